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

// dbWait reads the gateway's database wait histogram of one operation from
// Caddy's admin /metrics. A missing series is an empty histogram.
func (h *harness) dbWait(op string) (histo, error) {
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		return histo{}, fmt.Errorf("reading /metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return histo{}, fmt.Errorf("reading /metrics: status %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return histo{}, fmt.Errorf("parsing /metrics: %w", err)
	}
	mf := mfs[dbWaitMetric]
	if mf == nil || mf.GetType() != dto.MetricType_HISTOGRAM {
		return histo{}, nil
	}
	for _, m := range mf.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() != "operation" || l.GetValue() != op {
				continue
			}
			hg := m.GetHistogram()
			out := histo{count: hg.GetSampleCount(), sum: hg.GetSampleSum()}
			for _, b := range hg.GetBucket() {
				out.bounds = append(out.bounds, b.GetUpperBound())
				out.cum = append(out.cum, b.GetCumulativeCount())
			}
			return out, nil
		}
	}
	return histo{}, nil
}

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
