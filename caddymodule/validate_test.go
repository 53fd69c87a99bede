package caddymodule

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// validate adapts a Caddyfile and runs Caddy's own validation (provision and
// cleanup of every module), as `caddy validate` does.
func validate(t *testing.T, caddyfile string) error {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	raw, _, err := adapter.Adapt([]byte(caddyfile), nil)
	if err != nil {
		return err
	}
	var cfg caddy.Config
	require.NoError(t, json.Unmarshal(raw, &cfg), "adapted config does not parse")
	return caddy.Validate(&cfg)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}

const site = `{
	admin off
	llm_billing {
		mongodb_uri %URI%
	}
}
:0 {
	llm_billing {
		%BODY%
	}
	reverse_proxy 127.0.0.1:1
}
`

func config(uri, body string) string {
	return strings.NewReplacer("%URI%", uri, "%BODY%", body).Replace(site)
}

// caddy validate must not hang on an unreachable database: provisioning does
// no network I/O (the driver connects lazily).
func TestValidateDoesNotDialDatabase(t *testing.T) {
	models, _ := filepath.Abs("testdata/models.json")
	start := time.Now()
	err := validate(t, config("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=60000", "credit_field creditsNew\nmodels "+models))
	require.NoError(t, err, "valid config refused")
	assert.LessOrEqual(t, time.Since(start), 20*time.Second, "validate must not wait for the database")
}

func TestValidateRefusesBadConfig(t *testing.T) {
	models, _ := filepath.Abs("testdata/models.json")
	t.Setenv("LLM_TEST_URI", "mongodb://127.0.0.1:1")
	tests := []struct {
		name    string
		cfg     string
		wantErr []string
	}{
		{"unknown credit field", config("{env.LLM_TEST_URI}", "credit_field creditz\nmodels "+models),
			[]string{"llm_billing", "credit_field", `unknown credit field "creditz"`}},
		{"refCredits alone", config("{env.LLM_TEST_URI}", "credit_field refCredits credits\nmodels "+models),
			[]string{"credit_field", "unsupported credit field combination"}},
		{"no credit field", config("{env.LLM_TEST_URI}", "models "+models),
			[]string{"credit_field", "no credit field"}},
		{"missing models file", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels /nonexistent/models.json"),
			[]string{"llm_billing", "models", "/nonexistent/models.json"}},
		{"malformed models file", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels "+writeFile(t, "bad.json", `{"models": [`)),
			[]string{"llm_billing", "models"}},
		{"model without prices", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels "+writeFile(t, "noprice.json", `{"models":[{"id":"m","upstream_model_id":"u"}]}`)),
			[]string{"models", "input_price_per_mtok"}},
		{"negative price", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels "+writeFile(t, "neg.json", `{"models":[{"id":"m","input_price_per_mtok":1,"output_price_per_mtok":2,"cache_hit_price_per_mtok":-1}]}`)),
			[]string{"models", "cache_hit_price_per_mtok"}},
		{"weights do not match", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels "+writeFile(t, "w.json", `{"models":[{"id":"m","input_price_per_mtok":1,"output_price_per_mtok":2,"upstream_model_id":["a","b"],"upstream_model_weights":[1]}]}`)),
			[]string{"models", "upstream_model_weights"}},
		{"body_memory below one chunk", config("{env.LLM_TEST_URI}\n\t\tbody_memory 1KiB", "credit_field creditsNew\nmodels "+models),
			[]string{"body_memory must be at least 65536 bytes"}},
		{"credential in forward_headers", config("{env.LLM_TEST_URI}", "credit_field creditsNew\nmodels "+models+"\nforward_headers X-Trace-Id X-Litellm-Api-Key"),
			[]string{"forward_headers", `"X-Litellm-Api-Key" looks like a credential`}},
		{"unset env for uri", config("{env.LLM_TEST_UNSET_VARIABLE}", "credit_field creditsNew\nmodels "+models),
			[]string{"mongodb_uri"}},
		{"missing mongodb_uri", strings.Replace(config("x", "credit_field creditsNew\nmodels "+models), "mongodb_uri x", "database fproxy", 1),
			[]string{"mongodb_uri is required"}},
		{"no global option at all", "{\n\tadmin off\n}\n:0 {\n\tllm_billing {\n\t\tcredit_field creditsNew\n\t\tmodels " + models + "\n\t}\n\treverse_proxy 127.0.0.1:1\n}\n",
			[]string{"mongodb_uri is required"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validate(t, tt.cfg)
			require.Error(t, err, "config accepted")
			for _, want := range tt.wantErr {
				assert.ErrorContains(t, err, want)
			}
		})
	}
}

// The URI never appears in an error, even when it is malformed.
func TestValidateDoesNotEchoURI(t *testing.T) {
	models, _ := filepath.Abs("testdata/models.json")
	secret := "mongodb+srv://admin:hunter2@"
	t.Setenv("LLM_TEST_BAD_URI", secret)
	err := validate(t, config("{env.LLM_TEST_BAD_URI}", "credit_field creditsNew\nmodels "+models))
	require.Error(t, err, "malformed URI accepted")
	assert.NotContains(t, err.Error(), "hunter2", "error leaks the URI")
}

// Caddyfile.example, the production config, adapts and validates with the
// environment it documents (and an unreachable database).
func TestCaddyfileExampleValidates(t *testing.T) {
	assert.NoError(t, validate(t, exampleCaddyfile(t)), "Caddyfile.example does not validate")
}

// examples/Caddyfile.minimal, the generic one-site config the README shows,
// adapts and validates.
func TestCaddyfileMinimalValidates(t *testing.T) {
	t.Setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
	t.Setenv("UPSTREAM_KEY", "sk-upstream")
	cf, err := os.ReadFile(filepath.Join("..", "examples", "Caddyfile.minimal"))
	require.NoError(t, err)
	models, err := filepath.Abs(filepath.Join("..", "examples", "models-chat.json"))
	require.NoError(t, err)
	src := strings.Replace(string(cf), "examples/models-chat.json", models, 1)
	require.NotEqual(t, string(cf), src, "the models path of Caddyfile.minimal changed; update this test")
	assert.NoError(t, validate(t, src), "Caddyfile.minimal does not validate")
}

// TestAppValidate holds every bound of the app's settings: a zero value is
// the default and always valid, the edges are valid, one step past them is
// not, and the error names the key as written in both config formats.
func TestAppValidate(t *testing.T) {
	ok := App{MongoDBURI: "{env.MONGODB_URI}"}
	with := func(f func(a *App)) App { a := ok; f(&a); return a }
	sec := func(d time.Duration) caddy.Duration { return caddy.Duration(d) }
	valid := []App{
		ok,
		with(func(a *App) { a.KeyCacheTTL = -1 }),
		with(func(a *App) { a.KeyCacheTTL = sec(time.Millisecond) }),
		with(func(a *App) { a.KeyRefreshInterval = sec(time.Second) }),
		with(func(a *App) { a.KeyAttempts = 1 }),
		with(func(a *App) { a.KeyAttempts = 20 }),
		with(func(a *App) {
			a.KeyRetryBudget, a.KeyCooldown, a.KeyErrorCooldown = sec(time.Nanosecond), sec(time.Millisecond), sec(time.Hour)
		}),
		with(func(a *App) { a.HoldLease = sec(time.Minute) }),
		with(func(a *App) { a.BodyMemory = firstChunk }),
		with(func(a *App) { a.OrphanPolicy, a.Isolation, a.ErrorLogs = "release", "shared", "off" }),
		with(func(a *App) {
			a.RateLimit = &RateLimits{User: &RateLimit{}, IP: &RateLimit{Events: 1, Window: sec(time.Second)}}
		}),
	}
	for _, a := range valid {
		assert.NoError(t, a.Validate(), "%+v", a)
	}
	invalid := []struct {
		app  App
		want string
	}{
		{App{}, "mongodb_uri is required"},
		{App{MongoDBURI: " "}, "mongodb_uri is required"},
		{with(func(a *App) { a.KeyRefreshInterval = sec(999 * time.Millisecond) }), "key_refresh_interval must be at least 1s, got 999ms"},
		{with(func(a *App) { a.KeyRefreshInterval = sec(-time.Second) }), "key_refresh_interval must be at least 1s, got -1s"},
		{with(func(a *App) { a.KeyAttempts = 21 }), "key_attempts must be from 1 to 20, got 21"},
		{with(func(a *App) { a.KeyAttempts = -1 }), "key_attempts must be from 1 to 20, got -1"},
		{with(func(a *App) { a.KeyRetryBudget = -1 }), "key_retry_budget must be positive, got -1ns"},
		{with(func(a *App) { a.KeyCooldown = sec(-time.Minute) }), "key_cooldown must be positive, got -1m"},
		{with(func(a *App) { a.KeyErrorCooldown = sec(-time.Second) }), "key_error_cooldown must be positive, got -1s"},
		{with(func(a *App) { a.HoldLease = sec(59 * time.Second) }), "hold_lease must be at least 1m, got 59s"},
		{with(func(a *App) { a.BodyMemory = firstChunk - 1 }), "body_memory must be at least 65536 bytes, got 65535"},
		{with(func(a *App) { a.BodyMemory = -1 }), "body_memory must be at least 65536 bytes, got -1"},
		{with(func(a *App) { a.OrphanPolicy = "keep" }), `orphan_policy: unknown orphan policy "keep"`},
		{with(func(a *App) { a.Isolation = "none" }), `isolation: unknown mode "none"`},
		{with(func(a *App) { a.ErrorLogs = "yes" }), `error_logs: want on or off, got "yes"`},
		{with(func(a *App) { a.CreditLease = "yes" }), `credit_lease: want on or off, got "yes"`},
		{with(func(a *App) { a.RateLimit = &RateLimits{Friend: &RateLimit{Events: -1}} }), "rate_limit friend: events must not be negative, got -1"},
		{with(func(a *App) { a.RateLimit = &RateLimits{IP: &RateLimit{Events: 5}} }), "rate_limit ip: the window must be positive"},
	}
	for _, tt := range invalid {
		err := tt.app.Validate()
		if assert.Error(t, err, "%+v", tt.app) {
			assert.Contains(t, err.Error(), tt.want)
		}
	}
}

// TestHandlerValidate is TestAppValidate for the handler's settings.
func TestHandlerValidate(t *testing.T) {
	ok := Handler{CreditFields: []string{"creditsNew"}, Models: "/m.json"}
	with := func(f func(h *Handler)) Handler { h := ok; f(&h); return h }
	valid := []Handler{
		ok,
		with(func(h *Handler) { h.CreditFields = []string{"credits", "refCredits"} }),
		with(func(h *Handler) { h.MaxBodySize = 1 }),
		with(func(h *Handler) { h.MaxBodySize = 1 << 40 }),
		with(func(h *Handler) { h.HoldSizing, h.ClientDisconnect = HoldCheck, DisconnectStop }),
		with(func(h *Handler) { h.DefaultMaxTokens = 1 }),
		with(func(h *Handler) { h.DefaultMaxTokens = 10_000_000 }),
		with(func(h *Handler) { h.DrainTimeout = caddy.Duration(time.Millisecond) }),
		with(func(h *Handler) { h.AllowRoles = []string{"Admin"} }),
		with(func(h *Handler) { h.PriceFactor = &PriceFactor{Factor: 0.4} }),
		with(func(h *Handler) { h.ForwardHeaders = []string{"X-Trace-Id"} }),
	}
	for _, h := range valid {
		assert.NoError(t, h.Validate(), "%+v", h)
	}
	invalid := []struct {
		h    Handler
		want string
	}{
		{with(func(h *Handler) { h.CreditFields = nil }), "credit_field: no credit field given"},
		{with(func(h *Handler) { h.CreditFields = []string{"creditz"} }), `credit_field: unknown credit field "creditz"`},
		{with(func(h *Handler) { h.Models = "" }), "models: a models file is required"},
		{with(func(h *Handler) { h.MaxBodySize = 1<<40 + 1 }), "max_body_size must be from 1 byte to 1TiB, got 1099511627777 bytes"},
		{with(func(h *Handler) { h.MaxBodySize = -1 }), "max_body_size must be from 1 byte to 1TiB, got -1 bytes"},
		{with(func(h *Handler) { h.HoldSizing = "all" }), `hold: unknown sizing "all"`},
		{with(func(h *Handler) { h.DefaultMaxTokens = 10_000_001 }), "default_max_tokens must be from 1 to 10000000, got 10000001"},
		{with(func(h *Handler) { h.DefaultMaxTokens = -1 }), "default_max_tokens must be from 1 to 10000000, got -1"},
		{with(func(h *Handler) { h.ClientDisconnect = "bill" }), `client_disconnect: unknown policy "bill"`},
		{with(func(h *Handler) { h.DrainTimeout = caddy.Duration(-time.Second) }), "drain_timeout must be positive, got -1s"},
		{with(func(h *Handler) { h.AllowRoles = []string{"admin", " "} }), "allow_roles: a role must not be empty"},
		{with(func(h *Handler) { h.PriceFactor = &PriceFactor{} }), "price_factor: the factor must be above 0 and at most 1000, got 0"},
		{with(func(h *Handler) { h.ForwardHeaders = []string{"Cookie"} }), `forward_headers: "Cookie" looks like a credential`},
	}
	for _, tt := range invalid {
		err := tt.h.Validate()
		if assert.Error(t, err, "%+v", tt.h) {
			assert.Contains(t, err.Error(), tt.want)
		}
	}
}

// Validate is what Caddy calls after Provision too: it must not change the
// config it checks.
func TestValidateChangesNothing(t *testing.T) {
	h := Handler{CreditFields: []string{"creditsNew"}, Models: "/m.json", AllowRoles: []string{" Admin "}, PriceFactor: &PriceFactor{Factor: 0.4}}
	before := h
	require.NoError(t, h.Validate())
	assert.Equal(t, before, h)
	assert.Equal(t, []string{" Admin "}, h.AllowRoles)
	assert.Equal(t, PriceFactor{Factor: 0.4}, *h.PriceFactor)
}

// badSettings are out-of-bounds values written once in each config format.
// global is true for the app's settings, false for the handler's.
var badSettings = []struct {
	name      string
	global    bool
	caddyfile string
	json      string
	want      string
}{
	{"hold_lease", true, "hold_lease 10s", `{"hold_lease": "10s"}`, "hold_lease must be at least 1m, got 10s"},
	{"key_refresh_interval", true, "key_refresh_interval 10ms", `{"key_refresh_interval": "10ms"}`, "key_refresh_interval must be at least 1s, got 10ms"},
	{"key_attempts", true, "key_attempts 25", `{"key_attempts": 25}`, "key_attempts must be from 1 to 20, got 25"},
	{"key_retry_budget", true, "key_retry_budget -1s", `{"key_retry_budget": "-1s"}`, "key_retry_budget must be positive, got -1s"},
	{"key_cooldown", true, "key_cooldown -1m", `{"key_cooldown": "-1m"}`, "key_cooldown must be positive, got -1m"},
	{"key_error_cooldown", true, "key_error_cooldown -5s", `{"key_error_cooldown": "-5s"}`, "key_error_cooldown must be positive, got -5s"},
	{"body_memory", true, "body_memory 1KiB", `{"body_memory": 1024}`, "body_memory must be at least 65536 bytes, got 1024"},
	{"orphan_policy", true, "orphan_policy keep", `{"orphan_policy": "keep"}`, `orphan_policy: unknown orphan policy "keep"`},
	{"isolation", true, "isolation none", `{"isolation": "none"}`, `isolation: unknown mode "none"`},
	{"error_logs", true, "error_logs maybe", `{"error_logs": "maybe"}`, `error_logs: want on or off, got "maybe"`},
	{"credit_lease", true, "credit_lease always", `{"credit_lease": "always"}`, `credit_lease: want on or off, got "always"`},
	{"rate_limit", true, "rate_limit {\n\t\t\tuser -1\n\t\t}", `{"rate_limit": {"user": {"events": -1, "window": "1m"}}}`, "rate_limit user: events must not be negative, got -1"},
	{"credit_field", false, "credit_field creditz", `{"credit_field": ["creditz"]}`, `credit_field: unknown credit field "creditz"`},
	{"max_body_size", false, "max_body_size 2TiB", `{"max_body_size": 2199023255552}`, "max_body_size must be from 1 byte to 1TiB, got 2199023255552 bytes"},
	{"hold", false, "hold all", `{"hold": "all"}`, `hold: unknown sizing "all"`},
	{"default_max_tokens", false, "default_max_tokens 20000000", `{"default_max_tokens": 20000000}`, "default_max_tokens must be from 1 to 10000000, got 20000000"},
	{"client_disconnect", false, "client_disconnect bill", `{"client_disconnect": "bill"}`, `client_disconnect: unknown policy "bill"`},
	{"drain_timeout", false, "drain_timeout -1s", `{"drain_timeout": "-1s"}`, "drain_timeout must be positive, got -1s"},
	{"price_factor", false, "price_factor 0", `{"price_factor": {"factor": 0}}`, "price_factor: the factor must be above 0 and at most 1000, got 0"},
}

// The same bad value is refused with the same error, naming the key as the
// user wrote it, whether it comes from a Caddyfile or from a JSON config:
// the bounds live in Validate, not in the Caddyfile parser.
func TestValidateRefusesBadSettingsInBothFormats(t *testing.T) {
	models, err := filepath.Abs("testdata/models.json")
	require.NoError(t, err)
	t.Setenv("LLM_TEST_URI", "mongodb://127.0.0.1:1")
	for _, tt := range badSettings {
		t.Run(tt.name, func(t *testing.T) {
			var cf string
			if tt.global {
				cf = config("{env.LLM_TEST_URI}\n\t\t"+tt.caddyfile, "credit_field creditsNew\nmodels "+models)
			} else {
				credit := "credit_field creditsNew\n"
				if strings.HasPrefix(tt.caddyfile, "credit_field") {
					credit = "" // the row's own
				}
				cf = config("{env.LLM_TEST_URI}", credit+"models "+models+"\n"+tt.caddyfile)
			}
			err := validate(t, cf)
			if assert.Error(t, err, "Caddyfile accepted") {
				assert.Contains(t, err.Error(), tt.want, "Caddyfile")
			}
			err = validateJSON(t, models, tt.global, tt.json)
			if assert.Error(t, err, "JSON accepted") {
				assert.Contains(t, err.Error(), tt.want, "JSON")
			}
		})
	}
}

// validateJSON runs caddy.Validate on a JSON config of one site whose
// llm_billing app (global) or handler (!global) has the fields of extra on
// top of a valid minimum.
func validateJSON(t *testing.T, models string, global bool, extra string) error {
	t.Helper()
	app := map[string]any{"mongodb_uri": "{env.LLM_TEST_URI}"}
	handler := map[string]any{"handler": "llm_billing", "credit_field": []string{"creditsNew"}, "models": models}
	dst := handler
	if global {
		dst = app
	}
	require.NoError(t, json.Unmarshal([]byte(extra), &dst))
	cfg := map[string]any{
		"admin": map[string]any{"disabled": true},
		"apps": map[string]any{
			"llm_billing": app,
			"http": map[string]any{"servers": map[string]any{"srv0": map[string]any{
				"listen": []string{":0"},
				"routes": []any{map[string]any{"handle": []any{
					handler,
					map[string]any{"handler": "reverse_proxy", "upstreams": []any{map[string]any{"dial": "127.0.0.1:1"}}},
				}}},
			}}},
		},
	}
	raw, err := json.Marshal(cfg)
	require.NoError(t, err)
	var c caddy.Config
	require.NoError(t, json.Unmarshal(raw, &c))
	return caddy.Validate(&c)
}

// The JSON config validateJSON builds is valid without extra fields, so
// the refusals above are the bad values' doing.
func TestValidateJSONMinimumIsValid(t *testing.T) {
	models, err := filepath.Abs("testdata/models.json")
	require.NoError(t, err)
	t.Setenv("LLM_TEST_URI", "mongodb://127.0.0.1:1")
	assert.NoError(t, validateJSON(t, models, true, `{}`))
	assert.NoError(t, validateJSON(t, models, false, `{"max_body_size": 1024, "drain_timeout": "1s"}`))
}

// A reload whose config does not validate changes nothing in the engine the
// running config shares: Provision checks everything before it stores a
// setting in the pooled engine.
func TestInvalidReloadKeepsEngineSettings(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	running := &App{MongoDBURI: "mongodb://127.0.0.1:1", Database: "validate_reload",
		KeyCacheTTL: caddy.Duration(10 * time.Second), KeyAttempts: 5, SpoolDir: t.TempDir()}
	require.NoError(t, running.Provision(ctx))
	defer running.Cleanup()

	reload := *running
	reload.eng, reload.poolKey, reload.limits = nil, "", nil
	reload.KeyCacheTTL = caddy.Duration(20 * time.Second)
	reload.KeyAttempts = -1
	err := reload.Provision(ctx)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "key_attempts")
	require.NoError(t, reload.Cleanup()) // as Caddy does after a failed Provision

	assert.Equal(t, 10*time.Second, running.eng.settings().authTTL, "key_cache_ttl")
	assert.Equal(t, 5, running.eng.settings().attempts, "key_attempts")
}
