package lease

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// lease is one lease of one user and plan. Its writes to the store go one
// at a time, under mu, each starting from the state the last one left: a
// write whose answer was lost is sent again, unchanged, before any other
// (pending), so the Ledger always knows what the store holds.
type lease struct {
	id      string       // the lease's request id in the store
	mu      sync.Mutex   // held across a write to the store
	hold    billing.Hold // the lease as the store holds it; written under mu and Ledger.mu
	pending *pendingOp   // a write whose answer was lost; under mu
	done    map[string]billing.Receipt

	// Under Ledger.mu:
	free    []billing.Nano            // hold.Taken minus what outstanding carved holds took
	carved  map[string][]billing.Nano // carved holds not yet charged: what each took
	clears  []string                  // receipts to drop with the next write
	born    time.Time
	used    time.Time
	retired bool // no longer carved from
	gone    bool // the Ledger no longer knows what the store holds: closed, or moved by the sweeper
	closed  bool // gone from the store, what it held back in the pool
}

func newLease(h billing.Hold, now time.Time) *lease {
	free := make([]billing.Nano, len(h.Taken))
	copy(free, h.Taken)
	return &lease{id: h.RequestID, hold: h, free: free, born: now, used: now, carved: map[string][]billing.Nano{}, done: map[string]billing.Receipt{}}
}

// pendingOp is a write on a lease whose outcome is unknown: one of flush
// and settle is set.
type pendingOp struct {
	flush  *billing.LeaseFlush
	settle *billing.SettleRequest
}

// flush charges settles, carved from ls, in one write; with close it also
// gives back what no outstanding hold took (the whole lease when none is
// left). The settlements' receipts are returned in order.
func (l *Ledger) flush(ctx context.Context, ls *lease, settles []billing.SettleRequest, close bool) ([]billing.Receipt, error) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if err := l.resend(ctx, ls); err != nil {
		return nil, err
	}
	out, todo := ls.settledBefore(settles)
	if len(todo) == 0 && len(settles) > 0 {
		return out, nil
	}
	rcs, err := l.write(ctx, ls, pick(settles, todo), close)
	if err != nil {
		return nil, err
	}
	for j, i := range todo {
		out[i] = rcs[j]
	}
	return out, nil
}

// write charges settles, none of which was charged before, in one write.
// The caller holds ls.mu.
func (l *Ledger) write(ctx context.Context, ls *lease, settles []billing.SettleRequest, close bool) ([]billing.Receipt, error) {
	l.mu.Lock()
	if ls.gone {
		l.mu.Unlock()
		return nil, billing.ErrLeaseMoved
	}
	f := billing.LeaseFlush{Lease: ls.hold, Settles: settles}
	f.Clear, ls.clears = takeClears(ls.clears)
	if close || ls.retired {
		if len(ls.carved) == len(settles) {
			f.Close = true
		} else {
			f.Keep = keepFor(ls, settles)
		}
	}
	l.mu.Unlock()
	return l.send(ctx, ls, &pendingOp{flush: &f})
}

// takeClears splits ids into the receipts one write drops (at most
// billing.MaxClear) and those left for the next.
func takeClears(ids []string) (now, rest []string) {
	if len(ids) <= billing.MaxClear {
		return ids, nil
	}
	return ids[:billing.MaxClear:billing.MaxClear], slices.Clone(ids[billing.MaxClear:])
}

// keepFor is what ls must keep after settles are charged: what its other
// outstanding holds took. The caller holds Ledger.mu.
func keepFor(ls *lease, settles []billing.SettleRequest) []billing.Nano {
	keep := make([]billing.Nano, len(ls.hold.Taken))
	for i, t := range ls.hold.Taken {
		keep[i] = t - ls.free[i]
	}
	for _, s := range settles {
		for i, t := range s.Hold.Taken {
			keep[i] -= t
		}
	}
	return keep
}

// send makes op's write and, when the store answers, applies it to ls.
// An answer lost leaves op pending. The caller holds ls.mu.
func (l *Ledger) send(ctx context.Context, ls *lease, op *pendingOp) ([]billing.Receipt, error) {
	var (
		next billing.Hold
		rcs  []billing.Receipt
		err  error
	)
	if op.flush != nil {
		next, rcs, err = l.LeaseLedger.FlushLease(ctx, *op.flush)
	} else {
		var rc billing.Receipt
		rc, _, err = l.LeaseLedger.Settle(ctx, *op.settle)
		rcs = []billing.Receipt{rc}
	}
	switch {
	case errors.Is(err, billing.ErrLeaseMoved), errors.Is(err, billing.ErrNotAllHeld):
		// Nothing was written: the lease is not what the Ledger knows, or
		// one of the settlements was charged through the store. The
		// store's Settle knows which; the Ledger stops writing the lease.
		ls.pending = nil
		l.lost(ls, op, err)
		return nil, err
	case errors.Is(err, billing.ErrNoHold):
		// Charged before, and logged: from the lease or from the pool,
		// which the Ledger cannot tell; the store knows.
		ls.pending = nil
		l.lost(ls, op, err)
		l.mu.Lock()
		delete(ls.carved, op.settle.Hold.RequestID)
		l.mu.Unlock()
		return nil, err
	case err != nil:
		ls.pending = op
		return nil, err
	}
	ls.pending = nil
	l.applied(ls, op, next, rcs)
	return rcs, nil
}

// resend sends the pending write, if any. The caller holds ls.mu.
func (l *Ledger) resend(ctx context.Context, ls *lease) error {
	if ls.pending == nil {
		return nil
	}
	_, err := l.send(ctx, ls, ls.pending)
	if errors.Is(err, billing.ErrLeaseMoved) || errors.Is(err, billing.ErrNotAllHeld) || errors.Is(err, billing.ErrNoHold) {
		return nil // the lease is gone: the caller finds it so
	}
	return err
}

// settledBefore returns the receipts of the settles that a write answered
// before charged (a batch retried after a later step failed, or after a
// lost answer that resend recovered), and the indexes of the others.
// The caller holds ls.mu.
func (ls *lease) settledBefore(settles []billing.SettleRequest) ([]billing.Receipt, []int) {
	rcs := make([]billing.Receipt, len(settles))
	var todo []int
	for i, s := range settles {
		if rc, ok := ls.done[s.Hold.RequestID]; ok {
			rcs[i] = rc
		} else {
			todo = append(todo, i)
		}
	}
	return rcs, todo
}

func pick(settles []billing.SettleRequest, idx []int) []billing.SettleRequest {
	out := make([]billing.SettleRequest, len(idx))
	for j, i := range idx {
		out[j] = settles[i]
	}
	return out
}

// applied updates ls after op's write: each charged hold's unused part is
// free again, and the lease is what the store now holds. The caller holds
// ls.mu.
func (l *Ledger) applied(ls *lease, op *pendingOp, next billing.Hold, rcs []billing.Receipt) {
	l.mu.Lock()
	defer l.mu.Unlock()
	settles := []billing.SettleRequest{}
	if op.flush != nil {
		settles = op.flush.Settles
	} else {
		settles = append(settles, *op.settle)
		next = ls.hold
		next.Taken = append([]billing.Nano(nil), ls.hold.Taken...)
		for i, k := range billing.SplitCost(op.settle.Hold.Taken, op.settle.Cost) {
			next.Taken[i] -= k
		}
	}
	for i, s := range settles {
		keep := billing.SplitCost(s.Hold.Taken, s.Cost)
		for j, t := range s.Hold.Taken {
			ls.free[j] += t - keep[j]
		}
		delete(ls.carved, s.Hold.RequestID)
		ls.done[s.Hold.RequestID] = rcs[i]
	}
	switch {
	case op.flush != nil && op.flush.Close:
		ls.gone, ls.closed, ls.free = true, true, make([]billing.Nano, len(ls.free))
		l.cfg.Observer.Closed(op.flush.Lease)
	case op.flush != nil && op.flush.Keep != nil:
		for j := range ls.free {
			ls.free[j] = 0
		}
	}
	ls.hold = next
}

// lost records that the store no longer has ls as the Ledger knows it:
// its carved holds settle through the store from now on, Tick closes it
// as the store has it, and the receipts op was to drop go back to the
// settlement. The caller holds ls.mu.
func (l *Ledger) lost(ls *lease, op *pendingOp, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ls.gone = true
	if u := l.users[key(ls.hold.User, ls.hold.Plan)]; u != nil && u.current == ls {
		l.retireCurrent(u)
	}
	if op.flush != nil && len(op.flush.Clear) > 0 {
		l.cfg.ReturnReceipts(ls.hold.User, op.flush.Clear, err)
	}
}
