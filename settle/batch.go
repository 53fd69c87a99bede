package settle

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// batchRun is one pass over a batch: what each settlement led to.
type batchRun struct {
	st *Settler
	// down is the database error that stopped the batch: the settlements
	// after it wait for the retry.
	down     error
	logs     []billing.RequestLog
	logged   []*Settlement
	receipts map[string][]string // user → receipts whose log rows need no write
	counters []billing.UsageCounters
	done     []*Settlement
	// friends are settled settlements whose friend holds settle together
	// before their log rows are written.
	friends []friendDue
}

// friendDue is a settlement whose hold is settled (rc) and whose friend
// hold is not yet.
type friendDue struct {
	s  *Settlement
	rc billing.Receipt
}

// SettleBatch settles the holds (one command for the batch, or one
// conditional update each), then writes the batch's log rows in one
// insert, queues the receipts' drop and the counters, and marks the
// journal in one write. A settlement the database refused is kept for
// retry; nothing is dropped.
func (st *Settler) SettleBatch(batch []*Settlement) {
	ctx, cancel := context.WithTimeout(context.Background(), st.batchTimeout())
	defer cancel()
	st.settleBatch(ctx, batch)
}

func (st *Settler) settleBatch(ctx context.Context, batch []*Settlement) {
	b := &batchRun{st: st, receipts: map[string][]string{}}
	b.down = st.findHolds(ctx, batch)
	var merged map[*Settlement]billing.Receipt
	if b.down == nil {
		merged = st.settleMerged(ctx, batch)
	}
	for _, s := range batch {
		b.settle(ctx, s, merged)
	}
	b.settleFriends(ctx)
	b.writeLogs(ctx)
	b.finish()
}

// settle resolves one settlement's hold and sorts it: logged, done, or
// failed.
func (b *batchRun) settle(ctx context.Context, s *Settlement, merged map[*Settlement]billing.Receipt) {
	st := b.st
	if b.down != nil {
		st.failed(s, b.down)
		return
	}
	if s.Unknown {
		// There was no hold, nor credit to take one: nothing to give back.
		b.done = append(b.done, s)
		return
	}
	rc, applied, err := st.receipt(ctx, s, merged)
	switch {
	case errors.Is(err, billing.ErrNoHold):
		// Settled and logged before (a replay): nothing left to do but a
		// friend hold, which the settlement settles first.
		st.settleFriendOrWarn(ctx, s, billing.Receipt{})
		b.done = append(b.done, s)
		return
	case err != nil:
		b.fail(s, err)
		return
	case rc.By == billing.SettledBySweeper:
		// The sweeper resolved the hold first (this process was presumed
		// dead): its charge and its log row stand.
		s.Logger.Warn("hold was resolved by the sweeper before its settlement",
			zap.String("request_id", s.Hold.RequestID), zap.String("charged", rc.Charged.String()))
		st.settleFriendOrWarn(ctx, s, rc)
		b.done = append(b.done, s)
		return
	}
	if applied && s.Bill {
		b.counters = append(b.counters, s.Counters)
	}
	if s.Hold.Friend != nil && st.friends != nil {
		b.friends = append(b.friends, friendDue{s: s, rc: rc})
		return
	}
	b.settled(s, rc)
}

// settleFriends settles the friend holds of the batch's settled
// settlements in one call, before their log rows: a retry, which finds
// the receipt, settles the friend hold again (once), and only then writes
// the row and drops the receipt.
func (b *batchRun) settleFriends(ctx context.Context) {
	if len(b.friends) == 0 {
		return
	}
	st := b.st
	sts := make([]billing.FriendSettlement, len(b.friends))
	for i, fd := range b.friends {
		sts[i] = friendSettlement(fd.s, fd.rc, st.now())
	}
	opCtx, cancel := context.WithTimeout(ctx, st.opTimeout)
	t0 := time.Now()
	err := st.friends.SettleFriends(opCtx, sts)
	st.obs.DBWait(OpSettle, time.Since(t0))
	cancel()
	for _, fd := range b.friends {
		if err != nil {
			b.fail(fd.s, err)
		} else {
			b.settled(fd.s, fd.rc)
		}
	}
}

// settled sorts a settlement whose holds are settled: a release is done,
// a billed request waits for its log row.
func (b *batchRun) settled(s *Settlement, rc billing.Receipt) {
	if !s.Bill {
		// A release: no log row, its receipt can go.
		b.receipts[s.Hold.User] = append(b.receipts[s.Hold.User], s.Hold.RequestID)
		b.done = append(b.done, s)
		return
	}
	s.Log.Settled(rc)
	b.logs = append(b.logs, s.Log)
	b.logged = append(b.logged, s)
}

// fail keeps s for the retry and stops the rest of the batch.
func (b *batchRun) fail(s *Settlement, err error) {
	b.down = err
	b.st.failed(s, err)
}

// receipt is s's receipt: from the merged settlement, or from a Settle of
// its own.
func (st *Settler) receipt(ctx context.Context, s *Settlement, merged map[*Settlement]billing.Receipt) (billing.Receipt, bool, error) {
	if rc, ok := merged[s]; ok {
		return rc, true, nil
	}
	opCtx, cancel := context.WithTimeout(ctx, st.opTimeout)
	defer cancel()
	t0 := time.Now()
	rc, applied, err := st.ledger.Settle(opCtx, s.request())
	st.obs.DBWait(OpSettle, time.Since(t0))
	return rc, applied, err
}

// writeLogs inserts the batch's log rows in one write. When it fails the
// receipts stay: the retry finds them and writes the rows.
func (b *batchRun) writeLogs(ctx context.Context) {
	if len(b.logs) == 0 {
		return
	}
	t0 := time.Now()
	err := b.st.store.InsertRequestLogs(ctx, b.logs)
	b.st.obs.DBWait(OpRequestLogs, time.Since(t0))
	if err != nil {
		for _, s := range b.logged {
			b.st.failed(s, err)
		}
		b.logged = nil
	}
}

// finish queues the receipts' drop and the usage counters, counts and
// logs the billed requests, and marks the done settlements in the journal.
func (b *batchRun) finish() {
	st := b.st
	for _, s := range b.logged {
		b.receipts[s.Hold.User] = append(b.receipts[s.Hold.User], s.Hold.RequestID)
	}
	// The receipts go with the user's next hold (no write of their own),
	// or after clearDelay when none comes.
	now := st.now()
	for user, ids := range b.receipts {
		st.clears.add(user, ids, now)
	}
	if len(b.counters) > 0 {
		st.addUsage(b.counters)
	}
	for _, s := range b.logged {
		st.obs.Billed(s)
		s.logBilled()
		b.done = append(b.done, s)
	}
	st.markDone(b.done)
}

// markDone marks finished settlements in the journal in one write, tells
// the Observer, and wakes the holds waiting for them.
func (st *Settler) markDone(done []*Settlement) {
	if j := st.journalOf(); j != nil {
		ids := make([]string, 0, len(done))
		for _, s := range done {
			ids = append(ids, journalIDs(s)...)
		}
		if err := j.DoneAll(ids); err != nil {
			// Replayed at the next start, and recognised as settled.
			st.log().Warn("marking settlements done in the spool failed", zap.Int("count", len(ids)), zap.Error(err))
		}
	}
	for _, s := range done {
		if s.Counted {
			s.Counted = false
			st.obs.Finished(s)
		}
	}
	st.waiting.done(done)
}

// findHolds turns the batch's Unknown releases into plain ones (findHold);
// it returns the database error that stopped it, if any.
func (st *Settler) findHolds(ctx context.Context, batch []*Settlement) error {
	for _, s := range batch {
		if s.Unknown {
			if err := st.findHold(ctx, s); err != nil {
				return err
			}
		}
	}
	return nil
}

// findHold turns an Unknown release into a plain one. Reserve is idempotent
// by request id, so asking again, for a zero hold, returns the hold the
// unanswered request took, or takes an empty one; the release then gives
// back exactly what was taken. When there is no hold and no credit to hold
// (or no user), or the hold was settled already (the sweeper resolved it),
// the release stays Unknown: there is nothing to give back.
// An error means the database is still away: the release waits for the
// retry like any other settlement.
func (st *Settler) findHold(ctx context.Context, s *Settlement) error {
	h := s.Hold
	opCtx, cancel := context.WithTimeout(ctx, st.opTimeout)
	defer cancel()
	held, err := st.store.Reserve(opCtx, billing.HoldRequest{
		RequestID: h.RequestID, User: h.User, Plan: h.Plan, Owner: h.Owner, At: h.At, Expires: h.Expires,
		LogID: h.LogID, Model: h.Model, KeyID: h.KeyID,
	})
	var ie *billing.InsufficientError
	switch {
	case err == nil:
		s.Hold, s.Unknown = held, false
	case errors.As(err, &ie), errors.Is(err, billing.ErrUserNotFound), errors.Is(err, billing.ErrNoHold):
	default:
		return err
	}
	return nil
}

// settleMerged settles the settlements of a batch whose cost is within
// their hold with one SettleMany: one conditional write per user and plan
// (under load the queue holds several per user), all sent to the database
// in one command. What it cannot settle this way is left out of the result
// and settled one by one, which recognises what SettleMany did settle.
func (st *Settler) settleMerged(ctx context.Context, batch []*Settlement) map[*Settlement]billing.Receipt {
	var (
		group []*Settlement
		reqs  []billing.SettleRequest
	)
	for _, s := range batch {
		if s.Unknown || s.failures > 0 || s.Cost > s.Hold.Amount() {
			continue // no hold to settle; a retry may be half done; costs above the hold need the pool
		}
		group = append(group, s)
		reqs = append(reqs, s.request())
	}
	if len(group) < 2 {
		return nil // Settle costs the same and says more
	}
	opCtx, cancel := context.WithTimeout(ctx, st.opTimeout)
	t0 := time.Now()
	rcs, err := st.ledger.SettleMany(opCtx, reqs)
	st.obs.DBWait(OpSettle, time.Since(t0))
	cancel()
	if err != nil {
		return nil // one by one, which handles every case
	}
	out := make(map[*Settlement]billing.Receipt, len(group))
	for i, s := range group {
		out[s] = rcs[i]
	}
	return out
}

// settleFriend replaces the settlement's friend hold, if any, by what the
// owner was charged (rc.Charged: never more than the owner paid). It is
// idempotent, so a settlement retried or replayed counts once.
func (st *Settler) settleFriend(ctx context.Context, s *Settlement, rc billing.Receipt) error {
	fh := s.Hold.Friend
	if fh == nil || st.friends == nil {
		return nil
	}
	opCtx, cancel := context.WithTimeout(ctx, st.opTimeout)
	defer cancel()
	t0 := time.Now()
	err := st.friends.SettleFriend(opCtx, friendSettlement(s, rc, st.now()))
	st.obs.DBWait(OpSettle, time.Since(t0))
	return err
}

// friendSettlement replaces s's friend hold by what the owner was charged
// (rc.Charged: never more than the owner paid).
func friendSettlement(s *Settlement, rc billing.Receipt, now time.Time) billing.FriendSettlement {
	return billing.FriendSettlement{Hold: *s.Hold.Friend, Charged: rc.Charged, Billed: s.Bill || rc.Charged > 0, At: now}
}

// settleFriendOrWarn settles the friend hold of a settlement that is done
// otherwise; a failure leaves the hold to expire.
func (st *Settler) settleFriendOrWarn(ctx context.Context, s *Settlement, rc billing.Receipt) {
	if err := st.settleFriend(ctx, s, rc); err != nil {
		s.Logger.Warn("settling a friend key hold failed; it expires on its own", zap.String("request_id", s.Hold.RequestID), zap.Error(err))
	}
}
