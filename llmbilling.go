// Package llmbilling registers the llm_billing Caddy modules: the
// llm_billing app (global option), the http.handlers.llm_billing handler
// (site directive) and the caddy.storage.mongodb certificate storage
// (global option `storage mongodb`). Import it for its side effects, as
// xcaddy does:
//
//	xcaddy build --with github.com/trollllm/caddy-llm-billing
//
// The modules themselves live in the caddymodule and certstorage packages;
// the billing logic, with no Caddy dependency, in the billing package.
package llmbilling

import (
	// Registers the modules, the Caddyfile directive and global option.
	_ "github.com/trollllm/caddy-llm-billing/caddymodule"
	// Registers the caddy.storage.mongodb storage module.
	_ "github.com/trollllm/caddy-llm-billing/certstorage"
)
