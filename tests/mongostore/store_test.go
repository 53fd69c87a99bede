// Package mongostore tests the MongoDB store of the plugin against a real
// wire-protocol database (embedded FerretDB) with the official driver.
package mongostore

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

func open(t *testing.T) (*mongostore.Store, *mongo.Database) {
	t.Helper()
	d := testdb.StartForTest(t)
	c, err := d.Connect(context.Background())
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	db := c.Database("fproxy")
	return mongostore.New(db), db
}

func TestAuthenticate(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	past, future := time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	require.NoError(t, seed.Insert(ctx, db,
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
	require.NoError(t, err)

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
		if tt.reason != 0 {
			var ae *billing.AuthError
			if assert.ErrorAs(t, err, &ae, tt.key) {
				assert.Equal(t, tt.reason, ae.Reason, tt.key)
			}
			continue
		}
		if assert.NoError(t, err, tt.key) {
			assert.Equal(t, tt.user, p.User, tt.key)
			assert.Equal(t, tt.inUserKeys, p.InUserKeys, tt.key)
		}
	}
}

func TestLoadUpstreamKeysFollowsBindings(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db,
		seed.UpstreamKey{ID: "k1", APIKey: "a1", Status: "healthy"},
		seed.UpstreamKey{ID: "k2", APIKey: "a2", Status: "rate_limited"},
		seed.UpstreamKey{ID: "k3", APIKey: "a3", Status: "exhausted"},
		seed.UpstreamKey{ID: "k4", APIKey: "a4", Status: "healthy"},
	))
	ids := func() []string {
		keys, err := s.LoadUpstreamKeys(ctx)
		require.NoError(t, err)
		var out []string
		for _, k := range keys {
			out = append(out, k.ID)
		}
		return out
	}
	// No active binding: every key, whatever its status (the legacy rule).
	assert.Len(t, ids(), 4, "without bindings: want all 4 keys")
	require.NoError(t, seed.Bind(ctx, db, "k1"))
	require.NoError(t, seed.Bind(ctx, db, "k2"))
	require.NoError(t, seed.Bind(ctx, db, "k3"))
	// Bound keys only, without need_refresh/exhausted/error.
	assert.Equal(t, []string{"k1", "k2"}, ids(), "with bindings")
	_, err := db.Collection("openhands_bindings").UpdateMany(ctx, bson.D{{Key: "openhandsKeyId", Value: "k1"}}, bson.D{{Key: "$set", Value: bson.D{{Key: "isActive", Value: false}}}})
	require.NoError(t, err)
	assert.Equal(t, []string{"k2"}, ids(), "after deactivating k1's binding")
}
