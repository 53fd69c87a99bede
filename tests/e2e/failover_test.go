package e2e

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// A pool where most keys fail, each in its own way: every request still
// succeeds on the good key before any byte reaches the client, streaming or
// not, is billed once, and records its attempts; the failed keys get the
// statuses the admin UI knows, and a rate-limited key comes back after its
// Retry-After.
func TestFailoverToAGoodKey(t *testing.T) {
	ctx := context.Background()
	fdb := env.DB.Client().Database("fproxy_failover")
	failing := map[string]string{ // key id → how the stand-in fails it
		"f-401": "401", "f-402": "402", "f-403": "403", "f-429": "429",
		"f-529": "529", "f-budget": standin.StatusBudget, "f-500": "500",
		"f-hang": standin.StatusHang, "f-drop": standin.StatusDrop,
	}
	var accepted []string
	for id := range failing {
		accepted = append(accepted, "sk-"+id)
	}
	accepted = append(accepted, "sk-good", "sk-spare-1", env.UpstreamKey)
	env.Standin.SetKeys(accepted...)
	for id, st := range failing {
		env.Standin.SetKeyStatus("sk-"+id, st)
	}
	defer func() {
		for id := range failing {
			env.Standin.SetKeyStatus("sk-"+id, "")
		}
		env.Standin.SetKeys(env.UpstreamKey)
	}()
	for id := range failing {
		if err := seed.Insert(ctx, fdb, seed.UpstreamKey{ID: id, APIKey: "sk-" + id, Status: "healthy"}); err != nil {
			t.Fatal(err)
		}
		if err := seed.Bind(ctx, fdb, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := seed.Insert(ctx, fdb, seed.UpstreamKey{ID: "good", APIKey: "sk-good", Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	if err := seed.Bind(ctx, fdb, "good"); err != nil {
		t.Fatal(err)
	}
	// One spare in openhands_backup_keys: the first key that fails for good
	// is replaced by it; the others are marked as the legacy proxy did.
	if _, err := fdb.Collection("openhands_backup_keys").InsertOne(ctx, bson.D{{Key: "_id", Value: "spare-1"},
		{Key: "apiKey", Value: "sk-spare-1"}, {Key: "isUsed", Value: false}, {Key: "createdAt", Value: time.Now()}}); err != nil {
		t.Fatal(err)
	}
	user := uniq(t, "u")
	key := "sk-trollllm-" + randHex(64)
	rememberKey(key)
	if err := seed.Insert(ctx, fdb, seed.User{ID: user, APIKey: key, Role: "user", Active: true, Migration: true, CreditsNew: 10}); err != nil {
		t.Fatal(err)
	}

	if err := loadCaddy(caddyfile(configOpts{database: "fproxy_failover", headerTimeout: "2s",
		appExtra: "\n\t\tkey_attempts 12\n\t\tkey_error_cooldown 60s"})); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := loadCaddy(caddyfile(configOpts{})); err != nil {
			t.Fatalf("restoring the config: %v", err)
		}
	}()

	calls := []call{
		{"anthropic json", "anthropic", false, "ant-text"},
		{"anthropic stream", "anthropic", true, "ant-cache"},
		{"openai json", "openai", false, "oai-cached"},
		{"openai stream", "openai", true, "oai-text"},
	}
	const rounds = 3
	for r := 0; r < rounds; r++ {
		for _, c := range calls {
			c.do(t, chatURL, key, "claude-sonnet-4-5", uniq(t, "req")) // fails the test on any error the client sees
		}
	}
	n := rounds * len(calls)
	logs := waitLogsIn(t, fdb, user, n)
	var sum float64
	failedAttempts := 0
	for _, l := range logs {
		sum += num(t, l, "creditsCost")
		attempts, _ := l["attempts"].(bson.A)
		last := asMap(attempts[len(attempts)-1])
		if (last["keyId"] != "good" && last["keyId"] != "spare-1") || last["reason"] != "ok" || l["trollKeyId"] != "openhands:"+last["keyId"].(string) {
			t.Errorf("billed on %v, last attempt %v", l["trollKeyId"], last)
		}
		failedAttempts += len(attempts) - 1
	}
	// Every failing key failed at least once, and was then left alone.
	if failedAttempts < len(failing) {
		t.Errorf("%d failed attempts for %d failing keys", failedAttempts, len(failing))
	}
	var b bson.M
	if err := fdb.Collection("usersNew").FindOne(ctx, bson.D{{Key: "_id", Value: user}}).Decode(&b); err != nil {
		t.Fatal(err)
	}
	if !near(num(t, b, "creditsNewUsed"), sum) || !near(10-num(t, b, "creditsNew"), sum) {
		t.Errorf("charged %v in %d logs, creditsNewUsed %v, balance drop %v", sum, n, b["creditsNewUsed"], 10-num(t, b, "creditsNew"))
	}
	t.Logf("%d requests billed once each on a working key after %d failed attempts; the first one was charged $%v (chargedNano %v) on %v after attempts %v",
		n, failedAttempts, logs[0]["creditsCost"], logs[0]["chargedNano"], logs[0]["trollKeyId"], logs[0]["attempts"])

	// The statuses the backend admin UI shows; exactly one of the keys that
	// failed for good was rotated out (archived, replaced by the spare).
	want := map[string]string{"f-401": "need_refresh", "f-403": "need_refresh", "f-402": "exhausted", "f-budget": "exhausted",
		"f-429": "rate_limited", "f-529": "rate_limited",
		// 5xx, hangs past the timeout and dropped connections: a cooldown in memory only.
		"f-500": "healthy", "f-hang": "healthy", "f-drop": "healthy"}
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := keyStatuses(t, fdb)
		rotated := ""
		ok := got["spare-1"] == "healthy"
		for id, st := range want {
			switch {
			case got[id] == st:
			case got[id] == "" && rotated == "" && (st == "need_refresh" || st == "exhausted"):
				rotated = id
			default:
				ok = false
			}
		}
		if ok && rotated != "" {
			var archived, spare bson.M
			if err := fdb.Collection("deleted_keys_archive").FindOne(ctx, bson.D{{Key: "sourceId", Value: rotated}}).Decode(&archived); err != nil {
				t.Fatalf("rotated %s but no archive: %v", rotated, err)
			}
			if err := fdb.Collection("openhands_keys").FindOne(ctx, bson.D{{Key: "_id", Value: "spare-1"}}).Decode(&spare); err != nil || spare["replacedKey"] != rotated {
				t.Fatalf("spare key %v, want it to replace %s (%v)", spare, rotated, err)
			}
			t.Logf("key statuses %v; %s was replaced by spare-1", got, rotated)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key statuses %v, want %v with one need_refresh/exhausted key rotated to spare-1", got, want)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The 429 key's Retry-After (1s from the stand-in) passes and the key
	// is healthy again upstream: it serves again.
	env.Standin.SetKeyStatus("sk-f-429", "")
	time.Sleep(1500 * time.Millisecond)
	served := false
	for i := 0; i < 24 && !served; i++ {
		if i == 12 {
			// A loaded machine: give the pool one refresh.
			time.Sleep(5 * time.Second)
		}
		c := calls[0]
		c.do(t, chatURL, key, "claude-sonnet-4-5", uniq(t, "req"))
		logs = waitLogsIn(t, fdb, user, n+i+1)
		if logs[len(logs)-1]["trollKeyId"] == "openhands:f-429" {
			served = true
		}
	}
	if !served {
		t.Error("the rate-limited key never served again after its cooldown")
	}
}

func keyStatuses(t *testing.T, d *mongo.Database) map[string]string {
	t.Helper()
	cur, err := d.Collection("openhands_keys").Find(context.Background(), bson.D{})
	if err != nil {
		t.Fatal(err)
	}
	var docs []struct {
		ID     string `bson:"_id"`
		Status string `bson:"status"`
	}
	if err := cur.All(context.Background(), &docs); err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, d := range docs {
		out[d.ID] = d.Status
	}
	return out
}

// asMap reads a nested document the driver decoded as bson.D or bson.M.
func asMap(v any) bson.M {
	switch d := v.(type) {
	case bson.M:
		return d
	case bson.D:
		m := bson.M{}
		for _, e := range d {
			m[e.Key] = e.Value
		}
		return m
	}
	return nil
}

// A gateway that starts with an empty key pool (the legacy proxy never
// recovered from that) serves as soon as a key appears in MongoDB.
func TestEmptyPoolRecovers(t *testing.T) {
	ctx := context.Background()
	edb := env.DB.Client().Database("fproxy_empty")
	user := uniq(t, "u")
	key := "sk-trollllm-" + randHex(64)
	rememberKey(key)
	if err := seed.Insert(ctx, edb, seed.User{ID: user, APIKey: key, Role: "user", Active: true, Migration: true, CreditsNew: 10}); err != nil {
		t.Fatal(err)
	}
	if err := loadCaddy(caddyfile(configOpts{database: "fproxy_empty"})); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := loadCaddy(caddyfile(configOpts{})); err != nil {
			t.Fatalf("restoring the config: %v", err)
		}
	}()
	resp := post(t, chatURL+"/v1/messages", key, validBody("claude-sonnet-4-5")(), nil)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("empty pool: status %d %s, want the legacy 503", resp.StatusCode, raw)
	}
	checkErrorShape(t, "/v1/messages", raw, "", "", "api_error", "Service temporarily unavailable")

	if err := seed.Insert(ctx, edb, seed.UpstreamKey{ID: "late-key", APIKey: env.UpstreamKey, Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	resp = post(t, chatURL+"/v1/messages", key, validBody("claude-sonnet-4-5")(), nil)
	raw, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("after a key appeared: status %d %s", resp.StatusCode, raw)
	}
	if l := waitLogsIn(t, edb, user, 1); l[0]["trollKeyId"] != "openhands:late-key" {
		t.Errorf("billed on %v", l[0]["trollKeyId"])
	}
}
