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
		{ID: "g", Status: "error"}, // no cooldown end: never
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

	p.Set([]UpstreamKey{{ID: "x", Status: "exhausted"}})
	if _, err := p.Pick(now); !errors.Is(err, ErrNoUpstreamKey) {
		t.Errorf("only exhausted keys: err = %v", err)
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
