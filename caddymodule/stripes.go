package caddymodule

import (
	"hash/maphash"
	"sync"
)

// stripes serialises the writes of this process to one document (a user's
// balance, a key's counters) with a fixed set of mutexes picked by hash.
//
// MongoDB applies each $inc atomically, so this is not needed for
// correctness there; it is for the test database: FerretDB 1.24 applies an
// update as read, modify, write without isolation, so two concurrent $inc
// on one document can lose one of them (40 concurrent updates, 15 applied,
// seen here). Serialising per document keeps one instance exact on both,
// and costs nothing measurable: writes to one user's balance are rare
// compared to the request rate, and different documents never wait.
type stripes struct {
	seed maphash.Seed
	mu   [256]sync.Mutex
}

func newStripes() *stripes { return &stripes{seed: maphash.MakeSeed()} }

func (s *stripes) lock(key string) func() {
	m := &s.mu[maphash.String(s.seed, key)%uint64(len(s.mu))]
	m.Lock()
	return m.Unlock
}
