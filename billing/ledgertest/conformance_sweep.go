package ledgertest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// settleManyCases are the semantics of billing.Ledger.SettleMany.
var settleManyCases = []confTest{
	{"SettleMany/settles every group", func(t *testing.T, c *confCase) {
		a := c.user("a", billing.Balances{CreditsNew: usd(1), Credits: usd(1)})
		b := c.user("b", billing.Balances{CreditsNew: usd(1)})
		a1 := c.reserve(c.req("a1", a, planNew, usd(0.3), 0))
		a2 := c.reserve(c.req("a2", a, planNew, usd(0.3), 0))
		a3 := c.reserve(c.req("a3", a, planOld, usd(0.3), 0))
		b1 := c.reserve(c.req("b1", b, planNew, usd(0.3), 0))
		reqs := []billing.SettleRequest{
			{Hold: a1, Cost: usd(0.1), By: billing.SettledByRequest}, {Hold: b1, Cost: usd(0.3), By: billing.SettledByRequest},
			{Hold: a3, Cost: 0, By: billing.SettledByRequest}, {Hold: a2, Cost: usd(0.2), By: billing.SettledByRequest},
		}
		rcs, err := c.s.SettleMany(c.ctx, reqs)
		require.NoError(t, err)
		require.Len(t, rcs, 4)
		for i, r := range reqs {
			assert.Equal(t, r.Hold.RequestID, rcs[i].RequestID, "receipts in the order asked")
			assert.Equal(t, r.Cost, rcs[i].Charged, "charged")
			assert.Equal(t, r.Hold.LogID, rcs[i].LogID, "log id")
		}
		assert.Equal(t, billing.Balances{CreditsNew: usd(0.7), Credits: usd(1)}, c.balances(a))
		assert.Equal(t, billing.Balances{CreditsNew: usd(0.7)}, c.balances(b))
		rc, applied, err := c.s.Settle(c.ctx, reqs[1])
		require.NoError(t, err, "settled: the receipt is there")
		assert.False(t, applied)
		assert.Equal(t, usd(0.3), rc.Charged)
	}},
	{"SettleMany/all or none per user and plan", func(t *testing.T, c *confCase) {
		a := c.user("a", billing.Balances{CreditsNew: usd(1)})
		b := c.user("b", billing.Balances{CreditsNew: usd(1)})
		a1 := c.reserve(c.req("a1", a, planNew, usd(0.3), 0))
		a2 := c.reserve(c.req("a2", a, planNew, usd(0.3), 0))
		b1 := c.reserve(c.req("b1", b, planNew, usd(0.3), 0))
		c.settle(a1, usd(0.3)) // settled before: a's group cannot apply
		reqs := []billing.SettleRequest{
			{Hold: a1, Cost: usd(0.1), By: billing.SettledByRequest}, {Hold: a2, Cost: usd(0.1), By: billing.SettledByRequest},
			{Hold: b1, Cost: usd(0.1), By: billing.SettledByRequest},
		}
		_, err := c.s.SettleMany(c.ctx, reqs)
		require.ErrorIs(t, err, billing.ErrNotAllHeld)
		assert.Equal(t, usd(0.4), c.balances(a).CreditsNew, "a2 still held")
		_, applied, err := c.s.Settle(c.ctx, reqs[1])
		require.NoError(t, err)
		assert.True(t, applied, "a2 was left held")
		_, applied, err = c.s.Settle(c.ctx, reqs[2])
		require.NoError(t, err)
		assert.False(t, applied, "b1, of another user, was settled")
		assert.Equal(t, usd(0.9), c.balances(b).CreditsNew)
	}},
	{"SettleMany/refuses a cost above a hold before anything", func(t *testing.T, c *confCase) {
		a := c.user("a", billing.Balances{CreditsNew: usd(1)})
		a1 := c.reserve(c.req("a1", a, planNew, usd(0.3), 0))
		a2 := c.reserve(c.req("a2", a, planNew, usd(0.3), 0))
		_, err := c.s.SettleMany(c.ctx, []billing.SettleRequest{
			{Hold: a1, Cost: usd(0.1), By: billing.SettledByRequest}, {Hold: a2, Cost: usd(0.5), By: billing.SettledByRequest},
		})
		require.Error(t, err)
		assert.NotErrorIs(t, err, billing.ErrNotAllHeld)
		assert.Equal(t, usd(0.4), c.balances(a).CreditsNew, "both still held")
		rcs, err := c.s.SettleMany(c.ctx, nil)
		assert.NoError(t, err, "nothing to settle")
		assert.Empty(t, rcs)
	}},
	{"SettleMany/unknown user is not all held", func(t *testing.T, c *confCase) {
		h := billing.Hold{RequestID: c.id("r1"), User: c.id("nobody"), Plan: planNew, Taken: []billing.Nano{usd(1)}}
		_, err := c.s.SettleMany(c.ctx, []billing.SettleRequest{{Hold: h, Cost: usd(0.1), By: billing.SettledByRequest}})
		assert.ErrorIs(t, err, billing.ErrNotAllHeld)
	}},
}

// sweepCases are the semantics of billing.Sweeper and of the request log
// insert.
var sweepCases = []confTest{
	{"Orphans/lease ended", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		require.NoError(t, c.s.Heartbeat(c.ctx, c.id("owner"), c.now))
		old := c.req("old", u, planNew, usd(0.1), 0)
		old.Expires = c.now.Add(-time.Minute)
		c.reserve(old)
		c.reserve(c.req("live", u, planNew, usd(0.1), 0))
		got := c.orphans(billing.OrphanQuery{Now: c.now, OwnerDeadline: c.now.Add(-time.Minute), ReceiptAge: time.Hour})
		assert.Equal(t, []string{"hold:old"}, got)
	}},
	{"Orphans/a hold without a lease end", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		require.NoError(t, c.s.Heartbeat(c.ctx, c.id("owner"), c.now))
		req := c.req("r1", u, planNew, usd(0.1), 0)
		req.Expires = time.Time{}
		c.reserve(req)
		got := c.orphans(billing.OrphanQuery{Now: c.now, OwnerDeadline: c.now.Add(-time.Minute), ReceiptAge: time.Hour})
		assert.Equal(t, []string{"hold:r1"}, got, "a zero Expires has ended")
	}},
	{"Orphans/dead owner", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		require.NoError(t, c.s.Heartbeat(c.ctx, c.id("owner"), c.now))
		c.reserve(c.req("r1", u, planNew, usd(0.1), 0))
		dead := c.id("owner")
		got := c.orphans(billing.OrphanQuery{Now: c.now, OwnerDeadline: c.now.Add(-time.Minute), ReceiptAge: time.Hour,
			Dead: func(owner string) bool { return owner == dead }})
		assert.Equal(t, []string{"hold:r1"}, got)
	}},
	{"Orphans/owner silent since the deadline", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		deadline := c.now.Add(-5 * time.Minute)
		mk := func(rid, owner string, at time.Time) {
			r := c.req(rid, u, planNew, usd(0.1), 0)
			r.Owner, r.At = c.id(owner), at
			c.reserve(r)
		}
		mk("silent", "never", c.now.Add(-10*time.Minute)) // no heartbeat at all
		mk("stale", "stale", c.now.Add(-10*time.Minute))  // heartbeat before the deadline
		mk("alive", "alive", c.now.Add(-10*time.Minute))  // heartbeat since
		mk("young", "never", c.now.Add(-time.Minute))     // taken after the deadline: may not have beaten yet
		mk("edge", "never", deadline)                     // taken at the deadline
		require.NoError(t, c.s.Heartbeat(c.ctx, c.id("stale"), c.now.Add(-20*time.Minute)))
		require.NoError(t, c.s.Heartbeat(c.ctx, c.id("alive"), deadline))
		got := c.orphans(billing.OrphanQuery{Now: c.now, OwnerDeadline: deadline, ReceiptAge: time.Hour})
		assert.ElementsMatch(t, []string{"hold:silent", "hold:stale"}, got)
	}},
	{"Orphans/the hold as taken", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.1), RefCredits: usd(1)})
		req := c.req("r1", u, planOld, usd(0.3), usd(0.05))
		req.Expires = c.now.Add(-time.Minute)
		h := c.reserve(req)
		os, err := c.s.Orphans(c.ctx, billing.OrphanQuery{Now: c.now, OwnerDeadline: c.now.Add(-time.Hour), ReceiptAge: time.Hour})
		require.NoError(t, err)
		var got *billing.Orphan
		for i := range os {
			if os[i].Hold.RequestID == h.RequestID {
				got = &os[i]
			}
		}
		require.NotNil(t, got, "found")
		assert.Nil(t, got.Receipt)
		g := got.Hold
		assert.Equal(t, u, g.User)
		assert.Equal(t, planOld.String(), g.Plan.String())
		assert.Equal(t, h.Taken, g.Taken)
		assert.Equal(t, h.Input, g.Input)
		assert.Equal(t, h.LogID, g.LogID)
		assert.Equal(t, []string{h.Owner, h.Model, h.KeyID}, []string{g.Owner, g.Model, g.KeyID})
		assert.True(t, h.At.Equal(g.At) && h.Expires.Equal(g.Expires), "times")
	}},
	{"Orphans/receipts older than ReceiptAge", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.3), 0), usd(0.2))
		now := time.Now()
		assert.Empty(t, c.orphans(billing.OrphanQuery{Now: now, OwnerDeadline: now.Add(-time.Hour), ReceiptAge: time.Minute}), "young")
		later := now.Add(2 * time.Minute)
		os, err := c.s.Orphans(c.ctx, billing.OrphanQuery{Now: later, OwnerDeadline: now.Add(-time.Hour), ReceiptAge: time.Minute})
		require.NoError(t, err)
		var got *billing.Orphan
		for i := range os {
			if os[i].Hold.RequestID == h.RequestID {
				got = &os[i]
			}
		}
		require.NotNil(t, got, "old enough")
		require.NotNil(t, got.Receipt)
		assert.Equal(t, usd(0.2), got.Receipt.Charged)
		assert.Equal(t, []billing.Nano{usd(0.2)}, got.Receipt.Taken)
		assert.Equal(t, billing.SettledByRequest, got.Receipt.By)
		assert.Equal(t, h.RequestID, got.Receipt.RequestID)
		assert.Equal(t, u, got.Hold.User)
		assert.Equal(t, h.LogID, got.Hold.LogID)
		assert.Equal(t, planNew.String(), got.Hold.Plan.String())
	}},
	{"Orphans/does not apply Skip", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		old := c.req("r1", u, planNew, usd(0.1), 0)
		old.Expires = c.now.Add(-time.Minute)
		c.reserve(old)
		got := c.orphans(billing.OrphanQuery{Now: c.now, OwnerDeadline: c.now.Add(-time.Hour), ReceiptAge: time.Hour,
			Skip: map[string]bool{old.RequestID: true}})
		assert.Equal(t, []string{"hold:r1"}, got, "the caller skips them")
	}},
	{"InsertRequestLogs/is idempotent by ID", func(t *testing.T, c *confCase) {
		var lid billing.LogID
		copy(lid[:], c.prefix)
		lid[11] = 1
		row := billing.RequestLog{ID: lid, UserID: c.id("u"), RequestID: c.id("r1"), Model: "m", CreatedAt: c.now}
		require.NoError(t, c.s.InsertRequestLogs(c.ctx, []billing.RequestLog{row}))
		require.NoError(t, c.s.InsertRequestLogs(c.ctx, []billing.RequestLog{row, row}), "again, twice in one batch")
		require.NoError(t, c.s.InsertRequestLogs(c.ctx, nil), "nothing")
		if c.sub.LogRows != nil {
			assert.Equal(t, 1, c.sub.LogRows(t, lid))
		}
	}},
}
