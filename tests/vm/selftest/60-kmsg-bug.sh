#!/bin/bash
# Self-test: passes itself, but the kernel-log line must fail the run (DMESG TROUBLE).
set -euo pipefail
echo "<3>BUG: selftest injected kernel trouble" >/dev/kmsg
