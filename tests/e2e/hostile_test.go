package e2e

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
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
