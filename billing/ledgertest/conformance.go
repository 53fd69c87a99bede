package ledgertest

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Backend is a store the conformance suite runs against: the ledger with
// credit leases, the sweeper and the request log insert.
type Backend interface {
	billing.LeaseLedger
	billing.Sweeper
	InsertRequestLogs(ctx context.Context, logs []billing.RequestLog) error
}

// Subject is what Conformance needs of a store.
type Subject struct {
	Store Backend
	// AddUser creates a user with the given balances.
	AddUser func(t *testing.T, id string, b billing.Balances)
	// LogRows, when set, counts the request log rows with the id.
	LogRows func(t *testing.T, id billing.LogID) int
}

// Conformance runs the semantics every billing.Ledger and billing.Sweeper
// of the project shares, one subtest each, against one store: the cases
// use users, request ids and owners of their own, numbered across every
// run in the process, so a store may be shared by cases and by runs (a
// database started once). Receipts are stamped by the store's clock,
// which must be the wall clock (the MongoDB store's is).
func Conformance(t *testing.T, sub Subject) {
	for _, tc := range conformanceCases {
		t.Run(tc.name, func(t *testing.T) {
			tc.run(t, newCase(t, sub))
		})
	}
}

// caseCount numbers the cases of every run in the process, so that runs
// against one database do not meet each other's users.
var caseCount atomic.Int64

// confCase is one subtest's context: its unique prefix and time.
type confCase struct {
	s      Backend
	sub    Subject
	t      *testing.T
	ctx    context.Context
	prefix string
	now    time.Time
}

func newCase(t *testing.T, sub Subject) *confCase {
	return &confCase{
		s: sub.Store, sub: sub, t: t, ctx: context.Background(),
		prefix: fmt.Sprintf("conf%d-", caseCount.Add(1)), now: time.Now().Truncate(time.Millisecond),
	}
}

// Plans of the suite.
var (
	planNew = mustPlan(billing.FieldCreditsNew)
	planOld = mustPlan(billing.FieldCredits, billing.FieldRefCredits)
)

func mustPlan(fields ...string) billing.CreditPlan {
	p, err := billing.ParseCreditPlan(fields)
	if err != nil {
		panic(err)
	}
	return p
}

// usd is a USD amount in Nano.
func usd(v float64) billing.Nano { return billing.NanoFromUSD(v) }

// user creates the case's user name with the balances.
func (c *confCase) user(name string, b billing.Balances) string {
	id := c.prefix + name
	c.sub.AddUser(c.t, id, b)
	return id
}

// id makes a request id or owner name unique to the case.
func (c *confCase) id(name string) string { return c.prefix + name }

// req asks for a hold of want (at least minimum) by a live owner, leased
// for an hour.
func (c *confCase) req(rid, user string, plan billing.CreditPlan, want, minimum billing.Nano) billing.HoldRequest {
	var lid billing.LogID
	binary.BigEndian.PutUint32(lid[:4], uint32(c.now.Unix()))
	hash := fnv.New64a()
	hash.Write([]byte(c.prefix + rid))
	binary.BigEndian.PutUint64(lid[4:], hash.Sum64())
	return billing.HoldRequest{
		RequestID: c.id(rid), User: user, Plan: plan, Want: want, Min: minimum, Input: minimum,
		Owner: c.id("owner"), At: c.now, Expires: c.now.Add(time.Hour), LogID: lid, Model: "m", KeyID: "sk-t...abcd",
	}
}

// reserve takes a hold that must succeed.
func (c *confCase) reserve(req billing.HoldRequest) billing.Hold {
	c.t.Helper()
	h, err := c.s.Reserve(c.ctx, req)
	require.NoError(c.t, err, "reserve %s", req.RequestID)
	return h
}

// settle settles h with cost by the request, and must apply.
func (c *confCase) settle(h billing.Hold, cost billing.Nano) billing.Receipt {
	c.t.Helper()
	rc, applied, err := c.s.Settle(c.ctx, billing.SettleRequest{Hold: h, Cost: cost, By: billing.SettledByRequest})
	require.NoError(c.t, err, "settle %s", h.RequestID)
	require.True(c.t, applied, "settle %s applied", h.RequestID)
	return rc
}

// balances reads the user's balances.
func (c *confCase) balances(user string) billing.Balances {
	c.t.Helper()
	b, err := c.s.Balances(c.ctx, user)
	require.NoError(c.t, err, "balances of %s", user)
	return b
}

// orphans runs the query and keeps the case's orphans, as "hold:rid" or
// "receipt:rid" without the prefix.
func (c *confCase) orphans(q billing.OrphanQuery) []string {
	c.t.Helper()
	os, err := c.s.Orphans(c.ctx, q)
	require.NoError(c.t, err, "orphans")
	var out []string
	for _, o := range os {
		rid, ok := strings.CutPrefix(o.Hold.RequestID, c.prefix)
		if !ok {
			continue
		}
		kind := "hold:"
		if o.Receipt != nil {
			kind = "receipt:"
		}
		out = append(out, kind+rid)
	}
	return out
}

type confTest struct {
	name string
	run  func(t *testing.T, c *confCase)
}

var conformanceCases []confTest

func init() {
	conformanceCases = append(conformanceCases, reserveCases...)
	conformanceCases = append(conformanceCases, settleCases...)
	conformanceCases = append(conformanceCases, settleManyCases...)
	conformanceCases = append(conformanceCases, sweepCases...)
	conformanceCases = append(conformanceCases, leaseCases...)
}
