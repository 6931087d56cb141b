//! The `p2p-usb attach` processes of this user, as `status` and `detach`
//! see them. Every attach process keeps one record, named by its pid, in a
//! private runtime directory: the device, the server, what it is doing, and
//! the vhci port while the device is attached. Between reconnects the device
//! has no port, and the record is how `p2p-usb detach DEVICE` still finds the
//! process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_usb_common::proto::DeviceKey;
use serde::{Deserialize, Serialize};

use crate::client;
use crate::vhci::{self, VhciError, VhciPort};

/// How long `detach` waits for an attach process it signalled to end.
pub const STOP_WAIT: Duration = Duration::from_secs(10);

/// What one attach process is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachRecord {
    pub pid: u32,
    /// The process's start time (clock ticks after boot, from
    /// `/proc/PID/stat`), so a pid taken over by another process after a
    /// crash does not pass for the attach.
    pub started: u64,
    /// The server's EndpointId.
    pub server: String,
    /// What the process does now, in words: "attached …", "reconnecting: …".
    pub state: String,
    /// Where the device is while it is attached.
    pub attached: Option<VhciSlot>,
    pub device: DeviceKey,
}

/// The vhci port an attached device sits on, with the devid it was attached
/// under: a port freed behind the process's back and taken by another
/// device does not pass for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhciSlot {
    pub port: u32,
    pub devid: u32,
}

impl VhciSlot {
    /// True if `port` holds this very attachment.
    pub fn is(&self, port: &VhciPort) -> bool {
        port.port == self.port && port.devid == self.devid && !port.is_free()
    }
}

/// The record of this process, kept up to date and removed when dropped.
pub struct RecordFile {
    path: PathBuf,
    record: AttachRecord,
}

impl RecordFile {
    /// Records that this process attaches `device` of `server`. Best effort:
    /// without a record the attach works the same, `status` and `detach
    /// DEVICE` just do not know of it.
    pub fn create(server: String, device: DeviceKey) -> Option<RecordFile> {
        let pid = std::process::id();
        let record = AttachRecord {
            pid,
            started: running_since(pid)?,
            server,
            state: "connecting".into(),
            attached: None,
            device,
        };
        let dir = records_dir();
        if let Err(e) = create_private_dir(&records_base(), &dir) {
            tracing::debug!("no attach record: {e}");
            return None;
        }
        let file = RecordFile {
            path: dir.join(pid.to_string()),
            record,
        };
        file.write();
        Some(file)
    }

    /// Says what the process does now.
    pub fn set(&mut self, attached: Option<VhciSlot>, state: impl Into<String>) {
        self.record.attached = attached;
        self.record.state = state.into();
        self.write();
    }

    /// Written whole and renamed into place: readers never see half a record.
    fn write(&self) {
        let Ok(text) = toml::to_string(&self.record) else {
            return;
        };
        let partial = self.path.with_extension("new");
        if let Err(e) =
            std::fs::write(&partial, text).and_then(|()| std::fs::rename(&partial, &self.path))
        {
            tracing::debug!("cannot write {}: {e}", self.path.display());
        }
    }
}

impl Drop for RecordFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The attach processes of this user that are running, by pid. Records of
/// processes that are gone (killed, crashed) are removed on the way. Read
/// only from a directory that is this user's alone: anything else could
/// hold records planted by another user, and is an error.
pub fn list() -> std::io::Result<Vec<AttachRecord>> {
    let dir = records_dir();
    match check_private_dir(&records_base(), &dir) {
        Ok(()) => Ok(list_in(&dir)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn list_in(dir: &Path) -> Vec<AttachRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut records: Vec<AttachRecord> = entries
        .flatten()
        .filter(|entry| entry.file_name().to_str().is_some_and(is_pid))
        .filter_map(|entry| {
            let record = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|text| toml::from_str::<AttachRecord>(&text).ok());
            match record {
                Some(record) if running_since(record.pid) == Some(record.started) => Some(record),
                _ => {
                    let _ = std::fs::remove_file(entry.path());
                    None
                }
            }
        })
        .collect();
    records.sort_by_key(|r| r.pid);
    records
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it runs:
/// a zombie, ended but not yet reaped by its parent, does not.
fn running_since(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Why `p2p-usb detach` could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(transparent)]
    Vhci(#[from] VhciError),
    #[error("cannot read the attach records: {0}")]
    Records(std::io::Error),
    #[error("no `p2p-usb attach` of {spec:?} runs as this user ({running})")]
    NoAttach { spec: String, running: String },
    #[error(
        "{spec:?} names more than one `p2p-usb attach`: {candidates}; give the vhci port or the whole device key"
    )]
    Ambiguous { spec: String, candidates: String },
    #[error("cannot stop the attach process {pid}: {source}")]
    Signal { pid: u32, source: std::io::Error },
    #[error("the attach process {pid} did not end within {STOP_WAIT:?}")]
    StillRunning { pid: u32 },
}

/// Ends an attach: `target` is a vhci port number, or a device as `attach`
/// takes it (key, bus path, VID:PID) naming one of this user's attach
/// processes. An attached device is detached from its port (its process
/// then ends by itself); a process between reconnects, which holds no port,
/// is stopped with SIGTERM. Returns what was done, in words.
pub async fn detach(vhci_root: &Path, target: &str) -> Result<String, DetachError> {
    if let Ok(port) = target.parse::<u32>() {
        vhci::detach(vhci_root, port)?;
        return Ok(format!("detached vhci port {port}"));
    }
    let records = list().map_err(DetachError::Records)?;
    detach_record(vhci_root, &records, target).await
}

async fn detach_record(
    vhci_root: &Path,
    records: &[AttachRecord],
    target: &str,
) -> Result<String, DetachError> {
    let record = match client::named_by(records, |r| &r.device, target).as_slice() {
        [one] => *one,
        [] => {
            let running = if records.is_empty() {
                "none runs".to_string()
            } else {
                let devices: Vec<String> = records.iter().map(|r| r.device.to_string()).collect();
                format!("running: {}", devices.join(", "))
            };
            return Err(DetachError::NoAttach {
                spec: target.into(),
                running,
            });
        }
        many => {
            let candidates: Vec<String> = many.iter().map(|r| describe(r)).collect();
            return Err(DetachError::Ambiguous {
                spec: target.into(),
                candidates: candidates.join("; "),
            });
        }
    };
    if let Some(slot) = record.attached
        && vhci::ports(vhci_root)?.iter().any(|port| slot.is(port))
    {
        vhci::detach(vhci_root, slot.port)?;
        return Ok(format!(
            "detached vhci port {} ({})",
            slot.port, record.device
        ));
    }
    stop(record).await?;
    Ok(format!(
        "stopped the attach of {} (pid {}), which was not attached: {}",
        record.device, record.pid, record.state
    ))
}

/// One attach in a line: device, server, process, what it does.
pub fn describe(record: &AttachRecord) -> String {
    // Servers by the start of their EndpointId, as iroh shortens them.
    let server = record.server.get(..10).unwrap_or(&record.server);
    format!(
        "device {} of server {server}… (pid {}): {}",
        record.device, record.pid, record.state
    )
}

/// SIGTERM to the attach process, then waits until it is gone. Through a
/// pidfd taken before the process is checked once more: should the attach
/// end in between and its pid go to another process, the signal cannot
/// reach that one.
async fn stop(record: &AttachRecord) -> Result<(), DetachError> {
    let pid = record.pid;
    let failed = |source: std::io::Error| DetachError::Signal { pid, source };
    let Some(process) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Ok(());
    };
    let pidfd = match rustix::process::pidfd_open(process, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(failed(e.into())),
    };
    if running_since(pid) != Some(record.started) {
        return Ok(());
    }
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::TERM)
        .map_err(|e| failed(e.into()))?;
    // A pidfd turns readable when its process has ended.
    // SAFETY: `pidfd` is an open pidfd owned by the AsyncFd for its whole life.
    let ended = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| failed(e.into()))?;
    match tokio::time::timeout(STOP_WAIT, ended.readable()).await {
        Ok(_) => Ok(()),
        Err(_) => Err(DetachError::StillRunning { pid }),
    }
}

/// The user's runtime directory, if set to an absolute path (an empty or
/// relative one would put records wherever the command runs).
fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
}

/// Where attach records live.
fn records_dir() -> PathBuf {
    runtime_dir()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("p2p-usb-{}", nix::unistd::geteuid())))
        .join("p2p-usb")
        .join("attached")
}

/// The directory [`records_dir`] lives in and that is trusted as it is.
fn records_base() -> PathBuf {
    runtime_dir().unwrap_or_else(std::env::temp_dir)
}

/// An error unless `dir` lies below `base`.
fn below(base: &Path, dir: &Path) -> std::io::Result<()> {
    if dir.starts_with(base) {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{} is not below {}",
            dir.display(),
            base.display()
        )))
    }
}

/// Creates `dir` below `base` owner-only (0700), then checks it as
/// [`check_private_dir`] does.
fn create_private_dir(base: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    below(base, dir)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    check_private_dir(base, dir)
}

/// Without XDG_RUNTIME_DIR the records live under the shared temporary
/// directory, where another user could have planted `/tmp/p2p-usb-UID` (or
/// a symlink) to have us write, read or delete records in a place of their
/// choosing: every component of `dir` below `base` must be a real directory
/// owned by us and writable by nobody else.
fn check_private_dir(base: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    below(base, dir)?;
    let uid = nix::unistd::geteuid().as_raw();
    let mut path = dir;
    while path != base {
        let meta = std::fs::symlink_metadata(path)?;
        if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{} is not a private directory of uid {uid}",
                path.display()
            )));
        }
        let Some(parent) = path.parent() else { break };
        path = parent;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_go_only_into_private_directories() {
        let base = tempfile::tempdir().unwrap();
        let dir = base
            .path()
            .join("p2p-usb-1")
            .join("p2p-usb")
            .join("attached");
        create_private_dir(base.path(), &dir).unwrap();
        let mode = std::fs::metadata(base.path().join("p2p-usb-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");

        // Planted by someone else: writable by others. Neither written nor read.
        let planted = base.path().join("p2p-usb-2");
        let inside = planted.join("p2p-usb").join("attached");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(create_private_dir(base.path(), &inside).is_err());
        assert!(check_private_dir(base.path(), &inside).is_err());

        // A symlink to a place of someone else's choosing.
        let target = base.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, base.path().join("p2p-usb-3")).unwrap();
        let linked = base.path().join("p2p-usb-3").join("x");
        assert!(create_private_dir(base.path(), &linked).is_err());
        assert!(check_private_dir(base.path(), &linked).is_err());

        assert!(create_private_dir(base.path(), Path::new("/elsewhere/p2p-usb")).is_err());
    }

    fn record(pid: u32, started: u64, device: &str) -> AttachRecord {
        AttachRecord {
            pid,
            started,
            server: "ab".repeat(32),
            state: "attached".into(),
            attached: Some(VhciSlot {
                port: 3,
                devid: 0x0001_0002,
            }),
            device: device.parse().unwrap(),
        }
    }

    const KBD: &str = "1-2/0627:0001/42";

    #[test]
    fn only_records_of_running_processes_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mine = record(me, running_since(me).unwrap(), KBD);
        let write = |name: &str, record: &AttachRecord| {
            std::fs::write(dir.path().join(name), toml::to_string(record).unwrap()).unwrap();
        };
        write(&me.to_string(), &mine);
        // The pid is running, but it is another process than the one that
        // wrote the record.
        write("1", &record(1, running_since(1).unwrap_or(0) + 1, KBD));
        // A pid that is not running.
        write("999999999", &record(999_999_999, 5, KBD));
        std::fs::write(dir.path().join("77"), "not a record").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "left alone").unwrap();

        assert_eq!(list_in(dir.path()), vec![mine]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [me.to_string(), "notes.txt".into()]);
    }

    #[test]
    fn an_ended_process_not_yet_reaped_is_not_running() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped: a zombie until `wait`.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(running_since(pid), None);
        child.wait().unwrap();
        assert!(running_since(std::process::id()).is_some());
    }

    #[tokio::test]
    async fn detach_names_exactly_one_attach() {
        let vhci = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let started = running_since(me).unwrap();
        let records = [
            record(me, started, KBD),
            record(me, started, "1-3/0403:6001/A1"),
            record(me, started, "1-4/0403:6001/B2"),
        ];
        match detach_record(vhci.path(), &records, "dead:beef").await {
            Err(DetachError::NoAttach { spec, running }) => {
                assert_eq!(spec, "dead:beef");
                assert!(
                    running.contains(KBD) && running.contains("1-4/0403:6001/B2"),
                    "{running}"
                );
            }
            other => panic!("{other:?}"),
        }
        match detach_record(vhci.path(), &records, "0403:6001").await {
            Err(DetachError::Ambiguous { candidates, .. }) => {
                assert!(candidates.contains("1-3/0403:6001/A1"), "{candidates}");
                assert!(candidates.contains("1-4/0403:6001/B2"), "{candidates}");
            }
            other => panic!("{other:?}"),
        }
        // The same device through two servers.
        let mut twice = records[0].clone();
        twice.server = "cd".repeat(32);
        let both = [records[0].clone(), twice];
        assert!(matches!(
            detach_record(vhci.path(), &both, "1-2").await,
            Err(DetachError::Ambiguous { .. })
        ));
    }

    #[tokio::test]
    async fn a_process_between_reconnects_is_stopped_by_signal() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut held = record(pid, running_since(pid).unwrap(), KBD);
        held.attached = None;
        // Reaped as soon as it ends, as a shell reaps an attach it started.
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        stop(&held).await.unwrap();
        assert_eq!(reaper.join().unwrap().signal(), Some(libc::SIGTERM));
    }
}
