package caddymodule

import (
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func TestPriceFactorApplies(t *testing.T) {
	pf := &PriceFactor{Factor: 0.4, UpstreamModels: []string{"glm-4.6*", "glm4-6*"}, ExceptModels: []string{"*haiku*"}}
	require.NoError(t, pf.Validate())
	opus := &billing.Model{ID: "claude-opus-4-6", Price: billing.Price{Input: 4_000_000, Output: 20_000_000, Multiplier: 1_020_000}}
	haiku := &billing.Model{ID: "claude-haiku-4-5-20251001", Price: billing.Price{Input: 1_000_000, Output: 5_000_000, Multiplier: 1_020_000}}

	got := pf.apply(opus, "GLM-4.6")
	assert.EqualValues(t, 400_000, got.Price.Factor, "the upstream pattern matches, case aside")
	assert.Zero(t, opus.Price.Factor, "the catalogue's model is not changed")
	assert.Same(t, opus, pf.apply(opus, "prod/claude-sonnet-4-5-20250929"), "another upstream is not scaled")
	assert.Same(t, haiku, pf.apply(haiku, "glm-4.6"), "an excepted model is not scaled")
	var none *PriceFactor
	assert.Same(t, opus, none.apply(opus, "glm-4.6"))

	all := &PriceFactor{Factor: 2}
	require.NoError(t, all.Validate())
	assert.EqualValues(t, 2_000_000, all.apply(haiku, "anything").Price.Factor)

	for _, bad := range []PriceFactor{{Factor: 0}, {Factor: -1}, {Factor: 1001}, {Factor: 1e-9}, {Factor: 1, UpstreamModels: []string{"[bad"}}} {
		assert.Error(t, bad.Validate(), "%+v", bad)
	}
}

func TestPriorityCaddyfile(t *testing.T) {
	var h Handler
	require.NoError(t, h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`llm_billing {
		credit_field creditsNew
		models /m.json
		allow_roles admin Priority
		price_factor 0.4 {
			upstream_models glm-4.6* glm4-6*
			except_models *haiku*
		}
	}`)))
	assert.Equal(t, []string{"admin", "Priority"}, h.AllowRoles)
	require.NotNil(t, h.PriceFactor)
	assert.Equal(t, PriceFactor{Factor: 0.4, UpstreamModels: []string{"glm-4.6*", "glm4-6*"}, ExceptModels: []string{"*haiku*"}}, *h.PriceFactor)

	for _, bad := range []string{
		"allow_roles",
		"price_factor",
		"price_factor cheap",
		"price_factor 0.4 0.5",
		"price_factor 0.4 {\n only_models x\n}",
		"price_factor 0.4 {\n upstream_models\n}",
		"price_factor 0.4\nprice_factor 0.5",
	} {
		var h Handler
		assert.Error(t, h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("llm_billing {\n"+bad+"\n}")), bad)
	}
	assert.True(t, admits(nil, "user"))
	assert.True(t, admits([]string{"admin", "priority"}, "priority"))
	assert.False(t, admits([]string{"admin", "priority"}, "user"))
	assert.False(t, admits([]string{"admin", "priority"}, ""))
}
