package caddymodule

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHandlerUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    Handler
		wantErr string
	}{
		{
			name:  "creditsNew",
			input: "llm_billing {\n credit_field creditsNew\n models /etc/m.json\n}",
			want:  Handler{CreditFields: []string{"creditsNew"}, Models: "/etc/m.json"},
		},
		{
			name:  "credits then refCredits, body limit",
			input: "llm_billing {\n credit_field credits refCredits\n models {env.M}\n max_body_size 10MB\n}",
			want:  Handler{CreditFields: []string{"credits", "refCredits"}, Models: "{env.M}", MaxBodySize: 10_000_000},
		},
		{
			name:  "hold and disconnect policy",
			input: "llm_billing {\n credit_field creditsNew\n models m\n hold check\n default_max_tokens 8192\n client_disconnect stop\n drain_timeout 30s\n}",
			want: Handler{CreditFields: []string{"creditsNew"}, Models: "m", HoldSizing: HoldCheck, DefaultMaxTokens: 8192,
				ClientDisconnect: DisconnectStop, DrainTimeout: caddy.Duration(30 * time.Second)},
		},
		{
			// Bounds and enums are Handler.Validate's (TestHandlerValidate):
			// the parser converts what it is given.
			name:  "out of bounds parses",
			input: "llm_billing {\n hold all\n default_max_tokens 0\n client_disconnect bill\n drain_timeout -1s\n max_body_size 0\n}",
			want:  Handler{HoldSizing: "all", ClientDisconnect: "bill", DrainTimeout: caddy.Duration(-time.Second)},
		},
		{name: "max tokens not a number", input: "llm_billing {\n default_max_tokens many\n}", wantErr: `default_max_tokens: not a whole number: "many"`},
		{name: "drain timeout not a duration", input: "llm_billing {\n drain_timeout soon\n}", wantErr: `drain_timeout: not a duration: "soon"`},
		{name: "duplicate hold", input: "llm_billing {\n hold check\n hold worst_case\n}", wantErr: "hold already specified"},
		{name: "repeated allow_roles add up", input: "llm_billing {\n allow_roles admin\n allow_roles priority\n}", want: Handler{AllowRoles: []string{"admin", "priority"}}},
		{name: "inline argument", input: "llm_billing creditsNew", wantErr: "wrong argument count"},
		{name: "unknown subdirective", input: "llm_billing {\n credit creditsNew\n}", wantErr: "unrecognized llm_billing subdirective 'credit'"},
		{name: "duplicate credit_field", input: "llm_billing {\n credit_field creditsNew\n credit_field credits\n}", wantErr: "credit_field already specified"},
		{name: "credit_field without value", input: "llm_billing {\n credit_field\n}", wantErr: "wrong argument count"},
		{name: "models with two paths", input: "llm_billing {\n models a b\n}", wantErr: "wrong argument count"},
		{name: "bad size", input: "llm_billing {\n max_body_size lots\n}", wantErr: `max_body_size: not a size: "lots"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, h)
		})
	}
}

func TestAppUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    App
		wantErr string
	}{
		{
			name:  "full",
			input: "llm_billing {\n mongodb_uri {env.MONGODB_URI}\n database {env.DB}\n key_cache_ttl 10s\n key_refresh_interval 3s\n upstream_keys {env.K1} {env.K2}\n}",
			want: App{MongoDBURI: "{env.MONGODB_URI}", Database: "{env.DB}", KeyCacheTTL: caddy.Duration(10 * time.Second),
				KeyRefreshInterval: caddy.Duration(3 * time.Second), UpstreamKeys: []string{"{env.K1}", "{env.K2}"}},
		},
		{name: "cache off", input: "llm_billing {\n key_cache_ttl off\n}", want: App{KeyCacheTTL: -1}},
		{
			name:  "holds and settlement",
			input: "llm_billing {\n hold_lease 20m\n orphan_policy charge_hold\n spool_dir /var/lib/caddy/spool\n isolation shared\n}",
			want:  App{HoldLease: caddy.Duration(20 * time.Minute), OrphanPolicy: "charge_hold", SpoolDir: "/var/lib/caddy/spool", Isolation: "shared"},
		},
		{name: "body memory", input: "llm_billing {\n body_memory 64MiB\n}", want: App{BodyMemory: 64 << 20}},
		{name: "bad body memory", input: "llm_billing {\n body_memory plenty\n}", wantErr: `body_memory: not a size: "plenty"`},
		{
			// Bounds and enums are App.Validate's (TestAppValidate): the
			// parser converts what it is given.
			name:  "out of bounds parses",
			input: "llm_billing {\n hold_lease 10s\n orphan_policy keep\n isolation none\n key_refresh_interval 10ms\n key_attempts 25\n key_cooldown 0s\n}",
			want: App{HoldLease: caddy.Duration(10 * time.Second), OrphanPolicy: "keep", Isolation: "none",
				KeyRefreshInterval: caddy.Duration(10 * time.Millisecond), KeyAttempts: 25},
		},
		{name: "attempts not a number", input: "llm_billing {\n key_attempts three\n}", wantErr: `key_attempts: not a whole number: "three"`},
		{name: "lease not a duration", input: "llm_billing {\n hold_lease forever\n}", wantErr: `hold_lease: not a duration: "forever"`},
		{name: "duplicate lease", input: "llm_billing {\n hold_lease 10m\n hold_lease 20m\n}", wantErr: "hold_lease already specified"},
		{name: "repeated upstream_keys add up", input: "llm_billing {\n upstream_keys a\n upstream_keys b c\n}", want: App{UpstreamKeys: []string{"a", "b", "c"}}},
		{name: "rate limit out of bounds parses", input: "llm_billing {\n rate_limit {\n user -1 0s\n }\n}", want: App{RateLimit: &RateLimits{User: &RateLimit{Events: -1}}}},
		{name: "unknown option", input: "llm_billing {\n mongo_uri x\n}", wantErr: "unrecognized llm_billing option 'mongo_uri'"},
		{name: "duplicate uri", input: "llm_billing {\n mongodb_uri a\n mongodb_uri b\n}", wantErr: "mongodb_uri already specified"},
		{name: "bad ttl", input: "llm_billing {\n key_cache_ttl soon\n}", wantErr: `key_cache_ttl: not a duration: "soon"`},
		{name: "ttl with two values", input: "llm_billing {\n key_cache_ttl off 10s\n}", wantErr: "wrong argument count"},
		{name: "no keys", input: "llm_billing {\n upstream_keys\n}", wantErr: "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, a)
		})
	}
}

// A dispenser without tokens (FuzzHandlerUnmarshalCaddyfile's "#0") used
// to give "wrong argument count ..., at :0", an error naming no place; it
// now parses to the zero value and Validate reports what is missing.
func TestUnmarshalCaddyfileWithoutTokens(t *testing.T) {
	for _, input := range []string{"", "#0", "# only a comment\n"} {
		assert.NoError(t, new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)), "Handler, %q", input)
		assert.NoError(t, new(App).UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)), "App, %q", input)
	}
}
