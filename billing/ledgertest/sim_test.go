package ledgertest_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

var (
	conservationSeed  = flag.Uint64("ledgertest.seed", 0, "run TestConservation with this seed only")
	conservationSeeds = flag.Uint64("ledgertest.seeds", 8, "run TestConservation with the seeds 1 to N")
)

// TestConservation drives the store with a small settlement pipeline of
// its own (reserve, settle alone or in batches, write log rows, clear
// receipts, sweep, crash and forget) under random faults and clock jumps,
// and checks the money invariant (Snapshot.Check) after every step; then
// it drains everything and checks that each settled request has one log
// row. The same seed must give the same store twice. A failing seed is
// printed; replay it with -ledgertest.seed=N; run more seeds with
// -ledgertest.seeds=N.
func TestConservation(t *testing.T) {
	var seeds []uint64
	for seed := uint64(1); seed <= *conservationSeeds; seed++ {
		seeds = append(seeds, seed)
	}
	if *conservationSeed != 0 {
		seeds = []uint64{*conservationSeed}
	}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			a := runSim(t, seed, 600)
			b := runSim(t, seed, 600)
			assert.Equal(t, a, b, "seed %d: the same seed gives the same store", seed)
		})
	}
}

// sim is the pipeline driving the store: what one gateway process knows.
type sim struct {
	t     *testing.T
	rnd   *rand.Rand
	s     *ledgertest.Store
	now   time.Time
	owner string
	boots int
	n     int
	users []simUser
	open  map[string]billing.Hold // holds this process took and has not settled
	toLog map[string]simReceipt   // settled, log row not written
	clear map[string][]string     // per user, receipts whose rows are written
	// exact are receipts to clear that may be gone already (a call that
	// dropped them may have lost its answer): they go only by
	// ClearReceipts, never with a hold, whose update counts them out
	// whether they exist or not.
	exact map[string][]string
	// noRow are the receipts dropped without a row (a release by the sweeper).
	noRow map[string]bool
	// faulty makes the next calls fail at random.
	faulty bool
}

type simUser struct {
	id   string
	plan billing.CreditPlan
}

type simReceipt struct {
	user string
	rc   billing.Receipt
}

const simLease = 2 * time.Minute

func runSim(t *testing.T, seed uint64, steps int) ledgertest.Snapshot {
	sm := &sim{
		t: t, rnd: rand.New(rand.NewPCG(seed, 0x1edbe7)), s: ledgertest.New(), now: t0,
		open: map[string]billing.Hold{}, toLog: map[string]simReceipt{}, clear: map[string][]string{}, exact: map[string][]string{}, noRow: map[string]bool{},
	}
	sm.boot()
	sm.s.SetClock(func() time.Time { return sm.now })
	sm.s.SetFaults(sm.fault)
	for i, plan := range []billing.CreditPlan{planNew, planNew, planOld, planOld} {
		id := fmt.Sprintf("u%d", i)
		sm.s.AddUser(id, billing.Balances{CreditsNew: sm.amount(2), Credits: sm.amount(1) - usd(0.2), RefCredits: sm.amount(1)})
		sm.users = append(sm.users, simUser{id: id, plan: plan})
	}
	sm.faulty = true
	for step := 0; step < steps; step++ {
		what := sm.step()
		if err := sm.s.Snapshot().Check(); err != nil {
			t.Fatalf("seed %d, step %d (%s): %v\nreplay: go test -run 'TestConservation' ./billing/ledgertest -ledgertest.seed=%d",
				seed, step, what, err, seed)
		}
	}
	sm.drain()
	snap := sm.s.Snapshot()
	require.NoError(t, snap.Check(), "seed %d: after draining", seed)
	sm.checkDrained(snap)
	return snap
}

// amount is a random amount up to max USD, in steps of a tenth of a cent.
func (sm *sim) amount(max float64) billing.Nano {
	return billing.Nano(sm.rnd.Int64N(int64(max*1000)+1)) * usd(0.001)
}

// fault fails a tenth of the calls while faulty: before, after or timed
// out (Timeout, the stall that does not wait for the wall clock).
func (sm *sim) fault(ledgertest.Op) ledgertest.Fault {
	if !sm.faulty || sm.rnd.IntN(10) != 0 {
		return ledgertest.Pass
	}
	return []ledgertest.Fault{ledgertest.FailBefore, ledgertest.FailAfter, ledgertest.Timeout}[sm.rnd.IntN(3)]
}

// ctx is a call's context. Its deadline is far: a context that ends on
// the wall clock would make the run depend on the machine's speed.
func (sm *sim) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), time.Minute)
}

func (sm *sim) boot() {
	sm.boots++
	sm.owner = fmt.Sprintf("boot%d", sm.boots)
}

// step runs one random step and says what it was.
func (sm *sim) step() string {
	switch r := sm.rnd.IntN(100); {
	case r < 30:
		return sm.reserve()
	case r < 50:
		return sm.settleOne()
	case r < 58:
		return sm.settleMany()
	case r < 70:
		return sm.writeLogs()
	case r < 78:
		return sm.flushClears()
	case r < 86:
		return sm.sweep()
	case r < 97:
		d := time.Duration(sm.rnd.Int64N(int64(90 * time.Second)))
		sm.now = sm.now.Add(d)
		ctx, cancel := sm.ctx()
		defer cancel()
		_ = sm.s.Heartbeat(ctx, sm.owner, sm.now)
		return "clock +" + d.String()
	}
	// A crash: what the process knew is gone; its holds and receipts are
	// the sweeper's.
	sm.open, sm.toLog, sm.clear, sm.exact = map[string]billing.Hold{}, map[string]simReceipt{}, map[string][]string{}, map[string][]string{}
	sm.boot()
	return "crash"
}

func (sm *sim) reserve() string {
	u := sm.users[sm.rnd.IntN(len(sm.users))]
	sm.n++
	rid := fmt.Sprintf("r%d", sm.n)
	var lid billing.LogID
	copy(lid[:], rid)
	want := sm.amount(0.5)
	req := billing.HoldRequest{
		RequestID: rid, User: u.id, Plan: u.plan, Want: want, Min: want / billing.Nano(1+sm.rnd.IntN(4)), Input: want / 3,
		Owner: sm.owner, At: sm.now, Expires: sm.now.Add(simLease), LogID: lid, Clear: sm.clear[u.id],
	}
	delete(sm.clear, u.id)
	ctx, cancel := sm.ctx()
	defer cancel()
	h, err := sm.s.Reserve(ctx, req)
	if err != nil && !isRefusal(err) && sm.rnd.IntN(2) == 0 {
		// The answer may be lost: ask again for a zero hold, which finds it.
		req.Want, req.Min = 0, 0
		h, err = sm.s.Reserve(ctx, req)
	}
	if err != nil {
		// The receipts to clear go by ClearReceipts now: a Clear with the
		// next hold would count them out twice if this one dropped them.
		sm.clearExact(u.id, req.Clear)
		return "reserve " + rid + ": " + err.Error()
	}
	sm.open[rid] = h
	return "reserve " + rid
}

func isRefusal(err error) bool {
	var ie *billing.InsufficientError
	return errors.As(err, &ie) || errors.Is(err, billing.ErrUserNotFound)
}

// clearExact drops receipts right away, as the caller's flusher does.
func (sm *sim) clearExact(user string, ids []string) {
	if len(ids) > 0 {
		ctx, cancel := sm.ctx()
		defer cancel()
		if sm.s.ClearReceipts(ctx, user, ids) != nil {
			sm.exact[user] = append(sm.exact[user], ids...)
		}
	}
}

// pick returns a random open hold, sorted by id so runs repeat.
func (sm *sim) pick() (billing.Hold, bool) {
	if len(sm.open) == 0 {
		return billing.Hold{}, false
	}
	ids := make([]string, 0, len(sm.open))
	for id := range sm.open {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return sm.open[ids[sm.rnd.IntN(len(ids))]], true
}

func (sm *sim) settleOne() string {
	h, ok := sm.pick()
	if !ok {
		return "settle: nothing open"
	}
	cost := sm.amount(0.7) // within, above the hold, above the pool
	ctx, cancel := sm.ctx()
	defer cancel()
	rc, _, err := sm.s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest})
	switch {
	case errors.Is(err, billing.ErrNoHold):
		delete(sm.open, h.RequestID) // swept and logged
	case err != nil:
		return "settle " + h.RequestID + ": " + err.Error()
	default:
		delete(sm.open, h.RequestID)
		sm.toLog[h.RequestID] = simReceipt{user: h.User, rc: rc}
	}
	return "settle " + h.RequestID
}

func (sm *sim) settleMany() string {
	var reqs []billing.SettleRequest
	for range 1 + sm.rnd.IntN(4) {
		h, ok := sm.pick()
		if !ok || slices.ContainsFunc(reqs, func(r billing.SettleRequest) bool { return r.Hold.RequestID == h.RequestID }) {
			continue
		}
		cost := billing.Nano(sm.rnd.Int64N(int64(h.Amount()) + 1))
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest})
	}
	if len(reqs) == 0 {
		return "settleMany: nothing open"
	}
	ctx, cancel := sm.ctx()
	defer cancel()
	rcs, err := sm.s.SettleMany(ctx, reqs)
	if err != nil {
		return "settleMany: " + err.Error() // settled one by one later
	}
	for i, r := range reqs {
		delete(sm.open, r.Hold.RequestID)
		sm.toLog[r.Hold.RequestID] = simReceipt{user: r.Hold.User, rc: rcs[i]}
	}
	return fmt.Sprintf("settleMany %d", len(reqs))
}

// writeLogs writes the rows of the receipts, then queues them for clearing.
func (sm *sim) writeLogs() string {
	ids := make([]string, 0, len(sm.toLog))
	for id := range sm.toLog {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	rows := make([]billing.RequestLog, 0, len(ids))
	for _, id := range ids {
		r := sm.toLog[id]
		rows = append(rows, logRow(r.user, r.rc))
	}
	ctx, cancel := sm.ctx()
	defer cancel()
	if err := sm.s.InsertRequestLogs(ctx, rows); err != nil {
		return "logs: " + err.Error()
	}
	for _, id := range ids {
		u := sm.toLog[id].user
		sm.clear[u] = append(sm.clear[u], id)
		delete(sm.toLog, id)
	}
	return fmt.Sprintf("logs %d", len(rows))
}

func (sm *sim) flushClears() string {
	for _, m := range []map[string][]string{sm.clear, sm.exact} {
		for _, u := range sortedUsers(m) {
			ids := m[u]
			delete(m, u)
			sm.clearExact(u, ids)
		}
	}
	return "clear"
}

func sortedUsers(m map[string][]string) []string {
	out := make([]string, 0, len(m))
	for u := range m {
		out = append(out, u)
	}
	slices.Sort(out)
	return out
}

// sweep resolves orphans as the engine does: holds with the charge_input
// policy, then their rows; receipts' rows; released receipts without one.
func (sm *sim) sweep() string {
	ctx, cancel := sm.ctx()
	defer cancel()
	os, err := sm.s.Orphans(ctx, billing.OrphanQuery{Now: sm.now, OwnerDeadline: sm.now.Add(-time.Minute), ReceiptAge: time.Minute})
	if err != nil {
		return "sweep: " + err.Error()
	}
	for _, o := range os {
		sm.resolve(o)
	}
	return fmt.Sprintf("sweep %d", len(os))
}

func (sm *sim) resolve(o billing.Orphan) {
	h, rc := o.Hold, o.Receipt
	ctx, cancel := sm.ctx()
	defer cancel()
	if rc != nil && rc.Cost == 0 && rc.Charged == 0 {
		sm.noRow[h.RequestID] = true
		if sm.s.ClearReceipts(ctx, h.User, []string{h.RequestID}) != nil {
			sm.exact[h.User] = append(sm.exact[h.User], h.RequestID)
		}
		sm.forget(h)
		return
	}
	if rc == nil {
		r, _, err := sm.s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: billing.OrphanChargeInput.Cost(h), By: billing.SettledBySweeper})
		if err != nil || r.By != billing.SettledBySweeper {
			return
		}
		rc = &r
	}
	if sm.s.InsertRequestLogs(ctx, []billing.RequestLog{logRow(h.User, *rc)}) != nil {
		return
	}
	if sm.s.ClearReceipts(ctx, h.User, []string{h.RequestID}) != nil {
		sm.exact[h.User] = append(sm.exact[h.User], h.RequestID)
	}
	sm.forget(h)
}

// forget is what the sweeper of this process tells its pipeline about a
// receipt it drops: a hold must not name it again in its Clear, which would
// count it out twice. (Another instance's sweeper cannot tell.)
func (sm *sim) forget(h billing.Hold) {
	delete(sm.toLog, h.RequestID)
	sm.clear[h.User] = slices.DeleteFunc(sm.clear[h.User], func(id string) bool { return id == h.RequestID })
}

// drain stops the faults and resolves everything: the open holds settled,
// rows written, receipts cleared, then the sweeper past every lease.
func (sm *sim) drain() {
	sm.faulty = false
	for len(sm.open) > 0 {
		sm.settleOne()
	}
	sm.writeLogs()
	sm.flushClears()
	for range 2 {
		sm.now = sm.now.Add(time.Hour)
		sm.sweep()
	}
}

// checkDrained: nothing is held or kept, and every settled request has
// exactly one log row, or none when it was released for free.
func (sm *sim) checkDrained(snap ledgertest.Snapshot) {
	t := sm.t
	var settled int64
	for _, u := range snap.Users {
		assert.Empty(t, u.Holds, "user %s: holds left", u.ID)
		assert.Empty(t, u.Receipts, "user %s: receipts left", u.ID)
		settled += u.Settled
	}
	logged := map[string]bool{}
	for _, row := range snap.Logs {
		logged[row.RequestID] = true
	}
	for id := range sm.noRow {
		logged[id] = true
	}
	assert.Equal(t, int(settled), len(logged), "every settled request logged once")
	assert.Positive(t, settled, "the run settled something")
}
