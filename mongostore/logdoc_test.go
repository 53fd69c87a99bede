package mongostore

import (
	"math"
	"math/rand/v2"
	"sort"
	"strings"
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

// reflectLogDoc is logDoc without its MarshalBSON: the driver encodes it
// by reflection from the same bson tags.
type reflectLogDoc logDoc

// randomLogDoc fills every field of a row, optional ones sometimes empty.
func randomLogDoc(r *rand.Rand, takenKeys int) *logDoc {
	texts := []string{"", "u", "sk-tro...abcd", "ünï\u2028", "nul\x00in", "bad\xffutf8", "/v1/messages"}
	txt := func() string { return texts[r.IntN(len(texts))] }
	num := func() int64 { return r.Int64() - r.Int64() }
	at := time.Unix(r.Int64N(4e9), r.Int64N(1e9)).In(time.FixedZone("z", 3600*(r.IntN(25)-12)))
	d := &logDoc{
		ID: bson.ObjectID(billing.NewLogID(at)), UserID: txt(), UserKeyID: txt(), TrollKeyID: txt(), Model: txt(),
		InputTokens: num(), OutputTokens: num(), CacheWriteTokens: num(), CacheHitTokens: num(),
		CreditsCost: r.NormFloat64() * 1e3, CreditType: txt(), TokensUsed: num(), LatencyMs: num(), IsSuccess: r.IntN(2) == 0,
		CreatedAt: at, FriendKeyID: txt(), RequestID: txt(), CreditField: txt(), Endpoint: txt(), Stream: r.IntN(2) == 0,
		UpstreamModel: txt(), UsageSource: txt(), EndReason: txt(), CostNano: num(), ChargedNano: num(),
		Shortfall: r.NormFloat64(), ShortfallNano: num(), HoldNano: num(),
	}
	d.StatusCode = []int{0, 200, -1, math.MaxInt32 + 1, math.MinInt32 - 1}[r.IntN(5)]
	if takenKeys >= 0 {
		d.TakenNano = map[string]int64{}
		for i := range takenKeys {
			d.TakenNano[[]string{"creditsNew", "credits", "refCredits"}[i%3]+strings.Repeat("x", i/3)] = num()
		}
	}
	for range r.IntN(13) {
		d.Attempts = append(d.Attempts, attemptDoc{KeyID: txt(), Status: int(num() % (1 << 40)), Reason: txt(), LatencyMs: num()})
	}
	return d
}

// The row is written as the driver would write it from the bson tags.
func TestLogDocBSONIsTheDriversEncoding(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	for i := range 3000 {
		d := randomLogDoc(r, r.IntN(6)-1) // -1: a nil map
		got, err := d.MarshalBSON()
		require.NoError(t, err)
		want, err := bson.Marshal((*reflectLogDoc)(d))
		require.NoError(t, err)
		if len(d.TakenNano) <= 1 {
			require.Equal(t, want, got, "case %d", i) // byte for byte
			continue
		}
		// Several map keys: the driver's order is the map's, which is random.
		var g, w reflectLogDoc
		require.NoError(t, bson.Unmarshal(got, &g))
		require.NoError(t, bson.Unmarshal(want, &w))
		require.Equal(t, w, g, "case %d", i)
		require.Equal(t, len(want), len(got), "case %d", i)
	}
	// What InsertMany sends is this encoding.
	d := randomLogDoc(r, 1)
	b, err := bson.Marshal(d)
	require.NoError(t, err)
	own, err := d.MarshalBSON()
	require.NoError(t, err)
	assert.Equal(t, own, b)
}

func BenchmarkLogDocEncode(b *testing.B) {
	d := randomLogDoc(rand.New(rand.NewPCG(13, 14)), 1)
	b.Run("MarshalBSON", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = d.MarshalBSON()
		}
	})
	b.Run("reflection", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_, _ = bson.Marshal((*reflectLogDoc)(d))
		}
	})
}
