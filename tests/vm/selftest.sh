#!/bin/bash
# Self-test of the harness's failure paths, with the scenarios in tests/vm/selftest:
# FAIL/SKIP/timeout statuses, cgroup cleanup after a scenario, kernel trouble in dmesg,
# a kernel panic, the global timeout. Three VM boots, ~3 min with a cached guest.
#   tests/vm/selftest.sh [--bin-dir DIR]   (extra args go to run.sh)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=$here/../../target/vm-selftest
mkdir -p "$out"
bad=0

# vm EXPECTED_EXIT NAME RUN_SH_ARGS...: one run.sh invocation on the selftest scenarios.
vm() {
  local want=$1 name=$2 rc=0
  shift 2
  results=$out/$name.txt
  echo "== selftest run '$name': run.sh $*"
  "$here/run.sh" --scenario-dir "$here/selftest" --results "$results" "$@" >"$out/$name.log" 2>&1 || rc=$?
  if [ "$rc" = "$want" ]; then echo "ok   exit $rc"; else echo "FAIL exit $rc, expected $want (see $out/$name.log)"; bad=1; fi
}

# expect ERE: the last run's results file has a matching line.
expect() {
  if grep -qE "$1" "$results"; then echo "ok   $1"; else echo "FAIL no line matching: $1"; bad=1; fi
}

vm 1 statuses "$@" 10 20 30 40 50 60
expect '^SCENARIO 10-pass PASS'
expect '^SCENARIO 20-fail FAIL .* exit 1$'
expect '^SCENARIO 30-skip SKIP .* intentional skip$'
expect '^SCENARIO 40-timeout FAIL .* timeout after 5s$'
expect '^SCENARIO 50-cgroup-cleanup PASS'
expect '^SCENARIO 60-kmsg-bug PASS'
expect '^METRIC selftest_metric 1.5 units$'
expect '^DMESG TROUBLE: .*selftest injected'
expect '^RESULT FAIL: 3 passed, 2 failed, 1 skipped; VM poweroff'

vm 1 panic "$@" 70 80
expect '^SCENARIO 70-panic FAIL - did not finish \(guest died'
expect '^SCENARIO 80-after-panic FAIL - not run'
expect '^DMESG TROUBLE: .*Kernel panic'

vm 1 global-timeout --timeout 60 "$@" 90
expect '^SCENARIO 90-hang FAIL - did not finish \(timeout\)'
expect '^RESULT FAIL: .*VM timeout'

if [ "$bad" = 0 ]; then echo "SELFTEST PASS"; else echo "SELFTEST FAIL"; fi
exit "$bad"
