// Package settle turns finished requests into charges, exactly once: it
// journals each settlement, gathers settlements into batches, settles their
// holds, writes their request log rows, retries what the database refused,
// and sweeps the holds and receipts that crashed instances left behind.
//
// It knows neither Caddy nor MongoDB: the store, the journal, the clock and
// the metrics are interfaces its owner supplies. Every step the background
// loops take is also a method a caller can run on its own goroutine, so a
// simulation can drive the package step by step.
package settle

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/spool"
)

// Store is what settling needs from the database.
type Store interface {
	billing.LeaseLedger
	billing.Sweeper
	billing.Recorder
}

// Journal keeps settlements on disk until they are done (a spool.Spool).
type Journal interface {
	Append(id string, data []byte) error
	DoneAll(ids []string) error
	Close() error
}

// Observer is told what settling does, for metrics. Its methods must not
// block.
type Observer interface {
	// DBWait is how long one database operation took; op is one of the
	// Op constants.
	DBWait(op string, d time.Duration)
	// Billed is called once per billed request, when its charge and its
	// log row are written by this process.
	Billed(s *Settlement)
	// Finished is called once for each settlement submitted with Counted
	// set, when it is done.
	Finished(s *Settlement)
	// Swept is called when the sweeper charged an orphaned hold.
	Swept(h billing.Hold, charged billing.Nano)
}

// The database operations an Observer is told about.
const (
	OpSettle      = "settle"         // one settlement command (one user, or a batch of users)
	OpRequestLogs = "request_logs"   // one batched insert of request logs
	OpUsage       = "usage_counters" // one batched update of the usage counters
)

// Config is what a Settler is built with.
type Config struct {
	Store Store
	// Friends settles friend key holds; nil when the store keeps none.
	Friends billing.FriendLedger
	// Owner is this process's identity in the holds it takes: Caddy's
	// instance id, "/", and a random suffix for this run.
	Owner string
	// Now is the clock; nil: time.Now.
	Now func() time.Time
	// Observer is told what happens; nil: nothing is.
	Observer Observer
	// OpTimeout bounds one database operation; 0: 5 s. A batch gets three
	// times as long.
	OpTimeout time.Duration
	// Ledger settles the holds: Store, or a cache of credit leases in
	// front of it (package lease). Nil: Store.
	Ledger billing.Ledger
	// BatchLinger is how long a batch waits for more settlements after its
	// first, and BatchSize its largest size; 0: 50 ms and 256. A batch
	// costs one write per user (per lease with leases) and one insert of
	// log rows, whatever its size.
	BatchLinger time.Duration
	BatchSize   int
}

// Timings of the pipeline.
const (
	batchSize      = 256
	batchLinger    = 50 * time.Millisecond
	defaultTimeout = 5 * time.Second
	queueSize      = 1024
	workers        = 4
	retryMin       = 500 * time.Millisecond
	retryMax       = 15 * time.Second
	sweepInterval  = 15 * time.Second
	heartbeatEvery = 10 * time.Second
	ownerTimeout   = 45 * time.Second
	receiptAge     = 10 * time.Minute
)

// Settler settles the holds of finished requests. It is safe for
// concurrent use; one Settler serves every site on one database.
type Settler struct {
	store   Store
	ledger  billing.Ledger
	linger  atomic.Int64 // time.Duration
	size    atomic.Int64
	friends billing.FriendLedger
	owner   string
	now     func() time.Time
	obs     Observer
	// opTimeout bounds one database operation.
	opTimeout time.Duration

	logger  atomic.Pointer[zap.Logger]
	policy  atomic.Pointer[billing.OrphanPolicy]
	journal atomic.Pointer[journalRef]

	jobs     chan *Settlement
	batches  chan []*Settlement
	hurry    chan struct{} // ends the collector's linger
	stop     chan struct{}
	quit     chan struct{} // closed when Close starts
	quitOnce sync.Once
	started  atomic.Bool  // the collector runs
	mu       sync.RWMutex // guards closed against sends on jobs
	closed   bool
	loops    sync.WaitGroup

	waiting waitingSettlements
	retryMu sync.Mutex
	retry   []*Settlement
	open    []billing.Hold // open holds of a previous run, to charge (open.go)
	clears  receiptClears
	usage   usageQueue
}

type journalRef struct{ j Journal }

// New returns a Settler; Start launches its background work.
func New(cfg Config) *Settler {
	st := &Settler{
		store: cfg.Store, friends: cfg.Friends, owner: cfg.Owner, now: cfg.Now, obs: cfg.Observer, opTimeout: cfg.OpTimeout,
		jobs:    make(chan *Settlement, queueSize),
		batches: make(chan []*Settlement, workers),
		hurry:   make(chan struct{}, 1),
		stop:    make(chan struct{}),
		quit:    make(chan struct{}),
	}
	if st.now == nil {
		st.now = time.Now
	}
	st.ledger = cfg.Ledger
	if st.ledger == nil {
		st.ledger = cfg.Store
	}
	st.SetBatching(cfg.BatchLinger, cfg.BatchSize)
	if st.opTimeout <= 0 {
		st.opTimeout = defaultTimeout
	}
	if st.obs == nil {
		st.obs = nopObserver{}
	}
	st.SetLogger(nil)
	st.SetOrphanPolicy(billing.OrphanChargeInput)
	return st
}

// SetBatching replaces Config.BatchLinger and Config.BatchSize (0: the
// defaults) for the batches made from now on.
func (st *Settler) SetBatching(linger time.Duration, size int) {
	if linger <= 0 {
		linger = batchLinger
	}
	if size <= 0 {
		size = batchSize
	}
	st.linger.Store(int64(linger))
	st.size.Store(int64(size))
}

func (st *Settler) batching() (time.Duration, int) {
	return time.Duration(st.linger.Load()), int(st.size.Load())
}

// SetLogger replaces the logger (nil: none).
func (st *Settler) SetLogger(l *zap.Logger) {
	if l == nil {
		l = zap.NewNop()
	}
	st.logger.Store(l)
}

// SetOrphanPolicy replaces what the sweeper charges for an orphaned hold.
func (st *Settler) SetOrphanPolicy(p billing.OrphanPolicy) { st.policy.Store(&p) }

func (st *Settler) log() *zap.Logger { return st.logger.Load() }

// batchTimeout bounds the settling of one batch.
func (st *Settler) batchTimeout() time.Duration { return 3 * st.opTimeout }

// Start recovers the journal (Recover), then launches the batching
// workers, the retry loop, the sweeper and the receipt flusher.
func (st *Settler) Start(j Journal, recs []spool.Record) {
	st.Recover(j, recs)
	st.started.Store(true)
	st.loops.Add(workers + 4)
	go st.collectLoop()
	for i := 0; i < workers; i++ {
		go st.settleLoop()
	}
	go st.retryLoop()
	go st.sweepLoop()
	go st.flushLoop()
}

// Recover makes j the journal and queues for the retry what it holds from
// a previous run (recs). j may be nil: settlements are then kept in memory
// only, and a crash leaves their holds to the sweeper.
func (st *Settler) Recover(j Journal, recs []spool.Record) {
	if j != nil {
		st.journal.Store(&journalRef{j})
		st.replay(recs)
	}
}

func (st *Settler) journalOf() Journal {
	if r := st.journal.Load(); r != nil {
		return r.j
	}
	return nil
}

// Submit journals a settlement and queues it. When the queue stays full
// for batchTimeout (the database is not keeping up), or the Settler is
// closed, the caller settles it itself: back-pressure instead of a
// dropped charge.
func (st *Settler) Submit(s *Settlement) {
	if s.Logger == nil {
		s.Logger = st.log()
	}
	st.append(s)
	st.waiting.add(s)
	if !st.enqueue(s) {
		st.SettleBatch([]*Settlement{s})
	}
}

// enqueue hands s to the collector. When the queue is full, the batches
// are waiting for the database: it waits for room, up to batchTimeout,
// since a batch settles s with thousands of others, where settling it
// here would cost a write of its own just when writes are scarcest. The
// wait holds up only this response's handler, which has answered.
func (st *Settler) enqueue(s *Settlement) bool {
	st.mu.RLock()
	defer st.mu.RUnlock()
	if st.closed {
		return false
	}
	select {
	case st.jobs <- s:
		return true
	default:
	}
	if !st.started.Load() {
		return false // nothing empties the queue (a simulation's step)
	}
	t := time.NewTimer(st.batchTimeout())
	defer t.Stop()
	select {
	case st.jobs <- s:
		return true
	case <-st.quit:
		return false
	case <-t.C:
		return false
	}
}

// append journals s. A settlement that cannot be journaled is still
// settled from memory, and its hold in the database is the backstop.
func (st *Settler) append(s *Settlement) {
	j := st.journalOf()
	if j == nil {
		return
	}
	if err := journal(j, s.Hold.RequestID, s); err != nil {
		st.log().Error("journaling a settlement failed", zap.String("request_id", s.Hold.RequestID), zap.Error(err))
		return
	}
	s.journaled = true
}

// Close stops the background work and settles everything queued; what the
// database still refuses after one last try stays in the journal for the
// next start. It then closes the journal.
func (st *Settler) Close(timeout time.Duration) {
	st.quitOnce.Do(func() { close(st.quit) }) // a Submit waiting for room lets go
	st.mu.Lock()
	if !st.closed {
		st.closed = true
		close(st.stop)
		close(st.jobs)
	}
	st.mu.Unlock()
	for s := range st.jobs { // the workers may never have started
		st.SettleBatch([]*Settlement{s})
	}
	st.loops.Wait()
	if !st.RetryOnce(timeout) {
		st.log().Warn("database unreachable at shutdown; settlements stay in the spool for the next start",
			zap.Int("pending", st.Pending()))
	}
	st.FlushClears(true)
	if !st.FlushUsage() {
		// Statistics only: the charges and request logs are settled
		// (or in the journal) whatever happens here.
		st.log().Warn("database unreachable at shutdown; usage counters (user_keys, openhands_keys) not written",
			zap.Int("requests", st.usage.pending()))
	}
	if j := st.journalOf(); j != nil {
		if err := j.Close(); err != nil {
			st.log().Error("closing the settlement spool failed", zap.Error(err))
		}
	}
}

// collectLoop gathers queued settlements into batches: what arrives within
// batchLinger of the first, up to batchSize. A batch costs one insert of
// log rows and one command with a balance write per user and plan, so at
// any load a larger batch means fewer writes per request; the linger only
// delays work that is already off the request path.
func (st *Settler) collectLoop() {
	defer st.loops.Done()
	defer close(st.batches)
	for s := range st.jobs {
		linger, size := st.batching()
		batch := make([]*Settlement, 1, size)
		batch[0] = s
		t := time.NewTimer(linger)
	fill:
		for len(batch) < size {
			select {
			case s, ok := <-st.jobs:
				if !ok {
					break fill
				}
				batch = append(batch, s)
			case <-t.C:
				break fill
			case <-st.hurry:
				break fill // a hold waits for this user's settlements
			}
		}
		t.Stop()
		st.batches <- batch
	}
}

// settleLoop settles the batches collectLoop makes.
func (st *Settler) settleLoop() {
	defer st.loops.Done()
	for b := range st.batches {
		st.SettleBatch(b)
	}
}

// SettleQueued settles, on the calling goroutine, what is queued now and
// not yet taken by a worker: a simulation's step (no workers run).
func (st *Settler) SettleQueued() {
	var batch []*Settlement
	_, size := st.batching()
	for {
		select {
		case s, ok := <-st.jobs:
			if ok {
				if batch = append(batch, s); len(batch) < size {
					continue
				}
			}
		default:
		}
		if len(batch) == 0 {
			return
		}
		st.SettleBatch(batch)
		batch = nil
	}
}

type nopObserver struct{}

func (nopObserver) DBWait(string, time.Duration)     {}
func (nopObserver) Billed(*Settlement)               {}
func (nopObserver) Finished(*Settlement)             {}
func (nopObserver) Swept(billing.Hold, billing.Nano) {}
