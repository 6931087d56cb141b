#!/bin/bash
# Self-test (run alone with 80): a kernel panic ends the VM; 70 "did not finish", 80 "not run".
set -euo pipefail
sync
echo c >/proc/sysrq-trigger
sleep 60
