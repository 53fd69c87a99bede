package jsonw

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var oddStrings = []string{
	"", "plain", `quote " and \ backslash`, "<script>&amp;</script>", "tab\tnl\nret\rbs\bff\f",
	"\x00\x01\x1f\x7f", "line\u2028para\u2029", "bad \xff utf-8 \xc3", "snow ☃ and 𝄞", "sk-tr...abcd",
}

func TestStringIsJSON(t *testing.T) {
	for _, s := range oddStrings {
		want, err := json.Marshal(s)
		require.NoError(t, err)
		assert.Equal(t, string(want), string(String(nil, s)), "%q", s)
	}
}

func TestFloatIsJSON(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	fs := []float64{0, math.Copysign(0, -1), 1, -1, 1e-6, 1e-7, 9.99e-7, 1e20, 1e21, 123456789.125, 0.1, 5e-324, math.MaxFloat64}
	for range 2000 {
		fs = append(fs, r.NormFloat64()*math.Pow(10, float64(r.IntN(60)-30)))
	}
	for _, f := range fs {
		want, err := json.Marshal(f)
		require.NoError(t, err)
		got, err := Float(nil, f)
		require.NoError(t, err)
		assert.Equal(t, string(want), string(got), "%v", f)
	}
	for _, f := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		_, jerr := json.Marshal(f)
		require.Error(t, jerr)
		_, err := Float(nil, f)
		assert.ErrorIs(t, err, ErrUnsupported)
	}
}

func TestTimeIsJSON(t *testing.T) {
	zones := []*time.Location{time.UTC, time.FixedZone("x", -(9*3600 + 30*60)), time.FixedZone("y", 5*3600+45*60)}
	r := rand.New(rand.NewPCG(3, 4))
	ts := []time.Time{{}, time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC), time.Unix(0, 0)}
	for range 500 {
		ts = append(ts, time.Unix(r.Int64N(4e9), r.Int64N(1e9)).In(zones[r.IntN(len(zones))]))
	}
	for _, tm := range ts {
		want, err := json.Marshal(tm)
		require.NoError(t, err)
		got, err := Time(nil, tm)
		require.NoError(t, err)
		assert.Equal(t, string(want), string(got), "%v", tm)
	}
	for _, tm := range []time.Time{time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)} {
		_, jerr := json.Marshal(tm)
		require.Error(t, jerr)
		_, err := Time(nil, tm)
		assert.ErrorIs(t, err, ErrUnsupported)
	}
}

func TestIntAndBool(t *testing.T) {
	for _, n := range []int64{0, -1, math.MaxInt64, math.MinInt64, 42} {
		want, _ := json.Marshal(n)
		assert.Equal(t, string(want), string(Int(nil, n)))
	}
	assert.Equal(t, "true", string(Bool(nil, true)))
	assert.Equal(t, "false", string(Bool(nil, false)))
}

func FuzzString(f *testing.F) {
	for _, s := range oddStrings {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want, err := json.Marshal(s)
		require.NoError(t, err)
		require.Equal(t, string(want), string(String(nil, s)))
	})
}

func FuzzFloat(f *testing.F) {
	f.Add(1.5)
	f.Add(1e-7)
	f.Add(1e21)
	f.Fuzz(func(t *testing.T, v float64) {
		want, jerr := json.Marshal(v)
		got, err := Float(nil, v)
		if jerr != nil {
			require.ErrorIs(t, err, ErrUnsupported)
			return
		}
		require.NoError(t, err)
		require.Equal(t, string(want), string(got))
	})
}
