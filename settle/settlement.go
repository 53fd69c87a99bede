package settle

import (
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Settlement is the work left after a response: settle the hold (charge the
// cost, give back the rest), write the request log, add the usage
// counters. It is journaled before it is queued, so that it survives the
// process and is replayed until the database has it; its JSON form is that
// journal record.
type Settlement struct {
	Hold     billing.Hold  `json:"hold"`
	Cost     billing.Nano  `json:"cost"`
	Usage    billing.Usage `json:"usage"`
	Weighted int64         `json:"weighted"`
	// Bill is false for a release: no answer was billed, the hold goes
	// back and no log row is written.
	Bill bool `json:"bill"`
	// Unknown marks a release whose hold was asked for and never answered
	// (the database went away meanwhile): Hold has no amounts and the hold
	// may or may not exist, so it is looked up first (findHold).
	Unknown  bool                  `json:"unknown,omitempty"`
	Log      billing.RequestLog    `json:"log"`
	Counters billing.UsageCounters `json:"counters"`
	Site     string                `json:"site"`

	// Logger logs what happens to this settlement; nil: the Settler's.
	Logger *zap.Logger `json:"-"`
	// Counted says the submitter counts this settlement as outstanding:
	// the Observer's Finished is called for it, once, when it is done.
	Counted bool `json:"-"`

	journaled bool // appended to the journal
	queued    bool // counted in waiting
	failures  int
}

// Release returns the settlement that gives a hold back unbilled.
func Release(h billing.Hold, logger *zap.Logger) *Settlement {
	return &Settlement{Hold: h, Logger: logger}
}

// request is the store's settle request for s. The receipt it leaves
// says whether a log row follows (SettledByRequest) or not
// (SettledByRelease), so the sweeper knows which receipts need one.
func (s *Settlement) request() billing.SettleRequest {
	by := billing.SettledByRequest
	if !s.Bill {
		by = billing.SettledByRelease
	}
	return billing.SettleRequest{Hold: s.Hold, Cost: s.Cost, Usage: s.Usage, WeightedTokens: s.Weighted, By: by}
}

// logBilled writes one line per billed request, as Caddy's own
// reverse_proxy logs its round trips: at DEBUG (the request log row is the
// record), and at WARN when part of the cost could not be charged.
func (s *Settlement) logBilled() {
	lvl, msg := zap.DebugLevel, "billed"
	if s.Log.ShortfallNano > 0 {
		lvl, msg = zap.WarnLevel, "billed with shortfall"
	}
	ce := s.Logger.Check(lvl, msg)
	if ce == nil {
		return
	}
	ce.Write(
		zap.String("request_id", s.Log.RequestID),
		zap.String("site", s.Site),
		zap.String("credit_field", s.Log.CreditField),
		zap.String("user", s.Log.UserID),
		zap.String("key", s.Log.UserKeyID),
		zap.String("model", s.Log.Model),
		zap.String("upstream_model", s.Log.UpstreamModel),
		zap.String("upstream_key", s.Log.TrollKeyID),
		zap.Int64("input_tokens", s.Log.InputTokens),
		zap.Int64("output_tokens", s.Log.OutputTokens),
		zap.Int64("cache_write_tokens", s.Log.CacheWriteTokens),
		zap.Int64("cache_read_tokens", s.Log.CacheHitTokens),
		zap.String("hold", s.Hold.Amount().String()),
		zap.String("cost", s.Cost.String()),
		zap.String("charged", billing.Nano(s.Log.ChargedNano).String()),
		zap.String("shortfall", billing.Nano(s.Log.ShortfallNano).String()),
		zap.String("usage_source", s.Log.UsageSource),
		zap.String("end_reason", s.Log.EndReason),
	)
}
