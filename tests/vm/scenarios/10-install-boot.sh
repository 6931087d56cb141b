#!/bin/bash
# vm-timeout: 300
# Install as a user would (scripts/install-service.sh), configure for the guest, enable
# p2p-usb-server.target under the real systemd, and check what the units promise:
# socket activation of the helper by the agent, READY and STATUS for both, non-root
# users with no capabilities, udev's group on the USB device nodes, the three emulated
# devices listed by the agent and offered to an approved client; and a second instance
# (p2p-usb-server@lab.target) beside the first.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
[ "$VM_HAVE_BINARIES" = 1 ] || skip "no p2p-usb binaries in the payload"
[ ! -e "$P2P_SETUP_DONE" ] || skip "already installed in this boot (run 10 first)"

# --- install, exactly as docs/SYSTEMD.md says ---
out=$(p2p_install 2>&1) || { echo "$out"; fail "install-service.sh --all failed"; }
indent "install" <<<"$out"
for f in /usr/local/bin/p2p-usb-helper /usr/local/bin/p2p-usb-agent /usr/local/bin/p2p-usb \
  /etc/systemd/system/p2p-usb-server.target /etc/systemd/system/p2p-usb-helper.socket \
  /etc/systemd/system/p2p-usb-helper.service /etc/systemd/system/p2p-usb-agent.service \
  /etc/udev/rules.d/70-p2p-usb-helper.rules /etc/udev/rules.d/70-p2p-usb-vhci.rules \
  /etc/p2p-usb/server.toml /etc/p2p-usb/client.toml; do
  [ -e "$f" ] || fail "install did not create $f"
done
for u in p2p-usb-helper p2p-usb; do id "$u" >/dev/null || fail "user $u missing after install"; done
id -nG p2p-usb-helper | has -w usb-proxy || fail "p2p-usb-helper is not in usb-proxy: $(id p2p-usb-helper)"
for g in usb-proxy p2p-usb-admin p2p-usb-attach; do getent group "$g" >/dev/null || fail "group $g missing"; done
[ "$(stat -c '%U:%G %a' /run/p2p-usb)" = "root:p2p-usb 750" ] || fail "/run/p2p-usb is $(stat -c '%U:%G %a' /run/p2p-usb)"
# Nothing is enabled or started by the install.
for u in p2p-usb-server.target p2p-usb-helper.socket p2p-usb-agent.service; do
  [ "$(systemctl is-enabled "$u" 2>/dev/null || true)" = disabled ] || fail "$u is $(systemctl is-enabled "$u" 2>&1) right after install"
done
unit_active p2p-usb-helper.service && fail "helper runs before anything was enabled"

# --- the udev rule: group usb-proxy, 0660 on the device nodes of the three devices ---
for vp in "$VM_STICK_VIDPID" "$VM_KBD_VIDPID" "$VM_SERIAL_VIDPID"; do
  b=$(wait_for 30 "device $vp" usb_busid "$vp")
  node=$(printf '/dev/bus/usb/%03d/%03d' "$(cat "/sys/bus/usb/devices/$b/busnum")" "$(cat "/sys/bus/usb/devices/$b/devnum")")
  perm=$(stat -c '%G %a' "$node")
  [ "$perm" = "usb-proxy 660" ] || fail "$node ($vp) is '$perm', expected 'usb-proxy 660'"
  log "udev: $node ($vp) group usb-proxy, mode 660"
done

# --- users, client key, server configuration ---
p2p_users
p2p_client_toml | write_user_file "$P2P_USER" "$(tester_config)"
client_id=$(p2p_client_id)
[[ $client_id =~ ^[0-9a-f]{64}$ ]] || fail "p2p-usb id printed '$client_id'"
key=$(user_home "$P2P_USER")/.local/share/p2p-usb/client.key
[ -f "$key" ] || fail "client key not at $key"
[ "$(stat -c '%U %a' "$key")" = "$P2P_USER 600" ] || fail "client key is $(stat -c '%U %a' "$key")"
[ "$(p2p_client_id)" = "$client_id" ] || fail "client id not stable across runs"
log "client $P2P_USER has id $client_id"
p2p_configure_server "$client_id"

# --- enable and start the pair ---
journal_mark /run/vmtest-10.since
t0=$(date +%s%N)
systemctl enable --now p2p-usb-server.target
p2p_wait_ready 60
t1=$(date +%s%N)
metric p2p_server_start_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')" s
for u in p2p-usb-server.target p2p-usb-helper.socket p2p-usb-agent.service; do
  [ "$(systemctl is-enabled "$u")" = enabled ] || fail "$u is $(systemctl is-enabled "$u") after enable"
done
for u in "${P2P_UNITS[@]}"; do
  unit_active "$u" || fail "$u is $(unit_prop "$u" ActiveState)/$(unit_prop "$u" SubState)"
done

# Socket activation: the helper has no [Install] and nothing but its socket starts it;
# it started after the agent (which is ordered after it), so the agent's connect did.
[ "$(unit_prop p2p-usb-helper.service TriggeredBy)" = p2p-usb-helper.socket ] ||
  fail "helper TriggeredBy=$(unit_prop p2p-usb-helper.service TriggeredBy)"
agent_start=$(unit_prop p2p-usb-agent.service ExecMainStartTimestampMonotonic)
helper_start=$(unit_prop p2p-usb-helper.service ExecMainStartTimestampMonotonic)
[ "$helper_start" -gt "$agent_start" ] ||
  fail "helper started at ${helper_start}us, not after the agent (${agent_start}us): not socket-activated by it"
log "helper socket-activated $(( (helper_start - agent_start) / 1000 )) ms after the agent started"
journal_since /run/vmtest-10.since -u p2p-usb-helper.socket -u p2p-usb-helper.service -u p2p-usb-agent.service | tail -n 40 | indent "journal"

# READY (Type=notify: active means READY=1 arrived) and STATUS for both.
for u in p2p-usb-helper.service p2p-usb-agent.service; do
  [ "$(unit_prop "$u" Type)" = notify ] || fail "$u is not Type=notify"
  st=$(unit_prop "$u" StatusText)
  [ -n "$st" ] || fail "$u sent no STATUS="
  systemctl status --no-pager "$u" | grep -F "Status: \"$st\"" >/dev/null ||
    fail "systemctl status $u does not show its status '$st'"
  log "$u: READY, Status: \"$st\""
done
unit_prop p2p-usb-agent.service StatusText | has "NodeId $(server_id)" ||
  fail "agent status does not name its NodeId: $(unit_prop p2p-usb-agent.service StatusText)"
agent_shares_3() { unit_prop p2p-usb-agent.service StatusText | has "3 devices shared"; }
wait_for 15 "agent status showing 3 shared devices (now: $(unit_prop p2p-usb-agent.service StatusText))" agent_shares_3
[ "$(unit_prop p2p-usb-helper.service WatchdogUSec)" != 0 ] || fail "helper has no watchdog"
[ "$(unit_prop p2p-usb-agent.service WatchdogUSec)" != 0 ] || fail "agent has no watchdog"

# Non-root users, no capabilities; the helper holds usb-proxy, the agent does not.
for pair in p2p-usb-helper.service:p2p-usb-helper p2p-usb-agent.service:p2p-usb; do
  u=${pair%%:*} user=${pair#*:}
  pid=$(main_pid "$u") || fail "$u has no main pid"
  uid=$(id -u "$user")
  read -r ruid euid _ <<<"$(proc_field "$pid" Uid)"
  [ "$ruid:$euid" = "$uid:$uid" ] || fail "$u (pid $pid) runs as uid $ruid/$euid, expected $user ($uid)"
  for c in CapInh CapPrm CapEff CapBnd CapAmb; do
    [ "$(proc_field "$pid" "$c")" = 0000000000000000 ] || fail "$u $c=$(proc_field "$pid" "$c")"
  done
  [ "$(proc_field "$pid" NoNewPrivs)" = 1 ] || fail "$u has NoNewPrivs=$(proc_field "$pid" NoNewPrivs)"
  log "$u: pid $pid uid $uid ($user), groups [$(proc_field "$pid" Groups)], CapEff 0, NoNewPrivs 1"
done
proxy_gid=$(getent group usb-proxy | cut -d: -f3)
helper_groups=" $(proc_field "$(main_pid p2p-usb-helper.service)" Groups) "
agent_groups=" $(proc_field "$(main_pid p2p-usb-agent.service)" Groups) "
[[ $helper_groups == *" $proxy_gid "* ]] || fail "helper lacks group usb-proxy ($proxy_gid): $helper_groups"
[[ $agent_groups != *" $proxy_gid "* ]] || fail "agent has group usb-proxy"
[ "$(stat -c '%U:%G %a' /run/p2p-usb/helper.sock)" = "p2p-usb-helper:p2p-usb 660" ] ||
  fail "helper socket is $(stat -c '%U:%G %a' /run/p2p-usb/helper.sock)"

# --- the agent sees the three devices through the helper, all shared ---
devices=$(p2p-usb-agent devices)
indent "devices" <<<"$devices"
for vp in "$VM_STICK_VIDPID" "$VM_KBD_VIDPID" "$VM_SERIAL_VIDPID"; do
  echo "$devices" | awk -v vp="$vp" '$2 == vp && $4 == "yes" { found = 1 } END { exit !found }' ||
    fail "p2p-usb-agent devices does not list $vp as shared"
done
[ "$(echo "$devices" | grep -c ':')" -ge 3 ] || fail "fewer than 3 devices listed"
# The helper did not grab anything yet: listing is from sysfs only.
stick=$(usb_busid "$VM_STICK_VIDPID")
bound_to "$stick" usb || fail "stick $stick is bound to $(usb_driver "$stick")"
usb_blockdev "$stick" >/dev/null || fail "the stick lost its block device by being listed"

# --- the approved client sees them over iroh on loopback ---
p2p_pin_server
listed=$(as_tester p2p-usb list "$P2P_SERVER") || fail "p2p-usb list as $P2P_USER failed: $listed"
indent "client list" <<<"$listed"
for vp in "$VM_STICK_VIDPID" "$VM_KBD_VIDPID" "$VM_SERIAL_VIDPID"; do
  echo "$listed" | has -w "$vp" || fail "the client does not see $vp"
done
# A ticket works as the server address too.
ticket=$(p2p-usb-agent id --ticket)
[[ $ticket == endpoint* ]] || fail "ticket '$ticket'"
as_tester p2p-usb list "$ticket" | has -w "$VM_STICK_VIDPID" || fail "listing by ticket failed"
unit_prop p2p-usb-agent.service StatusText | indent "agent status now"

# --- a second instance beside it, set up as docs/SYSTEMD.md "Multiple instances" says ---
# Its configuration is a copy of the first (still naming the plain helper socket and
# the same UDP port: the instance units pass their own socket paths, so only the
# port has to differ).
sed 's/^bind_addr = .*/bind_addr = "127.0.0.1:0"/' /etc/p2p-usb/server.toml >/etc/p2p-usb/server-lab.toml
chmod 600 /etc/p2p-usb/server-lab.toml
journal_mark /run/vmtest-10.instance
systemctl start p2p-usb-server@lab.target
wait_for 60 "p2p-usb-agent@lab.service active" unit_active p2p-usb-agent@lab.service
wait_for 60 "p2p-usb-helper@lab.service active (started by the instance agent)" unit_active p2p-usb-helper@lab.service
lab=(p2p-usb-agent --control-socket /run/p2p-usb-agent/lab/control.sock)
wait_for 30 "the instance agent to list the stick" sh -c "${lab[*]} devices | grep -qw $VM_STICK_VIDPID"
[ "$("${lab[@]}" id)" != "$(p2p-usb-agent id)" ] || fail "the instance has the plain agent's identity"
[ -s /var/lib/p2p-usb/lab/secret.key ] || fail "the instance key is not in /var/lib/p2p-usb/lab"
[ -S /run/p2p-usb/helper-lab.sock ] || fail "no instance helper socket"
if journal_since /run/vmtest-10.instance -u p2p-usb-helper@lab.service | has "passed by systemd), but"; then
  journal_since /run/vmtest-10.instance -u p2p-usb-helper@lab.service | indent "helper@lab"
  fail "the instance helper warns about its socket path"
fi
systemctl stop p2p-usb-server@lab.target
for u in p2p-usb-agent@lab.service p2p-usb-helper@lab.service p2p-usb-helper@lab.socket; do
  [ "$(unit_prop "$u" ActiveState)" = inactive ] || fail "$u is $(unit_prop "$u" ActiveState) after stopping the instance"
done
rm -f /etc/p2p-usb/server-lab.toml
log "instance lab: own helper socket, identity and state; stopped cleanly"

touch "$P2P_SETUP_DONE"
log "installed, enabled and serving"
