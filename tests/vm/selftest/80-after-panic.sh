#!/bin/bash
# Self-test: never runs (70-panic killed the VM before).
set -euo pipefail
