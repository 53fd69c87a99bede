package caddymodule

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/trollllm/caddy-llm-billing/billing"
)

// endpoint is what a request path asks for.
type endpoint uint8

const (
	epNotFound    endpoint = iota
	epChat                 // POST /v1/chat/completions: billed, OpenAI
	epMessages             // POST /v1/messages: billed, Anthropic
	epCountTokens          // POST /v1/messages/count_tokens: forwarded, never billed
	epModels               // GET /v1/models
	epModel                // GET /v1/models/{id}
	epHealth               // /health
	epRoot                 // /
)

// route maps a path to its endpoint and the API shape of its errors.
func route(path string) (endpoint, billing.API) {
	switch path {
	case "/v1/chat/completions":
		return epChat, billing.OpenAI
	case "/v1/messages":
		return epMessages, billing.Anthropic
	case "/v1/messages/count_tokens":
		return epCountTokens, billing.Anthropic
	case "/v1/models":
		return epModels, billing.OpenAI
	case "/health":
		return epHealth, billing.OpenAI
	case "/":
		return epRoot, billing.OpenAI
	}
	if id, ok := strings.CutPrefix(path, "/v1/models/"); ok && id != "" && !strings.Contains(id, "/") {
		return epModel, billing.OpenAI
	}
	return epNotFound, billing.OpenAI
}

// CORS, as the legacy proxy answered it on every path, with the headers the
// official SDKs send from a browser added (the legacy list lacked the
// Anthropic ones, so browser clients of /v1/messages failed their preflight).
const (
	corsMethods = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
	corsHeaders = "Content-Type, Authorization, x-api-key, x-session-id, x-assistant-message-id, " +
		"anthropic-version, anthropic-beta, anthropic-dangerous-direct-browser-access, " +
		"openai-organization, openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, " +
		"x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, " +
		"x-stainless-runtime-version, x-stainless-timeout, x-stainless-helper-method"
	corsMaxAge = "86400"
)

// setCORS adds the CORS response headers every answer carries: the request's
// Origin echoed (or * without one), and credentials allowed, as the legacy.
func setCORS(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	origin := r.Header.Get("Origin")
	if origin == "" {
		origin = "*"
	} else {
		h.Add("Vary", "Origin")
	}
	h.Set("Access-Control-Allow-Origin", origin)
	h.Set("Access-Control-Allow-Credentials", "true")
}

// preflight answers an OPTIONS request on any path: 200, no auth, nothing
// forwarded.
func preflight(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Access-Control-Allow-Methods", corsMethods)
	h.Set("Access-Control-Allow-Headers", corsHeaders)
	h.Set("Access-Control-Max-Age", corsMaxAge)
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusOK)
}

// serveInfo answers the endpoints that need neither a key nor the upstream.
func (h *Handler) serveInfo(w http.ResponseWriter, r *http.Request, ep endpoint) {
	switch ep {
	case epModels:
		writeJSON(w, http.StatusOK, h.cat.ListJSON())
	case epModel:
		name := strings.TrimPrefix(r.URL.Path, "/v1/models/")
		if b, ok := h.cat.ModelJSON(name); ok {
			writeJSON(w, http.StatusOK, b)
			return
		}
		errModelNotFound(billing.OpenAI, name).write(w, billing.OpenAI)
	case epHealth:
		ok := h.eng.health.ok(r.Context(), h.eng.ping)
		status, db := http.StatusOK, "ok"
		if !ok {
			status, db = http.StatusServiceUnavailable, "unreachable"
		}
		b, _ := json.Marshal(map[string]any{"status": "healthy", "timestamp": time.Now().UTC().Format(time.RFC3339),
			"uptime": time.Since(started).Seconds(), "database": db})
		writeJSON(w, status, b)
	case epRoot:
		writeJSON(w, http.StatusOK, rootBody)
	default:
		errNotFound.write(w, billing.OpenAI)
	}
}

// healthTTL is how long a database check answers /health: a database that
// goes away or comes back shows within this time (plus the check's own
// healthTimeout), and a flood of /health requests costs one ping per TTL.
const (
	healthTTL     = 2 * time.Second
	healthTimeout = 2 * time.Second
)

// dbHealth caches the outcome of the last database ping.
type dbHealth struct {
	mu      sync.Mutex
	checked time.Time
	healthy bool
}

// ok reports whether the database answered its last ping, pinging again
// when that answer is older than healthTTL. Concurrent callers wait for one
// ping rather than sending their own.
func (d *dbHealth) ok(ctx context.Context, ping func(context.Context) error) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if time.Since(d.checked) < healthTTL {
		return d.healthy
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), healthTimeout)
	defer cancel()
	d.healthy = ping(ctx) == nil
	d.checked = time.Now()
	return d.healthy
}

// ping checks that the database answers; a store that is not MongoDB
// (tests) always does.
func (e *engine) ping(ctx context.Context) error {
	if e.client == nil {
		return nil
	}
	return e.client.Ping(ctx, nil)
}

// countTokens forwards an authenticated POST /v1/messages/count_tokens with
// a pool key, on another key when one fails, as a billed request would be;
// it takes no hold and bills nothing, since the upstream counts tokens
// without running the model.
func (h *Handler) countTokens(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, a *admission, upKey billing.UpstreamKey, upstreamModel string) error {
	fwd, err := billing.RewriteRequest(a.api, a.body, a.info, upstreamModel, -1)
	if err != nil {
		errInvalidJSON.write(w, a.api)
		return nil
	}
	done, ok := h.eng.begin()
	if !ok {
		errUnavailable.write(w, a.api)
		return nil
	}
	defer done()
	m := newMeter(w, a.api)
	defer m.release()
	pr := &proxied{start: a.start, client: r.Context(), upKey: upKey, expect: expectJSON}
	return h.forward(w, r, next, m, pr, fwd, a.api)
}
