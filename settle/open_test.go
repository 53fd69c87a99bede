package settle_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
	"github.com/trollllm/caddy-llm-billing/settle"
)

// A request served from a credit lease exists only in its process until
// its settlement is written. When the process dies, the next run charges
// the one still in flight under the orphan policy and the one settled in
// the journal what it cost, each once, then closes the lease; a later run
// finds nothing more to charge.
func TestOpenHoldsOfDeadRunChargedOnce(t *testing.T) {
	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { return now }
	store := ledgertest.New()
	store.SetClock(clock)
	store.AddUser("u1", billing.Balances{CreditsNew: 1_000_000})
	plan, err := billing.ParseCreditPlan([]string{billing.FieldCreditsNew})
	require.NoError(t, err)
	ls, err := store.Reserve(context.Background(), billing.HoldRequest{
		RequestID: billing.LeaseID("i1/run1", 1), User: "u1", Plan: plan, Want: 100_000, Min: 100_000,
		Owner: "i1/run1", At: now, Expires: now.Add(time.Hour), LogID: logID(1),
	})
	require.NoError(t, err)
	carved := func(id string, n int) billing.Hold {
		return billing.Hold{RequestID: id, User: "u1", Plan: plan, Taken: []billing.Nano{10_000}, Input: 3_000,
			Owner: "i1/run1", At: now, Expires: now.Add(time.Hour), LogID: logID(n), Lease: ls.RequestID}
	}
	inFlight, served := carved("r1", 2), carved("r2", 3)

	j := newMemJournal()
	run1 := settle.New(settle.Config{Store: store, Owner: "i1/run1", Now: clock})
	run1.Recover(j, nil)
	run1.JournalHold(inFlight)
	run1.JournalHold(served)
	// r2's settlement reaches the journal and the queue; the process dies
	// before the queue is settled.
	run1.Submit(&settle.Settlement{Hold: served, Cost: 5_000, Bill: true, Log: billing.RequestLog{
		ID: served.LogID, UserID: "u1", RequestID: "r2", CreditField: plan.String(), CostNano: 5_000,
	}})

	restart := func(run string) {
		st := settle.New(settle.Config{Store: store, Owner: "i1/" + run, Now: clock})
		st.Recover(j, j.records())
		st.Heartbeat(now)
		require.True(t, st.RetryOnce(time.Second))
		st.SweepPredecessors(now)
		st.FlushClears(true)
	}
	restart("run2")

	snap := store.Snapshot()
	require.NoError(t, snap.Check())
	rows := map[string]billing.RequestLog{}
	for _, row := range snap.Logs {
		rows[row.RequestID] = row
	}
	require.Len(t, rows, 2)
	assert.Equal(t, billing.SourceHoldFallback, rows["r1"].UsageSource)
	assert.Equal(t, int64(3_000), rows["r1"].ChargedNano, "charge_input: the hold's input part")
	assert.Equal(t, int64(5_000), rows["r2"].ChargedNano)
	assert.Empty(t, j.records(), "both requests are done in the journal")
	u := snap.Users[0]
	assert.Equal(t, billing.Nano(8_000), u.Charged[billing.FieldCreditsNew])
	assert.Empty(t, u.Holds, "the sweep closed the dead run's lease")
	assert.Equal(t, billing.Nano(1_000_000-8_000), u.Balance.CreditsNew, "the lease's rest went back to the pool")

	restart("run3")
	again := store.Snapshot()
	assert.Len(t, again.Logs, 2)
	assert.Equal(t, billing.Nano(8_000), again.Users[0].Charged[billing.FieldCreditsNew])
}
