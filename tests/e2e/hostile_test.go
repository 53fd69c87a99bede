package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/trollllm/caddy-llm-billing/tests/seed"
	"github.com/trollllm/caddy-llm-billing/tests/standin"
)

// Oversized headers and control characters in a header are refused by
// net/http before Caddy's handlers run: the client gets Go's plain-text
// answer, not JSON, the upstream never sees the request and nothing is
// billed (there is no user to bill). docs/hostile.md quotes these answers.
func TestHeaderErrorsBeforeTheHandler(t *testing.T) {
	noLeaks(t)
	for _, tc := range []struct {
		name   string
		header string
		status int
		body   string
	}{
		{"oversized header", "X-Big: " + strings.Repeat("a", 2<<20) + "\r\n", 431, "431 Request Header Fields Too Large"},
		{"control character in the key", "Authorization: Bearer sk-trollllm-\x01abc\r\n", 400, "400 Bad Request"},
		{"space in a header name", "Author ization: Bearer x\r\n", 400, "400 Bad Request: invalid header name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			testID := uniq(t, "req")
			body := `{"model":"claude-sonnet-4-5","messages":[]}`
			resp, got := rawRequest(t, chatURL, fmt.Sprintf("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Test-Id: %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
				testID, tc.header, len(body), body))
			assert.Equal(t, tc.status, resp.StatusCode, got)
			assert.Equal(t, "text/plain; charset=utf-8", resp.Header.Get("Content-Type"), "net/http's own answer")
			assert.True(t, strings.HasPrefix(got, tc.body), "body %q, want it to start %q", got, tc.body)
			assert.True(t, resp.Close, "the connection is closed")
			assert.Empty(t, upstreamRequests(testID), "never reaches the upstream")
		})
	}
}

// A client that sends its headers too slowly (slow-loris) is disconnected
// by the read_header timeout, without an answer, and nothing of it stays
// behind: the request never reaches the handler or the upstream.
func TestSlowHeadersAreCutOff(t *testing.T) {
	noLeaks(t)
	conn, err := net.Dial("tcp", strings.TrimPrefix(chatURL, "http://"))
	require.NoError(t, err)
	defer conn.Close()
	start := time.Now()
	testID := uniq(t, "req")
	_, err = io.WriteString(conn, "POST /v1/messages HTTP/1.1\r\nHost: x\r\nX-Test-Id: "+testID+"\r\nX-Slow: ")
	require.NoError(t, err)
	closed := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(conn) // until the server closes
		closed <- got
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(readHeaderTimeout + 5*time.Second)
	for {
		select {
		case got := <-closed:
			waited := time.Since(start)
			assert.Empty(t, got, "no answer, the connection is closed")
			assert.GreaterOrEqual(t, waited, readHeaderTimeout-500*time.Millisecond, "not before the timeout")
			assert.Empty(t, upstreamRequests(testID))
			return
		case <-tick.C:
			// One byte at a time: each keeps the connection busy, none
			// moves the deadline.
			_, _ = conn.Write([]byte("a"))
		case <-deadline:
			t.Fatalf("still connected %v after the first byte", time.Since(start))
		}
	}
}

// An SSE line longer than the usage scanner's line limit (1 MiB) reaches
// the client unchanged, and the usage is still read from the other events:
// the request is billed exactly as the same answer without that line.
func TestLongSSELinePassesThrough(t *testing.T) {
	noLeaks(t)
	const n = 2 << 20
	for _, tc := range []struct{ path, fixture string }{
		{"/v1/messages", "ant-text"}, {"/v1/chat/completions", "oai-text"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			var rows []map[string]any
			for _, long := range []bool{false, true} {
				u, key := newUser(t, seed.User{Active: true, Migration: true, CreditsNew: 10})
				hdr := map[string]string{standin.HeaderFixture: tc.fixture}
				if long {
					hdr[standin.HeaderLongLine] = strconv.Itoa(n)
				}
				resp := post(t, chatURL+tc.path, key, streamBody("claude-sonnet-4-5"), hdr)
				longest := 0
				sc := bufio.NewScanner(resp.Body)
				sc.Buffer(nil, 4<<20)
				for sc.Scan() {
					longest = max(longest, len(sc.Bytes()))
				}
				require.NoError(t, sc.Err())
				resp.Body.Close()
				require.Equal(t, http.StatusOK, resp.StatusCode)
				if long {
					assert.Equal(t, n, longest, "the long line reaches the client whole")
				}
				rows = append(rows, waitLogs(t, u.ID, 1)[0])
			}
			for _, f := range []string{"usageSource", "endReason", "inputTokens", "outputTokens", "creditsCost"} {
				assert.Equal(t, rows[0][f], rows[1][f], f)
			}
			assert.Equal(t, "upstream", rows[1]["usageSource"])
		})
	}
}
