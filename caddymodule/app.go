// Package caddymodule plugs the billing gateway into Caddy: the llm_billing
// app (global options: the database and what all sites share) and the
// http.handlers.llm_billing handler (per site: which credit pool is billed,
// which price list applies).
package caddymodule

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func init() {
	caddy.RegisterModule(App{})
	caddy.RegisterModule(Handler{})
}

// engines holds one engine per database, shared by all configs and sites.
var engines = caddy.NewUsagePool()

// DefaultDatabase is the database used when none is configured, as the
// legacy proxy's MONGODB_DB_NAME default.
const DefaultDatabase = "fproxy"

// App is the llm_billing app: the MongoDB connection and the state every
// site shares (key cache, upstream key pool, settlement workers). It is
// configured by the global `llm_billing` option and kept across config
// reloads.
type App struct {
	// MongoDBURI is the MongoDB connection string. Required. Use an
	// {env.*} or {file.*} placeholder: it is resolved at provision time and
	// so never stored in the config or logged.
	MongoDBURI string `json:"mongodb_uri,omitempty"`

	// Database is the database name. Placeholders are resolved. Default: fproxy.
	Database string `json:"database,omitempty"`

	// KeyCacheTTL is how long a successful API key lookup is cached.
	// Revoking a key takes effect within this delay. 0 means the default
	// (30s); a negative value disables the cache.
	KeyCacheTTL caddy.Duration `json:"key_cache_ttl,omitempty"`

	// KeyRefreshInterval is how often the upstream key pool is reloaded from
	// openhands_keys and openhands_bindings. Default: 5s; at least 1s.
	KeyRefreshInterval caddy.Duration `json:"key_refresh_interval,omitempty"`

	// UpstreamKeys is a static list of upstream API keys, for deployments
	// without the openhands_keys collection. When set, the collection is not
	// read. Placeholders are resolved.
	UpstreamKeys []string `json:"upstream_keys,omitempty"`

	// KeyAttempts is how many upstream keys a request may try before its
	// answer reaches the client: a key that fails (401, 402, 403, 429, 529,
	// 5xx, a budget-exceeded 400, a transport error) is retried on another
	// key before any byte is sent. From 1 to 20; default: 3.
	KeyAttempts int `json:"key_attempts,omitempty"`

	// KeyRetryBudget bounds the time a request may spend on failed attempts
	// before it stops retrying. Default: 30s.
	KeyRetryBudget caddy.Duration `json:"key_retry_budget,omitempty"`

	// KeyCooldown is how long a key answering 429 or 529 without a
	// Retry-After header is left out. Default: 60s.
	KeyCooldown caddy.Duration `json:"key_cooldown,omitempty"`

	// KeyErrorCooldown is how long a key is left out after a 5xx answer or a
	// transport error. Default: 10s.
	KeyErrorCooldown caddy.Duration `json:"key_error_cooldown,omitempty"`

	// HoldLease is how long a hold is trusted while its owner is alive;
	// past it the sweeper resolves it. Keep it above the longest request
	// (the upstream timeouts). At least 1m; default: 15m.
	HoldLease caddy.Duration `json:"hold_lease,omitempty"`

	// OrphanPolicy is what the sweeper charges for a hold whose request
	// never settled because its process died: "charge_input" (the default:
	// the estimated input cost), "charge_hold" (the whole hold) or
	// "release" (nothing).
	OrphanPolicy string `json:"orphan_policy,omitempty"`

	// SpoolDir is the directory of the settlement journal, where each
	// settlement is written before it is sent to the database and replayed
	// after a crash or an outage. Default: llm_billing/spool-<id> under
	// Caddy's data directory. Each process needs its own.
	SpoolDir string `json:"spool_dir,omitempty"`

	// Isolation is how balance writes are isolated: "process" serialises
	// this process's writes per user (exact on MongoDB with any number of
	// instances); "shared" adds a lock document per user, needed when
	// several instances share a FerretDB (whose updates are not isolated);
	// "auto" (the default) picks shared on FerretDB, process otherwise.
	Isolation string `json:"isolation,omitempty"`

	// RateLimit sets the request rate limits, per client key by its kind
	// and per client IP. Absent: the legacy limits per key (user 2000,
	// friend 60, other 300 per minute) and none per IP.
	RateLimit *RateLimits `json:"rate_limit,omitempty"`

	// ErrorLogs is "on" (the default) to write the requests the gateway
	// refuses to error_logs, in the legacy shape, or "off".
	ErrorLogs string `json:"error_logs,omitempty"`

	// CreditLease is "on" to serve the holds of busy users from credit
	// leases (package lease): this instance takes a slice of such a user's
	// pool in one write and charges their requests in one write per batch,
	// instead of a write per request. "off" (the default) takes a hold per
	// request. See the README's "Credit leases".
	CreditLease string `json:"credit_lease,omitempty"`
	// BodyMemory bounds, in bytes, the memory held by request bodies in
	// flight, across all sites: a body is counted before it is read and
	// until its request ends, and one that does not fit gets a 503
	// (overloaded) without being read. The bound is kept across config
	// reloads. At least 64 KiB; default: 256 MiB.
	BodyMemory int64 `json:"body_memory,omitempty"`

	eng     *engine
	poolKey string
	limits  *rateLimiter
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "llm_billing",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision checks the settings (Validate), resolves the secrets and
// acquires the shared engine. It does no network I/O. A config that does not
// validate, or whose placeholders do not resolve, changes nothing in the
// engine a running config shares.
func (a *App) Provision(ctx caddy.Context) error {
	if err := a.Validate(); err != nil {
		return err
	}
	a.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	uri, err := repl.ReplaceOrErr(a.MongoDBURI, true, true)
	if err != nil {
		return fmt.Errorf("mongodb_uri: %v", err)
	}
	db := DefaultDatabase
	if a.Database != "" {
		db, err = repl.ReplaceOrErr(a.Database, true, true)
		if err != nil {
			return fmt.Errorf("database: %v", err)
		}
	}
	static := make([]billing.UpstreamKey, 0, len(a.UpstreamKeys))
	for i, k := range a.UpstreamKeys {
		v, err := repl.ReplaceOrErr(k, true, true)
		if err != nil {
			return fmt.Errorf("upstream_keys: key %d: %v", i, err)
		}
		static = append(static, billing.UpstreamKey{ID: fmt.Sprintf("static-%d", i), APIKey: v, Status: "healthy"})
	}

	if err := a.provisionRateLimits(); err != nil {
		return err
	}

	sum := sha256.Sum256([]byte(uri + "\x00" + db))
	key := "llm_billing:" + hex.EncodeToString(sum[:])
	dir := a.SpoolDir
	if dir != "" {
		if dir, err = repl.ReplaceOrErr(dir, true, true); err != nil {
			return fmt.Errorf("spool_dir: %w", err)
		}
	} else {
		dir = filepath.Join(caddy.AppDataDir(), "llm_billing", "spool-"+hex.EncodeToString(sum[:6]))
	}
	v, _, err := engines.LoadOrNew(key, func() (caddy.Destructor, error) {
		e, err := newEngine(uri, db)
		if err != nil {
			return nil, describeConnectErr(err, uri)
		}
		return e, nil
	})
	if err != nil {
		return err
	}
	a.eng, a.poolKey = v.(*engine), key
	a.store(a.eng, static, dir)
	return nil
}

// store puts the app's settings, with their defaults, in the pooled engine.
// The app has passed Validate and its placeholders are resolved (the static
// upstream keys and the spool directory are given resolved).
func (a *App) store(e *engine, static []billing.UpstreamKey, dir string) {
	s := defaultSettings()
	s.authTTL = orDefault(time.Duration(a.KeyCacheTTL), defaultAuthTTL) // negative: off
	s.keyRefresh = orDefault(time.Duration(a.KeyRefreshInterval), defaultRefresh)
	s.attempts = orDefault(a.KeyAttempts, defaultAttempts)
	s.budget = orDefault(time.Duration(a.KeyRetryBudget), defaultRetryBudget)
	s.cooldowns.RateLimitCooldown = orDefault(time.Duration(a.KeyCooldown), defaultRateLimitCooldown)
	s.cooldowns.ErrorCooldown = orDefault(time.Duration(a.KeyErrorCooldown), defaultErrorCooldown)
	s.static = len(static) > 0
	s.holdLease = orDefault(time.Duration(a.HoldLease), defaultHoldLease)
	if a.Isolation != "" {
		s.isolation = a.Isolation
	}
	s.errorLogs = a.ErrorLogs != "off"
	s.leases = a.CreditLease == "on"
	s.spoolDir = dir
	s.logger = a.logger
	if len(static) > 0 {
		e.keys.Set(static)
	}
	e.bodies.limit.Store(orDefault(a.BodyMemory, DefaultBodyMemory))
	policy := billing.OrphanChargeInput
	if a.OrphanPolicy != "" {
		policy = billing.OrphanPolicy(a.OrphanPolicy) // checked by Validate
	}
	e.settler.SetOrphanPolicy(policy)
	e.configure(s)
}

// provisionRateLimits attaches to the pooled buckets (Validate checked the
// limits).
func (a *App) provisionRateLimits() error {
	rl := a.RateLimit
	if rl == nil {
		rl = new(RateLimits)
	}
	state, err := acquireLimiters()
	if err != nil {
		return err
	}
	a.limits = &rateLimiter{state: state,
		user:   limitOrDefault(rl.User, defaultUserLimit),
		friend: limitOrDefault(rl.Friend, defaultFriendLimit),
		other:  limitOrDefault(rl.Other, defaultOtherLimit),
		ip:     limitOrDefault(rl.IP, RateLimit{}),
	}
	return nil
}

// Start starts the shared background work (once per engine).
func (a *App) Start() error {
	a.eng.start()
	return nil
}

// Stop does nothing: the engine outlives config reloads; Cleanup releases it.
func (a *App) Stop() error { return nil }

// Cleanup releases the engine; the last release drains pending settlements
// and disconnects.
func (a *App) Cleanup() error {
	if a.limits != nil {
		_, _ = rateLimitPool.Delete(rateLimitPoolKey)
		a.limits = nil
	}
	if a.poolKey == "" {
		return nil
	}
	// a.eng stays set: requests of this config generation may still be
	// streaming, and they settle through it (the pool keeps it alive while
	// another generation uses it; Destruct drains it otherwise).
	_, err := engines.Delete(a.poolKey)
	a.poolKey = ""
	return err
}

func orDefault[T int | int64 | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

func containsFold(s, sub string) bool {
	return strings.Contains(strings.ToLower(s), strings.ToLower(sub))
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Destructor   = (*engine)(nil)
)
