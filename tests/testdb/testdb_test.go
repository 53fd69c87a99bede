package testdb

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

func connect(t *testing.T, db *DB) *mongo.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := db.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	return c
}

func TestDatabaseOperations(t *testing.T) {
	db := StartForTest(t)
	if !strings.HasPrefix(db.URI(), "mongodb://127.0.0.1:") || !strings.HasSuffix(db.URI(), "/") {
		t.Errorf("URI = %q, want mongodb://127.0.0.1:<port>/", db.URI())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	coll := connect(t, db).Database("fproxy").Collection("usersNew")

	if _, err := coll.InsertOne(ctx, bson.D{{Key: "_id", Value: "alice"}, {Key: "creditsNew", Value: 1.5}, {Key: "creditsNewUsed", Value: 0.0}}); err != nil {
		t.Fatalf("insert: %v", err)
	}

	t.Run("conditional inc", func(t *testing.T) {
		deduct := func(cost float64) int64 {
			res, err := coll.UpdateOne(ctx,
				bson.D{{Key: "_id", Value: "alice"}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: cost}}}},
				bson.D{{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -cost}, {Key: "creditsNewUsed", Value: cost}}}})
			if err != nil {
				t.Fatalf("update: %v", err)
			}
			return res.ModifiedCount
		}
		if n := deduct(1.0); n != 1 {
			t.Errorf("deduct 1.0 from 1.5 modified %d, want 1", n)
		}
		if n := deduct(1.0); n != 0 {
			t.Errorf("deduct 1.0 from 0.5 modified %d, want 0 (the $gte filter must refuse)", n)
		}
		var doc struct {
			CreditsNew     float64 `bson:"creditsNew"`
			CreditsNewUsed float64 `bson:"creditsNewUsed"`
		}
		if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: "alice"}}).Decode(&doc); err != nil {
			t.Fatal(err)
		}
		if doc.CreditsNew != 0.5 || doc.CreditsNewUsed != 1.0 {
			t.Errorf("balances = %+v, want 0.5 / 1.0", doc)
		}
	})

	t.Run("or filter", func(t *testing.T) {
		n, err := coll.CountDocuments(ctx, bson.D{{Key: "$or", Value: bson.A{
			bson.D{{Key: "_id", Value: "nobody"}},
			bson.D{{Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 0.5}}}},
		}}})
		if err != nil || n != 1 {
			t.Errorf("count = %d, %v; want 1", n, err)
		}
	})

	t.Run("find one and update", func(t *testing.T) {
		var after struct {
			CreditsNew float64 `bson:"creditsNew"`
			Note       string  `bson:"note"`
		}
		err := coll.FindOneAndUpdate(ctx,
			bson.D{{Key: "_id", Value: "alice"}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 0.25}}}},
			bson.D{
				{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -0.25}}},
				{Key: "$set", Value: bson.D{{Key: "note", Value: "held"}}},
			},
			options.FindOneAndUpdate().SetReturnDocument(options.After)).Decode(&after)
		if err != nil {
			t.Fatal(err)
		}
		if after.CreditsNew != 0.25 || after.Note != "held" {
			t.Errorf("after = %+v, want 0.25 held", after)
		}
		err = coll.FindOneAndUpdate(ctx,
			bson.D{{Key: "_id", Value: "alice"}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 100}}}},
			bson.D{{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -100}}}}).Err()
		if !errors.Is(err, mongo.ErrNoDocuments) {
			t.Errorf("unmatched findOneAndUpdate: %v, want ErrNoDocuments", err)
		}
	})

	t.Run("unique index", func(t *testing.T) {
		keys := coll.Database().Collection("holds")
		_, err := keys.Indexes().CreateOne(ctx, mongo.IndexModel{
			Keys:    bson.D{{Key: "requestId", Value: 1}},
			Options: options.Index().SetUnique(true),
		})
		if err != nil {
			t.Fatalf("create index: %v", err)
		}
		if _, err := keys.InsertOne(ctx, bson.D{{Key: "requestId", Value: "r1"}}); err != nil {
			t.Fatal(err)
		}
		_, err = keys.InsertOne(ctx, bson.D{{Key: "requestId", Value: "r1"}})
		if !mongo.IsDuplicateKeyError(err) {
			t.Errorf("second insert: %v, want a duplicate key error", err)
		}
	})

	t.Run("bulk write", func(t *testing.T) {
		logs := coll.Database().Collection("request_logs")
		res, err := logs.BulkWrite(ctx, []mongo.WriteModel{
			mongo.NewInsertOneModel().SetDocument(bson.D{{Key: "n", Value: 1}}),
			mongo.NewInsertOneModel().SetDocument(bson.D{{Key: "n", Value: 2}}),
			mongo.NewUpdateOneModel().SetFilter(bson.D{{Key: "n", Value: 1}}).SetUpdate(bson.D{{Key: "$inc", Value: bson.D{{Key: "n", Value: 10}}}}),
		})
		if err != nil {
			t.Fatal(err)
		}
		if res.InsertedCount != 2 || res.ModifiedCount != 1 {
			t.Errorf("bulk result = %+v", res)
		}
	})
}

func TestCloseStopsAndDataPersists(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	db, err := Start(ctx, dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	c, err := db.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Database("fproxy").Collection("k").InsertOne(ctx, bson.D{{Key: "_id", Value: "x"}}); err != nil {
		t.Fatal(err)
	}
	uri := db.URI()
	db.Close()
	db.Close() // idempotent

	pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
	err = c.Ping(pctx, nil)
	pcancel()
	_ = c.Disconnect(ctx)
	if err == nil {
		t.Errorf("ping after Close succeeded on %s", uri)
	}

	db2, err := Start(ctx, dir, nil)
	if err != nil {
		t.Fatalf("restart on the same directory: %v", err)
	}
	defer db2.Close()
	c2, err := db2.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c2.Disconnect(ctx) }()
	n, err := c2.Database("fproxy").Collection("k").CountDocuments(ctx, bson.D{})
	if err != nil || n != 1 {
		t.Errorf("after restart: %d documents, %v; want 1", n, err)
	}
}

// TestParallelStart starts two databases at once (run with -race).
func TestParallelStart(t *testing.T) {
	var wg sync.WaitGroup
	uris := make([]string, 2)
	for i := range uris {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			db, err := Start(ctx, t.TempDir(), nil)
			if err != nil {
				t.Error(err)
				return
			}
			defer db.Close()
			uris[i] = db.URI()
		})
	}
	wg.Wait()
	if uris[0] == uris[1] {
		t.Errorf("two databases share %s", uris[0])
	}
}

func TestStartErrors(t *testing.T) {
	if _, err := Start(context.Background(), "", nil); err == nil {
		t.Error("Start with an empty directory succeeded")
	}
}
