package e2e

import (
	"bufio"
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/mongo"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// hostileSite loads a config billing database dbName, whose upstream key
// pool is keys (id → key, all accepted by the stand-in), and returns a user
// with $10 there and its key. Cleanup restores the config and the stand-in.
func hostileSite(t *testing.T, dbName string, keys map[string]string) (string, string, *mongo.Database) {
	t.Helper()
	ctx := context.Background()
	fdb := env.DB.Client().Database(dbName)
	accepted := []string{env.UpstreamKey}
	for id, k := range keys {
		accepted = append(accepted, k)
		require.NoError(t, seed.Insert(ctx, fdb, seed.UpstreamKey{ID: id, APIKey: k, Status: "healthy"}))
		require.NoError(t, seed.Bind(ctx, fdb, id))
	}
	env.Standin.SetKeys(accepted...)
	user := uniq(t, "u")
	key := "sk-trollllm-" + randHex(64)
	rememberKey(key)
	require.NoError(t, seed.Insert(ctx, fdb, seed.User{ID: user, APIKey: key, Role: "user", Active: true, Migration: true, CreditsNew: 10}))
	require.NoError(t, loadCaddy(caddyfile(configOpts{database: dbName})))
	t.Cleanup(func() {
		for _, k := range keys {
			env.Standin.SetKeyStatus(k, "")
		}
		env.Standin.SetKeys(env.UpstreamKey)
		if err := loadCaddy(caddyfile(configOpts{})); err != nil {
			t.Errorf("restoring the config: %v", err)
		}
	})
	return user, key, fdb
}

func postRead(t *testing.T, url, key string, body []byte, hdr map[string]string) (int, []byte) {
	t.Helper()
	resp := post(t, url, key, body, hdr)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, raw
}

// Client headers that carry credentials never reach the upstream, so a
// client cannot make a pool key answer 401 with them (LiteLLM reads
// x-litellm-api-key before Authorization); and a 401 a client causes some
// other way (here X-Standin-Status) does not demote a key: the gateway's
// own probe finds the key good.
func TestClientCannotTakeThePoolDown(t *testing.T) {
	keys := map[string]string{"h-a": "sk-h-a-" + randHex(16), "h-b": "sk-h-b-" + randHex(16)}
	_, key, fdb := hostileSite(t, "fproxy_hostile", keys)
	noLeaks(t) // after the test's config is loaded; checked before it is restored
	healthy := func() {
		t.Helper()
		got := keyStatuses(t, fdb)
		for id := range keys {
			assert.Equal(t, "healthy", got[id], "key %s", id)
		}
	}

	for _, h := range []struct{ name, value string }{
		{"X-Litellm-Api-Key", "sk-hostile-" + randHex(16)},
		{"Api-Key", "sk-hostile-" + randHex(16)},
		{"X-Goog-Api-Key", "AIza-hostile"},
		{"Ocp-Apim-Subscription-Key", "hostile-sub-key"},
		{"Cookie", "session=hostile"},
	} {
		t.Run(h.name, func(t *testing.T) {
			for _, path := range []string{"/v1/messages", "/v1/chat/completions"} {
				testID := uniq(t, "req")
				status, raw := postRead(t, chatURL+path, key, validBody("claude-sonnet-4-5")(),
					map[string]string{h.name: h.value, "X-Test-Id": testID})
				assert.Equal(t, 200, status, "%s: %s", path, raw)
				reqs := upstreamRequests(testID)
				require.NotEmpty(t, reqs, path)
				for _, r := range reqs {
					assert.Empty(t, r.Header.Values(h.name), "%s reached the upstream on %s", h.name, path)
					assert.Equal(t, []string{"Bearer " + keys[keyID(keys, r.Header.Get("Authorization"))]}, r.Header.Values("Authorization"))
				}
			}
			healthy()
		})
	}

	t.Run("client-caused 401", func(t *testing.T) {
		since := time.Now()
		status, raw := postRead(t, chatURL+"/v1/messages", key, validBody("claude-sonnet-4-5")(),
			map[string]string{standin.HeaderStatus: "401", "X-Test-Id": uniq(t, "req")})
		assert.Equal(t, 401, status, "%s", raw)
		// Each key that got the 401 is probed, without the client's headers.
		probed := map[string]bool{}
		deadline := time.Now().Add(10 * time.Second)
		for len(probed) < len(keys) && time.Now().Before(deadline) {
			for _, r := range env.Standin.Requests() {
				if r.Method == http.MethodGet && r.Path == standin.PathModels && r.Time.After(since) {
					assert.Empty(t, r.Header.Get(standin.HeaderStatus))
					assert.Empty(t, r.Header.Get("X-Test-Id"))
					probed[r.Header.Get("Authorization")] = true
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		assert.Len(t, probed, len(keys), "probes")
		time.Sleep(500 * time.Millisecond) // a wrong demotion would be written by now
		healthy()
		// Both keys serve again at once.
		for i := 0; i < 2*len(keys); i++ {
			status, raw := postRead(t, chatURL+"/v1/chat/completions", key, validBody("claude-sonnet-4-5")(), nil)
			assert.Equal(t, 200, status, "%s", raw)
		}
	})
}

func keyID(keys map[string]string, auth string) string {
	for id, k := range keys {
		if auth == "Bearer "+k {
			return id
		}
	}
	return ""
}

// A key the upstream really refuses is demoted for good once the probe
// confirms it: need_refresh in openhands_keys, and clients never see it.
func TestRevokedKeyDemotedAfterProbe(t *testing.T) {
	keys := map[string]string{"p-good": "sk-p-good-" + randHex(16), "p-revoked": "sk-p-revoked-" + randHex(16)}
	_, key, fdb := hostileSite(t, "fproxy_probe", keys)
	noLeaks(t) // after the test's config is loaded; checked before it is restored
	env.Standin.SetKeyStatus(keys["p-revoked"], "401")
	since := time.Now()
	hit := false
	for i := 0; i < 4 && !hit; i++ {
		status, raw := postRead(t, chatURL+"/v1/messages", key, validBody("claude-sonnet-4-5")(), nil)
		require.Equal(t, 200, status, "%s", raw)
		for _, r := range env.Standin.Requests() {
			hit = hit || (r.Method == http.MethodPost && r.Time.After(since) && r.Header.Get("Authorization") == "Bearer "+keys["p-revoked"])
		}
	}
	require.True(t, hit, "the revoked key was never tried")
	deadline := time.Now().Add(10 * time.Second)
	for keyStatuses(t, fdb)["p-revoked"] != "need_refresh" {
		require.True(t, time.Now().Before(deadline), "statuses %v", keyStatuses(t, fdb))
		time.Sleep(100 * time.Millisecond)
	}
	assert.Equal(t, "healthy", keyStatuses(t, fdb)["p-good"])
	probed := false
	for _, r := range env.Standin.Requests() {
		probed = probed || (r.Method == http.MethodGet && r.Path == standin.PathModels && r.Time.After(since) &&
			r.Header.Get("Authorization") == "Bearer "+keys["p-revoked"])
	}
	assert.True(t, probed, "demoted without a probe")
}

// An upstream 2xx that is not the JSON or the stream the API promises is a
// 502 in the API's shape, and costs the client nothing.
func TestGarbageSuccessIs502Unbilled(t *testing.T) {
	noLeaks(t)
	for _, tc := range []struct {
		name, garbage string
		stream        bool
	}{
		{"html page", "html", false},
		{"non-json body", "text", false},
		{"stream answered with json garbage", "text", true},
	} {
		for _, path := range []string{"/v1/messages", "/v1/chat/completions"} {
			t.Run(tc.name+" "+path, func(t *testing.T) {
				u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5})
				before := balances(t, u.ID)
				body := validBody("claude-sonnet-4-5")()
				if tc.stream {
					body = streamBody("claude-sonnet-4-5")
				}
				status, raw := postRead(t, chatURL+path, key, body, map[string]string{standin.HeaderGarbage: tc.garbage})
				assert.Equal(t, http.StatusBadGateway, status, "%s", raw)
				checkErrorShape(t, path, raw, "upstream_error", "", "api_error", "Upstream service returned an invalid response")
				noLogsFor(t, u.ID)
				assert.Equal(t, before, balances(t, u.ID))
			})
		}
	}
}

// rawRequest sends raw bytes over one connection and returns the answer.
func rawRequest(t *testing.T, base string, req string) (*http.Response, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	go func() { _, _ = io.WriteString(conn, req) }() // the server may answer before reading it all
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	require.NoError(t, err)
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	return resp, string(raw)
}

// A key in the query string never reaches the upstream: of the query only
// beta (which Claude Code sends) is forwarded.
func TestQueryKeyNeverReachesTheUpstream(t *testing.T) {
	noLeaks(t)
	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
	testID := uniq(t, "req")
	status, raw := postRead(t, chatURL+"/v1/messages?beta=true&key="+key+"&api-key="+key, key,
		validBody("claude-sonnet-4-5")(), map[string]string{"X-Test-Id": testID})
	require.Equal(t, http.StatusOK, status, "%s", raw)
	reqs := upstreamRequests(testID)
	require.Len(t, reqs, 1)
	assert.Equal(t, "beta=true", reqs[0].Query)
	assert.NotContains(t, reqs[0].Query, key)
}
