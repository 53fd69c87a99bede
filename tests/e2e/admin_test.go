package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

type keysView struct {
	Stats map[string]int `json:"stats"`
	Keys  []struct {
		ID        string `json:"id"`
		Status    string `json:"status"`
		Available bool   `json:"available"`
	} `json:"keys"`
}

// adminGet reads a GET route of Caddy's admin API, which must answer 200.
func adminGet(t *testing.T, path string) []byte {
	t.Helper()
	resp, err := http.Get(adminURL + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, raw)
	}
	return raw
}

func adminKeys(t *testing.T) keysView {
	t.Helper()
	raw := adminGet(t, "/llm_billing/keys")
	var v keysView
	if err := json.Unmarshal(raw, &v); err != nil {
		t.Fatalf("GET /llm_billing/keys: %v %s", err, raw)
	}
	if strings.Contains(string(raw), env.UpstreamKey) || strings.Contains(string(raw), "apiKey") {
		t.Fatalf("key material in the key status: %s", raw)
	}
	return v
}

// The backend's "reload" (POST, 2xx JSON) and a key status endpoint live on
// Caddy's admin API, not on the public sites; a key added in MongoDB is in
// the pool as soon as reload is called.
func TestAdminReloadAndKeyStatus(t *testing.T) {
	ctx := context.Background()
	// The pool loads in the background at start-up.
	before := adminKeys(t)
	for deadline := time.Now().Add(10 * time.Second); before.Stats["total"] == 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
		before = adminKeys(t)
	}
	if before.Stats["total"] != 1 || len(before.Keys) != 1 || before.Keys[0].ID != seed.DemoUpstreamKeyID {
		t.Fatalf("key status before: %+v", before)
	}

	if err := seed.Insert(ctx, db, seed.UpstreamKey{ID: "added-by-admin-ui", APIKey: "sk-added", Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	if err := seed.Bind(ctx, db, "added-by-admin-ui"); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_, _ = db.Collection("openhands_bindings").DeleteMany(ctx, bson.D{{Key: "openhandsKeyId", Value: "added-by-admin-ui"}})
		_, _ = db.Collection("openhands_keys").DeleteOne(ctx, bson.D{{Key: "_id", Value: "added-by-admin-ui"}})
		reload(t)
	}()
	var r struct {
		Success bool `json:"success"`
		Keys    int  `json:"openhands_keys"`
	}
	if err := json.Unmarshal(reload(t), &r); err != nil || !r.Success || r.Keys != 2 {
		t.Fatalf("reload: %+v %v", r, err)
	}
	if after := adminKeys(t); after.Stats["total"] != 2 || after.Stats["available"] != 2 {
		t.Errorf("key status after reload: %+v", after)
	}

	// Not on the public sites.
	for _, path := range []string{"/llm_billing/reload", "/llm_billing/keys", "/reload", "/keys/status"} {
		resp, err := http.Post(chatURL+path, "application/json", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Errorf("public %s: status %d", path, resp.StatusCode)
		}
	}
}

func reload(t *testing.T) []byte {
	t.Helper()
	resp, err := http.Post(adminURL+"/llm_billing/reload", "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("POST /llm_billing/reload: %d %s", resp.StatusCode, raw)
	}
	return raw
}

// metricValue reads one sample of Caddy's admin /metrics (text format).
func metricValue(t *testing.T, series string) (float64, string) {
	t.Helper()
	raw := adminGet(t, "/metrics")
	for _, line := range strings.Split(string(raw), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", line, err)
			}
			return f, string(raw)
		}
	}
	return 0, string(raw)
}

// The database wait of every hold is in Caddy's own /metrics, and nothing
// secret is.
func TestDatabaseMetrics(t *testing.T) {
	const holds = `caddy_llm_billing_database_duration_seconds_count{operation="hold"}`
	before, _ := metricValue(t, holds)
	nu, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
	c := call{"anthropic json", "anthropic", false, "ant-text"}
	c.do(t, chatURL, key, "claude-haiku-4-5", uniq(t, "req"))
	waitLogs(t, nu.ID, 1)
	after, raw := metricValue(t, holds)
	if after < before+1 {
		t.Fatalf("hold count %v -> %v after a request\n%s", before, after, raw)
	}
	for _, op := range []string{"settle", "request_logs"} {
		if n, _ := metricValue(t, `caddy_llm_billing_database_duration_seconds_count{operation="`+op+`"}`); n < 1 {
			t.Errorf("no %s observed", op)
		}
	}
	for _, secret := range []string{key, env.UpstreamKey} {
		if strings.Contains(raw, secret) {
			t.Fatal("key material in /metrics")
		}
	}
}
