#!/bin/bash
# vm-timeout: 180
# Harness self-test: the emulated USB devices enumerate with their drivers, udev runs,
# and every control-channel command does what it says (serial bytes reach QEMU's
# chardev file, sendkey produces key events, unplug/plug really remove/add devices).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# --- devices and drivers ---
stick=$(wait_for 30 "usb-storage $VM_STICK_VIDPID" usb_busid "$VM_STICK_VIDPID")
kbd=$(wait_for 30 "usb-kbd $VM_KBD_VIDPID" usb_busid "$VM_KBD_VIDPID")
serial=$(wait_for 30 "usb-serial $VM_SERIAL_VIDPID" usb_busid "$VM_SERIAL_VIDPID")
lsusb
disk=$(wait_for 30 "block device of $stick" usb_blockdev "$stick")
tty=$(wait_for 30 "ttyUSB of $serial (ftdi_sio)" usb_tty "$serial")
event=$(wait_for 30 "input event device of $kbd (usbhid)" usb_event "$kbd")
log "stick $stick=$disk keyboard $kbd=$event serial $serial=$tty"
[ "$(blockdev --getsize64 "$disk")" = "$VM_STICK_SIZE" ] || fail "$disk size is not $VM_STICK_SIZE"

# --- udev ---
systemctl is-active --quiet systemd-udevd || fail "systemd-udevd is not active"
udevadm control --ping || fail "udevd does not answer"
# The block device can appear before udevd has run its rules for it.
udev_says_usb() { udevadm info --query=property --name="$1" | has '^ID_BUS=usb'; }
wait_for 30 "udev to give $disk ID_BUS=usb" udev_says_usb "$disk"

# --- control channel ---
[ "$(vmctl ping)" = pong ] || fail "vmctl ping"
if vmctl unplug no-such-device 2>/dev/null; then fail "vmctl accepted an unknown device"; fi
[ "$(vmctl devices | tr '\n' ' ')" = "kbd serial stick " ] || fail "vmctl devices: $(vmctl devices)"

# --- usb-serial: guest writes, bytes land in QEMU's chardev file on the host ---
vmctl clear-serial
stty -F "$tty" raw -echo 115200
msg="p2p-usb serial check $RANDOM$RANDOM"
printf '%s' "$msg" >"$tty"
serial_has() { vmctl read-serial | grep -qF "$msg"; }
wait_for 10 "'$msg' in QEMU's serial file" serial_has
log "serial: host received '$msg'"

# --- usb-kbd: host sendkey -> EV_KEY KEY_A (type 1, code 30) on the keyboard's evdev ---
# input_event is 24 bytes on x86_64: 16 time, u16 type, u16 code, s32 value.
key_events() {
  local tmp rc=0
  tmp=$(mktemp)
  timeout 10 dd if="$event" of="$tmp" bs=24 count=6 status=none &
  sleep 0.5
  vmctl sendkey a
  wait $! || true
  od -An -v -tu2 -w24 "$tmp" | awk '$9 == 1 && $10 == 30 { n++ } END { exit n < 2 }' || rc=1
  rm -f "$tmp"
  return "$rc"
}
key_events || fail "no KEY_A press/release on $event after vmctl sendkey a"
log "keyboard: sendkey a -> KEY_A press and release on $event"

# --- unplug/plug: the keyboard disappears and comes back ---
vmctl unplug kbd
wait_for 10 "keyboard gone after unplug" not usb_busid "$VM_KBD_VIDPID"
wait_for 10 "$event removed" not test -e "$event"
vmctl plug kbd
kbd=$(wait_for 20 "keyboard back after plug" usb_busid "$VM_KBD_VIDPID")
event=$(wait_for 20 "keyboard event device back" usb_event "$kbd")
key_events || fail "no key events from the re-plugged keyboard"
log "keyboard: unplug/plug ok, now $kbd=$event"

# --- the stick too: it comes back with the same content ---
vmctl unplug stick
wait_for 10 "stick gone after unplug" not usb_busid "$VM_STICK_VIDPID"
vmctl plug stick
stick=$(wait_for 20 "stick back after plug" usb_busid "$VM_STICK_VIDPID")
disk=$(wait_for 30 "block device of re-plugged $stick" usb_blockdev "$stick")
expect_stick_sha256 "$disk"
log "stick: unplug/plug ok, now $stick=$disk"
