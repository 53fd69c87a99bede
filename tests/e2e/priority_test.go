package e2e

import (
	"context"
	"encoding/json"
	"io"
	"math/big"
	"net/http"
	"testing"

	"github.com/anthropics/anthropic-sdk-go"
	antoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go/v3"
	oaioption "github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

const (
	prioDeniedOAI = `{"error":{"message":"vui long lien he qua discord de duoc tham gia line uu tien","type":"insufficient_permissions","code":"priority_line_access_denied"}}`
	prioDeniedANT = `{"type":"error","error":{"type":"forbidden","message":"vui long lien he qua discord de duoc tham gia line uu tien"}}`
)

// The priority line admits admin and priority users (the role trimmed and
// lower-cased) and refuses every other role with the legacy 403 of each API,
// before anything is held or forwarded.
func TestPriorityLineRoles(t *testing.T) {
	for _, tc := range []struct {
		role  string
		admit bool
	}{{"admin", true}, {"priority", true}, {" Priority ", true}, {"user", false}, {"priorityx", false}} {
		t.Run(tc.role, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, Role: tc.role, CreditsNew: 1})
			testID := uniq(t, "req")
			ac := anthropic.NewClient(antoption.WithBaseURL(prioURL), antoption.WithAPIKey(key), antoption.WithMaxRetries(0),
				antoption.WithHeader("X-Test-Id", testID))
			_, err := ac.Messages.New(context.Background(), anthropic.MessageNewParams{
				Model: "claude-haiku-4-5-20251001", MaxTokens: 100,
				Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("hi"))},
			})
			oc := openai.NewClient(oaioption.WithBaseURL(prioURL+"/v1"), oaioption.WithAPIKey(key), oaioption.WithMaxRetries(0),
				oaioption.WithHeader("X-Test-Id", testID))
			_, oerr := oc.Chat.Completions.New(context.Background(), openai.ChatCompletionNewParams{
				Model:    "claude-haiku-4-5-20251001",
				Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")},
			})
			models := prioGet(t, "/v1/models", key)
			if tc.admit {
				require.NoError(t, err)
				require.NoError(t, oerr)
				assert.Len(t, upstreamRequests(testID), 2)
				waitLogs(t, u.ID, 2)
				assert.Equal(t, 200, models.status)
				return
			}
			var ae *anthropic.Error
			require.ErrorAs(t, err, &ae)
			assert.Equal(t, http.StatusForbidden, ae.StatusCode)
			assert.JSONEq(t, prioDeniedANT, ae.RawJSON())
			var oe *openai.Error
			require.ErrorAs(t, oerr, &oe)
			assert.Equal(t, http.StatusForbidden, oe.StatusCode)
			var whole struct{ Error json.RawMessage }
			require.NoError(t, json.Unmarshal([]byte(prioDeniedOAI), &whole))
			assert.JSONEq(t, string(whole.Error), oe.RawJSON(), "the SDK's error is the body's error object")
			assert.Equal(t, 403, models.status)
			assert.JSONEq(t, prioDeniedOAI, models.body)
			assert.Empty(t, upstreamRequests(testID), "a refused role reached the upstream")
			noLogsFor(t, u.ID)
			assert.Equal(t, 1.0, balances(t, u.ID)["creditsNew"], "a refused role was held or charged")
		})
	}
	// The model list of the priority line needs a key, as the legacy's did;
	// the other lines' does not.
	assert.Equal(t, 401, prioGet(t, "/v1/models", "").status)
	assert.Equal(t, 401, prioGet(t, "/v1/models/claude-opus-4-6", "sk-trollllm-"+randHex(64)).status)
	status, _ := get(t, chatURL+"/v1/models")
	assert.Equal(t, 200, status)
}

type answer struct {
	status int
	body   string
}

func prioGet(t *testing.T, path, key string) answer {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, prioURL+path, nil)
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, string(raw)}
}

// The price factor scales the cost of requests routed to glm-4.6, except for
// Haiku, to the nano-USD, rounded once; the weighted tokens are not scaled.
func TestPriorityLinePriceFactor(t *testing.T) {
	prices := loadPrices(t, "models-priority.json")
	u, key := newUser(t, seed.User{Active: true, Migration: true, Role: "priority", CreditsNew: 5})
	usage := fixtures.Get("ant-text").JSONUsage
	const opus, haiku = 20, 4
	for i := 0; i < opus+haiku; i++ {
		model := "claude-opus-4-6"
		if i >= opus {
			model = "claude-haiku-4-5-20251001"
		}
		resp := post(t, prioURL+"/v1/messages", key, validBody(model)(), nil)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		require.Equal(t, 200, resp.StatusCode)
	}
	logs := waitLogs(t, u.ID, opus+haiku)
	var scaled, plain int
	total := new(big.Rat)
	for _, l := range logs {
		model, upstream := l["model"].(string), l["upstreamModel"].(string)
		factor := big.NewRat(1, 1)
		if upstream == "glm-4.6" && model != "claude-haiku-4-5-20251001" {
			factor = big.NewRat(2, 5)
			scaled++
		} else {
			plain++
		}
		want := prices[model].scaledCost(usage, factor)
		assert.InDelta(t, want, num(t, l, "creditsCost"), 1e-12, "%s via %s", model, upstream)
		assert.EqualValues(t, prices[model].weighted(usage), num(t, l, "tokensUsed"), "%s via %s", model, upstream)
		total.Add(total, new(big.Rat).SetFloat64(want))
	}
	assert.Positive(t, scaled, "no request was routed to glm-4.6 (60/40 over 20 requests)")
	assert.Positive(t, plain)
	spent, _ := total.Float64()
	assert.InDelta(t, 5-spent, balances(t, u.ID)["creditsNew"], 1e-8)
	b, _ := json.Marshal(map[string]int{"scaled": scaled, "plain": plain})
	t.Logf("requests: %s", b)
}
