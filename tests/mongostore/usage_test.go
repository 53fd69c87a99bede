package mongostore

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// A usage batch sent twice (its first write's outcome unknown) counts once;
// the writer's next batch counts; another writer's marks do not interfere.
func TestAddUsageOnce(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.UpstreamKey{ID: "up", APIKey: "sk-up", Status: "healthy"}))
	require.NoError(t, seed.Insert(ctx, db, seed.UserKey{Key: "sk-user-key", User: "someone", Active: true}))
	at := time.Now().UTC().Truncate(time.Millisecond)
	c := billing.UsageCounters{UserKey: "sk-user-key", UpstreamKeyID: "up", WeightedTokens: 7, RawTokens: 5, At: at}
	a1 := billing.UsageBatch{Writer: "instance-a", Seq: "run1-1", Counters: []billing.UsageCounters{c, c}}
	for range 2 {
		require.NoError(t, s.AddUsage(ctx, a1))
	}
	// Another instance's batch, with the same Seq by chance.
	b1 := billing.UsageBatch{Writer: "instance.b", Seq: "run1-1", Counters: []billing.UsageCounters{c}}
	require.NoError(t, s.AddUsage(ctx, b1))
	a2 := billing.UsageBatch{Writer: "instance-a", Seq: "run1-2", Counters: []billing.UsageCounters{c}}
	for range 2 {
		require.NoError(t, s.AddUsage(ctx, a2))
	}
	check := func(coll, id string, tokens int64) {
		t.Helper()
		var d bson.M
		require.NoError(t, db.Collection(coll).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&d))
		assert.Equal(t, tokens, d["tokensUsed"], "%s %s: tokensUsed", coll, id)
		assert.Equal(t, int64(4), d["requestsCount"], "%s %s: requestsCount", coll, id)
		got, ok := d["lastUsedAt"].(bson.DateTime)
		if assert.True(t, ok, "%s %s: lastUsedAt %v", coll, id, d["lastUsedAt"]) {
			assert.True(t, got.Time().Equal(at), "%s %s: lastUsedAt %v, want %v", coll, id, got.Time(), at)
		}
	}
	check("openhands_keys", "up", 4*5)
	check("user_keys", "sk-user-key", 4*7)
	assert.Error(t, s.AddUsage(ctx, billing.UsageBatch{Writer: "instance-a", Counters: []billing.UsageCounters{c}}), "a batch without a Seq was accepted")
}
