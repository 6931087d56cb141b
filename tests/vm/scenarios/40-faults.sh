#!/bin/bash
# vm-timeout: 600
# Faults under real systemd and a real kernel, with the stick attached through the stack:
#  A. kill -9 of the helper during a read: systemd restarts it (Restart=on-failure), the
#     reader gets an answer (data or an I/O error, never a hang), the client re-attaches.
#  B. SIGSTOP of the agent: the watchdog (shortened to 5 s by a drop-in) restarts it.
#  C. hot-unplug of the stick mid-transfer: pending transfers fail, the client detaches
#     cleanly, and attaches again when the stick is plugged back; and again after an
#     unplug and plug-in the helper does not see apart (it is held still meanwhile).
#  D. `systemctl stop p2p-usb-server.target` while attached: done within 10 s, and the
#     stick is back on its local kernel driver; once the target is started again, the
#     client (still running) attaches the stick again by itself.
#  E. kill -9 of the helper while a (frozen) client holds the stick: the restarted helper
#     hands the driverless interfaces back, so the stick is a local disk again.
#  F. `p2p-usb status` and `p2p-usb detach DEVICE` reach an attach that is between
#     reconnects (the agent stopped), which holds no vhci port.
# The harness fails the run on any Oops/BUG/hung task in dmesg.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
p2p_traps
p2p_setup
dmesg_mark /run/vmtest-40.dmesg

stick=$(wait_for 30 "usb-storage stick $VM_STICK_VIDPID" usb_busid "$VM_STICK_VIDPID")

# start_reader DEV ROUNDS: reads DEV ROUNDS times in the background (O_DIRECT);
# the exit status of the first failing dd ends up in /run/vmtest-40.reader.
start_reader() {
  rm -f /run/vmtest-40.reader
  (
    rc=0
    for _ in $(seq "$2"); do
      dd if="$1" of=/dev/null bs=1M iflag=direct status=none 2>/run/vmtest-40.reader.err || { rc=$?; break; }
    done
    echo "$rc" >/run/vmtest-40.reader
  ) &
}
reader_done() { [ -s /run/vmtest-40.reader ]; }

# attach_stick NAME: attach the stick as the client user; VDEV = the vhci block device.
attach_stick() {
  p2p_attach "$1" "$P2P_USER" "$stick"
  local v
  v=$(wait_vhci "$VM_STICK_VIDPID" 60) || { show_attach "$1"; fail "no vhci copy of the stick ($1)"; }
  VDEV=$(wait_for 60 "block device of vhci $v" usb_blockdev "$v")
}

# === A. kill -9 of the helper during a read ===========================================
log "A: kill -9 of the helper during a read"
attach_stick A
vdev=$VDEV
hpid=$(main_pid p2p-usb-helper.service)
nr0=$(unit_prop p2p-usb-helper.service NRestarts)
start_reader "$vdev" 20
sleep 1.5
reader_done && fail "A: the reader finished before the kill; nothing was tested"
kill -KILL "$hpid"
log "A: killed helper pid $hpid"
wait_for 60 "A: reader to end (data or error, not a hang)" reader_done
log "A: reader ended with status $(cat /run/vmtest-40.reader): $(head -c 200 /run/vmtest-40.reader.err)"
wait_for 60 "A: helper restarted by systemd" sh -c "[ \"\$(systemctl show -p NRestarts --value p2p-usb-helper.service)\" -gt $nr0 ]"
p2p_wait_ready 60
[ "$(main_pid p2p-usb-helper.service)" != "$hpid" ] || fail "A: helper pid unchanged"
log "A: helper restarted (NRestarts $nr0 -> $(unit_prop p2p-usb-helper.service NRestarts)), pid $(main_pid p2p-usb-helper.service)"
journal_since /dev/null -u p2p-usb-helper.service -n 5 | indent "journal"
# The client attaches again by the stable key once the helper is back.
v=$(wait_for 90 "A: client re-attached after the helper restart" vhci_busid "$VM_STICK_VIDPID") ||
  { show_attach A; fail "A: client did not re-attach after the helper restart"; }
attach_running A || { show_attach A; fail "A: client exited instead of re-attaching"; }
vdev=$(wait_for 60 "block device of re-attached $v" usb_blockdev "$v")
expect_stick_sha256 "$vdev"
log "A: client re-attached by itself; all bytes still right"
metric fault_helper_kill_reattached 1 bool
show_attach A
p2p_detach A 30
wait_no_vhci "$VM_STICK_VIDPID" 30
wait_for 30 "A: stick back on usb-storage" usb_blockdev "$stick" >/dev/null ||
  fail "A: stick not back on usb-storage after detach"

# === B. SIGSTOP of the agent: the watchdog restarts it =================================
log "B: SIGSTOP of the agent with WatchdogSec=5s"
dropin=/etc/systemd/system/p2p-usb-agent.service.d/90-vmtest-watchdog.conf
mkdir -p "${dropin%/*}"
printf '[Service]\nWatchdogSec=5s\n' >"$dropin"
on_exit 'rm -f '"$dropin"'; systemctl daemon-reload; systemctl restart p2p-usb-agent.service'
systemctl daemon-reload
systemctl restart p2p-usb-agent.service
p2p_wait_ready 60
[ "$(unit_prop p2p-usb-agent.service WatchdogUSec)" = 5s ] || fail "B: drop-in not applied: WatchdogUSec=$(unit_prop p2p-usb-agent.service WatchdogUSec)"
# Healthy for 3 watchdog periods first: the agent pings on time.
apid=$(main_pid p2p-usb-agent.service)
sleep 15
[ "$(main_pid p2p-usb-agent.service)" = "$apid" ] || fail "B: healthy agent was restarted (pings missing?)"
journal_mark /run/vmtest-40.since
nr0=$(unit_prop p2p-usb-agent.service NRestarts)
kill -STOP "$apid"
t0=$(date +%s%N)
log "B: stopped agent pid $apid"
wait_for 60 "B: agent restarted" sh -c "[ \"\$(systemctl show -p NRestarts --value p2p-usb-agent.service)\" -gt $nr0 ]"
t1=$(date +%s%N)
p2p_wait_ready 60
[ "$(main_pid p2p-usb-agent.service)" != "$apid" ] || fail "B: agent pid unchanged"
journal_since /run/vmtest-40.since -u p2p-usb-agent.service | indent "journal" | head -n 20
journal_since /run/vmtest-40.since -u p2p-usb-agent.service | has "Watchdog timeout" ||
  fail "B: restart was not caused by the watchdog"
metric fault_agent_watchdog_restart_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" s
as_tester p2p-usb list "$P2P_SERVER" | has -w "$VM_STICK_VIDPID" || fail "B: restarted agent does not serve the client"
log "B: watchdog restarted the hung agent; it serves again"
rm -f "$dropin"
systemctl daemon-reload
systemctl restart p2p-usb-agent.service
p2p_wait_ready 60

# === C. hot-unplug mid-transfer ========================================================
log "C: hot-unplug of the stick during a read"
attach_stick C
vdev=$VDEV
start_reader "$vdev" 20
sleep 1.5
reader_done && fail "C: the reader finished before the unplug; nothing was tested"
on_exit 'vmctl devices | has -x stick || vmctl plug stick'
vmctl unplug stick
log "C: unplugged"
wait_for 60 "C: reader to end" reader_done
rc=$(cat /run/vmtest-40.reader)
log "C: reader ended with status $rc: $(head -c 200 /run/vmtest-40.reader.err)"
[ "$rc" != 0 ] || fail "C: reading the unplugged stick succeeded"
wait_no_vhci "$VM_STICK_VIDPID" 30
attach_running C || { show_attach C; fail "C: client exited instead of waiting for the stick"; }
show_attach C
grep -q "left the server" "$(attach_log C)" || fail "C: client did not report the device leaving"
vmctl plug stick
stick=$(wait_for 30 "C: stick plugged back" usb_busid "$VM_STICK_VIDPID")
log "C: stick back as $stick"
v=$(wait_for 90 "C: client re-attached after plug" vhci_busid "$VM_STICK_VIDPID") || { show_attach C; fail "C: no re-attach after plug"; }
vdev=$(wait_for 60 "block device of re-attached $v" usb_blockdev "$v")
expect_stick_sha256 "$vdev"
log "C: re-attached after plug; all bytes right"

# An unplug and a plug-in that the helper does not see apart: held still (SIGSTOP) while
# they happen, its one look at the bus afterwards finds the stick back under the same
# stable key. It is a new device with a new address all the same, and the old handle is
# dead: the client must see it leave and arrive, and attach it again.
log "C: unplug and plug back while the helper cannot look"
# lines_in_attach_log PATTERN: how many lines of attach C's log match.
lines_in_attach_log() { grep -c "$1" "$(attach_log C)" || true; }
# more_in_attach_log PATTERN N: more than N lines match now.
more_in_attach_log() { [ "$(lines_in_attach_log "$1")" -gt "$2" ]; }
lefts=$(lines_in_attach_log "left the server")
attaches=$(lines_in_attach_log "^attached .* at vhci port")
address=$(cat "/sys/bus/usb/devices/$stick/devnum")
hpid=$(main_pid p2p-usb-helper.service)
nr0=$(unit_prop p2p-usb-helper.service NRestarts)
on_exit "kill -CONT $hpid 2>/dev/null || true"
kill -STOP "$hpid"
vmctl unplug stick
vmctl plug stick
# Resumed as soon as the new device is on the bus: well inside the watchdog's 60 s.
stick=$(wait_for 30 "C: stick plugged back" usb_busid "$VM_STICK_VIDPID")
kill -CONT "$hpid"
new_address=$(cat "/sys/bus/usb/devices/$stick/devnum")
log "C: stick back as $stick, address $address -> $new_address; helper resumed"
[ "$new_address" != "$address" ] || fail "C: the stick came back at the same address; nothing was tested"
wait_for 60 "C: client told the stick left" more_in_attach_log "left the server" "$lefts" ||
  { show_attach C; fail "C: the client never heard of the quick replug"; }
wait_for 90 "C: client attached the new plug-in" more_in_attach_log "^attached .* at vhci port" "$attaches" ||
  { show_attach C; fail "C: no re-attach after the quick replug"; }
v=$(wait_vhci "$VM_STICK_VIDPID" 60)
vdev=$(wait_for 60 "block device of re-attached $v" usb_blockdev "$v")
expect_stick_sha256 "$vdev"
if [ "$(main_pid p2p-usb-helper.service)" != "$hpid" ] || [ "$(unit_prop p2p-usb-helper.service NRestarts)" != "$nr0" ]; then
  fail "C: the helper was restarted; the replug it did not see was not what the client reacted to"
fi
log "C: re-attached after the quick replug; all bytes right"

# === D. stop the target while attached =================================================
log "D: systemctl stop p2p-usb-server.target while attached"
# systemctl returns once the target is stopped; the units it is ordered after stop
# after it (stop runs in reverse order), so the time is taken until all are down.
all_inactive() {
  local u
  for u in "${P2P_UNITS[@]}"; do
    [ "$(unit_prop "$u" ActiveState)" = inactive ] || return 1
  done
}
t0=$(date +%s%N)
systemctl stop p2p-usb-server.target
while ! all_inactive && [ $(( ($(date +%s%N) - t0) / 1000000000 )) -lt 10 ]; do sleep 0.1; done
t1=$(date +%s%N)
stop_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
metric server_stop_while_attached_s "$stop_s" s
awk -v s="$stop_s" 'BEGIN { exit !(s < 10) }' || fail "D: stop took ${stop_s}s (limit 10 s)"
for u in "${P2P_UNITS[@]}"; do
  st=$(unit_prop "$u" ActiveState)
  [ "$st" = inactive ] || fail "D: $u is $st ${stop_s}s after the stop (limit 10 s)"
done
journal_since /dev/null -u p2p-usb-helper.service -u p2p-usb-agent.service -n 12 | indent "journal"
wait_for 10 "D: stick back on usb-storage" usb_blockdev "$stick" >/dev/null
wait_no_vhci "$VM_STICK_VIDPID" 30
log "D: stopped in ${stop_s}s; $stick back on usb-storage as $(usb_blockdev "$stick")"
attach_running C || { show_attach C; fail "D: client exited when the server stopped"; }
systemctl start p2p-usb-server.target
p2p_wait_ready 60
# The client has been retrying; it attaches the stick again by its stable key.
v=$(wait_for 90 "D: client re-attached after the server restart" vhci_busid "$VM_STICK_VIDPID") ||
  { show_attach C; fail "D: client did not re-attach after the server restart"; }
vdev=$(wait_for 60 "block device of re-attached $v" usb_blockdev "$v")
expect_stick_sha256 "$vdev"
log "D: client re-attached after the server restart; all bytes right"
show_attach C
p2p_detach C 30
wait_no_vhci "$VM_STICK_VIDPID" 30
wait_for 30 "D: stick back on usb-storage after detach" usb_blockdev "$stick" >/dev/null
expect_stick_sha256 "$(usb_blockdev "$stick")"

# === E. a killed helper does not leave the stick without its local driver ===============
# The client is frozen so it cannot open the stick again: only the restarted helper can
# hand the interfaces back to usb-storage.
log "E: kill -9 of the helper while the stick is attached and the client is frozen"
attach_stick E
udevadm settle --timeout=30 || true
kill -STOP "$(attach_pid E)"
hpid=$(main_pid p2p-usb-helper.service)
nr0=$(unit_prop p2p-usb-helper.service NRestarts)
journal_mark /run/vmtest-40.e.journal
kill -KILL "$hpid"
wait_for 60 "E: helper restarted by systemd" sh -c "[ \"\$(systemctl show -p NRestarts --value p2p-usb-helper.service)\" -gt $nr0 ]"
p2p_wait_ready 60
handback_logged() { journal_since /run/vmtest-40.e.journal -u p2p-usb-helper.service | has "handed back to usb-storage"; }
wait_for 30 "E: the restarted helper to hand the stick back to usb-storage" usb_blockdev "$stick" >/dev/null
wait_for 10 "E: the hand-back in the helper's journal" handback_logged
journal_since /run/vmtest-40.e.journal -u p2p-usb-helper.service | grep "handed back" | indent "journal"
log "E: $stick back on usb-storage as $(usb_blockdev "$stick") after the helper restart"
kill -CONT "$(attach_pid E)"
p2p_detach E 60
wait_no_vhci "$VM_STICK_VIDPID" 60
wait_for 30 "E: stick on usb-storage at the end" usb_blockdev "$stick" >/dev/null ||
  fail "E: stick not on usb-storage after the detach"
expect_stick_sha256 "$(usb_blockdev "$stick")"

# === F. detach by device while the client reconnects =====================================
log "F: p2p-usb status and detach DEVICE while the client is between reconnects"
attach_stick F
as_tester p2p-usb status | tee /run/vmtest-40.status | indent "status"
grep -E "^[0-9]+ .*$VM_STICK_VIDPID.*\(pid $(attach_pid F)\): attached" /run/vmtest-40.status >/dev/null ||
  fail "F: status does not show the attached stick with its process"
systemctl stop p2p-usb-agent.service
lost() { grep -q "lost the server" "$(attach_log F)"; }
wait_for 30 "F: the client to notice the server is gone" lost
wait_no_vhci "$VM_STICK_VIDPID" 30
as_tester p2p-usb status | tee /run/vmtest-40.status | indent "status"
grep -E "^- .*$VM_STICK_VIDPID.*\(pid $(attach_pid F)\): reconnecting" /run/vmtest-40.status >/dev/null ||
  fail "F: status does not show the reconnecting attach"
as_tester p2p-usb detach "$VM_STICK_VIDPID" | tee /run/vmtest-40.detach | indent "detach"
has "^stopped the attach of .*$VM_STICK_VIDPID" /run/vmtest-40.detach || fail "F: p2p-usb detach $VM_STICK_VIDPID did not stop the attach"
not attach_running F || { show_attach F; fail "F: the attach process still runs after p2p-usb detach"; }
[ "$(as_tester p2p-usb status)" = "no device is attached through vhci_hcd" ] || fail "F: status still lists an attach"
rc=0
as_tester p2p-usb detach "$VM_STICK_VIDPID" 2>/run/vmtest-40.detach || rc=$?
if [ "$rc" != 65 ] || not has "no \`p2p-usb attach\` of" /run/vmtest-40.detach; then
  fail "F: a second detach: exit $rc, $(cat /run/vmtest-40.detach)"
fi
systemctl start p2p-usb-agent.service
p2p_wait_ready 60
log "F: the reconnecting attach was listed and stopped by p2p-usb detach $VM_STICK_VIDPID"

dmesg_since /run/vmtest-40.dmesg | indent "dmesg" | tail -n 80
if dmesg_since /run/vmtest-40.dmesg | grep -E 'blocked for more than|hung_task|Oops|BUG:' >/dev/null; then
  fail "kernel trouble during the faults"
fi
