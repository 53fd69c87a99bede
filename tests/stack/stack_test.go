package stack_test

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/stack"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

func TestStartSeedClose(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := stack.Start(ctx, stack.StackOptions{})
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			st.Close()
		}
	}()
	if st.Database != "fproxy" || st.DB.Name() != "fproxy" || !strings.HasPrefix(st.MongoURI, "mongodb://127.0.0.1:") {
		t.Errorf("database %q / %q at %q", st.Database, st.DB.Name(), st.MongoURI)
	}

	for coll, want := range map[string]int64{
		seed.UsersCollection: 2, seed.UserKeysCollection: 1,
		seed.UpstreamKeyCollection: 1, seed.BindingsCollection: 1,
	} {
		n, err := st.DB.Collection(coll).CountDocuments(ctx, bson.D{})
		if err != nil || n != want {
			t.Errorf("%s: %d documents (%v), want %d", coll, n, err, want)
		}
	}
	b, err := seed.Balances(ctx, st.DB, seed.DemoUser)
	if err != nil || b["creditsNew"] != 10 || b["credits"] != 5 || b["refCredits"] != 2 {
		t.Errorf("demo balances = %v, %v", b, err)
	}

	// The stand-in accepts the seeded upstream key and only it.
	for key, want := range map[string]int{st.UpstreamKey: 200, "sk-other": 401} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, st.UpstreamURL+standin.PathMessages, strings.NewReader(`{"model":"m"}`))
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("key %s: status %d, want %d", key, resp.StatusCode, want)
		}
	}
	if n := len(st.Standin.Requests()); n != 2 {
		t.Errorf("stand-in recorded %d requests, want 2", n)
	}

	dir := st.TestDB.Dir()
	upstream := st.UpstreamURL
	begin := time.Now()
	st.Close()
	closed = true
	st.Close() // idempotent
	if d := time.Since(begin); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("temporary directory %s left behind: %v", dir, err)
	}
	if resp, err := http.Post(upstream+standin.PathMessages, "application/json", strings.NewReader("{}")); err == nil {
		resp.Body.Close()
		t.Error("stand-in still answers after Close")
	}
}

func TestOptions(t *testing.T) {
	dir := t.TempDir()
	st := stack.StartForTest(t, stack.StackOptions{Dir: dir, Database: "other", NoSeed: true, UpstreamAddr: "127.0.0.1:0"})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if st.DB.Name() != "other" || st.TestDB.Dir() != dir {
		t.Errorf("db %q in %q", st.DB.Name(), st.TestDB.Dir())
	}
	n, err := st.DB.Collection(seed.UsersCollection).CountDocuments(ctx, bson.D{})
	if err != nil || n != 0 {
		t.Errorf("NoSeed: %d users, %v", n, err)
	}
	if _, err := stack.Start(ctx, stack.StackOptions{UpstreamAddr: "not-an-address"}); err == nil {
		t.Error("Start with a bad upstream address succeeded")
	}
}
