package billing

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestHoldTerms(t *testing.T) {
	// $3 in, $15 out, $3.75 cache write, $0.30 cache read per Mtok, ×1.
	m := &Model{Price: Price{Input: 3_000_000, Output: 15_000_000, CacheWrite: 3_750_000, CacheRead: 300_000, Multiplier: 1_000_000}, ContextWindow: 1000}
	tm := HoldTerms(m, 400, 10, 4096)
	assert.Equal(t, int64(400), tm.InputTokens, "a token is at least a byte")
	assert.Equal(t, int64(10), tm.MaxTokens)
	assert.Equal(t, Nano(1_500_000), tm.Input, "400 tokens at the cache write price")
	assert.Equal(t, Nano(1_650_000), tm.Want)
	// The bound covers any split of the input the upstream may report.
	for _, u := range []Usage{{Input: 400, Output: 10}, {CacheWrite: 400, Output: 10}, {CacheRead: 400, Output: 10}, {Input: 100, CacheWrite: 200, CacheRead: 100, Output: 10}} {
		assert.LessOrEqual(t, m.Price.Cost(u), tm.Want, "%+v", u)
	}
	// The context window bounds both sides; no max_tokens means the default.
	tm = HoldTerms(m, 5000, 0, 4096)
	assert.Equal(t, int64(1000), tm.InputTokens)
	assert.Equal(t, int64(1000), tm.MaxTokens)
	assert.Equal(t, int64(7), HoldTerms(m, 1, 0, 7).MaxTokens)
	assert.Equal(t, int64(DefaultContextWindow), HoldTerms(&Model{Price: m.Price}, 1<<40, 1, 1).InputTokens)
}

func TestAffordableAndCap(t *testing.T) {
	m := &Model{Price: Price{Input: 3_000_000, Output: 15_000_000, CacheWrite: 3_750_000, Multiplier: 1_020_000}, ContextWindow: 1 << 20}
	tm := HoldTerms(m, 400, 4096, 4096)
	assert.Equal(t, int64(4096), tm.Affordable(m, tm.Want), "the full hold pays for max_tokens")
	assert.Equal(t, int64(-1), tm.Affordable(m, tm.Input-1), "below the input bound")
	assert.Equal(t, int64(0), tm.Affordable(m, tm.Input))
	for _, amount := range []Nano{tm.Input, tm.Input + 1, tm.Input + 15_300, tm.Input + 15_301, tm.Input + 33_333, tm.Want - 1} {
		k := tm.Affordable(m, amount)
		p := boundPrice(m.Price)
		assert.LessOrEqual(t, p.Cost(Usage{Input: tm.InputTokens, Output: k}), amount, "k=%d pays", k)
		if k < tm.MaxTokens {
			assert.Greater(t, p.Cost(Usage{Input: tm.InputTokens, Output: k + 1}), amount, "k=%d is the most", k)
		}
	}
	assert.Equal(t, int64(0), tm.Cap(m, tm.Input, 0), "no output token affordable: refused")
	assert.Equal(t, int64(1), tm.Cap(m, tm.Input+15_300, 0))
	assert.Equal(t, int64(4096), tm.Cap(m, tm.Want, 2048))
	assert.Equal(t, int64(0), tm.Cap(m, tm.Input+15_300*2048, 2048), "the cap must stay above the thinking budget")
	assert.Equal(t, int64(2049), tm.Cap(m, tm.Input+15_300*2049, 2048))
	assert.Equal(t, int64(4096), tm.Cap(m, tm.Want, 8000), "a budget above the client's own max_tokens is the upstream's to refuse")
	// A free output price affords everything asked.
	free := &Model{Price: Price{Input: 1, Multiplier: 1_000_000}, ContextWindow: 10}
	ft := HoldTerms(free, 5, 7, 7)
	assert.Equal(t, int64(7), ft.Affordable(free, ft.Input))
}
