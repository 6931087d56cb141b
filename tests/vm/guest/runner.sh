#!/bin/bash
# Guest-side scenario runner (lives on the payload disk, started by vmtest-start).
#
# Runs each scenario of $VM_SCENARIOS from /payload/scenarios in its own transient
# systemd unit, so a timeout or a leftover daemon (usbipd -D, ...) is killed with the
# unit's cgroup. Writes to the console (stdout) and to /payload/out:
#   results.txt  "SCENARIO name PASS|FAIL|SKIP seconds [reason]" and "METRIC ..." lines
#   progress     "BEGIN name" / "END name" (tells the host where a dead VM stopped)
#   NAME.log     the scenario's output;  dmesg.txt, journal.txt at the end
# Exit codes of a scenario: 0 pass, 77 skip (reason: last "SKIP: ..." line), else fail.
set -euo pipefail

# shellcheck source=/dev/null
. /payload/vm.env
out=${VM_OUT:-/payload/out}
dir=/payload/scenarios
mkdir -p "$out"
: >"$out/results.txt"
: >"$out/progress"

record() {
  echo "$*"
  echo "$*" >>"$out/results.txt"
}

# "# vm-timeout: SECONDS" in a scenario's first lines overrides the default.
scenario_timeout() {
  local t
  t=$(head -n 20 "$1" | sed -n 's/^# *vm-timeout: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
  echo "${t:-${VM_SCENARIO_TIMEOUT:-300}}"
}

for s in ${VM_SCENARIOS:-}; do
  name=${s%.sh}
  log=$out/$name.log
  t=$(scenario_timeout "$dir/$s")
  echo "BEGIN $name" >>"$out/progress"
  sync
  echo "RUNNER BEGIN $name timeout=${t}s"
  echo "----- begin $name -----"
  start=$(date +%s%N)
  set +e
  # RuntimeMaxSec is a backstop behind timeout(1), which gives the clean exit code 124.
  systemd-run --quiet --wait --pipe --collect --unit="vmtest-$name" \
    -p EnvironmentFile=/payload/vm.env -p WorkingDirectory="$dir" \
    -p RuntimeMaxSec=$((t + 30)) -p KillMode=control-group \
    --setenv=PATH=/payload/vm:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --setenv=VM_SCENARIO="$name" \
    timeout -k 10 "$t" "$dir/$s" </dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  end=$(date +%s%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
  echo "----- end $name (exit $rc) -----"
  case $rc in
    0) record "SCENARIO $name PASS ${secs}s" ;;
    77)
      reason=$(sed -n 's/^SKIP: *//p' "$log" | tail -n 1)
      record "SCENARIO $name SKIP ${secs}s ${reason:-no reason given}"
      ;;
    124) record "SCENARIO $name FAIL ${secs}s timeout after ${t}s" ;;
    *) record "SCENARIO $name FAIL ${secs}s exit $rc" ;;
  esac
  # The console already showed them: METRIC lines only go to the results file.
  grep -E '^METRIC [^ ]+ [^ ]+' "$log" >>"$out/results.txt" || true
  echo "END $name" >>"$out/progress"
  sync
done

dmesg >"$out/dmesg.txt" 2>&1 || true
journalctl -b --no-pager -o short-monotonic >"$out/journal.txt" 2>&1 || true
echo "DONE" >>"$out/progress"
sync
echo "RUNNER DONE"
