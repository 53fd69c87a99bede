package caddymodule

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// dbDuration is process-wide: Caddy gives each config load a new registry,
// so the collector is made once and registered with every registry (see
// registerMetrics), and its values survive a reload.
var dbDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "database_duration_seconds",
	Help:      "Time the gateway waited for one database operation, by operation (key_lookup, balance, hold, settle, request_logs, usage_counters).",
	// A local MongoDB answers in well under a millisecond, and the hold is
	// waited for before the first byte: buckets of a quarter to one
	// millisecond up to 10 ms, so that a p50 read from them is good to a
	// fraction of a millisecond.
	Buckets: []float64{
		.00025, .0005, .00075, .001, .00125, .0015, .00175, .002, .0025, .003, .0035, .004, .005, .006, .008, .01,
		.015, .025, .05, .1, .25, .5, 1, 2.5, 5,
	},
}, []string{"operation"})

// The series of dbDuration, one per operation.
var (
	waitKeyLookup   = dbDuration.WithLabelValues("key_lookup")     // a key not in the cache, or its background refresh
	waitBalance     = dbDuration.WithLabelValues("balance")        // the pre-check's fresh read of a balance that looked empty
	waitHold        = dbDuration.WithLabelValues("hold")           // the hold taken before forwarding
	waitSettle      = dbDuration.WithLabelValues("settle")         // one settlement command (one user, or a batch of users)
	waitRequestLogs = dbDuration.WithLabelValues("request_logs")   // one batched insert of request logs
	waitUsage       = dbDuration.WithLabelValues("usage_counters") // one batched update of the usage counters
)

// rateLimited counts the requests refused by a rate limit, by the limit's
// kind (user, friend, other, ip).
var rateLimited = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "rate_limited_total",
	Help:      "Requests refused by a rate limit, by kind (user, friend, other, ip).",
}, []string{"kind"})

// registerMetrics registers the module's collectors with a config's
// registry; registering them again (a second site, or a reload) is fine.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	var are prometheus.AlreadyRegisteredError
	for _, c := range []prometheus.Collector{dbDuration, rateLimited, usageProblems} {
		if err := reg.Register(c); err != nil && !errors.As(err, &are) {
			return err
		}
	}
	return nil
}

// observeDB records on o how long a database operation started at start
// took. It does not allocate.
func observeDB(o prometheus.Observer, start time.Time) {
	o.Observe(time.Since(start).Seconds())
}
