package main

import (
	"fmt"
	"math"
	"net/http"
	"sort"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// dbWaitMetric is the gateway's own histogram of the time it waited for
// each database operation (caddymodule/metrics.go).
const dbWaitMetric = "caddy_llm_billing_database_duration_seconds"

// histo is one histogram series: cumulative bucket counts by upper bound.
type histo struct {
	count  uint64
	sum    float64
	bounds []float64
	cum    []uint64
}

// Counters and gauges of the gateway's /metrics about holds and credit
// leases (caddymodule/metrics.go).
const (
	holdsMetric       = "caddy_llm_billing_holds_total"         // by source: store, lease
	leasesMetric      = "caddy_llm_billing_credit_leases_total" // by event: taken, closed
	outstandingMetric = "caddy_llm_billing_holds_outstanding"   // holds not yet settled or released
)

// gwMetrics is what the harness reads of the gateway's /metrics at one
// moment: the hold's database wait histogram, the holds taken by source,
// the credit leases by event, and the holds outstanding. Every one is
// process-wide, so a phase's figure is the difference of two readings of
// the same Caddy process.
type gwMetrics struct {
	hold        histo
	holds       map[string]float64 // source -> holds taken
	leases      map[string]float64 // event -> leases
	outstanding float64
}

// scrape reads the gateway's metrics from Caddy's admin /metrics. A
// missing series reads as zero.
func (h *harness) scrape() (gwMetrics, error) {
	g := gwMetrics{holds: map[string]float64{}, leases: map[string]float64{}}
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		return g, fmt.Errorf("reading /metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return g, fmt.Errorf("reading /metrics: status %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return g, fmt.Errorf("parsing /metrics: %w", err)
	}
	if mf := mfs[dbWaitMetric]; mf != nil && mf.GetType() == dto.MetricType_HISTOGRAM {
		for _, m := range mf.GetMetric() {
			if label(m, "operation") != "hold" {
				continue
			}
			hg := m.GetHistogram()
			g.hold = histo{count: hg.GetSampleCount(), sum: hg.GetSampleSum()}
			for _, b := range hg.GetBucket() {
				g.hold.bounds = append(g.hold.bounds, b.GetUpperBound())
				g.hold.cum = append(g.hold.cum, b.GetCumulativeCount())
			}
		}
	}
	for name, into := range map[string]struct {
		label string
		m     map[string]float64
	}{holdsMetric: {"source", g.holds}, leasesMetric: {"event", g.leases}} {
		if mf := mfs[name]; mf != nil {
			for _, m := range mf.GetMetric() {
				into.m[label(m, into.label)] += m.GetCounter().GetValue()
			}
		}
	}
	if mf := mfs[outstandingMetric]; mf != nil {
		for _, m := range mf.GetMetric() {
			g.outstanding += m.GetGauge().GetValue()
		}
	}
	return g, nil
}

// label is the value of a metric's label name ("" when it has none).
func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// leasesOpen is how many leases the process took and has not closed.
func (g gwMetrics) leasesOpen() float64 { return g.leases["taken"] - g.leases["closed"] }

// since is what was observed between before and h.
func (h histo) since(before histo) histo {
	d := histo{count: h.count - before.count, sum: h.sum - before.sum, bounds: h.bounds}
	for i := range h.cum {
		c := h.cum[i]
		if i < len(before.cum) {
			c -= before.cum[i]
		}
		d.cum = append(d.cum, c)
	}
	return d
}

// meanMs is the mean observation in milliseconds.
func (h histo) meanMs() float64 {
	if h.count == 0 {
		return math.NaN()
	}
	return h.sum / float64(h.count) * 1e3
}

// quantileMs interpolates quantile q inside its bucket, as Prometheus'
// histogram_quantile does, in milliseconds.
func (h histo) quantileMs(q float64) float64 {
	if h.count == 0 || len(h.bounds) == 0 {
		return math.NaN()
	}
	rank := q * float64(h.count)
	i := sort.Search(len(h.cum), func(i int) bool { return float64(h.cum[i]) >= rank })
	if i == len(h.cum) {
		return h.bounds[len(h.bounds)-1] * 1e3
	}
	lo, below := 0.0, uint64(0)
	if i > 0 {
		lo, below = h.bounds[i-1], h.cum[i-1]
	}
	in := h.cum[i] - below
	if in == 0 {
		return h.bounds[i] * 1e3
	}
	return (lo + (h.bounds[i]-lo)*(rank-float64(below))/float64(in)) * 1e3
}
