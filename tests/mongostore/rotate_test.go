package mongostore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

func insertSpare(t *testing.T, db *mongo.Database, id string, age time.Duration) {
	t.Helper()
	_, err := db.Collection("openhands_backup_keys").InsertOne(context.Background(), bson.D{
		{Key: "_id", Value: id}, {Key: "apiKey", Value: "sk-" + id}, {Key: "isUsed", Value: false},
		{Key: "activated", Value: false}, {Key: "createdAt", Value: time.Now().Add(-age)},
	})
	if err != nil {
		t.Fatal(err)
	}
}

func count(t *testing.T, db *mongo.Database, coll string, filter bson.D) int64 {
	t.Helper()
	n, err := db.Collection(coll).CountDocuments(context.Background(), filter)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestRotateUpstreamKey(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.UpstreamKey{ID: "old", APIKey: "sk-old", Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	if err := seed.Bind(ctx, db, "old"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.RotateUpstreamKey(ctx, "old", "unauthorized"); !errors.Is(err, billing.ErrNoSpareKey) {
		t.Fatalf("without spares: err = %v", err)
	}
	insertSpare(t, db, "spare-new", time.Minute)
	insertSpare(t, db, "spare-oldest", time.Hour)
	// The claim of the first attempt was released: a spare added later serves.
	newID, err := s.RotateUpstreamKey(ctx, "old", "unauthorized")
	if err != nil || newID != "spare-oldest" {
		t.Fatalf("rotation: %q %v, want the oldest spare", newID, err)
	}
	var k bson.M
	if err := db.Collection("openhands_keys").FindOne(ctx, bson.D{{Key: "_id", Value: newID}}).Decode(&k); err != nil {
		t.Fatal(err)
	}
	if k["apiKey"] != "sk-spare-oldest" || k["status"] != "healthy" || k["replacedKey"] != "old" {
		t.Errorf("new key %v", k)
	}
	if count(t, db, "openhands_keys", bson.D{{Key: "_id", Value: "old"}}) != 0 {
		t.Error("the failed key is still there")
	}
	if count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceId", Value: "old"}, {Key: "sourceCollection", Value: "openhands_keys"}}) != 1 {
		t.Error("the failed key was not archived once")
	}
	if count(t, db, "openhands_bindings", bson.D{{Key: "openhandsKeyId", Value: newID}}) != 1 || count(t, db, "openhands_bindings", bson.D{{Key: "openhandsKeyId", Value: "old"}}) != 0 {
		t.Error("bindings not repointed")
	}
	if count(t, db, "openhands_backup_keys", bson.D{{Key: "_id", Value: newID}, {Key: "isUsed", Value: true}, {Key: "usedFor", Value: "old"}}) != 1 {
		t.Error("spare not marked used")
	}
	keys, err := s.LoadUpstreamKeys(ctx)
	if err != nil || len(keys) != 1 || keys[0].ID != newID {
		t.Errorf("pool after rotation: %+v %v", keys, err)
	}
	// Rotating it again is a no-op.
	if again, err := s.RotateUpstreamKey(ctx, "old", "unauthorized"); err != nil || again != "" {
		t.Errorf("second rotation: %q %v", again, err)
	}
}

// Two gateway instances (two clients, as two processes would have) race to
// rotate the same failed key many times over: exactly one spare is claimed,
// the key is archived once and replaced once.
func TestRotationRaceClaimsOneSpare(t *testing.T) {
	ctx := context.Background()
	stores, db := twoInstances(t)
	if err := seed.Insert(ctx, db, seed.UpstreamKey{ID: "bad", APIKey: "sk-bad", Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	if err := seed.Bind(ctx, db, "bad"); err != nil {
		t.Fatal(err)
	}
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
	if results["rotated"] != 1 || results["rotated"]+results["already"]+results["in_progress"] != 30 {
		t.Errorf("results %v, want exactly one rotation", results)
	}
	if n := count(t, db, "openhands_backup_keys", bson.D{{Key: "isUsed", Value: true}}); n != 1 {
		t.Errorf("%d spares used, want 1", n)
	}
	if n := count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceId", Value: "bad"}}); n != 1 {
		t.Errorf("archived %d times, want 1", n)
	}
	if n := count(t, db, "openhands_keys", bson.D{}); n != 1 {
		t.Errorf("%d keys after rotation, want 1", n)
	}
}

// The 6-hour cleanup of used spares, run by two instances at once: each
// old used spare is archived once and deleted; fresh and unused ones stay.
func TestCleanUsedSpares(t *testing.T) {
	ctx := context.Background()
	stores, db := twoInstances(t)
	now := time.Now()
	for i, usedAt := range []time.Time{now.Add(-7 * time.Hour), now.Add(-8 * time.Hour), now.Add(-time.Hour)} {
		if _, err := db.Collection("openhands_backup_keys").InsertOne(ctx, bson.D{{Key: "_id", Value: fmt.Sprintf("used-%d", i)},
			{Key: "apiKey", Value: "sk-x"}, {Key: "isUsed", Value: true}, {Key: "usedAt", Value: usedAt}}); err != nil {
			t.Fatal(err)
		}
	}
	insertSpare(t, db, "unused", 10*time.Hour)
	var wg sync.WaitGroup
	for _, s := range stores {
		wg.Add(1)
		go func(s *mongostore.Store) {
			defer wg.Done()
			if _, err := s.CleanUsedSpares(ctx, now.Add(-6*time.Hour)); err != nil {
				t.Error(err)
			}
		}(s)
	}
	wg.Wait()
	if n := count(t, db, "openhands_backup_keys", bson.D{}); n != 2 {
		t.Errorf("%d spares left, want the recent used one and the unused one", n)
	}
	if n := count(t, db, "deleted_keys_archive", bson.D{{Key: "sourceCollection", Value: "openhands_backup_keys"}}); n != 2 {
		t.Errorf("%d archived, want 2 (once each)", n)
	}
}

// twoInstances returns two stores over one database through two clients,
// as two gateway processes would have.
func twoInstances(t *testing.T) ([]*mongostore.Store, *mongo.Database) {
	t.Helper()
	d := testdb.StartForTest(t)
	var stores []*mongostore.Store
	var db *mongo.Database
	for i := 0; i < 2; i++ {
		c, err := d.Connect(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
		db = c.Database("fproxy")
		stores = append(stores, mongostore.New(db))
	}
	return stores, db
}
