package ledgertest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// settleCases are the semantics of billing.Ledger.Settle and ClearReceipts.
var settleCases = []confTest{
	{"Settle/gives back the unused part", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.4), 0))
		rc := c.settle(h, usd(0.1))
		assert.Equal(t, usd(0.1), rc.Cost, "cost")
		assert.Equal(t, usd(0.1), rc.Charged, "charged")
		assert.Zero(t, rc.Shortfall, "shortfall")
		assert.Equal(t, []billing.Nano{usd(0.1)}, rc.Taken, "taken")
		assert.Equal(t, []string{billing.FieldCreditsNew}, rc.Fields, "fields")
		assert.Equal(t, h.LogID, rc.LogID, "log id")
		assert.Equal(t, h.RequestID, rc.RequestID, "request id")
		assert.Equal(t, billing.SettledByRequest, rc.By, "by")
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew)
	}},
	{"Settle/a zero cost gives the whole hold back", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.5), RefCredits: usd(0.5)})
		h := c.reserve(c.req("r1", u, planOld, usd(0.8), 0))
		rc := c.settle(h, 0)
		assert.Zero(t, rc.Charged)
		assert.Equal(t, []billing.Nano{0, 0}, rc.Taken)
		assert.Equal(t, billing.Balances{Credits: usd(0.5), RefCredits: usd(0.5)}, c.balances(u))
	}},
	{"Settle/multi-field keeps the first field's part first", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.5), RefCredits: usd(0.25)})
		h := c.reserve(c.req("r1", u, planOld, usd(0.6), 0))
		rc := c.settle(h, usd(0.55))
		assert.Equal(t, []billing.Nano{usd(0.5), usd(0.05)}, rc.Taken)
		assert.Equal(t, billing.Balances{Credits: 0, RefCredits: usd(0.2)}, c.balances(u))
	}},
	{"Settle/charges a cost above the hold from the pool", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.2), 0))
		rc := c.settle(h, usd(0.5))
		assert.Equal(t, usd(0.5), rc.Charged, "charged")
		assert.Zero(t, rc.Shortfall, "shortfall")
		assert.Equal(t, []billing.Nano{usd(0.5)}, rc.Taken)
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew)
	}},
	{"Settle/above the hold and the pool leaves a shortfall", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.3)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.2), 0))
		rc := c.settle(h, usd(0.5))
		assert.Equal(t, usd(0.3), rc.Charged, "charged")
		assert.Equal(t, usd(0.2), rc.Shortfall, "shortfall")
		assert.Zero(t, c.balances(u).CreditsNew, "never below zero")
	}},
	{"Settle/above the hold takes the first field then the second", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.3), RefCredits: usd(0.3)})
		h := c.reserve(c.req("r1", u, planOld, usd(0.2), 0))
		rc := c.settle(h, usd(0.5)) // 0.2 held, 0.1 more from credits, 0.2 from refCredits
		assert.Equal(t, []billing.Nano{usd(0.3), usd(0.2)}, rc.Taken)
		assert.Equal(t, usd(0.5), rc.Charged)
		assert.Equal(t, billing.Balances{Credits: 0, RefCredits: usd(0.1)}, c.balances(u))
	}},
	{"Settle/a zero hold takes the cost from both fields", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.1), RefCredits: usd(0.1)})
		h := c.reserve(c.req("r1", u, planOld, 0, 0))
		rc := c.settle(h, usd(0.3))
		assert.Equal(t, []billing.Nano{usd(0.1), usd(0.1)}, rc.Taken)
		assert.Equal(t, usd(0.1), rc.Shortfall)
	}},
	{"Settle/twice is applied once", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.2), 0))
		rc := c.settle(h, usd(0.5))
		rc2, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: usd(0.7), By: billing.SettledByRequest})
		require.NoError(t, err)
		assert.False(t, applied)
		assert.Equal(t, rc.Charged, rc2.Charged, "the earlier receipt")
		assert.Equal(t, rc.Taken, rc2.Taken, "the earlier receipt")
		assert.Equal(t, rc.Cost, rc2.Cost, "the earlier receipt")
		assert.Equal(t, rc.LogID, rc2.LogID, "the earlier receipt")
		assert.Equal(t, rc.RequestID, rc2.RequestID, "the earlier receipt")
		assert.Equal(t, usd(0.5), c.balances(u).CreditsNew)
	}},
	{"Settle/after the sweeper returns the sweeper's receipt", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.4), usd(0.1)))
		_, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: billing.OrphanChargeInput.Cost(h), By: billing.SettledBySweeper})
		require.NoError(t, err)
		require.True(t, applied)
		rc, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: usd(0.3), By: billing.SettledByRequest})
		require.NoError(t, err)
		assert.False(t, applied)
		assert.Equal(t, billing.SettledBySweeper, rc.By)
		assert.Equal(t, usd(0.1), rc.Charged)
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew)
	}},
	{"Settle/ErrNoHold once the receipt is cleared", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.4), 0), usd(0.1))
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{h.RequestID}))
		_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: usd(0.1), By: billing.SettledByRequest})
		assert.ErrorIs(t, err, billing.ErrNoHold)
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew)
	}},
	{"Settle/trusts the amounts of the hold it is given", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.2), 0))
		h.Taken = []billing.Nano{usd(0.5)} // not what was taken: pass the hold Reserve returned
		rc := c.settle(h, usd(0.1))
		assert.Equal(t, usd(0.1), rc.Charged)
		assert.Equal(t, usd(1.2), c.balances(u).CreditsNew, "0.4 given back of a 0.2 hold")
	}},
	{"Settle/unknown user", func(t *testing.T, c *confCase) {
		h := billing.Hold{RequestID: c.id("r1"), User: c.id("nobody"), Plan: planNew, Taken: []billing.Nano{usd(1)}}
		_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: usd(0.1), By: billing.SettledByRequest})
		assert.ErrorIs(t, err, billing.ErrUserNotFound)
	}},
	{"Settle/refuses a negative cost or a hold without its plan", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.4), 0))
		_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: -1, By: billing.SettledByRequest})
		assert.Error(t, err, "negative cost")
		bad := h
		bad.Taken = []billing.Nano{1, 2}
		_, _, err = c.s.Settle(c.ctx, billing.SettleRequest{Hold: bad, Cost: 1, By: billing.SettledByRequest})
		assert.Error(t, err, "taken does not match the plan")
		assert.Equal(t, usd(0.6), c.balances(u).CreditsNew, "nothing moved")
	}},
	{"ClearReceipts/drops what exists and ignores the rest", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h1 := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.1), 0), usd(0.1))
		h2 := c.settleAfterReserve(c.req("r2", u, planNew, usd(0.1), 0), usd(0.1))
		h3 := c.settleAfterReserve(c.req("r3", u, planNew, usd(0.1), 0), usd(0.1))
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{h1.RequestID, h2.RequestID, c.id("unknown")}))
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{h1.RequestID}), "again")
		require.NoError(t, c.s.ClearReceipts(c.ctx, c.id("nobody"), []string{h1.RequestID}), "unknown user")
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, nil), "nothing")
		for _, h := range []billing.Hold{h1, h2} {
			_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: usd(0.1), By: billing.SettledByRequest})
			assert.ErrorIs(t, err, billing.ErrNoHold, h.RequestID)
		}
		_, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h3, Cost: usd(0.1), By: billing.SettledByRequest})
		assert.NoError(t, err, "r3 kept")
		assert.False(t, applied, "r3 kept")
	}},
}
