package e2e

import (
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// With credit_lease on, a busy user's holds are carved from a lease in
// memory: most of 120 streams (8 at a time) take no database write before
// they are forwarded, as holds_total{source} says. When the lease goes
// back (idle for 5 s), the money is exact: every stream logged once, the
// charges are the balance drop, no hold or lease left.
func TestCreditLeaseServesABusyUser(t *testing.T) {
	reloadWith(t, configOpts{appExtra: "\n\t\tcredit_lease on"})
	defer reloadWith(t, configOpts{})
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 100})
	start := billing.NanoFromUSD(100)
	const leaseSeries = `caddy_llm_billing_holds_total{source="lease"}`
	before, _ := metricValue(t, leaseSeries)

	const streams = 120
	var o outcome
	var wg sync.WaitGroup
	slots := make(chan struct{}, 8)
	for i := 0; i < streams; i++ {
		wg.Add(1)
		slots <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			fire(t, chatURL, key, antStream(40), "", &o)
		}()
	}
	wg.Wait()
	require.EqualValues(t, streams, o.ok.Load(), "every stream served (refused %d, other %d)", o.refused.Load(), o.other.Load())
	after, _ := metricValue(t, leaseSeries)
	t.Logf("%d of %d holds carved from a lease", int(after-before), streams)
	assert.Greater(t, after-before, float64(streams/2), "most holds come from a lease")

	st := waitSettled(t, u.ID, streams, "creditsNew")
	checkMoney(t, st, start, streams, "creditsNew")
}
