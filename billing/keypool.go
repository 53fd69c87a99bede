package billing

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// ErrNoUpstreamKey is returned by KeyPool.Pick when no key can serve.
var ErrNoUpstreamKey = errors.New("no upstream key available")

// KeyPool hands out upstream keys round-robin. Keys whose status is
// exhausted or need_refresh are skipped, and so are keys in any other
// non-healthy status while their cooldown has not passed (or has no end), as
// the legacy pool did; a key in "error" cooldown is used only when no other
// key can serve. It is safe for concurrent use; Pick does not allocate.
type KeyPool struct {
	mu   sync.RWMutex
	keys []UpstreamKey
	next atomic.Uint64
}

// Set replaces the pool's keys. A cooldown this process applied (Mark) that
// is still running and that the new list does not extend is kept: the
// database may not have been told yet, and short error cooldowns are never
// written there.
func (p *KeyPool) Set(keys []UpstreamKey) {
	p.SetAt(keys, time.Now())
}

// SetAt is Set with the current time given.
func (p *KeyPool) SetAt(keys []UpstreamKey, now time.Time) {
	cp := append([]UpstreamKey(nil), keys...)
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, old := range p.keys {
		if !old.CooldownUntil.After(now) {
			continue
		}
		for i := range cp {
			if cp[i].ID == old.ID && !cp[i].CooldownUntil.After(old.CooldownUntil) && usable(cp[i], now) {
				cp[i].Status, cp[i].CooldownUntil = old.Status, old.CooldownUntil
			}
		}
	}
	p.keys = cp
}

// Len returns the number of keys in the pool, usable or not.
func (p *KeyPool) Len() int {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return len(p.keys)
}

// Pick returns the next usable key.
func (p *KeyPool) Pick(now time.Time) (UpstreamKey, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	n := uint64(len(p.keys))
	if n == 0 {
		return UpstreamKey{}, ErrNoUpstreamKey
	}
	start := p.next.Add(1) - 1
	fallback := -1
	for i := uint64(0); i < n; i++ {
		j := int((start + i) % n)
		k := p.keys[j]
		if usable(k, now) {
			return k, nil
		}
		if fallback < 0 && k.Status == KeyError {
			fallback = j
		}
	}
	// A key cooling down after a server or transport error is still better
	// than no key: such errors are seldom the key's fault. Rate-limited,
	// exhausted and revoked keys are never used before their time.
	if fallback >= 0 {
		return p.keys[fallback], nil
	}
	return UpstreamKey{}, ErrNoUpstreamKey
}

// Mark records a key's new status in memory at once, so the next Pick skips
// it; the database is told separately. until is the end of the cooldown
// (zero: none).
func (p *KeyPool) Mark(id, status string, until time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.keys {
		if p.keys[i].ID == id {
			// Copy on write: Pick may hold the old slice's elements.
			keys := append([]UpstreamKey(nil), p.keys...)
			keys[i].Status, keys[i].CooldownUntil = status, until
			p.keys = keys
			return
		}
	}
}

// Restore puts a key back in service (healthy, no cooldown) if its status
// is still status, as a mark this process applied left it; a status the
// key got since is kept.
func (p *KeyPool) Restore(id, status string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for i := range p.keys {
		if p.keys[i].ID == id {
			if p.keys[i].Status != status {
				return
			}
			keys := append([]UpstreamKey(nil), p.keys...)
			keys[i].Status, keys[i].CooldownUntil = KeyHealthy, time.Time{}
			p.keys = keys
			return
		}
	}
}

// Snapshot returns a copy of the pool's keys.
func (p *KeyPool) Snapshot() []UpstreamKey {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return append([]UpstreamKey(nil), p.keys...)
}

// Usable reports whether Pick may return k at now on its first pass.
func Usable(k UpstreamKey, now time.Time) bool { return usable(k, now) }

func usable(k UpstreamKey, now time.Time) bool {
	switch k.Status {
	case "", "healthy":
		return true
	case "exhausted", "need_refresh":
		return false
	}
	return !k.CooldownUntil.IsZero() && !k.CooldownUntil.After(now)
}
