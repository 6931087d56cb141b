#!/bin/bash
# vm-timeout: 300
# Baseline: the kernel's own USB/IP on loopback (usbip-host + usbipd + vhci_hcd).
# Attaches the emulated usb-storage stick through vhci, checks every byte (sha256 of the
# whole device against the host's image), measures read/write throughput, detaches and
# checks the stick is back on usb-storage. The project's stack is compared to these
# METRIC figures, measured in the same boot.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

trap kusbip_cleanup EXIT
# Throughput: median of several cold-cache samples at different offsets. TCG speed
# swings with the host's load, so compare figures from the same boot only.
MIB=16
OFFSETS=(0 12 24 36 48)

busid=$(wait_for 30 "usb-storage stick $VM_STICK_VIDPID" usb_busid "$VM_STICK_VIDPID")
native=$(wait_for 30 "block device of $busid" usb_blockdev "$busid")
log "stick $busid is $native"

# Local reads first: what the emulated device gives without USB/IP.
expect_stick_sha256 "$native"
measure native_usb_read_mib_s read_mib_s "$native" $MIB "${OFFSETS[@]}"
measure native_usb_write_mib_s write_mib_s "$native" 8 0 24 48

kusbip_setup
kusbip_bind "$busid"
not usb_blockdev "$busid" || fail "$native still present after usbip bind"

a=$(date +%s%N)
port=$(kusbip_attach "$busid")
vbusid=$(wait_for 20 "vhci copy of $VM_STICK_VIDPID" vhci_busid "$VM_STICK_VIDPID")
dev=$(wait_for 30 "block device of $vbusid" usb_blockdev "$vbusid")
b=$(date +%s%N)
log "attached on vhci port $port as $vbusid, $dev"
metric kernel_usbip_attach_s "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')" s

# Every byte, through USB/IP.
a=$(date +%s%N)
expect_stick_sha256 "$dev"
b=$(date +%s%N)
metric kernel_usbip_sha256_read_mib_s "$(_mib_s "$VM_STICK_SIZE" "$a" "$b")" MiB/s

measure kernel_usbip_read_mib_s read_mib_s "$dev" $MIB "${OFFSETS[@]}"
measure kernel_usbip_buffered_read_mib_s read_buffered_mib_s "$dev" $MIB "${OFFSETS[@]}"
measure kernel_usbip_write_mib_s write_mib_s "$dev" 8 0 24 48
expect_stick_sha256 "$dev" # the write-backs left the content unchanged

kusbip_detach "$port"
wait_for 20 "vhci device gone" not vhci_busid "$VM_STICK_VIDPID"
kusbip_unbind "$busid"
wait_for 20 "$busid back on usb-storage" usb_blockdev "$busid" >/dev/null
[ "$(usb_driver "$busid")" = usb ] || fail "$busid bound to $(usb_driver "$busid"), expected usb"
expect_stick_sha256 "$(usb_blockdev "$busid")"
log "stick back on usb-storage as $(usb_blockdev "$busid")"
