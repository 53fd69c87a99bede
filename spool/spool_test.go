package spool

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dataFor is the payload every test stores under id, so that any record read
// back can be checked byte for byte.
func dataFor(id string, n int) []byte {
	b := make([]byte, 0, n)
	for i := 0; len(b) < n; i++ {
		b = append(b, fmt.Sprintf("{%s:%d}", id, i)...)
	}
	return b[:n]
}

// sizeFor varies the payload size with the id.
func sizeFor(id string) int {
	h := 0
	for _, c := range id {
		h = h*31 + int(c)
	}
	return 20 + (h&0x7fffffff)%300
}

func openT(t testing.TB, dir string, opts Options) (*Spool, []Record) {
	t.Helper()
	s, recs, err := Open(dir, opts)
	require.NoError(t, err, "Open")
	return s, recs
}

func appendT(t testing.TB, s *Spool, id string) {
	t.Helper()
	require.NoError(t, s.Append(id, dataFor(id, sizeFor(id))), "Append(%q)", id)
}

func doneT(t testing.TB, s *Spool, id string) {
	t.Helper()
	require.NoError(t, s.Done(id), "Done(%q)", id)
}

func closeT(t testing.TB, s *Spool) {
	t.Helper()
	require.NoError(t, s.Close(), "Close")
}

// checkRecs checks that recs are exactly want, in order, with their data.
func checkRecs(t testing.TB, recs []Record, want []string) {
	t.Helper()
	got := make([]string, len(recs))
	for i, r := range recs {
		got[i] = r.ID
		assert.Equal(t, string(dataFor(r.ID, sizeFor(r.ID))), string(r.Data), "record %q: data", r.ID)
	}
	if len(want) == 0 {
		require.Empty(t, got, "records")
		return
	}
	require.Equal(t, want, got, "records")
}

func segFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "seg-*.log"))
	require.NoError(t, err)
	slices.Sort(m)
	return m
}

func dirUsage(t testing.TB, dir string) (size int64, files int) {
	t.Helper()
	des, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, de := range des {
		fi, err := de.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		require.NoError(t, err)
		size += fi.Size()
		files++
	}
	return size, files
}

func ids(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s%d", prefix, i)
	}
	return out
}

func TestAppendDoneReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool") // Open creates it
	s, recs := openT(t, dir, Options{})
	checkRecs(t, recs, nil)
	fi, err := os.Stat(dir)
	require.NoError(t, err, "directory")
	assert.Equal(t, fs.FileMode(0o700), fi.Mode().Perm(), "directory mode")
	all := ids("r", 10)
	for _, id := range all {
		appendT(t, s, id)
	}
	for _, id := range []string{"r1", "r3", "r4", "r8"} {
		doneT(t, s, id)
	}
	doneT(t, s, "r3")      // again: no-op
	doneT(t, s, "unknown") // never appended: no-op
	require.Equal(t, 6, s.Pending())
	closeT(t, s)

	s, recs = openT(t, dir, Options{})
	checkRecs(t, recs, []string{"r0", "r2", "r5", "r6", "r7", "r9"})
	require.Equal(t, 6, s.Pending(), "Pending after reopen")
	doneT(t, s, "r0") // a record of the previous run
	appendT(t, s, "r10")
	appendT(t, s, "r1") // done in the previous run: may come again
	closeT(t, s)

	s, recs = openT(t, dir, Options{})
	checkRecs(t, recs, []string{"r2", "r5", "r6", "r7", "r9", "r10", "r1"})
	for _, r := range recs {
		doneT(t, s, r.ID)
	}
	closeT(t, s)
	require.Empty(t, segFiles(t, dir), "segments left with nothing pending")
	s, recs = openT(t, dir, Options{})
	checkRecs(t, recs, nil)
	closeT(t, s)
}

// DoneAll marks several records in one write; unknown and repeated ids
// are skipped, as with Done.
func TestDoneAll(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	s, _ := openT(t, dir, Options{})
	for _, id := range ids("r", 6) {
		appendT(t, s, id)
	}
	require.NoError(t, s.DoneAll([]string{"r0", "r2", "r2", "unknown", "r5"}))
	require.NoError(t, s.DoneAll(nil))
	require.Equal(t, 3, s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	checkRecs(t, recs, []string{"r1", "r3", "r4"})
	require.NoError(t, s.DoneAll([]string{"r1", "r3", "r4"}))
	closeT(t, s)
	require.Empty(t, segFiles(t, dir), "segments left with nothing pending")
	assert.ErrorIs(t, s.DoneAll([]string{"r1"}), ErrClosed, "DoneAll after Close")
}

func TestCloseWithoutDoneThenReopen(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	want := ids("x", 5)
	for _, id := range want {
		appendT(t, s, id)
	}
	closeT(t, s)
	// Reopening again and again loses nothing and leaves no litter.
	for range 20 {
		s, recs := openT(t, dir, Options{})
		checkRecs(t, recs, want)
		closeT(t, s)
	}
	assert.Len(t, segFiles(t, dir), 1, "segments after 20 idle reopens")
}

func TestErrFull(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{MaxPending: 3})
	for _, id := range ids("f", 3) {
		appendT(t, s, id)
	}
	require.ErrorIs(t, s.Append("f3", nil), ErrFull, "4th Append")
	doneT(t, s, "f0")
	appendT(t, s, "f3")
	require.ErrorIs(t, s.Append("f4", nil), ErrFull, "Append after refill")
	closeT(t, s)
	// The records of the previous run count.
	s, recs := openT(t, dir, Options{MaxPending: 3})
	checkRecs(t, recs, []string{"f1", "f2", "f3"})
	assert.ErrorIs(t, s.Append("f5", nil), ErrFull, "Append with 3 replayed")
	closeT(t, s)
}

func TestDuplicatePendingID(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	require.NoError(t, s.Append("a", []byte("one")))
	require.ErrorIs(t, s.Append("a", []byte("two")), ErrDuplicate, "duplicate Append")
	doneT(t, s, "a")
	require.NoError(t, s.Append("a", []byte("three")), "Append after Done")
	require.Equal(t, 1, s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	require.Len(t, recs, 1)
	assert.Equal(t, "a", recs[0].ID)
	assert.Equal(t, "three", string(recs[0].Data))
	assert.ErrorIs(t, s.Append("a", []byte("four")), ErrDuplicate, "Append of a replayed id")
	closeT(t, s)
}

func TestBounds(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	for _, c := range []struct {
		id   string
		data int
	}{{"", 1}, {strings.Repeat("i", MaxIDLen+1), 1}, {"big", MaxDataLen + 1}} {
		assert.ErrorIs(t, s.Append(c.id, make([]byte, c.data)), ErrTooLarge, "Append(%d-byte id, %d bytes)", len(c.id), c.data)
	}
	longID := strings.Repeat("i", MaxIDLen)
	big := bytes.Repeat([]byte{0xAB}, MaxDataLen)
	require.NoError(t, s.Append(longID, big), "Append at the limits")
	require.NoError(t, s.Append("empty", nil), "Append without data")
	require.Equal(t, 2, s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	require.Len(t, recs, 2, "records at the limits")
	assert.Equal(t, longID, recs[0].ID, "long id did not round-trip")
	assert.True(t, bytes.Equal(big, recs[0].Data), "largest data did not round-trip")
	assert.Equal(t, "empty", recs[1].ID)
	assert.Empty(t, recs[1].Data)
	closeT(t, s)
}

// copyDir copies the files of src into a new temporary directory.
func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	des, err := os.ReadDir(src)
	require.NoError(t, err)
	for _, de := range des {
		b, err := os.ReadFile(filepath.Join(src, de.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dst, de.Name()), b, 0o600))
	}
	return dst
}

// frameSpans returns the [start, end) of every intact frame of a segment.
func frameSpans(buf []byte) (spans [][2]int) {
	scan(buf, func(f frame) { spans = append(spans, [2]int{f.off, f.off + f.n}) })
	return spans
}

func TestTornTail(t *testing.T) {
	src := t.TempDir()
	s, _ := openT(t, src, Options{})
	want := ids("t", 5)
	for _, id := range want {
		appendT(t, s, id)
	}
	closeT(t, s)
	segs := segFiles(t, src)
	require.Len(t, segs, 1, "segments")
	buf, _ := os.ReadFile(segs[0])
	spans := frameSpans(buf)
	require.Len(t, spans, 5, "frames in %d bytes", len(buf))
	require.Equal(t, len(buf), spans[4][1], "frames %v end before the file", spans)
	last := spans[4]
	// Every cut inside the last frame, from its first byte to its last.
	for cut := last[0] + 1; cut < last[1]; cut++ {
		dir := copyDir(t, src)
		require.NoError(t, os.Truncate(filepath.Join(dir, filepath.Base(segs[0])), int64(cut)))
		var logs []string
		s, recs := openT(t, dir, Options{Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }})
		checkRecs(t, recs, want[:4])
		require.Len(t, logs, 1, "cut at %d", cut)
		require.Contains(t, logs[0], "torn", "cut at %d", cut)
		// The spool goes on working after a torn tail.
		appendT(t, s, "after")
		doneT(t, s, "t0")
		closeT(t, s)
		s, recs = openT(t, dir, Options{})
		checkRecs(t, recs, []string{"t1", "t2", "t3", "after"})
		closeT(t, s)
	}
}

func TestCorruptByteInTheMiddle(t *testing.T) {
	src := t.TempDir()
	s, _ := openT(t, src, Options{})
	for _, id := range []string{"c0", "c1", "c2"} {
		appendT(t, s, id)
	}
	doneT(t, s, "c1")
	for _, id := range []string{"c3", "c4"} {
		appendT(t, s, id)
	}
	closeT(t, s)
	segs := segFiles(t, src)
	require.Len(t, segs, 1, "segments")
	name := filepath.Base(segs[0])
	orig, _ := os.ReadFile(segs[0])
	spans := frameSpans(orig) // c0 c1 c2 done(c1) c3 c4
	require.Len(t, spans, 6, "frames")
	frameIDs := []string{"c0", "c1", "c2", "", "c3", "c4"}

	// Flip every byte of the segment in turn: the damaged frame is lost
	// (a lost done frame brings its record back), nothing else changes, and
	// nothing unverified is ever returned.
	for off := range orig {
		hit := -1
		for i, sp := range spans {
			if off >= sp[0] && off < sp[1] {
				hit = i
			}
		}
		var want []string
		for i, id := range frameIDs {
			switch {
			case i == hit || id == "":
			case id == "c1" && hit != 3:
			default:
				want = append(want, id)
			}
		}
		dir := copyDir(t, src)
		buf := slices.Clone(orig)
		buf[off] ^= 0xFF
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), buf, 0o600))
		var logs []string
		s, recs := openT(t, dir, Options{Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }})
		checkRecs(t, recs, want)
		require.NotEmpty(t, logs, "byte %d flipped: nothing reported", off)
		closeT(t, s)
	}
}

func TestSegmentRotationAndDeletion(t *testing.T) {
	const segSize = 8 << 10
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{SegmentSize: segSize, SyncEvery: 20 * time.Millisecond})
	maxSize, maxFiles := int64(0), 0
	for i := range 100000 {
		id := fmt.Sprintf("req-%d", i)
		appendT(t, s, id)
		doneT(t, s, id)
		if i%500 == 0 {
			size, files := dirUsage(t, dir)
			maxSize, maxFiles = max(maxSize, size), max(maxFiles, files)
		}
	}
	// Frames of both kinds went through many segments; only the current
	// one (and the lock) is ever left.
	last := segFiles(t, dir)
	require.Len(t, last, 1, "segments")
	assert.True(t, strings.HasSuffix(last[0], fmt.Sprintf("%020d.log", s.cur.num)), "segment %s is not the current one (%d)", last[0], s.cur.num)
	assert.GreaterOrEqual(t, s.cur.num, uint64(1000), "segments used")
	assert.LessOrEqual(t, maxSize, int64(2*segSize), "directory size")
	assert.LessOrEqual(t, maxFiles, 3, "files in the directory")
	closeT(t, s)
	assert.Empty(t, segFiles(t, dir), "segments after Close")
	s, recs := openT(t, dir, Options{})
	checkRecs(t, recs, nil)
	closeT(t, s)
}

// Records that stay pending must not keep the done segments after them
// alive: they are moved forward, and the directory stays bounded. With
// fsync on, a segment whose records were moved is kept until the syncer has
// fsynced the copies; here the test plays the syncer, every 1000 records,
// so that the bounds do not depend on timing.
func TestLongPendingRecordsDoNotPinSegments(t *testing.T) {
	for _, c := range []struct {
		name string
		sync time.Duration
		n    int
	}{{"nosync", -1, 100000}, {"sync", time.Hour, 30000}} {
		t.Run(c.name, func(t *testing.T) {
			const segSize = 8 << 10
			dir := t.TempDir()
			s, _ := openT(t, dir, Options{SegmentSize: segSize, SyncEvery: c.sync})
			var stuck []string
			var stuckBytes, peak int64
			check := func(limit int64) {
				size, _ := dirUsage(t, dir)
				peak = max(peak, size)
				require.LessOrEqual(t, size, limit, "directory size (%d bytes pending)", stuckBytes)
			}
			for i := range c.n {
				id := fmt.Sprintf("req-%d", i)
				appendT(t, s, id)
				if i%1000 == 7 {
					stuck = append(stuck, id)
					stuckBytes += int64(headerLen + len(id) + sizeFor(id))
				} else {
					doneT(t, s, id)
				}
				if i%1000 == 999 {
					limit := 2*stuckBytes + 3*segSize
					if c.sync > 0 {
						// Before the sync, add what 1000 records (and the
						// copies of the pending ones) take.
						check(limit + 1000*2*(headerLen+200))
						s.syncOnce()
					}
					check(limit)
				}
			}
			t.Logf("directory peaked at %d bytes (%d bytes pending at the end)", peak, stuckBytes)
			closeT(t, s)
			s, recs := openT(t, dir, Options{SegmentSize: segSize})
			checkRecs(t, recs, stuck)
			closeT(t, s)
		})
	}
}

// A done frame lies in a later segment than its append; neither deletion
// nor moving may bring the record back.
func TestDoneInALaterSegment(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 512}
	s, _ := openT(t, dir, opts)
	appendT(t, s, "stuck")
	appendT(t, s, "late")
	for i := range 50 {
		id := fmt.Sprintf("fill-%d", i)
		appendT(t, s, id)
		doneT(t, s, id)
	}
	doneT(t, s, "late")
	for i := range 50 {
		id := fmt.Sprintf("more-%d", i)
		appendT(t, s, id)
		doneT(t, s, id)
	}
	closeT(t, s)
	s, recs := openT(t, dir, opts)
	checkRecs(t, recs, []string{"stuck"})
	closeT(t, s)
}

// A random workload with small segments and reopens, against a model.
func TestRandomAgainstModel(t *testing.T) {
	for seed := range uint64(8) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			dir := t.TempDir()
			// Odd seeds fsync (the test plays the syncer), which holds back
			// the deletion of segments whose records were moved.
			opts := Options{SegmentSize: int64(200 + rng.IntN(2000)), SyncEvery: -1}
			if seed%2 == 1 {
				opts.SyncEvery = time.Hour
			}
			s, _ := openT(t, dir, opts)
			var model []string // pending, in append order
			next := 0
			for range 2500 {
				switch r := rng.IntN(100); {
				case r < 50:
					id := fmt.Sprintf("m%d", next)
					if rng.IntN(10) == 0 && next > 0 {
						id = fmt.Sprintf("m%d", rng.IntN(next)) // reuse an id
					}
					next++
					err := s.Append(id, dataFor(id, sizeFor(id)))
					if slices.Contains(model, id) {
						require.ErrorIs(t, err, ErrDuplicate, "Append(%q) pending", id)
					} else {
						require.NoError(t, err)
						model = append(model, id)
					}
				case r < 93:
					if len(model) == 0 {
						continue
					}
					// Mostly the oldest, sometimes any.
					i := 0
					if rng.IntN(3) == 0 {
						i = rng.IntN(len(model))
					}
					doneT(t, s, model[i])
					model = slices.Delete(model, i, i+1)
				case r < 98:
					s.syncOnce()
				default:
					closeT(t, s)
					var recs []Record
					s, recs = openT(t, dir, opts)
					checkRecs(t, recs, model)
				}
				require.Equal(t, len(model), s.Pending(), "Pending against the model")
			}
			closeT(t, s)
			s, recs := openT(t, dir, opts)
			checkRecs(t, recs, model)
			closeT(t, s)
		})
	}
}

func TestSecondOpenFails(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	_, _, err := Open(dir, Options{})
	require.ErrorIs(t, err, ErrInUse, "second Open")
	require.ErrorContains(t, err, "spool "+dir+" in use", "second Open")
	closeT(t, s)
	s, _ = openT(t, dir, Options{})
	closeT(t, s)
}

func TestClosed(t *testing.T) {
	s, _ := openT(t, t.TempDir(), Options{})
	appendT(t, s, "a")
	closeT(t, s)
	assert.ErrorIs(t, s.Append("b", nil), ErrClosed, "Append after Close")
	assert.ErrorIs(t, s.Done("a"), ErrClosed, "Done after Close")
	assert.ErrorIs(t, s.Close(), ErrClosed, "second Close")
}

func TestConcurrent(t *testing.T) {
	dir := t.TempDir()
	opts := Options{SegmentSize: 8 << 10, SyncEvery: time.Millisecond}
	s, _ := openT(t, dir, opts)
	const workers, each = 16, 1500
	var wg sync.WaitGroup
	var mu sync.Mutex
	want := map[string]bool{}
	for g := range workers {
		wg.Go(func() {
			for i := range each {
				id := fmt.Sprintf("g%d-%d", g, i)
				if !assert.NoError(t, s.Append(id, dataFor(id, sizeFor(id)))) {
					return
				}
				if i%3 == 0 {
					mu.Lock()
					want[id] = true
					mu.Unlock()
					continue
				}
				if !assert.NoError(t, s.Done(id)) {
					return
				}
				_ = s.Pending()
			}
		})
	}
	wg.Wait()
	require.Equal(t, len(want), s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, opts)
	defer closeT(t, s)
	require.Len(t, recs, len(want))
	last := map[string]int{} // per worker, append order is kept
	for _, r := range recs {
		var g, i int
		fmt.Sscanf(r.ID, "g%d-%d", &g, &i)
		require.True(t, want[r.ID], "unexpected record %q", r.ID)
		require.Equal(t, string(dataFor(r.ID, sizeFor(r.ID))), string(r.Data), "record %q", r.ID)
		if p, ok := last[fmt.Sprint(g)]; ok {
			require.Less(t, p, i, "record %q after g%d-%d", r.ID, g, p)
		}
		last[fmt.Sprint(g)] = i
	}
}

func TestFrameRoundTrip(t *testing.T) {
	b := appendFrame(nil, kindAppend, 42, "id", []byte("data"))
	b = appendFrame(b, kindDone, 42, "id", nil)
	var got []frame
	require.Empty(t, scan(b, func(f frame) { got = append(got, f) }), "damage")
	require.Len(t, got, 2, "frames")
	assert.EqualValues(t, kindAppend, got[0].kind)
	assert.EqualValues(t, 42, got[0].seq)
	assert.Equal(t, "id", string(got[0].id))
	assert.Equal(t, "data", string(got[0].data))
	assert.EqualValues(t, kindDone, got[1].kind)
	assert.Equal(t, headerLen+6, got[1].off)
	// Zeros (what a power loss can leave) and garbage are skipped.
	junk := append(append(make([]byte, 100), b...), bytes.Repeat([]byte{0xFF, 'S', 'P', 'L', 9}, 20)...)
	got = nil
	bad := scan(junk, func(f frame) { got = append(got, f) })
	assert.Len(t, got, 2, "frames")
	require.Len(t, bad, 2, "damage")
	assert.Equal(t, damage{0, 100, false}, bad[0])
	assert.True(t, bad[1].tail, "damage %+v", bad[1])
}

// A failed write leaves the record out (Append) or pending (Done), and the
// next write goes to a fresh segment.
func TestWriteError(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	appendT(t, s, "a")
	breakFile := func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.cur.f.Close()
		f, err := os.Open(s.cur.path) // read-only: the next write(2) fails
		require.NoError(t, err)
		s.cur.f = f
	}
	breakFile()
	require.ErrorContains(t, s.Append("b", []byte("x")), `spool: append "b"`, "Append on a broken segment")
	require.Equal(t, 1, s.Pending())
	appendT(t, s, "c") // in a new segment
	breakFile()
	require.Error(t, s.Done("a"), "Done on a broken segment succeeded")
	require.Equal(t, 2, s.Pending())
	doneT(t, s, "a")
	appendT(t, s, "d")
	require.NoError(t, s.Close())
	s, recs := openT(t, dir, Options{})
	checkRecs(t, recs, []string{"c", "d"})
	closeT(t, s)
}

// A pending record whose frame the disk damaged while the spool was open
// cannot be moved forward: it is reported, stays pending in memory, and its
// segment no longer blocks the others.
func TestDamagedPendingRecordWhileOpen(t *testing.T) {
	dir := t.TempDir()
	var mu sync.Mutex
	var logs []string
	opts := Options{SegmentSize: 1024, SyncEvery: -1, Logf: func(f string, a ...any) {
		mu.Lock()
		logs = append(logs, fmt.Sprintf(f, a...))
		mu.Unlock()
	}}
	s, _ := openT(t, dir, opts)
	appendT(t, s, "victim")
	appendT(t, s, "kept")
	seg := segFiles(t, dir)[0]
	f, err := os.OpenFile(seg, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{'#'}, headerLen+10) // in the victim's data
	require.NoError(t, err)
	f.Close()
	for i := range 200 {
		id := fmt.Sprintf("traffic-%d", i)
		appendT(t, s, id)
		doneT(t, s, id)
	}
	segs := segFiles(t, dir)
	require.NotEmpty(t, segs)
	require.LessOrEqual(t, len(segs), 4, "segments %v", segs)
	require.NotEqual(t, seg, segs[0], "the damaged segment is still kept")
	mu.Lock()
	found := slices.ContainsFunc(logs, func(l string) bool { return strings.Contains(l, `"victim" no longer reads back intact`) })
	mu.Unlock()
	require.True(t, found, "logs %q", logs)
	require.Equal(t, 2, s.Pending())
	closeT(t, s)
	s, recs := openT(t, dir, opts)
	checkRecs(t, recs, []string{"kept"})
	closeT(t, s)
}
