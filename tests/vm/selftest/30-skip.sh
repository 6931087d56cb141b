#!/bin/bash
# Self-test: must be reported as SKIP with this reason.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
skip "intentional skip"
