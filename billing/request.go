package billing

import (
	"errors"
	"fmt"

	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
)

// ErrInvalidJSON is returned for a request body that is not a JSON object.
var ErrInvalidJSON = errors.New("invalid JSON")

// RequestInfo is what the gateway reads from a request body. The body itself
// is forwarded unchanged but for the model (and, for OpenAI streams, the
// usage option).
type RequestInfo struct {
	Model        string // model as sent by the client
	Stream       bool   // "stream": true
	MaxTokens    int64  // max_tokens (or max_completion_tokens), 0 when absent
	IncludeUsage bool   // stream_options.include_usage is already true
	hasStreamOpt bool   // stream_options is present and an object
}

// guarded are the top-level fields whose value decides billing; a body that
// repeats one of them is refused, because JSON parsers disagree on which
// duplicate wins and the upstream must see what we priced.
var guarded = [...]string{"model", "stream", "stream_options", "max_tokens", "max_completion_tokens"}

// ReadRequest validates a request body and reads the fields billing needs.
func ReadRequest(body []byte) (RequestInfo, error) {
	if !gjson.ValidBytes(body) {
		return RequestInfo{}, ErrInvalidJSON
	}
	root := gjson.ParseBytes(body)
	if !root.IsObject() {
		return RequestInfo{}, ErrInvalidJSON
	}
	var info RequestInfo
	var seen [len(guarded)]int
	var err error
	root.ForEach(func(k, v gjson.Result) bool {
		for i, g := range guarded {
			if k.Str != g {
				continue
			}
			if seen[i]++; seen[i] > 1 {
				err = fmt.Errorf("duplicate %q field", g)
				return false
			}
			switch g {
			case "model":
				if v.Type != gjson.String {
					err = errors.New(`"model" must be a string`)
					return false
				}
				info.Model = v.Str
			case "stream":
				info.Stream = v.Type == gjson.True
			case "stream_options":
				if v.IsObject() {
					info.hasStreamOpt = true
					info.IncludeUsage = v.Get("include_usage").Type == gjson.True
				}
			case "max_tokens", "max_completion_tokens":
				if v.Type == gjson.Number && v.Int() > info.MaxTokens {
					info.MaxTokens = v.Int()
				}
			}
		}
		return true
	})
	if err != nil {
		return RequestInfo{}, err
	}
	return info, nil
}

// RewriteRequest returns body with "model" set to upstreamModel and, for an
// OpenAI stream that does not already ask for it,
// stream_options.include_usage set to true so that usage arrives. Every
// other byte is kept as it is. body is not modified.
func RewriteRequest(api API, body []byte, info RequestInfo, upstreamModel string) ([]byte, error) {
	out := body
	var err error
	if upstreamModel != info.Model {
		out, err = sjson.SetBytes(body, "model", upstreamModel)
		if err != nil {
			return nil, fmt.Errorf("rewriting model: %w", err)
		}
	}
	if api == OpenAI && info.Stream && !info.IncludeUsage {
		if info.hasStreamOpt {
			out, err = sjson.SetBytes(out, "stream_options.include_usage", true)
		} else {
			out, err = sjson.SetRawBytes(out, "stream_options", []byte(`{"include_usage":true}`))
		}
		if err != nil {
			return nil, fmt.Errorf("asking for stream usage: %w", err)
		}
	}
	return out, nil
}
