package ledgertest_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

// leaseFixture is a store whose user u (creditsNew 1) has a lease of 0.5
// with two holds carved from it, and a flush settling both.
func leaseFixture(t *testing.T) (*ledgertest.Store, billing.LeaseFlush) {
	t.Helper()
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0.Add(time.Second) })
	s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	req := holdReq(billing.LeaseID("o1", 1), "u", planNew, usd(0.5), 0)
	lease, err := s.Reserve(context.Background(), req)
	require.NoError(t, err)
	carve := func(rid string, taken billing.Nano) billing.Hold {
		h := billing.Hold{RequestID: rid, User: "u", Plan: planNew, Taken: []billing.Nano{taken}, Lease: lease.RequestID}
		copy(h.LogID[:], rid)
		return h
	}
	return s, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{
		settleReq(carve("c1", usd(0.2)), usd(0.1)), settleReq(carve("c2", usd(0.1)), usd(0.1))},
		Keep: []billing.Nano{usd(0.1)}}
}

// TestFlushLeaseAnswerLost: a flush whose answer was lost is recognised
// when asked again, and leaves the store as one flush does.
func TestFlushLeaseAnswerLost(t *testing.T) {
	ctx := context.Background()
	clean, f := leaseFixture(t)
	wantNext, wantRcs, err := clean.FlushLease(ctx, f)
	require.NoError(t, err)
	require.NoError(t, clean.Snapshot().Check())

	s, f := leaseFixture(t)
	s.SetFaults(func(op ledgertest.Op) ledgertest.Fault {
		assert.Equal(t, ledgertest.OpFlushLease, op)
		return ledgertest.FailAfter
	})
	_, _, err = s.FlushLease(ctx, f)
	assertNetworkError(t, err, ledgertest.FailAfter)
	s.SetFaults(nil)
	next, rcs, err := s.FlushLease(ctx, f)
	require.NoError(t, err, "asked again")
	assert.Equal(t, wantNext.Taken, next.Taken)
	require.Len(t, rcs, len(wantRcs))
	for i := range rcs {
		assert.True(t, wantRcs[i].At.Equal(rcs[i].At), "receipt %d time", i)
		rcs[i].At = wantRcs[i].At
	}
	assert.Equal(t, wantRcs, rcs, "the receipts of the flush")
	assert.Equal(t, clean.Snapshot(), s.Snapshot(), "applied once")
	u, _ := s.Snapshot().User("u")
	assert.Equal(t, usd(0.7), u.Balance.CreditsNew, "of the 0.5 leased 0.2 charged, 0.1 kept, 0.2 given back")
}

// TestFlushLeaseFailBefore: a flush that never reached the store changes
// nothing, and goes through when sent again.
func TestFlushLeaseFailBefore(t *testing.T) {
	ctx := context.Background()
	s, f := leaseFixture(t)
	before := s.Snapshot()
	s.SetFaults(func(ledgertest.Op) ledgertest.Fault { return ledgertest.FailBefore })
	_, _, err := s.FlushLease(ctx, f)
	assertNetworkError(t, err, ledgertest.FailBefore)
	assert.Equal(t, before, s.Snapshot())
	s.SetFaults(nil)
	_, _, err = s.FlushLease(ctx, f)
	require.NoError(t, err)
	require.NoError(t, s.Snapshot().Check())
}

// TestSettleCarvedAnswerLost: a carved hold's settlement whose answer was
// lost gives its receipt when asked again, and is charged once.
func TestSettleCarvedAnswerLost(t *testing.T) {
	ctx := context.Background()
	s, f := leaseFixture(t)
	s.SetFaults(func(ledgertest.Op) ledgertest.Fault { return ledgertest.FailAfter })
	_, _, err := s.Settle(ctx, f.Settles[0])
	assertNetworkError(t, err, ledgertest.FailAfter)
	s.SetFaults(nil)
	rc, applied, err := s.Settle(ctx, f.Settles[0])
	require.NoError(t, err)
	assert.False(t, applied)
	assert.Equal(t, usd(0.1), rc.Charged)
	_, _, err = s.FlushLease(ctx, f)
	assert.ErrorIs(t, err, billing.ErrLeaseMoved, "the lease changed under the flush")
	snap := s.Snapshot()
	require.NoError(t, snap.Check())
	u, _ := snap.User("u")
	assert.Equal(t, []billing.Nano{usd(0.4)}, u.Holds[0].Taken)
}
