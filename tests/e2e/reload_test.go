package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/fixtures"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// Config reloads while streams are in flight lose no request and no charge:
// the engine (MongoDB client, pending settlements) is shared across config
// generations. The reloads also switch between the openhands_keys pool and
// a static key list, so both key sources serve traffic.
func TestReloadUnderTraffic(t *testing.T) {
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 100})
	defer func() {
		if err := loadCaddy(caddyfile(configOpts{})); err != nil {
			t.Fatalf("restoring the config: %v", err)
		}
	}()

	const workers, perWorker = 8, 6
	want := fixtures.Get("ant-text").SSE(true)
	var wg sync.WaitGroup
	errs := make(chan error, workers*perWorker)
	stop := make(chan struct{})
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < perWorker; i++ {
				resp, err := postRetryingConnErrors(key)
				if err != nil {
					errs <- err
					continue
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil || resp.StatusCode != 200 || !bytes.Equal(got, want) {
					errs <- fmt.Errorf("status %d, %d bytes, err %v", resp.StatusCode, len(got), err)
				}
			}
		}()
	}
	reloads := 0
	go func() {
		defer close(stop)
		for i := 0; i < 6; i++ {
			time.Sleep(250 * time.Millisecond)
			cfg := caddyfile(configOpts{staticKeys: i%2 == 0, cacheTTL: fmt.Sprintf("%ds", i+1)})
			if err := loadCaddy(cfg); err != nil {
				errs <- fmt.Errorf("reload %d: %w", i, err)
				return
			}
			reloads++
		}
	}()
	wg.Wait()
	<-stop
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d requests, %d reloads, %d connection errors retried", workers*perWorker, reloads, connRetries.Load())
	if reloads != 6 {
		t.Fatalf("%d reloads happened, want 6", reloads)
	}

	n := workers * perWorker
	logs := waitLogs(t, u.ID, n)
	var sum float64
	static, pooled := 0, 0
	ids := map[string]bool{}
	for _, l := range logs {
		sum += num(t, l, "creditsCost")
		ids[l["requestId"].(string)] = true
		switch tk, _ := l["trollKeyId"].(string); {
		case tk == "openhands:"+seed.DemoUpstreamKeyID:
			pooled++
		case strings.HasPrefix(tk, "openhands:static-"):
			static++
		}
	}
	if len(ids) != n {
		t.Errorf("%d distinct request ids for %d requests", len(ids), n)
	}
	b := balances(t, u.ID)
	if !near(b["creditsNewUsed"], sum) || !near(100-b["creditsNew"], sum) {
		t.Errorf("charged %v in logs, creditsNewUsed %v, balance drop %v", sum, b["creditsNewUsed"], 100-b["creditsNew"])
	}
	if static == 0 || pooled == 0 {
		t.Errorf("static-key requests %d, pool-key requests %d: both key sources should have served", static, pooled)
	}
	cnt, err := db.Collection("request_logs").CountDocuments(context.Background(), bson.D{{Key: "userId", Value: u.ID}})
	if err != nil || cnt != int64(n) {
		t.Errorf("request logs %d (err %v), want %d", cnt, err, n)
	}
}

var connRetries atomic.Int64

// postRetryingConnErrors sends one streaming request and, like the official
// SDKs, retries it when the connection fails before any response: a reload
// closes the old server's idle keep-alive connections, and a request written
// on one at that moment never reaches Caddy. Such an attempt is never
// billed, which the log count below checks (a billed retry would show up
// as an extra log).
func postRetryingConnErrors(key string) (*http.Response, error) {
	var lastErr error
	for attempt := 0; attempt < 4; attempt++ {
		req, _ := http.NewRequest(http.MethodPost, chatURL+"/v1/messages", bytes.NewReader(streamBody("claude-sonnet-4-5")))
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("X-Standin-Event-Delay", "40ms")
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			return resp, nil
		}
		lastErr = err
		connRetries.Add(1)
	}
	return nil, lastErr
}
