// Package spool is a durable local journal of pending billing settlements.
//
// Before the gateway writes a settlement to the database it appends the
// settlement to the spool ([Spool.Append]); once the database has confirmed
// the write it marks the record done ([Spool.Done]). If the process dies in
// between, or the database is unreachable for a while, the record is still
// in the spool, and the next [Open] returns it so that it can be written
// again. The database writes must therefore be idempotent: a record is
// replayed whenever its Done did not reach the journal, which includes a
// process that died after the database write and before Done returned.
//
// # Durability
//
//   - Process death (panic, OOM kill, kill -9): a record is safe once Append
//     has returned. Append returns once the whole framed record was handed to
//     the kernel by one write(2) call, so it is in the page cache and survives
//     the process. A Done that has returned is
//     durable in the same way; a Done interrupted by the death may or may not
//     have been recorded (if not, the record is replayed).
//   - Power loss or kernel crash: data reaches the disk when it is fsynced. A
//     background goroutine fsyncs the segment being written (and the
//     directory, after a segment was created) every [Options.SyncEvery],
//     default 1s; Close fsyncs everything. So the records appended in the last
//     SyncEvery or so before a power loss may be lost, and Done marks of that
//     window may be lost (those records are replayed). With a negative
//     SyncEvery only Close fsyncs. A torn or zero-filled stretch left by a
//     power loss is detected and skipped, never returned.
//
// Nothing is fsynced on the Append/Done path, which costs at most two
// write(2) calls per record (see Cost).
//
// # On-disk format
//
// The directory holds a lock file, LOCK (flock'ed while a Spool has the
// directory open; it holds the owner's pid, for the error message), and
// segment files named seg-<20-digit sequence number>.log, written one after
// the other. Other files are ignored. A segment is a sequence of frames, one
// per Append or Done; all integers are little-endian:
//
//	offset  size  field
//	0       4     magic: 0xFF 'S' 'P' 'L'
//	4       1     kind: 1 = append, 2 = done
//	5       1     reserved, 0
//	6       2     id length, 1..256
//	8       4     data length, 0..1 MiB (0 in a done frame)
//	12      8     record sequence number: increasing in append order; a done
//	              frame carries the number of the append it completes
//	20      4     CRC-32C (Castagnoli) of bytes 4..20, the id and the data
//	24            id, then data
//
// A frame is accepted only if it is complete, its lengths are within bounds
// and its CRC matches. Reading resumes after a bad spot at the next magic, so
// a torn last frame (the process died in the middle of a write) is ignored,
// and corruption inside a segment costs only the frames it touches; a record
// whose CRC does not match is never returned. (A lost done frame means a
// replay, a lost append frame a lost record.) Reading replays the segments
// in order: an append makes its id pending, a done with the same id and
// sequence number removes it. The records still pending are returned by
// Open, in append (sequence) order.
//
// # Segments and compaction
//
// Frames go to the current segment; when it would grow beyond
// [Options.SegmentSize] a new one is started. Every Open starts a new current
// segment and never writes into the files of an earlier run (so a torn tail
// stays at the end of its file). The spool keeps in memory, per segment, the
// number and size of its pending records. A segment is deleted once it is not
// the current one, all the records appended to it are done, and all older
// segments are deleted: a done frame may lie in a later segment than its
// append, and must not disappear while the append is still on disk.
//
// So that a few records that stay pending for a long time (a database outage,
// a record the caller never marks done) do not keep all later segments
// alive, the spool moves them forward: when the dead bytes kept on disk by
// the oldest segment with pending records exceed both all pending bytes and
// one SegmentSize, the pending frames of that segment are copied unchanged
// (same id, sequence number and CRC) into the current segment, and the
// segment is deleted once the syncer has fsynced the copies (at once if
// SyncEvery is negative). A copy and its original carry the same sequence
// number, so a crash in the middle of a move changes nothing. Moving runs
// when a new segment is started, for at most two segments at a time, and at
// Open. It keeps the directory within about twice the pending bytes plus a
// few segments (and what is written within one SyncEvery), at the price of
// rewriting at most about as many bytes as the traffic itself, and only
// while records stay pending. Close deletes the segments that hold no
// pending record, so a spool with nothing pending leaves only LOCK behind.
//
// # Cost
//
// Appends and Dones are group-committed: the frames callers queue while a
// write(2) is under way are written together by the next one, by the first
// of those callers, and each returns when its frame is written. A caller
// alone costs one write(2), no fsync and one small allocation: about 5 µs for an
// Append and a Done of a 1 KiB record on ext4; many callers at once share
// their system calls (and do not sleep on a lock held across one) instead
// of taking turns for one each. Starting a segment adds a file
// creation, and deleting one an unlink, once per SegmentSize of traffic;
// moving records forward reads a segment and writes the copies while
// holding the Spool's lock, which pauses concurrent callers for about the
// time it takes to copy a few MiB in the page cache.
package spool

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	lockName      = "LOCK"
	segPrefix     = "seg-"
	segSuffix     = ".log"
	segDigits     = 20
	defaultMax    = 100000
	defaultSegLen = 4 << 20
	defaultSync   = time.Second
)

// Options configure a Spool. The zero value gives the defaults.
type Options struct {
	// MaxPending is the largest number of records appended and not yet
	// done, counting those returned by Open; Append returns ErrFull beyond
	// it. Zero or negative means 100000.
	MaxPending int
	// SegmentSize is the size in bytes after which a new segment file is
	// started. Zero or negative means 4 MiB.
	SegmentSize int64
	// SyncEvery is how often a background goroutine fsyncs the segment
	// being written, which bounds what a power loss can take. Zero means
	// 1s; negative means never (only Close fsyncs).
	SyncEvery time.Duration
	// Logf, if set, receives reports the caller cannot otherwise see:
	// damaged stretches skipped by Open, failed background fsyncs, segment
	// files that could not be removed. It must be safe for concurrent use
	// and must not call back into the Spool.
	Logf func(format string, args ...any)
}

func (o Options) withDefaults() Options {
	if o.MaxPending <= 0 {
		o.MaxPending = defaultMax
	}
	if o.SegmentSize <= 0 {
		o.SegmentSize = defaultSegLen
	}
	if o.SyncEvery == 0 {
		o.SyncEvery = defaultSync
	}
	return o
}

// Record is a pending record, as returned by Open.
type Record struct {
	ID   string
	Data []byte
}

var (
	// ErrFull is returned by Append when Options.MaxPending records are
	// pending.
	ErrFull = errors.New("spool full: too many pending records")
	// ErrClosed is returned by the methods of a closed Spool.
	ErrClosed = errors.New("spool closed")
	// ErrInUse is wrapped by the error of Open when another Spool, in this
	// process or another, has the directory open.
	ErrInUse = errors.New("spool directory in use")
	// ErrDuplicate is wrapped by the error of Append when the id is already
	// pending.
	ErrDuplicate = errors.New("id already pending")
	// ErrTooLarge is wrapped by the error of Append when the id is empty or
	// longer than MaxIDLen, or the data is longer than MaxDataLen.
	ErrTooLarge = errors.New("record out of bounds")
)

// Spool is an open journal directory. Its methods are safe for concurrent
// use.
type Spool struct {
	dir  string
	opts Options
	lock *os.File

	mu       sync.Mutex
	closed   bool
	pending  map[string]entry
	segs     []*segment // oldest first; the last is the current one
	cur      *segment
	nextSeq  uint64          // sequence number of the next append
	nextSeg  uint64          // number of the next segment file
	queued   map[string]bool // ids whose append frame waits in a batch
	batch    *batch          // the batch frames queue in; nil if none
	spare    []byte          // a written batch's buffer, for the next one
	spareOps []op            // and its ops
	writing  bool            // a batch is being written (mu released)
	wrote    sync.Cond       // broadcast when a batch write ends
	broken   bool            // a write to cur failed: start a new segment first
	dirty    bool            // cur written since its last fsync
	dirDirty bool            // a segment was created since the last directory fsync
	toSync   []*segment      // retired segments whose file still awaits fsync
	removeEr bool            // a failed removal was reported
	rotateEr bool            // a failed rotation was reported

	stop chan struct{}
	wg   sync.WaitGroup

	testHookWrite func() // called before each batch write, mu released (tests)
}

// segment is one segment file.
type segment struct {
	num       uint64
	path      string
	f         *os.File // open while current, and after until fsynced
	size      int64
	live      int   // pending records whose frame is in this segment
	liveBytes int64 // their frame bytes
	held      bool  // its records were moved: kept until the copies are fsynced
}

// entry is a pending record.
type entry struct {
	seq uint64
	seg *segment // segment holding its frame; nil if no intact copy is left
	n   int64    // frame length
}

// Open opens the spool in dir, creating dir (mode 0700) if needed, and locks
// it: while the Spool is open, another Open of dir fails with an error
// wrapping ErrInUse, in this process or another. It returns the records
// that earlier runs appended and did not mark done, in append order; they
// count as pending until Done.
func Open(dir string, opts Options) (*Spool, []Record, error) {
	opts = opts.withDefaults()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("spool: create directory: %w", err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, nil, err
	}
	s := &Spool{dir: dir, opts: opts, lock: lock, pending: map[string]entry{}, queued: map[string]bool{}, nextSeq: 1, nextSeg: 1}
	s.wrote.L = &s.mu
	recs, err := s.load()
	if err == nil {
		var seg *segment
		if seg, err = s.createSegment(); err == nil {
			s.cur = seg
			s.segs = append(s.segs, seg)
		}
	}
	if err != nil {
		unlockDir(dir, lock)
		return nil, nil, err
	}
	s.rebalance(-1)
	if opts.SyncEvery > 0 {
		s.stop = make(chan struct{})
		s.wg.Add(1)
		go s.syncLoop(opts.SyncEvery)
	}
	return s, recs, nil
}

// load reads the segments of earlier runs and returns the pending records.
func (s *Spool) load() ([]Record, error) {
	nums, err := s.segmentNums()
	if err != nil {
		return nil, err
	}
	data := map[string]loadedRec{}
	var maxSeq uint64
	for _, num := range nums {
		s.nextSeg = num + 1
		segMax, err := s.loadSegment(num, data)
		if err != nil {
			return nil, err
		}
		maxSeq = max(maxSeq, segMax)
	}
	s.nextSeq = maxSeq + 1
	return inSeqOrder(data), nil
}

// loadedRec is the data of a pending record found by load, with its
// sequence number.
type loadedRec struct {
	seq  uint64
	data []byte
}

// segmentNums returns the numbers of the segment files in the spool's
// directory, in increasing order.
func (s *Spool) segmentNums() ([]uint64, error) {
	des, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("spool: read directory: %w", err)
	}
	var nums []uint64
	for _, de := range des {
		if n, ok := parseSegName(de.Name()); ok && de.Type().IsRegular() {
			nums = append(nums, n)
		}
	}
	slices.Sort(nums)
	return nums, nil
}

// loadSegment reads segment num into the spool: its frames update the
// pending records (s.pending, and their data in data) in order, its
// damaged stretches are logged, and the segment joins s.segs. An empty
// segment is removed instead. It returns the highest sequence number the
// segment holds.
func (s *Spool) loadSegment(num uint64, data map[string]loadedRec) (uint64, error) {
	seg := &segment{num: num, path: s.segPath(num)}
	buf, err := os.ReadFile(seg.path)
	if err != nil {
		return 0, fmt.Errorf("spool: read segment: %w", err)
	}
	if len(buf) == 0 {
		// Holds nothing, not even a done frame: not needed in any order.
		if err := os.Remove(seg.path); err != nil {
			return 0, fmt.Errorf("spool: remove empty segment: %w", err)
		}
		return 0, nil
	}
	seg.size = int64(len(buf))
	var maxSeq uint64
	bad := scan(buf, func(f frame) {
		maxSeq = max(maxSeq, f.seq)
		s.loadFrame(seg, f, data)
	})
	for _, d := range bad {
		if d.tail {
			s.logf("spool: %s: ignored %d unreadable bytes at the end (offset %d), e.g. a torn last write", seg.path, d.n, d.off)
		} else {
			s.logf("spool: %s: skipped %d corrupt bytes at offset %d", seg.path, d.n, d.off)
		}
	}
	s.segs = append(s.segs, seg)
	return maxSeq, nil
}

// loadFrame applies one intact frame of seg: a done frame ends the pending
// append it names; an append makes its record pending in seg, replacing an
// earlier copy (the later of two appends wins).
func (s *Spool) loadFrame(seg *segment, f frame, data map[string]loadedRec) {
	id := string(f.id)
	old, ok := s.pending[id]
	switch {
	case f.kind == kindDone:
		if ok && old.seq == f.seq {
			delete(s.pending, id)
			delete(data, id)
			s.unlive(old)
		}
		return
	case ok && old.seq != f.seq:
		// Two pending appends of one id: the done frame of the first
		// was lost. The later one wins.
		s.logf("spool: %s: record %q appended again (sequence %d after %d); keeping the later one", seg.path, id, f.seq, old.seq)
	}
	if ok {
		s.unlive(old) // an earlier copy (or a superseded append)
	}
	e := entry{seq: f.seq, seg: seg, n: int64(f.n)}
	s.pending[id] = e
	seg.live++
	seg.liveBytes += e.n
	data[id] = loadedRec{f.seq, f.data}
}

// inSeqOrder returns the loaded records in the order they were appended,
// each with a copy of its data.
func inSeqOrder(data map[string]loadedRec) []Record {
	type seqRec struct {
		seq uint64
		Record
	}
	sorted := make([]seqRec, 0, len(data))
	for id, r := range data {
		sorted = append(sorted, seqRec{r.seq, Record{ID: id, Data: slices.Clone(r.data)}})
	}
	slices.SortFunc(sorted, func(a, b seqRec) int { return cmp.Compare(a.seq, b.seq) })
	recs := make([]Record, len(sorted))
	for i, r := range sorted {
		recs[i] = r.Record
	}
	return recs
}

// unlive takes e out of its segment's live counts.
func (s *Spool) unlive(e entry) {
	if e.seg != nil {
		e.seg.live--
		e.seg.liveBytes -= e.n
	}
}

func parseSegName(name string) (uint64, bool) {
	if !strings.HasPrefix(name, segPrefix) || !strings.HasSuffix(name, segSuffix) {
		return 0, false
	}
	digits := name[len(segPrefix) : len(name)-len(segSuffix)]
	if len(digits) != segDigits {
		return 0, false
	}
	n, err := strconv.ParseUint(digits, 10, 64)
	return n, err == nil
}

func (s *Spool) segPath(num uint64) string {
	return filepath.Join(s.dir, fmt.Sprintf("%s%0*d%s", segPrefix, segDigits, num, segSuffix))
}

func (s *Spool) createSegment() (*segment, error) {
	num := s.nextSeg
	path := s.segPath(num)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("spool: create segment: %w", err)
	}
	s.nextSeg++
	s.dirDirty = true
	return &segment{num: num, path: path, f: f}, nil
}

func (s *Spool) logf(format string, args ...any) {
	if s.opts.Logf != nil {
		s.opts.Logf(format, args...)
	}
}

// checkRecord enforces the bounds that reading enforces.
func checkRecord(id string, data []byte) error {
	switch {
	case len(id) == 0:
		return fmt.Errorf("spool: append: empty id: %w", ErrTooLarge)
	case len(id) > MaxIDLen:
		return fmt.Errorf("spool: append: id of %d bytes, more than %d: %w", len(id), MaxIDLen, ErrTooLarge)
	case len(data) > MaxDataLen:
		return fmt.Errorf("spool: append %q: %d bytes of data, more than %d: %w", id, len(data), MaxDataLen, ErrTooLarge)
	}
	return nil
}

// Append journals a record under id. Once it returns nil the record survives
// the death of the process: its whole frame was handed to the kernel by one
// write(2) call (power loss: see Options.SyncEvery). The id must be 1 to
// MaxIDLen bytes, the data at most MaxDataLen bytes (else ErrTooLarge), and
// not already pending (else ErrDuplicate); an id may be appended again after
// its Done. With Options.MaxPending records pending it returns ErrFull. On an
// error the record is not pending.
func (s *Spool) Append(id string, data []byte) error {
	if err := checkRecord(id, data); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if _, ok := s.pending[id]; ok || s.queued[id] {
		return fmt.Errorf("spool: append %q: %w", id, ErrDuplicate)
	}
	if len(s.pending)+len(s.queued) >= s.opts.MaxPending {
		return ErrFull
	}
	b := s.collecting()
	start := len(b.frames)
	b.frames = appendFrame(b.frames, kindAppend, s.nextSeq, id, data)
	b.ops = append(b.ops, op{kind: kindAppend, id: id, seq: s.nextSeq, n: int64(len(b.frames) - start), end: len(b.frames)})
	s.nextSeq++
	s.queued[id] = true
	if err := s.await(b, len(b.frames)); err != nil {
		return fmt.Errorf("spool: append %q: %w", id, err)
	}
	return nil
}

// Done marks the pending record id done; the record is not returned by
// later Opens (once Done has returned). An id that is not pending is a
// no-op returning nil. On an error the record stays pending.
func (s *Spool) Done(id string) error {
	return s.DoneAll([]string{id})
}

// DoneAll is Done for several records with one write: what the settlement
// worker calls once per batch. Ids not pending are skipped. On an error
// the records whose done frame was not written stay pending.
func (s *Spool) DoneAll(ids []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	var b *batch
	n, last := 0, ""
	for _, id := range ids {
		e, ok := s.pending[id] // a repeated id writes a second, harmless done frame
		if !ok {
			continue
		}
		if b == nil {
			b = s.collecting()
		}
		b.frames = appendFrame(b.frames, kindDone, e.seq, id, nil)
		b.ops = append(b.ops, op{kind: kindDone, id: id, seq: e.seq, end: len(b.frames)})
		n, last = n+1, id
	}
	if b == nil {
		return nil
	}
	if err := s.await(b, len(b.frames)); err != nil {
		if n == 1 {
			return fmt.Errorf("spool: done %q: %w", last, err)
		}
		return fmt.Errorf("spool: done (%d records): %w", n, err)
	}
	return nil
}

// Pending returns the number of records appended (in this run or an
// earlier one) and not done.
func (s *Spool) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}

// batch is the frames that callers queued while a write was under way,
// written together by one write(2) call (group commit): concurrent Appends
// and Dones share a system call instead of taking turns for one each.
type batch struct {
	frames []byte
	ops    []op
	done   bool  // written (or failed); n and err are set
	n      int   // bytes written
	err    error // the write's error
}

// op is one frame of a batch.
type op struct {
	kind byte // kindAppend or kindDone
	id   string
	seq  uint64
	n    int64 // frame length (appends)
	end  int   // offset in the batch just after its frame
}

// collecting returns the batch that queued frames join. Callers hold mu.
func (s *Spool) collecting() *batch {
	if s.batch == nil {
		s.batch = &batch{frames: s.spare[:0], ops: s.spareOps[:0]}
		s.spare, s.spareOps = nil, nil
	}
	return s.batch
}

// await returns once b is written, writing it (and the batches queued
// before it) when no other caller is: the first caller to find no write
// under way writes everything queued so far. It returns nil if the frames
// of b up to end reached the kernel. Callers hold mu.
func (s *Spool) await(b *batch, end int) error {
	for !b.done {
		if s.writing {
			s.wrote.Wait()
			continue
		}
		s.flush()
	}
	switch {
	case end <= b.n:
		return nil
	case b.err != nil:
		return b.err
	default:
		return io.ErrShortWrite
	}
}

// flush writes the collecting batch with one write(2) call, releasing mu
// during the call so that more frames can queue, and applies what it
// wrote: appends become pending, done records go. Callers hold mu and
// no write is under way.
func (s *Spool) flush() {
	b := s.batch
	s.batch, s.writing = nil, true
	rotated, err := s.makeRoom(len(b.frames))
	seg := s.cur
	if err != nil {
		b.err = err
	} else {
		s.mu.Unlock()
		if s.testHookWrite != nil {
			s.testHookWrite()
		}
		n, err := seg.f.Write(b.frames)
		s.mu.Lock()
		s.wrote1(seg, n, err)
		b.n, b.err = n, err
	}
	for _, o := range b.ops {
		s.apply(o, seg, o.end <= b.n)
	}
	clear(b.ops)
	if cap(b.frames) <= maxSpare {
		s.spare, s.spareOps = b.frames[:0], b.ops[:0] // its callers read only done, n and err
	}
	b.frames, b.ops, b.done = nil, nil, true
	if rotated {
		s.rebalance(forwardBudget)
	} else {
		s.collect()
	}
	s.writing = false
	s.wrote.Broadcast()
}

// maxSpare is the largest batch buffer kept for the next batch.
const maxSpare = 1 << 20

// apply records that the frame of o was written to seg (ok) or not.
// Callers hold mu.
func (s *Spool) apply(o op, seg *segment, ok bool) {
	switch o.kind {
	case kindAppend:
		delete(s.queued, o.id)
		if ok {
			s.pending[o.id] = entry{seq: o.seq, seg: seg, n: o.n}
			seg.live++
			seg.liveBytes += o.n
		}
	case kindDone:
		if e, still := s.pending[o.id]; ok && still && e.seq == o.seq {
			delete(s.pending, o.id)
			s.unlive(e)
		}
	}
}

// write writes b with one write(2) call to the current segment, starting a
// new segment first if b would take the current one past SegmentSize. It
// returns the segment written and whether a new one was started. Callers
// hold mu, and write only when no batch write is under way (moving
// records forward, from flush or Open).
func (s *Spool) write(b []byte) (*segment, bool, error) {
	rotated, err := s.makeRoom(len(b))
	if err != nil {
		return nil, rotated, err
	}
	n, err := s.cur.f.Write(b)
	s.wrote1(s.cur, n, err)
	if err != nil {
		return nil, rotated, err
	}
	return s.cur, rotated, nil
}

// makeRoom starts a new segment when the current one failed a write or
// would grow past SegmentSize with n more bytes, and reports whether it
// did. It returns an error when nothing can be written: the current
// segment failed a write and no new one could be started. Callers hold mu.
func (s *Spool) makeRoom(n int) (bool, error) {
	if !s.broken && (s.cur.size == 0 || s.cur.size+int64(n) <= s.opts.SegmentSize) {
		return false, nil
	}
	if err := s.rotate(); err != nil {
		if s.broken {
			return false, err
		}
		if !s.rotateEr {
			// Keep writing to the current segment; it just grows.
			s.rotateEr = true
			s.logf("spool: starting a new segment failed; writing on in %s: %v", s.cur.path, err)
		}
		return false, nil
	}
	s.rotateEr = false
	return true, nil
}

// wrote1 accounts for a write(2) of n bytes to seg that returned err. A
// partial frame may be in the file: readers skip it, but the next write
// starts a fresh segment anyway. Callers hold mu.
func (s *Spool) wrote1(seg *segment, n int, err error) {
	seg.size += int64(n)
	if n > 0 {
		s.dirty = true
	}
	if err != nil {
		s.broken = true
	}
}

// rotate makes a new segment the current one. The old one's file stays
// open for the syncer, which fsyncs and closes it, unless the segment is
// deleted first. Callers hold mu.
func (s *Spool) rotate() error {
	seg, err := s.createSegment()
	if err != nil {
		return err
	}
	old := s.cur
	if s.opts.SyncEvery > 0 {
		s.toSync = append(s.toSync, old)
	} else {
		if err := old.f.Close(); err != nil {
			s.logf("spool: closing %s: %v", old.path, err)
		}
		old.f = nil
	}
	s.cur, s.dirty, s.broken = seg, false, false
	s.segs = append(s.segs, seg)
	return nil
}

// collect deletes the oldest segments while they are not current and hold
// no pending record. Deleting strictly oldest first keeps every done frame
// on disk for as long as the append it completes. Callers hold mu.
func (s *Spool) collect() {
	for len(s.segs) > 1 && s.segs[0].live == 0 && !s.segs[0].held {
		if !s.removeSegment() {
			return
		}
	}
}

// removeSegment deletes s.segs[0] and reports whether it is gone.
func (s *Spool) removeSegment() bool {
	seg := s.segs[0]
	if seg.f != nil && seg != s.cur {
		seg.f.Close() // it goes: no fsync needed
		seg.f = nil
	}
	if err := os.Remove(seg.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		if !s.removeEr {
			s.removeEr = true
			s.logf("spool: removing %s: %v", seg.path, err)
		}
		return false
	}
	s.segs[0] = nil
	s.segs = s.segs[1:]
	return true
}

// forwardBudget is how many segments one rebalance on the Append/Done path
// may move forward, which bounds the pause it causes.
const forwardBudget = 2

// rebalance deletes the segments that are no longer needed and, while dead
// bytes dominate, moves the pending records of the oldest segments into the
// current one so that they can be deleted too; at most budget segments
// (negative: no limit). Callers hold mu.
func (s *Spool) rebalance(budget int) {
	s.collect()
	old := s.segs[: len(s.segs)-1 : len(s.segs)-1] // forwarding may append to s.segs
	// The segments before the first one with pending records go anyway
	// (at the latest once the syncer releases them); those from it on are
	// kept by it.
	first := slices.IndexFunc(old, func(g *segment) bool { return g.live > 0 })
	if first < 0 {
		return
	}
	old = old[first:]
	var dead, live int64 // dead bytes kept by old[0]; all pending bytes
	for _, g := range old {
		dead += g.size - g.liveBytes
	}
	for _, g := range s.segs {
		live += g.liveBytes
	}
	for _, g := range old {
		if dead <= max(live, s.opts.SegmentSize) {
			break
		}
		liveBytes := g.liveBytes
		if g.live > 0 {
			if budget == 0 {
				break
			}
			budget--
			if err := s.forward(g); err != nil {
				s.logf("spool: moving the pending records of %s: %v", g.path, err)
				break
			}
		}
		dead -= g.size - liveBytes // g goes once the segments before it are gone
	}
	s.collect()
}

// forward copies the frames of the records pending in seg, unchanged, to
// the current segment, and moves the records there. The copies must be on
// disk before seg goes, so seg is held until the syncer's next fsync (unless
// fsync is off). Callers hold mu.
func (s *Spool) forward(seg *segment) error {
	buf, err := os.ReadFile(seg.path)
	if err != nil {
		return err
	}
	var werr error
	moved := false
	scan(buf, func(f frame) {
		if werr != nil || f.kind != kindAppend {
			return
		}
		e, ok := s.pending[string(f.id)]
		if !ok || e.seg != seg || e.seq != f.seq {
			return
		}
		dst, _, err := s.write(buf[f.off : f.off+f.n])
		if err != nil {
			werr = err
			return
		}
		s.unlive(e)
		e.seg = dst
		dst.live++
		dst.liveBytes += e.n
		s.pending[string(f.id)] = e
		moved = true
	})
	if werr == nil && seg.live > 0 {
		// Their frames no longer read back intact (the disk damaged them):
		// nothing is left to move. They stay pending in memory.
		for id, e := range s.pending {
			if e.seg == seg {
				s.logf("spool: %s: pending record %q no longer reads back intact; it will be missing at the next Open", seg.path, id)
				e.seg = nil
				s.pending[id] = e
			}
		}
		seg.live, seg.liveBytes, moved = 0, 0, true
	}
	if moved && s.opts.SyncEvery > 0 {
		seg.held = true
	}
	return werr
}

// syncLoop fsyncs what was written, every interval, until Close.
func (s *Spool) syncLoop(every time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.syncOnce()
		}
	}
}

// syncOnce fsyncs the retired segments, the current one if it was written,
// and the directory if a segment was created, without holding mu.
func (s *Spool) syncOnce() {
	s.mu.Lock()
	var cur *os.File
	if s.dirty && s.cur.f != nil {
		cur, s.dirty = s.cur.f, false
	}
	var retired []*os.File
	for _, seg := range s.toSync {
		if seg.f != nil {
			retired = append(retired, seg.f)
			seg.f = nil
		}
	}
	s.toSync = nil
	dir := s.dirDirty
	s.dirDirty = false
	var held []*segment
	for _, seg := range s.segs {
		if seg.held {
			held = append(held, seg)
		}
	}
	s.mu.Unlock()
	failed := false
	for _, f := range retired {
		if err := f.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
			failed = true
			s.logf("spool: fsync %s: %v", f.Name(), err)
		}
		f.Close()
	}
	// If cur was retired and its segment deleted meanwhile, the file is
	// closed and needs no fsync. (Close waits for this goroutine.)
	if cur != nil {
		if err := cur.Sync(); err != nil && !errors.Is(err, os.ErrClosed) {
			failed = true
			s.logf("spool: fsync %s: %v", cur.Name(), err)
		}
	}
	if dir {
		if err := syncDir(s.dir); err != nil {
			s.logf("spool: fsync %s: %v", s.dir, err)
		}
	}
	if len(held) > 0 && !failed {
		// The copies of their records, written before this pass began, are
		// on disk now.
		s.mu.Lock()
		for _, seg := range held {
			seg.held = false
		}
		if !s.closed {
			s.collect()
		}
		s.mu.Unlock()
	}
}

// Close fsyncs the spool, deletes the segments that hold no pending record
// and releases the lock. The pending records stay for the next Open. A
// second Close returns ErrClosed.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	s.closed = true
	for s.writing || s.batch != nil { // the frames queued before Close
		if s.writing {
			s.wrote.Wait()
		} else {
			s.flush()
		}
	}
	s.mu.Unlock()
	if s.stop != nil {
		close(s.stop)
		s.wg.Wait()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for _, seg := range s.toSync {
		if f := seg.f; f != nil {
			if err := f.Sync(); err != nil {
				errs = append(errs, fmt.Errorf("spool: fsync %s: %w", f.Name(), err))
			}
			f.Close()
			seg.f = nil
		}
	}
	s.toSync = nil
	if f := s.cur.f; f != nil {
		if err := f.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("spool: fsync %s: %w", f.Name(), err))
		}
		if err := f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("spool: close %s: %w", f.Name(), err))
		}
		s.cur.f = nil
	}
	if err := syncDir(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("spool: fsync %s: %w", s.dir, err))
	}
	if len(errs) == 0 {
		for _, seg := range s.segs {
			seg.held = false // the copies are on disk
		}
	}
	// The current segment is current no more: it too goes if nothing in it,
	// or before it, is pending; and if it is empty.
	for len(s.segs) > 0 && s.segs[0].live == 0 && !s.segs[0].held && s.removeSegment() {
	}
	if len(s.segs) > 0 && s.cur.size == 0 && s.segs[len(s.segs)-1] == s.cur {
		if err := os.Remove(s.cur.path); err != nil {
			errs = append(errs, fmt.Errorf("spool: remove empty segment: %w", err))
		}
	}
	if err := syncDir(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("spool: fsync %s: %w", s.dir, err))
	}
	if err := unlockDir(s.dir, s.lock); err != nil {
		errs = append(errs, fmt.Errorf("spool: release lock: %w", err))
	}
	return errors.Join(errs...)
}
