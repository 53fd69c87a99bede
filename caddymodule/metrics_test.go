package caddymodule

import (
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/stretchr/testify/require"
)

// holdCount is how many holds dbDuration has seen, read through a registry
// the way Caddy's /metrics does.
func holdCount(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != "caddy_llm_billing_database_duration_seconds" || mf.GetType() != dto.MetricType_HISTOGRAM {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "operation" && l.GetValue() == "hold" {
					return m.GetHistogram().GetSampleCount()
				}
			}
		}
	}
	require.FailNow(t, "no hold series in the registry")
	return 0
}

func TestDatabaseDurationMetrics(t *testing.T) {
	// Each config load has its own registry, and two sites register in
	// the same one: neither is an error, and the series keep their values.
	reg := prometheus.NewPedanticRegistry()
	for range 2 {
		require.NoError(t, registerMetrics(reg))
	}
	h, fs := newTestHandler(t)
	before := holdCount(t, reg)
	rec := httptest.NewRecorder()
	require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), upstream(false, 0)))
	require.Equal(t, 200, rec.Code)
	require.Equal(t, uint64(1), holdCount(t, reg)-before, "holds observed for one request")
	reloaded := prometheus.NewPedanticRegistry()
	require.NoError(t, registerMetrics(reloaded))
	require.GreaterOrEqual(t, holdCount(t, reloaded), before+1, "hold count after a reload")
}
