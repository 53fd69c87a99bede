package mongostore

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/event"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// A scan larger than one batch reads everything in single-batch queries
// and leaves no cursor on the server (FerretDB keeps a PostgreSQL
// connection for each open cursor): no getMore is ever sent.
func TestScansLeaveNoCursorOpen(t *testing.T) {
	d := testdb.StartForTest(t)
	var mu sync.Mutex
	cmds := map[string]int{}
	mon := &event.CommandMonitor{Started: func(_ context.Context, e *event.CommandStartedEvent) {
		mu.Lock()
		cmds[e.CommandName]++
		mu.Unlock()
	}}
	c, err := mongo.Connect(options.Client().ApplyURI(d.URI()).SetMonitor(mon))
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	db := c.Database("fproxy")
	s := mongostore.New(db)
	ctx := context.Background()

	const n = 600 // more than two pages, and than a first batch (101)
	var docs []any
	var want []string
	for i := range n {
		id := fmt.Sprintf("k%04d", i)
		docs = append(docs, seed.UpstreamKey{ID: id, APIKey: "a" + id, Status: "healthy"})
		want = append(want, id)
	}
	require.NoError(t, seed.Insert(ctx, db, docs...))
	for _, id := range want {
		require.NoError(t, seed.Bind(ctx, db, id))
	}
	mu.Lock()
	clear(cmds)
	mu.Unlock()
	keys, err := s.LoadUpstreamKeys(ctx)
	require.NoError(t, err)
	var got []string
	for _, k := range keys {
		got = append(got, k.ID)
	}
	assert.Equal(t, want, got, "every key once, in _id order")
	mu.Lock()
	defer mu.Unlock()
	assert.Zero(t, cmds["getMore"], "no cursor left to read on")
	assert.Equal(t, 2*(n/256+2), cmds["find"], "bindings, then keys: three full-or-partial pages and an empty one each")
	assert.Zero(t, cmds["killCursors"], "no cursor to kill")
}
