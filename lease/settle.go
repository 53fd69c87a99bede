package lease

import (
	"context"
	"errors"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Settle charges a hold. A hold carved from a lease this Ledger writes
// goes with that lease's writes; any other (a hold of its own, a hold
// carved from a lease of an earlier run or one the sweeper closed) goes to
// the store, which settles carved holds too.
func (l *Ledger) Settle(ctx context.Context, req billing.SettleRequest) (billing.Receipt, bool, error) {
	ls, ok := l.own(&req)
	if !ok {
		return l.LeaseLedger.Settle(ctx, req)
	}
	if rc, ok := l.settled(ls, req.Hold.RequestID); ok {
		return rc, true, nil
	}
	if req.Cost > req.Hold.Amount() && !l.grow(ls, &req) {
		return l.settleAbove(ctx, ls, req)
	}
	rcs, err := l.flush(ctx, ls, []billing.SettleRequest{req}, false)
	if errors.Is(err, billing.ErrLeaseMoved) || errors.Is(err, billing.ErrNotAllHeld) {
		return l.LeaseLedger.Settle(ctx, req)
	}
	if err != nil {
		return billing.Receipt{}, false, err
	}
	return rcs[0], true, nil
}

// settleAbove settles a carved hold whose cost is above what the hold and
// the lease's free part hold, through the store: the hold's part from the
// lease, the rest from the pool.
func (l *Ledger) settleAbove(ctx context.Context, ls *lease, req billing.SettleRequest) (billing.Receipt, bool, error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if err := l.resend(ctx, ls); err != nil {
		return billing.Receipt{}, false, err
	}
	if rc, ok := ls.done[req.Hold.RequestID]; ok {
		return rc, true, nil
	}
	l.mu.Lock()
	gone := ls.gone
	l.mu.Unlock()
	if gone {
		return l.LeaseLedger.Settle(ctx, req)
	}
	rcs, err := l.send(ctx, ls, &pendingOp{settle: &req})
	if err != nil {
		return billing.Receipt{}, false, err
	}
	return rcs[0], true, nil
}

// SettleMany settles holds of their own in one store call and the holds
// carved from each lease in one write per lease. When one write fails it
// returns its error: the caller settles each request with Settle, which
// recognises what was settled.
func (l *Ledger) SettleMany(ctx context.Context, reqs []billing.SettleRequest) ([]billing.Receipt, error) {
	out := make([]billing.Receipt, len(reqs))
	var plain []int
	var order []*lease
	byLease := map[*lease][]int{}
	for i := range reqs {
		if reqs[i].Hold.Lease == "" {
			plain = append(plain, i)
			continue
		}
		ls, ok := l.own(&reqs[i])
		if !ok || reqs[i].Cost > reqs[i].Hold.Amount() {
			return nil, billing.ErrNotAllHeld // settled one by one
		}
		if byLease[ls] == nil {
			order = append(order, ls)
		}
		byLease[ls] = append(byLease[ls], i)
	}
	if err := l.settlePlain(ctx, reqs, plain, out); err != nil {
		return nil, err
	}
	for _, ls := range order {
		idx := byLease[ls]
		batch := make([]billing.SettleRequest, len(idx))
		for j, i := range idx {
			batch[j] = reqs[i]
		}
		rcs, err := l.flush(ctx, ls, batch, false)
		if err != nil {
			return nil, err
		}
		for j, i := range idx {
			out[i] = rcs[j]
		}
	}
	return out, nil
}

func (l *Ledger) settlePlain(ctx context.Context, reqs []billing.SettleRequest, idx []int, out []billing.Receipt) error {
	if len(idx) == 0 {
		return nil
	}
	batch := make([]billing.SettleRequest, len(idx))
	for j, i := range idx {
		batch[j] = reqs[i]
	}
	rcs, err := l.LeaseLedger.SettleMany(ctx, batch)
	if err != nil {
		return err
	}
	for j, i := range idx {
		out[i] = rcs[j]
	}
	return nil
}

// own finds the lease this Ledger writes that req's hold was carved from,
// and sets req's hold to what the lease's books say it took (a hold grown
// by an earlier try). ok is false when there is none, or the lease is
// gone: the store then settles the hold.
func (l *Ledger) own(req *billing.SettleRequest) (*lease, bool) {
	h := req.Hold
	if h.Lease == "" {
		return nil, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.users[key(h.User, h.Plan)]
	if u == nil {
		return nil, false
	}
	for _, ls := range u.leases() {
		if ls.id != h.Lease {
			continue
		}
		if _, settled := ls.done[h.RequestID]; settled {
			return ls, true // its receipt is in the books
		}
		taken, ok := ls.carved[h.RequestID]
		if !ok || ls.gone {
			delete(ls.carved, h.RequestID)
			return nil, false
		}
		req.Hold.Taken = append([]billing.Nano(nil), taken...)
		return ls, true
	}
	return nil, false
}

// grow carves what a hold's cost needs beyond the hold from the lease's
// free part, and reports whether it could. A retired lease's free part is
// on its way back to the pool (a write that may be pending): it is never
// carved again.
func (l *Ledger) grow(ls *lease, req *billing.SettleRequest) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ls.gone || ls.retired {
		return false
	}
	taken, held := ls.carved[req.Hold.RequestID]
	extra, ok := billing.Carve(ls.free, req.Cost-req.Hold.Amount())
	if !ok || !held {
		return false
	}
	for i, e := range extra {
		ls.free[i] -= e
		taken[i] += e
	}
	req.Hold.Taken = append([]billing.Nano(nil), taken...)
	return true
}

// settled returns the receipt of a hold of ls that a write charged before.
func (l *Ledger) settled(ls *lease, requestID string) (billing.Receipt, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	rc, ok := ls.done[requestID]
	return rc, ok
}
