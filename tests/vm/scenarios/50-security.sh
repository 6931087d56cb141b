#!/bin/bash
# vm-timeout: 400
# Trust boundaries on the real system:
#  - a local user outside the allowed groups cannot connect to the helper socket
#    (file system) nor use the agent's control socket (SO_PEERCRED);
#  - a user who gets through the socket's file permissions (group p2p-usb) but is not
#    in the helper's allowed_users is refused by the helper's own peer check;
#  - an unapproved client node (a second client key) cannot list devices and shows up
#    in `p2p-usb-agent pending`; after `approve` it can; `revoke` cuts it off, also a
#    running attach.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup
journal_mark /run/vmtest-50.since

# --- local users and the helper socket ---
sock=/run/p2p-usb/helper.sock
stat -c '    %A %U:%G %n' /run/p2p-usb "$sock"
id "$P2P_OUTSIDER" | indent outsider
out=$(as_user "$P2P_OUTSIDER" timeout 5 nc -U "$sock" </dev/null 2>&1) && fail "outsider connected to $sock: $out"
log "outsider -> helper socket: $out"
echo "$out" | has "Permission denied" || fail "outsider's connect failed, but not with EACCES: $out"
rc=0
out=$(as_user "$P2P_OUTSIDER" p2p-usb-agent devices 2>&1) || rc=$?
log "outsider: p2p-usb-agent devices -> exit $rc: $out"
[ "$rc" != 0 ] || fail "outsider could list devices: $out"
echo "$out" | has -w "$VM_STICK_VIDPID" && fail "outsider saw the stick"
rc=0
out=$(as_user "$P2P_OUTSIDER" p2p-usb-agent pending 2>&1) || rc=$?
log "outsider: p2p-usb-agent pending -> exit $rc: $out"
[ "$rc" != 0 ] || fail "outsider could use the control socket"
rc=0
out=$(as_user "$P2P_OUTSIDER" p2p-usb-agent approve "$(printf '%064d' 0)" 2>&1) || rc=$?
[ "$rc" != 0 ] || fail "outsider could approve a client: $out"

# A member of the socket's group (p2p-usb) who is not the agent's user: the file system
# lets the connect through, the helper's SO_PEERCRED check must not.
sneaky=p2p-sneaky
id "$sneaky" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash --groups p2p-usb "$sneaky"
rc=0
out=$(as_user "$sneaky" p2p-usb-agent --control-socket /nonexistent devices 2>&1) || rc=$?
log "group-p2p-usb user: p2p-usb-agent devices (helper directly) -> exit $rc: $out"
[ "$rc" != 0 ] || fail "a non-agent user in group p2p-usb listed devices through the helper: $out"
echo "$out" | has -w "$VM_STICK_VIDPID" && fail "the helper answered a user outside allowed_users"
helper_refused() { journal_since /run/vmtest-50.since -u p2p-usb-helper.service | grep -i "rejected peer"; }
wait_for 10 "the helper to log its refusal of uid $(id -u "$sneaky")" helper_refused | indent journal

# --- a second client node, unknown to the server ---
home=$(user_home "$P2P_USER")
c2=$home/.config/p2p-usb/client2.toml
p2p_client_toml "$(server_id)" "$home/.local/share/p2p-usb/client2.key" | write_user_file "$P2P_USER" "$c2"
id2=$(as_tester p2p-usb --config "$c2" id)
[[ $id2 =~ ^[0-9a-f]{64}$ ]] || fail "second client id '$id2'"
[ "$id2" != "$(p2p_client_id)" ] || fail "second key has the same id as the first"
log "second client node $id2"
if p2p-usb-agent pending | has "$id2"; then fail "new id already pending"; fi

rc=0
out=$(as_tester p2p-usb --config "$c2" list "$P2P_SERVER" 2>&1) || rc=$?
log "unapproved: p2p-usb list -> exit $rc: $out"
[ "$rc" != 0 ] || fail "unapproved client listed devices"
echo "$out" | has -w "$VM_STICK_VIDPID" && fail "unapproved client saw the stick"
echo "$out" | has "p2p-usb-agent approve $id2" || fail "refusal does not tell how to approve: $out"
pending=$(p2p-usb-agent pending)
indent "pending" <<<"$pending"
echo "$pending" | has "^$id2" || fail "unapproved client not in p2p-usb-agent pending"
rc=0
out=$(as_tester p2p-usb --config "$c2" attach "$P2P_SERVER" "$VM_SERIAL_VIDPID" 2>&1) || rc=$?
[ "$rc" != 0 ] || fail "unapproved client could attach"
not vhci_busid "$VM_SERIAL_VIDPID" || fail "unapproved client's attach produced a vhci device"

# --- approve: it can ---
p2p-usb-agent approve "$id2"
if p2p-usb-agent pending | has "^$id2"; then fail "approved client still pending"; fi
listed=$(as_tester p2p-usb --config "$c2" list "$P2P_SERVER") || fail "approved client cannot list: $listed"
echo "$listed" | has -w "$VM_STICK_VIDPID" || fail "approved client does not see the stick"
log "approved: the second client lists $(echo "$listed" | grep -c ':') devices"

# --- revoke: cut off, also in the middle of an attach ---
serial=$(usb_busid "$VM_SERIAL_VIDPID")
p2p_attach revoke "$P2P_USER" "$serial" --config "$c2"
vserial=$(wait_vhci "$VM_SERIAL_VIDPID" 60) || { show_attach revoke; fail "approved second client could not attach"; }
p2p-usb-agent clients | has "$id2" || fail "agent does not list the second client as connected"
log "second client attached the serial adapter as $vserial"
p2p-usb-agent revoke "$id2"
wait_no_vhci "$VM_SERIAL_VIDPID" 30 || { show_attach revoke; fail "revoked client's device still attached"; }
wait_for 30 "revoked client's attach to end" not attach_running revoke || { show_attach revoke; fail "revoked client's attach still running"; }
show_attach revoke
grep -q "p2p-usb-agent approve $id2" "$(attach_log revoke)" || fail "revoked attach did not say it is no longer approved"
if p2p-usb-agent clients | has "$id2"; then fail "revoked client still connected"; fi
rc=0
out=$(as_tester p2p-usb --config "$c2" list "$P2P_SERVER" 2>&1) || rc=$?
[ "$rc" != 0 ] || fail "revoked client can still list: $out"
log "revoked: attach ended, listing refused (exit $rc)"
wait_for 30 "serial adapter back on ftdi_sio" usb_tty "$serial" >/dev/null
# The first client is unaffected.
as_tester p2p-usb list "$P2P_SERVER" | has -w "$VM_STICK_VIDPID" || fail "the approved first client lost access"
