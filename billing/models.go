package billing

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
)

// Model is one entry of the model catalogue, read from the legacy goproxy
// config JSON (its "models" array). String fields hold the file's values as
// they are; the legacy meanings of an empty value are noted per field.
type Model struct {
	ID      string   // "id": what clients send as "model"
	Name    string   // "name": display name
	Aliases []string // "id_aliases": other names clients may send

	Type      string // "type": openhands | ohmygpt | anthropic | openai
	Reasoning string // "reasoning": high | medium | low; anything else means none
	// "upstream": openhands | troll | main | ohmygpt; empty meant troll,
	// which the legacy proxy also routed to OpenHands.
	Upstream string
	// "billing_upstream": openhands billed creditsNew; anything else,
	// empty included, billed credits then refCredits.
	BillingUpstream string

	// ThinkingBudget is "thinking_budget"; when it is absent or 0 it is the
	// legacy default for Reasoning: low 2000, medium 5000, high and none 10000.
	ThinkingBudget int

	// ContextWindow is "context_window": the most tokens the model takes in
	// and gives out in one request, DefaultContextWindow when absent. It
	// bounds a request's input for its hold and the usage an upstream can
	// report for it.
	ContextWindow int64

	Price Price // the four prices and billing_multiplier, in integer units

	// UpstreamIDs is "upstream_model_id" (a string or an array of strings):
	// at least one entry; just ID when the field is absent.
	UpstreamIDs []string
	// UpstreamWeights is "upstream_model_weights", one positive weight per
	// UpstreamIDs entry, or nil for a uniform pick.
	UpstreamWeights []int

	// Created is the legacy /v1/models "created" value of this model:
	// 1735689600 (2025-01-01T00:00:00Z) + index·86400.
	Created int64
}

// PickUpstream returns the upstream model id for one request, given r, a
// uniformly random number supplied by the caller. With weights, entry i is
// chosen for r mod ΣW falling in its share of [0, ΣW), so for weights [60,40]
// r = 0..59 picks the first and 60..99 the second; without weights the pick is
// UpstreamIDs[r mod n]. The modulo bias is at most ΣW/2^64 and irrelevant.
// The result depends on r only, and PickUpstream does not allocate.
//
// A Model from ParseCatalogue always has valid weights; for a hand-built
// Model, weights that do not match UpstreamIDs in length, or ≤ 0, are ignored.
func (m *Model) PickUpstream(r uint64) string {
	ids := m.UpstreamIDs
	switch len(ids) {
	case 0:
		return m.ID
	case 1:
		return ids[0]
	}
	if ws := m.UpstreamWeights; len(ws) == len(ids) {
		var total uint64
		for _, w := range ws {
			if w > 0 {
				total += uint64(w)
			}
		}
		if total > 0 {
			x := r % total
			for i, w := range ws {
				if w <= 0 {
					continue
				}
				if x < uint64(w) {
					return ids[i]
				}
				x -= uint64(w)
			}
		}
	}
	return ids[r%uint64(len(ids))]
}

// Catalogue is an immutable set of models, safe for concurrent use.
type Catalogue struct {
	models []*Model
	byName map[string]*Model // ids and aliases
	list   []byte            // the /v1/models body
	one    map[string][]byte // the /v1/models/{id} bodies, by id and alias
}

// Lookup returns the model whose id or one of whose id_aliases is exactly
// name (case-sensitive). It does not allocate.
func (c *Catalogue) Lookup(name string) (*Model, bool) {
	m, ok := c.byName[name]
	return m, ok
}

// Models returns the models in file order. The slice is the caller's; the
// models are shared and must not be modified.
func (c *Catalogue) Models() []*Model {
	return append([]*Model(nil), c.models...)
}

// ListJSON returns the legacy /v1/models response body, built once:
//
//	{"object":"list","data":[{"id":"<id>","object":"model","created":1735689600,"owned_by":"trollLLM"},...]}
//
// with the models in file order and aliases not listed. The slice is shared
// and must not be modified.
func (c *Catalogue) ListJSON() []byte { return c.list }

// ModelJSON returns the /v1/models/{id} body of the model whose id or alias
// is name: its entry of ListJSON, {"id":"<id>","object":"model",...}, which
// names the model by its id even when asked by an alias. The slice is shared
// and must not be modified.
func (c *Catalogue) ModelJSON(name string) ([]byte, bool) {
	b, ok := c.one[name]
	return b, ok
}

// Limits and legacy constants of the config format.
const (
	createdEpoch = 1735689600 // /v1/models "created" of the first model
	createdStep  = 86400      // one day more per model

	// maxPricePerMtok guards against typos and keeps every price well inside
	// the integer arithmetic: 10^6 USD per million tokens is 10^12 units.
	maxPricePerMtok = 1_000_000
	// maxMultiplier is the largest billing_multiplier accepted.
	maxMultiplier = 1000
)

// LoadCatalogue reads and parses a legacy config JSON file; see
// ParseCatalogue. Read errors are wrapped as `reading models file "path": …`
// (errors.Is works, e.g. with fs.ErrNotExist) and parse errors as
// `models file "path": …`.
func LoadCatalogue(path string) (*Catalogue, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading models file %q: %w", path, err)
	}
	c, err := ParseCatalogue(data)
	if err != nil {
		return nil, fmt.Errorf("models file %q: %w", path, err)
	}
	return c, nil
}

// configFile is the part of the legacy goproxy config that the catalogue
// reads. Other top-level fields ("port", "endpoints", "system_prompt",
// "user_agent", "_comment"...) are accepted and ignored.
type configFile struct {
	Models []json.RawMessage `json:"models"`
}

// modelJSON is one legacy model entry. Pointers tell an absent field from a
// zero. Unknown fields (batch_*_price_per_mtok, ...) are ignored.
type modelJSON struct {
	Name            string          `json:"name"`
	ID              string          `json:"id"`
	IDAliases       []string        `json:"id_aliases"`
	Type            string          `json:"type"`
	Reasoning       string          `json:"reasoning"`
	ThinkingBudget  *int            `json:"thinking_budget"`
	ContextWindow   *int64          `json:"context_window"`
	InputPrice      *float64        `json:"input_price_per_mtok"`
	OutputPrice     *float64        `json:"output_price_per_mtok"`
	CacheWritePrice *float64        `json:"cache_write_price_per_mtok"`
	CacheHitPrice   *float64        `json:"cache_hit_price_per_mtok"`
	Multiplier      *float64        `json:"billing_multiplier"`
	BillingUpstream string          `json:"billing_upstream"`
	Upstream        string          `json:"upstream"`
	UpstreamModelID json.RawMessage `json:"upstream_model_id"`
	UpstreamWeights []int           `json:"upstream_model_weights"`
}

// DefaultContextWindow is a model's context window when its entry sets
// none: 1 Mi tokens, the largest window of the models the legacy files list.
// MaxContextWindow bounds the field, so that token counts within a window
// can never overflow a price computation or a counter.
const (
	DefaultContextWindow = 1 << 20
	MaxContextWindow     = 1 << 30
)

// ParseCatalogue parses a legacy goproxy config JSON document and validates
// its "models". Unknown fields, at the top level and in models, are ignored.
//
// Unlike the legacy proxy it refuses, with an error naming the model by index
// and id: a document without models; a model without id; an id or alias used
// twice; input_price_per_mtok or output_price_per_mtok absent or not above 0
// (the legacy proxy silently charged 3 and 15 USD, so a typo could make a
// model cheap); a negative or absurd (above 1,000,000 USD/Mtok) price; a
// billing_multiplier that is negative, above 1000 or rounds to 0 ppm; a
// negative thinking_budget; a context_window outside 1..MaxContextWindow; an empty upstream_model_id, or
// upstream_model_weights that do not give one positive weight per upstream id.
//
// Prices are rounded to the nearest micro-USD per million tokens and the
// multiplier to the nearest part per million. Absent cache prices are 0; an
// absent or 0 billing_multiplier is 1, as in the legacy proxy.
func ParseCatalogue(data []byte) (*Catalogue, error) {
	var f configFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	if len(f.Models) == 0 {
		return nil, errors.New(`no models: "models" is missing or empty`)
	}
	c := &Catalogue{
		models: make([]*Model, 0, len(f.Models)),
		byName: make(map[string]*Model, 2*len(f.Models)),
	}
	for i, raw := range f.Models {
		m, err := parseModel(i, raw)
		if err != nil {
			if m == nil || m.ID == "" {
				return nil, fmt.Errorf("model %d: %w", i, err)
			}
			return nil, fmt.Errorf("model %d (%q): %w", i, m.ID, err)
		}
		c.models = append(c.models, m)
		for k, name := range append([]string{m.ID}, m.Aliases...) {
			what := "id"
			if k > 0 {
				what = "alias"
			}
			if name == "" {
				return nil, fmt.Errorf("model %d (%q): id_aliases contains an empty string", i, m.ID)
			}
			if other, dup := c.byName[name]; dup {
				j := slices.Index(c.models, other)
				return nil, fmt.Errorf("model %d (%q): %s %q is already used by model %d (%q)",
					i, m.ID, what, name, j, other.ID)
			}
			c.byName[name] = m
		}
	}
	c.list = listJSON(c.models)
	c.one = make(map[string][]byte, len(c.byName))
	for name, m := range c.byName {
		c.one[name] = modelJSON1(m)
	}
	return c, nil
}

// parseModel decodes and validates model i. On a validation error it returns
// the partly filled model too, so that the error can name its id.
func parseModel(i int, raw json.RawMessage) (*Model, error) {
	var j modelJSON
	if err := json.Unmarshal(raw, &j); err != nil {
		return nil, fmt.Errorf("invalid JSON: %w", err)
	}
	m := &Model{
		ID:              j.ID,
		Name:            j.Name,
		Aliases:         j.IDAliases,
		Type:            j.Type,
		Reasoning:       j.Reasoning,
		Upstream:        j.Upstream,
		BillingUpstream: j.BillingUpstream,
		Created:         createdEpoch + int64(i)*createdStep,
	}
	if m.ID == "" {
		return m, errors.New("id is missing or empty")
	}
	if err := m.setPrice(&j); err != nil {
		return m, err
	}
	if err := m.setTokenLimits(&j); err != nil {
		return m, err
	}
	if err := m.setUpstreamIDs(&j); err != nil {
		return m, err
	}
	return m, nil
}

// setPrice sets m.Price from j: input and output prices required, cache
// prices optional, the multiplier checked. It stops at the first field
// that is not valid.
func (m *Model) setPrice(j *modelJSON) error {
	var err error
	if m.Price.Input, err = priceField("input_price_per_mtok", j.InputPrice, true); err != nil {
		return err
	}
	if m.Price.Output, err = priceField("output_price_per_mtok", j.OutputPrice, true); err != nil {
		return err
	}
	if m.Price.CacheWrite, err = priceField("cache_write_price_per_mtok", j.CacheWritePrice, false); err != nil {
		return err
	}
	if m.Price.CacheRead, err = priceField("cache_hit_price_per_mtok", j.CacheHitPrice, false); err != nil {
		return err
	}
	m.Price.Multiplier, err = multiplierField(j.Multiplier)
	return err
}

// setTokenLimits sets m.ThinkingBudget (the reasoning default when absent
// or 0, never negative) and m.ContextWindow (DefaultContextWindow when
// absent, else 1 to MaxContextWindow tokens) from j.
func (m *Model) setTokenLimits(j *modelJSON) error {
	switch {
	case j.ThinkingBudget == nil || *j.ThinkingBudget == 0:
		m.ThinkingBudget = defaultThinkingBudget(m.Reasoning)
	case *j.ThinkingBudget < 0:
		return fmt.Errorf("thinking_budget must not be negative, got %d", *j.ThinkingBudget)
	default:
		m.ThinkingBudget = *j.ThinkingBudget
	}

	switch {
	case j.ContextWindow == nil:
		m.ContextWindow = DefaultContextWindow
	case *j.ContextWindow < 1 || *j.ContextWindow > MaxContextWindow:
		return fmt.Errorf("context_window must be between 1 and %d tokens, got %d", MaxContextWindow, *j.ContextWindow)
	default:
		m.ContextWindow = *j.ContextWindow
	}
	return nil
}

// setUpstreamIDs sets m.UpstreamIDs and, when j gives them, their weights:
// one per id, each above 0, adding up to at most 2^63-1.
func (m *Model) setUpstreamIDs(j *modelJSON) error {
	var err error
	if m.UpstreamIDs, err = upstreamIDs(j.UpstreamModelID, m.ID); err != nil {
		return err
	}
	if j.UpstreamWeights == nil {
		return nil
	}
	if len(j.UpstreamWeights) != len(m.UpstreamIDs) {
		return fmt.Errorf("upstream_model_weights has %d entries but upstream_model_id has %d",
			len(j.UpstreamWeights), len(m.UpstreamIDs))
	}
	var total uint64
	for k, w := range j.UpstreamWeights {
		if w <= 0 {
			return fmt.Errorf("upstream_model_weights[%d] must be greater than 0, got %d", k, w)
		}
		if total += uint64(w); total > math.MaxInt64 {
			return errors.New("upstream_model_weights add up to more than 2^63-1")
		}
	}
	m.UpstreamWeights = j.UpstreamWeights
	return nil
}

// priceField converts a USD-per-Mtok price to micro-USD per Mtok. Required
// prices must be above 0 after rounding; optional ones are 0 when absent.
func priceField(name string, v *float64, required bool) (int64, error) {
	if v == nil {
		if required {
			return 0, fmt.Errorf("%s is missing (the legacy default price is not applied)", name)
		}
		return 0, nil
	}
	f := *v
	switch {
	case f > maxPricePerMtok:
		return 0, fmt.Errorf("%s must be at most %d USD per million tokens, got %v", name, maxPricePerMtok, f)
	case required && f <= 0:
		return 0, fmt.Errorf("%s must be greater than 0, got %v", name, f)
	case f < 0:
		return 0, fmt.Errorf("%s must not be negative, got %v", name, f)
	}
	units := int64(math.Round(f * 1e6))
	if required && units == 0 {
		return 0, fmt.Errorf("%s must be greater than 0 (at least 0.000001), got %v", name, f)
	}
	return units, nil
}

// multiplierField converts billing_multiplier to parts per million.
func multiplierField(v *float64) (int64, error) {
	if v == nil || *v == 0 {
		return 1_000_000, nil
	}
	switch f := *v; {
	case f < 0:
		return 0, fmt.Errorf("billing_multiplier must not be negative, got %v", f)
	case f > maxMultiplier:
		return 0, fmt.Errorf("billing_multiplier must be at most %d, got %v", maxMultiplier, f)
	}
	ppm := int64(math.Round(*v * 1e6))
	if ppm == 0 {
		// A multiplier that rounds to 0 would make the model free.
		return 0, fmt.Errorf("billing_multiplier must be at least 0.000001 (or 0 for 1), got %v", *v)
	}
	return ppm, nil
}

func defaultThinkingBudget(reasoning string) int {
	switch reasoning {
	case "medium":
		return 5000
	case "low":
		return 2000
	}
	return 10000
}

// upstreamIDs decodes upstream_model_id: absent or null means id itself.
func upstreamIDs(raw json.RawMessage, id string) ([]string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || string(raw) == "null" {
		return []string{id}, nil
	}
	var ids []string
	if raw[0] == '"' {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, fmt.Errorf("upstream_model_id: %w", err)
		}
		ids = []string{s}
	} else if err := json.Unmarshal(raw, &ids); err != nil || ids == nil {
		return nil, errors.New("upstream_model_id must be a string or an array of strings")
	}
	if len(ids) == 0 {
		return nil, errors.New("upstream_model_id must not be an empty array")
	}
	for k, s := range ids {
		if s == "" {
			if len(ids) == 1 && raw[0] == '"' {
				return nil, errors.New("upstream_model_id must not be empty")
			}
			return nil, fmt.Errorf("upstream_model_id[%d] must not be empty", k)
		}
	}
	return ids, nil
}

// modelEntry is one model as /v1/models lists it.
type modelEntry struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
}

func entryOf(m *Model) modelEntry {
	return modelEntry{ID: m.ID, Object: "model", Created: m.Created, OwnedBy: "trollLLM"}
}

// modelJSON1 builds one model's /v1/models/{id} body.
func modelJSON1(m *Model) []byte {
	b, err := json.Marshal(entryOf(m))
	if err != nil {
		panic("billing: marshalling a model: " + err.Error()) // strings and ints only
	}
	return b
}

// listJSON builds the legacy /v1/models body.
func listJSON(models []*Model) []byte {
	body := struct {
		Object string       `json:"object"`
		Data   []modelEntry `json:"data"`
	}{Object: "list", Data: make([]modelEntry, len(models))}
	for i, m := range models {
		body.Data[i] = entryOf(m)
	}
	b, err := json.Marshal(body)
	if err != nil {
		panic("billing: marshalling the model list: " + err.Error()) // strings and ints only
	}
	return b
}
