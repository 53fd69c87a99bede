package caddymodule

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// DefaultMaxBodySize is the request body limit when none is configured:
// 50 MB, as nginx allowed before.
const DefaultMaxBodySize = 50 << 20

// maxKeyLength bounds a client API key; longer values are refused without a
// database lookup.
const maxKeyLength = 256

// Handler is the llm_billing HTTP handler. Put it in the same site block as
// the reverse_proxy to the LLM upstream: it authenticates the client's key,
// checks the site's credit pool, swaps in an upstream key, rewrites the
// model, lets the response stream through untouched while reading its token
// usage, and bills the exact cost to the pool.
//
// It answers /v1/chat/completions (OpenAI), /v1/messages (Anthropic),
// /v1/models, /health and /; any other path gets a JSON 404 and never
// reaches the upstream.
type Handler struct {
	// CreditFields names the balance fields this site bills, in the order
	// they are spent: ["creditsNew"], ["credits"] or ["credits", "refCredits"].
	CreditFields []string `json:"credit_fields,omitempty"`

	// Models is the path of the model catalogue, in the legacy config JSON
	// format (the backend reads the same file). Placeholders are resolved.
	Models string `json:"models,omitempty"`

	// MaxBodySize is the request body limit in bytes. Default: 50 MB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	eng    *engine
	plan   billing.CreditPlan
	cat    *billing.Catalogue
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_billing",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision loads the model catalogue and attaches to the llm_billing app.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	plan, err := billing.ParseCreditPlan(h.CreditFields)
	if err != nil {
		return fmt.Errorf("credit_field: %v", err)
	}
	h.plan = plan
	if h.Models == "" {
		return errors.New("models: a models file is required")
	}
	path, err := caddy.NewReplacer().ReplaceOrErr(h.Models, true, true)
	if err != nil {
		return fmt.Errorf("models: %v", err)
	}
	h.cat, err = billing.LoadCatalogue(path)
	if err != nil {
		return fmt.Errorf("models: %v", err)
	}
	if h.MaxBodySize < 0 {
		return errors.New("max_body_size must not be negative")
	}
	if h.MaxBodySize == 0 {
		h.MaxBodySize = DefaultMaxBodySize
	}
	app, err := ctx.App("llm_billing")
	if err != nil {
		return fmt.Errorf("llm_billing app: %v", err)
	}
	// Keep the engine itself: it outlives this config generation's app.
	h.eng = app.(*App).eng
	return nil
}

var started = time.Now()

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	var api billing.API
	switch r.URL.Path {
	case "/v1/chat/completions":
		api = billing.OpenAI
	case "/v1/messages":
		api = billing.Anthropic
	case "/v1/models":
		writeJSON(w, http.StatusOK, h.cat.ListJSON())
		return nil
	case "/health":
		b, _ := json.Marshal(map[string]any{"status": "healthy", "timestamp": time.Now().UTC().Format(time.RFC3339), "uptime": time.Since(started).Seconds()})
		writeJSON(w, http.StatusOK, b)
		return nil
	case "/":
		writeJSON(w, http.StatusOK, rootBody)
		return nil
	default:
		errNotFound.write(w, billing.OpenAI)
		return nil
	}
	if r.Method != http.MethodPost {
		errMethod.write(w, api)
		return nil
	}
	start := time.Now()
	eng := h.eng

	key, aerr := clientKey(r)
	// The client's key never goes further than this handler. (Caddy's access
	// log records the request as it arrived: drop X-Api-Key there with a log
	// filter, as Caddyfile.example does; Authorization is redacted by Caddy.)
	r.Header.Del("X-Api-Key")
	if aerr != nil {
		aerr.write(w, api)
		return nil
	}
	p, err := eng.authenticate(r.Context(), key)
	if err != nil {
		var ae *billing.AuthError
		if errors.As(err, &ae) {
			authErrorFor(ae).write(w, api)
			return nil
		}
		h.logger.Error("authenticating key failed", zap.String("key", billing.MaskKey(key)), zap.Error(err))
		errUnavailable.write(w, api)
		return nil
	}

	body, aerr := h.readBody(w, r)
	if aerr != nil {
		aerr.write(w, api)
		return nil
	}
	info, err := billing.ReadRequest(body)
	switch {
	case errors.Is(err, billing.ErrInvalidJSON):
		errInvalidJSON.write(w, api)
		return nil
	case err != nil:
		errBadRequest(err.Error()).write(w, api)
		return nil
	case info.Model == "":
		errNoModel.write(w, api)
		return nil
	}
	model, ok := h.cat.Lookup(info.Model)
	if !ok {
		errModelNotFound(api, info.Model).write(w, api)
		return nil
	}

	bctx, cancel := context.WithTimeout(r.Context(), dbTimeout)
	balance, err := eng.store.Balance(bctx, p.User, h.plan)
	cancel()
	switch {
	case errors.Is(err, billing.ErrUserNotFound):
		errInvalidKey.write(w, api)
		return nil
	case err != nil:
		h.logger.Error("reading balance failed", zap.String("user", p.User), zap.Error(err))
		errUnavailable.write(w, api)
		return nil
	case balance <= 0:
		errInsufficient(api, h.plan, balance).write(w, api)
		return nil
	}

	upKey, err := eng.pickKey()
	if err != nil {
		h.logger.Warn("no upstream key available")
		errNoKey.write(w, api)
		return nil
	}
	upstreamModel := model.PickUpstream(rand.Uint64())
	fwd, err := billing.RewriteRequest(api, body, info, upstreamModel)
	if err != nil {
		errInvalidJSON.write(w, api)
		return nil
	}
	// Plain bytes from the upstream, so the usage reader sees JSON, not gzip.
	r.Header.Set("Accept-Encoding", "identity")

	done, ok := eng.begin()
	if !ok {
		errUnavailable.write(w, api)
		return nil
	}
	m := newMeter(w, api)
	pr := &proxied{start: start, principal: p, key: key, upKey: upKey, model: model, upstreamModel: upstreamModel, bodyLen: len(body)}
	// Deferred: runs on a normal return and when reverse_proxy aborts the
	// handler with panic(http.ErrAbortHandler) after a client disconnect.
	defer func() {
		h.settle(r, m, pr)
		m.release()
		done()
	}()
	return h.forward(w, r, next, m, pr, fwd, api)
}

// proxied is what a forwarded request needs for its settlement.
type proxied struct {
	start         time.Time
	principal     billing.Principal
	key           string // the client's key: only ever masked, or a user_keys _id for its counters
	upKey         billing.UpstreamKey
	model         *billing.Model
	upstreamModel string
	bodyLen       int
	attempts      []billing.Attempt // every upstream attempt, the answered one last
}

// settle prices what the response used and hands the charge to the engine.
// Nothing is charged unless the upstream answered 2xx.
func (h *Handler) settle(r *http.Request, m *meter, pr *proxied) {
	p, key, upKey, model, bodyLen := pr.principal, pr.key, pr.upKey, pr.model, pr.bodyLen
	if m.status < 200 || m.status >= 300 {
		return
	}
	clientGone := r.Context().Err() != nil
	var (
		u      billing.Usage
		source = "upstream"
		end    = "complete"
	)
	if m.sse {
		res := m.scanner.Result()
		switch {
		case res.HasUsage && res.Done:
			u = res.Usage
		case res.HasUsage:
			// Cut before the final usage: keep what was reported, and
			// never bill less output than what was seen.
			u = res.Usage
			if est := billing.EstimateTokens(res.TextBytes); est > u.Output {
				u.Output = est
			}
			source = "upstream_partial"
		default:
			u = billing.Usage{Input: billing.EstimateTokens(int64(bodyLen)), Output: billing.EstimateTokens(res.TextBytes)}
			source = "estimated"
		}
		switch {
		case res.Done:
		case clientGone:
			end = "client_gone"
		case res.Errored:
			end = "upstream_error"
		default:
			end = "upstream_cut"
		}
	} else {
		var ok bool
		var err error
		if !m.overflow {
			u, ok, err = billing.ParseUsageJSON(m.api, m.body)
		}
		if !ok || err != nil {
			u = billing.Usage{Input: billing.EstimateTokens(int64(bodyLen)), Output: billing.EstimateTokens(m.bytes)}
			source = "estimated"
			end = "no_usage"
			if clientGone {
				end = "client_gone"
			}
		}
	}
	cost := model.Price.Cost(u)
	weighted := model.Price.WeightedTokens(u)
	now := time.Now()
	trollKey := ""
	if upKey.ID != "" {
		trollKey = "openhands:" + upKey.ID
	}
	reqID, masked := requestID(r), billing.MaskKey(key)
	s := &settlement{
		charge: billing.ChargeRequest{
			RequestID: reqID, User: p.User, Plan: h.plan, Cost: cost, Usage: u, WeightedTokens: weighted,
		},
		log: billing.RequestLog{
			UserID: p.User, UserKeyID: masked, TrollKeyID: trollKey, Model: model.ID,
			InputTokens: u.Input, OutputTokens: u.Output, CacheWriteTokens: u.CacheWrite, CacheHitTokens: u.CacheRead,
			CreditsCost: cost.USD(), CreditType: h.plan.CreditType(), TokensUsed: weighted,
			StatusCode: m.status, LatencyMs: now.Sub(pr.start).Milliseconds(), IsSuccess: true, CreatedAt: now,
			RequestID: reqID, CreditField: h.plan.String(), Endpoint: r.URL.Path, Stream: m.sse,
			Attempts: pr.attempts, UpstreamModel: pr.upstreamModel, UsageSource: source, EndReason: end, CostNano: int64(cost),
		},
		counters: billing.UsageCounters{
			UpstreamKeyID: upKeyID(upKey), WeightedTokens: weighted, RawTokens: u.Input + u.Output, At: now,
		},
		logger: h.logger,
		site:   r.Host,
	}
	if p.InUserKeys {
		s.counters.UserKey = key
	}
	h.eng.submit(s)
}

func upKeyID(k billing.UpstreamKey) string {
	if strings.HasPrefix(k.ID, "static-") {
		return ""
	}
	return k.ID
}

// requestID is Caddy's per-request UUID ({http.request.uuid}), so the
// access log and the request log share one id.
func requestID(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		if v, ok := repl.GetString("http.request.uuid"); ok {
			return v
		}
	}
	return ""
}

// clientKey reads the client's API key: Authorization: Bearer first (the
// scheme in any case), else x-api-key, on both APIs.
func clientKey(r *http.Request) (string, *apiError) {
	if auth := r.Header.Get("Authorization"); auth != "" {
		scheme, key, ok := strings.Cut(auth, " ")
		key = strings.TrimSpace(key)
		if !ok || !strings.EqualFold(scheme, "Bearer") || key == "" {
			return "", errAuthFormat
		}
		if len(key) > maxKeyLength {
			return "", errInvalidKey
		}
		return key, nil
	}
	if key := strings.TrimSpace(r.Header.Get("X-Api-Key")); key != "" {
		if len(key) > maxKeyLength {
			return "", errInvalidKey
		}
		return key, nil
	}
	return "", errAuthRequired
}

// readBody reads the request body up to the configured limit.
func (h *Handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, *apiError) {
	if r.ContentLength > h.MaxBodySize {
		return nil, errBodyTooLarge(h.MaxBodySize)
	}
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		buf.Grow(int(r.ContentLength))
	}
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, h.MaxBodySize))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errBodyTooLarge(h.MaxBodySize)
		}
		return nil, errReadBody
	}
	return buf.Bytes(), nil
}

// setBody replaces the request body with b, keeping the length consistent
// and letting reverse_proxy replay it.
func setBody(r *http.Request, b []byte) {
	r.Body = io.NopCloser(bytes.NewReader(b))
	r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	r.ContentLength = int64(len(b))
	r.Header.Set("Content-Length", strconv.Itoa(len(b)))
	r.TransferEncoding = nil
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

var rootBody = []byte(`{"service":"trolLLM - We Troll So You Don't Have To","version":"999.999.999","endpoints":["/health","/v1/models","/v1/chat/completions","/v1/messages"]}`)

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
