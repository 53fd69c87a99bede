// Package llmbilling registers the llm_billing Caddy modules: the
// llm_billing app (global option) and the http.handlers.llm_billing handler
// (site directive). Import it for its side effects, as xcaddy does:
//
//	xcaddy build --with github.com/trollllm/caddy-llm-billing
//
// The modules themselves live in the caddymodule package; the billing logic,
// with no Caddy dependency, in the billing package.
package llmbilling

import (
	// Registers the modules, the Caddyfile directive and global option.
	_ "github.com/trollllm/caddy-llm-billing/caddymodule"
)
