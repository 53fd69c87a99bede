package caddymodule

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// caddyfileSeeds are the llm_billing blocks of Caddyfile.example and the
// README, plus the edges of each option.
var caddyfileSeeds = []string{
	"llm_billing {\n\tcredit_field creditsNew\n\tmodels {$LLM_MODELS_DIR:/etc/caddy/models}/config-openhands-prod.json\n\tmax_body_size 50MB\n}",
	"llm_billing {\n\tcredit_field credits refCredits\n\tmodels /etc/m.json\n\tmax_body_size 50MB\n\thold check\n}",
	"llm_billing {\n\tdefault_max_tokens 4096\n\tclient_disconnect stop\n\tdrain_timeout 2m\n\thold worst_case\n}",
	"llm_billing {\n\tmongodb_uri {env.MONGODB_URI}\n\tdatabase {env.MONGODB_DB_NAME}\n\thold_lease 15m\n\torphan_policy charge_input\n\tspool_dir /var/lib/caddy/llm-spool\n}",
	"llm_billing {\n\tkey_cache_ttl off\n\tkey_refresh_interval 5s\n\tupstream_keys a b c\n\tkey_attempts 3\n\tkey_retry_budget 30s\n\tkey_cooldown 60s\n\tkey_error_cooldown 10s\n\tisolation auto\n}",
	"llm_billing arg",
	"llm_billing {\n\tunknown x\n}",
	"llm_billing {\n\tmax_body_size\n}",
	"llm_billing {\n\tcredit_field {\n\t}\n}",
	"llm_billing {\n\thold_lease 1m\n\thold_lease 2m\n\tkey_cache_ttl off\n\tkey_attempts x\n}",
	"llm_billing {\n\tallow_roles a\n\tallow_roles b\n\tprice_factor 0 {\n\t\texcept_models [\n\t}\n}",
	"",
}

// FuzzHandlerUnmarshalCaddyfile checks that the handler's Caddyfile parser
// never panics, that every error it returns says where it is, and that
// Validate judges whatever it parsed without panicking.
func FuzzHandlerUnmarshalCaddyfile(f *testing.F) {
	for _, s := range caddyfileSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		d, ok := fuzzDispenser(input)
		if !ok {
			return
		}
		h := new(Handler)
		if err := h.UnmarshalCaddyfile(d); err != nil {
			checkPositioned(t, err)
			return
		}
		_ = h.Validate() // whatever parses, Validate judges without panicking
	})
}

// FuzzAppUnmarshalCaddyfile is FuzzHandlerUnmarshalCaddyfile for the global
// option block.
func FuzzAppUnmarshalCaddyfile(f *testing.F) {
	for _, s := range caddyfileSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		d, ok := fuzzDispenser(input)
		if !ok {
			return
		}
		a := new(App)
		if err := a.UnmarshalCaddyfile(d); err != nil {
			checkPositioned(t, err)
			return
		}
		_ = a.Validate()
	})
}

// fuzzDispenser returns caddyfile.NewTestDispenser(input), or false when
// the input does not tokenize: NewTestDispenser calls log.Fatalf on those,
// and Caddy's lexer reports them before any unmarshaller runs.
func fuzzDispenser(input string) (*caddyfile.Dispenser, bool) {
	if _, err := caddyfile.Tokenize([]byte(input), "Testfile"); err != nil {
		return nil, false
	}
	return caddyfile.NewTestDispenser(input), true
}

// checkPositioned fails t if err does not name the Caddyfile and line it is
// about, as Caddy's d.Errf and d.ArgErr do ("…, at Testfile:3").
func checkPositioned(t *testing.T, err error) {
	t.Helper()
	if err != nil && !strings.Contains(err.Error(), ", at Testfile:") {
		t.Fatalf("error without a position: %v", err)
	}
}
