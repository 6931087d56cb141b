//! The one message vocabulary spoken on both hops: helper link (Unix socket) and
//! network link (iroh). The agent forwards requests between the two without
//! re-interpreting transfers, so every type here must make sense on either hop.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of this vocabulary. Peers with a different major version refuse the link.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest transfer (IN length or OUT payload) a peer may ask for. Linux
/// usb-storage on SuperSpeed issues 1 MiB requests; 4 MiB leaves headroom.
pub const MAX_TRANSFER_LEN: u32 = 4 * 1024 * 1024;

/// Largest encoded frame body: a maximal transfer plus room for its envelope.
pub const MAX_FRAME_LEN: usize = MAX_TRANSFER_LEN as usize + 64 * 1024;

/// Identifies a request on one link so replies can arrive out of order.
pub type RequestId = u64;

/// Names an open device on one link; handed out by `Open`, valid until `Close`
/// or until the link drops.
pub type Handle = u32;

/// Everything that crosses a link is one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message in each direction: version and capabilities.
    Hello(Hello),
    /// Asks the peer to do something; answered by exactly one `Reply` with the same id.
    Request { id: RequestId, body: Request },
    /// Answers the `Request` with the same id.
    Reply {
        id: RequestId,
        body: Result<Reply, UsbError>,
    },
    /// Pushed unasked: hotplug and shutdown notices.
    Event(Event),
}

/// Opens every link so each side knows what the other speaks before any request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    /// Free-form software name and version, for logs.
    pub software: String,
    /// Optional features the sender supports; unknown entries are ignored.
    pub capabilities: Vec<String>,
}

impl Hello {
    /// The hello this build sends, naming the sending program.
    pub fn new(software: &str) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            software: format!("{software} {}", env!("CARGO_PKG_VERSION")),
            capabilities: vec![
                CAP_HOTPLUG.into(),
                CAP_CANCEL.into(),
                CAP_PARTIAL_TRANSFERS.into(),
            ],
        }
    }

    /// True if the sender named `capability` in its hello.
    pub fn supports(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    /// Checks that the peer's hello is one this build can talk to.
    pub fn check_compatible(&self) -> Result<(), UsbError> {
        if self.version == PROTOCOL_VERSION {
            Ok(())
        } else {
            Err(UsbError::Protocol(format!(
                "peer speaks protocol version {} ({}), this build speaks {PROTOCOL_VERSION}",
                self.version, self.software
            )))
        }
    }
}

/// Capability: the sender pushes `DeviceArrived`/`DeviceLeft` events.
pub const CAP_HOTPLUG: &str = "hotplug";
/// Capability: `Cancel` really cancels in-flight transfers.
pub const CAP_CANCEL: &str = "cancel";
/// Capability: the sender reads `Reply::PartlyTransferred`. A peer that does
/// not name it gets the error alone for a transfer that failed part way.
pub const CAP_PARTIAL_TRANSFERS: &str = "partial-transfers";

/// What one side asks of the other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// All devices the peer may use, with full descriptors.
    ListDevices,
    /// Claims a device (every interface of its active configuration, detaching
    /// kernel drivers) for this link.
    Open { key: DeviceKey },
    /// Releases a device and gives it back to its kernel drivers.
    Close { handle: Handle },
    /// Queues one transfer; answered when it completes, fails or is cancelled.
    Submit(Transfer),
    /// Cancels the `Submit` (or a device operation still waiting its turn)
    /// with this request id. Its own reply is `Done`; the cancelled request
    /// still gets exactly one reply of its own.
    Cancel { request: RequestId },
    /// SET_CONFIGURATION, done the way the host's USB core does it.
    SetConfiguration { handle: Handle, value: u8 },
    /// SET_INTERFACE: selects an alternate setting.
    SetInterface {
        handle: Handle,
        interface: u8,
        alt_setting: u8,
    },
    /// CLEAR_FEATURE(ENDPOINT_HALT), also resetting the host's data toggle.
    ClearHalt { handle: Handle, endpoint: u8 },
    /// Port reset of the device.
    Reset { handle: Handle },
}

impl Request {
    /// Short name for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::ListDevices => "ListDevices",
            Request::Open { .. } => "Open",
            Request::Close { .. } => "Close",
            Request::Submit(_) => "Submit",
            Request::Cancel { .. } => "Cancel",
            Request::SetConfiguration { .. } => "SetConfiguration",
            Request::SetInterface { .. } => "SetInterface",
            Request::ClearHalt { .. } => "ClearHalt",
            Request::Reset { .. } => "Reset",
        }
    }

    /// The open device this request acts on, if any.
    pub fn handle(&self) -> Option<Handle> {
        match self {
            Request::Close { handle }
            | Request::SetConfiguration { handle, .. }
            | Request::SetInterface { handle, .. }
            | Request::ClearHalt { handle, .. }
            | Request::Reset { handle } => Some(*handle),
            Request::Submit(t) => Some(t.handle),
            Request::ListDevices | Request::Open { .. } | Request::Cancel { .. } => None,
        }
    }
}

/// Answers to requests that were carried out (a transfer that failed part
/// way is one: see `PartlyTransferred`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Devices(Vec<DeviceInfo>),
    Opened {
        handle: Handle,
        device: DeviceInfo,
    },
    Transferred(Completion),
    /// The request was carried out and has nothing to return.
    Done,
    /// A transfer that failed after moving bytes: an IN that stalled after
    /// some packets, an OUT cut short by an error. usbip-host passes on both
    /// the error and what moved (a mass-storage data phase that ends in a
    /// stall still delivers its data), so this does too. A transfer that
    /// failed before moving anything is an `Err(UsbError)`. Sent only to
    /// peers that name [`CAP_PARTIAL_TRANSFERS`].
    PartlyTransferred {
        error: UsbError,
        completion: Completion,
    },
}

impl Reply {
    /// The answer to a transfer that ended with `error` after moving what
    /// `completion` holds: partial when bytes moved, else the error alone.
    pub fn transfer_failed(error: UsbError, completion: Completion) -> Result<Reply, UsbError> {
        if completion.actual_length == 0 {
            Err(error)
        } else {
            Ok(Reply::PartlyTransferred { error, completion })
        }
    }
}

/// Pushed without a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    DeviceArrived(DeviceInfo),
    DeviceLeft {
        key: DeviceKey,
    },
    /// The sender is stopping; the link will close.
    ShuttingDown {
        reason: String,
    },
}

/// One USB transfer. Its type (control, bulk, interrupt, isochronous) is not
/// stated by the requester: the device side takes it from the endpoint
/// descriptor of the current alternate setting, as the USB core does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transfer {
    pub handle: Handle,
    /// Endpoint address including the direction bit (0x81 = IN 1). Endpoint 0
    /// (either 0x00 or 0x80) is the control endpoint.
    pub endpoint: u8,
    /// The 8-byte setup packet; required for endpoint 0, absent otherwise.
    pub setup: Option<SetupPacket>,
    pub data: TransferData,
    pub flags: TransferFlags,
    /// Milliseconds after which the transfer fails with `Timeout`; `None`
    /// means it stays pending until it completes or is cancelled.
    pub timeout_ms: Option<u32>,
}

/// Direction-specific payload: IN transfers carry only a length.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub enum TransferData {
    In { length: u32 },
    Out(#[serde(with = "crate::codec::payload")] Bytes),
}

impl TransferData {
    /// Bytes requested (IN) or carried (OUT).
    pub fn len(&self) -> u32 {
        match self {
            TransferData::In { length } => *length,
            TransferData::Out(bytes) => bytes.len() as u32,
        }
    }

    /// True for a zero-length transfer, which is a real transfer on the bus.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for device-to-host transfers.
    pub fn is_in(&self) -> bool {
        matches!(self, TransferData::In { .. })
    }
}

impl fmt::Debug for TransferData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransferData::In { length } => write!(f, "In({length})"),
            TransferData::Out(bytes) => write!(f, "Out({} bytes)", bytes.len()),
        }
    }
}

/// The URB flags that change what happens on the bus.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferFlags {
    /// OUT: end with a zero-length packet when the length is a multiple of
    /// the max packet size (URB_ZERO_PACKET).
    pub zero_packet: bool,
    /// IN: a short read is an error (URB_SHORT_NOT_OK).
    pub short_not_ok: bool,
}

/// A completed transfer.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Bytes moved; for IN equal to `data.len()`.
    pub actual_length: u32,
    /// IN data, truncated to what the device sent; empty for OUT.
    #[serde(with = "crate::codec::payload")]
    pub data: Bytes,
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Completion({} bytes)", self.actual_length)
    }
}

/// The 8-byte SETUP packet of a control transfer, fields in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetupPacket {
    pub request_type: u8,
    pub request: u8,
    pub value: u16,
    pub index: u16,
    pub length: u16,
}

impl SetupPacket {
    /// Parses the wire form (little-endian fields, as on the bus).
    pub fn from_bytes(raw: [u8; 8]) -> Self {
        SetupPacket {
            request_type: raw[0],
            request: raw[1],
            value: u16::from_le_bytes([raw[2], raw[3]]),
            index: u16::from_le_bytes([raw[4], raw[5]]),
            length: u16::from_le_bytes([raw[6], raw[7]]),
        }
    }

    /// The wire form.
    pub fn to_bytes(self) -> [u8; 8] {
        let [v0, v1] = self.value.to_le_bytes();
        let [i0, i1] = self.index.to_le_bytes();
        let [l0, l1] = self.length.to_le_bytes();
        [self.request_type, self.request, v0, v1, i0, i1, l0, l1]
    }

    /// True when the data stage goes device-to-host.
    pub fn is_in(&self) -> bool {
        self.request_type & 0x80 != 0
    }
}

/// Standard request codes the passthrough must map to real operations.
pub mod std_request {
    pub const GET_STATUS: u8 = 0x00;
    pub const CLEAR_FEATURE: u8 = 0x01;
    pub const SET_FEATURE: u8 = 0x03;
    pub const SET_ADDRESS: u8 = 0x05;
    pub const GET_DESCRIPTOR: u8 = 0x06;
    pub const GET_CONFIGURATION: u8 = 0x08;
    pub const SET_CONFIGURATION: u8 = 0x09;
    pub const GET_INTERFACE: u8 = 0x0a;
    pub const SET_INTERFACE: u8 = 0x0b;
    /// Feature selector of CLEAR_FEATURE for endpoints.
    pub const ENDPOINT_HALT: u16 = 0;
    /// Hub port feature used by USB/IP clients to ask for a device reset.
    pub const PORT_RESET: u16 = 4;
}

/// Typed failures, shared by both hops so a client sees what the device did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum UsbError {
    #[error("endpoint stalled")]
    Stall,
    #[error("device is gone")]
    NoDevice,
    #[error("transfer timed out")]
    Timeout,
    #[error("transfer cancelled")]
    Cancelled,
    #[error("device sent more data than requested")]
    Overflow,
    #[error("short packet on a transfer that forbids it")]
    ShortPacket,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    #[error("no such device: {0}")]
    NotFound(String),
    #[error("device {0} is not shared")]
    NotShared(String),
    #[error("device is busy: {0}")]
    Busy(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl UsbError {
    /// The negative errno usbip-host reports in `RET_SUBMIT.status` for this
    /// failure, so USB/IP clients see what a kernel server would send.
    pub fn urb_status(&self) -> i32 {
        match self {
            UsbError::Stall => -libc::EPIPE,
            UsbError::NoDevice => -libc::ESHUTDOWN,
            UsbError::Timeout => -libc::ETIMEDOUT,
            UsbError::Cancelled => -libc::ECONNRESET,
            UsbError::Overflow => -libc::EOVERFLOW,
            UsbError::ShortPacket => -libc::EREMOTEIO,
            UsbError::Unsupported(_) => -libc::ENOSYS,
            UsbError::Invalid(_) => -libc::EINVAL,
            UsbError::AccessDenied(_) | UsbError::NotShared(_) => -libc::EPERM,
            UsbError::NotFound(_) => -libc::ENODEV,
            UsbError::Busy(_) => -libc::EBUSY,
            UsbError::Io(_) | UsbError::Protocol(_) => -libc::EPROTO,
        }
    }
}

/// Bus speed of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Speed {
    Low,
    Full,
    High,
    Super,
    SuperPlus,
}

impl Speed {
    /// The `enum usb_device_speed` value USB/IP and vhci_hcd use.
    pub fn usbip_code(self) -> u32 {
        match self {
            Speed::Low => 1,
            Speed::Full => 2,
            Speed::High => 3,
            Speed::Super => 5,
            Speed::SuperPlus => 6,
        }
    }

    /// Short label for tables.
    pub fn label(self) -> &'static str {
        match self {
            Speed::Low => "low",
            Speed::Full => "full",
            Speed::High => "high",
            Speed::Super => "super",
            Speed::SuperPlus => "super+",
        }
    }
}

/// Names a device across helper, agent and network restarts: the physical
/// port path plus what the device says it is. A counter would change on every
/// restart; this does not, so clients can re-attach the same device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceKey {
    /// Bus and port chain as in `/sys/bus/usb/devices`, e.g. `1-1.2`.
    pub bus_path: String,
    pub vid: u16,
    pub pid: u16,
    pub serial: Option<String>,
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:04x}:{:04x}", self.bus_path, self.vid, self.pid)?;
        if let Some(serial) = &self.serial {
            write!(f, "/{serial}")?;
        }
        Ok(())
    }
}

/// Why a device key given by a user could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid device key {input:?}: expected BUSPATH/VID:PID[/SERIAL], e.g. 1-1.2/0525:a4a0/1234"
)]
pub struct DeviceKeyParseError {
    pub input: String,
}

impl FromStr for DeviceKey {
    type Err = DeviceKeyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DeviceKeyParseError { input: s.into() };
        let mut parts = s.splitn(3, '/');
        let bus_path = parts.next().filter(|p| !p.is_empty()).ok_or_else(err)?;
        let ids = parts.next().ok_or_else(err)?;
        let (vid, pid) = ids.split_once(':').ok_or_else(err)?;
        let hex = |h: &str| {
            if h.len() == 4 {
                u16::from_str_radix(h, 16).map_err(|_| err())
            } else {
                Err(err())
            }
        };
        Ok(DeviceKey {
            bus_path: bus_path.to_string(),
            vid: hex(vid)?,
            pid: hex(pid)?,
            serial: parts.next().map(str::to_string),
        })
    }
}

/// A device as listed: identity, speed, location and every descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub key: DeviceKey,
    pub bus_number: u8,
    pub address: u8,
    pub speed: Speed,
    pub descriptor: DeviceDescriptor,
    /// `bConfigurationValue` of the active configuration, 0 if unconfigured.
    pub active_configuration: u8,
    pub configurations: Vec<ConfigurationDescriptor>,
    pub manufacturer: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
}

impl DeviceInfo {
    /// The active configuration, if the device is configured.
    pub fn active_config(&self) -> Option<&ConfigurationDescriptor> {
        self.configurations
            .iter()
            .find(|c| c.value == self.active_configuration)
    }

    /// Human-readable product name, falling back to VID:PID.
    pub fn display_name(&self) -> String {
        match (&self.manufacturer, &self.product) {
            (Some(m), Some(p)) => format!("{m} {p}"),
            (None, Some(p)) => p.clone(),
            _ => format!("{:04x}:{:04x}", self.key.vid, self.key.pid),
        }
    }
}

/// The standard device descriptor, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescriptor {
    pub usb_version: u16,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub max_packet_size0: u8,
    pub vendor_id: u16,
    pub product_id: u16,
    pub device_version: u16,
    pub manufacturer_index: u8,
    pub product_index: u8,
    pub serial_index: u8,
    pub num_configurations: u8,
    /// The 18 bytes as the device sent them.
    pub raw: Bytes,
}

/// One configuration with its interfaces, parsed, plus the raw bytes
/// (configuration descriptor and everything after it, `wTotalLength` long).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigurationDescriptor {
    pub value: u8,
    pub attributes: u8,
    pub max_power: u8,
    pub string_index: u8,
    pub interfaces: Vec<InterfaceDescriptor>,
    pub raw: Bytes,
}

impl ConfigurationDescriptor {
    /// The alternate setting `alt` of interface `number`.
    pub fn alt_setting(&self, number: u8, alt: u8) -> Option<&AltSetting> {
        self.interfaces
            .iter()
            .find(|i| i.number == number)?
            .alt_settings
            .iter()
            .find(|a| a.alternate == alt)
    }
}

/// An interface and all its alternate settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceDescriptor {
    pub number: u8,
    pub alt_settings: Vec<AltSetting>,
}

/// One alternate setting of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltSetting {
    pub alternate: u8,
    pub class: u8,
    pub subclass: u8,
    pub protocol: u8,
    pub string_index: u8,
    pub endpoints: Vec<EndpointDescriptor>,
}

/// One endpoint descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDescriptor {
    pub address: u8,
    pub attributes: u8,
    pub max_packet_size: u16,
    pub interval: u8,
}

/// Endpoint transfer types (bmAttributes bits 0..1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointType {
    Control,
    Isochronous,
    Bulk,
    Interrupt,
}

impl EndpointDescriptor {
    /// The transfer type this endpoint carries.
    pub fn transfer_type(&self) -> EndpointType {
        match self.attributes & 0x03 {
            0 => EndpointType::Control,
            1 => EndpointType::Isochronous,
            2 => EndpointType::Bulk,
            _ => EndpointType::Interrupt,
        }
    }

    /// Payload bytes per packet (bits 0..10 of wMaxPacketSize).
    pub fn packet_size(&self) -> usize {
        usize::from(self.max_packet_size & 0x7ff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_key_round_trips_through_text() {
        let key = DeviceKey {
            bus_path: "1-1.2".into(),
            vid: 0x0525,
            pid: 0xa4a0,
            serial: Some("ab/cd".into()),
        };
        assert_eq!(key.to_string(), "1-1.2/0525:a4a0/ab/cd");
        assert_eq!(key.to_string().parse::<DeviceKey>().unwrap(), key);
        let no_serial: DeviceKey = "3-4/046d:c52b".parse().unwrap();
        assert_eq!(no_serial.serial, None);
        assert_eq!(no_serial.vid, 0x046d);
    }

    #[test]
    fn device_key_rejects_garbage() {
        for bad in [
            "",
            "1-1",
            "1-1/0525",
            "1-1/525:a4a0",
            "1-1/zzzz:a4a0",
            "/0525:a4a0",
        ] {
            assert!(bad.parse::<DeviceKey>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn setup_packet_wire_form_round_trips() {
        let raw = [0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00];
        let setup = SetupPacket::from_bytes(raw);
        assert_eq!(setup.request, std_request::GET_DESCRIPTOR);
        assert_eq!(setup.value, 0x0100);
        assert_eq!(setup.length, 18);
        assert!(setup.is_in());
        assert_eq!(setup.to_bytes(), raw);
    }

    #[test]
    fn hello_version_mismatch_is_a_protocol_error() {
        let mut hello = Hello::new("test");
        assert!(hello.check_compatible().is_ok());
        hello.version += 1;
        assert!(matches!(
            hello.check_compatible(),
            Err(UsbError::Protocol(_))
        ));
    }
}
