package mongostore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

var (
	newPlan, _ = billing.ParseCreditPlan([]string{"creditsNew"})
	oldPlan, _ = billing.ParseCreditPlan([]string{"credits", "refCredits"})
	usd        = billing.NanoFromUSD
)

func holdReq(rid, user string, plan billing.CreditPlan, want, minimum billing.Nano) billing.HoldRequest {
	now := time.Now()
	return billing.HoldRequest{RequestID: rid, User: user, Plan: plan, Want: want, Min: minimum, Input: minimum,
		Owner: "test-owner", At: now, Expires: now.Add(time.Hour), LogID: billing.NewLogID(now), Model: "m", KeyID: "sk-t...abcd"}
}

// ledgerState is the gateway bookkeeping of one user document.
type ledgerState struct {
	Net   map[string]int64         `bson:"llmNet"`
	Holds map[string]bson.RawValue `bson:"llmHolds"`
	Held  int64                    `bson:"llmHeld"`
	Done  map[string]bson.RawValue `bson:"llmDone"`
	DoneN int64                    `bson:"llmDoneN"`
}

func readState(t *testing.T, db *mongo.Database, user string) ledgerState {
	t.Helper()
	var st ledgerState
	require.NoError(t, db.Collection("usersNew").FindOne(context.Background(), bson.D{{Key: "_id", Value: user}}).Decode(&st))
	return st
}

func TestReserveAndSettle(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}))
	req := holdReq("r1", "n", newPlan, usd(0.4), usd(0.01))
	h, err := s.Reserve(ctx, req)
	require.NoError(t, err, "reserve")
	require.Equal(t, usd(0.4), h.Amount(), "reserve: amount")
	require.Equal(t, usd(0.01), h.Input, "reserve: input")
	// Taking the same hold again changes nothing.
	h2, err := s.Reserve(ctx, req)
	require.NoError(t, err, "reserve again")
	require.Equal(t, usd(0.4), h2.Amount(), "reserve again")
	b, _ := seed.Balances(ctx, db, "n")
	assert.Equal(t, 0.6, b["creditsNew"], "in flight: the hold is taken from the balance")
	st := readState(t, db, "n")
	assert.Equal(t, -int64(usd(0.4)), st.Net["creditsNew"], "after reserve: net")
	assert.Equal(t, int64(1), st.Held, "after reserve: held")
	assert.Len(t, st.Holds, 1, "after reserve: holds")

	sr := billing.SettleRequest{Hold: h, Cost: usd(0.1), Usage: billing.Usage{Input: 10, Output: 5}, WeightedTokens: 7, By: billing.SettledByRequest}
	rc, applied, err := s.Settle(ctx, sr)
	require.NoError(t, err, "settle")
	require.True(t, applied, "settle")
	require.Equal(t, usd(0.1), rc.Charged, "settle: charged")
	require.Zero(t, rc.Shortfall, "settle: shortfall")
	require.Equal(t, usd(0.1), rc.Taken[0], "settle: taken")
	b, _ = seed.Balances(ctx, db, "n")
	assert.Equal(t, usd(0.9), usd(b["creditsNew"]), "after settle: %v", b)
	assert.Equal(t, 0.1, b["creditsNewUsed"], "after settle: %v", b)
	assert.Equal(t, 7.0, b["tokensUserNew"], "after settle: %v", b)
	assert.Equal(t, 10.0, b["totalInputTokens"], "after settle: %v", b)
	assert.Equal(t, 5.0, b["totalOutputTokens"], "after settle: %v", b)
	st = readState(t, db, "n")
	assert.Equal(t, -int64(usd(0.1)), st.Net["creditsNew"], "after settle: net")
	assert.Zero(t, st.Held, "after settle: held")
	assert.Empty(t, st.Holds, "after settle: holds")
	assert.Equal(t, int64(1), st.DoneN, "after settle: done count")
	assert.Len(t, st.Done, 1, "after settle: receipts")
	// Settling again returns the receipt and moves nothing.
	rc2, applied, err := s.Settle(ctx, sr)
	require.NoError(t, err, "settle again")
	require.False(t, applied, "settle again")
	require.Equal(t, rc.Charged, rc2.Charged, "settle again")
	require.Equal(t, h.LogID, rc2.LogID, "settle again")
	require.NoError(t, s.ClearReceipts(ctx, "n", []string{"r1", "unknown"}))
	st = readState(t, db, "n")
	assert.Zero(t, st.DoneN, "after clearing: done count")
	assert.Empty(t, st.Done, "after clearing: receipts")
	_, _, err = s.Settle(ctx, sr)
	assert.ErrorIs(t, err, billing.ErrNoHold, "settle after the receipt is gone")
	b, _ = seed.Balances(ctx, db, "n")
	assert.Equal(t, usd(0.9), usd(b["creditsNew"]), "after repeated settles: creditsNew")
}

func TestHoldCappedAndShortfall(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db,
		seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 0.3},
		seed.User{ID: "poor", Active: true, Migration: true, CreditsNew: 0.001},
		seed.User{ID: "zero", Active: true, Migration: true},
	))
	// Worst case 1.0, the pool has 0.3: the hold is 0.3.
	h, err := s.Reserve(ctx, holdReq("r1", "n", newPlan, usd(1), usd(0.01)))
	require.NoError(t, err, "capped hold")
	require.Equal(t, usd(0.3), h.Amount(), "capped hold")
	// Nothing left for a second request.
	var ie *billing.InsufficientError
	_, err = s.Reserve(ctx, holdReq("r2", "n", newPlan, usd(1), usd(0.01)))
	require.ErrorAs(t, err, &ie, "second hold")
	require.Zero(t, ie.Balance, "second hold: balance")
	// The cost is above the hold and the pool: charged to zero, the rest is shortfall.
	rc, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.5), By: billing.SettledByRequest})
	require.NoError(t, err, "settle above the hold")
	require.True(t, applied, "settle above the hold")
	require.Equal(t, usd(0.3), rc.Charged, "settle above the hold: charged")
	require.Equal(t, usd(0.2), rc.Shortfall, "settle above the hold: shortfall")
	b, _ := seed.Balances(ctx, db, "n")
	assert.Zero(t, b["creditsNew"], "after shortfall: %v", b)
	assert.Equal(t, 0.3, b["creditsNewUsed"], "after shortfall: %v", b)
	// Below the minimum (the estimated input): refused with the balance.
	_, err = s.Reserve(ctx, holdReq("r3", "poor", newPlan, usd(1), usd(0.01)))
	require.ErrorAs(t, err, &ie, "below minimum")
	require.Equal(t, usd(0.001), ie.Balance, "below minimum: balance")
	require.Equal(t, usd(0.01), ie.Need, "below minimum: need")
	_, err = s.Reserve(ctx, holdReq("r4", "zero", newPlan, 0, 0))
	require.ErrorAs(t, err, &ie, "check hold on an empty pool")
	_, err = s.Reserve(ctx, holdReq("r5", "nobody", newPlan, usd(1), 0))
	require.ErrorIs(t, err, billing.ErrUserNotFound, "unknown user")
	st := readState(t, db, "poor")
	assert.Zero(t, st.Held, "a refused hold left state: %+v", st)
	assert.Zero(t, st.Net["creditsNew"], "a refused hold left state: %+v", st)
}

func TestHoldAcrossTwoFields(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "c", Active: true, Migration: true, Credits: 0.5, RefCredits: 0.25}))
	h, err := s.Reserve(ctx, holdReq("r1", "c", oldPlan, usd(0.6), 0))
	require.NoError(t, err, "hold across credits and refCredits")
	require.Equal(t, []billing.Nano{usd(0.5), usd(0.1)}, h.Taken, "hold across credits and refCredits")
	// 0.55 is kept: all of credits and 0.05 of refCredits; 0.05 goes back to refCredits.
	rc, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.55), By: billing.SettledByRequest})
	require.NoError(t, err, "settle")
	require.Equal(t, []billing.Nano{usd(0.5), usd(0.05)}, rc.Taken, "settle: taken")
	b, _ := seed.Balances(ctx, db, "c")
	assert.Zero(t, b["credits"], "credits pool: %v", b)
	assert.Equal(t, "0.200000000", fmt.Sprintf("%.9f", b["refCredits"]), "credits pool: %v", b)
	assert.Equal(t, 0.55, b["creditsUsed"], "credits pool: %v", b)
	st := readState(t, db, "c")
	assert.Equal(t, -int64(usd(0.5)), st.Net["credits"], "net: %+v", st.Net)
	assert.Equal(t, -int64(usd(0.05)), st.Net["refCredits"], "net: %+v", st.Net)

	// A zero hold (check sizing) then a cost taken from both fields.
	h, err = s.Reserve(ctx, holdReq("r2", "c", oldPlan, 0, 0))
	require.NoError(t, err, "zero hold")
	require.Zero(t, h.Amount(), "zero hold")
	rc, _, err = s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.3), By: billing.SettledByRequest})
	require.NoError(t, err, "settle a zero hold")
	require.Equal(t, usd(0.2), rc.Charged, "settle a zero hold: charged")
	require.Equal(t, usd(0.1), rc.Shortfall, "settle a zero hold: shortfall")
	require.Len(t, rc.Taken, 2, "settle a zero hold: taken")
	require.Equal(t, usd(0.2), rc.Taken[1], "settle a zero hold: taken from refCredits")
	b, _ = seed.Balances(ctx, db, "c")
	assert.Zero(t, b["credits"], "after draining: %v", b)
	assert.Zero(t, b["refCredits"], "after draining: %v", b)
}

// TestConcurrentHoldsTwoInstances runs two stores on two connections (two
// gateway instances) with shared isolation, all holding and settling on one
// small balance: the balance never goes below zero, and what was charged is
// exactly what the balance lost.
func TestConcurrentHoldsTwoInstances(t *testing.T) {
	stores, db := twoInstances(t)
	for _, s := range stores {
		s.SetIsolation(mongostore.IsolationShared)
	}
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}))
	const n = 30
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		charged billing.Nano
		served  int
	)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			s := stores[i%2]
			h, err := s.Reserve(ctx, holdReq(fmt.Sprintf("r%d", i), "n", newPlan, usd(0.3), usd(0.05)))
			var ie *billing.InsufficientError
			if errors.As(err, &ie) {
				return
			}
			if !assert.NoError(t, err) {
				return
			}
			rc, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.12), By: billing.SettledByRequest})
			if !assert.NoError(t, err) {
				return
			}
			mu.Lock()
			charged += rc.Charged
			served++
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	b, _ := seed.Balances(ctx, db, "n")
	st := readState(t, db, "n")
	left := usd(b["creditsNew"])
	t.Logf("served %d of %d, charged %s, left %s", served, n, charged, left)
	require.GreaterOrEqual(t, left, billing.Nano(0), "balance below zero")
	require.Equal(t, usd(1), charged+left, "charged %s + left %s", charged, left)
	require.Equal(t, -int64(charged), st.Net["creditsNew"], "net, state %+v", st)
	require.Zero(t, st.Held, "held, state %+v", st)
	require.Empty(t, st.Holds, "holds left")
	assert.GreaterOrEqual(t, served, 3, "served, want at least 3 (0.3 holds on 1.0)")
}

// TestStaleUserLockTakenOverOnce: a user's shared lock left by a process
// that died is taken over by one of the instances waiting for it, never by
// two (on FerretDB a delete is not isolated): one hold that takes the whole
// balance is served, every other is refused, and the balance never goes
// below zero.
func TestStaleUserLockTakenOverOnce(t *testing.T) {
	const n = 8
	stores, db := instances(t, n)
	for _, s := range stores {
		s.SetIsolation(mongostore.IsolationShared)
	}
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "s", Active: true, Migration: true, CreditsNew: 1}))
	_, err := db.Collection(mongostore.CollLocks).InsertOne(ctx, bson.D{{Key: "_id", Value: "usersNew:s"},
		{Key: "token", Value: "dead"}, {Key: "exp", Value: time.Now().Add(-time.Minute)}})
	require.NoError(t, err)
	var served atomic.Int32
	var wg sync.WaitGroup
	for i, s := range stores {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.Reserve(ctx, holdReq(fmt.Sprintf("t%d", i), "s", newPlan, usd(1), usd(1)))
			var ie *billing.InsufficientError
			if errors.As(err, &ie) {
				return
			}
			if assert.NoError(t, err) {
				served.Add(1)
			}
		}()
	}
	wg.Wait()
	b, _ := seed.Balances(ctx, db, "s")
	assert.Equal(t, int32(1), served.Load(), "holds of the whole balance served")
	assert.GreaterOrEqual(t, b["creditsNew"], 0.0, "balance below zero")
}

func TestOrphans(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}))
	now := time.Now()
	require.NoError(t, s.Heartbeat(ctx, "alive", now))
	old := now.Add(-time.Minute)
	mk := func(rid, owner string, at, exp time.Time) {
		r := holdReq(rid, "n", newPlan, usd(0.1), usd(0.02))
		r.Owner, r.At, r.Expires = owner, at, exp
		_, err := s.Reserve(ctx, r)
		require.NoError(t, err)
	}
	mk("live", "alive", old, now.Add(time.Hour))
	mk("dead", "gone", old, now.Add(time.Hour))
	mk("young", "new-instance", now, now.Add(time.Hour))
	mk("expired", "alive", old, now.Add(-time.Second))
	got, err := s.Orphans(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-30 * time.Second), ReceiptAge: time.Minute})
	require.NoError(t, err)
	ids := map[string]billing.Orphan{}
	for _, o := range got {
		ids[o.Hold.RequestID] = o
	}
	require.Len(t, ids, 2, "orphans: %+v", got)
	require.Contains(t, ids, "dead", "orphans")
	require.Contains(t, ids, "expired", "orphans")
	require.Equal(t, usd(0.1), ids["dead"].Hold.Amount(), "orphan dead: amount")
	require.Equal(t, usd(0.02), ids["expired"].Hold.Input, "orphan expired: input")
	require.Equal(t, "m", ids["dead"].Hold.Model, "orphan dead: model")
	// Resolved by the sweeper with the input policy; its receipt says so.
	h := ids["dead"].Hold
	rc, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: billing.OrphanChargeInput.Cost(h), By: billing.SettledBySweeper})
	require.NoError(t, err, "sweep")
	require.True(t, applied, "sweep")
	require.Equal(t, usd(0.02), rc.Charged, "sweep: charged")
	require.Equal(t, billing.SettledBySweeper, rc.By, "sweep: by")
	// A late settlement by the presumed-dead owner gets the sweeper's receipt.
	rc2, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.05), By: billing.SettledByRequest})
	require.NoError(t, err, "late settle")
	require.False(t, applied, "late settle")
	require.Equal(t, billing.SettledBySweeper, rc2.By, "late settle: by")
	require.Equal(t, usd(0.02), rc2.Charged, "late settle: charged")
	// Receipts older than the age are returned for their log rows.
	// An owner named dead is swept at once, however young its hold.
	got, err = s.Orphans(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-30 * time.Second),
		Dead: func(o string) bool { return o == "new-instance" }, Skip: nil})
	require.NoError(t, err)
	ids = map[string]billing.Orphan{}
	for _, o := range got {
		ids[o.Hold.RequestID] = o
	}
	require.Len(t, got, 2, "with a dead owner: want the expired and the young holds")
	require.Contains(t, ids, "young", "with a dead owner: want the expired and the young holds")
	got, err = s.Orphans(ctx, billing.OrphanQuery{Now: now.Add(2 * time.Minute), OwnerDeadline: now.Add(-30 * time.Second), ReceiptAge: time.Minute})
	require.NoError(t, err)
	var receipts int
	for _, o := range got {
		if o.Receipt != nil {
			receipts++
			assert.Equal(t, "dead", o.Hold.RequestID, "receipt orphan: %+v", o)
			assert.Equal(t, usd(0.02), o.Receipt.Charged, "receipt orphan: %+v", o)
			assert.Equal(t, "creditsNew", o.Hold.Plan.String(), "receipt orphan: %+v", o)
		}
	}
	assert.Equal(t, 1, receipts, "receipts")
}

func TestRequestLogRowWrittenOnce(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	id := billing.NewLogID(time.Now())
	row := billing.RequestLog{ID: id, UserID: "n", Model: "m", RequestID: "r1", CreatedAt: time.Now(), CostNano: 5}
	for i := 0; i < 3; i++ {
		require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{row, {UserID: "other", RequestID: fmt.Sprint("x", i), CreatedAt: time.Now()}}), "write %d", i)
	}
	n, err := db.Collection("request_logs").CountDocuments(ctx, bson.D{{Key: "requestId", Value: "r1"}})
	require.NoError(t, err)
	require.Equal(t, int64(1), n, "rows for r1")
	var got struct {
		ID bson.ObjectID `bson:"_id"`
	}
	require.NoError(t, db.Collection("request_logs").FindOne(ctx, bson.D{{Key: "requestId", Value: "r1"}}).Decode(&got))
	require.Equal(t, bson.ObjectID(id), got.ID, "_id")
}

// A hold can carry the receipts of earlier settlements of the same user,
// whose log rows are written: they go in the hold's update.
func TestReserveDropsReceipts(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}))
	for _, rid := range []string{"a", "b"} {
		h, err := s.Reserve(ctx, holdReq(rid, "n", newPlan, usd(0.1), 0))
		require.NoError(t, err)
		_, _, err = s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.05), By: billing.SettledByRequest})
		require.NoError(t, err)
	}
	st := readState(t, db, "n")
	require.Equal(t, int64(2), st.DoneN, "before: %+v", st)
	require.Len(t, st.Done, 2, "before: %+v", st)
	r := holdReq("c", "n", newPlan, usd(0.1), 0)
	r.Clear = []string{"a", "b"}
	_, err := s.Reserve(ctx, r)
	require.NoError(t, err)
	st = readState(t, db, "n")
	assert.Zero(t, st.DoneN, "after: %+v", st)
	assert.Empty(t, st.Done, "after: %+v", st)
	assert.Equal(t, int64(1), st.Held, "after: %+v", st)
	assert.Equal(t, -int64(usd(0.2)), st.Net["creditsNew"], "after: %+v", st)
}

// Several holds of one user settle in one write, all or nothing.
func TestSettleMany(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "c", Active: true, Migration: true, Credits: 0.5, RefCredits: 0.5}))
	var reqs []billing.SettleRequest
	for i, cost := range []float64{0.1, 0.2, 0.3} {
		h, err := s.Reserve(ctx, holdReq(fmt.Sprint("m", i), "c", oldPlan, usd(0.3), 0))
		require.NoError(t, err)
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: usd(cost), Usage: billing.Usage{Input: 1, Output: 2}, By: billing.SettledByRequest})
	}
	// The third hold took 0.3 from refCredits (credits had 0.5 - 0.3 - 0.2 = 0 left after two).
	rcs, err := s.SettleMany(ctx, reqs)
	require.NoError(t, err, "settle many")
	require.Len(t, rcs, 3, "settle many")
	require.Equal(t, usd(0.3), rcs[2].Charged, "settle many: third charged")
	b, _ := seed.Balances(ctx, db, "c")
	st := readState(t, db, "c")
	left := usd(b["credits"]) + usd(b["refCredits"])
	require.Equal(t, usd(0.4), left, "after: balances %v", b)
	require.Equal(t, usd(0.6), usd(b["creditsUsed"]), "after: balances %v", b)
	require.Equal(t, 6.0, b["totalOutputTokens"], "after: balances %v", b)
	require.Zero(t, st.Held, "after: state %+v", st)
	require.Equal(t, int64(3), st.DoneN, "after: state %+v", st)
	require.Equal(t, -int64(usd(0.6)), st.Net["credits"]+st.Net["refCredits"], "after: state %+v", st)
	// Again: the holds are gone, nothing moves.
	_, err = s.SettleMany(ctx, reqs)
	require.ErrorIs(t, err, billing.ErrNotAllHeld, "settle many again")
	b2, _ := seed.Balances(ctx, db, "c")
	require.Equal(t, usd(0.4), usd(b2["credits"])+usd(b2["refCredits"]), "moved again: %v", b2)
}

// Holds of several users settle in one command; when one user's update
// cannot apply (a hold settled before), the others still do, and Settle
// then recognises each of them.
func TestSettleManyUsers(t *testing.T) {
	// One test at a time, so IsolationAtomic (no lock; one command for
	// every user) is exact on FerretDB too.
	for _, iso := range []mongostore.Isolation{mongostore.IsolationProcess, mongostore.IsolationShared, mongostore.IsolationAtomic} {
		t.Run(fmt.Sprint("isolation", iso), func(t *testing.T) { testSettleManyUsers(t, iso) })
	}
}

func testSettleManyUsers(t *testing.T, iso mongostore.Isolation) {
	s, db := open(t)
	s.SetIsolation(iso)
	ctx := context.Background()
	users := []string{"u1", "u2", "u3"}
	for _, u := range users {
		require.NoError(t, seed.Insert(ctx, db, seed.User{ID: u, Active: true, Migration: true, CreditsNew: 1}))
	}
	var reqs []billing.SettleRequest
	for i := 0; i < 6; i++ {
		u := users[i%3]
		h, err := s.Reserve(ctx, holdReq(fmt.Sprint("mu", i), u, newPlan, usd(0.2), 0))
		require.NoError(t, err)
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: usd(0.01 * float64(i+1)), Usage: billing.Usage{Input: 1, Output: 1}, By: billing.SettledByRequest})
	}
	// u2's first hold is settled on its own first.
	_, applied, err := s.Settle(ctx, reqs[1])
	require.NoError(t, err, "settle one")
	require.True(t, applied, "settle one")
	_, err = s.SettleMany(ctx, reqs)
	require.ErrorIs(t, err, billing.ErrNotAllHeld, "settle many")
	// u1 and u3 were settled by that call; u2's second hold was not.
	for i, want := range []bool{false, false, false, false, true, false} {
		rc, applied, err := s.Settle(ctx, reqs[i])
		require.NoError(t, err, "settle %d after", i)
		require.Equal(t, want, applied, "settle %d after: applied", i)
		require.Equal(t, reqs[i].Cost, rc.Charged, "settle %d after: charged", i)
	}
	for i, u := range users {
		b, _ := seed.Balances(ctx, db, u)
		st := readState(t, db, u)
		spent := reqs[i].Cost + reqs[i+3].Cost
		require.Equal(t, usd(1)-spent, usd(b["creditsNew"]), "%s: balances %v", u, b)
		require.Zero(t, st.Held, "%s: state %+v", u, st)
		require.Equal(t, int64(2), st.DoneN, "%s: state %+v", u, st)
		require.Equal(t, -int64(spent), st.Net["creditsNew"], "%s: state %+v", u, st)
	}
	// All settled now: nothing moves again.
	_, err = s.SettleMany(ctx, reqs)
	require.ErrorIs(t, err, billing.ErrNotAllHeld, "settle many again")
}

// The gateway finds a hold whose answer was lost by asking again for a
// zero hold with the same request id: it gets the hold that was taken, or
// an empty one, and releasing it restores the balance exactly.
func TestZeroHoldFindsTheHoldTaken(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "z", Active: true, Migration: true, CreditsNew: 1}))
	_, err := s.Reserve(ctx, holdReq("lost", "z", newPlan, usd(0.4), usd(0.01)))
	require.NoError(t, err)
	for _, rid := range []string{"lost", "never-taken"} {
		h, err := s.Reserve(ctx, holdReq(rid, "z", newPlan, 0, 0))
		want := usd(0.4)
		if rid == "never-taken" {
			want = 0
		}
		require.NoError(t, err, "%s: zero hold", rid)
		require.Equal(t, want, h.Amount(), "%s: zero hold amount", rid)
		_, _, err = s.Settle(ctx, billing.SettleRequest{Hold: h, By: billing.SettledByRequest})
		require.NoError(t, err)
	}
	b, _ := seed.Balances(ctx, db, "z")
	st := readState(t, db, "z")
	assert.Equal(t, 1.0, b["creditsNew"], "after the releases")
	assert.Zero(t, st.Held, "after the releases: %+v", st)
	assert.Zero(t, st.Net["creditsNew"], "after the releases: %+v", st)
	// A user with nothing to hold and no hold: refused, nothing to release.
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "empty", Active: true, Migration: true}))
	var ie *billing.InsufficientError
	_, err = s.Reserve(ctx, holdReq("none", "empty", newPlan, 0, 0))
	assert.ErrorAs(t, err, &ie, "zero hold on an empty balance")
}
