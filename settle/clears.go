package settle

import (
	"context"
	"errors"
	"maps"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// clearsPerHold is the most receipts one hold takes along: a hold is on
// the request path, and its write grows with every receipt it names. A
// lease's flush gathers those of the holds carved from it, up to
// billing.MaxClear; what is left is dropped by FlushClears.
const clearsPerHold = 16

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
	for _, id := range ids {
		// A hold naming one receipt twice is refused by the database.
		if !slices.Contains(uc.ids, id) {
			uc.ids = append(uc.ids, id)
		}
	}
	uc.exact = uc.exact || exact
}

// take removes and returns up to clearsPerHold of the user's receipts to
// drop.
func (c *receiptClears) take(user string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	uc := c.m[user]
	if uc == nil || uc.exact {
		return nil
	}
	if len(uc.ids) > clearsPerHold {
		ids := uc.ids[:clearsPerHold:clearsPerHold]
		uc.ids = slices.Clone(uc.ids[clearsPerHold:])
		return ids
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

// TakeReceipts removes and returns up to clearsPerHold of the user's
// receipts whose log rows are written, for the user's next hold to drop
// (billing.HoldRequest.Clear).
// When that hold fails, ReturnReceipts puts them back.
func (st *Settler) TakeReceipts(user string) []string { return st.clears.take(user) }

// ReturnReceipts puts back receipts TakeReceipts gave for a hold that
// failed with err. A refusal (billing.InsufficientError,
// billing.ErrUserNotFound) changed nothing, so they may go with the next
// hold again. Any other error leaves it unknown whether the hold's update
// dropped them: they then go only through ClearReceipts, which drops what
// still exists, since a hold's update counts every receipt it names as
// dropped.
func (st *Settler) ReturnReceipts(user string, ids []string, err error) {
	if len(ids) == 0 {
		return
	}
	var ie *billing.InsufficientError
	if errors.As(err, &ie) || errors.Is(err, billing.ErrUserNotFound) {
		st.clears.add(user, ids, st.now())
		return
	}
	st.clears.addExact(user, ids, st.now())
}

// FlushClears drops the receipts no hold took along within clearDelay, or
// all of them.
func (st *Settler) FlushClears(all bool) {
	due := st.clears.due(st.now(), all)
	if len(due) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*st.opTimeout)
	defer cancel()
	for _, user := range slices.Sorted(maps.Keys(due)) { // in order: a replayed run does the same
		uc := due[user]
		if err := st.store.ClearReceipts(ctx, user, uc.ids); err != nil {
			// Tried again by the next flush; past receiptAge the
			// sweeper drops them too. The failed write may have dropped
			// them already, so only ClearReceipts, never a hold's
			// update, which counts what it names as dropped.
			st.clears.put(user, uc.ids, st.now(), true)
			if !all {
				st.log().Warn("clearing settlement receipts failed; will retry", zap.String("user", user), zap.Error(err))
			}
		}
	}
}

// flushLoop drops receipts and writes usage counters every half clearDelay.
func (st *Settler) flushLoop() {
	defer st.loops.Done()
	for {
		select {
		case <-st.stop:
			return
		case <-time.After(clearDelay / 2):
			st.FlushClears(false)
			st.FlushUsage()
		}
	}
}
