package billing

import (
	"errors"
	"testing"
	"time"
)

func TestKeyPoolRoundRobinSkipsUnusableKeys(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var p KeyPool
	if _, err := p.Pick(now); !errors.Is(err, ErrNoUpstreamKey) {
		t.Fatalf("empty pool: err = %v", err)
	}
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
		if err != nil {
			t.Fatal(err)
		}
		counts[k.ID]++
	}
	for _, id := range []string{"b", "d", "e", "g"} {
		if counts[id] != 0 {
			t.Errorf("unusable key %s picked %d times", id, counts[id])
		}
	}
	// a, c, f share the picks; a skipped key's turn goes to the next usable one.
	if counts["a"]+counts["c"]+counts["f"] != 300 || counts["a"] == 0 || counts["c"] == 0 || counts["f"] == 0 {
		t.Errorf("picks %v", counts)
	}

	p.Set([]UpstreamKey{{ID: "x", Status: "exhausted"}, {ID: "y", Status: "rate_limited", CooldownUntil: now.Add(time.Minute)}})
	if _, err := p.Pick(now); !errors.Is(err, ErrNoUpstreamKey) {
		t.Errorf("only exhausted and rate-limited keys: err = %v", err)
	}
	p.Set([]UpstreamKey{{ID: "x", Status: "exhausted"}, {ID: "z", Status: "error", CooldownUntil: now.Add(time.Minute)}})
	if k, err := p.Pick(now); err != nil || k.ID != "z" {
		t.Errorf("a key in error cooldown is the last resort: %v %v", k, err)
	}
}

func TestKeyPoolPickDoesNotAllocate(t *testing.T) {
	var p KeyPool
	p.Set([]UpstreamKey{{ID: "a"}, {ID: "b"}})
	now := time.Now()
	if n := testing.AllocsPerRun(1000, func() { _, _ = p.Pick(now) }); n != 0 {
		t.Errorf("Pick allocates %v times", n)
	}
}

func TestKeyPoolRefreshKeepsRunningCooldowns(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	var p KeyPool
	p.SetAt([]UpstreamKey{{ID: "a"}, {ID: "b"}}, now)
	p.Mark("a", "error", now.Add(10*time.Second))
	// The database still says healthy: the cooldown survives the refresh.
	p.SetAt([]UpstreamKey{{ID: "a", Status: "healthy"}, {ID: "b", Status: "healthy"}}, now.Add(time.Second))
	for i := 0; i < 4; i++ {
		if k, _ := p.Pick(now.Add(2 * time.Second)); k.ID != "b" {
			t.Fatalf("picked %s during a's cooldown", k.ID)
		}
	}
	// Once it is over, a refresh no longer carries it.
	p.SetAt([]UpstreamKey{{ID: "a"}, {ID: "b"}}, now.Add(11*time.Second))
	seen := map[string]bool{}
	for i := 0; i < 4; i++ {
		k, _ := p.Pick(now.Add(11 * time.Second))
		seen[k.ID] = true
	}
	if !seen["a"] || !seen["b"] {
		t.Errorf("after the cooldown: %v", seen)
	}
}
