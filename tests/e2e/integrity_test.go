package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/ledgercheck"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

func antStream(maxTokens int) []byte {
	return []byte(fmt.Sprintf(`{"model":"claude-sonnet-4-5","max_tokens":%d,"stream":true,"messages":[{"role":"user","content":"Write a long story."}]}`, maxTokens))
}

// outcome counts what the clients saw.
type outcome struct {
	ok, refused, unavailable, other atomic.Int64
}

// fire sends one streaming request and reads it to the end; it returns the
// status. A 402 must carry the legacy body.
func fire(t *testing.T, url, key string, body []byte, delay string, o *outcome) {
	req, _ := http.NewRequest(http.MethodPost, url+"/v1/messages", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Standin-Fixture", "ant-text")
	req.Header.Set("X-Standin-Event-Delay", delay)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		o.other.Add(1)
		return
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode == 200 && err == nil:
		o.ok.Add(1)
	case resp.StatusCode == 402:
		var e struct {
			Type  string `json:"type"`
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if json.Unmarshal(b, &e) != nil || e.Type != "error" || e.Error.Message == "" {
			t.Errorf("402 body %q", b)
		}
		o.refused.Add(1)
	case resp.StatusCode == 503:
		o.unavailable.Add(1)
	default:
		t.Errorf("status %d: %s (%v)", resp.StatusCode, b, err)
		o.other.Add(1)
	}
}

// waitSettled waits until the user has no hold or receipt left and rows
// for every admitted request, and returns the final state.
func waitSettled(t *testing.T, user string, rows int, fields ...string) ledgercheck.User {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		u, err := ledgercheck.Read(context.Background(), db, user, fields...)
		if err != nil {
			t.Fatal(err)
		}
		if u.Settled() && len(u.Rows) >= rows {
			return u
		}
		if time.Now().After(deadline) {
			t.Fatalf("user %s not settled after 90s: %d rows (want %d), held %d, holds %d, receipts %d", user, len(u.Rows), rows, u.Held, u.Holds, u.Receipts)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkMoney asserts the invariants of a finished run: nothing negative,
// every admitted request logged once, the charges equal the balance drop
// and the gateway's net counter.
func checkMoney(t *testing.T, u ledgercheck.User, start billing.Nano, admitted int64, field string) {
	t.Helper()
	drop := start - u.Balance
	t.Logf("admitted %d; balance %s -> %s (drop %s); %d rows charging %s, shortfall %s",
		admitted, start, u.Balance, drop, len(u.Rows), u.Charged, u.Shortfall)
	for f, v := range u.Fields {
		if v < 0 {
			t.Errorf("%s went negative: %v", f, v)
		}
	}
	if int64(len(u.Rows)) != admitted {
		t.Errorf("%d request log rows for %d admitted requests", len(u.Rows), admitted)
	}
	if len(u.DuplicateRequestIDs) > 0 {
		t.Errorf("requests logged twice: %v", u.DuplicateRequestIDs)
	}
	if u.Charged != drop {
		t.Errorf("charged %s, but the balance dropped %s", u.Charged, drop)
	}
	if u.Net[field] != -int64(u.Charged) {
		t.Errorf("llmNet.%s = %d, want %d", field, u.Net[field], -int64(u.Charged))
	}
}

// Forty concurrent long streams with a large max_tokens on a balance worth
// about five requests: the first hold takes what the balance has (its
// worst case is far more), so the others are refused with the legacy 402
// before anything is sent upstream. A second round with max_tokens just
// above the real output admits several at once: still never below zero,
// and every charge is on a log row.
func TestConcurrentStreamsNeverOverspend(t *testing.T) {
	prices := loadPrices(t, "models-chat.json")
	c := call{"", "anthropic", true, "ant-text"}
	cost := prices["claude-sonnet-4-5"].cost(c.expected())
	for _, tc := range []struct {
		name      string
		maxTokens int
	}{
		{"max_tokens 32000", 32000},
		{"max_tokens 40", 40}, // just above the 29 the fixture produces
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5 * cost})
			start := billing.NanoFromUSD(5 * cost)
			var o outcome
			var wg sync.WaitGroup
			for i := 0; i < 40; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					fire(t, chatURL, key, antStream(tc.maxTokens), "40ms", &o)
				}()
			}
			wg.Wait()
			if o.other.Load() != 0 || o.unavailable.Load() != 0 {
				t.Fatalf("unexpected answers: %d other, %d unavailable", o.other.Load(), o.unavailable.Load())
			}
			st := waitSettled(t, u.ID, int(o.ok.Load()), "creditsNew")
			t.Logf("40 streams: %d admitted, %d refused (402)", o.ok.Load(), o.refused.Load())
			if o.ok.Load() == 0 || o.ok.Load()+o.refused.Load() != 40 {
				t.Errorf("admitted %d, refused %d", o.ok.Load(), o.refused.Load())
			}
			checkMoney(t, st, start, o.ok.Load(), "creditsNew")
			// A request only goes ahead when the pool covers its estimated
			// input; what the hold could not cover is recorded, never lost.
			if o.ok.Load() > 6 {
				t.Errorf("%d streams admitted on a balance worth 5", o.ok.Load())
			}
		})
	}
}

// One client sends requests one after the other, each with a worst-case
// hold far above the balance, so each hold takes the whole balance. The
// next request comes while the last one's settlement is still queued: its
// hold waits for that settlement to give back the unused part instead of
// being refused, so the balance serves exactly as many requests as it can
// pay for, then 402. The balance is five requests' cost plus one nano less
// than the least a request needs (its input bound and one output token):
// five are served, and what is left cannot pay for a sixth.
func TestSequentialRequestsUseWhatTheLastGaveBack(t *testing.T) {
	prices := loadPrices(t, "models-chat.json")
	c := call{"", "anthropic", true, "ant-text"}
	cost := prices["claude-sonnet-4-5"].cost(c.expected())
	rest := leastAdmitted(t, antStream(32000)) - 1
	start := billing.NanoFromUSD(5*cost) + rest
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: start.USD()})
	var o outcome
	for i := 0; i < 7; i++ {
		fire(t, chatURL, key, antStream(32000), "0ms", &o)
	}
	st := waitSettled(t, u.ID, int(o.ok.Load()), "creditsNew")
	t.Logf("7 requests in sequence: %d admitted, %d refused (402)", o.ok.Load(), o.refused.Load())
	if o.ok.Load() != 5 || o.refused.Load() != 2 {
		t.Errorf("admitted %d, refused %d; want 5 and 2", o.ok.Load(), o.refused.Load())
	}
	checkMoney(t, st, start, o.ok.Load(), "creditsNew")
	if st.Balance != rest || st.Shortfall != 0 {
		t.Errorf("balance left %s, shortfall %s; want %s and 0", st.Balance, st.Shortfall, rest)
	}
}

// leastAdmitted is the least balance that admits body to claude-sonnet-4-5
// on chatURL: the hold's input bound and one output token.
func leastAdmitted(t *testing.T, body []byte) billing.Nano {
	t.Helper()
	cat, err := billing.LoadCatalogue(examples("models-chat.json"))
	if err != nil {
		t.Fatal(err)
	}
	m, _ := cat.Lookup("claude-sonnet-4-5")
	terms := billing.HoldTerms(m, billing.ForwardedSize(len(body), m.PickUpstream(0)), 32000, 4096)
	lo, hi := terms.Input, terms.Want
	for lo < hi {
		if mid := lo + (hi-lo)/2; terms.Cap(m, mid, 0) >= 1 {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	return lo
}

// The database stops for 10 seconds in the middle of traffic. Requests that
// cannot take a hold fail closed (503, nothing sent upstream); streams that
// had their hold finish, and their settlements wait for the database. When
// it is back every admitted request is charged and logged exactly once.
func TestDatabaseOutageDuringTraffic(t *testing.T) {
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
	start := billing.NanoFromUSD(10)
	var o outcome
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				fire(t, chatURL, key, antStream(1024), "50ms", &o)
			}
		}()
	}
	time.Sleep(3 * time.Second)
	before := o.ok.Load()
	env.TestDB.Stop()
	t.Log("database stopped")
	time.Sleep(10 * time.Second)
	if err := env.TestDB.Restart(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Log("database restarted")
	time.Sleep(4 * time.Second)
	close(stop)
	wg.Wait()
	t.Logf("answers: %d ok (%d before the outage), %d unavailable (503), %d refused, %d other",
		o.ok.Load(), before, o.unavailable.Load(), o.refused.Load(), o.other.Load())
	if o.unavailable.Load() == 0 {
		t.Error("no request failed closed during the outage")
	}
	if o.ok.Load() <= before {
		t.Error("no request succeeded after the outage")
	}
	st := waitSettled(t, u.ID, int(o.ok.Load()), "creditsNew")
	checkMoney(t, st, start, o.ok.Load(), "creditsNew")
}
