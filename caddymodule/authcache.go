package caddymodule

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// authCache keeps successful key lookups for a short time (auth_cache_ttl),
// so that a busy key costs no database round trip. An entry hit in the
// second half of its life is looked up again in the background (one lookup
// at a time per key), so a key in steady use never waits for the database,
// while a key that was revoked stops working within the TTL as before (or
// sooner, when a background lookup sees it refused). Refusals are not
// cached: a key that was just created or re-activated works at once. The
// raw key is only ever a map key in memory; it is never logged.
type authCache struct {
	mu      sync.RWMutex
	entries map[string]*authEntry
}

type authEntry struct {
	p          billing.Principal
	refreshAt  time.Time
	expires    time.Time
	refreshing atomic.Bool
}

func newAuthCache() *authCache {
	return &authCache{entries: make(map[string]*authEntry)}
}

// get returns a live entry, and whether the caller should look the key up
// again in the background (it is then the only one told so until put or
// unmark). It does not allocate.
func (c *authCache) get(key string, now time.Time) (p billing.Principal, ok, refresh bool) {
	c.mu.RLock()
	e := c.entries[key]
	c.mu.RUnlock()
	if e == nil || !now.Before(e.expires) {
		return billing.Principal{}, false, false
	}
	refresh = !now.Before(e.refreshAt) && e.refreshing.CompareAndSwap(false, true)
	return e.p, true, refresh
}

// put stores a lookup made at now, live for ttl.
func (c *authCache) put(key string, p billing.Principal, now time.Time, ttl time.Duration) {
	e := &authEntry{p: p, refreshAt: now.Add(ttl / 2), expires: now.Add(ttl)}
	c.mu.Lock()
	c.entries[key] = e
	c.mu.Unlock()
}

// setBalances replaces the balances of a cached key, keeping its lifetime
// and refresh state; it does nothing when the key is not cached.
func (c *authCache) setBalances(key string, b billing.Balances) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.entries[key]
	if e == nil {
		return
	}
	n := &authEntry{p: e.p, refreshAt: e.refreshAt, expires: e.expires}
	n.p.Balances = b
	n.refreshing.Store(e.refreshing.Load())
	c.entries[key] = n
}

// drop forgets a key (a background lookup found it refused).
func (c *authCache) drop(key string) {
	c.mu.Lock()
	delete(c.entries, key)
	c.mu.Unlock()
}

// unmark lets the next hit start a background lookup again (this one
// failed for a reason other than a refusal).
func (c *authCache) unmark(key string) {
	c.mu.RLock()
	e := c.entries[key]
	c.mu.RUnlock()
	if e != nil {
		e.refreshing.Store(false)
	}
}

// sweep drops expired entries.
func (c *authCache) sweep(now time.Time) {
	c.mu.Lock()
	for k, e := range c.entries {
		if !now.Before(e.expires) {
			delete(c.entries, k)
		}
	}
	c.mu.Unlock()
}
