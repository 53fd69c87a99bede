package ledgertest

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// FlushLease applies the flush as the MongoDB store does, in one step; see
// billing.LeaseLedger. Asked again after its answer was lost (FailAfter),
// it recognises the step it made: the lease is what that step left (or
// gone, for a Close) and every settlement has its receipt; it then returns
// the same lease and the stored receipts. A lease that is not f.Lease
// otherwise gives billing.ErrLeaseMoved; a settlement with a receipt while
// the lease is f.Lease gives billing.ErrNotAllHeld. A receipt of f.Clear
// that is gone does not fail the flush: those still kept are dropped.
func (s *Store) FlushLease(ctx context.Context, f billing.LeaseFlush) (billing.Hold, []billing.Receipt, error) {
	if err := flushIDs(f); err != nil {
		return billing.Hold{}, nil, err
	}
	if _, err := billing.PlanFlush(f, time.Time{}); err != nil {
		return billing.Hold{}, nil, err // refused before the database
	}
	fault, err := s.enter(ctx, OpFlushLease)
	if err != nil {
		return billing.Hold{}, nil, fmt.Errorf("flushing a lease: %w", err)
	}
	defer s.mu.Unlock()
	p, err := billing.PlanFlush(f, s.now())
	if err != nil {
		return billing.Hold{}, nil, err
	}
	next, rcs, err := s.flushLease(f, p)
	if fault == FailAfter {
		return billing.Hold{}, nil, fmt.Errorf("flushing a lease: %w", &FaultError{Op: OpFlushLease, Fault: fault})
	}
	return next, rcs, err
}

// flushIDs checks that every request id of f can key a hold or receipt.
func flushIDs(f billing.LeaseFlush) error {
	for _, id := range f.RequestIDs() {
		if err := validRequestID(id); err != nil {
			return err
		}
	}
	return nil
}

// flushLease is FlushLease under the lock.
func (s *Store) flushLease(f billing.LeaseFlush, p billing.FlushPlan) (billing.Hold, []billing.Receipt, error) {
	u := s.users[f.Lease.User]
	if u == nil {
		return billing.Hold{}, nil, billing.ErrUserNotFound
	}
	cur, held := u.holds[f.Lease.RequestID]
	settled := 0
	for _, st := range f.Settles {
		if _, ok := u.receipts[st.Hold.RequestID]; ok {
			settled++
		}
	}
	switch {
	case held && settled == 0 && sameHold(cur, f.Lease):
		u.applyFlush(f, p)
		return p.Next, p.Receipts, nil
	case settled == len(f.Settles) && (p.Closed && !held || !p.Closed && held && sameHold(cur, p.Next)):
		rcs := make([]billing.Receipt, len(f.Settles))
		for i, st := range f.Settles {
			rcs[i] = cloneReceipt(u.receipts[st.Hold.RequestID])
		}
		return p.Next, rcs, nil // applied before
	case held && sameHold(cur, f.Lease):
		return billing.Hold{}, nil, fmt.Errorf("flushing %s: %w", f.Lease.RequestID, billing.ErrNotAllHeld)
	}
	return billing.Hold{}, nil, fmt.Errorf("flushing %s: %w", f.Lease.RequestID, billing.ErrLeaseMoved)
}

// applyFlush writes the plan: the receipts and what they charged, the
// lease's new amount or its end, the released part back to the pool, and
// the receipts of f.Clear dropped.
func (u *user) applyFlush(f billing.LeaseFlush, p billing.FlushPlan) {
	fields := f.Lease.Plan.Fields()
	for i, rc := range p.Receipts {
		for j, fl := range fields {
			u.charged[fl] += rc.Taken[j]
		}
		stored := cloneReceipt(rc)
		stored.At = ms(rc.At)
		u.receipts[f.Settles[i].Hold.RequestID] = stored
		u.doneN++
		u.settled++
	}
	for j, fl := range fields {
		u.move(fl, p.Back[j])
	}
	if p.Closed {
		delete(u.holds, f.Lease.RequestID)
		u.held--
	} else {
		stored := cloneHold(p.Next)
		stored.At, stored.Expires = ms(stored.At), ms(stored.Expires)
		u.holds[f.Lease.RequestID] = stored
	}
	u.clearExact(f.Clear)
}

// sameHold reports whether a and b are the same hold as the MongoDB store
// packs it: its plan, amounts, input, times to the millisecond, owner, log
// id, model and key.
func sameHold(a, b billing.Hold) bool {
	return a.Plan.String() == b.Plan.String() && slices.Equal(a.Taken, b.Taken) && a.Input == b.Input &&
		a.At.UnixMilli() == b.At.UnixMilli() && a.Expires.UnixMilli() == b.Expires.UnixMilli() &&
		a.Owner == b.Owner && a.LogID == b.LogID && a.Model == b.Model && a.KeyID == b.KeyID
}

// settleCarved settles a hold served from a lease, under the lock: once,
// known by its receipt, or by its log row once the receipt is dropped
// (billing.ErrNoHold). The part of the cost within the hold leaves the
// lease, as far as the lease still has it; the rest of the cost is taken
// from the pool first field first, and what the pool cannot cover is the
// Shortfall. The lease's other carves and the hold count are not touched.
func (s *Store) settleCarved(req billing.SettleRequest) (billing.Receipt, bool, error) {
	h := req.Hold
	u := s.users[h.User]
	if u == nil {
		return billing.Receipt{}, false, billing.ErrUserNotFound
	}
	if rc, ok := u.receipts[h.RequestID]; ok {
		return cloneReceipt(rc), false, nil
	}
	if _, ok := s.logs[h.LogID]; ok {
		return billing.Receipt{}, false, billing.ErrNoHold
	}
	fields := h.Plan.Fields()
	fromLease := make([]billing.Nano, len(fields))
	if lease, ok := u.holds[h.Lease]; ok && lease.Plan.String() == h.Plan.String() {
		for j, k := range billing.SplitCost(h.Taken, req.Cost) {
			fromLease[j] = min(k, lease.Taken[j])
			lease.Taken[j] -= fromLease[j]
		}
		lease.Input = min(lease.Input, lease.Amount())
		u.holds[h.Lease] = lease
	}
	rc := billing.Receipt{RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: fromLease,
		Cost: req.Cost, By: req.By, At: s.now()}
	for _, n := range fromLease {
		rc.Charged += n
	}
	extra := u.takeFirstFirst(fields, req.Cost-rc.Charged)
	for j, f := range fields {
		u.move(f, -extra[j])
		rc.Taken[j] += extra[j]
		rc.Charged += extra[j]
		u.charged[f] += rc.Taken[j]
	}
	rc.Shortfall = req.Cost - rc.Charged
	stored := cloneReceipt(rc)
	stored.At = ms(rc.At)
	u.receipts[h.RequestID] = stored
	u.doneN++
	u.settled++
	return rc, true, nil
}

// Interface guard.
var _ billing.LeaseLedger = (*Store)(nil)
