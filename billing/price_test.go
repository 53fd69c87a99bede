package billing

import (
	"math"
	"math/big"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The prod price lists of the legacy doc, section 5, in integer units
// (micro-USD per Mtok, multiplier in ppm). models_test.go checks that the
// example model files parse to exactly these.
var (
	// chat: claude-opus-4-6 and claude-opus-4-5-20251101, 4/20/6.25/0.5 ×1.02.
	chatOpus = Price{Input: 4_000_000, Output: 20_000_000, CacheWrite: 6_250_000, CacheRead: 500_000, Multiplier: 1_020_000}
	// chat: claude-sonnet-4-5-20250929, 3/14/3.75/0.3 ×1.02.
	chatSonnet = Price{Input: 3_000_000, Output: 14_000_000, CacheWrite: 3_750_000, CacheRead: 300_000, Multiplier: 1_020_000}
	// chat: claude-haiku-4-5-20251001, 1/5/1.25/0.1 ×1.05.
	chatHaiku = Price{Input: 1_000_000, Output: 5_000_000, CacheWrite: 1_250_000, CacheRead: 100_000, Multiplier: 1_050_000}
	// chat2: claude-opus-4-5-20251101, 5/25/6.25/0.5 ×1.15.
	chat2Opus = Price{Input: 5_000_000, Output: 25_000_000, CacheWrite: 6_250_000, CacheRead: 500_000, Multiplier: 1_150_000}
	// chat2: claude-sonnet-4-5-20250929, 3/15/3.75/0.3 ×1.15.
	chat2Sonnet = Price{Input: 3_000_000, Output: 15_000_000, CacheWrite: 3_750_000, CacheRead: 300_000, Multiplier: 1_150_000}
	// chat2: claude-haiku-4-5-20251001, 1/5/1.3/0.11 ×1.15.
	chat2Haiku = Price{Input: 1_000_000, Output: 5_000_000, CacheWrite: 1_300_000, CacheRead: 110_000, Multiplier: 1_150_000}
	// priority: claude-opus-4-6 and claude-opus-4-5-20251101, 5/25/6.25/0.5 ×1.03.
	priorityOpus = Price{Input: 5_000_000, Output: 25_000_000, CacheWrite: 6_250_000, CacheRead: 500_000, Multiplier: 1_030_000}
	// priority: claude-haiku-4-5-20251001, 1/5/1.25/0.1 ×1.03.
	priorityHaiku = Price{Input: 1_000_000, Output: 5_000_000, CacheWrite: 1_250_000, CacheRead: 100_000, Multiplier: 1_030_000}
)

// workedExample is the usage of the legacy doc's worked example.
var workedExample = Usage{Input: 1000, Output: 500, CacheWrite: 2000, CacheRead: 10000}

type priceVector struct {
	name     string
	price    Price
	usage    Usage
	cost     Nano
	weighted int64
}

// prodVectors has a hand-computed vector for every prod model. Notation:
// cost = Σ tokens·USD/Mtok / 10^6 × multiplier, then rounded up to a Nano;
// weighted = (in + out + cw·P_cw/P_in + cr·P_cr/P_in) × multiplier, truncated.
var prodVectors = []priceVector{
	{
		// The legacy doc's worked example (chat, Sonnet):
		// cost = (1000·3 + 500·14 + 2000·3.75 + 10000·0.3) / 1e6 × 1.02
		//      = (3000 + 7000 + 7500 + 3000) / 1e6 × 1.02 = 20500e-6 × 1.02 = $0.02091
		// weighted = (1000 + 500 + 2000·1.25 + 10000·0.1) × 1.02 = 5000 × 1.02 = 5100
		name: "chat sonnet worked example", price: chatSonnet, usage: workedExample,
		cost: 20_910_000, weighted: 5100,
	},
	{
		// chat Opus 4.6 / 4.5:
		// cost = (1000·4 + 500·20 + 2000·6.25 + 10000·0.5) / 1e6 × 1.02
		//      = (4000 + 10000 + 12500 + 5000) = 31500e-6 × 1.02 = $0.03213
		// weighted = (1500 + 2000·6.25/4 + 10000·0.5/4) × 1.02
		//          = (1500 + 3125 + 1250) × 1.02 = 5875 × 1.02 = 5992.5 → 5992
		name: "chat opus", price: chatOpus, usage: workedExample,
		cost: 32_130_000, weighted: 5992,
	},
	{
		// chat Opus, one million output tokens: 20 × 1.02 = $20.40;
		// weighted = 1e6 × 1.02 = 1_020_000.
		name: "chat opus 1M output", price: chatOpus, usage: Usage{Output: 1_000_000},
		cost: 20_400_000_000, weighted: 1_020_000,
	},
	{
		// chat Haiku:
		// cost = (123·1 + 4567·5 + 0·1.25 + 89012·0.1) / 1e6 × 1.05
		//      = (123 + 22835 + 8901.2) = 31859.2e-6 × 1.05 = $0.03345216
		// weighted = (123 + 4567 + 89012·0.1) × 1.05 = 13591.2 × 1.05 = 14270.76 → 14270
		name: "chat haiku", price: chatHaiku, usage: Usage{Input: 123, Output: 4567, CacheRead: 89012},
		cost: 33_452_160, weighted: 14270,
	},
	{
		// chat2 Opus:
		// cost = (2500·5 + 1234·25 + 50000·0.5) / 1e6 × 1.15
		//      = (12500 + 30850 + 25000) = 68350e-6 × 1.15 = $0.0786025
		// weighted = (2500 + 1234 + 50000·0.5/5) × 1.15 = 8734 × 1.15 = 10044.1 → 10044
		name: "chat2 opus", price: chat2Opus, usage: Usage{Input: 2500, Output: 1234, CacheRead: 50000},
		cost: 78_602_500, weighted: 10044,
	},
	{
		// chat2 Opus, where the legacy float64 formula undercounts:
		// cost = (99·5 + 10·0.5) / 1e6 × 1.15 = 500e-6 × 1.15 = $0.000575
		// weighted = (99 + 10·0.5/5) × 1.15 = 100 × 1.15 = 115 exactly; the
		// legacy int64((99 + 10*(0.5/5)) * 1.15) gives 114.
		name: "chat2 opus exact weighted", price: chat2Opus, usage: Usage{Input: 99, CacheRead: 10},
		cost: 575_000, weighted: 115,
	},
	{
		// chat2 Sonnet:
		// cost = (100000·3 + 8000·15) / 1e6 × 1.15 = 420000e-6 × 1.15 = $0.483
		// weighted = (100000 + 8000) × 1.15 = 124200
		name: "chat2 sonnet", price: chat2Sonnet, usage: Usage{Input: 100_000, Output: 8000},
		cost: 483_000_000, weighted: 124200,
	},
	{
		// chat2 Haiku, needs the ceil:
		// cost = (777·1 + 333·5 + 1111·1.3 + 3·0.11) / 1e6 × 1.15
		//      = (777 + 1665 + 1444.3 + 0.33) = 3886.63e-6 × 1.15 = $0.0044696245
		//      = 4_469_624.5 Nano → 4_469_625
		// weighted = (777 + 333 + 1111·1.3/1 + 3·0.11/1) × 1.15
		//          = (1110 + 1444.3 + 0.33) × 1.15 = 2554.63 × 1.15 = 2937.8245 → 2937
		name: "chat2 haiku", price: chat2Haiku, usage: Usage{Input: 777, Output: 333, CacheWrite: 1111, CacheRead: 3},
		cost: 4_469_625, weighted: 2937,
	},
	{
		// chat2 Haiku, one cache-read token: 0.11e-6 × 1.15 = $0.0000001265
		// = 126.5 Nano → 127; weighted = 0.11 × 1.15 = 0.1265 → 0.
		name: "chat2 haiku one cached token", price: chat2Haiku, usage: Usage{CacheRead: 1},
		cost: 127, weighted: 0,
	},
	{
		// priority Opus 4.6 / 4.5:
		// cost = (1000·5 + 500·25 + 2000·6.25 + 10000·0.5) / 1e6 × 1.03
		//      = (5000 + 12500 + 12500 + 5000) = 35000e-6 × 1.03 = $0.03605
		// weighted = (1500 + 2000·1.25 + 10000·0.1) × 1.03 = 5000 × 1.03 = 5150
		name: "priority opus", price: priorityOpus, usage: workedExample,
		cost: 36_050_000, weighted: 5150,
	},
	{
		// priority Opus, one million input tokens: 5 × 1.03 = $5.15;
		// weighted = 1e6 × 1.03 = 1_030_000.
		name: "priority opus 1M input", price: priorityOpus, usage: Usage{Input: 1_000_000},
		cost: 5_150_000_000, weighted: 1_030_000,
	},
	{
		// priority Haiku, one token of each kind:
		// cost = (1 + 5 + 1.25 + 0.1) / 1e6 × 1.03 = 7.35e-6 × 1.03 = $0.0000075705
		//      = 7570.5 Nano → 7571
		// weighted = (1 + 1 + 1.25 + 0.1) × 1.03 = 3.4505 → 3
		name: "priority haiku", price: priorityHaiku, usage: Usage{Input: 1, Output: 1, CacheWrite: 1, CacheRead: 1},
		cost: 7571, weighted: 3,
	},
}

// edgeVectors cover the rounding rule and the integer limits.
var edgeVectors = []priceVector{
	{
		name: "zero usage", price: chatSonnet, usage: Usage{},
		cost: 0, weighted: 0,
	},
	{
		// 1 token at 0.000001 $/Mtok ×1: E = 1·1·10^6 = 10^6 (10^-18 USD)
		// = 0.001 Nano → 1.
		name: "smallest charge rounds up", price: Price{Input: 1, Output: 1, Multiplier: 1_000_000}, usage: Usage{Input: 1},
		cost: 1, weighted: 1,
	},
	{
		// E = 1·1000·10^6 = 10^9: exactly 1 Nano, nothing to round.
		name: "exact nano", price: Price{Input: 1000, Output: 1000, Multiplier: 1_000_000}, usage: Usage{Input: 1},
		cost: 1, weighted: 1,
	},
	{
		// E = 1·1001·10^6 = 1.001·10^9: 1.001 Nano → 2.
		name: "just above one nano", price: Price{Input: 1001, Output: 1001, Multiplier: 1_000_000}, usage: Usage{Input: 1},
		cost: 2, weighted: 1,
	},
	{
		name: "negative counts are zero", price: chatSonnet, usage: Usage{Input: -1000, Output: -5, CacheWrite: -1, CacheRead: math.MinInt64},
		cost: 0, weighted: 0,
	},
	{
		// Only Output counts: 500·14 / 1e6 × 1.02 = $0.00714; weighted 510.
		name: "negative input ignored", price: chatSonnet, usage: Usage{Input: -1000, Output: 500},
		cost: 7_140_000, weighted: 510,
	},
	{
		// Negative prices and multiplier count as 0.
		name: "negative price", price: Price{Input: -1, Output: 5, Multiplier: 1_000_000}, usage: Usage{Input: 10, Output: 2},
		// cost = 2·5 pico·10^6 = 10^7 → 0.01 Nano → 1; weighted with P_in = 0:
		// (10 + 2) × 1 = 12.
		cost: 1, weighted: 12,
	},
	{
		name: "negative multiplier", price: Price{Input: 5, Output: 5, Multiplier: -1}, usage: Usage{Input: 10},
		cost: 0, weighted: 0,
	},
	{
		// P_in = 0: weighted = (in + out + cw + cr) × multiplier
		// = (1 + 2 + 3 + 4) × 1.5 = 15; cost = (2·5 + 3·1) pico × 1.5 = 19.5e-12
		// USD → 1 Nano.
		name: "free input", price: Price{Output: 5, CacheWrite: 1, Multiplier: 1_500_000}, usage: Usage{Input: 1, Output: 2, CacheWrite: 3, CacheRead: 4},
		cost: 1, weighted: 15,
	},
	{
		// MaxInt64 tokens at 1000 pico ×1: E = (2^63-1)·10^9, exactly
		// math.MaxInt64 Nano, not saturated.
		name: "largest exact", price: Price{Input: 1000, Output: 1, Multiplier: 1_000_000}, usage: Usage{Input: math.MaxInt64},
		cost: math.MaxInt64, weighted: math.MaxInt64,
	},
	{
		// One cached token more: E = (2^63-1)·10^9 + 10^6, whose ceil is
		// 2^63 Nano: saturates.
		name: "ceil past the limit", price: Price{Input: 1000, Output: 1, CacheRead: 1, Multiplier: 1_000_000}, usage: Usage{Input: math.MaxInt64, CacheRead: 1},
		cost: math.MaxInt64, weighted: math.MaxInt64,
	},
	{
		name: "huge counts saturate", price: Price{Input: math.MaxInt64, Output: math.MaxInt64, CacheWrite: math.MaxInt64, CacheRead: math.MaxInt64, Multiplier: math.MaxInt64},
		usage: Usage{Input: math.MaxInt64, Output: math.MaxInt64, CacheWrite: math.MaxInt64, CacheRead: math.MaxInt64},
		cost:  math.MaxInt64, weighted: math.MaxInt64,
	},
	{
		// 10^12 tokens (a million million) of Opus output at the legacy price:
		// 10^6 × 20 × 1.02 = $20,400,000 = 2.04·10^16 Nano, well inside int64.
		name: "huge but fits", price: chatOpus, usage: Usage{Output: 1_000_000_000_000},
		cost: 20_400_000_000_000_000, weighted: 1_020_000_000_000,
	},
}

func TestPriceGoldenVectors(t *testing.T) {
	for _, tt := range append(append([]priceVector(nil), prodVectors...), edgeVectors...) {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.price.Cost(tt.usage)
			assert.Equal(t, tt.cost, got, "Cost = %v, want %v", got, tt.cost)
			assert.Equal(t, tt.weighted, tt.price.WeightedTokens(tt.usage), "WeightedTokens")
		})
	}
}

func TestWorkedExampleIsTwoCentsAndABit(t *testing.T) {
	got := chatSonnet.Cost(workedExample)
	assert.Equal(t, "$0.020910000", got.String(), "worked example")
	assert.Equal(t, 0.02091, got.USD(), "worked example in USD")
}

// refCost and refWeighted are Cost and WeightedTokens in math/big.
func refCost(p Price, u Usage) Nano {
	e := refSum([4]int64{u.Input, u.Output, u.CacheWrite, u.CacheRead}, [4]int64{p.Input, p.Output, p.CacheWrite, p.CacheRead})
	e.Mul(e, big.NewInt(max(p.Multiplier, 0)))
	d := big.NewInt(1_000_000_000)
	q, r := new(big.Int).QuoRem(e, d, new(big.Int))
	if r.Sign() != 0 {
		q.Add(q, big.NewInt(1))
	}
	return Nano(satInt64(q))
}

func refWeighted(p Price, u Usage) int64 {
	pin, pcw, pcr := max(p.Input, 0), max(p.CacheWrite, 0), max(p.CacheRead, 0)
	if pin == 0 {
		pin, pcw, pcr = 1, 1, 1
	}
	e := refSum([4]int64{u.Input, u.Output, u.CacheWrite, u.CacheRead}, [4]int64{pin, pin, pcw, pcr})
	e.Mul(e, big.NewInt(max(p.Multiplier, 0)))
	e.Quo(e, new(big.Int).Mul(big.NewInt(pin), big.NewInt(1_000_000)))
	return satInt64(e)
}

func refSum(tokens, prices [4]int64) *big.Int {
	s := new(big.Int)
	for i := range tokens {
		s.Add(s, new(big.Int).Mul(big.NewInt(max(tokens[i], 0)), big.NewInt(max(prices[i], 0))))
	}
	return s
}

func satInt64(x *big.Int) int64 {
	if !x.IsInt64() {
		return math.MaxInt64
	}
	return x.Int64()
}

func TestCostAgainstBig(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	// Values of every magnitude, including negatives, zero and the extremes.
	val := func() int64 {
		switch rng.IntN(8) {
		case 0:
			return 0
		case 1:
			return math.MaxInt64 - rng.Int64N(3)
		case 2:
			return -rng.Int64N(1000)
		}
		return rng.Int64N(1 << rng.IntN(63))
	}
	for i := 0; i < 100_000; i++ {
		p := Price{Input: val(), Output: val(), CacheWrite: val(), CacheRead: val(), Multiplier: val()}
		u := Usage{Input: val(), Output: val(), CacheWrite: val(), CacheRead: val()}
		require.Equal(t, refCost(p, u), p.Cost(u), "%+v.Cost(%+v)", p, u)
		require.Equal(t, refWeighted(p, u), p.WeightedTokens(u), "%+v.WeightedTokens(%+v)", p, u)
	}
}

func TestCostDoesNotAllocate(t *testing.T) {
	u := Usage{Input: 123, Output: 456, CacheWrite: 789, CacheRead: 1011}
	n := testing.AllocsPerRun(100, func() {
		_ = chatOpus.Cost(u)
		_ = chatOpus.WeightedTokens(u)
	})
	assert.Zero(t, n, "Cost+WeightedTokens allocate")
}

func BenchmarkCost(b *testing.B) {
	u := Usage{Input: 12345, Output: 6789, CacheWrite: 2000, CacheRead: 100000}
	var sink Nano
	for b.Loop() {
		sink += chatOpus.Cost(u)
	}
	_ = sink
}

func TestCostWithFactor(t *testing.T) {
	p := Price{Input: 3_000_000, Output: 15_000_000, CacheWrite: 3_750_000, CacheRead: 300_000, Multiplier: 1_020_000}
	u := Usage{Input: 1000, Output: 500, CacheWrite: 2000, CacheRead: 10000}
	// (3000 + 7500 + 7500 + 3000) µUSD × 1.02 = $0.02142, and ×0.4 = $0.008568 exactly.
	assert.Equal(t, Nano(21_420_000), p.Cost(u))
	assert.Equal(t, Nano(8_568_000), p.WithFactor(400_000).Cost(u))
	assert.Equal(t, p.WeightedTokens(u), p.WithFactor(400_000).WeightedTokens(u), "the factor is not in the weighted tokens")
	assert.Equal(t, p.Cost(u), p.WithFactor(1_000_000).Cost(u))

	// One rounding, up, after the factor: 2.5 nano ×0.4 is exactly 1 nano;
	// rounding before the factor would charge ceil(ceil(2.5)·0.4) = 2.
	one := Price{Input: 2500, Output: 1, Multiplier: 1_000_000}
	assert.Equal(t, Nano(3), one.Cost(Usage{Input: 1}))
	assert.Equal(t, Nano(1), one.WithFactor(400_000).Cost(Usage{Input: 1}))
	assert.Equal(t, Nano(1), one.WithFactor(1).Cost(Usage{Input: 1}), "never free")

	// Extreme values neither overflow nor wrap.
	huge := Price{Input: math.MaxInt64, Output: math.MaxInt64, CacheWrite: math.MaxInt64, CacheRead: math.MaxInt64, Multiplier: 1000 * 1_000_000}
	assert.Equal(t, Nano(math.MaxInt64), huge.WithFactor(MaxFactor).Cost(Usage{Input: math.MaxInt64, Output: math.MaxInt64, CacheWrite: math.MaxInt64, CacheRead: math.MaxInt64}))
}
