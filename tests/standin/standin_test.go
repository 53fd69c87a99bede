package standin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go"
	aoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go/v3"
	ooption "github.com/openai/openai-go/v3/option"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
)

const testKey = "sk-upstream-test-0001"

func start(t *testing.T, opts Options) (*Server, string) {
	t.Helper()
	if opts.Keys == nil {
		opts.Keys = []string{testKey}
	}
	s := New(opts)
	url, closeFn := s.Start()
	t.Cleanup(closeFn)
	return s, url
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func anthropicClient(url, key string, opts ...aoption.RequestOption) anthropic.Client {
	return anthropic.NewClient(append([]aoption.RequestOption{
		aoption.WithBaseURL(url), aoption.WithAPIKey(key), aoption.WithMaxRetries(0),
	}, opts...)...)
}

func openaiClient(url, key string, opts ...ooption.RequestOption) openai.Client {
	return openai.NewClient(append([]ooption.RequestOption{
		ooption.WithBaseURL(url + "/v1/"), ooption.WithAPIKey(key), ooption.WithMaxRetries(0),
	}, opts...)...)
}

var messageParams = anthropic.MessageNewParams{
	Model:     anthropic.ModelClaudeSonnet4_5,
	MaxTokens: 1024,
	Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("Hello, how are you?"))},
}

func chatParams(stream bool) openai.ChatCompletionNewParams {
	p := openai.ChatCompletionNewParams{
		Model:    "gpt-4.1-nano",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Invent a new holiday.")},
	}
	if stream {
		p.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	}
	return p
}

// nonPing counts the events other than ping, which the Anthropic SDK does
// not surface.
func nonPing(chunks [][]byte) int {
	n := 0
	for _, c := range chunks {
		if !bytes.Equal(c, []byte(`{"type":"ping"}`)) {
			n++
		}
	}
	return n
}

func anthropicUsage(u anthropic.Usage) fixtures.Usage {
	return fixtures.Usage{Input: u.InputTokens, Output: u.OutputTokens, CacheWrite: u.CacheCreationInputTokens, CacheRead: u.CacheReadInputTokens}
}

func anthropicText(m *anthropic.Message) string {
	var b strings.Builder
	for _, c := range m.Content {
		if c.Type == "text" {
			b.WriteString(c.Text)
		}
	}
	return b.String()
}

func openaiUsage(u openai.CompletionUsage) fixtures.Usage {
	return fixtures.Usage{Input: u.PromptTokens, Output: u.CompletionTokens, CacheRead: u.PromptTokensDetails.CachedTokens}
}

func TestAnthropicSDK(t *testing.T) {
	s, url := start(t, Options{})
	for _, name := range []string{"ant-text", "ant-cache"} {
		fx := fixtures.Get(name)
		client := anthropicClient(url, testKey, aoption.WithHeader(HeaderFixture, name))

		t.Run(name+"/json", func(t *testing.T) {
			msg, err := client.Messages.New(ctx(t), messageParams)
			if err != nil {
				t.Fatal(err)
			}
			want, wantText := fx.JSONUsage, fx.JSONText
			if !fx.HasJSON { // reassembled from the stream
				want, wantText = fx.SSEUsage, fx.SSEText
			}
			if got := anthropicUsage(msg.Usage); got != want {
				t.Errorf("usage = %+v, want %+v", got, want)
			}
			if got := anthropicText(msg); got != wantText {
				t.Errorf("text = %q, want %q", got, wantText)
			}
			if msg.StopReason != anthropic.StopReasonEndTurn {
				t.Errorf("stop reason = %q", msg.StopReason)
			}
		})

		t.Run(name+"/stream", func(t *testing.T) {
			stream := client.Messages.NewStreaming(ctx(t), messageParams)
			var msg anthropic.Message
			events := 0
			for stream.Next() {
				events++
				if err := msg.Accumulate(stream.Current()); err != nil {
					t.Fatalf("accumulate event %d: %v", events, err)
				}
			}
			if err := stream.Err(); err != nil {
				t.Fatal(err)
			}
			_ = stream.Close()
			if want := nonPing(fx.Chunks); events != want {
				t.Errorf("%d events, want %d (the SDK hides pings)", events, want)
			}
			if got := anthropicUsage(msg.Usage); got != fx.SSEUsage {
				t.Errorf("usage = %+v, want %+v", got, fx.SSEUsage)
			}
			if got := anthropicText(&msg); got != fx.SSEText {
				t.Errorf("text = %q, want %q", got, fx.SSEText)
			}
		})
	}

	// The SDK authenticated with x-api-key and reached /v1/messages.
	reqs := s.Requests()
	if len(reqs) != 4 {
		t.Fatalf("%d requests recorded, want 4", len(reqs))
	}
	r := reqs[0]
	if r.Method != http.MethodPost || r.Path != PathMessages || r.Header.Get("X-Api-Key") != testKey || !json.Valid(r.Body) {
		t.Errorf("recorded request = %s %s key=%q body=%s", r.Method, r.Path, r.Header.Get("X-Api-Key"), r.Body)
	}
	var body struct {
		Stream bool `json:"stream"`
	}
	if err := json.Unmarshal(reqs[1].Body, &body); err != nil || !body.Stream {
		t.Errorf("second request is not a stream request: %s", reqs[1].Body)
	}
	s.Reset()
	if n := len(s.Requests()); n != 0 {
		t.Errorf("%d requests after Reset", n)
	}
}

func TestOpenAISDK(t *testing.T) {
	s, url := start(t, Options{})
	for _, name := range []string{"oai-text", "oai-cached"} {
		fx := fixtures.Get(name)
		client := openaiClient(url, testKey, ooption.WithHeader(HeaderFixture, name))

		t.Run(name+"/json", func(t *testing.T) {
			c, err := client.Chat.Completions.New(ctx(t), chatParams(false))
			if err != nil {
				t.Fatal(err)
			}
			if got := openaiUsage(c.Usage); got != fx.JSONUsage {
				t.Errorf("usage = %+v, want %+v", got, fx.JSONUsage)
			}
			_, text, _ := fixtures.UsageFromJSON(fixtures.OpenAI, fx.JSON)
			if len(c.Choices) != 1 || c.Choices[0].Message.Content != text {
				t.Errorf("content differs from the recording")
			}
		})

		t.Run(name+"/stream", func(t *testing.T) {
			stream := client.Chat.Completions.NewStreaming(ctx(t), chatParams(true))
			var acc openai.ChatCompletionAccumulator
			for stream.Next() {
				acc.AddChunk(stream.Current())
			}
			if err := stream.Err(); err != nil {
				t.Fatal(err)
			}
			_ = stream.Close()
			if got := openaiUsage(acc.Usage); got != fx.SSEUsage {
				t.Errorf("usage = %+v, want %+v", got, fx.SSEUsage)
			}
			_, text, _ := fixtures.UsageFromChunks(fixtures.OpenAI, fx.Chunks)
			if len(acc.Choices) != 1 || acc.Choices[0].Message.Content != text {
				t.Errorf("accumulated content differs from the recording")
			}
		})
	}
	for _, r := range s.Requests() {
		if r.Path != PathChatCompletions || r.Header.Get("Authorization") != "Bearer "+testKey {
			t.Errorf("recorded %s with Authorization %q", r.Path, r.Header.Get("Authorization"))
		}
	}
}

func TestSDKErrors(t *testing.T) {
	s, url := start(t, Options{})

	t.Run("anthropic bad key", func(t *testing.T) {
		client := anthropicClient(url, "sk-wrong")
		_, err := client.Messages.New(ctx(t), messageParams)
		var apiErr *anthropic.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
			t.Fatalf("err = %v, want an SDK error with status 401", err)
		}
		if !strings.Contains(apiErr.RawJSON(), "Invalid proxy server token passed") || !strings.Contains(apiErr.RawJSON(), `"auth_error"`) {
			t.Errorf("body = %s", apiErr.RawJSON())
		}
	})
	t.Run("openai bad key", func(t *testing.T) {
		client := openaiClient(url, "sk-wrong")
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
			t.Fatalf("err = %v, want an SDK error with status 401", err)
		}
		if apiErr.Type != "auth_error" || apiErr.Code != "401" {
			t.Errorf("type/code = %q/%q", apiErr.Type, apiErr.Code)
		}
	})
	t.Run("anthropic 429", func(t *testing.T) {
		client := anthropicClient(url, testKey, aoption.WithHeader(HeaderStatus, "429"))
		_, err := client.Messages.New(ctx(t), messageParams)
		var apiErr *anthropic.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("err = %v, want an SDK error with status 429", err)
		}
		var body struct {
			Type  string `json:"type"`
			Error struct {
				Type string `json:"type"`
			} `json:"error"`
		}
		if err := json.Unmarshal([]byte(apiErr.RawJSON()), &body); err != nil || body.Type != "error" || body.Error.Type != "rate_limit_error" {
			t.Errorf("body = %s, want an Anthropic rate_limit_error", apiErr.RawJSON())
		}
		// Streaming requests fail the same way, before any event.
		stream := client.Messages.NewStreaming(ctx(t), messageParams)
		for stream.Next() {
			t.Fatal("got an event from a failed stream")
		}
		if !errors.As(stream.Err(), &apiErr) || apiErr.StatusCode != http.StatusTooManyRequests {
			t.Errorf("stream err = %v, want status 429", stream.Err())
		}
	})
	t.Run("openai 429", func(t *testing.T) {
		client := openaiClient(url, testKey, ooption.WithHeader(HeaderStatus, "429"))
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("err = %v, want an SDK error with status 429", err)
		}
		if apiErr.Type != "rate_limit_error" {
			t.Errorf("type = %q", apiErr.Type)
		}
	})
	t.Run("key status", func(t *testing.T) {
		s.SetKeyStatus(testKey, StatusBudget)
		defer s.SetKeyStatus(testKey, "")
		client := openaiClient(url, testKey)
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusBadRequest || apiErr.Type != "budget_exceeded" {
			t.Fatalf("err = %v, want a 400 budget_exceeded", err)
		}
	})
	t.Run("set keys", func(t *testing.T) {
		s.SetKeys("sk-rotated")
		defer s.SetKeys(testKey)
		rotated, old := openaiClient(url, "sk-rotated"), openaiClient(url, testKey)
		_, err := rotated.Chat.Completions.New(ctx(t), chatParams(false))
		if err != nil {
			t.Fatalf("new key refused: %v", err)
		}
		_, err = old.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusUnauthorized {
			t.Fatalf("old key: err = %v, want 401", err)
		}
	})
}

// post sends a raw request and returns the response with its body read.
func post(t *testing.T, url, path, body string, hdr map[string]string) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx(t), http.MethodPost, url+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+testKey)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func TestWire(t *testing.T) {
	_, url := start(t, Options{})

	t.Run("openai stream without include_usage", func(t *testing.T) {
		resp, b, err := post(t, url, PathChatCompletions, `{"model":"m","stream":true}`, nil)
		if err != nil {
			t.Fatal(err)
		}
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" || resp.Header.Get("Cache-Control") != "no-cache" {
			t.Errorf("headers = %v", resp.Header)
		}
		if !bytes.Equal(b, fixtures.Get("oai-text").SSE(false)) {
			t.Error("body differs from fixtures SSE(false)")
		}
	})
	t.Run("openai stream with include_usage", func(t *testing.T) {
		_, b, err := post(t, url, PathChatCompletions, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`,
			map[string]string{HeaderFixture: "oai-cached"})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, fixtures.Get("oai-cached").SSE(true)) {
			t.Error("body differs from fixtures SSE(true)")
		}
	})
	t.Run("anthropic json", func(t *testing.T) {
		resp, b, err := post(t, url, PathMessages, `{"model":"claude","max_tokens":5,"stream":false}`, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get(HeaderFixtureUsed) != "ant-text" {
			t.Errorf("headers = %v", resp.Header)
		}
		if !bytes.Equal(b, fixtures.Get("ant-text").JSON) {
			t.Error("body differs from the recorded JSON")
		}
	})
	t.Run("anthropic stream", func(t *testing.T) {
		_, b, err := post(t, url, PathMessages, `{"model":"claude","stream":true}`, map[string]string{HeaderFixture: "ant-cache"})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, fixtures.Get("ant-cache").SSE(true)) {
			t.Error("body differs from fixtures SSE")
		}
	})

	errorCases := []struct {
		name, path, body string
		hdr              map[string]string
		status           int
		contains         string
	}{
		{"unknown path", "/v1/embeddings", `{"model":"m"}`, nil, 404, `"type":"not_found_error"`},
		{"bad json", PathMessages, `{"model":`, nil, 400, `"code":"400"`},
		{"no model", PathChatCompletions, `{"messages":[]}`, nil, 400, "Invalid model name"},
		{"empty model", PathChatCompletions, `{"model":""}`, nil, 400, "Invalid model name"},
		{"model not a string", PathChatCompletions, `{"model":5}`, nil, 400, "Invalid model name"},
		{"fixture of the other api", PathMessages, `{"model":"m"}`, map[string]string{HeaderFixture: "oai-text"}, 400, "not for /v1/messages"},
		{"unknown fixture", PathMessages, `{"model":"m"}`, map[string]string{HeaderFixture: "nope"}, 400, "unknown fixture"},
		{"no key", PathMessages, `{"model":"m"}`, map[string]string{"Authorization": ""}, 401, "No api key passed in"},
		{"bad x-api-key", PathMessages, `{"model":"m"}`, map[string]string{"Authorization": "", "X-Api-Key": "sk-nope-1234"}, 401, "Received API Key = sk-...1234"},
		{"forced 529 anthropic", PathMessages, `{"model":"m"}`, map[string]string{HeaderStatus: "529"}, 529, `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`},
		{"forced 500 openai", PathChatCompletions, `{"model":"m"}`, map[string]string{HeaderStatus: "500"}, 500, `"type":"server_error"`},
		{"forced 401 is litellm's", PathMessages, `{"model":"m"}`, map[string]string{HeaderStatus: "401"}, 401, `"type":"auth_error"`},
		{"forced budget", PathMessages, `{"model":"m"}`, map[string]string{HeaderStatus: StatusBudget}, 400, `"type":"budget_exceeded"`},
	}
	for _, tc := range errorCases {
		t.Run(tc.name, func(t *testing.T) {
			resp, b, err := post(t, url, tc.path, tc.body, tc.hdr)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != tc.status || !strings.Contains(string(b), tc.contains) || !json.Valid(b) {
				t.Errorf("got %d %s, want %d containing %s", resp.StatusCode, b, tc.status, tc.contains)
			}
			if resp.Header.Get("Content-Type") != "application/json" {
				t.Errorf("content type %q", resp.Header.Get("Content-Type"))
			}
		})
	}
	t.Run("GET is not found", func(t *testing.T) {
		resp, err := http.Get(url + PathMessages)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Errorf("status %d", resp.StatusCode)
		}
	})
}

func TestCutAfter(t *testing.T) {
	_, url := start(t, Options{})
	fx := fixtures.Get("ant-text")

	_, b, err := post(t, url, PathMessages, `{"model":"m","stream":true}`, map[string]string{HeaderCutAfter: "3"})
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("read error = %v, want unexpected EOF", err)
	}
	if want := bytes.Join(fx.Events(true)[:3], nil); !bytes.Equal(b, want) {
		t.Errorf("got %q before the cut, want the first 3 events", b)
	}

	// Through the SDK the cut shows as a stream error, with no message_stop.
	client := anthropicClient(url, testKey, aoption.WithHeader(HeaderCutAfter, "5"))
	stream := client.Messages.NewStreaming(ctx(t), messageParams)
	n := 0
	for stream.Next() {
		n++
	}
	if want := nonPing(fx.Chunks[:5]); n != want || stream.Err() == nil {
		t.Errorf("SDK saw %d events and err %v, want %d and an error", n, stream.Err(), want)
	}

	// A non-stream body is cut after n bytes.
	_, b, err = post(t, url, PathMessages, `{"model":"m"}`, map[string]string{HeaderCutAfter: "10"})
	if !errors.Is(err, io.ErrUnexpectedEOF) || string(b) != string(fx.JSON[:10]) {
		t.Errorf("non-stream cut: %q, %v", b, err)
	}
}

func TestEventDelayAndClientGone(t *testing.T) {
	s, url := start(t, Options{EventDelay: 20 * time.Millisecond})
	// oai-text has 303 events: 6 s at this pace; the client leaves early.
	c, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(c, http.MethodPost, url+PathChatCompletions, strings.NewReader(`{"model":"m","stream":true}`))
	req.Header.Set("Authorization", "Bearer "+testKey)
	begin := time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	read := 0
	for read < 3*len("data: ") {
		n, err := resp.Body.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		read += n
	}
	cancel()
	resp.Body.Close()

	done := make(chan struct{})
	go func() { s.active.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("the handler kept streaming after the client left")
	}
	if el := time.Since(begin); el > 3*time.Second {
		t.Errorf("took %v", el)
	}

	// The per-request header overrides the delay: 12 events, 11 pauses.
	begin = time.Now()
	_, _, err = post(t, url, PathMessages, `{"model":"m","stream":true}`, map[string]string{HeaderEventDelay: "30ms"})
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(begin); el < 11*30*time.Millisecond {
		t.Errorf("stream took %v, want at least %v", el, 11*30*time.Millisecond)
	}
}

// TestHandlerInHTTPTest uses the Server as a plain handler, concurrently.
func TestHandlerInHTTPTest(t *testing.T) {
	s := New(Options{Keys: []string{testKey}})
	ts := httptest.NewServer(s)
	defer ts.Close()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			name := []string{"oai-text", "oai-cached"}[i%2]
			client := openaiClient(ts.URL, testKey, ooption.WithHeader(HeaderFixture, name))
			stream := client.Chat.Completions.NewStreaming(context.Background(), chatParams(true))
			var acc openai.ChatCompletionAccumulator
			for stream.Next() {
				acc.AddChunk(stream.Current())
			}
			if err := stream.Err(); err != nil {
				t.Error(err)
				return
			}
			if got := openaiUsage(acc.Usage); got != fixtures.Get(name).SSEUsage {
				t.Errorf("%s: usage %+v", name, got)
			}
		})
	}
	wg.Wait()
	if n := len(s.Requests()); n != 8 {
		t.Errorf("%d requests recorded, want 8", n)
	}
}

func TestSetDefaultFixture(t *testing.T) {
	s, url := start(t, Options{})
	if err := s.SetDefaultFixture("nope"); err == nil {
		t.Error("unknown fixture accepted")
	}
	if err := s.SetDefaultFixture("ant-cache"); err != nil {
		t.Fatal(err)
	}
	resp, _, err := post(t, url, PathMessages, `{"model":"m"}`, nil)
	if err != nil || resp.Header.Get(HeaderFixtureUsed) != "ant-cache" {
		t.Errorf("fixture used = %q, %v", resp.Header.Get(HeaderFixtureUsed), err)
	}
	resp, _, _ = post(t, url, PathChatCompletions, `{"model":"m"}`, nil)
	if resp.Header.Get(HeaderFixtureUsed) != "oai-text" {
		t.Errorf("openai default changed to %q", resp.Header.Get(HeaderFixtureUsed))
	}
}

// TestUsageHeader checks X-Standin-Usage replaces the usage of a JSON answer
// and of the final usage event of a stream, for both APIs.
func TestUsageHeader(t *testing.T) {
	_, url := start(t, Options{})
	const usage = `{"prompt_tokens":-1,"input_tokens":"x","output_tokens":1e15}`
	for _, tc := range []struct {
		path, body string
	}{
		{PathMessages, `{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}`},
		{PathMessages, `{"model":"m","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}`},
		{PathChatCompletions, `{"model":"m","messages":[{"role":"user","content":"hi"}]}`},
		{PathChatCompletions, `{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}`},
		{PathChatCompletions, `{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}`},
	} {
		req, _ := http.NewRequest(http.MethodPost, url+tc.path, strings.NewReader(tc.body))
		req.Header.Set("Authorization", "Bearer "+testKey)
		req.Header.Set(HeaderUsage, usage)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if n := strings.Count(string(raw), usage); resp.StatusCode != 200 || n != 1 {
			t.Errorf("%s %s: %d, usage replaced %d times in %.300s", tc.path, tc.body, resp.StatusCode, n, raw)
		}
	}
	req, _ := http.NewRequest(http.MethodPost, url+PathMessages, strings.NewReader(`{"model":"m","max_tokens":5,"messages":[]}`))
	req.Header.Set("Authorization", "Bearer "+testKey)
	req.Header.Set(HeaderUsage, `{"input_tokens":`)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("invalid usage JSON: %d, want 400", resp.StatusCode)
	}
}
