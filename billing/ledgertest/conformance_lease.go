package ledgertest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// leaseReq asks for the case's n-th lease of want on the plan.
func (c *confCase) leaseReq(user string, plan billing.CreditPlan, n uint64, want billing.Nano) billing.HoldRequest {
	req := c.req("lease", user, plan, want, 0)
	req.RequestID = billing.LeaseID(c.id("owner"), n)
	req.Input = 0
	return req
}

// carve is a hold served from the lease in memory: taken from its fields.
func (c *confCase) carve(rid string, lease billing.Hold, taken ...billing.Nano) billing.Hold {
	h := c.req(rid, lease.User, lease.Plan, 0, 0)
	return billing.Hold{RequestID: h.RequestID, User: lease.User, Plan: lease.Plan, Taken: taken, Owner: h.Owner,
		At: h.At, Expires: h.Expires, LogID: h.LogID, Model: h.Model, KeyID: h.KeyID, Lease: lease.RequestID}
}

// flush must apply.
func (c *confCase) flush(f billing.LeaseFlush) (billing.Hold, []billing.Receipt) {
	c.t.Helper()
	next, rcs, err := c.s.FlushLease(c.ctx, f)
	require.NoError(c.t, err, "flush %s", f.Lease.RequestID)
	return next, rcs
}

// leaseNow is the lease as the store holds it (Reserve again returns it).
func (c *confCase) leaseNow(req billing.HoldRequest) billing.Hold {
	c.t.Helper()
	req.Want = 0
	return c.reserve(req)
}

// leaseHeld reports whether the lease is still a hold in the store.
func (c *confCase) leaseHeld(lease billing.Hold) bool {
	c.t.Helper()
	os, err := c.s.Orphans(c.ctx, billing.OrphanQuery{Now: c.now, Dead: func(o string) bool { return o == lease.Owner }})
	require.NoError(c.t, err)
	for _, o := range os {
		if o.Receipt == nil && o.Hold.RequestID == lease.RequestID {
			return true
		}
	}
	return false
}

// check holds the case's users in the in-memory store to the store's
// invariants (Snapshot.Check); other cases break some on purpose.
func (c *confCase) check() {
	c.t.Helper()
	st, ok := c.s.(*Store)
	if !ok {
		return
	}
	all := st.Snapshot()
	snap := Snapshot{Logs: map[billing.LogID]billing.RequestLog{}}
	for _, u := range all.Users {
		if strings.HasPrefix(u.ID, c.prefix) {
			snap.Users = append(snap.Users, u)
		}
	}
	for _, id := range all.LogOrder {
		if row := all.Logs[id]; strings.HasPrefix(row.UserID, c.prefix) {
			snap.Logs[id] = row
			snap.LogOrder = append(snap.LogOrder, id)
		}
	}
	require.NoError(c.t, snap.Check())
}

func settleBy(h billing.Hold, cost billing.Nano) billing.SettleRequest {
	return billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest}
}

// leaseCases are the semantics of billing.LeaseLedger.
var leaseCases = []confTest{
	{"Lease/flush charges its settlements from the lease", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "a lease is a hold")
		h1, h2, h3 := c.carve("r1", lease, usd(0.1)), c.carve("r2", lease, usd(0.1)), c.carve("r3", lease, usd(0.2))
		next, rcs := c.flush(billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{
			settleBy(h1, usd(0.05)), settleBy(h2, usd(0.1)), settleBy(h3, 0)}})
		assert.Equal(t, []billing.Nano{usd(0.35)}, next.Taken, "lease after the flush")
		require.Len(t, rcs, 3)
		for i, want := range []billing.Nano{usd(0.05), usd(0.1), 0} {
			assert.Equal(t, want, rcs[i].Charged, "receipt %d", i)
			assert.Equal(t, []billing.Nano{want}, rcs[i].Taken, "receipt %d", i)
		}
		assert.Equal(t, h1.RequestID, rcs[0].RequestID)
		assert.Equal(t, h1.LogID, rcs[0].LogID)
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "what the lease charged was held")
		assert.Equal(t, []billing.Nano{usd(0.35)}, c.leaseNow(req).Taken, "stored lease")
		rc, applied, err := c.s.Settle(c.ctx, settleBy(h2, usd(0.2)))
		require.NoError(t, err)
		assert.False(t, applied, "settled by the flush")
		assert.Equal(t, usd(0.1), rc.Charged)
		c.check()
	}},
	{"Lease/flush on two fields keeps the first field's part first", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.3), RefCredits: usd(0.3)})
		req := c.leaseReq(u, planOld, 1, usd(0.5))
		lease := c.reserve(req)
		require.Equal(t, []billing.Nano{usd(0.3), usd(0.2)}, lease.Taken)
		h1, h2 := c.carve("r1", lease, usd(0.3), 0), c.carve("r2", lease, 0, usd(0.2))
		next, rcs := c.flush(billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(h1, usd(0.1)), settleBy(h2, usd(0.2))}})
		assert.Equal(t, []billing.Nano{usd(0.2), 0}, next.Taken)
		assert.Equal(t, []billing.Nano{0, usd(0.2)}, rcs[1].Taken)
		_, _ = c.flush(billing.LeaseFlush{Lease: next, Close: true})
		assert.Equal(t, billing.Balances{Credits: usd(0.2), RefCredits: usd(0.1)}, c.balances(u))
		c.check()
	}},
	{"Lease/flush asked again after a lost answer is applied once", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		f := billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(c.carve("r1", lease, usd(0.2)), usd(0.15))},
			Keep: []billing.Nano{usd(0.25)}}
		next, rcs := c.flush(f)
		next2, rcs2 := c.flush(f)
		assert.Equal(t, next.Taken, next2.Taken)
		require.Len(t, rcs2, 1)
		assert.Equal(t, rcs[0].Charged, rcs2[0].Charged)
		assert.Equal(t, rcs[0].Taken, rcs2[0].Taken)
		assert.Equal(t, usd(0.6), c.balances(u).CreditsNew, "0.1 given back once")
		closing := billing.LeaseFlush{Lease: next, Close: true}
		c.flush(closing)
		c.flush(closing)
		assert.Equal(t, usd(0.85), c.balances(u).CreditsNew, "the rest given back once")
		c.check()
	}},
	{"Lease/flush of a stale lease moves nothing", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		next, _ := c.flush(billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(c.carve("r1", lease, usd(0.1)), usd(0.1))}})
		h2 := c.carve("r2", lease, usd(0.1))
		_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(h2, usd(0.1))}, Close: true})
		require.ErrorIs(t, err, billing.ErrLeaseMoved)
		assert.Equal(t, next.Taken, c.leaseNow(req).Taken, "lease unchanged")
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "nothing given back")
		c.settle(h2, usd(0.1)) // not settled by the refused flush
		c.check()
	}},
	{"Lease/Keep shrinks the lease and gives the rest back", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		later := c.now.Add(2 * time.Hour)
		next, _ := c.flush(billing.LeaseFlush{Lease: lease, Keep: []billing.Nano{usd(0.1)}, Expires: later})
		assert.Equal(t, []billing.Nano{usd(0.1)}, next.Taken)
		assert.Equal(t, later.UnixMilli(), next.Expires.UnixMilli(), "expiry")
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew)
		stored := c.leaseNow(req)
		assert.Equal(t, []billing.Nano{usd(0.1)}, stored.Taken)
		assert.Equal(t, later.UnixMilli(), stored.Expires.UnixMilli(), "stored expiry")
		_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: next, Keep: []billing.Nano{usd(0.2)}})
		assert.Error(t, err, "Keep above what the lease has")
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew, "nothing moved")
		c.check()
	}},
	{"Lease/Close gives the remainder back and drops the lease", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		require.True(t, c.leaseHeld(lease))
		next, rcs := c.flush(billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(c.carve("r1", lease, usd(0.3)), usd(0.2))}, Close: true})
		assert.Zero(t, next.Amount())
		assert.Empty(t, next.RequestID, "closed")
		assert.Equal(t, usd(0.2), rcs[0].Charged)
		assert.Equal(t, usd(0.8), c.balances(u).CreditsNew)
		assert.False(t, c.leaseHeld(lease), "lease dropped")
		c.check()
	}},
	{"Lease/flush refuses a settlement outside the lease", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		h := c.carve("r1", lease, usd(0.1))
		for name, st := range map[string]billing.SettleRequest{
			"cost above the hold": settleBy(h, usd(0.2)),
			"another lease":       settleBy(func() billing.Hold { x := h; x.Lease = billing.LeaseID("x", 1); return x }(), 0),
			"above the lease":     settleBy(c.carve("r2", lease, usd(0.6)), usd(0.6)),
		} {
			_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{st}})
			assert.Error(t, err, name)
		}
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "nothing moved")
		c.settle(h, usd(0.1))
		c.check()
	}},
	{"Lease/flush of a request settled before is ErrNotAllHeld", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		h1, h2 := c.carve("r1", lease, usd(0.1)), c.carve("r2", lease, usd(0.1))
		c.settle(h1, 0) // a zero cost leaves the lease as it was
		_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(h1, usd(0.1)), settleBy(h2, usd(0.1))}})
		require.ErrorIs(t, err, billing.ErrNotAllHeld)
		assert.Equal(t, lease.Taken, c.leaseNow(req).Taken, "nothing written")
		c.settle(h2, usd(0.1))
		c.check()
	}},
	{"Lease/flush drops the receipts it is told to clear", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h0 := c.settleAfterReserve(c.req("r0", u, planNew, usd(0.1), 0), usd(0.1))
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		c.flush(billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(c.carve("r1", lease, usd(0.1)), usd(0.1))},
			Clear: []string{h0.RequestID, c.id("gone")}})
		_, _, err := c.s.Settle(c.ctx, settleBy(h0, usd(0.1)))
		assert.ErrorIs(t, err, billing.ErrNoHold, "receipt cleared")
		assert.Equal(t, usd(0.4), c.balances(u).CreditsNew)
	}},
	{"Lease/Settle of a carved hold takes its cost from the lease", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		h1, h2 := c.carve("r1", lease, usd(0.2)), c.carve("r2", lease, usd(0.2))
		rc := c.settle(h1, usd(0.15))
		assert.Equal(t, usd(0.15), rc.Charged)
		assert.Equal(t, []billing.Nano{usd(0.15)}, rc.Taken)
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "charged within the lease")
		now := c.leaseNow(req)
		assert.Equal(t, []billing.Nano{usd(0.35)}, now.Taken)
		_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: lease, Settles: []billing.SettleRequest{settleBy(h2, usd(0.1))}})
		assert.ErrorIs(t, err, billing.ErrLeaseMoved, "the lease changed under the flush")
		_, rcs := c.flush(billing.LeaseFlush{Lease: now, Settles: []billing.SettleRequest{settleBy(h2, usd(0.1))}, Close: true})
		assert.Equal(t, usd(0.1), rcs[0].Charged)
		assert.Equal(t, usd(0.75), c.balances(u).CreditsNew)
		c.check()
	}},
	{"Lease/Settle of a carved hold above the carve takes the rest from the pool", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.leaseReq(u, planNew, 1, usd(0.5))
		lease := c.reserve(req)
		rc := c.settle(c.carve("r1", lease, usd(0.1)), usd(0.3))
		assert.Equal(t, usd(0.3), rc.Charged)
		assert.Zero(t, rc.Shortfall)
		assert.Equal(t, usd(0.3), c.balances(u).CreditsNew, "0.2 above the carve")
		assert.Equal(t, []billing.Nano{usd(0.4)}, c.leaseNow(req).Taken, "0.1 from the lease")
		c.check()
	}},
	{"Lease/Settle of a carved hold once the lease is closed charges the pool", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.6)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		h1, h2 := c.carve("r1", lease, usd(0.2)), c.carve("r2", lease, usd(0.2))
		c.flush(billing.LeaseFlush{Lease: lease, Close: true})
		rc := c.settle(h1, usd(0.15))
		assert.Equal(t, usd(0.15), rc.Charged)
		assert.Equal(t, usd(0.45), c.balances(u).CreditsNew)
		rc = c.settle(h2, usd(0.5))
		assert.Equal(t, usd(0.45), rc.Charged)
		assert.Equal(t, usd(0.05), rc.Shortfall)
		assert.Zero(t, c.balances(u).CreditsNew, "never below zero")
		c.check()
	}},
	{"Lease/Settle of a carved hold twice is applied once", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		h := c.carve("r1", lease, usd(0.2))
		rc := c.settle(h, usd(0.3))
		rc2, applied, err := c.s.Settle(c.ctx, settleBy(h, usd(0.1)))
		require.NoError(t, err)
		assert.False(t, applied)
		assert.Equal(t, rc.Charged, rc2.Charged)
		assert.Equal(t, rc.Taken, rc2.Taken)
		assert.Equal(t, usd(0.4), c.balances(u).CreditsNew)
		c.check()
	}},
	{"Lease/Settle of a carved hold logged and cleared is ErrNoHold", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		h := c.carve("r1", lease, usd(0.2))
		rc := c.settle(h, usd(0.1))
		require.NoError(t, c.s.InsertRequestLogs(c.ctx, []billing.RequestLog{{ID: h.LogID, UserID: u, RequestID: h.RequestID,
			CreatedAt: c.now, CostNano: int64(rc.Cost), ChargedNano: int64(rc.Charged), TakenNano: rc.TakenByField()}}))
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{h.RequestID}))
		_, _, err := c.s.Settle(c.ctx, settleBy(h, usd(0.1)))
		assert.ErrorIs(t, err, billing.ErrNoHold)
		c.flush(billing.LeaseFlush{Lease: c.leaseNow(c.leaseReq(u, planNew, 1, 0)), Close: true})
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew)
		c.check()
	}},
	{"Lease/a write drops at most MaxClear receipts, ClearReceipts any number", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(2)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(1)))
		var settles []billing.SettleRequest
		var ids []string
		for i := range billing.MaxClear + 44 {
			h := c.carve(fmt.Sprintf("r%d", i), lease, usd(0.001))
			settles = append(settles, settleBy(h, usd(0.001)))
			ids = append(ids, h.RequestID)
		}
		lease, rcs := c.flush(billing.LeaseFlush{Lease: lease, Settles: settles})
		rows := make([]billing.RequestLog, len(rcs))
		for i, rc := range rcs {
			rows[i] = billing.RequestLog{ID: rc.LogID, UserID: u, RequestID: rc.RequestID, CreatedAt: c.now,
				CostNano: int64(rc.Cost), ChargedNano: int64(rc.Charged), TakenNano: rc.TakenByField()}
		}
		require.NoError(t, c.s.InsertRequestLogs(c.ctx, rows))
		_, _, err := c.s.FlushLease(c.ctx, billing.LeaseFlush{Lease: lease, Clear: ids[:billing.MaxClear+1]})
		assert.Error(t, err, "a flush naming more than MaxClear receipts")
		req := c.req("big", u, planNew, usd(0.1), 0)
		req.Clear = ids[:billing.MaxClear+1]
		_, err = c.s.Reserve(c.ctx, req)
		assert.Error(t, err, "a hold naming more than MaxClear receipts")
		lease, _ = c.flush(billing.LeaseFlush{Lease: lease, Clear: ids[:billing.MaxClear]})
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, append(ids, c.id("unknown"))))
		got := c.orphans(billing.OrphanQuery{Now: c.now.Add(time.Hour), Skip: map[string]bool{lease.RequestID: true}})
		assert.Empty(t, got, "every receipt dropped")
		c.flush(billing.LeaseFlush{Lease: lease, Close: true})
		assert.Equal(t, usd(2)-usd(0.001)*billing.Nano(len(ids)), c.balances(u).CreditsNew)
		c.check()
	}},
	{"Lease/Settle and SettleMany refuse a lease, SettleMany a carved hold", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		lease := c.reserve(c.leaseReq(u, planNew, 1, usd(0.5)))
		h := c.carve("r1", lease, usd(0.2))
		_, _, err := c.s.Settle(c.ctx, settleBy(lease, usd(0.1)))
		assert.ErrorIs(t, err, billing.ErrCarvedLease, "Settle of a lease")
		_, err = c.s.SettleMany(c.ctx, []billing.SettleRequest{settleBy(lease, usd(0.1))})
		assert.ErrorIs(t, err, billing.ErrCarvedLease, "SettleMany of a lease")
		_, err = c.s.SettleMany(c.ctx, []billing.SettleRequest{settleBy(h, usd(0.1))})
		assert.ErrorIs(t, err, billing.ErrCarvedLease, "SettleMany of a carved hold")
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew, "nothing moved")
		assert.True(t, c.leaseHeld(lease))
		c.settle(h, usd(0.1))
		c.check()
	}},
}
