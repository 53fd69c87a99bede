package settle_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
	"github.com/trollllm/caddy-llm-billing/lease"
	"github.com/trollllm/caddy-llm-billing/settle"
	"github.com/trollllm/caddy-llm-billing/spool"
)

var (
	simSeeds = flag.Int("sim.seeds", 300, "how many seeds TestSimulation runs")
	simSeed  = flag.Int64("sim.seed", 0, "run only this seed (to replay a failure)")
	simSteps = flag.Int("sim.steps", 1000, "random steps per seed")
	simOps   = flag.Bool("sim.ops", false, "trace every store call, not only the faulty ones")
)

// TestSimulation drives the settlement pipeline of a small fleet on one
// in-memory store, one seed at a time, through thousands of random steps:
// requests of random cost taken and finished, batches settled, retries,
// sweeps, heartbeats, clock jumps past the lease and the owner timeout,
// instances killed (in-flight work lost, the journal kept) and restarted,
// and storms of database faults (a write refused, a write applied whose
// answer is lost, a stall until the deadline). Half the seeds run the
// instances with credit leases (package lease): slices of the users' pools
// taken, carved, charged in batches, shrunk, returned, lost with a killed
// instance and closed by a sweeper. After every step it checks
// the money invariant of every user (balance + holds + charged = what the
// user was given, no field below zero, no request logged twice); at the
// end, with the database healthy again and every instance drained, it
// checks that no hold or receipt is left, every billed request has its one
// log row, and each row charged what the request cost unless the sweeper
// resolved it first. A failing seed prints how to replay it.
func TestSimulation(t *testing.T) {
	seeds := make([]int64, 0, *simSeeds)
	if *simSeed != 0 {
		seeds = append(seeds, *simSeed)
	} else {
		for i := 1; i <= *simSeeds; i++ {
			seeds = append(seeds, int64(i))
		}
	}
	if testing.Short() && *simSeed == 0 {
		seeds = seeds[:min(len(seeds), 20)]
	}
	var holds, carved int
	for _, seed := range seeds {
		h, c, err := simulate(seed, *simSteps)
		if err != nil {
			t.Fatalf("seed %d: %v\nreplay: go test ./settle -run 'TestSimulation$' -sim.seed=%d -sim.steps=%d -v", seed, err, seed, *simSteps)
		}
		holds, carved = holds+h, carved+c
	}
	t.Logf("%d seeds: %d holds, %d of them carved from credit leases", len(seeds), holds, carved)
	if len(seeds) >= 20 {
		assert.Greater(t, carved, holds/20, "the seeds with leases hardly used them")
	}
}

// traceLen is how many of the last steps a failure prints.
const traceLen = 40

const (
	simLease = 2 * time.Minute
	// simOpLimit bounds each store call. The store answers at once (a
	// timeout is a fault it returns, not a wait), so the bound is never
	// reached and a loaded machine cannot change a seed's course.
	simOpLimit = time.Minute
)

// world is one simulated fleet: instances on one store, a clock, and what
// the clients were promised.
type world struct {
	rng       *rand.Rand
	now       time.Time
	store     *ledgertest.Store
	inst      []*instance
	users     []string
	plans     []billing.CreditPlan
	faultRate float64
	leases    bool // instances serve holds from credit leases
	next      int
	billed    map[string]billing.Nano // request id → cost of its billed settlement
	released  map[string]bool         // request ids given back unbilled
	crashed   map[string]bool         // request ids in flight when their instance was killed
	holds     int                     // holds taken
	carved    int                     // of them carved from a lease
	trace     []string                // the last steps, for a failure report
}

// instance is one gateway process: its settler dies with it, its journal
// (the disk) does not.
type instance struct {
	name     string
	run      int
	st       *settle.Settler
	ledger   billing.Ledger // where holds are taken: the store, or a lease cache
	leases   *lease.Ledger  // nil without leases
	journal  *memJournal
	inflight []billing.Hold // holds taken, answers not finished
}

func (in *instance) owner() string { return fmt.Sprintf("%s/run%d", in.name, in.run) }

func (in *instance) alive() bool { return in.st != nil }

// simulate runs one seed; it returns how many holds were taken and how
// many of them were carved from a lease.
func simulate(seed int64, steps int) (holds, carved int, err error) {
	w := newWorld(seed)
	defer func() { holds, carved = w.holds, w.carved }()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
		}
		if err != nil {
			err = fmt.Errorf("%w\nlast steps:\n  %s", err, strings.Join(w.trace, "\n  "))
		}
	}()
	for i := 0; i < steps; i++ {
		w.step()
		if err := w.store.Snapshot().Check(); err != nil {
			return 0, 0, fmt.Errorf("after step %d: %w", i, err)
		}
	}
	return 0, 0, w.heal()
}

func newWorld(seed int64) *world {
	w := &world{
		rng: rand.New(rand.NewSource(seed)), now: time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC),
		store: ledgertest.New(), billed: map[string]billing.Nano{}, released: map[string]bool{}, crashed: map[string]bool{},
	}
	for _, fields := range [][]string{{billing.FieldCreditsNew}, {billing.FieldCredits, billing.FieldRefCredits}} {
		p, err := billing.ParseCreditPlan(fields)
		if err != nil {
			panic(err)
		}
		w.plans = append(w.plans, p)
	}
	w.store.SetClock(func() time.Time { return w.now })
	w.store.SetFaults(w.fault)
	// Half the seeds run with credit leases; a lease is at most a quarter
	// of a pool and at least 8 holds, so their pools are larger.
	w.leases = w.rng.Intn(2) == 0
	scale := int64(1)
	if w.leases {
		scale = 1 + w.rng.Int63n(40)
	}
	for i := 0; i < 2+w.rng.Intn(4); i++ {
		u := fmt.Sprintf("u%d", i)
		w.users = append(w.users, u)
		w.store.AddUser(u, billing.Balances{
			CreditsNew: billing.Nano(w.rng.Int63n(50_000 * scale)), Credits: billing.Nano(w.rng.Int63n(30_000 * scale)), RefCredits: billing.Nano(w.rng.Int63n(20_000 * scale)),
		})
	}
	for i := 0; i < 1+w.rng.Intn(3); i++ {
		in := &instance{name: fmt.Sprintf("i%d", i), journal: newMemJournal()}
		w.inst = append(w.inst, in)
		w.restart(in)
	}
	return w
}

// fault decides each store call's fault, during a storm.
func (w *world) fault(op ledgertest.Op) ledgertest.Fault {
	if w.rng.Float64() >= w.faultRate {
		if *simOps {
			w.note("  %s", op)
		}
		return ledgertest.Pass
	}
	f := []ledgertest.Fault{ledgertest.FailBefore, ledgertest.FailAfter, ledgertest.Timeout}[w.rng.Intn(3)]
	w.note("  %s: %s", op, f)
	return f
}

func (w *world) note(format string, args ...any) {
	w.trace = append(w.trace, fmt.Sprintf("%s "+format, append([]any{w.now.Format("15:04:05")}, args...)...))
	if len(w.trace) > traceLen {
		w.trace = w.trace[1:]
	}
}

// step takes one random step.
func (w *world) step() {
	in := w.inst[w.rng.Intn(len(w.inst))]
	if !in.alive() {
		if w.rng.Intn(4) == 0 {
			w.restart(in)
		}
		return
	}
	switch r := w.rng.Intn(100); {
	case r < 30:
		w.admit(in)
	case r < 55:
		w.finish(in)
	case r < 65:
		w.note("%s settles its queue", in.owner())
		in.st.SettleQueued()
	case r < 72:
		w.note("%s retries (%d pending)", in.owner(), in.st.Pending())
		in.st.RetryOnce(3 * simOpLimit)
	case r < 77:
		w.note("%s flushes receipts", in.owner())
		in.st.FlushClears(w.rng.Intn(5) == 0)
	case r < 82:
		w.note("%s heartbeat", in.owner())
		in.st.Heartbeat(w.now)
	case r < 86:
		w.note("%s sweeps", in.owner())
		in.st.Sweep(w.now)
	case r < 88 && in.leases != nil:
		w.note("%s ticks its leases", in.owner())
		in.leases.Tick(context.Background())
	case r < 95:
		w.now = w.now.Add(time.Duration(1+w.rng.Intn(3)) * time.Second)
	case r < 96:
		d := time.Duration(1+w.rng.Intn(20)) * time.Minute
		w.note("clock jumps %s", d)
		w.now = w.now.Add(d)
	case r < 97:
		w.crash(in)
	default:
		w.faultRate = []float64{0, 0, 0.05, 0.3, 1}[w.rng.Intn(5)]
		w.note("database fault rate %.2f", w.faultRate)
	}
}

// admit takes a hold as the handler does: the receipts waiting for the
// user's next hold go with it, given back when it fails; a hold whose
// answer was lost is released through the pipeline.
func (w *world) admit(in *instance) {
	w.next++
	user, plan := w.users[w.rng.Intn(len(w.users))], w.plans[w.rng.Intn(len(w.plans))]
	want := billing.Nano(w.rng.Int63n(8_000))
	req := billing.HoldRequest{
		RequestID: fmt.Sprintf("r%d", w.next), User: user, Plan: plan, Want: want, Min: want / billing.Nano(1+w.rng.Intn(4)),
		Input: want / 4, Owner: in.owner(), At: w.now, Expires: w.now.Add(simLease), LogID: logID(w.next),
		Model: "m", KeyID: "sk-tro...0000", Clear: in.st.TakeReceipts(user),
	}
	ctx, cancel := context.WithTimeout(context.Background(), simOpLimit)
	defer cancel()
	h, err := in.ledger.Reserve(ctx, req)
	if err != nil {
		in.st.ReturnReceipts(user, req.Clear, err)
	}
	var ie *billing.InsufficientError
	switch {
	case err == nil:
		w.note("%s holds %s for %s of %s%s", in.owner(), h.Amount(), req.RequestID, user, leaseNote(h))
		in.st.JournalHold(h)
		in.inflight = append(in.inflight, h)
		w.holds++
		if h.Lease != "" {
			w.carved++
		}
	case errors.As(err, &ie):
		w.note("%s refuses %s: %v", in.owner(), req.RequestID, err)
	default:
		w.note("%s: hold of %s failed (%v), released", in.owner(), req.RequestID, err)
		w.released[req.RequestID] = true
		in.st.Submit(&settle.Settlement{Unknown: true, Hold: billing.Hold{
			RequestID: req.RequestID, User: user, Plan: plan, Owner: req.Owner, At: req.At, Expires: req.Expires,
			LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
		}})
	}
}

// finish ends one in-flight request: an answer of random cost (above the
// hold sometimes), or a failure that gives the hold back.
func (w *world) finish(in *instance) {
	if len(in.inflight) == 0 {
		return
	}
	i := w.rng.Intn(len(in.inflight))
	h := in.inflight[i]
	in.inflight = slices.Delete(in.inflight, i, i+1)
	if w.rng.Intn(5) == 0 {
		w.note("%s releases %s", in.owner(), h.RequestID)
		w.released[h.RequestID] = true
		in.st.Submit(settle.Release(h, nil))
		return
	}
	cost := billing.Nano(w.rng.Int63n(int64(h.Amount())*2 + 100))
	w.billed[h.RequestID] = cost
	w.note("%s bills %s: cost %s, hold %s", in.owner(), h.RequestID, cost, h.Amount())
	in.st.Submit(&settle.Settlement{Hold: h, Cost: cost, Bill: true, Log: billing.RequestLog{
		ID: h.LogID, UserID: h.User, UserKeyID: h.KeyID, Model: h.Model, CreditsCost: cost.USD(),
		CreditType: h.Plan.CreditType(), StatusCode: 200, IsSuccess: true, CreatedAt: w.now, RequestID: h.RequestID,
		CreditField: h.Plan.String(), UsageSource: "reported", EndReason: "complete", CostNano: int64(cost), HoldNano: int64(h.Amount()),
	}})
}

// crash kills an instance: its queue, its retries and its in-flight
// requests are gone; its journal stays on disk.
func (w *world) crash(in *instance) {
	w.note("%s is killed with %d requests in flight, %d settlements pending", in.owner(), len(in.inflight), in.st.Pending())
	for _, h := range in.inflight {
		w.crashed[h.RequestID] = true
	}
	in.st, in.inflight, in.ledger, in.leases = nil, nil, nil, nil
}

func leaseNote(h billing.Hold) string {
	if h.Lease == "" {
		return ""
	}
	return " from " + h.Lease
}

// restart starts a new run of the instance, as Caddy's first sweep does:
// the journal is replayed, then the earlier runs' holds are swept.
func (w *world) restart(in *instance) {
	in.run++
	now := func() time.Time { return w.now }
	in.ledger, in.leases = w.store, nil
	if w.leases {
		in.leases = lease.New(lease.Config{Store: w.store, Owner: in.owner(), Now: now, Go: func(take func()) { take() }, ReturnReceipts: func(user string, ids []string, err error) {
			in.st.ReturnReceipts(user, ids, err)
		}})
		in.ledger = in.leases
	}
	in.st = settle.New(settle.Config{Store: w.store, Ledger: in.ledger, Owner: in.owner(), Now: now, OpTimeout: simOpLimit})
	in.st.Recover(in.journal, in.journal.records())
	w.note("%s starts with %d journaled settlements", in.owner(), len(in.journal.records()))
	in.st.Heartbeat(w.now)
	in.st.RetryOnce(3 * simOpLimit)
	in.st.SweepPredecessors(w.now)
}

// heal ends the run: the database recovers, every instance comes back and
// drains, the clock passes every lease and timeout, and the sweepers and
// flushers run. Then nothing may be left over.
func (w *world) heal() error {
	w.faultRate = 0
	w.note("heal")
	for _, in := range w.inst {
		if !in.alive() {
			w.restart(in)
		}
		for len(in.inflight) > 0 {
			w.finish(in)
		}
	}
	for _, in := range w.inst {
		in.st.SettleQueued()
		if !in.st.RetryOnce(time.Second) {
			return fmt.Errorf("%s: %d settlements still pending with the database healthy", in.owner(), in.st.Pending())
		}
		if in.leases != nil {
			in.leases.Close(context.Background())
		}
	}
	w.now = w.now.Add(simLease + time.Hour)
	for _, in := range w.inst {
		in.st.Heartbeat(w.now)
	}
	for _, in := range w.inst {
		in.st.Sweep(w.now)
		in.st.FlushClears(true)
	}
	return w.checkEnd(w.store.Snapshot())
}

// checkEnd checks the healed store: the invariant, nothing outstanding,
// each billed request logged once with its cost charged (or its shortfall
// recorded), unless the sweeper resolved its hold first.
func (w *world) checkEnd(snap ledgertest.Snapshot) error {
	if err := snap.Check(); err != nil {
		return err
	}
	for _, u := range snap.Users {
		if len(u.Holds) > 0 || len(u.Receipts) > 0 {
			return fmt.Errorf("user %s: %d holds and %d receipts left", u.ID, len(u.Holds), len(u.Receipts))
		}
	}
	rows := map[string]billing.RequestLog{}
	for _, row := range snap.Logs {
		if _, dup := rows[row.RequestID]; dup {
			return fmt.Errorf("request %s has two log rows", row.RequestID)
		}
		rows[row.RequestID] = row
	}
	for id := range w.crashed {
		if row, ok := rows[id]; !ok || row.UsageSource != billing.SourceHoldFallback {
			return fmt.Errorf("request %s was in flight when its instance was killed and was not charged under the orphan policy (row %+v)", id, row)
		}
	}
	for id, cost := range w.billed {
		row, ok := rows[id]
		switch {
		case !ok:
			return fmt.Errorf("request %s was billed %s and has no log row", id, cost)
		case row.UsageSource == billing.SourceHoldFallback:
			continue // the sweeper resolved it first (its lease ran out): its charge stands
		case row.CostNano != int64(cost) || row.ChargedNano+row.ShortfallNano != int64(cost):
			return fmt.Errorf("request %s cost %s: its row says cost %d, charged %d, shortfall %d", id, cost, row.CostNano, row.ChargedNano, row.ShortfallNano)
		}
	}
	for id := range w.released {
		if row, ok := rows[id]; ok && row.UsageSource != billing.SourceHoldFallback {
			return fmt.Errorf("request %s was released and has a log row: %+v", id, row)
		}
	}
	return nil
}

func logID(n int) billing.LogID {
	var id billing.LogID
	copy(id[:], fmt.Sprintf("%012d", n))
	return id
}

// memJournal is a journal on a disk that survives its process.
type memJournal struct {
	order []string
	data  map[string][]byte
}

func newMemJournal() *memJournal { return &memJournal{data: map[string][]byte{}} }

func (j *memJournal) Append(id string, data []byte) error {
	if _, ok := j.data[id]; !ok {
		j.order = append(j.order, id)
	}
	j.data[id] = slices.Clone(data)
	return nil
}

func (j *memJournal) DoneAll(ids []string) error {
	for _, id := range ids {
		delete(j.data, id)
	}
	j.order = slices.DeleteFunc(j.order, func(id string) bool { _, ok := j.data[id]; return !ok })
	return nil
}

func (j *memJournal) Close() error { return nil }

func (j *memJournal) records() []spool.Record {
	out := make([]spool.Record, 0, len(j.order))
	for _, id := range j.order {
		out = append(out, spool.Record{ID: id, Data: j.data[id]})
	}
	return out
}
