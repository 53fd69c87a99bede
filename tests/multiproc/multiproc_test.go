// Package multiproc runs the gateway as real Caddy processes (the test
// binary re-executed as Caddy, see caddyproc) sharing one database: two
// instances billing one balance, and an instance killed with SIGKILL in the
// middle of streams and restarted.
package multiproc

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/reconcile"
	"github.com/trollllm/caddy-llm-billing/tests/caddyproc"
	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/ledgercheck"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/stack"
)

func TestMain(m *testing.M) {
	caddyproc.MaybeRunChild()
	os.Exit(m.Run())
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// gatewayOptions are what a gateway is started with besides its stack.
// The zero value is the configuration the tests used before credit leases
// (plus a response header, see startGateway).
type gatewayOptions struct {
	// Leases turns credit_lease on.
	Leases bool
	// KeyCacheTTL is key_cache_ttl; empty: 2s.
	KeyCacheTTL string
}

// instance is one gateway process with the addresses it serves.
type instance struct {
	*caddyproc.Proc
	// Base is the site's base URL; Admin the admin endpoint's, where
	// /metrics is.
	Base, Admin string
}

// gateway starts one Caddy process billing creditsNew through st's
// database and upstream; it returns the process and the site's base URL.
func gateway(t *testing.T, st *stack.Stack) (*caddyproc.Proc, string) {
	t.Helper()
	g := startGateway(t, st, gatewayOptions{})
	return g.Proc, g.Base
}

// startGateway starts one Caddy process as gateway does, with opts. Every
// answer of the site carries the request id its log row will have, in
// X-Gateway-Request-Id.
func startGateway(t *testing.T, st *stack.Stack, opts gatewayOptions) instance {
	t.Helper()
	models, err := filepath.Abs("../../examples/models-chat.json")
	if err != nil {
		t.Fatal(err)
	}
	ttl, app := opts.KeyCacheTTL, ""
	if ttl == "" {
		ttl = "2s"
	}
	if opts.Leases {
		app = "\n\t\tcredit_lease on"
	}
	admin, site := freePort(t), freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", site)
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	grace_period 5s
	llm_billing {
		mongodb_uri {env.MONGODB_URI}
		database %s
		key_cache_ttl %s%s
	}
}

%s {
	header X-Gateway-Request-Id {http.request.uuid}
	llm_billing {
		credit_field creditsNew
		models %s
		forward_headers X-Test-Id X-Standin-*
	}
	reverse_proxy %s
}
`, admin, st.Database, ttl, app, base, models, st.UpstreamURL)
	adminAddr := fmt.Sprintf("127.0.0.1:%d", admin)
	p := caddyproc.Start(t, caddyproc.Options{
		Caddyfile: cf, Env: []string{"MONGODB_URI=" + st.MongoURI},
		AdminAddr: adminAddr, ReadyURL: base + "/health",
	})
	return instance{Proc: p, Base: base, Admin: "http://" + adminAddr}
}

func newUser(t *testing.T, st *stack.Stack, usd float64) (seed.User, string) {
	t.Helper()
	u := seed.User{ID: fmt.Sprintf("u-%s-%d", t.Name(), time.Now().UnixNano()), Active: true, Migration: true, Role: "user",
		CreditsNew: usd, APIKey: fmt.Sprintf("sk-trollllm-%064x", time.Now().UnixNano())}
	if err := seed.Insert(context.Background(), st.DB, u); err != nil {
		t.Fatal(err)
	}
	return u, u.APIKey
}

// streamCost is what one ant-text stream of claude-sonnet-4-5 costs on chat.
func streamCost(t *testing.T) billing.Nano {
	t.Helper()
	cat, err := billing.LoadCatalogue("../../examples/models-chat.json")
	if err != nil {
		t.Fatal(err)
	}
	m, _ := cat.Lookup("claude-sonnet-4-5")
	u := fixtures.Get("ant-text").SSEUsage
	return m.Price.Cost(billing.Usage{Input: u.Input, Output: u.Output, CacheWrite: u.CacheWrite, CacheRead: u.CacheRead})
}

func body(maxTokens int, stream bool) []byte {
	return []byte(fmt.Sprintf(`{"model":"claude-sonnet-4-5","max_tokens":%d,"stream":%t,"messages":[{"role":"user","content":"Write a story."}]}`, maxTokens, stream))
}

// send posts one request and reads the answer to the end; it returns the
// status, or 0 when the connection failed.
func send(ctx context.Context, base, key string, b []byte, delay string) int {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/messages", bytes.NewReader(b))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Standin-Fixture", "ant-text")
	if delay != "" {
		req.Header.Set("X-Standin-Event-Delay", delay)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0
	}
	return resp.StatusCode
}

// waitSettled waits until user has no hold or receipt left and at least
// rows log rows.
func waitSettled(t *testing.T, st *stack.Stack, user string, rows int) ledgercheck.User {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		u, err := ledgercheck.Read(context.Background(), st.DB, user, "creditsNew")
		if err != nil {
			t.Fatal(err)
		}
		if u.Settled() && len(u.Rows) >= rows {
			return u
		}
		if time.Now().After(deadline) {
			t.Fatalf("not settled after 90s: %d rows (want %d), held %d, receipts %d", len(u.Rows), rows, u.Held, u.Receipts)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func checkMoney(t *testing.T, u ledgercheck.User, start billing.Nano, rows int) {
	t.Helper()
	drop := start - u.Balance
	t.Logf("balance %s -> %s (drop %s); %d rows charging %s, shortfall %s", start, u.Balance, drop, len(u.Rows), u.Charged, u.Shortfall)
	if u.Fields["creditsNew"] < 0 {
		t.Errorf("creditsNew went negative: %v", u.Fields["creditsNew"])
	}
	if len(u.Rows) != rows {
		t.Errorf("%d request log rows, want %d", len(u.Rows), rows)
	}
	if len(u.DuplicateRequestIDs) > 0 {
		t.Errorf("requests logged twice: %v", u.DuplicateRequestIDs)
	}
	if u.Charged != drop || u.Net["creditsNew"] != -int64(drop) {
		t.Errorf("charged %s, llmNet %d, but the balance dropped %s", u.Charged, u.Net["creditsNew"], drop)
	}
}

func reconcileClean(t *testing.T, st *stack.Stack) {
	t.Helper()
	rep, err := reconcile.Run(context.Background(), st.DB, reconcile.Options{RecheckDelay: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	_ = rep.WriteText(&buf)
	t.Logf("reconcile:\n%s", buf.String())
	if !rep.OK() {
		t.Errorf("reconciliation found %d drift items", len(rep.Drift))
	}
}

// Two Caddy processes share one database and one user whose balance is
// worth about five requests; 100 streams go to both at once. Neither can
// spend what the other holds: the balance never goes below zero, every
// admitted stream is charged and logged once, and the charges are the
// balance drop. The processes isolate their writes with lock documents,
// since FerretDB does not isolate concurrent updates of one document.
func TestTwoInstancesShareOneBalance(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	a, baseA := gateway(t, st)
	b, baseB := gateway(t, st)
	cost := streamCost(t)
	u, key := newUser(t, st, (5 * cost).USD())
	start := billing.NanoFromUSD((5 * cost).USD())

	var ok, refused, unavailable, other atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 100; i++ {
		base := baseA
		if i%2 == 1 {
			base = baseB
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch send(context.Background(), base, key, body(40, true), "20ms") {
			case 200:
				ok.Add(1)
			case 402:
				refused.Add(1)
			case 503:
				// Fail-closed: the user's lock queue across the two
				// processes outgrew the hold's deadline (one user, 100
				// streams at once, on a loaded machine). Not admitted,
				// so not charged; checkMoney counts rows against ok.
				unavailable.Add(1)
			default:
				other.Add(1)
			}
		}()
	}
	wg.Wait()
	t.Logf("100 streams over two processes: %d admitted, %d refused (402), %d unavailable (503), %d other",
		ok.Load(), refused.Load(), unavailable.Load(), other.Load())
	if other.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("admitted %d, other %d", ok.Load(), other.Load())
	}
	st2 := waitSettled(t, st, u.ID, int(ok.Load()))
	checkMoney(t, st2, start, int(ok.Load()))
	for _, p := range []*caddyproc.Proc{a, b} {
		log, _ := os.ReadFile(p.LogPath())
		if !bytes.Contains(log, []byte(`"cross_instance_locks":true`)) {
			t.Errorf("process %d did not turn on cross-instance locks on FerretDB", p.Pid())
		}
	}
	reconcileClean(t, st)
}

// A Caddy is killed with SIGKILL while streams are in flight, just after a
// batch of requests completed. After the restart, the settlements the spool
// kept are replayed, and the holds of the killed streams are resolved at
// once by the orphan policy (charge_input): nothing is left held, nothing
// is charged twice, every charge has its log row.
func TestKill9MidStream(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	p, base := gateway(t, st)
	u, key := newUser(t, st, 10)
	start := billing.NanoFromUSD(10)

	// Completed requests, whose settlements may still be queued at the kill.
	var done atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if send(context.Background(), base, key, body(1024, false), "") == 200 {
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	// Slow streams, in flight at the kill.
	var inflight sync.WaitGroup
	for i := 0; i < 8; i++ {
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			if code := send(context.Background(), base, key, body(1024, true), "400ms"); code == 200 {
				t.Errorf("a stream completed across the kill")
			}
		}()
	}
	time.Sleep(1500 * time.Millisecond)
	held, err := ledgercheck.Read(context.Background(), st.DB, u.ID, "creditsNew")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("at the kill: %d completed, %d holds in flight", done.Load(), held.Holds)
	if held.Holds != 8 {
		t.Errorf("%d holds in flight before the kill, want 8", held.Holds)
	}
	p.Kill()
	inflight.Wait()
	p.Restart(t)

	// Receipts the killed process logged and had not dropped yet hold no
	// money: a later hold of the user or a sweeper's pass drops them.
	st2 := waitNoHold(t, st, u.ID, int(done.Load())+8)
	checkMoney(t, st2, start, int(done.Load())+8)
	var orphaned int
	for _, r := range st2.Rows {
		if r["usageSource"] == "hold_fallback" && r["endReason"] == "orphaned:charge_input" {
			orphaned++
		}
	}
	if orphaned != 8 {
		t.Errorf("%d rows resolved by the orphan policy, want 8", orphaned)
	}
	log, _ := os.ReadFile(p.LogPath())
	if n := strings.Count(string(log), "resolved an orphaned hold"); n != 8 {
		t.Errorf("the restarted process logged %d resolved holds, want 8", n)
	}
	reconcileClean(t, st)
}

// Streams finish while the database is down, and the Caddy is then stopped
// gracefully: their settlements cannot be written, so they stay in the
// spool on disk. With the database back, the restarted Caddy replays them:
// each is charged and logged exactly once.
func TestChargesSurviveOutageAndRestart(t *testing.T) {
	st := stack.StartForTest(t, stack.StackOptions{})
	p, base := gateway(t, st)
	u, key := newUser(t, st, 10)
	start := billing.NanoFromUSD(10)

	var ok atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 6; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if send(context.Background(), base, key, body(1024, true), "150ms") == 200 {
				ok.Add(1)
			}
		}()
	}
	time.Sleep(700 * time.Millisecond) // holds taken, streams running
	st.TestDB.Stop()
	wg.Wait()
	t.Logf("%d streams completed with the database down", ok.Load())
	if ok.Load() != 6 {
		t.Fatalf("%d of 6 streams completed", ok.Load())
	}
	p.Stop()
	log, _ := os.ReadFile(p.LogPath())
	if !bytes.Contains(log, []byte("settlements stay in the spool")) {
		t.Errorf("the stopped Caddy did not report settlements kept in the spool")
	}
	if err := st.TestDB.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	p.Restart(t)
	st2 := waitSettled(t, st, u.ID, 6)
	checkMoney(t, st2, start, 6)
	log, _ = os.ReadFile(p.LogPath())
	if !bytes.Contains(log, []byte("replaying settlements journaled by a previous run")) {
		t.Errorf("the restarted Caddy did not replay its spool")
	}
	reconcileClean(t, st)
}
