package ledgertest

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Heartbeat records that owner is alive at the given time.
func (s *Store) Heartbeat(ctx context.Context, owner string, at time.Time) error {
	f, err := s.enter(ctx, OpHeartbeat)
	if err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	defer s.mu.Unlock()
	s.see(at)
	s.instances[owner] = ms(at)
	if f == FailAfter {
		return fmt.Errorf("heartbeat: %w", &FaultError{Op: OpHeartbeat, Fault: f})
	}
	return nil
}

// Orphans returns, as the MongoDB store does, the holds whose lease ended
// before q.Now, whose owner q.Dead names, or which were taken before
// q.OwnerDeadline by an owner without a heartbeat since; and the receipts
// at least q.ReceiptAge old. Like the MongoDB store it looks only at the
// users whose hold or receipt count is above zero, and it does not apply
// q.Skip: the caller does. The result is ordered by user, then holds
// before receipts, each by request id.
func (s *Store) Orphans(ctx context.Context, q billing.OrphanQuery) ([]billing.Orphan, error) {
	f, err := s.enter(ctx, OpOrphans)
	if err != nil {
		return nil, fmt.Errorf("finding holds: %w", err)
	}
	defer s.mu.Unlock()
	s.see(q.Now)
	if f == FailAfter {
		return nil, fmt.Errorf("finding holds: %w", &FaultError{Op: OpOrphans, Fault: f})
	}
	deadline := ms(q.OwnerDeadline) // a query value is kept to the millisecond
	var out []billing.Orphan
	for _, id := range sortedKeys(s.users) {
		u := s.users[id]
		if u.held <= 0 && u.doneN <= 0 {
			continue
		}
		for _, rid := range sortedKeys(u.holds) {
			h := cloneHold(u.holds[rid])
			seen, ok := s.instances[h.Owner]
			alive := ok && !seen.Before(deadline)
			dead := q.Dead != nil && q.Dead(h.Owner)
			if !dead && (alive || !h.At.Before(q.OwnerDeadline)) && !h.Expires.Before(q.Now) {
				continue
			}
			out = append(out, billing.Orphan{Hold: h})
		}
		for _, rid := range sortedKeys(u.receipts) {
			rc := cloneReceipt(u.receipts[rid])
			if q.Now.Sub(rc.At) < q.ReceiptAge {
				continue
			}
			h := billing.Hold{RequestID: rid, User: id, LogID: rc.LogID, At: rc.At}
			if p, err := billing.ParseCreditPlan(rc.Fields); err == nil {
				h.Plan = p
			}
			out = append(out, billing.Orphan{Hold: h, Receipt: &rc})
		}
	}
	return out, nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
