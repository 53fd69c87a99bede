package caddymodule

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Database operation names: the operation label of
// caddy_llm_billing_database_duration_seconds.
const (
	opKeyLookup   = "key_lookup"     // a key that was not in the cache (or its background refresh)
	opHold        = "hold"           // the hold taken before forwarding
	opSettle      = "settle"         // one settlement command (one user, or a batch of users)
	opRequestLogs = "request_logs"   // one batched insert of request logs
	opUsage       = "usage_counters" // one batched update of the usage counters
)

// dbDuration is process-wide: Caddy gives each config load a new registry,
// so the collector is made once and registered with every registry (see
// registerMetrics), and its values survive a reload.
var dbDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "database_duration_seconds",
	Help:      "Time the gateway waited for one database operation, by operation (key_lookup, hold, settle, request_logs, usage_counters).",
	// A local MongoDB answers in well under a millisecond, and the hold is
	// waited for before the first byte: buckets of a quarter to one
	// millisecond up to 10 ms, so that a p50 read from them is good to a
	// fraction of a millisecond.
	Buckets: []float64{
		.00025, .0005, .00075, .001, .00125, .0015, .00175, .002, .0025, .003, .0035, .004, .005, .006, .008, .01,
		.015, .025, .05, .1, .25, .5, 1, 2.5, 5,
	},
}, []string{"operation"})

// dbObservers are dbDuration's series, looked up once.
var dbObservers = func() map[string]prometheus.Observer {
	m := make(map[string]prometheus.Observer)
	for _, op := range []string{opKeyLookup, opHold, opSettle, opRequestLogs, opUsage} {
		m[op] = dbDuration.WithLabelValues(op)
	}
	return m
}()

// registerMetrics registers the module's collectors with a config's
// registry; registering them again (a second site, or a reload) is fine.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	var are prometheus.AlreadyRegisteredError
	if err := reg.Register(dbDuration); err != nil && !errors.As(err, &are) {
		return err
	}
	return nil
}

// observeDB records how long a database operation started at start took.
// It does not allocate.
func observeDB(op string, start time.Time) {
	dbObservers[op].Observe(time.Since(start).Seconds())
}
