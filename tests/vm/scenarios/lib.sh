# shellcheck shell=bash
# Helpers for VM scenarios. Source it: `. "$(dirname "$0")/lib.sh"`.
# Scenarios run as root in the guest, cwd /payload/scenarios, with /payload/vm.env in
# the environment (VM_STICK_SHA256, VM_STICK_VIDPID, P2P_USB_BIN_DIR, ...) and vmctl in PATH.
set -euo pipefail

# --- reporting -------------------------------------------------------------------------
log() { printf '%s %s\n' "$(date +%T.%3N)" "$*"; }
# stderr: a failure inside $(...) or with stdout redirected must still reach the log.
fail() { echo "FAIL: $*" >&2; exit 1; }
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

# CMD | has [GREP ARGS] PATTERN: like `grep -q`, but reads all its input. grep -q exits
# at the first match, and the writer then dies of SIGPIPE (a Rust CLI panics on
# "Broken pipe"), which pipefail turns into a failed check.
has() { grep "$@" >/dev/null; }

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

# --- p2p-usb: installation, server, clients ----------------------------------------------
# The scenarios 10-60 share one installation per boot. Each calls p2p_setup, which
# installs and configures whatever is missing, so any of them also runs alone.
P2P_USER=p2p-tester          # unprivileged client user, group p2p-usb-attach
P2P_OUTSIDER=p2p-outsider    # a local user in none of the project's groups
P2P_PORT=7777                # the server agent's fixed UDP port on 127.0.0.1
P2P_SERVER=vm                # the server's name in the client's [[servers]]
P2P_SETUP_DONE=/run/p2p-usb-vmtest.setup
# shellcheck disable=SC2034 # used by the scenarios
P2P_UNITS=(p2p-usb-server.target p2p-usb-helper.socket p2p-usb-helper.service p2p-usb-agent.service)

# on_exit CMD...: run CMD when the scenario ends (in reverse order). The exit handler
# also turns a stray exit status 77 (a command that failed with EX_NOPERM under
# set -e) into a failure, so only skip() can skip.
_P2P_ON_EXIT=()
_P2P_SKIPPING=0
on_exit() { _P2P_ON_EXIT=("$*" "${_P2P_ON_EXIT[@]}"); }
_P2P_FAILING=0
_P2P_ERR=""
_p2p_exit() {
  local rc=$? c
  set +e
  trap - ERR
  for c in "${_P2P_ON_EXIT[@]}"; do eval "$c"; done
  if [ "$rc" != 0 ] && [ "$_P2P_FAILING" = 0 ] && [ "$_P2P_SKIPPING" = 0 ]; then
    # set -e ended the scenario: say which command, so the log is never silent.
    echo "FAIL: exit $rc from: ${_P2P_ERR:-unknown command}" >&2
    exit 1
  fi
  exit "$rc"
}
# p2p_traps: the scenario's EXIT handler (on_exit commands, clear failure messages).
# shellcheck disable=SC2317 # skip() and fail() are called by the scenarios
p2p_traps() {
  set -o errtrace
  trap '_P2P_ERR="line $LINENO: $BASH_COMMAND"' ERR
  trap _p2p_exit EXIT
  skip() { _P2P_SKIPPING=1; echo "SKIP: $*"; exit 77; }
  fail() { _P2P_FAILING=1; echo "FAIL: $*" >&2; exit 1; }
}

user_home() { getent passwd "$1" | cut -d: -f6; }
# as_user USER CMD...: run CMD as USER with a login-like environment and USER's groups.
# setpriv execs (no helper process in between), so pids and signals reach CMD itself.
as_user() {
  local u=$1
  shift
  setpriv --reuid="$u" --regid="$u" --init-groups -- env HOME="$(user_home "$u")" USER="$u" LOGNAME="$u" "$@"
}
# as_tester CMD...: run CMD as the client user.
as_tester() { as_user "$P2P_USER" "$@"; }

# main_pid UNIT: the unit's main PID, or fail.
main_pid() {
  local pid
  pid=$(systemctl show -p MainPID --value "$1")
  [ -n "$pid" ] && [ "$pid" != 0 ] || return 1
  echo "$pid"
}
unit_prop() { systemctl show -p "$2" --value "$1"; }
unit_active() { [ "$(unit_prop "$1" ActiveState)" = active ]; }

# proc_field PID FIELD: a line's value from /proc/PID/status (e.g. CapEff, Uid).
proc_field() { awk -v f="$2:" '$1 == f { $1 = ""; sub(/^ /, ""); print; exit }' "/proc/$1/status"; }

# journal_mark FILE / journal_since FILE [journalctl args]: journal entries from the time
# of the mark on. By time, not by cursor: journalctl 252 with --after-cursor plus a
# match (-u, -p) returned nothing for entries that were plainly there.
journal_mark() { date +%s.%6N >"$1"; }
journal_since() {
  local f=$1
  shift
  if [ -s "$f" ]; then
    journalctl --no-pager -q --since "@$(cat "$f")" "$@"
  else
    journalctl --no-pager -q -b "$@"
  fi
}

# Server configuration for the guest: loopback only, no relays, no DNS; the helper
# may open exactly the three emulated devices; auto_share; the given client approved.
p2p_server_toml() {
  cat <<TOML
# Written by the p2p-usb VM tests (tests/vm/scenarios/lib.sh).
[server]
log_level = "${P2P_LOG_LEVEL:-info}"

[usb]
auto_share = true

[security]
approved_clients = ["$1"]
require_approval = true

[[helper.share]]
vid = 0x${VM_STICK_VIDPID%:*}
pid = 0x${VM_STICK_VIDPID#*:}

[[helper.share]]
vid = 0x${VM_KBD_VIDPID%:*}
pid = 0x${VM_KBD_VIDPID#*:}

[[helper.share]]
vid = 0x${VM_SERIAL_VIDPID%:*}
pid = 0x${VM_SERIAL_VIDPID#*:}

[iroh]
relay_mode = "disabled"
bind_addr = "127.0.0.1:$P2P_PORT"
dns_discovery = false
local_discovery = false
TOML
}

# p2p_client_toml [SERVER_ID] [SECRET_KEY]: a client configuration on loopback; with
# SERVER_ID the server is pinned as "$P2P_SERVER" at 127.0.0.1:$P2P_PORT.
p2p_client_toml() {
  cat <<TOML
[client]
log_level = "${P2P_LOG_LEVEL:-info}"
TOML
  if [ -n "${2:-}" ]; then echo "secret_key = \"$2\""; fi
  if [ -n "${1:-}" ]; then
    cat <<TOML

[[servers]]
name = "$P2P_SERVER"
id = "$1"
addrs = ["127.0.0.1:$P2P_PORT"]
TOML
  fi
  cat <<TOML

[iroh]
relay_mode = "disabled"
bind_addr = "127.0.0.1:0"
dns_discovery = false
local_discovery = false
TOML
}

# write_user_file USER PATH: stdin to PATH owned by USER (directories created).
write_user_file() {
  local u=$1 path=$2
  install -d -o "$u" -g "$u" -m 0700 "$(dirname "$path")"
  cat >"$path"
  chown "$u:" "$path"
}

tester_config() { echo "$(user_home "$P2P_USER")/.config/p2p-usb/client.toml"; }

# p2p_install: the project's own install script, both roles, as an admin would run it.
p2p_install() {
  log "install: $P2P_USB_REPO/scripts/install-service.sh --all"
  "$P2P_USB_REPO/scripts/install-service.sh" --all
}

# p2p_users: the client user (in p2p-usb-attach) and an outsider in no project group.
p2p_users() {
  id "$P2P_USER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$P2P_USER"
  usermod -aG p2p-usb-attach "$P2P_USER"
  id "$P2P_OUTSIDER" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$P2P_OUTSIDER"
}

# p2p_client_id: the client user's EndpointId (creates its key on first use).
p2p_client_id() { as_tester p2p-usb id; }

# p2p_configure_server CLIENT_ID: /etc/p2p-usb/server.toml for the guest (root, 0600).
p2p_configure_server() {
  p2p_server_toml "$1" >/etc/p2p-usb/server.toml
  chmod 600 /etc/p2p-usb/server.toml
}

# p2p_wait_ready [SECS]: agent and helper active (READY=1 sent) and the agent
# connected to the helper.
p2p_wait_ready() {
  local secs=${1:-60}
  wait_for "$secs" "p2p-usb-agent.service active" unit_active p2p-usb-agent.service
  wait_for "$secs" "p2p-usb-helper.service active" unit_active p2p-usb-helper.service
  wait_for "$secs" "agent status without 'waiting for helper'" \
    sh -c '! systemctl show -p StatusText --value p2p-usb-agent.service | grep -q "waiting for helper"'
}

server_id() { p2p-usb-agent id; }

# p2p_pin_server: the client user's client.toml pins the running server.
p2p_pin_server() {
  p2p_client_toml "$(server_id)" | write_user_file "$P2P_USER" "$(tester_config)"
}

# p2p_setup: everything above, once per boot (scenario 10 does it step by step).
p2p_setup() {
  [ "$VM_HAVE_BINARIES" = 1 ] || skip "no p2p-usb binaries in the payload"
  if [ -e "$P2P_SETUP_DONE" ]; then
    if ! unit_active p2p-usb-agent.service; then systemctl start p2p-usb-server.target; fi
    p2p_wait_ready 60
    return 0
  fi
  p2p_install >/dev/null
  p2p_users
  p2p_client_toml | write_user_file "$P2P_USER" "$(tester_config)"
  p2p_configure_server "$(p2p_client_id)"
  systemctl enable --now p2p-usb-server.target
  p2p_wait_ready 60
  p2p_pin_server
  touch "$P2P_SETUP_DONE"
}

# --- p2p-usb attach -----------------------------------------------------------------------
# p2p_attach NAME USER DEVICE [p2p-usb options...]: start `p2p-usb attach` in the
# background as USER (root or the tester); its output goes to $VM_OUT/attach-NAME.log,
# its pid to /run/p2p-attach-NAME.pid. Returns at once.
p2p_attach() {
  local name=$1 user=$2 device=$3 log
  shift 3
  log=$(attach_log "$name")
  : >"$log"
  chmod 666 "$log"
  # exec in the subshells: $! must be p2p-usb itself, so signals reach it.
  if [ "$user" = root ]; then
    (exec p2p-usb "$@" attach "$P2P_SERVER" "$device") >>"$log" 2>&1 </dev/null &
  else
    (exec setpriv --reuid="$user" --regid="$user" --init-groups -- \
      env HOME="$(user_home "$user")" USER="$user" LOGNAME="$user" \
      p2p-usb "$@" attach "$P2P_SERVER" "$device") >>"$log" 2>&1 </dev/null &
  fi
  echo $! >"/run/p2p-attach-$name.pid"
  on_exit p2p_attach_kill "$name"
}
attach_log() { echo "$VM_OUT/attach-$1.log"; }
attach_pid() { cat "/run/p2p-attach-$1.pid"; }
attach_running() { kill -0 "$(attach_pid "$1")" 2>/dev/null; }
# attached_port NAME: the vhci port from the attach's "attached ... at vhci port N".
attached_port() { sed -n 's/^attached .* at vhci port \([0-9]*\)$/\1/p' "$(attach_log "$1")" | tail -n 1 | grep .; }

# p2p_detach NAME [SECS]: SIGTERM the attach process (what `systemctl stop` or Ctrl-C
# would do) and wait until it has exited; fails if it does not within SECS.
p2p_detach() {
  local name=$1 secs=${2:-20} pid
  pid=$(attach_pid "$name")
  kill -TERM "$pid" 2>/dev/null || true
  wait_for "$secs" "p2p-usb attach ($name) to exit after SIGTERM" not kill -0 "$pid"
}
p2p_attach_kill() {
  local pid
  pid=$(attach_pid "$1" 2>/dev/null) || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "/run/p2p-attach-$1.pid"
}

# wait_vhci VID:PID [SECS]: bus id of the copy attached through vhci_hcd.
wait_vhci() { wait_for "${2:-60}" "vhci copy of $1" vhci_busid "$1"; }
wait_no_vhci() { wait_for "${2:-30}" "vhci copy of $1 gone" not vhci_busid "$1"; }

# show_attach NAME: the attach log, indented (for failure reports).
show_attach() { indent "attach-$1" <"$(attach_log "$1")" || true; }

# dmesg_mark / dmesg_since: kernel messages after a point (by line count).
dmesg_mark() { dmesg | wc -l >"$1"; }
dmesg_since() { dmesg | tail -n +"$(( $(cat "$1") + 1 ))"; }

# indent LABEL: stdin indented and labelled, for context in scenario logs.
indent() { sed "s/^/    $1: /"; }

# stick_home: make sure the stick's interface is on usb-storage again (cleanup after a
# failed scenario left it without a driver); prints the local block device.
stick_home() {
  local b i
  b=$(usb_busid "$VM_STICK_VIDPID") || return 1
  for i in /sys/bus/usb/devices/"$b":*; do
    if [ -e "$i" ] && [ ! -e "$i/driver" ]; then
      echo "${i##*/}" >/sys/bus/usb/drivers/usb-storage/bind 2>/dev/null || true
    fi
  done
  wait_for 30 "block device of $b" usb_blockdev "$b"
}
