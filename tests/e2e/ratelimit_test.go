package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// rateLimited reloads Caddy with the given rate_limit block for the test's
// duration.
func rateLimited(t *testing.T, block string) {
	t.Helper()
	reloadWith(t, configOpts{appExtra: "\n\t\trate_limit {\n" + block + "\n\t\t}"})
	t.Cleanup(func() { reloadWith(t, configOpts{}) })
}

// reloadWith loads a new config; connections to the old one are dropped.
func reloadWith(t *testing.T, o configOpts) {
	t.Helper()
	require.NoError(t, loadCaddy(caddyfile(o)))
	http.DefaultClient.CloseIdleConnections()
}

type limitAnswer struct {
	status                  int
	limit, remaining, retry int
	reset                   time.Time
	body                    map[string]any
}

func sendLimited(t *testing.T, path, key, testID string) limitAnswer {
	t.Helper()
	body := validBody("claude-sonnet-4-5-20250929")()
	resp := post(t, chatURL+path, key, body, map[string]string{"X-Test-Id": testID})
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	a := limitAnswer{status: resp.StatusCode}
	num := func(h string) int {
		n, err := strconv.Atoi(resp.Header.Get(h))
		require.NoError(t, err, "%s: %q", h, resp.Header.Get(h))
		return n
	}
	a.limit, a.remaining = num("X-RateLimit-Limit"), num("X-RateLimit-Remaining")
	a.reset = time.Unix(int64(num("X-RateLimit-Reset")), 0)
	if a.status == http.StatusTooManyRequests {
		a.retry = num("Retry-After")
		require.NoError(t, json.Unmarshal(raw, &a.body), string(raw))
	}
	return a
}

// The limit of a user key: the headers say what is left on every answer, the
// request past the limit gets the legacy 429 with the real wait, is neither
// forwarded nor billed, and a reload does not give the budget back.
func TestRateLimitPerKey(t *testing.T) {
	rateLimited(t, "\t\t\tuser 5 1m")
	u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5})
	testID := uniq(t, "req")
	for i := 0; i < 5; i++ {
		a := sendLimited(t, "/v1/messages", key, testID)
		require.Equal(t, 200, a.status, "request %d", i+1)
		assert.Equal(t, 5, a.limit)
		assert.Equal(t, 4-i, a.remaining, "request %d", i+1)
		assert.WithinDuration(t, time.Now().Add(time.Duration(i+1)*12*time.Second), a.reset, 2*time.Second)
	}
	a := sendLimited(t, "/v1/messages", key, testID)
	require.Equal(t, http.StatusTooManyRequests, a.status)
	assert.Equal(t, 0, a.remaining)
	assert.InDelta(t, 12, a.retry, 1, "Retry-After is the time until one request is allowed again: 1m/5")
	assert.Equal(t, "error", a.body["type"])
	errObj := a.body["error"].(map[string]any)
	assert.Equal(t, "rate_limit_error", errObj["type"])
	assert.Equal(t, "Rate limit exceeded. Please retry after "+strconv.Itoa(a.retry)+" seconds.", errObj["message"])
	assert.Len(t, upstreamRequests(testID), 5, "a rate-limited request reached the upstream")
	waitLogs(t, u.ID, 5)

	// The OpenAI shape on its endpoint; the budget survives a reload.
	reloadWith(t, configOpts{appExtra: "\n\t\trate_limit {\n\t\t\tuser 5 1m\n\t\t}"})
	resp := post(t, chatURL+"/v1/chat/completions", key, []byte(`{"model":"claude-sonnet-4-5-20250929","messages":[]}`), nil)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode, string(raw))
	assert.JSONEq(t, `{"error":{"message":"Rate limit exceeded. Please retry after `+resp.Header.Get("Retry-After")+
		` seconds.","type":"rate_limit_error","code":"rate_limit_exceeded"}}`, string(raw))

	// Another key has its own budget.
	_, other := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5})
	assert.Equal(t, 200, sendLimited(t, "/v1/messages", other, testID).status)
	time.Sleep(300 * time.Millisecond)
	waitLogs(t, u.ID, 5)

	n, _ := metricValue(t, `caddy_llm_billing_rate_limited_total{kind="user"}`)
	assert.GreaterOrEqual(t, n, 2.0)
}

// The per-IP limit applies before the key is read, to any key or none.
func TestRateLimitPerIP(t *testing.T) {
	rateLimited(t, "\t\t\tip 3 1m")
	testID := uniq(t, "req")
	for i := 0; i < 3; i++ {
		_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 5})
		a := sendLimited(t, "/v1/messages", key, testID)
		require.Equal(t, 200, a.status)
	}
	a := sendLimited(t, "/v1/messages", "sk-trollllm-"+randHex(64), testID)
	require.Equal(t, http.StatusTooManyRequests, a.status)
	assert.Equal(t, 3, a.limit)
	assert.Len(t, upstreamRequests(testID), 3)
}
