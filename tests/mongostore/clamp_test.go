package mongostore

import (
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// Token counts of int64 max, settled one at a time and in a batch, add at
// most billing.MaxRequestTokens each: no $inc overflows, and the user's
// later settlements still apply. The usage counters of keys likewise.
func TestTokenCountersClamped(t *testing.T) {
	s, db := open(t)
	ctx := context.Background()
	require.NoError(t, seed.Insert(ctx, db, seed.User{ID: "x", Active: true, Migration: true, CreditsNew: 1}))
	huge := billing.Usage{Input: math.MaxInt64, Output: math.MaxInt64, CacheWrite: math.MaxInt64, CacheRead: math.MaxInt64}
	var reqs []billing.SettleRequest
	for i := range 4 {
		h, err := s.Reserve(ctx, holdReq(fmt.Sprint("t", i), "x", newPlan, usd(0.01), 0))
		require.NoError(t, err)
		reqs = append(reqs, billing.SettleRequest{Hold: h, Cost: usd(0.001), Usage: huge, WeightedTokens: math.MaxInt64, By: billing.SettledByRequest})
	}
	for _, r := range reqs[:2] {
		_, ok, err := s.Settle(ctx, r)
		require.NoError(t, err)
		require.True(t, ok)
	}
	_, err := s.SettleMany(ctx, reqs[2:])
	require.NoError(t, err)
	b, err := seed.Balances(ctx, db, "x")
	require.NoError(t, err)
	for _, f := range []string{"tokensUserNew", "totalInputTokens", "totalOutputTokens"} {
		assert.EqualValues(t, 4*billing.MaxRequestTokens, b[f], f)
	}

	at := time.Now()
	c := billing.UsageCounters{UserKey: "sk-user-huge", UpstreamKeyID: "up-huge", WeightedTokens: math.MaxInt64, RawTokens: math.MaxInt64, At: at}
	require.NoError(t, seed.Insert(ctx, db, seed.UserKey{Key: "sk-user-huge", User: "x", Active: true}))
	_, err = db.Collection("openhands_keys").InsertOne(ctx, map[string]any{"_id": "up-huge", "tokensUsed": int64(0)})
	require.NoError(t, err)
	require.NoError(t, s.AddUsage(ctx, billing.UsageBatch{Writer: "w", Seq: "1", Counters: []billing.UsageCounters{c, c, c}}))
	for _, coll := range []string{"user_keys", "openhands_keys"} {
		var doc struct {
			TokensUsed int64 `bson:"tokensUsed"`
		}
		id := "sk-user-huge"
		if coll == "openhands_keys" {
			id = "up-huge"
		}
		require.NoError(t, db.Collection(coll).FindOne(ctx, map[string]any{"_id": id}).Decode(&doc))
		assert.EqualValues(t, 3*billing.MaxRequestTokens, doc.TokensUsed, coll)
	}
}
