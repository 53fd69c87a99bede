// Command caddy is Caddy v2 with its standard modules and the llm_billing
// modules, pinned by this repository's go.mod. It is what the repository's
// own tests and CI build; users usually build with xcaddy (see xcaddy.sh).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/trollllm/caddy-llm-billing"
)

func main() {
	caddycmd.Main()
}
