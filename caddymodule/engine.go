package caddymodule

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/lease"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/settle"
	"github.com/trollllm/caddy-llm-billing/spool"
)

// engine is what every site and every config generation share for one
// database: the MongoDB client, the key cache, the upstream key pool and the
// settlement workers. It lives in a caddy.UsagePool, so a config reload
// keeps it (and its in-flight settlements) and only the last user's
// Cleanup destroys it.
type engine struct {
	client *mongo.Client // nil when the store is not MongoDB (tests)
	store  billing.Store
	// isolator sets the store's balance write isolation; nil when the
	// store has none (tests), and then applyIsolation does nothing.
	isolator isolator
	// friends keeps the friend keys' limits; nil when the store has none
	// (friend keys are then refused with friend_key_error).
	friends billing.FriendLedger

	auth *authCache
	// errorLogs queues refusals for error_logs (errorLogLoop writes them).
	errorLogs        chan billing.ErrorLog
	errorLogsDropped atomic.Int64
	health           dbHealth // the last database ping, for /health
	keys             billing.KeyPool
	// settler settles the holds of finished requests.
	settler *settle.Settler
	// leases serves the holds of busy users from credit leases when
	// settings.leases is on; the settler settles through it.
	leases *lease.Ledger

	// boot identifies this process's holds: Caddy's instance id and a
	// random suffix, so that a restarted process is a new owner.
	boot   string
	bodies bodyBudget // request bodies in flight, bounded by App.BodyMemory
	cfg    atomic.Pointer[settings]

	marks      chan keyMark
	probing    sync.Map     // upstream key id → a probe of it is running (probeKey)
	mu         sync.RWMutex // guards closed against sends
	closed     bool
	inflight   sync.WaitGroup
	background sync.WaitGroup // background key lookups
	workers    sync.WaitGroup
	startOnce  sync.Once
	stop       chan struct{}
	loadMu     sync.Mutex
}

const (
	drainTimeout   = 30 * time.Second
	dbTimeout      = 5 * time.Second
	defaultAuthTTL = 30 * time.Second
	// defaultHoldLease is how long a hold lasts before the sweeper may
	// resolve it even though its owner is alive.
	defaultHoldLease = 15 * time.Minute
	defaultRefresh   = 5 * time.Second

	defaultAttempts          = 3
	defaultRetryBudget       = 30 * time.Second
	defaultRateLimitCooldown = 60 * time.Second
	defaultErrorCooldown     = 10 * time.Second
)

// settings are what the app's config sets in the pooled engine, defaults
// applied. Each config that provisions the app replaces them whole
// (engine.configure); readers take the current ones with engine.settings.
type settings struct {
	authTTL    time.Duration // how long a key lookup is cached; ≤ 0: not cached
	keyRefresh time.Duration // how often the upstream key pool is reloaded
	static     bool          // static upstream keys: never loaded from the database
	attempts   int           // upstream attempts per request
	budget     time.Duration // what a request may spend on failed attempts
	cooldowns  billing.KeyPolicy
	holdLease  time.Duration // a hold's lease (billing.HoldRequest.Expires)
	isolation  string        // "auto", "process" or "shared"
	errorLogs  bool          // refusals are written to error_logs
	leases     bool          // holds of busy users are served from credit leases
	spoolDir   string        // the settlement journal's directory; "": none
	logger     *zap.Logger
}

// defaultSettings are an engine's settings before any config sets them.
func defaultSettings() settings {
	return settings{
		authTTL: defaultAuthTTL, keyRefresh: defaultRefresh, attempts: defaultAttempts, budget: defaultRetryBudget,
		cooldowns: billing.KeyPolicy{RateLimitCooldown: defaultRateLimitCooldown, ErrorCooldown: defaultErrorCooldown},
		holdLease: defaultHoldLease, isolation: "auto", errorLogs: true, logger: zap.NewNop(),
	}
}

// settings returns the current settings; they never change once read.
func (e *engine) settings() *settings { return e.cfg.Load() }

// configure replaces the settings.
func (e *engine) configure(s settings) {
	if s.logger == nil {
		s.logger = zap.NewNop()
	}
	e.cfg.Store(&s)
	e.settler.SetLogger(s.logger)
	if s.leases {
		// One write per lease per batch: longer batches, fewer writes.
		e.settler.SetBatching(leaseBatchLinger, leaseBatchSize)
	} else {
		e.settler.SetBatching(0, 0)
	}
}

// Batches of the settlement with credit leases on.
const (
	leaseBatchLinger = time.Second
	leaseBatchSize   = 4096
)

// ledger is where holds are taken: the lease cache when credit leases are
// on, the store otherwise.
func (e *engine) ledger() billing.Ledger {
	if e.settings().leases {
		return e.leases
	}
	return e.store
}

// retryPolicy returns the current attempt limit, time budget and cooldowns.
func (e *engine) retryPolicy() (int, time.Duration, billing.KeyPolicy) {
	s := e.settings()
	return s.attempts, s.budget, s.cooldowns
}

func newEngine(uri, database string) (*engine, error) {
	opts := options.Client().ApplyURI(uri).SetAppName("caddy-llm-billing").
		SetMaxPoolSize(100).SetTimeout(10 * time.Second)
	// mongo.Connect does not dial: the client connects on first use, so
	// `caddy validate` with an unreachable database does not hang.
	client, err := mongo.Connect(opts)
	if err != nil {
		return nil, err
	}
	store := mongostore.New(client.Database(database))
	e := newEngineWithStore(store)
	e.client = client
	e.isolator = store
	return e, nil
}

// isolator is a store whose balance writes can be isolated in several ways
// (see mongostore.Isolation), and that can tell whether its server is
// FerretDB, whose updates are not isolated by themselves.
type isolator interface {
	SetIsolation(mongostore.Isolation)
	IsFerretDB(ctx context.Context) (bool, error)
}

// newEngineWithStore returns an engine over any store.
func newEngineWithStore(store billing.Store) *engine {
	e := &engine{
		store: store,
		auth:  newAuthCache(),
		boot:  bootID(),
		marks: make(chan keyMark, 256),
		stop:  make(chan struct{}),

		errorLogs: make(chan billing.ErrorLog, errorLogQueue),
	}
	e.friends, _ = store.(billing.FriendLedger)
	e.leases = lease.New(lease.Config{Store: store, Owner: e.boot, Observer: leaseMetrics{}, ReturnReceipts: func(user string, ids []string, err error) {
		e.settler.ReturnReceipts(user, ids, err)
	}})
	// The settlement goes through the lease cache whether leases are on or
	// not: it settles the holds it did not carve in the store.
	e.settler = settle.New(settle.Config{Store: store, Ledger: e.leases, Friends: e.friends, Owner: e.boot, Observer: settleMetrics{}})
	e.configure(defaultSettings())
	e.bodies.limit.Store(DefaultBodyMemory)
	return e
}

// bootID returns Caddy's instance id (kept in its data directory) with a
// random suffix for this process.
func bootID() string {
	var b [6]byte
	_, _ = crand.Read(b[:])
	id := "caddy"
	if u, err := caddy.InstanceID(); err == nil {
		id = u.String()
	}
	return id + "/" + hex.EncodeToString(b[:])
}

func (e *engine) log() *zap.Logger { return e.settings().logger }

// start launches the background work once: settlement workers, the key
// pool refresher and the cache sweeper. It is called from App.Start, never
// from Provision, so `caddy validate` starts nothing.
func (e *engine) start() {
	e.startOnce.Do(func() {
		e.applyIsolation()
		e.settler.Start(e.openSpool())
		e.workers.Add(4)
		go e.leaseLoop()
		go e.errorLogLoop()
		go e.refreshLoop()
		go e.markLoop()
	})
}

// usedSpareAge is how long a used spare stays in openhands_backup_keys
// before the cleanup archives and deletes it (the legacy 6 h).
const usedSpareAge = 6 * time.Hour

func (e *engine) refreshLoop() {
	defer e.workers.Done()
	e.loadKeys()
	lastCleanup := time.Time{}
	for {
		d := e.settings().keyRefresh
		select {
		case <-e.stop:
			return
		case <-time.After(d):
			e.loadKeys()
			now := time.Now()
			e.auth.sweep(now)
			if !e.settings().static && now.Sub(lastCleanup) >= time.Minute {
				lastCleanup = now
				e.cleanSpares(now)
			}
		}
	}
}

// loadKeys refreshes the upstream key pool from the database (unless static
// keys are configured). A failure keeps the previous pool.
func (e *engine) loadKeys() {
	if err := e.reloadKeys(context.Background()); err != nil {
		e.log().Warn("loading upstream keys failed; keeping the previous pool", zap.Error(err))
	}
}

// reloadKeys loads the pool from the database now.
func (e *engine) reloadKeys(ctx context.Context) error {
	if e.settings().static {
		return nil
	}
	e.loadMu.Lock()
	defer e.loadMu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	keys, err := e.store.LoadUpstreamKeys(ctx)
	if err != nil {
		return err
	}
	e.keys.Set(keys)
	return nil
}

// pickKey returns an upstream key; an empty pool is reloaded once on the
// spot, so a pool that was empty at start-up recovers as soon as keys exist.
func (e *engine) pickKey() (billing.UpstreamKey, error) {
	k, err := e.keys.Pick(time.Now())
	if err == nil || e.settings().static || e.keys.Len() > 0 {
		return k, err
	}
	e.loadKeys()
	return e.keys.Pick(time.Now())
}

// authenticate resolves a key through the cache. refresh is true when the
// caller must start refreshAuth(key): the key came from the cache in the
// second half of its life. The caller starts it once the request's own
// round trips are over (when the answer starts), so that the lookup never
// competes with the hold for the database.
func (e *engine) authenticate(ctx context.Context, key string) (p billing.Principal, refresh bool, err error) {
	now := time.Now()
	if p, ok, refresh := e.auth.get(key, now); ok {
		return p, refresh, nil
	}
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	t0 := time.Now()
	p, err = e.store.Authenticate(ctx, key)
	observeDB(waitKeyLookup, t0)
	if err != nil {
		return p, false, err
	}
	if ttl := e.settings().authTTL; ttl > 0 {
		e.auth.put(key, p, now, ttl)
	}
	return p, false, nil
}

// freshBalances reads a user's balances now, for the pre-check of a key
// whose cached balance looks empty, and keeps them in the key's cache entry
// (which expires when it would have), so a top-up counts at once.
func (e *engine) freshBalances(ctx context.Context, key, user string) (billing.Balances, error) {
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	t0 := time.Now()
	b, err := e.store.Balances(ctx, user)
	observeDB(waitBalance, t0)
	if err == nil {
		e.auth.setBalances(key, b)
	}
	return b, err
}

// refreshAuth looks a cached key up again off the request path.
func (e *engine) refreshAuth(key string) {
	e.mu.RLock()
	if e.closed {
		e.mu.RUnlock()
		return
	}
	e.background.Add(1)
	e.mu.RUnlock()
	go func() {
		defer e.background.Done()
		now := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
		defer cancel()
		p, err := e.store.Authenticate(ctx, key)
		observeDB(waitKeyLookup, now)
		var ae *billing.AuthError
		switch {
		case err == nil:
			if ttl := e.settings().authTTL; ttl > 0 {
				e.auth.put(key, p, now, ttl)
			}
		case errors.As(err, &ae):
			e.auth.drop(key)
		default:
			e.auth.unmark(key)
		}
	}()
}

// begin registers an in-flight request; the returned function must be
// called when its settlement has been submitted. ok is false once the
// engine is shutting down.
func (e *engine) begin() (done func(), ok bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.closed {
		return nil, false
	}
	e.inflight.Add(1)
	return e.inflight.Done, true
}

// Destruct drains: it waits for in-flight requests to submit their
// settlements, settles everything queued, then disconnects.
func (e *engine) Destruct() error {
	waitTimeout(&e.inflight, drainTimeout)
	e.mu.Lock()
	if !e.closed {
		e.closed = true
		close(e.stop)
	}
	e.mu.Unlock()
	e.startOnce.Do(func() {}) // never start after this
	waitTimeout(&e.background, dbTimeout)
	e.workers.Wait()
	e.settler.Close(dbTimeout)
	ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
	defer cancel()
	e.leases.Close(ctx) // after the settlement drained: what the leases hold goes back
	if e.client == nil {
		return nil
	}
	return e.client.Disconnect(ctx)
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
		return true
	case <-time.After(d):
		return false
	}
}

// describeConnectErr keeps a driver error from echoing the URI.
func describeConnectErr(err error, uri string) error {
	msg := err.Error()
	if uri != "" && containsFold(msg, uri) {
		return errors.New("invalid mongodb_uri")
	}
	return fmt.Errorf("invalid mongodb_uri: %w", err)
}

func (e *engine) cleanSpares(now time.Time) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*dbTimeout)
	defer cancel()
	n, err := e.store.CleanUsedSpares(ctx, now.Add(-usedSpareAge))
	if err != nil {
		e.log().Warn("cleaning used spare keys failed", zap.Error(err))
	}
	if n > 0 {
		e.log().Info("archived and deleted used spare keys", zap.Int("count", n))
	}
}

// openSpool opens the settlement journal and returns it with what a
// previous run left in it. Without a spool (none configured, or it cannot
// be opened) it returns nil: settlements are kept in memory only, and a
// crash leaves their holds to the sweeper.
func (e *engine) openSpool() (settle.Journal, []spool.Record) {
	dir := e.settings().spoolDir
	if dir == "" {
		return nil, nil
	}
	sp, recs, err := spool.Open(dir, spool.Options{})
	if err != nil {
		e.log().Error("opening the settlement spool failed; settlements are kept in memory only", zap.String("dir", dir), zap.Error(err))
		return nil, nil
	}
	return sp, recs
}

// applyIsolation sets how balance writes are isolated: "auto" asks the
// server and isolates across instances on FerretDB (see
// mongostore.Isolation), and until it knows.
func (e *engine) applyIsolation() {
	ms := e.isolator
	if ms == nil {
		return
	}
	switch e.settings().isolation {
	case "process":
		ms.SetIsolation(mongostore.IsolationProcess)
		return
	case "shared":
		ms.SetIsolation(mongostore.IsolationShared)
		return
	}
	ms.SetIsolation(mongostore.IsolationShared)
	go func() {
		for delay := time.Second; ; delay = min(2*delay, time.Minute) {
			ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
			ferret, err := ms.IsFerretDB(ctx)
			cancel()
			if err == nil {
				if !ferret {
					// MongoDB isolates every document update: no lock.
					ms.SetIsolation(mongostore.IsolationAtomic)
				}
				e.log().Info("balance write isolation", zap.Bool("ferretdb", ferret), zap.Bool("cross_instance_locks", ferret))
				return
			}
			select {
			case <-e.stop:
				return
			case <-time.After(delay):
			}
		}
	}()
}

// leaseTick is how often leases that went idle or old are given back.
const leaseTick = time.Second

// leaseLoop gives back idle and old credit leases (lease.Ledger.Tick).
func (e *engine) leaseLoop() {
	defer e.workers.Done()
	t := time.NewTicker(leaseTick)
	defer t.Stop()
	for {
		select {
		case <-e.stop:
			return
		case <-t.C:
			ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
			e.leases.Tick(ctx)
			cancel()
		}
	}
}
