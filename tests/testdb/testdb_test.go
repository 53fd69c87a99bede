package testdb

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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

// TestStopRestart stops the database under a connected client of the
// official driver and restarts it: the same client gets errors while it is
// down, then reads and writes again without reconnecting by hand.
func TestStopRestart(t *testing.T) {
	db := StartForTest(t)
	uri, addr := db.URI(), db.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	client := connect(t, db)
	coll := client.Database("fproxy").Collection("usersNew")
	if _, err := coll.InsertOne(ctx, bson.D{{Key: "_id", Value: "alice"}, {Key: "creditsNew", Value: 2.5}}); err != nil {
		t.Fatal(err)
	}

	if lo, hi, ok := localPortRange(); ok {
		_, ps, _ := net.SplitHostPort(addr)
		if port, _ := strconv.Atoi(ps); port >= lo && port <= hi {
			t.Errorf("port %d is in the ephemeral range %d-%d", port, lo, hi)
		}
	}

	// A raw connection open across Stop must be cut, not left to serve.
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()

	start := time.Now()
	db.Stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Stop took %v; FerretDB's 3 s grace for open connections should not apply", d)
	}
	db.Stop() // a no-op when stopped

	_ = raw.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := raw.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read on a connection open across Stop: %v, want EOF or a reset", err)
	}
	if c, err := net.DialTimeout("tcp", addr, 2*time.Second); err == nil {
		c.Close()
		t.Errorf("dial %s succeeded while stopped", addr)
	}

	// The pooled connection is dead and the server gone: a short
	// operation fails when its context ends.
	for _, op := range []struct {
		name string
		do   func(context.Context) error
	}{
		{"find", func(ctx context.Context) error { return coll.FindOne(ctx, bson.D{{Key: "_id", Value: "alice"}}).Err() }},
		{"insert", func(ctx context.Context) error {
			_, err := coll.InsertOne(ctx, bson.D{{Key: "_id", Value: "lost"}})
			return err
		}},
	} {
		octx, ocancel := context.WithTimeout(ctx, time.Second)
		start := time.Now()
		err := op.do(octx)
		ocancel()
		if err == nil {
			t.Errorf("%s while stopped succeeded", op.name)
		} else {
			t.Logf("%s while stopped: %v (after %v)", op.name, err, time.Since(start).Round(time.Millisecond))
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s while stopped took %v with a 1 s context", op.name, d)
		}
	}

	start = time.Now()
	if err := db.Restart(ctx); err != nil {
		t.Fatalf("restart: %v", err)
	}
	t.Logf("restart took %v", time.Since(start).Round(time.Millisecond))
	if db.URI() != uri {
		t.Errorf("URI after restart = %s, want %s", db.URI(), uri)
	}
	if err := db.Restart(ctx); err == nil {
		t.Error("Restart of a running database succeeded")
	}

	// The same client, reconnecting by itself.
	start = time.Now()
	var doc struct {
		CreditsNew float64 `bson:"creditsNew"`
	}
	if err := coll.FindOne(ctx, bson.D{{Key: "_id", Value: "alice"}}).Decode(&doc); err != nil {
		t.Fatalf("find after restart: %v", err)
	}
	t.Logf("first read after restart took %v", time.Since(start).Round(time.Millisecond))
	if doc.CreditsNew != 2.5 {
		t.Errorf("creditsNew after restart = %v, want 2.5", doc.CreditsNew)
	}
	if _, err := coll.InsertOne(ctx, bson.D{{Key: "_id", Value: "bob"}}); err != nil {
		t.Fatalf("insert after restart: %v", err)
	}
	if n, err := coll.CountDocuments(ctx, bson.D{}); err != nil || n != 2 {
		t.Errorf("after restart: %d documents, %v; want 2 (alice, bob)", n, err)
	}

	// Close works when stopped, and Restart after Close fails.
	db.Stop()
	db.Close()
	db.Close()
	if err := db.Restart(ctx); err == nil {
		t.Error("Restart of a closed database succeeded")
	}
}

// TestStopRestartUnderLoad runs writers through Stop and Restart (run with
// -race): every write either fails or lands, and writes succeed again
// after the restart.
func TestStopRestartUnderLoad(t *testing.T) {
	db := StartForTest(t)
	coll := connect(t, db).Database("fproxy").Collection("load")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var (
		stop     atomic.Bool
		wg       sync.WaitGroup
		mu       sync.Mutex
		acked    = map[string]bool{}
		failures int
	)
	for w := range 4 {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				id := fmt.Sprintf("w%d-%d", w, i)
				octx, ocancel := context.WithTimeout(ctx, 300*time.Millisecond)
				_, err := coll.InsertOne(octx, bson.D{{Key: "_id", Value: id}})
				ocancel()
				mu.Lock()
				if err == nil {
					acked[id] = true
				} else {
					failures++
				}
				mu.Unlock()
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	db.Stop()
	time.Sleep(time.Second)
	if err := db.Restart(ctx); err != nil {
		stop.Store(true)
		wg.Wait()
		t.Fatal(err)
	}
	mu.Lock()
	before := len(acked)
	mu.Unlock()
	time.Sleep(1500 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	if failures == 0 {
		t.Error("no write failed while the database was stopped")
	}
	if len(acked) == before {
		t.Error("no write succeeded after the restart")
	}
	cur, err := coll.Find(ctx, bson.D{})
	if err != nil {
		t.Fatal(err)
	}
	var docs []struct {
		ID string `bson:"_id"`
	}
	if err := cur.All(ctx, &docs); err != nil {
		t.Fatal(err)
	}
	stored := map[string]bool{}
	for _, d := range docs {
		stored[d.ID] = true
	}
	for id := range acked {
		if !stored[id] {
			t.Errorf("acknowledged write %s is missing after the restart", id)
		}
	}
	t.Logf("%d writes acknowledged (%d before the restart returned), %d failed, %d stored", len(acked), before, failures, len(stored))
}

// TestRestartPortTaken: Restart waits for a port another process holds,
// and fails if it is not given back in time.
func TestRestartPortTaken(t *testing.T) {
	defer func(d time.Duration) { rebindWait = d }(rebindWait)
	rebindWait = 500 * time.Millisecond
	db := StartForTest(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	db.Stop()

	squatter, err := net.Listen("tcp", db.Addr())
	if err != nil {
		t.Fatal(err)
	}
	err = db.Restart(ctx)
	if !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("Restart on a taken port: %v, want EADDRINUSE", err)
	}

	rebindWait = 10 * time.Second
	time.AfterFunc(300*time.Millisecond, func() { squatter.Close() })
	if err := db.Restart(ctx); err != nil {
		t.Fatalf("Restart once the port is given back: %v", err)
	}
	c := connect(t, db)
	if err := c.Ping(ctx, nil); err != nil {
		t.Error(err)
	}
}
