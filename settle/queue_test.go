package settle

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/billing/ledgertest"
)

// With every worker stuck on the database and the queue full, a new
// settlement waits for room instead of settling alone: the database is
// not sent a write per request when it is already the bottleneck.
func TestFullQueueWaitsForRoom(t *testing.T) {
	store := ledgertest.New()
	store.AddUser("u1", billing.Balances{CreditsNew: billing.NanoFromUSD(1000)})
	plan, err := billing.ParseCreditPlan([]string{billing.FieldCreditsNew})
	require.NoError(t, err)
	stuck := &stuckLogs{Store: store, release: make(chan struct{})}
	const size = 64
	st := New(Config{Store: stuck, Owner: "i1/run1", BatchLinger: time.Millisecond, BatchSize: size, OpTimeout: 5 * time.Second})
	st.Start(nil, nil)

	// Workers, the batches they wait on, the collector's batch, the
	// queue, and 100 more.
	n := 2*workers*size + size + queueSize + 100
	now := time.Now()
	holds := make([]billing.Hold, n)
	for i := range holds {
		holds[i], err = store.Reserve(context.Background(), billing.HoldRequest{
			RequestID: fmt.Sprintf("r%d", i), User: "u1", Plan: plan, Want: 1000, Min: 1000, Owner: "i1/run1",
			At: now, Expires: now.Add(time.Hour), LogID: billing.NewLogID(now),
		})
		require.NoError(t, err)
	}
	var wg sync.WaitGroup
	for _, h := range holds {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st.Submit(&Settlement{Hold: h, Cost: 400, Bill: true, Log: billing.RequestLog{
				ID: h.LogID, UserID: "u1", RequestID: h.RequestID, CreditField: plan.String(), CostNano: 400,
			}})
		}()
	}
	require.Eventually(t, func() bool { return stuck.inserts.Load() == workers }, 5*time.Second, time.Millisecond)
	time.Sleep(300 * time.Millisecond) // time for a settlement to go around the queue, if one would
	assert.Equal(t, int64(workers), stuck.inserts.Load(), "no settlement wrote on its own while the workers were stuck")
	close(stuck.release)
	wg.Wait()
	require.Eventually(t, func() bool { return len(store.Snapshot().Logs) == n }, 10*time.Second, 20*time.Millisecond)
	st.Close(5 * time.Second)

	snap := store.Snapshot()
	require.NoError(t, snap.Check())
	assert.Equal(t, n, len(snap.Logs))
	assert.Equal(t, billing.Nano(400*n), snap.Users[0].Charged[billing.FieldCreditsNew])
	assert.Less(t, stuck.inserts.Load(), int64(n/size+workers+30), "every settlement went in a batch")
}

// stuckLogs is a store whose log inserts wait for release: the database
// stuck under the workers.
type stuckLogs struct {
	*ledgertest.Store
	release chan struct{}
	inserts atomic.Int64
}

func (s *stuckLogs) InsertRequestLogs(ctx context.Context, rows []billing.RequestLog) error {
	s.inserts.Add(1)
	<-s.release
	return s.Store.InsertRequestLogs(ctx, rows)
}
