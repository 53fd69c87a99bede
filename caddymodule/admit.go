package caddymodule

import (
	"errors"
	"net/http"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// admission is what the gateway knows of a request it admitted: who sends
// it, what it asks for, and what it holds until it ends.
type admission struct {
	start   time.Time
	api     billing.API
	key     string // the client's key: only ever masked, or a user_keys _id for its counters
	p       billing.Principal
	refresh func() // starts the key's background lookup; nil when none is due
	held    int64  // bytes of body_memory the body holds
	body    []byte
	info    billing.RequestInfo
	model   *billing.Model // the site's model the request names
}

// admit decides, before anything is held, whether a request may go on: the
// client IP's rate limit, the key, the site's roles, the key's rate limit,
// a pool with credit (before any byte of the body is read), then the body
// and its model. A refusal is written to rr and admit returns false.
func (h *Handler) admit(rr *refusalRecorder, r *http.Request, a *admission) bool {
	if !h.limits.allowIP(rr, r, a.api) || !h.authenticate(rr, r, a) {
		return false
	}
	if !admits(h.AllowRoles, a.p.Role) {
		errPriorityDenied.write(rr, a.api) // before anything is held or counted
		return false
	}
	if !h.limits.allowKey(rr, a.api, a.key) {
		return false // neither forwarded nor billed
	}
	return h.readRequest(rr, r, a)
}

// authenticate reads the client's key and looks it up (from the cache when
// it can); the key is removed from the request.
func (h *Handler) authenticate(rr *refusalRecorder, r *http.Request, a *admission) bool {
	key, aerr := clientKey(r)
	// The client's key never goes further than this handler. (Caddy's access
	// log records the request as it arrived: drop X-Api-Key there with a log
	// filter, as Caddyfile.example does; Authorization is redacted by Caddy.)
	r.Header.Del("X-Api-Key")
	if key != "" {
		rr.masked = billing.MaskKey(key)
	}
	if aerr != nil {
		aerr.write(rr, a.api)
		return false
	}
	eng := h.eng
	p, refresh, err := eng.authenticate(r.Context(), key)
	if refresh {
		// The key is looked up again in the background once the answer
		// starts, or when the request ends, whichever comes first.
		var once sync.Once
		a.refresh = func() { once.Do(func() { eng.refreshAuth(key) }) }
	}
	var ae *billing.AuthError
	switch {
	case errors.As(err, &ae):
		authErrorFor(ae).write(rr, a.api)
		return false
	case err != nil:
		h.logger.Error("authenticating key failed", zap.String("key", billing.MaskKey(key)), zap.Error(err))
		errUnavailable.write(rr, a.api)
		return false
	}
	a.key, a.p, rr.user = key, p, p.User
	return true
}

// readRequest reads the body (nothing of it for a user whose pool is
// empty) and the fields the gateway bills by, and finds the model.
func (h *Handler) readRequest(rr *refusalRecorder, r *http.Request, a *admission) bool {
	body, held, aerr := h.admitBody(r, a.key, a.p, a.api)
	a.held = held // counted until the request ends: reverse_proxy may replay the body
	if aerr != nil {
		friendCredit(a.p, aerr).write(rr, a.api)
		return false
	}
	info, err := billing.ReadRequest(body)
	var rerr *billing.RequestError
	switch {
	case errors.As(err, &rerr):
		errBadRequest(rerr.Error()).write(rr, a.api)
		return false
	case errors.Is(err, billing.ErrInvalidJSON):
		errInvalidJSON.write(rr, a.api)
		return false
	case err != nil:
		errBadRequest(err.Error()).write(rr, a.api)
		return false
	case info.Model == "":
		errNoModel.write(rr, a.api)
		return false
	}
	model, ok := h.cat.Lookup(info.Model)
	if !ok {
		errModelNotFound(a.api, info.Model).write(rr, a.api)
		return false
	}
	a.body, a.info, a.model, rr.model = body, info, model, model.ID
	if aerr := checkFriend(a.p, model.ID, info.Model); aerr != nil {
		aerr.write(rr, a.api) // limits are per canonical model id
		return false
	}
	return true
}

// release gives back what an admission holds when its request ends: its
// share of body_memory, and a background key lookup not started yet.
func (h *Handler) release(a *admission) {
	h.eng.bodies.release(a.held)
	if a.refresh != nil {
		a.refresh()
	}
}
