package ledgertest_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

var (
	planNew = mustPlan(billing.FieldCreditsNew)
	planOld = mustPlan(billing.FieldCredits, billing.FieldRefCredits)
	usd     = billing.NanoFromUSD
	t0      = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
)

func mustPlan(fields ...string) billing.CreditPlan {
	p, err := billing.ParseCreditPlan(fields)
	if err != nil {
		panic(err)
	}
	return p
}

// TestConformance runs the shared semantic table against the in-memory
// store (tests/mongostore runs it against the MongoDB store).
func TestConformance(t *testing.T) {
	s := ledgertest.New()
	s.SetClock(time.Now)
	ledgertest.Conformance(t, ledgertest.Subject{
		Store:   s,
		AddUser: func(_ *testing.T, id string, b billing.Balances) { s.AddUser(id, b) },
		LogRows: func(_ *testing.T, id billing.LogID) int {
			if _, ok := s.Snapshot().Logs[id]; ok {
				return 1
			}
			return 0
		},
	})
}

func holdReq(rid, user string, plan billing.CreditPlan, want, minimum billing.Nano) billing.HoldRequest {
	var lid billing.LogID
	copy(lid[:], rid)
	return billing.HoldRequest{RequestID: rid, User: user, Plan: plan, Want: want, Min: minimum, Input: minimum,
		Owner: "o1", At: t0, Expires: t0.Add(time.Minute), LogID: lid, Model: "m", KeyID: "k"}
}

func settleReq(h billing.Hold, cost billing.Nano) billing.SettleRequest {
	return billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest}
}

// fixture is a store with user u (creditsNew 1), user c (credits 0.5,
// refCredits 0.5), a hold h1 of u outstanding and the receipt of h2.
type fixture struct {
	s      *ledgertest.Store
	h1, h2 billing.Hold
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0.Add(time.Second) })
	s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	s.AddUser("c", billing.Balances{Credits: usd(0.5), RefCredits: usd(0.5)})
	ctx := context.Background()
	h1, err := s.Reserve(ctx, holdReq("h1", "u", planNew, usd(0.2), 0))
	require.NoError(t, err)
	h2, err := s.Reserve(ctx, holdReq("h2", "u", planNew, usd(0.2), 0))
	require.NoError(t, err)
	_, _, err = s.Settle(ctx, settleReq(h2, usd(0.1)))
	require.NoError(t, err)
	return fixture{s: s, h1: h1, h2: h2}
}

// faultCalls are one call of each operation on a fixture, each changing
// the state when it applies (but the reads).
var faultCalls = []struct {
	op   ledgertest.Op
	call func(ctx context.Context, f fixture) error
}{
	{ledgertest.OpReserve, func(ctx context.Context, f fixture) error {
		_, err := f.s.Reserve(ctx, holdReq("new", "c", planOld, usd(0.7), 0))
		return err
	}},
	{ledgertest.OpSettle, func(ctx context.Context, f fixture) error {
		_, _, err := f.s.Settle(ctx, settleReq(f.h1, usd(0.5)))
		return err
	}},
	{ledgertest.OpSettleMany, func(ctx context.Context, f fixture) error {
		_, err := f.s.SettleMany(ctx, []billing.SettleRequest{settleReq(f.h1, usd(0.1))})
		return err
	}},
	{ledgertest.OpClearReceipts, func(ctx context.Context, f fixture) error {
		return f.s.ClearReceipts(ctx, "u", []string{"h2"})
	}},
	{ledgertest.OpInsertLogs, func(ctx context.Context, f fixture) error {
		return f.s.InsertRequestLogs(ctx, []billing.RequestLog{{ID: f.h2.LogID, UserID: "u", RequestID: "h2"}})
	}},
	{ledgertest.OpAddUsage, func(ctx context.Context, f fixture) error {
		return f.s.AddUsage(ctx, billing.UsageBatch{Writer: "w", Seq: "1", Counters: []billing.UsageCounters{{RawTokens: 3}}})
	}},
	{ledgertest.OpHeartbeat, func(ctx context.Context, f fixture) error {
		return f.s.Heartbeat(ctx, "o2", t0)
	}},
	{ledgertest.OpOrphans, func(ctx context.Context, f fixture) error {
		_, err := f.s.Orphans(ctx, billing.OrphanQuery{Now: t0.Add(time.Hour), OwnerDeadline: t0, ReceiptAge: time.Minute})
		return err
	}},
	{ledgertest.OpBalances, func(ctx context.Context, f fixture) error {
		_, err := f.s.Balances(ctx, "u")
		return err
	}},
}

// TestFaults injects each fault into each operation: FailBefore and Stall
// change nothing, FailAfter changes what a call without fault changes, and
// the error of each looks like a network error, not a billing one.
func TestFaults(t *testing.T) {
	for _, fc := range faultCalls {
		t.Run(string(fc.op), func(t *testing.T) {
			ctx := context.Background()
			clean := newFixture(t)
			before := clean.s.Snapshot()
			require.NoError(t, fc.call(ctx, clean), "without a fault")
			applied := clean.s.Snapshot()

			for _, fault := range []ledgertest.Fault{ledgertest.FailBefore, ledgertest.FailAfter, ledgertest.Stall, ledgertest.Timeout} {
				f := newFixture(t)
				var seen []ledgertest.Op
				f.s.SetFaults(func(op ledgertest.Op) ledgertest.Fault {
					seen = append(seen, op)
					return fault
				})
				cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
				err := fc.call(cctx, f)
				cancel()
				require.Error(t, err, fault.String())
				assert.Equal(t, []ledgertest.Op{fc.op}, seen, "%s: the hook sees the call", fault)
				assertNetworkError(t, err, fault)
				f.s.SetFaults(nil)
				want := before
				if fault == ledgertest.FailAfter {
					want = applied
				}
				assert.Equal(t, want, f.s.Snapshot(), fault.String())
			}
		})
	}
}

// assertNetworkError checks err is what a driver gives for a lost
// connection or a deadline, and no billing sentinel.
func assertNetworkError(t *testing.T, err error, fault ledgertest.Fault) {
	t.Helper()
	for _, sentinel := range []error{billing.ErrNoHold, billing.ErrNotAllHeld, billing.ErrUserNotFound} {
		assert.NotErrorIs(t, err, sentinel, fault.String())
	}
	var ie *billing.InsufficientError
	assert.False(t, errors.As(err, &ie), "%s: not an InsufficientError", fault)
	if fault == ledgertest.Stall || fault == ledgertest.Timeout {
		assert.ErrorIs(t, err, context.DeadlineExceeded, "%s: ends with the deadline", fault)
	}
	if fault == ledgertest.Stall {
		return // the context's own error
	}
	var fe *ledgertest.FaultError
	require.ErrorAs(t, err, &fe, fault.String())
	assert.Equal(t, fault, fe.Fault)
	var ne net.Error
	if assert.ErrorAs(t, err, &ne, "%s: a net.Error", fault) {
		assert.Equal(t, fault == ledgertest.Timeout, ne.Timeout(), "%s: a timeout", fault)
	}
}

// TestStallWithoutDeadline returns at once with a timeout instead of
// hanging the test.
func TestStallWithoutDeadline(t *testing.T) {
	f := newFixture(t)
	f.s.SetFaults(func(ledgertest.Op) ledgertest.Fault { return ledgertest.Stall })
	_, _, err := f.s.Settle(context.Background(), settleReq(f.h1, 0))
	var ne net.Error
	require.ErrorAs(t, err, &ne)
	assert.True(t, ne.Timeout())
}

// TestCanceledContextAppliesNothing: a call whose context has ended does
// not reach the store, as the driver does not send it.
func TestCanceledContextAppliesNothing(t *testing.T) {
	f := newFixture(t)
	before := f.s.Snapshot()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for _, fc := range faultCalls {
		assert.ErrorIs(t, fc.call(ctx, f), context.Canceled, string(fc.op))
	}
	assert.Equal(t, before, f.s.Snapshot())
}

// TestDefaultClock stamps receipts with the latest time the store was
// given, so a store without a clock stays deterministic.
func TestDefaultClock(t *testing.T) {
	s := ledgertest.New()
	s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	ctx := context.Background()
	h, err := s.Reserve(ctx, holdReq("r1", "u", planNew, usd(0.1), 0))
	require.NoError(t, err)
	rc, _, err := s.Settle(ctx, settleReq(h, 0))
	require.NoError(t, err)
	assert.True(t, rc.At.Equal(t0), "the hold's time: %v", rc.At)
	require.NoError(t, s.Heartbeat(ctx, "o", t0.Add(time.Hour)))
	h, err = s.Reserve(ctx, holdReq("r2", "u", planNew, usd(0.1), 0))
	require.NoError(t, err)
	rc, _, err = s.Settle(ctx, settleReq(h, 0))
	require.NoError(t, err)
	assert.True(t, rc.At.Equal(t0.Add(time.Hour)), "the heartbeat's time, later: %v", rc.At)
}

// TestConcurrentUse: the store may be used by the pipeline's workers at
// once (run with -race); the invariant holds after.
func TestConcurrentUse(t *testing.T) {
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0 })
	s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	s.AddUser("c", billing.Balances{Credits: usd(0.5), RefCredits: usd(0.5)})
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := range 50 {
				user, plan := "u", planNew
				if (w+i)%2 == 0 {
					user, plan = "c", planOld
				}
				h, err := s.Reserve(ctx, holdReq(fmt.Sprintf("w%d-%d", w, i), user, plan, usd(0.05), 0))
				if err != nil {
					continue
				}
				rc, _, err := s.Settle(ctx, settleReq(h, usd(0.01)*billing.Nano(i%7)))
				if err == nil && s.InsertRequestLogs(ctx, []billing.RequestLog{logRow(user, rc)}) == nil {
					_ = s.ClearReceipts(ctx, user, []string{h.RequestID})
				}
				_ = s.Snapshot()
			}
		})
	}
	wg.Wait()
	snap := s.Snapshot()
	require.NoError(t, snap.Check())
	for _, u := range snap.Users {
		assert.Empty(t, u.Holds, u.ID)
		assert.Empty(t, u.Receipts, u.ID)
	}
}

// TestConn: two connections share the data, each with its own faults.
func TestConn(t *testing.T) {
	a := ledgertest.New()
	a.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	b := a.Conn()
	b.SetFaults(func(ledgertest.Op) ledgertest.Fault { return ledgertest.FailBefore })
	ctx := context.Background()
	_, err := b.Reserve(ctx, holdReq("r1", "u", planNew, usd(0.4), 0))
	var fe *ledgertest.FaultError
	require.ErrorAs(t, err, &fe, "b's calls fail")
	h, err := a.Reserve(ctx, holdReq("r1", "u", planNew, usd(0.4), 0))
	require.NoError(t, err, "a's pass")
	b.SetFaults(nil)
	h2, err := b.Reserve(ctx, holdReq("r1", "u", planNew, usd(0.4), 0))
	require.NoError(t, err)
	assert.Equal(t, h.Taken, h2.Taken, "b sees a's hold")
	assert.Equal(t, a.Snapshot(), b.Snapshot())
}
