package caddymodule

import (
	"context"
	"maps"
	"net/http"
	"net/url"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// probePath is what a key probe asks the upstream: the model list, which an
// OpenAI-compatible upstream (LiteLLM included) serves to any valid key, at
// no cost, and refuses with 401 to a revoked one.
const probePath = "/v1/models"

// probeTimeout bounds one key probe.
const probeTimeout = 15 * time.Second

// upstreamHandler is the next handler of the chain: reverse_proxy.
type upstreamHandler interface {
	ServeHTTP(http.ResponseWriter, *http.Request) error
}

// probeKey confirms, off the request path, whether an upstream key that
// answered a client's request with 401 or 403 is bad. The probe is a GET
// probePath the gateway builds itself, with the key as its only header of
// note and none of the client's bytes, sent through the same reverse_proxy
// (same upstreams, same transport). Only a 401 or 403 to it demotes the key
// for good (need_refresh, persisted, rotated to a spare); a 2xx puts it back
// in service at once; anything else leaves it in its error cooldown. At
// most one probe per key runs at a time in this process.
func (h *Handler) probeKey(r *http.Request, next upstreamHandler, k billing.UpstreamKey) {
	e := h.eng
	if _, busy := e.probing.LoadOrStore(k.ID, true); busy {
		return
	}
	e.mu.RLock()
	if e.closed {
		e.mu.RUnlock()
		e.probing.Delete(k.ID)
		return
	}
	e.background.Add(1)
	e.mu.RUnlock()
	req := probeRequest(r, k)
	go func() {
		defer e.background.Done()
		defer e.probing.Delete(k.ID)
		ctx, cancel := context.WithTimeout(req.Context(), probeTimeout)
		defer cancel()
		pw := &probeWriter{header: make(http.Header)}
		err := next.ServeHTTP(pw, req.WithContext(ctx))
		outcome, v := billing.JudgeProbe(pw.status)
		log := e.log().With(zap.String("upstream_key", k.ID), zap.Int("probe_status", pw.status))
		switch outcome {
		case billing.ProbeKeyBad:
			log.Warn("upstream key refused by its probe; demoted for good")
			e.markKey(k, v)
		case billing.ProbeKeyGood:
			log.Warn("upstream key refused a request but passed its probe; back in service")
			e.keys.Restore(k.ID, billing.KeyError)
		default:
			log.Info("upstream key probe inconclusive; the key stays in its cooldown", zap.Error(err))
		}
	}()
}

// probeRequest builds the probe: the client request's site and connection
// (reverse_proxy needs them for its X-Forwarded-* headers), a copy of its
// Caddy variables, a fresh replacer, and nothing the client sent.
func probeRequest(r *http.Request, k billing.UpstreamKey) *http.Request {
	vars := map[string]any{}
	if v, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		maps.Copy(vars, v) // on the request's goroutine: nothing writes it meanwhile
	}
	ctx := context.WithoutCancel(r.Context())
	ctx = context.WithValue(ctx, caddyhttp.VarsCtxKey, vars)
	ctx = context.WithValue(ctx, caddy.ReplacerCtxKey, caddy.NewReplacer())
	u := &url.URL{Scheme: r.URL.Scheme, Host: r.URL.Host, Path: probePath}
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	req.Host, req.RemoteAddr, req.TLS = r.Host, r.RemoteAddr, r.TLS
	req.RequestURI = probePath
	req.Header = http.Header{
		"Authorization":   {"Bearer " + k.APIKey},
		"Accept":          {"application/json"},
		"Accept-Encoding": {"identity"},
		"User-Agent":      {"caddy-llm-billing key probe"},
	}
	return req
}

// probeWriter keeps a probe answer's status and discards its body.
type probeWriter struct {
	header http.Header
	status int
}

func (p *probeWriter) Header() http.Header { return p.header }

func (p *probeWriter) WriteHeader(code int) {
	if p.status == 0 && code >= 200 {
		p.status = code
	}
}

func (p *probeWriter) Write(b []byte) (int, error) {
	if p.status == 0 {
		p.status = http.StatusOK
	}
	return len(b), nil
}
