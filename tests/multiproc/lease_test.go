package multiproc

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/ledgercheck"
	"github.com/trollllm/caddy-llm-billing/tests/stack"
)

// The credit lease tests: real Caddy processes with credit_lease on, one
// database, and the money counted back from the user document and the
// request log after traffic, kills, outages and shutdowns.

// leaseSeries counts the holds carved from a credit lease in memory.
const leaseSeries = `caddy_llm_billing_holds_total{source="lease"}`

// streamHold is what one stream of body(maxTokens, true) asks its hold
// for: the input bound of its forwarded body plus maxTokens of output.
func streamHold(t *testing.T, maxTokens int) billing.Nano {
	t.Helper()
	cat, err := billing.LoadCatalogue("../../examples/models-chat.json")
	require.NoError(t, err)
	m, ok := cat.Lookup("claude-sonnet-4-5")
	require.True(t, ok)
	b := body(maxTokens, true)
	return billing.HoldTerms(m, billing.ForwardedSize(len(b), m.PickUpstream(0)), int64(maxTokens), 0).Want
}

// answer is what a client got for one request.
type answer struct {
	id         string // X-Gateway-Request-Id: the request id of its log row; empty when no answer began
	code       int    // the status; 0 when no answer began
	full       bool   // the answer was read to its end
	base       string // the instance asked
	refusal    string // the body of an answer other than 200
	start, end time.Time
}

// served reports whether the client got a complete successful answer.
func (a answer) served() bool { return a.code == http.StatusOK && a.full }

// ask posts one stream and reads the answer to its end.
func ask(base, key string, b []byte, delay string) answer {
	a := answer{base: base, start: time.Now()}
	defer func() { a.end = time.Now() }()
	req, _ := http.NewRequest(http.MethodPost, base+"/v1/messages", strings.NewReader(string(b)))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Standin-Fixture", "ant-text")
	if delay != "" {
		req.Header.Set("X-Standin-Event-Delay", delay)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.end = time.Now()
		return a
	}
	defer resp.Body.Close()
	a.id, a.code = resp.Header.Get("X-Gateway-Request-Id"), resp.StatusCode
	if a.code != http.StatusOK {
		raw, err := io.ReadAll(resp.Body)
		a.refusal, a.full = string(raw), err == nil
		return a
	}
	_, err = io.Copy(io.Discard, resp.Body)
	a.full = err == nil
	a.end = time.Now()
	return a
}

// answers collects the answers of concurrent clients.
type answers struct {
	mu  sync.Mutex
	all []answer
}

func (as *answers) add(a answer) {
	as.mu.Lock()
	as.all = append(as.all, a)
	as.mu.Unlock()
}

func (as *answers) list() []answer {
	as.mu.Lock()
	defer as.mu.Unlock()
	return append([]answer(nil), as.all...)
}

// tally is how the answers went.
type tally struct {
	served  int // 200, read to the end
	refused int // 402: the balance could not pay the hold
	// unavailable counts the gateway's own 503 "Billing is temporarily
	// unavailable": it fails closed when it cannot take a hold in time.
	unavailable int
	other       map[int]int // anything else, by status; 0: no answer began
}

func (as *answers) tally() tally {
	n := tally{other: map[int]int{}}
	for _, a := range as.list() {
		switch {
		case a.served():
			n.served++
		case a.code == http.StatusPaymentRequired && a.full:
			n.refused++
		case a.code == http.StatusServiceUnavailable && a.full && strings.Contains(a.refusal, "Billing is temporarily unavailable"):
			n.unavailable++
		default:
			n.other[a.code]++
		}
	}
	return n
}

// servedIDs returns the request ids of the served answers.
func (as *answers) servedIDs() []string {
	var ids []string
	for _, a := range as.list() {
		if a.served() {
			ids = append(ids, a.id)
		}
	}
	return ids
}

// drive runs workers clients, each sending streams one after another to
// the instance pick chooses, until stop is closed; a client finishes the
// stream it is in. A request that gets no answer (an instance down) is
// retried after a pause.
func drive(workers int, pick func(worker int) string, key string, b []byte, delay string, stop <-chan struct{}, out *answers) *sync.WaitGroup {
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				a := ask(pick(w), key, b, delay)
				out.add(a)
				if a.code == 0 {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	return &wg
}

// book is a user's money as the database has it at one moment: what the
// balance has, what holds and leases keep out of it, and what was charged
// (by the receipts, and by the log rows whose receipt is dropped).
type book struct {
	balance billing.Nano
	held    billing.Nano
	charged billing.Nano
	leases  []billing.Hold
}

// readBook reads the user's book: the user document, the log rows, and
// the user document again, until both reads of the document agree, so
// that no charge is missed or counted twice while a flush writes rows and
// drops their receipts.
func readBook(t *testing.T, st *stack.Stack, user string) book {
	t.Helper()
	ctx := context.Background()
	readDoc := func() bson.Raw {
		var doc bson.Raw
		require.NoError(t, st.DB.Collection("usersNew").FindOne(ctx, bson.D{{Key: "_id", Value: user}}).Decode(&doc))
		return doc
	}
	var rows []bson.M
	doc := readDoc()
	for attempt := 0; ; attempt++ {
		cur, err := st.DB.Collection("request_logs").Find(ctx, bson.D{{Key: "userId", Value: user}})
		require.NoError(t, err)
		rows = nil
		require.NoError(t, cur.All(ctx, &rows))
		again := readDoc()
		if bytes.Equal(doc, again) {
			break
		}
		require.Less(t, attempt, 50, "the user document keeps changing")
		doc = again
	}
	var m bson.M
	require.NoError(t, bson.Unmarshal(doc, &m))

	var b book
	credits, _ := m["creditsNew"].(float64)
	b.balance = billing.NanoFromUSD(credits)
	for id, v := range embedded(m["llmHolds"]) {
		s, ok := v.(string)
		require.True(t, ok, "hold %s is not a packed string", id)
		h, err := mongostore.DecodeHold(s)
		require.NoError(t, err)
		h.RequestID = id
		b.held += h.Amount()
		if billing.IsLease(id) {
			b.leases = append(b.leases, h)
		}
	}
	receipts := map[string]bool{}
	for id, v := range embedded(m["llmDone"]) {
		s, ok := v.(string)
		require.True(t, ok, "receipt %s is not a packed string", id)
		rc, _, err := mongostore.DecodeReceipt(s)
		require.NoError(t, err)
		receipts[id] = true
		b.charged += rc.Charged
	}
	for _, r := range rows {
		if id, _ := r["requestId"].(string); !receipts[id] {
			b.charged += billing.Nano(asInt(r["chargedNano"]))
		}
	}
	return b
}

// waitNoHold waits until user has no hold or lease left and at least rows
// log rows, and every receipt left has its log row. Unlike waitSettled it
// lets receipts stay: those a killed process had logged and not yet
// dropped wait for a sweeper (10 minutes), and hold no money.
func waitNoHold(t *testing.T, st *stack.Stack, user string, rows int) ledgercheck.User {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		u, err := ledgercheck.Read(context.Background(), st.DB, user, "creditsNew")
		require.NoError(t, err)
		if u.Held == 0 && u.Holds == 0 && len(u.Rows) >= rows {
			var doc struct {
				Done map[string]any `bson:"llmDone"`
			}
			require.NoError(t, st.DB.Collection("usersNew").FindOne(context.Background(), bson.D{{Key: "_id", Value: user}}).Decode(&doc))
			logged := map[string]bool{}
			for _, r := range u.Rows {
				id, _ := r["requestId"].(string)
				logged[id] = true
			}
			unlogged := 0
			for id := range doc.Done {
				if !logged[id] {
					unlogged++
				}
			}
			if unlogged == 0 {
				t.Logf("no hold left; %d receipts left, each with its log row", len(doc.Done))
				return u
			}
		}
		require.True(t, time.Now().Before(deadline), "not settled after 90s: %d rows (want %d), held %d, receipts %d",
			len(u.Rows), rows, u.Held, u.Receipts)
		time.Sleep(200 * time.Millisecond)
	}
}

// logProblems logs how often each warning or error message appears in
// p's log, with one example of each: what to read when a test fails.
func logProblems(t *testing.T, p instance) {
	t.Helper()
	raw, err := os.ReadFile(p.LogPath())
	require.NoError(t, err)
	counts, example := map[string]int{}, map[string]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		var e struct{ Level, Msg string }
		if json.Unmarshal([]byte(line), &e) != nil || e.Level != "warn" && e.Level != "error" {
			continue
		}
		counts[e.Msg]++
		if _, ok := example[e.Msg]; !ok {
			example[e.Msg] = line
		}
	}
	for msg, n := range counts {
		t.Logf("pid %d logged %d times: %s", p.Pid(), n, example[msg])
	}
}

// logLines counts the lines of p's log that contain every one of subs.
func logLines(t *testing.T, p instance, subs ...string) int {
	t.Helper()
	raw, err := os.ReadFile(p.LogPath())
	require.NoError(t, err)
	n := 0
	for _, line := range strings.Split(string(raw), "\n") {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			n++
		}
	}
	return n
}

func embedded(v any) map[string]any {
	m := map[string]any{}
	switch d := v.(type) {
	case bson.D:
		for _, e := range d {
			m[e.Key] = e.Value
		}
	case bson.M:
		for k, x := range d {
			m[k] = x
		}
	}
	return m
}

func asInt(v any) int64 {
	switch n := v.(type) {
	case int64:
		return n
	case int32:
		return int64(n)
	case float64:
		return int64(n)
	}
	return 0
}

// checkBook checks that the book adds up: the balance, plus what is held,
// plus what was charged, is what the user started with.
func checkBook(t *testing.T, b book, start billing.Nano) {
	t.Helper()
	t.Logf("book: balance %s + held %s (%d leases) + charged %s = %s (start %s)",
		b.balance, b.held, len(b.leases), b.charged, b.balance+b.held+b.charged, start)
	assert.Equal(t, start, b.balance+b.held+b.charged, "balance + held + charged is not what the user had")
	assert.GreaterOrEqual(t, int64(b.balance), int64(0), "the balance is negative")
}

// leasesOf returns the leases of the book taken by one Caddy instance.
func (b book) leasesOf(instanceID string) []billing.Hold {
	var out []billing.Hold
	for _, l := range b.leases {
		if strings.HasPrefix(l.Owner, instanceID+"/") {
			out = append(out, l)
		}
	}
	return out
}

// instanceID is the Caddy instance id of p, which starts the owner of
// every hold and lease it takes.
func instanceID(t *testing.T, p instance) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(p.Dir(), "data", "caddy", "instance.uuid"))
	require.NoError(t, err)
	return strings.TrimSpace(string(raw))
}

// metric reads one series from the instance's /metrics; 0 when absent.
func metric(t *testing.T, p instance, series string) float64 {
	t.Helper()
	resp, err := http.Get(p.Admin + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err)
			return f
		}
	}
	require.NoError(t, sc.Err())
	return 0
}

// watchBalance samples the user's creditsNew every 50 ms until the
// returned function is called, which returns the lowest value seen.
func watchBalance(st *stack.Stack, user string) func() float64 {
	stop, done := make(chan struct{}), make(chan struct{})
	var low atomic.Value
	low.Store(1e18)
	go func() {
		defer close(done)
		for {
			var doc struct {
				Credits float64 `bson:"creditsNew"`
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			err := st.DB.Collection("usersNew").FindOne(ctx, bson.D{{Key: "_id", Value: user}}).Decode(&doc)
			cancel()
			if err == nil && doc.Credits < low.Load().(float64) {
				low.Store(doc.Credits)
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return func() float64 {
		close(stop)
		<-done
		return low.Load().(float64)
	}
}

// checkRows checks that every served request has exactly one log row and
// that every other row belongs to a request in cut: one whose answer began
// and was cut (by a kill), which its instance may have settled before it
// died. It returns how many rows are of cut requests.
func checkRows(t *testing.T, u ledgercheck.User, served []string, cut map[string]bool) int {
	t.Helper()
	rows := map[string]int{}
	for _, r := range u.Rows {
		id, _ := r["requestId"].(string)
		rows[id]++
	}
	for _, id := range served {
		assert.Equal(t, 1, rows[id], "served request %s has %d log rows", id, rows[id])
		delete(rows, id)
	}
	extra := 0
	for id, n := range rows {
		if cut[id] {
			extra += n
			continue
		}
		assert.Failf(t, "a log row for a request that was not served", "request %q has %d rows", id, n)
	}
	return extra
}

// Two Caddy processes with credit leases on share one user, whose balance
// holds 48 streams at once (a lease is at most a quarter of the pool and
// at least 8 holds, so both instances can take one) and pays for about
// 150 (a stream costs about a third of its hold). 200 clients send a
// stream each, half to each process, one every 30 ms: more than the
// balance pays for, so it runs dry. The holds carved from leases never
// spend what the other process holds: the balance never goes below zero,
// every served stream is charged and logged once, and the charges are the
// balance drop once the leases went back (no hold or lease left).
//
// The streams start 30 ms apart rather than all at once: with the race
// detector on two cores, a burst of 200 queues the refused requests at
// the user's lock on FerretDB for longer than a hold may wait, and most
// answers become the gateway's fail-closed 503 (allowed here all the
// same, since the money must add up either way).
func TestLeaseTwoInstancesShareOneBalance(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a := startGateway(t, st, gatewayOptions{Leases: true})
	b := startGateway(t, st, gatewayOptions{Leases: true})
	start := billing.NanoFromUSD((48 * streamHold(t, 40)).USD())
	u, key := newUser(t, st, start.USD())
	lowest := watchBalance(st, u.ID)

	var out answers
	var wg sync.WaitGroup
	for i := 0; i < 200; i++ {
		base := a.Base
		if i%2 == 1 {
			base = b.Base
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 30 * time.Millisecond)
			out.add(ask(base, key, body(40, true), "20ms"))
		}()
	}
	wg.Wait()
	n := out.tally()
	leasedA, leasedB := metric(t, a, leaseSeries), metric(t, b, leaseSeries)
	t.Logf("200 streams over two processes: %d served, %d refused (402), %d unavailable (503), other %v; holds carved from leases: %v and %v",
		n.served, n.refused, n.unavailable, n.other, leasedA, leasedB)
	if len(n.other) > 0 || n.unavailable > 0 {
		logProblems(t, a)
		logProblems(t, b)
	}
	require.Empty(t, n.other, "answers other than 200, 402 and the gateway's 503")
	require.Positive(t, n.served)
	assert.Positive(t, n.refused+n.unavailable, "every stream was served: the test did not press on the balance")
	assert.GreaterOrEqual(t, leasedA+leasedB, 8.0, "no lease served its 8 holds")

	settled := waitSettled(t, st, u.ID, n.served)
	low := lowest()
	t.Logf("lowest balance seen: $%.9f", low)
	assert.GreaterOrEqual(t, low, 0.0, "the balance went below zero")
	checkMoney(t, settled, start, n.served)
	checkRows(t, settled, out.servedIDs(), nil)
	reconcileClean(t, st)
}

// One of two Caddy processes with credit leases on is killed with SIGKILL
// while both serve one user: it holds a lease, streams are in flight, and
// the settlements of the last second are in its journal only. While it is
// down, the database's book adds up with its lease still out. Restarted,
// it replays its journal and closes the lease of its previous run once;
// then every served stream, and every stream the kill cut, is charged and
// logged exactly once, the charges are the balance drop, and no hold or
// lease is left.
func TestLeaseKill9MidStream(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a := startGateway(t, st, gatewayOptions{Leases: true})
	b := startGateway(t, st, gatewayOptions{Leases: true})
	start := billing.NanoFromUSD(10)
	u, key := newUser(t, st, start.USD())
	idA := instanceID(t, a)

	var out answers
	stopA, stopB := make(chan struct{}), make(chan struct{})
	wgA := drive(4, func(int) string { return a.Base }, key, body(100, true), "50ms", stopA, &out)
	wgB := drive(4, func(int) string { return b.Base }, key, body(100, true), "50ms", stopB, &out)
	time.Sleep(2500 * time.Millisecond)

	before := readBook(t, st, u.ID)
	require.NotEmpty(t, before.leasesOf(idA), "the process to kill holds no lease")
	a.Kill()
	killedAt := time.Now()
	close(stopA)
	wgA.Wait()
	var cut []string
	cutSet := map[string]bool{}
	for _, x := range out.list() {
		if x.base == a.Base && x.code != 0 && !x.full {
			cut = append(cut, x.id)
			cutSet[x.id] = true
		}
	}
	t.Logf("killed with %d streams in flight", len(cut))
	assert.NotEmpty(t, cut, "no stream was in flight at the kill")

	// The survivor goes on; once its own settlements are written, the
	// book adds up with the dead process's lease still out.
	time.Sleep(time.Second)
	close(stopB)
	wgB.Wait()
	time.Sleep(2 * time.Second) // the survivor's last batch (1 s)
	down := readBook(t, st, u.ID)
	orphans := down.leasesOf(idA)
	require.NotEmpty(t, orphans, "the killed process's lease is gone before its restart")
	checkBook(t, down, start)

	a.Restart(t)
	t.Logf("restarted %v after the kill", time.Since(killedAt).Round(time.Millisecond))
	// The restarted process serves the user again.
	for i := 0; i < 3; i++ {
		x := ask(a.Base, key, body(100, true), "")
		require.True(t, x.served(), "after the restart: %d %s", x.code, x.refusal)
		out.add(x)
	}
	n := out.tally()
	t.Logf("%d served; %d unavailable (503); other answers %v", n.served, n.unavailable, n.other)
	settled := waitNoHold(t, st, u.ID, n.served)
	checkMoney(t, settled, start, len(settled.Rows))
	extra := checkRows(t, settled, out.servedIDs(), cutSet)
	// A stream cut by the kill was served from the lease: it exists only
	// in the killed process's journal (an open hold), and its next run
	// charges it under the orphan policy, as the sweeper charges a hold.
	assert.Equal(t, len(cut), extra, "every stream cut by the kill is charged, once")
	for _, r := range settled.Rows {
		if id, _ := r["requestId"].(string); cutSet[id] {
			t.Logf("cut stream %s: usageSource %v, charged %v nano", id, r["usageSource"], r["chargedNano"])
		}
	}

	for _, l := range orphans {
		assert.Equal(t, 1, logLines(t, a, "closed the credit lease of a dead instance", `"lease":"`+l.RequestID+`"`),
			"the restarted process did not close lease %s exactly once", l.RequestID)
	}
	assert.Equal(t, 0, logLines(t, b, "closed the credit lease of a dead instance"), "the survivor closed a lease")
	assert.Positive(t, logLines(t, a, "replaying settlements journaled by a previous run"), "nothing was left in the journal at the kill")
	reconcileClean(t, st)
}

// A Caddy process with credit leases on is killed with SIGKILL after its
// lease's charges are written, and never restarted. The other process's
// sweeper closes the lease once the dead one's heartbeat is 45 s old (it
// sweeps every 20 s or so, so this takes up to a minute): what it held
// goes back to the pool, and the balance is exactly what the user had
// minus what was charged. (Receipts the dead process had logged but not
// yet dropped stay for a sweeper's later pass; they hold no money.)
func TestLeaseOfKilledInstanceClosedBySweeper(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a := startGateway(t, st, gatewayOptions{Leases: true})
	start := billing.NanoFromUSD(10)
	u, key := newUser(t, st, start.USD())
	idA := instanceID(t, a)

	var out answers
	stop := make(chan struct{})
	wg := drive(6, func(int) string { return a.Base }, key, body(100, true), "20ms", stop, &out)
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	n := out.tally()
	served := n.served
	t.Logf("%d served, %d unavailable (503), other %v", served, n.unavailable, n.other)
	require.Empty(t, n.other)
	require.Positive(t, metric(t, a, leaseSeries), "no hold was carved from a lease")

	// The other process starts while the lease is out, then the first is
	// killed once every charge is written (about a second: a batch waits
	// up to 1 s with leases), before its lease goes idle (5 s) and back.
	b := startGateway(t, st, gatewayOptions{Leases: true})
	deadline := time.Now().Add(3 * time.Second)
	for {
		rows, err := ledgercheck.Read(context.Background(), st.DB, u.ID, "creditsNew")
		require.NoError(t, err)
		if len(rows.Rows) == served {
			break
		}
		require.True(t, time.Now().Before(deadline), "%d of %d served streams charged 3 s after the traffic", len(rows.Rows), served)
		time.Sleep(100 * time.Millisecond)
	}
	a.Kill()
	killedAt := time.Now()
	held := readBook(t, st, u.ID)
	orphans := held.leasesOf(idA)
	require.NotEmpty(t, orphans, "the lease went back before the kill")
	require.Len(t, orphans, len(held.leases), "a lease of another owner")
	checkBook(t, held, start)

	for {
		now := readBook(t, st, u.ID)
		if len(now.leases) == 0 {
			t.Logf("the lease was closed %v after the kill", time.Since(killedAt).Round(time.Second))
			break
		}
		require.Less(t, time.Since(killedAt), 90*time.Second, "the dead process's lease is still out")
		time.Sleep(time.Second)
	}
	settled := waitNoHold(t, st, u.ID, served)
	checkMoney(t, settled, start, served)
	checkRows(t, settled, out.servedIDs(), nil)
	for _, l := range orphans {
		assert.Equal(t, 1, logLines(t, b, "closed the credit lease of a dead instance", `"lease":"`+l.RequestID+`"`),
			"the surviving process did not close lease %s exactly once", l.RequestID)
	}
	reconcileClean(t, st)
}

// The database goes away for ten seconds while a busy user is served from
// a lease. The lease goes on serving within what it holds (the user's key
// stays cached), the settlements wait in the journal, and once the
// database is back every served stream is charged and logged exactly once.
func TestLeaseDatabaseOutageDuringTraffic(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a := startGateway(t, st, gatewayOptions{Leases: true, KeyCacheTTL: "1m"})
	start := billing.NanoFromUSD(10)
	u, key := newUser(t, st, start.USD())

	var out answers
	stop := make(chan struct{})
	wg := drive(4, func(int) string { return a.Base }, key, body(100, true), "50ms", stop, &out)
	time.Sleep(3 * time.Second)
	require.Positive(t, metric(t, a, leaseSeries), "no hold was carved from a lease before the outage")
	st.TestDB.Stop()
	downAt := time.Now()
	t.Log("database stopped")
	time.Sleep(10 * time.Second)
	require.NoError(t, st.TestDB.Restart(context.Background()))
	upAt := time.Now()
	t.Log("database restarted")
	time.Sleep(4 * time.Second)
	close(stop)
	wg.Wait()

	var during, after int
	for _, x := range out.list() {
		switch {
		case !x.served():
		case x.start.After(downAt) && x.end.Before(upAt):
			during++
		case x.start.After(upAt):
			after++
		}
	}
	n := out.tally()
	t.Logf("%d served (%d entirely during the outage, %d after it), %d refused, %d unavailable (503), other %v",
		n.served, during, after, n.refused, n.unavailable, n.other)
	assert.Positive(t, during, "the lease served nothing while the database was away")
	assert.Positive(t, after, "nothing served after the outage")
	assert.Zero(t, n.refused)
	assert.Empty(t, n.other)

	settled := waitSettled(t, st, u.ID, n.served)
	checkMoney(t, settled, start, n.served)
	checkRows(t, settled, out.servedIDs(), nil)
	reconcileClean(t, st)
}

// A Caddy process with credit leases on is stopped gracefully while its
// lease is out: it writes the last charges and gives the lease back before
// it exits, so the user document has no lease or hold left and the balance
// is what the user had minus what was charged, without a sweeper.
func TestLeaseGivenBackAtShutdown(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a := startGateway(t, st, gatewayOptions{Leases: true})
	start := billing.NanoFromUSD(10)
	u, key := newUser(t, st, start.USD())

	var out answers
	stop := make(chan struct{})
	wg := drive(6, func(int) string { return a.Base }, key, body(100, true), "20ms", stop, &out)
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()
	n := out.tally()
	served := n.served
	require.Empty(t, n.other)
	require.Positive(t, metric(t, a, leaseSeries), "no hold was carved from a lease")
	taken := metric(t, a, `caddy_llm_billing_credit_leases_total{event="taken"}`)

	before := readBook(t, st, u.ID)
	require.NotEmpty(t, before.leases, "no lease out at the shutdown")
	a.Stop()

	after := readBook(t, st, u.ID)
	checkBook(t, after, start)
	assert.Empty(t, after.leases, "a lease is left after the shutdown")
	assert.Zero(t, after.held, "credit is held after the shutdown")
	settled, err := ledgercheck.Read(context.Background(), st.DB, u.ID, "creditsNew")
	require.NoError(t, err)
	t.Logf("%d served, %v leases taken; after the shutdown: %d rows, %d receipts", served, taken, len(settled.Rows), settled.Receipts)
	assert.Zero(t, settled.Held)
	checkMoney(t, settled, start, served)
	checkRows(t, settled, out.servedIDs(), nil)
}
