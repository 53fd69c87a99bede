package standin

import (
	"bytes"
	"context"
	"encoding/json"
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
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
			require.NoError(t, err)
			want, wantText := fx.JSONUsage, fx.JSONText
			if !fx.HasJSON { // reassembled from the stream
				want, wantText = fx.SSEUsage, fx.SSEText
			}
			assert.Equal(t, want, anthropicUsage(msg.Usage), "usage")
			assert.Equal(t, wantText, anthropicText(msg), "text")
			assert.Equal(t, anthropic.StopReasonEndTurn, msg.StopReason, "stop reason")
		})

		t.Run(name+"/stream", func(t *testing.T) {
			stream := client.Messages.NewStreaming(ctx(t), messageParams)
			var msg anthropic.Message
			events := 0
			for stream.Next() {
				events++
				require.NoError(t, msg.Accumulate(stream.Current()), "accumulate event %d", events)
			}
			require.NoError(t, stream.Err())
			_ = stream.Close()
			assert.Equal(t, nonPing(fx.Chunks), events, "events (the SDK hides pings)")
			assert.Equal(t, fx.SSEUsage, anthropicUsage(msg.Usage), "usage")
			assert.Equal(t, fx.SSEText, anthropicText(&msg), "text")
		})
	}

	// The SDK authenticated with x-api-key and reached /v1/messages.
	reqs := s.Requests()
	require.Len(t, reqs, 4, "requests recorded")
	r := reqs[0]
	assert.Equal(t, http.MethodPost, r.Method, "recorded request")
	assert.Equal(t, PathMessages, r.Path, "recorded request")
	assert.Equal(t, testKey, r.Header.Get("X-Api-Key"), "recorded request")
	assert.True(t, json.Valid(r.Body), "recorded request body %s", r.Body)
	var body struct {
		Stream bool `json:"stream"`
	}
	if assert.NoError(t, json.Unmarshal(reqs[1].Body, &body), "second request: %s", reqs[1].Body) {
		assert.True(t, body.Stream, "second request is not a stream request: %s", reqs[1].Body)
	}
	s.Reset()
	assert.Empty(t, s.Requests(), "requests after Reset")
}

func TestOpenAISDK(t *testing.T) {
	s, url := start(t, Options{})
	for _, name := range []string{"oai-text", "oai-cached"} {
		fx := fixtures.Get(name)
		client := openaiClient(url, testKey, ooption.WithHeader(HeaderFixture, name))

		t.Run(name+"/json", func(t *testing.T) {
			c, err := client.Chat.Completions.New(ctx(t), chatParams(false))
			require.NoError(t, err)
			assert.Equal(t, fx.JSONUsage, openaiUsage(c.Usage), "usage")
			_, text, _ := fixtures.UsageFromJSON(fixtures.OpenAI, fx.JSON)
			if assert.Len(t, c.Choices, 1) {
				assert.Equal(t, text, c.Choices[0].Message.Content, "content differs from the recording")
			}
		})

		t.Run(name+"/stream", func(t *testing.T) {
			stream := client.Chat.Completions.NewStreaming(ctx(t), chatParams(true))
			var acc openai.ChatCompletionAccumulator
			for stream.Next() {
				acc.AddChunk(stream.Current())
			}
			require.NoError(t, stream.Err())
			_ = stream.Close()
			assert.Equal(t, fx.SSEUsage, openaiUsage(acc.Usage), "usage")
			_, text, _ := fixtures.UsageFromChunks(fixtures.OpenAI, fx.Chunks)
			if assert.Len(t, acc.Choices, 1) {
				assert.Equal(t, text, acc.Choices[0].Message.Content, "accumulated content differs from the recording")
			}
		})
	}
	for _, r := range s.Requests() {
		assert.Equal(t, PathChatCompletions, r.Path, "recorded path")
		assert.Equal(t, "Bearer "+testKey, r.Header.Get("Authorization"), "recorded %s: Authorization", r.Path)
	}
}

func TestSDKErrors(t *testing.T) {
	s, url := start(t, Options{})

	t.Run("anthropic bad key", func(t *testing.T) {
		client := anthropicClient(url, "sk-wrong")
		_, err := client.Messages.New(ctx(t), messageParams)
		var apiErr *anthropic.Error
		require.ErrorAs(t, err, &apiErr, "want an SDK error")
		require.Equal(t, http.StatusUnauthorized, apiErr.StatusCode, "err = %v", err)
		assert.Contains(t, apiErr.RawJSON(), "Invalid proxy server token passed")
		assert.Contains(t, apiErr.RawJSON(), `"auth_error"`)
	})
	t.Run("openai bad key", func(t *testing.T) {
		client := openaiClient(url, "sk-wrong")
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		require.ErrorAs(t, err, &apiErr, "want an SDK error")
		require.Equal(t, http.StatusUnauthorized, apiErr.StatusCode, "err = %v", err)
		assert.Equal(t, "auth_error", apiErr.Type, "type")
		assert.Equal(t, "401", apiErr.Code, "code")
	})
	t.Run("anthropic 429", func(t *testing.T) {
		client := anthropicClient(url, testKey, aoption.WithHeader(HeaderStatus, "429"))
		_, err := client.Messages.New(ctx(t), messageParams)
		var apiErr *anthropic.Error
		require.ErrorAs(t, err, &apiErr, "want an SDK error")
		require.Equal(t, http.StatusTooManyRequests, apiErr.StatusCode, "err = %v", err)
		var body struct {
			Type  string `json:"type"`
			Error struct {
				Type string `json:"type"`
			} `json:"error"`
		}
		if assert.NoError(t, json.Unmarshal([]byte(apiErr.RawJSON()), &body), "body = %s", apiErr.RawJSON()) {
			assert.Equal(t, "error", body.Type, "body = %s, want an Anthropic rate_limit_error", apiErr.RawJSON())
			assert.Equal(t, "rate_limit_error", body.Error.Type, "body = %s, want an Anthropic rate_limit_error", apiErr.RawJSON())
		}
		// Streaming requests fail the same way, before any event.
		stream := client.Messages.NewStreaming(ctx(t), messageParams)
		require.False(t, stream.Next(), "got an event from a failed stream")
		if assert.ErrorAs(t, stream.Err(), &apiErr, "stream err") {
			assert.Equal(t, http.StatusTooManyRequests, apiErr.StatusCode, "stream err = %v", stream.Err())
		}
	})
	t.Run("openai 429", func(t *testing.T) {
		client := openaiClient(url, testKey, ooption.WithHeader(HeaderStatus, "429"))
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		require.ErrorAs(t, err, &apiErr, "want an SDK error")
		require.Equal(t, http.StatusTooManyRequests, apiErr.StatusCode, "err = %v", err)
		assert.Equal(t, "rate_limit_error", apiErr.Type, "type")
	})
	t.Run("key status", func(t *testing.T) {
		s.SetKeyStatus(testKey, StatusBudget)
		defer s.SetKeyStatus(testKey, "")
		client := openaiClient(url, testKey)
		_, err := client.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		require.ErrorAs(t, err, &apiErr, "want a 400 budget_exceeded")
		assert.Equal(t, http.StatusBadRequest, apiErr.StatusCode, "err = %v", err)
		assert.Equal(t, "budget_exceeded", apiErr.Type, "err = %v", err)
	})
	t.Run("set keys", func(t *testing.T) {
		s.SetKeys("sk-rotated")
		defer s.SetKeys(testKey)
		rotated, old := openaiClient(url, "sk-rotated"), openaiClient(url, testKey)
		_, err := rotated.Chat.Completions.New(ctx(t), chatParams(false))
		require.NoError(t, err, "new key refused")
		_, err = old.Chat.Completions.New(ctx(t), chatParams(false))
		var apiErr *openai.Error
		require.ErrorAs(t, err, &apiErr, "old key")
		assert.Equal(t, http.StatusUnauthorized, apiErr.StatusCode, "old key: err = %v", err)
	})
}

// post sends a raw request and returns the response with its body read.
func post(t *testing.T, url, path, body string, hdr map[string]string) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx(t), http.MethodPost, url+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+testKey)
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, b, err
}

func TestWire(t *testing.T) {
	_, url := start(t, Options{})

	t.Run("openai stream without include_usage", func(t *testing.T) {
		resp, b, err := post(t, url, PathChatCompletions, `{"model":"m","stream":true}`, nil)
		require.NoError(t, err)
		assert.Equal(t, "text/event-stream", resp.Header.Get("Content-Type"), "headers = %v", resp.Header)
		assert.Equal(t, "no-cache", resp.Header.Get("Cache-Control"), "headers = %v", resp.Header)
		assert.Equal(t, string(fixtures.Get("oai-text").SSE(false)), string(b), "body differs from fixtures SSE(false)")
	})
	t.Run("openai stream with include_usage", func(t *testing.T) {
		_, b, err := post(t, url, PathChatCompletions, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`,
			map[string]string{HeaderFixture: "oai-cached"})
		require.NoError(t, err)
		assert.Equal(t, string(fixtures.Get("oai-cached").SSE(true)), string(b), "body differs from fixtures SSE(true)")
	})
	t.Run("anthropic json", func(t *testing.T) {
		resp, b, err := post(t, url, PathMessages, `{"model":"claude","max_tokens":5,"stream":false}`, nil)
		require.NoError(t, err)
		assert.Equal(t, "application/json", resp.Header.Get("Content-Type"), "headers = %v", resp.Header)
		assert.Equal(t, "ant-text", resp.Header.Get(HeaderFixtureUsed), "headers = %v", resp.Header)
		assert.Equal(t, string(fixtures.Get("ant-text").JSON), string(b), "body differs from the recorded JSON")
	})
	t.Run("anthropic stream", func(t *testing.T) {
		_, b, err := post(t, url, PathMessages, `{"model":"claude","stream":true}`, map[string]string{HeaderFixture: "ant-cache"})
		require.NoError(t, err)
		assert.Equal(t, string(fixtures.Get("ant-cache").SSE(true)), string(b), "body differs from fixtures SSE")
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
			require.NoError(t, err)
			assert.Equal(t, tc.status, resp.StatusCode, "body %s", b)
			assert.Contains(t, string(b), tc.contains)
			assert.True(t, json.Valid(b), "body is not JSON: %s", b)
			assert.Equal(t, "application/json", resp.Header.Get("Content-Type"), "content type")
		})
	}
	t.Run("GET is not found", func(t *testing.T) {
		resp, err := http.Get(url + PathMessages)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, 404, resp.StatusCode, "status")
	})
}

func TestCutAfter(t *testing.T) {
	_, url := start(t, Options{})
	fx := fixtures.Get("ant-text")

	_, b, err := post(t, url, PathMessages, `{"model":"m","stream":true}`, map[string]string{HeaderCutAfter: "3"})
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "read error")
	assert.Equal(t, string(bytes.Join(fx.Events(true)[:3], nil)), string(b), "before the cut, want the first 3 events")

	// Through the SDK the cut shows as a stream error, with no message_stop.
	client := anthropicClient(url, testKey, aoption.WithHeader(HeaderCutAfter, "5"))
	stream := client.Messages.NewStreaming(ctx(t), messageParams)
	n := 0
	for stream.Next() {
		n++
	}
	assert.Equal(t, nonPing(fx.Chunks[:5]), n, "events the SDK saw")
	assert.Error(t, stream.Err(), "the SDK saw no error")

	// A non-stream body is cut after n bytes.
	_, b, err = post(t, url, PathMessages, `{"model":"m"}`, map[string]string{HeaderCutAfter: "10"})
	assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "non-stream cut")
	assert.Equal(t, string(fx.JSON[:10]), string(b), "non-stream cut")
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
	require.NoError(t, err)
	buf := make([]byte, 4096)
	read := 0
	for read < 3*len("data: ") {
		n, err := resp.Body.Read(buf)
		require.NoError(t, err)
		read += n
	}
	cancel()
	resp.Body.Close()

	done := make(chan struct{})
	go func() { s.active.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		require.FailNow(t, "the handler kept streaming after the client left")
	}
	assert.LessOrEqual(t, time.Since(begin), 3*time.Second, "time until the handler stopped")

	// The per-request header overrides the delay: 12 events, 11 pauses.
	begin = time.Now()
	_, _, err = post(t, url, PathMessages, `{"model":"m","stream":true}`, map[string]string{HeaderEventDelay: "30ms"})
	require.NoError(t, err)
	assert.GreaterOrEqual(t, time.Since(begin), 11*30*time.Millisecond, "stream time")
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
			if !assert.NoError(t, stream.Err()) {
				return
			}
			assert.Equal(t, fixtures.Get(name).SSEUsage, openaiUsage(acc.Usage), "%s: usage", name)
		})
	}
	wg.Wait()
	assert.Len(t, s.Requests(), 8, "requests recorded")
}

func TestSetDefaultFixture(t *testing.T) {
	s, url := start(t, Options{})
	assert.Error(t, s.SetDefaultFixture("nope"), "unknown fixture accepted")
	require.NoError(t, s.SetDefaultFixture("ant-cache"))
	resp, _, err := post(t, url, PathMessages, `{"model":"m"}`, nil)
	assert.NoError(t, err)
	assert.Equal(t, "ant-cache", resp.Header.Get(HeaderFixtureUsed), "fixture used")
	resp, _, _ = post(t, url, PathChatCompletions, `{"model":"m"}`, nil)
	assert.Equal(t, "oai-text", resp.Header.Get(HeaderFixtureUsed), "openai default changed")
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
		require.NoError(t, err)
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.Equal(t, 200, resp.StatusCode, "%s %s: %.300s", tc.path, tc.body, raw)
		assert.Equal(t, 1, strings.Count(string(raw), usage), "%s %s: times the usage was replaced in %.300s", tc.path, tc.body, raw)
	}
	req, _ := http.NewRequest(http.MethodPost, url+PathMessages, strings.NewReader(`{"model":"m","max_tokens":5,"messages":[]}`))
	req.Header.Set("Authorization", "Bearer "+testKey)
	req.Header.Set(HeaderUsage, `{"input_tokens":`)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode, "invalid usage JSON")
}
