package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawRequest sends req as written on a new connection to the chat site and
// returns the status line, the headers and the body of the answer.
func rawRequest(t *testing.T, req string) (*http.Response, string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(chatURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

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
			resp, got := rawRequest(t, fmt.Sprintf("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Test-Id: %s\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s",
				testID, tc.header, len(body), body))
			if resp.StatusCode != tc.status {
				t.Errorf("status %d, want %d: %q", resp.StatusCode, tc.status, got)
			}
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
				t.Errorf("Content-Type %q, want net/http's text/plain", ct)
			}
			if !strings.HasPrefix(got, tc.body) {
				t.Errorf("body %q, want it to start %q", got, tc.body)
			}
			if n := len(upstreamRequests(testID)); n != 0 {
				t.Errorf("reached the upstream %d times", n)
			}
		})
	}
}
