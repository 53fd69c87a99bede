package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// A duplicate or wrongly typed billing field, at any depth and however its
// key is escaped, is a 400 in the API's shape naming the field: nothing
// reaches the upstream and the balance does not move (issue 13, findings 2
// and 6).
func TestStrictRequestFields(t *testing.T) {
	noLeaks(t)
	msgs := `"messages":[{"role":"user","content":"hi"}]`
	for _, tc := range []struct {
		name, path, body, msg string
	}{
		{"nested duplicate include_usage", "/v1/chat/completions",
			`{"model":"claude-sonnet-4-5","stream":true,"stream_options":{"include_usage":true,"include_usage":false},` + msgs + `}`,
			`"stream_options.include_usage" appears more than once`},
		{"escaped duplicate include_usage", "/v1/chat/completions",
			`{"model":"claude-sonnet-4-5","stream":true,"stream_options":{"include_usage":true,"include_\u0075sage":false},` + msgs + `}`,
			`"stream_options.include_usage" appears more than once`},
		{"stream as a string", "/v1/chat/completions",
			`{"model":"claude-sonnet-4-5","stream":"true",` + msgs + `}`, `"stream" must be a boolean`},
		{"max_tokens as a string", "/v1/messages",
			`{"model":"claude-sonnet-4-5","max_tokens":"10",` + msgs + `}`, `"max_tokens" must be an integer`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
			testID := uniq(t, "strict")
			resp := post(t, chatURL+tc.path, key, []byte(tc.body), map[string]string{"X-Test-Id": testID})
			raw, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.NoError(t, err)
			assert.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s", raw)
			checkErrorShape(t, tc.path, raw, "invalid_request_error", "", "invalid_request_error", tc.msg)
			assert.Empty(t, upstreamRequests(testID), "forwarded to the upstream")
			noLogsFor(t, u.ID)
			assert.Equal(t, 1.0, balances(t, u.ID)["creditsNew"], "the balance moved")
		})
	}
}

// fireMost sends a non-streaming Anthropic request that the stand-in
// answers with the most usage a compliant upstream may report.
func fireMost(t *testing.T, key string, body []byte, usage string, o *outcome) {
	req, _ := http.NewRequest(http.MethodPost, chatURL+"/v1/messages", strings.NewReader(string(body)))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set(standin.HeaderBound, usage)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		o.other.Add(1)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	switch resp.StatusCode {
	case http.StatusOK:
		o.ok.Add(1)
	case http.StatusPaymentRequired:
		o.refused.Add(1)
	default:
		t.Errorf("status %d: %s", resp.StatusCode, b)
		o.other.Add(1)
	}
}

// Finding 5: forty concurrent requests with max_tokens 10 whose input
// tokenizes at one token per byte (the most a body can carry), on a balance
// worth a few of them. The hold's input side is an upper bound, so the
// requests served cost no more than the starting balance: nothing is
// shortfall, and the balance never goes below zero.
func TestHoldBoundsTheCost(t *testing.T) {
	noLeaks(t)
	body := []byte(`{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"` +
		strings.Repeat("ж", 1000) + `"}]}`)
	// One request costs about 2100 input tokens at $3/Mtok ×1.02: $0.0064.
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0.0217})
	start := billing.NanoFromUSD(0.0217)
	var o outcome
	var wg sync.WaitGroup
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fireMost(t, key, body, "most", &o)
		}()
	}
	wg.Wait()
	require.Zero(t, o.other.Load())
	st := waitSettled(t, u.ID, int(o.ok.Load()), "creditsNew")
	t.Logf("40 requests: %d served, %d refused", o.ok.Load(), o.refused.Load())
	assert.NotZero(t, o.ok.Load())
	checkMoney(t, st, start, o.ok.Load(), "creditsNew")
	assert.Zero(t, st.Shortfall, "served more than the balance")
	assert.LessOrEqual(t, st.Charged+st.Shortfall, start, "the cost of what was served")
	assert.GreaterOrEqual(t, st.Balance, billing.Nano(0))
}

// A hold capped by the balance lowers the max_tokens the upstream sees to
// what the hold pays for; an upstream that then answers within it costs no
// more than the hold. One that answers more breaks its contract: the excess
// is recorded as shortfall.
func TestMaxTokensLoweredToTheHold(t *testing.T) {
	noLeaks(t)
	body := []byte(`{"model":"claude-sonnet-4-5","max_tokens":4096,"messages":[{"role":"user","content":"hi"}]}`)
	for _, tc := range []struct{ usage string }{{"most"}, {"over"}} {
		t.Run(tc.usage, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0.01})
			testID := uniq(t, "cap")
			resp := post(t, chatURL+"/v1/messages", key, body, map[string]string{"X-Test-Id": testID, standin.HeaderBound: tc.usage})
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode, "%s", raw)
			reqs := upstreamRequests(testID)
			require.Len(t, reqs, 1)
			var fwd struct {
				MaxTokens int64 `json:"max_tokens"`
			}
			require.NoError(t, json.Unmarshal(reqs[0].Body, &fwd))
			// ($0.01 - about 200 input tokens at $3.75/Mtok ×1.02) / ($14/Mtok ×1.02): about 650.
			assert.Greater(t, fwd.MaxTokens, int64(600))
			assert.Less(t, fwd.MaxTokens, int64(700), "max_tokens not lowered to what $0.01 pays for")
			l := waitLogs(t, u.ID, 1)[0]
			assert.Equal(t, float64(billing.NanoFromUSD(0.01)), num(t, l, "holdNano"))
			if tc.usage == "most" {
				assert.Zero(t, num(t, l, "shortfallNano"), "the cost went past the hold")
				assert.LessOrEqual(t, num(t, l, "costNano"), num(t, l, "holdNano"))
			} else {
				assert.Greater(t, num(t, l, "shortfallNano"), 0.0, "the upstream's excess is recorded")
			}
			assert.GreaterOrEqual(t, balances(t, u.ID)["creditsNew"], 0.0)
		})
	}
}
