package caddymodule

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
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
	"github.com/trollllm/caddy-llm-billing/settle"
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
	CreditFields []string `json:"credit_field,omitempty"`

	// Models is the path of the model catalogue, in the legacy config JSON
	// format (the backend reads the same file). Placeholders are resolved.
	Models string `json:"models,omitempty"`

	// MaxBodySize is the request body limit in bytes. Default: 50 MB.
	MaxBodySize int64 `json:"max_body_size,omitempty"`

	// HoldSizing is how much credit is reserved before a request is forwarded:
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
	HoldSizing string `json:"hold,omitempty"`

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

	// AllowRoles, when set, admits only users whose usersNew.role (trimmed,
	// lower-cased) is listed: the priority line ("admin", "priority").
	// Others get the legacy 403 after authentication, before anything is
	// held; /v1/models then needs an admitted key too, as the legacy's did.
	AllowRoles []string `json:"allow_roles,omitempty"`

	// PriceFactor scales the price of some requests (see PriceFactor).
	PriceFactor *PriceFactor `json:"price_factor,omitempty"`

	// ForwardHeaders adds client request headers to the allow-list of
	// those forwarded upstream (see forwardedHeaders); a name ending in "*"
	// adds every header it prefixes. Credential-like names (Authorization,
	// Cookie, *-Key, *-Token, ...) are refused: the upstream key is the only
	// credential the gateway forwards.
	ForwardHeaders []string `json:"forward_headers,omitempty"`

	headers headerFilter
	eng     *engine
	plan    billing.CreditPlan
	cat     *billing.Catalogue
	limits  *rateLimiter
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.llm_billing",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks the settings (Validate), loads the model catalogue and
// attaches to the llm_billing app.
func (h *Handler) Provision(ctx caddy.Context) error {
	if err := h.Validate(); err != nil {
		return err
	}
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
	plan, err := billing.ParseCreditPlan(h.CreditFields)
	if err != nil {
		return fmt.Errorf("credit_field: %w", err)
	}
	h.plan = plan
	path, err := caddy.NewReplacer().ReplaceOrErr(h.Models, true, true)
	if err != nil {
		return fmt.Errorf("models: %w", err)
	}
	h.cat, err = billing.LoadCatalogue(path)
	if err != nil {
		return fmt.Errorf("models: %w", err)
	}
	h.MaxBodySize = orDefault(h.MaxBodySize, DefaultMaxBodySize)
	h.DefaultMaxTokens = orDefault(h.DefaultMaxTokens, DefaultMaxTokens)
	h.DrainTimeout = caddy.Duration(orDefault(time.Duration(h.DrainTimeout), DefaultDrainTimeout))
	for i, role := range h.AllowRoles {
		h.AllowRoles[i] = strings.ToLower(strings.TrimSpace(role))
	}
	if h.headers, err = newHeaderFilter(h.ForwardHeaders); err != nil {
		return err
	}
	app, err := ctx.App("llm_billing")
	if err != nil {
		return fmt.Errorf("llm_billing app: %v", err)
	}
	// Keep the engine itself: it outlives this config generation's app.
	h.eng = app.(*App).eng
	h.limits = app.(*App).limits
	if mem := h.eng.bodies.limit.Load(); h.MaxBodySize > mem {
		h.logger.Warn("max_body_size is above the llm_billing body_memory: larger bodies always get 503",
			zap.Int64("max_body_size", h.MaxBodySize), zap.Int64("body_memory", mem))
	}
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

// ServeHTTP implements caddyhttp.MiddlewareHandler: it routes the request,
// admits it (admit.go), and forwards it under a hold (bill), or unbilled
// for count_tokens.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	setCORS(w, r)
	if r.Method == http.MethodOptions {
		preflight(w)
		return nil
	}
	ep, api := route(r.URL.Path)
	if ep != epChat && ep != epMessages && ep != epCountTokens {
		if (ep == epModels || ep == epModel) && !h.admitListing(w, r) {
			return nil
		}
		h.serveInfo(w, r, ep)
		return nil
	}
	rr := &refusalRecorder{ResponseWriter: w}
	defer h.logRefusal(r, rr)
	defer h.countRequest(rr, ep)
	if r.Method != http.MethodPost {
		errMethod.write(rr, api)
		return nil
	}
	a := &admission{start: time.Now(), api: api}
	defer h.release(a)
	if !h.admit(rr, r, a) {
		return nil
	}
	upKey, err := h.eng.pickKey()
	if err != nil {
		h.logger.Warn("no upstream key available")
		errNoKey.write(rr, api)
		return nil
	}
	upstreamModel := a.model.PickUpstream(rand.Uint64())
	a.model = h.PriceFactor.apply(a.model, upstreamModel) // the price this request is held and billed at
	if ep == epCountTokens {
		return h.countTokens(rr, r, next, a, upKey, upstreamModel)
	}
	return h.bill(rr, r, next, a, upKey, upstreamModel)
}

// bill forwards an admitted request under a hold and settles what its
// answer used: the hold is taken first, so that the forwarded max_tokens is
// what it pays for.
func (h *Handler) bill(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, a *admission, upKey billing.UpstreamKey, upstreamModel string) error {
	api, eng := a.api, h.eng
	done, ok := eng.begin()
	if !ok {
		errUnavailable.write(w, api)
		return nil
	}
	reqID, masked := requestID(r), billing.MaskKey(a.key)
	hold, maxTokens, aerr := h.reserve(r.Context(), api, reqID, a.key, a.p, a.model, masked, billing.ForwardedSize(len(a.body), upstreamModel), a.info)
	if aerr != nil {
		done()
		aerr.write(w, api)
		return nil
	}
	fwd, err := billing.RewriteRequest(api, a.body, a.info, upstreamModel, maxTokens)
	if err != nil {
		eng.settler.Submit(settle.Release(hold, h.logger))
		done()
		errInvalidJSON.write(w, api)
		return nil
	}
	holdsOutstanding.Inc() // until its settlement is done (settleMetrics.Finished)
	m := newMeter(w, api)
	m.onStart = a.refresh
	pr := &proxied{start: a.start, principal: a.p, key: a.key, masked: masked, reqID: reqID, hold: hold, client: r.Context(),
		upKey: upKey, model: a.model, upstreamModel: upstreamModel, bodyLen: len(a.body), expect: expectJSON,
		maxTokens: maxTokens, askedTokens: a.info.MaxTokens}
	if a.info.Stream {
		pr.expect = expectSSE
	}
	r, undrain := h.drain(r, m)
	defer undrain()
	// Deferred: runs on a normal return and when reverse_proxy aborts the
	// handler with panic(http.ErrAbortHandler) after a client disconnect.
	defer func() {
		h.settle(r, m, pr)
		m.release()
		done()
	}()
	return h.forward(w, r, next, m, pr, fwd, api)
}

// drain returns r with a context that outlives the client by at most
// DrainTimeout under client_disconnect drain, so that the usage the
// upstream reports can be billed, and what ends that context. Under stop it
// returns r as it is.
func (h *Handler) drain(r *http.Request, m *meter) (*http.Request, func()) {
	if h.ClientDisconnect == DisconnectStop {
		return r, func() {}
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(r.Context()))
	m.drain = true
	stop := context.AfterFunc(r.Context(), func() {
		m.gone.Store(true)
		time.AfterFunc(time.Duration(h.DrainTimeout), cancel)
	})
	return r.WithContext(ctx), func() {
		stop()
		cancel()
	}
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
	askedTokens   int64             // the request's own max_tokens, 0 when it sets none
	attempts      []billing.Attempt // every upstream attempt, the answered one last
	expect        int               // what a success must be: expectJSON or expectSSE
}

// reserve takes the request's hold, sized by h.HoldSizing, and
// returns the max_tokens to forward: what the hold pays for after the
// input bound of a forwarded body of size bytes (billing.HoldTerms), or -1
// (leave the body's as it is) under hold check.
func (h *Handler) reserve(ctx context.Context, api billing.API, reqID, key string, p billing.Principal, model *billing.Model, masked string, size int64, info billing.RequestInfo) (billing.Hold, int64, *apiError) {
	eng := h.eng
	if eng.settler.Backlogged() {
		h.logger.Error("refusing requests: settlements are waiting for the database", zap.Int("pending", eng.settler.Pending()))
		return billing.Hold{}, 0, errUnavailable
	}
	terms := billing.HoldTerms(model, size, info.MaxTokens, h.DefaultMaxTokens)
	want, need := terms.Want, terms.Input
	if h.HoldSizing == HoldCheck {
		want, need = 0, 0
	}
	// An orphaned hold is still charged the estimated input (charge_input),
	// not the bound.
	estimate := model.Price.Cost(billing.Usage{Input: billing.EstimateTokens(size)})
	fh, want, aerr := h.holdFriend(ctx, key, reqID, p, model, info.Model, want, need)
	if aerr != nil {
		return billing.Hold{}, 0, aerr
	}
	hold, aerr := h.take(ctx, api, reqID, p, model, masked, want, need, estimate)
	if aerr != nil {
		h.eng.releaseFriend(fh)
		return hold, -1, friendCredit(p, aerr)
	}
	hold.Friend = fh // settled with the hold, or given back with it
	if h.HoldSizing == HoldCheck {
		return hold, -1, nil
	}
	maxTokens := terms.Cap(model, hold.Amount(), info.ThinkingBudget)
	if maxTokens < 1 {
		eng.settler.Submit(settle.Release(hold, h.logger))
		if fh != nil && fh.Amount < terms.Want && hold.Amount() >= fh.Amount {
			return billing.Hold{}, 0, errFriendLimit(billing.FriendLimitExceeded, info.Model) // the limit, not the pool
		}
		return billing.Hold{}, 0, friendCredit(p, errInsufficient(api, h.plan, hold.Amount()))
	}
	return hold, maxTokens, nil
}

// take reserves want (at least need) from the user's pool.
func (h *Handler) take(ctx context.Context, api billing.API, reqID string, p billing.Principal, model *billing.Model, masked string, want, need, inputCost billing.Nano) (billing.Hold, *apiError) {
	eng := h.eng
	now := time.Now()
	req := billing.HoldRequest{
		RequestID: reqID, User: p.User, Plan: h.plan, Want: want, Min: need, Input: inputCost,
		Owner: eng.boot, At: now, Expires: now.Add(eng.settings().holdLease), LogID: billing.NewLogID(now),
		Model: model.ID, KeyID: masked, Clear: eng.settler.TakeReceipts(p.User),
	}
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	t0 := time.Now()
	hold, err := eng.ledger().Reserve(ctx, req)
	observeHold(hold, err, t0)
	var ie *billing.InsufficientError
	if errors.As(err, &ie) && eng.settler.AwaitUser(ctx, p.User, refusedWait) {
		// The user's own earlier requests still hold credit their
		// settlements will give back: once they are settled, ask again.
		t0 = time.Now()
		hold, err = eng.ledger().Reserve(ctx, req)
		observeHold(hold, err, t0)
	}
	if err != nil {
		eng.settler.ReturnReceipts(p.User, req.Clear, err)
	}
	switch {
	case err == nil:
		eng.settler.JournalHold(hold)
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
	eng.settler.Submit(&settle.Settlement{Unknown: true, Logger: h.logger, Hold: billing.Hold{
		RequestID: req.RequestID, User: req.User, Plan: req.Plan, Owner: req.Owner, At: req.At, Expires: req.Expires,
		LogID: req.LogID, Model: req.Model, KeyID: req.KeyID,
	}})
	return billing.Hold{}, errUnavailable
}

// settle prices what the response used and hands the settlement to the
// engine: the cost for a 2xx answer, a release of the hold otherwise.
func (h *Handler) settle(r *http.Request, m *meter, pr *proxied) {
	s := &settle.Settlement{Hold: pr.hold, Logger: h.logger, Site: r.Host, Counted: true}
	if m.status < 200 || m.status >= 300 {
		h.eng.settler.Submit(s) // nothing billed: the hold goes back
		return
	}
	p, key, upKey, model := pr.principal, pr.key, pr.upKey, pr.model
	ms := h.measure(m, pr, pr.client.Err() != nil || m.gone.Load())
	cost, u := h.charge(&ms, pr)
	source, end := ms.Source, ms.End
	h.checkCap(pr, source, u, cost)
	u = u.Clamped() // what one request may add to the token counters
	weighted := billing.ClampTokens(model.Price.WeightedTokens(u))
	now := time.Now()
	trollKey := ""
	if upKey.ID != "" {
		trollKey = "openhands:" + upKey.ID
	}
	s.Cost, s.Usage, s.Weighted, s.Bill = friendCap(pr.hold, cost), u, weighted, true
	s.Log = billing.RequestLog{
		ID: pr.hold.LogID, UserID: p.User, UserKeyID: pr.masked, TrollKeyID: trollKey, Model: model.ID,
		InputTokens: u.Input, OutputTokens: u.Output, CacheWriteTokens: u.CacheWrite, CacheHitTokens: u.CacheRead,
		CreditsCost: cost.USD(), CreditType: h.plan.CreditType(), TokensUsed: weighted,
		StatusCode: m.status, LatencyMs: now.Sub(pr.start).Milliseconds(), IsSuccess: true, CreatedAt: now,
		RequestID: pr.reqID, CreditField: h.plan.String(), Endpoint: r.URL.Path, Stream: m.sse,
		Attempts: pr.attempts, UpstreamModel: pr.upstreamModel, UsageSource: source, EndReason: end, CostNano: int64(cost),
		HoldNano: int64(pr.hold.Amount()),
	}
	if p.Friend != nil {
		s.Log.FriendKeyID = pr.masked
	}
	s.Counters = billing.UsageCounters{
		UpstreamKeyID: upKeyID(upKey), WeightedTokens: weighted, RawTokens: billing.ClampTokens(u.Input + u.Output), At: now,
	}
	if p.InUserKeys {
		s.Counters.UserKey = key
	}
	h.eng.settler.Submit(s)
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
