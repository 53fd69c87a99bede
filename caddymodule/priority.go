package caddymodule

import (
	"errors"
	"fmt"
	"math"
	"net/http"
	"path"
	"slices"
	"strings"

	"github.com/trollllm/caddy-llm-billing/billing"
)

// PriceFactor scales the cost of a site's requests whose chosen upstream
// model matches UpstreamModels and whose model does not match ExceptModels:
// the legacy priority line's ×0.4 for GLM, made configurable. The factor
// multiplies the exact cost before its one rounding (billing.Price.Cost); it
// does not change the weighted token counters, as the legacy discount did
// not.
type PriceFactor struct {
	// Factor is the multiplier, above 0 and at most 1000 (0.4 is a 60%
	// discount). It is rounded to the nearest part per million.
	Factor float64 `json:"factor"`
	// UpstreamModels are path.Match patterns on the upstream model chosen
	// for the request (lower-cased); empty matches every model.
	UpstreamModels []string `json:"upstream_models,omitempty"`
	// ExceptModels are path.Match patterns on the catalogue id of the model
	// the client asked for (lower-cased); a match is never scaled.
	ExceptModels []string `json:"except_models,omitempty"`
}

// Validate checks the factor and the patterns. It changes nothing.
func (pf *PriceFactor) Validate() error {
	ppm := math.Round(pf.Factor * 1e6)
	if !(pf.Factor > 0) || ppm < 1 || ppm > billing.MaxFactor {
		return fmt.Errorf("price_factor: the factor must be above 0 and at most 1000, got %v", pf.Factor)
	}
	for _, p := range append(slices.Clone(pf.UpstreamModels), pf.ExceptModels...) {
		if _, err := path.Match(p, ""); err != nil {
			return fmt.Errorf("price_factor: bad pattern %q: %v", p, err)
		}
	}
	return nil
}

// ppm is the factor in parts per million, the unit billing.Price.WithFactor
// takes; it is within bounds once Validate has passed.
func (pf *PriceFactor) ppm() int64 {
	return int64(math.Round(pf.Factor * 1e6))
}

// apply returns the model as billed for a request routed to upstream: model
// itself, or a copy whose price carries the factor when it applies.
func (pf *PriceFactor) apply(model *billing.Model, upstream string) *billing.Model {
	if pf == nil || pf.ppm() == 0 || matchAny(pf.ExceptModels, model.ID) {
		return model
	}
	if len(pf.UpstreamModels) > 0 && !matchAny(pf.UpstreamModels, upstream) {
		return model
	}
	scaled := *model
	scaled.Price = model.Price.WithFactor(pf.ppm())
	return &scaled
}

func matchAny(patterns []string, name string) bool {
	name = strings.ToLower(name)
	for _, p := range patterns {
		if ok, _ := path.Match(strings.ToLower(p), name); ok {
			return true
		}
	}
	return false
}

// admits reports whether a site with allow_roles roles serves a user of
// role (already trimmed and lower-cased at authentication). No roles: all.
func admits(roles []string, role string) bool {
	return len(roles) == 0 || slices.Contains(roles, role)
}

// admitListing gates /v1/models on a site with allow_roles, as the legacy
// priority line did: a valid key of an admitted role, else an OpenAI-shaped
// refusal (written here; it returns false).
func (h *Handler) admitListing(w http.ResponseWriter, r *http.Request) bool {
	if len(h.AllowRoles) == 0 {
		return true
	}
	key, aerr := clientKey(r)
	if aerr != nil {
		aerr.write(w, billing.OpenAI)
		return false
	}
	p, _, err := h.eng.authenticate(r.Context(), key)
	var ae *billing.AuthError
	switch {
	case errors.As(err, &ae):
		authErrorFor(ae).write(w, billing.OpenAI)
		return false
	case err != nil:
		errUnavailable.write(w, billing.OpenAI)
		return false
	case !admits(h.AllowRoles, p.Role):
		errPriorityDenied.write(w, billing.OpenAI)
		return false
	}
	return true
}
