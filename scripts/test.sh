#!/usr/bin/env bash
# Runs every test of p2p-usb: unit, property and end-to-end tests on the host
# (real binaries, real sockets, systemd tools, the stock usbip tool), the
# deployment checks, and the VM tests (real kernel, systemd, udev, USB).
#
#   scripts/test.sh [--no-vm] [--quick]
#
#   --no-vm   skip the QEMU stage (it needs root and ~10-20 minutes)
#   --quick   host tests only: no deployment checks, no VM
#
# One release build serves every stage (CARGO_TARGET_DIR is honoured).
# As root, missing Debian packages are installed with apt-get.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
vm=1
deploy=1
for arg in "$@"; do
    case "$arg" in
        --no-vm) vm=0 ;;
        --quick) vm=0; deploy=0 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 64 ;;
    esac
done

step() { printf '\n==> %s\n' "$*"; }

# Tools the host tests drive: systemd-socket-activate and systemd-analyze
# (systemd), the stock usbip client (usbip), ip netns (iproute2).
needed=()
command -v systemd-socket-activate >/dev/null || needed+=(systemd)
command -v usbip >/dev/null || needed+=(usbip)
command -v ip >/dev/null || needed+=(iproute2)
if [ ${#needed[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
        step "installing ${needed[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${needed[@]}" >/dev/null
    else
        echo "missing tools from Debian packages: ${needed[*]} (install them, or run as root)" >&2
        exit 69
    fi
fi

step "the USB helper links no network code"
if cargo tree -p p2p-usb-helper -e normal --prefix none | grep -E -i '^(iroh|noq|quinn|rustls|ring|hyper|reqwest|h2|http|openssl)[ -]'; then
    echo "p2p-usb-helper must not depend on network, TLS or HTTP crates" >&2
    exit 1
fi

target=${CARGO_TARGET_DIR:-$repo/target}
step "building (release: binaries, tests, benchmarks)"
cargo build --release --workspace --bins --tests --benches

step "unit, property and end-to-end tests"
P2P_USB_BIN_DIR=$target/release cargo test --release --workspace

step "the main job: p2p-usb demo"
"$target/release/p2p-usb" demo --bulk-mib 32

if [ "$deploy" -eq 1 ]; then
    step "deployment checks (units, udev, install scripts, .deb)"
    scripts/check-deploy.sh --bin-dir "$target/release" --require-binaries
fi

if [ "$vm" -eq 1 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "the VM stage needs root; rerun as root or pass --no-vm" >&2
        exit 77
    fi
    step "VM tests (real kernel, systemd, udev, emulated USB devices)"
    tests/vm/run.sh --bin-dir "$target/release"
fi
step "all tests passed"
