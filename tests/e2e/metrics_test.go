package e2e

import (
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// metricsSeries are the series of chat2 (pool credits+refCredits) and the
// one model of its models file no other test bills.
const (
	metricsPool  = `pool="credits+refCredits"`
	metricsModel = "claude-opus-4-5-20251101"
)

func requestsSeries(model, outcome string) string {
	return `caddy_llm_billing_requests_total{model="` + model + `",outcome="` + outcome + `",` + metricsPool + `}`
}

func tokensSeries(kind string) string {
	return `caddy_llm_billing_tokens_total{kind="` + kind + `",model="` + metricsModel + `",` + metricsPool + `}`
}

const chargedSeries = `caddy_llm_billing_charged_usd_total{` + metricsPool + `}`

// metricsNow reads every series the test checks.
func metricsNow(t *testing.T) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, s := range []string{
		requestsSeries(metricsModel, "billed"), requestsSeries("unknown", "refused_auth"), chargedSeries,
		tokensSeries("input"), tokensSeries("output"), tokensSeries("cache_write"), tokensSeries("cache_read"),
		`caddy_llm_billing_settlement_lag_seconds_count`,
	} {
		out[s], _ = metricValue(t, s)
	}
	return out
}

// After a billed request and a refused one, Caddy's admin /metrics says
// exactly what the request log row says (tokens by kind, money to the
// nano-USD), counts each request once with its outcome, has no hold left
// outstanding, and says all of it again after a config reload.
func TestMetricsMatchTheRequestLog(t *testing.T) {
	before := metricsNow(t)
	u, key := newUser(t, seed.User{Active: true, Migration: true, Credits: 10})
	call{"anthropic json", "anthropic", false, "ant-text"}.do(t, chat2URL, key, metricsModel, uniq(t, "req"))
	resp := post(t, chat2URL+"/v1/messages", "sk-trollllm-"+randHex(64), validBody(metricsModel)(), nil)
	resp.Body.Close()
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	row := waitLogs(t, u.ID, 1)[0]
	require.Equal(t, metricsModel, row["model"])
	require.Equal(t, "credits+refCredits", row["creditField"])

	want := map[string]float64{
		requestsSeries(metricsModel, "billed"):    1,
		requestsSeries("unknown", "refused_auth"): 1,
		tokensSeries("input"):                     num(t, row, "inputTokens"),
		tokensSeries("output"):                    num(t, row, "outputTokens"),
		tokensSeries("cache_write"):               num(t, row, "cacheWriteTokens"),
		tokensSeries("cache_read"):                num(t, row, "cacheHitTokens"),
	}
	require.Positive(t, num(t, row, "inputTokens"))
	require.Positive(t, num(t, row, "chargedNano"))
	check := func(when string) {
		t.Helper()
		// The counts are taken as the request ends, which the client may
		// see a moment before.
		require.Eventually(t, func() bool {
			return metricsNow(t)[requestsSeries(metricsModel, "billed")]-before[requestsSeries(metricsModel, "billed")] == 1
		}, 5*time.Second, 20*time.Millisecond, when)
		now := metricsNow(t)
		for s, d := range want {
			assert.Equal(t, d, now[s]-before[s], "%s: %s", when, s)
		}
		// The lag has no pool label: the settlements of earlier tests may
		// still be counted in it.
		lag := `caddy_llm_billing_settlement_lag_seconds_count`
		assert.GreaterOrEqual(t, now[lag]-before[lag], 1.0, "%s: %s", when, lag)
		charged := math.Round((now[chargedSeries] - before[chargedSeries]) * 1e9)
		assert.Equal(t, num(t, row, "chargedNano"), charged, "%s: charged_usd_total to the nano-USD", when)
		holds, raw := metricValue(t, "caddy_llm_billing_holds_outstanding")
		assert.Zero(t, holds, when)
		healthy, _ := metricValue(t, `caddy_llm_billing_upstream_keys{state="healthy"}`)
		assert.Positive(t, healthy, when)
		for _, secret := range []string{key, env.UpstreamKey, u.ID} {
			assert.False(t, strings.Contains(raw, secret), "%s: a key or a user in /metrics", when)
		}
	}
	check("after the requests")
	reloadWith(t, configOpts{})
	check("after a reload")
}
