#!/bin/bash
# Self-test: the daemon 40-timeout left behind was killed with its unit's cgroup.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
pid=$(cat /run/selftest-daemon.pid)
if kill -0 "$pid" 2>/dev/null; then fail "daemon $pid of 40-timeout still alive"; fi
