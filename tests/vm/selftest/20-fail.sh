#!/bin/bash
# Self-test: must be reported as FAIL.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
fail "intentional failure"
