package caddymodule

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInspect(t *testing.T) {
	for _, tc := range []struct {
		expect int
		body   string
		final  bool
		want   int
	}{
		{expectJSON, `{"id":"x"}`, true, looksRight},
		{expectJSON, ` {"id":`, false, undecided},
		{expectJSON, `{"id":`, true, garbage},
		{expectJSON, `<html><body>502 Bad Gateway</body></html>`, false, garbage},
		{expectJSON, `hello`, true, garbage},
		{expectJSON, ``, true, garbage},
		{expectJSON, `[1,2]`, true, garbage},
		{expectJSON, `{` + strings.Repeat(" ", maxCheckedJSON), false, looksRight},
		{expectSSE, ": ping\n\nevent: message_start\ndata: {\"type\":\"message_start\"}\n\n", false, looksRight},
		{expectSSE, "data: {\"id\":1}\r\n\r\n", false, looksRight},
		{expectSSE, "data: [DONE]\n\n", false, looksRight},
		{expectSSE, "data: {\"id\":", false, undecided},
		{expectSSE, "data: <html>\n\n", false, garbage},
		{expectSSE, "<html>\n<body>\n\n", true, garbage},
		{expectSSE, "data: {\"id\":1}\n", true, looksRight},
		{expectSSE, "", true, garbage},
		{expectSSE, strings.Repeat(": ping\n", maxCheckedSSE/7+1), false, garbage},
	} {
		assert.Equal(t, tc.want, inspect(tc.expect, []byte(tc.body), tc.final), "%d %q final=%v", tc.expect, tc.body, tc.final)
	}
}

// A 2xx that is not what the API promises becomes a 502 in the API's shape
// and is not billed; a JSON answer cut short is passed on as before.
func TestGarbageSuccessIs502Unbilled(t *testing.T) {
	for _, tc := range []struct {
		name, ctype, body string
		stream            bool
	}{
		{"html page", "text/html; charset=utf-8", "<html><body>Welcome to nginx!</body></html>", false},
		{"non-json body", "application/json", "upstream says hello", false},
		{"truncated json", "application/json", `{"id":"msg_1","usage":{"input_tokens":12`, false},
		{"json for a stream", "application/json", `{"id":"msg_1"}`, true},
		{"html for a stream", "text/html", "<html></html>", true},
		{"sse of html", "text/event-stream", "data: <html>\n\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, fs := newTestHandler(t)
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				w.Header().Set("Content-Type", tc.ctype)
				w.WriteHeader(200)
				_, _ = w.Write([]byte(tc.body))
				return nil
			})
			rec := httptest.NewRecorder()
			require.NoError(t, h.ServeHTTP(rec, newRequest(t, rec, fs.key, bodyFor(tc.stream)), next))
			assert.Equal(t, 502, rec.Code)
			var b antBody
			require.NoError(t, json.Unmarshal(rec.Body.Bytes(), &b), rec.Body.String())
			assert.Equal(t, "api_error", b.Error.Type)
			assert.NotContains(t, rec.Body.String(), tc.body)
			time.Sleep(50 * time.Millisecond)
			assert.Zero(t, fs.charges.Load(), "charged")
		})
	}
}
