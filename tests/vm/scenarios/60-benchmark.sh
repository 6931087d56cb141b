#!/bin/bash
# vm-timeout: 600
# Read throughput of the usb-storage stick through the whole p2p-usb stack (helper,
# agent, iroh on loopback, p2p-usb attach, vhci_hcd) next to the kernel's own USB/IP
# (usbip-host + usbipd + vhci_hcd) in the same boot, same offsets, same sizes; and
# through `p2p-usb serve-usbip` with the kernel's `usbip attach` as the client. Rounds
# alternate between the two so load swings of the host hit both alike. Figures only:
# no threshold fails this scenario (the goal is >= 0.8x the kernel).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup

MIB=16
OFFSETS=(0 12 24 36 48)
ROUNDS=2

stick=$(wait_for 30 "usb-storage stick $VM_STICK_VIDPID" usb_busid "$VM_STICK_VIDPID")
on_exit kusbip_cleanup

p2p_samples=() p2p_buf_samples=() k_samples=() k_buf_samples=() p2p_w=() k_w=()

kernel_round() {
  kusbip_setup
  kusbip_bind "$stick"
  local port v dev o
  port=$(kusbip_attach "$stick")
  v=$(wait_for 20 "kernel vhci copy" vhci_busid "$VM_STICK_VIDPID")
  dev=$(wait_for 30 "block device of $v" usb_blockdev "$v")
  for o in "${OFFSETS[@]}"; do k_samples+=("$(read_mib_s "$dev" $MIB "$o")"); done
  for o in "${OFFSETS[@]}"; do k_buf_samples+=("$(read_buffered_mib_s "$dev" $MIB "$o")"); done
  for o in 0 24 48; do k_w+=("$(write_mib_s "$dev" 8 "$o")"); done
  kusbip_detach "$port"
  wait_no_vhci "$VM_STICK_VIDPID" 20
  kusbip_unbind "$stick"
  wait_for 20 "$stick back on usb-storage" usb_blockdev "$stick" >/dev/null
}

p2p_round() {
  local v dev o
  p2p_attach bench "$P2P_USER" "$stick"
  v=$(wait_vhci "$VM_STICK_VIDPID" 60) || { show_attach bench; fail "p2p-usb attach failed"; }
  dev=$(wait_for 60 "block device of $v" usb_blockdev "$v")
  for o in "${OFFSETS[@]}"; do p2p_samples+=("$(read_mib_s "$dev" $MIB "$o")"); done
  for o in "${OFFSETS[@]}"; do p2p_buf_samples+=("$(read_buffered_mib_s "$dev" $MIB "$o")"); done
  for o in 0 24 48; do p2p_w+=("$(write_mib_s "$dev" 8 "$o")"); done
  p2p_detach bench 30
  wait_no_vhci "$VM_STICK_VIDPID" 30
  wait_for 30 "$stick back on usb-storage" usb_blockdev "$stick" >/dev/null
}

# The other way in: `p2p-usb serve-usbip` (standard USB/IP on loopback, for `usbip
# attach` and usbip-win2) with the kernel's own USB/IP client. Reads only.
GATEWAY_PORT=3241
gw_samples=()
gateway_round() {
  local log=$VM_OUT/serve-usbip.log pid port v dev o
  kusbip_setup # vhci_hcd, /run/vhci_hcd
  (exec setpriv --reuid="$P2P_USER" --regid="$P2P_USER" --init-groups -- \
    env HOME="$(user_home "$P2P_USER")" p2p-usb serve-usbip "$P2P_SERVER" --listen "127.0.0.1:$GATEWAY_PORT") >>"$log" 2>&1 </dev/null &
  pid=$!
  on_exit "kill $pid 2>/dev/null || true"
  wait_for 30 "serve-usbip listening on $GATEWAY_PORT" sh -c "ss -Htln 'sport = :$GATEWAY_PORT' | grep -q ." >/dev/null
  usbip --tcp-port "$GATEWAY_PORT" list -r 127.0.0.1 | has "$VM_STICK_VIDPID\|46f4" || { indent serve-usbip <"$log"; fail "usbip list through the gateway does not show the stick"; }
  usbip --tcp-port "$GATEWAY_PORT" attach -r 127.0.0.1 -b "$stick" >/dev/null || { indent serve-usbip <"$log"; fail "usbip attach through the gateway failed"; }
  port=$(wait_for 20 "vhci port of the gateway attach" kusbip_port "$stick")
  v=$(wait_vhci "$VM_STICK_VIDPID" 60)
  dev=$(wait_for 60 "block device of $v" usb_blockdev "$v")
  for o in "${OFFSETS[@]}"; do gw_samples+=("$(read_mib_s "$dev" $MIB "$o")"); done
  kusbip_detach "$port"
  wait_no_vhci "$VM_STICK_VIDPID" 30
  kill "$pid"
  wait_for 20 "serve-usbip to exit" not kill -0 "$pid"
  wait_for 30 "$stick back on usb-storage" usb_blockdev "$stick" >/dev/null
}

for r in $(seq $ROUNDS); do
  log "round $r: kernel USB/IP"
  kernel_round
  log "round $r: p2p-usb attach"
  p2p_round
  log "round $r: p2p-usb serve-usbip + usbip attach"
  gateway_round
done
kusbip_cleanup

log "kernel usbip O_DIRECT read samples (MiB/s): ${k_samples[*]}"
log "p2p-usb     O_DIRECT read samples (MiB/s): ${p2p_samples[*]}"
log "kernel usbip buffered read samples (MiB/s): ${k_buf_samples[*]}"
log "p2p-usb     buffered read samples (MiB/s): ${p2p_buf_samples[*]}"
log "kernel usbip write samples (MiB/s): ${k_w[*]}"
log "p2p-usb     write samples (MiB/s): ${p2p_w[*]}"
k=$(median "${k_samples[@]}")
p=$(median "${p2p_samples[@]}")
kb=$(median "${k_buf_samples[@]}")
pb=$(median "${p2p_buf_samples[@]}")
g=$(median "${gw_samples[@]}")
log "serve-usbip O_DIRECT read samples (MiB/s): ${gw_samples[*]}"
kw=$(median "${k_w[@]}")
pw=$(median "${p2p_w[@]}")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
metric bench_kernel_usbip_read_mib_s "$k" MiB/s
metric bench_p2p_usb_read_mib_s "$p" MiB/s
metric bench_p2p_vs_kernel_read_ratio "$(ratio "$p" "$k")" x
metric bench_p2p_gateway_read_mib_s "$g" MiB/s
metric bench_p2p_gateway_vs_kernel_read_ratio "$(ratio "$g" "$k")" x
metric bench_kernel_usbip_buffered_read_mib_s "$kb" MiB/s
metric bench_p2p_usb_buffered_read_mib_s "$pb" MiB/s
metric bench_p2p_vs_kernel_buffered_read_ratio "$(ratio "$pb" "$kb")" x
metric bench_kernel_usbip_write_mib_s "$kw" MiB/s
metric bench_p2p_usb_write_mib_s "$pw" MiB/s
metric bench_p2p_vs_kernel_write_ratio "$(ratio "$pw" "$kw")" x
expect_stick_sha256 "$(usb_blockdev "$stick")"
