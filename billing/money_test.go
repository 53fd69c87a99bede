package billing

import (
	"math"
	"math/big"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNanoString(t *testing.T) {
	tests := []struct {
		n    Nano
		want string
	}{
		{0, "$0.000000000"},
		{1, "$0.000000001"},
		{20_910_000, "$0.020910000"},
		{1_000_000_000, "$1.000000000"},
		{123_456_789_012, "$123.456789012"},
		{-1, "-$0.000000001"},
		{-1_500_000_000, "-$1.500000000"},
		{math.MaxInt64, "$9223372036.854775807"},
		{math.MinInt64, "-$9223372036.854775808"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, tt.n.String(), "Nano(%d).String()", int64(tt.n))
	}
}

func TestNanoUSD(t *testing.T) {
	tests := []struct {
		n    Nano
		want float64
	}{
		{0, 0},
		{20_910_000, 0.02091},
		{-1_500_000_000, -1.5},
		{1, 1e-9},
		{123_456_789_012, 123.456789012},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, tt.n.USD(), "Nano(%d).USD()", int64(tt.n))
	}
}

func TestNanoFromUSD(t *testing.T) {
	tests := []struct {
		usd  float64
		want Nano
	}{
		{0, 0},
		{math.Copysign(0, -1), 0},
		{0.02091, 20_910_000},
		{-0.02091, -20_910_000},
		{1, 1_000_000_000},
		{123.456789012, 123_456_789_012},
		{4.9e-10, 0},
		// These three float64 values sit just off a half Nano, and their
		// product with 1e9 rounds to exactly k+0.5 in float64: a plain
		// math.Round(usd*1e9) would round all three up. Exact values
		// (checked with math/big): 1.5e-9·1e9 = 1.4999999999999999…,
		// 5e-10·1e9 = 0.50000000000000001…, 2.5e-9·1e9 = 2.5000000000000001….
		{1.5e-9, 1},
		{-1.5e-9, -1},
		{5e-10, 1},
		{2.5e-9, 3},
		// Exactly half a Nano, representable: away from zero.
		// 2^-10 USD is exactly 976562.5 Nano.
		{0x1p-10, 976_563},
		{-0x1p-10, -976_563},
		{1e10, math.MaxInt64},  // 10^19 Nano does not fit
		{-1e10, math.MinInt64}, // nor -10^19
		{math.MaxFloat64, math.MaxInt64},
		{-math.MaxFloat64, math.MinInt64},
		{math.NaN(), 0},
		{math.Inf(1), 0},
		{math.Inf(-1), 0},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, NanoFromUSD(tt.usd), "NanoFromUSD(%v)", tt.usd)
	}
}

// refNanoFromUSD is NanoFromUSD in exact rational arithmetic.
func refNanoFromUSD(usd float64) Nano {
	if math.IsNaN(usd) || math.IsInf(usd, 0) {
		return 0
	}
	r := new(big.Rat).SetFloat64(usd)
	r.Mul(r, big.NewRat(1_000_000_000, 1))
	num := new(big.Int).Abs(r.Num())
	q, m := new(big.Int).QuoRem(num, r.Denom(), new(big.Int))
	if m.Lsh(m, 1).Cmp(r.Denom()) >= 0 { // half or more: away from zero
		q.Add(q, big.NewInt(1))
	}
	if usd < 0 {
		q.Neg(q)
	}
	switch {
	case q.Cmp(big.NewInt(math.MaxInt64)) > 0:
		return math.MaxInt64
	case q.Cmp(big.NewInt(math.MinInt64)) < 0:
		return math.MinInt64
	}
	return Nano(q.Int64())
}

func TestNanoFromUSDAgainstBig(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	check := func(usd float64) {
		t.Helper()
		require.Equal(t, refNanoFromUSD(usd), NanoFromUSD(usd), "NanoFromUSD(%v = %x) against exact rounding", usd, usd)
	}
	// Near every half Nano up to 20000, where float products tie.
	for k := 0; k < 20_000; k++ {
		usd := (float64(k) + 0.5) / 1e9
		check(usd)
		check(-usd)
		check(math.Nextafter(usd, 0))
		check(math.Nextafter(usd, 1))
	}
	// Around the branch points 2^52 and 2^63 (in Nano) and the int64 ends.
	for _, edge := range []float64{0x1p52 / 1e9, 0x1p53 / 1e9, 0x1p63 / 1e9, 0x1p64 / 1e9} {
		x := edge
		for i := 0; i < 500; i++ {
			check(x)
			check(-x)
			x = math.Nextafter(x, 0)
		}
		x = edge
		for i := 0; i < 500; i++ {
			check(x)
			check(-x)
			x = math.Nextafter(x, math.Inf(1))
		}
	}
	// Random magnitudes from 10^-12 to 10^11 USD, and random bit patterns.
	for i := 0; i < 20_000; i++ {
		check(math.Pow(10, rng.Float64()*23-12) * float64(1-2*rng.IntN(2)))
		check(math.Float64frombits(rng.Uint64()))
	}
}

func TestNanoUSDRoundTrip(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 100_000; i++ {
		n := Nano(rng.Int64N(1<<52)) * Nano(1-2*rng.IntN(2))
		require.Equal(t, n, NanoFromUSD(n.USD()), "NanoFromUSD(Nano(%d).USD())", n)
	}
}
