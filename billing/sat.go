package billing

import "math"

// MaxRequestTokens bounds the tokens one request adds to any token counter
// (tokensUserNew, totalInputTokens, user_keys.tokensUsed, ...): 2^32, four
// times MaxContextWindow, so valid usage is never cut by it. A counter that
// starts at zero then needs 2^31 requests at the bound before it could reach
// math.MaxInt64, so no $inc of a stored total can overflow in practice, and
// the sums of a batch (see AddSat) cannot either.
const MaxRequestTokens = 1 << 32

// AddSat returns a+b, saturated at math.MaxInt64 and math.MinInt64 instead
// of wrapping around.
func AddSat[T ~int64](a, b T) T {
	s := a + b
	switch {
	case a > 0 && b > 0 && s < 0:
		return math.MaxInt64
	case a < 0 && b < 0 && s >= 0:
		return math.MinInt64
	}
	return s
}

// SubSat returns a-b, saturated like AddSat.
func SubSat[T ~int64](a, b T) T {
	s := a - b
	switch {
	case a >= 0 && b < 0 && s < 0:
		return math.MaxInt64
	case a < 0 && b > 0 && s >= 0:
		return math.MinInt64
	}
	return s
}

// ClampTokens returns n limited to [0, MaxRequestTokens]: what one request
// may add to a token counter.
func ClampTokens(n int64) int64 {
	return min(max(n, 0), MaxRequestTokens)
}

// Clamped returns u with every count limited by ClampTokens.
func (u Usage) Clamped() Usage {
	return Usage{
		Input:      ClampTokens(u.Input),
		Output:     ClampTokens(u.Output),
		CacheWrite: ClampTokens(u.CacheWrite),
		CacheRead:  ClampTokens(u.CacheRead),
	}
}

// Total returns the sum of u's four counts, saturated like AddSat.
func (u Usage) Total() int64 {
	return AddSat(AddSat(u.Input, u.Output), AddSat(u.CacheWrite, u.CacheRead))
}
