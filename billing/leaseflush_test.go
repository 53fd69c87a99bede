package billing

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func testLease(t *testing.T) (Hold, func(rid string, taken ...Nano) Hold) {
	t.Helper()
	plan, err := ParseCreditPlan([]string{FieldCredits, FieldRefCredits})
	require.NoError(t, err)
	lease := Hold{RequestID: LeaseID("o1", 1), User: "u", Plan: plan, Taken: []Nano{300, 200}, Input: 400}
	carve := func(rid string, taken ...Nano) Hold {
		return Hold{RequestID: rid, User: "u", Plan: plan, Taken: taken, Lease: lease.RequestID}
	}
	return lease, carve
}

func TestPlanFlushAmounts(t *testing.T) {
	lease, carve := testLease(t)
	at := time.Unix(100, 0)
	f := LeaseFlush{Lease: lease, Settles: []SettleRequest{
		{Hold: carve("a", 300, 0), Cost: 100, By: SettledByRequest},
		{Hold: carve("b", 0, 150), Cost: 150, By: SettledByRequest},
	}}
	p, err := PlanFlush(f, at)
	require.NoError(t, err)
	assert.Equal(t, []Nano{200, 50}, p.Next.Taken, "what the settlements keep leaves the lease")
	assert.Equal(t, Nano(250), p.Next.Input, "input capped by the lease")
	assert.Equal(t, []Nano{0, 0}, p.Back)
	assert.Equal(t, Nano(250), p.Charged)
	assert.Equal(t, []Nano{0, 150}, p.Receipts[1].Taken)
	assert.Equal(t, at, p.Receipts[0].At)

	f.Keep = []Nano{50, 50}
	p, err = PlanFlush(f, at)
	require.NoError(t, err)
	assert.Equal(t, []Nano{50, 50}, p.Next.Taken)
	assert.Equal(t, []Nano{150, 0}, p.Back)

	f.Close = true
	p, err = PlanFlush(f, at)
	require.NoError(t, err)
	assert.True(t, p.Closed)
	assert.Zero(t, p.Next.RequestID)
	assert.Equal(t, []Nano{200, 50}, p.Back, "Keep is ignored with Close")
}

func TestPlanFlushRefuses(t *testing.T) {
	lease, carve := testLease(t)
	other := carve("x", 10, 0)
	other.Lease = LeaseID("o2", 1)
	for name, f := range map[string]LeaseFlush{
		"not a lease":          {Lease: Hold{RequestID: "r1", Plan: lease.Plan, Taken: []Nano{1, 1}}},
		"another lease":        {Lease: lease, Settles: []SettleRequest{{Hold: other}}},
		"cost above the hold":  {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 10, 0), Cost: 11}}},
		"negative cost":        {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 10, 0), Cost: -1}}},
		"fields mismatch":      {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 10)}}},
		"above the lease":      {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 0, 300), Cost: 300}}},
		"Keep above the rest":  {Lease: lease, Keep: []Nano{301, 0}},
		"Keep of other fields": {Lease: lease, Keep: []Nano{1}},
		"a request twice":      {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 1, 0)}, {Hold: carve("a", 1, 0)}}},
		"settled and cleared":  {Lease: lease, Settles: []SettleRequest{{Hold: carve("a", 1, 0)}}, Clear: []string{"a"}},
	} {
		_, err := PlanFlush(f, time.Time{})
		assert.Error(t, err, name)
	}
}
