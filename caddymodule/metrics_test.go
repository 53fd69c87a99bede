package caddymodule

import (
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// holdCount is how many holds dbDuration has seen, read through a registry
// the way Caddy's /metrics does.
func holdCount(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
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
	t.Fatal("no hold series in the registry")
	return 0
}

func TestDatabaseDurationMetrics(t *testing.T) {
	// Each config load has its own registry, and two sites register in
	// the same one: neither is an error, and the series keep their values.
	reg := prometheus.NewPedanticRegistry()
	for range 2 {
		if err := registerMetrics(reg); err != nil {
			t.Fatal(err)
		}
	}
	h, fs := newTestHandler(t)
	before := holdCount(t, reg)
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), upstream(false, 0)); err != nil || rec.Code != 200 {
		t.Fatalf("%v %d", err, rec.Code)
	}
	if got := holdCount(t, reg) - before; got != 1 {
		t.Fatalf("%d holds observed for one request, want 1", got)
	}
	reloaded := prometheus.NewPedanticRegistry()
	if err := registerMetrics(reloaded); err != nil {
		t.Fatal(err)
	}
	if got := holdCount(t, reloaded); got < before+1 {
		t.Fatalf("after a reload the hold count is %d, want at least %d", got, before+1)
	}
}
