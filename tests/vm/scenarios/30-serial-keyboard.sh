#!/bin/bash
# vm-timeout: 400
# Interrupt and bulk endpoints of non-storage devices through the whole stack:
# the FTDI usb-serial (bytes written to the attached /dev/ttyUSB* reach QEMU's chardev
# on the host; detached with `p2p-usb detach PORT`) and the usb-kbd (its interrupt IN
# endpoint stays polled through the stack; keys injected into QEMU arrive as input
# events on the attached copy).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup
dmesg_mark /run/vmtest-30.dmesg
journal_mark /run/vmtest-30.since

# --- usb-serial ---
serial=$(wait_for 30 "usb-serial $VM_SERIAL_VIDPID" usb_busid "$VM_SERIAL_VIDPID")
p2p_attach serial "$P2P_USER" "$serial"
vserial=$(wait_vhci "$VM_SERIAL_VIDPID" 60) || { show_attach serial; fail "no vhci copy of the serial adapter"; }
vtty=$(wait_for 30 "ttyUSB of vhci $vserial (ftdi_sio)" usb_tty "$vserial") || { show_attach serial; fail "no tty on the attached serial adapter"; }
log "serial $serial attached as $vserial, $vtty"
not usb_tty "$serial" || fail "the local ttyUSB of $serial still exists while attached remotely"

vmctl clear-serial
stty -F "$vtty" raw -echo 115200
msg="p2p-usb through the stack $RANDOM$RANDOM"
printf '%s\n' "$msg" >"$vtty"
serial_has() { vmctl read-serial | has -F "$1"; }
wait_for 20 "'$msg' in QEMU's serial chardev" serial_has "$msg"
# A bigger burst: 64 KiB in one go, compared byte for byte.
vmctl clear-serial
burst=$(mktemp)
on_exit rm -f "$burst"
head -c 49152 /dev/urandom | base64 -w 0 | head -c 65536 >"$burst"
cat "$burst" >"$vtty"
serial_size() { [ "$(vmctl read-serial | wc -c)" -ge 65536 ]; }
wait_for 60 "64 KiB in QEMU's serial chardev" serial_size
[ "$(vmctl read-serial | head -c 65536 | sha256sum)" = "$(sha256sum <"$burst")" ] || fail "64 KiB burst arrived altered"
log "serial: line and 64 KiB burst arrived in QEMU's chardev intact"

# Detached the documented way: `p2p-usb detach PORT` by the user, from another shell.
port=$(attached_port serial) || { show_attach serial; fail "no vhci port in the serial attach log"; }
as_tester p2p-usb detach "$port" | has -x "detached vhci port $port" || fail "p2p-usb detach $port failed"
wait_for 30 "p2p-usb attach (serial) to end after p2p-usb detach" not attach_running serial ||
  { show_attach serial; fail "the attach process kept running after p2p-usb detach"; }
grep -q "^detached .* from vhci port $port$" "$(attach_log serial)" ||
  { show_attach serial; fail "the attach process did not report the detach"; }
wait_no_vhci "$VM_SERIAL_VIDPID" 30
wait_for 30 "ttyUSB of $serial back locally" usb_tty "$serial" >/dev/null
log "serial detached; $(usb_tty "$serial") back on ftdi_sio"

# --- usb-kbd ---
kbd=$(wait_for 30 "usb-kbd $VM_KBD_VIDPID" usb_busid "$VM_KBD_VIDPID")
p2p_attach kbd "$P2P_USER" "$kbd"
vkbd=$(wait_vhci "$VM_KBD_VIDPID" 60) || { show_attach kbd; fail "no vhci copy of the keyboard"; }
vevent=$(wait_for 30 "input event device of vhci $vkbd (usbhid)" usb_event "$vkbd") || { show_attach kbd; fail "no input device on the attached keyboard"; }
log "keyboard $kbd attached as $vkbd, $vevent"
not usb_event "$kbd" || fail "the local event device of $kbd still exists while attached remotely"

# 70-p2p-usb-vhci.rules keeps attached devices from autosuspending (remote wakeup
# cannot cross USB/IP; a suspended keyboard would never send a key again).
pc=$(cat "/sys/bus/usb/devices/$vkbd/power/control")
[ "$pc" = on ] || fail "attached keyboard has power/control=$pc, expected on (70-p2p-usb-vhci.rules)"
# Idle for a while: the interrupt IN URBs stay pending; nothing may fail or time out.
sleep 5
rs=$(cat "/sys/bus/usb/devices/$vkbd/power/runtime_status")
[ "$rs" = active ] || fail "attached keyboard is $rs after 5 s idle"
attach_running kbd || { show_attach kbd; fail "p2p-usb attach of the keyboard exited while idle"; }

# KEY_A = 30, KEY_B = 48, KEY_ENTER = 28 (type EV_KEY = 1); 24-byte input_event.
key_events() {
  local tmp rc=0
  tmp=$(mktemp)
  timeout 20 dd if="$vevent" of="$tmp" bs=24 count=18 status=none &
  sleep 1
  vmctl sendkey a b ret
  wait $! || true
  od -An -v -tu2 -w24 "$tmp" | awk '$9 == 1 { c[$10 " " $11]++ } END {
    exit !(c["30 1"] && c["30 0"] && c["48 1"] && c["48 0"] && c["28 1"] && c["28 0"]) }' || rc=1
  od -An -v -tu2 -w24 "$tmp" | awk '$9 == 1 { printf "    key event: code %d value %d\n", $10, $11 }'
  rm -f "$tmp"
  return "$rc"
}
key_events || { show_attach kbd; fail "no press/release of a, b, enter on $vevent after vmctl sendkey"; }
log "keyboard: sendkey a b ret -> press and release events on $vevent through the stack"
key_events || fail "second round of keys lost"
attach_running kbd || { show_attach kbd; fail "p2p-usb attach of the keyboard exited"; }

p2p_detach kbd 30
wait_no_vhci "$VM_KBD_VIDPID" 30
wait_for 30 "event device of $kbd back locally" usb_event "$kbd" >/dev/null
log "keyboard detached; $(usb_event "$kbd") back on usbhid"

# Errors on the way: the helper and agent must not have logged transfer failures, and
# the kernel no USB/IP trouble.
dmesg_since /run/vmtest-30.dmesg | indent "dmesg"
if dmesg_since /run/vmtest-30.dmesg | grep -E 'vhci_hcd.*(unknown pdu|cannot find urb)|usbhid.*(error|failed)|ftdi_sio.*(error|failed)' >/dev/null; then
  fail "kernel errors for the attached devices"
fi
errs=$(journal_since /run/vmtest-30.since -u p2p-usb-helper.service -u p2p-usb-agent.service -p warning || true)
if [ -n "$errs" ]; then
  indent "journal" <<<"$errs"
  fail "helper or agent logged warnings or errors during serial/keyboard use"
fi
