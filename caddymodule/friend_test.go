package caddymodule

import (
	"context"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// friendStore is fakeStore with one friend key, whose owner is the fake
// user, and a FriendLedger that records what it is asked.
type friendStore struct {
	*fakeStore
	friend   string
	mu       sync.Mutex
	reserves []billing.FriendHoldRequest
	settles  []billing.FriendSettlement
}

func (f *friendStore) Authenticate(ctx context.Context, key string) (billing.Principal, error) {
	if key != f.friend {
		return f.fakeStore.Authenticate(ctx, key)
	}
	f.authRead.Add(1)
	return billing.Principal{User: "u1", Role: "user", Balances: f.balances(), Friend: &billing.FriendKey{Limits: []billing.FriendLimit{
		{ModelID: "claude-sonnet-4-5-20250929", Slot: 0, Limit: 1e9, Enabled: true}}}}, nil
}

func (f *friendStore) ReserveFriend(_ context.Context, r billing.FriendHoldRequest) (billing.FriendHold, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.reserves = append(f.reserves, r)
	return billing.FriendHold{Key: r.Key, RequestID: r.RequestID, Model: r.Model, Slot: r.Slot, Amount: r.Want, Expires: r.Expires}, nil
}

func (f *friendStore) SettleFriend(_ context.Context, s billing.FriendSettlement) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.settles = append(f.settles, s)
	return nil
}

func (f *friendStore) SettleFriends(_ context.Context, s []billing.FriendSettlement) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.settles = append(f.settles, s...)
	return nil
}

// A cached friend key costs its limit hold and nothing else on the request
// path: one key lookup for two requests, named by an alias, and each
// request's hold is on the canonical model and settled with the charge.
func TestFriendKeyCachedCostsOnlyItsHold(t *testing.T) {
	cat, err := billing.LoadCatalogue("testdata/models.json")
	require.NoError(t, err)
	plan, _ := billing.ParseCreditPlan([]string{"creditsNew"})
	fs := &fakeStore{key: "sk-trollllm-" + strings.Repeat("ab", 32)}
	store := &friendStore{fakeStore: fs, friend: billing.FriendKeyPrefix + strings.Repeat("cd", 32)}
	eng := newEngineWithStore(store) // a FriendLedger: eng.friends is set
	keys, _ := fs.LoadUpstreamKeys(context.Background())
	eng.set(func(s *settings) { s.static = true })
	eng.keys.Set(keys)
	eng.start()
	t.Cleanup(func() { _ = eng.Destruct() })
	h := &Handler{MaxBodySize: DefaultMaxBodySize, eng: eng, plan: plan, cat: cat, logger: zap.NewNop()}
	for range 2 {
		rec := httptest.NewRecorder()
		require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, store.friend, jsonBody), upstream(false, 0)))
		require.Equal(t, 200, rec.Code, rec.Body.String())
	}
	waitCharges(t, fs, 2)
	deadline := time.Now().Add(5 * time.Second)
	for {
		store.mu.Lock()
		n := len(store.settles)
		store.mu.Unlock()
		if n == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	assert.EqualValues(t, 1, fs.authRead.Load(), "key lookups")
	store.mu.Lock()
	defer store.mu.Unlock()
	require.Len(t, store.reserves, 2)
	require.Len(t, store.settles, 2)
	for i, r := range store.reserves {
		assert.Equal(t, "claude-sonnet-4-5-20250929", r.Model)
		s := store.settles[i]
		assert.True(t, s.Billed)
		assert.Positive(t, s.Charged)
		assert.LessOrEqual(t, s.Charged, s.Hold.Amount)
	}
	fs.mu.Lock()
	defer fs.mu.Unlock()
	for _, l := range fs.logs {
		assert.Equal(t, billing.MaskKey(store.friend), l.FriendKeyID)
	}
}
