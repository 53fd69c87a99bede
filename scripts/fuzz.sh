#!/usr/bin/env bash
# Runs every fuzz target of the plugin module, one after the other, and
# prints how its coverage grew, so that a run long enough to stop finding
# new coverage can be told from one that is not.
#
#   ./scripts/fuzz.sh            each target for 10m
#   ./scripts/fuzz.sh 1h         each target for an hour
#   FUZZ_PARALLEL=2 ./scripts/fuzz.sh 30m
#
# The corpus grows in Go's fuzz cache ($(go env GOCACHE)/fuzz), so a later
# run goes on from where this one stopped. A crasher is written to the
# package's testdata/fuzz/<Target>/ and fails the run: commit it as a seed
# once fixed. Logs go to fuzz-logs/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
time="${1:-10m}"
parallel="${FUZZ_PARALLEL:-1}"
mkdir -p fuzz-logs
targets=(
	billing:FuzzReadRequest
	billing:FuzzRewriteRequest
	billing:FuzzSSEScanner
	billing:FuzzParseUsageJSON
	billing:FuzzParseCatalogue
	caddymodule:FuzzHandlerUnmarshalCaddyfile
	caddymodule:FuzzAppUnmarshalCaddyfile
)
status=0
for t in "${targets[@]}"; do
	pkg="${t%%:*}" name="${t##*:}"
	log="fuzz-logs/$name.log"
	echo "== $name ($time, -parallel $parallel)"
	if ! go test -run '^$' -fuzz "^${name}\$" -fuzztime "$time" -parallel "$parallel" "./$pkg/" >"$log" 2>&1; then
		if grep -q 'context deadline exceeded' "$log" && ! grep -q 'Failing input written to' "$log"; then
			# Go 1.26's fuzz coordinator can report its own -fuzztime
			# deadline as a failure (golang/go#75804, fixed in 1.27):
			# no input failed and none was written.
			echo "   ended by the coordinator's deadline race (golang/go#75804), no crasher"
		else
			status=1
			echo "   FAILED: see $log"
		fi
	fi
	# New coverage found in each quarter of the run: a run that stopped
	# finding any in its last quarter has plateaued.
	grep 'new interesting' "$log" | awk '{ n[NR] = $0 } END {
		for (q = 1; q <= 4; q++) { i = int(NR * q / 4); if (i < 1) i = 1; line = n[i]
			sub(/.*elapsed: /, "", line); sub(/, execs.*new interesting: /, "  new interesting: ", line); print "   " line } }'
done
exit "$status"
