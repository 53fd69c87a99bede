package billing

import (
	"math"
	"math/bits"
)

// Price is a model's price list in integer units.
//
// The four per-token prices are in micro-USD per million tokens, which is the
// same number as pico-USD (10^-12 USD) per token: the legacy config's
// "input_price_per_mtok": 3.0 is Input 3_000_000. Multiplier is the legacy
// billing_multiplier in parts per million: 1.02 is 1_020_000, and 1_000_000
// charges the list price.
//
// A Price from ParseCatalogue has no negative field and a positive Input and
// Output. For any other Price, Cost and WeightedTokens read a negative field
// as 0.
type Price struct {
	Input, Output, CacheWrite, CacheRead int64 // micro-USD per million tokens (equal to pico-USD per token)
	Multiplier                           int64 // billing multiplier in parts per million (1.02 → 1_020_000)
	// Factor is a site's price_factor in parts per million (0.4 → 400_000),
	// applied to Cost and not to WeightedTokens, as the legacy discount
	// was; 0 means none. See WithFactor.
	Factor int64
}

// MaxFactor bounds a price factor: 1000×, in parts per million.
const MaxFactor = 1000 * 1_000_000

// WithFactor returns p with its cost scaled by factor parts per million.
// The factor multiplies the exact cost before the one rounding of Cost, so
// a discounted request is rounded once, up, like any other.
func (p Price) WithFactor(factor int64) Price {
	p.Factor = factor
	return p
}

// Cost returns what one request with usage u is charged.
//
// The exact cost is the integer
//
//	E = (Input·P_in + Output·P_out + CacheWrite·P_cw + CacheRead·P_cr) · Multiplier
//
// in units of 10^-18 USD (tokens × pico-USD per token × parts per million).
// The charge is E rounded UP to a whole Nano, ceil(E / 10^9), once per
// request: never per component and never per stream chunk, so a request is
// never charged less than its exact cost and never more than 1 Nano above it.
//
// The arithmetic is 128/192-bit (math/bits) and cannot overflow for any int64
// inputs; a charge that does not fit in an int64 Nano (above 9.2 billion USD)
// saturates at math.MaxInt64. Negative token counts count as 0.
//
// This is the legacy formula (config.CalculateBillingCostWithCache) in exact
// arithmetic. The legacy code billed in_eff = input_tokens for the "openhands"
// upstream and input − cacheHit − cacheWrite for any other upstream; that
// subtraction is not applied here because Usage is already normalised per API
// so that Input excludes every cached token. The legacy priority-line
// discount (×0.4 for glm-4.6) is a site's price_factor: with Factor set the
// exact cost is E·Factor in units of 10^-24 USD, rounded up to a whole Nano
// the same way.
func (p Price) Cost(u Usage) Nano {
	var x u192
	x.addMul(nonNeg(u.Input), nonNeg(p.Input))
	x.addMul(nonNeg(u.Output), nonNeg(p.Output))
	x.addMul(nonNeg(u.CacheWrite), nonNeg(p.CacheWrite))
	x.addMul(nonNeg(u.CacheRead), nonNeg(p.CacheRead))
	x = x.mul(nonNeg(p.Multiplier))
	div := uint64(nanoPerUSD)
	if p.Factor > 0 {
		// Below 2^158 so far; a factor up to MaxFactor (< 2^30) keeps it
		// below 2^192.
		x = x.mul(uint64(min(p.Factor, MaxFactor)))
		div *= 1_000_000
	}
	q, rem := x.divRem(div)
	n := q.int64Sat()
	if rem != 0 && n < math.MaxInt64 {
		n++
	}
	return Nano(n)
}

// WeightedTokens returns the legacy "weighted billing tokens" of usage u, the
// number the legacy proxy stored in request_logs.tokensUsed,
// user_keys.tokensUsed and usersNew.tokensUserNew:
//
//	int64((in + out + cw·(P_cw/P_in) + cr·(P_cr/P_in)) · multiplier)
//
// computed exactly in integers as
//
//	floor(((in+out)·P_in + cw·P_cw + cr·P_cr) · Multiplier / (P_in · 10^6))
//
// (truncation toward zero, as the legacy int64 conversion; the legacy float
// could land one below an exact integer, this cannot). When P_in is 0 it is
// floor((in+out+cw+cr) · Multiplier / 10^6). Like Cost it is overflow-free,
// saturates at math.MaxInt64 and counts negative token counts as 0.
func (p Price) WeightedTokens(u Usage) int64 {
	pin, pcw, pcr := nonNeg(p.Input), nonNeg(p.CacheWrite), nonNeg(p.CacheRead)
	if pin == 0 {
		pin, pcw, pcr = 1, 1, 1
	}
	var x u192
	x.addMul(nonNeg(u.Input), pin)
	x.addMul(nonNeg(u.Output), pin)
	x.addMul(nonNeg(u.CacheWrite), pcw)
	x.addMul(nonNeg(u.CacheRead), pcr)
	x = x.mul(nonNeg(p.Multiplier))
	// floor(floor(X/a)/b) == floor(X/(a·b)) for positive integers, and this
	// way a·b (up to 2^83) never has to be formed.
	x, _ = x.divRem(pin)
	x, _ = x.divRem(1_000_000)
	return x.int64Sat()
}

func nonNeg(v int64) uint64 {
	if v < 0 {
		return 0
	}
	return uint64(v)
}

// u192 is an unsigned 192-bit integer, most significant word first. Cost and
// WeightedTokens need no more: four products of two values below 2^63 sum to
// less than 2^128, and one more factor below 2^63 keeps the total below 2^191.
type u192 [3]uint64

// addMul adds a·b to x. The caller keeps the sum below 2^192.
func (x *u192) addMul(a, b uint64) {
	hi, lo := bits.Mul64(a, b)
	var c uint64
	x[2], c = bits.Add64(x[2], lo, 0)
	x[1], c = bits.Add64(x[1], hi, c)
	x[0] += c
}

// mul returns x·m. The caller keeps the product below 2^192.
func (x u192) mul(m uint64) u192 {
	h2, l2 := bits.Mul64(x[2], m)
	h1, l1 := bits.Mul64(x[1], m)
	l0 := x[0] * m
	r1, c := bits.Add64(l1, h2, 0)
	return u192{l0 + h1 + c, r1, l2}
}

// divRem returns x/d and x%d; d must not be 0.
func (x u192) divRem(d uint64) (q u192, rem uint64) {
	q[0], rem = bits.Div64(0, x[0], d)
	q[1], rem = bits.Div64(rem, x[1], d)
	q[2], rem = bits.Div64(rem, x[2], d)
	return q, rem
}

// int64Sat returns x as an int64, or math.MaxInt64 when it does not fit.
func (x u192) int64Sat() int64 {
	if x[0]|x[1] != 0 || x[2] > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(x[2])
}
