//! The kernel's `vhci_hcd` (USB/IP client host controller) sysfs interface.
//!
//! Attaching a remote device means handing the kernel a connected stream
//! socket through `vhci_hcd.0/attach`; from then on the kernel speaks USB/IP
//! on it. Formats follow `drivers/usb/usbip/vhci_sysfs.c` and the reference
//! user space in `tools/usb/usbip/libsrc/vhci_driver.c`:
//!
//! * Every attribute (`attach`, `detach`, `nports`, `status`, `status.N`) lives
//!   on the first controller only (`vhci_hcd.0`); `status.N` describes
//!   controller `vhci_hcd.N`.
//! * Port numbers are global: controller `N` owns ports
//!   `N*2*P .. N*2*P + P` on its high-speed hub and the next `P` on its
//!   SuperSpeed hub (`P` ports per hub, 15 on Debian). The kernel splits a
//!   port number itself (`port / (2*P)` = controller, `port % P` = root-hub
//!   port), so one `attach`/`detach` file serves every controller.
//! * Status lines: `"%2s  %04u %03u %03u %08x %06u %s"` =
//!   hub (`hs`/`ss`), port, status, speed, devid (hex), sockfd, local busid,
//!   after the header `hub port sta spd dev      sockfd local_busid`.
//!
//! Every function takes the sysfs directory that holds `vhci_hcd.N` so tests
//! can point it at a fake tree.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// Where the kernel registers `vhci_hcd.N` (platform devices).
pub const DEFAULT_SYSFS_ROOT: &str = "/sys/devices/platform";

/// Where `vhci_hcd.N` would live if the driver moves to the faux bus
/// (a conversion proposed upstream in 2025); checked by [`default_root`].
pub const FAUX_SYSFS_ROOT: &str = "/sys/devices/faux";

/// `VDEV_ST_NULL` from `include/uapi/linux/usbip.h`: the port has no device.
pub const VDEV_ST_NULL: u32 = 4;

/// `USB_SPEED_SUPER` (`enum usb_device_speed`); this and faster go on the
/// SuperSpeed hub.
pub const USB_SPEED_SUPER: u32 = 5;

/// `USB_SPEED_SUPER_PLUS`, the fastest speed the kernel's `attach` accepts.
pub const USB_SPEED_SUPER_PLUS: u32 = 6;

/// The controller whose sysfs directory carries all the attributes.
const ATTR_DEVICE: &str = "vhci_hcd.0";

/// `VHCI_MAX_NR_HCS`: upper bound on `status.N` files worth probing.
const MAX_CONTROLLERS: u32 = 128;

/// How often [`attach_free_port`] retries when another attacher wins a port.
const ATTACH_RETRIES: usize = 16;

/// Which of a controller's two root hubs a port belongs to; a device must be
/// attached to a port of the hub matching its speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hub {
    /// USB 2 root hub (`hs`): low, full, high and wireless speed devices.
    HighSpeed,
    /// USB 3 root hub (`ss`): SuperSpeed and SuperSpeed+ devices.
    SuperSpeed,
}

impl Hub {
    /// The hub a device of `speed_code` goes on, as the kernel's
    /// `attach_store` decides (`speed >= USB_SPEED_SUPER` means SuperSpeed).
    pub fn for_speed(speed_code: u32) -> Hub {
        if speed_code >= USB_SPEED_SUPER {
            Hub::SuperSpeed
        } else {
            Hub::HighSpeed
        }
    }
}

impl fmt::Display for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hub::HighSpeed => "high-speed (USB 2)",
            Hub::SuperSpeed => "SuperSpeed (USB 3)",
        })
    }
}

/// One virtual root-hub port as reported by `status`/`status.N`; what callers
/// need to pick a port and to see what is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhciPort {
    /// Directory holding `attach`/`detach` (always `vhci_hcd.0`).
    pub sysfs_dir: PathBuf,
    /// Index `N` of the `vhci_hcd.N` controller owning the port.
    pub controller: u32,
    /// Root hub of the port.
    pub hub: Hub,
    /// Global port number, as written to `attach`/`detach`.
    pub port: u32,
    /// `VDEV_ST_*`: 4 free, 5 attached (address not yet assigned), 6 used, 7 error.
    pub status: u32,
    /// `enum usb_device_speed` of the attached device (0 when free).
    pub speed: u32,
    /// USB/IP devid of the attached device (0 when free).
    pub devid: u32,
    /// Socket fd number in the attaching process (0 when free).
    pub sockfd: u32,
    /// Local bus id of the attached device (`0-0` when free).
    pub local_busid: String,
}

impl VhciPort {
    /// Whether a device can be attached here (`status == VDEV_ST_NULL`).
    pub fn is_free(&self) -> bool {
        self.status == VDEV_ST_NULL
    }
}

/// Why a vhci operation failed, phrased for the person who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum VhciError {
    /// The driver is not loaded, so there is nothing to attach to.
    #[error("vhci_hcd is not loaded ({path} is missing); run `modprobe vhci-hcd`")]
    NotLoaded {
        /// The path that was expected to exist.
        path: PathBuf,
    },
    /// Every port of the needed hub already carries a device.
    #[error(
        "no free vhci_hcd port on the {hub} hub; detach a device or load vhci-hcd with more controllers (num_controllers=)"
    )]
    NoFreePort {
        /// The hub the device needs.
        hub: Hub,
    },
    /// The caller may not write the attribute.
    #[error(
        "permission denied writing {path}: attaching USB/IP devices needs root or membership in group p2p-usb-attach"
    )]
    PermissionDenied {
        /// The attribute written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another attacher took the port between our status read and our write
    /// (kernel `EBUSY`); pick another port.
    #[error("vhci_hcd port {port} was taken by someone else meanwhile")]
    PortBusy {
        /// The port that turned out to be in use.
        port: u32,
    },
    /// The kernel refused the request (e.g. `EINVAL`: bad fd, not a stream
    /// socket, port in use or not attached).
    #[error("kernel rejected {written:?} written to {path}: {source}")]
    Rejected {
        /// The attribute written.
        path: PathBuf,
        /// The exact string written.
        written: String,
        /// The errno the write returned.
        #[source]
        source: io::Error,
    },
    /// The speed code is outside what `attach` accepts (1..=6).
    #[error("unsupported USB speed code {0} (expected 1..=6, enum usb_device_speed)")]
    InvalidSpeed(u32),
    /// The port is on the wrong hub for the speed; the kernel would silently
    /// use a different port.
    #[error("port {port} is on the {hub} hub but a device of speed {speed} needs the {needed} hub")]
    HubMismatch {
        /// The requested port.
        port: u32,
        /// Its hub.
        hub: Hub,
        /// The device speed code.
        speed: u32,
        /// The hub the speed needs.
        needed: Hub,
    },
    /// The port number does not exist on this machine.
    #[error("vhci_hcd has no port {0}")]
    NoSuchPort(u32),
    /// A status file has a line this code does not understand.
    #[error("cannot parse line {line} of {path}: {text:?}")]
    Parse {
        /// The status file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The offending line.
        text: String,
    },
    /// Any other I/O failure.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The sysfs root to use on this machine: [`DEFAULT_SYSFS_ROOT`], or
/// [`FAUX_SYSFS_ROOT`] when only that one has `vhci_hcd.0`.
pub fn default_root() -> PathBuf {
    [DEFAULT_SYSFS_ROOT, FAUX_SYSFS_ROOT]
        .into_iter()
        .map(PathBuf::from)
        .find(|r| r.join(ATTR_DEVICE).is_dir())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SYSFS_ROOT))
}

/// All ports of all controllers, in port order; the basis for choosing a
/// port and for listing what is attached.
pub fn ports(root: &Path) -> Result<Vec<VhciPort>, VhciError> {
    let dir = attr_dir(root)?;
    let mut out = Vec::new();
    for n in 0..MAX_CONTROLLERS {
        let path = if n == 0 {
            dir.join("status")
        } else {
            dir.join(format!("status.{n}"))
        };
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound && n > 0 => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VhciError::NotLoaded { path });
            }
            Err(source) => return Err(VhciError::Io { path, source }),
        };
        parse_status(&text, &dir, n, &path, &mut out)?;
    }
    Ok(out)
}

/// The first free port on the hub matching `speed_code`, like
/// `usbip_vhci_get_free_port` (but SuperSpeed+ also goes to the SS hub, as
/// the kernel requires).
pub fn find_free_port(root: &Path, speed_code: u32) -> Result<VhciPort, VhciError> {
    check_speed(speed_code)?;
    let hub = Hub::for_speed(speed_code);
    ports(root)?
        .into_iter()
        .find(|p| p.hub == hub && p.is_free())
        .ok_or(VhciError::NoFreePort { hub })
}

/// Hands the connected stream socket `sock` to the kernel as device `devid`
/// on `port`. The kernel resolves the fd number in the calling process, so
/// `sock` must be open in this process; after success the kernel holds its
/// own reference and the caller may close its fd.
pub fn attach(
    port: &VhciPort,
    sock: BorrowedFd<'_>,
    devid: u32,
    speed_code: u32,
) -> Result<(), VhciError> {
    check_speed(speed_code)?;
    let needed = Hub::for_speed(speed_code);
    if port.hub != needed {
        return Err(VhciError::HubMismatch {
            port: port.port,
            hub: port.hub,
            speed: speed_code,
            needed,
        });
    }
    let written = format!(
        "{} {} {} {}",
        port.port,
        sock.as_raw_fd(),
        devid,
        speed_code
    );
    write_attr(&port.sysfs_dir.join("attach"), &written, Some(port.port))
}

/// Finds a free port and attaches `sock` there, retrying with another port
/// when a concurrent attacher wins the race (as `usbip attach` does).
/// Returns the port used, as it was before the attach.
pub fn attach_free_port(
    root: &Path,
    sock: BorrowedFd<'_>,
    devid: u32,
    speed_code: u32,
) -> Result<VhciPort, VhciError> {
    for _ in 0..ATTACH_RETRIES {
        let port = find_free_port(root, speed_code)?;
        match attach(&port, sock, devid, speed_code) {
            Ok(()) => return Ok(port),
            Err(VhciError::PortBusy { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(VhciError::NoFreePort {
        hub: Hub::for_speed(speed_code),
    })
}

/// Detaches whatever is on global `port`. Written to `vhci_hcd.0/detach`
/// whatever the controller: the kernel derives the controller from the number.
pub fn detach(root: &Path, port: u32) -> Result<(), VhciError> {
    let found = ports(root)?
        .into_iter()
        .find(|p| p.port == port)
        .ok_or(VhciError::NoSuchPort(port))?;
    write_attr(&found.sysfs_dir.join("detach"), &port.to_string(), None)
}

fn attr_dir(root: &Path) -> Result<PathBuf, VhciError> {
    let dir = root.join(ATTR_DEVICE);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(VhciError::NotLoaded { path: dir })
    }
}

fn check_speed(speed_code: u32) -> Result<(), VhciError> {
    if (1..=USB_SPEED_SUPER_PLUS).contains(&speed_code) {
        Ok(())
    } else {
        Err(VhciError::InvalidSpeed(speed_code))
    }
}

fn parse_status(
    text: &str,
    dir: &Path,
    controller: u32,
    path: &Path,
    out: &mut Vec<VhciPort>,
) -> Result<(), VhciError> {
    for (i, line) in text.lines().enumerate() {
        let first = line.split_whitespace().next();
        if matches!(first, None | Some("hub")) {
            continue;
        }
        let port = parse_line(line, dir, controller).ok_or_else(|| VhciError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            text: line.to_string(),
        })?;
        out.push(port);
    }
    Ok(())
}

fn parse_line(line: &str, dir: &Path, controller: u32) -> Option<VhciPort> {
    let mut f = line.split_whitespace();
    let hub = match f.next()? {
        "hs" => Hub::HighSpeed,
        "ss" => Hub::SuperSpeed,
        _ => return None,
    };
    let port = f.next()?.parse().ok()?;
    let status = f.next()?.parse().ok()?;
    let speed = f.next()?.parse().ok()?;
    let devid = u32::from_str_radix(f.next()?, 16).ok()?;
    // Used ports print "%06u"; a not-ready controller prints 16 zeros.
    let sockfd = f.next()?.parse().ok()?;
    let local_busid = f.next()?.to_string();
    Some(VhciPort {
        sysfs_dir: dir.to_path_buf(),
        controller,
        hub,
        port,
        status,
        speed,
        devid,
        sockfd,
        local_busid,
    })
}

/// One `write(2)` of `text`, as sysfs stores expect; errors mapped for humans.
fn write_attr(path: &Path, text: &str, port: Option<u32>) -> Result<(), VhciError> {
    let result = OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write(text.as_bytes()));
    match result {
        Ok(n) if n == text.len() => Ok(()),
        Ok(n) => Err(VhciError::Rejected {
            path: path.to_path_buf(),
            written: text.to_string(),
            source: io::Error::other(format!("short write: {n} of {} bytes", text.len())),
        }),
        Err(e) => Err(map_write_error(path, text, port, e)),
    }
}

fn map_write_error(path: &Path, text: &str, port: Option<u32>, e: io::Error) -> VhciError {
    match (e.kind(), e.raw_os_error(), port) {
        (io::ErrorKind::NotFound, _, _) => VhciError::NotLoaded {
            path: path.to_path_buf(),
        },
        (io::ErrorKind::PermissionDenied, _, _) => VhciError::PermissionDenied {
            path: path.to_path_buf(),
            source: e,
        },
        (_, Some(code), Some(port)) if code == nix::libc::EBUSY => VhciError::PortBusy { port },
        _ => VhciError::Rejected {
            path: path.to_path_buf(),
            written: text.to_string(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const HC_PORTS: u32 = 15;
    const HEADER: &str = "hub port sta spd dev      sockfd local_busid\n";

    /// An attached device: (speed, devid, sockfd, local busid).
    type Dev = (u32, u32, u32, &'static str);

    /// One status line exactly as `port_show_vhci` prints it.
    fn line(hub: &str, port: u32, used: Option<Dev>) -> String {
        match used {
            Some((spd, devid, fd, busid)) => {
                format!("{hub}  {port:04} 006 {spd:03} {devid:08x} {fd:06} {busid}\n")
            }
            None => format!("{hub}  {port:04} 004 000 00000000 000000 0-0\n"),
        }
    }

    /// A `status[.n]` file; `used` maps global port numbers to devices.
    fn status(n: u32, used: &[(u32, Dev)]) -> String {
        let mut s = HEADER.to_string();
        for (hub, base) in [("hs", 0), ("ss", HC_PORTS)] {
            for i in 0..HC_PORTS {
                let port = n * 2 * HC_PORTS + base + i;
                let dev = used.iter().find(|(p, _)| *p == port).map(|(_, d)| *d);
                s.push_str(&line(hub, port, dev));
            }
        }
        s
    }

    /// A fake `/sys/devices/platform` with two controllers.
    fn tree(used: &[(u32, Dev)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let d0 = root.path().join("vhci_hcd.0");
        fs::create_dir(&d0).unwrap();
        fs::create_dir(root.path().join("vhci_hcd.1")).unwrap();
        fs::write(d0.join("status"), status(0, used)).unwrap();
        fs::write(d0.join("status.1"), status(1, used)).unwrap();
        fs::write(d0.join("nports"), format!("{}\n", 4 * HC_PORTS)).unwrap();
        fs::write(d0.join("attach"), "").unwrap();
        fs::write(d0.join("detach"), "").unwrap();
        root
    }

    #[test]
    fn parses_free_and_used_ports_on_both_hubs_and_controllers() {
        let root = tree(&[
            (2, (3, 0x0001_0002, 3, "3-3")),
            (46, (5, 0x0002_0005, 7, "4-2")),
        ]);
        let ports = ports(root.path()).unwrap();
        assert_eq!(ports.len(), 60);
        let hs = &ports[2];
        assert_eq!((hs.controller, hs.hub, hs.port), (0, Hub::HighSpeed, 2));
        assert_eq!(
            (hs.status, hs.speed, hs.devid, hs.sockfd),
            (6, 3, 0x0001_0002, 3)
        );
        assert_eq!(hs.local_busid, "3-3");
        assert!(!hs.is_free());
        let ss = ports.iter().find(|p| p.port == 46).unwrap();
        assert_eq!((ss.controller, ss.hub, ss.status), (1, Hub::SuperSpeed, 6));
        assert_eq!((ss.speed, ss.devid, ss.sockfd), (5, 0x0002_0005, 7));
        assert_eq!(ss.local_busid, "4-2");
        let free = &ports[15];
        assert_eq!(
            (free.controller, free.hub, free.port),
            (0, Hub::SuperSpeed, 15)
        );
        assert!(free.is_free() && free.local_busid == "0-0");
        assert_eq!(ports[30].hub, Hub::HighSpeed);
        assert_eq!(ports[30].controller, 1);
        assert!(
            ports
                .iter()
                .all(|p| p.sysfs_dir == root.path().join("vhci_hcd.0"))
        );
        assert_eq!(ports.iter().filter(|p| !p.is_free()).count(), 2);
    }

    #[test]
    fn parses_not_ready_controller_lines() {
        let root = tree(&[]);
        let not_ready = format!(
            "{HEADER}hs  0030 005 000 00000000 0000000000000000 0-0\n\
             ss  0045 005 000 00000000 0000000000000000 0-0\n"
        );
        fs::write(root.path().join("vhci_hcd.0/status.1"), not_ready).unwrap();
        let ports = ports(root.path()).unwrap();
        assert_eq!(ports.len(), 32);
        assert_eq!((ports[30].port, ports[30].status), (30, 5));
        assert!(!ports[31].is_free());
    }

    #[test]
    fn odd_status_line_is_a_parse_error() {
        let root = tree(&[]);
        fs::write(
            root.path().join("vhci_hcd.0/status.1"),
            "hub ...\nhs  12x\n",
        )
        .unwrap();
        let err = ports(root.path()).unwrap_err();
        assert!(matches!(err, VhciError::Parse { line: 2, .. }), "{err}");
    }

    #[test]
    fn free_port_selection_follows_speed() {
        let dev = (3, 1, 3, "3-1");
        let mut used: Vec<_> = (0..HC_PORTS).map(|p| (p, dev)).collect();
        used.push((15, (5, 2, 4, "4-1")));
        let root = tree(&used);
        for speed in 1..=4 {
            let p = find_free_port(root.path(), speed).unwrap();
            assert_eq!((p.port, p.hub, p.controller), (30, Hub::HighSpeed, 1));
        }
        for speed in [5, 6] {
            let p = find_free_port(root.path(), speed).unwrap();
            assert_eq!((p.port, p.hub, p.controller), (16, Hub::SuperSpeed, 0));
        }
        assert!(matches!(
            find_free_port(root.path(), 0),
            Err(VhciError::InvalidSpeed(0))
        ));
        assert!(matches!(
            find_free_port(root.path(), 7),
            Err(VhciError::InvalidSpeed(7))
        ));
    }

    #[test]
    fn no_free_port() {
        let dev = (5, 1, 3, "4-1");
        let used: Vec<_> = (0..4 * HC_PORTS).map(|p| (p, dev)).collect();
        let root = tree(&used);
        let err = find_free_port(root.path(), 5).unwrap_err();
        assert!(
            matches!(
                err,
                VhciError::NoFreePort {
                    hub: Hub::SuperSpeed
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn attach_writes_exact_string_to_vhci_hcd_0() {
        let root = tree(&[]);
        let sock = fs::File::open("/dev/null").unwrap();
        let fd = sock.as_raw_fd();
        let port = find_free_port(root.path(), 3).unwrap();
        attach(&port, sock.as_fd(), 0x0001_0002, 3).unwrap();
        let written = fs::read_to_string(root.path().join("vhci_hcd.0/attach")).unwrap();
        assert_eq!(written, format!("0 {fd} 65538 3"));

        // A port of controller 1's SS hub still goes through vhci_hcd.0/attach.
        fs::write(root.path().join("vhci_hcd.0/attach"), "").unwrap();
        let ports = ports(root.path()).unwrap();
        let p45 = ports.iter().find(|p| p.port == 45).unwrap();
        assert_eq!((p45.controller, p45.hub), (1, Hub::SuperSpeed));
        attach(p45, sock.as_fd(), 7, 5).unwrap();
        let written = fs::read_to_string(root.path().join("vhci_hcd.0/attach")).unwrap();
        assert_eq!(written, format!("45 {fd} 7 5"));
        assert!(!root.path().join("vhci_hcd.1/attach").exists());
    }

    #[test]
    fn attach_refuses_wrong_hub() {
        let root = tree(&[]);
        let sock = fs::File::open("/dev/null").unwrap();
        let hs = find_free_port(root.path(), 3).unwrap();
        let err = attach(&hs, sock.as_fd(), 1, 5).unwrap_err();
        assert!(
            matches!(err, VhciError::HubMismatch { port: 0, .. }),
            "{err}"
        );
        let attach_file = root.path().join("vhci_hcd.0/attach");
        assert_eq!(fs::read_to_string(attach_file).unwrap(), "");
    }

    #[test]
    fn attach_free_port_picks_and_writes() {
        let root = tree(&[(0, (3, 1, 3, "3-1"))]);
        let sock = fs::File::open("/dev/null").unwrap();
        let p = attach_free_port(root.path(), sock.as_fd(), 9, 2).unwrap();
        assert_eq!(p.port, 1);
        let written = fs::read_to_string(root.path().join("vhci_hcd.0/attach")).unwrap();
        assert_eq!(written, format!("1 {} 9 2", sock.as_raw_fd()));
    }

    #[test]
    fn detach_writes_global_port_number() {
        let root = tree(&[(46, (5, 2, 4, "4-1"))]);
        detach(root.path(), 46).unwrap();
        let written = fs::read_to_string(root.path().join("vhci_hcd.0/detach")).unwrap();
        assert_eq!(written, "46");
        assert!(matches!(
            detach(root.path(), 60),
            Err(VhciError::NoSuchPort(60))
        ));
    }

    #[test]
    fn not_loaded() {
        let root = tempfile::tempdir().unwrap();
        let err = ports(root.path()).unwrap_err();
        assert!(matches!(err, VhciError::NotLoaded { .. }));
        assert!(err.to_string().contains("modprobe vhci-hcd"), "{err}");
        assert!(matches!(
            find_free_port(root.path(), 3),
            Err(VhciError::NotLoaded { .. })
        ));
        assert!(matches!(
            detach(root.path(), 0),
            Err(VhciError::NotLoaded { .. })
        ));
    }

    #[test]
    fn write_errors_are_mapped() {
        let p = Path::new("/sys/devices/platform/vhci_hcd.0/attach");
        let errno = |e: nix::errno::Errno| io::Error::from_raw_os_error(e as i32);
        let e = map_write_error(p, "0 3 1 3", Some(0), errno(nix::errno::Errno::EACCES));
        assert!(e.to_string().contains("p2p-usb-attach"), "{e}");
        let e = map_write_error(p, "0 3 1 3", Some(0), errno(nix::errno::Errno::EPERM));
        assert!(matches!(e, VhciError::PermissionDenied { .. }), "{e}");
        let e = map_write_error(p, "0 3 1 3", Some(0), errno(nix::errno::Errno::EBUSY));
        assert!(matches!(e, VhciError::PortBusy { port: 0 }), "{e}");
        let e = map_write_error(p, "0 3 1 3", Some(0), errno(nix::errno::Errno::EINVAL));
        assert!(matches!(e, VhciError::Rejected { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("\"0 3 1 3\"") && msg.contains("Invalid argument"),
            "{msg}"
        );
        let e = map_write_error(p, "0", None, errno(nix::errno::Errno::ENOENT));
        assert!(matches!(e, VhciError::NotLoaded { .. }), "{e}");
    }

    #[test]
    fn default_root_is_a_known_location() {
        let r = default_root();
        assert!(r == Path::new(DEFAULT_SYSFS_ROOT) || r == Path::new(FAUX_SYSFS_ROOT));
    }
}
