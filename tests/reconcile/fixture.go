// Package reconcile tests the billing reconciliation (package reconcile of
// the plugin, and its caddy subcommand) against a real wire-protocol
// database (embedded FerretDB) with the official driver.
//
// Its non-test part, [Seed], writes a consistent set of gateway bookkeeping
// straight into the database, in the shape the billing engine leaves it;
// the tests then break one thing at a time.
package reconcile

import (
	"context"
	"fmt"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// The amounts of the consistent set, in nano-USD.
const (
	// alice (creditsNew, starts at $10): two settled requests.
	A1Cost = 20_000_000  // a1, created 48 h ago
	A2Cost = 500_000_000 // a2, stored as doubles
	// bob (credits $0.01 then refCredits $5): b1 drains credits, b2 is an
	// outstanding live hold whose log row is already written.
	B1Credits, B1Ref = 10_000_000, 20_000_000 // b1, takenNano stored as int32
	B2Hold           = 100_000_000            // b2's hold on refCredits
	B2Taken          = 30_000_000             // what b2's row says it took
	// carol (creditsNew $0.005): c1 costs more than she has.
	C1Cost, C1Charged, C1Shortfall = 8_000_000, 5_000_000, 3_000_000

	// TotalCharged and TotalShortfall are the totals of every row.
	TotalCharged   = A1Cost + A2Cost + B1Credits + B1Ref + B2Taken + C1Charged
	TotalShortfall = C1Shortfall
)

// Fixture is the consistent set as written.
type Fixture struct {
	// Now is when it was written; rows are created within the last hour,
	// except a1 (48 h before Now).
	Now time.Time
	// RowIDs maps each requestId to its log row's _id.
	RowIDs map[string]bson.ObjectID
}

// Seed writes, into db, three users with gateway bookkeeping, one legacy
// user, their request_logs rows and a legacy row without requestId, all
// consistent: a reconciliation finds no drift.
func Seed(ctx context.Context, db *mongo.Database) (*Fixture, error) {
	now := time.Now().UTC().Truncate(time.Millisecond)
	f := &Fixture{Now: now, RowIDs: map[string]bson.ObjectID{}}
	usd := func(n int64) float64 { return billing.Nano(n).USD() }

	// Balances move as the engine moves them: one $inc of a double per
	// write, so each is computed with the same float operations.
	alice := 10.0
	alice += usd(-A1Cost)
	alice += usd(-A2Cost)
	bobCredits, bobRef := 0.01, 5.0
	bobCredits += usd(-B1Credits)
	bobRef += usd(-B1Ref)
	bobRef += usd(-B2Hold)
	carol := 0.005
	carol += usd(-C1Charged)

	users := []any{
		bson.D{
			{Key: "_id", Value: "alice"}, {Key: "isActive", Value: true}, {Key: "role", Value: "user"}, {Key: "migration", Value: true},
			{Key: "credits", Value: int32(0)}, {Key: "refCredits", Value: int32(0)}, {Key: "creditsNew", Value: alice},
			{Key: "llmNet", Value: bson.D{{Key: "creditsNew", Value: int64(-A1Cost - A2Cost)}}},
			{Key: "llmHolds", Value: bson.D{}}, {Key: "llmHeld", Value: int32(0)},
		},
		bson.D{
			{Key: "_id", Value: "bob"}, {Key: "isActive", Value: true}, {Key: "role", Value: "user"}, {Key: "migration", Value: true},
			{Key: "credits", Value: bobCredits}, {Key: "refCredits", Value: bobRef}, {Key: "creditsNew", Value: int32(0)},
			{Key: "llmNet", Value: bson.D{
				{Key: "credits", Value: int64(-B1Credits)},
				{Key: "refCredits", Value: int64(-B1Ref - B2Hold)},
			}},
			{Key: "llmHolds", Value: bson.D{{Key: "b2", Value: bson.D{
				{Key: "amt", Value: bson.A{int64(B2Hold)}},
				{Key: "fields", Value: bson.A{"refCredits"}},
				{Key: "input", Value: int64(10_000_000)},
				{Key: "at", Value: now.Add(-time.Minute)},
				{Key: "exp", Value: now.Add(10 * time.Minute)},
				{Key: "owner", Value: "caddy-1"},
				{Key: "log", Value: f.rowID("b2")},
			}}}},
			{Key: "llmHeld", Value: int64(1)},
		},
		bson.D{
			{Key: "_id", Value: "carol"}, {Key: "isActive", Value: true}, {Key: "role", Value: "user"}, {Key: "migration", Value: true},
			{Key: "credits", Value: int32(0)}, {Key: "refCredits", Value: int32(0)}, {Key: "creditsNew", Value: carol},
			{Key: "llmNet", Value: bson.D{{Key: "creditsNew", Value: int64(-C1Charged)}}},
			{Key: "llmHeld", Value: int32(0)},
		},
		// A legacy user: no gateway bookkeeping, balances as js-bson writes them.
		bson.D{
			{Key: "_id", Value: "dave"}, {Key: "isActive", Value: true}, {Key: "role", Value: "user"}, {Key: "migration", Value: true},
			{Key: "credits", Value: int32(3)}, {Key: "refCredits", Value: 1.5}, {Key: "creditsNew", Value: int32(0)},
		},
	}
	if _, err := db.Collection("usersNew").InsertMany(ctx, users); err != nil {
		return nil, fmt.Errorf("seeding usersNew: %w", err)
	}

	rows := []any{
		f.row("a1", "alice", "creditsNew", now.Add(-48*time.Hour), int64(A1Cost), int64(A1Cost), int64(0),
			bson.D{{Key: "creditsNew", Value: int64(A1Cost)}}),
		// Numbers as doubles, as a JavaScript client would rewrite them.
		f.row("a2", "alice", "creditsNew", now.Add(-50*time.Minute), float64(A2Cost), float64(A2Cost), 0.0,
			bson.D{{Key: "creditsNew", Value: float64(A2Cost)}}),
		// Numbers as int32.
		f.row("b1", "bob", "credits+refCredits", now.Add(-40*time.Minute), int32(B1Credits+B1Ref), int32(B1Credits+B1Ref), int32(0),
			bson.D{{Key: "credits", Value: int32(B1Credits)}, {Key: "refCredits", Value: int32(B1Ref)}}),
		// Written just before its hold is settled: the hold still stands.
		f.row("b2", "bob", "credits+refCredits", now.Add(-30*time.Second), int64(B2Taken), int64(B2Taken), int64(0),
			bson.D{{Key: "credits", Value: int64(0)}, {Key: "refCredits", Value: int64(B2Taken)}}),
		f.row("c1", "carol", "creditsNew", now.Add(-20*time.Minute), int64(C1Cost), int64(C1Charged), int64(C1Shortfall),
			bson.D{{Key: "creditsNew", Value: int64(C1Charged)}}),
		// A legacy row: no requestId, nothing to check.
		bson.D{
			{Key: "_id", Value: bson.NewObjectID()}, {Key: "userId", Value: "dave"}, {Key: "model", Value: "claude"},
			{Key: "creditsCost", Value: 0.5}, {Key: "creditType", Value: "ohmygpt"}, {Key: "createdAt", Value: now.Add(-10 * time.Minute)},
			{Key: "chargedNano", Value: int64(12345)},
		},
	}
	if _, err := db.Collection("request_logs").InsertMany(ctx, rows); err != nil {
		return nil, fmt.Errorf("seeding request_logs: %w", err)
	}
	return f, nil
}

func (f *Fixture) rowID(rid string) bson.ObjectID {
	id, ok := f.RowIDs[rid]
	if !ok {
		id = bson.NewObjectID()
		f.RowIDs[rid] = id
	}
	return id
}

// row is a request_logs document in the gateway's shape.
func (f *Fixture) row(rid, user, creditField string, at time.Time, cost, charged, shortfall any, taken bson.D) bson.D {
	return bson.D{
		{Key: "_id", Value: f.rowID(rid)},
		{Key: "userId", Value: user},
		{Key: "userKeyId", Value: "sk-trollllm-" + user},
		{Key: "model", Value: "claude-sonnet-4"},
		{Key: "creditType", Value: map[bool]string{true: "openhands", false: "ohmygpt"}[creditField == "creditsNew"]},
		{Key: "isSuccess", Value: true},
		{Key: "createdAt", Value: at},
		{Key: "requestId", Value: rid},
		{Key: "creditField", Value: creditField},
		{Key: "usageSource", Value: "usage"},
		{Key: "endReason", Value: "complete"},
		{Key: "costNano", Value: cost},
		{Key: "chargedNano", Value: charged},
		{Key: "shortfallNano", Value: shortfall},
		{Key: "holdNano", Value: int64(B2Hold)},
		{Key: "takenNano", Value: taken},
	}
}
