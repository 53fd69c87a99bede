package settle

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// usageFlushAt is how many settled requests' counters make a flush before
// the timer's.
const usageFlushAt = 4096

// usageQueue holds the usage counters of settled requests until they are
// written.
type usageQueue struct {
	mu      sync.Mutex
	waiting []billing.UsageCounters // for the next FlushUsage

	writeMu sync.Mutex // one counters write at a time
	// failedBatch is a batch whose write failed: it is sent again,
	// unchanged, before any other (under writeMu). stuck says there is
	// one, without the lock.
	failedBatch *billing.UsageBatch
	seq         uint64 // under writeMu
	stuck       atomic.Bool
}

// pending is how many settled requests' counters are not written yet.
func (q *usageQueue) pending() int {
	q.mu.Lock()
	n := len(q.waiting)
	q.mu.Unlock()
	q.writeMu.Lock()
	if q.failedBatch != nil {
		n += len(q.failedBatch.Counters)
	}
	q.writeMu.Unlock()
	return n
}

// addUsage queues the key counters of settled requests for the next
// FlushUsage (every clearDelay/2, at usageFlushAt, and at Close): the
// user_keys and openhands_keys counters are statistics, so one write per
// key per half second replaces one per batch.
//
// Each request's tokens are clamped to billing.MaxRequestTokens here too
// (a settlement replayed from a journal was priced by an older build), so
// that the store's sums of a batch cannot overflow.
func (st *Settler) addUsage(counters []billing.UsageCounters) {
	for i := range counters {
		c := &counters[i]
		c.WeightedTokens, c.RawTokens = billing.ClampTokens(c.WeightedTokens), billing.ClampTokens(c.RawTokens)
	}
	q := &st.usage
	q.mu.Lock()
	q.waiting = append(q.waiting, counters...)
	// While a failed batch waits, the timer retries it: a settlement
	// worker does not wait for the database for statistics.
	full := len(q.waiting) >= usageFlushAt && !q.stuck.Load()
	q.mu.Unlock()
	if full {
		st.FlushUsage()
	}
}

// FlushUsage writes the queued counters as one batch, after the batch that
// failed last time if any: batches go one at a time and in order, each
// sent again unchanged until it is written, so that one that half applied
// is finished, never counted twice (see billing.UsageBatch). While the
// database refuses, counters wait in memory; their number is bounded by
// the requests admitted meanwhile, which stop when settlements back up. It
// reports whether everything queued was written.
func (st *Settler) FlushUsage() bool {
	q := &st.usage
	q.writeMu.Lock()
	defer q.writeMu.Unlock()
	if b := q.failedBatch; b != nil {
		if !st.writeUsage(*b) {
			return false
		}
		q.failedBatch = nil
		q.stuck.Store(false)
	}
	q.mu.Lock()
	counters := q.waiting
	q.waiting = nil
	q.mu.Unlock()
	if len(counters) == 0 {
		return true
	}
	q.seq++
	writer, run, _ := strings.Cut(st.owner, "/")
	b := billing.UsageBatch{Writer: writer, Seq: run + "-" + strconv.FormatUint(q.seq, 10), Counters: counters}
	if !st.writeUsage(b) {
		q.failedBatch = &b
		q.stuck.Store(true)
		return false
	}
	return true
}

// writeUsage makes one attempt at writing a counters batch.
func (st *Settler) writeUsage(b billing.UsageBatch) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*st.opTimeout)
	defer cancel()
	t0 := time.Now()
	err := st.store.AddUsage(ctx, b)
	st.obs.DBWait(OpUsage, time.Since(t0))
	if err != nil {
		st.log().Warn("writing usage counters failed; the batch is sent again", zap.Int("requests", len(b.Counters)), zap.Error(err))
		return false
	}
	return true
}
