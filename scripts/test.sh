#!/usr/bin/env bash
# Runs every check CI runs, in order: formatting, go vet, the plugin's unit
# tests, the settlement simulation, the end-to-end suite (real Caddy
# in-process, embedded FerretDB, the stand-in upstream, the official SDK
# clients), then the xcaddy build and a
# `caddy validate` and `caddy fmt` check of Caddyfile.example with that binary.
#
#   ./scripts/test.sh                 # everything
#   SKIP_XCADDY=1 ./scripts/test.sh   # without the xcaddy build
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

step() { printf '\n== %s\n' "$*"; }

step "gofmt"
unformatted="$(gofmt -l $(find . -name '*.go' -not -path './.git/*'))"
if [ -n "$unformatted" ]; then
	echo "gofmt would change:"; echo "$unformatted"; exit 1
fi

step "go vet"
go vet ./...
(cd tests && go vet ./...)

step "unit tests (plugin module)"
go test -race -count=1 -skip '^TestSimulation$' ./...

step "settlement simulation (300 seeds, no race detector: it is one goroutine)"
go test -count=1 -run '^TestSimulation$' ./settle -sim.seeds=300

step "end-to-end tests (tests module)"
(cd tests && go test -race -count=1 -p 1 -timeout 20m ./...)
step "the integrity tests again with credit leases on"
(cd tests && LLM_BILLING_TEST_CREDIT_LEASE=on go test -race -count=1 -p 1 -timeout 10m \
	-run 'TestConcurrentStreamsNeverOverspend|TestSequentialRequestsUseWhatTheLastGaveBack|TestDatabaseOutageDuringTraffic' ./e2e/)

if [ "${SKIP_XCADDY:-0}" != 1 ]; then
	step "xcaddy build"
	./xcaddy.sh
	step "caddy validate Caddyfile.example"
	models="$(mktemp -d)"
	trap 'rm -rf "$models"' EXIT
	cp examples/models-chat.json "$models/config-openhands-prod.json"
	cp examples/models-chat2.json "$models/config-ohmygpt-prod.json"
	cp examples/models-priority.json "$models/config-openhands-prod-uutien.json"
	# An unreachable database on purpose: validation must not need it.
	MONGODB_URI="mongodb://127.0.0.1:1" MONGODB_DB_NAME=fproxy LLM_MODELS_DIR="$models" \
		timeout 60 "$root/caddy" validate --config Caddyfile.example --adapter caddyfile
	step "caddy fmt Caddyfile.example"
	# Users copy it: it must be in the form `caddy fmt` writes.
	"$root/caddy" fmt --diff Caddyfile.example >/dev/null 2>&1 || {
		"$root/caddy" fmt --diff Caddyfile.example || true
		echo "Caddyfile.example is not formatted: run caddy fmt --overwrite Caddyfile.example" >&2
		exit 1
	}
fi
step "all checks passed"
