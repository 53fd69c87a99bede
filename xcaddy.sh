#!/usr/bin/env bash
# Builds ./caddy with this checkout's llm_billing modules the way users build
# Caddy plugins: with xcaddy, pinned versions, then shows the modules are in.
#
#   ./xcaddy.sh              # writes ./caddy
#   OUTPUT=/usr/local/bin/caddy ./xcaddy.sh
set -euo pipefail

XCADDY_VERSION="${XCADDY_VERSION:-v0.4.5}"
CADDY_VERSION="${CADDY_VERSION:-v2.11.9}"
MODULE="github.com/trollllm/caddy-llm-billing"
here="$(cd "$(dirname "$0")" && pwd)"
OUTPUT="${OUTPUT:-$here/caddy}"

gobin="$(go env GOPATH)/bin"
if ! "$gobin/xcaddy" version 2>/dev/null | grep -q "${XCADDY_VERSION#v}"; then
	echo "installing xcaddy $XCADDY_VERSION" >&2
	go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"
fi

# xcaddy replaces our module with this checkout, but the go command still asks
# the module proxy about the module path first; for an unpublished path the
# proxy refuses and the build fails. Falling back to "off" after the proxy
# (instead of "direct") lets the local replacement win.
proxy="$(go env GOPROXY)"
case "$proxy" in
*"|off" | off) ;;
*) export GOPROXY="${proxy%,direct}|off" ;;
esac

CADDY_VERSION="$CADDY_VERSION" XCADDY_SETCAP=0 \
	"$gobin/xcaddy" build "$CADDY_VERSION" --output "$OUTPUT" --with "$MODULE=$here"

echo "built $OUTPUT"
"$OUTPUT" version
mods="$("$OUTPUT" list-modules)"
for m in llm_billing http.handlers.llm_billing admin.api.llm_billing caddy.storage.mongodb; do
	grep -qx "$m" <<<"$mods" || { echo "module $m is missing from $OUTPUT" >&2; exit 1; }
	echo "$m"
done
