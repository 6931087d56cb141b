#!/bin/bash
# Self-test: a passing scenario that reports a metric and uses the control channel.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
[ "$(vmctl ping)" = pong ] || fail "vmctl ping"
[ "$(vmctl hmp info status)" != "" ] || fail "vmctl hmp"
vmctl qmp '{"execute":"query-status"}' | grep -q '"running"' || fail "vmctl qmp"
metric selftest_metric 1.5 units
