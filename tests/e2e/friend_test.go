package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/billing"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

const (
	sonnetID = "claude-sonnet-4-5-20250929" // canonical id; alias claude-sonnet-4-5
	haikuID  = "claude-haiku-4-5-20251001"  // canonical id; alias claude-haiku-4-5
)

// newFriend inserts an owner (unless owner.ID names one already inserted)
// and a friend key of theirs with the given limits; it returns the owner's
// id and the key.
func newFriend(t *testing.T, owner *seed.User, active bool, limits ...seed.FriendLimit) (string, string) {
	t.Helper()
	if owner != nil {
		u, _ := newUser(t, *owner)
		*owner = u
	}
	key := billing.FriendKeyPrefix + randHex(64)
	rememberKey(key)
	fk := seed.FriendKey{Key: key, Active: active, Limits: limits}
	if owner != nil {
		fk.Owner = owner.ID
	} else {
		fk.Owner = uniq(t, "nobody")
	}
	require.NoError(t, seed.Insert(context.Background(), db, fk))
	return fk.Owner, key
}

// friendRow is a friend_keys document as the dashboard reads it.
type friendRow struct {
	Limits []struct {
		ModelID string  `bson:"modelId"`
		Limit   float64 `bson:"limitUsd"`
		Used    float64 `bson:"usedUsd"`
	} `bson:"modelLimits"`
	TotalUsed  float64           `bson:"totalUsedUsd"`
	Requests   int64             `bson:"requestsCount"`
	LastUsedAt *time.Time        `bson:"lastUsedAt"`
	Holds      map[string]string `bson:"llmFriendHolds"`
}

// friendDoc reads a friend_keys document.
func friendDoc(t *testing.T, key string) friendRow {
	t.Helper()
	var d friendRow
	require.NoError(t, db.Collection(seed.FriendKeysCollection).FindOne(context.Background(), bson.D{{Key: "_id", Value: key}}).Decode(&d))
	return d
}

// waitNoFriendHolds waits until the friend key has no hold outstanding (its
// settlements are done) and returns the document.
func waitNoFriendHolds(t *testing.T, key string) friendRow {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		d := friendDoc(t, key)
		if len(d.Holds) == 0 {
			return d
		}
		if time.Now().After(deadline) {
			t.Fatalf("friend key still has %d holds after 20s", len(d.Holds))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A friend key is billed to its owner's pool (the site's: creditsNew on
// chat), and its usage goes to the limit of the canonical model when the
// client names an alias; the log rows carry the masked friend key.
func TestFriendKeyBilledToOwner(t *testing.T) {
	prices := loadPrices(t, "models-chat.json")
	owner := &seed.User{Active: true, Migration: true, CreditsNew: 10, Credits: 5, RefCredits: 2}
	_, key := newFriend(t, owner, true,
		seed.FriendLimit{Model: haikuID, Limit: 1},
		seed.FriendLimit{Model: sonnetID, Limit: 2, Used: 0.5})

	var total float64
	for i, c := range []call{calls[0], calls[3]} { // anthropic json, openai stream
		c.do(t, chatURL, key, "claude-sonnet-4-5", uniq(t, "req"))
		total += prices["claude-sonnet-4-5"].cost(c.expected())
		logs := waitLogs(t, owner.ID, i+1)
		l := logs[i]
		assert.Equal(t, billing.MaskKey(key), l["friendKeyId"], "friendKeyId")
		assert.Equal(t, billing.MaskKey(key), l["userKeyId"], "userKeyId")
		assert.Equal(t, sonnetID, l["model"])
		assert.Equal(t, "openhands", l["creditType"])
	}
	d := waitNoFriendHolds(t, key)
	b := balances(t, owner.ID)
	assert.InDelta(t, 10-total, b["creditsNew"], 1e-9, "the owner's creditsNew pays")
	assert.InDelta(t, total, b["creditsNewUsed"], 1e-9)
	assert.EqualValues(t, 5, b["credits"], "another pool does not move")

	require.Len(t, d.Limits, 2)
	assert.Equal(t, sonnetID, d.Limits[1].ModelID)
	assert.InDelta(t, 0.5+total, d.Limits[1].Used, 1e-9, "usage counts on the canonical model's limit")
	assert.Zero(t, d.Limits[0].Used, "haiku's limit is untouched")
	assert.InDelta(t, total, d.TotalUsed, 1e-9)
	assert.EqualValues(t, 2, d.Requests)
	require.NotNil(t, d.LastUsedAt)
	assert.WithinDuration(t, time.Now(), *d.LastUsedAt, time.Minute)
}

// Each legacy refusal of a friend key, with its status, type and message,
// in the shape of both APIs; nothing reaches the upstream or moves money.
func TestFriendKeyRefusals(t *testing.T) {
	noLeaks(t)
	off := false
	funded := func() *seed.User { return &seed.User{Active: true, Migration: true, CreditsNew: 5} }
	sonnet := seed.FriendLimit{Model: sonnetID, Limit: 1}
	cases := []struct {
		name                              string
		setup                             func(t *testing.T) (owner, key string)
		model                             string
		status                            int
		oaiType, oaiCode, antType, prefix string
	}{
		{"unknown friend key", func(t *testing.T) (string, string) { return "", billing.FriendKeyPrefix + randHex(64) },
			"claude-sonnet-4-5", 401, "authentication_error", "", "authentication_error", "Invalid API key"},
		{"deactivated", func(t *testing.T) (string, string) { return newFriend(t, funded(), false, sonnet) },
			"claude-sonnet-4-5", 401, "authentication_error", "", "authentication_error", "Friend Key has been deactivated"},
		{"owner inactive", func(t *testing.T) (string, string) {
			return newFriend(t, &seed.User{Active: false, Migration: true, CreditsNew: 5}, true, sonnet)
		}, "claude-sonnet-4-5", 401, "authentication_error", "", "authentication_error", "Friend Key owner account is inactive"},
		{"owner missing", func(t *testing.T) (string, string) { _, k := newFriend(t, nil, true, sonnet); return "", k },
			"claude-sonnet-4-5", 401, "authentication_error", "", "authentication_error", "Invalid API key"},
		{"owner not migrated", func(t *testing.T) (string, string) {
			return newFriend(t, &seed.User{Active: true, Migration: false, CreditsNew: 5}, true, sonnet)
		}, "claude-sonnet-4-5", 401, "authentication_error", "", "authentication_error", "Invalid API key"},
		{"model not configured", func(t *testing.T) (string, string) { return newFriend(t, funded(), true, sonnet) },
			"claude-haiku-4-5", 402, "friend_key_model_not_allowed", "", "friend_key_model_not_allowed", "Model 'claude-haiku-4-5' is not configured for this Friend Key"},
		{"zero limit", func(t *testing.T) (string, string) {
			return newFriend(t, funded(), true, seed.FriendLimit{Model: sonnetID, Limit: 0})
		}, "claude-sonnet-4-5", 402, "friend_key_model_not_allowed", "", "friend_key_model_not_allowed", "Model 'claude-sonnet-4-5' is not configured for this Friend Key"},
		{"limit on the alias only", func(t *testing.T) (string, string) {
			return newFriend(t, funded(), true, seed.FriendLimit{Model: "claude-sonnet-4-5", Limit: 1})
		}, "claude-sonnet-4-5", 402, "friend_key_model_not_allowed", "", "friend_key_model_not_allowed", "Model 'claude-sonnet-4-5' is not configured"},
		{"disabled", func(t *testing.T) (string, string) {
			return newFriend(t, funded(), true, seed.FriendLimit{Model: sonnetID, Limit: 1, Enabled: &off})
		}, "claude-sonnet-4-5", 402, "friend_key_model_disabled", "", "friend_key_model_disabled", "Model 'claude-sonnet-4-5' is disabled for this Friend Key"},
		{"limit spent", func(t *testing.T) (string, string) {
			return newFriend(t, funded(), true, seed.FriendLimit{Model: sonnetID, Limit: 1, Used: 1})
		}, "claude-sonnet-4-5", 402, "friend_key_model_limit_exceeded", "", "friend_key_model_limit_exceeded", "Friend Key spending limit exceeded for model 'claude-sonnet-4-5'"},
		{"owner has no credit in the site's pool", func(t *testing.T) (string, string) {
			return newFriend(t, &seed.User{Active: true, Migration: true, CreditsNew: 0, Credits: 5}, true, sonnet)
		}, "claude-sonnet-4-5", 402, "insufficient_quota", "insufficient_credits", "insufficient_credits", "Insufficient credits. Please contact the key owner."},
		{"usage unreadable", func(t *testing.T) (string, string) {
			o, k := newFriend(t, funded(), true, sonnet)
			_, err := db.Collection(seed.FriendKeysCollection).UpdateOne(context.Background(), bson.D{{Key: "_id", Value: k}},
				bson.D{{Key: "$set", Value: bson.D{{Key: "modelLimits.0.usedUsd", Value: "oops"}}}})
			require.NoError(t, err)
			return o, k
		}, "claude-sonnet-4-5", 402, "friend_key_error", "", "friend_key_error", "Friend Key model access denied"},
	}
	for _, tc := range cases {
		for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
			t.Run(tc.name+" "+path, func(t *testing.T) {
				owner, key := tc.setup(t)
				var before map[string]float64
				if owner != "" {
					if _, err := seed.Balances(context.Background(), db, owner); err == nil {
						before = balances(t, owner)
					}
				}
				testID := uniq(t, "req")
				resp := post(t, chatURL+path, key, validBody(tc.model)(), map[string]string{"X-Test-Id": testID})
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				require.Equal(t, tc.status, resp.StatusCode, "%s", raw)
				assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
				checkErrorShape(t, path, raw, tc.oaiType, tc.oaiCode, tc.antType, tc.prefix)
				assert.Empty(t, upstreamRequests(testID), "a refused request reached the upstream")
				if before != nil {
					noLogsFor(t, owner)
					assert.Equal(t, mustJSON(before), mustJSON(balances(t, owner)), "balances moved")
					if tc.status == 402 {
						var d struct {
							Holds map[string]string `bson:"llmFriendHolds"`
						}
						require.NoError(t, db.Collection(seed.FriendKeysCollection).FindOne(context.Background(), bson.D{{Key: "_id", Value: key}}).Decode(&d))
						assert.Empty(t, d.Holds, "a refused request left a friend hold")
					}
				}
			})
		}
	}
}

// fireFriend sends one worst-case Anthropic request (the stand-in reports one
// input token per byte and max_tokens of output) and returns the status
// and body; safe in a goroutine.
func fireFriend(key, testID string) (int, []byte, error) {
	body := []byte(`{"model":"claude-haiku-4-5","max_tokens":2000,"messages":[{"role":"user","content":"count to ten"}]}`)
	req, err := http.NewRequest(http.MethodPost, chatURL+"/v1/messages", bytes.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-Api-Key", key)
	req.Header.Set("X-Test-Id", testID)
	req.Header.Set(standin.HeaderBound, "most")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	return resp.StatusCode, raw, err
}

// sumCharged returns the total chargedNano of the owner's n log rows.
func sumCharged(t *testing.T, owner string, n int) int64 {
	t.Helper()
	var sum int64
	for _, l := range waitLogs(t, owner, n) {
		sum += int64(num(t, l, "chargedNano"))
	}
	return sum
}

// 20 concurrent requests against a limit that pays for about five of them:
// the holds count against the limit, so the owner is never charged more
// than the limit, and the requests refused get the legacy 402.
func TestFriendKeyLimitUnderConcurrency(t *testing.T) {
	noLeaks(t)
	// One request on a key with room to spare: what a request holds.
	probeOwner := &seed.User{Active: true, Migration: true, CreditsNew: 100}
	_, probeKey := newFriend(t, probeOwner, true, seed.FriendLimit{Model: haikuID, Limit: 50})
	status, raw, err := fireFriend(probeKey, uniq(t, "probe"))
	require.NoError(t, err)
	require.Equal(t, 200, status, "%s", raw)
	probe := waitLogs(t, probeOwner.ID, 1)[0]
	hold, cost := int64(num(t, probe, "holdNano")), int64(num(t, probe, "costNano"))
	require.Positive(t, cost)
	require.LessOrEqual(t, cost, hold)

	limit := 5*hold + hold/2 // five full holds and half of one
	owner := &seed.User{Active: true, Migration: true, CreditsNew: 100}
	_, key := newFriend(t, owner, true, seed.FriendLimit{Model: haikuID, Limit: float64(limit) / 1e9})
	const n = 20
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		ok       int
		refusals []string
	)
	testID := uniq(t, "burst")
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, raw, err := fireFriend(key, testID)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				refusals = append(refusals, err.Error())
			case status == 200:
				ok++
			default:
				var b struct {
					Error struct{ Type, Message string } `json:"error"`
				}
				_ = json.Unmarshal(raw, &b)
				if status != 402 || b.Error.Type != "friend_key_model_limit_exceeded" {
					refusals = append(refusals, string(raw))
				}
			}
		}()
	}
	wg.Wait()
	assert.Empty(t, refusals, "every refusal is a 402 friend_key_model_limit_exceeded")
	require.Positive(t, ok)
	assert.Less(t, ok, n, "some requests must be refused")

	charged := sumCharged(t, owner.ID, ok)
	t.Logf("limit %d nano (hold %d, cost %d each): %d of %d served, %d nano charged", limit, hold, cost, ok, n, charged)
	assert.LessOrEqual(t, charged, limit, "the owner paid more than the friend key's limit")

	d := waitNoFriendHolds(t, key)
	assert.InDelta(t, float64(charged)/1e9, d.Limits[0].Used, 1e-8, "usedUsd is what was charged")
	assert.InDelta(t, float64(charged)/1e9, d.TotalUsed, 1e-8)
	assert.EqualValues(t, ok, d.Requests)
	b := balances(t, owner.ID)
	assert.InDelta(t, 100-float64(charged)/1e9, b["creditsNew"], 1e-8)

}

// An upstream that answers more output than the forwarded max_tokens costs
// more than the hold; the owner's pool, nearly empty, pays what it has. The
// friend key's usage is what the owner was charged, never the price (the
// legacy counted the price even when the owner paid nothing), and the rest
// is recorded as shortfall.
func TestFriendKeyUsageIsWhatWasCharged(t *testing.T) {
	owner := &seed.User{Active: true, Migration: true, CreditsNew: 0.004}
	_, key := newFriend(t, owner, true, seed.FriendLimit{Model: haikuID, Limit: 1})
	body := []byte(`{"model":"claude-haiku-4-5","max_tokens":2000,"messages":[{"role":"user","content":"count to ten"}]}`)
	resp := post(t, chatURL+"/v1/messages", key, body, map[string]string{"X-Test-Id": uniq(t, "req"), standin.HeaderBound: "over"})
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode, "%s", raw)

	l := waitLogs(t, owner.ID, 1)[0]
	cost, charged, shortfall := int64(num(t, l, "costNano")), int64(num(t, l, "chargedNano")), int64(num(t, l, "shortfallNano"))
	t.Logf("cost %d, charged %d, shortfall %d nano", cost, charged, shortfall)
	require.Less(t, charged, cost, "the owner cannot pay the whole cost")
	assert.Equal(t, cost, charged+shortfall)
	assert.EqualValues(t, 4_000_000, charged, "the owner pays what the pool had")

	d := waitNoFriendHolds(t, key)
	assert.InDelta(t, float64(charged)/1e9, d.Limits[0].Used, 1e-12, "usedUsd counts what was charged")
	assert.InDelta(t, float64(charged)/1e9, d.TotalUsed, 1e-12)
	assert.EqualValues(t, 1, d.Requests)
	assert.InDelta(t, 0, balances(t, owner.ID)["creditsNew"], 1e-12)
}

// An upstream that answers more than max_tokens cannot spend past a friend
// key's limit either: the charge is capped by the friend hold, the rest is
// shortfall.
func TestFriendKeyLimitCapsAnOverlongAnswer(t *testing.T) {
	owner := &seed.User{Active: true, Migration: true, CreditsNew: 100}
	_, key := newFriend(t, owner, true, seed.FriendLimit{Model: haikuID, Limit: 0.005})
	body := []byte(`{"model":"claude-haiku-4-5","max_tokens":2000,"messages":[{"role":"user","content":"count to ten"}]}`)
	resp := post(t, chatURL+"/v1/messages", key, body, map[string]string{"X-Test-Id": uniq(t, "req"), standin.HeaderBound: "over"})
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode, "%s", raw)

	l := waitLogs(t, owner.ID, 1)[0]
	cost, charged, shortfall := int64(num(t, l, "costNano")), int64(num(t, l, "chargedNano")), int64(num(t, l, "shortfallNano"))
	t.Logf("cost %d, charged %d, shortfall %d nano", cost, charged, shortfall)
	assert.LessOrEqual(t, charged, int64(5_000_000), "charged past the friend key's limit")
	assert.Greater(t, cost, charged)
	assert.Equal(t, cost, charged+shortfall)
	d := waitNoFriendHolds(t, key)
	assert.InDelta(t, float64(charged)/1e9, d.Limits[0].Used, 1e-12)
	assert.InDelta(t, 100-float64(charged)/1e9, balances(t, owner.ID)["creditsNew"], 1e-9)
}
