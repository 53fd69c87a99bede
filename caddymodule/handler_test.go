package caddymodule

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// fakeStore is an in-process billing.Store: one user, one upstream key, and
// counts of what was charged and logged. It lets the handler be tested and
// measured without a database.
type fakeStore struct {
	key      string
	charges  atomic.Int64
	charged  atomic.Int64 // nano-USD
	holds    atomic.Int64
	mu       sync.Mutex
	logs     []billing.RequestLog
	authRead atomic.Int64
	// broke empties the user's balance; balanceReads counts Balances calls.
	broke        atomic.Bool
	balanceReads atomic.Int64
	// authStarted, when not nil, gets a value (if it has room) at every
	// key lookup.
	authStarted chan struct{}
	// usageFail is how many AddUsage calls fail from now (under mu);
	// usageTries records every call.
	usageFail  int
	usageTries []usageTry
	// lostHolds is how many Reserve calls from now take their hold and
	// then fail as if the answer was lost (under mu); held are those
	// holds, until they are settled, and released the request ids settled
	// without a cost.
	lostHolds int
	// balance, when positive, caps every hold, as a pool holding that much.
	balance  billing.Nano
	held     map[string]billing.Hold
	released []string
}

type usageTry struct {
	batch   billing.UsageBatch
	written bool
}

func (f *fakeStore) Authenticate(_ context.Context, key string) (billing.Principal, error) {
	f.authRead.Add(1)
	select {
	case f.authStarted <- struct{}{}:
	default:
	}
	if key != f.key {
		return billing.Principal{}, &billing.AuthError{Reason: billing.AuthInvalid}
	}
	return billing.Principal{User: "u1", Role: "user", Balances: f.balances()}, nil
}

// balances is the fake user's balance: plenty on every field, or nothing
// while broke is set.
func (f *fakeStore) balances() billing.Balances {
	if f.broke.Load() {
		return billing.Balances{}
	}
	return billing.Balances{CreditsNew: 1000 * 1e9, Credits: 1000 * 1e9}
}

func (f *fakeStore) Balances(context.Context, string) (billing.Balances, error) {
	f.balanceReads.Add(1)
	return f.balances(), nil
}

func (f *fakeStore) Reserve(_ context.Context, r billing.HoldRequest) (billing.Hold, error) {
	f.holds.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	if h, ok := f.held[r.RequestID]; ok {
		return h, nil // idempotent, as the real store
	}
	amount := r.Want
	if f.balance > 0 {
		amount = min(amount, f.balance)
	}
	h := billing.Hold{RequestID: r.RequestID, User: r.User, Plan: r.Plan, Taken: []billing.Nano{amount},
		Input: r.Input, Owner: r.Owner, At: r.At, Expires: r.Expires, LogID: r.LogID}
	if f.lostHolds > 0 {
		f.lostHolds--
		if f.held == nil {
			f.held = map[string]billing.Hold{}
		}
		f.held[r.RequestID] = h
		return billing.Hold{}, errors.New("taking a hold: connection(127.0.0.1:27017) incomplete read of message header: EOF")
	}
	return h, nil
}

func (f *fakeStore) Settle(_ context.Context, r billing.SettleRequest) (billing.Receipt, bool, error) {
	f.mu.Lock()
	if h, ok := f.held[r.Hold.RequestID]; ok {
		if r.Cost == 0 && len(r.Hold.Taken) == 1 && r.Hold.Taken[0] == h.Taken[0] {
			delete(f.held, r.Hold.RequestID)
			f.released = append(f.released, r.Hold.RequestID)
		}
	}
	f.mu.Unlock()
	if r.Cost > 0 {
		f.charges.Add(1)
		f.charged.Add(int64(r.Cost))
	}
	return billing.Receipt{RequestID: r.Hold.RequestID, LogID: r.Hold.LogID, Fields: r.Hold.Plan.Fields(),
		Taken: []billing.Nano{r.Cost}, Cost: r.Cost, Charged: r.Cost, By: r.By, At: time.Now()}, true, nil
}

func (f *fakeStore) SettleMany(ctx context.Context, reqs []billing.SettleRequest) ([]billing.Receipt, error) {
	out := make([]billing.Receipt, len(reqs))
	for i, r := range reqs {
		out[i], _, _ = f.Settle(ctx, r)
	}
	return out, nil
}

func (f *fakeStore) ClearReceipts(context.Context, string, []string) error { return nil }

// FlushLease refuses: the fake takes no leases (credit_lease stays off).
func (f *fakeStore) FlushLease(context.Context, billing.LeaseFlush) (billing.Hold, []billing.Receipt, error) {
	return billing.Hold{}, nil, billing.ErrLeaseMoved
}

func (f *fakeStore) Heartbeat(context.Context, string, time.Time) error { return nil }

func (f *fakeStore) Orphans(context.Context, billing.OrphanQuery) ([]billing.Orphan, error) {
	return nil, nil
}

func (f *fakeStore) LoadUpstreamKeys(context.Context) ([]billing.UpstreamKey, error) {
	return []billing.UpstreamKey{{ID: "k1", APIKey: "upstream-secret", Status: "healthy"}}, nil
}

func (f *fakeStore) InsertRequestLogs(_ context.Context, logs []billing.RequestLog) error {
	f.mu.Lock()
	f.logs = append(f.logs, logs...)
	f.mu.Unlock()
	return nil
}

func (f *fakeStore) MarkUpstreamKey(context.Context, string, string, time.Time, string) error {
	return nil
}

func (f *fakeStore) RotateUpstreamKey(context.Context, string, string) (string, error) {
	return "", billing.ErrNoSpareKey
}

func (f *fakeStore) CleanUsedSpares(context.Context, time.Time) (int, error) { return 0, nil }

func (f *fakeStore) AddUsage(_ context.Context, b billing.UsageBatch) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fail := f.usageFail > 0
	if fail {
		f.usageFail--
	}
	f.usageTries = append(f.usageTries, usageTry{b, !fail})
	if fail {
		return errors.New("connection reset by peer")
	}
	return nil
}

// set changes the engine's settings as a config would.
func (e *engine) set(change func(*settings)) {
	s := *e.settings()
	change(&s)
	e.configure(s)
}

// newTestHandler returns a provisioned handler over a fake store, with its
// engine started; the engine is drained when the test ends.
func newTestHandler(tb testing.TB) (*Handler, *fakeStore) {
	tb.Helper()
	cat, err := billing.LoadCatalogue("testdata/models.json")
	if err != nil {
		tb.Fatal(err)
	}
	plan, _ := billing.ParseCreditPlan([]string{"creditsNew"})
	fs := &fakeStore{key: "sk-trollllm-" + strings.Repeat("ab", 32), authStarted: make(chan struct{}, 1)}
	eng := newEngineWithStore(fs)
	// The pool is set here, not loaded by the refresher: a test that sets
	// its own keys must not race with a load.
	keys, _ := fs.LoadUpstreamKeys(context.Background())
	eng.set(func(s *settings) { s.static = true })
	eng.keys.Set(keys)
	eng.start()
	tb.Cleanup(func() { _ = eng.Destruct() })
	return &Handler{MaxBodySize: DefaultMaxBodySize, eng: eng, plan: plan, cat: cat, logger: zap.NewNop()}, fs
}

// upstream is a stand-in for reverse_proxy: it answers like the provider,
// JSON or an SSE stream of n content events, flushing each event.
func upstream(sse bool, events int) caddyhttp.Handler {
	start := []byte(`event: message_start` + "\n" + `data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"glm-4.6","content":[],"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}` + "\n\n")
	delta := []byte(`event: content_block_delta` + "\n" + `data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello there, this is a token."}}` + "\n\n")
	end := []byte(`event: message_delta` + "\n" + `data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":30}}` + "\n\n" +
		`event: message_stop` + "\n" + `data: {"type":"message_stop"}` + "\n\n")
	body := []byte(`{"id":"msg_1","type":"message","role":"assistant","model":"glm-4.6","content":[{"type":"text","text":"Hello!"}],"stop_reason":"end_turn","usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":29}}`)
	return caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		_, _ = io.Copy(io.Discard, r.Body)
		if !sse {
			w.Header().Set("Content-Type", "application/json")
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(200)
			_, _ = w.Write(body)
			return nil
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(200)
		rc := http.NewResponseController(w)
		_, _ = w.Write(start)
		_ = rc.Flush()
		for i := 0; i < events; i++ {
			_, _ = w.Write(delta)
			_ = rc.Flush()
		}
		_, _ = w.Write(end)
		_ = rc.Flush()
		return nil
	})
}

// discardWriter is a ResponseWriter that keeps nothing, so a benchmark
// measures the handler, not a recorder.
type discardWriter struct {
	h http.Header
	n int
}

func (d *discardWriter) Header() http.Header         { return d.h }
func (d *discardWriter) WriteHeader(int)             {}
func (d *discardWriter) Write(p []byte) (int, error) { d.n += len(p); return len(p), nil }
func (d *discardWriter) Flush()                      {}

func newRequest(tb testing.TB, w http.ResponseWriter, key string, body []byte) *http.Request {
	r := httptest.NewRequest(http.MethodPost, "/v1/messages", bytes.NewReader(body))
	r.Header.Set("X-Api-Key", key)
	r.Header.Set("Content-Type", "application/json")
	return caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, &caddyhttp.Server{})
}

var benchBody = []byte(`{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Hello, how are you today? Tell me something nice."}]}`)

// jsonBody is benchBody without "stream": the upstream must answer JSON.
var jsonBody = []byte(`{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hello, how are you today? Tell me something nice."}]}`)

// bodyFor returns the request body whose answer is SSE (sse) or JSON.
func bodyFor(sse bool) []byte {
	if sse {
		return benchBody
	}
	return jsonBody
}

// waitCharges waits for the settlement workers to process n charges.
func waitCharges(tb testing.TB, fs *fakeStore, n int64) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for fs.charges.Load() < n {
		if time.Now().After(deadline) {
			tb.Fatalf("%d charges after 10s, want %d", fs.charges.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitLogged waits for n charges and then for their request logs, which
// are inserted in a later batch.
func waitLogged(tb testing.TB, fs *fakeStore, n int) {
	tb.Helper()
	waitCharges(tb, fs, int64(n))
	deadline := time.Now().Add(10 * time.Second)
	for {
		fs.mu.Lock()
		got := len(fs.logs)
		fs.mu.Unlock()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d request logs after 10s, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestHandlerBillsThroughTheStore(t *testing.T) {
	h, fs := newTestHandler(t)
	for _, sse := range []bool{false, true} {
		rec := httptest.NewRecorder()
		if err := h.ServeHTTP(rec, newRequest(t, rec, fs.key, bodyFor(sse)), upstream(sse, 50)); err != nil {
			t.Fatal(err)
		}
		if rec.Code != 200 {
			t.Fatalf("status %d: %s", rec.Code, rec.Body)
		}
	}
	waitLogged(t, fs, 2)
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if len(fs.logs) != 2 {
		t.Fatalf("%d request logs, want 2", len(fs.logs))
	}
	for _, l := range fs.logs {
		want := int64(29) // the JSON answer
		if l.Stream {
			want = 30 // the stream's last message_delta
		}
		if l.OutputTokens != want || l.InputTokens != 12 || l.UsageSource != "upstream" || l.EndReason != "complete" || l.CostNano <= 0 {
			t.Errorf("log %+v", l)
		}
	}
	// A cache hit costs no store round trip.
	if fs.authRead.Load() != 1 {
		t.Errorf("%d key lookups for 2 requests with one key, want 1", fs.authRead.Load())
	}
}

// BenchmarkHandler measures the module's own cost per request against a
// bare upstream handler (the "direct" rows): key lookup on a cache hit, body
// read and rewrite, metering, settlement through a fake store.
func BenchmarkHandler(b *testing.B) {
	for _, tc := range []struct {
		name   string
		sse    bool
		events int
	}{{"json", false, 0}, {"sse-50-events", true, 50}} {
		next := upstream(tc.sse, tc.events)
		b.Run(tc.name+"/direct", func(b *testing.B) {
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				clear(w.h)
				r := newRequest(b, w, "k", benchBody)
				if err := next.ServeHTTP(w, r); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(tc.name+"/llm_billing", func(b *testing.B) {
			h, fs := newTestHandler(b)
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				clear(w.h)
				r := newRequest(b, w, fs.key, bodyFor(tc.sse))
				if err := h.ServeHTTP(w, r, next); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			waitCharges(b, fs, int64(b.N))
		})
	}
}

func BenchmarkAuthCacheHit(b *testing.B) {
	c := newAuthCache()
	now := time.Now()
	key := "sk-trollllm-" + strings.Repeat("cd", 32)
	c.put(key, billing.Principal{User: "u"}, now, time.Hour)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, ok, _ := c.get(key, now); !ok {
			b.Fatal("miss")
		}
	}
}

func TestAuthCacheHitDoesNotAllocate(t *testing.T) {
	c := newAuthCache()
	now := time.Now()
	key := "sk-trollllm-" + strings.Repeat("cd", 32)
	c.put(key, billing.Principal{User: "u"}, now, time.Hour)
	if n := testing.AllocsPerRun(1000, func() { c.get(key, now) }); n != 0 {
		t.Errorf("a cache hit allocates %v times", n)
	}
	if _, ok, _ := c.get(key, now.Add(2*time.Hour)); ok {
		t.Error("an expired entry was returned")
	}
}

// In the second half of its life an entry is still served, and exactly one
// caller is told to look the key up again; after unmark the next one is.
func TestAuthCacheRefreshAhead(t *testing.T) {
	c := newAuthCache()
	now := time.Now()
	c.put("k", billing.Principal{User: "u"}, now, time.Minute)
	if _, ok, refresh := c.get("k", now.Add(10*time.Second)); !ok || refresh {
		t.Fatalf("young entry: ok %v refresh %v", ok, refresh)
	}
	later := now.Add(40 * time.Second)
	if p, ok, refresh := c.get("k", later); !ok || !refresh || p.User != "u" {
		t.Fatalf("old entry: ok %v refresh %v", ok, refresh)
	}
	if _, ok, refresh := c.get("k", later); !ok || refresh {
		t.Fatalf("second hit while refreshing: ok %v refresh %v", ok, refresh)
	}
	c.unmark("k")
	if _, _, refresh := c.get("k", later); !refresh {
		t.Fatal("after unmark no refresh")
	}
	c.put("k", billing.Principal{User: "u2"}, later, time.Minute)
	if p, ok, refresh := c.get("k", later.Add(time.Second)); !ok || refresh || p.User != "u2" {
		t.Fatalf("refreshed entry: %v %v %v", p, ok, refresh)
	}
	c.drop("k")
	if _, ok, _ := c.get("k", later); ok {
		t.Fatal("dropped entry served")
	}
}

// A key hit in the second half of its cache life is looked up again off
// the request path: the hit is served from the cache, and a key the
// background lookup finds refused is forgotten.
func TestAuthRefreshInBackground(t *testing.T) {
	fs := &fakeStore{key: "sk-good"}
	e := newEngineWithStore(fs)
	e.set(func(s *settings) { s.authTTL = time.Hour })
	ctx := context.Background()
	if _, refresh, err := e.authenticate(ctx, "sk-good"); err != nil || refresh {
		t.Fatal(refresh, err)
	}
	// Age the entry into its second half.
	e.auth.put("sk-good", billing.Principal{User: "u1"}, time.Now().Add(-40*time.Minute), time.Hour)
	reads := fs.authRead.Load()
	fs.key = "sk-other" // revoked in the database
	p, refresh, err := e.authenticate(ctx, "sk-good")
	if err != nil || p.User != "u1" || !refresh {
		t.Fatalf("stale hit: %v %v %v", p, refresh, err)
	}
	if _, again, _ := e.authenticate(ctx, "sk-good"); again {
		t.Fatal("a second hit was told to refresh too")
	}
	e.refreshAuth("sk-good")
	waitTimeout(&e.background, 5*time.Second)
	if got := fs.authRead.Load() - reads; got != 1 {
		t.Fatalf("%d background lookups, want 1", got)
	}
	if _, ok, _ := e.auth.get("sk-good", time.Now()); ok {
		t.Fatal("a key refused by the background lookup is still cached")
	}
	if _, _, err := e.authenticate(ctx, "sk-good"); err == nil {
		t.Fatal("revoked key accepted")
	}
}

// TestAuthRefreshAfterTheAnswerStarts: the background lookup of a key in
// the second half of its cache life starts once the answer does, so that it
// never competes with the request's hold for the database; and it starts
// even when the request ends without an answer from the upstream.
func TestAuthRefreshAfterTheAnswerStarts(t *testing.T) {
	h, fs := newTestHandler(t)
	h.eng.set(func(s *settings) { s.authTTL = time.Hour })
	age := func() {
		h.eng.auth.put(fs.key, billing.Principal{User: "u1", Role: "user"}, time.Now().Add(-40*time.Minute), time.Hour)
	}
	age()
	json := upstream(false, 0)
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		// The hold has been taken; the lookup must not have started.
		select {
		case <-fs.authStarted:
			t.Error("the background key lookup started before the answer")
		case <-time.After(100 * time.Millisecond):
		}
		return json.ServeHTTP(w, r)
	})
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), next); err != nil || rec.Code != 200 {
		t.Fatalf("%v %d %s", err, rec.Code, rec.Body)
	}
	select {
	case <-fs.authStarted:
	case <-time.After(5 * time.Second):
		t.Fatal("no background key lookup after the answer")
	}
	waitTimeout(&h.eng.background, 5*time.Second)

	// No answer at all (the upstream handler fails): the lookup still runs.
	age()
	fail := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error {
		return caddyhttp.Error(http.StatusBadGateway, io.ErrUnexpectedEOF)
	})
	rec = httptest.NewRecorder()
	_ = h.ServeHTTP(rec, newRequest(t, rec, fs.key, benchBody), fail)
	select {
	case <-fs.authStarted:
	case <-time.After(5 * time.Second):
		t.Fatal("no background key lookup after a request without an answer")
	}
	waitTimeout(&h.eng.background, 5*time.Second)
}

// A hold the database took while its answer was lost: the request is
// refused (503), and the hold is found and given back in full once the
// database answers, never left for the sweeper to charge.
func TestHoldWithLostAnswerIsReleased(t *testing.T) {
	h, fs := newTestHandler(t)
	fs.mu.Lock()
	fs.lostHolds = 1
	fs.mu.Unlock()
	rec := httptest.NewRecorder()
	if err := h.ServeHTTP(rec, newRequest(t, rec, fs.key, jsonBody), upstream(false, 0)); err != nil {
		t.Fatal(err)
	}
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503: %s", rec.Code, rec.Body)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		fs.mu.Lock()
		left, released := len(fs.held), len(fs.released)
		fs.mu.Unlock()
		if left == 0 && released == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %d holds left, %d released; want 0 and 1", left, released)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if fs.charges.Load() != 0 {
		t.Fatalf("%d charges for a refused request", fs.charges.Load())
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if len(fs.logs) != 0 {
		t.Fatalf("a refused request has %d log rows", len(fs.logs))
	}
}
