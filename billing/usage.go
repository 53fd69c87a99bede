package billing

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
)

// DefaultMaxSSELine is the longest SSE line kept for parsing (1 MiB); longer
// lines are skipped (counted in StreamResult.Oversized).
const DefaultMaxSSELine = 1 << 20

// maxRetainedBuffer is the largest buffer capacity Reset keeps for reuse. A
// buffer grown past it by one unusually large event is dropped instead, so a
// pooled scanner does not pin that memory.
const maxRetainedBuffer = 64 << 10

// StreamResult is what an SSEScanner has read from a response stream.
type StreamResult struct {
	Usage     Usage // merged usage (see SSEScanner)
	HasUsage  bool  // at least one usage object was read
	Done      bool  // terminal event seen: Anthropic "message_stop" event; OpenAI "data: [DONE]"
	Errored   bool  // an error event was seen (Anthropic type "error"; OpenAI a chunk with a top-level "error" object)
	Events    int   // number of events (data payloads) processed
	Oversized int   // number of lines skipped because they exceeded MaxLine (and events dropped because their data did)
	TextBytes int64 // bytes of generated content seen in deltas, used to estimate output tokens when usage never arrives
	// Problem says whether Usage can be billed: UsageValid, UsageMissing
	// when no usage was read, or what is wrong with it (see UsageProblem).
	Problem UsageProblem
}

// SSEScanner extracts token usage from a server-sent-event response body as
// it streams past. It is fed a copy of the bytes (io.Writer) in chunks split
// anywhere, never fails, and never holds more than MaxLine bytes of a line.
//
// The stream is parsed as a WHATWG event stream: lines end in LF, CR or CRLF;
// the data lines of an event are joined with "\n" and the event is dispatched
// at a blank line; event, id, retry and comment lines are ignored, because the
// JSON payload carries the event type for both APIs. A line longer than
// MaxLine is skipped along with the event it belongs to.
//
// For Anthropic, the usage of message_start is merged with that of every
// later message_delta: output_tokens is replaced, and input_tokens and the
// two cache counts are replaced only when the delta reports them non-zero.
// For OpenAI, the last chunk with a usage object wins and is normalised as
// described on Usage. Only the top-level structure of each payload counts:
// a tool input or text mentioning "usage" is never read as usage.
//
// The result's Problem is sticky for Anthropic: a count that is negative,
// not a number or not an integer in any usage event makes the whole usage
// invalid, as does an input_tokens or output_tokens that no event reported.
// For OpenAI it is that of the usage object that won (see ParseUsageJSON
// for the rules). In both, the merged usage must fit in Window.
//
// Events that carry no usage are handled without allocating. An SSEScanner
// is not safe for concurrent use.
type SSEScanner struct {
	// MaxLine is the longest line, and the longest joined event data, kept
	// for parsing. Zero or less means DefaultMaxSSELine.
	MaxLine int
	// Window is the model's context window, which the usage must fit in;
	// zero or less means DefaultContextWindow. Result applies the value it
	// has when called.
	Window int64

	api       API
	res       StreamResult
	line      []byte       // the current line so far, while it spans writes
	data      []byte       // the data of the current event, lines joined with "\n"
	hasData   bool         // the current event has a data line (data may still be empty)
	skipLine  bool         // the current line exceeded MaxLine and is being discarded
	dropEvent bool         // the current event lost a line to MaxLine and will not be dispatched
	crPending bool         // the last byte written ended a line with CR; a following LF belongs to it
	sawLine   bool         // a line has ended, so a byte order mark is no longer expected
	problem   UsageProblem // what is wrong with the usage read so far (see the type's doc)
	inSet     bool         // Anthropic: some event reported input_tokens
	outSet    bool         // Anthropic: some event reported output_tokens
}

// NewSSEScanner returns a scanner for a response of the given API, with
// MaxLine set to DefaultMaxSSELine.
func NewSSEScanner(api API) *SSEScanner {
	return &SSEScanner{
		MaxLine: DefaultMaxSSELine,
		api:     api,
		data:    make([]byte, 0, 1024),
	}
}

// Reset prepares s for a new response of the given API, keeping its buffers
// (unless one unusual event made them large), MaxLine and Window.
func (s *SSEScanner) Reset(api API) {
	line, data := s.line[:0], s.data[:0]
	if cap(line) > maxRetainedBuffer {
		line = nil
	}
	if cap(data) > maxRetainedBuffer {
		data = nil
	}
	*s = SSEScanner{MaxLine: s.MaxLine, Window: s.Window, api: api, line: line, data: data}
}

func (s *SSEScanner) maxLine() int {
	if s.MaxLine <= 0 {
		return DefaultMaxSSELine
	}
	return s.MaxLine
}

// Write parses p as the next part of the stream. It always returns len(p), nil.
func (s *SSEScanner) Write(p []byte) (int, error) {
	n := len(p)
	if n == 0 {
		return 0, nil
	}
	if s.crPending {
		s.crPending = false
		if p[0] == '\n' {
			p = p[1:]
		}
	}
	// nl is the index of the next LF in p, -1 if there is none; it is kept
	// across lines so that a run of CR-terminated lines is scanned once.
	nl := -2
	for off := 0; off < len(p); {
		if nl != -1 && nl < off {
			if nl = bytes.IndexByte(p[off:], '\n'); nl >= 0 {
				nl += off
			}
		}
		end := len(p)
		if nl >= 0 {
			end = nl
		}
		if cr := bytes.IndexByte(p[off:end], '\r'); cr >= 0 {
			end = off + cr
		} else if nl < 0 {
			s.appendPartial(p[off:])
			break
		}
		s.endLine(p[off:end])
		off = end + 1
		if p[end] == '\r' {
			if off == len(p) {
				s.crPending = true
			} else if p[off] == '\n' {
				off++
			}
		}
	}
	return n, nil
}

// Result returns what has been read so far. It may be called at any time and
// does not change s: an event still waiting for its blank line, and a last
// line still waiting for its line ending, are included as if the stream had
// ended there.
func (s *SSEScanner) Result() StreamResult {
	if !s.hasData && len(s.line) == 0 {
		return s.result()
	}
	c := *s // dispatching on a copy only reads c.data and reslices it
	if !c.skipLine && len(c.line) > 0 {
		c.data = bytes.Clone(s.data) // the last line may be appended to it
		c.processLine(c.line)
	}
	c.dispatch()
	return c.result()
}

// result returns s.res with its Problem decided.
func (s *SSEScanner) result() StreamResult {
	r := s.res
	switch {
	case !r.HasUsage:
		r.Problem = UsageMissing
	case s.problem != UsageValid:
		r.Problem = s.problem
	case s.api == Anthropic && !(s.inSet && s.outSet):
		r.Problem = UsageFieldMissing
	default:
		r.Problem = r.Usage.CheckWindow(s.Window)
	}
	return r
}

// appendPartial keeps seg, the start of a line whose end is not yet written.
func (s *SSEScanner) appendPartial(seg []byte) {
	switch {
	case s.skipLine:
	case len(s.line)+len(seg) > s.maxLine():
		s.lineTooLong()
		s.skipLine = true
		s.line = s.line[:0]
	default:
		s.line = appendBounded(s.line, seg, s.maxLine())
	}
}

// endLine handles the end of a line whose last part is seg.
func (s *SSEScanner) endLine(seg []byte) {
	switch {
	case s.skipLine:
		s.skipLine = false
	case len(s.line) > 0:
		if len(s.line)+len(seg) > s.maxLine() {
			s.lineTooLong()
		} else {
			s.line = appendBounded(s.line, seg, s.maxLine())
			s.processLine(s.line)
		}
		s.line = s.line[:0]
	case len(seg) > s.maxLine():
		s.lineTooLong()
	default:
		s.processLine(seg)
	}
	s.sawLine = true
}

// lineTooLong counts a skipped line and drops the event it belongs to, whose
// data could otherwise be misread without it.
func (s *SSEScanner) lineTooLong() {
	s.res.Oversized++
	s.dropEvent = true
	s.data = s.data[:0]
	s.hasData = false
}

// processLine interprets one complete line, without its line ending.
func (s *SSEScanner) processLine(line []byte) {
	if !s.sawLine {
		line = bytes.TrimPrefix(line, []byte("\uFEFF"))
	}
	if len(line) == 0 {
		s.dispatch()
		return
	}
	if line[0] == ':' {
		return // comment
	}
	field, value := line, []byte(nil)
	if i := bytes.IndexByte(line, ':'); i >= 0 {
		field, value = line[:i], line[i+1:]
		if len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
	}
	if string(field) != "data" || s.dropEvent {
		return
	}
	limit := s.maxLine()
	if s.hasData {
		if len(s.data)+1+len(value) > limit {
			s.lineTooLong()
			return
		}
		s.data = appendBounded(s.data, []byte{'\n'}, limit)
	}
	// A line is at most limit bytes, so its value alone always fits.
	s.data = appendBounded(s.data, value, limit)
	s.hasData = true
}

// appendBounded appends p to buf like append, but grows buf to a capacity
// of no more than limit (or len(buf)+len(p), if that is more).
func appendBounded(buf, p []byte, limit int) []byte {
	if n := len(buf) + len(p); n > cap(buf) {
		grown := make([]byte, len(buf), max(min(2*cap(buf), limit), n, min(512, limit)))
		copy(grown, buf)
		buf = grown
	}
	return append(buf, p...)
}

// dispatch ends the current event, processing its data if it has any.
func (s *SSEScanner) dispatch() {
	if s.hasData && !s.dropEvent {
		s.res.Events++
		switch s.api {
		case Anthropic:
			s.anthropicEvent(s.data)
		case OpenAI:
			s.openAIEvent(s.data)
		}
	}
	s.data = s.data[:0]
	s.hasData = false
	s.dropEvent = false
}

// anthropicEvent handles one Messages API stream event. Every event is routed
// and content deltas are measured by the allocation-free walker; the two
// events that carry usage are decoded with encoding/json, which has the last
// word, and the terminal and error events are validated with json.Valid.
func (s *SSEScanner) anthropicEvent(data []byte) {
	var typ, delta []byte
	it := iterate(data, '{')
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case jsonStringIs(k, "type"):
			typ = v
		case jsonStringIs(k, "delta"):
			delta = v
		}
	}
	if it.bad {
		return
	}
	switch {
	case jsonStringIs(typ, "content_block_delta"):
		s.res.TextBytes += anthropicDeltaBytes(delta)
	case jsonStringIs(typ, "message_start"), jsonStringIs(typ, "message_delta"):
		s.anthropicUsage(data)
	case jsonStringIs(typ, "message_stop"):
		// For valid JSON the walker's reading of "type" is exact.
		s.res.Done = s.res.Done || json.Valid(data)
	case jsonStringIs(typ, "error"):
		s.res.Errored = s.res.Errored || json.Valid(data)
	}
}

// anthropicUsage merges the usage of a message_start or message_delta event.
func (s *SSEScanner) anthropicUsage(data []byte) {
	var ev struct {
		Type    string `json:"type"`
		Message *struct {
			Usage *anthropicUsage `json:"usage"`
		} `json:"message"`
		Usage *anthropicUsage `json:"usage"`
	}
	ok, typeErr := decodeLenient(data, &ev)
	if !ok {
		return
	}
	var u *anthropicUsage
	switch ev.Type {
	case "message_start":
		if ev.Message != nil && ev.Message.Usage != nil {
			u = ev.Message.Usage
			s.res.Usage = u.usage()
			s.inSet, s.outSet = u.InputTokens.set, u.OutputTokens.set
		}
	case "message_delta":
		if u = ev.Usage; u != nil {
			s.mergeDelta(u)
		}
	default:
		return
	}
	if u != nil {
		s.res.HasUsage = true
		s.noteProblem(u.fieldProblem())
	}
	if typeErr {
		s.noteProblem(UsageNotNumber) // a usage or message that is not an object
	}
}

// mergeDelta merges the usage of a message_delta event.
func (s *SSEScanner) mergeDelta(u *anthropicUsage) {
	r := &s.res.Usage
	if u.OutputTokens.set {
		r.Output = u.OutputTokens.n
		s.outSet = true
	}
	// A zero here is taken as "not reported": some upstreams send 0
	// rather than repeat message_start's numbers.
	if u.InputTokens.n > 0 {
		r.Input = u.InputTokens.n
	}
	s.inSet = s.inSet || u.InputTokens.set
	if u.CacheCreationInputTokens.n > 0 {
		r.CacheWrite = u.CacheCreationInputTokens.n
	}
	if u.CacheReadInputTokens.n > 0 {
		r.CacheRead = u.CacheReadInputTokens.n
	}
}

// noteProblem keeps the first problem found in an Anthropic stream.
func (s *SSEScanner) noteProblem(p UsageProblem) {
	if s.problem == UsageValid {
		s.problem = p
	}
}

// openAIEvent handles one Chat Completions stream payload.
func (s *SSEScanner) openAIEvent(data []byte) {
	if string(bytes.TrimSpace(data)) == "[DONE]" {
		s.res.Done = true
		return
	}
	var choices []byte
	decode := false
	it := iterate(data, '{')
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		switch {
		case jsonStringIs(k, "choices"):
			choices = v
		case jsonStringIs(k, "usage"), jsonStringIs(k, "error"):
			// Most chunks say "usage":null; only an object is worth decoding.
			decode = decode || v[0] == '{'
		}
	}
	if it.bad {
		return
	}
	s.res.TextBytes += openAIChoicesBytes(choices)
	if !decode {
		return
	}
	var ev struct {
		Usage *openAIUsage    `json:"usage"`
		Error json.RawMessage `json:"error"`
	}
	ok, typeErr := decodeLenient(data, &ev)
	if !ok {
		return
	}
	if ev.Usage != nil {
		s.res.Usage = ev.Usage.usage()
		s.res.HasUsage = true
		// The last usage object wins, and its problem with it. Only
		// its prompt_tokens_details can fail to decode.
		s.problem = ev.Usage.problem()
		if typeErr && s.problem == UsageValid {
			s.problem = UsageNotNumber
		}
	}
	if len(ev.Error) > 0 && ev.Error[0] == '{' {
		s.res.Errored = true
	}
}

// decodeLenient decodes data into v. It reports false for invalid JSON but
// accepts a value of an unexpected type somewhere in it (json leaves that
// field alone and fills in the rest), which it reports in typeErr.
func decodeLenient(data []byte, v any) (ok, typeErr bool) {
	err := json.Unmarshal(data, v)
	if err == nil {
		return true, false
	}
	_, ok = errors.AsType[*json.UnmarshalTypeError](err)
	return ok, ok
}

// anthropicDeltaBytes returns the length of the generated content in the
// delta object of a content_block_delta event.
func anthropicDeltaBytes(delta []byte) int64 {
	var n int64
	it := iterate(delta, '{')
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		if jsonStringIs(k, "text") || jsonStringIs(k, "thinking") || jsonStringIs(k, "partial_json") {
			n += stringLen(v)
		}
	}
	return n
}

// openAIChoicesBytes returns the length of the generated content in the
// choices array of a chunk: each delta's content, reasoning_content and tool
// call arguments.
func openAIChoicesBytes(choices []byte) int64 {
	var n int64
	cs := iterate(choices, '[')
	for _, c, ok := cs.next(); ok; _, c, ok = cs.next() {
		choice := iterate(c, '{')
		for k, delta, ok := choice.next(); ok; k, delta, ok = choice.next() {
			if !jsonStringIs(k, "delta") {
				continue
			}
			d := iterate(delta, '{')
			for k, v, ok := d.next(); ok; k, v, ok = d.next() {
				switch {
				case jsonStringIs(k, "content"), jsonStringIs(k, "reasoning_content"):
					n += stringLen(v)
				case jsonStringIs(k, "tool_calls"):
					n += toolCallsBytes(v)
				}
			}
		}
	}
	return n
}

// toolCallsBytes returns the length of the function arguments in a
// tool_calls array.
func toolCallsBytes(calls []byte) int64 {
	var n int64
	cs := iterate(calls, '[')
	for _, c, ok := cs.next(); ok; _, c, ok = cs.next() {
		call := iterate(c, '{')
		for k, fn, ok := call.next(); ok; k, fn, ok = call.next() {
			if !jsonStringIs(k, "function") {
				continue
			}
			f := iterate(fn, '{')
			for k, v, ok := f.next(); ok; k, v, ok = f.next() {
				if jsonStringIs(k, "arguments") {
					n += stringLen(v)
				}
			}
		}
	}
	return n
}

// ParseUsageJSON reads the top-level "usage" object of a non-streaming
// response body and says whether it can be billed (see UsageProblem):
// UsageMissing when the body is valid JSON without a usage object (or with
// "usage": null); UsageNotNumber when "usage" or a part of it is not of the
// type the API specifies; for a count, UsageNegative, UsageNotNumber or
// UsageNotInteger (12.0 and 1e3 are integers); UsageFieldMissing when a
// required count (Anthropic input_tokens and output_tokens, OpenAI
// prompt_tokens and completion_tokens) is absent or null; for OpenAI,
// UsageCacheExceeds when prompt_tokens_details.cached_tokens is above
// prompt_tokens, which includes it; and UsageBeyondWindow when the four
// counts of the usage, normalised as described on Usage, add up to more
// than window (DefaultContextWindow when window <= 0). Anthropic reports
// its cache counts apart from input_tokens, so there the whole is their sum
// and only the window bounds them. err is non-nil for invalid JSON (or an
// API other than OpenAI and Anthropic).
//
// A count with a problem is read as 0 when negative and as the nearest
// integer towards zero otherwise, at most math.MaxInt64; the caller bills
// such a usage by another rule.
func ParseUsageJSON(api API, body []byte, window int64) (u Usage, problem UsageProblem, err error) {
	if api != OpenAI && api != Anthropic {
		return Usage{}, UsageMissing, fmt.Errorf("billing: cannot parse usage for API %s", api)
	}
	if !json.Valid(body) {
		// Let encoding/json say what is wrong; it checks the syntax before
		// it decodes anything.
		err := json.Unmarshal(body, new(struct{}))
		if err == nil {
			err = errors.New("billing: invalid JSON")
		}
		return Usage{}, UsageMissing, err
	}
	// The body is valid, so the walker's view of its top level is exact.
	var raw []byte
	it := iterate(body, '{')
	for k, v, ok := it.next(); ok; k, v, ok = it.next() {
		if jsonStringIs(k, "usage") {
			raw = v // the last one wins, as with encoding/json
		}
	}
	switch {
	case len(raw) == 0 || string(raw) == "null":
		return Usage{}, UsageMissing, nil
	case raw[0] != '{':
		return Usage{}, UsageNotNumber, nil
	}
	if api == Anthropic {
		var au anthropicUsage
		_, typeErr := decodeLenient(raw, &au) // raw is valid JSON
		u, problem = au.usage(), au.problem()
		if typeErr && problem == UsageValid {
			problem = UsageNotNumber
		}
	} else {
		var ou openAIUsage
		_, typeErr := decodeLenient(raw, &ou)
		u, problem = ou.usage(), ou.problem()
		if typeErr && problem == UsageValid {
			problem = UsageNotNumber
		}
	}
	if problem == UsageValid {
		problem = u.CheckWindow(window)
	}
	return u, problem, nil
}

// EstimateTokens returns a conservative token estimate for n bytes of text:
// ceil(n/4), 0 for n <= 0.
func EstimateTokens(n int64) int64 {
	if n <= 0 {
		return 0
	}
	return n/4 + min(n%4, 1)
}

// anthropicUsage is the usage object of the Messages API.
type anthropicUsage struct {
	InputTokens              count `json:"input_tokens"`
	CacheCreationInputTokens count `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     count `json:"cache_read_input_tokens"`
	OutputTokens             count `json:"output_tokens"`
}

// fieldProblem returns the first problem of a count, UsageValid if none.
func (u *anthropicUsage) fieldProblem() UsageProblem {
	return firstProblem(u.InputTokens, u.CacheCreationInputTokens, u.CacheReadInputTokens, u.OutputTokens)
}

// problem is fieldProblem, then UsageFieldMissing for a required count that
// is absent.
func (u *anthropicUsage) problem() UsageProblem {
	if p := u.fieldProblem(); p != UsageValid {
		return p
	}
	if !u.InputTokens.set || !u.OutputTokens.set {
		return UsageFieldMissing
	}
	return UsageValid
}

func (u *anthropicUsage) usage() Usage {
	return Usage{
		Input:      u.InputTokens.n,
		Output:     u.OutputTokens.n,
		CacheWrite: u.CacheCreationInputTokens.n,
		CacheRead:  u.CacheReadInputTokens.n,
	}
}

// openAIUsage is the usage object of the Chat Completions API, with the
// cache_creation_input_tokens field LiteLLM adds for Anthropic upstreams.
type openAIUsage struct {
	PromptTokens        count `json:"prompt_tokens"`
	CompletionTokens    count `json:"completion_tokens"`
	PromptTokensDetails struct {
		CachedTokens count `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
	CacheCreationInputTokens count `json:"cache_creation_input_tokens"`
}

// problem returns the first problem of a count, then UsageFieldMissing for
// a required count that is absent, then UsageCacheExceeds; UsageValid if
// none.
func (u *openAIUsage) problem() UsageProblem {
	cached := u.PromptTokensDetails.CachedTokens
	if p := firstProblem(u.PromptTokens, u.CompletionTokens, cached, u.CacheCreationInputTokens); p != UsageValid {
		return p
	}
	switch {
	case !u.PromptTokens.set || !u.CompletionTokens.set:
		return UsageFieldMissing
	case cached.n > u.PromptTokens.n:
		return UsageCacheExceeds
	}
	return UsageValid
}

func (u *openAIUsage) usage() Usage {
	cached, written := u.PromptTokensDetails.CachedTokens.n, u.CacheCreationInputTokens.n
	// All counts are non-negative, so neither subtraction can overflow.
	in := max(u.PromptTokens.n-cached, 0)
	in = max(in-written, 0)
	return Usage{
		Input:      in,
		Output:     u.CompletionTokens.n,
		CacheWrite: written,
		CacheRead:  cached,
	}
}

// count is a token count as an API reports it. A number sets it: n is the
// number clamped to [0, math.MaxInt64] and truncated towards zero, and bad
// says why it cannot be billed as is (negative, fractional, or too large for
// any context window). A value of another type leaves it unset with bad
// UsageNotNumber; null, like an absent field, leaves it unset and valid.
type count struct {
	n   int64
	set bool
	bad UsageProblem
}

// UnmarshalJSON implements json.Unmarshaler. It never fails, so one odd field
// cannot cost the rest of the usage object.
func (c *count) UnmarshalJSON(b []byte) error {
	switch {
	case string(b) == "null":
		return nil
	case len(b) == 0 || (b[0] != '-' && (b[0] < '0' || b[0] > '9')):
		c.bad = UsageNotNumber
		return nil
	}
	if n, err := strconv.ParseInt(string(b), 10, 64); err == nil {
		*c = count{n: max(n, 0), set: true}
		if n < 0 {
			c.bad = UsageNegative
		}
		return nil
	}
	f, err := strconv.ParseFloat(string(b), 64) // 1e3, 12.0 or out of range
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		c.bad = UsageNotNumber
		return nil
	}
	*c = count{set: true}
	switch {
	case f < 0:
		c.bad = UsageNegative
	case !(f < math.MaxInt64): // also +Inf; NaN is not JSON
		c.n, c.bad = math.MaxInt64, UsageBeyondWindow
	default:
		c.n = int64(f)
		if float64(c.n) != f {
			c.bad = UsageNotInteger
		}
	}
	return nil
}

// firstProblem returns the first count's problem, UsageValid if none has one.
func firstProblem(cs ...count) UsageProblem {
	for _, c := range cs {
		if c.bad != UsageValid {
			return c.bad
		}
	}
	return UsageValid
}

// A jsonIter walks the members of one JSON object or array without
// allocating. It checks only as much syntax as it needs to find where each
// value ends, so it is used to route and measure events; anything billed is
// decoded by encoding/json, which validates it.
type jsonIter struct {
	b     []byte
	i     int
	close byte // '}' or ']'
	n     int  // members returned so far
	done  bool // no more members
	bad   bool // the value is malformed (or not of the kind asked for)
}

// iterate returns an iterator over v, which should be an object (open '{')
// or an array (open '[').
func iterate(v []byte, open byte) jsonIter {
	i := skipSpace(v, 0)
	if i >= len(v) || v[i] != open {
		return jsonIter{done: true, bad: true}
	}
	return jsonIter{b: v, i: i + 1, close: open + 2} // '{'+2 == '}', '['+2 == ']'
}

// next returns the next member: for an object its key (quoted, as written)
// and value, for an array a nil key and the element. ok is false at the end
// or at malformed input, which also sets bad.
func (it *jsonIter) next() (key, val []byte, ok bool) {
	if it.done {
		return nil, nil, false
	}
	b := it.b
	i := skipSpace(b, it.i)
	if i < len(b) && b[i] == it.close {
		it.done = true
		return nil, nil, false
	}
	if it.n > 0 {
		if i >= len(b) || b[i] != ',' {
			return it.fail()
		}
		i = skipSpace(b, i+1)
	}
	if it.close == '}' {
		if i >= len(b) || b[i] != '"' {
			return it.fail()
		}
		end := skipString(b, i)
		if end < 0 {
			return it.fail()
		}
		key = b[i:end]
		i = skipSpace(b, end)
		if i >= len(b) || b[i] != ':' {
			return it.fail()
		}
		i = skipSpace(b, i+1)
	}
	end := skipValue(b, i)
	if end < 0 {
		return it.fail()
	}
	it.i = end
	it.n++
	return key, b[i:end], true
}

func (it *jsonIter) fail() (key, val []byte, ok bool) {
	it.done, it.bad = true, true
	return nil, nil, false
}

// skipSpace returns the index of the first byte at or after i that is not
// JSON whitespace.
func skipSpace(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

// skipValue returns the index just past the JSON value starting at b[i], or
// -1 if there is none.
func skipValue(b []byte, i int) int {
	if i >= len(b) {
		return -1
	}
	switch b[i] {
	case '"':
		return skipString(b, i)
	case '{', '[':
		return skipContainer(b, i)
	}
	j := i // a number, true, false or null
	for j < len(b) {
		switch b[j] {
		case ',', '}', ']', ':', '"', '{', '[', ' ', '\t', '\n', '\r':
			if j == i {
				return -1
			}
			return j
		}
		j++
	}
	if j == i {
		return -1
	}
	return j
}

// skipString returns the index just past the JSON string starting at b[i]
// (which is '"'), or -1 if it is not terminated.
func skipString(b []byte, i int) int {
	j := i + 1
	// Most strings in an event are short: a byte loop beats the call
	// overhead of IndexByte for them, which then takes over for long ones.
	for n := min(len(b), j+32); j < n; j++ {
		switch b[j] {
		case '"':
			return j + 1
		case '\\':
			j++
		}
	}
	for j < len(b) {
		q := bytes.IndexByte(b[j:], '"')
		if q < 0 {
			return -1
		}
		q += j
		// j is never inside an escape, so the backslashes from j to q
		// decide whether the quote is escaped.
		escaped := false
		for k := q - 1; k >= j && b[k] == '\\'; k-- {
			escaped = !escaped
		}
		if !escaped {
			return q + 1
		}
		j = q + 1
	}
	return -1
}

// skipContainer returns the index just past the object or array starting at
// b[i], or -1 if it is not closed. Brackets are counted, not matched.
func skipContainer(b []byte, i int) int {
	depth := 0
	for j := i; j < len(b); j++ {
		switch b[j] {
		case '"':
			end := skipString(b, j)
			if end < 0 {
				return -1
			}
			j = end - 1
		case '{', '[':
			depth++
		case '}', ']':
			if depth--; depth == 0 {
				return j + 1
			}
		}
	}
	return -1
}

// jsonStringIs reports whether raw, a JSON value as written, is the string s.
func jsonStringIs(raw []byte, s string) bool {
	if len(raw) < 2 || raw[0] != '"' {
		return false
	}
	inner := raw[1 : len(raw)-1]
	// An escape sequence is longer than what it stands for, so only a
	// longer string can be an escaped spelling of s.
	if len(inner) <= len(s) {
		return string(inner) == s
	}
	if bytes.IndexByte(inner, '\\') < 0 {
		return false
	}
	var str string // escaped: rare enough to decode properly
	return json.Unmarshal(raw, &str) == nil && str == s
}

// stringLen returns the length of the JSON string raw as written, without
// its quotes, or 0 if raw is not a string.
func stringLen(raw []byte) int64 {
	if len(raw) < 2 || raw[0] != '"' {
		return 0
	}
	return int64(len(raw) - 2)
}
