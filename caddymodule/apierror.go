package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// apiError is an error the gateway answers itself, in the shape of the
// client's API. The messages, types and codes are the legacy proxy's, so
// that clients and the dashboard see what they saw before.
type apiError struct {
	status  int
	message string
	oaiType string // OpenAI error.type
	oaiCode string // OpenAI error.code, omitted when empty
	antType string // Anthropic error.type
	balance *float64
	// retryAfter, when set, is sent as the Retry-After header.
	retryAfter string
}

type oaiBody struct {
	Error struct {
		Message string   `json:"message"`
		Type    string   `json:"type"`
		Code    string   `json:"code,omitempty"`
		Balance *float64 `json:"balance,omitempty"`
	} `json:"error"`
}

type antBody struct {
	Type  string `json:"type"`
	Error struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

// write sends the error as JSON for api (OpenAI when api is zero), and
// notes it for error_logs when w records refusals.
func (e *apiError) write(w http.ResponseWriter, api billing.API) {
	if rr, ok := w.(*refusalRecorder); ok {
		rr.refusal = e
	}
	var body []byte
	if api == billing.Anthropic {
		var b antBody
		b.Type = "error"
		b.Error.Type, b.Error.Message = e.antType, e.message
		body, _ = json.Marshal(b)
	} else {
		var b oaiBody
		b.Error.Message, b.Error.Type, b.Error.Code, b.Error.Balance = e.message, e.oaiType, e.oaiCode, e.balance
		body, _ = json.Marshal(b)
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Del("Content-Encoding")
	if e.retryAfter != "" {
		h.Set("Retry-After", e.retryAfter)
	}
	w.WriteHeader(e.status)
	_, _ = w.Write(body)
}

func (e *apiError) Error() string { return e.message }

var (
	errAuthRequired   = &apiError{status: http.StatusUnauthorized, message: "Authorization header is required", oaiType: "invalid_request_error", antType: "authentication_error"}
	errAuthFormat     = &apiError{status: http.StatusUnauthorized, message: "Invalid authorization header format", oaiType: "invalid_request_error", antType: "authentication_error"}
	errInvalidKey     = &apiError{status: http.StatusUnauthorized, message: "Invalid API key", oaiType: "authentication_error", antType: "authentication_error"}
	errRevoked        = &apiError{status: http.StatusUnauthorized, message: "API key has been revoked", oaiType: "authentication_error", antType: "authentication_error"}
	errExpired        = &apiError{status: http.StatusPaymentRequired, message: "Credits have expired. Please purchase new credits.", oaiType: "insufficient_quota", oaiCode: "credits_expired", antType: "credits_expired"}
	errMigration      = &apiError{status: http.StatusForbidden, message: "Migration required: please visit https://trollllm.xyz/dashboard to migrate your account to the new billing rate (1000→2500 VNĐ/$)", oaiType: "migration_required", oaiCode: "migration_required", antType: "migration_required"}
	errReadBody       = &apiError{status: http.StatusBadRequest, message: "Failed to read request body", oaiType: "invalid_request_error", antType: "invalid_request_error"}
	errInvalidJSON    = &apiError{status: http.StatusBadRequest, message: "Invalid JSON", oaiType: "invalid_request_error", antType: "invalid_request_error"}
	errNoModel        = &apiError{status: http.StatusBadRequest, message: "model is required", oaiType: "invalid_request_error", antType: "invalid_request_error"}
	errMethod         = &apiError{status: http.StatusMethodNotAllowed, message: "Method not allowed", oaiType: "invalid_request_error", antType: "invalid_request_error"}
	errNotFound       = &apiError{status: http.StatusNotFound, message: "Not found", oaiType: "invalid_request_error", antType: "not_found_error"}
	errNoKey          = &apiError{status: http.StatusServiceUnavailable, message: "Service temporarily unavailable. Please try again later.", oaiType: "server_error", antType: "api_error"}
	errUnavailable    = &apiError{status: http.StatusServiceUnavailable, message: "Billing is temporarily unavailable. Please try again later.", oaiType: "server_error", antType: "api_error"}
	errPriorityDenied = &apiError{status: http.StatusForbidden, message: "vui long lien he qua discord de duoc tham gia line uu tien", oaiType: "insufficient_permissions", oaiCode: "priority_line_access_denied", antType: "forbidden"}
	errUpstream       = &apiError{status: http.StatusBadGateway, message: "Request to upstream service failed", oaiType: "upstream_error", antType: "api_error"}
	errBadAnswer      = &apiError{status: http.StatusBadGateway, message: "Upstream service returned an invalid response", oaiType: "upstream_error", antType: "api_error"}
)

func errBodyTooLarge(limit int64) *apiError {
	return &apiError{status: http.StatusRequestEntityTooLarge,
		message: fmt.Sprintf("Request body too large: the limit is %d bytes", limit),
		oaiType: "invalid_request_error", antType: "request_too_large"}
}

// errRateLimited is the legacy 429, with the real wait.
func errRateLimited(retryAfter int64) *apiError {
	return &apiError{status: http.StatusTooManyRequests,
		message: fmt.Sprintf("Rate limit exceeded. Please retry after %d seconds.", retryAfter),
		oaiType: "rate_limit_error", oaiCode: "rate_limit_exceeded", antType: "rate_limit_error"}
}

func errBadRequest(msg string) *apiError {
	return &apiError{status: http.StatusBadRequest, message: msg, oaiType: "invalid_request_error", antType: "invalid_request_error"}
}

func errModelNotFound(api billing.API, model string) *apiError {
	msg := fmt.Sprintf("Model '%s' not found", model)
	if api == billing.Anthropic {
		msg = "Model not found"
	}
	return &apiError{status: http.StatusNotFound, message: msg, oaiType: "invalid_request_error", antType: "invalid_request_error"}
}

// errInsufficient is the legacy pre-check refusal. The balance is shown with
// two decimals, as before; the Anthropic message names the pool.
func errInsufficient(api billing.API, plan billing.CreditPlan, balance billing.Nano) *apiError {
	usd := balance.USD()
	shown := float64(int64(usd*100)) / 100
	msg := fmt.Sprintf("Insufficient credits. Current balance: $%.2f", shown)
	if api == billing.Anthropic && plan.Fields()[0] == billing.FieldCreditsNew {
		msg = fmt.Sprintf("Insufficient creditsNew. Current balance: $%.2f", shown)
	}
	return &apiError{status: http.StatusPaymentRequired, message: msg, oaiType: "insufficient_quota", oaiCode: "insufficient_credits", antType: "insufficient_credits", balance: &shown}
}

// errInsufficientCost is the legacy second pre-check refusal: the pool has
// something, but less than the estimated cost of the request's input.
func errInsufficientCost(cost, balance billing.Nano) *apiError {
	return &apiError{status: http.StatusPaymentRequired,
		message: fmt.Sprintf("Insufficient credits. Cost: $%.4f, Balance: $%.4f", cost.USD(), balance.USD()),
		oaiType: "insufficient_balance", antType: "insufficient_balance"}
}

func authErrorFor(err *billing.AuthError) *apiError {
	switch err.Reason {
	case billing.AuthRevoked:
		return errRevoked
	case billing.AuthExpired:
		return errExpired
	case billing.AuthMigrationRequired:
		return errMigration
	case billing.AuthFriendInactive:
		return errFriendInactive
	case billing.AuthFriendOwnerInactive:
		return errFriendOwnerInactive
	}
	return errInvalidKey
}
