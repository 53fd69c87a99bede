package settle

import (
	"slices"
	"sync"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/internal/jsonw"
)

// The journal holds a settlement as the JSON json.Marshal writes for it
// (and reads it back with json.Unmarshal). Every request journals one or
// two, so appendSettlement writes those bytes without reflection;
// TestJournalCodecIsJSON compares it with json.Marshal on every field.

// encBufs recycles the buffers settlements are encoded into (Append
// copies its data before it returns).
var encBufs = sync.Pool{New: func() any { return new([]byte) }}

// maxPooledBuf is the largest buffer kept for reuse.
const maxPooledBuf = 64 << 10

// journal appends s to j under id.
func journal(j Journal, id string, s *Settlement) error {
	p := encBufs.Get().(*[]byte)
	b, err := appendSettlement((*p)[:0], s)
	if err == nil {
		err = j.Append(id, b)
	}
	if cap(b) <= maxPooledBuf {
		*p = b
		encBufs.Put(p)
	}
	return err
}

// jenc appends JSON, keeping the first error (a value JSON cannot hold).
type jenc struct {
	b   []byte
	err error
}

func (e *jenc) str(key, v string)       { e.b = jsonw.String(append(e.b, key...), v) }
func (e *jenc) num(key string, v int64) { e.b = jsonw.Int(append(e.b, key...), v) }
func (e *jenc) flag(key string, v bool) { e.b = jsonw.Bool(append(e.b, key...), v) }

func (e *jenc) float(key string, v float64) {
	var err error
	if e.b, err = jsonw.Float(append(e.b, key...), v); err != nil && e.err == nil {
		e.err = err
	}
}

func (e *jenc) time(key string, t time.Time) {
	var err error
	if e.b, err = jsonw.Time(append(e.b, key...), t); err != nil && e.err == nil {
		e.err = err
	}
}

// appendSettlement appends s as json.Marshal(s) writes it.
func appendSettlement(dst []byte, s *Settlement) ([]byte, error) {
	e := &jenc{b: append(dst, `{"hold":`...)}
	e.hold(&s.Hold)
	e.num(`,"cost":`, int64(s.Cost))
	e.b = append(e.b, `,"usage":`...)
	e.usage(s.Usage)
	e.num(`,"weighted":`, s.Weighted)
	e.flag(`,"bill":`, s.Bill)
	if s.Unknown {
		e.flag(`,"unknown":`, true)
	}
	e.b = append(e.b, `,"log":`...)
	e.log(&s.Log)
	c := &s.Counters
	e.str(`,"counters":{"UpstreamKeyID":`, c.UpstreamKeyID)
	e.num(`,"WeightedTokens":`, c.WeightedTokens)
	e.num(`,"RawTokens":`, c.RawTokens)
	e.time(`,"At":`, c.At)
	e.str(`},"site":`, s.Site)
	e.b = append(e.b, '}')
	return e.b, e.err
}

func (e *jenc) hold(h *billing.Hold) {
	e.str(`{"RequestID":`, h.RequestID)
	e.str(`,"User":`, h.User)
	e.b = append(e.b, `,"Plan":`...)
	e.strings(h.Plan.Fields())
	e.b = append(e.b, `,"Taken":`...)
	if h.Taken == nil {
		e.b = append(e.b, "null"...)
	} else {
		e.b = append(e.b, '[')
		for i, n := range h.Taken {
			if i > 0 {
				e.b = append(e.b, ',')
			}
			e.b = jsonw.Int(e.b, int64(n))
		}
		e.b = append(e.b, ']')
	}
	e.num(`,"Input":`, int64(h.Input))
	e.str(`,"Owner":`, h.Owner)
	e.time(`,"At":`, h.At)
	e.time(`,"Expires":`, h.Expires)
	e.b = append(e.b, `,"LogID":`...)
	e.logID(h.LogID)
	e.str(`,"Model":`, h.Model)
	e.str(`,"KeyID":`, h.KeyID)
	if f := h.Friend; f != nil {
		e.str(`,"Friend":{"RequestID":`, f.RequestID)
		e.str(`,"Model":`, f.Model)
		e.num(`,"Slot":`, int64(f.Slot))
		e.num(`,"Amount":`, int64(f.Amount))
		e.time(`,"Expires":`, f.Expires)
		e.b = append(e.b, '}')
	}
	if h.Lease != "" {
		e.str(`,"Lease":`, h.Lease)
	}
	e.b = append(e.b, '}')
}

func (e *jenc) usage(u billing.Usage) {
	e.num(`{"Input":`, u.Input)
	e.num(`,"Output":`, u.Output)
	e.num(`,"CacheWrite":`, u.CacheWrite)
	e.num(`,"CacheRead":`, u.CacheRead)
	e.b = append(e.b, '}')
}

func (e *jenc) strings(v []string) {
	if v == nil {
		e.b = append(e.b, "null"...)
		return
	}
	e.b = append(e.b, '[')
	for i, s := range v {
		if i > 0 {
			e.b = append(e.b, ',')
		}
		e.b = jsonw.String(e.b, s)
	}
	e.b = append(e.b, ']')
}

func (e *jenc) logID(id billing.LogID) {
	e.b = append(e.b, '[')
	for i, c := range id {
		if i > 0 {
			e.b = append(e.b, ',')
		}
		e.b = jsonw.Int(e.b, int64(c))
	}
	e.b = append(e.b, ']')
}

func (e *jenc) log(l *billing.RequestLog) {
	e.b = append(e.b, `{"ID":`...)
	e.logID(l.ID)
	e.str(`,"UserID":`, l.UserID)
	e.str(`,"UserKeyID":`, l.UserKeyID)
	e.str(`,"TrollKeyID":`, l.TrollKeyID)
	e.str(`,"Model":`, l.Model)
	e.num(`,"InputTokens":`, l.InputTokens)
	e.num(`,"OutputTokens":`, l.OutputTokens)
	e.num(`,"CacheWriteTokens":`, l.CacheWriteTokens)
	e.num(`,"CacheHitTokens":`, l.CacheHitTokens)
	e.float(`,"CreditsCost":`, l.CreditsCost)
	e.str(`,"CreditType":`, l.CreditType)
	e.num(`,"TokensUsed":`, l.TokensUsed)
	e.num(`,"StatusCode":`, int64(l.StatusCode))
	e.num(`,"LatencyMs":`, l.LatencyMs)
	e.flag(`,"IsSuccess":`, l.IsSuccess)
	e.time(`,"CreatedAt":`, l.CreatedAt)
	e.str(`,"FriendKeyID":`, l.FriendKeyID)
	e.str(`,"RequestID":`, l.RequestID)
	e.str(`,"CreditField":`, l.CreditField)
	e.str(`,"Endpoint":`, l.Endpoint)
	e.flag(`,"Stream":`, l.Stream)
	e.str(`,"UpstreamModel":`, l.UpstreamModel)
	e.str(`,"UsageSource":`, l.UsageSource)
	e.str(`,"EndReason":`, l.EndReason)
	e.num(`,"CostNano":`, l.CostNano)
	e.num(`,"ChargedNano":`, l.ChargedNano)
	e.float(`,"Shortfall":`, l.Shortfall)
	e.num(`,"ShortfallNano":`, l.ShortfallNano)
	e.num(`,"HoldNano":`, l.HoldNano)
	e.b = append(e.b, `,"TakenNano":`...)
	e.counts(l.TakenNano)
	e.b = append(e.b, `,"Attempts":`...)
	e.attempts(l.Attempts)
	e.b = append(e.b, '}')
}

// counts appends m with its keys sorted, as json.Marshal does.
func (e *jenc) counts(m map[string]int64) {
	if m == nil {
		e.b = append(e.b, "null"...)
		return
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	e.b = append(e.b, '{')
	for i, k := range keys {
		if i > 0 {
			e.b = append(e.b, ',')
		}
		e.b = append(jsonw.String(e.b, k), ':')
		e.b = jsonw.Int(e.b, m[k])
	}
	e.b = append(e.b, '}')
}

func (e *jenc) attempts(as []billing.Attempt) {
	if as == nil {
		e.b = append(e.b, "null"...)
		return
	}
	e.b = append(e.b, '[')
	for i := range as {
		a := &as[i]
		if i > 0 {
			e.b = append(e.b, ',')
		}
		e.str(`{"KeyID":`, a.KeyID)
		e.num(`,"Status":`, int64(a.Status))
		e.str(`,"Reason":`, a.Reason)
		e.num(`,"LatencyMs":`, a.LatencyMs)
		e.b = append(e.b, '}')
	}
	e.b = append(e.b, ']')
}
