package ledgertest_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

// logRow is the row a settlement writes for its receipt.
func logRow(user string, rc billing.Receipt) billing.RequestLog {
	return billing.RequestLog{ID: rc.LogID, UserID: user, RequestID: rc.RequestID, TakenNano: rc.TakenByField(),
		ChargedNano: int64(rc.Charged), CreatedAt: rc.At}
}

// TestSnapshot shows the state per user and field, and the log rows.
func TestSnapshot(t *testing.T) {
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0 })
	s.AddUser("c", billing.Balances{Credits: usd(0.5), RefCredits: usd(1)})
	s.AddUser("c", billing.Balances{Credits: usd(0.5)}) // a top-up
	ctx := context.Background()
	h1, err := s.Reserve(ctx, holdReq("r1", "c", planOld, usd(1.5), 0))
	require.NoError(t, err)
	h2, err := s.Reserve(ctx, holdReq("r2", "c", planOld, usd(0.2), 0))
	require.NoError(t, err)
	rc, _, err := s.Settle(ctx, settleReq(h2, usd(0.1)))
	require.NoError(t, err)
	row := logRow("c", rc)
	require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{row, row}))
	require.NoError(t, s.Heartbeat(ctx, "o1", t0))

	snap := s.Snapshot()
	u, ok := snap.User("c")
	require.True(t, ok)
	_, ok = snap.User("nobody")
	assert.False(t, ok)
	assert.Equal(t, billing.Balances{Credits: usd(1), RefCredits: usd(1)}, u.Initial, "initial, top-up included")
	assert.Equal(t, billing.Balances{Credits: 0, RefCredits: usd(0.4)}, u.Balance, "balance")
	assert.Equal(t, []billing.Nano{usd(1), usd(0.5)}, h1.Taken)
	require.Len(t, u.Holds, 1)
	assert.Equal(t, "r1", u.Holds[0].RequestID)
	assert.Equal(t, map[string]billing.Nano{billing.FieldCredits: usd(1), billing.FieldRefCredits: usd(0.5)}, u.Held, "held")
	require.Len(t, u.Receipts, 1)
	assert.Equal(t, rc.Taken, u.Receipts[0].Taken)
	assert.Equal(t, map[string]billing.Nano{billing.FieldCredits: 0, billing.FieldRefCredits: usd(0.1)}, u.Charged, "charged")
	assert.Equal(t, map[string]billing.Nano{billing.FieldCredits: -usd(1), billing.FieldRefCredits: -usd(0.6)}, u.Net, "net")
	assert.Equal(t, int64(1), u.HeldCount)
	assert.Equal(t, int64(1), u.ReceiptCount)
	assert.Equal(t, int64(1), u.Settled)
	assert.Equal(t, map[billing.LogID]billing.RequestLog{row.ID: row}, snap.Logs)
	assert.Equal(t, []billing.LogID{row.ID}, snap.LogOrder)
	assert.Equal(t, 1, snap.DuplicateLogs)
	assert.Equal(t, map[string]time.Time{"o1": t0}, mapUTC(snap.Heartbeats))
	assert.NoError(t, snap.Check())
}

func mapUTC(m map[string]time.Time) map[string]time.Time {
	for k, v := range m {
		m[k] = v.UTC()
	}
	return m
}

// TestFreshLogIDsRepeat: rows without an ID get the same IDs in every run.
func TestFreshLogIDsRepeat(t *testing.T) {
	ids := func() []billing.LogID {
		s := ledgertest.New()
		require.NoError(t, s.InsertRequestLogs(context.Background(), []billing.RequestLog{{CreatedAt: t0}, {CreatedAt: t0}}))
		return s.Snapshot().LogOrder
	}
	a := ids()
	assert.Len(t, a, 2)
	assert.NotEqual(t, a[0], a[1])
	assert.Equal(t, a, ids())
}

// TestCheck finds each way the money invariant can break.
func TestCheck(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		do   func(t *testing.T, s *ledgertest.Store, h billing.Hold)
		want string // in the error; "" for none
	}{
		{"settled, logged and cleared", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			rc, _, err := s.Settle(ctx, settleReq(h, usd(0.3)))
			require.NoError(t, err)
			require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{logRow("u", rc)}))
			require.NoError(t, s.ClearReceipts(ctx, "u", []string{h.RequestID}))
		}, ""},
		{"settled above the hold with a shortfall, logged", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			rc, _, err := s.Settle(ctx, settleReq(h, usd(3)))
			require.NoError(t, err)
			require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{logRow("u", rc)}))
		}, ""},
		{"receipt cleared before its log row", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			_, _, err := s.Settle(ctx, settleReq(h, usd(0.3)))
			require.NoError(t, err)
			require.NoError(t, s.ClearReceipts(ctx, "u", []string{h.RequestID}))
		}, "recorded 0"},
		{"log row says less than was taken", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			rc, _, err := s.Settle(ctx, settleReq(h, usd(0.3)))
			require.NoError(t, err)
			row := logRow("u", rc)
			row.TakenNano[billing.FieldCreditsNew]--
			require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{row}))
			require.NoError(t, s.ClearReceipts(ctx, "u", []string{h.RequestID}))
		}, "off by -1"},
		{"request logged twice", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			rc, _, err := s.Settle(ctx, settleReq(h, usd(0.3)))
			require.NoError(t, err)
			row := logRow("u", rc)
			require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{row}))
			row.ID[0]++
			require.NoError(t, s.InsertRequestLogs(ctx, []billing.RequestLog{row}))
		}, "logged twice"},
		{"settled with a hold that is not the one taken", func(t *testing.T, s *ledgertest.Store, h billing.Hold) {
			h.Taken = []billing.Nano{h.Taken[0] + usd(0.1)}
			_, _, err := s.Settle(ctx, settleReq(h, 0))
			require.NoError(t, err)
		}, "want 1000000000"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ledgertest.New()
			s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
			h, err := s.Reserve(ctx, holdReq("r1", "u", planNew, usd(0.5), 0))
			require.NoError(t, err)
			require.NoError(t, s.Snapshot().Check(), "with a hold outstanding")
			tt.do(t, s, h)
			err = s.Snapshot().Check()
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

// A hold's Clear that names a receipt already gone (the answer of an
// earlier Reserve that dropped it was lost, and the caller named it again)
// counts out only the receipts that exist, as the MongoDB store does: the
// receipt count stays equal to the receipts kept, so the sweeper, which
// looks only at users whose counts are above zero, still sees a receipt
// left without its log row.
func TestClearOfAGoneReceiptCountsNothing(t *testing.T) {
	ctx := context.Background()
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0 })
	s.AddUser("u", billing.Balances{CreditsNew: usd(1)})
	ha, err := s.Reserve(ctx, holdReq("a", "u", planNew, usd(0.1), 0))
	require.NoError(t, err)
	_, _, err = s.Settle(ctx, settleReq(ha, usd(0.1))) // receipt a: its log row is never written
	require.NoError(t, err)
	hb, err := s.Reserve(ctx, holdReq("b", "u", planNew, usd(0.1), 0))
	require.NoError(t, err)
	_, _, err = s.Settle(ctx, settleReq(hb, usd(0.1)))
	require.NoError(t, err)
	req := holdReq("c", "u", planNew, usd(0.1), 0)
	req.Clear = []string{"b"}
	s.SetFaults(func(op ledgertest.Op) ledgertest.Fault { return ledgertest.FailAfter })
	_, err = s.Reserve(ctx, req) // b dropped, the answer lost
	require.Error(t, err)
	s.SetFaults(nil)
	req = holdReq("d", "u", planNew, usd(0.1), 0)
	req.Clear = []string{"b"} // named again with the next hold
	hd, err := s.Reserve(ctx, req)
	require.NoError(t, err)
	hc := hd
	hc.RequestID, hc.LogID = "c", req.LogID
	for _, h := range []billing.Hold{hc, hd} {
		_, _, err = s.Settle(ctx, settleReq(h, 0))
		require.NoError(t, err)
	}
	require.NoError(t, s.ClearReceipts(ctx, "u", []string{"c", "d"}))

	u, _ := s.Snapshot().User("u")
	assert.Len(t, u.Receipts, 1, "receipt a is kept")
	assert.Equal(t, int64(1), u.ReceiptCount, "and counted once: b was counted out once")
	os, err := s.Orphans(ctx, billing.OrphanQuery{Now: t0.Add(time.Hour), OwnerDeadline: t0, ReceiptAge: time.Minute})
	require.NoError(t, err)
	require.Len(t, os, 1, "the sweeper sees it")
	assert.Equal(t, "a", os[0].Hold.RequestID)
}

// TestOrphansOrdered lists orphans by user, holds before receipts, each by
// request id, whatever the order they were made in.
func TestOrphansOrdered(t *testing.T) {
	ctx := context.Background()
	s := ledgertest.New()
	s.SetClock(func() time.Time { return t0 })
	for _, u := range []string{"z", "a", "m"} {
		s.AddUser(u, billing.Balances{CreditsNew: usd(1)})
		for _, rid := range []string{u + "3", u + "1", u + "2"} {
			h, err := s.Reserve(ctx, holdReq(rid, u, planNew, usd(0.1), 0))
			require.NoError(t, err)
			if rid == u+"1" {
				_, _, err = s.Settle(ctx, settleReq(h, usd(0.1)))
				require.NoError(t, err)
			}
		}
	}
	os, err := s.Orphans(ctx, billing.OrphanQuery{Now: t0.Add(time.Hour), OwnerDeadline: t0, ReceiptAge: time.Minute})
	require.NoError(t, err)
	var got []string
	for _, o := range os {
		got = append(got, o.Hold.RequestID)
	}
	assert.Equal(t, []string{"a2", "a3", "a1", "m2", "m3", "m1", "z2", "z3", "z1"}, got)
}
