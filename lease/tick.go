package lease

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// forgetAfter is how long the Ledger remembers a user without a lease.
const forgetAfter = time.Minute

func key(user string, plan billing.CreditPlan) string { return user + "\x00" + plan.String() }

func sumOf(ns []billing.Nano) billing.Nano {
	var t billing.Nano
	for _, n := range ns {
		t += n
	}
	return t
}

// leases lists the user's leases, the current one first. The caller
// holds Ledger.mu.
func (u *user) leases() []*lease {
	if u.current == nil {
		return u.retired
	}
	return append([]*lease{u.current}, u.retired...)
}

// retireCurrent stops carving from the user's current lease and returns
// it, so that its free part goes back now. The caller holds Ledger.mu.
func (l *Ledger) retireCurrent(u *user) *lease {
	ls := u.current
	if ls == nil {
		return nil
	}
	u.current = nil
	ls.retired = true
	u.retired = append(u.retired, ls)
	return ls
}

// shrink gives back a retired lease's free part (all of it when no
// carved hold is outstanding). An error leaves it to Tick.
func (l *Ledger) shrink(ctx context.Context, ls *lease) {
	if ls == nil {
		return
	}
	_, _ = l.flush(ctx, ls, nil, true)
}

// Tick retires the leases unused for Config.Idle, starts taking the next
// lease of a busy user whose lease is older than Config.MaxAge or has
// less than half of it free, gives back what retired leases hold beyond
// their outstanding holds, closes those with none, and closes, as the
// store holds them, the leases the Ledger lost track of. The owner calls
// it every second or so.
func (l *Ledger) Tick(ctx context.Context) {
	now := l.now()
	var work []*lease
	var takes []func()
	l.mu.Lock()
	for _, k := range slices.Sorted(maps.Keys(l.users)) { // in order: a simulation replays a seed exactly
		u := l.users[k]
		if ls := u.current; ls != nil && now.Sub(ls.used) >= l.cfg.Idle {
			l.retireCurrent(u)
		} else if ls != nil && (now.Sub(ls.born) >= l.cfg.MaxAge || 2*sumOf(ls.free) < ls.hold.Amount()) {
			takes = append(takes, l.renew(u, now))
		}
		kept := u.retired[:0]
		for _, ls := range u.retired {
			switch {
			case ls.closed && len(ls.carved) == 0 && now.Sub(ls.used) >= forgetAfter:
				continue // nothing left to settle or to recognise
			case !ls.closed && (len(ls.carved) == 0 || sumOf(ls.free) > 0 || ls.gone):
				work = append(work, ls)
			}
			kept = append(kept, ls)
		}
		u.retired = kept
		if u.current == nil && len(u.retired) == 0 && u.taking == nil && now.Sub(u.rate.last) >= forgetAfter {
			delete(l.users, k)
		}
	}
	l.mu.Unlock()
	for _, take := range takes {
		take()
	}
	for _, ls := range work {
		l.settleDown(ctx, ls)
	}
}

// settleDown gives back what a retired lease holds beyond its outstanding
// holds, closing it when none is left; a lease the Ledger lost track of is
// read back from the store and closed as it is there.
func (l *Ledger) settleDown(ctx context.Context, ls *lease) {
	l.mu.Lock()
	gone := ls.gone
	l.mu.Unlock()
	if !gone {
		l.shrink(ctx, ls)
		return
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	h := ls.hold
	// Asked again for a hold it has, the store returns it as it is now.
	cur, err := l.LeaseLedger.Reserve(ctx, billing.HoldRequest{
		RequestID: ls.id, User: h.User, Plan: h.Plan, Owner: l.cfg.Owner, At: h.At, Expires: h.Expires, LogID: h.LogID,
	})
	if err == nil {
		_, _, err = l.LeaseLedger.FlushLease(ctx, billing.LeaseFlush{Lease: cur, Close: true})
	}
	if err != nil && !refused(err) {
		return // the next Tick tries again
	}
	l.mu.Lock()
	ls.closed = true
	l.mu.Unlock()
}

// refused reports whether Reserve or FlushLease said there is nothing to
// close: no credit for even an empty hold, no user, or the lease moved on
// between the two calls (the next Tick reads it again).
func refused(err error) bool {
	var ie *billing.InsufficientError
	return errors.As(err, &ie) || errors.Is(err, billing.ErrUserNotFound) || errors.Is(err, billing.ErrNoHold)
}

// Close retires every lease and gives back what they hold beyond their
// outstanding holds; a lease whose holds are still unsettled (in the
// journal) stays for the sweeper of the next run. The owner calls it after
// the settlement drained.
func (l *Ledger) Close(ctx context.Context) {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
	l.takes.Wait()
	l.mu.Lock()
	var work []*lease
	for _, k := range slices.Sorted(maps.Keys(l.users)) {
		u := l.users[k]
		l.retireCurrent(u)
		for _, ls := range u.retired {
			if !ls.closed {
				work = append(work, ls)
			}
		}
	}
	l.mu.Unlock()
	for _, ls := range work {
		l.settleDown(ctx, ls)
	}
}

// rate counts a user's holds and what they asked for, per second: the
// last whole second and the current one.
type rate struct {
	start, last time.Time
	n, prevN    float64
	sum, prev   billing.Nano
}

func (r *rate) add(now time.Time, want billing.Nano) {
	r.roll(now)
	r.n++
	r.sum += want
	r.last = now
}

func (r *rate) roll(now time.Time) {
	el := now.Sub(r.start)
	if el < time.Second {
		return
	}
	r.prevN, r.prev = r.n, r.sum
	if el >= 2*time.Second {
		r.prevN, r.prev = 0, 0
	}
	r.n, r.sum, r.start = 0, 0, now
}

// perSecond is the user's rate of holds: the busier of the last second
// and the current one.
func (r *rate) perSecond(now time.Time) float64 {
	r.roll(now)
	return max(r.n, r.prevN)
}

// nanoPerSecond is what the user's holds asked for per second: the
// busier of the last second and the current one, the current one's pace
// counted over at least minPace, so that a user who starts busy gets a
// lease sized for the second that has begun, not for its first holds.
func (r *rate) nanoPerSecond(now time.Time) float64 {
	r.roll(now)
	el := max(now.Sub(r.start), minPace)
	return max(float64(r.prev), float64(r.sum)*float64(time.Second)/float64(el))
}

// minPace is the least part of a second from which nanoPerSecond takes the
// pace of the second that has begun.
const minPace = 250 * time.Millisecond
