package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// dbcostMain measures what one user-document write costs the test database
// (FerretDB on PostgreSQL), for the write shapes the gateway issues, so the
// end-to-end figures can be read against the database's own limit:
//
//   - a bare conditional $inc on a user document (the figure the
//     performance issue quotes for this database);
//   - a hold then its settlement, through the real store, on a user with no
//     other hold;
//   - the same on a user document that carries 20 other outstanding holds
//     (what a settlement backlog makes the documents look like), packed as
//     the gateway writes them, and as sub-documents.
//
// Each worker has its own user, so nothing contends for a document.
func dbcostMain(args []string) error {
	fs := flag.NewFlagSet("dbcost", flag.ExitOnError)
	pgBin := fs.String("pg-bin", "", "folder of the PostgreSQL server binaries")
	dur := fs.Duration("duration", 5*time.Second, "duration of each shape")
	conc := fs.Int("concurrency", 8, "concurrent writers (one user each)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "llm-billing-dbcost-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	bin, err := pgBinDir(*pgBin)
	if err != nil {
		return err
	}
	pg, err := startPostgres(bin, filepath.Join(work, "pg"), nil)
	if err != nil {
		return err
	}
	defer pg.stop()
	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: "127.0.0.1:0"}, Handler: "postgresql", PostgreSQLURL: pg.url(),
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})),
	})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = f.Run(ctx) }()
	client, err := mongo.Connect(options.Client().ApplyURI(f.MongoDBURI()))
	if err != nil {
		return err
	}
	defer client.Disconnect(context.Background())
	db := client.Database("dbcost")
	store := mongostore.New(db)
	plan, _ := billing.ParseCreditPlan([]string{"creditsNew"})
	users := db.Collection(mongostore.CollUsers)

	mkUsers := func(prefix string) ([]string, error) {
		var ids []string
		for i := 0; i < *conc; i++ {
			id := fmt.Sprintf("%s-%d", prefix, i)
			ids = append(ids, id)
			if err := seed.Insert(ctx, db, seed.User{ID: id, Active: true, Migration: true, Role: "user", CreditsNew: 1e6,
				APIKey: fmt.Sprintf("sk-trollllm-%s-%064d", prefix, i)}); err != nil {
				return nil, err
			}
		}
		return ids, nil
	}
	var seq atomic.Int64
	hold := func(user string) (billing.Hold, error) {
		now := time.Now()
		rid := fmt.Sprintf("r%d", seq.Add(1))
		return store.Reserve(ctx, billing.HoldRequest{RequestID: rid, User: user, Plan: plan, Want: 14_705_340, Min: 90_000,
			Input: 90_000, Owner: "dbcost/000000000000", At: now, Expires: now.Add(time.Hour), LogID: billing.NewLogID(now),
			Model: "claude-sonnet-4-5-20250929", KeyID: "sk-troll...8c70"})
	}
	run := func(name string, writesPerOp int, op func(user string) error, ids []string) error {
		var n atomic.Int64
		var firstErr atomic.Value
		var wg sync.WaitGroup
		deadline := time.Now().Add(*dur)
		for _, u := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for time.Now().Before(deadline) {
					if err := op(u); err != nil {
						firstErr.CompareAndSwap(nil, err)
						return
					}
					n.Add(1)
				}
			}()
		}
		wg.Wait()
		if e := firstErr.Load(); e != nil {
			return e.(error)
		}
		ops := float64(n.Load()) / dur.Seconds()
		fmt.Printf("| %s | %.0f | %.0f |\n", name, ops, ops*float64(writesPerOp))
		return nil
	}

	fmt.Printf("FerretDB v1.24 on PostgreSQL, %d writers (one user each), %s per shape\n\n", *conc, *dur)
	fmt.Println("| shape | operations/s | user-document writes/s |")
	fmt.Println("|---|---:|---:|")
	ids, err := mkUsers("inc")
	if err != nil {
		return err
	}
	if err := run("bare conditional $inc", 1, func(u string) error {
		_, err := users.UpdateOne(ctx, bson.D{{Key: "_id", Value: u}, {Key: "creditsNew", Value: bson.D{{Key: "$gte", Value: 0.01}}}},
			bson.D{{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -0.01}}}})
		return err
	}, ids); err != nil {
		return err
	}
	holdSettle := func(u string) error {
		h, err := hold(u)
		if err != nil {
			return err
		}
		rc, _, err := store.Settle(ctx, billing.SettleRequest{Hold: h, Cost: 450_840, By: billing.SettledByRequest})
		if err != nil {
			return err
		}
		return store.ClearReceipts(ctx, u, []string{rc.RequestID})
	}
	if ids, err = mkUsers("gw"); err != nil {
		return err
	}
	if err := run("hold + settle + receipt drop, no other hold", 3, holdSettle, ids); err != nil {
		return err
	}
	if ids, err = mkUsers("backlog"); err != nil {
		return err
	}
	for _, u := range ids {
		for i := 0; i < 20; i++ {
			if _, err := hold(u); err != nil {
				return err
			}
		}
	}
	if err := run("hold + settle + receipt drop, 20 other holds in the document (packed, as written)", 3, holdSettle, ids); err != nil {
		return err
	}
	// The same number of other holds as sub-documents of 9 fields, the
	// layout the packed strings replaced.
	if ids, err = mkUsers("subdoc"); err != nil {
		return err
	}
	for _, u := range ids {
		set := bson.D{}
		for i := 0; i < 20; i++ {
			set = append(set, bson.E{Key: fmt.Sprintf("llmHolds.s%02d-7f0c6c5e-3b1a-4f8e-9d2a-6a1b2c3d4e", i), Value: bson.D{
				{Key: "amt", Value: bson.A{int64(14705340)}}, {Key: "fields", Value: bson.A{"creditsNew"}}, {Key: "input", Value: int64(90000)},
				{Key: "at", Value: time.Now()}, {Key: "exp", Value: time.Now().Add(time.Hour)}, {Key: "owner", Value: "0b7c1f0e-9f5a-4b7d-8a31-2f7c9d1e6a40/5f2a9c1d7e3b"},
				{Key: "log", Value: bson.NewObjectID()}, {Key: "model", Value: "claude-sonnet-4-5-20250929"}, {Key: "key", Value: "sk-troll...8c70"},
			}})
		}
		if _, err := users.UpdateOne(ctx, bson.D{{Key: "_id", Value: u}}, bson.D{{Key: "$set", Value: set}}); err != nil {
			return err
		}
	}
	return run("hold + settle + receipt drop, 20 other holds as sub-documents (the earlier layout)", 3, holdSettle, ids)
}
