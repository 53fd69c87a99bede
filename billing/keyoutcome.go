package billing

import (
	"bytes"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Key statuses of openhands_keys, shared with the backend admin UI.
const (
	KeyHealthy     = "healthy"
	KeyRateLimited = "rate_limited"
	KeyExhausted   = "exhausted"
	KeyNeedRefresh = "need_refresh"
	KeyError       = "error"
)

// KeyVerdict is what an upstream answer says about the key that got it.
type KeyVerdict struct {
	// Retry is true when another key may succeed where this one failed.
	Retry bool
	// Status is the key's new status ("" when the key is fine).
	Status string
	// Cooldown is how long the key stays out; 0 with a status means until
	// someone repairs it (need_refresh).
	Cooldown time.Duration
	// Reason names the failure for logs and the request log.
	Reason string
	// Persist is true when the status is written to openhands_keys for every
	// instance and the admin UI to see; a short error cooldown stays in
	// this process's memory.
	Persist bool
	// Probe is true when the answer only suspects the key: it is out for
	// Cooldown in this process, and a probe the gateway builds itself (no
	// client bytes) decides whether it is demoted for good (JudgeProbe).
	Probe bool
}

// KeyPolicy holds the cooldowns applied to failing keys.
type KeyPolicy struct {
	// RateLimitCooldown applies to 429 and 529 without a Retry-After.
	RateLimitCooldown time.Duration
	// ErrorCooldown applies to 5xx answers and transport errors.
	ErrorCooldown time.Duration
}

// exhaustedCooldown is how long a key out of credit stays out (the legacy
// proxy's 24 h).
const exhaustedCooldown = 24 * time.Hour

// JudgeResponse classifies an upstream answer. body is (the start of) the
// error body; retryAfter is the Retry-After header.
//
// A 401 or 403 to a client's request does not prove the key bad: the
// request carried client bytes, and an upstream may authenticate from them.
// Such a key only gets an error cooldown and a probe (Probe); JudgeProbe
// rules on the probe's answer.
func (p KeyPolicy) JudgeResponse(status int, body []byte, retryAfter string, now time.Time) KeyVerdict {
	switch {
	case status == http.StatusUnauthorized:
		return KeyVerdict{Retry: true, Status: KeyError, Cooldown: p.ErrorCooldown, Reason: "unauthorized", Probe: true}
	case status == http.StatusPaymentRequired:
		return KeyVerdict{Retry: true, Status: KeyExhausted, Cooldown: exhaustedCooldown, Reason: "payment_required", Persist: true}
	case status == http.StatusForbidden:
		return KeyVerdict{Retry: true, Status: KeyError, Cooldown: p.ErrorCooldown, Reason: "forbidden", Probe: true}
	case status == http.StatusBadRequest && budgetExceeded(body):
		return KeyVerdict{Retry: true, Status: KeyExhausted, Cooldown: exhaustedCooldown, Reason: "budget_exceeded", Persist: true}
	case status == http.StatusTooManyRequests || status == 529:
		d := p.RateLimitCooldown
		if ra, ok := parseRetryAfter(retryAfter, now); ok {
			d = ra
		}
		reason := "rate_limited"
		if status == 529 {
			reason = "overloaded"
		}
		return KeyVerdict{Retry: true, Status: KeyRateLimited, Cooldown: d, Reason: reason, Persist: true}
	case status >= 500 && status <= 599:
		return KeyVerdict{Retry: true, Status: KeyError, Cooldown: p.ErrorCooldown, Reason: "upstream_" + strconv.Itoa(status)}
	}
	return KeyVerdict{}
}

// ProbeOutcome is what a key probe's answer proves.
type ProbeOutcome int

// Probe outcomes.
const (
	// ProbeInconclusive: the probe failed for another reason (5xx, 429,
	// transport error); the key keeps its cooldown and nothing is written.
	ProbeInconclusive ProbeOutcome = iota
	// ProbeKeyGood: the key authenticates; its cooldown is lifted.
	ProbeKeyGood
	// ProbeKeyBad: the key itself is refused; it is demoted for good.
	ProbeKeyBad
)

// JudgeProbe classifies the answer to a probe: a request the gateway built
// itself, with the key as its only credential and no client bytes. Only a
// 401 or 403 to it proves the key bad; the verdict then persists
// need_refresh, as a revoked key needs a person to repair it.
func JudgeProbe(status int) (ProbeOutcome, KeyVerdict) {
	switch {
	case status == http.StatusUnauthorized:
		return ProbeKeyBad, KeyVerdict{Status: KeyNeedRefresh, Reason: "unauthorized", Persist: true}
	case status == http.StatusForbidden:
		return ProbeKeyBad, KeyVerdict{Status: KeyNeedRefresh, Reason: "forbidden", Persist: true}
	case status >= 200 && status < 300:
		return ProbeKeyGood, KeyVerdict{}
	}
	return ProbeInconclusive, KeyVerdict{}
}

// JudgeTransportError classifies a failure to get any answer.
func (p KeyPolicy) JudgeTransportError() KeyVerdict {
	return KeyVerdict{Retry: true, Status: KeyError, Cooldown: p.ErrorCooldown, Reason: "transport_error"}
}

// budgetExceeded matches LiteLLM's budget errors, as the legacy proxy did.
func budgetExceeded(body []byte) bool {
	if bytes.Contains(body, []byte("ExceededBudget")) {
		return true
	}
	lower := bytes.ToLower(body)
	return bytes.Contains(lower, []byte("budget_exceeded")) || bytes.Contains(lower, []byte("over budget")) ||
		bytes.Contains(lower, []byte("budget has been exceeded"))
}

// parseRetryAfter reads delta-seconds or an HTTP date; it caps the wait at
// one hour so a hostile header cannot park a key for days.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	var d time.Duration
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		if secs < 0 {
			return 0, false
		}
		d = time.Duration(secs * float64(time.Second))
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	} else {
		return 0, false
	}
	if d < 0 {
		d = 0
	}
	if d > time.Hour {
		d = time.Hour
	}
	return d, true
}
