//go:build llmbilling_tools

// Package tests holds the end-to-end test infrastructure of the llm_billing
// Caddy module. It is a separate Go module so that the plugin's own go.mod
// carries no test-only dependencies.
//
// This file only pins, for go mod tidy, the modules that the e2e tests
// build against (Caddy with its standard modules and the plugin itself);
// it is never compiled.
package tests

import (
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/trollllm/caddy-llm-billing/billing"
)
