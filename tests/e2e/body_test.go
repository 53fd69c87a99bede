package e2e

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mongodb.org/mongo-driver/v2/bson"

	"github.com/trollllm/caddy-llm-billing/tests/seed"
)

// gatedBody is a request body of size bytes: a valid JSON start, then
// padding. Its first head bytes are sent at once; the rest waits until
// open is closed. read counts the bytes the client sent.
type gatedBody struct {
	data []byte
	head int
	open <-chan struct{}
	read atomic.Int64
}

func newGatedBody(size, head int, open <-chan struct{}) *gatedBody {
	start := `{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"`
	end := `"}]}`
	data := make([]byte, size)
	copy(data, start)
	for i := len(start); i < size-len(end); i++ {
		data[i] = 'a'
	}
	copy(data[size-len(end):], end)
	return &gatedBody{data: data, head: head, open: open}
}

func (g *gatedBody) Read(p []byte) (int, error) {
	off := int(g.read.Load())
	if off >= len(g.data) {
		return 0, io.EOF
	}
	if off >= g.head {
		select {
		case <-g.open:
		case <-time.After(15 * time.Second):
			return 0, errors.New("gated body: the server waited for bytes that were never sent")
		}
	} else {
		p = p[:min(len(p), g.head-off)]
	}
	n := copy(p, g.data[off:])
	g.read.Add(int64(n))
	return n, nil
}

// postBody sends body with the given Content-Length (-1: chunked).
func postBody(t *testing.T, url, key string, body io.Reader, length int64, testID string) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, body)
	require.NoError(t, err)
	req.ContentLength = length
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("X-Test-Id", testID)
	return http.DefaultClient.Do(req)
}

// A user whose pool is empty gets the 402 while most of a 40 MiB body is
// unread: the body waits after its first MiB, and the answer must come
// before it is let through. (The gateway reads none of it; net/http, under
// Caddy's read idle timeout, discards up to 256 KiB before it answers.)
func TestBrokeUserRefusedBeforeBody(t *testing.T) {
	noLeaks(t)
	user, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0, Credits: 5})
	for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
		t.Run(path, func(t *testing.T) {
			open := make(chan struct{})
			defer close(open)
			const size, head = 40 << 20, 1 << 20
			body := newGatedBody(size, head, open)
			testID := uniq(t, "req")
			resp, err := postBody(t, chatURL+path, key, body, size, testID)
			require.NoError(t, err, "the gateway waited for the body before refusing")
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusPaymentRequired, resp.StatusCode, string(raw))
			checkErrorShape(t, path, raw, "insufficient_quota", "insufficient_credits", "insufficient_credits", "Insufficient credit")
			assert.LessOrEqual(t, body.read.Load(), int64(head), "the client sent no more than the first bytes")
			assert.Empty(t, upstreamRequests(testID))
		})
	}
	noLogsFor(t, user.ID)
}

// A chunked body beyond max_body_size gets 413 in the API's shape.
func TestChunkedBodyOverLimit(t *testing.T) {
	noLeaks(t)
	_, key := newUser(t, seed.User{Active: true, Migration: true, Credits: 5, RefCredits: 1})
	for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
		t.Run(path, func(t *testing.T) {
			open := make(chan struct{})
			close(open)
			body := newGatedBody(3*chat2BodyLimit, 0, open)
			testID := uniq(t, "req")
			resp, err := postBody(t, chat2URL+path, key, io.NopCloser(body), -1, testID)
			require.NoError(t, err)
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusRequestEntityTooLarge, resp.StatusCode, string(raw))
			checkErrorShape(t, path, raw, "invalid_request_error", "", "request_too_large", "Request body too large")
			assert.Empty(t, upstreamRequests(testID))
		})
	}
}

// With body_memory 1 MiB, concurrent bodies of 400 kB that each fit the
// site's limit cannot all be held: two are read, the others get 503 while
// the last 100 kB of every body are held back, and once the two are done
// the whole budget is free again.
func TestBodyMemoryBound(t *testing.T) {
	require.NoError(t, loadCaddy(caddyfile(configOpts{appExtra: "\n\t\tbody_memory 1MiB"})))
	t.Cleanup(func() { assert.NoError(t, loadCaddy(caddyfile(configOpts{})), "restoring the config") })
	noLeaks(t) // after the test's config is loaded; checked before it is restored
	user, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 50})

	const n, size, head = 6, 400_000, 300_000
	open := make(chan struct{})
	var once sync.Once
	defer once.Do(func() { close(open) })
	type result struct {
		path   string
		status int
		raw    []byte
		read   int64
	}
	results := make(chan result, n)
	for i := 0; i < n; i++ {
		path := []string{"/v1/chat/completions", "/v1/messages"}[i%2]
		body, testID := newGatedBody(size, head, open), uniq(t, "req")
		go func() {
			resp, err := postBody(t, chatURL+path, key, body, size, testID)
			if err != nil {
				results <- result{path: path, raw: []byte(err.Error())}
				return
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results <- result{path, resp.StatusCode, raw, body.read.Load()}
		}()
	}
	// The refused requests are answered while every body is still held
	// back: they were refused without being read.
	for i := 0; i < n-2; i++ {
		select {
		case r := <-results:
			require.Equal(t, http.StatusServiceUnavailable, r.status, "%s", r.raw)
			checkErrorShape(t, r.path, r.raw, "server_error", "overloaded", "overloaded_error", "The gateway is busy")
			assert.LessOrEqual(t, r.read, int64(head))
		case <-time.After(10 * time.Second):
			t.Fatalf("%d requests refused, want %d", i, n-2)
		}
	}
	once.Do(func() { close(open) })
	for i := 0; i < 2; i++ {
		r := <-results
		assert.Equal(t, http.StatusOK, r.status, "an admitted body is served: %s", r.raw)
	}
	waitLogs(t, user.ID, 2)

	// Released: a body of 900 kB, which needs almost the whole budget, passes.
	big := newGatedBody(900_000, 900_000, nil)
	resp, err := postBody(t, chatURL+"/v1/messages", key, big, 900_000, uniq(t, "req"))
	require.NoError(t, err)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "the budget is released after the requests: %s", raw)
}

// A user who tops up from nothing is served at once, although the key
// cache still holds the empty balance read with the key.
func TestTopUpAdmittedAtOnce(t *testing.T) {
	user, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 0})
	body := validBody("claude-sonnet-4-5")()
	resp := post(t, chatURL+"/v1/messages", key, body, nil)
	raw, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusPaymentRequired, resp.StatusCode, string(raw))
	require.True(t, strings.Contains(string(raw), "Insufficient creditsNew"), string(raw))

	_, err := db.Collection("usersNew").UpdateOne(context.Background(), bson.D{{Key: "_id", Value: user.ID}},
		bson.D{{Key: "$set", Value: bson.D{{Key: "creditsNew", Value: 5.0}}}})
	require.NoError(t, err)
	resp = post(t, chatURL+"/v1/messages", key, body, nil)
	raw, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode, "a top-up counts at once: %s", raw)
	waitLogs(t, user.ID, 1)
}
