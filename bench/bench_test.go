package main

import (
	"context"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// The counting proxy sees every command the official driver sends, with
// its collection and the number of inserted documents, and forwards the
// replies.
func TestDBProxyCounts(t *testing.T) {
	db := testdb.StartForTest(t)
	p, err := startDBProxy(strings.TrimSuffix(strings.TrimPrefix(db.URI(), "mongodb://"), "/"))
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := mongo.Connect(options.Client().ApplyURI("mongodb://" + p.addr() + "/"))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Disconnect(ctx)
	coll := client.Database("bench").Collection("request_logs")
	if _, err := coll.InsertMany(ctx, []any{bson.D{{Key: "a", Value: 1}}, bson.D{{Key: "a", Value: 2}}, bson.D{{Key: "a", Value: 3}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := coll.UpdateOne(ctx, bson.D{{Key: "a", Value: 1}}, bson.D{{Key: "$inc", Value: bson.D{{Key: "a", Value: 10}}}}); err != nil {
		t.Fatal(err)
	}
	if n, err := coll.CountDocuments(ctx, bson.D{}); err != nil || n != 3 {
		t.Fatalf("count = %d, %v", n, err)
	}
	var ins, upd, reads int
	for _, o := range p.take() {
		switch {
		case o.Cmd == "insert" && o.Coll == "request_logs":
			ins++
			if o.Docs != 3 {
				t.Errorf("insert documents = %d, want 3", o.Docs)
			}
		case o.Cmd == "update" && o.Coll == "request_logs":
			upd++
		case o.class() == "read" && o.Coll == "request_logs":
			reads++
		}
		if o.RTT < 0 || o.RTT > time.Minute {
			t.Errorf("%s: rtt %v", o.Cmd, o.RTT)
		}
	}
	if ins != 1 || upd != 1 || reads != 1 {
		t.Errorf("insert %d update %d reads %d, want 1 each", ins, upd, reads)
	}
}

// The synthetic streams have exactly the asked number of events, end as
// the real APIs end, and carry the recorded usage.
func TestUpstreamSyntheticStreams(t *testing.T) {
	key := "sk-test"
	srv := httptest.NewServer(newUpstream([]string{key}))
	defer srv.Close()
	for _, tc := range []struct {
		path, body, last, usage string
	}{
		{"/v1/messages", `{"model":"m","stream":true}`, `data: {"type":"message_stop"}`, `"output_tokens":30`},
		{"/v1/chat/completions", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, "data: [DONE]", `"completion_tokens":300`},
	} {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+tc.path, strings.NewReader(tc.body))
		req.Header.Set("X-Api-Key", key)
		req.Header.Set(HeaderEvents, "50")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		s := strings.TrimSpace(string(b))
		if n := strings.Count(s, "\n\n") + 1; n != 50 {
			t.Errorf("%s: %d events, want 50", tc.path, n)
		}
		if !strings.HasSuffix(s, tc.last) {
			t.Errorf("%s: ends with %q", tc.path, s[max(0, len(s)-40):])
		}
		if !strings.Contains(s, tc.usage) {
			t.Errorf("%s: no usage %s", tc.path, tc.usage)
		}

		req, _ = http.NewRequest(http.MethodPost, srv.URL+tc.path, strings.NewReader(tc.body))
		req.Header.Set("X-Api-Key", key)
		req.Header.Set(HeaderStreamBytes, "1000000")
		req.Header.Set(HeaderEventBytes, "4096")
		resp, err = http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if len(b) < 1000000 || !strings.HasSuffix(strings.TrimSpace(string(b)), tc.last) {
			t.Errorf("%s: big stream of %d bytes", tc.path, len(b))
		}
	}
	// Without the bench headers the stand-in answers from its recordings.
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/v1/messages", strings.NewReader(`{"model":"m"}`))
	req.Header.Set("X-Api-Key", key)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Standin-Fixture-Used") != "ant-text" {
		t.Errorf("stand-in answer: %d %q", resp.StatusCode, resp.Header.Get("X-Standin-Fixture-Used"))
	}
}

// The /proc readers see this process.
func TestProcReaders(t *testing.T) {
	pid := os.Getpid()
	if _, _, err := cpuTime(pid); err != nil {
		t.Fatal(err)
	}
	rss, hwm, err := memStatus(pid)
	if err != nil || rss <= 0 || hwm < rss {
		t.Fatalf("rss %d hwm %d err %v", rss, hwm, err)
	}
}

// The bench Caddyfile adapts, with the key pool and with static keys
// (needs a Caddy with llm_billing: BENCH_TEST_CADDY=/path/to/caddy).
func TestCaddyfileAdapts(t *testing.T) {
	bin := os.Getenv("BENCH_TEST_CADDY")
	if bin == "" {
		t.Skip("BENCH_TEST_CADDY not set")
	}
	for _, static := range []bool{false, true} {
		h := &harness{cfg: config{StaticKeys: static}, upURL: "http://127.0.0.1:9", models: "../examples/models-chat.json",
			upstreamKeys: []string{"k1", "k2"}}
		path := t.TempDir() + "/Caddyfile"
		if err := os.WriteFile(path, []byte(h.caddyfile(2999, 3001, 3002)), 0o644); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "adapt", "--config", path, "--adapter", "caddyfile")
		cmd.Env = append(os.Environ(), "BENCH_MONGODB_URI=mongodb://127.0.0.1:1/")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("static %v: %v\n%s", static, err, out)
		}
		if static != strings.Contains(string(out), `"upstream_keys":["k1","k2"]`) {
			t.Errorf("static %v: %s", static, out)
		}
	}
}

// The histogram quantile interpolates inside the bucket as Prometheus'
// histogram_quantile does, and a phase's histogram is the difference of
// two scrapes.
func TestHistoQuantile(t *testing.T) {
	before := histo{count: 10, sum: 0.01, bounds: []float64{.001, .002, .004}, cum: []uint64{10, 10, 10}}
	after := histo{count: 30, sum: 0.05, bounds: []float64{.001, .002, .004}, cum: []uint64{10, 20, 30}}
	d := after.since(before)
	if d.count != 20 || d.cum[0] != 0 || d.cum[1] != 10 || d.cum[2] != 20 {
		t.Fatalf("since: %+v", d)
	}
	if got := d.quantileMs(0.5); math.Abs(got-2) > 1e-9 {
		t.Errorf("p50 %v ms, want 2", got)
	}
	if got := d.quantileMs(0.75); math.Abs(got-3) > 1e-9 {
		t.Errorf("p75 %v ms, want 3", got)
	}
	if got := d.meanMs(); math.Abs(got-2) > 1e-9 {
		t.Errorf("mean %v ms, want 2", got)
	}
	if !math.IsNaN((histo{}).quantileMs(0.5)) {
		t.Error("an empty histogram has a p50")
	}
}
