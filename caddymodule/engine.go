package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/mongostore"
)

// engine is what every site and every config generation share for one
// database: the MongoDB client, the key cache, the upstream key pool and the
// settlement workers. It lives in a caddy.UsagePool, so a config reload
// keeps it (and its in-flight settlements) and only the last user's
// Cleanup destroys it.
type engine struct {
	client *mongo.Client // nil when the store is not MongoDB (tests)
	store  billing.Store

	auth  *authCache
	keys  billing.KeyPool
	locks *stripes // per-document write serialisation (see stripes)

	// settings, replaced by each config that provisions the app
	authTTL     atomic.Int64 // nanoseconds
	keyRefresh  atomic.Int64 // nanoseconds
	static      atomic.Bool  // static keys in use: do not load from the database
	attempts    atomic.Int64 // upstream attempts per request
	budget      atomic.Int64 // nanoseconds a request may spend on failed attempts
	rlCooldown  atomic.Int64 // nanoseconds, 429/529 without Retry-After
	errCooldown atomic.Int64 // nanoseconds, 5xx and transport errors
	logger      atomic.Pointer[zap.Logger]

	jobs      chan *settlement
	marks     chan keyMark
	mu        sync.RWMutex // guards closed against sends
	closed    bool
	inflight  sync.WaitGroup
	workers   sync.WaitGroup
	startOnce sync.Once
	stop      chan struct{}
	loadMu    sync.Mutex
}

const (
	settleWorkers  = 4
	settleQueue    = 4096
	settleTimeout  = 15 * time.Second
	drainTimeout   = 30 * time.Second
	dbTimeout      = 5 * time.Second
	defaultAuthTTL = 30 * time.Second
	defaultRefresh = 5 * time.Second

	defaultAttempts          = 3
	defaultRetryBudget       = 30 * time.Second
	defaultRateLimitCooldown = 60 * time.Second
	defaultErrorCooldown     = 10 * time.Second
)

// retryPolicy returns the current attempt limit, time budget and cooldowns.
func (e *engine) retryPolicy() (int, time.Duration, billing.KeyPolicy) {
	return int(e.attempts.Load()), time.Duration(e.budget.Load()), billing.KeyPolicy{
		RateLimitCooldown: time.Duration(e.rlCooldown.Load()),
		ErrorCooldown:     time.Duration(e.errCooldown.Load()),
	}
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
	e := newEngineWithStore(mongostore.New(client.Database(database)))
	e.client = client
	return e, nil
}

// newEngineWithStore returns an engine over any store.
func newEngineWithStore(store billing.Store) *engine {
	e := &engine{
		store: store,
		auth:  newAuthCache(),
		locks: newStripes(),
		jobs:  make(chan *settlement, settleQueue),
		marks: make(chan keyMark, 256),
		stop:  make(chan struct{}),
	}
	e.authTTL.Store(int64(defaultAuthTTL))
	e.keyRefresh.Store(int64(defaultRefresh))
	e.attempts.Store(defaultAttempts)
	e.budget.Store(int64(defaultRetryBudget))
	e.rlCooldown.Store(int64(defaultRateLimitCooldown))
	e.errCooldown.Store(int64(defaultErrorCooldown))
	e.logger.Store(zap.NewNop())
	return e
}

func (e *engine) log() *zap.Logger { return e.logger.Load() }

// start launches the background work once: settlement workers, the key
// pool refresher and the cache sweeper. It is called from App.Start, never
// from Provision, so `caddy validate` starts nothing.
func (e *engine) start() {
	e.startOnce.Do(func() {
		for i := 0; i < settleWorkers; i++ {
			e.workers.Add(1)
			go e.settleLoop()
		}
		e.workers.Add(2)
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
		d := time.Duration(e.keyRefresh.Load())
		select {
		case <-e.stop:
			return
		case <-time.After(d):
			e.loadKeys()
			now := time.Now()
			e.auth.sweep(now)
			if !e.static.Load() && now.Sub(lastCleanup) >= time.Minute {
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
	if e.static.Load() {
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
	if err == nil || e.static.Load() || e.keys.Len() > 0 {
		return k, err
	}
	e.loadKeys()
	return e.keys.Pick(time.Now())
}

// authenticate resolves a key through the cache.
func (e *engine) authenticate(ctx context.Context, key string) (billing.Principal, error) {
	now := time.Now()
	if p, ok := e.auth.get(key, now); ok {
		return p, nil
	}
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	p, err := e.store.Authenticate(ctx, key)
	if err != nil {
		return p, err
	}
	if ttl := time.Duration(e.authTTL.Load()); ttl > 0 {
		e.auth.put(key, p, now.Add(ttl))
	}
	return p, nil
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

// submit queues a settlement. When the queue is full the caller settles it
// itself: back-pressure instead of a dropped charge.
func (e *engine) submit(s *settlement) {
	e.mu.RLock()
	if !e.closed {
		select {
		case e.jobs <- s:
			e.mu.RUnlock()
			return
		default:
		}
	}
	e.mu.RUnlock()
	e.settle(s)
}

func (e *engine) settleLoop() {
	defer e.workers.Done()
	for s := range e.jobs {
		e.settle(s)
	}
}

// Destruct drains: it waits for in-flight requests to submit their
// settlements, settles everything queued, then disconnects.
func (e *engine) Destruct() error {
	waitTimeout(&e.inflight, drainTimeout)
	e.mu.Lock()
	if !e.closed {
		e.closed = true
		close(e.stop)
		close(e.jobs)
	}
	e.mu.Unlock()
	e.startOnce.Do(func() {}) // never start after this
	// Workers were possibly never started (validate): drain here then.
	for s := range e.jobs {
		e.settle(s)
	}
	e.workers.Wait()
	if e.client == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
	defer cancel()
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

// settlement is the work left after a response: charge the user, write the
// request log, add the usage counters.
type settlement struct {
	charge   billing.ChargeRequest
	log      billing.RequestLog
	counters billing.UsageCounters
	logger   *zap.Logger
	site     string
}

func (e *engine) settle(s *settlement) {
	ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
	defer cancel()
	unlock := e.locks.lock("usersNew/" + s.charge.User)
	res, err := e.store.Charge(ctx, s.charge)
	unlock()
	if err != nil {
		// The charge could not be written. The request log still records
		// the full cost and the error, so the charge is traceable and can
		// be replayed (durable retries come with the settlement ledger).
		s.log.ChargeError = err.Error()
		res.Shortfall = s.charge.Cost - res.Charged
	}
	s.log.ChargedNano = int64(res.Charged)
	s.log.ShortfallNano = int64(res.Shortfall)
	s.log.Shortfall = res.Shortfall.USD()
	// The request log is written last: once it exists, the charge and the
	// counters it describes are in place.
	usageErr := e.addUsage(ctx, s.counters)
	logErr := e.store.InsertRequestLogs(ctx, []billing.RequestLog{s.log})

	l := s.logger
	fields := []zap.Field{
		zap.String("request_id", s.log.RequestID),
		zap.String("site", s.site),
		zap.String("credit_field", s.log.CreditField),
		zap.String("user", s.log.UserID),
		zap.String("key", s.log.UserKeyID),
		zap.String("model", s.log.Model),
		zap.String("upstream_model", s.log.UpstreamModel),
		zap.String("upstream_key", s.log.TrollKeyID),
		zap.Int64("input_tokens", s.log.InputTokens),
		zap.Int64("output_tokens", s.log.OutputTokens),
		zap.Int64("cache_write_tokens", s.log.CacheWriteTokens),
		zap.Int64("cache_read_tokens", s.log.CacheHitTokens),
		zap.String("cost", s.charge.Cost.String()),
		zap.String("charged", res.Charged.String()),
		zap.String("shortfall", res.Shortfall.String()),
		zap.String("usage_source", s.log.UsageSource),
		zap.String("end_reason", s.log.EndReason),
	}
	switch {
	case err != nil:
		l.Error("charge failed", append(fields, zap.Error(err))...)
	case res.Shortfall > 0:
		l.Warn("billed with shortfall", fields...)
	default:
		l.Info("billed", fields...)
	}
	if logErr != nil {
		l.Error("writing request log failed", zap.String("request_id", s.log.RequestID), zap.Error(logErr))
	}
	if usageErr != nil {
		l.Warn("writing usage counters failed", zap.String("request_id", s.log.RequestID), zap.Error(usageErr))
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

// addUsage writes the key counters of one request, one document at a time
// under its stripe lock.
func (e *engine) addUsage(ctx context.Context, c billing.UsageCounters) error {
	var errs []error
	if c.UserKey != "" {
		unlock := e.locks.lock("user_keys/" + c.UserKey)
		errs = append(errs, e.store.AddUsage(ctx, []billing.UsageCounters{{UserKey: c.UserKey, WeightedTokens: c.WeightedTokens, At: c.At}}))
		unlock()
	}
	if c.UpstreamKeyID != "" {
		unlock := e.locks.lock("openhands_keys/" + c.UpstreamKeyID)
		errs = append(errs, e.store.AddUsage(ctx, []billing.UsageCounters{{UpstreamKeyID: c.UpstreamKeyID, RawTokens: c.RawTokens, At: c.At}}))
		unlock()
	}
	return errors.Join(errs...)
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
