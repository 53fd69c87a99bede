package caddymodule

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/mongostore"
)

// fakeIsolator records the isolations set on it and answers IsFerretDB
// from a script: one error per entry of errs, then ferret.
type fakeIsolator struct {
	mu     sync.Mutex
	set    []mongostore.Isolation
	probes int
	errs   int
	ferret bool
}

func (f *fakeIsolator) SetIsolation(iso mongostore.Isolation) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.set = append(f.set, iso)
}

func (f *fakeIsolator) IsFerretDB(context.Context) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.probes++
	if f.probes <= f.errs {
		return false, errors.New("server selection timeout")
	}
	return f.ferret, nil
}

// state returns the isolations set so far and the number of probes.
func (f *fakeIsolator) state() ([]mongostore.Isolation, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.set), f.probes
}

// isolationEngine returns an engine with the isolation setting mode over
// iso, whose background probe ends with the test.
func isolationEngine(t *testing.T, mode string, iso *fakeIsolator) *engine {
	e := newEngineWithStore(&fakeStore{})
	e.isolator = iso
	e.set(func(s *settings) { s.isolation = mode })
	t.Cleanup(func() { close(e.stop) })
	return e
}

// TestApplyIsolation checks each isolation setting: process and shared are
// set as written without asking the server; auto isolates across instances
// until the server answers, then drops the locks on MongoDB and keeps them
// on FerretDB, asking again after an error.
func TestApplyIsolation(t *testing.T) {
	const wait, tick = 5 * time.Second, 10 * time.Millisecond
	shared, atomic := mongostore.IsolationShared, mongostore.IsolationAtomic

	t.Run("process", func(t *testing.T) {
		iso := &fakeIsolator{}
		isolationEngine(t, "process", iso).applyIsolation()
		set, probes := iso.state()
		assert.Equal(t, []mongostore.Isolation{mongostore.IsolationProcess}, set)
		assert.Zero(t, probes, "process must not ask the server")
	})
	t.Run("shared", func(t *testing.T) {
		iso := &fakeIsolator{}
		isolationEngine(t, "shared", iso).applyIsolation()
		set, probes := iso.state()
		assert.Equal(t, []mongostore.Isolation{shared}, set)
		assert.Zero(t, probes, "shared must not ask the server")
	})
	t.Run("auto on MongoDB", func(t *testing.T) {
		iso := &fakeIsolator{}
		isolationEngine(t, "auto", iso).applyIsolation()
		set, _ := iso.state()
		require.NotEmpty(t, set)
		assert.Equal(t, shared, set[0], "auto must isolate across instances until the server answers")
		assert.Eventually(t, func() bool {
			set, _ := iso.state()
			return slices.Equal(set, []mongostore.Isolation{shared, atomic})
		}, wait, tick, "auto on MongoDB must end without locks")
	})
	t.Run("auto on FerretDB", func(t *testing.T) {
		iso := &fakeIsolator{ferret: true}
		isolationEngine(t, "auto", iso).applyIsolation()
		require.Eventually(t, func() bool { _, probes := iso.state(); return probes == 1 }, wait, tick)
		time.Sleep(50 * time.Millisecond) // room for a wrong second set
		set, probes := iso.state()
		assert.Equal(t, []mongostore.Isolation{shared}, set, "auto on FerretDB must keep the shared locks")
		assert.Equal(t, 1, probes)
	})
	t.Run("auto after an error", func(t *testing.T) {
		iso := &fakeIsolator{errs: 1}
		isolationEngine(t, "auto", iso).applyIsolation()
		assert.Eventually(t, func() bool {
			set, probes := iso.state()
			return probes == 2 && slices.Equal(set, []mongostore.Isolation{shared, atomic})
		}, wait, tick, "auto must ask again after a failed probe")
	})
	t.Run("no isolator", func(t *testing.T) {
		e := newEngineWithStore(&fakeStore{})
		assert.NotPanics(t, e.applyIsolation)
	})
}
