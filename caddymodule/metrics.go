package caddymodule

import (
	"errors"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/settle"
)

// Every collector here is process-wide: Caddy gives each config load a new
// registry, so a collector is made once and registered with every registry
// (see registerMetrics), and its values survive a reload. No label ever
// carries a key, a user or an IP: pool is a site's credit plan
// ("creditsNew", "credits+refCredits"), model a canonical id of a site's
// models file (or unknownModel), and every other label is one of a fixed
// set named where it is counted.

// dbDuration is the time of each database operation on the gateway's side.
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

// The outcomes of requestsTotal.
const (
	outcomeBilled        = "billed"         // a 2xx answer, billed
	outcomeRefusedAuth   = "refused_auth"   // 401: no key, a bad or revoked key
	outcomeRefusedCredit = "refused_credit" // 402: no credit, expired credit, a friend key's limit
	outcomeRefusedPolicy = "refused_policy" // 403: the priority line, migration required
	outcomeRateLimited   = "rate_limited"   // 429 from the gateway's own rate limit
	outcomeBadRequest    = "bad_request"    // any other 4xx of the gateway: bad JSON, unknown model, too large
	outcomeUpstreamError = "upstream_error" // the upstream's error answer, none, or one not valid for its API
	outcomeUnavailable   = "unavailable"    // 503: no upstream key, the database or body memory unavailable
)

// unknownModel is the model label of a request refused before its model
// was found in the site's models file: never the client's string.
const unknownModel = "unknown"

// requestsTotal counts the requests to the billed endpoints
// (/v1/chat/completions, /v1/messages) once each, when they end.
var requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "requests_total",
	Help:      "Requests to /v1/chat/completions and /v1/messages, counted when they end, by pool, model (canonical id, or unknown) and outcome (billed, refused_auth, refused_credit, refused_policy, rate_limited, bad_request, upstream_error, unavailable).",
}, []string{"pool", "model", "outcome"})

// tokensTotal counts the tokens billed, once per request, when its
// settlement and its request log row are written.
var tokensTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "tokens_total",
	Help:      "Tokens billed, as the request log rows record them, by pool, model and kind (input, output, cache_write, cache_read).",
}, []string{"pool", "model", "kind"})

// chargedUSD counts the money taken from the pools: what each settlement
// (and each orphaned hold the sweeper resolves) charged, shortfall excluded.
var chargedUSD = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "charged_usd_total",
	Help:      "USD charged to the users' balances, by pool: the request log rows' chargedNano, plus the holds the sweeper resolved.",
}, []string{"pool"})

// usageEstimated counts the requests billed from an estimate.
var usageEstimated = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "usage_estimated_total",
	Help:      "Billed requests whose usage was estimated from the bytes, in whole (usageSource estimated) or in part (upstream_partial), by pool.",
}, []string{"pool"})

// holdsOutstanding is the number of holds this process took and has not
// yet settled or released in the database.
var holdsOutstanding = prometheus.NewGauge(prometheus.GaugeOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "holds_outstanding",
	Help:      "Holds this process took and whose settlement or release the database has not yet taken.",
})

// settlementLag is the time from a response's end to its settlement and
// request log row in the database.
var settlementLag = prometheus.NewHistogram(prometheus.HistogramOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "settlement_lag_seconds",
	Help:      "Time from the end of a billed response to its settlement and request log row in the database.",
	// Batches linger 50 ms; a database outage shows in the upper buckets.
	Buckets: []float64{.01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900},
})

// upstreamFailovers counts the attempts retried on another upstream key,
// by why the key failed (billing.KeyVerdict reasons: unauthorized,
// payment_required, forbidden, budget_exceeded, rate_limited, overloaded,
// upstream_5xx status, transport_error).
var upstreamFailovers = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "upstream_failovers_total",
	Help:      "Requests retried on another upstream key before any byte reached the client, by the failed key's reason (unauthorized, payment_required, forbidden, budget_exceeded, rate_limited, overloaded, upstream_<5xx status>, transport_error).",
}, []string{"reason"})

// collectors returns every collector of the module.
func collectors() []prometheus.Collector {
	return []prometheus.Collector{
		dbDuration, rateLimited, usageProblems, requestsTotal, tokensTotal, chargedUSD, usageEstimated,
		holdsOutstanding, settlementLag, upstreamFailovers, keyStates, holdsTaken, leaseEvents,
	}
}

// registerMetrics registers the module's collectors with a config's
// registry; registering them again (a second site, or a reload) is fine.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	var are prometheus.AlreadyRegisteredError
	for _, c := range collectors() {
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

// outcome is the requests_total outcome of a request that ended with the
// gateway's own refusal (nil when it answered none) and the status the
// client got (0 when none was written).
func outcome(refusal *apiError, status int) string {
	if refusal == nil {
		if status >= 200 && status < 300 {
			return outcomeBilled // every 2xx of a billed endpoint is billed
		}
		return outcomeUpstreamError // passed through, or no answer at all
	}
	switch s := refusal.status; {
	case s == http.StatusUnauthorized:
		return outcomeRefusedAuth
	case s == http.StatusPaymentRequired:
		return outcomeRefusedCredit
	case s == http.StatusForbidden:
		return outcomeRefusedPolicy
	case s == http.StatusTooManyRequests:
		return outcomeRateLimited
	case s == http.StatusBadGateway || s == http.StatusGatewayTimeout:
		return outcomeUpstreamError
	case s >= 400 && s < 500:
		return outcomeBadRequest
	}
	return outcomeUnavailable
}

// countRequest counts a request to a billed endpoint once, when it ends
// (deferred before anything else runs, so it runs after the settlement is
// handed over). count_tokens is neither held nor billed: not counted.
func (h *Handler) countRequest(rr *refusalRecorder, ep endpoint) {
	if ep != epChat && ep != epMessages {
		return
	}
	model := rr.model
	if model == "" {
		model = unknownModel
	}
	requestsTotal.WithLabelValues(h.plan.String(), model, outcome(rr.refusal, rr.status)).Inc()
}

// settleMetrics counts what the settlement pipeline does.
type settleMetrics struct{}

// waits maps the settlement's database operations to their histograms.
var waits = map[string]prometheus.Observer{
	settle.OpSettle: waitSettle, settle.OpRequestLogs: waitRequestLogs, settle.OpUsage: waitUsage,
}

// DBWait observes one database operation of the pipeline.
func (settleMetrics) DBWait(op string, d time.Duration) {
	if o := waits[op]; o != nil {
		o.Observe(d.Seconds())
	}
}

// Billed counts a billed request whose settlement and log row this
// process has just written: tokens, money, estimate and lag, exactly once
// per request (a retry only gets here once its row is written).
func (settleMetrics) Billed(s *settle.Settlement) {
	l := &s.Log
	pool := l.CreditField
	tokensTotal.WithLabelValues(pool, l.Model, "input").Add(float64(l.InputTokens))
	tokensTotal.WithLabelValues(pool, l.Model, "output").Add(float64(l.OutputTokens))
	tokensTotal.WithLabelValues(pool, l.Model, "cache_write").Add(float64(l.CacheWriteTokens))
	tokensTotal.WithLabelValues(pool, l.Model, "cache_read").Add(float64(l.CacheHitTokens))
	chargedUSD.WithLabelValues(pool).Add(billing.Nano(l.ChargedNano).USD())
	if l.UsageSource == billing.SourceEstimated || l.UsageSource == billing.SourcePartial {
		usageEstimated.WithLabelValues(pool).Inc()
	}
	settlementLag.Observe(time.Since(l.CreatedAt).Seconds())
}

// Finished takes a finished settlement's hold out of holds_outstanding.
func (settleMetrics) Finished(*settle.Settlement) { holdsOutstanding.Dec() }

// Swept counts what the sweeper charged for an orphaned hold.
func (settleMetrics) Swept(h billing.Hold, charged billing.Nano) {
	chargedUSD.WithLabelValues(h.Plan.String()).Add(charged.USD())
}

// The states of upstream_keys: a key Pick may hand out now is healthy,
// whatever its stored status; any other is counted by its status, and a
// status outside this list as other.
var keyStateNames = []string{
	billing.KeyHealthy, billing.KeyRateLimited, billing.KeyExhausted, billing.KeyNeedRefresh, billing.KeyError, "other",
}

// keyStates is the upstream_keys collector. It reads the key pools of the
// live engines when scraped, so that a cooldown that has passed shows at
// once; every state is always reported, 0 when no key is in it.
var keyStates = &keyStateCollector{
	desc: prometheus.NewDesc("caddy_llm_billing_upstream_keys",
		"Upstream keys in the pool by state: healthy (usable now), rate_limited, exhausted, need_refresh, error (cooling down), other.",
		[]string{"state"}, nil),
	pools: func(f func(*billing.KeyPool)) {
		engines.Range(func(_, v any) bool {
			f(&v.(*engine).keys)
			return true
		})
	},
}

type keyStateCollector struct {
	desc  *prometheus.Desc
	pools func(func(*billing.KeyPool)) // calls its argument with every live key pool
}

// Describe implements prometheus.Collector.
func (c *keyStateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c *keyStateCollector) Collect(ch chan<- prometheus.Metric) {
	counts := countKeyStates(c.pools, time.Now())
	for i, state := range keyStateNames {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, counts[i], state)
	}
}

// countKeyStates counts the keys of every pool by state, in the order of
// keyStateNames.
func countKeyStates(pools func(func(*billing.KeyPool)), now time.Time) []float64 {
	counts := make([]float64, len(keyStateNames))
	pools(func(p *billing.KeyPool) {
		for _, k := range p.Snapshot() {
			i := len(keyStateNames) - 1
			if billing.Usable(k, now) {
				i = 0
			} else {
				for j, s := range keyStateNames[1 : len(keyStateNames)-1] {
					if k.Status == s {
						i = j + 1
					}
				}
			}
			counts[i]++
		}
	})
	return counts
}

// holdsTaken counts the holds taken, by where they came from: "store" (a
// write of their own) or "lease" (carved from a credit lease in memory).
var holdsTaken = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "holds_total",
	Help:      "Holds taken before forwarding, by source (store: a database write; lease: carved from a credit lease).",
}, []string{"source"})

// leaseEvents counts the credit leases this instance took and closed.
var leaseEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "credit_leases_total",
	Help:      "Credit leases this instance took and closed, by event (taken, closed).",
}, []string{"event"})

// The series of holdsTaken and leaseEvents.
var (
	holdsFromStore = holdsTaken.WithLabelValues("store")
	holdsFromLease = holdsTaken.WithLabelValues("lease")
	leasesTaken    = leaseEvents.WithLabelValues("taken")
	leasesClosed   = leaseEvents.WithLabelValues("closed")
)

// observeHold counts a hold by its source and, when it was a database
// write, observes how long it took from start.
func observeHold(h billing.Hold, err error, start time.Time) {
	if h.Lease != "" {
		holdsFromLease.Inc()
		return
	}
	observeDB(waitHold, start)
	if err == nil {
		holdsFromStore.Inc()
	}
}

// leaseMetrics counts what the credit leases do.
type leaseMetrics struct{}

// Taken counts a lease taken.
func (leaseMetrics) Taken(billing.Hold) { leasesTaken.Inc() }

// Closed counts a lease closed.
func (leaseMetrics) Closed(billing.Hold) { leasesClosed.Inc() }
