#!/usr/bin/env python3
"""Host side of the p2p-usb VM tests (stdlib only).

Boots QEMU, keeps its console in console.log, answers the guest's control channel
(guest /dev/ttyS1 <-> ctl.sock, the `vmctl` protocol) by acting on QEMU through QMP,
enforces a global timeout, then reads the results the guest left on the payload disk,
prints a summary and writes the results file. Exit status: 0 all scenarios passed or
skipped and dmesg is clean, 1 otherwise.

Control protocol (one line each way, replies matched by id):
  guest: REQ <id> <command> [args...]
  host:  RES <id> OK <base64 payload>   |   RES <id> ERR <base64 message>
"""

import argparse
import base64
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

# Hot-pluggable USB devices: id -> device_add arguments. The same definitions build
# the QEMU command line, so `plug ID` re-creates exactly what was there at boot.
# Fixed ports: `plug` after `unplug` puts a device back where it was (QEMU would take
# the next free port otherwise), like re-plugging a stick into the same socket; the
# device's bus path, part of p2p-usb's stable device key, stays the same.
USB_DEVICES = {
    "stick": {"driver": "usb-storage", "bus": "xhci.0", "port": "1", "drive": "stickdisk"},
    "kbd": {"driver": "usb-kbd", "bus": "xhci.0", "port": "2"},
    "serial": {"driver": "usb-serial", "bus": "xhci.0", "port": "3", "chardev": "ser0"},
}

# Kernel messages (dmesg, or console lines with a printk timestamp) that fail the run
# whatever the scenarios said. Only timestamped lines count, so a scenario printing
# "DEBUG: ..." or "Oops" is not mistaken for the kernel.
KMSG = re.compile(r"^\[\s*\d+\.\d+\] ")
KERNEL_TROUBLE = re.compile(
    r"\bOops\b.*\[#\d+\]|\bBUG:|kernel BUG|Kernel panic|general protection fault|"
    r"blocked for more than \d+ seconds|hung_task|soft lockup|rcu_sched detected stall|"
    r"WARNING: CPU:|UBSAN:|KASAN:|list_del corruption|refcount_t:"
)


def kernel_trouble(line):
    return bool(KMSG.match(line) and KERNEL_TROUBLE.search(line))

CONSOLE_ECHO = re.compile(r"^(RUNNER|SCENARIO|METRIC) ")


class QemuError(Exception):
    pass


class Qmp:
    """Minimal synchronous QMP client; events are kept for wait_event()."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.events = []
        self.next_id = 0
        self._read_msg(10)  # greeting
        self.execute("qmp_capabilities")

    def _read_msg(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError("QMP: no answer from QEMU")
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise QemuError("QMP: connection closed")
                self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line) if line.strip() else self._read_msg(timeout)

    def execute(self, command, arguments=None, timeout=10):
        self.next_id += 1
        msg = {"execute": command, "id": self.next_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_msg(max(0.1, deadline - time.monotonic()))
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == self.next_id:
                if "error" in reply:
                    raise QemuError(f"{command}: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")

    def wait_event(self, name, match, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and match(ev.get("data", {})):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"no {name} event within {timeout}s")
            try:
                msg = self._read_msg(left)
            except QemuError:
                continue
            if "event" in msg:
                self.events.append(msg)

    def pump(self):
        """Read whatever arrived (called when the socket is readable)."""
        data = self.sock.recv(65536)
        if not data:
            raise QemuError("QMP: connection closed")
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                msg = json.loads(line)
                if "event" in msg:
                    self.events.append(msg)


class Vm:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir
        self.t0 = time.monotonic()
        self.boot_secs = None
        self.console_log = open(os.path.join(self.work, "console.log"), "wb")
        self.console_buf = b""
        self.ctl_buf = b""
        self.plugged = set(USB_DEVICES)
        self.saw_poweroff = False
        # TCG speed depends on what else runs on the host: recorded with the metrics.
        self.load_start = f"{os.getloadavg()[0]:.2f}"

    # --- QEMU ---------------------------------------------------------------------
    def listen(self, name):
        path = os.path.join(self.work, name)
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        return s, path

    def command(self, con, ctl, qmp):
        a = self.args

        def dev(dev_id):
            opts = dict(USB_DEVICES[dev_id], id=dev_id)
            return ",".join([opts.pop("driver")] + [f"{k}={v}" for k, v in opts.items()])

        return [
            # TCG (KVM cannot boot the Debian kernel on these machines). thread=single: with
            # multi-threaded TCG on a busy 2-core host every cross-vCPU wakeup waits for the
            # host scheduler, and kernel USB/IP reads fell from ~50 to ~4 MiB/s.
            "qemu-system-x86_64", "-accel", os.environ.get("P2P_USB_VM_ACCEL", "tcg,thread=single"),
            "-machine", "pc,i8042=off",
            # The CPU model TCG emulates; unset: QEMU's default (qemu64, no AES-NI).
            *(["-cpu", os.environ["P2P_USB_VM_CPU"]] if os.environ.get("P2P_USB_VM_CPU") else []),
            "-m", a.memory, "-smp", str(a.smp), "-nodefaults", "-display", "none",
            "-no-reboot", "-nic", "none",
            "-kernel", a.kernel, "-initrd", a.initrd,
            "-append", "console=ttyS0,115200 quiet panic=-1 rdinit=/init " + a.append,
            # QEMU connects to our sockets (server=off): nothing the guest writes is lost.
            "-chardev", f"socket,id=con,path={con}",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,path={ctl}",
            "-serial", "chardev:ctl",
            "-chardev", f"socket,id=qmp,path={qmp}",
            "-mon", "chardev=qmp,mode=control",
            # The rootfs is shared by runs: snapshot=on keeps guest writes in a temp overlay.
            "-drive", f"file={a.rootfs},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={a.payload},if=virtio,format=raw",
            "-device", "qemu-xhci,id=xhci",
            # -blockdev, not -drive: a -drive backend is deleted with its device, which
            # would make `plug stick` impossible after `unplug stick`.
            "-blockdev", f"driver=raw,node-name=stickdisk,file.driver=file,file.filename={a.stick}",
            "-device", dev("stick"),
            "-device", dev("kbd"),
            # append=on: `clear-serial` truncates the file under QEMU's feet.
            "-chardev", f"file,id=ser0,path={a.serial_out},append=on",
            "-device", dev("serial"),
        ]

    def start(self):
        socks = {n: self.listen(n + ".sock") for n in ("con", "ctl", "qmp")}
        cmd = self.command(socks["con"][1], socks["ctl"][1], socks["qmp"][1])
        with open(os.path.join(self.work, "qemu-cmd.txt"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        self.qemu_log = open(os.path.join(self.work, "qemu.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=self.qemu_log, stderr=subprocess.STDOUT)
        conns = {}
        for name, (lsock, _) in socks.items():
            deadline = time.monotonic() + 60
            while name not in conns:
                if self.proc.poll() is not None:
                    raise QemuError(f"QEMU exited with {self.proc.returncode} at startup:\n"
                                    + self.read_file("qemu.log"))
                if time.monotonic() > deadline:
                    raise QemuError(f"QEMU did not connect to {name}.sock")
                ready, _, _ = select.select([lsock], [], [], 0.5)
                if ready:
                    conns[name], _ = lsock.accept()
            lsock.close()
        self.con, self.ctl = conns["con"], conns["ctl"]
        self.ctl.settimeout(30)
        self.qmp = Qmp(conns["qmp"])

    def read_file(self, name, limit=20000):
        try:
            with open(os.path.join(self.work, name), "rb") as f:
                return f.read()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.qmp.execute("quit", timeout=5)
            except (QemuError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # --- console --------------------------------------------------------------------
    def elapsed(self):
        return time.monotonic() - self.t0

    def on_console(self, data):
        self.console_log.write(data)
        self.console_log.flush()
        self.console_buf += data
        while b"\n" in self.console_buf:
            raw, self.console_buf = self.console_buf.split(b"\n", 1)
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith("RUNNER POWEROFF"):
                self.saw_poweroff = True
            if line.startswith("RUNNER BOOTED") and self.boot_secs is None:
                self.boot_secs = self.elapsed()
            if self.args.verbose or CONSOLE_ECHO.match(line) or kernel_trouble(line):
                print(f"[vm {self.elapsed():6.1f}s] {line}", flush=True)

    # --- control channel ------------------------------------------------------------
    def on_ctl(self, data):
        self.ctl_buf += data
        while b"\n" in self.ctl_buf:
            raw, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
            parts = raw.decode(errors="replace").strip().split(" ", 3)
            if len(parts) < 3 or parts[0] != "REQ":
                continue  # line noise, or a tty echo before the guest set raw mode
            req_id, cmd = parts[1], parts[2]
            rest = parts[3] if len(parts) > 3 else ""
            try:
                payload, status = self.handle(cmd, rest.strip()), "OK"
            except Exception as e:  # a bad request must never stop the orchestrator
                payload, status = f"{type(e).__name__}: {e}".encode(), "ERR"
            if self.args.verbose or status == "ERR":
                print(f"[host {self.elapsed():6.1f}s] vmctl {cmd} {rest} -> {status}"
                      + (f": {payload.decode(errors='replace')}" if status == "ERR" else ""),
                      flush=True)
            reply = f"RES {req_id} {status} {base64.b64encode(payload).decode()}\n"
            try:
                self.ctl.sendall(reply.encode())  # ctl has a timeout: a guest not reading can't block us
            except socket.timeout:
                print(f"[host] vmctl {cmd}: the guest did not read the reply", flush=True)

    def handle(self, cmd, rest):
        if cmd == "ping":
            return b"pong\n"
        if cmd == "devices":
            return "".join(f"{d}\n" for d in sorted(self.plugged)).encode()
        if cmd == "unplug":
            if rest not in USB_DEVICES:
                raise KeyError(f"unknown device {rest!r} (known: {' '.join(USB_DEVICES)})")
            self.qmp.execute("device_del", {"id": rest})
            # device_del only requests removal; DEVICE_DELETED says it is gone.
            self.qmp.wait_event("DEVICE_DELETED", lambda d: d.get("device") == rest)
            self.plugged.discard(rest)
            return b""
        if cmd == "plug":
            if rest not in USB_DEVICES:
                raise KeyError(f"unknown device {rest!r} (known: {' '.join(USB_DEVICES)})")
            self.qmp.execute("device_add", dict(USB_DEVICES[rest], id=rest))
            self.plugged.add(rest)
            return b""
        if cmd == "sendkey":
            # Each arg is one HMP sendkey key spec: "a", "ret", "shift-a", "ctrl-alt-f1".
            for key in rest.split():
                out = self.qmp.execute("human-monitor-command", {"command-line": f"sendkey {key}"})
                if out:
                    raise ValueError(out.strip())
                time.sleep(0.12)  # HMP releases after 100 ms; keep keys apart
            return b""
        if cmd == "hmp":
            return self.qmp.execute("human-monitor-command", {"command-line": rest}).encode()
        if cmd == "qmp":
            req = json.loads(rest)
            return (json.dumps(self.qmp.execute(req["execute"], req.get("arguments"))) + "\n").encode()
        if cmd == "read-serial":
            with open(self.args.serial_out, "rb") as f:
                return f.read()
        if cmd == "clear-serial":
            open(self.args.serial_out, "wb").close()
            return b""
        raise KeyError(f"unknown command {cmd!r}")

    # --- main loop ------------------------------------------------------------------
    def run(self):
        """How the VM ended: 'poweroff' (by the test unit), 'timeout', or 'guest died'."""
        deadline = self.t0 + self.args.timeout
        fds = {self.con: self.on_console, self.ctl: self.on_ctl, self.qmp.sock: None}
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                print(f"[host] global timeout ({self.args.timeout:.0f}s): stopping QEMU", flush=True)
                self.stop()
                return "timeout"
            if self.boot_secs is None and self.elapsed() > self.args.boot_timeout:
                # A guest that never starts its test unit would otherwise hold us for the
                # whole global timeout.
                print(f"[host] the guest did not boot within {self.args.boot_timeout:.0f}s: stopping QEMU",
                      flush=True)
                self.stop()
                return "boot timeout"
            ready, _, _ = select.select(list(fds), [], [], 1.0)
            for s in ready:
                try:
                    if s is self.qmp.sock:
                        self.qmp.pump()  # keeps events; EOF raises
                        continue
                    data = s.recv(65536)
                except (OSError, QemuError):
                    data = b""
                if data:
                    fds[s](data)
                else:
                    fds.pop(s, None)  # closed: QEMU is on its way out
            if not fds:
                break
        self.proc.wait()
        # Drain what the console still holds.
        for s in (self.con, self.ctl):
            try:
                s.setblocking(False)
                while True:
                    data = s.recv(65536)
                    if not data:
                        break
                    if s is self.con:
                        self.on_console(data)
            except OSError:
                pass
        self.console_log.close()
        if self.proc.returncode == 0 and self.saw_poweroff:
            return "poweroff"
        return f"guest died: QEMU exit {self.proc.returncode}"


# --- results ------------------------------------------------------------------------
def extract_out(payload, work):
    """Copy /out of the payload disk to WORK/out (journal replayed first: the VM may
    have been killed)."""
    dest = os.path.join(work, "out")
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["e2fsck", "-fy", payload], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(["debugfs", "-R", f"rdump /out {work}", payload],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dest


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def summarize(args, vm, how):
    out = extract_out(args.payload, args.workdir)
    results = read_text(os.path.join(out, "results.txt")).splitlines()
    progress = read_text(os.path.join(out, "progress")).splitlines()
    scen = {}
    metrics = []
    for line in results:
        f = line.split()
        if len(f) >= 4 and f[0] == "SCENARIO":
            scen[f[1]] = line
        elif f and f[0] == "METRIC":
            metrics.append(line)

    lines = []
    failed = []
    for name in args.scenarios:
        if name not in scen:
            why = f"did not finish ({how})" if "BEGIN " + name in progress else f"not run ({how})"
            scen[name] = f"SCENARIO {name} FAIL - {why}"
        line = scen[name]
        lines.append(line)
        if line.split()[2] == "FAIL":
            failed.append(name)

    # Kernel trouble: the guest's final dmesg plus the console (covers a dead guest).
    dmesg = read_text(os.path.join(out, "dmesg.txt")) + read_text(os.path.join(args.workdir, "console.log"))
    trouble = sorted({m.strip() for m in dmesg.splitlines() if kernel_trouble(m.strip("\r"))})
    ok = not failed and not trouble and how == "poweroff" and "DONE" in progress

    if failed:
        print("\n===== VM scenario logs of failures =====", flush=True)
    for name in failed:
        text = read_text(os.path.join(out, name + ".log"))
        tail = text.splitlines()[-150:]
        print(f"----- {name} (last {len(tail)} lines of out/{name}.log) -----")
        print("\n".join(tail) if tail else "(no log)")
    if how != "poweroff" or "DONE" not in progress:
        print(f"----- console.log tail (VM: {how}) -----")
        print("\n".join(read_text(os.path.join(args.workdir, "console.log")).splitlines()[-60:]))

    n = {s: sum(1 for l in lines if l.split()[2] == s) for s in ("PASS", "FAIL", "SKIP")}
    boot = f"{vm.boot_secs:.1f}s" if vm.boot_secs is not None else "n/a"
    dline = "DMESG clean" if not trouble else "DMESG TROUBLE: " + " | ".join(trouble[:10])
    total = (f"RESULT {'PASS' if ok else 'FAIL'}: {n['PASS']} passed, {n['FAIL']} failed, "
             f"{n['SKIP']} skipped; VM {how}; boot {boot}; VM time {vm.elapsed():.1f}s")
    load = f"HOST loadavg {vm.load_start} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs"
    report = lines + metrics + [dline, load, total]
    print("\n===== VM results =====")
    print("\n".join(report), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(report) + "\n")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--rootfs", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--stick", required=True)
    p.add_argument("--serial-out", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--memory", default=os.environ.get("P2P_USB_VM_MEMORY", "1G"))
    p.add_argument("--smp", type=int, default=int(os.environ.get("P2P_USB_VM_SMP", "2")))
    p.add_argument("--append", default="")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--boot-timeout", type=float, default=300)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("scenarios", nargs="*")
    args = p.parse_args()

    vm = Vm(args)
    try:
        vm.start()
        how = vm.run()
    except QemuError as e:
        print(f"[host] {e}", file=sys.stderr)
        if getattr(vm, "proc", None):
            vm.stop()
        how = "QEMU error"
    except KeyboardInterrupt:
        vm.stop()
        how = "interrupted"
    for name in ("con.sock", "ctl.sock", "qmp.sock"):
        try:
            os.unlink(os.path.join(args.workdir, name))
        except OSError:
            pass
    return summarize(args, vm, how)


if __name__ == "__main__":
    sys.exit(main())
