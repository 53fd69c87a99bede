package ledgertest_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

// A simulation drives the store with its own clock and a seeded fault
// hook, and checks the invariant after each step.
func ExampleStore() {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	rnd := rand.New(rand.NewPCG(42, 0))
	s := ledgertest.New()
	s.SetClock(func() time.Time { return now })
	s.SetFaults(func(op ledgertest.Op) ledgertest.Fault {
		if op == ledgertest.OpSettle && rnd.IntN(2) == 0 {
			return ledgertest.FailAfter // settled, but the answer is lost
		}
		return ledgertest.Pass
	})
	plan, _ := billing.ParseCreditPlan([]string{billing.FieldCredits, billing.FieldRefCredits})
	s.AddUser("alice", billing.Balances{Credits: billing.NanoFromUSD(0.25), RefCredits: billing.NanoFromUSD(1)})

	ctx := context.Background()
	h, _ := s.Reserve(ctx, billing.HoldRequest{RequestID: "r1", User: "alice", Plan: plan,
		Want: billing.NanoFromUSD(0.5), At: now, Expires: now.Add(time.Minute)})
	var rc billing.Receipt
	for {
		var err error
		rc, _, err = s.Settle(ctx, billing.SettleRequest{Hold: h, Cost: billing.NanoFromUSD(0.3), By: billing.SettledByRequest})
		var fe *ledgertest.FaultError
		if !errors.As(err, &fe) {
			break // a retry recognises the settlement
		}
	}
	fmt.Println("taken:", rc.Taken)
	fmt.Println("invariant before the log row:", s.Snapshot().Check())
	_ = s.ClearReceipts(ctx, "alice", []string{"r1"}) // too early: the row is not written
	fmt.Println("invariant after:", s.Snapshot().Check() != nil)
	// Output:
	// taken: [$0.250000000 $0.050000000]
	// invariant before the log row: <nil>
	// invariant after: true
}
