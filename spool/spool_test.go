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
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return s, recs
}

func appendT(t testing.TB, s *Spool, id string) {
	t.Helper()
	if err := s.Append(id, dataFor(id, sizeFor(id))); err != nil {
		t.Fatalf("Append(%q): %v", id, err)
	}
}

func doneT(t testing.TB, s *Spool, id string) {
	t.Helper()
	if err := s.Done(id); err != nil {
		t.Fatalf("Done(%q): %v", id, err)
	}
}

func closeT(t testing.TB, s *Spool) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// checkRecs checks that recs are exactly want, in order, with their data.
func checkRecs(t testing.TB, recs []Record, want []string) {
	t.Helper()
	got := make([]string, len(recs))
	for i, r := range recs {
		got[i] = r.ID
		if d := dataFor(r.ID, sizeFor(r.ID)); !bytes.Equal(r.Data, d) {
			t.Errorf("record %q: data %q, want %q", r.ID, r.Data, d)
		}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("records %v, want %v", got, want)
	}
}

func segFiles(t testing.TB, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "seg-*.log"))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(m)
	return m
}

func dirUsage(t testing.TB, dir string) (size int64, files int) {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range des {
		fi, err := de.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
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
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("directory: %v, %v", fi.Mode(), err)
	}
	all := ids("r", 10)
	for _, id := range all {
		appendT(t, s, id)
	}
	for _, id := range []string{"r1", "r3", "r4", "r8"} {
		doneT(t, s, id)
	}
	doneT(t, s, "r3")      // again: no-op
	doneT(t, s, "unknown") // never appended: no-op
	if n := s.Pending(); n != 6 {
		t.Fatalf("Pending = %d, want 6", n)
	}
	closeT(t, s)

	s, recs = openT(t, dir, Options{})
	checkRecs(t, recs, []string{"r0", "r2", "r5", "r6", "r7", "r9"})
	if n := s.Pending(); n != 6 {
		t.Fatalf("Pending after reopen = %d, want 6", n)
	}
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
	if segs := segFiles(t, dir); len(segs) != 0 {
		t.Fatalf("segments left with nothing pending: %v", segs)
	}
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
	if err := s.DoneAll([]string{"r0", "r2", "r2", "unknown", "r5"}); err != nil {
		t.Fatal(err)
	}
	if err := s.DoneAll(nil); err != nil {
		t.Fatal(err)
	}
	if n := s.Pending(); n != 3 {
		t.Fatalf("Pending = %d, want 3", n)
	}
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	checkRecs(t, recs, []string{"r1", "r3", "r4"})
	if err := s.DoneAll([]string{"r1", "r3", "r4"}); err != nil {
		t.Fatal(err)
	}
	closeT(t, s)
	if segs := segFiles(t, dir); len(segs) != 0 {
		t.Fatalf("segments left with nothing pending: %v", segs)
	}
	if err := s.DoneAll([]string{"r1"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("DoneAll after Close: %v, want ErrClosed", err)
	}
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
	if segs := segFiles(t, dir); len(segs) != 1 {
		t.Fatalf("segments after 20 idle reopens: %v", segs)
	}
}

func TestErrFull(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{MaxPending: 3})
	for _, id := range ids("f", 3) {
		appendT(t, s, id)
	}
	if err := s.Append("f3", nil); !errors.Is(err, ErrFull) {
		t.Fatalf("4th Append: %v, want ErrFull", err)
	}
	doneT(t, s, "f0")
	appendT(t, s, "f3")
	if err := s.Append("f4", nil); !errors.Is(err, ErrFull) {
		t.Fatalf("Append after refill: %v, want ErrFull", err)
	}
	closeT(t, s)
	// The records of the previous run count.
	s, recs := openT(t, dir, Options{MaxPending: 3})
	checkRecs(t, recs, []string{"f1", "f2", "f3"})
	if err := s.Append("f5", nil); !errors.Is(err, ErrFull) {
		t.Fatalf("Append with 3 replayed: %v, want ErrFull", err)
	}
	closeT(t, s)
}

func TestDuplicatePendingID(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	if err := s.Append("a", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := s.Append("a", []byte("two")); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("duplicate Append: %v, want ErrDuplicate", err)
	}
	doneT(t, s, "a")
	if err := s.Append("a", []byte("three")); err != nil {
		t.Fatalf("Append after Done: %v", err)
	}
	if n := s.Pending(); n != 1 {
		t.Fatalf("Pending = %d", n)
	}
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	if len(recs) != 1 || recs[0].ID != "a" || string(recs[0].Data) != "three" {
		t.Fatalf("records %+v", recs)
	}
	if err := s.Append("a", []byte("four")); !errors.Is(err, ErrDuplicate) {
		t.Fatalf("Append of a replayed id: %v, want ErrDuplicate", err)
	}
	closeT(t, s)
}

func TestBounds(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, Options{})
	for _, c := range []struct {
		id   string
		data int
	}{{"", 1}, {strings.Repeat("i", MaxIDLen+1), 1}, {"big", MaxDataLen + 1}} {
		if err := s.Append(c.id, make([]byte, c.data)); !errors.Is(err, ErrTooLarge) {
			t.Errorf("Append(%d-byte id, %d bytes): %v, want ErrTooLarge", len(c.id), c.data, err)
		}
	}
	longID := strings.Repeat("i", MaxIDLen)
	big := bytes.Repeat([]byte{0xAB}, MaxDataLen)
	if err := s.Append(longID, big); err != nil {
		t.Fatalf("Append at the limits: %v", err)
	}
	if err := s.Append("empty", nil); err != nil {
		t.Fatalf("Append without data: %v", err)
	}
	if n := s.Pending(); n != 2 {
		t.Fatalf("Pending = %d, want 2", n)
	}
	closeT(t, s)
	s, recs := openT(t, dir, Options{})
	if len(recs) != 2 || recs[0].ID != longID || !bytes.Equal(recs[0].Data, big) || recs[1].ID != "empty" || len(recs[1].Data) != 0 {
		t.Fatalf("records at the limits did not round-trip")
	}
	closeT(t, s)
}

// copyDir copies the files of src into a new temporary directory.
func copyDir(t testing.TB, src string) string {
	t.Helper()
	dst := t.TempDir()
	des, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, de := range des {
		b, err := os.ReadFile(filepath.Join(src, de.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, de.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
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
	if len(segs) != 1 {
		t.Fatalf("segments %v", segs)
	}
	buf, _ := os.ReadFile(segs[0])
	spans := frameSpans(buf)
	if len(spans) != 5 || spans[4][1] != len(buf) {
		t.Fatalf("frames %v in %d bytes", spans, len(buf))
	}
	last := spans[4]
	// Every cut inside the last frame, from its first byte to its last.
	for cut := last[0] + 1; cut < last[1]; cut++ {
		dir := copyDir(t, src)
		if err := os.Truncate(filepath.Join(dir, filepath.Base(segs[0])), int64(cut)); err != nil {
			t.Fatal(err)
		}
		var logs []string
		s, recs := openT(t, dir, Options{Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }})
		checkRecs(t, recs, want[:4])
		if len(logs) != 1 || !strings.Contains(logs[0], "torn") {
			t.Fatalf("cut at %d: logs %q", cut, logs)
		}
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
	if len(segs) != 1 {
		t.Fatalf("segments %v", segs)
	}
	name := filepath.Base(segs[0])
	orig, _ := os.ReadFile(segs[0])
	spans := frameSpans(orig) // c0 c1 c2 done(c1) c3 c4
	if len(spans) != 6 {
		t.Fatalf("frames %v", spans)
	}
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
		if err := os.WriteFile(filepath.Join(dir, name), buf, 0o600); err != nil {
			t.Fatal(err)
		}
		var logs []string
		s, recs := openT(t, dir, Options{Logf: func(f string, a ...any) { logs = append(logs, fmt.Sprintf(f, a...)) }})
		checkRecs(t, recs, want)
		if len(logs) == 0 {
			t.Fatalf("byte %d flipped: nothing reported", off)
		}
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
	if last := segFiles(t, dir); len(last) != 1 || !strings.HasSuffix(last[0], fmt.Sprintf("%020d.log", s.cur.num)) || s.cur.num < 1000 {
		t.Fatalf("segments %v (current %d)", last, s.cur.num)
	}
	if maxSize > 2*segSize || maxFiles > 3 {
		t.Fatalf("directory reached %d bytes in %d files", maxSize, maxFiles)
	}
	closeT(t, s)
	if segs := segFiles(t, dir); len(segs) != 0 {
		t.Fatalf("segments after Close: %v", segs)
	}
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
				if size > limit {
					t.Fatalf("directory at %d bytes, limit %d (%d bytes pending)", size, limit, stuckBytes)
				}
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
						if !errors.Is(err, ErrDuplicate) {
							t.Fatalf("Append(%q) pending: %v", id, err)
						}
					} else if err != nil {
						t.Fatal(err)
					} else {
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
				if s.Pending() != len(model) {
					t.Fatalf("Pending = %d, model %d", s.Pending(), len(model))
				}
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
	if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), "spool "+dir+" in use") {
		t.Fatalf("second Open: %v", err)
	}
	closeT(t, s)
	s, _ = openT(t, dir, Options{})
	closeT(t, s)
}

func TestClosed(t *testing.T) {
	s, _ := openT(t, t.TempDir(), Options{})
	appendT(t, s, "a")
	closeT(t, s)
	if err := s.Append("b", nil); !errors.Is(err, ErrClosed) {
		t.Errorf("Append after Close: %v", err)
	}
	if err := s.Done("a"); !errors.Is(err, ErrClosed) {
		t.Errorf("Done after Close: %v", err)
	}
	if err := s.Close(); !errors.Is(err, ErrClosed) {
		t.Errorf("second Close: %v", err)
	}
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
				if err := s.Append(id, dataFor(id, sizeFor(id))); err != nil {
					t.Error(err)
					return
				}
				if i%3 == 0 {
					mu.Lock()
					want[id] = true
					mu.Unlock()
					continue
				}
				if err := s.Done(id); err != nil {
					t.Error(err)
					return
				}
				_ = s.Pending()
			}
		})
	}
	wg.Wait()
	if s.Pending() != len(want) {
		t.Fatalf("Pending = %d, want %d", s.Pending(), len(want))
	}
	closeT(t, s)
	s, recs := openT(t, dir, opts)
	defer closeT(t, s)
	if len(recs) != len(want) {
		t.Fatalf("%d records, want %d", len(recs), len(want))
	}
	last := map[string]int{} // per worker, append order is kept
	for _, r := range recs {
		var g, i int
		fmt.Sscanf(r.ID, "g%d-%d", &g, &i)
		if !want[r.ID] || !bytes.Equal(r.Data, dataFor(r.ID, sizeFor(r.ID))) {
			t.Fatalf("unexpected record %q", r.ID)
		}
		if p, ok := last[fmt.Sprint(g)]; ok && p >= i {
			t.Fatalf("record %q after g%d-%d", r.ID, g, p)
		}
		last[fmt.Sprint(g)] = i
	}
}

func TestFrameRoundTrip(t *testing.T) {
	b := appendFrame(nil, kindAppend, 42, "id", []byte("data"))
	b = appendFrame(b, kindDone, 42, "id", nil)
	var got []frame
	if bad := scan(b, func(f frame) { got = append(got, f) }); len(bad) != 0 {
		t.Fatalf("damage %v", bad)
	}
	if len(got) != 2 || got[0].kind != kindAppend || got[0].seq != 42 || string(got[0].id) != "id" ||
		string(got[0].data) != "data" || got[1].kind != kindDone || got[1].off != headerLen+6 {
		t.Fatalf("frames %+v", got)
	}
	// Zeros (what a power loss can leave) and garbage are skipped.
	junk := append(append(make([]byte, 100), b...), bytes.Repeat([]byte{0xFF, 'S', 'P', 'L', 9}, 20)...)
	got = nil
	bad := scan(junk, func(f frame) { got = append(got, f) })
	if len(got) != 2 || len(bad) != 2 || bad[0] != (damage{0, 100, false}) || !bad[1].tail {
		t.Fatalf("frames %d, damage %+v", len(got), bad)
	}
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
		if err != nil {
			t.Fatal(err)
		}
		s.cur.f = f
	}
	breakFile()
	if err := s.Append("b", []byte("x")); err == nil || !strings.Contains(err.Error(), `spool: append "b"`) {
		t.Fatalf("Append on a broken segment: %v", err)
	}
	if n := s.Pending(); n != 1 {
		t.Fatalf("Pending = %d, want 1", n)
	}
	appendT(t, s, "c") // in a new segment
	breakFile()
	if err := s.Done("a"); err == nil {
		t.Fatal("Done on a broken segment succeeded")
	}
	if n := s.Pending(); n != 2 {
		t.Fatalf("Pending = %d, want 2", n)
	}
	doneT(t, s, "a")
	appendT(t, s, "d")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
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
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{'#'}, headerLen+10); err != nil { // in the victim's data
		t.Fatal(err)
	}
	f.Close()
	for i := range 200 {
		id := fmt.Sprintf("traffic-%d", i)
		appendT(t, s, id)
		doneT(t, s, id)
	}
	if segs := segFiles(t, dir); len(segs) > 4 || segs[0] == seg {
		t.Fatalf("segments %v", segs)
	}
	mu.Lock()
	found := slices.ContainsFunc(logs, func(l string) bool { return strings.Contains(l, `"victim" no longer reads back intact`) })
	mu.Unlock()
	if !found || s.Pending() != 2 {
		t.Fatalf("pending %d, logs %q", s.Pending(), logs)
	}
	closeT(t, s)
	s, recs := openT(t, dir, opts)
	checkRecs(t, recs, []string{"kept"})
	closeT(t, s)
}
