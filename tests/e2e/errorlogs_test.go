package e2e

import (
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// Refused requests are written to error_logs in the legacy shape, off the
// request path: masked key, error type by status, the selected headers.
func TestRefusalsAreInErrorLogs(t *testing.T) {
	broke, brokeKey := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0})
	_, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 1})
	unknown := "sk-trollllm-" + randHex(64)
	reqID := uniq(t, "rid")
	send := func(method, path, key, body string) int {
		req, err := http.NewRequest(method, chatURL+path, strings.NewReader(body))
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+key)
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Request-Id", reqID)
		req.Header.Set("User-Agent", "errorlogs-test/1.0")
		req.Header.Set("Cookie", "session=secret-cookie")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	body := string(validBody("claude-sonnet-4-5-20250929")())
	require.Equal(t, 401, send(http.MethodPost, "/v1/messages", unknown, body))
	require.Equal(t, 402, send(http.MethodPost, "/v1/messages", brokeKey, body))
	require.Equal(t, 404, send(http.MethodPost, "/v1/chat/completions", key, `{"model":"no-such-model","messages":[]}`))
	require.Equal(t, 400, send(http.MethodPost, "/v1/chat/completions", key, `{"model":`))
	require.Equal(t, 405, send(http.MethodGet, "/v1/messages", key, ""))
	require.Equal(t, 200, send(http.MethodPost, "/v1/messages", key, body), "a served request")

	var rows []bson.M
	require.Eventually(t, func() bool {
		cur, err := db.Collection("error_logs").Find(context.Background(), bson.D{{Key: "requestHeaders.X-Request-Id", Value: reqID}})
		require.NoError(t, err)
		rows = nil
		require.NoError(t, cur.All(context.Background(), &rows))
		return len(rows) >= 5
	}, 10*time.Second, 100*time.Millisecond, "error_logs rows did not appear")
	time.Sleep(1500 * time.Millisecond) // a served request must not add a row
	cur, err := db.Collection("error_logs").Find(context.Background(), bson.D{{Key: "requestHeaders.X-Request-Id", Value: reqID}})
	require.NoError(t, err)
	rows = nil
	require.NoError(t, cur.All(context.Background(), &rows))
	require.Len(t, rows, 5)

	byStatus := map[int32]bson.M{}
	for _, r := range rows {
		byStatus[r["statusCode"].(int32)] = r
		assert.Equal(t, "goproxy", r["source"])
		assert.Equal(t, "errorlogs-test/1.0", r["userAgent"])
		assert.Equal(t, "127.0.0.1", r["clientIp"])
		assert.IsType(t, bson.DateTime(0), r["createdAt"])
		var hdr map[string]string
		raw, err := bson.Marshal(r["requestHeaders"])
		require.NoError(t, err)
		require.NoError(t, bson.Unmarshal(raw, &hdr))
		assert.Equal(t, "application/json", hdr["Content-Type"])
		assert.NotContains(t, hdr, "Authorization")
		assert.NotContains(t, hdr, "Cookie")
		assert.Contains(t, r["endpoint"], chatURL[len("http://"):])
	}
	for status, want := range map[int32]struct{ typ, msg, user string }{
		401: {"authentication_error", "Invalid API key", ""},
		402: {"payment_required", "Insufficient", broke.ID},
		404: {"not_found", "no-such-model", ""},
		400: {"validation_error", "Invalid JSON", ""},
		405: {"method_not_allowed", "Method not allowed", ""},
	} {
		r := byStatus[status]
		require.NotNil(t, r, "no row for %d", status)
		assert.Equal(t, want.typ, r["errorType"], status)
		assert.Contains(t, r["errorMessage"], want.msg, status)
		if want.user != "" {
			assert.Equal(t, want.user, r["userId"], status)
		}
	}
	assert.Equal(t, maskedKey(unknown), byStatus[401]["userKeyId"])
	assert.Equal(t, maskedKey(brokeKey), byStatus[402]["userKeyId"])

	// The legacy indexes; the 30-day expiry where the database has TTL
	// indexes (FerretDB 1.24 has not: the gateway says so in its log).
	cur, err = db.Collection("error_logs").Indexes().List(context.Background())
	require.NoError(t, err)
	var idx []bson.M
	require.NoError(t, cur.All(context.Background(), &idx))
	names := map[string]bool{}
	ttl := false
	for _, i := range idx {
		names[i["name"].(string)] = true
		if v, ok := i["expireAfterSeconds"]; ok {
			ttl = true
			assert.EqualValues(t, 30*24*3600, v)
		}
	}
	for _, n := range []string{"source_1_createdAt_-1", "path_1_createdAt_-1", "statusCode_1_createdAt_-1"} {
		assert.True(t, names[n], "index %s missing: %v", n, idx)
	}
	if !ttl {
		logs, err := os.ReadFile(logFile)
		require.NoError(t, err)
		assert.Contains(t, string(logs), "no TTL index", "no expiry index on error_logs and no warning about it")
	}
}

// maskedKey is the gateway's one key mask (request_logs use it too): the
// first 8 characters, "...", the last 4.
func maskedKey(k string) string { return k[:8] + "..." + k[len(k)-4:] }
