package mongostore

import (
	"context"
	"testing"
	"time"

	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// A usage batch sent twice (its first write's outcome unknown) counts once;
// the writer's next batch counts; another writer's marks do not interfere.
func TestAddUsageOnce(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	if err := seed.Insert(ctx, db, seed.UpstreamKey{ID: "up", APIKey: "sk-up", Status: "healthy"}); err != nil {
		t.Fatal(err)
	}
	if err := seed.Insert(ctx, db, seed.UserKey{Key: "sk-user-key", User: "someone", Active: true}); err != nil {
		t.Fatal(err)
	}
	at := time.Now().UTC().Truncate(time.Millisecond)
	c := billing.UsageCounters{UserKey: "sk-user-key", UpstreamKeyID: "up", WeightedTokens: 7, RawTokens: 5, At: at}
	a1 := billing.UsageBatch{Writer: "instance-a", Seq: "run1-1", Counters: []billing.UsageCounters{c, c}}
	for range 2 {
		if err := s.AddUsage(ctx, a1); err != nil {
			t.Fatal(err)
		}
	}
	// Another instance's batch, with the same Seq by chance.
	b1 := billing.UsageBatch{Writer: "instance.b", Seq: "run1-1", Counters: []billing.UsageCounters{c}}
	if err := s.AddUsage(ctx, b1); err != nil {
		t.Fatal(err)
	}
	a2 := billing.UsageBatch{Writer: "instance-a", Seq: "run1-2", Counters: []billing.UsageCounters{c}}
	for range 2 {
		if err := s.AddUsage(ctx, a2); err != nil {
			t.Fatal(err)
		}
	}
	check := func(coll, id string, tokens int64) {
		t.Helper()
		var d bson.M
		if err := db.Collection(coll).FindOne(ctx, bson.D{{Key: "_id", Value: id}}).Decode(&d); err != nil {
			t.Fatal(err)
		}
		if d["tokensUsed"] != tokens || d["requestsCount"] != int64(4) {
			t.Errorf("%s %s: tokensUsed %v requestsCount %v, want %d and 4", coll, id, d["tokensUsed"], d["requestsCount"], tokens)
		}
		if got, ok := d["lastUsedAt"].(bson.DateTime); !ok || !got.Time().Equal(at) {
			t.Errorf("%s %s: lastUsedAt %v, want %v", coll, id, d["lastUsedAt"], at)
		}
	}
	check("openhands_keys", "up", 4*5)
	check("user_keys", "sk-user-key", 4*7)
	if err := s.AddUsage(ctx, billing.UsageBatch{Writer: "instance-a", Counters: []billing.UsageCounters{c}}); err == nil {
		t.Error("a batch without a Seq was accepted")
	}
}
