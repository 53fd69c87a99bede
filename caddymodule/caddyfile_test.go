package caddymodule

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
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
			want: Handler{CreditFields: []string{"creditsNew"}, Models: "m", Hold: HoldCheck, DefaultMaxTokens: 8192,
				ClientDisconnect: DisconnectStop, DrainTimeout: caddy.Duration(30 * time.Second)},
		},
		{name: "unknown hold", input: "llm_billing {\n hold all\n}", wantErr: `hold: unknown sizing "all"`},
		{name: "bad max tokens", input: "llm_billing {\n default_max_tokens 0\n}", wantErr: "default_max_tokens must be"},
		{name: "unknown disconnect policy", input: "llm_billing {\n client_disconnect bill\n}", wantErr: `client_disconnect: unknown policy "bill"`},
		{name: "bad drain timeout", input: "llm_billing {\n drain_timeout -1s\n}", wantErr: "drain_timeout must be"},
		{name: "inline argument", input: "llm_billing creditsNew", wantErr: "wrong argument count"},
		{name: "unknown subdirective", input: "llm_billing {\n credit creditsNew\n}", wantErr: "unrecognized llm_billing subdirective 'credit'"},
		{name: "duplicate credit_field", input: "llm_billing {\n credit_field creditsNew\n credit_field credits\n}", wantErr: "credit_field already specified"},
		{name: "credit_field without value", input: "llm_billing {\n credit_field\n}", wantErr: "wrong argument count"},
		{name: "models with two paths", input: "llm_billing {\n models a b\n}", wantErr: "wrong argument count"},
		{name: "bad size", input: "llm_billing {\n max_body_size lots\n}", wantErr: "max_body_size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h, tt.want) {
				t.Fatalf("got %+v, want %+v", h, tt.want)
			}
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
		{name: "short lease", input: "llm_billing {\n hold_lease 10s\n}", wantErr: "hold_lease must be"},
		{name: "unknown orphan policy", input: "llm_billing {\n orphan_policy keep\n}", wantErr: `unknown orphan policy "keep"`},
		{name: "unknown isolation", input: "llm_billing {\n isolation none\n}", wantErr: `isolation: unknown mode "none"`},
		{name: "unknown option", input: "llm_billing {\n mongo_uri x\n}", wantErr: "unrecognized llm_billing option 'mongo_uri'"},
		{name: "duplicate uri", input: "llm_billing {\n mongodb_uri a\n mongodb_uri b\n}", wantErr: "mongodb_uri already specified"},
		{name: "bad ttl", input: "llm_billing {\n key_cache_ttl soon\n}", wantErr: "key_cache_ttl"},
		{name: "refresh too fast", input: "llm_billing {\n key_refresh_interval 10ms\n}", wantErr: "at least 1s"},
		{name: "no keys", input: "llm_billing {\n upstream_keys\n}", wantErr: "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(a, tt.want) {
				t.Fatalf("got %+v, want %+v", a, tt.want)
			}
		})
	}
}

// A dispenser without tokens (FuzzHandlerUnmarshalCaddyfile's "#0") used
// to give "wrong argument count ..., at :0", an error naming no place; it
// now parses to the zero value and Validate reports what is missing.
func TestUnmarshalCaddyfileWithoutTokens(t *testing.T) {
	for _, input := range []string{"", "#0", "# only a comment\n"} {
		if err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			t.Errorf("Handler, %q: %v", input, err)
		}
		if err := new(App).UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
			t.Errorf("App, %q: %v", input, err)
		}
	}
}
