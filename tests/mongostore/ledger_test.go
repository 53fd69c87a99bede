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
	if err := db.Collection("usersNew").FindOne(context.Background(), bson.D{{Key: "_id", Value: user}}).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestReserveAndSettle(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}); err != nil {
		t.Fatal(err)
	}
	req := holdReq("r1", "n", newPlan, usd(0.4), usd(0.01))
	h, err := s.Reserve(ctx, req)
	if err != nil || h.Amount() != usd(0.4) || h.Input != usd(0.01) {
		t.Fatalf("reserve: %+v, %v", h, err)
	}
	// Taking the same hold again changes nothing.
	if h2, err := s.Reserve(ctx, req); err != nil || h2.Amount() != usd(0.4) {
		t.Fatalf("reserve again: %+v, %v", h2, err)
	}
	b, _ := seed.Balances(ctx, db, "n")
	if b["creditsNew"] != 0.6 {
		t.Errorf("in flight: creditsNew = %v, want 0.6 (the hold is taken from the balance)", b["creditsNew"])
	}
	st := readState(t, db, "n")
	if st.Net["creditsNew"] != -int64(usd(0.4)) || st.Held != 1 || len(st.Holds) != 1 {
		t.Errorf("after reserve: %+v", st)
	}

	sr := billing.SettleRequest{Hold: h, Cost: usd(0.1), Usage: billing.Usage{Input: 10, Output: 5}, WeightedTokens: 7, By: billing.SettledByRequest}
	rc, applied, err := s.Settle(ctx, sr)
	if err != nil || !applied || rc.Charged != usd(0.1) || rc.Shortfall != 0 || rc.Taken[0] != usd(0.1) {
		t.Fatalf("settle: %+v, %v, %v", rc, applied, err)
	}
	b, _ = seed.Balances(ctx, db, "n")
	if usd(b["creditsNew"]) != usd(0.9) || b["creditsNewUsed"] != 0.1 || b["tokensUserNew"] != 7 || b["totalInputTokens"] != 10 || b["totalOutputTokens"] != 5 {
		t.Errorf("after settle: %v", b)
	}
	st = readState(t, db, "n")
	if st.Net["creditsNew"] != -int64(usd(0.1)) || st.Held != 0 || len(st.Holds) != 0 || st.DoneN != 1 || len(st.Done) != 1 {
		t.Errorf("after settle: %+v", st)
	}
	// Settling again returns the receipt and moves nothing.
	rc2, applied, err := s.Settle(ctx, sr)
	if err != nil || applied || rc2.Charged != rc.Charged || rc2.LogID != h.LogID {
		t.Fatalf("settle again: %+v, %v, %v", rc2, applied, err)
	}
	if err := s.ClearReceipts(ctx, "n", []string{"r1", "unknown"}); err != nil {
		t.Fatal(err)
	}
	st = readState(t, db, "n")
	if st.DoneN != 0 || len(st.Done) != 0 {
		t.Errorf("after clearing: %+v", st)
	}
	if _, _, err := s.Settle(ctx, sr); !errors.Is(err, billing.ErrNoHold) {
		t.Errorf("settle after the receipt is gone: %v, want ErrNoHold", err)
	}
	b, _ = seed.Balances(ctx, db, "n")
	if usd(b["creditsNew"]) != usd(0.9) {
		t.Errorf("after repeated settles: creditsNew = %v, want 0.9", b["creditsNew"])
	}
}

func TestHoldCappedAndShortfall(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db,
		seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 0.3},
		seed.User{ID: "poor", Active: true, Migration: true, CreditsNew: 0.001},
		seed.User{ID: "zero", Active: true, Migration: true},
	); err != nil {
		t.Fatal(err)
	}
	// Worst case 1.0, the pool has 0.3: the hold is 0.3.
	h, err := s.Reserve(ctx, holdReq("r1", "n", newPlan, usd(1), usd(0.01)))
	if err != nil || h.Amount() != usd(0.3) {
		t.Fatalf("capped hold: %+v, %v", h, err)
	}
	// Nothing left for a second request.
	var ie *billing.InsufficientError
	if _, err := s.Reserve(ctx, holdReq("r2", "n", newPlan, usd(1), usd(0.01))); !errors.As(err, &ie) || ie.Balance != 0 {
		t.Fatalf("second hold: %v", err)
	}
	// The cost is above the hold and the pool: charged to zero, the rest is shortfall.
	rc, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.5), By: billing.SettledByRequest})
	if err != nil || !applied || rc.Charged != usd(0.3) || rc.Shortfall != usd(0.2) {
		t.Fatalf("settle above the hold: %+v, %v", rc, err)
	}
	b, _ := seed.Balances(ctx, db, "n")
	if b["creditsNew"] != 0 || b["creditsNewUsed"] != 0.3 {
		t.Errorf("after shortfall: %v", b)
	}
	// Below the minimum (the estimated input): refused with the balance.
	if _, err := s.Reserve(ctx, holdReq("r3", "poor", newPlan, usd(1), usd(0.01))); !errors.As(err, &ie) || ie.Balance != usd(0.001) || ie.Need != usd(0.01) {
		t.Fatalf("below minimum: %v", err)
	}
	if _, err := s.Reserve(ctx, holdReq("r4", "zero", newPlan, 0, 0)); !errors.As(err, &ie) {
		t.Fatalf("check hold on an empty pool: %v", err)
	}
	if _, err := s.Reserve(ctx, holdReq("r5", "nobody", newPlan, usd(1), 0)); !errors.Is(err, billing.ErrUserNotFound) {
		t.Fatalf("unknown user: %v", err)
	}
	st := readState(t, db, "poor")
	if st.Held != 0 || st.Net["creditsNew"] != 0 {
		t.Errorf("a refused hold left state: %+v", st)
	}
}

func TestHoldAcrossTwoFields(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "c", Active: true, Migration: true, Credits: 0.5, RefCredits: 0.25}); err != nil {
		t.Fatal(err)
	}
	h, err := s.Reserve(ctx, holdReq("r1", "c", oldPlan, usd(0.6), 0))
	if err != nil || h.Taken[0] != usd(0.5) || h.Taken[1] != usd(0.1) {
		t.Fatalf("hold across credits and refCredits: %+v, %v", h, err)
	}
	// 0.55 is kept: all of credits and 0.05 of refCredits; 0.05 goes back to refCredits.
	rc, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.55), By: billing.SettledByRequest})
	if err != nil || rc.Taken[0] != usd(0.5) || rc.Taken[1] != usd(0.05) {
		t.Fatalf("settle: %+v, %v", rc, err)
	}
	b, _ := seed.Balances(ctx, db, "c")
	if b["credits"] != 0 || fmt.Sprintf("%.9f", b["refCredits"]) != "0.200000000" || b["creditsUsed"] != 0.55 {
		t.Errorf("credits pool: %v", b)
	}
	st := readState(t, db, "c")
	if st.Net["credits"] != -int64(usd(0.5)) || st.Net["refCredits"] != -int64(usd(0.05)) {
		t.Errorf("net: %+v", st.Net)
	}

	// A zero hold (check sizing) then a cost taken from both fields.
	h, err = s.Reserve(ctx, holdReq("r2", "c", oldPlan, 0, 0))
	if err != nil || h.Amount() != 0 {
		t.Fatalf("zero hold: %+v, %v", h, err)
	}
	rc, _, err = s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.3), By: billing.SettledByRequest})
	if err != nil || rc.Charged != usd(0.2) || rc.Shortfall != usd(0.1) || rc.Taken[1] != usd(0.2) {
		t.Fatalf("settle a zero hold: %+v, %v", rc, err)
	}
	b, _ = seed.Balances(ctx, db, "c")
	if b["credits"] != 0 || b["refCredits"] != 0 {
		t.Errorf("after draining: %v", b)
	}
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
	if err := seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}); err != nil {
		t.Fatal(err)
	}
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
			if err != nil {
				t.Error(err)
				return
			}
			rc, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.12), By: billing.SettledByRequest})
			if err != nil {
				t.Error(err)
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
	if left < 0 || charged+left != usd(1) || st.Net["creditsNew"] != -int64(charged) || st.Held != 0 || len(st.Holds) != 0 {
		t.Fatalf("served %d, charged %s, left %s, state %+v", served, charged, left, st)
	}
	if served < 3 {
		t.Errorf("served %d, want at least 3 (0.3 holds on 1.0)", served)
	}
}

func TestOrphans(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if err := s.Heartbeat(ctx, "alive", now); err != nil {
		t.Fatal(err)
	}
	old := now.Add(-time.Minute)
	mk := func(rid, owner string, at, exp time.Time) {
		r := holdReq(rid, "n", newPlan, usd(0.1), usd(0.02))
		r.Owner, r.At, r.Expires = owner, at, exp
		if _, err := s.Reserve(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	mk("live", "alive", old, now.Add(time.Hour))
	mk("dead", "gone", old, now.Add(time.Hour))
	mk("young", "new-instance", now, now.Add(time.Hour))
	mk("expired", "alive", old, now.Add(-time.Second))
	got, err := s.Orphans(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-30 * time.Second), ReceiptAge: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]billing.Orphan{}
	for _, o := range got {
		ids[o.Hold.RequestID] = o
	}
	if len(ids) != 2 || ids["dead"].Hold.Amount() != usd(0.1) || ids["expired"].Hold.Input != usd(0.02) || ids["dead"].Hold.Model != "m" {
		t.Fatalf("orphans: %+v", got)
	}
	// Resolved by the sweeper with the input policy; its receipt says so.
	h := ids["dead"].Hold
	rc, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: billing.OrphanChargeInput.Cost(h), By: billing.SettledBySweeper})
	if err != nil || !applied || rc.Charged != usd(0.02) || rc.By != billing.SettledBySweeper {
		t.Fatalf("sweep: %+v, %v", rc, err)
	}
	// A late settlement by the presumed-dead owner gets the sweeper's receipt.
	rc2, applied, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.05), By: billing.SettledByRequest})
	if err != nil || applied || rc2.By != billing.SettledBySweeper || rc2.Charged != usd(0.02) {
		t.Fatalf("late settle: %+v, %v, %v", rc2, applied, err)
	}
	// Receipts older than the age are returned for their log rows.
	// An owner named dead is swept at once, however young its hold.
	got, err = s.Orphans(ctx, billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-30 * time.Second),
		Dead: func(o string) bool { return o == "new-instance" }, Skip: nil})
	if err != nil {
		t.Fatal(err)
	}
	ids = map[string]billing.Orphan{}
	for _, o := range got {
		ids[o.Hold.RequestID] = o
	}
	if _, ok := ids["young"]; len(got) != 2 || !ok {
		t.Fatalf("with a dead owner: %+v, want the expired and the young holds", got)
	}
	got, err = s.Orphans(ctx, billing.OrphanQuery{Now: now.Add(2 * time.Minute), OwnerDeadline: now.Add(-30 * time.Second), ReceiptAge: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	var receipts int
	for _, o := range got {
		if o.Receipt != nil {
			receipts++
			if o.Hold.RequestID != "dead" || o.Receipt.Charged != usd(0.02) || o.Hold.Plan.String() != "creditsNew" {
				t.Errorf("receipt orphan: %+v", o)
			}
		}
	}
	if receipts != 1 {
		t.Errorf("receipts: %d, want 1", receipts)
	}
}

func TestRequestLogRowWrittenOnce(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	id := billing.NewLogID(time.Now())
	row := billing.RequestLog{ID: id, UserID: "n", Model: "m", RequestID: "r1", CreatedAt: time.Now(), CostNano: 5}
	for i := 0; i < 3; i++ {
		if err := s.InsertRequestLogs(ctx, []billing.RequestLog{row, {UserID: "other", RequestID: fmt.Sprint("x", i), CreatedAt: time.Now()}}); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	n, err := db.Collection("request_logs").CountDocuments(ctx, bson.D{{Key: "requestId", Value: "r1"}})
	if err != nil || n != 1 {
		t.Fatalf("rows for r1: %d, %v", n, err)
	}
	var got struct {
		ID bson.ObjectID `bson:"_id"`
	}
	if err := db.Collection("request_logs").FindOne(ctx, bson.D{{Key: "requestId", Value: "r1"}}).Decode(&got); err != nil || got.ID != bson.ObjectID(id) {
		t.Fatalf("_id: %v, %v", got.ID, err)
	}
}

// A hold can carry the receipts of earlier settlements of the same user,
// whose log rows are written: they go in the hold's update.
func TestReserveDropsReceipts(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "n", Active: true, Migration: true, CreditsNew: 1}); err != nil {
		t.Fatal(err)
	}
	for _, rid := range []string{"a", "b"} {
		h, err := s.Reserve(ctx, holdReq(rid, "n", newPlan, usd(0.1), 0))
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.05), By: billing.SettledByRequest}); err != nil {
			t.Fatal(err)
		}
	}
	if st := readState(t, db, "n"); st.DoneN != 2 || len(st.Done) != 2 {
		t.Fatalf("before: %+v", st)
	}
	r := holdReq("c", "n", newPlan, usd(0.1), 0)
	r.Clear = []string{"a", "b"}
	if _, err := s.Reserve(ctx, r); err != nil {
		t.Fatal(err)
	}
	st := readState(t, db, "n")
	if st.DoneN != 0 || len(st.Done) != 0 || st.Held != 1 || st.Net["creditsNew"] != -int64(usd(0.2)) {
		t.Fatalf("after: %+v", st)
	}
}

// Several holds of one user settle in one write, all or nothing.
func TestSettleMany(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "c", Active: true, Migration: true, Credits: 0.5, RefCredits: 0.5}); err != nil {
		t.Fatal(err)
	}
	var reqs []billing.SettleRequest
	for i, cost := range []float64{0.1, 0.2, 0.3} {
		h, err := s.Reserve(ctx, holdReq(fmt.Sprint("m", i), "c", oldPlan, usd(0.3), 0))
		if err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: usd(cost), Usage: billing.Usage{Input: 1, Output: 2}, By: billing.SettledByRequest})
	}
	// The third hold took 0.3 from refCredits (credits had 0.5 - 0.3 - 0.2 = 0 left after two).
	rcs, err := s.SettleMany(ctx, reqs)
	if err != nil || len(rcs) != 3 || rcs[2].Charged != usd(0.3) {
		t.Fatalf("settle many: %+v, %v", rcs, err)
	}
	b, _ := seed.Balances(ctx, db, "c")
	st := readState(t, db, "c")
	left := usd(b["credits"]) + usd(b["refCredits"])
	if left != usd(0.4) || usd(b["creditsUsed"]) != usd(0.6) || b["totalOutputTokens"] != 6 || st.Held != 0 || st.DoneN != 3 ||
		st.Net["credits"]+st.Net["refCredits"] != -int64(usd(0.6)) {
		t.Fatalf("after: balances %v, state %+v", b, st)
	}
	// Again: the holds are gone, nothing moves.
	if _, err := s.SettleMany(ctx, reqs); !errors.Is(err, billing.ErrNotAllHeld) {
		t.Fatalf("settle many again: %v, want ErrNotAllHeld", err)
	}
	if b2, _ := seed.Balances(ctx, db, "c"); usd(b2["credits"])+usd(b2["refCredits"]) != usd(0.4) {
		t.Fatalf("moved again: %v", b2)
	}
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
		if err := seed.Insert(ctx, db, seed.User{ID: u, Active: true, Migration: true, CreditsNew: 1}); err != nil {
			t.Fatal(err)
		}
	}
	var reqs []billing.SettleRequest
	for i := 0; i < 6; i++ {
		u := users[i%3]
		h, err := s.Reserve(ctx, holdReq(fmt.Sprint("mu", i), u, newPlan, usd(0.2), 0))
		if err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: usd(0.01 * float64(i+1)), Usage: billing.Usage{Input: 1, Output: 1}, By: billing.SettledByRequest})
	}
	// u2's first hold is settled on its own first.
	if _, applied, err := s.Settle(ctx, reqs[1]); err != nil || !applied {
		t.Fatalf("settle one: %v %v", applied, err)
	}
	if _, err := s.SettleMany(ctx, reqs); !errors.Is(err, billing.ErrNotAllHeld) {
		t.Fatalf("settle many: %v, want ErrNotAllHeld", err)
	}
	// u1 and u3 were settled by that call; u2's second hold was not.
	for i, want := range []bool{false, false, false, false, true, false} {
		rc, applied, err := s.Settle(ctx, reqs[i])
		if err != nil || applied != want || rc.Charged != reqs[i].Cost {
			t.Fatalf("settle %d after: %+v applied %v (want %v), %v", i, rc, applied, want, err)
		}
	}
	for i, u := range users {
		b, _ := seed.Balances(ctx, db, u)
		st := readState(t, db, u)
		spent := reqs[i].Cost + reqs[i+3].Cost
		if usd(b["creditsNew"]) != usd(1)-spent || st.Held != 0 || st.DoneN != 2 || st.Net["creditsNew"] != -int64(spent) {
			t.Fatalf("%s: balances %v, state %+v, want spent %v", u, b, st, spent)
		}
	}
	// All settled now: nothing moves again.
	if _, err := s.SettleMany(ctx, reqs); !errors.Is(err, billing.ErrNotAllHeld) {
		t.Fatalf("settle many again: %v", err)
	}
}

// The gateway finds a hold whose answer was lost by asking again for a
// zero hold with the same request id: it gets the hold that was taken, or
// an empty one, and releasing it restores the balance exactly.
func TestZeroHoldFindsTheHoldTaken(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.User{ID: "z", Active: true, Migration: true, CreditsNew: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reserve(ctx, holdReq("lost", "z", newPlan, usd(0.4), usd(0.01))); err != nil {
		t.Fatal(err)
	}
	for _, rid := range []string{"lost", "never-taken"} {
		h, err := s.Reserve(ctx, holdReq(rid, "z", newPlan, 0, 0))
		want := usd(0.4)
		if rid == "never-taken" {
			want = 0
		}
		if err != nil || h.Amount() != want {
			t.Fatalf("%s: zero hold %+v, %v; want the amount %s", rid, h, err, want)
		}
		if _, _, err := s.Settle(ctx, billing.SettleRequest{Hold: h, By: billing.SettledByRequest}); err != nil {
			t.Fatal(err)
		}
	}
	b, _ := seed.Balances(ctx, db, "z")
	if st := readState(t, db, "z"); b["creditsNew"] != 1 || st.Held != 0 || st.Net["creditsNew"] != 0 {
		t.Errorf("after the releases: creditsNew %v, %+v; want 1 and nothing held", b["creditsNew"], st)
	}
	// A user with nothing to hold and no hold: refused, nothing to release.
	if err := seed.Insert(ctx, db, seed.User{ID: "empty", Active: true, Migration: true}); err != nil {
		t.Fatal(err)
	}
	var ie *billing.InsufficientError
	if _, err := s.Reserve(ctx, holdReq("none", "empty", newPlan, 0, 0)); !errors.As(err, &ie) {
		t.Errorf("zero hold on an empty balance: %v, want InsufficientError", err)
	}
}
