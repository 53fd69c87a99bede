package ledgertest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// reserveCases are the semantics of billing.Ledger.Reserve and Balances.
var reserveCases = []confTest{
	{"Reserve/takes Want from the first field", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.4), usd(0.01)))
		assert.Equal(t, []billing.Nano{usd(0.4)}, h.Taken)
		assert.Equal(t, usd(0.01), h.Input, "input")
		assert.Equal(t, c.id("r1"), h.RequestID)
		assert.Equal(t, u, h.User)
		assert.Equal(t, usd(0.6), c.balances(u).CreditsNew)
	}},
	{"Reserve/is idempotent by request id", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.req("r1", u, planNew, usd(0.4), usd(0.01))
		h := c.reserve(req)
		req.Want, req.Min = usd(0.9), usd(0.9) // asking again, even for another amount, is the same hold
		h2 := c.reserve(req)
		assert.Equal(t, h.Taken, h2.Taken, "taken")
		assert.Equal(t, h.LogID, h2.LogID, "log id")
		assert.Equal(t, h.Input, h2.Input, "input")
		assert.Equal(t, h.Owner, h2.Owner, "owner")
		assert.True(t, h.At.Equal(h2.At) && h.Expires.Equal(h2.Expires), "times: %v %v", h2.At, h2.Expires)
		assert.Equal(t, usd(0.6), c.balances(u).CreditsNew)
	}},
	{"Reserve/is idempotent when the pool is empty since", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.req("r1", u, planNew, usd(1), usd(0.5))
		h := c.reserve(req)
		h2 := c.reserve(req)
		assert.Equal(t, h.Taken, h2.Taken)
	}},
	{"Reserve/takes what the pool has when below Want", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.3)})
		h := c.reserve(c.req("r1", u, planNew, usd(1), usd(0.01)))
		assert.Equal(t, usd(0.3), h.Amount())
		assert.Zero(t, c.balances(u).CreditsNew)
	}},
	{"Reserve/takes Want even below Min when the pool has Min", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h := c.reserve(c.req("r1", u, planNew, usd(0.1), usd(0.2)))
		assert.Equal(t, usd(0.1), h.Amount())
	}},
	{"Reserve/caps Input by the hold", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.3)})
		req := c.req("r1", u, planNew, usd(1), usd(0.1))
		req.Input = usd(0.5)
		h := c.reserve(req)
		assert.Equal(t, usd(0.3), h.Input)
	}},
	{"Reserve/refuses below Min", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.001)})
		_, err := c.s.Reserve(c.ctx, c.req("r1", u, planNew, usd(1), usd(0.01)))
		var ie *billing.InsufficientError
		require.ErrorAs(t, err, &ie)
		assert.Equal(t, usd(0.001), ie.Balance, "balance")
		assert.Equal(t, usd(0.01), ie.Need, "need")
		assert.Equal(t, usd(0.001), c.balances(u).CreditsNew, "nothing taken")
	}},
	{"Reserve/refuses an empty pool even with Min 0", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: 0, Credits: usd(5)})
		_, err := c.s.Reserve(c.ctx, c.req("r1", u, planNew, 0, 0))
		var ie *billing.InsufficientError
		require.ErrorAs(t, err, &ie)
		assert.Zero(t, ie.Balance)
		assert.Zero(t, ie.Need)
	}},
	{"Reserve/takes a zero hold from a pool with something", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: 0, RefCredits: usd(0.2)})
		h := c.reserve(c.req("r1", u, planOld, 0, 0))
		assert.Equal(t, []billing.Nano{0, 0}, h.Taken)
		assert.Equal(t, usd(0.2), c.balances(u).RefCredits)
	}},
	{"Reserve/unknown user", func(t *testing.T, c *confCase) {
		_, err := c.s.Reserve(c.ctx, c.req("r1", c.id("nobody"), planNew, usd(1), 0))
		assert.ErrorIs(t, err, billing.ErrUserNotFound)
	}},
	{"Reserve/refuses a request id that cannot key a hold", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.req("r.1", u, planNew, usd(1), 0)
		_, err := c.s.Reserve(c.ctx, req)
		require.Error(t, err)
		assert.NotErrorIs(t, err, billing.ErrUserNotFound)
		assert.Equal(t, usd(1), c.balances(u).CreditsNew)
	}},
	{"Reserve/multi-field plan takes the first field then the second", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: usd(0.5), RefCredits: usd(0.25)})
		h := c.reserve(c.req("r1", u, planOld, usd(0.6), 0))
		assert.Equal(t, []billing.Nano{usd(0.5), usd(0.1)}, h.Taken)
		b := c.balances(u)
		assert.Zero(t, b.Credits, "credits")
		assert.Equal(t, usd(0.15), b.RefCredits, "refCredits")
	}},
	{"Reserve/multi-field plan skips a first field below zero", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{Credits: -usd(0.5), RefCredits: usd(1)})
		h := c.reserve(c.req("r1", u, planOld, usd(0.6), usd(0.6)))
		assert.Equal(t, []billing.Nano{0, usd(0.6)}, h.Taken)
		b := c.balances(u)
		assert.Equal(t, -usd(0.5), b.Credits, "credits left below zero")
		assert.Equal(t, usd(0.4), b.RefCredits, "refCredits")
		_, err := c.s.Reserve(c.ctx, c.req("r2", u, planOld, usd(1), usd(0.5)))
		var ie *billing.InsufficientError
		require.ErrorAs(t, err, &ie, "the negative field counts as 0")
		assert.Equal(t, usd(0.4), ie.Balance)
	}},
	{"Reserve/drops the receipts named by Clear", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h1 := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.2), 0), usd(0.1))
		req := c.req("r2", u, planNew, usd(0.2), 0)
		req.Clear = []string{h1.RequestID}
		c.reserve(req)
		_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h1, Cost: usd(0.1), By: billing.SettledByRequest})
		assert.ErrorIs(t, err, billing.ErrNoHold, "the receipt went with the hold")
	}},
	{"Reserve/refuses a request settled before whose receipt is kept", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		req := c.req("r1", u, planNew, usd(0.2), 0)
		c.settleAfterReserve(req, usd(0.1))
		req.Want = 0 // as a lookup of a hold whose answer was lost
		_, err := c.s.Reserve(c.ctx, req)
		assert.ErrorIs(t, err, billing.ErrNoHold, "a request is held once")
		assert.Equal(t, billing.Balances{CreditsNew: usd(0.9)}, c.balances(u))
	}},
	{"Reserve/counts out only the receipts named by Clear that exist", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		kept := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.2), 0), usd(0.1))
		gone := c.settleAfterReserve(c.req("r2", u, planNew, usd(0.2), 0), usd(0.1))
		require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{gone.RequestID}))
		for i, want := range []billing.Nano{usd(0.2), 0} {
			req := c.req(fmt.Sprint("r", 3+i), u, planNew, want, 0)
			req.Clear = []string{gone.RequestID}
			h := c.settleAfterReserve(req, 0)
			require.NoError(t, c.s.ClearReceipts(c.ctx, u, []string{h.RequestID}))
		}
		// The receipt still kept is still counted: the sweeper finds it.
		later := time.Now().Add(time.Hour)
		os, err := c.s.Orphans(c.ctx, billing.OrphanQuery{Now: later, OwnerDeadline: later.Add(-2 * time.Hour), ReceiptAge: time.Minute})
		require.NoError(t, err)
		var found bool
		for _, o := range os {
			found = found || (o.Receipt != nil && o.Hold.RequestID == kept.RequestID)
		}
		assert.True(t, found, "the kept receipt is still swept")
	}},
	{"Reserve/keeps the receipts named by Clear when it fails", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(0.2)})
		h1 := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.2), 0), usd(0.2))
		req := c.req("r2", u, planNew, usd(0.2), usd(0.1))
		req.Clear = []string{h1.RequestID}
		_, err := c.s.Reserve(c.ctx, req)
		var ie *billing.InsufficientError
		require.ErrorAs(t, err, &ie)
		rc, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h1, Cost: usd(0.2), By: billing.SettledByRequest})
		require.NoError(t, err, "the receipt is still there")
		assert.False(t, applied)
		assert.Equal(t, usd(0.2), rc.Charged)
	}},
	{"Reserve/again drops the receipts named by Clear", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h1 := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.2), 0), usd(0.1))
		req := c.req("r2", u, planNew, usd(0.2), 0)
		c.reserve(req)
		req.Clear = []string{h1.RequestID}
		c.reserve(req) // the hold exists: only the receipts go
		_, _, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h1, Cost: usd(0.1), By: billing.SettledByRequest})
		assert.ErrorIs(t, err, billing.ErrNoHold)
	}},
	{"Reserve/fails when Clear names a receipt twice", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1)})
		h1 := c.settleAfterReserve(c.req("r1", u, planNew, usd(0.2), 0), usd(0.1))
		req := c.req("r2", u, planNew, usd(0.2), 0)
		req.Clear = []string{h1.RequestID, h1.RequestID}
		_, err := c.s.Reserve(c.ctx, req)
		require.Error(t, err, "the update would unset one path twice")
		var ie *billing.InsufficientError
		assert.False(t, errors.As(err, &ie))
		assert.Equal(t, usd(0.9), c.balances(u).CreditsNew, "nothing taken")
		_, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h1, Cost: usd(0.1), By: billing.SettledByRequest})
		require.NoError(t, err, "the receipt is kept")
		assert.False(t, applied)
		_, err = c.s.Reserve(c.ctx, c.req("r2", u, planNew, usd(0.2), 0))
		require.NoError(t, err, "the same request without the Clear")
		_, err = c.s.Reserve(c.ctx, req)
		assert.Error(t, err, "the hold exists: the first update fails all the same")
		req.Want, req.Min = 0, 1
		_, err = c.s.Reserve(c.ctx, req)
		assert.NoError(t, err, "Want below Min reads first: the hold exists, its Clear is exact")
		_, err = c.s.Reserve(c.ctx, c.req("r3", c.id("nobody"), planNew, usd(0.2), 0))
		assert.ErrorIs(t, err, billing.ErrUserNotFound, "without Clear")
		req = c.req("r3", c.id("nobody"), planNew, usd(0.2), 0)
		req.Clear = []string{"x", "x"}
		_, err = c.s.Reserve(c.ctx, req)
		assert.NotErrorIs(t, err, billing.ErrUserNotFound, "the update fails before it finds no user")
	}},
	{"Balances/reads the fields", func(t *testing.T, c *confCase) {
		u := c.user("u", billing.Balances{CreditsNew: usd(1), Credits: usd(2), RefCredits: usd(3)})
		assert.Equal(t, billing.Balances{CreditsNew: usd(1), Credits: usd(2), RefCredits: usd(3)}, c.balances(u))
		_, err := c.s.Balances(c.ctx, c.id("nobody"))
		assert.ErrorIs(t, err, billing.ErrUserNotFound)
	}},
}

// settleAfterReserve takes the hold and settles it with cost.
func (c *confCase) settleAfterReserve(req billing.HoldRequest, cost billing.Nano) billing.Hold {
	c.t.Helper()
	h := c.reserve(req)
	c.settle(h, cost)
	return h
}
