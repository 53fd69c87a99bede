package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// The legacy friend key refusals (legacy-goproxy.md section 3), in both
// API shapes.
var (
	errFriendInactive      = &apiError{status: http.StatusUnauthorized, message: "Friend Key has been deactivated", oaiType: "authentication_error", antType: "authentication_error"}
	errFriendOwnerInactive = &apiError{status: http.StatusUnauthorized, message: "Friend Key owner account is inactive", oaiType: "authentication_error", antType: "authentication_error"}
	errFriendError         = &apiError{status: http.StatusPaymentRequired, message: "Friend Key model access denied", oaiType: "friend_key_error", antType: "friend_key_error"}
	// errFriendNoCredit replaces the insufficient-credit refusals for a
	// friend key: the friend is not shown the owner's balance.
	errFriendNoCredit = &apiError{status: http.StatusPaymentRequired, message: "Insufficient credits. Please contact the key owner.", oaiType: "insufficient_quota", oaiCode: "insufficient_credits", antType: "insufficient_credits"}
)

// errFriendLimit is the legacy 402 for a model the friend key may not
// spend on; model is the name the client sent, as the legacy showed it.
func errFriendLimit(reason billing.FriendRefusal, model string) *apiError {
	e := &apiError{status: http.StatusPaymentRequired}
	switch reason {
	case billing.FriendModelDisabled:
		e.message, e.oaiType = fmt.Sprintf("Model '%s' is disabled for this Friend Key", model), "friend_key_model_disabled"
	case billing.FriendLimitExceeded:
		e.message, e.oaiType = fmt.Sprintf("Friend Key spending limit exceeded for model '%s'", model), "friend_key_model_limit_exceeded"
	default:
		e.message, e.oaiType = fmt.Sprintf("Model '%s' is not configured for this Friend Key", model), "friend_key_model_not_allowed"
	}
	e.antType = e.oaiType
	return e
}

// friendCredit returns the refusal a friend key gets for aerr: the owner's
// insufficient credit becomes the legacy "contact the key owner".
func friendCredit(p billing.Principal, aerr *apiError) *apiError {
	if p.Friend != nil && aerr != nil && aerr.status == http.StatusPaymentRequired {
		return errFriendNoCredit
	}
	return aerr
}

// checkFriend refuses, from the limits cached with the key, a model the
// friend key has no limit for or has disabled; nil for other keys. model is
// the canonical id, asked the name the client sent.
func checkFriend(p billing.Principal, model, asked string) *apiError {
	if p.Friend == nil {
		return nil
	}
	if _, refusal := p.Friend.Check(model); refusal != 0 {
		return errFriendLimit(refusal, asked)
	}
	return nil
}

// holdFriend counts the request against the friend key's limit for the
// model, before the owner's pool is held: want at most, at least need, and
// returns the hold and what the pool hold may take (the friend hold's
// amount: the request then never costs more than the limit has room for).
// It does nothing for other keys.
func (h *Handler) holdFriend(ctx context.Context, key, reqID string, p billing.Principal, model *billing.Model, asked string, want, need billing.Nano) (*billing.FriendHold, billing.Nano, *apiError) {
	if p.Friend == nil {
		return nil, want, nil
	}
	lim, refusal := p.Friend.Check(model.ID)
	if refusal != 0 {
		return nil, 0, errFriendLimit(refusal, asked)
	}
	fl := h.eng.friends
	if fl == nil {
		return nil, 0, errFriendError
	}
	now := time.Now()
	req := billing.FriendHoldRequest{Key: key, RequestID: reqID, Model: model.ID, Slot: lim.Slot, Limit: lim.Limit,
		Want: want, Min: need, Expires: now.Add(h.eng.settings().holdLease)}
	ctx, cancel := context.WithTimeout(ctx, dbTimeout)
	defer cancel()
	t0 := time.Now()
	fh, err := fl.ReserveFriend(ctx, req)
	observeDB(waitHold, t0)
	var (
		le *billing.FriendLimitError
		ae *billing.AuthError
	)
	switch {
	case err == nil:
		return &fh, fh.Amount, nil
	case errors.As(err, &le):
		return nil, 0, errFriendLimit(le.Reason, asked)
	case errors.As(err, &ae):
		h.eng.auth.drop(key) // deactivated or deleted since it was cached
		return nil, 0, authErrorFor(ae)
	}
	h.logger.Error("taking a friend key hold failed", zap.String("key", billing.MaskKey(key)), zap.Error(err))
	return nil, 0, errFriendError
}

// releaseFriend gives a friend hold back at once (its request was refused
// before anything was forwarded). Should it fail, the hold stops counting
// when it expires.
func (e *engine) releaseFriend(fh *billing.FriendHold) {
	if fh == nil || e.friends == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), dbTimeout)
	defer cancel()
	if err := e.friends.SettleFriend(ctx, billing.FriendSettlement{Hold: *fh, At: time.Now()}); err != nil {
		e.log().Warn("giving a friend key hold back failed; it expires on its own", zap.String("request_id", fh.RequestID), zap.Error(err))
	}
}

// friendCap is what a request with hold h may charge for cost: for a
// friend key, at most its friend hold, the room its limit had (the rest is
// recorded as shortfall, as a cost above the pool's hold is), so that an
// upstream that answers more than max_tokens cannot spend past the limit.
// A zero friend hold (hold check) caps nothing.
func friendCap(h billing.Hold, cost billing.Nano) billing.Nano {
	if h.Friend == nil || h.Friend.Amount <= 0 {
		return cost
	}
	return min(cost, h.Friend.Amount)
}
