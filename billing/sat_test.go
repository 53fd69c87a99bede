package billing

import (
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestAddSat(t *testing.T) {
	tests := []struct{ a, b, want int64 }{
		{1, 2, 3},
		{-1, -2, -3},
		{math.MaxInt64, 1, math.MaxInt64},
		{math.MaxInt64, math.MaxInt64, math.MaxInt64},
		{math.MinInt64, -1, math.MinInt64},
		{math.MinInt64, math.MinInt64, math.MinInt64},
		{math.MaxInt64, math.MinInt64, -1},
		{math.MaxInt64 - 5, 5, math.MaxInt64},
		{0, math.MinInt64, math.MinInt64},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, AddSat(tt.a, tt.b), "AddSat(%d, %d)", tt.a, tt.b)
		assert.Equal(t, tt.want, AddSat(tt.b, tt.a), "AddSat(%d, %d)", tt.b, tt.a)
	}
	// Typed amounts saturate too: a total of Nano never wraps negative.
	assert.Equal(t, Nano(math.MaxInt64), AddSat(Nano(math.MaxInt64-1), Nano(9_200_000_000_000_000_000/1000)))
}

func TestSubSat(t *testing.T) {
	tests := []struct{ a, b, want int64 }{
		{3, 2, 1},
		{2, 3, -1},
		{math.MaxInt64, -1, math.MaxInt64},
		{0, math.MinInt64, math.MaxInt64},
		{-1, math.MinInt64, math.MaxInt64},
		{math.MinInt64, 1, math.MinInt64},
		{-2, math.MaxInt64, math.MinInt64},
		{-1, math.MaxInt64, math.MinInt64},
		{math.MinInt64, math.MinInt64, 0},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, SubSat(tt.a, tt.b), "SubSat(%d, %d)", tt.a, tt.b)
	}
}

func TestClampTokens(t *testing.T) {
	assert.EqualValues(t, 0, ClampTokens(-5))
	assert.EqualValues(t, 7, ClampTokens(7))
	assert.EqualValues(t, MaxRequestTokens, ClampTokens(math.MaxInt64))
	u := Usage{Input: math.MaxInt64, Output: -1, CacheWrite: 3, CacheRead: MaxRequestTokens + 1}
	assert.Equal(t, Usage{Input: MaxRequestTokens, Output: 0, CacheWrite: 3, CacheRead: MaxRequestTokens}, u.Clamped())
	assert.EqualValues(t, math.MaxInt64, Usage{Input: math.MaxInt64, Output: math.MaxInt64}.Total())
	// A counter fed the most one request may add cannot reach 2^63 in
	// fewer than 2^31 requests.
	assert.Greater(t, int64(math.MaxInt64/MaxRequestTokens), int64(1<<30))
}
