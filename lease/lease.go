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
	// MaxAge is how long a lease serves before a new one replaces it.
	// Default 30s.
	MaxAge time.Duration
	// HotRate is the rate of requests per second from which a user gets a
	// lease; slower users get a hold per request. Default 2.
	HotRate float64
	// Observer is told what the leases do; nil: nothing is.
	Observer Observer
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
	DefaultSpan    = 5 * time.Second
	DefaultIdle    = 5 * time.Second
	DefaultMaxAge  = 30 * time.Second
	DefaultHotRate = 2.0
)

// maxShare: a lease takes at most 1/maxShare of the pool.
const maxShare = 4

// minHolds is how many holds of the asking size a lease covers at least.
const minHolds = 8

// retryLeaseAfter is how long a user whose pool could not fund a lease
// gets holds per request before a lease is tried again.
const retryLeaseAfter = 10 * time.Second

// Ledger serves holds from leases; see the package comment. It is safe for
// concurrent use.
type Ledger struct {
	billing.LeaseLedger // the store, for what the Ledger does not change
	cfg                 Config
	now                 func() time.Time
	seq                 atomic.Uint64

	mu    sync.Mutex
	users map[string]*user
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
	if cfg.Observer == nil {
		cfg.Observer = nopObserver{}
	}
	if cfg.ReturnReceipts == nil {
		cfg.ReturnReceipts = func(string, []string, error) {}
	}
	return &Ledger{LeaseLedger: cfg.Store, cfg: cfg, now: cfg.Now, users: map[string]*user{}}
}

// user is what the Ledger knows of one user: how busy they are, and their
// leases.
type user struct {
	id      string
	rate    rate
	current *lease        // the lease holds are carved from; nil: none
	retired []*lease      // leases no longer carved from, closed once their holds are settled
	taking  bool          // a lease is being taken
	ready   chan struct{} // closed when that take ends
	noLease time.Time
}

// Reserve carves the hold from the user's lease when it has room for
// req.Want; otherwise it takes a lease first if the user is busy, or a
// hold of its own from the store.
func (l *Ledger) Reserve(ctx context.Context, req billing.HoldRequest) (billing.Hold, error) {
	if billing.IsLease(req.RequestID) {
		return billing.Hold{}, errors.New("a request id cannot name a credit lease")
	}
	now := l.now()
	l.mu.Lock()
	u := l.userOf(req.User, req.Plan)
	u.rate.add(now, req.Want)
	if h, ok := l.carve(u, req, now); ok {
		l.mu.Unlock()
		return h, nil
	}
	// The current lease cannot serve this hold (no room, or too old): it
	// is retired, its free part goes back now, and a new one may follow,
	// at least twice what the old one had out.
	size := max(l.size(u, req, now), 2*outstanding(u.current))
	stale := l.retireCurrent(u)
	take := !u.taking && now.After(u.noLease) && u.rate.perSecond(now) >= l.cfg.HotRate && req.Want > 0
	wait := u.ready
	if take {
		u.taking, u.ready = true, make(chan struct{})
	}
	l.mu.Unlock()
	l.shrink(ctx, stale)
	if take {
		if h, ok := l.takeAndCarve(ctx, req, size); ok {
			return h, nil
		}
	} else if h, ok := l.carveAfter(ctx, wait, req); ok {
		return h, nil
	}
	return l.LeaseLedger.Reserve(ctx, req)
}

// userOf is the state of a user's holds on one credit plan: a user billed
// on two plans (two sites) has a lease for each. The caller holds l.mu.
func (l *Ledger) userOf(id string, plan billing.CreditPlan) *user {
	k := key(id, plan)
	u := l.users[k]
	if u == nil {
		u = &user{id: id}
		l.users[k] = u
	}
	return u
}

// carve serves req from the user's current lease when it has room.
// The caller holds l.mu.
func (l *Ledger) carve(u *user, req billing.HoldRequest, now time.Time) (billing.Hold, bool) {
	ls := u.current
	if ls == nil || ls.retired || now.Sub(ls.born) >= l.cfg.MaxAge || req.Want < req.Min {
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

// takeAndCarve takes a lease of size for req's user, expiring when req's
// hold would (past it the sweeper may close it), at most a quarter of
// the pool (maxShare) so that the rest stays for the user's other
// instances, and carves req's hold from it. ok is false when no lease
// could be had: the caller takes a hold of its own.
func (l *Ledger) takeAndCarve(ctx context.Context, req billing.HoldRequest, size billing.Nano) (billing.Hold, bool) {
	now := l.now()
	if b, err := l.LeaseLedger.Balances(ctx, req.User); err == nil {
		size = min(size, b.Pool(req.Plan)/maxShare)
	} else {
		size = 0
	}
	if size < minHolds*req.Want {
		l.mu.Lock()
		u := l.userOf(req.User, req.Plan)
		u.noLease = now.Add(retryLeaseAfter)
		u.took()
		l.mu.Unlock()
		return billing.Hold{}, false
	}
	lr := billing.HoldRequest{
		RequestID: billing.LeaseID(l.cfg.Owner, l.seq.Add(1)), User: req.User, Plan: req.Plan, Want: size, Min: size,
		Owner: l.cfg.Owner, At: now, Expires: req.Expires, LogID: billing.NewLogID(now),
	}
	h, err := l.LeaseLedger.Reserve(ctx, lr)
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.userOf(req.User, req.Plan)
	u.took()
	if err != nil {
		// Too little credit for a lease, or the database is away (which
		// the request's own hold will say): holds per request for a while.
		u.noLease = now.Add(retryLeaseAfter)
		if !refused(err) {
			// The lease may have been taken before the answer was lost:
			// Tick reads it back and closes it.
			lost := newLease(billing.Hold{RequestID: lr.RequestID, User: lr.User, Plan: lr.Plan, At: lr.At, Expires: lr.Expires, LogID: lr.LogID}, now)
			lost.retired, lost.gone = true, true
			u.retired = append(u.retired, lost)
		}
		return billing.Hold{}, false
	}
	u.current = newLease(h, now)
	l.cfg.Observer.Taken(h)
	return l.carve(u, req, now)
}

// size is the lease to take for req: what the user's holds took over
// Span at their recent rate, and at least minHolds holds like req's.
// The caller holds l.mu.
func (l *Ledger) size(u *user, req billing.HoldRequest, now time.Time) billing.Nano {
	perSec := u.rate.nanoPerSecond(now)
	s := billing.Nano(perSec * l.cfg.Span.Seconds())
	return max(s, minHolds*req.Want)
}

// took ends a take: the holds waiting for it try the new lease. The
// caller holds Ledger.mu.
func (u *user) took() {
	u.taking = false
	if u.ready != nil {
		close(u.ready)
		u.ready = nil
	}
}

// carveAfter waits for the lease another hold of the user is taking (one
// round trip, as a hold of its own would cost) and carves req from it.
func (l *Ledger) carveAfter(ctx context.Context, wait chan struct{}, req billing.HoldRequest) (billing.Hold, bool) {
	if wait == nil {
		return billing.Hold{}, false
	}
	select {
	case <-wait:
	case <-ctx.Done():
		return billing.Hold{}, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.carve(l.userOf(req.User, req.Plan), req, l.now())
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
