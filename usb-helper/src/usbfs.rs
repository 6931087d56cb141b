//! Real devices through Linux usbfs, with `nusb`.
//!
//! Access comes from the udev rule that gives the helper's group read-write on
//! `/dev/bus/usb/*/*`; no capability is needed. What usbip-host does in the
//! kernel is done here with usbfs calls: every interface of the active
//! configuration is claimed with its kernel driver detached (after a device
//! reset, as on a fresh plug-in), SET_CONFIGURATION / SET_INTERFACE /
//! CLEAR_HALT / reset become the real operations, and the kernel drivers are
//! re-attached on close.
//!
//! nusb 0.2 can only cancel all transfers of an endpoint, so cancelling one
//! transfer cancels the endpoint's queue and transparently resubmits the other
//! transfers that had not moved any data yet, keeping their order (one that
//! had moved some ends with an I/O error and what moved). A bulk or
//! interrupt transfer whose `timeout_ms` runs out (counted from its
//! submission) is cancelled the same way and answered `Timeout`. Control
//! transfers cannot be cancelled in usbfs through nusb at all: a cancelled one
//! is answered `Cancelled` at once and its late result discarded; their
//! timeout is nusb's own.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use nusb::MaybeFuture;
use nusb::transfer::{
    Buffer, Bulk, BulkOrInterrupt, ControlIn, ControlOut, ControlType, EndpointDirection, In,
    Interrupt, Out, Recipient, TransferError,
};
use p2p_usb_common::descriptors;
use p2p_usb_common::proto::{
    Completion, DeviceInfo, DeviceKey, EndpointType, Reply, RequestId, Speed, Transfer,
    TransferData, UsbError,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::{BackendError, BackendEvent, HEALTH_TIMEOUT, HOTPLUG_QUEUE, hotplug_changes};
use crate::transfer::{self, ReplySink};

/// How often the device list is re-read even without hotplug events (udevd
/// may be missing, e.g. in a container).
const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How soon the bus is looked at again after a device was caught in a reset:
/// a reset takes tens of milliseconds, so one more look usually finds it
/// done, without rescanning the bus in a tight loop meanwhile.
const RESET_SETTLE: Duration = Duration::from_millis(250);
/// Control transfers without a timeout of their own end after this long, so a
/// control transfer abandoned by a cancel cannot hold endpoint 0 forever.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// A device as found on the bus.
#[derive(Clone)]
struct Found {
    nusb: nusb::DeviceInfo,
    info: DeviceInfo,
}

/// Real USB devices.
pub struct UsbfsBackend {
    found: Arc<Mutex<Vec<Found>>>,
    events: broadcast::Sender<BackendEvent>,
}

impl UsbfsBackend {
    /// Scans the bus and starts watching for hotplug. Must run inside the
    /// tokio runtime.
    pub fn start() -> Result<UsbfsBackend, BackendError> {
        let (events, _) = broadcast::channel(HOTPLUG_QUEUE);
        let watch = match nusb::watch_devices() {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!("no hotplug events ({e}); rescanning every {RESCAN_INTERVAL:?}");
                None
            }
        };
        let uevents = match kernel_uevents() {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!("cannot listen to kernel uevents ({e})");
                None
            }
        };
        let (present, resetting) = while_resetting(&[], scan(), |f| &f.info);
        let found = Arc::new(Mutex::new(present));
        tokio::spawn(watch_loop(
            watch,
            uevents,
            found.clone(),
            events.clone(),
            resetting,
        ));
        Ok(UsbfsBackend { found, events })
    }

    /// Devices currently present.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.found
            .lock()
            .expect("found lock")
            .iter()
            .map(|f| f.info.clone())
            .collect()
    }

    /// Hotplug events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    /// Opens the device and claims every interface of its active configuration.
    pub async fn open(&self, key: &DeviceKey) -> Result<UsbfsDevice, UsbError> {
        let found = self
            .found
            .lock()
            .expect("found lock")
            .iter()
            .find(|f| f.info.key == *key)
            .cloned()
            .ok_or_else(|| UsbError::NotFound(key.to_string()))?;
        let device = found.nusb.open().await.map_err(map_error)?;
        UsbfsDevice::start(device, found.info).await
    }

    /// Gives interfaces without a driver back to the kernel, for the devices
    /// `wanted` picks. A helper that was killed while a client used a device
    /// leaves it without its local drivers: the kernel drops the claims with
    /// the process but does not probe the interfaces again, so a stick would
    /// have no block device until someone rebound it by hand.
    pub async fn hand_back_driverless(&self, wanted: impl Fn(&DeviceInfo) -> bool) {
        let candidates: Vec<(Found, Vec<(u8, String)>)> = self
            .found
            .lock()
            .expect("found lock")
            .iter()
            .filter(|f| wanted(&f.info))
            .map(|f| (f.clone(), driverless_interfaces(&f.info)))
            .filter(|(_, driverless)| !driverless.is_empty())
            .collect();
        for (found, driverless) in candidates {
            let device = match found.nusb.open().await {
                Ok(device) => device,
                Err(e) => {
                    tracing::debug!(device = %found.info.key, "cannot open to hand back drivers: {e}");
                    continue;
                }
            };
            for (number, name) in driverless {
                let handle = device.clone();
                let attached =
                    tokio::task::spawn_blocking(move || handle.attach_kernel_driver(number)).await;
                match (attached, interface_driver(&name)) {
                    (Ok(Ok(())), Some(driver)) => tracing::info!(
                        device = %found.info.key,
                        "interface {name} had no driver (left so by an earlier helper?); handed back to {driver}"
                    ),
                    (Ok(Ok(())), None) => {
                        tracing::debug!("interface {name}: no kernel driver matches it")
                    }
                    (Ok(Err(e)), _) => {
                        tracing::debug!("cannot hand interface {name} back to the kernel: {e}")
                    }
                    (Err(_), _) => {}
                }
            }
        }
    }

    /// True if the bus can still be listed within [`HEALTH_TIMEOUT`].
    pub async fn healthy(&self) -> bool {
        let listing = tokio::task::spawn_blocking(|| nusb::list_devices().wait().is_ok());
        matches!(
            tokio::time::timeout(HEALTH_TIMEOUT, listing).await,
            Ok(Ok(true))
        )
    }
}

fn scan() -> Vec<Found> {
    match nusb::list_devices().wait() {
        Ok(list) => list
            .filter(|nusb| !on_vhci(nusb.sysfs_path()))
            .filter_map(|nusb| {
                let info = describe(&nusb)
                    .map_err(|e| tracing::warn!("skipping {:?}: {e}", nusb.sysfs_path()))
                    .ok()?;
                Some(Found { nusb, info })
            })
            .collect(),
        Err(e) => {
            tracing::debug!("cannot list USB devices: {e}");
            Vec::new()
        }
    }
}

/// Devices attached to this machine through USB/IP (`vhci_hcd`) are not ours
/// to offer: on a machine that is server and client at once the helper would
/// otherwise list every device a client attached here as a new local one
/// (with `auto_share` and a VID:PID ceiling, offered again: a loop), and a
/// VID:PID picked by a client would match twice.
fn on_vhci(sysfs_path: &Path) -> bool {
    sysfs_path.components().any(|c| {
        c.as_os_str()
            .to_str()
            .is_some_and(|name| name.starts_with("vhci_hcd."))
    })
}

/// The kernel's own uevents (netlink group 1). udevd's re-broadcasts, which
/// nusb's watch listens to, do not reach a helper in its own network
/// namespace (`PrivateNetwork=yes`); the kernel's do.
fn kernel_uevents() -> std::io::Result<AsyncFd<OwnedFd>> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 1))?;
    // SAFETY: `fd` is an open socket owned by the AsyncFd for its whole life.
    unsafe { AsyncFd::register(fd) }.map_err(|e| std::io::Error::other(e.to_string()))
}

/// Waits for a uevent of the USB subsystem.
async fn next_usb_uevent(socket: &AsyncFd<OwnedFd>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    loop {
        let mut guard = socket.readable().await?;
        match guard.try_io(|fd| {
            nix::sys::socket::recv(
                fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(Ok(n)) if buf[..n].split(|b| *b == 0).any(|f| f == b"SUBSYSTEM=usb") => {
                return Ok(());
            }
            Ok(Ok(_)) | Err(_) => continue,
            // The kernel had more uevents than the socket holds (after the
            // helper was held still, say): some were lost, so look now.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn watch_loop(
    mut watch: Option<nusb::hotplug::HotplugWatch>,
    mut uevents: Option<AsyncFd<OwnedFd>>,
    found: Arc<Mutex<Vec<Found>>>,
    events: broadcast::Sender<BackendEvent>,
    resetting: bool,
) {
    let mut next_look = next_look_after(resetting);
    loop {
        let hotplug = async {
            match watch.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        let uevent = async {
            match uevents.as_ref() {
                Some(socket) => next_usb_uevent(socket).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            event = hotplug => if event.is_none() { watch = None },
            result = uevent => match result {
                // Let the burst of uevents of one plug-in settle.
                Ok(()) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    tracing::warn!("kernel uevent socket failed ({e}); rescanning every {RESCAN_INTERVAL:?}");
                    uevents = None;
                }
            },
            _ = tokio::time::sleep(next_look) => {}
        }
        let scanned = tokio::task::spawn_blocking(scan).await.unwrap_or_default();
        // Events go out under the lock, after which the listing says the
        // same: a connection catching up reads the listing.
        let mut known = found.lock().expect("found lock");
        let (now, resetting) = while_resetting(&known, scanned, |f| &f.info);
        next_look = next_look_after(resetting);
        for change in hotplug_changes(&known, &now, |f| &f.info) {
            match &change {
                BackendEvent::Left(gone) => tracing::info!(
                    "device left: {} (bus {} address {})",
                    gone.key,
                    gone.bus_number,
                    gone.address
                ),
                BackendEvent::Arrived(new) => tracing::info!(
                    "device arrived: {} (bus {} address {}): {}",
                    new.key,
                    new.bus_number,
                    new.address,
                    new.display_name()
                ),
            }
            let _ = events.send(change);
        }
        *known = now;
    }
}

/// How long the watch waits for a reason to look at the bus again: soon if
/// the last look caught a device in a reset.
fn next_look_after(resetting: bool) -> Duration {
    if resetting {
        RESET_SETTLE
    } else {
        RESCAN_INTERVAL
    }
}

/// A device being reset (as every open here does) reads address 0 for a
/// moment. That is not a new plug-in: such a device keeps its entry from
/// `known`, which still opens, as a reset gives the device its address
/// back. One not known yet waits for the next look (its address-0 node
/// cannot be opened); a new device shows address 0 only while something
/// else resets it. Also says whether any device was caught resetting, so
/// the next look comes soon.
fn while_resetting<T: Clone>(
    known: &[T],
    scanned: Vec<T>,
    info: impl Fn(&T) -> &DeviceInfo,
) -> (Vec<T>, bool) {
    let mut resetting = false;
    let now = scanned
        .into_iter()
        .filter_map(|device| {
            if info(&device).address != 0 {
                return Some(device);
            }
            resetting = true;
            known
                .iter()
                .find(|k| info(k).key == info(&device).key)
                .cloned()
        })
        .collect();
    (now, resetting)
}

/// Builds the listing of a device from sysfs alone: no usbfs open, so
/// listing never wakes or disturbs a device.
fn describe(nusb: &nusb::DeviceInfo) -> Result<DeviceInfo, String> {
    let speed = match nusb.speed() {
        Some(nusb::Speed::Low) => Speed::Low,
        Some(nusb::Speed::Full) => Speed::Full,
        Some(nusb::Speed::High) => Speed::High,
        Some(nusb::Speed::Super) => Speed::Super,
        _ => Speed::SuperPlus,
    };
    let mut info = describe_sysfs(
        nusb.sysfs_path(),
        nusb.busnum(),
        nusb.device_address(),
        speed,
    )?;
    info.manufacturer = nusb.manufacturer_string().map(str::to_string);
    info.product = nusb.product_string().map(str::to_string);
    info.serial = nusb.serial_number().map(str::to_string);
    info.key.serial = info.serial.clone();
    Ok(info)
}

/// The sysfs part of [`describe`]: `descriptors` holds the device descriptor
/// followed by every configuration, `bConfigurationValue` the active one.
fn describe_sysfs(dir: &Path, bus: u8, address: u8, speed: Speed) -> Result<DeviceInfo, String> {
    let raw = std::fs::read(dir.join("descriptors")).map_err(|e| format!("descriptors: {e}"))?;
    let descriptor = descriptors::parse_device(&raw).map_err(|e| e.to_string())?;
    let mut configurations = Vec::new();
    let mut rest = raw.get(18..).unwrap_or_default();
    while rest.len() >= 9 {
        let config = descriptors::parse_configuration(rest).map_err(|e| e.to_string())?;
        let used = config.raw.len().max(9);
        configurations.push(config);
        rest = &rest[used.min(rest.len())..];
    }
    let active_configuration = std::fs::read_to_string(dir.join("bConfigurationValue"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let bus_path = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("sysfs path has no name")?
        .to_string();
    Ok(DeviceInfo {
        key: DeviceKey {
            bus_path,
            vid: descriptor.vendor_id,
            pid: descriptor.product_id,
            serial: None,
        },
        bus_number: bus,
        address,
        speed,
        descriptor,
        active_configuration,
        configurations,
        manufacturer: None,
        product: None,
        serial: None,
    })
}

/// Interfaces of the active configuration (number and sysfs name, e.g.
/// `2-1:1.0`) that no driver is bound to.
fn driverless_interfaces(info: &DeviceInfo) -> Vec<(u8, String)> {
    let Some(config) = info.active_config() else {
        return Vec::new();
    };
    config
        .interfaces
        .iter()
        .map(|i| (i.number, interface_name(info, i.number)))
        .filter(|(_, name)| interface_driver(name).is_none())
        .collect()
}

/// The sysfs name of interface `number` of the active configuration, e.g. `2-1:1.0`.
fn interface_name(info: &DeviceInfo, number: u8) -> String {
    format!(
        "{}:{}.{number}",
        info.key.bus_path, info.active_configuration
    )
}

/// The name of the driver bound to interface `name` (e.g. `2-1:1.0`), from sysfs.
fn interface_driver(name: &str) -> Option<String> {
    std::fs::read_link(Path::new("/sys/bus/usb/devices").join(name).join("driver"))
        .ok()
        .and_then(|target| target.file_name()?.to_str().map(str::to_string))
}

/// Maps nusb's operation errors.
fn map_error(e: nusb::Error) -> UsbError {
    match e.kind() {
        nusb::ErrorKind::Disconnected => UsbError::NoDevice,
        _ if e.os_error() == Some(libc::ENODEV as u32) => UsbError::NoDevice,
        nusb::ErrorKind::Busy => UsbError::Busy(e.to_string()),
        nusb::ErrorKind::PermissionDenied => UsbError::AccessDenied(e.to_string()),
        nusb::ErrorKind::NotFound => UsbError::Invalid(e.to_string()),
        nusb::ErrorKind::Unsupported => UsbError::Unsupported(e.to_string()),
        // The device stalled the request (SET_INTERFACE, CLEAR_FEATURE).
        _ if e.os_error() == Some(libc::EPIPE as u32) => UsbError::Stall,
        _ => UsbError::Io(e.to_string()),
    }
}

/// Maps a transfer's completion status.
fn map_transfer_error(e: TransferError) -> UsbError {
    match e {
        TransferError::Stall => UsbError::Stall,
        TransferError::Disconnected => UsbError::NoDevice,
        TransferError::Cancelled => UsbError::Cancelled,
        TransferError::Fault => UsbError::Io("bus error (CRC, bit stuffing or babble)".into()),
        TransferError::InvalidArgument => UsbError::Invalid("rejected by usbfs".into()),
        TransferError::Unknown(errno) => {
            UsbError::Io(std::io::Error::from_raw_os_error(errno as i32).to_string())
        }
    }
}

/// Splits bmRequestType into what nusb can express.
fn request_kind(request_type: u8) -> Result<(ControlType, Recipient), UsbError> {
    let control_type = match (request_type >> 5) & 3 {
        0 => ControlType::Standard,
        1 => ControlType::Class,
        2 => ControlType::Vendor,
        _ => return Err(UsbError::Stall),
    };
    let recipient = match request_type & 0x1f {
        0 => Recipient::Device,
        1 => Recipient::Interface,
        2 => Recipient::Endpoint,
        3 => Recipient::Other,
        _ => return Err(UsbError::Stall),
    };
    Ok((control_type, recipient))
}

/// usbfs (through nusb) wants IN lengths that are whole packets. The extra
/// room is never passed on: see [`finish`].
fn whole_packets(length: u32, max_packet_size: usize) -> usize {
    let mps = max_packet_size.max(1);
    (length as usize).div_ceil(mps).max(1) * mps
}

enum EndpointCommand {
    Submit(Transfer, ReplySink),
    Cancel(RequestId),
    ClearHalt(oneshot::Sender<Result<(), UsbError>>),
    /// Cancel everything, drain, and drop the endpoint.
    Stop(oneshot::Sender<()>),
}

/// What a cancel found on endpoint 0.
enum ControlCancel {
    /// The transfer was running: its worker answers it `Cancelled`.
    Stopped,
    /// The transfer was waiting: the caller answers it.
    TakenOut(ReplySink),
    /// Not a control transfer (or already answered).
    NotHere,
}

/// Endpoint 0's queue, shared by the device and its control worker.
type ControlSlot = Arc<Mutex<ControlQueue>>;

/// Endpoint 0's queue as a cancel sees it, under one lock: a cancel finds
/// its transfer running (and stops it) or queued (and takes it out, to be
/// answered at once rather than when the running transfer ends), never in
/// between.
#[derive(Default)]
struct ControlQueue {
    running: Option<(RequestId, oneshot::Sender<()>)>,
    queued: VecDeque<(Transfer, ReplySink)>,
}

impl ControlQueue {
    /// The next transfer to run, recorded as running with `stop` to end it.
    fn next(&mut self, stop: oneshot::Sender<()>) -> Option<(Transfer, ReplySink)> {
        let next = self.queued.pop_front()?;
        self.running = Some((next.1.id, stop));
        Some(next)
    }

    /// Cancels request `id` if it is on endpoint 0.
    fn cancel(&mut self, id: RequestId) -> ControlCancel {
        if self
            .running
            .as_ref()
            .is_some_and(|(running, _)| *running == id)
        {
            if let Some((_, stop)) = self.running.take() {
                let _ = stop.send(());
            }
            return ControlCancel::Stopped;
        }
        let index = self.queued.iter().position(|(_, reply)| reply.id == id);
        match index.and_then(|index| self.queued.remove(index)) {
            Some((_, reply)) => ControlCancel::TakenOut(reply),
            None => ControlCancel::NotHere,
        }
    }

    /// Stops the running transfer and takes out every waiting one.
    fn cancel_all(&mut self) -> Vec<ReplySink> {
        if let Some((_, stop)) = self.running.take() {
            let _ = stop.send(());
        }
        self.queued.drain(..).map(|(_, reply)| reply).collect()
    }
}

/// An open real device.
pub struct UsbfsDevice {
    device: nusb::Device,
    info: Mutex<DeviceInfo>,
    interfaces: Mutex<HashMap<u8, nusb::Interface>>,
    alts: Mutex<HashMap<u8, u8>>,
    endpoints: Mutex<HashMap<u8, mpsc::UnboundedSender<EndpointCommand>>>,
    /// One wake-up of the control worker per transfer queued on endpoint 0.
    control_queued: mpsc::UnboundedSender<()>,
    control: ControlSlot,
    /// The configuration the device had when opened, restored on close so
    /// the kernel drivers find the interfaces they had.
    opened_configuration: u8,
    /// Set by [`UsbfsDevice::close`]: an operation still running (a reset,
    /// a configuration change) must not claim the interfaces again.
    closed: std::sync::atomic::AtomicBool,
    /// Held by the operations that release and claim interfaces (reset,
    /// configuration and alternate setting changes) and by close, so close
    /// never runs in the middle of one.
    operation: tokio::sync::Mutex<()>,
}

impl UsbfsDevice {
    async fn start(device: nusb::Device, info: DeviceInfo) -> Result<UsbfsDevice, UsbError> {
        let (control_queued, wake_ups) = mpsc::unbounded_channel();
        let control: ControlSlot = Arc::default();
        tokio::spawn(control_worker(device.clone(), wake_ups, control.clone()));
        let opened_configuration = info.active_configuration;
        let this = UsbfsDevice {
            device,
            opened_configuration,
            closed: std::sync::atomic::AtomicBool::new(false),
            operation: tokio::sync::Mutex::new(()),
            info: Mutex::new(info),
            interfaces: Mutex::default(),
            alts: Mutex::default(),
            endpoints: Mutex::default(),
            control_queued,
            control,
        };
        if let Err(e) = this.fresh_start().await {
            // Whatever was detached or claimed before the failure goes back.
            this.close().await;
            return Err(e);
        }
        Ok(this)
    }

    /// Takes the device from its kernel drivers, resets it, and claims it.
    ///
    /// The client's vhci_hcd enumerates a brand-new device, and on a real bus
    /// that always starts with a port reset; usbip-host gets the same effect
    /// by resetting the device when each session ends. Without it a device
    /// whose previous user vanished mid-transfer (a helper killed during a
    /// read) is still in that transfer's data phase: usb-storage on the
    /// client then failed every command and gave up. The kernel drivers are
    /// detached first so none of them reacts to the reset.
    async fn fresh_start(&self) -> Result<(), UsbError> {
        for number in self.interface_numbers() {
            if let Err(e) = self.device.detach_kernel_driver(number)
                && e.os_error() != Some(libc::ENODATA as u32)
            {
                return Err(map_error(e));
            }
        }
        match self.device.reset().await {
            Ok(()) => {}
            Err(e) if e.kind() == nusb::ErrorKind::Disconnected => return Err(UsbError::NoDevice),
            Err(e) => tracing::warn!(
                device = %self.info().key,
                "reset before use failed ({e}); using the device as it is"
            ),
        }
        // claim_all detaches once more: after a reset the kernel probes
        // interfaces that have no driver, and one may have bound again.
        self.claim_all().await
    }

    /// The listing as opened, with the active configuration kept current.
    pub fn info(&self) -> DeviceInfo {
        self.info.lock().expect("info lock").clone()
    }

    fn interface_numbers(&self) -> Vec<u8> {
        self.info()
            .active_config()
            .map(|c| c.interfaces.iter().map(|i| i.number).collect())
            .unwrap_or_default()
    }

    /// Detaches kernel drivers from, and claims, every interface of the
    /// active configuration. Plain claims: dropping them never re-attaches a
    /// driver behind our back; [`UsbfsDevice::close`] does that explicitly.
    async fn claim_all(&self) -> Result<(), UsbError> {
        let closed = || self.closed.load(std::sync::atomic::Ordering::SeqCst);
        for number in self.interface_numbers() {
            if closed() {
                return Err(UsbError::NoDevice);
            }
            if let Err(e) = self.device.detach_kernel_driver(number)
                && e.os_error() != Some(libc::ENODATA as u32)
            {
                return Err(map_error(e));
            }
            let interface = self
                .device
                .claim_interface(number)
                .await
                .map_err(map_error)?;
            if closed() {
                // Closed while claiming: the claim goes with `interface`.
                return Err(UsbError::NoDevice);
            }
            self.interfaces
                .lock()
                .expect("interfaces lock")
                .insert(number, interface);
        }
        Ok(())
    }

    /// Stops the endpoint workers (of `only` interfaces' endpoints, or all),
    /// failing their transfers with `Cancelled`.
    async fn stop_endpoints(&self, only: Option<&[u8]>) {
        let stopping: Vec<_> = {
            let mut endpoints = self.endpoints.lock().expect("endpoints lock");
            let addresses: Vec<u8> = endpoints
                .keys()
                .copied()
                .filter(|a| only.is_none_or(|list| list.contains(a)))
                .collect();
            addresses
                .into_iter()
                .filter_map(|a| endpoints.remove(&a))
                .collect()
        };
        for worker in stopping {
            let (done, finished) = oneshot::channel();
            if worker.send(EndpointCommand::Stop(done)).is_ok() {
                let _ = finished.await;
            }
        }
    }

    fn release_all(&self) {
        self.interfaces.lock().expect("interfaces lock").clear();
        self.alts.lock().expect("alts lock").clear();
    }

    /// Queues a transfer on its endpoint's FIFO.
    pub fn submit(&self, transfer: Transfer, reply: ReplySink) {
        // Resolved under the locks, not on copies: this runs for every transfer.
        let resolved = transfer::resolve(
            &self.info.lock().expect("info lock"),
            &self.alts.lock().expect("alts lock"),
            &transfer,
        );
        let resolved = match resolved {
            Ok(resolved) => resolved,
            Err(e) => {
                tokio::spawn(reply.send(Err(e)));
                return;
            }
        };
        if resolved.address == 0 {
            self.control
                .lock()
                .expect("control lock")
                .queued
                .push_back((transfer, reply));
            let _ = self.control_queued.send(());
            return;
        }
        let mut endpoints = self.endpoints.lock().expect("endpoints lock");
        if let Some(worker) = endpoints.get(&resolved.address) {
            let _ = worker.send(EndpointCommand::Submit(transfer, reply));
            return;
        }
        let interface = resolved.interface.and_then(|n| {
            self.interfaces
                .lock()
                .expect("interfaces lock")
                .get(&n)
                .cloned()
        });
        let Some(interface) = interface else {
            tokio::spawn(reply.send(Err(UsbError::Busy(
                "interface is being reconfigured".into(),
            ))));
            return;
        };
        match spawn_endpoint_worker(&interface, resolved.address, resolved.kind) {
            Ok(worker) => {
                let _ = worker.send(EndpointCommand::Submit(transfer, reply));
                endpoints.insert(resolved.address, worker);
            }
            Err(e) => {
                tokio::spawn(reply.send(Err(e)));
            }
        }
    }

    /// Cancels the transfer of request `id` wherever it is queued.
    pub fn cancel(&self, id: RequestId) {
        let found = self.control.lock().expect("control lock").cancel(id);
        match found {
            ControlCancel::Stopped => return,
            ControlCancel::TakenOut(reply) => {
                tokio::spawn(reply.send(Err(UsbError::Cancelled)));
                return;
            }
            ControlCancel::NotHere => {}
        }
        for worker in self.endpoints.lock().expect("endpoints lock").values() {
            let _ = worker.send(EndpointCommand::Cancel(id));
        }
    }

    /// SET_CONFIGURATION: a no-op for the active value (Linux hosts always
    /// send it during enumeration); otherwise release, switch, re-claim.
    pub async fn set_configuration(&self, value: u8) -> Result<(), UsbError> {
        let _operation = self.begin_operation().await?;
        if value == self.info().active_configuration {
            return Ok(());
        }
        if value != 0 && !self.info().configurations.iter().any(|c| c.value == value) {
            return Err(UsbError::Stall);
        }
        self.stop_endpoints(None).await;
        self.release_all();
        for number in self.interface_numbers() {
            let _ = self.device.detach_kernel_driver(number);
        }
        if let Err(e) = self.device.set_configuration(value).await {
            // The kernel may have unconfigured the device on the way: what
            // is active now is what the listing says and what is claimed
            // again, so the device stays usable and a retry is not taken
            // for a no-op.
            let active = self
                .device
                .active_configuration()
                .map(|c| c.configuration_value())
                .unwrap_or(0);
            self.info.lock().expect("info lock").active_configuration = active;
            let _ = self.claim_all().await;
            return Err(map_error(e));
        }
        self.info.lock().expect("info lock").active_configuration = value;
        self.claim_all().await
    }

    /// SET_INTERFACE on a claimed interface.
    pub async fn set_interface(&self, number: u8, alt: u8) -> Result<(), UsbError> {
        let _operation = self.begin_operation().await?;
        let info = self.info();
        let config = info.active_config().ok_or(UsbError::Stall)?;
        config.alt_setting(number, alt).ok_or(UsbError::Stall)?;
        let endpoints: Vec<u8> = config
            .interfaces
            .iter()
            .filter(|i| i.number == number)
            .flat_map(|i| &i.alt_settings)
            .flat_map(|a| a.endpoints.iter().map(|e| e.address))
            .collect();
        self.stop_endpoints(Some(&endpoints)).await;
        let interface = self
            .interfaces
            .lock()
            .expect("interfaces lock")
            .get(&number)
            .cloned()
            .ok_or_else(|| UsbError::Invalid(format!("interface {number} is not claimed")))?;
        interface.set_alt_setting(alt).await.map_err(map_error)?;
        self.alts.lock().expect("alts lock").insert(number, alt);
        Ok(())
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) through usbfs (also resets the toggle).
    pub async fn clear_halt(&self, endpoint: u8) -> Result<(), UsbError> {
        if endpoint & 0x7f == 0 {
            return Ok(());
        }
        // Like the other operations: never beside a close, which must find
        // no endpoint worker (and so no claim) left behind.
        let _operation = self.begin_operation().await?;
        let probe = Transfer {
            handle: 0,
            endpoint,
            setup: None,
            data: if endpoint & 0x80 != 0 {
                TransferData::In { length: 0 }
            } else {
                TransferData::Out(Bytes::new())
            },
            flags: Default::default(),
            timeout_ms: None,
        };
        let resolved = transfer::resolve(
            &self.info(),
            &self.alts.lock().expect("alts lock").clone(),
            &probe,
        )?;
        let worker = {
            let mut endpoints = self.endpoints.lock().expect("endpoints lock");
            match endpoints.get(&endpoint) {
                Some(worker) => worker.clone(),
                None => {
                    let interface = resolved
                        .interface
                        .and_then(|n| {
                            self.interfaces
                                .lock()
                                .expect("interfaces lock")
                                .get(&n)
                                .cloned()
                        })
                        .ok_or_else(|| UsbError::Busy("interface is being reconfigured".into()))?;
                    let worker = spawn_endpoint_worker(&interface, endpoint, resolved.kind)?;
                    endpoints.insert(endpoint, worker.clone());
                    worker
                }
            }
        };
        let (reply, answer) = oneshot::channel();
        worker
            .send(EndpointCommand::ClearHalt(reply))
            .map_err(|_| UsbError::NoDevice)?;
        answer.await.unwrap_or(Err(UsbError::NoDevice))
    }

    /// Port reset: usbfs drops claims across a reset, so release first and
    /// claim again after.
    pub async fn reset(&self) -> Result<(), UsbError> {
        let _operation = self.begin_operation().await?;
        self.stop_endpoints(None).await;
        self.release_all();
        let reset = self.device.reset().await.map_err(map_error);
        // Claimed again even after a failed reset, or every later transfer
        // would find its interface gone.
        let claimed = self.claim_all().await;
        reset.and(claimed)
    }

    /// Waits for the operation running, if any; refuses once closed.
    async fn begin_operation(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, UsbError> {
        let guard = self.operation.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(UsbError::NoDevice);
        }
        Ok(guard)
    }

    /// Ends all transfers, releases every interface and re-attaches the
    /// kernel drivers, so the device works locally again.
    pub async fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        // An operation already running finishes (its claims fail), then
        // close undoes what it changed.
        let _operation = self.operation.lock().await;
        // Endpoint 0 too: nothing queued runs on a device given back, and
        // the one running ends now.
        let waiting = self.control.lock().expect("control lock").cancel_all();
        for reply in waiting {
            tokio::spawn(reply.send(Err(UsbError::Cancelled)));
        }
        self.stop_endpoints(None).await;
        self.release_all();
        if self.info().active_configuration != self.opened_configuration {
            // A client may have unconfigured the device or picked another
            // configuration; the kernel drivers expect the one it had.
            match self
                .device
                .set_configuration(self.opened_configuration)
                .await
            {
                Ok(()) => {
                    self.info.lock().expect("info lock").active_configuration =
                        self.opened_configuration;
                }
                Err(e) => tracing::warn!(
                    device = %self.info().key,
                    "cannot restore configuration {}: {e}",
                    self.opened_configuration
                ),
            }
        }
        let info = self.info();
        for number in self.interface_numbers() {
            self.reattach_driver(number, &interface_name(&info, number))
                .await;
        }
    }

    /// USBDEVFS_CONNECT for one interface. The kernel answers EBUSY while any
    /// driver is bound, and that includes usbfs itself: our claim is released
    /// only when the last reference to the interface is gone (transfers that
    /// were just cancelled may still hold one for a moment). Ignoring that
    /// EBUSY left the interface without a driver after a detach, so the
    /// device never came back to usb-storage locally.
    async fn reattach_driver(&self, number: u8, interface: &str) {
        const TRIES: u32 = 100;
        for attempt in 1..=TRIES {
            let device = self.device.clone();
            let Ok(result) =
                tokio::task::spawn_blocking(move || device.attach_kernel_driver(number)).await
            else {
                return;
            };
            match result {
                Ok(()) => {
                    let driver = interface_driver(interface);
                    tracing::debug!(
                        "interface {interface} handed back to the kernel (driver: {})",
                        driver.as_deref().unwrap_or("none matched")
                    );
                    return;
                }
                Err(e) if e.kind() == nusb::ErrorKind::Busy => {
                    match interface_driver(interface).as_deref() {
                        // Still claimed by usbfs (by us): wait for the release.
                        Some("usbfs") if attempt < TRIES => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Some("usbfs") => {
                            tracing::warn!(
                                "interface {interface} is still claimed through usbfs after close; its kernel driver was not re-attached"
                            );
                            return;
                        }
                        // Another driver is bound already: nothing to do.
                        _ => return,
                    }
                }
                Err(e) if e.os_error() == Some(libc::ENODEV as u32) => return,
                Err(e) => {
                    tracing::warn!("cannot re-attach the kernel driver of {interface}: {e}");
                    return;
                }
            }
        }
    }
}

fn spawn_endpoint_worker(
    interface: &nusb::Interface,
    address: u8,
    kind: EndpointType,
) -> Result<mpsc::UnboundedSender<EndpointCommand>, UsbError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let dir_in = address & 0x80 != 0;
    match (kind, dir_in) {
        (EndpointType::Bulk, true) => {
            tokio::spawn(endpoint_worker(
                interface.endpoint::<Bulk, In>(address).map_err(map_error)?,
                rx,
            ));
        }
        (EndpointType::Bulk, false) => {
            tokio::spawn(endpoint_worker(
                interface
                    .endpoint::<Bulk, Out>(address)
                    .map_err(map_error)?,
                rx,
            ));
        }
        (EndpointType::Interrupt, true) => {
            tokio::spawn(endpoint_worker(
                interface
                    .endpoint::<Interrupt, In>(address)
                    .map_err(map_error)?,
                rx,
            ));
        }
        (EndpointType::Interrupt, false) => {
            tokio::spawn(endpoint_worker(
                interface
                    .endpoint::<Interrupt, Out>(address)
                    .map_err(map_error)?,
                rx,
            ));
        }
        (other, _) => {
            return Err(UsbError::Unsupported(format!(
                "{other:?} endpoint {address:#04x}"
            )));
        }
    }
    Ok(tx)
}

/// One submitted usbfs transfer.
struct InFlight {
    /// `None` for the zero-length packet that emulates URB_ZERO_PACKET.
    reply: Option<ReplySink>,
    transfer: Transfer,
    cancel_requested: bool,
    /// When the transfer's own `timeout_ms` runs out, counted from its first
    /// submission (a resubmission after another transfer's cancel keeps it).
    deadline: Option<Instant>,
    /// Cancelled because its deadline passed: answered `Timeout`.
    timed_out: bool,
    /// For a zero-length packet: its transfer completed in full, so the
    /// packet must go out even if another transfer's cancel cuts it off.
    owner_whole: bool,
}

impl InFlight {
    fn new(transfer: Transfer, reply: ReplySink) -> InFlight {
        let deadline = transfer
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(u64::from(ms)));
        InFlight {
            reply: Some(reply),
            transfer,
            cancel_requested: false,
            deadline,
            timed_out: false,
            owner_whole: false,
        }
    }

    /// The trailing zero-length packet of an OUT transfer with `zero_packet`.
    fn zero_length_packet() -> InFlight {
        InFlight {
            reply: None,
            transfer: Transfer {
                handle: 0,
                endpoint: 0,
                setup: None,
                data: TransferData::Out(Bytes::new()),
                flags: Default::default(),
                timeout_ms: None,
            },
            cancel_requested: false,
            deadline: None,
            timed_out: false,
            owner_whole: false,
        }
    }
}

/// What becomes of one completion taken from an endpoint's queue.
#[derive(Debug, PartialEq)]
enum Settled {
    /// Answer the transfer: its data and this status.
    Answer(Result<(), UsbError>),
    /// Cancelled only because another transfer of the endpoint was, before
    /// it moved anything: it goes back in, in its place.
    Resubmit,
    /// Nobody waits for it: a zero-length packet whose transfer failed, or
    /// whose transfer goes back in (and brings its own packet again).
    Forget,
}

/// The error of a transfer that had moved part of its data when another
/// transfer's cancel or timeout cut it off (nusb cancels a whole endpoint).
/// Not `Cancelled`: drivers take that as their own unlink and stop
/// resubmitting (usbhid, usb-serial), and not success, which would hide the
/// bytes that never moved.
fn cut_short() -> UsbError {
    UsbError::Io("cut short by the cancel of another transfer on its endpoint".into())
}

/// Decides what a completion means. `collateral` is true while the
/// endpoint's queue drains for a cancel or a timeout of one of its transfers
/// (not for a stop), for the transfers that were not themselves meant.
fn settle(
    item: &InFlight,
    collateral: bool,
    status: Result<(), TransferError>,
    actual_len: usize,
) -> Settled {
    let cancelled = status == Err(TransferError::Cancelled);
    if item.reply.is_none() {
        return if cancelled && collateral && item.owner_whole {
            Settled::Resubmit
        } else {
            Settled::Forget
        };
    }
    match status {
        Err(TransferError::Cancelled) if item.timed_out => Settled::Answer(Err(UsbError::Timeout)),
        Err(TransferError::Cancelled) if collateral && actual_len > 0 => {
            Settled::Answer(Err(cut_short()))
        }
        Err(TransferError::Cancelled) if collateral => Settled::Resubmit,
        status => Settled::Answer(status.map_err(map_transfer_error)),
    }
}

/// Owns one nusb endpoint: submits in order, replies in completion order
/// (which usbfs keeps equal to submission order per endpoint).
async fn endpoint_worker<E: BulkOrInterrupt, D: EndpointDirection>(
    mut endpoint: nusb::Endpoint<E, D>,
    commands: mpsc::UnboundedReceiver<EndpointCommand>,
) {
    let stopped = run_endpoint(&mut endpoint, commands).await;
    // The endpoint keeps its interface claimed: drop it before saying the
    // worker is gone, so a close that follows finds the interface released
    // and can give it back to its kernel driver.
    drop(endpoint);
    if let Some(done) = stopped {
        let _ = done.send(());
    }
}

/// The worker's loop; returns the `Stop` sender to answer, if stopped.
async fn run_endpoint<E: BulkOrInterrupt, D: EndpointDirection>(
    endpoint: &mut nusb::Endpoint<E, D>,
    mut commands: mpsc::UnboundedReceiver<EndpointCommand>,
) -> Option<oneshot::Sender<()>> {
    let mps = endpoint.max_packet_size().max(1);
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // After a cancel the whole queue is discarded; these wait to go back in.
    let mut resubmit: Vec<InFlight> = Vec::new();
    let mut draining = false;
    let mut stop: Option<oneshot::Sender<()>> = None;

    loop {
        let next_deadline = in_flight
            .iter()
            .filter(|item| !item.cancel_requested)
            .filter_map(|item| item.deadline)
            .min();
        tokio::select! {
            completion = endpoint.next_complete(), if endpoint.pending() > 0 => {
                let Some(item) = in_flight.pop_front() else { continue };
                let collateral = draining && !item.cancel_requested && stop.is_none();
                match settle(&item, collateral, completion.status, completion.actual_len) {
                    Settled::Answer(status) => {
                        // Its zero-length packet, right behind it, must go out.
                        if status.is_ok()
                            && completion.actual_len == item.transfer.data.len() as usize
                            && let Some(packet) = in_flight.front_mut()
                            && packet.reply.is_none()
                        {
                            packet.owner_whole = true;
                        }
                        if let Some(reply) = item.reply {
                            let result = finish(&item.transfer, completion.buffer, completion.actual_len, status);
                            reply.send_reply(result).await;
                        }
                    }
                    Settled::Resubmit => resubmit.push(item),
                    Settled::Forget => {}
                }
                if draining && endpoint.pending() == 0 {
                    draining = false;
                    if stop.is_some() {
                        return stop;
                    }
                    let now = Instant::now();
                    for item in std::mem::take(&mut resubmit) {
                        // Ran out of time while the queue drained: not sent again.
                        if item.deadline.is_some_and(|d| d <= now)
                            && let Some(reply) = item.reply
                        {
                            reply.send(Err(UsbError::Timeout)).await;
                            continue;
                        }
                        submit(endpoint, &mut in_flight, item, mps);
                    }
                }
            }
            _ = sleep_until_deadline(next_deadline), if !draining => {
                let now = Instant::now();
                for item in in_flight.iter_mut().filter(|i| !i.cancel_requested && i.deadline.is_some_and(|d| d <= now)) {
                    item.cancel_requested = true;
                    item.timed_out = true;
                    draining = true;
                }
                if draining {
                    endpoint.cancel_all();
                }
            }
            command = commands.recv(), if !draining => match command {
                None => {
                    endpoint.cancel_all();
                    return None;
                }
                Some(EndpointCommand::Submit(transfer, reply)) => {
                    submit(endpoint, &mut in_flight, InFlight::new(transfer, reply), mps);
                }
                Some(EndpointCommand::Cancel(id)) => {
                    if let Some(item) = in_flight.iter_mut().find(|i| i.reply.as_ref().is_some_and(|r| r.id == id)) {
                        item.cancel_requested = true;
                        endpoint.cancel_all();
                        draining = true;
                    }
                }
                Some(EndpointCommand::ClearHalt(reply)) => {
                    let _ = reply.send(endpoint.clear_halt().await.map_err(map_error));
                }
                Some(EndpointCommand::Stop(done)) => {
                    if endpoint.pending() == 0 {
                        return Some(done);
                    }
                    for item in &mut in_flight {
                        item.cancel_requested = true;
                    }
                    endpoint.cancel_all();
                    draining = true;
                    stop = Some(done);
                }
            },
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn submit<E: BulkOrInterrupt, D: EndpointDirection>(
    endpoint: &mut nusb::Endpoint<E, D>,
    in_flight: &mut VecDeque<InFlight>,
    item: InFlight,
    mps: usize,
) {
    let (buffer, zero_packet) = match &item.transfer.data {
        TransferData::In { length } => (Buffer::new(whole_packets(*length, mps)), false),
        TransferData::Out(bytes) => (
            Buffer::from(bytes.to_vec()),
            item.transfer.flags.zero_packet && !bytes.is_empty() && bytes.len() % mps == 0,
        ),
    };
    endpoint.submit(buffer);
    in_flight.push_back(item);
    if zero_packet {
        endpoint.submit(Buffer::new(0));
        in_flight.push_back(InFlight::zero_length_packet());
    }
}

/// Turns a usbfs completion into the reply for the client's transfer.
fn finish(
    transfer: &Transfer,
    buffer: Buffer,
    actual_len: usize,
    status: Result<(), UsbError>,
) -> Result<Reply, UsbError> {
    // On failure too, what moved is passed on, as usbip-host does: the
    // kernel fills `actual_len` for failed URBs as well.
    let completion = match transfer.data {
        TransferData::In { length } => {
            // The buffer was rounded up to whole packets, so a device may
            // have filled more than the client asked for. usbip-host submits
            // exactly `length`, where the device can never deliver more (a
            // device that tried would babble), and some devices size their
            // answer by the host's buffer: QEMU's usb-storage pads a data
            // phase to the whole buffer. Reporting an overflow here made
            // usb-storage reset the device after every padded reply, so the
            // client gets the `length` bytes it asked for.
            let actual = actual_len.min(length as usize);
            if actual < actual_len {
                tracing::trace!(
                    endpoint = transfer.endpoint,
                    "IN transfer got {actual_len} bytes into a buffer rounded up from {length}; passing on {length}"
                );
            }
            let mut data = buffer.into_vec();
            data.truncate(actual);
            Completion {
                actual_length: actual as u32,
                data: Bytes::from(data),
            }
        }
        TransferData::Out(_) => Completion {
            actual_length: actual_len as u32,
            data: Bytes::new(),
        },
    };
    match status {
        Ok(()) => transfer::answer(transfer, completion),
        Err(e) => Reply::transfer_failed(e, completion),
    }
}

/// Runs endpoint 0's transfers one at a time, in order; ends with the device.
async fn control_worker(
    device: nusb::Device,
    mut wake_ups: mpsc::UnboundedReceiver<()>,
    queue: ControlSlot,
) {
    while wake_ups.recv().await.is_some() {
        let (stop, stopped) = oneshot::channel();
        let next = queue.lock().expect("control lock").next(stop);
        // None: the transfer this wake-up was for has been cancelled.
        let Some((transfer, reply)) = next else {
            continue;
        };
        let result = tokio::select! {
            result = control_transfer(&device, &transfer) => result,
            _ = stopped => Err(UsbError::Cancelled),
        };
        queue.lock().expect("control lock").running.take();
        reply
            .send_reply(result.and_then(|completion| transfer::answer(&transfer, completion)))
            .await;
    }
}

async fn control_transfer(
    device: &nusb::Device,
    transfer: &Transfer,
) -> Result<Completion, UsbError> {
    let setup = transfer
        .setup
        .ok_or_else(|| UsbError::Invalid("no setup packet".into()))?;
    let (control_type, recipient) = request_kind(setup.request_type)?;
    let timeout = transfer
        .timeout_ms
        .map_or(CONTROL_TIMEOUT, |ms| Duration::from_millis(u64::from(ms)));
    // nusb ends a transfer that ran out of time as cancelled.
    let started = tokio::time::Instant::now();
    let failed = |e: TransferError| match e {
        TransferError::Cancelled if started.elapsed() >= timeout => UsbError::Timeout,
        e => map_transfer_error(e),
    };
    match &transfer.data {
        TransferData::In { length } => {
            let data = device
                .control_in(
                    ControlIn {
                        control_type,
                        recipient,
                        request: setup.request,
                        value: setup.value,
                        index: setup.index,
                        length: u16::try_from(*length).unwrap_or(u16::MAX),
                    },
                    timeout,
                )
                .await
                .map_err(failed)?;
            Ok(Completion {
                actual_length: data.len() as u32,
                data: Bytes::from(data),
            })
        }
        TransferData::Out(bytes) => {
            device
                .control_out(
                    ControlOut {
                        control_type,
                        recipient,
                        request: setup.request,
                        value: setup.value,
                        index: setup.index,
                        data: bytes,
                    },
                    timeout,
                )
                .await
                .map_err(failed)?;
            Ok(Completion {
                actual_length: bytes.len() as u32,
                data: Bytes::new(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_listing_parses_descriptors_and_active_configuration() {
        let dir = std::env::temp_dir()
            .join(format!("p2p-usb-sysfs-{}", std::process::id()))
            .join("3-1.4");
        std::fs::create_dir_all(&dir).unwrap();
        let zero = crate::sim::zero::device_info(5);
        let mut blob = zero.descriptor.raw.to_vec();
        for config in &zero.configurations {
            blob.extend_from_slice(&config.raw);
        }
        std::fs::write(dir.join("descriptors"), &blob).unwrap();
        std::fs::write(dir.join("bConfigurationValue"), "2\n").unwrap();
        let info = describe_sysfs(&dir, 3, 5, Speed::High).unwrap();
        assert_eq!(info.key.bus_path, "3-1.4");
        assert_eq!((info.key.vid, info.key.pid), (0x0525, 0xa4a0));
        assert_eq!(info.configurations, zero.configurations);
        assert_eq!(info.active_configuration, 2);

        std::fs::write(dir.join("bConfigurationValue"), "\n").unwrap();
        assert_eq!(
            describe_sysfs(&dir, 3, 5, Speed::High)
                .unwrap()
                .active_configuration,
            0
        );
        std::fs::write(dir.join("descriptors"), &blob[..10]).unwrap();
        assert!(describe_sysfs(&dir, 3, 5, Speed::High).is_err());
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn devices_attached_through_vhci_are_not_listed() {
        assert!(on_vhci(Path::new(
            "/sys/devices/platform/vhci_hcd.0/usb4/4-1"
        )));
        assert!(on_vhci(Path::new("/sys/devices/faux/vhci_hcd.3/usb9/9-1")));
        assert!(!on_vhci(Path::new(
            "/sys/devices/pci0000:00/0000:00:02.0/usb2/2-1"
        )));
    }

    /// A bulk IN of `length` bytes on endpoint 0x81.
    fn read_transfer(length: u32) -> Transfer {
        Transfer {
            handle: 1,
            endpoint: 0x81,
            setup: None,
            data: TransferData::In { length },
            flags: Default::default(),
            timeout_ms: None,
        }
    }

    #[test]
    fn rounded_up_in_buffers_pass_on_only_the_requested_length() {
        let transfer = read_transfer(512);
        let filled = Buffer::from(vec![7u8; 1024]);
        let Ok(Reply::Transferred(done)) = finish(&transfer, filled, 1024, Ok(())) else {
            panic!("a completed transfer");
        };
        assert_eq!(done.actual_length, 512);
        assert_eq!(done.data.len(), 512);
        let short = Buffer::from(vec![7u8; 1024]);
        let Ok(Reply::Transferred(done)) = finish(&transfer, short, 13, Ok(())) else {
            panic!("a completed transfer");
        };
        assert_eq!((done.actual_length, done.data.len()), (13, 13));
    }

    #[test]
    fn failed_transfers_pass_on_what_moved() {
        let read = read_transfer(1024);
        let buffer = || Buffer::from(vec![7u8; 1024]);
        match finish(&read, buffer(), 512, Err(UsbError::Stall)) {
            Ok(Reply::PartlyTransferred { error, completion }) => {
                assert_eq!(error, UsbError::Stall);
                assert_eq!(
                    (completion.actual_length, completion.data.len()),
                    (512, 512)
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            finish(&read, buffer(), 0, Err(UsbError::Stall)),
            Err(UsbError::Stall),
            "nothing moved: the error alone"
        );
        let write = Transfer {
            endpoint: 0x01,
            data: TransferData::Out(Bytes::from(vec![1u8; 1024])),
            ..read
        };
        match finish(&write, Buffer::new(0), 600, Err(UsbError::NoDevice)) {
            Ok(Reply::PartlyTransferred { error, completion }) => {
                assert_eq!(error, UsbError::NoDevice);
                assert_eq!((completion.actual_length, completion.data.len()), (600, 0));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A transfer as the endpoint worker holds it, answered nowhere.
    fn in_flight(timed_out: bool) -> InFlight {
        let (outgoing, _) = mpsc::channel(1);
        let mut item = InFlight::new(read_transfer(512), ReplySink::new(7, outgoing, None));
        item.cancel_requested = timed_out;
        item.timed_out = timed_out;
        item
    }

    #[test]
    fn completions_settle_by_why_their_queue_was_cancelled() {
        let cancelled = Err(TransferError::Cancelled);
        // Its own deadline passed: Timeout, unless it completed first.
        assert_eq!(
            settle(&in_flight(true), false, cancelled, 0),
            Settled::Answer(Err(UsbError::Timeout))
        );
        assert_eq!(
            settle(&in_flight(true), false, Ok(()), 512),
            Settled::Answer(Ok(()))
        );
        // Another transfer's cancel or timeout: back in if nothing moved,
        // otherwise an error with what moved (never a short success).
        assert_eq!(
            settle(&in_flight(false), true, cancelled, 0),
            Settled::Resubmit
        );
        assert_eq!(
            settle(&in_flight(false), true, cancelled, 100),
            Settled::Answer(Err(cut_short()))
        );
        assert_eq!(
            settle(&in_flight(false), true, Ok(()), 512),
            Settled::Answer(Ok(()))
        );
        // Cancelled for itself, or on a stop.
        assert_eq!(
            settle(&in_flight(false), false, cancelled, 0),
            Settled::Answer(Err(UsbError::Cancelled))
        );
        assert_eq!(
            settle(&in_flight(false), false, Err(TransferError::Stall), 0),
            Settled::Answer(Err(UsbError::Stall))
        );
    }

    #[test]
    fn a_zero_length_packet_cut_off_by_another_cancel_goes_out_again() {
        let cancelled = Err(TransferError::Cancelled);
        let mut packet = InFlight::zero_length_packet();
        // Its transfer failed or goes back in itself (bringing a new packet).
        assert_eq!(settle(&packet, true, cancelled, 0), Settled::Forget);
        packet.owner_whole = true;
        assert_eq!(settle(&packet, true, cancelled, 0), Settled::Resubmit);
        // The endpoint stops, or the packet went out.
        assert_eq!(settle(&packet, false, cancelled, 0), Settled::Forget);
        assert_eq!(settle(&packet, true, Ok(()), 0), Settled::Forget);
    }

    #[test]
    fn a_waiting_control_transfer_is_taken_out_by_its_cancel() {
        let (outgoing, _) = mpsc::channel(1);
        let sink = |id| ReplySink::new(id, outgoing.clone(), None);
        let mut queue = ControlQueue::default();
        for id in 1..=3 {
            queue.queued.push_back((read_transfer(8), sink(id)));
        }
        let (stop, mut stopped) = oneshot::channel();
        assert_eq!(queue.next(stop).map(|(_, r)| r.id), Some(1));
        // Waiting: out of the queue at once, for the caller to answer.
        assert!(matches!(queue.cancel(3), ControlCancel::TakenOut(r) if r.id == 3));
        assert!(matches!(queue.cancel(3), ControlCancel::NotHere));
        assert!(matches!(queue.cancel(99), ControlCancel::NotHere));
        // Running: told to stop; its worker answers it.
        assert!(matches!(queue.cancel(1), ControlCancel::Stopped));
        assert_eq!(stopped.try_recv(), Ok(()));
        let (stop, _) = oneshot::channel();
        assert_eq!(queue.next(stop).map(|(_, r)| r.id), Some(2));
        let (stop, _) = oneshot::channel();
        assert!(queue.next(stop).is_none(), "3 was taken out");
        queue.queued.push_back((read_transfer(8), sink(4)));
        let ids: Vec<RequestId> = queue.cancel_all().iter().map(|r| r.id).collect();
        assert_eq!(ids, [4]);
        assert!(queue.running.is_none());
    }

    #[test]
    fn a_device_caught_in_a_reset_keeps_its_listing() {
        use crate::sim::{keyboard, zero};
        let known = [keyboard::device_info(2), zero::device_info(3)];
        let (now, resetting) = while_resetting(
            &known,
            vec![keyboard::device_info(0), zero::device_info(3)],
            |d| d,
        );
        assert!(resetting);
        assert_eq!(now, known, "the keyboard in its reset is still itself");
        let (now, resetting) = while_resetting(&known[1..], vec![keyboard::device_info(0)], |d| d);
        assert!(resetting);
        assert_eq!(
            now,
            vec![],
            "a device seen first mid-reset waits for the next look"
        );
        let (now, resetting) = while_resetting(&known, vec![keyboard::device_info(5)], |d| d);
        assert!(!resetting);
        assert_eq!(now, vec![keyboard::device_info(5)]);
    }

    #[test]
    fn in_lengths_round_up_to_whole_packets() {
        assert_eq!(whole_packets(13, 512), 512);
        assert_eq!(whole_packets(512, 512), 512);
        assert_eq!(whole_packets(513, 512), 1024);
        assert_eq!(whole_packets(0, 64), 64);
        assert_eq!(whole_packets(8, 0), 8);
    }

    #[test]
    fn reserved_request_types_stall() {
        assert!(matches!(
            request_kind(0x80),
            Ok((ControlType::Standard, Recipient::Device))
        ));
        assert!(matches!(
            request_kind(0xa1),
            Ok((ControlType::Class, Recipient::Interface))
        ));
        assert!(matches!(
            request_kind(0x42),
            Ok((ControlType::Vendor, Recipient::Endpoint))
        ));
        assert_eq!(request_kind(0x60).unwrap_err(), UsbError::Stall);
        assert_eq!(request_kind(0x05).unwrap_err(), UsbError::Stall);
    }

    #[test]
    fn transfer_errors_map_to_typed_errors() {
        assert_eq!(map_transfer_error(TransferError::Stall), UsbError::Stall);
        assert_eq!(
            map_transfer_error(TransferError::Disconnected),
            UsbError::NoDevice
        );
        assert_eq!(
            map_transfer_error(TransferError::Cancelled),
            UsbError::Cancelled
        );
        assert!(
            matches!(map_transfer_error(TransferError::Unknown(12)), UsbError::Io(m) if m.contains("memory"))
        );
    }
}
