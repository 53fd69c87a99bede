package caddymodule

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// forwardedHeaders is the allow-list of client request headers that reach
// the upstream. Every other header the client sent is removed before the
// request is forwarded, so that the upstream key the gateway sets
// (Authorization: Bearer) is the only credential that leaves it: an
// upstream such as LiteLLM reads x-litellm-api-key, api-key,
// x-goog-api-key or Ocp-Apim-Subscription-Key before Authorization, and a
// client sending one could otherwise make a pool key answer 401.
//
// The gateway itself sets Authorization, Content-Length and
// Accept-Encoding after the filter. Caddy's reverse_proxy adds Host (the
// request's host, unless header_up changes it), X-Forwarded-For,
// X-Forwarded-Proto, X-Forwarded-Host and Via after this handler; it keeps
// a client's X-Forwarded-* only when the client is a trusted proxy, which
// is why those three are on the list.
var forwardedHeaders = map[string]bool{
	"Content-Type":      true,
	"Accept":            true,
	"Anthropic-Version": true,
	"Anthropic-Beta":    true,
	"User-Agent":        true,
	"X-Request-Id":      true,
	"X-Forwarded-For":   true,
	"X-Forwarded-Proto": true,
	"X-Forwarded-Host":  true,
}

// forwardedPrefixes are allowed header name prefixes (canonical form): the
// official SDKs' X-Stainless-* telemetry (OS, runtime, retry count,
// timeout), which no upstream reads as a credential. A name matching a
// prefix is still dropped when it looks like a credential (credentialName).
var forwardedPrefixes = []string{"X-Stainless-"}

// ownedHeaders are set by the gateway, net/http or reverse_proxy, whatever
// the client sent: forward_headers cannot name them.
var ownedHeaders = map[string]bool{
	"Host": true, "Content-Length": true, "Accept-Encoding": true, "Transfer-Encoding": true,
	"Connection": true, "Upgrade": true, "Te": true, "Trailer": true, "Via": true,
	"Keep-Alive": true, "Proxy-Connection": true,
}

// credentialName reports whether a header name (any case) looks like it
// carries a credential: Authorization, cookies, and any *key, *token,
// *secret, *password, *credential or *signature header. Such a header is
// never forwarded and cannot be added with forward_headers.
func credentialName(name string) bool {
	n := strings.ToLower(name)
	switch n {
	case "authorization", "proxy-authorization", "cookie", "cookie2", "set-cookie", "key", "token":
		return true
	}
	for _, part := range []string{"auth", "cookie", "apikey", "api-key", "api_key", "secret", "password",
		"passwd", "credential", "session", "signature"} {
		if strings.Contains(n, part) {
			return true
		}
	}
	for _, suffix := range []string{"-key", "_key", "-token", "_token", "-sig"} {
		if strings.HasSuffix(n, suffix) {
			return true
		}
	}
	return false
}

// headerFilter decides which client headers are forwarded: the built-in
// allow-list plus the names configured with forward_headers.
type headerFilter struct {
	names    map[string]bool // canonical names
	prefixes []string        // canonical prefixes
}

// newHeaderFilter validates the forward_headers names and returns the
// filter. A name ending in "*" allows every header it prefixes.
func newHeaderFilter(extra []string) (headerFilter, error) {
	f := headerFilter{names: make(map[string]bool, len(forwardedHeaders)+len(extra)), prefixes: forwardedPrefixes}
	for n := range forwardedHeaders {
		f.names[n] = true
	}
	for _, name := range extra {
		base, prefix := strings.CutSuffix(name, "*")
		switch {
		case base == "" || !httpguts.ValidHeaderFieldName(base):
			return f, fmt.Errorf("forward_headers: %q is not a header name", name)
		case credentialName(base):
			return f, fmt.Errorf("forward_headers: %q looks like a credential; the upstream key is the only credential the gateway forwards", name)
		case ownedHeaders[http.CanonicalHeaderKey(base)]:
			return f, fmt.Errorf("forward_headers: %q is set by the gateway or the proxy, not forwarded from the client", name)
		}
		if prefix {
			f.prefixes = append(f.prefixes[:len(f.prefixes):len(f.prefixes)], http.CanonicalHeaderKey(base))
		} else {
			f.names[http.CanonicalHeaderKey(base)] = true
		}
	}
	return f, nil
}

// forwardedQuery are the query parameters that reach the upstream: `beta`,
// which Claude Code sends on /v1/messages. Neither API takes another, and a
// client's key in the query (`?key=`) must not leave the gateway.
var forwardedQuery = []string{"beta"}

// apply removes from r every header the filter does not allow, and every
// query parameter but forwardedQuery. It works on r in place; names are
// compared in canonical form (net/http canonicalises the headers it parses,
// so a client's spelling does not matter).
func (f headerFilter) apply(r *http.Request) {
	for name := range r.Header {
		if !f.allows(name) {
			delete(r.Header, name)
		}
	}
	if r.URL.RawQuery != "" {
		q, kept := r.URL.Query(), url.Values{}
		for _, name := range forwardedQuery {
			if v, ok := q[name]; ok {
				kept[name] = v
			}
		}
		r.URL.RawQuery = kept.Encode()
	}
}

func (f headerFilter) allows(name string) bool {
	c := http.CanonicalHeaderKey(name)
	if f.names[c] {
		return true
	}
	for _, p := range f.prefixes {
		if strings.HasPrefix(c, p) {
			return !credentialName(c)
		}
	}
	return false
}
