package spool

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blockFirstWrite makes the first batch write of s wait until the returned
// release is called, and counts the batch writes.
func blockFirstWrite(s *Spool) (entered <-chan struct{}, release func(), writes func() int) {
	in, out := make(chan struct{}), make(chan struct{})
	n := 0 // only writers touch it, one at a time
	s.testHookWrite = func() {
		n++
		if n == 1 {
			close(in)
			<-out
		}
	}
	return in, func() { close(out) }, func() int {
		s.mu.Lock()
		defer s.mu.Unlock()
		return n
	}
}

// queuedOps is the number of frames waiting for the next batch write.
func queuedOps(s *Spool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.batch == nil {
		return 0
	}
	return len(s.batch.ops)
}

// Appends and Dones made while a write is under way are written together,
// by one write(2), and each returns only once its frame is written.
func TestConcurrentCallersShareAWrite(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{SyncEvery: -1})
	appendT(t, s, "old")
	entered, release, writes := blockFirstWrite(s)
	first := make(chan error)
	go func() { first <- s.Append("a", dataFor("a", sizeFor("a"))) }()
	<-entered
	const n = 20
	errs := make(chan error, n+1)
	var returned sync.WaitGroup
	for i := range n {
		returned.Go(func() {
			id := fmt.Sprintf("b%d", i)
			errs <- s.Append(id, dataFor(id, sizeFor(id)))
		})
	}
	returned.Go(func() { errs <- s.Done("old") })
	require.Eventually(t, func() bool { return queuedOps(s) == n+1 }, 5*time.Second, time.Millisecond)
	select {
	case err := <-errs:
		t.Fatalf("a caller returned before its frame was written: %v", err)
	default:
	}
	release()
	require.NoError(t, <-first)
	returned.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, 2, writes(), "batch writes: the first caller's, then one for all the others")
	assert.Equal(t, n+1, s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	defer closeT(t, s)
	want := []string{"a"}
	for i := range n {
		want = append(want, fmt.Sprintf("b%d", i))
	}
	require.Len(t, recs, len(want))
	got := map[string]string{}
	for _, r := range recs {
		got[r.ID] = string(r.Data)
	}
	for _, id := range want {
		assert.Equal(t, string(dataFor(id, sizeFor(id))), got[id], "record %q", id)
	}
}

// When a shared write fails, every caller in it gets the error: none of
// the appended records is pending, the record to be done stays pending.
func TestSharedWriteFailsForAll(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{SyncEvery: -1})
	appendT(t, s, "old")
	in, out := make(chan struct{}), make(chan struct{})
	writes := 0 // only writers touch it, one at a time
	s.testHookWrite = func() {
		writes++
		switch writes {
		case 1:
			close(in)
			<-out
		case 2: // the shared write: its segment breaks (the writer holds it alone)
			s.cur.f.Close()
			f, err := os.Open(s.cur.path) // read-only: write(2) fails
			if assert.NoError(t, err) {
				s.cur.f = f
			}
		}
	}
	first := make(chan error)
	go func() { first <- s.Append("a", dataFor("a", sizeFor("a"))) }()
	<-in
	const n = 10
	errs := make(chan error, n+1)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs <- s.Append(fmt.Sprintf("b%d", i), []byte("y")) })
	}
	wg.Go(func() { errs <- s.Done("old") })
	require.Eventually(t, func() bool { return queuedOps(s) == n+1 }, 5*time.Second, time.Millisecond)
	close(out)
	require.NoError(t, <-first)
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.Error(t, err)
	}
	assert.Equal(t, 2, s.Pending(), `"old" and "a"`)
	appendT(t, s, "c") // in a new segment
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	defer closeT(t, s)
	checkRecs(t, recs, []string{"old", "a", "c"})
}
