package settle

import (
	"encoding/json"
	"math"
	"math/rand/v2"
	"reflect"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// filler sets every exported, encoded field of a value to a random value,
// so that a field the journal codec forgets shows as a difference from
// json.Marshal.
type filler struct{ r *rand.Rand }

var (
	planType = reflect.TypeFor[billing.CreditPlan]()
	timeType = reflect.TypeFor[time.Time]()
	oddText  = []string{"", "user-00012", `q"b\s`, "<&>", "\t\n\x01", "\u2028", "bad\xff", "☃𝄞", "sk-tr...abcd"}
	plans    = [][]string{nil, {"creditsNew"}, {"credits"}, {"credits", "refCredits"}}
)

func (f filler) fill(v reflect.Value) {
	switch {
	case v.Type() == planType:
		var p billing.CreditPlan
		if fields := plans[f.r.IntN(len(plans))]; fields != nil {
			p, _ = billing.ParseCreditPlan(fields)
		}
		v.Set(reflect.ValueOf(p))
		return
	case v.Type() == timeType:
		zone := time.FixedZone("z", (f.r.IntN(48)-24)*1800)
		if f.r.IntN(3) == 0 {
			zone = time.UTC
		}
		v.Set(reflect.ValueOf(time.Unix(f.r.Int64N(5e9), f.r.Int64N(1e9)).In(zone)))
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(oddText[f.r.IntN(len(oddText))])
	case reflect.Bool:
		v.SetBool(f.r.IntN(2) == 0)
	case reflect.Int, reflect.Int64:
		v.SetInt(f.r.Int64() - math.MaxInt64/2*int64(f.r.IntN(3)))
	case reflect.Uint8:
		v.SetUint(uint64(f.r.IntN(256)))
	case reflect.Float64:
		v.SetFloat(f.r.NormFloat64() * math.Pow(10, float64(f.r.IntN(40)-20)))
	case reflect.Array:
		for i := range v.Len() {
			f.fill(v.Index(i))
		}
	case reflect.Slice:
		if f.r.IntN(4) == 0 {
			return // nil
		}
		n := f.r.IntN(4)
		v.Set(reflect.MakeSlice(v.Type(), n, n))
		for i := range n {
			f.fill(v.Index(i))
		}
	case reflect.Map:
		if f.r.IntN(4) == 0 {
			return
		}
		v.Set(reflect.MakeMap(v.Type()))
		for range f.r.IntN(4) {
			k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
			f.fill(k)
			f.fill(e)
			v.SetMapIndex(k, e)
		}
	case reflect.Pointer:
		if f.r.IntN(3) == 0 {
			return
		}
		v.Set(reflect.New(v.Type().Elem()))
		f.fill(v.Elem())
	case reflect.Struct:
		for i := range v.NumField() {
			sf := v.Type().Field(i)
			if sf.IsExported() && sf.Tag.Get("json") != "-" {
				f.fill(v.Field(i))
			}
		}
	default:
		panic("filler: no rule for " + v.Type().String())
	}
}

func TestJournalCodecIsJSON(t *testing.T) {
	f := filler{rand.New(rand.NewPCG(5, 6))}
	cases := []*Settlement{{}, {Hold: billing.Hold{RequestID: "r"}}}
	for range 3000 {
		s := new(Settlement)
		f.fill(reflect.ValueOf(s).Elem())
		cases = append(cases, s, &Settlement{Hold: s.Hold})
	}
	for i, s := range cases {
		want, err := json.Marshal(s)
		require.NoError(t, err, "case %d", i)
		got, err := appendSettlement(nil, s)
		require.NoError(t, err, "case %d", i)
		require.Equal(t, string(want), string(got), "case %d", i)
	}
}

func TestJournalCodecRefusesWhatJSONRefuses(t *testing.T) {
	bad := []*Settlement{
		{Log: billing.RequestLog{CreditsCost: math.NaN()}},
		{Log: billing.RequestLog{Shortfall: math.Inf(1)}},
		{Hold: billing.Hold{At: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}},
	}
	for _, s := range bad {
		_, jerr := json.Marshal(s)
		require.Error(t, jerr)
		_, err := appendSettlement(nil, s)
		assert.Error(t, err)
	}
}

func BenchmarkJournalEncode(b *testing.B) {
	s := new(Settlement)
	filler{rand.New(rand.NewPCG(9, 10))}.fill(reflect.ValueOf(s).Elem())
	b.Run("appendSettlement", func(b *testing.B) {
		b.ReportAllocs()
		var buf []byte
		for b.Loop() {
			buf, _ = appendSettlement(buf[:0], s)
		}
	})
	b.Run("json.Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = json.Marshal(s)
		}
	})
}
