#!/bin/bash
# vm-timeout: 240
# The helper's usbfs backend on a real device, driven directly over the helper socket
# (`usbfs-probe`, as the agent's user): on the usb-kbd's interrupt IN endpoint, which
# answers NAK until a key is pressed, a transfer with a timeout ends `Timeout` in time,
# also behind three waiting transfers without one (they are cancelled with the endpoint's
# queue and resubmitted, so they keep waiting); two of them are then cancelled, and the
# third still delivers the report of a key pressed afterwards.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup
probe="$P2P_USB_BIN_DIR/usbfs-probe"
[ -x "$probe" ] || skip "no usbfs-probe in the payload"
journal_mark /run/vmtest-35.since

kbd=$(wait_for 30 "usb-kbd $VM_KBD_VIDPID" usb_busid "$VM_KBD_VIDPID")
wait_for 30 "usbhid on $kbd" usb_event "$kbd" >/dev/null
out="$VM_OUT/usbfs-probe.log"
: >"$out"
(exec setpriv --reuid=p2p-usb --regid=p2p-usb --init-groups -- \
  "$probe" /run/p2p-usb/helper.sock "$VM_KBD_VIDPID") >"$out" 2>&1 </dev/null &
pid=$!
on_exit "kill $pid 2>/dev/null || true; indent probe <'$out'"
wait_for 60 "usbfs-probe to wait for a key press" grep -q "^waiting for a key press$" "$out"
vmctl sendkey a
rc=0
wait "$pid" || rc=$?
[ "$rc" = 0 ] || fail "usbfs-probe failed (exit $rc)"
[ "$(grep -c '^ok: ' "$out")" = 5 ] || fail "usbfs-probe passed $(grep -c '^ok: ' "$out") checks, expected 5"

# Closing the probe's link gives the keyboard back to usbhid.
wait_for 30 "event device of $kbd back on usbhid" usb_event "$kbd" >/dev/null
errs=$(journal_since /run/vmtest-35.since -u p2p-usb-helper.service -p warning || true)
if [ -n "$errs" ]; then
  indent journal <<<"$errs"
  fail "the helper logged warnings or errors"
fi
log "usbfs: timeouts, resubmission behind a timeout, cancels and a late report on $kbd"
