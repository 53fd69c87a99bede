#!/usr/bin/env bash
# The performance benchmark of the llm_billing module (see bench/README.md).
#
#   ./scripts/bench.sh                     end to end, gateway vs plain Caddy: about 10 minutes on 2 cores
#   ./scripts/bench.sh --quick             the same as a smoke run (about a minute and a half)
#   ./scripts/bench.sh --rounds 5 ...      any flag of the harness (./bench/.build/bench run -h lists them)
#   ./scripts/bench.sh --credit-lease ...  the same with `credit_lease on` in the gateway's Caddyfile
#   ./scripts/bench.sh sweep [flags]       non-stream saturation for users 1, 32, 1000, 10000 × credit_lease
#                                          off/on, gateway and plain Caddy side by side, one table
#                                          (half an hour or more on 2 cores: the 10000-user cells settle
#                                          10000 warm-up holds each; --sweep-users, --sweep-leases, --sat-duration)
#   ./scripts/bench.sh go [BASELINE.txt]   the Go micro-benchmarks of billing/ and caddymodule/,
#                                          compared with BASELINE.txt by benchstat when given
#
# End to end, it installs what is missing (Debian's postgresql for FerretDB's
# PostgreSQL backend), builds Caddy from this checkout with ./xcaddy.sh and the
# harness (bench/, a Go module of its own), then runs the harness, which starts
# PostgreSQL, FerretDB, the stand-in upstream and Caddy, drives both sites and
# prints a Markdown table. Results go to bench/results/ (JSON and Markdown).
#
# Environment:
#   CADDY_BIN=/path/to/caddy   use this Caddy (with llm_billing) instead of building one
#   SKIP_CADDY_BUILD=1         reuse bench/.build/caddy from an earlier run
#   BENCH_<FLAG>=value         any harness flag, e.g. BENCH_ROUNDS=5 BENCH_SAT_DURATION=10s
#   BENCH_CREDIT_LEASE=on      the gateway with `credit_lease on` (the same as --credit-lease)
#   BENCH_USERS=N              the gateway's requests spread over N seeded users (default 32)
#   GO_BENCH_COUNT=6           -count of the Go micro-benchmarks
#   GO_BENCH_TIME=1s           -benchtime of the Go micro-benchmarks
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
results="$root/bench/results"
mkdir -p "$results"
stamp="$(date +%Y%m%d-%H%M%S)"

as_root() {
	if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

if [ "${1:-}" = go ]; then
	shift
	baseline="${1:-}"
	out="$results/go-bench-$stamp.txt"
	echo "== go test -bench (billing, caddymodule) -> $out" >&2
	go test -run '^$' -bench . -benchmem -count "${GO_BENCH_COUNT:-6}" -benchtime "${GO_BENCH_TIME:-1s}" \
		./billing/ ./caddymodule/ | tee "$out"
	gobin="$(go env GOBIN)"
	[ -n "$gobin" ] || gobin="$(go env GOPATH)/bin"
	if [ ! -x "$gobin/benchstat" ]; then
		echo "== installing benchstat" >&2
		go install golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da ||
			echo "benchstat did not install; raw results are in $out" >&2
	fi
	if [ -x "$gobin/benchstat" ]; then
		if [ -n "$baseline" ]; then
			echo "== benchstat $baseline $out" >&2
			"$gobin/benchstat" "$baseline" "$out"
		else
			"$gobin/benchstat" "$out"
			echo "(pass this file as the baseline of a later run: ./scripts/bench.sh go $out)" >&2
		fi
	fi
	exit 0
fi

mode=run
if [ "${1:-}" = sweep ]; then
	shift
	mode=sweep
fi

# PostgreSQL for FerretDB's PostgreSQL backend, unless SQLite was asked for.
want_pg=1
case " ${BENCH_DB:-} $* " in
*" sqlite "* | *"-db=sqlite"* | *"-db sqlite"*) want_pg=0 ;;
esac
if [ "$want_pg" = 1 ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v postgres >/dev/null; then
	echo "== installing Debian's postgresql" >&2
	as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql ||
		{ as_root apt-get update && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; }
fi

echo "== building the harness (bench/)" >&2
(cd bench && go build -o .build/bench .)

caddy="${CADDY_BIN:-}"
if [ -z "$caddy" ]; then
	caddy="$root/bench/.build/caddy"
	if [ "${SKIP_CADDY_BUILD:-0}" != 1 ] || [ ! -x "$caddy" ]; then
		echo "== building Caddy with ./xcaddy.sh" >&2
		OUTPUT="$caddy" ./xcaddy.sh >&2
	fi
fi

if [ "$mode" = sweep ]; then
	exec "$root/bench/.build/bench" run -sweep -caddy "$caddy" -repo "$root" -out "$results/sweep-$stamp.json" "$@"
fi
exec "$root/bench/.build/bench" run -caddy "$caddy" -repo "$root" -out "$results/bench-$stamp.json" "$@"
