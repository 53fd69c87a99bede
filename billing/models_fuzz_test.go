package billing

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseCatalogue feeds arbitrary bytes to the models file loader. It must
// never panic, and a catalogue it accepts must keep the promises its users rely
// on: positive required prices, a positive multiplier, every id and alias
// resolving to its own model, a bounded context window, valid upstream picks
// and a /v1/models body that is valid JSON listing the models in order.
func FuzzParseCatalogue(f *testing.F) {
	for _, glob := range []string{"../examples/*.json", "../caddymodule/testdata/*.json"} {
		paths, err := filepath.Glob(glob)
		if err != nil {
			f.Fatal(err)
		}
		for _, p := range paths {
			data, err := os.ReadFile(p)
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data)
		}
	}
	f.Add([]byte(`{"models":[{"id":"a","id_aliases":["b"],"input_price_per_mtok":1,"output_price_per_mtok":2,` +
		`"billing_multiplier":1.5,"context_window":100,"upstream_model_id":["x","y"],"upstream_model_weights":[1,3]}]}`))
	f.Add([]byte(`{"models":[{"id":"a","input_price_per_mtok":1e-7,"output_price_per_mtok":1}]}`))
	f.Add([]byte(`{"models":[]}`))

	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseCatalogue(data)
		if err != nil {
			if c != nil {
				t.Fatalf("error %v came with a catalogue", err)
			}
			return
		}
		checkCatalogue(t, c)
	})
}

// checkCatalogue fails t unless c satisfies ParseCatalogue's documented
// invariants.
func checkCatalogue(t *testing.T, c *Catalogue) {
	t.Helper()
	models := c.Models()
	if len(models) == 0 {
		t.Fatal("accepted a catalogue without models")
	}
	for i, m := range models {
		p := m.Price
		if p.Input <= 0 || p.Output <= 0 {
			t.Errorf("model %d (%q): required prices not above 0: %+v", i, m.ID, p)
		}
		if p.CacheWrite < 0 || p.CacheRead < 0 {
			t.Errorf("model %d (%q): negative cache price: %+v", i, m.ID, p)
		}
		limit := int64(maxPricePerMtok) * 1e6
		if p.Input > limit || p.Output > limit || p.CacheWrite > limit || p.CacheRead > limit {
			t.Errorf("model %d (%q): price above the limit: %+v", i, m.ID, p)
		}
		if p.Multiplier <= 0 || p.Multiplier > maxMultiplier*1e6 {
			t.Errorf("model %d (%q): multiplier %d out of range", i, m.ID, p.Multiplier)
		}
		if m.ContextWindow < 1 || m.ContextWindow > MaxContextWindow {
			t.Errorf("model %d (%q): context window %d out of range", i, m.ID, m.ContextWindow)
		}
		if m.ThinkingBudget < 0 {
			t.Errorf("model %d (%q): negative thinking budget %d", i, m.ID, m.ThinkingBudget)
		}
		for _, name := range append([]string{m.ID}, m.Aliases...) {
			if got, ok := c.Lookup(name); !ok || got != m {
				t.Errorf("model %d (%q): Lookup(%q) does not find it", i, m.ID, name)
			}
		}
		checkUpstreams(t, i, m)
	}
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(c.ListJSON(), &list); err != nil {
		t.Fatalf("ListJSON is not valid JSON: %v\n%s", err, c.ListJSON())
	}
	if list.Object != "list" || len(list.Data) != len(models) {
		t.Errorf("ListJSON lists %d models as %q, want %d as \"list\"", len(list.Data), list.Object, len(models))
	}
}

// checkUpstreams fails t unless model i has at least one non-empty upstream
// id, weights that match them, and PickUpstream only returns those ids.
func checkUpstreams(t *testing.T, i int, m *Model) {
	t.Helper()
	if len(m.UpstreamIDs) == 0 {
		t.Errorf("model %d (%q): no upstream ids", i, m.ID)
	}
	ids := make(map[string]bool, len(m.UpstreamIDs))
	for _, id := range m.UpstreamIDs {
		if id == "" {
			t.Errorf("model %d (%q): empty upstream id", i, m.ID)
		}
		ids[id] = true
	}
	if m.UpstreamWeights != nil {
		if len(m.UpstreamWeights) != len(m.UpstreamIDs) {
			t.Errorf("model %d (%q): %d weights for %d ids", i, m.ID, len(m.UpstreamWeights), len(m.UpstreamIDs))
		}
		for _, w := range m.UpstreamWeights {
			if w <= 0 {
				t.Errorf("model %d (%q): weight %d not above 0", i, m.ID, w)
			}
		}
	}
	for _, r := range []uint64{0, 1, 59, 60, 1 << 40, ^uint64(0)} {
		if got := m.PickUpstream(r); !ids[got] {
			t.Errorf("model %d (%q): PickUpstream(%d) = %q, not one of its upstream ids", i, m.ID, r, got)
		}
	}
}
