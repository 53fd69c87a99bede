package billing

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// ErrInvalidJSON is returned for a request body that is not a JSON object.
var ErrInvalidJSON = errors.New("invalid JSON")

// MaxTokensField bounds max_tokens, max_completion_tokens and
// thinking.budget_tokens: a larger value is refused as a bad request.
const MaxTokensField = MaxContextWindow

// RequestError is a request body whose billing fields break the gateway's
// strict rule: a field the gateway depends on appears more than once at its
// level (keys compared after decoding escapes) or has the wrong type. The
// gateway answers it with a 400 and never forwards the body.
type RequestError struct {
	Field   string // dotted path of the field, e.g. "stream_options.include_usage"
	Problem string // e.g. "appears more than once", "must be a boolean"
}

func (e *RequestError) Error() string { return fmt.Sprintf("%q %s", e.Field, e.Problem) }

// span is the position of a JSON value in the body: [at, end).
type span struct{ at, end int }

// RequestInfo is what the gateway reads from a request body. The body itself
// is forwarded unchanged but for the values RewriteRequest owns.
type RequestInfo struct {
	Model        string // model as sent by the client
	Stream       bool   // "stream": true
	MaxTokens    int64  // the larger of max_tokens and max_completion_tokens, 0 when both are absent
	HasMaxTokens bool   // max_tokens or max_completion_tokens is present
	IncludeUsage bool   // stream_options.include_usage is already true
	// ThinkingBudget is thinking.budget_tokens (Anthropic extended
	// thinking), 0 when absent.
	ThinkingBudget int64

	model, maxTok, maxCompl, streamOpt, usage span // value positions; at == 0 when absent
	start, end                                int  // positions of the root object's braces
}

// fieldKind is the JSON type a guarded field must have.
type fieldKind uint8

const (
	kString fieldKind = iota
	kBool
	kObject
	kArray
	kStringOrArray
	kTokens // an integer in 0..MaxTokensField
)

// topFields are the top-level fields the gateway depends on, with their type.
var topFields = [...]struct {
	name string
	kind fieldKind
}{
	{"model", kString}, {"stream", kBool}, {"stream_options", kObject}, {"max_tokens", kTokens},
	{"max_completion_tokens", kTokens}, {"messages", kArray}, {"system", kStringOrArray}, {"thinking", kObject},
}

// ReadRequest validates a request body and reads the fields billing needs.
// Any of them repeated at its level or wrongly typed is a *RequestError;
// null counts as absent for stream_options. Other fields are not looked at.
func ReadRequest(body []byte) (RequestInfo, error) {
	// JSON text is UTF-8 (RFC 8259): a body that is not is refused, so
	// that every reader downstream sees the same strings.
	if !gjson.ValidBytes(body) || !utf8.Valid(body) {
		return RequestInfo{}, ErrInvalidJSON
	}
	root := gjson.ParseBytes(body)
	if !root.IsObject() {
		return RequestInfo{}, ErrInvalidJSON
	}
	// gjson leaves Index 0 for a root with leading space: set it, so that
	// every value's Index is its offset in body.
	root.Index = len(body) - len(bytes.TrimLeft(body, " \t\r\n"))
	info := RequestInfo{start: root.Index, end: bytes.LastIndexByte(body, '}')} // only space may follow it
	var seen [len(topFields)]bool
	var err error
	root.ForEach(func(k, v gjson.Result) bool {
		for i, f := range topFields {
			if k.Str != f.name {
				continue
			}
			if seen[i] {
				err = &RequestError{f.name, "appears more than once"}
				return false
			}
			seen[i] = true
			err = info.read(body, f.name, f.kind, v)
			return err == nil
		}
		return true
	})
	if err != nil {
		return RequestInfo{}, err
	}
	return info, nil
}

// read checks one top-level field and records it in info.
func (info *RequestInfo) read(body []byte, name string, kind fieldKind, v gjson.Result) error {
	if v.Type == gjson.Null {
		// null is absent for the options a client may send as null; the
		// rewrite replaces it rather than add a second key.
		switch name {
		case "stream_options":
			info.streamOpt = spanOf(v)
			return nil
		case "max_tokens":
			info.maxTok = spanOf(v)
			return nil
		case "max_completion_tokens":
			info.maxCompl = spanOf(v)
			return nil
		}
	}
	if err := checkKind(name, kind, v); err != nil {
		return err
	}
	switch name {
	case "model":
		info.Model, info.model = v.Str, spanOf(v)
	case "stream":
		info.Stream = v.Type == gjson.True
	case "max_tokens", "max_completion_tokens":
		n := tokens(v)
		info.MaxTokens, info.HasMaxTokens = max(info.MaxTokens, n), true
		if name == "max_tokens" {
			info.maxTok = spanOf(v)
		} else {
			info.maxCompl = spanOf(v)
		}
	case "stream_options":
		info.streamOpt = spanOf(v)
		return readObject(v, name, "include_usage", kBool, func(u gjson.Result) {
			info.IncludeUsage, info.usage = u.Type == gjson.True, spanOf(u)
		})
	case "thinking":
		return readObject(v, name, "budget_tokens", kTokens, func(b gjson.Result) { info.ThinkingBudget = tokens(b) })
	}
	return nil
}

// readObject finds the one field key in object v (named parent), checks its
// kind and passes it to found; a repeated key is a *RequestError.
func readObject(v gjson.Result, parent, key string, kind fieldKind, found func(gjson.Result)) error {
	var n int
	var err error
	v.ForEach(func(k, x gjson.Result) bool {
		if k.Str != key {
			return true
		}
		if n++; n > 1 {
			err = &RequestError{parent + "." + key, "appears more than once"}
			return false
		}
		if err = checkKind(parent+"."+key, kind, x); err != nil {
			return false
		}
		found(x)
		return true
	})
	return err
}

func checkKind(name string, kind fieldKind, v gjson.Result) error {
	ok := false
	var want string
	switch kind {
	case kString:
		ok, want = v.Type == gjson.String, "must be a string"
	case kBool:
		ok, want = v.Type == gjson.True || v.Type == gjson.False, "must be a boolean"
	case kObject:
		ok, want = v.IsObject(), "must be an object"
	case kArray:
		ok, want = v.IsArray(), "must be an array"
	case kStringOrArray:
		ok, want = v.Type == gjson.String || v.IsArray(), "must be a string or an array"
	case kTokens:
		ok, want = tokens(v) >= 0, fmt.Sprintf("must be an integer from 0 to %d", MaxTokensField)
	}
	if !ok {
		return &RequestError{name, want}
	}
	return nil
}

// tokens returns v as a token count, or -1 when v is not a plain integer
// literal in 0..MaxTokensField (no sign, fraction or exponent).
func tokens(v gjson.Result) int64 {
	if v.Type != gjson.Number || len(v.Raw) == 0 || len(v.Raw) > 10 {
		return -1
	}
	for _, c := range []byte(v.Raw) {
		if c < '0' || c > '9' {
			return -1
		}
	}
	n, err := strconv.ParseInt(v.Raw, 10, 64)
	if err != nil || n > MaxTokensField {
		return -1
	}
	return n
}

func spanOf(v gjson.Result) span { return span{v.Index, v.Index + len(v.Raw)} }

// RewriteRequest returns body with "model" set to upstreamModel; for an
// OpenAI stream that does not already ask for it,
// stream_options.include_usage set to true, so that usage arrives; and,
// when maxTokens >= 0, max_tokens and max_completion_tokens lowered to at
// most maxTokens (max_tokens inserted when the body has neither). Values are
// replaced in place, wherever and however their keys are written; every
// other byte is kept as it is. info must come from ReadRequest(body). body is
// not modified; it is returned as is when nothing changes.
func RewriteRequest(api API, body []byte, info RequestInfo, upstreamModel string, maxTokens int64) ([]byte, error) {
	if info.end <= 0 || info.end >= len(body) || body[info.end] != '}' {
		return nil, errors.New("rewriting request: info does not match the body")
	}
	var edits [4]edit
	e := edits[:0]
	var add []byte // members to insert at the end of the root object
	if upstreamModel != info.Model {
		q := appendJSONString(nil, upstreamModel)
		if info.model.end > 0 {
			e = append(e, edit{info.model, q})
		} else {
			add = append(append(add, `,"model":`...), q...)
		}
	}
	if api == OpenAI && info.Stream && !info.IncludeUsage {
		switch {
		case info.usage.end > 0:
			e = append(e, edit{info.usage, []byte("true")})
		case info.streamOpt.end > 0 && body[info.streamOpt.at] == '{':
			in := span{info.streamOpt.at + 1, info.streamOpt.end - 1}
			e = append(e, edit{span{in.end, in.end}, members(body, in, []byte(`,"include_usage":true`))})
		case info.streamOpt.end > 0: // null
			e = append(e, edit{info.streamOpt, []byte(`{"include_usage":true}`)})
		default:
			add = append(add, `,"stream_options":{"include_usage":true}`...)
		}
	}
	if maxTokens >= 0 {
		e, add = capTokens(e, add, body, info, maxTokens)
	}
	if len(add) > 0 {
		e = append(e, edit{span{info.end, info.end}, members(body, span{info.start + 1, info.end}, add)})
	}
	if len(e) == 0 {
		return body, nil
	}
	return apply(body, e), nil
}

// capTokens adds the edits that keep the output cap at most n: each of
// max_tokens and max_completion_tokens present is lowered to n (a null one
// set to n), and max_tokens is added when neither is present.
func capTokens(e []edit, add, body []byte, info RequestInfo, n int64) ([]edit, []byte) {
	if info.maxTok.end == 0 && info.maxCompl.end == 0 {
		return e, strconv.AppendInt(append(add, `,"max_tokens":`...), n, 10)
	}
	for _, s := range [...]span{info.maxTok, info.maxCompl} {
		if s.end == 0 {
			continue
		}
		if v, err := strconv.ParseInt(string(body[s.at:s.end]), 10, 64); err != nil || v > n {
			e = append(e, edit{s, strconv.AppendInt(nil, n, 10)})
		}
	}
	return e, add
}

// members returns text, which starts with a comma, to insert before the
// closing brace of the object whose inside is body[in.at:in.end], without
// its comma when that object is empty.
func members(body []byte, in span, text []byte) []byte {
	for _, c := range body[in.at:in.end] {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return text
		}
	}
	return text[1:]
}

// edit replaces body[at:end] with text.
type edit struct {
	span
	text []byte
}

// apply returns a new body with the edits, which do not overlap, made.
func apply(body []byte, e []edit) []byte {
	for i := 1; i < len(e); i++ { // insertion sort by position: at most four
		for j := i; j > 0 && e[j].at < e[j-1].at; j-- {
			e[j], e[j-1] = e[j-1], e[j]
		}
	}
	size := len(body)
	for _, x := range e {
		size += len(x.text) - (x.end - x.at)
	}
	out := make([]byte, 0, size)
	last := 0
	for _, x := range e {
		out = append(out, body[last:x.at]...)
		out = append(out, x.text...)
		last = x.end
	}
	return append(out, body[last:]...)
}

// ForwardedSize bounds the size of what RewriteRequest makes of a body of n
// bytes for upstreamModel with a cap of at most MaxTokensField: the
// upstream counts its input tokens on that, not on the client's body.
func ForwardedSize(n int, upstreamModel string) int64 {
	return int64(n) + 6*int64(len(upstreamModel)) + 2 + rewriteGrowth
}

// rewriteGrowth is the most RewriteRequest adds besides the model's value.
const rewriteGrowth = int64(len(`,"model":`) + len(`,"stream_options":{"include_usage":true}`) + len(`,"max_tokens":1073741824`))

// appendJSONString appends s as a JSON string: quotes, backslashes and
// control characters escaped, invalid UTF-8 replaced by U+FFFD, as
// encoding/json writes it.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for _, r := range s { // ranging replaces invalid UTF-8 with U+FFFD
		switch {
		case r == '"' || r == '\\':
			b = append(b, '\\', byte(r))
		case r < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[r>>4], hex[r&0xf])
		default:
			b = utf8.AppendRune(b, r)
		}
	}
	return append(b, '"')
}
