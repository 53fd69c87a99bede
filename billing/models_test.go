package billing

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func loadExample(t *testing.T, name string) *Catalogue {
	t.Helper()
	c, err := LoadCatalogue(filepath.Join("..", "examples", name))
	require.NoError(t, err)
	return c
}

func TestExampleFiles(t *testing.T) {
	type want struct {
		id, name    string
		aliases     []string
		typ         string
		reasoning   string
		billing     string
		budget      int
		price       Price
		upstreams   []string
		weights     []int
		createdDays int64
	}
	files := []struct {
		file   string
		models []want
	}{
		{"models-chat.json", []want{
			{"claude-opus-4-6", "Claude Opus 4.6", nil, "openhands", "high", "openhands", 16000, chatOpus, []string{"glm-4.6"}, nil, 0},
			{"claude-opus-4-5-20251101", "Claude Opus 4.5", nil, "openhands", "high", "openhands", 16000, chatOpus, []string{"glm-4.6"}, nil, 1},
			{"claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", []string{"claude-sonnet-4-5"}, "openhands", "high", "openhands", 16000, chatSonnet, []string{"glm-4.6"}, nil, 2},
			{"claude-haiku-4-5-20251001", "Claude Haiku 4.5", []string{"claude-haiku-4-5"}, "openhands", "low", "openhands", 2000, chatHaiku, []string{"glm-4.6"}, nil, 3},
		}},
		{"models-chat2.json", []want{
			{"claude-opus-4-5-20251101", "Claude Opus 4.5", nil, "ohmygpt", "high", "ohmygpt", 12000, chat2Opus, []string{"claude-opus-4-5-20251101"}, nil, 0},
			{"claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", []string{"claude-sonnet-4-5"}, "ohmygpt", "high", "ohmygpt", 12000, chat2Sonnet, []string{"claude-sonnet-4-5-20250929"}, nil, 1},
			{"claude-haiku-4-5-20251001", "Claude Haiku 4.5", []string{"claude-haiku-4-5"}, "ohmygpt", "low", "ohmygpt", 12000, chat2Haiku, []string{"claude-haiku-4-5-20251001"}, nil, 2},
		}},
		{"models-priority.json", []want{
			{"claude-opus-4-6", "Claude Opus 4.6", nil, "openhands", "high", "openhands", 12000, priorityOpus, []string{"prod/claude-sonnet-4-5-20250929", "glm-4.6"}, []int{60, 40}, 0},
			{"claude-opus-4-5-20251101", "Claude Opus 4.5", nil, "openhands", "high", "openhands", 12000, priorityOpus, []string{"prod/claude-sonnet-4-5-20250929", "glm-4.6"}, []int{60, 40}, 1},
			// No thinking_budget in the file: the legacy default for "low".
			{"claude-haiku-4-5-20251001", "Claude Haiku 4.5", []string{"claude-haiku-4-5"}, "openhands", "low", "openhands", 2000, priorityHaiku, []string{"glm-4.6"}, nil, 2},
		}},
	}
	for _, f := range files {
		t.Run(f.file, func(t *testing.T) {
			c := loadExample(t, f.file)
			models := c.Models()
			require.Len(t, models, len(f.models))
			for i, w := range f.models {
				m := models[i]
				got := want{m.ID, m.Name, m.Aliases, m.Type, m.Reasoning, m.BillingUpstream, m.ThinkingBudget,
					m.Price, m.UpstreamIDs, m.UpstreamWeights, (m.Created - 1735689600) / 86400}
				assert.Equal(t, w, got, "model %d", i)
				assert.Equal(t, "openhands", m.Upstream, "model %d: upstream", i)
				assert.Equal(t, 1735689600+int64(i)*86400, m.Created, "model %d: created", i)
			}
		})
	}
}

// The prod vectors again, through the example files: file → model → cost.
func TestExampleFilesBillTheGoldenVectors(t *testing.T) {
	tests := []struct {
		file, model string
		usage       Usage
		cost        Nano
	}{
		{"models-chat.json", "claude-sonnet-4-5", workedExample, 20_910_000},
		{"models-chat.json", "claude-opus-4-6", workedExample, 32_130_000},
		{"models-chat.json", "claude-opus-4-5-20251101", workedExample, 32_130_000},
		{"models-chat.json", "claude-haiku-4-5", Usage{Input: 123, Output: 4567, CacheRead: 89012}, 33_452_160},
		{"models-chat2.json", "claude-opus-4-5-20251101", Usage{Input: 2500, Output: 1234, CacheRead: 50000}, 78_602_500},
		{"models-chat2.json", "claude-sonnet-4-5-20250929", Usage{Input: 100_000, Output: 8000}, 483_000_000},
		{"models-chat2.json", "claude-haiku-4-5-20251001", Usage{Input: 777, Output: 333, CacheWrite: 1111, CacheRead: 3}, 4_469_625},
		{"models-priority.json", "claude-opus-4-6", workedExample, 36_050_000},
		{"models-priority.json", "claude-haiku-4-5", Usage{Input: 1, Output: 1, CacheWrite: 1, CacheRead: 1}, 7571},
	}
	for _, tt := range tests {
		m, ok := loadExample(t, tt.file).Lookup(tt.model)
		require.True(t, ok, "%s: no model %q", tt.file, tt.model)
		assert.Equal(t, tt.cost, m.Price.Cost(tt.usage), "%s %s: cost", tt.file, tt.model)
	}
}

// model wraps one model's JSON fields in a minimal valid file.
func model(fields string) string {
	return `{"models":[{"id":"ok","input_price_per_mtok":1,"output_price_per_mtok":2},{` + fields + `}]}`
}

const base = `"id":"claude-x","input_price_per_mtok":3,"output_price_per_mtok":15`

func TestParseCatalogueErrors(t *testing.T) {
	tests := []struct {
		name string
		json string
		want []string // substrings of the error
	}{
		{"malformed", `{"models":[`, []string{"invalid JSON", "unexpected end of JSON input"}},
		{"not an object", `[]`, []string{"invalid JSON", "cannot unmarshal array"}},
		{"trailing garbage", `{"models":[]} x`, []string{"invalid JSON"}},
		{"model of the wrong type", `{"models":[1]}`, []string{"model 0", "invalid JSON"}},
		{"field of the wrong type", model(base + `,"output_price_per_mtok":"15"`), []string{"model 1", "invalid JSON", "output_price_per_mtok"}},
		{"no models field", `{"port":8004}`, []string{"no models"}},
		{"empty models", `{"models":[]}`, []string{"no models"}},
		{"null models", `{"models":null}`, []string{"no models"}},
		{"missing id", model(`"input_price_per_mtok":3,"output_price_per_mtok":15`), []string{"model 1:", "id is missing"}},
		{"empty id", model(`"id":"","input_price_per_mtok":3,"output_price_per_mtok":15`), []string{"model 1:", "id is missing"}},
		{"duplicate id", model(`"id":"ok","input_price_per_mtok":3,"output_price_per_mtok":15`), []string{`model 1 ("ok")`, `id "ok" is already used by model 0 ("ok")`}},
		{"alias duplicates an id", model(base + `,"id_aliases":["ok"]`), []string{`model 1 ("claude-x")`, `alias "ok" is already used by model 0`}},
		{"alias duplicates its own id", model(base + `,"id_aliases":["claude-x"]`), []string{`model 1 ("claude-x")`, `alias "claude-x" is already used by model 1`}},
		{"alias repeated", model(base + `,"id_aliases":["a","a"]`), []string{`model 1 ("claude-x")`, `alias "a" is already used`}},
		{"alias duplicates an alias", `{"models":[{"id":"a","id_aliases":["x"],"input_price_per_mtok":1,"output_price_per_mtok":2},{"id":"b","id_aliases":["x"],"input_price_per_mtok":1,"output_price_per_mtok":2}]}`,
			[]string{`model 1 ("b")`, `alias "x" is already used by model 0 ("a")`}},
		{"empty alias", model(base + `,"id_aliases":[""]`), []string{`model 1 ("claude-x")`, "id_aliases contains an empty string"}},
		{"input price missing", model(`"id":"claude-x","output_price_per_mtok":15`), []string{`model 1 ("claude-x")`, "input_price_per_mtok is missing"}},
		{"output price missing", model(`"id":"claude-x","input_price_per_mtok":3`), []string{`model 1 ("claude-x")`, "output_price_per_mtok is missing"}},
		{"input price zero", model(`"id":"claude-x","input_price_per_mtok":0,"output_price_per_mtok":15`), []string{`model 1 ("claude-x")`, "input_price_per_mtok must be greater than 0"}},
		{"output price zero", model(`"id":"claude-x","input_price_per_mtok":3,"output_price_per_mtok":0`), []string{`model 1 ("claude-x"): output_price_per_mtok must be greater than 0`}},
		{"output price negative", model(`"id":"claude-x","input_price_per_mtok":3,"output_price_per_mtok":-15`), []string{`model 1 ("claude-x")`, "output_price_per_mtok must be greater than 0"}},
		{"output price null", model(`"id":"claude-x","input_price_per_mtok":3,"output_price_per_mtok":null`), []string{`model 1 ("claude-x")`, "output_price_per_mtok is missing"}},
		{"input price rounds to zero", model(`"id":"claude-x","input_price_per_mtok":0.0000004,"output_price_per_mtok":15`), []string{`model 1 ("claude-x")`, "input_price_per_mtok must be greater than 0"}},
		{"input price absurd", model(`"id":"claude-x","input_price_per_mtok":1000001,"output_price_per_mtok":15`), []string{`model 1 ("claude-x")`, "input_price_per_mtok must be at most 1000000"}},
		{"output price absurd", model(`"id":"claude-x","input_price_per_mtok":3,"output_price_per_mtok":1e300`), []string{`model 1 ("claude-x")`, "output_price_per_mtok must be at most"}},
		{"cache write negative", model(base + `,"cache_write_price_per_mtok":-3.75`), []string{`model 1 ("claude-x")`, "cache_write_price_per_mtok must not be negative"}},
		{"cache hit negative", model(base + `,"cache_hit_price_per_mtok":-0.3`), []string{`model 1 ("claude-x")`, "cache_hit_price_per_mtok must not be negative"}},
		{"cache hit absurd", model(base + `,"cache_hit_price_per_mtok":2e6`), []string{`model 1 ("claude-x")`, "cache_hit_price_per_mtok must be at most"}},
		{"multiplier negative", model(base + `,"billing_multiplier":-1.02`), []string{`model 1 ("claude-x")`, "billing_multiplier must not be negative"}},
		{"multiplier absurd", model(base + `,"billing_multiplier":1e9`), []string{`model 1 ("claude-x")`, "billing_multiplier must be at most"}},
		{"multiplier rounds to zero", model(base + `,"billing_multiplier":1e-7`), []string{`model 1 ("claude-x")`, "billing_multiplier must be at least"}},
		{"thinking budget negative", model(base + `,"thinking_budget":-1`), []string{`model 1 ("claude-x")`, "thinking_budget must not be negative"}},
		{"upstream empty string", model(base + `,"upstream_model_id":""`), []string{`model 1 ("claude-x")`, "upstream_model_id must not be empty"}},
		{"upstream empty array", model(base + `,"upstream_model_id":[]`), []string{`model 1 ("claude-x")`, "upstream_model_id must not be an empty array"}},
		{"upstream empty entry", model(base + `,"upstream_model_id":["glm-4.6",""]`), []string{`model 1 ("claude-x")`, "upstream_model_id[1] must not be empty"}},
		{"upstream null entry", model(base + `,"upstream_model_id":["glm-4.6",null]`), []string{`model 1 ("claude-x")`, "upstream_model_id[1] must not be empty"}},
		{"upstream number", model(base + `,"upstream_model_id":46`), []string{`model 1 ("claude-x")`, "upstream_model_id must be a string or an array of strings"}},
		{"upstream object", model(base + `,"upstream_model_id":{"a":1}`), []string{`model 1 ("claude-x")`, "upstream_model_id must be a string or an array of strings"}},
		{"upstream array of numbers", model(base + `,"upstream_model_id":[1]`), []string{`model 1 ("claude-x")`, "upstream_model_id must be a string or an array of strings"}},
		{"weights longer", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[60,30,10]`), []string{`model 1 ("claude-x")`, "upstream_model_weights has 3 entries but upstream_model_id has 2"}},
		{"weights shorter", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[60]`), []string{`model 1 ("claude-x")`, "upstream_model_weights has 1 entries"}},
		{"weights empty", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[]`), []string{`model 1 ("claude-x")`, "upstream_model_weights has 0 entries"}},
		{"weights without ids", model(base + `,"upstream_model_weights":[60,40]`), []string{`model 1 ("claude-x")`, "upstream_model_weights has 2 entries but upstream_model_id has 1"}},
		{"weight zero", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[60,0]`), []string{`model 1 ("claude-x")`, "upstream_model_weights[1] must be greater than 0"}},
		{"weight negative", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[-1,40]`), []string{`model 1 ("claude-x")`, "upstream_model_weights[0] must be greater than 0"}},
		{"weights overflow", model(base + `,"upstream_model_id":["a","b"],"upstream_model_weights":[9223372036854775807,9223372036854775807]`), []string{`model 1 ("claude-x")`, "upstream_model_weights add up to more than"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseCatalogue([]byte(tt.json))
			require.Error(t, err)
			for _, w := range tt.want {
				assert.ErrorContains(t, err, w)
			}
			msg := err.Error()
			assert.Equal(t, strings.ToLower(msg[:1])+msg[1:], msg, "error does not start in lower case")
		})
	}
}

func TestParseCatalogueDefaultsAndIgnoredFields(t *testing.T) {
	c, err := ParseCatalogue([]byte(`{
		"_comment": "unknown top-level fields are ignored",
		"port": 8004, "endpoints": [{"name": "x", "base_url": "https://example.com"}],
		"system_prompt": "", "user_agent": "x", "something_new": {"a": [1, 2]},
		"models": [
			{"id": "plain", "input_price_per_mtok": 3, "output_price_per_mtok": 15,
			 "batch_input_price_per_mtok": 1.5, "batch_output_price_per_mtok": 7.5, "future_field": true},
			{"id": "zero-mult", "reasoning": "medium", "input_price_per_mtok": 0.6, "output_price_per_mtok": 2.5,
			 "billing_multiplier": 0, "thinking_budget": 0, "upstream_model_id": null},
			{"id": "rounded", "reasoning": "high", "input_price_per_mtok": 0.0000015, "output_price_per_mtok": 1.0000004,
			 "cache_write_price_per_mtok": 1.56, "cache_hit_price_per_mtok": 0.13, "billing_multiplier": 1.1,
			 "thinking_budget": 7, "upstream_model_id": ["only"], "upstream_model_weights": [5]}
		]}`))
	require.NoError(t, err)
	ms := c.Models()
	tests := []struct {
		m          *Model
		price      Price
		budget     int
		upstreams  []string
		weights    []int
		upstream   string
		billingUps string
	}{
		// No cache prices → 0, no multiplier → 1, no budget and no
		// reasoning → 10000, no upstream_model_id → the id.
		{ms[0], Price{Input: 3_000_000, Output: 15_000_000, Multiplier: 1_000_000}, 10000, []string{"plain"}, nil, "", ""},
		// Multiplier 0 → 1 (legacy), budget 0 → the "medium" default,
		// upstream_model_id null → the id.
		{ms[1], Price{Input: 600_000, Output: 2_500_000, Multiplier: 1_000_000}, 5000, []string{"zero-mult"}, nil, "", ""},
		// Rounded to the nearest micro-USD per Mtok and ppm.
		{ms[2], Price{Input: 2, Output: 1_000_000, CacheWrite: 1_560_000, CacheRead: 130_000, Multiplier: 1_100_000}, 7, []string{"only"}, []int{5}, "", ""},
	}
	for i, tt := range tests {
		m := tt.m
		assert.Equal(t, tt.price, m.Price, "model %d (%s): price", i, m.ID)
		assert.Equal(t, tt.budget, m.ThinkingBudget, "model %d (%s): thinking budget", i, m.ID)
		assert.Equal(t, tt.upstreams, m.UpstreamIDs, "model %d (%s): upstream ids", i, m.ID)
		assert.Equal(t, tt.weights, m.UpstreamWeights, "model %d (%s): upstream weights", i, m.ID)
		assert.Equal(t, tt.upstream, m.Upstream, "model %d (%s): upstream", i, m.ID)
		assert.Equal(t, tt.billingUps, m.BillingUpstream, "model %d (%s): billing upstream", i, m.ID)
	}
}

func TestLoadCatalogueErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.json")
	_, err := LoadCatalogue(missing)
	require.ErrorIs(t, err, fs.ErrNotExist, "missing file")
	assert.True(t, strings.HasPrefix(err.Error(), `reading models file "`+missing+`": `), "missing file: %v", err)

	bad := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte(model(`"id":"claude-x","input_price_per_mtok":3`)), 0o600))
	_, err = LoadCatalogue(bad)
	require.Error(t, err, "bad file")
	want := `models file "` + bad + `": model 1 ("claude-x"): output_price_per_mtok is missing`
	assert.True(t, strings.HasPrefix(err.Error(), want), "bad file: %v, want prefix %q", err, want)
}

func TestLookup(t *testing.T) {
	c := loadExample(t, "models-chat.json")
	tests := []struct {
		name, want string
	}{
		{"claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929"},
		{"claude-sonnet-4-5", "claude-sonnet-4-5-20250929"},
		{"claude-haiku-4-5", "claude-haiku-4-5-20251001"},
		{"claude-opus-4-6", "claude-opus-4-6"},
		{"Claude-Opus-4-6", ""}, // case-sensitive
		{"claude-opus-4-6 ", ""},
		{"glm-4.6", ""}, // upstream ids are not names
		{"Claude Opus 4.6", ""},
		{"", ""},
	}
	for _, tt := range tests {
		m, ok := c.Lookup(tt.name)
		if assert.Equal(t, tt.want != "", ok, "Lookup(%q) found", tt.name) && ok {
			assert.Equal(t, tt.want, m.ID, "Lookup(%q)", tt.name)
		}
	}
}

func TestPickUpstream(t *testing.T) {
	count := func(m *Model, n uint64, offset uint64) map[string]int {
		got := map[string]int{}
		for r := uint64(0); r < n; r++ {
			got[m.PickUpstream(offset+r)]++
		}
		return got
	}
	c := loadExample(t, "models-priority.json")
	opus, _ := c.Lookup("claude-opus-4-6")

	// Weights [60,40]: r = 0..99 maps exactly 60/40, and so does any run of
	// 100 consecutive values, near 2^64 too.
	for _, off := range []uint64{0, 100, 12345, 1<<64 - 1000} {
		want := map[string]int{"prod/claude-sonnet-4-5-20250929": 60, "glm-4.6": 40}
		if off%100 != 0 {
			off -= off % 100
		}
		assert.Equal(t, want, count(opus, 100, off), "weights [60,40] from r=%d", off)
	}
	assert.Equal(t, "prod/claude-sonnet-4-5-20250929", opus.PickUpstream(59), "r=59")
	assert.Equal(t, "glm-4.6", opus.PickUpstream(60), "r=60")

	// Uniform over three.
	uni := &Model{ID: "m", UpstreamIDs: []string{"a", "b", "c"}}
	assert.Equal(t, map[string]int{"a": 100, "b": 100, "c": 100}, count(uni, 300, 0), "uniform")
	assert.Equal(t, "b", uni.PickUpstream(4), "uniform r=4")

	// One upstream, or none (hand-built): no choice.
	haiku, _ := c.Lookup("claude-haiku-4-5")
	assert.Equal(t, 10, count(haiku, 10, 1<<63)["glm-4.6"], "single")
	assert.Equal(t, "bare", (&Model{ID: "bare"}).PickUpstream(7), "no upstream ids")

	// Hand-built models with unusable weights fall back to uniform, or skip
	// the unusable entries.
	mismatch := &Model{UpstreamIDs: []string{"a", "b"}, UpstreamWeights: []int{1}}
	assert.Equal(t, map[string]int{"a": 2, "b": 2}, count(mismatch, 4, 0), "mismatched weights")
	allZero := &Model{UpstreamIDs: []string{"a", "b"}, UpstreamWeights: []int{0, -3}}
	assert.Equal(t, map[string]int{"a": 2, "b": 2}, count(allZero, 4, 0), "zero weights")
	someZero := &Model{UpstreamIDs: []string{"a", "b", "c"}, UpstreamWeights: []int{0, 3, 1}}
	assert.Equal(t, map[string]int{"b": 6, "c": 2}, count(someZero, 8, 0), "a zero weight")
}

func TestListJSON(t *testing.T) {
	c, err := ParseCatalogue([]byte(`{"port":8004,"models":[
		{"id":"claude-sonnet-4-5-20250929","id_aliases":["claude-sonnet-4-5"],"name":"Claude Sonnet 4.5","input_price_per_mtok":3,"output_price_per_mtok":14},
		{"id":"gpt-<5>&","input_price_per_mtok":1,"output_price_per_mtok":2}]}`))
	require.NoError(t, err)
	want := `{"object":"list","data":[` +
		`{"id":"claude-sonnet-4-5-20250929","object":"model","created":1735689600,"owned_by":"trollLLM"},` +
		`{"id":"gpt-\u003c5\u003e\u0026","object":"model","created":1735776000,"owned_by":"trollLLM"}]}`
	assert.Equal(t, want, string(c.ListJSON()), "ListJSON")
}

func TestModelsIsACopy(t *testing.T) {
	c := loadExample(t, "models-chat.json")
	ms := c.Models()
	ms[0] = nil
	assert.NotNil(t, c.Models()[0], "Models returned the catalogue's own slice")
}

func TestLookupAndPickUpstreamDoNotAllocate(t *testing.T) {
	c := loadExample(t, "models-priority.json")
	name := strings.Clone("claude-haiku-4-5") // not a constant the compiler could intern
	var r uint64
	var sink string
	allocs := testing.AllocsPerRun(1000, func() {
		m, ok := c.Lookup(name)
		if !ok {
			panic("lookup failed")
		}
		sink = m.PickUpstream(r)
		opus, _ := c.Lookup("claude-opus-4-6")
		sink = opus.PickUpstream(r)
		r += 7
	})
	assert.Zero(t, allocs, "Lookup+PickUpstream allocate per run")
	_ = sink
}

func TestContextWindow(t *testing.T) {
	const entry = `{"models":[{"id":"m","input_price_per_mtok":1,"output_price_per_mtok":2%s}]}`
	c, err := ParseCatalogue([]byte(fmt.Sprintf(entry, "")))
	require.NoError(t, err)
	m, _ := c.Lookup("m")
	assert.EqualValues(t, DefaultContextWindow, m.ContextWindow)

	c, err = ParseCatalogue([]byte(fmt.Sprintf(entry, `,"context_window":200000`)))
	require.NoError(t, err)
	m, _ = c.Lookup("m")
	assert.EqualValues(t, 200000, m.ContextWindow)

	for _, bad := range []string{`0`, `-1`, `1073741825`, `"big"`} {
		_, err = ParseCatalogue([]byte(fmt.Sprintf(entry, `,"context_window":`+bad)))
		assert.Error(t, err, bad)
	}
}

func TestModelJSON(t *testing.T) {
	c := loadExample(t, "models-chat.json")
	var list struct {
		Data []json.RawMessage `json:"data"`
	}
	require.NoError(t, json.Unmarshal(c.ListJSON(), &list))
	for i, m := range c.Models() {
		for _, name := range append([]string{m.ID}, m.Aliases...) {
			b, ok := c.ModelJSON(name)
			require.True(t, ok, name)
			assert.JSONEq(t, string(list.Data[i]), string(b), name)
		}
	}
	_, ok := c.ModelJSON("no-such-model")
	assert.False(t, ok)
}
