package caddymodule

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// Bounds of the settings. A zero value of an optional setting means its
// default and is always accepted.
const (
	minKeyRefresh    = time.Second
	maxKeyAttempts   = 20
	minHoldLease     = time.Minute
	maxMaxBodySize   = 1 << 40
	maxDefaultTokens = 10_000_000
)

// Validate checks every setting of the app against its bounds. It is the
// only place these rules live: the Caddyfile parser only converts, and a
// JSON config is checked by the same rules. Errors name the setting by its
// key, which is the same in the Caddyfile and in JSON. Validate is cheap,
// does no I/O and changes nothing; Provision calls it before it touches the
// shared engine, and Caddy calls it again after Provision.
//
// key_cache_ttl has no bound: 0 is the default and a negative value (the
// Caddyfile's off) turns the cache off.
func (a *App) Validate() error {
	if strings.TrimSpace(a.MongoDBURI) == "" {
		return errors.New("mongodb_uri is required (use a placeholder such as {env.MONGODB_URI})")
	}
	if err := atLeast("key_refresh_interval", a.KeyRefreshInterval, minKeyRefresh); err != nil {
		return err
	}
	if a.KeyAttempts != 0 && (a.KeyAttempts < 1 || a.KeyAttempts > maxKeyAttempts) {
		return fmt.Errorf("key_attempts must be from 1 to %d, got %d", maxKeyAttempts, a.KeyAttempts)
	}
	for _, d := range []struct {
		key string
		v   caddy.Duration
	}{{"key_retry_budget", a.KeyRetryBudget}, {"key_cooldown", a.KeyCooldown}, {"key_error_cooldown", a.KeyErrorCooldown}} {
		if err := atLeast(d.key, d.v, time.Nanosecond); err != nil {
			return err
		}
	}
	if err := atLeast("hold_lease", a.HoldLease, minHoldLease); err != nil {
		return err
	}
	if a.BodyMemory != 0 && a.BodyMemory < firstChunk {
		return fmt.Errorf("body_memory must be at least %d bytes, got %d", firstChunk, a.BodyMemory)
	}
	if a.OrphanPolicy != "" {
		if _, err := billing.ParseOrphanPolicy(a.OrphanPolicy); err != nil {
			return fmt.Errorf("orphan_policy: %w", err)
		}
	}
	switch a.Isolation {
	case "", "auto", "process", "shared":
	default:
		return fmt.Errorf("isolation: unknown mode %q (want auto, process or shared)", a.Isolation)
	}
	switch a.ErrorLogs {
	case "", "on", "off":
	default:
		return fmt.Errorf("error_logs: want on or off, got %q", a.ErrorLogs)
	}
	switch a.CreditLease {
	case "", "on", "off":
	default:
		return fmt.Errorf("credit_lease: want on or off, got %q", a.CreditLease)
	}
	if a.RateLimit != nil {
		return a.RateLimit.Validate()
	}
	return nil
}

// Validate checks every setting of the handler against its bounds, as
// App.Validate does for the app. Loading the models file is not a check
// but I/O: Provision does it.
func (h *Handler) Validate() error {
	if _, err := billing.ParseCreditPlan(h.CreditFields); err != nil {
		return fmt.Errorf("credit_field: %w", err)
	}
	if h.Models == "" {
		return errors.New("models: a models file is required")
	}
	if h.MaxBodySize != 0 && (h.MaxBodySize < 1 || h.MaxBodySize > maxMaxBodySize) {
		return fmt.Errorf("max_body_size must be from 1 byte to 1TiB, got %d bytes", h.MaxBodySize)
	}
	switch h.HoldSizing {
	case "", HoldWorstCase, HoldCheck:
	default:
		return fmt.Errorf("hold: unknown sizing %q (want %s or %s)", h.HoldSizing, HoldWorstCase, HoldCheck)
	}
	if h.DefaultMaxTokens != 0 && (h.DefaultMaxTokens < 1 || h.DefaultMaxTokens > maxDefaultTokens) {
		return fmt.Errorf("default_max_tokens must be from 1 to %d, got %d", maxDefaultTokens, h.DefaultMaxTokens)
	}
	switch h.ClientDisconnect {
	case "", DisconnectDrain, DisconnectStop:
	default:
		return fmt.Errorf("client_disconnect: unknown policy %q (want %s or %s)", h.ClientDisconnect, DisconnectDrain, DisconnectStop)
	}
	if err := atLeast("drain_timeout", h.DrainTimeout, time.Nanosecond); err != nil {
		return err
	}
	for _, role := range h.AllowRoles {
		if strings.TrimSpace(role) == "" {
			return errors.New("allow_roles: a role must not be empty")
		}
	}
	if h.PriceFactor != nil {
		if err := h.PriceFactor.Validate(); err != nil {
			return err
		}
	}
	_, err := newHeaderFilter(h.ForwardHeaders)
	return err
}

// atLeast checks an optional duration: 0 (the default) or at least lowest.
// A lowest of one nanosecond reads "must be positive".
func atLeast(key string, v caddy.Duration, lowest time.Duration) error {
	if v == 0 || time.Duration(v) >= lowest {
		return nil
	}
	if lowest == time.Nanosecond {
		return fmt.Errorf("%s must be positive, got %s", key, shortDuration(time.Duration(v)))
	}
	return fmt.Errorf("%s must be at least %s, got %s", key, shortDuration(lowest), shortDuration(time.Duration(v)))
}

// shortDuration prints d as it would be written in a config: 1m, not 1m0s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// Interface guards.
var (
	_ caddy.Validator = (*App)(nil)
	_ caddy.Validator = (*Handler)(nil)
)
