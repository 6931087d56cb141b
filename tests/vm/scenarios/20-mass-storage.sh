#!/bin/bash
# vm-timeout: 400
# The usb-storage stick through the whole stack: helper (usbfs) -> agent -> iroh on
# loopback -> `p2p-usb attach` as an unprivileged user in group p2p-usb-attach ->
# vhci_hcd -> usb-storage on the client side. Every byte is read through the stack
# and compared with the host's image; a scratch region is written through the stack
# and read back from the real device after detach; the stick returns to usb-storage.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup

SCRATCH_MIB=60 # offset of the 1 MiB scratch region (the stick is 64 MiB)

stick=$(wait_for 30 "usb-storage stick $VM_STICK_VIDPID" usb_busid "$VM_STICK_VIDPID")
native=$(wait_for 30 "block device of $stick" usb_blockdev "$stick")
log "stick $stick is $native locally"
dmesg_mark /run/vmtest-20.dmesg

# --- the vhci attribute files as the udev rule left them ---
stat -c '    %A %U:%G %n' /sys/devices/platform/vhci_hcd.0/attach /sys/devices/platform/vhci_hcd.0/detach
perm=$(stat -c '%G %a' /sys/devices/platform/vhci_hcd.0/attach)
[ "$perm" = "p2p-usb-attach 220" ] || fail "vhci_hcd.0/attach is '$perm', expected 'p2p-usb-attach 220' (70-p2p-usb-vhci.rules)"

# --- attach as the unprivileged client user ---
a=$(date +%s%N)
p2p_attach stick "$P2P_USER" "$stick"
if ! vbusid=$(wait_vhci "$VM_STICK_VIDPID" 60); then
  show_attach stick
  fail "no vhci copy of the stick after p2p-usb attach as $P2P_USER"
fi
attach_running stick || { show_attach stick; fail "p2p-usb attach exited"; }
port=$(wait_for 10 "attach message" attached_port stick)
vdev=$(wait_for 60 "block device of vhci $vbusid" usb_blockdev "$vbusid")
b=$(date +%s%N)
log "attached as $P2P_USER: vhci port $port, $vbusid, $vdev"
metric p2p_usb_attach_s "$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')" s
show_attach stick
[ "$(cat "/sys/bus/usb/devices/$vbusid/speed")" = 5000 ] || fail "vhci copy runs at $(cat "/sys/bus/usb/devices/$vbusid/speed") Mb/s, expected 5000"

# The helper took the stick away from the local usb-storage driver.
not usb_blockdev "$stick" || fail "$native still there while the stick is attached remotely"
p2p-usb status | indent "status"
as_tester p2p-usb status | has "$port" || fail "p2p-usb status does not show port $port"
p2p-usb-agent clients | indent "clients"
p2p-usb-agent clients | has "$(p2p_client_id)" || fail "agent does not list the client as connected"

# --- every byte through the stack ---
a=$(date +%s%N)
expect_stick_sha256 "$vdev"
b=$(date +%s%N)
metric p2p_usb_sha256_read_mib_s "$(_mib_s "$VM_STICK_SIZE" "$a" "$b")" MiB/s

# --- write a scratch region through the stack, read it back through the stack ---
orig=$(mktemp) data=$(mktemp)
on_exit rm -f "$orig" "$data"
dd if="$vdev" of="$orig" bs=1M skip=$SCRATCH_MIB count=1 iflag=direct status=none
# Whatever happens below, the stick gets its original bytes back (later scenarios
# compare it with the host's image).
restore_scratch() {
  p2p_attach_kill stick
  local dev
  dev=$(stick_home) || { echo "cleanup: cannot restore the scratch region: no local block device" >&2; return; }
  dd if="$orig" of="$dev" bs=1M seek=$SCRATCH_MIB count=1 oflag=direct conv=fsync,notrunc status=none
}
on_exit restore_scratch
head -c 1048576 /dev/urandom >"$data"
dd if="$data" of="$vdev" bs=1M seek=$SCRATCH_MIB count=1 oflag=direct conv=fsync,notrunc status=none
want=$(sha256sum <"$data" | cut -d' ' -f1)
got=$(dd if="$vdev" bs=1M skip=$SCRATCH_MIB count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "scratch region read back through the stack differs"
log "wrote 1 MiB at ${SCRATCH_MIB} MiB through the stack; read back identical"

# --- detach: SIGTERM to p2p-usb attach ---
p2p_detach stick 30
wait_no_vhci "$VM_STICK_VIDPID" 30
show_attach stick
grep -q "^detached " "$(attach_log stick)" || fail "p2p-usb attach did not report the detach"
rc=0
wait "$(attach_pid stick)" 2>/dev/null || rc=$?
log "p2p-usb attach exited (status ${rc})"
if p2p-usb status | has "^$port "; then fail "port $port still shown after detach"; fi

# --- the stick is back on usb-storage, with what was written through the stack ---
wait_for 30 "$stick bound to usb again" bound_to "$stick" usb
native=$(wait_for 30 "block device of $stick after detach" usb_blockdev "$stick")
drv=$(basename "$(readlink -f "/sys/bus/usb/devices/$stick/$stick:1.0/driver")")
[ "$drv" = usb-storage ] || fail "interface of $stick bound to '$drv', expected usb-storage"
got=$(dd if="$native" bs=1M skip=$SCRATCH_MIB count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "the real device ($native) does not hold what was written through the stack"
log "real device $native holds the scratch data; interface back on $drv"

# Put the original bytes back: the other scenarios compare against the host image.
dd if="$orig" of="$native" bs=1M seek=$SCRATCH_MIB count=1 oflag=direct conv=fsync,notrunc status=none
expect_stick_sha256 "$native"

dmesg_since /run/vmtest-20.dmesg | indent "dmesg"
if dmesg_since /run/vmtest-20.dmesg | grep -E 'vhci_hcd.*(unknown pdu|cannot find urb|invalid)|usbip.*error' >/dev/null; then
  fail "kernel USB/IP errors during the scenario"
fi
