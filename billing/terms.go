package billing

// Terms are the sizes of a request's hold, so that the request can never
// cost more than its hold while the upstream keeps to max_tokens.
type Terms struct {
	// InputTokens is an upper bound of the request's input tokens: a token
	// is at least one byte of the body, and no model takes in more than its
	// context window.
	InputTokens int64
	// MaxTokens is the output the hold is sized for: the client's
	// max_tokens (or the default when it sets none), at most the model's
	// context window.
	MaxTokens int64
	// Input is the cost of InputTokens at the highest per-token input
	// price (the upstream may report input as cache writes); Want adds
	// MaxTokens of output. A pool below Input cannot pay the request.
	Input, Want Nano
}

// HoldTerms sizes the hold of a request of bodyLen bytes to model m that asks
// for maxTokens of output (maxTokens <= 0 means defaultMax).
//
// For any usage with at most InputTokens of input (however the upstream
// splits it between input, cache writes and cache reads) and at most
// MaxTokens of output, m.Price.Cost(usage) <= Want.
func HoldTerms(m *Model, bodyLen, maxTokens, defaultMax int64) Terms {
	window := m.ContextWindow
	if window <= 0 {
		window = DefaultContextWindow
	}
	if maxTokens <= 0 {
		maxTokens = defaultMax
	}
	t := Terms{InputTokens: min(max(bodyLen, 0), window), MaxTokens: min(max(maxTokens, 0), window)}
	p := boundPrice(m.Price)
	t.Input = p.Cost(Usage{Input: t.InputTokens})
	t.Want = p.Cost(Usage{Input: t.InputTokens, Output: t.MaxTokens})
	return t
}

// boundPrice is p with the input price raised to the highest price any
// input token may be billed at.
func boundPrice(p Price) Price {
	return Price{Input: max(p.Input, p.CacheWrite, p.CacheRead), Output: p.Output, Multiplier: p.Multiplier}
}

// Affordable returns the most output tokens, at most t.MaxTokens, that a
// hold of amount pays for after t's input bound: the largest k with
// Cost(InputTokens, k) <= amount. It is -1 when amount does not cover the
// input bound. A request forwarded with max_tokens lowered to Affordable
// can cost no more than its hold.
func (t Terms) Affordable(m *Model, amount Nano) int64 {
	p := boundPrice(m.Price)
	if p.Cost(Usage{Input: t.InputTokens}) > amount {
		return -1
	}
	lo, hi := int64(0), t.MaxTokens // Cost(lo) <= amount always
	for lo < hi {
		mid := lo + (hi-lo+1)/2
		if p.Cost(Usage{Input: t.InputTokens, Output: mid}) <= amount {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	return lo
}

// Cap returns the max_tokens to forward with a hold of amount, or 0 when
// the request must be refused because the hold cannot pay for it: the hold
// does not pay for one output token after the input bound, or, for
// Anthropic extended thinking (thinkingBudget > 0), the cap had to be
// lowered to no more than the thinking budget. Anthropic requires
// budget_tokens < max_tokens; lowering the budget as well would change what
// the client asked for behind its back, so such a request is refused
// instead (the client can ask again with a smaller budget). A client's own
// max_tokens at or below its budget is left for the upstream to refuse.
func (t Terms) Cap(m *Model, amount Nano, thinkingBudget int64) int64 {
	c := t.Affordable(m, amount)
	if c < 1 || thinkingBudget > 0 && c < t.MaxTokens && c <= thinkingBudget {
		return 0
	}
	return c
}
