// Package standin is a stand-in for the OpenHands LLM proxy, the LiteLLM
// deployment the billing gateway forwards to. It speaks both APIs the
// gateway bills, POST /v1/messages (Anthropic) and POST
// /v1/chat/completions (OpenAI), streaming and not, and answers with the
// real recorded responses of package fixtures, byte for byte (the "model"
// field is left as recorded).
//
// Requests are controlled with headers, which Caddy's reverse_proxy passes
// through:
//
//   - X-Standin-Fixture: <name> picks the fixture (default ant-text on
//     /v1/messages, oai-text on /v1/chat/completions).
//   - X-Standin-Status: <code> answers that status with a real-shaped error
//     body instead; the value "budget" answers LiteLLM's 400
//     budget_exceeded.
//   - X-Standin-Cut-After: <n> cuts the connection after n events of a
//     stream (or n bytes of a non-stream body), without a clean end.
//   - X-Standin-Event-Delay: <duration> overrides Options.EventDelay.
//   - X-Standin-Usage: <json> replaces the usage object of the answer with
//     the given JSON value, as is (any value: an object with absurd
//     counts, or null): the top-level "usage" of a JSON body, and of the
//     final usage event of a stream (OpenAI: the usage chunk, sent even
//     without include_usage; Anthropic: the last message_delta, while
//     message_start keeps its own). Invalid JSON is a 400.
//   - X-Standin-Long-Line: <n> adds to a stream, after its first event, one
//     event whose data line is n bytes long (a JSON object padded with a
//     string; Anthropic: a ping event), as a runaway upstream might send.
//   - X-Standin-Bound: most|over answers a non-streaming Anthropic request
//     with the most usage a compliant upstream may report, or more output
//     than max_tokens (see HeaderBound).
//
// and, for when headers cannot be used, with [Server.SetKeyStatus] (an
// upstream key that fails) and [Server.SetDefaultFixture].
package standin

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tidwall/sjson"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
)

// Request headers that steer the stand-in.
const (
	HeaderFixture    = "X-Standin-Fixture"
	HeaderStatus     = "X-Standin-Status"
	HeaderCutAfter   = "X-Standin-Cut-After"
	HeaderEventDelay = "X-Standin-Event-Delay"
	HeaderUsage      = "X-Standin-Usage"
	// HeaderGarbage: "html" answers 200 with an HTML page (text/html),
	// "text" 200 with a non-JSON body labelled application/json: an
	// upstream (or a proxy in front of it) that breaks the API's contract.
	HeaderGarbage = "X-Standin-Garbage"
	// HeaderBound: "most" answers a non-streaming Anthropic request with
	// a minimal message whose usage is the most a compliant upstream may
	// report: one input token per byte of the request body, and the
	// request's max_tokens of output. "over" reports 100 more output tokens
	// than max_tokens (an upstream that breaks its contract).
	HeaderBound = "X-Standin-Bound"
	// HeaderLongLine: "<n>" adds one event with an n-byte data line to a
	// stream, after its first event.
	HeaderLongLine = "X-Standin-Long-Line"
	// HeaderFixtureUsed is set on every answer replayed from a fixture: the
	// name of the fixture actually replayed (after any fallback).
	HeaderFixtureUsed = "X-Standin-Fixture-Used"
)

// The API paths the stand-in serves.
const (
	PathMessages        = "/v1/messages"
	PathChatCompletions = "/v1/chat/completions"
	// PathCountTokens answers {"input_tokens": n} with n = CountTokens(body),
	// as Anthropic's token counting endpoint does, after the same key checks.
	PathCountTokens = "/v1/messages/count_tokens"
	// PathModels (GET) lists the models; it answers 401 for an unknown key
	// and the status set with SetKeyStatus when that is 401 or 403, as a
	// revoked key gets on every route.
	PathModels = "/v1/models"
)

// StatusBudget is the X-Standin-Status (and SetKeyStatus) value that
// answers LiteLLM's 400 budget_exceeded error.
const StatusBudget = "budget"

// StatusHang (X-Standin-Status or SetKeyStatus) makes the stand-in accept
// the request and never answer, until the caller gives up: a key whose
// requests hang past the gateway's timeout.
const StatusHang = "hang"

// StatusDrop makes the stand-in close the connection without answering:
// a transport error, as a refused or reset connection gives.
const StatusDrop = "drop"

// maxBody bounds the request bodies the stand-in reads.
const maxBody = 32 << 20

// Options configures a Server.
type Options struct {
	// Keys are the accepted upstream bearer tokens (Authorization: Bearer
	// or x-api-key). With no keys every request is refused with 401.
	Keys []string
	// EventDelay is the pause between two events of a stream.
	EventDelay time.Duration
	// Logger receives one record per request at DEBUG; nil discards.
	Logger *slog.Logger
}

// Recorded is a copy of one request the stand-in received.
type Recorded struct {
	Method string
	Path   string
	Query  string // the raw query string
	Header http.Header
	Body   []byte
	Time   time.Time
}

// Server is the stand-in, an http.Handler. Its methods are safe for
// concurrent use.
type Server struct {
	eventDelay time.Duration
	log        *slog.Logger

	mu        sync.Mutex
	keys      map[string]bool
	keyStatus map[string]string
	defaults  map[string]string // api -> fixture name
	reqs      []Recorded

	active sync.WaitGroup
}

// New returns a stand-in server configured by opts.
func New(opts Options) *Server {
	s := &Server{
		eventDelay: opts.EventDelay,
		log:        opts.Logger,
		keys:       map[string]bool{},
		keyStatus:  map[string]string{},
		defaults:   map[string]string{fixtures.Anthropic: "ant-text", fixtures.OpenAI: "oai-text"},
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	for _, k := range opts.Keys {
		s.keys[k] = true
	}
	return s
}

// SetKeys replaces the accepted upstream keys.
func (s *Server) SetKeys(keys ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys = map[string]bool{}
	for _, k := range keys {
		s.keys[k] = true
	}
}

// SetKeyStatus makes every authenticated request made with the upstream key
// key fail as the header X-Standin-Status: status would ("429", "402",
// StatusBudget, ...). An empty status clears it. It is how a test makes one
// key of the pool fail while the others work.
func (s *Server) SetKeyStatus(key, status string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if status == "" {
		delete(s.keyStatus, key)
		return
	}
	s.keyStatus[key] = status
}

// SetDefaultFixture sets the fixture replayed when a request names none,
// for its API (fixtures.Anthropic or fixtures.OpenAI).
func (s *Server) SetDefaultFixture(name string) error {
	f, ok := fixtures.Lookup(name)
	if !ok {
		return fmt.Errorf("standin: unknown fixture %q", name)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.defaults[f.API] = name
	return nil
}

// Requests returns a copy of every request received since New or the last
// Reset, in arrival order.
func (s *Server) Requests() []Recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Recorded, len(s.reqs))
	for i, r := range s.reqs {
		out[i] = Recorded{Method: r.Method, Path: r.Path, Query: r.Query, Header: r.Header.Clone(), Body: bytes.Clone(r.Body), Time: r.Time}
	}
	return out
}

// Reset forgets the recorded requests.
func (s *Server) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.reqs = nil
}

// Start serves the stand-in on a free port of 127.0.0.1 with net/http and
// returns its base URL ("http://127.0.0.1:<port>", no trailing slash) and
// a function that stops it. It panics if it cannot listen.
func (s *Server) Start() (url string, closeFn func()) {
	url, closeFn, err := s.Listen("127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	return url, closeFn
}

// Listen is Start on a given address ("127.0.0.1:0" for a free port).
// closeFn closes the listener and every connection (cutting the streams in
// progress) and waits, up to 5 seconds, for the Server's handlers to return
// (those serving other listeners of the same Server included).
func (s *Server) Listen(addr string) (url string, closeFn func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return "", nil, fmt.Errorf("standin: listen on %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           s,
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln) // returns http.ErrServerClosed on Close
	}()
	var once sync.Once
	closeFn = func() {
		once.Do(func() {
			_ = srv.Close()
			<-served
			done := make(chan struct{})
			go func() { s.active.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				s.log.Warn("standin: handlers still running after close")
			}
		})
	}
	return "http://" + ln.Addr().String(), closeFn, nil
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.active.Add(1)
	defer s.active.Done()

	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	rec := Recorded{Method: r.Method, Path: r.URL.Path, Query: r.URL.RawQuery, Header: r.Header.Clone(), Body: body, Time: time.Now()}
	s.mu.Lock()
	s.reqs = append(s.reqs, rec)
	s.mu.Unlock()
	s.log.Debug("standin request", "method", r.Method, "path", r.URL.Path, "bytes", len(body))
	if err != nil {
		writeLiteLLMError(w, http.StatusBadRequest, "Failed to read request body: "+err.Error(), "invalid_request_error")
		return
	}

	var api string
	switch {
	case r.Method == http.MethodGet && r.URL.Path == PathModels:
		s.serveModels(w, r)
		return
	case r.Method == http.MethodPost && (r.URL.Path == PathMessages || r.URL.Path == PathCountTokens):
		api = fixtures.Anthropic
	case r.Method == http.MethodPost && r.URL.Path == PathChatCompletions:
		api = fixtures.OpenAI
	default:
		writeLiteLLMError(w, http.StatusNotFound, "Not Found", "not_found_error")
		return
	}

	key := bearer(r)
	s.mu.Lock()
	ok := key != "" && s.keys[key]
	keyStatus := s.keyStatus[key]
	defaultFixture := s.defaults[api]
	s.mu.Unlock()
	if !ok {
		writeAuthError(w, key)
		return
	}

	st := r.Header.Get(HeaderStatus)
	if st == "" {
		st = keyStatus
	}
	switch st {
	case "":
	case StatusHang:
		<-r.Context().Done()
		return
	case StatusDrop:
		panic(http.ErrAbortHandler) // net/http closes the connection, no answer
	default:
		writeStatus(w, api, st, key)
		return
	}

	if r.URL.Path == PathCountTokens {
		countTokens(w, body)
		return
	}
	switch r.Header.Get(HeaderGarbage) {
	case "html":
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "<html><head><title>Welcome</title></head><body><h1>It works!</h1></body></html>\n")
		return
	case "text":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, _ = io.WriteString(w, "upstream says hello, this is not JSON\n")
		return
	}

	var req struct {
		Model         any `json:"model"`
		Stream        any `json:"stream"`
		MaxTokens     any `json:"max_tokens"`
		StreamOptions *struct {
			IncludeUsage any `json:"include_usage"`
		} `json:"stream_options"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		writeLiteLLMError(w, http.StatusBadRequest, "Invalid JSON payload: "+err.Error(), "invalid_request_error")
		return
	}
	if m, ok := req.Model.(string); !ok || m == "" {
		writeLiteLLMError(w, http.StatusBadRequest, "Invalid model name passed in model=None. Call `/v1/models` to view available models for your key.", "invalid_request_error")
		return
	}
	if u := r.Header.Get(HeaderBound); u != "" && api == fixtures.Anthropic {
		n, _ := req.MaxTokens.(float64)
		out := int64(n)
		if u == "over" {
			out += 100
		}
		writeJSON(w, http.StatusOK, map[string]any{"id": "msg_standin", "type": "message", "role": "assistant", "model": req.Model,
			"content": []any{map[string]any{"type": "text", "text": "ok"}}, "stop_reason": "max_tokens",
			"usage": map[string]any{"input_tokens": len(body), "output_tokens": out}})
		return
	}
	stream := req.Stream == true
	includeUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage == true

	name := r.Header.Get(HeaderFixture)
	if name == "" {
		name = defaultFixture
	}
	fx, ok := fixtures.Lookup(name)
	if !ok {
		writeLiteLLMError(w, http.StatusBadRequest, fmt.Sprintf("standin: unknown fixture %q", name), "invalid_request_error")
		return
	}
	if fx.API != api {
		writeLiteLLMError(w, http.StatusBadRequest, fmt.Sprintf("standin: fixture %q is %s, not for %s", name, fx.API, r.URL.Path), "invalid_request_error")
		return
	}

	cutAfter := -1
	if v := r.Header.Get(HeaderCutAfter); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeLiteLLMError(w, http.StatusBadRequest, "standin: bad "+HeaderCutAfter+": "+v, "invalid_request_error")
			return
		}
		cutAfter = n
	}
	delay := s.eventDelay
	if v := r.Header.Get(HeaderEventDelay); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			writeLiteLLMError(w, http.StatusBadRequest, "standin: bad "+HeaderEventDelay+": "+v, "invalid_request_error")
			return
		}
		delay = d
	}

	usage := []byte(r.Header.Get(HeaderUsage))
	if len(usage) > 0 && !json.Valid(usage) {
		writeLiteLLMError(w, http.StatusBadRequest, "standin: bad "+HeaderUsage, "invalid_request_error")
		return
	}

	if stream {
		if !fx.HasSSE {
			fx = fallback(fx, func(f *fixtures.Fixture) bool { return f.HasSSE })
		}
		events := fx.Events(includeUsage)
		if len(usage) > 0 {
			events = withUsage(fx, events, usage)
		}
		if v := r.Header.Get(HeaderLongLine); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 32 || n > 64<<20 {
				writeLiteLLMError(w, http.StatusBadRequest, "standin: bad "+HeaderLongLine+": "+v, "invalid_request_error")
				return
			}
			events = slices.Insert(slices.Clone(events), 1, longEvent(fx.API, n))
		}
		s.stream(w, r.Context(), fx, events, cutAfter, delay)
		return
	}
	data := fx.NonStreamJSON()
	if data == nil {
		fx = fallback(fx, func(f *fixtures.Fixture) bool { return f.NonStreamJSON() != nil })
		data = fx.NonStreamJSON()
	}
	if len(usage) > 0 {
		data = setUsage(data, usage)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(data)))
	h.Set(HeaderFixtureUsed, fx.Name)
	setLiteLLMHeaders(h)
	w.WriteHeader(http.StatusOK)
	if cutAfter >= 0 && cutAfter < len(data) {
		_, _ = w.Write(data[:cutAfter])
		_ = http.NewResponseController(w).Flush()
		panic(http.ErrAbortHandler) // net/http closes the connection mid-body
	}
	_, _ = w.Write(data)
}

// withUsage returns events with the usage of the final usage event
// replaced (see HeaderUsage).
func withUsage(fx *fixtures.Fixture, events [][]byte, usage []byte) [][]byte {
	out := slices.Clone(events)
	if fx.API == fixtures.OpenAI {
		all := fx.Events(true) // the usage chunk, even if not asked for
		for i := len(all) - 1; i >= 0; i-- {
			if data := eventData(all[i]); fixtures.IsUsageChunk(data) {
				ev := append([]byte("data: "), setUsage(data, usage)...)
				ev = append(ev, "\n\n"...)
				if len(out) == len(all) {
					out[i] = ev
				} else { // before [DONE]
					out = slices.Insert(out, len(out)-1, ev)
				}
				break
			}
		}
		return out
	}
	for i := len(out) - 1; i >= 0; i-- {
		if bytes.HasPrefix(out[i], []byte("event: message_delta\n")) {
			ev := append([]byte("event: message_delta\ndata: "), setUsage(eventData(out[i]), usage)...)
			out[i] = append(ev, "\n\n"...)
			break
		}
	}
	return out
}

// longEvent is an event whose "data: " line is n bytes long (n >= 32).
func longEvent(api string, n int) []byte {
	head, prefix := "", `data: {"pad":"`
	if api == fixtures.Anthropic {
		head, prefix = "event: ping\n", `data: {"type":"ping","pad":"`
	}
	pad := n - len(prefix) - len(`"}`)
	return []byte(head + prefix + strings.Repeat("a", pad) + `"}` + "\n\n")
}

// eventData returns the data of one event as Fixture.Events writes it.
func eventData(ev []byte) []byte {
	_, data, _ := bytes.Cut(ev, []byte("data: "))
	return bytes.TrimSuffix(data, []byte("\n\n"))
}

// setUsage returns the JSON object data with its top-level "usage" set to
// usage, a valid JSON value.
func setUsage(data, usage []byte) []byte {
	out, err := sjson.SetRawBytes(slices.Clone(data), "usage", usage)
	if err != nil {
		return data // fixtures are valid JSON objects
	}
	return out
}

// fallback returns the first fixture (by name) of f's API that satisfies
// ok; every API has one with JSON and one with a stream.
func fallback(f *fixtures.Fixture, ok func(*fixtures.Fixture) bool) *fixtures.Fixture {
	all := fixtures.All()
	names := make([]string, 0, len(all))
	for n := range all {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if c := all[n]; c.API == f.API && ok(c) {
			return c
		}
	}
	panic("standin: no fallback fixture for " + f.API)
}

// stream writes events as server-sent events, flushing after each.
func (s *Server) stream(w http.ResponseWriter, ctx context.Context, fx *fixtures.Fixture, events [][]byte, cutAfter int, delay time.Duration) {
	rc := http.NewResponseController(w)
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set(HeaderFixtureUsed, fx.Name)
	setLiteLLMHeaders(h)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	var timer *time.Timer
	for i, ev := range events {
		if i == cutAfter {
			panic(http.ErrAbortHandler) // net/http closes the connection without ending the stream
		}
		if i > 0 && delay > 0 {
			if timer == nil {
				timer = time.NewTimer(delay)
				defer timer.Stop()
			} else {
				timer.Reset(delay)
			}
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		if ctx.Err() != nil {
			return
		}
		if _, err := w.Write(ev); err != nil {
			return
		}
		if err := rc.Flush(); err != nil {
			return
		}
	}
	if cutAfter == len(events) {
		// Every event went out but the connection still ends abruptly.
		panic(http.ErrAbortHandler)
	}
}

// serveModels answers GET /v1/models: the key's authentication, nothing else.
func (s *Server) serveModels(w http.ResponseWriter, r *http.Request) {
	key := bearer(r)
	s.mu.Lock()
	ok := key != "" && s.keys[key]
	st := s.keyStatus[key]
	s.mu.Unlock()
	switch {
	case !ok:
		writeAuthError(w, key)
	case st == "401" || st == "403":
		writeStatus(w, fixtures.OpenAI, st, key)
	default:
		writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": []map[string]any{
			{"id": "claude-sonnet-4-5", "object": "model", "created": 1677610602, "owned_by": "openai"}}})
	}
}

// bearer returns the key LiteLLM authenticates a request with: the
// x-litellm-api-key header first (LiteLLM reads it before Authorization),
// then "Authorization: Bearer <key>", else x-api-key.
func bearer(r *http.Request) string {
	if k := strings.TrimSpace(r.Header.Get("X-Litellm-Api-Key")); k != "" {
		return strings.TrimPrefix(k, "Bearer ")
	}
	if a := r.Header.Get("Authorization"); a != "" {
		if k, ok := cutPrefixFold(a, "Bearer "); ok {
			return strings.TrimSpace(k)
		}
	}
	return strings.TrimSpace(r.Header.Get("X-Api-Key"))
}

func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix) {
		return s[len(prefix):], true
	}
	return "", false
}

// setLiteLLMHeaders adds the response headers a LiteLLM proxy sends.
func setLiteLLMHeaders(h http.Header) {
	var id [16]byte
	_, _ = rand.Read(id[:])
	s := hex.EncodeToString(id[:])
	h.Set("x-litellm-call-id", s[:8]+"-"+s[8:12]+"-"+s[12:16]+"-"+s[16:20]+"-"+s[20:])
	h.Set("x-litellm-version", "1.74.0-standin")
}

// writeJSON writes body as a JSON answer with status.
func writeJSON(w http.ResponseWriter, status int, body any) {
	b, err := json.Marshal(body)
	if err != nil {
		b = []byte(`{"error":{"message":"standin: marshal error"}}`)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	setLiteLLMHeaders(h)
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// liteLLMError is the error body of the LiteLLM proxy (and, on
// /v1/chat/completions, of the OpenAI API it imitates): code is the status
// as a string, param null or the string "None".
type liteLLMError struct {
	Error struct {
		Message string  `json:"message"`
		Type    string  `json:"type"`
		Param   *string `json:"param"`
		Code    string  `json:"code"`
	} `json:"error"`
}

func writeLiteLLMError(w http.ResponseWriter, status int, message, typ string) {
	var e liteLLMError
	e.Error.Message, e.Error.Type, e.Error.Code = message, typ, strconv.Itoa(status)
	writeJSON(w, status, e)
}

// writeAuthError writes LiteLLM's answer to a missing or unknown key.
func writeAuthError(w http.ResponseWriter, key string) {
	var e liteLLMError
	none := "None"
	e.Error.Type, e.Error.Param, e.Error.Code = "auth_error", &none, "401"
	if key == "" {
		e.Error.Message = "Authentication Error, No api key passed in."
	} else {
		sum := sha256.Sum256([]byte(key))
		e.Error.Message = fmt.Sprintf("Authentication Error, Invalid proxy server token passed. Received API Key = %s, Key Hash (Token) =%s. Unable to find token in cache or `LiteLLM_VerificationTokenTable`",
			maskKey(key), hex.EncodeToString(sum[:]))
	}
	writeJSON(w, http.StatusUnauthorized, e)
}

// maskKey masks a key as LiteLLM does in its messages: sk-...<last 4>.
func maskKey(k string) string {
	if len(k) <= 4 {
		return "sk-..."
	}
	return "sk-..." + k[len(k)-4:]
}

// anthropicErrorType maps a status to the error type the Anthropic API
// answers with.
func anthropicErrorType(status int) string {
	switch status {
	case 400:
		return "invalid_request_error"
	case 401:
		return "authentication_error"
	case 402:
		return "billing_error"
	case 403:
		return "permission_error"
	case 404:
		return "not_found_error"
	case 413:
		return "request_too_large"
	case 429:
		return "rate_limit_error"
	case 504:
		return "timeout_error"
	case 529:
		return "overloaded_error"
	}
	return "api_error"
}

// openAIErrorType maps a status to the error type LiteLLM answers with on
// the OpenAI route.
func openAIErrorType(status int) string {
	switch status {
	case 400, 404, 413, 422:
		return "invalid_request_error"
	case 401:
		return "auth_error"
	case 402:
		return "insufficient_quota"
	case 403:
		return "permission_error"
	case 429:
		return "rate_limit_error"
	case 529:
		return "overloaded_error"
	}
	return "server_error"
}

// errorMessage is a realistic message for a status.
func errorMessage(status int) string {
	switch status {
	case 400:
		return "Invalid request: messages: at least one message is required"
	case 402:
		return "Your credit balance is too low to access the API. Please go to Plans & Billing to upgrade or purchase credits."
	case 403:
		return "Your API key does not have permission to use the specified resource."
	case 404:
		return "Resource not found"
	case 429:
		return "Number of request tokens has exceeded your per-minute rate limit. Please try again later."
	case 500:
		return "Internal server error"
	case 502, 503:
		return "Service unavailable: upstream connect error"
	case 504:
		return "Request timed out"
	case 529:
		return "Overloaded"
	}
	if t := http.StatusText(status); t != "" {
		return t
	}
	return "Error"
}

// writeStatus answers a forced failure: "budget" is LiteLLM's
// budget_exceeded, 401 LiteLLM's auth error (a revoked upstream key), any
// other status an error shaped like the route's API.
func writeStatus(w http.ResponseWriter, api, st, key string) {
	if st == StatusBudget {
		writeLiteLLMError(w, http.StatusBadRequest,
			fmt.Sprintf("Budget has been exceeded! Key=%s Current cost: 10.0123, Max budget: 10.0", maskKey(key)), "budget_exceeded")
		return
	}
	status, err := strconv.Atoi(st)
	if err != nil || status < 400 || status > 599 {
		writeLiteLLMError(w, http.StatusBadRequest, "standin: bad "+HeaderStatus+": "+st, "invalid_request_error")
		return
	}
	if status == http.StatusUnauthorized {
		writeAuthError(w, key)
		return
	}
	if status == http.StatusTooManyRequests {
		w.Header().Set("Retry-After", "1")
	}
	if api == fixtures.Anthropic {
		type errBody struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		}
		writeJSON(w, status, struct {
			Type  string  `json:"type"`
			Error errBody `json:"error"`
		}{"error", errBody{anthropicErrorType(status), errorMessage(status)}})
		return
	}
	writeLiteLLMError(w, status, errorMessage(status), openAIErrorType(status))
}

// CountTokens is the stand-in's token count of a count_tokens request body:
// one token per four bytes, at least one.
func CountTokens(body []byte) int { return len(body)/4 + 1 }

func countTokens(w http.ResponseWriter, body []byte) {
	if !json.Valid(body) {
		writeLiteLLMError(w, http.StatusBadRequest, "Invalid JSON payload", "invalid_request_error")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"input_tokens":%d}`, CountTokens(body))
}
