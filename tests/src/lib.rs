//! Test support: locating the built binaries, writing configurations,
//! recording sd-notify messages, and running the real processes.
//!
//! The binaries are found next to the test executable's target directory
//! (`target/debug`), or in `$P2P_USB_BIN_DIR`. `cargo build --workspace`
//! (which the README's test command runs first) puts them there.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod gateway;
pub mod measure;
pub mod server;
pub mod usb;

/// Path of a workspace binary, panicking with the fix if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("P2P_USB_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_path_buf()
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` first (scripts/test.sh does), or set P2P_USB_BIN_DIR",
        path.display()
    );
    path
}

/// True when the tests run as root (as in CI), which some tests need to run
/// a peer under another uid.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The uid tests use for "some other user".
pub const NOBODY: u32 = 65534;

/// A server configuration for the sim backend in `dir`, allowing `allowed_uid`
/// on the helper socket and sharing every device unless `extra` adds rules.
pub fn write_sim_config(dir: &Path, socket: &Path, allowed_uid: u32, extra: &str) -> PathBuf {
    let share = if extra.contains("[[helper.share]]") {
        String::new()
    } else {
        "[[helper.share]]\nall = true\n".into()
    };
    let text = format!(
        r#"[server]
log_level = "debug"

[helper]
backend = "sim"
socket = "{socket}"
allowed_users = [{allowed_uid}]

[agent]
state_dir = "{state}"
control_socket = "{control}"

[iroh]
relay_mode = "disabled"
bind_addr = "127.0.0.1:0"
dns_discovery = false

{share}
{extra}
"#,
        socket = socket.display(),
        state = dir.join("state").display(),
        control = dir.join("control.sock").display(),
    );
    let path = dir.join("server.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// One datagram received on the notify socket.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    pub text: String,
}

impl Notification {
    /// True if the datagram carries this `KEY=VALUE` line (or `KEY=` prefix).
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l.starts_with(line))
    }
}

/// A stand-in for systemd's notify socket that records every datagram.
pub struct NotifySocket {
    pub path: PathBuf,
    received: Arc<Mutex<Vec<Notification>>>,
}

impl NotifySocket {
    /// Binds a datagram socket in `dir` and records what arrives.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let received: Arc<Mutex<Vec<Notification>>> = Arc::default();
        let sink = received.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push(Notification {
                    at: Instant::now(),
                    text,
                });
            }
        });
        NotifySocket { path, received }
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Notification> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until a datagram with `line` arrives (counting from `after`
    /// received messages), returning it.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> Notification {
        self.wait_for_after(0, line, timeout)
    }

    /// Like [`NotifySocket::wait_for`], ignoring the first `skip` datagrams.
    pub fn wait_for_after(&self, skip: usize, line: &str, timeout: Duration) -> Notification {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.all().into_iter().skip(skip).find(|n| n.has(line)) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {line:?} within {timeout:?}; received: {:#?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for a datagram (after the first `skip`) whose text contains `needle`.
    pub fn wait_for_text(&self, skip: usize, needle: &str, timeout: Duration) -> Notification {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self
                .all()
                .into_iter()
                .skip(skip)
                .find(|n| n.text.contains(needle))
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "nothing containing {needle:?} within {timeout:?}; received: {:#?}",
                self.all()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many datagrams carry `line`, received after `since`.
    pub fn count_since(&self, line: &str, since: Instant) -> usize {
        self.all()
            .iter()
            .filter(|n| n.at >= since && n.has(line))
            .count()
    }

    /// Number of datagrams so far.
    pub fn len(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// True before anything arrived.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A child process killed (SIGKILL) when dropped, with its output captured to
/// a file so failures can show it.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Spawns `command` with stdout and stderr going to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Process {
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command.spawn().expect("spawn process");
        Process { child, log }
    }

    /// The process id.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), signal).expect("send signal");
    }

    /// Waits for exit up to `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The captured output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `path` exists (a socket being bound).
pub fn wait_for_path(path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running helper (sim backend) and what the test needs to talk to it.
pub struct HelperUnderTest {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub notify: NotifySocket,
    pub process: Process,
}

/// Starts the helper the way systemd does: `systemd-socket-activate` owns the
/// listening socket and execs the helper on the first connection, with
/// `LISTEN_FDS`, `NOTIFY_SOCKET` and `WATCHDOG_USEC` set.
pub fn start_activated_helper(extra_config: &str, watchdog_usec: Option<u64>) -> HelperUnderTest {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("helper.sock");
    let config = write_sim_config(
        dir.path(),
        &socket,
        nix::unistd::geteuid().as_raw(),
        extra_config,
    );
    let notify = NotifySocket::bind(dir.path());
    let mut command = Command::new("systemd-socket-activate");
    command
        .arg("-l")
        .arg(&socket)
        .arg("--fdname=helper")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify.path.display()))
        .arg("--setenv=RUST_LOG=debug");
    if let Some(usec) = watchdog_usec {
        command.arg(format!("--setenv=WATCHDOG_USEC={usec}"));
    }
    command
        .arg(bin("p2p-usb-helper"))
        .arg("--config")
        .arg(&config);
    if is_root() {
        command.arg("--allow-root");
    }
    let process = Process::spawn(command, dir.path().join("helper.log"));
    wait_for_path(&socket, Duration::from_secs(10));
    HelperUnderTest {
        dir,
        socket,
        config,
        notify,
        process,
    }
}

/// Starts the helper on its own socket (`--listen`), as a developer would.
pub fn start_listening_helper(
    dir: &Path,
    config: &Path,
    socket: &Path,
    notify: Option<&Path>,
) -> Process {
    let mut command = Command::new(bin("p2p-usb-helper"));
    command
        .arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(socket);
    command.env("RUST_LOG", "debug").env_remove("NOTIFY_SOCKET");
    if let Some(notify) = notify {
        command.env("NOTIFY_SOCKET", notify);
    }
    if is_root() {
        command.arg("--allow-root");
    }
    Process::spawn(command, dir.join(format!("helper-{}.log", unique())))
}

/// A process-unique counter for file names.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
