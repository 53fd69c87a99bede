package caddymodule

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// sample reads one series through a registry, as Caddy's /metrics does: a
// counter's or a gauge's value, or a histogram's sample count; 0 when the
// series does not exist. labels are name, value pairs, all of the series'.
func sample(t *testing.T, reg prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel())*2 != len(labels) {
				continue
			}
			for i, l := range m.GetLabel() { // sorted by name, as labels must be given
				if l.GetName() != labels[2*i] || l.GetValue() != labels[2*i+1] {
					continue series
				}
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				return m.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				return m.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

// pedantic returns a registry such as a config load gets, with the
// module's collectors registered twice (two sites).
func pedantic(t *testing.T) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	require.NoError(t, registerMetrics(reg))
	require.NoError(t, registerMetrics(reg))
	return reg
}

// waitHolds waits until holds_outstanding is want.
func waitHolds(t *testing.T, reg prometheus.Gatherer, want float64) {
	t.Helper()
	require.Eventually(t, func() bool { return sample(t, reg, "caddy_llm_billing_holds_outstanding") == want },
		10*time.Second, time.Millisecond, "holds_outstanding never came back to %v", want)
}

// A billed request, a refused one and one for a model the site does not
// have: each counted once with its outcome, the billed one's tokens and
// money exactly as its request log row says, its hold outstanding while it
// runs and not after, and all of it still there through a new registry (a
// reload).
func TestRequestMetricsAcrossReload(t *testing.T) {
	reg := pedantic(t)
	h, fs := newTestHandler(t)
	// A pool no other test bills, so that the deltas are this test's.
	plan, err := billing.ParseCreditPlan([]string{"credits", "refCredits"})
	require.NoError(t, err)
	h.plan = plan
	const pool, model = "credits+refCredits", "claude-sonnet-4-5-20250929"
	series := func(outcome string) []string { return []string{"model", model, "outcome", outcome, "pool", pool} }
	holdsBefore := sample(t, reg, "caddy_llm_billing_holds_outstanding")
	lagBefore := sample(t, reg, "caddy_llm_billing_settlement_lag_seconds")

	var during float64
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		during = sample(t, reg, "caddy_llm_billing_holds_outstanding")
		return upstream(false, 0).ServeHTTP(w, r)
	})
	rec := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), next))
	require.Equal(t, 200, rec.Code)
	rec = httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, "sk-trollllm-"+strings.Repeat("cd", 32), jsonBody), next))
	require.Equal(t, 401, rec.Code)
	rec = httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, []byte(`{"model":"a-secret-or-junk","messages":[]}`)), next))
	require.Equal(t, 404, rec.Code)
	waitCharges(t, fs, 1)
	waitHolds(t, reg, holdsBefore)
	assert.Equal(t, holdsBefore+1, during, "the hold is outstanding while the request runs")

	fs.mu.Lock()
	require.Len(t, fs.logs, 1)
	l := fs.logs[0]
	fs.mu.Unlock()
	require.Positive(t, l.ChargedNano)
	check := func(reg prometheus.Gatherer) {
		assert.Equal(t, 1.0, sample(t, reg, "caddy_llm_billing_requests_total", series("billed")...))
		assert.Equal(t, 1.0, sample(t, reg, "caddy_llm_billing_requests_total", "model", unknownModel, "outcome", "refused_auth", "pool", pool))
		assert.Equal(t, 1.0, sample(t, reg, "caddy_llm_billing_requests_total", "model", unknownModel, "outcome", "bad_request", "pool", pool))
		for kind, want := range map[string]int64{"input": l.InputTokens, "output": l.OutputTokens, "cache_write": l.CacheWriteTokens, "cache_read": l.CacheHitTokens} {
			assert.Equal(t, float64(want), sample(t, reg, "caddy_llm_billing_tokens_total", "kind", kind, "model", model, "pool", pool), kind)
		}
		assert.Equal(t, 12.0, sample(t, reg, "caddy_llm_billing_tokens_total", "kind", "input", "model", model, "pool", pool))
		assert.Equal(t, billing.Nano(l.ChargedNano).USD(), sample(t, reg, "caddy_llm_billing_charged_usd_total", "pool", pool))
		assert.Equal(t, lagBefore+1, sample(t, reg, "caddy_llm_billing_settlement_lag_seconds"))
		assert.Zero(t, sample(t, reg, "caddy_llm_billing_usage_estimated_total", "pool", pool))
	}
	check(reg)
	check(pedantic(t)) // the next config's registry
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		assert.NotContains(t, mf.String(), "a-secret-or-junk", "a client's model string is never a label")
		assert.NotContains(t, mf.String(), fs.key)
	}
}

// A stream the upstream cuts before any usage is billed from an estimate,
// and counted so.
func TestUsageEstimatedMetric(t *testing.T) {
	reg := pedantic(t)
	h, fs := newTestHandler(t)
	before := sample(t, reg, "caddy_llm_billing_usage_estimated_total", "pool", "creditsNew")
	cut := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		_, _ = w.Write([]byte("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n"))
		return nil
	})
	rec := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), cut))
	require.Equal(t, 200, rec.Code)
	waitCharges(t, fs, 1)
	fs.mu.Lock()
	require.Len(t, fs.logs, 1)
	assert.Equal(t, billing.SourceEstimated, fs.logs[0].UsageSource)
	fs.mu.Unlock()
	require.Eventually(t, func() bool {
		return sample(t, reg, "caddy_llm_billing_usage_estimated_total", "pool", "creditsNew") == before+1
	}, 5*time.Second, time.Millisecond)
}

// A key that fails before any byte is retried on another, and counted by
// the failed key's reason: two requests over a 429 key and a good one fail
// over exactly once (the 429 key then cools down).
func TestFailoverMetric(t *testing.T) {
	reg := pedantic(t)
	h, fs := newTestHandler(t)
	withKeys(h, "busy-429", "good")
	before := sample(t, reg, "caddy_llm_billing_upstream_failovers_total", "reason", "rate_limited")
	next := failingUpstream(map[string]int{"busy-429": 429}, upstream(false, 0))
	for range 2 {
		rec := httptest.NewRecorder()
		require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), next))
		require.Equal(t, 200, rec.Code)
	}
	assert.Equal(t, before+1, sample(t, reg, "caddy_llm_billing_upstream_failovers_total", "reason", "rate_limited"))
}

// upstream_keys counts the live engines' keys by state when scraped: a
// cooldown that has passed makes a key healthy again, and every state is
// reported, 0 when empty.
func TestUpstreamKeysMetric(t *testing.T) {
	h, _ := newTestHandler(t)
	now := time.Now()
	h.eng.keys.Set([]billing.UpstreamKey{
		{ID: "a", Status: billing.KeyHealthy},
		{ID: "b", Status: ""},
		{ID: "c", Status: billing.KeyRateLimited, CooldownUntil: now.Add(time.Hour)},
		{ID: "d", Status: billing.KeyRateLimited, CooldownUntil: now.Add(-time.Second)}, // cooled down
		{ID: "e", Status: billing.KeyExhausted},
		{ID: "f", Status: billing.KeyNeedRefresh},
		{ID: "g", Status: billing.KeyError, CooldownUntil: now.Add(time.Minute)},
		{ID: "h", Status: "suspended-by-hand"},
	})
	_, _, err := engines.LoadOrNew(t.Name(), func() (caddy.Destructor, error) { return h.eng, nil })
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = engines.Delete(t.Name()) })
	reg := pedantic(t)
	want := map[string]float64{"healthy": 3, "rate_limited": 1, "exhausted": 1, "need_refresh": 1, "error": 1, "other": 1}
	for state, n := range want {
		assert.Equal(t, n, sample(t, reg, "caddy_llm_billing_upstream_keys", "state", state), state)
	}
	h.eng.keys.Set(nil)
	for state := range want {
		assert.Zero(t, sample(t, reg, "caddy_llm_billing_upstream_keys", "state", state), state)
	}
}

// Every refusal the gateway answers maps to its outcome by status.
func TestOutcomeOfRefusals(t *testing.T) {
	for _, tc := range []struct {
		e    *apiError
		want string
	}{
		{errAuthRequired, "refused_auth"}, {errAuthFormat, "refused_auth"}, {errInvalidKey, "refused_auth"}, {errRevoked, "refused_auth"},
		{errExpired, "refused_credit"}, {errInsufficient(billing.OpenAI, billing.CreditPlan{}, 0), "refused_credit"},
		{errInsufficientCost(1, 1), "refused_credit"},
		{errMigration, "refused_policy"}, {errPriorityDenied, "refused_policy"},
		{errRateLimited(3), "rate_limited"},
		{errReadBody, "bad_request"}, {errInvalidJSON, "bad_request"}, {errNoModel, "bad_request"}, {errMethod, "bad_request"},
		{errNotFound, "bad_request"}, {errBodyTooLarge(1), "bad_request"}, {errModelNotFound(billing.OpenAI, "x"), "bad_request"},
		{errUpstream, "upstream_error"}, {errBadAnswer, "upstream_error"},
		{errNoKey, "unavailable"}, {errUnavailable, "unavailable"},
	} {
		assert.Equal(t, tc.want, outcome(tc.e, tc.e.status), tc.e.message)
	}
	assert.Equal(t, "billed", outcome(nil, 200))
	assert.Equal(t, "upstream_error", outcome(nil, 400), "an upstream error passed through")
	assert.Equal(t, "upstream_error", outcome(nil, 0), "no answer at all")
}

// orphanStore is a fakeStore whose sweeper query finds the given holds.
type orphanStore struct {
	*fakeStore
	orphans []billing.Orphan
}

func (s *orphanStore) Orphans(context.Context, billing.OrphanQuery) ([]billing.Orphan, error) {
	return s.orphans, nil
}

// An orphaned hold the sweeper charges is money taken from the pool:
// charged_usd_total counts it, once.
func TestSweeperChargeIsCounted(t *testing.T) {
	reg := pedantic(t)
	fs := &fakeStore{key: "k"}
	plan, err := billing.ParseCreditPlan([]string{"credits", "refCredits"})
	require.NoError(t, err)
	hold := billing.Hold{RequestID: "orphan-1", User: "u1", Plan: plan, Taken: []billing.Nano{7_000}, Input: 3_000,
		Owner: "dead/1", At: time.Now().Add(-time.Hour), Expires: time.Now().Add(-time.Minute), LogID: billing.NewLogID(time.Now())}
	eng := newEngineWithStore(&orphanStore{fakeStore: fs, orphans: []billing.Orphan{{Hold: hold}}})
	t.Cleanup(func() { _ = eng.Destruct() })
	before := sample(t, reg, "caddy_llm_billing_charged_usd_total", "pool", "credits+refCredits")
	eng.settler.Sweep(time.Now())
	require.Equal(t, int64(1), fs.charges.Load(), "the sweeper charged the orphan")
	charged := billing.OrphanChargeInput.Cost(hold) // the default policy
	require.Positive(t, charged)
	assert.Equal(t, before+charged.USD(), sample(t, reg, "caddy_llm_billing_charged_usd_total", "pool", "credits+refCredits"))
}
