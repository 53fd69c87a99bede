// Package mongostore tests the MongoDB store of the plugin against a real
// wire-protocol database (embedded FerretDB) with the official driver.
package mongostore

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

func open(t *testing.T) (*mongostore.Store, *mongo.Database) {
	t.Helper()
	d := testdb.StartForTest(t)
	c, err := d.Connect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	db := c.Database("fproxy")
	return mongostore.New(db), db
}

func TestAuthenticate(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	past, future := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(seed.Insert(ctx, db,
		seed.User{ID: "alice", APIKey: "sk-trollllm-alice", Role: "user", Active: true, Migration: true},
		seed.User{ID: "old", APIKey: "sk-trollllm-old", Role: "user", Active: true, Migration: false},
		seed.User{ID: "boss", APIKey: "sk-trollllm-boss", Role: "Admin ", Active: true, Migration: false},
		seed.User{ID: "gone", APIKey: "sk-trollllm-gone", Role: "user", Active: false, Migration: true},
		seed.User{ID: "late", APIKey: "sk-trollllm-late", Role: "user", Active: true, Migration: true, ExpiresAt: &past},
		seed.User{ID: "fresh", APIKey: "sk-trollllm-fresh", Role: "user", Active: true, Migration: true, ExpiresAt: &future},
		seed.UserKey{Key: "sk-troll-ok", User: "alice", Active: true},
		seed.UserKey{Key: "sk-troll-revoked", User: "alice", Active: false},
		seed.UserKey{Key: "sk-troll-expired", User: "alice", Active: true, ExpiresAt: &past},
		seed.UserKey{Key: "sk-troll-of-old", User: "old", Active: true},
		seed.UserKey{Key: "sk-troll-orphan", User: "nobody", Active: true},
		seed.UserKey{Key: "sk-troll-of-gone", User: "gone", Active: true},
	))
	// A user_keys document without isActive (the backend schema defaults it to true).
	_, err := db.Collection("user_keys").InsertOne(ctx, bson.D{{Key: "_id", Value: "sk-troll-noflag"}, {Key: "name", Value: "alice"}})
	must(err)

	tests := []struct {
		key        string
		user       string
		inUserKeys bool
		reason     billing.AuthFailure
	}{
		{key: "sk-trollllm-alice", user: "alice"},
		{key: "sk-trollllm-boss", user: "boss"}, // admin bypasses migration, role trimmed and lower-cased
		{key: "sk-trollllm-fresh", user: "fresh"},
		{key: "sk-troll-ok", user: "alice", inUserKeys: true},
		{key: "sk-troll-noflag", user: "alice", inUserKeys: true},
		{key: "sk-troll-orphan", user: "nobody", inUserKeys: true}, // as the legacy: billing then finds no user
		{key: "sk-trollllm-unknown", reason: billing.AuthInvalid},
		{key: "sk-trollllm-old", reason: billing.AuthMigrationRequired},
		{key: "sk-troll-of-old", reason: billing.AuthMigrationRequired},
		{key: "sk-trollllm-gone", reason: billing.AuthRevoked},
		{key: "sk-troll-revoked", reason: billing.AuthRevoked},
		{key: "sk-troll-of-gone", reason: billing.AuthRevoked}, // an active key of a deactivated user
		{key: "sk-trollllm-late", reason: billing.AuthExpired},
		{key: "sk-troll-expired", reason: billing.AuthExpired},
	}
	for _, tt := range tests {
		p, err := s.Authenticate(ctx, tt.key)
		var ae *billing.AuthError
		switch {
		case tt.reason != 0:
			if !errors.As(err, &ae) || ae.Reason != tt.reason {
				t.Errorf("%s: err = %v, want reason %d", tt.key, err, tt.reason)
			}
		case err != nil:
			t.Errorf("%s: %v", tt.key, err)
		case p.User != tt.user || p.InUserKeys != tt.inUserKeys:
			t.Errorf("%s: got %+v", tt.key, p)
		}
	}
}

func TestLoadUpstreamKeysFollowsBindings(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(seed.Insert(ctx, db,
		seed.UpstreamKey{ID: "k1", APIKey: "a1", Status: "healthy"},
		seed.UpstreamKey{ID: "k2", APIKey: "a2", Status: "rate_limited"},
		seed.UpstreamKey{ID: "k3", APIKey: "a3", Status: "exhausted"},
		seed.UpstreamKey{ID: "k4", APIKey: "a4", Status: "healthy"},
	))
	ids := func() []string {
		keys, err := s.LoadUpstreamKeys(ctx)
		must(err)
		var out []string
		for _, k := range keys {
			out = append(out, k.ID)
		}
		return out
	}
	// No active binding: every key, whatever its status (the legacy rule).
	if got := ids(); len(got) != 4 {
		t.Errorf("without bindings: %v, want all 4 keys", got)
	}
	must(seed.Bind(ctx, db, "k1"))
	must(seed.Bind(ctx, db, "k2"))
	must(seed.Bind(ctx, db, "k3"))
	// Bound keys only, without need_refresh/exhausted/error.
	if got := ids(); len(got) != 2 || got[0] != "k1" || got[1] != "k2" {
		t.Errorf("with bindings: %v, want [k1 k2]", got)
	}
	_, err := db.Collection("openhands_bindings").UpdateMany(ctx, bson.D{{Key: "openhandsKeyId", Value: "k1"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "isActive", Value: false}}}})
	must(err)
	if got := ids(); len(got) != 1 || got[0] != "k2" {
		t.Errorf("after deactivating k1's binding: %v, want [k2]", got)
	}
}
