package e2e

import (
	"bytes"
	"context"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/reconcile"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// TestReconcileAfterEverything runs last (files run in name order): after
// every other test of the package (refusals, failover, reloads, outages,
// disconnects, shortfalls, concurrent streams) the request logs, the
// gateway's ledger counters and the balances agree, with no hold left. Then
// tampering is caught: a balance moved by hand, and a log row deleted.
func TestReconcileAfterEverything(t *testing.T) {
	ctx := context.Background()
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
	calls[0].do(t, chatURL, key, "claude-sonnet-4-5", uniq(t, "req"))
	waitSettled(t, u.ID, 1, "creditsNew") // its receipt dropped too

	rep := runReconcile(t, reconcile.Options{RecheckDelay: time.Second})
	if !rep.OK() || rep.HoldsOutstanding != 0 || rep.RowsChecked == 0 {
		t.Fatalf("drift after the suite: %d items, %d holds outstanding, %d rows", len(rep.Drift), rep.HoldsOutstanding, rep.RowsChecked)
	}
	base := rep.Baseline()

	// A balance moved by something that is not the gateway.
	if _, err := db.Collection("usersNew").UpdateOne(ctx, bson.D{{Key: "_id", Value: u.ID}},
		bson.D{{Key: "$inc", Value: bson.D{{Key: "creditsNew", Value: -0.01}}}}); err != nil {
		t.Fatal(err)
	}
	rep = runReconcile(t, reconcile.Options{Baseline: base})
	if len(rep.Drift) != 1 || rep.Drift[0].Kind != reconcile.KindExternalDebit || rep.Drift[0].User != u.ID || rep.Drift[0].Amount != -billing.NanoFromUSD(0.01) {
		t.Fatalf("tampered balance: drift %+v", rep.Drift)
	}

	// A charge whose log row is gone.
	if _, err := db.Collection("request_logs").DeleteOne(ctx, bson.D{{Key: "userId", Value: u.ID}}); err != nil {
		t.Fatal(err)
	}
	rep = runReconcile(t, reconcile.Options{})
	found := false
	for _, d := range rep.Drift {
		if d.Kind == reconcile.KindChargeWithoutLog && d.User == u.ID {
			found = true
		}
	}
	if !found {
		t.Fatalf("deleted log row not reported: %+v", rep.Drift)
	}
}

func runReconcile(t *testing.T, opts reconcile.Options) *reconcile.Report {
	t.Helper()
	rep, err := reconcile.Run(context.Background(), db, opts)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	_ = rep.WriteText(&buf)
	t.Logf("reconcile:\n%s", buf.String())
	return rep
}
