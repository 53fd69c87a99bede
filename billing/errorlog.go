package billing

import (
	"context"
	"net/http"
	"time"
)

// ErrorLog is one refused request, as the legacy proxy recorded it in
// error_logs for the dashboard: who asked (masked key), what, and what it
// got. It never holds a key in clear.
type ErrorLog struct {
	Method, Path, Endpoint string
	UserID                 string // the authenticated user, "" when refused before
	UserKeyID              string // MaskKey of the client's key, "" without one
	ClientIP, UserAgent    string
	StatusCode             int
	ErrorType              string // ErrorTypeFor(StatusCode)
	ErrorMessage           string
	RequestHeaders         map[string]string // ErrorLogHeaders only
	CreatedAt              time.Time
}

// ErrorLogHeaders are the request headers an error log keeps, the legacy
// selection: none of them carries a credential.
var ErrorLogHeaders = []string{"Content-Type", "Accept", "Origin", "Referer", "X-Request-Id", "User-Agent"}

// ErrorTypeFor is the legacy error_logs errorType of a status.
func ErrorTypeFor(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "validation_error"
	case http.StatusUnauthorized:
		return "authentication_error"
	case http.StatusPaymentRequired:
		return "payment_required"
	case http.StatusForbidden:
		return "authorization_error"
	case http.StatusNotFound:
		return "not_found"
	case http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case http.StatusTooManyRequests:
		return "rate_limit_error"
	case http.StatusBadGateway:
		return "upstream_error"
	case http.StatusServiceUnavailable:
		return "service_unavailable"
	}
	if status >= 500 {
		return "server_error"
	}
	return "client_error"
}

// ErrorLogger writes error logs; a Store that is one records refusals.
type ErrorLogger interface {
	// InsertErrorLogs inserts a batch of error logs.
	InsertErrorLogs(ctx context.Context, logs []ErrorLog) error
	// EnsureErrorLogIndexes creates the error_logs indexes, the 30-day
	// expiry among them, if they are missing.
	EnsureErrorLogIndexes(ctx context.Context) error
}
