package ledgertest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Reserve takes a hold, as the MongoDB store does: Want, or what the pool
// has when that is less, first field first, never driving a field below
// zero; the same request id again returns the hold taken before (and drops
// req.Clear exactly). A pool that is empty or below req.Min gives an
// *billing.InsufficientError, a missing user billing.ErrUserNotFound, a
// request settled before whose receipt is kept billing.ErrNoHold. The
// receipts named by req.Clear are dropped with a new hold, exactly (only
// those that still exist are counted out); a Clear that names a receipt twice fails with a write error, as the
// MongoDB store's update does (whenever it sends one: always when Want is
// at least Min, otherwise when a new hold is to be taken).
func (s *Store) Reserve(ctx context.Context, req billing.HoldRequest) (billing.Hold, error) {
	if err := validRequestID(req.RequestID); err != nil {
		return billing.Hold{}, err
	}
	if req.Plan.IsZero() {
		return billing.Hold{}, errNoPlan
	}
	if err := billing.CheckClear(req.Clear); err != nil {
		return billing.Hold{}, fmt.Errorf("taking a hold: %w", err)
	}
	f, err := s.enter(ctx, OpReserve)
	if err != nil {
		return billing.Hold{}, fmt.Errorf("taking a hold: %w", err)
	}
	defer s.mu.Unlock()
	s.see(req.At)
	h, err := s.reserve(req)
	if f == FailAfter {
		return billing.Hold{}, fmt.Errorf("taking a hold: %w", &FaultError{Op: OpReserve, Fault: f})
	}
	return h, err
}

// reserve is Reserve under the lock.
func (s *Store) reserve(req billing.HoldRequest) (billing.Hold, error) {
	if req.Want >= req.Min {
		// The MongoDB store tries one update first, which the database
		// refuses whatever the document holds.
		if err := clearConflict(req.Clear); err != nil {
			return billing.Hold{}, err
		}
	}
	u := s.users[req.User]
	if u == nil {
		return billing.Hold{}, billing.ErrUserNotFound
	}
	if held, ok := u.holds[req.RequestID]; ok {
		u.clearExact(req.Clear)
		return cloneHold(held), nil
	}
	if _, ok := u.receipts[req.RequestID]; ok {
		return billing.Hold{}, billing.ErrNoHold // held and settled before
	}
	fields := req.Plan.Fields()
	avail := u.pool(fields)
	if avail <= 0 || avail < req.Min {
		return billing.Hold{}, &billing.InsufficientError{Balance: avail, Need: req.Min}
	}
	if err := clearConflict(req.Clear); err != nil {
		return billing.Hold{}, err
	}
	taken := u.takeFirstFirst(fields, max(min(req.Want, avail), 0))
	for i, f := range fields {
		u.move(f, -taken[i])
	}
	h := billing.Hold{
		RequestID: req.RequestID, User: req.User, Plan: req.Plan, Taken: taken,
		Owner: req.Owner, At: req.At, Expires: req.Expires, LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
	}
	h.Input = min(req.Input, h.Amount())
	stored := cloneHold(h)
	stored.At, stored.Expires = ms(h.At), ms(h.Expires)
	u.holds[req.RequestID] = stored
	u.held++
	u.clearExact(req.Clear)
	return h, nil
}

// clearConflict is the write error the database gives for an update that
// drops the receipts ids when one is named twice: it would $unset the
// same path twice.
func clearConflict(ids []string) error {
	seen := make(map[string]bool, len(ids))
	for _, id := range ids {
		if seen[id] {
			return fmt.Errorf("taking a hold: write exception: updating the path 'llmDone.%s' would create a conflict", id)
		}
		seen[id] = true
	}
	return nil
}

// Settle releases the hold and charges the cost, as the MongoDB store
// does: the unused part of req.Hold goes back, a cost above it is taken
// from the pool first field first and what the pool cannot cover is the
// Shortfall; the receipt is left in the same step. A hold settled before
// (by anyone) gives its receipt and applied false; a hold whose receipt is
// gone too gives billing.ErrNoHold. The amounts are those of req.Hold, not
// of the stored hold, as in the MongoDB store. A hold served from a lease
// is settled as billing.LeaseLedger says (see settleCarved); a lease
// itself is refused (billing.ErrCarvedLease).
func (s *Store) Settle(ctx context.Context, req billing.SettleRequest) (billing.Receipt, bool, error) {
	h := req.Hold
	if err := validRequestID(h.RequestID); err != nil {
		return billing.Receipt{}, false, err
	}
	if billing.IsLease(h.RequestID) {
		return billing.Receipt{}, false, fmt.Errorf("settling %s: %w", h.RequestID, billing.ErrCarvedLease)
	}
	if h.Lease != "" {
		if err := validRequestID(h.Lease); err != nil {
			return billing.Receipt{}, false, err
		}
	}
	if h.Plan.IsZero() || len(h.Taken) != len(h.Plan.Fields()) {
		return billing.Receipt{}, false, errors.New("settling a hold without its credit plan")
	}
	if req.Cost < 0 {
		return billing.Receipt{}, false, errors.New("settling a negative cost")
	}
	f, err := s.enter(ctx, OpSettle)
	if err != nil {
		return billing.Receipt{}, false, fmt.Errorf("settling a hold: %w", err)
	}
	defer s.mu.Unlock()
	rc, applied, err := s.settle(req)
	if f == FailAfter {
		return billing.Receipt{}, false, fmt.Errorf("settling a hold: %w", &FaultError{Op: OpSettle, Fault: f})
	}
	return rc, applied, err
}

// settle is Settle under the lock.
func (s *Store) settle(req billing.SettleRequest) (billing.Receipt, bool, error) {
	h := req.Hold
	if h.Lease != "" {
		return s.settleCarved(req)
	}
	u := s.users[h.User]
	if u == nil {
		return billing.Receipt{}, false, billing.ErrUserNotFound
	}
	if _, ok := u.holds[h.RequestID]; !ok {
		if rc, ok := u.receipts[h.RequestID]; ok {
			return cloneReceipt(rc), false, nil
		}
		return billing.Receipt{}, false, billing.ErrNoHold
	}
	fields := h.Plan.Fields()
	within := min(req.Cost, h.Amount())
	keep := split(h.Taken, within)
	extra := u.takeFirstFirst(fields, req.Cost-within)
	rc := billing.Receipt{
		RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: make([]billing.Nano, len(fields)),
		Cost: req.Cost, Charged: within, Shortfall: req.Cost - within, By: req.By, At: s.now(),
	}
	for i, f := range fields {
		rc.Taken[i] = keep[i] + extra[i]
		rc.Charged += extra[i]
		rc.Shortfall -= extra[i]
		u.move(f, h.Taken[i]-keep[i]-extra[i])
	}
	u.settle(h.RequestID, rc)
	return rc, true, nil
}

// split spreads amount over the hold's fields, first field first.
func split(taken []billing.Nano, amount billing.Nano) []billing.Nano {
	keep := make([]billing.Nano, len(taken))
	for i, t := range taken {
		keep[i] = min(amount, t)
		amount -= keep[i]
	}
	return keep
}

// settle drops the hold and leaves the receipt, counting what it charged.
func (u *user) settle(rid string, rc billing.Receipt) {
	for i, f := range rc.Fields {
		u.charged[f] += rc.Taken[i]
	}
	stored := cloneReceipt(rc)
	stored.At = ms(rc.At)
	delete(u.holds, rid)
	u.receipts[rid] = stored
	u.held--
	u.doneN++
	u.settled++
}

// SettleMany settles several holds, each with a cost within its hold, as
// the MongoDB store does: the holds of one user and plan all or none of
// them, each such group on its own. It returns billing.ErrNotAllHeld when
// a group was not settled because one of its holds (or its user) is gone;
// the other groups are settled then. A request it cannot take (an invalid
// id, a cost outside its hold, a lease or a hold served from one: see
// billing.ErrCarvedLease) fails the whole call before anything.
func (s *Store) SettleMany(ctx context.Context, reqs []billing.SettleRequest) ([]billing.Receipt, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	groups, err := groupSettlements(reqs)
	if err != nil {
		return nil, err
	}
	f, err := s.enter(ctx, OpSettleMany)
	if err != nil {
		return nil, fmt.Errorf("settling holds: %w", err)
	}
	defer s.mu.Unlock()
	out := make([]billing.Receipt, len(reqs))
	now := s.now()
	all := true
	for _, g := range groups {
		all = s.settleGroup(reqs, g, out, now) && all
	}
	switch {
	case f == FailAfter:
		return nil, fmt.Errorf("settling holds: %w", &FaultError{Op: OpSettleMany, Fault: f})
	case !all:
		return nil, billing.ErrNotAllHeld
	}
	return out, nil
}

// groupSettlements checks reqs and groups their indexes by user and plan,
// in the order each group first appears.
func groupSettlements(reqs []billing.SettleRequest) ([][]int, error) {
	var groups [][]int
	byKey := map[string]int{}
	ids := map[string]bool{}
	for i, req := range reqs {
		h := req.Hold
		if err := validRequestID(h.RequestID); err != nil {
			return nil, err
		}
		if h.Lease != "" || billing.IsLease(h.RequestID) {
			return nil, fmt.Errorf("settling %s in a batch: %w", h.RequestID, billing.ErrCarvedLease)
		}
		if h.Plan.IsZero() || len(h.Taken) != len(h.Plan.Fields()) || req.Cost < 0 || req.Cost > h.Amount() {
			return nil, errors.New("settling a hold without its credit plan, or with a cost above the hold, in a batch")
		}
		k := h.User + "\x00" + h.Plan.String()
		if ids[k+"\x00"+h.RequestID] {
			return nil, fmt.Errorf("settling holds: request %q twice in a batch", h.RequestID)
		}
		ids[k+"\x00"+h.RequestID] = true
		gi, ok := byKey[k]
		if !ok {
			gi = len(groups)
			byKey[k] = gi
			groups = append(groups, nil)
		}
		groups[gi] = append(groups[gi], i)
	}
	return groups, nil
}

// settleGroup settles reqs[idx...], holds of one user and plan, if every
// one is still held, filling their receipts in out; it reports whether it
// did.
func (s *Store) settleGroup(reqs []billing.SettleRequest, idx []int, out []billing.Receipt, now time.Time) bool {
	u := s.users[reqs[idx[0]].Hold.User]
	if u == nil {
		return false
	}
	for _, i := range idx {
		if _, ok := u.holds[reqs[i].Hold.RequestID]; !ok {
			return false
		}
	}
	for _, i := range idx {
		req := reqs[i]
		h := req.Hold
		fields := h.Plan.Fields()
		keep := split(h.Taken, req.Cost)
		for j, f := range fields {
			u.move(f, h.Taken[j]-keep[j])
		}
		out[i] = billing.Receipt{RequestID: h.RequestID, LogID: h.LogID, Fields: fields, Taken: keep,
			Cost: req.Cost, Charged: req.Cost, By: req.By, At: now}
		u.settle(h.RequestID, out[i])
	}
	return true
}

// ClearReceipts drops the named receipts that still exist; see
// billing.Ledger. A missing user or receipt is not an error.
func (s *Store) ClearReceipts(ctx context.Context, id string, requestIDs []string) error {
	if len(requestIDs) == 0 {
		return nil
	}
	f, err := s.enter(ctx, OpClearReceipts)
	if err != nil {
		return fmt.Errorf("clearing receipts: %w", err)
	}
	defer s.mu.Unlock()
	if u := s.users[id]; u != nil {
		u.clearExact(requestIDs)
	}
	if f == FailAfter {
		return fmt.Errorf("clearing receipts: %w", &FaultError{Op: OpClearReceipts, Fault: f})
	}
	return nil
}

// Interface guards.
var (
	_ billing.Ledger   = (*Store)(nil)
	_ billing.Sweeper  = (*Store)(nil)
	_ billing.Recorder = (*Store)(nil)
)
