package mongostore

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/event"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

var friendKey = billing.FriendKeyPrefix + strings.Repeat("ab", 32)

type friendState struct {
	Limits []struct {
		ModelID string  `bson:"modelId"`
		Used    float64 `bson:"usedUsd"`
	} `bson:"modelLimits"`
	TotalUsed float64           `bson:"totalUsedUsd"`
	Requests  int64             `bson:"requestsCount"`
	Holds     map[string]string `bson:"llmFriendHolds"`
}

func readFriend(t *testing.T, db *mongo.Database) friendState {
	t.Helper()
	var d friendState
	require.NoError(t, db.Collection(seed.FriendKeysCollection).FindOne(context.Background(), bson.D{{Key: "_id", Value: friendKey}}).Decode(&d))
	return d
}

func seedFriend(t *testing.T, db *mongo.Database, limits ...seed.FriendLimit) {
	t.Helper()
	require.NoError(t, seed.Insert(context.Background(), db,
		seed.User{ID: "owner", Role: "user", Active: true, Migration: true, CreditsNew: 5},
		seed.FriendKey{Key: friendKey, Owner: "owner", Active: true, Limits: limits}))
}

func friendReq(rid string, slot int, limit, want, minimum billing.Nano) billing.FriendHoldRequest {
	return billing.FriendHoldRequest{Key: friendKey, RequestID: rid, Model: "m", Slot: slot, Limit: limit,
		Want: want, Min: minimum, Expires: time.Now().Add(time.Minute)}
}

// A friend key resolves to its owner, who pays, with its limits; a key
// that only looks like one is a user key, unknown here.
func TestFriendAuthenticate(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	off := false
	seedFriend(t, db, seed.FriendLimit{Model: "a", Limit: 2, Used: 0.5}, seed.FriendLimit{Model: "m", Limit: 1, Enabled: &off})
	p, err := s.Authenticate(ctx, friendKey)
	require.NoError(t, err)
	assert.Equal(t, "owner", p.User)
	assert.Equal(t, billing.Nano(5_000_000_000), p.Balances.CreditsNew)
	require.NotNil(t, p.Friend)
	assert.Equal(t, []billing.FriendLimit{
		{ModelID: "a", Slot: 0, Limit: 2_000_000_000, Used: 500_000_000, Enabled: true},
		{ModelID: "m", Slot: 1, Limit: 1_000_000_000, Enabled: false},
	}, p.Friend.Limits)

	_, err = s.Authenticate(ctx, billing.FriendKeyPrefix+"short")
	var ae *billing.AuthError
	require.ErrorAs(t, err, &ae)
	assert.Equal(t, billing.AuthInvalid, ae.Reason)
}

// A hold counts in usedUsd at once; asking again for the same request
// returns it; settling it, even without the key (a settlement replayed
// from the journal), replaces it by the charge, once.
func TestFriendHoldSettlesOnce(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	seedFriend(t, db, seed.FriendLimit{Model: "m", Limit: 1})
	h, err := s.ReserveFriend(ctx, friendReq("r1", 0, usd(1), usd(0.3), usd(0.01)))
	require.NoError(t, err)
	assert.Equal(t, usd(0.3), h.Amount)
	again, err := s.ReserveFriend(ctx, friendReq("r1", 0, usd(1), usd(0.3), usd(0.01)))
	require.NoError(t, err)
	assert.Equal(t, h.Amount, again.Amount)
	d := readFriend(t, db)
	assert.InDelta(t, 0.3, d.Limits[0].Used, 1e-12, "the hold counts against the limit")
	assert.Len(t, d.Holds, 1)

	h.Key = "" // as journaled
	st := billing.FriendSettlement{Hold: h, Charged: usd(0.1), Billed: true, At: time.Now()}
	require.NoError(t, s.SettleFriend(ctx, st))
	require.NoError(t, s.SettleFriend(ctx, st))
	d = readFriend(t, db)
	assert.InDelta(t, 0.1, d.Limits[0].Used, 1e-12)
	assert.InDelta(t, 0.1, d.TotalUsed, 1e-12)
	assert.EqualValues(t, 1, d.Requests)
	assert.Empty(t, d.Holds)
}

// With a stale cached slot the limit is found by reading; the room left is
// held when it is less than wanted, and a request needing more than the
// room is refused; a settlement finds its entry after the dashboard moved
// it.
func TestFriendHoldReadsWhenTheCacheIsStale(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	seedFriend(t, db, seed.FriendLimit{Model: "x", Limit: 5}, seed.FriendLimit{Model: "m", Limit: 1, Used: 0.75})
	h, err := s.ReserveFriend(ctx, friendReq("r1", 0, usd(5), usd(0.5), usd(0.01)))
	require.NoError(t, err)
	assert.Equal(t, 1, h.Slot)
	assert.Equal(t, usd(0.25), h.Amount, "the room left")
	_, err = s.ReserveFriend(ctx, friendReq("r2", 1, usd(1), usd(0.5), usd(0.01)))
	var le *billing.FriendLimitError
	require.ErrorAs(t, err, &le)
	assert.Equal(t, billing.FriendLimitExceeded, le.Reason)

	// The dashboard rewrites the list, "m" first, keeping usedUsd.
	_, err = db.Collection(seed.FriendKeysCollection).UpdateOne(ctx, bson.D{{Key: "_id", Value: friendKey}}, bson.D{{Key: "$set", Value: bson.D{
		{Key: "modelLimits", Value: bson.A{
			bson.D{{Key: "modelId", Value: "m"}, {Key: "limitUsd", Value: 1.0}, {Key: "usedUsd", Value: 1.0}},
			bson.D{{Key: "modelId", Value: "x"}, {Key: "limitUsd", Value: 5.0}, {Key: "usedUsd", Value: 0.0}},
		}}}}})
	require.NoError(t, err)
	require.NoError(t, s.SettleFriend(ctx, billing.FriendSettlement{Hold: h, Charged: usd(0.2), Billed: true, At: time.Now()}))
	d := readFriend(t, db)
	assert.InDelta(t, 0.95, d.Limits[0].Used, 1e-12)
	assert.Zero(t, d.Limits[1].Used)
}

// A hold whose process died stops counting once it expires: the next
// request that finds the limit full gives it back.
func TestFriendExpiredHoldGivenBack(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	seedFriend(t, db, seed.FriendLimit{Model: "m", Limit: 1})
	dead := friendReq("dead", 0, usd(1), usd(1), usd(0.01))
	dead.Expires = time.Now().Add(-time.Second)
	_, err := s.ReserveFriend(ctx, dead)
	require.NoError(t, err)
	h, err := s.ReserveFriend(ctx, friendReq("next", 0, usd(1), usd(0.5), usd(0.01)))
	require.NoError(t, err)
	assert.Equal(t, usd(0.5), h.Amount)
	d := readFriend(t, db)
	assert.InDelta(t, 0.5, d.Limits[0].Used, 1e-12)
	assert.Len(t, d.Holds, 1)
	assert.Zero(t, d.TotalUsed, "an expired hold charges nothing")
}

// A batch's friend holds of one key settle in one update; a hold settled
// before, or of another key, does not stop the rest; settling the batch
// again changes nothing.
func TestFriendHoldsSettleTogether(t *testing.T) {
	d := testdb.StartForTest(t)
	var updates atomic.Int64
	mon := &event.CommandMonitor{Started: func(_ context.Context, e *event.CommandStartedEvent) {
		if e.CommandName == "update" {
			updates.Add(1)
		}
	}}
	c, err := mongo.Connect(options.Client().ApplyURI(d.URI()).SetMonitor(mon))
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	db := c.Database("fproxy")
	s := mongostore.New(db)
	ctx := context.Background()
	seedFriend(t, db, seed.FriendLimit{Model: "x", Limit: 5}, seed.FriendLimit{Model: "m", Limit: 1})
	var sts []billing.FriendSettlement
	for i, rid := range []string{"r1", "r2", "r3"} {
		req := friendReq(rid, 1, usd(1), usd(0.2), usd(0.01))
		if i == 2 {
			req.Model, req.Slot, req.Limit = "x", 0, usd(5)
		}
		h, err := s.ReserveFriend(ctx, req)
		require.NoError(t, err)
		sts = append(sts, billing.FriendSettlement{Hold: h, Charged: usd(0.05 * float64(i+1)), Billed: i != 1, At: time.Now()})
	}
	updates.Store(0)
	require.NoError(t, s.SettleFriends(ctx, sts))
	assert.EqualValues(t, 1, updates.Load(), "one update for the key's three holds")
	got := readFriend(t, db)
	assert.InDelta(t, 0.15, got.Limits[0].Used, 1e-12, "x")
	assert.InDelta(t, 0.15, got.Limits[1].Used, 1e-12, "m: 0.05 + 0.1")
	assert.InDelta(t, 0.3, got.TotalUsed, 1e-12)
	assert.EqualValues(t, 2, got.Requests, "the release is not a request")
	assert.Empty(t, got.Holds)

	require.NoError(t, s.SettleFriends(ctx, sts), "again")
	again := readFriend(t, db)
	assert.Equal(t, got.Limits, again.Limits, "counted once")
	assert.Equal(t, got.TotalUsed, again.TotalUsed)
	assert.Equal(t, got.Requests, again.Requests)

	// One hold of the batch settled before: the others still settle, once.
	h4, err := s.ReserveFriend(ctx, friendReq("r4", 1, usd(1), usd(0.2), usd(0.01)))
	require.NoError(t, err)
	h5, err := s.ReserveFriend(ctx, friendReq("r5", 1, usd(1), usd(0.2), usd(0.01)))
	require.NoError(t, err)
	st4 := billing.FriendSettlement{Hold: h4, Charged: usd(0.1), Billed: true, At: time.Now()}
	require.NoError(t, s.SettleFriend(ctx, st4))
	require.NoError(t, s.SettleFriends(ctx, []billing.FriendSettlement{st4, {Hold: h5, Charged: usd(0.1), Billed: true, At: time.Now()}}))
	got = readFriend(t, db)
	assert.InDelta(t, 0.35, got.Limits[1].Used, 1e-12)
	assert.EqualValues(t, 4, got.Requests)
	assert.Empty(t, got.Holds)

	// Two holds naming one entry for different models (the limits were
	// edited between them): each charge still lands on its own model.
	h6, err := s.ReserveFriend(ctx, friendReq("r6", 1, usd(1), usd(0.2), usd(0.01)))
	require.NoError(t, err)
	x := friendReq("r7", 0, usd(5), usd(0.2), usd(0.01))
	x.Model = "x"
	h7, err := s.ReserveFriend(ctx, x)
	require.NoError(t, err)
	h7.Slot = 1 // as cached before an edit moved "x"
	require.NoError(t, s.SettleFriends(ctx, []billing.FriendSettlement{
		{Hold: h6, Charged: usd(0.1), Billed: true, At: time.Now()},
		{Hold: h7, Charged: usd(0.05), Billed: true, At: time.Now()},
	}))
	got = readFriend(t, db)
	assert.InDelta(t, 0.2, got.Limits[0].Used, 1e-12, "x")
	assert.InDelta(t, 0.45, got.Limits[1].Used, 1e-12, "m")
	assert.Empty(t, got.Holds)
}
