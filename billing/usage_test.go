package billing

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// llmFixtureDir holds the recorded responses described in its SOURCES.md.
const llmFixtureDir = "../tests/fixtures/llm"

// llmManifestUsage is a usage entry of fixtures.json. For OpenAI, input is
// prompt_tokens as reported, cached tokens included.
type llmManifestUsage struct {
	Input      int64 `json:"input"`
	Output     int64 `json:"output"`
	CacheWrite int64 `json:"cache_write"`
	CacheRead  int64 `json:"cache_read"`
}

type llmManifestFile struct {
	File  string           `json:"file"`
	Usage llmManifestUsage `json:"usage"`
	Text  string           `json:"text"`
}

type llmManifestFixture struct {
	API  string           `json:"api"`
	JSON *llmManifestFile `json:"json"`
	SSE  *llmManifestFile `json:"sse"`
}

// sseFixture is one SSE fixture as the stand-in replays it.
type sseFixture struct {
	name   string // manifest key
	api    API
	chunks []byte // the .chunks.txt file
	file   llmManifestFile
}

var (
	llmManifestOnce sync.Once
	llmManifest     map[string]llmManifestFixture
	llmManifestErr  error
)

// loadLLMManifest reads fixtures.json. It fails the test, rather than skipping,
// when the manifest is missing or lists nothing.
func loadLLMManifest(tb testing.TB) map[string]llmManifestFixture {
	tb.Helper()
	llmManifestOnce.Do(func() {
		var m struct {
			Fixtures map[string]llmManifestFixture `json:"fixtures"`
		}
		b, err := os.ReadFile(filepath.Join(llmFixtureDir, "fixtures.json"))
		if err == nil {
			err = json.Unmarshal(b, &m)
		}
		if err == nil && len(m.Fixtures) == 0 {
			err = errors.New("fixtures.json lists no fixtures")
		}
		llmManifest, llmManifestErr = m.Fixtures, err
	})
	if llmManifestErr != nil {
		tb.Fatalf("loading fixture manifest: %v", llmManifestErr)
	}
	return llmManifest
}

func llmManifestAPI(tb testing.TB, name, s string) API {
	tb.Helper()
	switch s {
	case "anthropic":
		return Anthropic
	case "openai":
		return OpenAI
	}
	tb.Fatalf("fixture %s: unknown api %q", name, s)
	return 0
}

// sortedFixtureNames returns the manifest keys in a stable order.
func sortedFixtureNames(m map[string]llmManifestFixture) []string {
	return slices.Sorted(maps.Keys(m))
}

func readLLMFixture(tb testing.TB, file string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(llmFixtureDir, file))
	if err != nil {
		tb.Fatalf("fixture listed in fixtures.json is unreadable: %v", err)
	}
	return b
}

// loadSSEFixtures returns every SSE fixture of the manifest.
func loadSSEFixtures(tb testing.TB) []sseFixture {
	tb.Helper()
	m := loadLLMManifest(tb)
	var out []sseFixture
	for _, name := range sortedFixtureNames(m) {
		fx := m[name]
		if fx.SSE == nil {
			continue
		}
		out = append(out, sseFixture{
			name:   name,
			api:    llmManifestAPI(tb, name, fx.API),
			chunks: readLLMFixture(tb, fx.SSE.File),
			file:   *fx.SSE,
		})
	}
	if len(out) == 0 {
		tb.Fatal("fixtures.json lists no SSE fixture")
	}
	return out
}

// want converts a manifest entry to the normalised Usage: the manifest gives
// OpenAI's prompt_tokens, which include the cached tokens.
func (u llmManifestUsage) want(api API) Usage {
	in := u.Input
	if api == OpenAI {
		in = max(in-u.CacheRead-u.CacheWrite, 0)
	}
	return Usage{Input: in, Output: u.Output, CacheWrite: u.CacheWrite, CacheRead: u.CacheRead}
}

// chunkLines returns the non-empty lines of a .chunks.txt file.
func chunkLines(chunks []byte) [][]byte {
	var lines [][]byte
	for line := range bytes.Lines(chunks) {
		if line = bytes.TrimRight(line, "\r\n"); len(line) > 0 {
			lines = append(lines, line)
		}
	}
	return lines
}

// sseStream builds the bytes the stand-in sends for a .chunks.txt file,
// with eol as the line ending: Anthropic events as "event: <type>" plus
// "data: <line>", OpenAI chunks as "data: <line>" followed by "data: [DONE]".
func sseStream(tb testing.TB, api API, chunks []byte, eol string) []byte {
	tb.Helper()
	return sseStreamForm(tb, api, chunks, streamForm{eol: eol})
}

// A streamForm is a way of writing the same events.
type streamForm struct {
	name string
	eol  string // line ending
	// splitData writes each JSON payload as two data lines, "{" and the
	// rest, which the scanner must join again with "\n".
	splitData bool
}

var streamForms = []streamForm{
	{name: "LF", eol: "\n"},
	{name: "CRLF", eol: "\r\n"},
	{name: "CR", eol: "\r"},
	{name: "CRLF-multiline", eol: "\r\n", splitData: true},
}

func sseStreamForm(tb testing.TB, api API, chunks []byte, form streamForm) []byte {
	tb.Helper()
	eol := form.eol
	var b bytes.Buffer
	for _, line := range chunkLines(chunks) {
		if api == Anthropic {
			var ev struct {
				Type string `json:"type"`
			}
			if err := json.Unmarshal(line, &ev); err != nil || ev.Type == "" {
				tb.Fatalf("fixture line without a type: %s", line)
			}
			b.WriteString("event: " + ev.Type + eol)
		}
		if form.splitData {
			if line[0] != '{' {
				tb.Fatalf("fixture line is not an object: %s", line)
			}
			b.WriteString("data: {" + eol)
			line = line[1:]
		}
		b.WriteString("data: ")
		b.Write(line)
		b.WriteString(eol + eol)
	}
	if api == OpenAI {
		b.WriteString("data: [DONE]" + eol + eol)
	}
	return b.Bytes()
}

// referenceUsage re-derives, with plain encoding/json, what a scanner must read
// from a .chunks.txt file: the merged usage and the raw content bytes.
func referenceUsage(tb testing.TB, api API, chunks []byte) (u Usage, textBytes int64) {
	tb.Helper()
	raw := func(m json.RawMessage) int64 {
		if len(m) >= 2 && m[0] == '"' {
			return int64(len(m) - 2)
		}
		return 0
	}
	for _, line := range chunkLines(chunks) {
		if api == Anthropic {
			var ev struct {
				Type    string
				Message struct{ Usage map[string]json.RawMessage }
				Usage   map[string]json.RawMessage
				Delta   map[string]json.RawMessage
			}
			if err := json.Unmarshal(line, &ev); err != nil {
				tb.Fatalf("fixture line: %v", err)
			}
			get := func(m map[string]json.RawMessage, k string) int64 {
				var n int64
				if v, ok := m[k]; ok {
					if err := json.Unmarshal(v, &n); err != nil {
						tb.Fatalf("fixture %s: %v", k, err)
					}
				}
				return n
			}
			switch ev.Type {
			case "message_start":
				mu := ev.Message.Usage
				u = Usage{get(mu, "input_tokens"), get(mu, "output_tokens"),
					get(mu, "cache_creation_input_tokens"), get(mu, "cache_read_input_tokens")}
			case "message_delta":
				mu := ev.Usage
				u.Output = get(mu, "output_tokens")
				for k, p := range map[string]*int64{"input_tokens": &u.Input,
					"cache_creation_input_tokens": &u.CacheWrite, "cache_read_input_tokens": &u.CacheRead} {
					if v := get(mu, k); v > 0 {
						*p = v
					}
				}
			case "content_block_delta":
				textBytes += raw(ev.Delta["text"]) + raw(ev.Delta["thinking"]) + raw(ev.Delta["partial_json"])
			}
			continue
		}
		var ch struct {
			Choices []struct {
				Delta struct {
					Content          json.RawMessage `json:"content"`
					ReasoningContent json.RawMessage `json:"reasoning_content"`
					ToolCalls        []struct {
						Function struct {
							Arguments json.RawMessage `json:"arguments"`
						} `json:"function"`
					} `json:"tool_calls"`
				} `json:"delta"`
			} `json:"choices"`
			Usage *struct {
				PromptTokens        int64 `json:"prompt_tokens"`
				CompletionTokens    int64 `json:"completion_tokens"`
				PromptTokensDetails struct {
					CachedTokens int64 `json:"cached_tokens"`
				} `json:"prompt_tokens_details"`
			} `json:"usage"`
		}
		if err := json.Unmarshal(line, &ch); err != nil {
			tb.Fatalf("fixture line: %v", err)
		}
		for _, c := range ch.Choices {
			textBytes += raw(c.Delta.Content) + raw(c.Delta.ReasoningContent)
			for _, tc := range c.Delta.ToolCalls {
				textBytes += raw(tc.Function.Arguments)
			}
		}
		if ch.Usage != nil {
			cached := ch.Usage.PromptTokensDetails.CachedTokens
			u = Usage{Input: ch.Usage.PromptTokens - cached, Output: ch.Usage.CompletionTokens, CacheRead: cached}
		}
	}
	return u, textBytes
}

// scanSSE feeds the chunks to a new scanner and returns its result.
func scanSSE(api API, maxLine int, chunks ...[]byte) StreamResult {
	s := NewSSEScanner(api)
	if maxLine > 0 {
		s.MaxLine = maxLine
	}
	for _, c := range chunks {
		if n, err := s.Write(c); n != len(c) || err != nil {
			panic(fmt.Sprintf("Write = %d, %v; want %d, nil", n, err, len(c)))
		}
	}
	return s.Result()
}

func TestSSEScannerFixtures(t *testing.T) {
	for _, fx := range loadSSEFixtures(t) {
		wantUsage := fx.file.Usage.want(fx.api)
		refUsage, refText := referenceUsage(t, fx.api, fx.chunks)
		require.Equal(t, wantUsage, refUsage, "%s: fixtures.json disagrees with what %s decodes to; refusing to run", fx.name, fx.file.File)
		wantEvents := len(chunkLines(fx.chunks))
		if fx.api == OpenAI {
			wantEvents++ // [DONE]
		}
		want := StreamResult{Usage: wantUsage, HasUsage: true, Done: true, Events: wantEvents, TextBytes: refText}
		for _, form := range streamForms {
			t.Run(fx.name+"/"+form.name, func(t *testing.T) {
				got := scanSSE(fx.api, 0, sseStreamForm(t, fx.api, fx.chunks, form))
				assert.Equal(t, want, got, fx.file.File)
				assert.GreaterOrEqual(t, int(got.TextBytes), len(fx.file.Text), "TextBytes less than the fixture's text")
			})
		}
	}
}

// TestSSEScannerAnthropicCacheMerge pins the numbers of the prompt-cache
// fixture, whose message_start and message_delta disagree on every count.
func TestSSEScannerAnthropicCacheMerge(t *testing.T) {
	chunks := readLLMFixture(t, "anthropic-code-execution-20260120-prompt-cache.1.chunks.txt")
	got := scanSSE(Anthropic, 0, sseStream(t, Anthropic, chunks, "\n"))
	assert.Equal(t, Usage{Input: 6, Output: 198, CacheWrite: 3337, CacheRead: 6289}, got.Usage)
	assert.True(t, got.HasUsage, "HasUsage")
	assert.True(t, got.Done, "Done")
}

// TestSSEScannerAnthropicTextBytes checks TextBytes against the text the
// manifest gives for a stream whose text needs no JSON escaping.
func TestSSEScannerAnthropicTextBytes(t *testing.T) {
	fx := loadLLMManifest(t)["ant-text"]
	require.NotNil(t, fx.SSE, "fixtures.json has no ant-text stream")
	require.NotEmpty(t, fx.SSE.Text, "fixtures.json has no ant-text stream with text")
	got := scanSSE(Anthropic, 0, sseStream(t, Anthropic, readLLMFixture(t, fx.SSE.File), "\n"))
	assert.Equal(t, int64(len(fx.SSE.Text)), got.TextBytes, "TextBytes (len of %q)", fx.SSE.Text)
}

func TestParseUsageJSONFixtures(t *testing.T) {
	m := loadLLMManifest(t)
	n := 0
	for _, name := range sortedFixtureNames(m) {
		fx := m[name]
		if fx.JSON == nil {
			continue
		}
		n++
		api := llmManifestAPI(t, name, fx.API)
		u, problem, err := ParseUsageJSON(api, readLLMFixture(t, fx.JSON.File), 0)
		assert.NoError(t, err, "%s: ParseUsageJSON(%s)", name, fx.JSON.File)
		assert.Equal(t, fx.JSON.Usage.want(api), u, "%s: ParseUsageJSON(%s)", name, fx.JSON.File)
		assert.Equal(t, UsageValid, problem, "%s: ParseUsageJSON(%s)", name, fx.JSON.File)
	}
	assert.NotZero(t, n, "fixtures.json lists no JSON fixture")
}

// scannerState is everything an SSEScanner carries from one write to the
// next, in comparable form.
type scannerState struct {
	res                                              StreamResult
	line, data                                       string
	hasData, skipLine, dropEvent, crPending, sawLine bool
}

func scannerStateOf(s *SSEScanner) scannerState {
	return scannerState{s.res, string(s.line), string(s.data), s.hasData, s.skipLine, s.dropEvent, s.crPending, s.sawLine}
}

// cloneScanner returns a copy of s that shares no memory with it.
func cloneScanner(s *SSEScanner) *SSEScanner {
	c := *s
	c.line, c.data = slices.Clone(s.line), slices.Clone(s.data)
	return &c
}

// TestSSEScannerSplitEveryOffset feeds every fixture stream split at every
// byte offset, and one byte at a time.
//
// Writing a 100 KB stream from scratch for each of its offsets would take
// minutes, so each offset is tested within its own event: from the state
// reached before the event, the event is written in two parts, split at the
// offset, and the state must equal the one reached by writing it whole. As
// Write's effect depends only on that state and the bytes, this covers every
// split of the whole stream. The small Anthropic streams, in their most
// demanding form, are also split literally, from scratch, at every offset.
func TestSSEScannerSplitEveryOffset(t *testing.T) {
	for _, fx := range loadSSEFixtures(t) {
		for _, form := range streamForms {
			t.Run(fx.name+"/"+form.name, func(t *testing.T) {
				t.Parallel()
				stream := sseStreamForm(t, fx.api, fx.chunks, form)
				want := scanSSE(fx.api, 0, stream)
				events := bytes.SplitAfter(stream, []byte(form.eol+form.eol))

				whole := NewSSEScanner(fx.api)
				for k, ev := range events {
					before := cloneScanner(whole)
					whole.Write(ev)
					after := scannerStateOf(whole)
					for i := 1; i < len(ev); i++ {
						s := cloneScanner(before)
						s.Write(ev[:i])
						s.Write(ev[i:])
						require.Equal(t, after, scannerStateOf(s), "event %d split at %d", k, i)
					}
				}
				require.Equal(t, want, whole.Result(), "event by event")

				s := NewSSEScanner(fx.api)
				if len(stream) <= 16<<10 && form.splitData && !testing.Short() {
					for i := 0; i <= len(stream); i++ {
						s.Reset(fx.api)
						s.Write(stream[:i])
						s.Write(stream[i:])
						require.Equal(t, want, s.Result(), "split at %d of %d", i, len(stream))
					}
				}
				s.Reset(fx.api)
				for i := range stream {
					s.Write(stream[i : i+1])
				}
				require.Equal(t, want, s.Result(), "one byte at a time")
			})
		}
	}
}

// Event builders for the hand-written cases.
func antEvent(data string) string { return "event: x\ndata: " + data + "\n\n" }
func oaiEvent(data string) string { return "data: " + data + "\n\n" }

const (
	antStart = `{"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],` +
		`"usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":1}}}`
	antText = `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}`
	antStop = `{"type":"message_stop"}`
	oaiText = `{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}],"usage":null}`
)

func TestSSEScannerCases(t *testing.T) {
	startUsage := Usage{Input: 10, Output: 1, CacheWrite: 20, CacheRead: 30}
	tests := []struct {
		name    string
		api     API
		maxLine int
		stream  string
		want    StreamResult
	}{
		{
			name: "anthropic delta without cache fields keeps start's",
			api:  Anthropic,
			stream: antEvent(antStart) + antEvent(antText) +
				antEvent(`{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":50}}`) +
				antEvent(antStop),
			want: StreamResult{Usage: Usage{10, 50, 20, 30}, HasUsage: true, Done: true, Events: 4, TextBytes: 5},
		},
		{
			name: "anthropic delta with zero input and cache keeps start's",
			api:  Anthropic,
			stream: antEvent(antStart) +
				antEvent(`{"type":"message_delta","usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7}}`),
			want: StreamResult{Usage: Usage{10, 7, 20, 30}, HasUsage: true, Events: 2},
		},
		{
			name: "anthropic delta with nulls keeps start's",
			api:  Anthropic,
			stream: antEvent(antStart) +
				antEvent(`{"type":"message_delta","usage":{"input_tokens":null,"cache_creation_input_tokens":null,"cache_read_input_tokens":null,"output_tokens":8}}`),
			want: StreamResult{Usage: Usage{10, 8, 20, 30}, HasUsage: true, Events: 2},
		},
		{
			name: "anthropic delta replaces every reported count, last delta wins",
			api:  Anthropic,
			stream: antEvent(antStart) +
				antEvent(`{"type":"message_delta","usage":{"input_tokens":11,"cache_creation_input_tokens":21,"cache_read_input_tokens":31,"output_tokens":5}}`) +
				antEvent(`{"type":"message_delta","usage":{"input_tokens":12,"output_tokens":6}}`),
			want: StreamResult{Usage: Usage{12, 6, 21, 31}, HasUsage: true, Events: 3},
		},
		{
			name:   "anthropic stream cut before message_delta",
			api:    Anthropic,
			stream: antEvent(antStart) + antEvent(antText) + antEvent(antText),
			want:   StreamResult{Usage: startUsage, HasUsage: true, Events: 3, TextBytes: 10},
		},
		{
			name: "anthropic thinking and tool input deltas count as text",
			api:  Anthropic,
			stream: antEvent(`{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Hmm."}}`) +
				antEvent(`{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"c2lnbmF0dXJl"}}`) +
				antEvent(`{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"a\": 1}"}}`),
			want: StreamResult{Events: 3, TextBytes: 4 + 10, Problem: UsageMissing},
		},
		{
			name: "anthropic usage-like keys below the top level are ignored",
			api:  Anthropic,
			stream: antEvent(antStart) +
				antEvent(`{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{"usage":{"input_tokens":999,"output_tokens":999}}}}`) +
				antEvent(`{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"usage\":{\"output_tokens\":999}}"}}`) +
				antEvent(`{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\"type\":\"message_delta\",\"usage\":{\"output_tokens\":999}"}}`) +
				antEvent(`{"type":"message_delta","delta":{"stop_reason":"end_turn","usage":{"output_tokens":999}},"usage":{"output_tokens":3},"x":{"usage":{"input_tokens":999}}}`) +
				antEvent(`{"type":"ping","usage":{"input_tokens":999,"output_tokens":999}}`),
			want: StreamResult{Usage: Usage{10, 3, 20, 30}, HasUsage: true, Events: 6, TextBytes: 35 + 60},
		},
		{
			name:   "anthropic error event",
			api:    Anthropic,
			stream: antEvent(antStart) + "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
			want:   StreamResult{Usage: startUsage, HasUsage: true, Errored: true, Events: 2},
		},
		{
			name:   "anthropic negative counts are clamped and invalid",
			api:    Anthropic,
			stream: antEvent(`{"type":"message_start","message":{"usage":{"input_tokens":-5,"cache_creation_input_tokens":-1,"cache_read_input_tokens":2,"output_tokens":-9}}}`),
			want:   StreamResult{Usage: Usage{0, 0, 0, 2}, HasUsage: true, Events: 1, Problem: UsageNegative},
		},
		{
			name: "anthropic invalid JSON and foreign payloads break nothing",
			api:  Anthropic,
			stream: antEvent(`{"type":"message_start","message":{"usage":{"input_tokens":99`) +
				antEvent(`[DONE]`) + antEvent(`{"type":"message_stop"`) + antEvent(`"message_stop"`) +
				antEvent(antStart) + antEvent(antStop),
			want: StreamResult{Usage: startUsage, HasUsage: true, Done: true, Events: 6},
		},
		{
			name: "openai stream without usage chunk",
			api:  OpenAI,
			stream: oaiEvent(`{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}`) +
				oaiEvent(oaiText) + oaiEvent(oaiText) + oaiEvent(`[DONE]`),
			want: StreamResult{Done: true, Events: 4, TextBytes: 10, Problem: UsageMissing},
		},
		{
			name: "openai usage null chunks then usage object",
			api:  OpenAI,
			stream: oaiEvent(oaiText) +
				oaiEvent(`{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":7,"total_tokens":107,"prompt_tokens_details":{"cached_tokens":40}}}`) +
				oaiEvent(`{"choices":[{"index":0,"delta":{}}],"usage":null}`) +
				oaiEvent(`[DONE]`),
			want: StreamResult{Usage: Usage{Input: 60, Output: 7, CacheRead: 40}, HasUsage: true, Done: true, Events: 4, TextBytes: 5},
		},
		{
			name: "openai last usage object wins",
			api:  OpenAI,
			stream: oaiEvent(`{"usage":{"prompt_tokens":1,"completion_tokens":1}}`) +
				oaiEvent(`{"usage":{"prompt_tokens":9,"completion_tokens":4,"prompt_tokens_details":null}}`),
			want: StreamResult{Usage: Usage{Input: 9, Output: 4}, HasUsage: true, Events: 2},
		},
		{
			name:   "openai LiteLLM cache_creation_input_tokens",
			api:    OpenAI,
			stream: oaiEvent(`{"choices":[],"usage":{"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":30},"cache_creation_input_tokens":50}}`),
			want:   StreamResult{Usage: Usage{Input: 20, Output: 5, CacheWrite: 50, CacheRead: 30}, HasUsage: true, Events: 1},
		},
		{
			name:   "openai negative count: clamped, invalid",
			api:    OpenAI,
			stream: oaiEvent(`{"usage":{"prompt_tokens":10,"completion_tokens":-3,"prompt_tokens_details":{"cached_tokens":30},"cache_creation_input_tokens":5}}`),
			want:   StreamResult{Usage: Usage{Input: 0, Output: 0, CacheWrite: 5, CacheRead: 30}, HasUsage: true, Events: 1, Problem: UsageNegative},
		},
		{
			name: "openai usage-like content below the top level is ignored",
			api:  OpenAI,
			stream: oaiEvent(`{"choices":[{"index":0,"delta":{"content":"{\"usage\":{\"prompt_tokens\":999}}","usage":{"prompt_tokens":999}}}],"usage":null}`) +
				oaiEvent(`{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{\"usage\":"}},{"function":{"arguments":"{}"}}]}}],"x":{"usage":{"prompt_tokens":999}}}`) +
				oaiEvent(`{"choices":[{"index":0,"delta":{"reasoning_content":"usage"},"usage":{"prompt_tokens":999}}]}`),
			want: StreamResult{Events: 3, TextBytes: 34 + 12 + 2 + 5, Problem: UsageMissing},
		},
		{
			name: "openai error chunk",
			api:  OpenAI,
			stream: oaiEvent(oaiText) + oaiEvent(`{"error":null,"choices":[]}`) +
				oaiEvent(`{"error":{"message":"The server had an error","type":"server_error"}}`),
			want: StreamResult{Errored: true, Events: 3, TextBytes: 5, Problem: UsageMissing},
		},
		{
			name:   "openai error string is not an error object",
			api:    OpenAI,
			stream: oaiEvent(`{"error":"nope"}`) + oaiEvent(`{"choices":[{"delta":{"content":"{\"error\":{}}"}}]}`),
			want:   StreamResult{Events: 2, TextBytes: 14, Problem: UsageMissing},
		},
		{
			name: "oversized line is skipped and parsing resumes",
			api:  OpenAI, maxLine: 64,
			stream: oaiEvent(`{"usage":{"prompt_tokens":999,"completion_tokens":999,"total_tokens":1998}}`) +
				": " + strings.Repeat("c", 100) + "\n\n" +
				oaiEvent(`{"usage":{"prompt_tokens":3,"completion_tokens":4}}`),
			want: StreamResult{Usage: Usage{Input: 3, Output: 4}, HasUsage: true, Events: 1, Oversized: 2},
		},
		{
			name: "oversized line drops its whole event",
			api:  OpenAI, maxLine: 64,
			stream: "data: {\"usage\":\ndata: " + strings.Repeat(" ", 80) + "{\"prompt_tokens\":9}}\n\n" +
				oaiEvent(`[DONE]`),
			want: StreamResult{Done: true, Events: 1, Oversized: 1, Problem: UsageMissing},
		},
		{
			name: "event data longer than MaxLine is dropped",
			api:  OpenAI, maxLine: 64,
			stream: "data: {\"usage\":\n" + strings.Repeat("data: \n", 60) + "data: {\"prompt_tokens\":9}}\n\n" +
				oaiEvent(`{"usage":{"completion_tokens":4}}`),
			want: StreamResult{Usage: Usage{Output: 4}, HasUsage: true, Events: 1, Oversized: 1, Problem: UsageFieldMissing},
		},
		{
			name: "line of exactly MaxLine is kept",
			api:  OpenAI, maxLine: len(`data: {"usage":{"completion_tokens":4}}`),
			stream: oaiEvent(`{"usage":{"completion_tokens":4}}`),
			want:   StreamResult{Usage: Usage{Output: 4}, HasUsage: true, Events: 1, Problem: UsageFieldMissing},
		},
		{
			name: "SSE syntax: no space, joined data lines, ignored fields, comments",
			api:  Anthropic,
			stream: "\uFEFF: comment\nretry: 1000\nid: 7\nevent: message_start\n" +
				"data:{\"type\":\"message_start\",\n" +
				"data: \"message\":{\"usage\":{\"input_tokens\":10,\n" +
				"event: ignored\n" +
				"data:  \"output_tokens\":2}}}\n" +
				"\n\n\n" + // extra blank lines dispatch nothing
				"data\n\n" + // a field without a colon: an empty payload
				"data:{\"type\":\"message_stop\"}\n\n",
			want: StreamResult{Usage: Usage{Input: 10, Output: 2}, HasUsage: true, Done: true, Events: 3},
		},
		{
			name:   "unknown fields are not data",
			api:    OpenAI,
			stream: "date: [DONE]\n\ndata : [DONE]\n\n datA: [DONE]\n\n",
			want:   StreamResult{Problem: UsageMissing},
		},
		{
			name:   "mixed line endings",
			api:    OpenAI,
			stream: "data: " + oaiText + "\r\rdata: " + oaiText + "\r\n\r\ndata: " + oaiText + "\n\rdata: [DONE]\n\n",
			want:   StreamResult{Done: true, Events: 4, TextBytes: 15, Problem: UsageMissing},
		},
		{
			name:   "final event without its blank line",
			api:    OpenAI,
			stream: oaiEvent(oaiText) + "data: {\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n",
			want:   StreamResult{Usage: Usage{Input: 2, Output: 3}, HasUsage: true, Events: 2, TextBytes: 5},
		},
		{
			name:   "final line without its line ending",
			api:    OpenAI,
			stream: oaiEvent(oaiText) + "data: [DONE]",
			want:   StreamResult{Done: true, Events: 2, TextBytes: 5, Problem: UsageMissing},
		},
		{
			name:   "unknown API counts events only",
			api:    0,
			stream: oaiEvent(oaiText) + oaiEvent(`[DONE]`),
			want:   StreamResult{Events: 2, Problem: UsageMissing},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, scanSSE(tt.api, tt.maxLine, []byte(tt.stream)))
			for i := range len(tt.stream) + 1 {
				require.Equal(t, tt.want, scanSSE(tt.api, tt.maxLine, []byte(tt.stream[:i]), []byte(tt.stream[i:])), "split at %d", i)
			}
		})
	}
}

// TestSSEScannerProblems checks the stream readers say why a usage cannot
// be billed, for both APIs.
func TestSSEScannerProblems(t *testing.T) {
	antStart := func(usage string) string {
		return antEvent(`{"type":"message_start","message":{"usage":` + usage + `}}`)
	}
	antDelta := func(usage string) string {
		return antEvent(`{"type":"message_delta","delta":{},"usage":` + usage + `}`)
	}
	tests := []struct {
		name   string
		api    API
		window int64
		stream string
		want   UsageProblem
	}{
		{"anthropic valid", Anthropic, 0, antStart(`{"input_tokens":5,"output_tokens":1}`) + antDelta(`{"output_tokens":9}`), UsageValid},
		{"anthropic output only in the delta", Anthropic, 0, antStart(`{"input_tokens":5}`) + antDelta(`{"output_tokens":9}`), UsageValid},
		{"anthropic no input ever", Anthropic, 0, antStart(`{"output_tokens":1}`) + antDelta(`{"output_tokens":9}`), UsageFieldMissing},
		{"anthropic no output ever", Anthropic, 0, antStart(`{"input_tokens":5}`) + antDelta(`{"input_tokens":5}`), UsageFieldMissing},
		{"anthropic string in the delta", Anthropic, 0, antStart(`{"input_tokens":5,"output_tokens":1}`) + antDelta(`{"output_tokens":"9"}`), UsageNotNumber},
		{"anthropic bad start, good delta: sticky", Anthropic, 0, antStart(`{"input_tokens":-5,"output_tokens":1}`) + antDelta(`{"input_tokens":5,"output_tokens":9}`), UsageNegative},
		{"anthropic fraction", Anthropic, 0, antStart(`{"input_tokens":5.5,"output_tokens":1}`), UsageNotInteger},
		{"anthropic usage not an object", Anthropic, 0, antStart(`{"input_tokens":5,"output_tokens":1}`) + antDelta(`"lots"`), UsageNotNumber},
		{"anthropic max int", Anthropic, 0, antStart(`{"input_tokens":9223372036854775807,"output_tokens":1}`), UsageBeyondWindow},
		{"anthropic 1e15 in the delta", Anthropic, 0, antStart(`{"input_tokens":5,"output_tokens":1}`) + antDelta(`{"output_tokens":1e15}`), UsageBeyondWindow},
		{"anthropic cache parts add up past the window", Anthropic, 100, antStart(`{"input_tokens":40,"cache_read_input_tokens":40,"cache_creation_input_tokens":20,"output_tokens":1}`), UsageBeyondWindow},
		{"anthropic exactly the window", Anthropic, 101, antStart(`{"input_tokens":40,"cache_read_input_tokens":40,"cache_creation_input_tokens":20,"output_tokens":1}`), UsageValid},
		{"anthropic no usage", Anthropic, 0, antEvent(antText), UsageMissing},
		{"openai valid", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":5,"completion_tokens":1}}`), UsageValid},
		{"openai cached above prompt", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":6}}}`), UsageCacheExceeds},
		{"openai string", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":"5","completion_tokens":1}}`), UsageNotNumber},
		{"openai details not an object", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":5,"completion_tokens":1,"prompt_tokens_details":7}}`), UsageNotNumber},
		{"openai missing completion", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":5}}`), UsageFieldMissing},
		{"openai max int", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1}}`), UsageBeyondWindow},
		{"openai last object wins", OpenAI, 0, oaiEvent(`{"usage":{"prompt_tokens":-5,"completion_tokens":1}}`) + oaiEvent(`{"usage":{"prompt_tokens":5,"completion_tokens":1}}`), UsageValid},
		{"openai window", OpenAI, 10, oaiEvent(`{"usage":{"prompt_tokens":5,"completion_tokens":6}}`), UsageBeyondWindow},
		{"openai no usage", OpenAI, 0, oaiEvent(oaiText) + oaiEvent(`[DONE]`), UsageMissing},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewSSEScanner(tt.api)
			s.Window = tt.window
			s.Write([]byte(tt.stream))
			assert.Equal(t, tt.want.String(), s.Result().Problem.String())
			s.Reset(tt.api) // keeps Window, forgets the problem
			assert.Equal(t, tt.window, s.Window)
			assert.Equal(t, UsageMissing, s.Result().Problem)
		})
	}
}

func TestSSEScannerOversizedDefault(t *testing.T) {
	big := "data: {\"usage\":{\"prompt_tokens\":999,\"x\":\"" + strings.Repeat("x", DefaultMaxSSELine) + "\"}}\n\n"
	stream := []byte(big + oaiEvent(`{"usage":{"prompt_tokens":5}}`))
	s := NewSSEScanner(OpenAI)
	for chunk := range slices.Chunk(stream, 4096) {
		s.Write(chunk)
		require.LessOrEqual(t, cap(s.line), DefaultMaxSSELine, "scanner holds more line than DefaultMaxSSELine")
		require.LessOrEqual(t, cap(s.data), DefaultMaxSSELine, "scanner holds more data than DefaultMaxSSELine")
	}
	want := StreamResult{Usage: Usage{Input: 5}, HasUsage: true, Events: 1, Oversized: 1, Problem: UsageFieldMissing}
	require.Equal(t, want, s.Result())
	// One unterminated line, however long, is never held beyond MaxLine.
	s.Reset(OpenAI)
	s.MaxLine = 1000
	for range 100 {
		s.Write([]byte(strings.Repeat("d", 100)))
	}
	require.LessOrEqual(t, len(s.line), 1000, "scanner holds more of a line than MaxLine")
	assert.EqualValues(t, 1, s.Result().Oversized, "Oversized")
}

// TestSSEScannerCRLFSplit checks a CRLF split across writes is one line
// ending, not two (which would dispatch events early and join nothing).
func TestSSEScannerCRLFSplit(t *testing.T) {
	s := NewSSEScanner(OpenAI)
	for _, p := range []string{"data: {\"usage\":\r", "\ndata: {\"prompt_tokens\":4}}\r", "\n\r", "", "\n", "data: [DONE]\r", "\r"} {
		s.Write([]byte(p))
	}
	want := StreamResult{Usage: Usage{Input: 4}, HasUsage: true, Done: true, Events: 2, Problem: UsageFieldMissing}
	assert.Equal(t, want, s.Result())
}

// TestSSEScannerResultMidStream checks Result can be called at any time
// without changing what the scanner reads next.
func TestSSEScannerResultMidStream(t *testing.T) {
	for _, fx := range loadSSEFixtures(t)[:2] {
		stream := sseStream(t, fx.api, fx.chunks, "\r\n")
		want := scanSSE(fx.api, 0, stream)
		s := NewSSEScanner(fx.api)
		for i := range stream {
			s.Write(stream[i : i+1])
			s.Result()
		}
		require.Equal(t, want, s.Result(), fx.name)
	}
	// A pending event is reported, but not yet counted as processed.
	s := NewSSEScanner(OpenAI)
	s.Write([]byte("data: {\"usage\":{\"prompt_tokens\":1}}\n"))
	first := s.Result()
	s.Write([]byte("data: \n\n"))
	assert.Equal(t, first, s.Result(), "pending event read twice")
	assert.EqualValues(t, 1, first.Events, "pending event counted as processed")
}

func TestSSEScannerReset(t *testing.T) {
	streams := loadSSEFixtures(t)
	s := NewSSEScanner(Anthropic)
	s.MaxLine = 4 << 20
	s.Write([]byte("data: {\"type\":\"message_start\"")) // left pending
	for _, fx := range streams {
		s.Reset(fx.api)
		stream := sseStream(t, fx.api, fx.chunks, "\n")
		s.Write(stream)
		assert.Equal(t, scanSSE(fx.api, 0, stream), s.Result(), "%s after Reset", fx.name)
	}
	assert.Equal(t, 4<<20, s.MaxLine, "Reset changed MaxLine")
	s.Write([]byte("data: " + strings.Repeat("x", 1<<20) + "\n"))
	s.Reset(OpenAI)
	assert.LessOrEqual(t, cap(s.line), maxRetainedBuffer, "Reset kept the line buffer")
	assert.LessOrEqual(t, cap(s.data), maxRetainedBuffer, "Reset kept the data buffer")
}

// TestSSEScannerZeroAllocs checks the steady state allocates nothing for
// events that carry no usage.
func TestSSEScannerZeroAllocs(t *testing.T) {
	tests := []struct {
		name   string
		api    API
		events []string
	}{
		{"anthropic", Anthropic, []string{
			"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"'m doing well, thank you for asking\"}}\n\n",
			"event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"sum=0\"}}\r\n\r\n",
			"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
			"event: ping\ndata: {\"type\": \"ping\"}\n\n",
			"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
		}},
		{"openai", OpenAI, []string{
			`data: {"id":"chatcmpl-D8Z5oo6uDh67AD85p73ksdT1KxhE0","object":"chat.completion.chunk","created":1770933892,"model":"gpt-4.1-nano-2025-04-14","service_tier":"default","system_fingerprint":"fp_de604bd877","choices":[{"index":0,"delta":{"content":"Holiday"},"logprobs":null,"finish_reason":null}],"usage":null,"obfuscation":"dTh"}` + "\n\n",
			`data: {"id":"f0f0f217","object":"chat.completion.chunk","created":1770772287,"model":"grok-3-mini","choices":[{"index":0,"delta":{"reasoning_content":" the"}}],"system_fingerprint":"fp_2a885414fb"}` + "\n\n",
			`data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\": \"Par"}}]}}],"usage":null}` + "\r\n\r\n",
			"data: [DONE]\n\n",
		}},
	}
	for _, tt := range tests {
		for _, ev := range tt.events {
			s := NewSSEScanner(tt.api)
			p := []byte(ev)
			s.Write(p) // grow the buffers once
			before := s.Result()
			allocs := testing.AllocsPerRun(100, func() {
				s.Write(p[:len(p)/2]) // also through the partial-line buffer
				s.Write(p[len(p)/2:])
			})
			assert.Zero(t, allocs, "%s: allocs per event for %q", tt.name, ev)
			assert.Greater(t, s.Result().Events, before.Events, "%s: events not processed: %q", tt.name, ev)
		}
	}
}

func TestParseUsageJSON(t *testing.T) {
	const (
		valid    = UsageValid
		missing  = UsageMissing
		field    = UsageFieldMissing
		negative = UsageNegative
		notNum   = UsageNotNumber
		notInt   = UsageNotInteger
		window   = UsageBeyondWindow
		cache    = UsageCacheExceeds
	)
	tests := []struct {
		name    string
		api     API
		body    string
		want    Usage
		problem UsageProblem
		wantErr bool
	}{
		{"anthropic", Anthropic, `{"content":[{"type":"text","text":"\"usage\":{\"input_tokens\":9}"}],"usage":{"input_tokens":3,"cache_creation_input_tokens":4,"cache_read_input_tokens":5,"output_tokens":6}}`,
			Usage{Input: 3, Output: 6, CacheWrite: 4, CacheRead: 5}, valid, false},
		{"anthropic integers as floats", Anthropic, `{"usage":{"input_tokens":3.0,"output_tokens":1e2}}`,
			Usage{Input: 3, Output: 100}, valid, false},
		{"anthropic null count", Anthropic, `{"usage":{"input_tokens":null,"output_tokens":6}}`,
			Usage{Output: 6}, field, false},
		{"anthropic absent count", Anthropic, `{"usage":{"input_tokens":6}}`,
			Usage{Input: 6}, field, false},
		{"anthropic string count", Anthropic, `{"usage":{"input_tokens":1,"output_tokens":"6"}}`,
			Usage{Input: 1}, notNum, false},
		{"anthropic bool count", Anthropic, `{"usage":{"input_tokens":true,"output_tokens":6}}`,
			Usage{Output: 6}, notNum, false},
		{"anthropic object count", Anthropic, `{"usage":{"input_tokens":{},"output_tokens":6}}`,
			Usage{Output: 6}, notNum, false},
		{"anthropic fraction", Anthropic, `{"usage":{"input_tokens":1,"output_tokens":6,"cache_read_input_tokens":2.9}}`,
			Usage{Input: 1, Output: 6, CacheRead: 2}, notInt, false},
		{"anthropic negative", Anthropic, `{"usage":{"input_tokens":-3,"output_tokens":5}}`,
			Usage{Output: 5}, negative, false},
		{"anthropic negative fraction", Anthropic, `{"usage":{"input_tokens":1,"output_tokens":-0.5}}`,
			Usage{Input: 1}, negative, false},
		{"anthropic huge", Anthropic, `{"usage":{"input_tokens":1,"output_tokens":99999999999999999999}}`,
			Usage{Input: 1, Output: math.MaxInt64}, window, false},
		{"anthropic int64 max", Anthropic, `{"usage":{"input_tokens":9223372036854775807,"output_tokens":1}}`,
			Usage{Input: math.MaxInt64, Output: 1}, window, false},
		{"anthropic 1e15", Anthropic, `{"usage":{"input_tokens":1e15,"output_tokens":1}}`,
			Usage{Input: 1e15, Output: 1}, window, false},
		{"anthropic parts fit alone, not together", Anthropic, `{"usage":{"input_tokens":600000,"cache_read_input_tokens":600000,"output_tokens":1}}`,
			Usage{Input: 600000, Output: 1, CacheRead: 600000}, window, false},
		{"anthropic exactly the window", Anthropic, `{"usage":{"input_tokens":1048000,"cache_read_input_tokens":575,"output_tokens":1}}`,
			Usage{Input: 1048000, Output: 1, CacheRead: 575}, valid, false},
		{"anthropic nested usage only", Anthropic, `{"content":[{"type":"tool_use","input":{"usage":{"input_tokens":9}}}]}`,
			Usage{}, missing, false},
		{"openai", OpenAI, `{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":495,"completion_tokens":144,"prompt_tokens_details":{"cached_tokens":320}}}`,
			Usage{Input: 175, Output: 144, CacheRead: 320}, valid, false},
		{"openai LiteLLM", OpenAI, `{"usage":{"prompt_tokens":100,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":30},"cache_creation_input_tokens":50}}`,
			Usage{Input: 20, Output: 1, CacheWrite: 50, CacheRead: 30}, valid, false},
		{"openai cached above prompt", OpenAI, `{"usage":{"prompt_tokens":10,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":30}}}`,
			Usage{CacheRead: 30}, cache, false},
		{"openai details not an object", OpenAI, `{"usage":{"prompt_tokens":10,"completion_tokens":0,"prompt_tokens_details":"x"}}`,
			Usage{Input: 10}, notNum, false},
		{"openai max int", OpenAI, `{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1}}`,
			Usage{Input: math.MaxInt64, Output: 1}, window, false},
		{"openai string", OpenAI, `{"usage":{"prompt_tokens":"10","completion_tokens":1}}`,
			Usage{Output: 1}, notNum, false},
		{"openai negative", OpenAI, `{"usage":{"prompt_tokens":10,"completion_tokens":-1}}`,
			Usage{Input: 10}, negative, false},
		{"openai whitespace and escaped key", OpenAI, " {\n \"us\\u0061ge\" :\t{ \"prompt_tokens\": 1, \"completion_tokens\" : 2 } }\n",
			Usage{Input: 1, Output: 2}, valid, false},
		{"openai missing prompt", OpenAI, `{"usage":{"completion_tokens":2}}`, Usage{Output: 2}, field, false},
		{"openai within a small window", OpenAI, `{"usage":{"prompt_tokens":10,"completion_tokens":90}}`, Usage{Input: 10, Output: 90}, valid, false},
		{"last usage wins", OpenAI, `{"usage":{"completion_tokens":-1},"usage":{"prompt_tokens":1,"completion_tokens":2}}`,
			Usage{Input: 1, Output: 2}, valid, false},
		{"usage null", OpenAI, `{"usage":null}`, Usage{}, missing, false},
		{"usage not an object", Anthropic, `{"usage":[1]}`, Usage{}, notNum, false},
		{"usage a string", OpenAI, `{"usage":"lots"}`, Usage{}, notNum, false},
		{"no usage", OpenAI, `{"id":"x"}`, Usage{}, missing, false},
		{"not an object", OpenAI, `[{"usage":{"prompt_tokens":1}}]`, Usage{}, missing, false},
		{"invalid", OpenAI, `{"usage":{"prompt_tokens":1}`, Usage{}, missing, true},
		{"trailing garbage", Anthropic, `{"usage":{"input_tokens":1}} x`, Usage{}, missing, true},
		{"empty", Anthropic, ``, Usage{}, missing, true},
		{"unknown API", API(0), `{"usage":{"prompt_tokens":1}}`, Usage{}, missing, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			u, problem, err := ParseUsageJSON(tt.api, []byte(tt.body), 0)
			assert.Equal(t, tt.want, u)
			assert.Equal(t, tt.problem.String(), problem.String())
			if tt.wantErr {
				assert.Error(t, err)
			} else {
				assert.NoError(t, err)
			}
		})
	}
	// The window is the model's.
	_, problem, err := ParseUsageJSON(OpenAI, []byte(`{"usage":{"prompt_tokens":10,"completion_tokens":91}}`), 100)
	require.NoError(t, err)
	assert.Equal(t, UsageBeyondWindow, problem)
	_, problem, _ = ParseUsageJSON(OpenAI, []byte(`{"usage":{"prompt_tokens":10,"completion_tokens":90}}`), 100)
	assert.Equal(t, UsageValid, problem)
}

func TestEstimateTokens(t *testing.T) {
	tests := []struct{ n, want int64 }{
		{math.MinInt64, 0}, {-1, 0}, {0, 0}, {1, 1}, {3, 1}, {4, 1}, {5, 2}, {8, 2}, {9, 3},
		{math.MaxInt64, math.MaxInt64/4 + 1},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, EstimateTokens(tt.n), "EstimateTokens(%d)", tt.n)
	}
}

// FuzzSSEScanner feeds arbitrary bytes, split at arbitrary places, and checks
// the scanner neither panics, nor holds more than MaxLine, nor reads anything
// different depending on how the stream was split.
func FuzzSSEScanner(f *testing.F) {
	for _, fx := range loadSSEFixtures(f) {
		stream := sseStream(f, fx.api, fx.chunks, "\n")
		if len(stream) > 2<<10 {
			stream = stream[len(stream)-2<<10:] // the tail, with the usage; small seeds fuzz faster
		}
		f.Add(fx.api == Anthropic, uint16(0), stream, uint32(len(stream)/2), uint32(7))
	}
	f.Add(true, uint16(40), []byte(antEvent(antStart)+antEvent(antText)+"data: {\"usage\":\r\ndata: 1}\r\r\n"), uint32(60), uint32(3))
	f.Add(false, uint16(70), []byte("\uFEFFdata:"+oaiText+"\r\r: c\ndata: {\"error\":{}}\n\ndata: [DONE]"), uint32(1), uint32(200))
	f.Add(false, uint16(0), []byte(`data: {"usage":{"prompt_tokens":1e400,"completion_tokens":-0.5}}`+"\n\n"), uint32(9), uint32(9))
	f.Fuzz(func(t *testing.T, anthropic bool, maxLine uint16, stream []byte, cut1, cut2 uint32) {
		api := OpenAI
		if anthropic {
			api = Anthropic
		}
		ml := int(maxLine % 512) // small limits reach the oversize paths; 0 is the default
		want := scanSSE(api, ml, stream)
		if want.Events < 0 || want.Oversized < 0 || want.TextBytes < 0 ||
			want.Usage.Input < 0 || want.Usage.Output < 0 || want.Usage.CacheWrite < 0 || want.Usage.CacheRead < 0 {
			t.Fatalf("negative count in %+v", want)
		}
		checkUsageRule(t, want.Usage, want.Problem, DefaultContextWindow)
		if want.HasUsage != (want.Problem != UsageMissing) {
			t.Fatalf("HasUsage %v with problem %v", want.HasUsage, want.Problem)
		}
		i := int(cut1 % uint32(len(stream)+1))
		j := i + int(cut2%uint32(len(stream)-i+1))
		if got := scanSSE(api, ml, stream[:i], stream[i:j], stream[j:]); got != want {
			t.Fatalf("split at %d, %d:\n got %+v\nwant %+v", i, j, got, want)
		}
		s := NewSSEScanner(api)
		s.MaxLine = ml
		limit := s.maxLine()
		for k := range stream {
			s.Write(stream[k : k+1])
			if len(s.line) > limit || len(s.data) > limit {
				t.Fatalf("holds %d bytes of a line and %d of data, MaxLine is %d", len(s.line), len(s.data), limit)
			}
			if k == i {
				s.Result() // must not disturb what follows
			}
		}
		if got := s.Result(); got != want {
			t.Fatalf("one byte at a time:\n got %+v\nwant %+v", got, want)
		}
		ParseUsageJSON(api, stream, 0)
	})
}

// checkUsageRule checks the validity rule on a reader's result: a valid
// usage has non-negative counts that together fit in the window; an invalid
// one has a named reason.
func checkUsageRule(t *testing.T, u Usage, p UsageProblem, window int64) {
	t.Helper()
	if p == UsageValid {
		if u.Input < 0 || u.Output < 0 || u.CacheWrite < 0 || u.CacheRead < 0 || u.Total() > window {
			t.Fatalf("valid usage %+v outside [0, %d]", u, window)
		}
		return
	}
	if !slices.Contains(UsageProblems, p) {
		t.Fatalf("invalid usage %+v without a known reason (%d)", u, p)
	}
}

// FuzzParseUsageJSON checks ParseUsageJSON never panics, for both APIs and
// any window, and keeps the validity rule: a valid usage has non-negative
// counts within the window, an invalid one a reason, an error no usage.
func FuzzParseUsageJSON(f *testing.F) {
	for _, fx := range []string{
		`{"usage":{"input_tokens":3,"cache_creation_input_tokens":4,"cache_read_input_tokens":5,"output_tokens":6}}`,
		`{"usage":{"prompt_tokens":495,"completion_tokens":144,"prompt_tokens_details":{"cached_tokens":320}}}`,
		`{"usage":{"prompt_tokens":9223372036854775807,"completion_tokens":1}}`,
		`{"usage":{"input_tokens":1e15,"output_tokens":-1.5,"cache_read_input_tokens":"7"}}`,
		`{"usage":{"prompt_tokens":10,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":1e400}},"usage":null}`,
		`{"us\u0061ge":{"prompt_tokens":1,"completion_tokens":2,"cache_creation_input_tokens":3,"prompt_tokens_details":[]}}`,
		`{"usage":{"input_tokens":12.0,"output_tokens":-0,"cache_creation_input_tokens":true}}`,
	} {
		f.Add(true, int64(0), []byte(fx))
		f.Add(false, int64(100), []byte(fx))
	}
	m := loadLLMManifest(f)
	for _, name := range sortedFixtureNames(m) {
		if fx := m[name]; fx.JSON != nil {
			f.Add(llmManifestAPI(f, name, fx.API) == Anthropic, int64(0), readLLMFixture(f, fx.JSON.File))
		}
	}
	f.Fuzz(func(t *testing.T, anthropic bool, window int64, body []byte) {
		api := OpenAI
		if anthropic {
			api = Anthropic
		}
		u, p, err := ParseUsageJSON(api, body, window)
		if err != nil {
			if u != (Usage{}) || p != UsageMissing {
				t.Fatalf("error %v with usage %+v, %v", err, u, p)
			}
			return
		}
		if window <= 0 {
			window = DefaultContextWindow
		}
		checkUsageRule(t, u, p, window)
		// The same usage, streamed, is read alike.
		if !anthropic && p != UsageMissing {
			s := NewSSEScanner(OpenAI)
			s.Window = window
			s.Write([]byte("data: " + strings.NewReplacer("\r", " ", "\n", " ").Replace(string(body)) + "\n\n"))
			checkUsageRule(t, s.Result().Usage, s.Result().Problem, window)
		}
	})
}

func ExampleSSEScanner() {
	// In a proxy the scanner sits behind an io.MultiWriter or io.TeeReader
	// and sees the response body in whatever pieces it arrives.
	body := "event: message_start\n" +
		`data: {"type":"message_start","message":{"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":40,"output_tokens":1}}}` + "\n\n" +
		"event: content_block_delta\n" +
		`data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello!"}}` + "\n\n" +
		"event: message_delta\n" +
		`data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":30}}` + "\n\n" +
		"event: message_stop\n" +
		`data: {"type":"message_stop"}` + "\n\n"
	s := NewSSEScanner(Anthropic)
	if _, err := io.Copy(s, iotest.OneByteReader(strings.NewReader(body))); err != nil {
		panic(err)
	}
	r := s.Result()
	fmt.Printf("%+v done=%v text=%d bytes\n", r.Usage, r.Done, r.TextBytes)
	// Output: {Input:12 Output:30 CacheWrite:0 CacheRead:40} done=true text=6 bytes
}

func ExampleParseUsageJSON() {
	body := []byte(`{"choices":[],"usage":{"prompt_tokens":495,"completion_tokens":144,"prompt_tokens_details":{"cached_tokens":320}}}`)
	u, problem, err := ParseUsageJSON(OpenAI, body, 0)
	fmt.Printf("%+v %v %v\n", u, problem, err)
	// Output: {Input:175 Output:144 CacheWrite:0 CacheRead:320} valid <nil>
}
