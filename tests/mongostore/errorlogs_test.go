package mongostore

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/event"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"

	"github.com/trollllm/caddy-llm-billing/mongostore"
	"github.com/trollllm/caddy-llm-billing/tests/testdb"
)

// The error_logs indexes are created once: a later start lists them and
// sends no createIndexes (FerretDB 1.24 may drop the connection on one for
// indexes that exist, failing every operation in flight with it).
func TestErrorLogIndexesCreatedOnce(t *testing.T) {
	d := testdb.StartForTest(t)
	var creates atomic.Int64
	mon := &event.CommandMonitor{Started: func(_ context.Context, e *event.CommandStartedEvent) {
		if e.CommandName == "createIndexes" {
			creates.Add(1)
		}
	}}
	c, err := mongo.Connect(options.Client().ApplyURI(d.URI()).SetMonitor(mon))
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Disconnect(context.Background()) })
	s := mongostore.New(c.Database("fproxy"))
	ctx := context.Background()

	noExpiry := func(err error) bool { return err == nil || assert.ErrorIs(t, err, mongostore.ErrNoExpiry) }
	require.True(t, noExpiry(s.EnsureErrorLogIndexes(ctx)), "on a database without error_logs")
	first := creates.Load()
	require.Positive(t, first)
	specs, err := c.Database("fproxy").Collection(mongostore.CollErrorLogs).Indexes().ListSpecifications(ctx)
	require.NoError(t, err)
	names := map[string]bool{}
	for _, sp := range specs {
		names[sp.Name] = true
	}
	for _, n := range []string{"source_1_createdAt_-1", "path_1_createdAt_-1", "statusCode_1_createdAt_-1"} {
		assert.True(t, names[n], n)
	}

	require.True(t, noExpiry(s.EnsureErrorLogIndexes(ctx)), "again")
	// Only the expiry index, which FerretDB refuses, is asked for again.
	assert.LessOrEqual(t, creates.Load()-first, int64(1), "no createIndexes for indexes that exist")
}
