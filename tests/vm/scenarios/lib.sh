# shellcheck shell=bash
# Helpers for VM scenarios. Source it: `. "$(dirname "$0")/lib.sh"`.
# Scenarios run as root in the guest, cwd /payload/scenarios, with /payload/vm.env in
# the environment (VM_STICK_SHA256, VM_STICK_VIDPID, P2P_USB_BIN_DIR, ...) and vmctl in PATH.
set -euo pipefail

# --- reporting -------------------------------------------------------------------------
log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
fail() { echo "FAIL: $*"; exit 1; }
skip() { echo "SKIP: $*"; exit 77; }
# metric NAME VALUE UNIT -> a "METRIC" line the runner copies into the results.
metric() { echo "METRIC $1 $2 $3"; }

# wait_for SECONDS DESCRIPTION CMD [ARGS...]: poll CMD every 0.2 s until it succeeds,
# print its stdout; fail the scenario after SECONDS.
wait_for() {
  local secs=$1 desc=$2 out end
  shift 2
  end=$(($(date +%s) + secs))
  while :; do
    if out=$("$@" 2>/dev/null); then
      [ -z "$out" ] || printf '%s\n' "$out"
      return 0
    fi
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${secs}s waiting for: $desc"
    sleep 0.2
  done
}

# not CMD...: succeeds when CMD fails (for wait_for).
not() { ! "$@" >/dev/null 2>&1; }

# --- USB devices in sysfs ---------------------------------------------------------------
# usb_busids VID:PID: bus ids (e.g. 2-1) of every device with that id, one a line.
usb_busids() {
  local d vid=${1%:*} pid=${1#*:}
  for d in /sys/bus/usb/devices/*; do
    [ -f "$d/idVendor" ] || continue
    if [ "$(cat "$d/idVendor")" = "$vid" ] && [ "$(cat "$d/idProduct")" = "$pid" ]; then
      echo "${d##*/}"
    fi
  done
}

# is_vhci BUSID: the device hangs off a vhci_hcd (i.e. it was attached over USB/IP).
is_vhci() { [[ $(readlink -f "/sys/bus/usb/devices/$1") == */vhci_hcd.* ]]; }

# usb_busid VID:PID: the emulated (non-vhci) device's bus id; fails if absent.
usb_busid() {
  local b
  for b in $(usb_busids "$1"); do
    if ! is_vhci "$b"; then echo "$b"; return 0; fi
  done
  return 1
}

# vhci_busid VID:PID: bus id of the copy of that device attached through vhci_hcd.
vhci_busid() {
  local b
  for b in $(usb_busids "$1"); do
    if is_vhci "$b"; then echo "$b"; return 0; fi
  done
  return 1
}

# usb_driver BUSID: driver bound to the device itself (usb, usbip-host) or "none".
usb_driver() {
  local l
  l=$(readlink "/sys/bus/usb/devices/$1/driver" 2>/dev/null) || { echo none; return 0; }
  echo "${l##*/}"
}

# bound_to BUSID DRIVER: the device is bound to DRIVER.
bound_to() { [ "$(usb_driver "$1")" = "$2" ]; }

# usb_blockdev BUSID: /dev/sdX of a usb-storage device; fails until the disk is there.
usb_blockdev() {
  local b
  for b in /sys/bus/usb/devices/"$1"/"$1":*/host*/target*/*/block/*; do
    if [ -e "$b" ] && [ -b "/dev/${b##*/}" ]; then echo "/dev/${b##*/}"; return 0; fi
  done
  return 1
}

# usb_tty BUSID: /dev/ttyUSBn of a usb-serial device.
usb_tty() {
  local t
  for t in /sys/bus/usb/devices/"$1"/"$1":*/ttyUSB*; do
    if [ -e "$t" ] && [ -c "/dev/${t##*/}" ]; then echo "/dev/${t##*/}"; return 0; fi
  done
  return 1
}

# usb_event BUSID: /dev/input/eventN of a USB HID device.
usb_event() {
  local e
  for e in /sys/bus/usb/devices/"$1"/"$1":*/*/input/input*/event*; do
    if [ -e "$e" ] && [ -c "/dev/input/${e##*/}" ]; then echo "/dev/input/${e##*/}"; return 0; fi
  done
  return 1
}

# --- block device data and throughput ----------------------------------------------------
# blockdev_sha256 DEV: sha256 of the whole device, read with O_DIRECT (no page cache).
blockdev_sha256() {
  dd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1
}

# expect_stick_sha256 DEV: the device holds exactly the host's stick image.
expect_stick_sha256() {
  local got
  got=$(blockdev_sha256 "$1")
  [ "$got" = "$VM_STICK_SHA256" ] || fail "sha256 of $1 is $got, expected $VM_STICK_SHA256"
  log "sha256 of $1 matches the host's image"
}

# _mib_s BYTES START_NS END_NS -> MiB/s with one decimal.
_mib_s() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.1f", n / 1048576 / ((b - a) / 1e9) }'; }

# read_mib_s DEV MIB [SKIP_MIB]: cold-cache O_DIRECT read throughput in MiB/s.
read_mib_s() {
  local dev=$1 mib=$2 skip=${3:-0} a b
  sync
  echo 3 >/proc/sys/vm/drop_caches
  a=$(date +%s%N)
  dd if="$dev" of=/dev/null bs=1M count="$mib" skip="$skip" iflag=direct status=none
  b=$(date +%s%N)
  _mib_s $((mib * 1048576)) "$a" "$b"
}

# read_buffered_mib_s DEV MIB [SKIP_MIB]: cold-cache read through the page cache
# (readahead decides the request sizes) in MiB/s.
read_buffered_mib_s() {
  local dev=$1 mib=$2 skip=${3:-0} a b
  sync
  echo 3 >/proc/sys/vm/drop_caches
  a=$(date +%s%N)
  dd if="$dev" of=/dev/null bs=1M count="$mib" skip="$skip" status=none
  b=$(date +%s%N)
  _mib_s $((mib * 1048576)) "$a" "$b"
}

# write_mib_s DEV MIB SKIP_MIB: O_DIRECT write throughput in MiB/s. Writes back the
# bytes already there, so the device content (and its sha256) does not change.
write_mib_s() {
  local dev=$1 mib=$2 skip=$3 tmp a b
  tmp=$(mktemp)
  dd if="$dev" of="$tmp" bs=1M count="$mib" skip="$skip" iflag=direct status=none
  a=$(date +%s%N)
  dd if="$tmp" of="$dev" bs=1M count="$mib" seek="$skip" oflag=direct conv=fsync,notrunc status=none
  b=$(date +%s%N)
  rm -f "$tmp"
  _mib_s $((mib * 1048576)) "$a" "$b"
}

# measure METRIC FUNC DEV MIB OFFSET...: FUNC DEV MIB OFFSET (read_mib_s, ...) once per
# offset; logs the samples and emits METRIC as their median, in MiB/s.
measure() {
  local name=$1 fn=$2 dev=$3 mib=$4 o samples=()
  shift 4
  for o in "$@"; do samples+=("$("$fn" "$dev" "$mib" "$o")"); done
  log "$name samples (MiB/s): ${samples[*]}"
  metric "$name" "$(median "${samples[@]}")" MiB/s
}

# median V1 V2 ...: median of numbers.
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- the kernel's own USB/IP on loopback (usbip-host + usbipd + vhci_hcd) ---------------
KUSBIPD_PID=/run/vmtest-usbipd.pid
kusbipd_running() { [ -s "$KUSBIPD_PID" ] && kill -0 "$(cat "$KUSBIPD_PID")" 2>/dev/null; }

kusbip_setup() {
  ip link set lo up
  mkdir -p /run/vhci_hcd # else `usbip attach` prints "error: record connection"
  modprobe usbip-host
  modprobe vhci-hcd
  if ! kusbipd_running; then usbipd -D --pid="$KUSBIPD_PID"; fi
  wait_for 10 "usbipd listening on 3240" sh -c 'ss -Htln "sport = :3240" | grep -q .'
}

# kusbip_bind BUSID: hand the device to usbip-host (usb-storage lets go of it).
kusbip_bind() {
  usbip bind -b "$1" >/dev/null
  wait_for 10 "$1 bound to usbip-host" bound_to "$1" usbip-host
}

# kusbip_attach BUSID [HOST]: attach through vhci_hcd, print the vhci port number.
kusbip_attach() {
  local busid=$1 host=${2:-127.0.0.1}
  usbip attach -r "$host" -b "$busid" >/dev/null
  wait_for 10 "vhci port for $busid" kusbip_port "$busid"
}

# kusbip_port BUSID: vhci port number of an attached remote BUSID (from `usbip port`).
kusbip_port() {
  usbip port 2>/dev/null | awk -v b="$1" '
    /^Port [0-9]+:/ { p = $2; sub(":", "", p); p += 0 }
    index($0, "usbip://") && $NF ~ ("/" b "$") { print p; found = 1; exit }
    END { exit !found }'
}

kusbip_detach() { usbip detach -p "$1" >/dev/null; }
kusbip_unbind() { usbip unbind -b "$1" >/dev/null; }

# kusbip_cleanup: detach every vhci port, unbind every usbip-host device, stop usbipd.
# Safe to call at any point (traps).
kusbip_cleanup() {
  local p d
  for p in $(usbip port 2>/dev/null | sed -n 's/^Port \([0-9]*\):.*/\1/p'); do
    usbip detach -p "$((10#$p))" >/dev/null 2>&1 || true
  done
  for d in /sys/bus/usb/drivers/usbip-host/[0-9]*; do
    if [ -e "$d" ]; then usbip unbind -b "${d##*/}" >/dev/null 2>&1 || true; fi
  done
  if kusbipd_running; then kill "$(cat "$KUSBIPD_PID")"; fi
  rm -f "$KUSBIPD_PID"
}
