package lease_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
	"github.com/trollllm/caddy-llm-billing/lease"
)

var plan, _ = billing.ParseCreditPlan([]string{billing.FieldCreditsNew})

func usd(v float64) billing.Nano { return billing.NanoFromUSD(v) }

// fixture is one store, a clock, and a count of the store's operations.
type fixture struct {
	t     *testing.T
	store *ledgertest.Store
	mu    sync.Mutex
	now   time.Time
	ops   map[ledgertest.Op]*atomic.Int64
	fault func(ledgertest.Op) ledgertest.Fault
}

func newFixture(t *testing.T, balance billing.Nano) *fixture {
	f := &fixture{t: t, store: ledgertest.New(), now: time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC), ops: map[ledgertest.Op]*atomic.Int64{}}
	for _, op := range []ledgertest.Op{ledgertest.OpReserve, ledgertest.OpSettle, ledgertest.OpSettleMany, ledgertest.OpFlushLease, ledgertest.OpBalances} {
		f.ops[op] = &atomic.Int64{}
	}
	f.store.SetClock(f.clock)
	f.store.SetFaults(func(op ledgertest.Op) ledgertest.Fault {
		if c := f.ops[op]; c != nil {
			c.Add(1)
		}
		f.mu.Lock()
		hook := f.fault
		f.mu.Unlock()
		if hook != nil {
			return hook(op)
		}
		return ledgertest.Pass
	})
	f.store.AddUser("alice", billing.Balances{CreditsNew: balance})
	return f
}

func (f *fixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fixture) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func (f *fixture) setFault(hook func(ledgertest.Op) ledgertest.Fault) {
	f.mu.Lock()
	f.fault = hook
	f.mu.Unlock()
}

func (f *fixture) ledger(owner string, conn *ledgertest.Store) *lease.Ledger {
	// Leases are taken in place: what a test sees does not depend on
	// when a goroutine runs.
	return lease.New(lease.Config{Store: conn, Owner: owner, Now: f.clock, Go: func(take func()) { take() }})
}

func (f *fixture) count(op ledgertest.Op) int64 { return f.ops[op].Load() }

func (f *fixture) check() ledgertest.UserState {
	snap := f.store.Snapshot()
	require.NoError(f.t, snap.Check())
	u, ok := snap.User("alice")
	require.True(f.t, ok)
	return u
}

var seq atomic.Int64

func (f *fixture) hold(l *lease.Ledger, want billing.Nano) (billing.Hold, error) {
	now := f.clock()
	return l.Reserve(context.Background(), billing.HoldRequest{
		RequestID: fmt.Sprintf("req-%d", seq.Add(1)), User: "alice", Plan: plan, Want: want, Min: want / 10,
		Input: want / 10, Owner: "test", At: now, Expires: now.Add(15 * time.Minute), LogID: billing.NewLogID(now),
	})
}

func settleReq(h billing.Hold, cost billing.Nano) billing.SettleRequest {
	return billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest}
}

// A busy user's holds come from a lease after the first few, and a batch
// of their settlements is one write.
func TestBusyUserServedFromLease(t *testing.T) {
	f := newFixture(t, usd(100))
	l := f.ledger("i1/a", f.store)
	ctx := context.Background()
	var holds []billing.Hold
	for i := 0; i < 50; i++ {
		h, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		holds = append(holds, h)
	}
	assert.Empty(t, holds[0].Lease, "the first hold of a user not yet busy is its own")
	assert.NotEmpty(t, holds[49].Lease, "a busy user's holds come from a lease")
	assert.LessOrEqual(t, f.count(ledgertest.OpReserve), int64(5), "most holds cost no database write")

	var reqs []billing.SettleRequest
	leases := map[string]bool{}
	for _, h := range holds {
		reqs = append(reqs, settleReq(h, usd(0.004)))
		if h.Lease != "" {
			leases[h.Lease] = true
		}
	}
	before := f.count(ledgertest.OpFlushLease)
	rcs, err := l.SettleMany(ctx, reqs)
	require.NoError(t, err)
	require.Len(t, rcs, 50)
	assert.Equal(t, int64(len(leases)), f.count(ledgertest.OpFlushLease)-before, "one write per lease for its settlements")
	assert.LessOrEqual(t, len(leases), 2, "a lease is sized for the user's rate: the second one lasts")
	u := f.check()
	assert.Equal(t, usd(0.004)*50, u.Charged[billing.FieldCreditsNew])

	// Idle, the lease goes back: the pool is what the user had minus the charges.
	f.advance(lease.DefaultIdle + time.Second)
	l.Tick(ctx)
	u = f.check()
	assert.Empty(t, u.Holds)
	assert.Equal(t, usd(100)-usd(0.2), u.Balance.CreditsNew)
}

// A lease never takes more than a quarter of the pool, and a pool too
// small for a useful lease is served hold by hold.
func TestLeaseBoundedByPool(t *testing.T) {
	f := newFixture(t, usd(1))
	l := f.ledger("i1/a", f.store)
	for i := 0; i < 20; i++ {
		h, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		for _, held := range f.check().Holds {
			if billing.IsLease(held.RequestID) {
				assert.LessOrEqual(t, held.Amount(), usd(0.25))
			}
		}
		_ = h
	}
	small := newFixture(t, usd(0.05))
	ls := small.ledger("i1/a", small.store)
	for i := 0; i < 10; i++ {
		h, err := small.hold(ls, usd(0.01))
		if err != nil {
			break
		}
		assert.Empty(t, h.Lease, "a pool that pays for a few holds gets no lease")
	}
}

// Three instances with leases on one $1 pool, many concurrent requests
// costing more than they reserve: the fleet never spends more than $1, and
// every settled request is charged once.
func TestFleetNeverOverspends(t *testing.T) {
	f := newFixture(t, usd(1))
	ctx := context.Background()
	var ledgers []*lease.Ledger
	for i := 0; i < 3; i++ {
		ledgers = append(ledgers, f.ledger(fmt.Sprintf("i%d/a", i), f.store.Conn()))
	}
	var wg sync.WaitGroup
	var served, charged atomic.Int64
	for w := 0; w < 12; w++ {
		wg.Add(1)
		go func(l *lease.Ledger) {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				h, err := f.hold(l, usd(0.01))
				if err != nil {
					continue
				}
				rc, _, err := l.Settle(ctx, settleReq(h, usd(0.008)))
				require.NoError(t, err)
				served.Add(1)
				charged.Add(int64(rc.Charged))
			}
		}(ledgers[w%3])
	}
	wg.Wait()
	for _, l := range ledgers {
		l.Close(ctx)
	}
	u := f.check()
	assert.Empty(t, u.Holds, "every lease went back")
	assert.Equal(t, billing.Nano(charged.Load()), u.Charged[billing.FieldCreditsNew])
	assert.Equal(t, usd(1)-billing.Nano(charged.Load()), u.Balance.CreditsNew)
	assert.GreaterOrEqual(t, u.Balance.CreditsNew, billing.Nano(0))
	assert.Greater(t, served.Load(), int64(100), "the pool paid for 125 requests")
}

// A flush whose answer is lost is sent again before anything else, and a
// settlement asked again finds its receipt: charged once.
func TestLostFlushAnswerChargesOnce(t *testing.T) {
	f := newFixture(t, usd(100))
	l := f.ledger("i1/a", f.store)
	ctx := context.Background()
	var holds []billing.Hold
	for len(holds) < 10 {
		h, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		if h.Lease != "" {
			holds = append(holds, h)
		} else {
			_, _, err = l.Settle(ctx, settleReq(h, 0))
			require.NoError(t, err)
		}
	}
	var reqs []billing.SettleRequest
	for _, h := range holds {
		reqs = append(reqs, settleReq(h, usd(0.005)))
	}
	f.setFault(func(op ledgertest.Op) ledgertest.Fault {
		if op == ledgertest.OpFlushLease {
			return ledgertest.FailAfter
		}
		return ledgertest.Pass
	})
	_, err := l.SettleMany(ctx, reqs)
	require.Error(t, err)
	f.setFault(nil)
	for _, r := range reqs {
		rc, _, err := l.Settle(ctx, r)
		require.NoError(t, err)
		assert.Equal(t, usd(0.005), rc.Charged)
	}
	u := f.check()
	assert.Equal(t, usd(0.05), u.Charged[billing.FieldCreditsNew])
	l.Close(ctx)
	u = f.check()
	assert.Equal(t, usd(100)-usd(0.05), u.Balance.CreditsNew)
}

// A lease the sweeper closed (its owner presumed dead): the requests it
// served settle from the pool, each once.
func TestLeaseClosedUnderItsOwner(t *testing.T) {
	f := newFixture(t, usd(100))
	l := f.ledger("i1/a", f.store)
	ctx := context.Background()
	var carved billing.Hold
	for carved.Lease == "" {
		h, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		carved = h
	}
	var leaseHold billing.Hold
	for _, h := range f.check().Holds {
		if billing.IsLease(h.RequestID) {
			leaseHold = h
		}
	}
	_, _, err := f.store.FlushLease(ctx, billing.LeaseFlush{Lease: leaseHold, Close: true})
	require.NoError(t, err)
	rc, _, err := l.Settle(ctx, settleReq(carved, usd(0.007)))
	require.NoError(t, err)
	assert.Equal(t, usd(0.007), rc.Charged)
	_, _, err = l.Settle(ctx, settleReq(carved, usd(0.007)))
	require.NoError(t, err)
	u := f.check()
	assert.Equal(t, usd(0.007), u.Charged[billing.FieldCreditsNew], "charged once")
}

// A user busy for two minutes at 30 requests a second, each answered in
// 200 ms, their settlements written in batches each second: the store sees
// one write per lease per batch, and a new lease now and then, far below a
// write per request.
func TestSteadyUserCostsAboutOneWritePerBatch(t *testing.T) {
	f := newFixture(t, usd(1000))
	l := f.ledger("i1/a", f.store)
	ctx := context.Background()
	const perSecond, seconds = 30, 120
	type running struct {
		h    billing.Hold
		done time.Time
	}
	var inFlight []running
	var queued []billing.SettleRequest
	var charged billing.Nano
	for tick := 0; tick < seconds*perSecond; tick++ {
		f.advance(time.Second / perSecond)
		now := f.clock()
		h, err := f.hold(l, usd(0.015))
		require.NoError(t, err)
		inFlight = append(inFlight, running{h, now.Add(200 * time.Millisecond)})
		for len(inFlight) > 0 && !inFlight[0].done.After(now) {
			queued = append(queued, settleReq(inFlight[0].h, usd(0.0005)))
			charged += usd(0.0005)
			inFlight = inFlight[1:]
		}
		if tick%perSecond == perSecond-1 {
			_, err := l.SettleMany(ctx, queued)
			require.NoError(t, err)
			queued = nil
			l.Tick(ctx)
		}
	}
	ops := f.count(ledgertest.OpReserve) + f.count(ledgertest.OpSettle) + f.count(ledgertest.OpSettleMany) +
		f.count(ledgertest.OpFlushLease) + f.count(ledgertest.OpBalances)
	perRequest := float64(ops) / (seconds * perSecond)
	t.Logf("%d store operations for %d requests (%.3f per request): reserve %d, flush %d, balances %d, settle %d+%d",
		ops, seconds*perSecond, perRequest, f.count(ledgertest.OpReserve), f.count(ledgertest.OpFlushLease),
		f.count(ledgertest.OpBalances), f.count(ledgertest.OpSettle), f.count(ledgertest.OpSettleMany))
	assert.Less(t, perRequest, 0.05, "about one write per batch for a user at 30 requests a second")
	assert.GreaterOrEqual(t, f.count(ledgertest.OpFlushLease), int64(seconds), "each batch charges the lease")

	for _, r := range inFlight {
		queued = append(queued, settleReq(r.h, usd(0.0005)))
		charged += usd(0.0005)
	}
	_, err := l.SettleMany(ctx, queued)
	require.NoError(t, err)
	l.Close(ctx)
	u := f.check()
	assert.Empty(t, u.Holds)
	assert.Equal(t, charged, u.Charged[billing.FieldCreditsNew])
	assert.Equal(t, usd(1000)-charged, u.Balance.CreditsNew)
}

// A lease is taken off the request path: while the store is slow to give
// it, a hold waits for it at most TakeWait and is then its own; once it
// is there, holds are carved from it.
func TestHoldsWaitAtMostTakeWait(t *testing.T) {
	f := newFixture(t, usd(100))
	slow := &slowLeases{LeaseLedger: f.store, gate: make(chan struct{})}
	l := lease.New(lease.Config{Store: slow, Owner: "i1/a", Now: f.clock, TakeWait: 5 * time.Millisecond})
	for i := 0; i < 20; i++ {
		h, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		assert.Empty(t, h.Lease, "no lease yet")
	}
	require.Eventually(t, func() bool { return slow.waiting.Load() == 1 }, 5*time.Second, time.Millisecond,
		"one lease is being taken, for all these holds")
	close(slow.gate)
	require.Eventually(t, func() bool {
		h, err := f.hold(l, usd(0.01))
		return err == nil && h.Lease != ""
	}, 5*time.Second, time.Millisecond)
	assert.Equal(t, int32(1), slow.waiting.Load())
	l.Close(context.Background())
	f.check()
}

// A hold that finds a lease being taken for its user waits for it and is
// carved from it, instead of costing the store a write while the lease
// comes.
func TestHoldsWaitForALeaseBeingTaken(t *testing.T) {
	f := newFixture(t, usd(100))
	slow := &slowLeases{LeaseLedger: f.store, gate: make(chan struct{})}
	l := lease.New(lease.Config{Store: slow, Owner: "i1/a", Now: f.clock, TakeWait: time.Minute})
	got := make(chan billing.Hold, 100)
	errs := make(chan error, 1)
	go func() {
		defer close(got)
		for range 100 {
			h, err := f.hold(l, usd(0.01))
			if err != nil {
				errs <- err
				return
			}
			got <- h
			if h.Lease != "" {
				return
			}
		}
	}()
	require.Eventually(t, func() bool { return slow.waiting.Load() == 1 }, 5*time.Second, time.Millisecond)
	before := len(got)
	close(slow.gate)
	var holds []billing.Hold
	for h := range got {
		holds = append(holds, h)
	}
	require.Empty(t, errs)
	require.Len(t, holds, before+1, "one hold waited for the lease")
	assert.NotEmpty(t, holds[before].Lease, "and was carved from it")
	for _, h := range holds[:before] {
		assert.Empty(t, h.Lease, "the holds before the lease was asked for")
	}
	l.Close(context.Background())
	f.check()
}

// slowLeases holds every lease's Reserve until gate is closed.
type slowLeases struct {
	billing.LeaseLedger
	gate    chan struct{}
	waiting atomic.Int32
}

func (s *slowLeases) Reserve(ctx context.Context, req billing.HoldRequest) (billing.Hold, error) {
	if billing.IsLease(req.RequestID) {
		s.waiting.Add(1)
		<-s.gate
	}
	return s.LeaseLedger.Reserve(ctx, req)
}

// The receipts a lease's carved holds name for dropping go out with its
// flushes at most billing.MaxClear at a time: more would be refused.
func TestFlushDropsAtMostMaxClear(t *testing.T) {
	f := newFixture(t, usd(100))
	l := f.ledger("i1/a", f.store)
	ctx := context.Background()
	var holds []billing.Hold
	for len(holds) < 3 {
		now := f.clock()
		req := billing.HoldRequest{
			RequestID: fmt.Sprintf("req-%d", seq.Add(1)), User: "alice", Plan: plan, Want: usd(0.01), Min: usd(0.001),
			Owner: "test", At: now, Expires: now.Add(15 * time.Minute), LogID: billing.NewLogID(now),
		}
		for i := range 100 {
			req.Clear = append(req.Clear, fmt.Sprintf("%s-gone-%d", req.RequestID, i))
		}
		h, err := l.Reserve(ctx, req)
		require.NoError(t, err)
		if h.Lease != "" {
			holds = append(holds, h)
			continue
		}
		_, err = l.SettleMany(ctx, []billing.SettleRequest{settleReq(h, 0)})
		require.NoError(t, err)
	}
	before := f.count(ledgertest.OpFlushLease)
	for _, h := range holds {
		_, err := l.SettleMany(ctx, []billing.SettleRequest{settleReq(h, usd(0.004))})
		require.NoError(t, err, "a flush carries at most MaxClear receipts")
	}
	assert.Equal(t, int64(3), f.count(ledgertest.OpFlushLease)-before)
	u := f.check()
	assert.Equal(t, usd(0.004)*3, u.Charged[billing.FieldCreditsNew])
}

// takenLeases records the leases a Ledger takes.
type takenLeases struct {
	mu     sync.Mutex
	leases []billing.Hold
}

func (o *takenLeases) Taken(h billing.Hold) {
	o.mu.Lock()
	o.leases = append(o.leases, h)
	o.mu.Unlock()
}
func (o *takenLeases) Closed(billing.Hold) {}

// A user who starts busy gets a first lease sized for the pace of the
// second that has begun, not for its first few holds: at 50 holds a second
// a lease of 8 holds would be spent, and another taken, every 160 ms.
func TestFirstLeaseSizedForThePaceOfTheSecond(t *testing.T) {
	f := newFixture(t, usd(100))
	obs := &takenLeases{}
	l := lease.New(lease.Config{Store: f.store, Owner: "i1/a", Now: f.clock, Observer: obs, Go: func(take func()) { take() }})
	for range 10 {
		_, err := f.hold(l, usd(0.01))
		require.NoError(t, err)
		f.advance(20 * time.Millisecond)
	}
	require.NotEmpty(t, obs.leases)
	// Span 5 s at 50 holds a second is 250 holds; the pace is counted
	// over at least 250 ms, so the first lease covers at least 40.
	assert.GreaterOrEqual(t, obs.leases[0].Amount(), 40*usd(0.01), "first lease")
	l.Close(context.Background())
	f.check()
}
