package mongostore

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// carved is a hold of cost taken served from the lease.
func carved(rid string, lease billing.Hold, taken billing.Nano) billing.Hold {
	h := holdReq(rid, lease.User, lease.Plan, 0, 0)
	return billing.Hold{RequestID: rid, User: lease.User, Plan: lease.Plan, Taken: []billing.Nano{taken},
		At: h.At, Expires: h.Expires, LogID: h.LogID, Lease: lease.RequestID}
}

// A lease's flushes and its carved holds' settlements keep the usage
// counters, llmNet, llmHeld and llmDoneN as settlements of held requests
// do.
func TestLeaseBookkeeping(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "l", Active: true, Migration: true, CreditsNew: 1}))
	lease, err := s.Reserve(ctx, holdReq(billing.LeaseID("o1", 1), "l", newPlan, usd(0.5), 0))
	require.NoError(t, err)
	use := billing.Usage{Input: 10, Output: 5}
	settle := func(rid string, cost billing.Nano) billing.SettleRequest {
		return billing.SettleRequest{Hold: carved(rid, lease, usd(0.1)), Cost: cost, Usage: use, WeightedTokens: 20, By: billing.SettledByRequest}
	}
	next, _, err := s.FlushLease(ctx, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settle("a", usd(0.1)), settle("b", usd(0.05))}})
	require.NoError(t, err)
	_, applied, err := s.Settle(ctx, settle("c", usd(0.2))) // 0.1 from the lease, 0.1 from the pool
	require.NoError(t, err)
	require.True(t, applied)
	st := readState(t, db, "l")
	assert.EqualValues(t, 1, st.Held, "the lease is one hold")
	assert.EqualValues(t, 3, st.DoneN, "receipts")
	assert.Equal(t, -int64(usd(0.6)), st.Net["creditsNew"], "0.5 leased, 0.1 above the carve")
	_, _, err = s.FlushLease(ctx, billing.LeaseFlush{Lease: next, Close: true})
	assert.ErrorIs(t, err, billing.ErrLeaseMoved, "the carved settlement changed the lease")
	lease, err = s.Reserve(ctx, holdReq(billing.LeaseID("o1", 1), "l", newPlan, 0, 0))
	require.NoError(t, err)
	_, _, err = s.FlushLease(ctx, billing.LeaseFlush{Lease: lease, Close: true, Clear: []string{"a", "b", "c"}})
	require.NoError(t, err)
	_, applied, err = s.Settle(ctx, settle("d", usd(0.05))) // the lease is gone: from the pool
	require.NoError(t, err)
	require.True(t, applied)

	st = readState(t, db, "l")
	assert.Zero(t, st.Held, "lease dropped")
	assert.Empty(t, st.Holds)
	assert.EqualValues(t, 1, st.DoneN, "receipts")
	assert.Equal(t, -int64(usd(0.4)), st.Net["creditsNew"], "net is minus what was charged")
	b, err := seed.Balances(ctx, db, "l")
	require.NoError(t, err)
	assert.Equal(t, usd(0.6), usd(b["creditsNew"]))
	assert.Equal(t, usd(0.4), usd(b["creditsNewUsed"]))
	assert.EqualValues(t, 80, b["tokensUserNew"])
	assert.EqualValues(t, 40, b["totalInputTokens"])
	assert.EqualValues(t, 20, b["totalOutputTokens"])
}

// Carved holds of one lease settled at once by two instances sharing the
// database each leave the lease once: what was charged and what the lease
// gives back at its close add up to the balance.
func TestLeaseCarvedSettlesConcurrent(t *testing.T) {
	stores, db := twoInstances(t)
	for _, s := range stores {
		s.SetIsolation(mongostore.IsolationShared)
	}
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "l", Active: true, Migration: true, CreditsNew: 1}))
	lreq := holdReq(billing.LeaseID("o1", 1), "l", newPlan, usd(0.5), 0)
	lease, err := stores[0].Reserve(ctx, lreq)
	require.NoError(t, err)
	const n = 16
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		charged billing.Nano
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h := carved(fmt.Sprint("c", i), lease, usd(0.03))
			rc, applied, err := stores[i%2].Settle(ctx, billing.SettleRequest{Hold: h, Cost: usd(0.01) * billing.Nano(1+i%3), By: billing.SettledByRequest})
			if assert.NoError(t, err) && assert.True(t, applied) {
				mu.Lock()
				charged += rc.Charged
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	lreq.Want = 0
	lease, err = stores[1].Reserve(ctx, lreq)
	require.NoError(t, err)
	assert.Equal(t, usd(0.5)-charged, lease.Amount(), "each settlement left the lease once")
	_, _, err = stores[1].FlushLease(ctx, billing.LeaseFlush{Lease: lease, Close: true})
	require.NoError(t, err)
	b, err := seed.Balances(ctx, db, "l")
	require.NoError(t, err)
	assert.Equal(t, usd(1)-charged, usd(b["creditsNew"]))
	st := readState(t, db, "l")
	assert.Equal(t, -int64(charged), st.Net["creditsNew"])
	assert.Zero(t, st.Held)
	assert.EqualValues(t, n, st.DoneN)
}
