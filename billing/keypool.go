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
// the legacy pool did. It is safe for concurrent use; Pick does not allocate.
type KeyPool struct {
	mu   sync.RWMutex
	keys []UpstreamKey
	next atomic.Uint64
}

// Set replaces the pool's keys.
func (p *KeyPool) Set(keys []UpstreamKey) {
	cp := append([]UpstreamKey(nil), keys...)
	p.mu.Lock()
	p.keys = cp
	p.mu.Unlock()
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
	for i := uint64(0); i < n; i++ {
		k := p.keys[(start+i)%n]
		if usable(k, now) {
			return k, nil
		}
	}
	return UpstreamKey{}, ErrNoUpstreamKey
}

func usable(k UpstreamKey, now time.Time) bool {
	switch k.Status {
	case "", "healthy":
		return true
	case "exhausted", "need_refresh":
		return false
	}
	return !k.CooldownUntil.IsZero() && !k.CooldownUntil.After(now)
}
