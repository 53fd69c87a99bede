package caddymodule

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// jsonUpstream answers a JSON body with the given usage object.
func jsonUpstream(usage string) caddyhttp.Handler {
	body := []byte(`{"id":"msg_1","type":"message","content":[{"type":"text","text":"Hi"}],"usage":` + usage + `}`)
	return caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.WriteHeader(200)
		_, _ = w.Write(body)
		return nil
	})
}

// Invalid usage bills the hold under worst_case, and under hold check
// (no hold) the bound: the body's bytes as input plus max_tokens.
func TestInvalidUsageBillsTheHoldOrTheBound(t *testing.T) {
	body := []byte(`{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}`)
	for _, tc := range []struct {
		hold, usage, source, problem string
	}{
		{HoldWorstCase, `{"input_tokens":-1,"output_tokens":5}`, billing.SourceHoldInvalid, "negative"},
		{HoldCheck, `{"input_tokens":-1,"output_tokens":5}`, billing.SourceBoundInvalid, "negative"},
		{HoldWorstCase, `null`, billing.SourceHoldMissing, "missing_usage"},
		{HoldCheck, `{"input_tokens":9223372036854775807,"output_tokens":5}`, billing.SourceBoundInvalid, "beyond_context_window"},
	} {
		t.Run(tc.hold+" "+tc.problem, func(t *testing.T) {
			h, fs := newTestHandler(t)
			h.HoldSizing, h.DefaultMaxTokens = tc.hold, DefaultMaxTokens
			counter := usageProblems.WithLabelValues("creditsNew", tc.problem)
			before := testutil.ToFloat64(counter)
			rec := httptest.NewRecorder()
			require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, body), jsonUpstream(tc.usage)))
			require.Equal(t, 200, rec.Code)
			waitLogged(t, fs, 1)
			fs.mu.Lock()
			defer fs.mu.Unlock()
			require.Len(t, fs.logs, 1)
			l := fs.logs[0]
			assert.Equal(t, tc.source, l.UsageSource)
			assert.Equal(t, "complete", l.EndReason)
			m, _ := h.cat.Lookup("claude-sonnet-4-5")
			bound := billing.Usage{Input: int64(len(body)), Output: 1024}
			assert.Equal(t, bound.Input, l.InputTokens)
			assert.Equal(t, bound.Output, l.OutputTokens)
			if tc.hold == HoldCheck {
				assert.Zero(t, l.HoldNano)
				assert.Equal(t, int64(m.Price.Cost(bound)), l.CostNano)
			} else {
				assert.Positive(t, l.HoldNano)
				assert.Equal(t, l.HoldNano, l.CostNano)
			}
			assert.Equal(t, before+1, testutil.ToFloat64(counter))
		})
	}
}
