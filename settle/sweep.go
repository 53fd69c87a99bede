package settle

import (
	"context"
	"errors"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// sweepLoop sends this process's heartbeat and resolves holds left by dead
// processes and receipts left without their log rows. Every instance runs
// it; resolving goes through the same conditional Settle, so two sweepers
// never resolve one hold twice.
func (st *Settler) sweepLoop() {
	defer st.loops.Done()
	lastSweep := time.Time{}
	for first := true; ; first = false {
		now := st.now()
		st.Heartbeat(now)
		if first {
			// Settle what a previous run of this instance journaled, then
			// resolve the holds that run left in flight: orphans now.
			st.RetryOnce(st.batchTimeout())
			st.SweepPredecessors(now)
		}
		if now.Sub(lastSweep) >= sweepInterval {
			lastSweep = now
			st.Sweep(now)
		}
		select {
		case <-st.stop:
			return
		case <-time.After(heartbeatEvery):
		}
	}
}

// Heartbeat records that this process is alive at now, so that the
// sweepers leave its holds alone.
func (st *Settler) Heartbeat(now time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), st.opTimeout)
	defer cancel()
	if err := st.store.Heartbeat(ctx, st.owner, now); err != nil {
		st.log().Warn("heartbeat failed", zap.Error(err))
	}
}

// Sweep resolves orphaned holds with the orphan policy and writes the log
// rows of receipts left without one; it also charges the open holds of a
// previous run that the first sweep could not (JournalHold).
func (st *Settler) Sweep(now time.Time) {
	st.chargeOpen()
	ctx, cancel := context.WithTimeout(context.Background(), 4*st.opTimeout)
	defer cancel()
	st.resolve(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-ownerTimeout), ReceiptAge: receiptAge})
}

// SweepPredecessors charges the requests earlier runs of this instance
// served from credit leases and left in flight (JournalHold), then
// resolves their holds (same Caddy instance id, so same Owner prefix): the
// journal's lock says none of them is alive. Holds whose settlement is still waiting in the
// journal are left to it. Without a journal it does nothing, since another
// process may then share the instance id.
func (st *Settler) SweepPredecessors(now time.Time) {
	if st.journalOf() == nil {
		return
	}
	st.chargeOpen()
	prefix, _, ok := strings.Cut(st.owner, "/")
	if !ok {
		return
	}
	prefix += "/"
	st.retryMu.Lock()
	pending := make(map[string]bool, len(st.retry))
	for _, s := range st.retry {
		pending[s.Hold.RequestID] = true
	}
	st.retryMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 4*st.opTimeout)
	defer cancel()
	st.resolve(ctx, billing.OrphanQuery{
		Now: now, OwnerDeadline: now.Add(-ownerTimeout), ReceiptAge: receiptAge,
		Dead: func(owner string) bool { return strings.HasPrefix(owner, prefix) && owner != st.owner },
		Skip: pending,
	})
}

// resolve settles the orphans the query finds with the orphan policy and
// writes the log rows of receipts left without one.
func (st *Settler) resolve(ctx context.Context, q billing.OrphanQuery) {
	orphans, err := st.store.Orphans(ctx, q)
	if err != nil {
		st.log().Warn("looking for orphaned holds failed", zap.Error(err))
		return
	}
	policy := *st.policy.Load()
	for _, o := range orphans {
		if q.Skip[o.Hold.RequestID] {
			continue
		}
		st.resolveOne(o, policy)
	}
}

// resolveOne settles one orphaned hold, or finishes one unlogged receipt:
// it writes the log row, then queues the receipt's drop. Each orphan has
// its own time: a lock left by a killed process can hold one user up to
// its lease. It reports false when the database failed: the next sweep
// tries again.
func (st *Settler) resolveOne(o billing.Orphan, policy billing.OrphanPolicy) bool {
	h, rc := o.Hold, o.Receipt
	if billing.IsLease(h.RequestID) {
		st.closeLease(h)
		return true
	}
	if rc != nil && rc.By == billing.SettledByRelease {
		// A hold its request gave back unbilled (the request failed): it
		// has no log row to write. Every other receipt has one, even at
		// zero cost: its request was served.
		st.clears.addExact(h.User, []string{h.RequestID}, st.now())
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*st.opTimeout)
	defer cancel()
	if rc == nil {
		r, ok, err := st.chargeOrphan(ctx, h, policy)
		if !ok {
			return err == nil
		}
		rc = &r
	}
	row := billing.OrphanRequestLog(h, *rc, policy)
	if err := st.store.InsertRequestLogs(ctx, []billing.RequestLog{row}); err != nil {
		st.log().Warn("writing the log row of a swept hold failed", zap.String("request_id", h.RequestID), zap.Error(err))
		return false
	}
	if o.Receipt != nil {
		st.log().Warn("wrote the missing log row of a settled request", zap.String("request_id", h.RequestID),
			zap.String("user", h.User), zap.String("charged", rc.Charged.String()))
	}
	// Dropped by the flusher, which retries until the database takes it.
	st.clears.addExact(h.User, []string{h.RequestID}, st.now())
	return true
}

// chargeOrphan settles an orphaned hold under the policy. ok is false
// when there is nothing more to do (the hold is gone, its own settlement
// got there first) or, with the error, when the database failed.
func (st *Settler) chargeOrphan(ctx context.Context, h billing.Hold, policy billing.OrphanPolicy) (billing.Receipt, bool, error) {
	r, applied, err := st.store.Settle(ctx, billing.SettleRequest{Hold: h, Cost: policy.Cost(h), By: billing.SettledBySweeper})
	switch {
	case errors.Is(err, billing.ErrNoHold):
		return r, false, nil
	case err != nil:
		st.log().Warn("resolving an orphaned hold failed", zap.String("request_id", h.RequestID), zap.Error(err))
		return r, false, err
	case r.By != billing.SettledBySweeper:
		return r, false, nil
	}
	if applied {
		st.obs.Swept(h, r.Charged)
		st.log().Warn("resolved an orphaned hold", zap.String("request_id", h.RequestID), zap.String("user", h.User),
			zap.String("owner", h.Owner), zap.Time("held_at", h.At), zap.String("policy", string(policy)),
			zap.String("hold", h.Amount().String()), zap.String("charged", r.Charged.String()))
	}
	return r, true, nil
}

// closeLease gives back what the credit lease of a dead (or stalled past
// the lease's expiry) instance holds. The requests it served were charged
// by its flushes; those it settled but did not flush, and those in flight
// when it died (open holds), are in its journal, and its next run charges
// them from the pool, each once. A lease that
// changed since it was read is left to the next sweep.
func (st *Settler) closeLease(h billing.Hold) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*st.opTimeout)
	defer cancel()
	_, _, err := st.store.FlushLease(ctx, billing.LeaseFlush{Lease: h, Close: true})
	if err != nil {
		if !errors.Is(err, billing.ErrLeaseMoved) {
			st.log().Warn("closing an orphaned credit lease failed", zap.String("lease", h.RequestID), zap.Error(err))
		}
		return
	}
	st.log().Warn("closed the credit lease of a dead instance", zap.String("lease", h.RequestID), zap.String("user", h.User),
		zap.String("owner", h.Owner), zap.String("returned", h.Amount().String()))
}
