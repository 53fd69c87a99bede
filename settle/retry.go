package settle

import (
	"context"
	"encoding/json"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/spool"
)

// MaxBacklog is how many settlements may wait for the database before new
// requests are refused: past it, the database is not taking charges, and
// serving more would only pile up unbilled work.
const MaxBacklog = 10000

// failed keeps a settlement the database did not take for the retry loop.
func (st *Settler) failed(s *Settlement, err error) {
	s.failures++
	if s.failures == 1 || s.failures%20 == 0 {
		s.Logger.Error("settlement failed; kept for retry", zap.String("request_id", s.Hold.RequestID),
			zap.String("user", s.Hold.User), zap.String("cost", s.Cost.String()), zap.Int("failures", s.failures), zap.Error(err))
	}
	st.retryMu.Lock()
	st.retry = append(st.retry, s)
	st.retryMu.Unlock()
}

// Backlogged reports whether new requests must be refused because
// settlements are not reaching the database.
func (st *Settler) Backlogged() bool { return st.Pending() >= MaxBacklog }

// Pending is the number of settlements waiting for the database.
func (st *Settler) Pending() int {
	st.retryMu.Lock()
	defer st.retryMu.Unlock()
	return len(st.retry)
}

// retryLoop resubmits failed settlements with a growing delay while the
// database refuses them.
func (st *Settler) retryLoop() {
	defer st.loops.Done()
	delay := retryMin
	for {
		select {
		case <-st.stop:
			return
		case <-time.After(delay):
		}
		if !st.RetryOnce(st.batchTimeout()) {
			delay = min(2*delay, retryMax)
		} else {
			delay = retryMin
		}
	}
}

// RetryOnce settles what is waiting for the database, within timeout; it
// reports whether all of it went through.
func (st *Settler) RetryOnce(timeout time.Duration) bool {
	st.retryMu.Lock()
	batch := st.retry
	st.retry = nil
	st.retryMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for len(batch) > 0 {
		n := min(len(batch), int(st.size.Load()))
		st.settleBatch(ctx, batch[:n])
		batch = batch[n:]
	}
	return st.Pending() == 0
}

// replay queues for the retry the settlements a previous run journaled
// and did not finish (a crash, a database outage at shutdown). Settling is
// idempotent, so one that did reach the database is recognised and only
// marked done.
func (st *Settler) replay(recs []spool.Record) {
	if len(recs) == 0 {
		return
	}
	n := 0
	settled := map[string]bool{}
	var open []billing.Hold
	for _, r := range recs {
		s := new(Settlement)
		if err := json.Unmarshal(r.Data, s); err != nil || s.Hold.RequestID == "" {
			st.log().Error("unreadable settlement in the spool; left in place", zap.String("id", r.ID), zap.Error(err))
			continue
		}
		if isOpen(r.ID) {
			open = append(open, s.Hold)
			continue
		}
		s.Logger, s.journaled = st.log(), true
		settled[s.Hold.RequestID] = true
		st.retryMu.Lock()
		st.retry = append(st.retry, s)
		st.retryMu.Unlock()
		n++
	}
	st.recoverOpen(open, settled)
	st.log().Info("replaying settlements journaled by a previous run", zap.Int("count", n), zap.Int("open_holds", len(open)))
}
