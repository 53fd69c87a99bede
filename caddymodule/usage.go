package caddymodule

import (
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// The request log's usageSource values (the README lists them).
const (
	// sourceUpstream: the upstream's usage, complete and valid.
	sourceUpstream = "upstream"
	// sourcePartial: the valid usage reported before the stream ended
	// early, with output never below what was seen.
	sourcePartial = "upstream_partial"
	// sourceEstimated: no usage, and none was due any more: a stream cut
	// (by the upstream, or by the gateway after its client left), or a
	// body that is not JSON or too large to keep. Estimated from the bytes.
	sourceEstimated = "estimated"
	// sourceHoldInvalid / sourceHoldMissing: the usage is invalid, or is
	// missing from an answer that promised it; the hold is billed.
	sourceHoldInvalid = "hold_invalid_usage"
	sourceHoldMissing = "hold_missing_usage"
	// sourceBoundInvalid / sourceBoundMissing: the same under hold check,
	// where there is no hold: billed the most the client could have
	// caused, its body's bytes as input tokens plus max_tokens of output.
	sourceBoundInvalid = "bound_invalid_usage"
	sourceBoundMissing = "bound_missing_usage"
)

// problemCutBeforeUsage is the usage-problems label of a stream the
// upstream ended (cut, or with an error event) before any usage.
const problemCutBeforeUsage = "cut_before_usage"

// usageProblems counts the answers whose usage could not be billed as
// reported, by pool (the credit plan, e.g. "credits+refCredits") and
// problem (billing.UsageProblem's names, cut_before_usage and output_over_cap): a fixed,
// small set of labels. Process-wide like dbDuration, so it survives reloads.
var usageProblems = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "caddy",
	Subsystem: "llm_billing",
	Name:      "usage_problems_total",
	Help:      "Answers whose upstream usage could not be billed as reported, by pool and problem (missing_usage, missing_field, negative, not_a_number, not_an_integer, beyond_context_window, cache_exceeds_whole, cut_before_usage, output_over_cap).",
}, []string{"pool", "problem"})

// measured is what a 2xx answer is billed for.
type measured struct {
	u      billing.Usage
	source string // the request log's usageSource
	end    string // the request log's endReason
	// problem is why the upstream's usage is not billed as reported (a
	// usageProblems label), "" when it is.
	problem string
	// bound: u cannot be trusted; bill the hold (or, with no hold, the
	// bound of boundUsage).
	bound bool
}

// measure reads what the answer used. Usage that is invalid, or missing
// where it was due, is never billed as reported: the result is bound.
// Where usage was due: always on a non-streaming JSON answer, and on a
// stream that ended normally (the gateway forces include_usage on OpenAI
// streams; Anthropic always reports). A stream that ended early without
// usage is estimated instead: if the upstream cut it, the client could not
// have caused that and the hold would bill max_tokens for a broken answer;
// if the gateway cut it (client_disconnect stop, or the drain timeout),
// the upstream stopped generating too, and the estimate covers what was
// sent.
func (h *Handler) measure(m *meter, pr *proxied, clientGone bool) measured {
	if m.sse {
		return measureStream(m, pr, clientGone)
	}
	est := billing.Usage{Input: billing.EstimateTokens(int64(pr.bodyLen)), Output: billing.EstimateTokens(m.bytes)}
	r := measured{source: sourceEstimated, end: "no_usage", u: est}
	if clientGone {
		r.end = "client_gone"
	}
	if m.overflow {
		return r
	}
	u, problem, err := billing.ParseUsageJSON(m.api, m.body, pr.model.ContextWindow)
	switch {
	case err != nil:
		return r
	case problem == billing.UsageMissing:
		r.source, r.problem, r.bound = sourceHoldMissing, problem.String(), true
	case problem != billing.UsageValid:
		r.source, r.problem, r.bound = sourceHoldInvalid, problem.String(), true
	default:
		r.u, r.source = u, sourceUpstream
	}
	if !clientGone {
		r.end = "complete"
	}
	return r
}

// measureStream is measure for an event stream.
func measureStream(m *meter, pr *proxied, clientGone bool) measured {
	m.scanner.Window = pr.model.ContextWindow
	res := m.scanner.Result()
	r := measured{u: res.Usage, source: sourceUpstream, end: "complete"}
	switch {
	case clientGone:
		r.end = "client_gone"
	case res.Done:
	case res.Errored:
		r.end = "upstream_error"
	default:
		r.end = "upstream_cut"
	}
	switch {
	case res.Problem == billing.UsageValid && !res.Done:
		// Ended before the final usage: never bill less output than seen.
		r.u.Output = max(r.u.Output, billing.EstimateTokens(res.TextBytes))
		r.source = sourcePartial
	case res.Problem == billing.UsageValid:
	case res.Problem != billing.UsageMissing:
		r.source, r.problem, r.bound = sourceHoldInvalid, res.Problem.String(), true
	case res.Done:
		r.source, r.problem, r.bound = sourceHoldMissing, res.Problem.String(), true
	default:
		r.u = billing.Usage{Input: billing.EstimateTokens(int64(pr.bodyLen)), Output: billing.EstimateTokens(res.TextBytes)}
		r.source = sourceEstimated
		if !clientGone {
			r.problem = problemCutBeforeUsage
		}
	}
	return r
}

// charge returns the cost of r and the usage recorded with it. A bound
// result is charged the hold, whatever the pool gave for it; under hold
// check, which takes none, it is charged boundUsage. Either way the
// usage recorded is boundUsage, limited to the model's window. Every
// problem is counted and logged (never with a key).
func (h *Handler) charge(r *measured, pr *proxied) (billing.Nano, billing.Usage) {
	if r.problem != "" {
		usageProblems.WithLabelValues(h.plan.String(), r.problem).Inc()
	}
	if !r.bound {
		return pr.model.Price.Cost(r.u), r.u
	}
	h.logger.Warn("upstream usage cannot be billed as reported; billing the hold",
		zap.String("problem", r.problem), zap.String("request_id", pr.reqID), zap.String("user", pr.principal.User),
		zap.String("model", pr.model.ID), zap.String("upstream_model", pr.upstreamModel),
		zap.Int64("reported_input", r.u.Input), zap.Int64("reported_output", r.u.Output),
		zap.Int64("reported_cache_write", r.u.CacheWrite), zap.Int64("reported_cache_read", r.u.CacheRead))
	u := h.boundUsage(pr)
	if h.HoldSizing != HoldCheck {
		return pr.hold.Amount(), u
	}
	if r.source == sourceHoldInvalid {
		r.source = sourceBoundInvalid
	} else {
		r.source = sourceBoundMissing
	}
	return pr.model.Price.Cost(u), u
}

// boundUsage is the most a request can use while its upstream keeps its
// contract: every byte of the body an input token, and max_tokens (or
// DefaultMaxTokens) of output, each at most the model's context window.
func (h *Handler) boundUsage(pr *proxied) billing.Usage {
	out := pr.maxTokens
	if out < 0 { // hold check: nothing was capped
		out = pr.askedTokens
	}
	if out <= 0 {
		out = h.DefaultMaxTokens
	}
	w := pr.model.ContextWindow
	if w <= 0 {
		w = billing.DefaultContextWindow
	}
	return billing.Usage{Input: min(int64(pr.bodyLen), w), Output: min(out, w)}
}

// problemOverCap counts answers that report more output than the forwarded
// max_tokens: the upstream broke its contract, and what the hold cannot
// pay is recorded as shortfall when the settlement is applied.
const problemOverCap = "output_over_cap"

// checkCap flags and counts a reported output above the forwarded cap.
func (h *Handler) checkCap(pr *proxied, source string, u billing.Usage, cost billing.Nano) {
	if pr.maxTokens < 0 || u.Output <= pr.maxTokens || source != sourceUpstream && source != sourcePartial {
		return
	}
	usageProblems.WithLabelValues(h.plan.String(), problemOverCap).Inc()
	h.logger.Warn("upstream broke its contract: more output than the forwarded max_tokens",
		zap.String("request_id", pr.reqID), zap.Int64("max_tokens", pr.maxTokens), zap.Int64("output_tokens", u.Output),
		zap.String("cost", cost.String()), zap.String("hold", pr.hold.Amount().String()))
}
