package caddymodule

import (
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

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

// measure reads what the answer used (billing.Measure).
func (h *Handler) measure(m *meter, pr *proxied, clientGone bool) billing.Outcome {
	a := billing.Answer{
		API: m.api, Stream: m.sse, Body: m.body, Overflow: m.overflow, Bytes: m.bytes,
		RequestBytes: int64(pr.bodyLen), ContextWindow: pr.model.ContextWindow, ClientGone: clientGone,
	}
	if m.sse {
		m.scanner.Window = pr.model.ContextWindow
		a.Scan = m.scanner.Result()
	}
	return billing.Measure(a)
}

// charge returns the cost of r and the usage recorded with it. A bound
// result is charged the hold, whatever the pool gave for it; under hold
// check, which takes none, it is charged boundUsage. Either way the
// usage recorded is boundUsage, limited to the model's window. Every
// problem is counted and logged (never with a key).
func (h *Handler) charge(r *billing.Outcome, pr *proxied) (billing.Nano, billing.Usage) {
	if r.Problem != "" {
		usageProblems.WithLabelValues(h.plan.String(), r.Problem).Inc()
	}
	if !r.Bound {
		return pr.model.Price.Cost(r.Usage), r.Usage
	}
	h.logger.Warn("upstream usage cannot be billed as reported; billing the hold",
		zap.String("problem", r.Problem), zap.String("request_id", pr.reqID), zap.String("user", pr.principal.User),
		zap.String("model", pr.model.ID), zap.String("upstream_model", pr.upstreamModel),
		zap.Int64("reported_input", r.Usage.Input), zap.Int64("reported_output", r.Usage.Output),
		zap.Int64("reported_cache_write", r.Usage.CacheWrite), zap.Int64("reported_cache_read", r.Usage.CacheRead))
	u := h.boundUsage(pr)
	if h.HoldSizing != HoldCheck {
		return pr.hold.Amount(), u
	}
	if r.Source == billing.SourceHoldInvalid {
		r.Source = billing.SourceBoundInvalid
	} else {
		r.Source = billing.SourceBoundMissing
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
	if pr.maxTokens < 0 || u.Output <= pr.maxTokens || source != billing.SourceUpstream && source != billing.SourcePartial {
		return
	}
	usageProblems.WithLabelValues(h.plan.String(), problemOverCap).Inc()
	h.logger.Warn("upstream broke its contract: more output than the forwarded max_tokens",
		zap.String("request_id", pr.reqID), zap.Int64("max_tokens", pr.maxTokens), zap.Int64("output_tokens", u.Output),
		zap.String("cost", cost.String()), zap.String("hold", pr.hold.Amount().String()))
}
