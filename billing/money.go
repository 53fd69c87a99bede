package billing

import (
	"math"
	"strconv"
)

// Nano is an amount of money in nano-US-dollars (10^-9 USD). All billing
// arithmetic is done in Nano, on integers; floating point appears only at the
// database boundary, where the legacy documents keep balances as USD doubles
// (see USD and NanoFromUSD).
//
// One Nano is far below anything the legacy data can tell apart (balances of
// a few hundred dollars carry about 10^-13 USD of float precision), and an
// int64 of Nano holds ±9.2 billion USD.
type Nano int64

const nanoPerUSD = 1_000_000_000

// USD returns n in US dollars, for the database boundary. It is the float64
// nearest to n/10^9 whenever |n| ≤ 2^53 (about 9 million USD), and then
// NanoFromUSD(n.USD()) == n for |n| < 2^52 (about 4.5 million USD).
func (n Nano) USD() float64 { return float64(n) / nanoPerUSD }

// NanoFromUSD converts a USD amount, as stored in the legacy documents, to
// Nano. It rounds the exact value of usd·10^9 to the nearest integer, halves
// away from zero (so 0.0000000005 USD, were it representable, would be 1 Nano),
// without the extra rounding a plain math.Round(usd*1e9) suffers.
//
// Amounts beyond the int64 range saturate at math.MaxInt64 or math.MinInt64.
// NaN and ±Inf are not amounts of money and convert to 0: read as a balance
// that is "nothing to spend", which is the safe direction; callers that must
// tell a corrupt value from a zero balance check math.IsNaN/IsInf themselves.
func NanoFromUSD(usd float64) Nano {
	if math.IsNaN(usd) || math.IsInf(usd, 0) {
		return 0
	}
	a := math.Abs(usd)
	p := a * nanoPerUSD
	// The product a·10^9 is exactly p+e: the rounding error of a
	// multiplication is itself a float64, and FMA computes it exactly.
	e := math.FMA(a, nanoPerUSD, -p)
	var m uint64 // the rounded magnitude
	switch {
	case p >= 0x1p64:
		m = math.MaxUint64
	case p >= 0x1p52:
		// p is an integer (its ulp is at least 1) and |e| ≤ ulp/2 ≤ 1024.
		// a ≥ 2^22 here, so e is a multiple of 2^-21 and e+0.5 is exact.
		m = uint64(p)
		if r := math.Floor(e + 0.5); r < 0 {
			m -= uint64(-r)
		} else {
			m += uint64(r) // p ≤ 2^64-2^11, so no overflow
		}
	default:
		// Below 2^52 every half-integer is a float64, so the exact value and
		// p round alike unless p sits exactly on a half, where e decides.
		if fl := math.Floor(p); p-fl == 0.5 && e < 0 {
			m = uint64(fl)
		} else {
			m = uint64(math.Round(p))
		}
	}
	if usd < 0 {
		if m >= 1<<63 {
			return math.MinInt64
		}
		return -Nano(m)
	}
	if m > math.MaxInt64 {
		return math.MaxInt64
	}
	return Nano(m)
}

// String formats n as dollars with all nine decimals, "$0.020910000", with a
// leading minus sign for negative amounts ("-$1.500000000"). The formatting is
// exact integer arithmetic.
func (n Nano) String() string {
	var buf [32]byte
	b := buf[:0]
	m := uint64(n)
	if n < 0 {
		b = append(b, '-')
		m = -m // two's complement: exact for math.MinInt64 too
	}
	b = append(b, '$')
	b = strconv.AppendUint(b, m/nanoPerUSD, 10)
	b = append(b, '.')
	frac := m % nanoPerUSD
	for d := uint64(nanoPerUSD / 10); d > 0; d /= 10 {
		b = append(b, byte('0'+frac/d%10))
	}
	return string(b)
}
