#!/bin/bash
# vm-timeout: 5
# Self-test: must be reported as FAIL (timeout); its daemon must not outlive it.
set -euo pipefail
setsid sleep 1000 </dev/null >/dev/null 2>&1 &
echo $! >/run/selftest-daemon.pid
sleep 60
