package caddymodule

import (
	"sync"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// authCache keeps successful key lookups for a short time, so that a busy
// key costs no database round trip. Refusals are not cached: a key that was
// just created or re-activated works at once. The raw key is only ever a map
// key in memory; it is never logged.
type authCache struct {
	mu      sync.RWMutex
	entries map[string]authEntry
}

type authEntry struct {
	p       billing.Principal
	expires time.Time
}

func newAuthCache() *authCache {
	return &authCache{entries: make(map[string]authEntry)}
}

// get returns a live entry. It does not allocate.
func (c *authCache) get(key string, now time.Time) (billing.Principal, bool) {
	c.mu.RLock()
	e, ok := c.entries[key]
	c.mu.RUnlock()
	if !ok || !now.Before(e.expires) {
		return billing.Principal{}, false
	}
	return e.p, true
}

func (c *authCache) put(key string, p billing.Principal, expires time.Time) {
	c.mu.Lock()
	c.entries[key] = authEntry{p: p, expires: expires}
	c.mu.Unlock()
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
