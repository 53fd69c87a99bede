package caddymodule

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
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
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatalf("adapted config does not parse: %v", err)
	}
	return caddy.Validate(&cfg)
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
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
	if err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("validate took %v: it must not wait for the database", d)
	}
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
			if err == nil {
				t.Fatal("config accepted, want an error")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
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
	if err == nil {
		t.Fatal("malformed URI accepted")
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Fatalf("error leaks the URI: %v", err)
	}
}

// Caddyfile.example, the production config, adapts and validates with the
// environment it documents (and an unreachable database).
func TestCaddyfileExampleValidates(t *testing.T) {
	dir := t.TempDir()
	for src, dst := range map[string]string{
		"models-chat.json":     "config-openhands-prod.json",
		"models-chat2.json":    "config-ohmygpt-prod.json",
		"models-priority.json": "config-openhands-prod-uutien.json",
	} {
		b, err := os.ReadFile(filepath.Join("..", "examples", src))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
	t.Setenv("MONGODB_DB_NAME", "fproxy")
	t.Setenv("LLM_MODELS_DIR", dir)
	cf, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	if err := validate(t, string(cf)); err != nil {
		t.Fatalf("Caddyfile.example does not validate: %v", err)
	}
}

// examples/Caddyfile.minimal, the generic one-site config the README shows,
// adapts and validates.
func TestCaddyfileMinimalValidates(t *testing.T) {
	t.Setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
	t.Setenv("UPSTREAM_KEY", "sk-upstream")
	cf, err := os.ReadFile(filepath.Join("..", "examples", "Caddyfile.minimal"))
	if err != nil {
		t.Fatal(err)
	}
	models, err := filepath.Abs(filepath.Join("..", "examples", "models-chat.json"))
	if err != nil {
		t.Fatal(err)
	}
	src := strings.Replace(string(cf), "examples/models-chat.json", models, 1)
	if src == string(cf) {
		t.Fatal("the models path of Caddyfile.minimal changed; update this test")
	}
	if err := validate(t, src); err != nil {
		t.Fatalf("Caddyfile.minimal does not validate: %v", err)
	}
}
