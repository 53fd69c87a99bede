package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

func streamBody(model string) []byte {
	return []byte(`{"model":"` + model + `","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Hello"}]}`)
}

// The client receives exactly the bytes the upstream sent, and receives
// them as they are sent: the first event arrives long before the last one
// is written.
func TestStreamIsByteIdenticalAndUnbuffered(t *testing.T) {
	for _, tc := range []struct{ path, fixture string }{
		{"/v1/messages", "ant-text"},
		{"/v1/chat/completions", "oai-cached"},
	} {
		t.Run(tc.fixture, func(t *testing.T) {
			u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
			const delay = 150 * time.Millisecond
			start := time.Now()
			resp := post(t, chatURL+tc.path, key, streamBody("claude-sonnet-4-5"), map[string]string{
				"X-Standin-Fixture": tc.fixture, "X-Standin-Event-Delay": delay.String(),
			})
			defer resp.Body.Close()
			if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
				t.Fatalf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
			}
			br := bufio.NewReader(resp.Body)
			first, err := br.ReadBytes('\n')
			if err != nil {
				t.Fatal(err)
			}
			firstAt := time.Since(start)
			rest, err := io.ReadAll(br)
			if err != nil {
				t.Fatal(err)
			}
			total := time.Since(start)
			got := append(first, rest...)
			// The gateway asked for usage on the client's behalf; the bytes
			// are the upstream's, unchanged.
			want := fixtures.Get(tc.fixture).SSE(true)
			if !bytes.Equal(got, want) {
				t.Fatalf("stream differs from what the upstream sent (%d vs %d bytes)", len(got), len(want))
			}
			// Events are paced `delay` apart by the upstream; a buffering
			// proxy would deliver the first one only at the end.
			if firstAt > total/2 {
				t.Errorf("first byte after %v of a %v stream: the stream is buffered", firstAt, total)
			}
			waitLogs(t, u.ID, 1)
		})
	}
}

// A client that goes away mid-stream. With the default policy (drain, on
// chat) the gateway reads the upstream to the end and bills the usage it
// reports; with client_disconnect stop (chat2) it cancels the upstream and
// bills what was reported so far (never less than the output it saw). The
// log says client_gone either way, and whether the usage was measured.
func TestClientDisconnectMidStream(t *testing.T) {
	noLeaks(t)
	prices := loadPrices(t, "models-chat.json")
	for _, tc := range []struct {
		name, url, source string
		user              seed.User
		field             string
	}{
		{"drain", chatURL, "upstream", seed.User{Active: true, Migration: true, CreditsNew: 10}, "creditsNew"},
		{"stop", chat2URL, "upstream_partial", seed.User{Active: true, Migration: true, Credits: 10, CreditsNew: 10}, "credits"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u, key := newUser(t, tc.user)
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, tc.url+"/v1/messages", bytes.NewReader(streamBody("claude-sonnet-4-5")))
			req.Header.Set("Authorization", "Bearer "+key)
			req.Header.Set("X-Standin-Fixture", "ant-cache")
			req.Header.Set("X-Standin-Event-Delay", "50ms")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			br := bufio.NewReader(resp.Body)
			for i := 0; i < 10; i++ { // message_start and a few more lines
				if _, err := br.ReadBytes('\n'); err != nil {
					t.Fatal(err)
				}
			}
			cancel()
			resp.Body.Close()

			l := waitLogs(t, u.ID, 1)[0]
			if l["endReason"] != "client_gone" || l["usageSource"] != tc.source {
				t.Errorf("endReason=%v usageSource=%v, want client_gone and %s", l["endReason"], l["usageSource"], tc.source)
			}
			// message_start of the fixture reported input 2, cache write 3068.
			if num(t, l, "inputTokens") < 2 || num(t, l, "cacheWriteTokens") < 3068 || num(t, l, "creditsCost") <= 0 {
				t.Errorf("billed %v", l)
			}
			if tc.name == "drain" {
				// Read to the end: exactly what a complete stream costs.
				full := call{"", "anthropic", true, "ant-cache"}
				if want := prices["claude-sonnet-4-5"].cost(full.expected()); !near(num(t, l, "creditsCost"), want) {
					t.Errorf("drained cost = %v, want the full %v", num(t, l, "creditsCost"), want)
				}
			}
			b := balances(t, u.ID)
			if !near(b[tc.field], 10-num(t, l, "creditsCost")) {
				t.Errorf("balances %v do not match the log", b)
			}
		})
	}
}

// An upstream that cuts the stream: the client gets what was sent, the
// request is billed from what was seen, and the log says upstream_cut.
func TestUpstreamCutMidStream(t *testing.T) {
	noLeaks(t)
	u, key := newUser(t, seed.User{Active: true, Migration: true, Credits: 10})
	resp := post(t, chat2URL+"/v1/chat/completions", key, streamBody("claude-sonnet-4-5"), map[string]string{
		"X-Standin-Fixture": "oai-text", "X-Standin-Cut-After": "40",
	})
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	l := waitLogs(t, u.ID, 1)[0]
	if l["endReason"] != "upstream_cut" || l["usageSource"] != "estimated" {
		t.Errorf("endReason=%v usageSource=%v, want upstream_cut and estimated", l["endReason"], l["usageSource"])
	}
	if num(t, l, "outputTokens") <= 0 || num(t, l, "creditsCost") <= 0 {
		t.Errorf("a cut stream was billed nothing: %v", l)
	}
}

// An upstream error is passed to the client and charges nothing: a client
// error at once, a server error after the retries on the pool's only key.
// (Errors that take a key out are in TestFailoverToAGoodKey, on a pool of
// their own.)
func TestUpstreamErrorIsNotBilled(t *testing.T) {
	noLeaks(t)
	for _, tc := range []struct {
		path   string
		status int
	}{{"/v1/messages", 400}, {"/v1/chat/completions", 400}, {"/v1/messages", 500}, {"/v1/chat/completions", 503}} {
		path := tc.path
		u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
		resp := post(t, chatURL+path, key, validBody("claude-sonnet-4-5")(), map[string]string{"X-Standin-Status": fmt.Sprint(tc.status)})
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !json.Valid(raw) || resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s: status %d body %s", path, resp.StatusCode, raw)
		}
		// Sanitised: the client's API shape, no upstream internals.
		if strings.Contains(strings.ToLower(string(raw)), "litellm") || resp.Header.Get("X-Litellm-Version") != "" {
			t.Errorf("%s: upstream internals reach the client: %v %s", path, resp.Header, raw)
		}
		noLogsFor(t, u.ID)
		if b := balances(t, u.ID); b["creditsNew"] != 10 {
			t.Errorf("%s: creditsNew = %v after an upstream error", path, b["creditsNew"])
		}
	}
}

// An unreachable upstream gives a JSON 502 in the API's shape and charges nothing.
func TestUpstreamDownIsJSON502(t *testing.T) {
	noLeaks(t)
	for _, path := range []string{"/v1/messages", "/v1/chat/completions"} {
		u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
		resp := post(t, deadURL+path, key, validBody("claude-sonnet-4-5")(), nil)
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("%s: status %d content type %q: %s", path, resp.StatusCode, resp.Header.Get("Content-Type"), raw)
		}
		oaiType := "upstream_error"
		checkErrorShape(t, path, raw, oaiType, "", "api_error", "Request to upstream service failed")
		noLogsFor(t, u.ID)
	}
}

// The legacy usage counters: user_keys (weighted tokens, requests, last
// use) and openhands_keys (input+output tokens, requests, last use).
func TestUsageCounters(t *testing.T) {
	ctx := context.Background()
	nu, _ := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
	key := "sk-troll-" + randHex(24)
	rememberKey(key)
	if err := seed.Insert(ctx, db, seed.UserKey{Key: key, User: nu.ID, Active: true}); err != nil {
		t.Fatal(err)
	}
	// The counters are written every 500 ms: let earlier tests' land
	// before the baseline is read.
	time.Sleep(1200 * time.Millisecond)
	var before bson.M
	if err := db.Collection("openhands_keys").FindOne(ctx, bson.D{{Key: "_id", Value: seed.DemoUpstreamKeyID}}).Decode(&before); err != nil {
		t.Fatal(err)
	}
	c := call{"anthropic json", "anthropic", false, "ant-text"}
	c.do(t, chatURL, key, "claude-haiku-4-5", uniq(t, "req"))
	l := waitLogs(t, nu.ID, 1)[0]

	var uk, after bson.M
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		uk, after = nil, nil
		if err := db.Collection("user_keys").FindOne(ctx, bson.D{{Key: "_id", Value: key}}).Decode(&uk); err != nil {
			t.Fatal(err)
		}
		if err := db.Collection("openhands_keys").FindOne(ctx, bson.D{{Key: "_id", Value: seed.DemoUpstreamKeyID}}).Decode(&after); err != nil {
			t.Fatal(err)
		}
		if (num(t, uk, "requestsCount") >= 1 && num(t, after, "requestsCount") > num(t, before, "requestsCount")) || time.Now().After(deadline) {
			break
		}
	}
	if num(t, uk, "tokensUsed") != num(t, l, "tokensUsed") || num(t, uk, "requestsCount") != 1 {
		t.Errorf("user_keys counters %v, log tokensUsed %v", uk, l["tokensUsed"])
	}
	if _, ok := uk["lastUsedAt"].(bson.DateTime); !ok {
		t.Errorf("user_keys.lastUsedAt = %v", uk["lastUsedAt"])
	}
	raw := num(t, l, "inputTokens") + num(t, l, "outputTokens")
	if num(t, after, "requestsCount")-num(t, before, "requestsCount") != 1 || num(t, after, "tokensUsed")-num(t, before, "tokensUsed") != raw {
		t.Errorf("openhands_keys counters before %v after %v, want +1 request and +%v tokens", before, after, raw)
	}
}
