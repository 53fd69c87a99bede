package billing

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

// FlushPlan is what a LeaseFlush does to a user's document, worked out
// before any write so that every store applies the same amounts.
type FlushPlan struct {
	// Next is the lease after the flush; zero when Closed.
	Next   Hold
	Closed bool
	// Receipts are the settlements' receipts, in the order of
	// LeaseFlush.Settles, stamped with the time given to PlanFlush.
	Receipts []Receipt
	// Back is what goes back to each field of the plan's pool: the part of
	// the lease the flush releases (never negative).
	Back []Nano
	// Charged is what the settlements charge together (all within the
	// lease).
	Charged Nano
}

// PlanFlush checks f and works out what it does: each settlement keeps
// SplitCost(its hold, its cost) of the lease, the rest of the lease stays
// (or Keep of it stays, or none of it with Close) and the part released
// goes back to the pool. It fails, and nothing may be written, when f is
// not a flush of one lease: a settlement served from another lease or
// plan, a cost outside its hold, a lease too small for what its
// settlements keep, a Keep above what is left, or a request named twice
// (in Settles and Clear together), or more than MaxClear receipts to drop.
func PlanFlush(f LeaseFlush, now time.Time) (FlushPlan, error) {
	l := f.Lease
	fields := l.Plan.Fields()
	if !IsLease(l.RequestID) || len(fields) == 0 || len(l.Taken) != len(fields) {
		return FlushPlan{}, fmt.Errorf("flushing %q: not a credit lease with its plan", l.RequestID)
	}
	if err := flushNamesOnce(f); err != nil {
		return FlushPlan{}, err
	}
	if err := CheckClear(f.Clear); err != nil {
		return FlushPlan{}, fmt.Errorf("flushing %s: %w", l.RequestID, err)
	}
	left := slices.Clone(l.Taken)
	p := FlushPlan{Receipts: make([]Receipt, len(f.Settles))}
	for i, s := range f.Settles {
		h := s.Hold
		if h.Lease != l.RequestID || h.User != l.User || h.Plan.String() != l.Plan.String() || len(h.Taken) != len(fields) {
			return FlushPlan{}, fmt.Errorf("flushing %s: request %q is not served from it", l.RequestID, h.RequestID)
		}
		if s.Cost < 0 || s.Cost > h.Amount() {
			return FlushPlan{}, fmt.Errorf("flushing %s: cost of request %q outside its hold", l.RequestID, h.RequestID)
		}
		keep := SplitCost(h.Taken, s.Cost)
		for j := range left {
			left[j] -= keep[j]
			if left[j] < 0 {
				return FlushPlan{}, fmt.Errorf("flushing %s: the settlements keep more than the lease holds", l.RequestID)
			}
		}
		p.Charged += s.Cost
		p.Receipts[i] = Receipt{RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: keep,
			Cost: s.Cost, Charged: s.Cost, By: s.By, At: now}
	}
	if err := p.release(f, left); err != nil {
		return FlushPlan{}, err
	}
	return p, nil
}

// release decides what stays in the lease of what left is, and what goes
// back to the pool.
func (p *FlushPlan) release(f LeaseFlush, left []Nano) error {
	p.Back = make([]Nano, len(left))
	stays := left
	switch {
	case f.Close:
		stays = nil
		copy(p.Back, left)
		p.Closed = true
	case f.Keep != nil:
		if len(f.Keep) != len(left) {
			return fmt.Errorf("flushing %s: Keep names %d fields, the plan %d", f.Lease.RequestID, len(f.Keep), len(left))
		}
		for j, k := range f.Keep {
			if k < 0 || k > left[j] {
				return fmt.Errorf("flushing %s: Keep is above what the lease has left", f.Lease.RequestID)
			}
			p.Back[j] = left[j] - k
		}
		stays = slices.Clone(f.Keep)
	}
	if p.Closed {
		return nil
	}
	p.Next = f.Lease
	p.Next.Taken = stays
	p.Next.Input = min(p.Next.Input, p.Next.Amount())
	if !f.Expires.IsZero() {
		p.Next.Expires = f.Expires
	}
	return nil
}

// flushNamesOnce refuses a flush that names a request twice: the write
// would set or drop one receipt twice.
func flushNamesOnce(f LeaseFlush) error {
	seen := make(map[string]bool, len(f.Settles)+len(f.Clear))
	for _, s := range f.Settles {
		if seen[s.Hold.RequestID] {
			return fmt.Errorf("flushing %s: request %q named twice", f.Lease.RequestID, s.Hold.RequestID)
		}
		seen[s.Hold.RequestID] = true
	}
	for _, rid := range f.Clear {
		if seen[rid] {
			return fmt.Errorf("flushing %s: request %q named twice", f.Lease.RequestID, rid)
		}
		seen[rid] = true
	}
	return nil
}

// ErrCarvedLease is returned by Settle and SettleMany for a hold they must
// not settle: a lease itself, which only LeaseLedger.FlushLease changes,
// or (SettleMany) a hold served from a lease.
var ErrCarvedLease = errors.New("a credit lease is settled by FlushLease")
