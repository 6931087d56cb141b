#!/bin/bash
# vm-timeout: 900
# Self-test (run alone with a short --timeout): the host's global timeout stops the VM.
set -euo pipefail
sleep 900
