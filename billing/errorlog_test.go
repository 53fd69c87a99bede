package billing

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestErrorTypeFor(t *testing.T) {
	for status, want := range map[int]string{
		400: "validation_error", 401: "authentication_error", 402: "payment_required", 403: "authorization_error",
		404: "not_found", 405: "method_not_allowed", 429: "rate_limit_error", 502: "upstream_error",
		503: "service_unavailable", 500: "server_error", 504: "server_error", 413: "client_error", 418: "client_error",
	} {
		assert.Equal(t, want, ErrorTypeFor(status), status)
	}
	for _, h := range ErrorLogHeaders {
		assert.NotContains(t, strings.ToLower(h), "auth", "an error log never keeps a credential header")
		assert.NotContains(t, strings.ToLower(h), "key")
		assert.NotContains(t, strings.ToLower(h), "cookie")
	}
}
