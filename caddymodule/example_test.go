package caddymodule

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// exampleCaddyfile returns Caddyfile.example, with the environment it
// documents set for t: its models files in a temporary folder, and an
// unreachable database.
func exampleCaddyfile(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for src, dst := range map[string]string{
		"models-chat.json":     "config-openhands-prod.json",
		"models-chat2.json":    "config-ohmygpt-prod.json",
		"models-priority.json": "config-openhands-prod-uutien.json",
	} {
		b, err := os.ReadFile(filepath.Join("..", "examples", src))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dir, dst), b, 0o600))
	}
	t.Setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
	t.Setenv("MONGODB_DB_NAME", "fproxy")
	t.Setenv("LLM_MODELS_DIR", dir)
	cf, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	require.NoError(t, err)
	return string(cf)
}

// adaptExample adapts Caddyfile.example with the environment it documents
// and returns the JSON config as generic maps.
func adaptExample(t *testing.T) map[string]any {
	t.Helper()
	cf := exampleCaddyfile(t)
	raw, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
	require.NoError(t, err)
	var cfg map[string]any
	require.NoError(t, json.Unmarshal(raw, &cfg))
	return cfg
}

// walk calls fn on every JSON object in v.
func walk(v any, fn func(map[string]any)) {
	switch x := v.(type) {
	case map[string]any:
		fn(x)
		for _, e := range x {
			walk(e, fn)
		}
	case []any:
		for _, e := range x {
			walk(e, fn)
		}
	}
}

func get(v any, path ...string) any {
	for _, p := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[p]
	}
	return v
}

// Caddyfile.example replaces every nginx server block: each host the legacy
// nginx served, its limits and timeouts, compression that leaves SSE alone,
// and logs that cannot carry a key.
func TestCaddyfileExampleReplacesNginx(t *testing.T) {
	cfg := adaptExample(t)
	servers, ok := get(cfg, "apps", "http", "servers").(map[string]any)
	require.True(t, ok, "no http servers")
	require.Len(t, servers, 1, "one server on :443 (plus Caddy's automatic :80 redirects)")
	var srv map[string]any
	for _, s := range servers {
		srv = s.(map[string]any)
	}

	var hosts []string
	walk(srv["routes"], func(m map[string]any) {
		for _, h := range asSlice(m["host"]) {
			hosts = append(hosts, h.(string))
		}
	})
	for _, h := range []string{"chat.trollllm.xyz", "chat2.trollllm.xyz", "chat-priority.trollllm.xyz",
		"chat-priority.trolllm.xyz", "api.trollllm.xyz", "trollllm.xyz", "www.trollllm.xyz"} {
		assert.Contains(t, hosts, h, "a host nginx served")
	}
	// Automatic HTTPS stays on: its redirects replace nginx's port 80 block.
	assert.Nil(t, get(srv, "automatic_https", "disable"), "automatic HTTPS (and its http->https redirect) disabled")
	assert.Nil(t, get(srv, "automatic_https", "disable_redirects"), "http->https redirects disabled")

	dur := func(k string) time.Duration { f, _ := srv[k].(float64); return time.Duration(f) }
	assert.Equal(t, 10*time.Second, dur("read_header_timeout"), "nginx client_header_timeout")
	assert.Equal(t, 10*time.Second, dur("read_idle_timeout"), "nginx client_body_timeout")
	assert.Equal(t, 10*time.Second, dur("write_idle_timeout"), "nginx send_timeout")
	assert.Zero(t, dur("write_timeout"), "a total write timeout would cut long streams, as the legacy's 300s did")
	assert.NotZero(t, srv["max_header_bytes"], "header size bound")

	var encoders int
	var bodyLimits, billed []float64
	walk(srv["routes"], func(m map[string]any) {
		switch m["handler"] {
		case "encode":
			encoders++
			checkEncodeSkipsSSE(t, m)
		case "request_body":
			bodyLimits = append(bodyLimits, m["max_size"].(float64))
		case "llm_billing":
			billed = append(billed, m["max_body_size"].(float64))
		}
	})
	assert.Equal(t, 5, encoders, "one encode per site")
	// nginx's sizes: 50M on the chat hosts, 10M on api, its default 1m on
	// the frontend; nginx's M is 2^20 bytes.
	assert.ElementsMatch(t, []float64{50 << 20, 50 << 20, 50 << 20}, billed, "chat hosts' max_body_size")
	assert.ElementsMatch(t, []float64{10 << 20, 1 << 20}, bodyLimits, "request_body on api and the frontend")

	logs, ok := get(cfg, "logging", "logs").(map[string]any)
	require.True(t, ok, "no logs")
	require.Contains(t, logs, "default", "the default log (error lines carry the request) is not filtered")
	assert.Len(t, logs, 6, "the default log and one access log per site")
	for name, l := range logs {
		checkKeyFreeLog(t, name, l)
	}
}

func asSlice(v any) []any {
	s, _ := v.([]any)
	return s
}

// checkEncodeSkipsSSE runs Caddy's own response matcher of an encode
// handler: JSON is compressed, an SSE stream never is.
func checkEncodeSkipsSSE(t *testing.T, enc map[string]any) {
	t.Helper()
	raw, err := json.Marshal(enc["match"])
	require.NoError(t, err)
	var m caddyhttp.ResponseMatcher
	require.NoError(t, json.Unmarshal(raw, &m))
	require.NotEmpty(t, m.Headers, "encode without a matcher uses Caddy's default list, whose text/* takes in text/event-stream")
	for ct, want := range map[string]bool{
		"application/json":                 true,
		"text/html; charset=utf-8":         true,
		"text/event-stream":                false,
		"text/event-stream; charset=utf-8": false,
		"TEXT/EVENT-STREAM":                false,
	} {
		got := m.Match(http.StatusOK, http.Header{"Content-Type": {ct}})
		assert.Equal(t, want, got, "encode compresses %q", ct)
	}
}

// checkKeyFreeLog checks that a log deletes every key-carrying header and
// filters the request URI.
func checkKeyFreeLog(t *testing.T, name string, l any) {
	t.Helper()
	enc := get(l, "encoder")
	require.Equal(t, "filter", get(enc, "format"), "log %s is not filtered", name)
	fields, _ := get(enc, "fields").(map[string]any)
	for _, h := range []string{"Authorization", "Proxy-Authorization", "X-Api-Key", "Cookie"} {
		assert.Equal(t, "delete", get(fields, "request>headers>"+h, "filter"), "log %s keeps %s", name, h)
	}
	uri := get(fields, "request>uri")
	assert.Equal(t, "multi_regexp", get(uri, "filter"), "log %s keeps query keys", name)
	raw, err := json.Marshal(uri)
	require.NoError(t, err)
	var f struct {
		Operations []struct{ Regexp, Value string }
	}
	require.NoError(t, json.Unmarshal(raw, &f))
	ops := f.Operations
	require.NotEmpty(t, ops)
	for uri, want := range map[string]string{
		"/v1/messages?beta=true&key=sk-trollllm-0123abcd&x=1": "/v1/messages?beta=REDACTED&key=REDACTED&x=REDACTED",
		"/v1/chat/completions?bare-key-0123":                  "/v1/chat/completions?REDACTED",
		"/v1/models#api_key=k2":                               "/v1/models#api_key=REDACTED",
		"/sk-trollllm-0123abcd/v1/models":                     "/sk-REDACTED/v1/models",
		"/v1/models/claude-sonnet-4-5":                        "/v1/models/claude-sonnet-4-5",
	} {
		got := uri
		for _, op := range ops {
			re, err := regexp.Compile(op.Regexp)
			require.NoError(t, err)
			got = re.ReplaceAllString(got, op.Value)
		}
		assert.Equal(t, want, got, "log %s: request>uri filter", name)
	}
}
