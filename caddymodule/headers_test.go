package caddymodule

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHeaderFilterKeepsOnlyTheAllowList(t *testing.T) {
	f, err := newHeaderFilter([]string{"X-Test-Id", "x-standin-*"})
	require.NoError(t, err)
	r := httptest.NewRequest(http.MethodPost, "/v1/messages?beta=true&key=sk-secret&api_key=x", nil)
	h := r.Header
	for _, n := range []string{"Content-Type", "Accept", "Anthropic-Version", "Anthropic-Beta", "User-Agent",
		"X-Request-Id", "X-Stainless-Os", "X-Test-Id", "X-Standin-Fixture",
		"Authorization", "X-Api-Key", "X-Litellm-Api-Key", "Api-Key", "X-Goog-Api-Key", "Ocp-Apim-Subscription-Key",
		"Cookie", "Proxy-Authorization", "Openai-Organization", "X-Stainless-Api-Key", "X-Standin-Token", "Forwarded"} {
		h.Set(n, "v")
	}
	f.apply(r)
	assert.Equal(t, "beta=true", r.URL.RawQuery, "only beta is forwarded; a key in the query never is")
	var kept []string
	for n := range h {
		kept = append(kept, n)
	}
	assert.ElementsMatch(t, []string{"Content-Type", "Accept", "Anthropic-Version", "Anthropic-Beta", "User-Agent",
		"X-Request-Id", "X-Stainless-Os", "X-Test-Id", "X-Standin-Fixture"}, kept)
}

func TestForwardHeadersRefusesCredentials(t *testing.T) {
	for _, n := range []string{"Authorization", "proxy-authorization", "Cookie", "X-Api-Key", "api-key", "X-Goog-Api-Key",
		"Ocp-Apim-Subscription-Key", "X-Litellm-Api-Key", "X-Auth-Token", "X-Amz-Security-Token", "X-Client-Secret",
		"X-Foo-Key*", "Host", "Content-Length", "Accept-Encoding", "", "*", "bad name"} {
		_, err := newHeaderFilter([]string{n})
		assert.Error(t, err, n)
	}
	_, err := newHeaderFilter([]string{"X-Api-Key"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "looks like a credential")
}
