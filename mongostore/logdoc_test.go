package mongostore

import (
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// A request log row is written with the field names the dashboard and
// reconcile read, every field of billing.RequestLog in its place.
func TestLogDocFieldNames(t *testing.T) {
	at := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	l := billing.RequestLog{
		ID: billing.NewLogID(at), UserID: "u", UserKeyID: "sk-tro...abcd", TrollKeyID: "openhands:k1", Model: "m",
		InputTokens: 1, OutputTokens: 2, CacheWriteTokens: 3, CacheHitTokens: 4, CreditsCost: 0.5, CreditType: "openhands",
		TokensUsed: 5, StatusCode: 200, LatencyMs: 6, IsSuccess: true, CreatedAt: at, FriendKeyID: "sk-tro...ffff",
		RequestID: "r", CreditField: "creditsNew", Endpoint: "/v1/messages", Stream: true, UpstreamModel: "um",
		UsageSource: "reported", EndReason: "complete", CostNano: 7, ChargedNano: 8, Shortfall: 0.1, ShortfallNano: 9,
		HoldNano: 10, TakenNano: map[string]int64{"creditsNew": 8},
		Attempts: []billing.Attempt{{KeyID: "k1", Status: 200, Reason: "ok", LatencyMs: 6}},
	}
	b, err := bson.Marshal(newLogDoc(l))
	require.NoError(t, err)
	var m bson.M
	require.NoError(t, bson.Unmarshal(b, &m))
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	assert.Equal(t, []string{
		"_id", "attempts", "cacheHitTokens", "cacheWriteTokens", "chargedNano", "costNano", "createdAt", "creditField",
		"creditType", "creditsCost", "endReason", "endpoint", "friendKeyId", "holdNano", "inputTokens", "isSuccess",
		"latencyMs", "model", "outputTokens", "requestId", "shortfall", "shortfallNano", "statusCode", "stream",
		"takenNano", "tokensUsed", "trollKeyId", "upstreamModel", "usageSource", "userId", "userKeyId",
	}, keys)
	assert.Equal(t, bson.ObjectID(l.ID), m["_id"])
	assert.Equal(t, "sk-tro...ffff", m["friendKeyId"])
	attempts, ok := m["attempts"].(bson.A)
	require.True(t, ok)
	assert.Equal(t, bson.D{{Key: "keyId", Value: "k1"}, {Key: "status", Value: int32(200)}, {Key: "reason", Value: "ok"}, {Key: "latencyMs", Value: int64(6)}}, attempts[0])

	// The optional fields are left out when empty, as the legacy rows.
	b, err = bson.Marshal(newLogDoc(billing.RequestLog{CreatedAt: at}))
	require.NoError(t, err)
	m = bson.M{}
	require.NoError(t, bson.Unmarshal(b, &m))
	for _, k := range []string{"userId", "trollKeyId", "friendKeyId", "attempts"} {
		assert.NotContains(t, m, k)
	}
	assert.False(t, bson.ObjectID(billing.LogID{}) == m["_id"], "a row without an id gets one")
}
