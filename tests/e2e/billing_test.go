package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go"
	antoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go/v3"
	oaioption "github.com/openai/openai-go/v3/option"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// call makes one request with an official SDK client and returns the usage
// the client saw (normalised: OpenAI input excludes cached tokens).
type call struct {
	name    string
	api     string // "anthropic" or "openai"
	stream  bool
	fixture string
}

var calls = []call{
	{"anthropic json", "anthropic", false, "ant-text"},
	{"anthropic stream with cache", "anthropic", true, "ant-cache"},
	{"openai json with cached tokens", "openai", false, "oai-cached"},
	{"openai stream", "openai", true, "oai-text"},
}

// expected returns the usage the gateway must bill for c: the fixture's
// manifest numbers, with OpenAI's cached tokens taken out of the input.
func (c call) expected() fixtures.Usage {
	f := fixtures.Get(c.fixture)
	u := f.JSONUsage
	if c.stream {
		u = f.SSEUsage
	}
	if c.api == "openai" {
		u.Input -= u.CacheRead
	}
	return u
}

func (c call) do(t *testing.T, base, key, model, testID string) {
	t.Helper()
	ctx := context.Background()
	want := c.expected()
	switch c.api {
	case "anthropic":
		client := anthropic.NewClient(antoption.WithBaseURL(base), antoption.WithAPIKey(key), antoption.WithMaxRetries(0),
			antoption.WithHeader("X-Test-Id", testID), antoption.WithHeader("X-Standin-Fixture", c.fixture))
		params := anthropic.MessageNewParams{
			Model: anthropic.Model(model), MaxTokens: 1024,
			Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("Hello, how are you?"))},
		}
		var msg anthropic.Message
		if c.stream {
			s := client.Messages.NewStreaming(ctx, params)
			for s.Next() {
				if err := msg.Accumulate(s.Current()); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Err(); err != nil {
				t.Fatal(err)
			}
		} else {
			m, err := client.Messages.New(ctx, params)
			if err != nil {
				t.Fatal(err)
			}
			msg = *m
		}
		got := fixtures.Usage{Input: msg.Usage.InputTokens, Output: msg.Usage.OutputTokens,
			CacheWrite: msg.Usage.CacheCreationInputTokens, CacheRead: msg.Usage.CacheReadInputTokens}
		if got != want {
			t.Fatalf("client saw usage %+v, want %+v", got, want)
		}
	case "openai":
		client := openai.NewClient(oaioption.WithBaseURL(base+"/v1"), oaioption.WithAPIKey(key), oaioption.WithMaxRetries(0),
			oaioption.WithHeader("X-Test-Id", testID), oaioption.WithHeader("X-Standin-Fixture", c.fixture))
		params := openai.ChatCompletionNewParams{
			Model:    openai.ChatModel(model),
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Hello, how are you?")},
		}
		var usage openai.CompletionUsage
		if c.stream {
			// The client does not ask for usage: the gateway must.
			s := client.Chat.Completions.NewStreaming(ctx, params)
			var acc openai.ChatCompletionAccumulator
			for s.Next() {
				acc.AddChunk(s.Current())
			}
			if err := s.Err(); err != nil {
				t.Fatal(err)
			}
			usage = acc.Usage
		} else {
			resp, err := client.Chat.Completions.New(ctx, params)
			if err != nil {
				t.Fatal(err)
			}
			usage = resp.Usage
		}
		cached := usage.PromptTokensDetails.CachedTokens
		got := fixtures.Usage{Input: usage.PromptTokens - cached, Output: usage.CompletionTokens, CacheRead: cached}
		if got != want {
			t.Fatalf("client saw usage %+v, want %+v", got, want)
		}
	}
}

// checkLog verifies the request log of one billed request.
func checkLog(t *testing.T, l bson.M, user, model, creditType, creditField string, u fixtures.Usage, cost float64, weighted int64, stream bool) {
	t.Helper()
	str := func(k string) string { s, _ := l[k].(string); return s }
	if str("userId") != user || str("model") != model || str("creditType") != creditType || str("creditField") != creditField {
		t.Errorf("log identity: userId=%q model=%q creditType=%q creditField=%q", str("userId"), str("model"), str("creditType"), str("creditField"))
	}
	if got := str("trollKeyId"); got != "openhands:"+seed.DemoUpstreamKeyID {
		t.Errorf("trollKeyId = %q", got)
	}
	for k, want := range map[string]int64{"inputTokens": u.Input, "outputTokens": u.Output, "cacheWriteTokens": u.CacheWrite, "cacheHitTokens": u.CacheRead, "tokensUsed": weighted} {
		if got := int64(num(t, l, k)); got != want {
			t.Errorf("%s = %d, want %d", k, got, want)
		}
	}
	if got := num(t, l, "creditsCost"); !near(got, cost) {
		t.Errorf("creditsCost = %v, want %v", got, cost)
	}
	if num(t, l, "statusCode") != 200 || l["isSuccess"] != true || l["stream"] != stream {
		t.Errorf("statusCode=%v isSuccess=%v stream=%v", l["statusCode"], l["isSuccess"], l["stream"])
	}
	if str("requestId") == "" || str("usageSource") != "upstream" || str("endReason") != "complete" || str("upstreamModel") == "" {
		t.Errorf("requestId=%q usageSource=%q endReason=%q upstreamModel=%q", str("requestId"), str("usageSource"), str("endReason"), str("upstreamModel"))
	}
	if _, ok := l["createdAt"].(bson.DateTime); !ok {
		t.Errorf("createdAt is %T, want a BSON date", l["createdAt"])
	}
	if _, ok := l["latencyMs"]; !ok {
		t.Error("latencyMs missing")
	}
}

func TestChatBillsCreditsNewOnly(t *testing.T) {
	prices := loadPrices(t, "models-chat.json")
	for _, c := range calls {
		t.Run(c.name, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10, Credits: 5, RefCredits: 2})
			testID := uniq(t, "req")
			c.do(t, chatURL, key, "claude-sonnet-4-5", testID)

			usage := c.expected()
			p := prices["claude-sonnet-4-5"]
			cost, weighted := p.cost(usage), p.weighted(usage)
			if cost <= 0 {
				t.Fatalf("expected cost %v: the fixture must cost something", cost)
			}
			logs := waitLogs(t, u.ID, 1)
			checkLog(t, logs[0], u.ID, "claude-sonnet-4-5-20250929", "openhands", "creditsNew", usage, cost, weighted, c.stream)
			if kid, _ := logs[0]["userKeyId"].(string); kid != key[:8]+"..."+key[len(key)-4:] {
				t.Errorf("userKeyId = %q, want the masked key", kid)
			}

			b := balances(t, u.ID)
			t.Logf("chat %s: usage %+v cost $%.9f; creditsNew 10 -> %v, credits 5 -> %v, refCredits 2 -> %v",
				c.name, usage, cost, b["creditsNew"], b["credits"], b["refCredits"])
			if !near(b["creditsNew"], 10-cost) || !near(b["creditsNewUsed"], cost) {
				t.Errorf("creditsNew=%v creditsNewUsed=%v, want %v and %v", b["creditsNew"], b["creditsNewUsed"], 10-cost, cost)
			}
			if b["tokensUserNew"] != float64(weighted) {
				t.Errorf("tokensUserNew=%v, want %d", b["tokensUserNew"], weighted)
			}
			if b["totalInputTokens"] != float64(usage.Input) || b["totalOutputTokens"] != float64(usage.Output) {
				t.Errorf("totalInputTokens=%v totalOutputTokens=%v, want %d and %d", b["totalInputTokens"], b["totalOutputTokens"], usage.Input, usage.Output)
			}
			if b["credits"] != 5 || b["refCredits"] != 2 || b["creditsUsed"] != 0 {
				t.Errorf("the credits pool moved: credits=%v refCredits=%v creditsUsed=%v", b["credits"], b["refCredits"], b["creditsUsed"])
			}

			reqs := upstreamRequests(testID)
			if len(reqs) != 1 {
				t.Fatalf("upstream got %d requests, want 1", len(reqs))
			}
			r := reqs[0]
			if got := r.Header.Get("Authorization"); got != "Bearer "+seed.DemoUpstreamAPIKey {
				t.Errorf("upstream Authorization = %q", got)
			}
			if r.Header.Get("X-Api-Key") != "" || strings.Contains(mustJSON(r.Header), key) || strings.Contains(string(r.Body), key) {
				t.Error("the client's key reached the upstream")
			}
			var body map[string]any
			if err := json.Unmarshal(r.Body, &body); err != nil {
				t.Fatal(err)
			}
			if body["model"] != "glm-4.6" {
				t.Errorf("upstream model = %v, want glm-4.6", body["model"])
			}
			if c.api == "openai" && c.stream {
				so, _ := body["stream_options"].(map[string]any)
				if so["include_usage"] != true {
					t.Errorf("stream_options = %v, want include_usage true", body["stream_options"])
				}
			}
		})
	}
}

func TestChat2BillsCreditsThenRefCredits(t *testing.T) {
	prices := loadPrices(t, "models-chat2.json")
	c := call{"anthropic json", "anthropic", false, "ant-text"}
	p := prices["claude-sonnet-4-5"]
	cost := p.cost(c.expected())

	tests := []struct {
		name                 string
		user                 seed.User
		wantCredits, wantRef float64
		wantRefPresent       bool
		wantShortfall        float64
	}{
		{"credits cover it", seed.User{Credits: 5, RefCredits: 2, CreditsNew: 10}, 5 - cost, 2, true, 0},
		{"credits run out, refCredits pay the rest", seed.User{Credits: 0.0001, RefCredits: 2, CreditsNew: 10}, 0, 2 - (cost - 0.0001), true, 0},
		{"only refCredits", seed.User{Credits: 0, RefCredits: 1, CreditsNew: 10}, 0, 1 - cost, true, 0},
		{"refCredits missing from the document", seed.User{Credits: 5, CreditsNew: 10, OmitRefCredits: true}, 5 - cost, 0, false, 0},
		// The pool covers the hold's input bound, but the upstream reports far
		// more than the request can carry (ant-cache: 9632 input tokens),
		// breaking its contract: the shortfall is wantShortfall above it.
		{"both run out: charge what is there", seed.User{Credits: 0.001, RefCredits: 0.002, CreditsNew: 10}, 0, 0, true, 0.003},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, cost := c, cost
			if tt.wantShortfall > 0 {
				c = call{"anthropic stream", "anthropic", true, "ant-cache"}
				cost = p.cost(c.expected())
				tt.wantShortfall = cost - tt.wantShortfall
			}
			tt.user.Active, tt.user.Migration = true, true
			u, key := newUser(t, tt.user)
			c.do(t, chat2URL, key, "claude-sonnet-4-5", uniq(t, "req"))
			logs := waitLogs(t, u.ID, 1)
			l := logs[0]
			if l["creditType"] != "ohmygpt" || l["creditField"] != "credits+refCredits" || !near(num(t, l, "creditsCost"), cost) {
				t.Errorf("log: creditType=%v creditField=%v creditsCost=%v (want %v)", l["creditType"], l["creditField"], l["creditsCost"], cost)
			}
			if got := num(t, l, "shortfall"); !near(got, tt.wantShortfall) {
				t.Errorf("shortfall = %v, want %v", got, tt.wantShortfall)
			}
			b := balances(t, u.ID)
			t.Logf("chat2 %s: cost $%.9f; credits %v -> %v, refCredits %v -> %v, creditsNew %v -> %v, shortfall %v",
				tt.name, cost, tt.user.Credits, b["credits"], tt.user.RefCredits, b["refCredits"], tt.user.CreditsNew, b["creditsNew"], l["shortfall"])
			if !near(b["credits"], tt.wantCredits) {
				t.Errorf("credits = %v, want %v", b["credits"], tt.wantCredits)
			}
			if _, ok := b["refCredits"]; ok != tt.wantRefPresent || !near(b["refCredits"], tt.wantRef) {
				t.Errorf("refCredits = %v (present %v), want %v", b["refCredits"], ok, tt.wantRef)
			}
			if b["credits"] < 0 || b["refCredits"] < 0 {
				t.Errorf("a balance went negative: %v", b)
			}
			if !near(b["creditsUsed"], cost-tt.wantShortfall) {
				t.Errorf("creditsUsed = %v, want %v", b["creditsUsed"], cost-tt.wantShortfall)
			}
			if b["creditsNew"] != 10 || b["creditsNewUsed"] != 0 || b["tokensUserNew"] != 0 {
				t.Errorf("the creditsNew pool moved: %v", b)
			}
		})
	}
}

// A pool that covers the estimated input but not the whole cost: the hold
// is all of it, the cost is charged down to zero and the rest recorded.
func TestShortfallIsRecordedNotDropped(t *testing.T) {
	prices := loadPrices(t, "models-chat.json")
	c := call{"anthropic stream", "anthropic", true, "ant-cache"}
	// $0.003 covers the hold's input bound (about $0.0016), not the
	// fixture's usage, which is more than the request can carry: an
	// upstream that breaks its contract.
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0.003})
	c.do(t, chatURL, key, "claude-sonnet-4-5", uniq(t, "req"))
	cost := prices["claude-sonnet-4-5"].cost(c.expected())
	l := waitLogs(t, u.ID, 1)[0]
	if got := num(t, l, "shortfall"); !near(got, cost-0.003) {
		t.Errorf("shortfall = %v, want %v", got, cost-0.003)
	}
	if got := num(t, l, "chargedNano"); got != 3_000_000 {
		t.Errorf("chargedNano = %v, want 3000000", got)
	}
	if got := num(t, l, "holdNano"); got != 3_000_000 {
		t.Errorf("holdNano = %v, want 3000000 (capped by the pool)", got)
	}
	b := balances(t, u.ID)
	if b["creditsNew"] != 0 || !near(b["creditsNewUsed"], 0.003) {
		t.Errorf("creditsNew=%v creditsNewUsed=%v, want 0 and 0.003", b["creditsNew"], b["creditsNewUsed"])
	}
}

// The body reaches the upstream byte for byte but for the model value, with
// the Anthropic headers; nothing of the client's key does.
func TestBodyForwardedUnchanged(t *testing.T) {
	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
	testID := uniq(t, "req")
	body := `{ "model" : "claude-sonnet-4-5",  "max_tokens":1024,"temperature":0,"top_k":5,"stop_sequences":["\n\nHuman:"],` +
		`"metadata":{"user_id":"x"},"tool_choice":{"type":"auto"},"tools":[{"name":"t","input_schema":{"type":"object"}}],` +
		`"messages":[{"role":"user","content":[{"type":"text","text":"héllo \u2603 \"quoted\"","cache_control":{"type":"ephemeral"}}]}],` +
		`"thinking":{"type":"disabled"},"service_tier":"auto"}`
	resp := post(t, chatURL+"/v1/messages", "", []byte(body), map[string]string{
		"X-Api-Key": key, "X-Test-Id": testID, "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31",
	})
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	reqs := upstreamRequests(testID)
	if len(reqs) != 1 {
		t.Fatalf("upstream got %d requests", len(reqs))
	}
	want := strings.Replace(body, `"claude-sonnet-4-5"`, `"glm-4.6"`, 1)
	if string(reqs[0].Body) != want {
		t.Errorf("upstream body\n got: %s\nwant: %s", reqs[0].Body, want)
	}
	h := reqs[0].Header
	if h.Get("Anthropic-Version") != "2023-06-01" || h.Get("Anthropic-Beta") != "prompt-caching-2024-07-31" {
		t.Errorf("anthropic headers not forwarded: %v", h)
	}
	if h.Get("X-Api-Key") != "" || strings.Contains(mustJSON(h), key) {
		t.Error("client key forwarded")
	}
}

func TestModelsList(t *testing.T) {
	for _, base := range []string{chatURL, chat2URL} {
		resp, err := http.Get(base + "/v1/models")
		if err != nil {
			t.Fatal(err)
		}
		var list struct {
			Object string `json:"object"`
			Data   []struct {
				ID      string `json:"id"`
				Object  string `json:"object"`
				Created int64  `json:"created"`
				OwnedBy string `json:"owned_by"`
			} `json:"data"`
		}
		err = json.NewDecoder(resp.Body).Decode(&list)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 || list.Object != "list" || len(list.Data) == 0 {
			t.Fatalf("%s: status %d, err %v, %+v", base, resp.StatusCode, err, list)
		}
		for i, m := range list.Data {
			if m.Object != "model" || m.OwnedBy != "trollLLM" || m.Created != 1735689600+int64(i)*86400 {
				t.Errorf("%s: model %d = %+v", base, i, m)
			}
		}
	}
}
