package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// checkFree fails with a message naming the flag when addr cannot be
// listened on. The probe listens without SO_REUSEPORT, so an address a
// running Caddy (or a second devstack) holds with SO_REUSEPORT is refused
// here instead of being silently shared.
func checkFree(addr, flagName string) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("address %s is already in use (another devstack or Caddy?); choose another with -%s: %w", addr, flagName, err)
	}
	return ln.Close()
}

// freeAddr returns a localhost address with a port that was free a moment
// ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// logRow is the part of a request_logs document the per-request line shows.
type logRow struct {
	ID           bson.ObjectID `bson:"_id"`
	CreatedAt    time.Time     `bson:"createdAt"`
	Endpoint     string        `bson:"endpoint"`
	Model        string        `bson:"model"`
	InputTokens  int64         `bson:"inputTokens"`
	OutputTokens int64         `bson:"outputTokens"`
	CostNano     int64         `bson:"costNano"`
	CreditField  string        `bson:"creditField"`
	UserID       string        `bson:"userId"`
	UsageSource  string        `bson:"usageSource"`
}

// formatRow renders one request log as the line devstack prints.
func formatRow(r logRow, sites map[string]string) string {
	site := sites[r.CreditField]
	if site == "" {
		site = "?"
	}
	return fmt.Sprintf("%s %-5s %-22s %-24s in %d out %d  $%.9f  pool %s  user %s  (%s)",
		r.CreatedAt.Local().Format("15:04:05"), site, r.Endpoint, r.Model, r.InputTokens, r.OutputTokens,
		float64(r.CostNano)/1e9, r.CreditField, r.UserID, r.UsageSource)
}

// balancesNow renders what the user has left in the fields of pool (a
// credit field list joined by "+"), read now, or nothing if it cannot be
// read.
func balancesNow(ctx context.Context, db *mongo.Database, user, pool string) string {
	var doc bson.M
	if err := db.Collection("usersNew").FindOne(ctx, bson.D{{Key: "_id", Value: user}}).Decode(&doc); err != nil {
		return ""
	}
	return formatBalances(doc, pool)
}

// formatBalances renders the fields of pool in a user document.
func formatBalances(doc bson.M, pool string) string {
	out := "  left"
	for _, f := range strings.Split(pool, "+") {
		var v float64
		switch n := doc[f].(type) {
		case float64:
			v = n
		case int32:
			v = float64(n)
		case int64:
			v = float64(n)
		}
		out += fmt.Sprintf(" %s $%.6f", f, v)
	}
	return out
}

// followLogs prints a line for every request_logs row written since start,
// polling every interval until ctx ends. A row's _id is chosen when its hold
// is taken, not when it is written, so rows arrive out of _id order: every
// row since start is read and the ones already printed are skipped (a dev
// stack sees few requests). sites maps a credit field to the site billing it.
func followLogs(ctx context.Context, db *mongo.Database, w io.Writer, sites map[string]string, start time.Time, interval time.Duration) {
	seen := map[bson.ObjectID]bool{}
	since := bson.NewObjectIDFromTimestamp(start.Add(-time.Second))
	filter := bson.D{{Key: "_id", Value: bson.D{{Key: "$gt", Value: since}}}}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cur, err := db.Collection("request_logs").Find(ctx, filter, options.Find().SetSort(bson.D{{Key: "createdAt", Value: 1}}))
		if err != nil {
			continue
		}
		var rows []logRow
		if err := cur.All(ctx, &rows); err != nil {
			continue
		}
		for _, r := range rows {
			if !seen[r.ID] {
				seen[r.ID] = true
				fmt.Fprintln(w, formatRow(r, sites)+balancesNow(ctx, db, r.UserID, r.CreditField))
			}
		}
	}
}
