package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go"
	antoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go/v3"
	oaioption "github.com/openai/openai-go/v3/option"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

type refusal struct {
	name      string
	base      string
	setup     func(t *testing.T) (user, key string) // user "" when there is none
	body      func() []byte
	headers   map[string]string
	status    int
	oaiType   string
	oaiCode   string
	antType   string
	msgPrefix string
}

func validBody(model string) func() []byte {
	return func() []byte {
		return []byte(`{"model":"` + model + `","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}`)
	}
}

func userWith(u seed.User) func(t *testing.T) (string, string) {
	return func(t *testing.T) (string, string) {
		nu, key := newUser(t, u)
		return nu.ID, key
	}
}

func userKeyWith(uk seed.UserKey) func(t *testing.T) (string, string) {
	return func(t *testing.T) (string, string) {
		nu, _ := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5, Credits: 5})
		uk.User = nu.ID
		uk.Key = "sk-troll-" + randHex(24)
		rememberKey(uk.Key)
		if err := seed.Insert(context.Background(), db, uk); err != nil {
			t.Fatal(err)
		}
		return nu.ID, uk.Key
	}
}

func TestRefusedRequestsChargeNothing(t *testing.T) {
	noLeaks(t)
	funded := seed.User{Active: true, Migration: true, CreditsNew: 5, Credits: 5, RefCredits: 1}
	past := time.Now().Add(-time.Hour)
	cases := []refusal{
		{name: "no key", base: chatURL, setup: func(*testing.T) (string, string) { return "", "" },
			body: validBody("claude-sonnet-4-5"), status: 401, oaiType: "invalid_request_error", antType: "authentication_error", msgPrefix: "Authorization header is required"},
		{name: "not a bearer", base: chatURL, setup: func(*testing.T) (string, string) { return "", "" },
			headers: map[string]string{"Authorization": "Basic abc"},
			body:    validBody("claude-sonnet-4-5"), status: 401, oaiType: "invalid_request_error", antType: "authentication_error", msgPrefix: "Invalid authorization header format"},
		{name: "unknown key", base: chatURL, setup: func(*testing.T) (string, string) { return "", "sk-trollllm-" + randHex(64) },
			body: validBody("claude-sonnet-4-5"), status: 401, oaiType: "authentication_error", antType: "authentication_error", msgPrefix: "Invalid API key"},
		{name: "revoked user_keys key", base: chatURL, setup: userKeyWith(seed.UserKey{Active: false}),
			body: validBody("claude-sonnet-4-5"), status: 401, oaiType: "authentication_error", antType: "authentication_error", msgPrefix: "API key has been revoked"},
		{name: "inactive user", base: chat2URL, setup: userWith(seed.User{Active: false, Migration: true, Credits: 5}),
			body: validBody("claude-sonnet-4-5"), status: 401, oaiType: "authentication_error", antType: "authentication_error", msgPrefix: "API key has been revoked"},
		{name: "expired key", base: chatURL, setup: userKeyWith(seed.UserKey{Active: true, ExpiresAt: &past}),
			body: validBody("claude-sonnet-4-5"), status: 402, oaiType: "insufficient_quota", oaiCode: "credits_expired", antType: "credits_expired", msgPrefix: "Credits have expired"},
		{name: "migration required", base: chatURL, setup: userWith(seed.User{Active: true, Migration: false, Role: "user", CreditsNew: 5}),
			body: validBody("claude-sonnet-4-5"), status: 403, oaiType: "migration_required", oaiCode: "migration_required", antType: "migration_required", msgPrefix: "Migration required"},
		{name: "no creditsNew on chat (credits elsewhere do not count)", base: chatURL, setup: userWith(seed.User{Active: true, Migration: true, CreditsNew: 0, Credits: 5, RefCredits: 5}),
			body: validBody("claude-sonnet-4-5"), status: 402, oaiType: "insufficient_quota", oaiCode: "insufficient_credits", antType: "insufficient_credits", msgPrefix: "Insufficient credit"},
		{name: "no credits nor refCredits on chat2", base: chat2URL, setup: userWith(seed.User{Active: true, Migration: true, CreditsNew: 50, Credits: 0, RefCredits: 0}),
			body: validBody("claude-sonnet-4-5"), status: 402, oaiType: "insufficient_quota", oaiCode: "insufficient_credits", antType: "insufficient_credits", msgPrefix: "Insufficient credits"},
		{name: "unknown model", base: chatURL, setup: userWith(funded),
			body: validBody("gpt-9-ultra"), status: 404, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: "Model"},
		{name: "model only on another site", base: chat2URL, setup: userWith(funded),
			body: validBody("claude-opus-4-6"), status: 404, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: "Model"},
		{name: "invalid JSON", base: chatURL, setup: userWith(funded),
			body: func() []byte { return []byte(`{"model":"claude-sonnet-4-5",`) }, status: 400, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: "Invalid JSON"},
		{name: "body not an object", base: chatURL, setup: userWith(funded),
			body: func() []byte { return []byte(`["model","claude-sonnet-4-5"]`) }, status: 400, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: "Invalid JSON"},
		{name: "missing model", base: chatURL, setup: userWith(funded),
			body: func() []byte { return []byte(`{"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}`) }, status: 400, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: "model is required"},
		{name: "overlong key", base: chatURL, setup: func(*testing.T) (string, string) { return "", "sk-trollllm-" + strings.Repeat("a", 300) },
			body: validBody("claude-sonnet-4-5"), status: 401, oaiType: "authentication_error", antType: "authentication_error", msgPrefix: "Invalid API key"},
		{name: "duplicate model field", base: chatURL, setup: userWith(funded),
			body: func() []byte { return []byte(`{"model":"claude-haiku-4-5","model":"claude-opus-4-6","messages":[]}`) }, status: 400, oaiType: "invalid_request_error", antType: "invalid_request_error", msgPrefix: `"model" appears more than once`},
		{name: "oversized body", base: chat2URL, setup: userWith(funded),
			body: func() []byte {
				return []byte(`{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"` + strings.Repeat("a", chat2BodyLimit) + `"}]}`)
			}, status: 413, oaiType: "invalid_request_error", antType: "request_too_large", msgPrefix: "Request body too large"},
	}
	for _, tc := range cases {
		for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
			t.Run(tc.name+" "+path, func(t *testing.T) {
				user, key := tc.setup(t)
				if key != "" {
					rememberKey(key)
				}
				var before map[string]float64
				if user != "" {
					before = balances(t, user)
				}
				testID := uniq(t, "req")
				hdr := map[string]string{"X-Test-Id": testID}
				for k, v := range tc.headers {
					hdr[k] = v
				}
				resp := post(t, tc.base+path, key, tc.body(), hdr)
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != tc.status {
					t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, raw)
				}
				if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
					t.Errorf("Content-Type %q", ct)
				}
				checkErrorShape(t, path, raw, tc.oaiType, tc.oaiCode, tc.antType, tc.msgPrefix)
				if n := len(upstreamRequests(testID)); n != 0 {
					t.Errorf("refused request reached the upstream %d times", n)
				}
				if user != "" {
					noLogsFor(t, user)
					if after := balances(t, user); mustJSON(after) != mustJSON(before) {
						t.Errorf("balances moved: before %v after %v", before, after)
					}
				}
			})
		}
	}
}

// checkErrorShape parses an error body in the shape of the endpoint's API.
func checkErrorShape(t *testing.T, path string, raw []byte, oaiType, oaiCode, antType, msgPrefix string) {
	t.Helper()
	if !json.Valid(raw) {
		t.Fatalf("error body is not JSON: %s", raw)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if path == "/v1/messages" {
		var b struct {
			Type  string `json:"type"`
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := dec.Decode(&b); err != nil {
			t.Fatalf("not an Anthropic error: %v: %s", err, raw)
		}
		if b.Type != "error" || b.Error.Type != antType || !strings.HasPrefix(b.Error.Message, msgPrefix) {
			t.Errorf("Anthropic error %+v, want type %q and a message starting %q", b, antType, msgPrefix)
		}
		return
	}
	var b struct {
		Error struct {
			Message string   `json:"message"`
			Type    string   `json:"type"`
			Code    string   `json:"code"`
			Balance *float64 `json:"balance"`
		} `json:"error"`
	}
	if err := dec.Decode(&b); err != nil {
		t.Fatalf("not an OpenAI error: %v: %s", err, raw)
	}
	if b.Error.Type != oaiType || b.Error.Code != oaiCode || !strings.HasPrefix(b.Error.Message, msgPrefix) {
		t.Errorf("OpenAI error %+v, want type %q code %q and a message starting %q", b.Error, oaiType, oaiCode, msgPrefix)
	}
}

// The official SDKs read the refusals as API errors with the right status.
func TestSDKsSeeRefusals(t *testing.T) {
	// The SDKs get a client of the test, so that noLeaks can close its idle connections.
	hc := &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	noLeaks(t, hc)
	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0, Credits: 5})
	ac := anthropic.NewClient(antoption.WithBaseURL(chatURL), antoption.WithAPIKey(key), antoption.WithMaxRetries(0), antoption.WithHTTPClient(hc))
	_, err := ac.Messages.New(context.Background(), anthropic.MessageNewParams{Model: "claude-sonnet-4-5", MaxTokens: 10,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hi"))}})
	var aerr *anthropic.Error
	if !errors.As(err, &aerr) || aerr.StatusCode != http.StatusPaymentRequired {
		t.Errorf("anthropic SDK error = %v, want a 402 API error", err)
	}
	oc := openai.NewClient(oaioption.WithBaseURL(chatURL+"/v1"), oaioption.WithAPIKey("sk-trollllm-"+randHex(64)), oaioption.WithMaxRetries(0), oaioption.WithHTTPClient(hc))
	_, err = oc.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{Model: "claude-sonnet-4-5",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
	var oerr *openai.Error
	if !errors.As(err, &oerr) || oerr.StatusCode != http.StatusUnauthorized || oerr.Type != "authentication_error" {
		t.Errorf("openai SDK error = %v, want a 401 authentication_error", err)
	}
}

// Paths and methods the gateway does not serve get JSON errors and never
// reach the upstream; /health and / answer as the legacy proxy did.
func TestOtherPathsAndMethods(t *testing.T) {
	noLeaks(t)
	for _, tc := range []struct {
		method, path string
		status       int
		api          string // error shape: OpenAI unless /v1/messages
	}{
		{http.MethodGet, "/v1/chat/completions", 405, "/v1/chat/completions"},
		{http.MethodGet, "/v1/messages", 405, "/v1/messages"},
		{http.MethodPost, "/v1/completions", 404, "/v1/chat/completions"},
		{http.MethodGet, "/v1/models/a/b", 404, "/v1/chat/completions"},
		{http.MethodGet, "/v1/messages/count_tokens", 405, "/v1/messages"},
		{http.MethodGet, "/admin", 404, "/v1/chat/completions"},
	} {
		testID := uniq(t, "req")
		req, _ := http.NewRequest(tc.method, chatURL+tc.path, strings.NewReader(`{}`))
		req.Header.Set("X-Test-Id", testID)
		req.Header.Set("Authorization", "Bearer sk-trollllm-"+randHex(64))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || resp.Header.Get("Content-Type") != "application/json" || !json.Valid(raw) {
			t.Errorf("%s %s: %d %q %s", tc.method, tc.path, resp.StatusCode, resp.Header.Get("Content-Type"), raw)
		}
		if n := len(upstreamRequests(testID)); n != 0 {
			t.Errorf("%s %s reached the upstream", tc.method, tc.path)
		}
	}
	for _, path := range []string{"/health", "/"} {
		resp, err := http.Get(chatURL + path)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		err = json.NewDecoder(resp.Body).Decode(&v)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || (path == "/health" && v["status"] != "healthy") || (path == "/" && v["service"] == nil) {
			t.Errorf("%s: %d %v %v", path, resp.StatusCode, v, err)
		}
	}
}
