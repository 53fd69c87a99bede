//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package spool

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
)

// On this platform the lock is process-local only: two Spools of one
// process exclude each other, two processes do not.
var (
	lockedMu sync.Mutex
	locked   = map[string]bool{}
)

func lockKey(dir string) string {
	if abs, err := filepath.Abs(dir); err == nil {
		return abs
	}
	return dir
}

func lockDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, lockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spool: open lock file: %w", err)
	}
	lockedMu.Lock()
	defer lockedMu.Unlock()
	if k := lockKey(dir); locked[k] {
		f.Close()
		return nil, fmt.Errorf("spool %s in use (by this process): %w", dir, ErrInUse)
	} else {
		locked[k] = true
	}
	return f, nil
}

func unlockDir(dir string, f *os.File) error {
	lockedMu.Lock()
	delete(locked, lockKey(dir))
	lockedMu.Unlock()
	return f.Close()
}

func syncDir(string) error { return nil }
