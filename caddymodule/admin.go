package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/trollllm/caddy-llm-billing/billing"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves the gateway's operator endpoints on Caddy's admin API
// (never on a site): POST /llm_billing/reload reloads the upstream key pool
// from openhands_keys at once (what the backend's admin UI calls after it
// changes keys), and GET /llm_billing/keys shows the pool's keys and their
// state, without key material.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.llm_billing",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/llm_billing/reload", Handler: caddy.AdminHandlerFunc(a.reload)},
		{Pattern: "/llm_billing/keys", Handler: caddy.AdminHandlerFunc(a.keys)},
	}
}

// liveEngines returns the engines of every database in use.
func liveEngines() []*engine {
	var out []*engine
	engines.Range(func(_, v any) bool {
		if e, ok := v.(*engine); ok {
			out = append(out, e)
		}
		return true
	})
	return out
}

// reload answers like the legacy proxy's /reload, which the backend relays:
// 2xx JSON on success.
func (adminAPI) reload(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	engs := liveEngines()
	if len(engs) == 0 {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("llm_billing is not configured")}
	}
	keys := 0
	for _, e := range engs {
		if err := e.reloadKeys(r.Context()); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("reloading upstream keys: %v", err)}
		}
		keys += e.keys.Len()
	}
	return writeAdminJSON(w, map[string]any{
		"success": true, "message": "All pools reloaded successfully",
		"openhands_reloaded": true, "openhands_keys": keys,
	})
}

type keyView struct {
	ID            string     `json:"id"`
	Status        string     `json:"status"`
	Available     bool       `json:"available"`
	CooldownUntil *time.Time `json:"cooldown_until,omitempty"`
}

func (adminAPI) keys(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	now := time.Now()
	stats := map[string]int{"total": 0, "available": 0}
	views := []keyView{}
	for _, e := range liveEngines() {
		for _, k := range e.keys.Snapshot() {
			v := keyView{ID: k.ID, Status: k.Status, Available: billing.Usable(k, now)}
			if v.Status == "" {
				v.Status = billing.KeyHealthy
			}
			if !k.CooldownUntil.IsZero() && k.CooldownUntil.After(now) {
				t := k.CooldownUntil
				v.CooldownUntil = &t
			}
			stats["total"]++
			stats[v.Status]++
			if v.Available {
				stats["available"]++
			}
			views = append(views, v)
		}
	}
	return writeAdminJSON(w, map[string]any{"stats": stats, "keys": views})
}

func writeAdminJSON(w http.ResponseWriter, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	writeJSON(w, http.StatusOK, b)
	return nil
}

// Interface guards.
var _ caddy.AdminRouter = adminAPI{}
