// Package ledgercheck reads back what billing did to a set of users: their
// balances, the request log rows and the gateway's hold bookkeeping, so
// tests can assert that every admitted request was charged and logged
// exactly once and that the money adds up.
package ledgercheck

import (
	"context"
	"fmt"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// User is the billing state of one user.
type User struct {
	ID string
	// Balance is the spendable total of the fields, in nano-USD.
	Balance billing.Nano
	// Fields are the balances as stored.
	Fields map[string]float64
	// Rows are the request log rows, Charged and Shortfall their sums.
	Rows      []bson.M
	Charged   billing.Nano
	Shortfall billing.Nano
	// DuplicateRequestIDs are request ids with more than one row.
	DuplicateRequestIDs []string
	// Held is llmHeld; Holds the number of llmHolds entries; Receipts the
	// number of llmDone entries; Net llmNet.
	Held     int64
	Holds    int
	Receipts int
	Net      map[string]int64
}

// Read returns the state of user, summing the fields given.
func Read(ctx context.Context, db *mongo.Database, user string, fields ...string) (User, error) {
	u := User{ID: user, Fields: map[string]float64{}}
	var doc bson.M
	if err := db.Collection("usersNew").FindOne(ctx, bson.D{{Key: "_id", Value: user}}).Decode(&doc); err != nil {
		return u, fmt.Errorf("reading user %s: %w", user, err)
	}
	for _, f := range fields {
		v := toFloat(doc[f])
		u.Fields[f] = v
		if v > 0 {
			u.Balance += billing.NanoFromUSD(v)
		}
	}
	u.Held = int64(toFloat(doc["llmHeld"]))
	u.Holds = len(asMap(doc["llmHolds"]))
	u.Receipts = len(asMap(doc["llmDone"]))
	u.Net = map[string]int64{}
	for k, v := range asMap(doc["llmNet"]) {
		u.Net[k] = int64(toFloat(v))
	}
	cur, err := db.Collection("request_logs").Find(ctx, bson.D{{Key: "userId", Value: user}})
	if err != nil {
		return u, err
	}
	if err := cur.All(ctx, &u.Rows); err != nil {
		return u, err
	}
	seen := map[string]int{}
	for _, r := range u.Rows {
		u.Charged += billing.Nano(toFloat(r["chargedNano"]))
		u.Shortfall += billing.Nano(toFloat(r["shortfallNano"]))
		id, _ := r["requestId"].(string)
		seen[id]++
		if seen[id] == 2 {
			u.DuplicateRequestIDs = append(u.DuplicateRequestIDs, id)
		}
	}
	return u, nil
}

// Settled reports whether no hold or receipt is left.
func (u User) Settled() bool { return u.Held == 0 && u.Holds == 0 && u.Receipts == 0 }

// asMap reads an embedded document, which the driver decodes as bson.D.
func asMap(v any) map[string]any {
	m := map[string]any{}
	switch d := v.(type) {
	case bson.D:
		for _, e := range d {
			m[e.Key] = e.Value
		}
	case bson.M:
		for k, x := range d {
			m[k] = x
		}
	}
	return m
}

func toFloat(v any) float64 {
	switch n := v.(type) {
	case float64:
		return n
	case int32:
		return float64(n)
	case int64:
		return float64(n)
	}
	return 0
}
