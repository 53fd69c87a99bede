package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/spool"
)

// settlement is the work left after a response: settle the hold (charge the
// cost, give back the rest), write the request log, add the usage
// counters. It is journaled in the spool before it is queued, so that it
// survives the process and is replayed until the database has it.
type settlement struct {
	Hold     billing.Hold  `json:"hold"`
	Cost     billing.Nano  `json:"cost"`
	Usage    billing.Usage `json:"usage"`
	Weighted int64         `json:"weighted"`
	Bill     bool          `json:"bill"` // false: a release (no answer was billed), no log row
	// Unknown: a release whose hold was asked for and never answered (the
	// database went away meanwhile), so Hold has no amounts and the hold
	// may or may not exist; settleBatch looks it up first (findHold).
	Unknown  bool                  `json:"unknown,omitempty"`
	Log      billing.RequestLog    `json:"log"`
	Counters billing.UsageCounters `json:"counters"`
	Site     string                `json:"site"`

	logger   *zap.Logger
	held     bool // counted in holds_outstanding until done
	journal  bool // appended to the spool
	queued   bool // counted in the engine's waiting settlements
	failures int
}

const (
	settleBatch      = 256
	settleLinger     = 50 * time.Millisecond
	retryMin         = 500 * time.Millisecond
	retryMax         = 15 * time.Second
	sweepInterval    = 15 * time.Second
	heartbeatEvery   = 10 * time.Second
	ownerTimeout     = 45 * time.Second
	receiptAge       = 10 * time.Minute
	defaultHoldLease = 15 * time.Minute
)

// submit journals a settlement and queues it. When the queue is full the
// caller settles it itself: back-pressure instead of a dropped charge.
func (e *engine) submit(s *settlement) {
	if sp := e.spool.Load(); sp != nil {
		if b, err := json.Marshal(s); err != nil {
			e.log().Error("encoding a settlement for the spool failed", zap.String("request_id", s.Hold.RequestID), zap.Error(err))
		} else if err := sp.Append(s.Hold.RequestID, b); err != nil {
			// Not journaled: it is still settled from memory, and the hold
			// in the database is the backstop (the sweeper).
			e.log().Error("journaling a settlement failed", zap.String("request_id", s.Hold.RequestID), zap.Error(err))
		} else {
			s.journal = true
		}
	}
	e.waiting.add(s)
	e.mu.RLock()
	if !e.closed {
		select {
		case e.jobs <- s:
			e.mu.RUnlock()
			return
		default:
		}
	}
	e.mu.RUnlock()
	e.settleBatch([]*settlement{s})
}

// collectLoop gathers queued settlements into batches: what arrives within
// settleLinger of the first, up to settleBatch. A batch costs one insert of
// log rows and one command with a balance write per user and plan (usage
// counters go every half second), so at any load a larger batch means fewer
// writes per request; the linger only delays work that is already off the
// request path.
func (e *engine) collectLoop() {
	defer e.workers.Done()
	defer close(e.batches)
	for s := range e.jobs {
		batch := make([]*settlement, 1, settleBatch)
		batch[0] = s
		t := time.NewTimer(settleLinger)
	fill:
		for len(batch) < settleBatch {
			select {
			case s, ok := <-e.jobs:
				if !ok {
					break fill
				}
				batch = append(batch, s)
			case <-t.C:
				break fill
			case <-e.hurry:
				break fill // a hold waits for this user's settlements
			}
		}
		t.Stop()
		e.batches <- batch
	}
}

// settleLoop settles the batches collectLoop makes.
func (e *engine) settleLoop() {
	defer e.workers.Done()
	for b := range e.batches {
		e.settleBatch(b)
	}
}

// settleBatch settles the holds (one command for the batch, or one
// conditional update each), then writes the batch's log rows in one insert,
// queues the receipts' drop and the counters, and marks the journal in one
// write. A settlement the database refused is
// kept for retry; nothing is dropped.
func (e *engine) settleBatch(batch []*settlement) {
	ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
	defer cancel()
	e.settleBatchCtx(ctx, batch)
}

func (e *engine) settleBatchCtx(ctx context.Context, batch []*settlement) {
	var (
		down     error // the database failed: the rest of the batch waits for the retry
		logs     []billing.RequestLog
		logged   []*settlement
		receipts = map[string][]string{}
		counters []billing.UsageCounters
		done     []*settlement
	)
	for _, s := range batch {
		if s.Unknown && down == nil {
			down = e.findHold(ctx, s)
		}
	}
	var merged map[*settlement]billing.Receipt
	if down == nil {
		merged = e.settleMerged(ctx, batch)
	}
	for _, s := range batch {
		if down != nil {
			e.failed(s, down)
			continue
		}
		if s.Unknown {
			// There was no hold, nor credit to take one: nothing to give back.
			done = append(done, s)
			continue
		}
		var (
			rc      billing.Receipt
			applied bool
			err     error
		)
		if m, ok := merged[s]; ok {
			rc, applied = m, true
		} else {
			opCtx, cancel := context.WithTimeout(ctx, dbTimeout)
			t0 := time.Now()
			rc, applied, err = e.store.Settle(opCtx, s.request())
			observeDB(waitSettle, t0)
			cancel()
		}
		switch {
		case errors.Is(err, billing.ErrNoHold):
			// Settled and logged before (a replay): nothing left to do
			// but a friend hold, which the settlement settles first.
			e.settleFriendOrWarn(ctx, s, billing.Receipt{})
			done = append(done, s)
			continue
		case err != nil:
			down = err
			e.failed(s, err)
			continue
		case rc.By != billing.SettledByRequest:
			// The sweeper resolved the hold first (this process was
			// presumed dead): its charge and its log row stand.
			s.logger.Warn("hold was resolved by the sweeper before its settlement",
				zap.String("request_id", s.Hold.RequestID), zap.String("charged", rc.Charged.String()))
			e.settleFriendOrWarn(ctx, s, rc)
			done = append(done, s)
			continue
		}
		if applied && s.Bill {
			counters = append(counters, s.Counters)
		}
		// Before the log row: a retry, which finds the receipt, settles
		// it again (once), and only then writes the row and drops it.
		if err := e.settleFriend(ctx, s, rc); err != nil {
			down = err
			e.failed(s, err)
			continue
		}
		if !s.Bill {
			// A release: no log row, its receipt can go.
			receipts[s.Hold.User] = append(receipts[s.Hold.User], s.Hold.RequestID)
			done = append(done, s)
			continue
		}
		s.Log.ChargedNano = int64(rc.Charged)
		// A friend key's charge is capped by its hold (friendCap): the
		// rest of the cost is shortfall too.
		s.Log.ShortfallNano = int64(rc.Shortfall) + max(s.Log.CostNano-int64(s.Cost), 0)
		s.Log.Shortfall = billing.Nano(s.Log.ShortfallNano).USD()
		s.Log.TakenNano = rc.TakenByField()
		logs = append(logs, s.Log)
		logged = append(logged, s)
	}
	if len(logs) > 0 {
		t0 := time.Now()
		err := e.store.InsertRequestLogs(ctx, logs)
		observeDB(waitRequestLogs, t0)
		if err != nil {
			// The receipts stay: the retry finds them and writes the rows.
			for _, s := range logged {
				e.failed(s, err)
			}
			logged = nil
		}
	}
	for _, s := range logged {
		receipts[s.Hold.User] = append(receipts[s.Hold.User], s.Hold.RequestID)
	}
	// The receipts go with the user's next hold (no write of their own), or
	// after clearDelay when none comes.
	for user, ids := range receipts {
		e.clears.add(user, ids, time.Now())
	}
	if len(counters) > 0 {
		e.addUsage(counters)
	}
	for _, s := range logged {
		s.countSettled()
		s.logBilled()
		done = append(done, s)
	}
	if sp := e.spool.Load(); sp != nil {
		ids := make([]string, 0, len(done))
		for _, s := range done {
			if s.journal {
				ids = append(ids, s.Hold.RequestID)
			}
		}
		if err := sp.DoneAll(ids); err != nil {
			// Replayed at the next start, and recognised as settled.
			e.log().Warn("marking settlements done in the spool failed", zap.Int("count", len(ids)), zap.Error(err))
		}
	}
	countDone(done)
	e.waiting.done(done)
}

// findHold turns an Unknown release into a plain one. Reserve is idempotent
// by request id, so asking again, for a zero hold, returns the hold the
// unanswered request took, or takes an empty one; the release then gives
// back exactly what was taken. When there is no hold and no credit to hold
// (or no user), the release stays Unknown: there is nothing to give back.
// An error means the database is still away: the release waits for the
// retry like any other settlement.
func (e *engine) findHold(ctx context.Context, s *settlement) error {
	h := s.Hold
	opCtx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	held, err := e.store.Reserve(opCtx, billing.HoldRequest{
		RequestID: h.RequestID, User: h.User, Plan: h.Plan, Owner: h.Owner, At: h.At, Expires: h.Expires,
		LogID: h.LogID, Model: h.Model, KeyID: h.KeyID,
	})
	var ie *billing.InsufficientError
	switch {
	case err == nil:
		s.Hold, s.Unknown = held, false
	case errors.As(err, &ie), errors.Is(err, billing.ErrUserNotFound):
	default:
		return err
	}
	return nil
}

// settleFriendOrWarn settles the friend hold of a settlement that is done
// otherwise; a failure leaves the hold to expire.
func (e *engine) settleFriendOrWarn(ctx context.Context, s *settlement, rc billing.Receipt) {
	if err := e.settleFriend(ctx, s, rc); err != nil {
		s.logger.Warn("settling a friend key hold failed; it expires on its own", zap.String("request_id", s.Hold.RequestID), zap.Error(err))
	}
}

func (s *settlement) request() billing.SettleRequest {
	return billing.SettleRequest{Hold: s.Hold, Cost: s.Cost, Usage: s.Usage, WeightedTokens: s.Weighted, By: billing.SettledByRequest}
}

// settleMerged settles the settlements of a batch whose cost is within
// their hold with one SettleMany: one conditional write per user and plan
// (under load the queue holds several per user), all sent to the database
// in one command. What it cannot settle this way is left out of the result
// and settled one by one, which recognises what SettleMany did settle.
func (e *engine) settleMerged(ctx context.Context, batch []*settlement) map[*settlement]billing.Receipt {
	var (
		group []*settlement
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
	opCtx, cancel := context.WithTimeout(ctx, dbTimeout)
	t0 := time.Now()
	rcs, err := e.store.SettleMany(opCtx, reqs)
	observeDB(waitSettle, t0)
	cancel()
	if err != nil {
		return nil // one by one, which handles every case
	}
	out := make(map[*settlement]billing.Receipt, len(group))
	for i, s := range group {
		out[s] = rcs[i]
	}
	return out
}

// waitingSettlements counts, per user, the settlements submitted and not
// yet settled, so that a hold refused for want of credit can first wait
// for the user's own earlier requests to give back the rest of their holds.
type waitingSettlements struct {
	mu     sync.Mutex
	users  map[string]int
	change chan struct{} // closed and replaced whenever settlements finish
}

func (w *waitingSettlements) add(s *settlement) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.users == nil {
		w.users = map[string]int{}
		w.change = make(chan struct{})
	}
	w.users[s.Hold.User]++
	s.queued = true
}

func (w *waitingSettlements) done(ss []*settlement) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, s := range ss {
		if !s.queued {
			continue // replayed from the spool: never counted
		}
		s.queued = false
		n++
		if w.users[s.Hold.User]--; w.users[s.Hold.User] <= 0 {
			delete(w.users, s.Hold.User)
		}
	}
	if n > 0 {
		close(w.change)
		w.change = make(chan struct{})
	}
}

// pending returns how many of the user's settlements are waiting, and a
// channel closed when some settlement finishes.
func (w *waitingSettlements) pending(user string) (int, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.users[user], w.change
}

// awaitUser waits, at most d, until none of the user's settlements is
// waiting; it reports whether there were any to wait for. It tells the
// collector not to linger.
func (e *engine) awaitUser(ctx context.Context, user string, d time.Duration) bool {
	n, change := e.waiting.pending(user)
	if n == 0 {
		return false
	}
	select {
	case e.hurry <- struct{}{}:
	default:
	}
	t := time.NewTimer(d)
	defer t.Stop()
	for n > 0 {
		select {
		case <-change:
		case <-t.C:
			return true
		case <-ctx.Done():
			return true
		}
		n, change = e.waiting.pending(user)
	}
	return true
}

// failed keeps a settlement the database did not take for the retry loop.
func (e *engine) failed(s *settlement, err error) {
	s.failures++
	if s.failures == 1 || s.failures%20 == 0 {
		s.logger.Error("settlement failed; kept for retry", zap.String("request_id", s.Hold.RequestID),
			zap.String("user", s.Hold.User), zap.String("cost", s.Cost.String()), zap.Int("failures", s.failures), zap.Error(err))
	}
	e.retryMu.Lock()
	e.retry = append(e.retry, s)
	e.retryMu.Unlock()
}

// maxBacklog is how many settlements may wait for the database before new
// requests are refused: past it, the database is not taking charges, and
// serving more would only pile up unbilled work.
const maxBacklog = 10000

// backlogged reports whether new requests must be refused because
// settlements are not reaching the database.
func (e *engine) backlogged() bool { return e.pendingRetries() >= maxBacklog }

// pendingRetries is the number of settlements waiting for the database.
func (e *engine) pendingRetries() int {
	e.retryMu.Lock()
	defer e.retryMu.Unlock()
	return len(e.retry)
}

// retryLoop resubmits failed settlements with a growing delay while the
// database refuses them.
func (e *engine) retryLoop() {
	defer e.workers.Done()
	delay := retryMin
	for {
		select {
		case <-e.stop:
			return
		case <-time.After(delay):
		}
		if !e.retryOnce(settleTimeout) {
			delay = min(2*delay, retryMax)
		} else {
			delay = retryMin
		}
	}
}

// retryOnce settles what is waiting, within timeout; it reports whether
// all of it went through.
func (e *engine) retryOnce(timeout time.Duration) bool {
	e.retryMu.Lock()
	batch := e.retry
	e.retry = nil
	e.retryMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for len(batch) > 0 {
		n := min(len(batch), settleBatch)
		e.settleBatchCtx(ctx, batch[:n])
		batch = batch[n:]
	}
	return e.pendingRetries() == 0
}

// replaySpool queues the settlements a previous run journaled and did not
// finish (a crash, a database outage at shutdown). Settling is idempotent,
// so one that did reach the database is recognised and only marked done.
func (e *engine) replaySpool(recs []spool.Record) {
	if len(recs) == 0 {
		return
	}
	n := 0
	for _, r := range recs {
		s := new(settlement)
		if err := json.Unmarshal(r.Data, s); err != nil || s.Hold.RequestID == "" {
			e.log().Error("unreadable settlement in the spool; left in place", zap.String("id", r.ID), zap.Error(err))
			continue
		}
		s.logger, s.journal = e.log(), true
		e.retryMu.Lock()
		e.retry = append(e.retry, s)
		e.retryMu.Unlock()
		n++
	}
	e.log().Info("replaying settlements journaled by a previous run", zap.Int("count", n))
}

func (s *settlement) logBilled() {
	// One line per request, as Caddy's own reverse_proxy logs its round
	// trips: at DEBUG (the request log row is the record), and at WARN
	// when part of the cost could not be charged.
	lvl, msg := zap.DebugLevel, "billed"
	if s.Log.ShortfallNano > 0 {
		lvl, msg = zap.WarnLevel, "billed with shortfall"
	}
	ce := s.logger.Check(lvl, msg)
	if ce == nil {
		return
	}
	ce.Write(
		zap.String("request_id", s.Log.RequestID),
		zap.String("site", s.Site),
		zap.String("credit_field", s.Log.CreditField),
		zap.String("user", s.Log.UserID),
		zap.String("key", s.Log.UserKeyID),
		zap.String("model", s.Log.Model),
		zap.String("upstream_model", s.Log.UpstreamModel),
		zap.String("upstream_key", s.Log.TrollKeyID),
		zap.Int64("input_tokens", s.Log.InputTokens),
		zap.Int64("output_tokens", s.Log.OutputTokens),
		zap.Int64("cache_write_tokens", s.Log.CacheWriteTokens),
		zap.Int64("cache_read_tokens", s.Log.CacheHitTokens),
		zap.String("hold", s.Hold.Amount().String()),
		zap.String("cost", s.Cost.String()),
		zap.String("charged", billing.Nano(s.Log.ChargedNano).String()),
		zap.String("shortfall", billing.Nano(s.Log.ShortfallNano).String()),
		zap.String("usage_source", s.Log.UsageSource),
		zap.String("end_reason", s.Log.EndReason),
	)
}

// sweepLoop sends this process's heartbeat and resolves holds left by dead
// processes and receipts left without their log rows. Every instance runs
// it; resolving goes through the same conditional Settle, so two sweepers
// never resolve one hold twice.
func (e *engine) sweepLoop() {
	defer e.workers.Done()
	lastSweep := time.Time{}
	for first := true; ; first = false {
		now := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
		if err := e.store.Heartbeat(ctx, e.boot, now); err != nil {
			e.log().Warn("heartbeat failed", zap.Error(err))
		}
		cancel()
		if first {
			// Settle what a previous run of this instance journaled, then
			// resolve the holds that run left in flight: orphans now.
			e.retryOnce(settleTimeout)
			e.sweepPredecessors()
		}
		if now.Sub(lastSweep) >= sweepInterval {
			lastSweep = now
			e.sweep(now)
		}
		select {
		case <-e.stop:
			return
		case <-time.After(heartbeatEvery):
		}
	}
}

// sweep resolves orphaned holds with the orphan policy and writes the log
// rows of receipts left without one.
func (e *engine) sweep(now time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*dbTimeout)
	defer cancel()
	e.resolve(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-ownerTimeout), ReceiptAge: receiptAge})
}

// sweepPredecessors resolves at start-up the holds of earlier runs of this
// Caddy instance (same data directory, so same instance id): this process
// holds the spool's lock, so none of them is alive. Holds whose settlement
// is still waiting in the spool are left to it.
func (e *engine) sweepPredecessors() {
	if e.spool.Load() == nil {
		return // no lock on the spool: another process may share the id
	}
	prefix, _, ok := strings.Cut(e.boot, "/")
	if !ok {
		return
	}
	prefix += "/"
	e.retryMu.Lock()
	pending := make(map[string]bool, len(e.retry))
	for _, s := range e.retry {
		pending[s.Hold.RequestID] = true
	}
	e.retryMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 4*dbTimeout)
	defer cancel()
	now := time.Now()
	e.resolve(ctx, billing.OrphanQuery{
		Now: now, OwnerDeadline: now.Add(-ownerTimeout), ReceiptAge: receiptAge,
		Dead: func(owner string) bool { return strings.HasPrefix(owner, prefix) && owner != e.boot },
		Skip: pending,
	})
}

// resolve settles the orphans the query finds with the orphan policy and
// writes the log rows of receipts left without one.
func (e *engine) resolve(ctx context.Context, q billing.OrphanQuery) {
	orphans, err := e.store.Orphans(ctx, q)
	if err != nil {
		e.log().Warn("looking for orphaned holds failed", zap.Error(err))
		return
	}
	policy := billing.OrphanPolicy(*e.orphanPolicy.Load())
	for _, o := range orphans {
		h := o.Hold
		if q.Skip[h.RequestID] {
			continue
		}
		rc := o.Receipt
		if rc != nil && rc.Cost == 0 && rc.Charged == 0 {
			// A hold released without a charge (the request failed): it
			// has no log row to write.
			e.clears.addExact(h.User, []string{h.RequestID}, time.Now())
			continue
		}
		// Each orphan has its own time: a lock left by a killed process
		// (IsolationShared) can hold one user up to its lease.
		opCtx, cancel := context.WithTimeout(context.Background(), 2*dbTimeout)
		if rc == nil {
			r, applied, err := e.store.Settle(opCtx, billing.SettleRequest{Hold: h, Cost: policy.Cost(h), By: billing.SettledBySweeper})
			if errors.Is(err, billing.ErrNoHold) {
				cancel()
				continue
			}
			if err != nil {
				cancel()
				e.log().Warn("resolving an orphaned hold failed", zap.String("request_id", h.RequestID), zap.Error(err))
				continue
			}
			if r.By != billing.SettledBySweeper {
				cancel()
				continue // its own settlement got there first
			}
			if applied {
				chargedUSD.WithLabelValues(h.Plan.String()).Add(r.Charged.USD())
				e.log().Warn("resolved an orphaned hold", zap.String("request_id", h.RequestID), zap.String("user", h.User),
					zap.String("owner", h.Owner), zap.Time("held_at", h.At), zap.String("policy", string(policy)),
					zap.String("hold", h.Amount().String()), zap.String("charged", r.Charged.String()))
			}
			rc = &r
		}
		row := orphanLog(h, *rc, policy)
		err := e.store.InsertRequestLogs(opCtx, []billing.RequestLog{row})
		cancel()
		if err != nil {
			e.log().Warn("writing the log row of a swept hold failed", zap.String("request_id", h.RequestID), zap.Error(err))
			continue
		}
		if o.Receipt != nil {
			e.log().Warn("wrote the missing log row of a settled request", zap.String("request_id", h.RequestID),
				zap.String("user", h.User), zap.String("charged", rc.Charged.String()))
		}
		// Dropped by the flusher, which retries until the database takes
		// it (a lock left by a killed process can hold the user a while).
		e.clears.addExact(h.User, []string{h.RequestID}, time.Now())
	}
}

// orphanLog is the log row of a hold the sweeper resolved, or of a receipt
// whose row was never written: what the hold and the receipt say.
func orphanLog(h billing.Hold, rc billing.Receipt, policy billing.OrphanPolicy) billing.RequestLog {
	source, end := "hold_fallback", "orphaned:"+string(policy)
	if rc.By == billing.SettledByRequest {
		source, end = "receipt", "recovered"
	}
	return billing.RequestLog{
		ID: rc.LogID, UserID: h.User, UserKeyID: h.KeyID, Model: h.Model,
		CreditsCost: rc.Cost.USD(), CreditType: h.Plan.CreditType(), StatusCode: 200, IsSuccess: true, CreatedAt: rc.At,
		RequestID: h.RequestID, CreditField: h.Plan.String(), UsageSource: source, EndReason: end,
		CostNano: int64(rc.Cost), ChargedNano: int64(rc.Charged), ShortfallNano: int64(rc.Shortfall), Shortfall: rc.Shortfall.USD(),
		HoldNano: int64(h.Amount()), TakenNano: rc.TakenByField(),
	}
}

// clearDelay is how long a receipt whose log row is written waits for the
// user's next hold to drop it before it is dropped on its own.
const clearDelay = time.Second

// receiptClears holds, per user, the receipts whose log rows are written,
// until a hold of the same user or the flusher drops them. Each receipt is
// in one place at a time, so it is dropped once and the count stays exact.
type receiptClears struct {
	mu sync.Mutex
	m  map[string]*userClears
}

type userClears struct {
	ids   []string
	since time.Time
	// exact: some of the receipts may be dropped by another process too
	// (a swept hold's, which every instance's sweeper may resolve), so they
	// go only through ClearReceipts, which drops what still exists, never
	// with a hold, whose update counts them as dropped.
	exact bool
}

func (c *receiptClears) add(user string, ids []string, now time.Time) { c.put(user, ids, now, false) }

// addExact is add for receipts another process may drop as well.
func (c *receiptClears) addExact(user string, ids []string, now time.Time) {
	c.put(user, ids, now, true)
}

func (c *receiptClears) put(user string, ids []string, now time.Time, exact bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[string]*userClears{}
	}
	uc := c.m[user]
	if uc == nil {
		uc = &userClears{since: now}
		c.m[user] = uc
	}
	uc.ids = append(uc.ids, ids...)
	uc.exact = uc.exact || exact
}

// take removes and returns the user's receipts to drop.
func (c *receiptClears) take(user string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	uc := c.m[user]
	if uc == nil || uc.exact {
		return nil
	}
	delete(c.m, user)
	return uc.ids
}

// due removes and returns the receipts waiting longer than clearDelay.
func (c *receiptClears) due(now time.Time, all bool) map[string]*userClears {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]*userClears{}
	for user, uc := range c.m {
		if all || now.Sub(uc.since) >= clearDelay {
			out[user] = uc
			delete(c.m, user)
		}
	}
	return out
}

// flushClears drops the receipts no hold took along.
func (e *engine) flushClears(all bool) {
	due := e.clears.due(time.Now(), all)
	if len(due) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*dbTimeout)
	defer cancel()
	for user, uc := range due {
		if err := e.store.ClearReceipts(ctx, user, uc.ids); err != nil {
			// Tried again with the next hold or flush; past receiptAge the
			// sweeper drops them too.
			e.clears.put(user, uc.ids, time.Now(), uc.exact)
			if !all {
				e.log().Warn("clearing settlement receipts failed; will retry", zap.String("user", user), zap.Error(err))
			}
		}
	}
}

func (e *engine) clearLoop() {
	defer e.workers.Done()
	for {
		select {
		case <-e.stop:
			return
		case <-time.After(clearDelay / 2):
			e.flushClears(false)
			e.flushUsage()
		}
	}
}
