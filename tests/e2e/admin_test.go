package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
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

func adminKeys(t *testing.T) keysView {
	t.Helper()
	resp, err := http.Get(adminURL + "/llm_billing/keys")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var v keysView
	if resp.StatusCode != 200 || json.Unmarshal(raw, &v) != nil {
		t.Fatalf("GET /llm_billing/keys: %d %s", resp.StatusCode, raw)
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
