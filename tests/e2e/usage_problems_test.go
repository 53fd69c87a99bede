package e2e

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/reconcile"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// usageProblemMetric is the series of the usage-problems counter for the
// chat site's pool (creditsNew) and one problem.
func usageProblemMetric(t *testing.T, problem string) float64 {
	t.Helper()
	v, _ := metricValue(t, fmt.Sprintf(`caddy_llm_billing_usage_problems_total{pool="creditsNew",problem="%s"}`, problem))
	return v
}

// sendWithUsage sends one request to the chat site whose answer reports
// usage (X-Standin-Usage), reads the whole answer and returns its status.
func sendWithUsage(t *testing.T, key, path string, stream bool, usage string) int {
	t.Helper()
	body := validBody("claude-sonnet-4-5")()
	if stream {
		body = streamBody("claude-sonnet-4-5")
	}
	hdr := map[string]string{}
	if usage != "" {
		hdr[standin.HeaderUsage] = usage
	}
	resp := post(t, chatURL+path, key, body, hdr)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// Usage an upstream reports that cannot be true, or no usage where it was
// due, is billed the hold: never less than the client could have caused,
// never an absurd amount, and never left in a counter that breaks the
// user's later settlements. The log says so and the metric counts it.
func TestAbsurdUsageBillsTheHold(t *testing.T) {
	noLeaks(t)
	const (
		msgs = "/v1/messages"
		chat = "/v1/chat/completions"
	)
	for _, tc := range []struct {
		name, path string
		stream     bool
		usage      string
		source     string
		problem    string
	}{
		{"openai prompt_tokens 2^63-1", chat, false, `{"prompt_tokens":9223372036854775807,"completion_tokens":5}`, "hold_invalid_usage", "beyond_context_window"},
		{"anthropic 1e15", msgs, false, `{"input_tokens":1e15,"output_tokens":5}`, "hold_invalid_usage", "beyond_context_window"},
		{"openai negative", chat, false, `{"prompt_tokens":-1000,"completion_tokens":5}`, "hold_invalid_usage", "negative"},
		{"anthropic string", msgs, false, `{"input_tokens":"1000","output_tokens":5}`, "hold_invalid_usage", "not_a_number"},
		{"openai cached above prompt", chat, false, `{"prompt_tokens":10,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":100000}}`, "hold_invalid_usage", "cache_exceeds_whole"},
		{"anthropic stream 2^63-1", msgs, true, `{"input_tokens":9223372036854775807,"output_tokens":5}`, "hold_invalid_usage", "beyond_context_window"},
		{"openai stream negative", chat, true, `{"prompt_tokens":10,"completion_tokens":-5}`, "hold_invalid_usage", "negative"},
		{"openai stream without usage", chat, true, `null`, "hold_missing_usage", "missing_usage"},
		{"openai without usage", chat, false, `null`, "hold_missing_usage", "missing_usage"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
			before := usageProblemMetric(t, tc.problem)
			require.Equal(t, http.StatusOK, sendWithUsage(t, key, tc.path, tc.stream, tc.usage))
			l := waitLogs(t, u.ID, 1)[0]
			assert.Equal(t, tc.source, l["usageSource"])
			hold := num(t, l, "holdNano")
			require.Greater(t, hold, 0.0)
			assert.Equal(t, hold, num(t, l, "costNano"), "billed the hold")
			assert.Equal(t, hold, num(t, l, "chargedNano"))
			assert.Zero(t, num(t, l, "shortfallNano"), "no shortfall")
			assert.Less(t, num(t, l, "inputTokens"), float64(billing.MaxContextWindow))
			assert.True(t, near(balances(t, u.ID)["creditsNew"], 10-hold/1e9), "balance %v, hold %v", balances(t, u.ID), hold)
			assert.Eventually(t, func() bool { return usageProblemMetric(t, tc.problem) == before+1 }, 5*time.Second, 50*time.Millisecond,
				"the %s counter did not count the request", tc.problem)

			// The same user's next, normal request settles and is logged.
			require.Equal(t, http.StatusOK, sendWithUsage(t, key, tc.path, tc.stream, ""))
			l = waitLogs(t, u.ID, 2)[1]
			assert.Equal(t, "upstream", l["usageSource"])
			assert.Greater(t, num(t, l, "costNano"), 0.0)
			var doc bson.M
			require.NoError(t, db.Collection("usersNew").FindOne(context.Background(), bson.D{{Key: "_id", Value: u.ID}}).Decode(&doc))
			for _, f := range []string{"tokensUserNew", "totalInputTokens", "totalOutputTokens"} {
				assert.Less(t, num(t, doc, f), float64(2*billing.MaxRequestTokens), "%s", f)
			}
		})
	}

	// No total wraps around: the report's sums stay non-negative and the
	// ledger agrees with the logs.
	rep := runReconcile(t, reconcile.Options{RecheckDelay: time.Second})
	assert.GreaterOrEqual(t, int64(rep.Charged), int64(0))
	assert.GreaterOrEqual(t, int64(rep.Shortfall), int64(0))
	assert.Less(t, int64(rep.Shortfall), int64(math.MaxInt64/2))
	assert.True(t, rep.OK(), "drift: %+v", rep.Drift)
}
