#!/usr/bin/env bash
# The main job: builds p2p-usb and runs `p2p-usb demo`, the whole system on
# this machine (USB helper with simulated devices, server agent, client over
# iroh on loopback, USB/IP gateway and client). No root, no USB hardware, no
# internet. Extra arguments go to the demo (e.g. --bulk-mib 256).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
cargo build --release --workspace --bins
exec "${CARGO_TARGET_DIR:-$repo/target}/release/p2p-usb" demo "$@"
