package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go"
	antoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// Claude Code calls count_tokens: it is authenticated, forwarded with a pool
// key and the upstream model id, and never held or billed.
func TestCountTokensIsForwardedAndNotBilled(t *testing.T) {
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
	testID := uniq(t, "req")
	client := anthropic.NewClient(antoption.WithBaseURL(chatURL), antoption.WithAPIKey(key), antoption.WithMaxRetries(0),
		antoption.WithHeader("X-Test-Id", testID), antoption.WithHeader("X-Litellm-Api-Key", "sk-hostile"))
	res, err := client.Messages.CountTokens(context.Background(), anthropic.MessageCountTokensParams{
		Model:    "claude-sonnet-4-5-20250929",
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("count me"))},
	})
	require.NoError(t, err)

	got := upstreamRequests(testID)
	require.Len(t, got, 1)
	assert.Equal(t, standin.PathCountTokens, got[0].Path)
	assert.EqualValues(t, standin.CountTokens(got[0].Body), res.InputTokens)
	assert.NotContains(t, got[0].Header.Get("Authorization"), key, "the client's key reached the upstream")
	assert.Empty(t, got[0].Header.Get("X-Litellm-Api-Key"), "a client credential header reached the upstream")
	var fwd struct{ Model string }
	require.NoError(t, json.Unmarshal(got[0].Body, &fwd))
	assert.NotEqual(t, "claude-sonnet-4-5-20250929", fwd.Model, "the model was not mapped to its upstream id")

	noLogsFor(t, u.ID)
	assert.Equal(t, 1.0, balances(t, u.ID)["creditsNew"])

	// Without a valid key it is refused before the upstream.
	bad := anthropic.NewClient(antoption.WithBaseURL(chatURL), antoption.WithAPIKey("sk-trollllm-"+randHex(64)),
		antoption.WithMaxRetries(0), antoption.WithHeader("X-Test-Id", testID))
	_, err = bad.Messages.CountTokens(context.Background(), anthropic.MessageCountTokensParams{
		Model:    "claude-sonnet-4-5-20250929",
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("count me"))},
	})
	var apiErr *anthropic.Error
	require.ErrorAs(t, err, &apiErr)
	assert.Equal(t, http.StatusUnauthorized, apiErr.StatusCode)
	assert.Len(t, upstreamRequests(testID), 1)
}

func TestModelByID(t *testing.T) {
	var list struct {
		Data []map[string]any `json:"data"`
	}
	status, body := get(t, chatURL+"/v1/models")
	require.Equal(t, 200, status)
	require.NoError(t, json.Unmarshal(body, &list))
	require.NotEmpty(t, list.Data)
	for _, m := range list.Data {
		status, body := get(t, chatURL+"/v1/models/"+m["id"].(string))
		require.Equal(t, 200, status, m["id"])
		var one map[string]any
		require.NoError(t, json.Unmarshal(body, &one))
		assert.Equal(t, m, one)
	}
	status, body = get(t, chatURL+"/v1/models/no-such-model")
	assert.Equal(t, 404, status)
	var e struct {
		Error struct{ Message, Type string }
	}
	require.NoError(t, json.Unmarshal(body, &e))
	assert.Equal(t, "invalid_request_error", e.Error.Type)
	assert.Contains(t, e.Error.Message, "no-such-model")
}

// A browser's preflight is answered on any path without a key and never
// reaches the upstream; the answer that follows carries the origin too.
func TestCORSPreflight(t *testing.T) {
	testID := uniq(t, "req")
	for _, path := range []string{"/v1/messages", "/v1/chat/completions", "/v1/messages/count_tokens", "/anything"} {
		req, _ := http.NewRequest(http.MethodOptions, chatURL+path, nil)
		req.Header.Set("Origin", "https://app.example")
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "anthropic-version,anthropic-beta,x-api-key,content-type")
		req.Header.Set("X-Test-Id", testID)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		assert.Equal(t, 200, resp.StatusCode, path)
		assert.Equal(t, "https://app.example", resp.Header.Get("Access-Control-Allow-Origin"), path)
		assert.Equal(t, "true", resp.Header.Get("Access-Control-Allow-Credentials"), path)
		assert.Contains(t, resp.Header.Get("Access-Control-Allow-Methods"), "POST", path)
		allowed := strings.ToLower(resp.Header.Get("Access-Control-Allow-Headers"))
		for _, h := range []string{"anthropic-version", "anthropic-beta", "x-api-key", "content-type", "authorization"} {
			assert.Contains(t, allowed, h, path)
		}
	}
	assert.Empty(t, upstreamRequests(testID))

	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
	req, _ := http.NewRequest(http.MethodPost, chatURL+"/v1/messages", bytes.NewReader(validBody("claude-sonnet-4-5-20250929")()))
	req.Header.Set("Origin", "https://app.example")
	req.Header.Set("x-api-key", key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	assert.Equal(t, 200, resp.StatusCode)
	assert.Equal(t, []string{"https://app.example"}, resp.Header.Values("Access-Control-Allow-Origin"))
}

// /health reports the database: 503 "unreachable" within seconds of it
// going away, 200 "ok" within seconds of it coming back.
func TestHealthFollowsTheDatabase(t *testing.T) {
	health := func() (int, map[string]any) {
		status, body := get(t, chatURL+"/health")
		var v map[string]any
		require.NoError(t, json.Unmarshal(body, &v), string(body))
		return status, v
	}
	status, v := health()
	require.Equal(t, 200, status)
	assert.Equal(t, "healthy", v["status"])
	assert.Equal(t, "ok", v["database"])
	assert.NotEmpty(t, v["timestamp"])
	assert.Contains(t, v, "uptime")

	env.TestDB.Stop()
	restarted := false
	defer func() {
		if !restarted {
			_ = env.TestDB.Restart(context.Background())
		}
	}()
	assert.Eventually(t, func() bool {
		status, v := health()
		return status == 503 && v["database"] == "unreachable"
	}, 10*time.Second, 200*time.Millisecond, "a stopped database does not show on /health")

	require.NoError(t, env.TestDB.Restart(context.Background()))
	restarted = true
	assert.Eventually(t, func() bool {
		status, v := health()
		return status == 200 && v["database"] == "ok"
	}, 15*time.Second, 200*time.Millisecond, "a restarted database does not show on /health")
	// The tests' own client drops its broken connections on first use.
	require.Eventually(t, func() bool {
		_, err := db.Collection("e2e_probe").InsertOne(context.Background(), map[string]int{"n": 1})
		return err == nil
	}, 10*time.Second, 100*time.Millisecond)
}

func get(t *testing.T, url string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, body
}
