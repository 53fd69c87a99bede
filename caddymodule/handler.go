package caddymodule

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
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

	// Hold is how much credit is reserved before a request is forwarded:
	// "worst_case" (the default) reserves the cost of an upper bound of the
	// input (one token per byte of the forwarded body, at most the model's
	// context window, at the highest input price) plus max_tokens of
	// output, or what the pool has when that is less, and then lowers the
	// forwarded max_tokens to what the hold pays for (see
	// billing.HoldTerms): a request costs no more than its hold unless the
	// upstream returns more than max_tokens, which is logged (WARN) and
	// recorded as shortfall. A pool that cannot pay the input bound and one
	// output token (or, with Anthropic extended thinking, more output than
	// thinking.budget_tokens) is refused with a 402. "check" reserves
	// nothing, leaves max_tokens as sent and only requires a positive
	// balance, as the legacy proxy did (concurrent requests can then spend
	// past the balance; the excess is recorded as shortfall).
	Hold string `json:"hold,omitempty"`

	// DefaultMaxTokens is the output size a hold assumes when the request
	// sets no max_tokens (OpenAI requests may omit it). Default: 4096.
	DefaultMaxTokens int64 `json:"default_max_tokens,omitempty"`

	// ClientDisconnect is what happens when the client goes away in the
	// middle of a response: "drain" (the default) keeps reading the
	// upstream, for at most DrainTimeout, and bills the usage it reports;
	// "stop" cancels the upstream request at once and bills what was seen
	// (the usage reported so far, or an estimate). The request log records
	// end reason client_gone and whether the usage was measured.
	ClientDisconnect string `json:"client_disconnect,omitempty"`

	// DrainTimeout bounds how long a response is read after its client is
	// gone. Default: 2m.
	DrainTimeout caddy.Duration `json:"drain_timeout,omitempty"`

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
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
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
	switch h.Hold {
	case "", HoldWorstCase, HoldCheck:
	default:
		return fmt.Errorf("hold: unknown sizing %q (want %s or %s)", h.Hold, HoldWorstCase, HoldCheck)
	}
	if h.DefaultMaxTokens < 0 {
		return errors.New("default_max_tokens must not be negative")
	}
	if h.DefaultMaxTokens == 0 {
		h.DefaultMaxTokens = DefaultMaxTokens
	}
	switch h.ClientDisconnect {
	case "", DisconnectDrain, DisconnectStop:
	default:
		return fmt.Errorf("client_disconnect: unknown policy %q (want %s or %s)", h.ClientDisconnect, DisconnectDrain, DisconnectStop)
	}
	if h.DrainTimeout < 0 {
		return errors.New("drain_timeout must not be negative")
	}
	if h.DrainTimeout == 0 {
		h.DrainTimeout = caddy.Duration(DefaultDrainTimeout)
	}
	app, err := ctx.App("llm_billing")
	if err != nil {
		return fmt.Errorf("llm_billing app: %v", err)
	}
	// Keep the engine itself: it outlives this config generation's app.
	h.eng = app.(*App).eng
	return nil
}

// Hold sizings, client disconnect policies and their defaults.
const (
	HoldWorstCase       = "worst_case"
	HoldCheck           = "check"
	DisconnectDrain     = "drain"
	DisconnectStop      = "stop"
	DefaultMaxTokens    = 4096
	DefaultDrainTimeout = 2 * time.Minute
)

var started = time.Now()

// refusedWait is the longest a hold refused for want of credit waits for
// the user's earlier settlements in this process before it is asked again
// (a settlement lingers settleLinger, then takes a database round trip).
const refusedWait = 500 * time.Millisecond

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
	p, refresh, err := eng.authenticate(r.Context(), key)
	var startRefresh func()
	if refresh {
		// The key is looked up again in the background once the answer
		// starts, or when the request ends, whichever comes first.
		var once sync.Once
		startRefresh = func() { once.Do(func() { eng.refreshAuth(key) }) }
		defer startRefresh()
	}
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
	var rerr *billing.RequestError
	switch {
	case errors.As(err, &rerr):
		errBadRequest(rerr.Error()).write(w, api)
		return nil
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

	upKey, err := eng.pickKey()
	if err != nil {
		h.logger.Warn("no upstream key available")
		errNoKey.write(w, api)
		return nil
	}
	upstreamModel := model.PickUpstream(rand.Uint64())

	done, ok := eng.begin()
	if !ok {
		errUnavailable.write(w, api)
		return nil
	}
	reqID, masked := requestID(r), billing.MaskKey(key)
	hold, maxTokens, aerr := h.reserve(r.Context(), api, reqID, p, model, masked, billing.ForwardedSize(len(body), upstreamModel), info)
	if aerr != nil {
		done()
		aerr.write(w, api)
		return nil
	}
	// Reserved first, so that the forwarded max_tokens is what the hold pays for.
	fwd, err := billing.RewriteRequest(api, body, info, upstreamModel, maxTokens)
	if err != nil {
		eng.submit(&settlement{Hold: hold, logger: h.logger}) // gives the hold back
		done()
		errInvalidJSON.write(w, api)
		return nil
	}
	// Plain bytes from the upstream, so the usage reader sees JSON, not gzip.
	r.Header.Set("Accept-Encoding", "identity")

	m := newMeter(w, api)
	m.onStart = startRefresh
	pr := &proxied{start: start, principal: p, key: key, masked: masked, reqID: reqID, hold: hold, client: r.Context(),
		upKey: upKey, model: model, upstreamModel: upstreamModel, bodyLen: len(body), maxTokens: maxTokens}
	if h.ClientDisconnect != DisconnectStop {
		// drain: the upstream request outlives the client, for at most
		// DrainTimeout, so that the usage it reports can be billed.
		ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
		m.drain = true
		stop := context.AfterFunc(r.Context(), func() {
			m.gone.Store(true)
			time.AfterFunc(time.Duration(h.DrainTimeout), cancel)
		})
		defer cancel()
		defer stop()
		r = r.WithContext(ctx)
	}
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
	masked        string
	reqID         string
	hold          billing.Hold
	client        context.Context // the client's request context (r's may outlive it: drain)
	upKey         billing.UpstreamKey
	model         *billing.Model
	upstreamModel string
	bodyLen       int
	maxTokens     int64             // the forwarded output cap; -1 when not capped (hold check)
	attempts      []billing.Attempt // every upstream attempt, the answered one last
}

// reserve takes the request's hold, sized by h.Hold (see Handler.Hold), and
// returns the max_tokens to forward: what the hold pays for after the
// input bound of a forwarded body of size bytes (billing.HoldTerms), or -1
// (leave the body's as it is) under hold check.
func (h *Handler) reserve(ctx context.Context, api billing.API, reqID string, p billing.Principal, model *billing.Model, masked string, size int64, info billing.RequestInfo) (billing.Hold, int64, *apiError) {
	eng := h.eng
	if eng.backlogged() {
		h.logger.Error("refusing requests: settlements are waiting for the database", zap.Int("pending", eng.pendingRetries()))
		return billing.Hold{}, 0, errUnavailable
	}
	terms := billing.HoldTerms(model, size, info.MaxTokens, h.DefaultMaxTokens)
	want, need := terms.Want, terms.Input
	if h.Hold == HoldCheck {
		want, need = 0, 0
	}
	// An orphaned hold is still charged the estimated input (charge_input),
	// not the bound.
	estimate := model.Price.Cost(billing.Usage{Input: billing.EstimateTokens(size)})
	hold, aerr := h.take(ctx, api, reqID, p, model, masked, want, need, estimate)
	if aerr != nil || h.Hold == HoldCheck {
		return hold, -1, aerr
	}
	maxTokens := terms.Cap(model, hold.Amount(), info.ThinkingBudget)
	if maxTokens < 1 {
		eng.submit(&settlement{Hold: hold, logger: h.logger}) // gives the hold back
		return billing.Hold{}, 0, errInsufficient(api, h.plan, hold.Amount())
	}
	return hold, maxTokens, nil
}

// take reserves want (at least need) from the user's pool.
func (h *Handler) take(ctx context.Context, api billing.API, reqID string, p billing.Principal, model *billing.Model, masked string, want, need, inputCost billing.Nano) (billing.Hold, *apiError) {
	eng := h.eng
	now := time.Now()
	req := billing.HoldRequest{
		RequestID: reqID, User: p.User, Plan: h.plan, Want: want, Min: need, Input: inputCost,
		Owner: eng.boot, At: now, Expires: now.Add(time.Duration(eng.holdLease.Load())), LogID: billing.NewLogID(now),
		Model: model.ID, KeyID: masked, Clear: eng.clears.take(p.User),
	}
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	t0 := time.Now()
	hold, err := eng.store.Reserve(ctx, req)
	observeDB(waitHold, t0)
	var ie *billing.InsufficientError
	if errors.As(err, &ie) && eng.awaitUser(ctx, p.User, refusedWait) {
		// The user's own earlier requests still hold credit their
		// settlements will give back: once they are settled, ask again.
		t0 = time.Now()
		hold, err = eng.store.Reserve(ctx, req)
		observeDB(waitHold, t0)
	}
	if err != nil && len(req.Clear) > 0 {
		eng.clears.add(p.User, req.Clear, time.Now())
	}
	switch {
	case err == nil:
		return hold, nil
	case errors.As(err, &ie):
		if ie.Balance > 0 && ie.Need > 0 {
			return billing.Hold{}, errInsufficientCost(ie.Need, ie.Balance)
		}
		return billing.Hold{}, errInsufficient(api, h.plan, ie.Balance)
	case errors.Is(err, billing.ErrUserNotFound):
		return billing.Hold{}, errInvalidKey
	}
	h.logger.Error("taking a hold failed; refusing the request", zap.String("user", p.User), zap.Error(err))
	// The database may have taken the hold before the answer was lost: a
	// release goes in the settlement queue (journaled, retried until the
	// database is back), so a refused request never keeps credit, and is
	// never charged by the sweeper when its lease ends.
	eng.submit(&settlement{Unknown: true, logger: h.logger, Hold: billing.Hold{
		RequestID: req.RequestID, User: req.User, Plan: req.Plan, Owner: req.Owner, At: req.At, Expires: req.Expires,
		LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
	}})
	return billing.Hold{}, errUnavailable
}

// settle prices what the response used and hands the settlement to the
// engine: the cost for a 2xx answer, a release of the hold otherwise.
func (h *Handler) settle(r *http.Request, m *meter, pr *proxied) {
	s := &settlement{Hold: pr.hold, logger: h.logger, Site: r.Host}
	if m.status < 200 || m.status >= 300 {
		h.eng.submit(s) // nothing billed: the hold goes back
		return
	}
	p, key, upKey, model, bodyLen := pr.principal, pr.key, pr.upKey, pr.model, pr.bodyLen
	clientGone := pr.client.Err() != nil || m.gone.Load()
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
		case clientGone:
			end = "client_gone"
		case res.Done:
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
		if clientGone {
			end = "client_gone"
		}
		if !ok || err != nil {
			u = billing.Usage{Input: billing.EstimateTokens(int64(bodyLen)), Output: billing.EstimateTokens(m.bytes)}
			source = "estimated"
			if !clientGone {
				end = "no_usage"
			}
		}
	}
	cost := model.Price.Cost(u)
	if pr.maxTokens >= 0 && u.Output > pr.maxTokens && source != "estimated" {
		// The hold pays for the forwarded max_tokens only: what it cannot
		// cover is recorded as shortfall when the settlement is applied.
		h.logger.Warn("upstream broke its contract: more output than the forwarded max_tokens",
			zap.String("request_id", pr.reqID), zap.Int64("max_tokens", pr.maxTokens), zap.Int64("output_tokens", u.Output),
			zap.String("cost", cost.String()), zap.String("hold", pr.hold.Amount().String()))
	}
	weighted := model.Price.WeightedTokens(u)
	now := time.Now()
	trollKey := ""
	if upKey.ID != "" {
		trollKey = "openhands:" + upKey.ID
	}
	s.Cost, s.Usage, s.Weighted, s.Bill = cost, u, weighted, true
	s.Log = billing.RequestLog{
		ID: pr.hold.LogID, UserID: p.User, UserKeyID: pr.masked, TrollKeyID: trollKey, Model: model.ID,
		InputTokens: u.Input, OutputTokens: u.Output, CacheWriteTokens: u.CacheWrite, CacheHitTokens: u.CacheRead,
		CreditsCost: cost.USD(), CreditType: h.plan.CreditType(), TokensUsed: weighted,
		StatusCode: m.status, LatencyMs: now.Sub(pr.start).Milliseconds(), IsSuccess: true, CreatedAt: now,
		RequestID: pr.reqID, CreditField: h.plan.String(), Endpoint: r.URL.Path, Stream: m.sse,
		Attempts: pr.attempts, UpstreamModel: pr.upstreamModel, UsageSource: source, EndReason: end, CostNano: int64(cost),
		HoldNano: int64(pr.hold.Amount()),
	}
	s.Counters = billing.UsageCounters{
		UpstreamKeyID: upKeyID(upKey), WeightedTokens: weighted, RawTokens: u.Input + u.Output, At: now,
	}
	if p.InUserKeys {
		s.Counters.UserKey = key
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
		if v, ok := repl.GetString("http.request.uuid"); ok && v != "" {
			return v
		}
	}
	var b [16]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
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
