// Package lease serves holds from credit leases: slices of a busy user's
// pool that this instance takes in one write and spends in memory, so a
// request of that user costs no database round trip before its first byte,
// and its charge is written with the others of the same user in one
// conditional write per batch.
//
// A lease is a hold in the store (billing.LeaseLedger), so the invariant
// of holds carries over to the fleet: the pool, plus every lease, plus
// every hold, is what the user had minus what was charged, and a hold
// served from a lease never takes more than the lease has free. A user
// with $1 and three instances can never spend more than $1.
//
// Ledger is a billing.Ledger in front of the store: Reserve carves a
// request's hold from the user's lease when there is one with room, and
// takes a lease when the user is busy enough to be worth one; Settle and
// SettleMany charge carved holds through billing.LeaseLedger.FlushLease.
// Everything else goes to the store unchanged. Tick gives back leases that
// went idle or old; Close gives back all of them.
package lease

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Config is what a Ledger is built with. Zero durations take the defaults.
type Config struct {
	Store billing.LeaseLedger
	// Owner is this process's identity in the leases it takes (the
	// settlement's owner, so the sweeper knows when it died).
	Owner string
	// Now is the clock; nil: time.Now.
	Now func() time.Time
	// Span is how long a lease should last at the user's recent rate of
	// holds. Default 5s.
	Span time.Duration
	// Idle is how long a lease stays unused before it goes back. Default 5s.
	Idle time.Duration
	// MaxAge is how long a lease serves before a fresh one, sized to the
	// user's rate then, replaces it. Default 30s.
	MaxAge time.Duration
	// HotRate is the rate of requests per second from which a user gets a
	// lease; slower users get a hold per request. Default 2.
	HotRate float64
	// Observer is told what the leases do; nil: nothing is.
	Observer Observer
	// TakeWait is how long a hold that finds no room waits for a lease
	// being taken for its user before it takes a hold of its own. A lease
	// comes in about the time a hold's write takes, so waiting costs the
	// hold little and spares the database a write per request while it
	// comes (at a cold start, every request of a busy user). When the
	// database is slow a hold of its own is no faster than the lease, and
	// adds the load that keeps it slow. Default 1s; negative: never wait.
	TakeWait time.Duration
	// Go runs a lease's taking off the request path; nil: a goroutine.
	// A simulation runs it in place, so that a seed replays exactly.
	Go func(func())
	// ReturnReceipts takes back the receipts a carved hold's request
	// named for dropping (billing.HoldRequest.Clear) when the write that
	// was to drop them failed with err (settle.Settler.ReturnReceipts).
	ReturnReceipts func(user string, ids []string, err error)
}

// Observer is told what the leases do, for metrics. Its methods must not
// block.
type Observer interface {
	// Taken is called for each lease taken, Closed for each lease closed
	// (by this Ledger; the sweeper closes those of dead instances).
	Taken(h billing.Hold)
	Closed(h billing.Hold)
}

type nopObserver struct{}

func (nopObserver) Taken(billing.Hold)  {}
func (nopObserver) Closed(billing.Hold) {}

// Defaults of Config.
const (
	DefaultSpan     = 5 * time.Second
	DefaultIdle     = 5 * time.Second
	DefaultMaxAge   = 30 * time.Second
	DefaultHotRate  = 2.0
	DefaultTakeWait = time.Second
)

// maxShare: a lease takes at most 1/maxShare of the pool.
const maxShare = 4

// minHolds is how many holds of the asking size a lease covers at least.
const minHolds = 8

// retryLeaseAfter is how long a user whose pool could not fund a lease
// gets holds per request before a lease is tried again.
const retryLeaseAfter = 10 * time.Second

// takeTimeout bounds the taking of one lease.
const takeTimeout = 5 * time.Second

// Ledger serves holds from leases; see the package comment. It is safe for
// concurrent use.
type Ledger struct {
	billing.LeaseLedger // the store, for what the Ledger does not change
	cfg                 Config
	now                 func() time.Time
	seq                 atomic.Uint64

	mu     sync.Mutex
	users  map[string]*user
	closed bool           // Close began: no lease is taken any more
	takes  sync.WaitGroup // leases being taken
}

// New returns a Ledger over cfg.Store.
func New(cfg Config) *Ledger {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Span <= 0 {
		cfg.Span = DefaultSpan
	}
	if cfg.Idle <= 0 {
		cfg.Idle = DefaultIdle
	}
	if cfg.MaxAge <= 0 {
		cfg.MaxAge = DefaultMaxAge
	}
	if cfg.HotRate <= 0 {
		cfg.HotRate = DefaultHotRate
	}
	if cfg.TakeWait == 0 {
		cfg.TakeWait = DefaultTakeWait
	}
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.ReturnReceipts == nil {
		cfg.ReturnReceipts = func(string, []string, error) {}
	}
	if cfg.Go == nil {
		cfg.Go = func(f func()) { go f() }
	}
	return &Ledger{LeaseLedger: cfg.Store, cfg: cfg, now: cfg.Now, users: map[string]*user{}}
}

// user is what the Ledger knows of one user: how busy they are, and their
// leases.
type user struct {
	id      string
	plan    billing.CreditPlan
	rate    rate
	want    billing.Nano  // what the user's last hold asked for
	span    time.Duration // how long the user's last hold was to live
	current *lease        // the lease holds are carved from; nil: none
	retired []*lease      // leases no longer carved from, closed once their holds are settled
	// taking is non-nil while a lease is being taken for the user, and
	// closed when it is there or is not to be.
	taking  chan struct{}
	noLease time.Time
}

// Reserve carves the hold from the user's lease when it has room for
// req.Want; otherwise the hold is the store's, and a busy user gets a
// lease taken off the request path for the holds that follow. A hold that
// finds a lease being taken waits for it up to Config.TakeWait.
func (l *Ledger) Reserve(ctx context.Context, req billing.HoldRequest) (billing.Hold, error) {
	if billing.IsLease(req.RequestID) {
		return billing.Hold{}, errors.New("a request id cannot name a credit lease")
	}
	now := l.now()
	l.mu.Lock()
	u := l.userOf(req.User, req.Plan)
	u.rate.add(now, req.Want)
	u.want, u.span = req.Want, req.Expires.Sub(req.At)
	if h, ok := l.carve(u, req, now); ok {
		l.mu.Unlock()
		return h, nil
	}
	take := l.renew(u, now)
	taking := u.taking
	l.mu.Unlock()
	take()
	if h, ok := l.awaitLease(ctx, u, taking, req); ok {
		return h, nil
	}
	return l.LeaseLedger.Reserve(ctx, req)
}

// awaitLease waits up to Config.TakeWait for the lease being taken for u
// (taking closed), then carves req from it if it has room.
func (l *Ledger) awaitLease(ctx context.Context, u *user, taking chan struct{}, req billing.HoldRequest) (billing.Hold, bool) {
	if taking == nil || l.cfg.TakeWait < 0 {
		return billing.Hold{}, false
	}
	t := time.NewTimer(l.cfg.TakeWait)
	defer t.Stop()
	select {
	case <-taking:
	case <-t.C:
		return billing.Hold{}, false
	case <-ctx.Done():
		return billing.Hold{}, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.carve(u, req, l.now())
}

// tookLease ends the taking of a lease for u and wakes the holds waiting
// for it. The caller holds l.mu.
func tookLease(u *user) {
	if u.taking != nil {
		close(u.taking)
		u.taking = nil
	}
}

// userOf is the state of a user's holds on one credit plan: a user billed
// on two plans (two sites) has a lease for each. The caller holds l.mu.
func (l *Ledger) userOf(id string, plan billing.CreditPlan) *user {
	k := key(id, plan)
	u := l.users[k]
	if u == nil {
		u = &user{id: id, plan: plan}
		l.users[k] = u
	}
	return u
}

// carve serves req from the user's current lease when it has room.
// The caller holds l.mu.
func (l *Ledger) carve(u *user, req billing.HoldRequest, now time.Time) (billing.Hold, bool) {
	ls := u.current
	if ls == nil || ls.retired || req.Want < req.Min {
		return billing.Hold{}, false
	}
	if req.Want == 0 && sumOf(ls.free) <= 0 {
		return billing.Hold{}, false // a zero hold ("check" sizing) needs something in the pool
	}
	taken, ok := billing.Carve(ls.free, req.Want)
	if !ok {
		return billing.Hold{}, false
	}
	for i, t := range taken {
		ls.free[i] -= t
	}
	ls.carved[req.RequestID] = taken
	ls.used = now
	ls.clears = append(ls.clears, req.Clear...)
	h := billing.Hold{
		RequestID: req.RequestID, User: req.User, Plan: req.Plan, Taken: taken, Owner: req.Owner,
		At: req.At, Expires: req.Expires, LogID: req.LogID, Model: req.Model, KeyID: req.KeyID, Lease: ls.id,
	}
	h.Input = min(req.Input, h.Amount())
	return h, true
}

// renew starts taking a lease for u, the next one when u has one, if u is
// busy and no lease is being taken; the returned func, called once the
// caller let go of Ledger.mu, starts it (it is a no-op otherwise). The new
// lease replaces the current one when it comes; only a hold the current
// one has no room for waits for it (Reserve). The caller holds Ledger.mu.
func (l *Ledger) renew(u *user, now time.Time) func() {
	if l.closed || u.taking != nil || !now.After(u.noLease) || u.rate.perSecond(now) < l.cfg.HotRate || u.want <= 0 {
		return func() {}
	}
	size := max(l.size(u, now), 2*outstanding(u.current))
	u.taking = make(chan struct{})
	l.takes.Add(1)
	return func() { l.cfg.Go(func() { l.take(u, size) }) }
}

// take takes a lease of size for u, at most a quarter of the pool
// (maxShare) so that the rest stays for the user's other instances, and
// makes it u's current lease; the one it replaces goes back, but for what
// its outstanding holds took. A pool too small for a useful lease, or a
// database away, leaves u on holds per request for a while.
func (l *Ledger) take(u *user, size billing.Nano) {
	defer l.takes.Done()
	ctx, cancel := context.WithTimeout(context.Background(), takeTimeout)
	defer cancel()
	now := l.now()
	l.mu.Lock()
	want, span := u.want, u.span
	l.mu.Unlock()
	if b, err := l.LeaseLedger.Balances(ctx, u.id); err == nil {
		size = min(size, b.Pool(u.plan)/maxShare)
	} else {
		size = 0
	}
	if size < minHolds*want {
		l.mu.Lock()
		u.noLease = now.Add(retryLeaseAfter)
		tookLease(u)
		l.mu.Unlock()
		return
	}
	lr := billing.HoldRequest{
		RequestID: billing.LeaseID(l.cfg.Owner, l.seq.Add(1)), User: u.id, Plan: u.plan, Want: size, Min: size,
		Owner: l.cfg.Owner, At: now, Expires: now.Add(span), LogID: billing.NewLogID(now),
	}
	h, err := l.LeaseLedger.Reserve(ctx, lr)
	l.mu.Lock()
	if err != nil {
		tookLease(u)
		u.noLease = now.Add(retryLeaseAfter)
		if !refused(err) {
			// The lease may have been taken before the answer was lost:
			// Tick reads it back and closes it.
			lost := newLease(billing.Hold{RequestID: lr.RequestID, User: lr.User, Plan: lr.Plan, At: lr.At, Expires: lr.Expires, LogID: lr.LogID}, now)
			lost.retired, lost.gone = true, true
			u.retired = append(u.retired, lost)
		}
		l.mu.Unlock()
		return
	}
	old := l.retireCurrent(u)
	u.current = newLease(h, now)
	tookLease(u)
	l.cfg.Observer.Taken(h)
	l.mu.Unlock()
	l.shrink(ctx, old)
}

// size is the lease to take for u: what the user's holds took over Span
// at their recent rate, and at least minHolds holds like their last.
// The caller holds Ledger.mu.
func (l *Ledger) size(u *user, now time.Time) billing.Nano {
	perSec := u.rate.nanoPerSecond(now)
	s := billing.Nano(perSec * l.cfg.Span.Seconds())
	return max(s, minHolds*u.want)
}

// outstanding is what a lease's outstanding holds took. The caller holds
// Ledger.mu.
func outstanding(ls *lease) billing.Nano {
	if ls == nil {
		return 0
	}
	var t billing.Nano
	for _, c := range ls.carved {
		t += sumOf(c)
	}
	return t
}
