package mongostore

import (
	"context"
	"errors"
	"fmt"
	"sync"
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

func insertSpare(t *testing.T, db *mongo.Database, id string, age time.Duration) {
	t.Helper()
	_, err := db.Collection("openhands_backup_keys").InsertOne(context.Background(), bson.D{
		{Key: "_id", Value: id}, {Key: "apiKey", Value: "sk-" + id}, {Key: "isUsed", Value: false},
		{Key: "activated", Value: false}, {Key: "createdAt", Value: time.Now().Add(-age)},
	})
	require.NoError(t, err)
}

func count(t *testing.T, db *mongo.Database, coll string, filter bson.D) int64 {
	t.Helper()
	n, err := db.Collection(coll).CountDocuments(context.Background(), filter)
	require.NoError(t, err)
	return n
}

func TestRotateUpstreamKey(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.UpstreamKey{ID: "old", APIKey: "sk-old", Status: "healthy"}))
	require.NoError(t, seed.Bind(ctx, db, "old"))
	_, err := s.RotateUpstreamKey(ctx, "old", "unauthorized")
	require.ErrorIs(t, err, billing.ErrNoSpareKey, "without spares")
	insertSpare(t, db, "spare-new", time.Minute)
	insertSpare(t, db, "spare-oldest", time.Hour)
	// The claim of the first attempt was released: a spare added later serves.
	newID, err := s.RotateUpstreamKey(ctx, "old", "unauthorized")
	require.NoError(t, err, "rotation")
	require.Equal(t, "spare-oldest", newID, "rotation: want the oldest spare")
	var k bson.M
	require.NoError(t, db.Collection("openhands_keys").FindOne(ctx, bson.D{{Key: "_id", Value: newID}}).Decode(&k))
	assert.Equal(t, "sk-spare-oldest", k["apiKey"], "new key %v", k)
	assert.Equal(t, "healthy", k["status"], "new key %v", k)
	assert.Equal(t, "old", k["replacedKey"], "new key %v", k)
	assert.Zero(t, count(t, db, "openhands_keys", bson.D{{Key: "_id", Value: "old"}}), "the failed key is still there")
	assert.Equal(t, int64(1), count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceId", Value: "old"}, {Key: "sourceCollection", Value: "openhands_keys"}}),
		"the failed key was not archived once")
	assert.Equal(t, int64(1), count(t, db, "openhands_bindings", bson.D{{Key: "openhandsKeyId", Value: newID}}), "bindings not repointed")
	assert.Zero(t, count(t, db, "openhands_bindings", bson.D{{Key: "openhandsKeyId", Value: "old"}}), "bindings not repointed")
	assert.Equal(t, int64(1), count(t, db, "openhands_backup_keys", bson.D{{Key: "_id", Value: newID}, {Key: "isUsed", Value: true}, {Key: "usedFor", Value: "old"}}),
		"spare not marked used")
	keys, err := s.LoadUpstreamKeys(ctx)
	if assert.NoError(t, err, "pool after rotation") && assert.Len(t, keys, 1, "pool after rotation") {
		assert.Equal(t, newID, keys[0].ID, "pool after rotation")
	}
	// Rotating it again is a no-op.
	again, err := s.RotateUpstreamKey(ctx, "old", "unauthorized")
	assert.NoError(t, err, "second rotation")
	assert.Empty(t, again, "second rotation")
}

// Two gateway instances (two clients, as two processes would have) race to
// rotate the same failed key many times over: exactly one spare is claimed,
// the key is archived once and replaced once.
func TestRotationRaceClaimsOneSpare(t *testing.T) {
	ctx := context.Background()
	stores, db := twoInstances(t)
	require.NoError(t, seed.Insert(ctx, db, seed.UpstreamKey{ID: "bad", APIKey: "sk-bad", Status: "healthy"}))
	require.NoError(t, seed.Bind(ctx, db, "bad"))
	for i := 0; i < 5; i++ {
		insertSpare(t, db, fmt.Sprintf("spare-%d", i), time.Duration(i)*time.Minute)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	results := map[string]int{}
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func(s *mongostore.Store) {
			defer wg.Done()
			id, err := s.RotateUpstreamKey(ctx, "bad", "budget_exceeded")
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil && id != "":
				results["rotated"]++
			case err == nil:
				results["already"]++
			case errors.Is(err, billing.ErrRotationInProgress):
				results["in_progress"]++
			default:
				results[err.Error()]++
			}
		}(stores[i%2])
	}
	wg.Wait()
	t.Logf("30 racing rotations: %v", results)
	assert.Equal(t, 1, results["rotated"], "results %v, want exactly one rotation", results)
	assert.Equal(t, 30, results["rotated"]+results["already"]+results["in_progress"], "results %v: errors other than in progress", results)
	assert.Equal(t, int64(1), count(t, db, "openhands_backup_keys", bson.D{{Key: "isUsed", Value: true}}), "spares used")
	assert.Equal(t, int64(1), count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceId", Value: "bad"}}), "times archived")
	assert.Equal(t, int64(1), count(t, db, "openhands_keys", bson.D{}), "keys after rotation")
}

// The 6-hour cleanup of used spares, run by two instances at once: each
// old used spare is archived once and deleted; fresh and unused ones stay.
func TestCleanUsedSpares(t *testing.T) {
	ctx := context.Background()
	stores, db := twoInstances(t)
	now := time.Now()
	for i, usedAt := range []time.Time{now.Add(-7 * time.Hour), now.Add(-8 * time.Hour), now.Add(-time.Hour)} {
		_, err := db.Collection("openhands_backup_keys").InsertOne(ctx, bson.D{{Key: "_id", Value: fmt.Sprintf("used-%d", i)},
			{Key: "apiKey", Value: "sk-x"}, {Key: "isUsed", Value: true}, {Key: "usedAt", Value: usedAt}})
		require.NoError(t, err)
	}
	insertSpare(t, db, "unused", 10*time.Hour)
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Add(1)
		go func(s *mongostore.Store) {
			defer wg.Done()
			_, err := s.CleanUsedSpares(ctx, now.Add(-6*time.Hour))
			assert.NoError(t, err)
		}(s)
	}
	wg.Wait()
	assert.Equal(t, int64(2), count(t, db, "openhands_backup_keys", bson.D{}), "spares left, want the recent used one and the unused one")
	assert.Equal(t, int64(2), count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceCollection", Value: "openhands_backup_keys"}}), "archived, want once each")
}

// twoInstances returns two stores over one database through two clients,
// as two gateway processes would have.
func twoInstances(t *testing.T) ([]*mongostore.Store, *mongo.Database) {
	t.Helper()
	return instances(t, 2)
}

// instances opens n stores on n connections to one new database: n gateway
// instances.
func instances(t *testing.T, n int) ([]*mongostore.Store, *mongo.Database) {
	t.Helper()
	d := testdb.StartForTest(t)
	var stores []*mongostore.Store
	var db *mongo.Database
	for i := 0; i < n; i++ {
		c, err := d.Connect(context.Background())
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
		db = c.Database("fproxy")
		stores = append(stores, mongostore.New(db))
	}
	return stores, db
}
