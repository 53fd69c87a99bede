package billing

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestKeyPoolRoundRobinSkipsUnusableKeys(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var p KeyPool
	_, err := p.Pick(now)
	require.ErrorIs(t, err, ErrNoUpstreamKey, "empty pool")
	p.Set([]UpstreamKey{
		{ID: "a", Status: "healthy"},
		{ID: "b", Status: "exhausted"},
		{ID: "c", Status: ""},
		{ID: "d", Status: "need_refresh"},
		{ID: "e", Status: "rate_limited", CooldownUntil: now.Add(time.Minute)},  // still cooling down
		{ID: "f", Status: "rate_limited", CooldownUntil: now.Add(-time.Second)}, // cooldown over
		{ID: "g", Status: "error"}, // server/transport error: only when nothing else serves
	})
	counts := map[string]int{}
	for i := 0; i < 300; i++ {
		k, err := p.Pick(now)
		require.NoError(t, err)
		counts[k.ID]++
	}
	for _, id := range []string{"b", "d", "e", "g"} {
		assert.Zero(t, counts[id], "unusable key %s picked", id)
	}
	// a, c, f share the picks; a skipped key's turn goes to the next usable one.
	assert.Equal(t, 300, counts["a"]+counts["c"]+counts["f"], "picks %v", counts)
	for _, id := range []string{"a", "c", "f"} {
		assert.NotZero(t, counts[id], "key %s never picked: %v", id, counts)
	}

	p.Set([]UpstreamKey{{ID: "x", Status: "exhausted"}, {ID: "y", Status: "rate_limited", CooldownUntil: now.Add(time.Minute)}})
	_, err = p.Pick(now)
	assert.ErrorIs(t, err, ErrNoUpstreamKey, "only exhausted and rate-limited keys")
	p.Set([]UpstreamKey{{ID: "x", Status: "exhausted"}, {ID: "z", Status: "error", CooldownUntil: now.Add(time.Minute)}})
	k, err := p.Pick(now)
	if assert.NoError(t, err) {
		assert.Equal(t, "z", k.ID, "a key in error cooldown is the last resort")
	}
}

func TestKeyPoolPickDoesNotAllocate(t *testing.T) {
	var p KeyPool
	p.Set([]UpstreamKey{{ID: "a"}, {ID: "b"}})
	now := time.Now()
	assert.Zero(t, testing.AllocsPerRun(1000, func() { _, _ = p.Pick(now) }), "Pick allocates")
}

func TestKeyPoolRefreshKeepsRunningCooldowns(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var p KeyPool
	p.SetAt([]UpstreamKey{{ID: "a"}, {ID: "b"}}, now)
	p.Mark("a", "error", now.Add(10*time.Second))
	// The database still says healthy: the cooldown survives the refresh.
	p.SetAt([]UpstreamKey{{ID: "a", Status: "healthy"}, {ID: "b", Status: "healthy"}}, now.Add(time.Second))
	for i := 0; i < 4; i++ {
		k, _ := p.Pick(now.Add(2 * time.Second))
		require.Equal(t, "b", k.ID, "picked during a's cooldown")
	}
	// Once it is over, a refresh no longer carries it.
	p.SetAt([]UpstreamKey{{ID: "a"}, {ID: "b"}}, now.Add(11*time.Second))
	seen := map[string]bool{}
	for i := 0; i < 4; i++ {
		k, _ := p.Pick(now.Add(11 * time.Second))
		seen[k.ID] = true
	}
	assert.Equal(t, map[string]bool{"a": true, "b": true}, seen, "after the cooldown")
}
