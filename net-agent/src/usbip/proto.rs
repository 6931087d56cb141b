//! USB/IP wire protocol v1.1.1: the byte layouts that Linux `vhci_hcd`, the
//! stock `usbip` tool and usbip-win2 speak, as pure encode/decode functions so
//! the connection code stays a thin I/O shell and every layout is testable.
//!
//! Sources: the kernel's `Documentation/usb/usbip_protocol.rst`,
//! `include/uapi/linux/usbip.h`, `drivers/usb/usbip/{usbip_common.[ch],
//! stub_rx.c, stub_tx.c, vhci_rx.c, vhci_tx.c}` and
//! `tools/usb/usbip/{libsrc/usbip_common.h, src/usbip_network.c,
//! src/usbip_attach.c}`.
//!
//! # Layout (all integers big-endian)
//! - Before import, every message starts with an 8-byte [`OpHeader`]
//!   `{version: u16 = 0x0111, code: u16, status: u32}`. `OP_REQ_DEVLIST` has
//!   no body; `OP_REP_DEVLIST` carries a `u32` count, then per device a
//!   312-byte [`UsbDevice`] followed by `num_interfaces` 4-byte
//!   [`UsbInterface`]s, and the server closes the connection. `OP_REQ_IMPORT`
//!   carries a 32-byte busid; `OP_REP_IMPORT` carries a [`UsbDevice`] only
//!   when its status is 0 ([`ImportReply`]).
//! - After a successful import the same connection carries URBs. Every URB
//!   header is 48 bytes ([`UrbHeader`]): five `u32` (command, seqnum, devid,
//!   direction, ep), then the command's fields zero-padded to 28 bytes.
//!   CMD_SUBMIT is followed by `transfer_buffer_length` bytes of OUT data
//!   (none for IN) and then, for isochronous URBs, `number_of_packets`
//!   16-byte [`IsoPacketDescriptor`]s. RET_SUBMIT is followed by
//!   `actual_length` bytes of IN data (none for OUT), then iso descriptors.
//!
//! # Pitfalls
//! - CMD_UNLINK and RET_UNLINK are 48 bytes too (4-byte field + 24 bytes of
//!   padding). Reading fewer desyncs the stream; the kernel logs
//!   "unknown pdu" and drops the device.
//! - RET_* headers carry devid, direction and ep = 0: the kernel stub zeroes
//!   them (`setup_base_pdu` in stub_tx.c), the doc says "for server this shall
//!   be 0", and vhci and usbip-win2 match replies by seqnum alone. Build
//!   replies with [`RetSubmit::reply_to`] and [`RetUnlink::reply_to`].
//! - `actual_length` must not exceed the command's `transfer_buffer_length`:
//!   vhci calls that a malicious packet and drops the device
//!   (`usbip_recv_xbuff`). [`RetSubmit::reply_to`] refuses it.
//! - Non-iso `number_of_packets`: the doc's table says 0xffffffff, but Linux
//!   vhci sends 0 (the URB default, also in the doc's own capture) and
//!   usbip-win2 sends -1. The stub copies the value into the URB and echoes it
//!   in RET_SUBMIT; usbip-win2 accepts 0 or -1 back (and at most 1024
//!   packets). So 0 and -1 both mean "no descriptors" ([`iso_descriptors_len`])
//!   and replies echo the client's value. The capture also has
//!   `start_frame = -1` for interrupt URBs, the opposite of the table.
//! - After RET_UNLINK for an URB, never send its RET_SUBMIT: vhci logs
//!   "cannot find a urb" and drops the device. RET_UNLINK's seqnum is the
//!   CMD_UNLINK's own seqnum; status is -ECONNRESET (-104) if the URB was
//!   cancelled, 0 if it had already completed. Statuses are negative Linux
//!   errno values on every platform.
//! - `transfer_flags` are the stable `USBIP_URB_*` values (newer kernels map
//!   them to internal `URB_*` flags). vhci clears `URB_NO_TRANSFER_DMA_MAP`
//!   and the stub masks flags per endpoint type (`masking_bogus_flags`), so
//!   only `URB_SHORT_NOT_OK`, `URB_ZERO_PACKET` and `URB_DIR_IN` matter.
//! - Strings are NUL-padded. The `usbip` tool sends at most 31 busid bytes
//!   and rejects an import reply whose busid differs from its request.
//! - The client puts `(busnum << 16) | devnum` from the import reply into the
//!   devid of its commands, each truncated to 8 bits by `usbip attach`
//!   ([`UsbDevice::devid`]); the stub drops the connection on another devid.
//! - vhci accepts speeds 1..=5, and 6 (SuperSpeed+) only since a 2024 patch:
//!   report SuperSpeed+ devices as [`USB_SPEED_SUPER`] to older kernels.

use std::cmp::Ordering;

use bytes::{Buf, BufMut, BytesMut};

/// Protocol version in every [`OpHeader`]; the `usbip` tool refuses others.
pub const USBIP_VERSION: u16 = 0x0111;
/// Conventional TCP port of a USB/IP server.
pub const USBIP_PORT: u16 = 3240;

/// Asks for the list of exported devices.
pub const OP_REQ_DEVLIST: u16 = 0x8005;
/// Answers [`OP_REQ_DEVLIST`] with [`encode_devlist`]'s body.
pub const OP_REP_DEVLIST: u16 = 0x0005;
/// Asks to import (attach) the device with a busid.
pub const OP_REQ_IMPORT: u16 = 0x8003;
/// Answers [`OP_REQ_IMPORT`] ([`ImportReply`]).
pub const OP_REP_IMPORT: u16 = 0x0003;

/// [`OpHeader`] status: success.
pub const ST_OK: u32 = 0x00;
/// [`OpHeader`] status: device not available (what usbipd answers for an unknown busid).
pub const ST_NA: u32 = 0x01;
/// [`OpHeader`] status: device busy (already imported).
pub const ST_DEV_BUSY: u32 = 0x02;
/// [`OpHeader`] status: device in an error state.
pub const ST_DEV_ERR: u32 = 0x03;
/// [`OpHeader`] status: no such device.
pub const ST_NODEV: u32 = 0x04;
/// [`OpHeader`] status: any other failure.
pub const ST_ERROR: u32 = 0x05;

/// URB command: submit an URB (client to server).
pub const USBIP_CMD_SUBMIT: u32 = 1;
/// URB command: cancel a submitted URB (client to server).
pub const USBIP_CMD_UNLINK: u32 = 2;
/// URB command: result of a CMD_SUBMIT (server to client).
pub const USBIP_RET_SUBMIT: u32 = 3;
/// URB command: result of a CMD_UNLINK (server to client).
pub const USBIP_RET_UNLINK: u32 = 4;

/// URB direction host to device.
pub const USBIP_DIR_OUT: u32 = 0;
/// URB direction device to host.
pub const USBIP_DIR_IN: u32 = 1;

/// transfer_flags: a short IN transfer is an error.
pub const URB_SHORT_NOT_OK: u32 = 0x0001;
/// transfer_flags: start an iso transfer at the next possible frame.
pub const URB_ISO_ASAP: u32 = 0x0002;
/// transfer_flags: client-side DMA detail; vhci clears it before sending.
pub const URB_NO_TRANSFER_DMA_MAP: u32 = 0x0004;
/// transfer_flags: end a bulk OUT that fills its last packet with a zero-length packet.
pub const URB_ZERO_PACKET: u32 = 0x0040;
/// transfer_flags: completion-interrupt hint, meaningless to a server.
pub const URB_NO_INTERRUPT: u32 = 0x0080;
/// transfer_flags: client-side buffer ownership, meaningless to a server.
pub const URB_FREE_BUFFER: u32 = 0x0100;
/// transfer_flags: the URB is IN (mirrors the header's direction).
pub const URB_DIR_IN: u32 = 0x0200;

/// Speed code (`enum usb_device_speed`): unknown; vhci refuses it.
pub const USB_SPEED_UNKNOWN: u32 = 0;
/// Speed code: low speed, 1.5 Mbit/s.
pub const USB_SPEED_LOW: u32 = 1;
/// Speed code: full speed, 12 Mbit/s.
pub const USB_SPEED_FULL: u32 = 2;
/// Speed code: high speed, 480 Mbit/s.
pub const USB_SPEED_HIGH: u32 = 3;
/// Speed code: wireless USB.
pub const USB_SPEED_WIRELESS: u32 = 4;
/// Speed code: SuperSpeed, 5 Gbit/s.
pub const USB_SPEED_SUPER: u32 = 5;
/// Speed code: SuperSpeed+; older vhci refuses it (see the module docs).
pub const USB_SPEED_SUPER_PLUS: u32 = 6;

/// Size of an [`OpHeader`].
pub const OP_HEADER_LEN: usize = 8;
/// Size of a [`UsbDevice`] (`struct usbip_usb_device`).
pub const USB_DEVICE_LEN: usize = 312;
/// Size of a [`UsbInterface`] (`struct usbip_usb_interface`).
pub const USB_INTERFACE_LEN: usize = 4;
/// Size of every [`UrbHeader`], whatever the command.
pub const URB_HEADER_LEN: usize = 48;
/// Size of an [`IsoPacketDescriptor`].
pub const ISO_DESCRIPTOR_LEN: usize = 16;
/// The most isochronous packets any USB/IP peer puts in one URB (usbip-win2's
/// limit; Linux's stub allows fewer): a larger count is an error, not an
/// allocation.
pub const MAX_ISO_PACKETS: usize = 1024;
/// Size of a busid field, including its terminating NUL.
pub const BUSID_LEN: usize = 32;
/// Size of a path field, including its terminating NUL.
pub const PATH_LEN: usize = 256;

/// Why bytes could not be decoded or a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("truncated {what}: {got} of {need} bytes")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{extra} unexpected bytes after {what}")]
    Trailing { what: &'static str, extra: usize },
    #[error("usbip version {0:#06x} not supported")]
    Version(u16),
    #[error("expected op code {expected:#06x}, got {got:#06x}")]
    OpCode { expected: u16, got: u16 },
    #[error("unknown URB command {0}")]
    UnknownCommand(u32),
    #[error("{0} too long")]
    TooLong(&'static str),
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("device {busid} lists {listed} interfaces but num_interfaces is {declared}")]
    InterfaceCount {
        busid: String,
        declared: u8,
        listed: usize,
    },
    #[error("too many devices")]
    TooManyDevices,
    #[error("an import refusal needs a non-zero status")]
    ZeroRefusal,
    #[error("bad URB direction {0}")]
    Direction(u32),
    #[error("negative transfer_buffer_length {0}")]
    NegativeLength(i32),
    #[error("transfer_buffer_length {len} over the {max}-byte limit")]
    LengthOverLimit { len: i32, max: usize },
    #[error("actual_length {actual} exceeds transfer_buffer_length {buffer}")]
    ActualLength { actual: usize, buffer: i32 },
}

/// `buf` if it is exactly `need` bytes long.
fn exact<'a>(buf: &'a [u8], need: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
    match buf.len().cmp(&need) {
        Ordering::Less => Err(ProtocolError::Truncated {
            what,
            need,
            got: buf.len(),
        }),
        Ordering::Greater => Err(ProtocolError::Trailing {
            what,
            extra: buf.len() - need,
        }),
        Ordering::Equal => Ok(buf),
    }
}

/// Splits `n` bytes off the front of `r`.
fn take<'a>(r: &mut &'a [u8], n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
    let (head, rest) = r.split_at_checked(n).ok_or(ProtocolError::Truncated {
        what,
        need: n,
        got: r.len(),
    })?;
    *r = rest;
    Ok(head)
}

/// Refuses strings that would not survive a NUL-padded `size`-byte field.
fn check_str(s: &str, size: usize, field: &'static str) -> Result<(), ProtocolError> {
    if s.len() >= size {
        Err(ProtocolError::TooLong(field))
    } else if s.as_bytes().contains(&0) {
        Err(ProtocolError::Nul(field))
    } else {
        Ok(())
    }
}

/// Writes a checked string NUL-padded to `size` bytes.
fn put_str(w: &mut impl BufMut, s: &str, size: usize) {
    w.put_slice(s.as_bytes());
    w.put_bytes(0, size.saturating_sub(s.len()));
}

/// Reads a `size`-byte NUL-padded field up to its first NUL (or its end).
fn get_str(r: &mut &[u8], size: usize) -> String {
    let (field, rest) = r.split_at(size.min(r.len()));
    *r = rest;
    let text = field.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// The 8-byte header of every pre-import message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpHeader {
    /// Always [`USBIP_VERSION`] on the wire.
    pub version: u16,
    /// One of the `OP_*` codes.
    pub code: u16,
    /// 0 in requests; `ST_*` in replies.
    pub status: u32,
}

impl OpHeader {
    /// A header with our protocol version, so callers cannot send another.
    pub fn new(code: u16, status: u32) -> Self {
        Self {
            version: USBIP_VERSION,
            code,
            status,
        }
    }

    /// The wire bytes.
    pub fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut out = [0; OP_HEADER_LEN];
        let mut w = &mut out[..];
        w.put_u16(self.version);
        w.put_u16(self.code);
        w.put_u32(self.status);
        out
    }

    /// Parses exactly 8 bytes; refuses other versions, like the `usbip` tool,
    /// since nothing after a foreign header can be trusted.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = exact(buf, OP_HEADER_LEN, "op header")?;
        let header = Self {
            version: r.get_u16(),
            code: r.get_u16(),
            status: r.get_u32(),
        };
        if header.version != USBIP_VERSION {
            return Err(ProtocolError::Version(header.version));
        }
        Ok(header)
    }

    /// Checks the code, so a message of the wrong kind is not misparsed.
    pub fn expect(self, code: u16) -> Result<Self, ProtocolError> {
        if self.code == code {
            Ok(self)
        } else {
            Err(ProtocolError::OpCode {
                expected: code,
                got: self.code,
            })
        }
    }
}

/// An exported device as listed and imported (`struct usbip_usb_device`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbDevice {
    /// Sysfs path on the exporting host; informational, at most 255 bytes.
    pub path: String,
    /// Bus id such as "3-2" that clients import by; at most 31 bytes.
    pub busid: String,
    /// Bus number; the high half of [`UsbDevice::devid`].
    pub busnum: u32,
    /// Device number; the low half of [`UsbDevice::devid`].
    pub devnum: u32,
    /// `USB_SPEED_*` code; vhci picks its hub from it.
    pub speed: u32,
    /// idVendor from the device descriptor.
    pub id_vendor: u16,
    /// idProduct from the device descriptor.
    pub id_product: u16,
    /// bcdDevice from the device descriptor.
    pub bcd_device: u16,
    /// bDeviceClass from the device descriptor.
    pub device_class: u8,
    /// bDeviceSubClass from the device descriptor.
    pub device_subclass: u8,
    /// bDeviceProtocol from the device descriptor.
    pub device_protocol: u8,
    /// bConfigurationValue of the active configuration.
    pub configuration_value: u8,
    /// bNumConfigurations from the device descriptor.
    pub num_configurations: u8,
    /// Interfaces of the active configuration; as many [`UsbInterface`]s follow in a devlist.
    pub num_interfaces: u8,
}

impl UsbDevice {
    /// The devid `usbip attach` will put in every URB header after importing
    /// this device: `(busnum << 16) | devnum`, but from `uint8_t` copies of
    /// both, so keep them below 256 for all clients to agree.
    pub fn devid(&self) -> u32 {
        ((self.busnum & 0xff) << 16) | (self.devnum & 0xff)
    }

    /// The 312 wire bytes; refuses strings that do not fit with their NUL.
    pub fn encode(&self) -> Result<[u8; USB_DEVICE_LEN], ProtocolError> {
        check_str(&self.path, PATH_LEN, "path")?;
        check_str(&self.busid, BUSID_LEN, "busid")?;
        let mut out = [0; USB_DEVICE_LEN];
        let mut w = &mut out[..];
        put_str(&mut w, &self.path, PATH_LEN);
        put_str(&mut w, &self.busid, BUSID_LEN);
        w.put_u32(self.busnum);
        w.put_u32(self.devnum);
        w.put_u32(self.speed);
        w.put_u16(self.id_vendor);
        w.put_u16(self.id_product);
        w.put_u16(self.bcd_device);
        w.put_slice(&[
            self.device_class,
            self.device_subclass,
            self.device_protocol,
            self.configuration_value,
            self.num_configurations,
            self.num_interfaces,
        ]);
        Ok(out)
    }

    /// Parses exactly 312 bytes; strings end at their first NUL or at the
    /// end of their field, and invalid UTF-8 is replaced rather than refused.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = exact(buf, USB_DEVICE_LEN, "usb device")?;
        Ok(Self {
            path: get_str(&mut r, PATH_LEN),
            busid: get_str(&mut r, BUSID_LEN),
            busnum: r.get_u32(),
            devnum: r.get_u32(),
            speed: r.get_u32(),
            id_vendor: r.get_u16(),
            id_product: r.get_u16(),
            bcd_device: r.get_u16(),
            device_class: r.get_u8(),
            device_subclass: r.get_u8(),
            device_protocol: r.get_u8(),
            configuration_value: r.get_u8(),
            num_configurations: r.get_u8(),
            num_interfaces: r.get_u8(),
        })
    }
}

/// One interface of a listed device (`struct usbip_usb_interface`), shown by
/// `usbip list` and used by usbip-win2 to pick drivers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsbInterface {
    /// bInterfaceClass.
    pub class: u8,
    /// bInterfaceSubClass.
    pub subclass: u8,
    /// bInterfaceProtocol.
    pub protocol: u8,
}

impl UsbInterface {
    /// The wire bytes, padding byte included.
    pub fn encode(&self) -> [u8; USB_INTERFACE_LEN] {
        [self.class, self.subclass, self.protocol, 0]
    }

    /// Parses exactly 4 bytes, ignoring the padding byte.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = exact(buf, USB_INTERFACE_LEN, "usb interface")?;
        Ok(Self {
            class: r.get_u8(),
            subclass: r.get_u8(),
            protocol: r.get_u8(),
        })
    }
}

/// A device and its interfaces as one OP_REP_DEVLIST entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevlistEntry {
    /// The device; its `num_interfaces` must equal `interfaces.len()`.
    pub device: UsbDevice,
    /// The interfaces of its active configuration.
    pub interfaces: Vec<UsbInterface>,
}

/// Appends the OP_REP_DEVLIST body (after its [`OpHeader`]): the count, then
/// each device and its interfaces. On error `out` is left as it was.
pub fn encode_devlist(out: &mut BytesMut, entries: &[DevlistEntry]) -> Result<(), ProtocolError> {
    let count = u32::try_from(entries.len()).map_err(|_| ProtocolError::TooManyDevices)?;
    let start = out.len();
    out.put_u32(count);
    let result = entries.iter().try_for_each(|entry| {
        if usize::from(entry.device.num_interfaces) != entry.interfaces.len() {
            return Err(ProtocolError::InterfaceCount {
                busid: entry.device.busid.clone(),
                declared: entry.device.num_interfaces,
                listed: entry.interfaces.len(),
            });
        }
        out.put_slice(&entry.device.encode()?);
        for interface in &entry.interfaces {
            out.put_slice(&interface.encode());
        }
        Ok(())
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// Parses a whole OP_REP_DEVLIST body (the server closes the connection
/// after it, so the client reads to EOF); trailing bytes are an error.
pub fn decode_devlist(body: &[u8]) -> Result<Vec<DevlistEntry>, ProtocolError> {
    let mut r = body;
    let count = take(&mut r, 4, "device count")?.get_u32();
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    // The count is untrusted: reserve only what the bytes at hand can hold.
    let mut entries = Vec::with_capacity(count.min(r.len() / USB_DEVICE_LEN));
    for _ in 0..count {
        let device = UsbDevice::decode(take(&mut r, USB_DEVICE_LEN, "usb device")?)?;
        let len = usize::from(device.num_interfaces) * USB_INTERFACE_LEN;
        let interfaces = take(&mut r, len, "interface list")?
            .chunks_exact(USB_INTERFACE_LEN)
            .map(UsbInterface::decode)
            .collect::<Result<_, _>>()?;
        entries.push(DevlistEntry { device, interfaces });
    }
    if !r.is_empty() {
        return Err(ProtocolError::Trailing {
            what: "device list",
            extra: r.len(),
        });
    }
    Ok(entries)
}

/// The OP_REQ_IMPORT body (after its [`OpHeader`]): the busid NUL-padded.
pub fn encode_import_request(busid: &str) -> Result<[u8; BUSID_LEN], ProtocolError> {
    check_str(busid, BUSID_LEN, "busid")?;
    let mut out = [0; BUSID_LEN];
    put_str(&mut &mut out[..], busid, BUSID_LEN);
    Ok(out)
}

/// Parses exactly the 32-byte OP_REQ_IMPORT body into the requested busid.
pub fn decode_import_request(body: &[u8]) -> Result<String, ProtocolError> {
    let mut r = exact(body, BUSID_LEN, "import request")?;
    Ok(get_str(&mut r, BUSID_LEN))
}

/// A complete OP_REP_IMPORT: the device on success, or only a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportReply {
    /// Status 0; the connection now carries URBs for this device.
    Device(UsbDevice),
    /// A non-zero `ST_*` status; nothing follows the header.
    Refused(u32),
}

impl ImportReply {
    /// Appends header and body. On error `out` is left as it was.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), ProtocolError> {
        match self {
            Self::Device(device) => {
                let device = device.encode()?;
                out.put_slice(&OpHeader::new(OP_REP_IMPORT, ST_OK).encode());
                out.put_slice(&device);
            }
            Self::Refused(ST_OK) => return Err(ProtocolError::ZeroRefusal),
            Self::Refused(status) => {
                out.put_slice(&OpHeader::new(OP_REP_IMPORT, *status).encode());
            }
        }
        Ok(())
    }

    /// Parses a whole reply: 8 bytes when refused, 8 + 312 on success (read
    /// the header first, then 312 more bytes if its status is 0).
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = buf;
        let header =
            OpHeader::decode(take(&mut r, OP_HEADER_LEN, "op header")?)?.expect(OP_REP_IMPORT)?;
        match header.status {
            ST_OK => Ok(Self::Device(UsbDevice::decode(r)?)),
            status => {
                exact(r, 0, "import refusal")?;
                Ok(Self::Refused(status))
            }
        }
    }
}

/// USBIP_CMD_SUBMIT: the client submits an URB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CmdSubmit {
    /// Identifies the URB in replies and unlinks; echo it exactly (usbip-win2 encodes the direction in it).
    pub seqnum: u32,
    /// `(busnum << 16) | devnum` of the imported device.
    pub devid: u32,
    /// [`USBIP_DIR_OUT`] or [`USBIP_DIR_IN`].
    pub direction: u32,
    /// Endpoint number 0..=15, without the direction bit.
    pub ep: u32,
    /// `URB_*` flags.
    pub transfer_flags: u32,
    /// Bytes of OUT data that follow, or the size of the IN buffer.
    pub transfer_buffer_length: i32,
    /// Iso start frame; not meaningful otherwise.
    pub start_frame: i32,
    /// Iso descriptors that follow the data; 0 or -1 for non-iso.
    pub number_of_packets: i32,
    /// Polling interval for interrupt and iso endpoints.
    pub interval: i32,
    /// The control SETUP packet, zero for other transfers.
    pub setup: [u8; 8],
}

/// USBIP_CMD_UNLINK: the client cancels a submitted URB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CmdUnlink {
    /// This unlink's own seqnum, echoed by its RET_UNLINK.
    pub seqnum: u32,
    /// `(busnum << 16) | devnum` of the imported device.
    pub devid: u32,
    /// 0 from vhci and usbip-win2.
    pub direction: u32,
    /// 0 from vhci and usbip-win2.
    pub ep: u32,
    /// seqnum of the CMD_SUBMIT to cancel.
    pub unlink_seqnum: u32,
}

/// USBIP_RET_SUBMIT: the server's result of a CMD_SUBMIT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetSubmit {
    /// seqnum of the CMD_SUBMIT this answers.
    pub seqnum: u32,
    /// 0 from the kernel stub.
    pub devid: u32,
    /// 0 from the kernel stub.
    pub direction: u32,
    /// 0 from the kernel stub.
    pub ep: u32,
    /// 0 or a negative Linux errno.
    pub status: i32,
    /// Bytes transferred; for IN, the bytes of data that follow.
    pub actual_length: i32,
    /// Iso start frame; the command's value otherwise.
    pub start_frame: i32,
    /// Iso descriptors that follow the data; the command's value otherwise.
    pub number_of_packets: i32,
    /// Iso packets that failed.
    pub error_count: i32,
}

/// USBIP_RET_UNLINK: the server's result of a CMD_UNLINK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetUnlink {
    /// seqnum of the CMD_UNLINK this answers (not of the cancelled URB).
    pub seqnum: u32,
    /// 0 from the kernel stub.
    pub devid: u32,
    /// 0 from the kernel stub.
    pub direction: u32,
    /// 0 from the kernel stub.
    pub ep: u32,
    /// -ECONNRESET (-104) if cancelled, 0 if the URB had already completed.
    pub status: i32,
}

impl RetSubmit {
    /// The kernel stub's reply to `cmd`: devid, direction and ep zeroed,
    /// start_frame and number_of_packets echoed (callers fill in iso results),
    /// and `actual_length` refused if it exceeds the command's buffer, which
    /// would make vhci drop the device.
    pub fn reply_to(
        cmd: &CmdSubmit,
        status: i32,
        actual_length: usize,
    ) -> Result<Self, ProtocolError> {
        let too_long = ProtocolError::ActualLength {
            actual: actual_length,
            buffer: cmd.transfer_buffer_length,
        };
        if actual_length > usize::try_from(cmd.transfer_buffer_length).unwrap_or(0) {
            return Err(too_long);
        }
        Ok(Self {
            seqnum: cmd.seqnum,
            status,
            actual_length: i32::try_from(actual_length).map_err(|_| too_long)?,
            start_frame: cmd.start_frame,
            number_of_packets: cmd.number_of_packets,
            ..Self::default()
        })
    }
}

impl RetUnlink {
    /// The kernel stub's reply to `cmd`: its own seqnum, devid, direction and
    /// ep zeroed.
    pub fn reply_to(cmd: &CmdUnlink, status: i32) -> Self {
        Self {
            seqnum: cmd.seqnum,
            status,
            ..Self::default()
        }
    }
}

/// Any 48-byte URB header, dispatched on its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrbHeader {
    /// USBIP_CMD_SUBMIT.
    Submit(CmdSubmit),
    /// USBIP_CMD_UNLINK.
    Unlink(CmdUnlink),
    /// USBIP_RET_SUBMIT.
    RetSubmit(RetSubmit),
    /// USBIP_RET_UNLINK.
    RetUnlink(RetUnlink),
}

/// Writes the 20-byte basic header.
fn put_basic(w: &mut impl BufMut, command: u32, seqnum: u32, devid: u32, direction: u32, ep: u32) {
    for field in [command, seqnum, devid, direction, ep] {
        w.put_u32(field);
    }
}

impl UrbHeader {
    /// The 48 wire bytes, padding zeroed.
    pub fn encode(&self) -> [u8; URB_HEADER_LEN] {
        let mut out = [0; URB_HEADER_LEN];
        let mut w = &mut out[..];
        match self {
            Self::Submit(c) => {
                put_basic(
                    &mut w,
                    USBIP_CMD_SUBMIT,
                    c.seqnum,
                    c.devid,
                    c.direction,
                    c.ep,
                );
                w.put_u32(c.transfer_flags);
                w.put_i32(c.transfer_buffer_length);
                w.put_i32(c.start_frame);
                w.put_i32(c.number_of_packets);
                w.put_i32(c.interval);
                w.put_slice(&c.setup);
            }
            Self::Unlink(c) => {
                put_basic(
                    &mut w,
                    USBIP_CMD_UNLINK,
                    c.seqnum,
                    c.devid,
                    c.direction,
                    c.ep,
                );
                w.put_u32(c.unlink_seqnum);
            }
            Self::RetSubmit(r) => {
                put_basic(
                    &mut w,
                    USBIP_RET_SUBMIT,
                    r.seqnum,
                    r.devid,
                    r.direction,
                    r.ep,
                );
                w.put_i32(r.status);
                w.put_i32(r.actual_length);
                w.put_i32(r.start_frame);
                w.put_i32(r.number_of_packets);
                w.put_i32(r.error_count);
            }
            Self::RetUnlink(r) => {
                put_basic(
                    &mut w,
                    USBIP_RET_UNLINK,
                    r.seqnum,
                    r.devid,
                    r.direction,
                    r.ep,
                );
                w.put_i32(r.status);
            }
        }
        out
    }

    /// Parses a header; padding is ignored, as the kernel does. Only the
    /// command is checked: the caller validates fields against its state.
    pub fn decode(buf: &[u8; URB_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut r = &buf[..];
        let command = r.get_u32();
        let (seqnum, devid, direction, ep) = (r.get_u32(), r.get_u32(), r.get_u32(), r.get_u32());
        match command {
            USBIP_CMD_SUBMIT => Ok(Self::Submit(CmdSubmit {
                seqnum,
                devid,
                direction,
                ep,
                transfer_flags: r.get_u32(),
                transfer_buffer_length: r.get_i32(),
                start_frame: r.get_i32(),
                number_of_packets: r.get_i32(),
                interval: r.get_i32(),
                setup: r.get_u64().to_be_bytes(),
            })),
            USBIP_CMD_UNLINK => Ok(Self::Unlink(CmdUnlink {
                seqnum,
                devid,
                direction,
                ep,
                unlink_seqnum: r.get_u32(),
            })),
            USBIP_RET_SUBMIT => Ok(Self::RetSubmit(RetSubmit {
                seqnum,
                devid,
                direction,
                ep,
                status: r.get_i32(),
                actual_length: r.get_i32(),
                start_frame: r.get_i32(),
                number_of_packets: r.get_i32(),
                error_count: r.get_i32(),
            })),
            USBIP_RET_UNLINK => Ok(Self::RetUnlink(RetUnlink {
                seqnum,
                devid,
                direction,
                ep,
                status: r.get_i32(),
            })),
            other => Err(ProtocolError::UnknownCommand(other)),
        }
    }
}

/// One packet of an isochronous URB (`struct usbip_iso_packet_descriptor`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IsoPacketDescriptor {
    /// Offset of the packet in the URB's buffer (the data on the wire is packed without gaps).
    pub offset: u32,
    /// Expected length.
    pub length: u32,
    /// Bytes transferred; in a RET_SUBMIT they sum to its actual_length.
    pub actual_length: u32,
    /// 0 or a negative Linux errno.
    pub status: i32,
}

impl IsoPacketDescriptor {
    /// The 16 wire bytes.
    pub fn encode(&self) -> [u8; ISO_DESCRIPTOR_LEN] {
        let mut out = [0; ISO_DESCRIPTOR_LEN];
        let mut w = &mut out[..];
        w.put_u32(self.offset);
        w.put_u32(self.length);
        w.put_u32(self.actual_length);
        w.put_i32(self.status);
        out
    }

    /// Parses exactly 16 bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = exact(buf, ISO_DESCRIPTOR_LEN, "iso packet descriptor")?;
        Ok(Self {
            offset: r.get_u32(),
            length: r.get_u32(),
            actual_length: r.get_u32(),
            status: r.get_i32(),
        })
    }
}

/// The USB endpoint address (`0x81` for ep 1 IN) of a header's ep and
/// direction, or `None` if either is out of range.
pub fn endpoint_address(ep: u32, direction: u32) -> Option<u8> {
    let ep = u8::try_from(ep).ok().filter(|ep| *ep <= 15)?;
    match direction {
        USBIP_DIR_OUT => Some(ep),
        USBIP_DIR_IN => Some(ep | 0x80),
        _ => None,
    }
}

/// Bytes of OUT data that follow `cmd` (0 for IN). `transfer_buffer_length`
/// is checked against `max` in both directions, since an IN buffer of that
/// size gets allocated too.
pub fn data_len_out(cmd: &CmdSubmit, max: usize) -> Result<usize, ProtocolError> {
    let len = usize::try_from(cmd.transfer_buffer_length)
        .map_err(|_| ProtocolError::NegativeLength(cmd.transfer_buffer_length))?;
    if len > max {
        return Err(ProtocolError::LengthOverLimit {
            len: cmd.transfer_buffer_length,
            max,
        });
    }
    match cmd.direction {
        USBIP_DIR_OUT => Ok(len),
        USBIP_DIR_IN => Ok(0),
        other => Err(ProtocolError::Direction(other)),
    }
}

/// Bytes of iso descriptors after the data: 0 for 0 and for the non-iso
/// markers (-1, any negative). Bound `number_of_packets` first (the stub
/// allows at most `transfer_buffer_length / maxpacket`, usbip-win2 1024).
pub fn iso_descriptors_len(number_of_packets: i32) -> usize {
    usize::try_from(number_of_packets)
        .unwrap_or(0)
        .saturating_mul(ISO_DESCRIPTOR_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes from hex text with any whitespace.
    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .map(|b| (b as char).to_digit(16).expect("hex digit") as u8)
            .collect();
        assert_eq!(digits.len() % 2, 0, "odd hex length");
        digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
    }

    fn header(text: &str) -> [u8; URB_HEADER_LEN] {
        hex(text).try_into().expect("48 bytes")
    }

    fn device() -> UsbDevice {
        UsbDevice {
            path: "/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2".into(),
            busid: "3-2".into(),
            busnum: 3,
            devnum: 2,
            speed: USB_SPEED_HIGH,
            id_vendor: 0x1234,
            id_product: 0x5678,
            bcd_device: 0x0100,
            device_class: 0xef,
            device_subclass: 0x02,
            device_protocol: 0x01,
            configuration_value: 1,
            num_configurations: 1,
            num_interfaces: 1,
        }
    }

    // Captures from the "EXAMPLE" section of usbip_protocol.rst (HID device).
    const CMD_INTR_IN: &str = "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff 00000000 00000004 00000000 00000000";
    const CMD_INTR_OUT: &str = "00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff 00000000 00000004 00000000 00000000";
    const OUT_DATA: &str = "ffffffff860008a784ce5ae212376300000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
    const RET_INTR_OUT: &str = "00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000";
    const RET_INTR_IN: &str = "00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff 00000000 00000000 00000000 00000000";
    const IN_DATA: &str = "ffffffff860011a784ce5ae2123763612891b1020100000400000000000000000000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn sizes() {
        assert_eq!(
            OpHeader::new(OP_REQ_DEVLIST, 0).encode().len(),
            OP_HEADER_LEN
        );
        assert_eq!(device().encode().unwrap().len(), USB_DEVICE_LEN);
        assert_eq!(PATH_LEN + BUSID_LEN + 3 * 4 + 3 * 2 + 6, USB_DEVICE_LEN);
        assert_eq!(UsbInterface::default().encode().len(), USB_INTERFACE_LEN);
        let unlink = UrbHeader::Unlink(CmdUnlink::default());
        assert_eq!(unlink.encode().len(), URB_HEADER_LEN);
        assert_eq!(
            IsoPacketDescriptor::default().encode().len(),
            ISO_DESCRIPTOR_LEN
        );
    }

    #[test]
    fn op_header_layout() {
        let bytes = OpHeader::new(OP_REQ_DEVLIST, 0).encode();
        assert_eq!(bytes, [0x01, 0x11, 0x80, 0x05, 0, 0, 0, 0]);
        let reply = OpHeader::decode(&[0x01, 0x11, 0x00, 0x03, 0, 0, 0, 1]).unwrap();
        assert_eq!(reply, OpHeader::new(OP_REP_IMPORT, ST_NA));
        let err = OpHeader::decode(&[0x01, 0x06, 0x80, 0x05, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(err.to_string(), "usbip version 0x0106 not supported");
        let err = reply.expect(OP_REP_DEVLIST).unwrap_err();
        assert_eq!(err.to_string(), "expected op code 0x0005, got 0x0003");
        let err = OpHeader::decode(&[1, 0x11, 0]).unwrap_err();
        assert_eq!(err.to_string(), "truncated op header: 3 of 8 bytes");
    }

    #[test]
    fn import_reply_layout_matches_doc_offsets() {
        let dev = device();
        let mut out = BytesMut::new();
        ImportReply::Device(dev.clone()).encode(&mut out).unwrap();
        assert_eq!(out.len(), 8 + 312);
        assert_eq!(&out[..8], &[0x01, 0x11, 0x00, 0x03, 0, 0, 0, 0]);
        let path = dev.path.as_bytes();
        assert_eq!(&out[8..8 + path.len()], path);
        assert!(out[8 + path.len()..0x108].iter().all(|&b| b == 0));
        assert_eq!(&out[0x108..0x10b], b"3-2");
        assert!(out[0x10b..0x128].iter().all(|&b| b == 0));
        assert_eq!(&out[0x128..0x12c], &[0, 0, 0, 3]);
        assert_eq!(&out[0x12c..0x130], &[0, 0, 0, 2]);
        assert_eq!(&out[0x130..0x134], &[0, 0, 0, 3]);
        assert_eq!(&out[0x134..0x13a], &[0x12, 0x34, 0x56, 0x78, 0x01, 0x00]);
        assert_eq!(&out[0x13a..0x140], &[0xef, 0x02, 0x01, 1, 1, 1]);
        assert_eq!(
            ImportReply::decode(&out).unwrap(),
            ImportReply::Device(dev.clone())
        );
        assert_eq!(dev.devid(), 0x0003_0002);

        out.clear();
        ImportReply::Refused(ST_NA).encode(&mut out).unwrap();
        assert_eq!(&out[..], &[0x01, 0x11, 0x00, 0x03, 0, 0, 0, 1]);
        assert_eq!(
            ImportReply::decode(&out).unwrap(),
            ImportReply::Refused(ST_NA)
        );
        out.clear();
        assert_eq!(
            ImportReply::Refused(ST_OK).encode(&mut out),
            Err(ProtocolError::ZeroRefusal)
        );
        assert!(out.is_empty());
        // A refusal followed by a device, or a success without one, is malformed.
        let mut bad = OpHeader::new(OP_REP_IMPORT, ST_NA).encode().to_vec();
        bad.extend_from_slice(&[0; 312]);
        assert!(ImportReply::decode(&bad).is_err());
        assert!(ImportReply::decode(&OpHeader::new(OP_REP_IMPORT, ST_OK).encode()).is_err());
    }

    #[test]
    fn devlist_layout_matches_doc_offsets() {
        let first = DevlistEntry {
            device: device(),
            interfaces: vec![UsbInterface {
                class: 3,
                subclass: 1,
                protocol: 2,
            }],
        };
        let second = DevlistEntry {
            device: UsbDevice {
                busid: "1-1.4".into(),
                num_interfaces: 0,
                ..device()
            },
            interfaces: vec![],
        };
        let mut out = BytesMut::new();
        out.put_slice(&OpHeader::new(OP_REP_DEVLIST, ST_OK).encode());
        encode_devlist(&mut out, &[first.clone(), second.clone()]).unwrap();
        // Offsets below are the doc's, which count from the OpHeader.
        assert_eq!(
            &out[..12],
            &[0x01, 0x11, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0, 2]
        );
        assert_eq!(&out[0x0c..0x0c + 4], b"/sys");
        assert_eq!(&out[0x10c..0x110], b"3-2\0");
        assert_eq!(&out[0x12c..0x130], &[0, 0, 0, 3]);
        assert_eq!(out[0x143], 1);
        assert_eq!(&out[0x144..0x148], &[3, 1, 2, 0]);
        let second_at = 0x0c + 0x138 + 4;
        assert_eq!(&out[second_at + 256..second_at + 262], b"1-1.4\0");
        assert_eq!(out.len(), second_at + 312);
        assert_eq!(
            decode_devlist(&out[8..]).unwrap(),
            vec![first.clone(), second]
        );

        let mut empty = BytesMut::new();
        encode_devlist(&mut empty, &[]).unwrap();
        assert_eq!(&empty[..], &[0, 0, 0, 0]);
        assert_eq!(decode_devlist(&empty).unwrap(), vec![]);

        let mismatched = DevlistEntry {
            interfaces: vec![],
            ..first
        };
        let mut out = BytesMut::from(&b"keep"[..]);
        let err = encode_devlist(&mut out, &[mismatched]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "device 3-2 lists 0 interfaces but num_interfaces is 1"
        );
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn devlist_rejects_short_and_long_bodies() {
        let err = decode_devlist(&[0, 0, 0, 1]).unwrap_err();
        assert_eq!(err.to_string(), "truncated usb device: 0 of 312 bytes");
        let err = decode_devlist(&[0, 0, 0, 0, 9]).unwrap_err();
        assert_eq!(err.to_string(), "1 unexpected bytes after device list");
        let mut body = vec![0, 0, 0, 1];
        body.extend_from_slice(
            &UsbDevice {
                num_interfaces: 2,
                ..device()
            }
            .encode()
            .unwrap(),
        );
        body.extend_from_slice(&[3, 0, 0, 0]);
        let err = decode_devlist(&body).unwrap_err();
        assert_eq!(err.to_string(), "truncated interface list: 4 of 8 bytes");
        // A huge count must not allocate or loop beyond the bytes present.
        assert!(decode_devlist(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn strings_are_checked_and_tolerated() {
        let err = UsbDevice {
            busid: "x".repeat(32),
            ..device()
        }
        .encode()
        .unwrap_err();
        assert_eq!(err.to_string(), "busid too long");
        assert!(
            UsbDevice {
                busid: "x".repeat(31),
                ..device()
            }
            .encode()
            .is_ok()
        );
        assert!(
            UsbDevice {
                path: "p".repeat(256),
                ..device()
            }
            .encode()
            .is_err()
        );
        assert!(
            UsbDevice {
                path: "p".repeat(255),
                ..device()
            }
            .encode()
            .is_ok()
        );
        let err = encode_import_request("1-1\0x").unwrap_err();
        assert_eq!(err.to_string(), "busid contains a NUL byte");

        let req = encode_import_request("1-1.2").unwrap();
        assert_eq!(&req[..6], b"1-1.2\0");
        assert!(req[5..].iter().all(|&b| b == 0));
        assert_eq!(decode_import_request(&req).unwrap(), "1-1.2");
        // No terminating NUL: the whole field is the busid.
        assert_eq!(decode_import_request(&[b'a'; 32]).unwrap(), "a".repeat(32));
        // Bytes after the first NUL are ignored; bad UTF-8 is replaced.
        let mut odd = [0u8; 32];
        odd[..4].copy_from_slice(&[b'1', 0xff, b'-', b'1']);
        odd[10] = b'z';
        assert_eq!(decode_import_request(&odd).unwrap(), "1\u{fffd}-1");
        assert!(decode_import_request(&[0; 31]).is_err());
    }

    #[test]
    fn kernel_doc_example_cmd_submit() {
        let decoded = UrbHeader::decode(&header(CMD_INTR_IN)).unwrap();
        let UrbHeader::Submit(cmd_in) = decoded else {
            panic!("not a submit: {decoded:?}")
        };
        assert_eq!(
            cmd_in,
            CmdSubmit {
                seqnum: 0xd05,
                devid: 0x0001_000f,
                direction: USBIP_DIR_IN,
                ep: 1,
                transfer_flags: URB_DIR_IN,
                transfer_buffer_length: 64,
                start_frame: -1,
                number_of_packets: 0,
                interval: 4,
                setup: [0; 8],
            }
        );
        assert_eq!(decoded.encode(), header(CMD_INTR_IN));
        assert_eq!(data_len_out(&cmd_in, 64), Ok(0));
        assert_eq!(endpoint_address(cmd_in.ep, cmd_in.direction), Some(0x81));
        assert_eq!(iso_descriptors_len(cmd_in.number_of_packets), 0);

        let UrbHeader::Submit(cmd_out) = UrbHeader::decode(&header(CMD_INTR_OUT)).unwrap() else {
            panic!("not a submit")
        };
        assert_eq!(cmd_out.direction, USBIP_DIR_OUT);
        assert_eq!(data_len_out(&cmd_out, 1 << 20), Ok(hex(OUT_DATA).len()));
        assert_eq!(endpoint_address(cmd_out.ep, cmd_out.direction), Some(0x01));
    }

    #[test]
    fn kernel_doc_example_ret_submit_is_what_reply_to_builds() {
        let UrbHeader::Submit(cmd_in) = UrbHeader::decode(&header(CMD_INTR_IN)).unwrap() else {
            panic!("not a submit")
        };
        let UrbHeader::Submit(cmd_out) = UrbHeader::decode(&header(CMD_INTR_OUT)).unwrap() else {
            panic!("not a submit")
        };
        let in_data = hex(IN_DATA);
        let ret_in = RetSubmit::reply_to(&cmd_in, 0, in_data.len()).unwrap();
        assert_eq!(UrbHeader::RetSubmit(ret_in).encode(), header(RET_INTR_IN));
        let ret_out = RetSubmit::reply_to(&cmd_out, 0, 64).unwrap();
        assert_eq!(UrbHeader::RetSubmit(ret_out).encode(), header(RET_INTR_OUT));
        assert_eq!(
            UrbHeader::decode(&header(RET_INTR_OUT)).unwrap(),
            UrbHeader::RetSubmit(ret_out)
        );

        let err = RetSubmit::reply_to(&cmd_in, 0, 65).unwrap_err();
        assert_eq!(
            err.to_string(),
            "actual_length 65 exceeds transfer_buffer_length 64"
        );
        let negative = CmdSubmit {
            transfer_buffer_length: -1,
            ..cmd_in
        };
        assert!(RetSubmit::reply_to(&negative, 0, 1).is_err());
        assert!(RetSubmit::reply_to(&negative, -32, 0).is_ok());
    }

    #[test]
    fn unlink_headers_are_48_bytes_with_padding() {
        let cmd = header(
            "00000002 00000005 00010002 00000000 00000000 00000004 \
             00000000 00000000 00000000 00000000 00000000 00000000",
        );
        let UrbHeader::Unlink(unlink) = UrbHeader::decode(&cmd).unwrap() else {
            panic!("not an unlink")
        };
        assert_eq!(
            unlink,
            CmdUnlink {
                seqnum: 5,
                devid: 0x0001_0002,
                direction: 0,
                ep: 0,
                unlink_seqnum: 4
            }
        );
        let ret = UrbHeader::RetUnlink(RetUnlink::reply_to(&unlink, -104)).encode();
        let expected = header(
            "00000004 00000005 00000000 00000000 00000000 ffffff98 \
             00000000 00000000 00000000 00000000 00000000 00000000",
        );
        assert_eq!(ret, expected);
        // Garbage in the padding is ignored, as the kernel ignores it.
        let mut noisy = cmd;
        noisy[47] = 0xaa;
        assert_eq!(
            UrbHeader::decode(&noisy).unwrap(),
            UrbHeader::Unlink(unlink)
        );
    }

    #[test]
    fn unknown_command_is_named() {
        let mut bytes = [0u8; URB_HEADER_LEN];
        bytes[3] = 7;
        let err = UrbHeader::decode(&bytes).unwrap_err();
        assert_eq!(err.to_string(), "unknown URB command 7");
        assert!(UrbHeader::decode(&[0; URB_HEADER_LEN]).is_err());
    }

    #[test]
    fn iso_descriptor_layout() {
        let desc = IsoPacketDescriptor {
            offset: 0x100,
            length: 0x200,
            actual_length: 0x1ff,
            status: -18,
        };
        let bytes = hex("00000100 00000200 000001ff ffffffee");
        assert_eq!(desc.encode().to_vec(), bytes);
        assert_eq!(IsoPacketDescriptor::decode(&bytes), Ok(desc));
        assert_eq!(iso_descriptors_len(3), 48);
        assert_eq!(iso_descriptors_len(0), 0);
        assert_eq!(iso_descriptors_len(-1), 0);
        assert_eq!(iso_descriptors_len(i32::MIN), 0);
    }

    #[test]
    fn helpers_check_ranges() {
        assert_eq!(endpoint_address(15, USBIP_DIR_IN), Some(0x8f));
        assert_eq!(endpoint_address(0, USBIP_DIR_OUT), Some(0));
        assert_eq!(endpoint_address(16, USBIP_DIR_OUT), None);
        assert_eq!(endpoint_address(1, 2), None);
        let cmd = CmdSubmit {
            transfer_buffer_length: 512,
            ..CmdSubmit::default()
        };
        assert_eq!(data_len_out(&cmd, 512), Ok(512));
        let err = data_len_out(&cmd, 511).unwrap_err();
        assert_eq!(
            err.to_string(),
            "transfer_buffer_length 512 over the 511-byte limit"
        );
        let in_too_big = CmdSubmit {
            direction: USBIP_DIR_IN,
            ..cmd
        };
        assert!(data_len_out(&in_too_big, 511).is_err());
        let negative = CmdSubmit {
            transfer_buffer_length: -5,
            ..cmd
        };
        assert_eq!(
            data_len_out(&negative, 512),
            Err(ProtocolError::NegativeLength(-5))
        );
        let odd_dir = CmdSubmit {
            direction: 9,
            ..cmd
        };
        assert_eq!(
            data_len_out(&odd_dir, 512),
            Err(ProtocolError::Direction(9))
        );
        // usbip_vhci_attach_device() truncates both to uint8_t.
        assert_eq!(
            UsbDevice {
                busnum: 0x101,
                devnum: 0x203,
                ..device()
            }
            .devid(),
            0x0001_0003
        );
    }

    fn arb_submit() -> impl Strategy<Value = CmdSubmit> {
        let basic = (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>());
        let rest = (
            any::<u32>(),
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
            any::<[u8; 8]>(),
        );
        (basic, rest).prop_map(
            |((seqnum, devid, direction, ep), (flags, len, frame, packets, interval, setup))| {
                CmdSubmit {
                    seqnum,
                    devid,
                    direction,
                    ep,
                    transfer_flags: flags,
                    transfer_buffer_length: len,
                    start_frame: frame,
                    number_of_packets: packets,
                    interval,
                    setup,
                }
            },
        )
    }

    fn arb_urb_header() -> impl Strategy<Value = UrbHeader> {
        let basic = (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>());
        let fields = (
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
            any::<i32>(),
        );
        prop_oneof![
            arb_submit().prop_map(UrbHeader::Submit),
            (basic, any::<u32>()).prop_map(|((seqnum, devid, direction, ep), unlink_seqnum)| {
                UrbHeader::Unlink(CmdUnlink {
                    seqnum,
                    devid,
                    direction,
                    ep,
                    unlink_seqnum,
                })
            }),
            (basic, fields).prop_map(
                |((seqnum, devid, direction, ep), (status, len, frame, packets, errors))| {
                    UrbHeader::RetSubmit(RetSubmit {
                        seqnum,
                        devid,
                        direction,
                        ep,
                        status,
                        actual_length: len,
                        start_frame: frame,
                        number_of_packets: packets,
                        error_count: errors,
                    })
                }
            ),
            (basic, any::<i32>()).prop_map(|((seqnum, devid, direction, ep), status)| {
                UrbHeader::RetUnlink(RetUnlink {
                    seqnum,
                    devid,
                    direction,
                    ep,
                    status,
                })
            }),
        ]
    }

    fn arb_device() -> impl Strategy<Value = UsbDevice> {
        // At most 4 bytes a char: 60 chars fit the path, 7 the busid.
        let strings = ("[^\u{0}]{0,60}", "[^\u{0}]{0,7}");
        let numbers = (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<[u16; 3]>(),
            any::<[u8; 6]>(),
        );
        (strings, numbers).prop_map(|((path, busid), (busnum, devnum, speed, ids, bytes))| {
            UsbDevice {
                path,
                busid,
                busnum,
                devnum,
                speed,
                id_vendor: ids[0],
                id_product: ids[1],
                bcd_device: ids[2],
                device_class: bytes[0],
                device_subclass: bytes[1],
                device_protocol: bytes[2],
                configuration_value: bytes[3],
                num_configurations: bytes[4],
                num_interfaces: bytes[5],
            }
        })
    }

    fn arb_entry() -> impl Strategy<Value = DevlistEntry> {
        let interface = any::<[u8; 3]>().prop_map(|[class, subclass, protocol]| UsbInterface {
            class,
            subclass,
            protocol,
        });
        (arb_device(), proptest::collection::vec(interface, 0..6)).prop_map(
            |(device, interfaces)| DevlistEntry {
                device: UsbDevice {
                    num_interfaces: interfaces.len() as u8,
                    ..device
                },
                interfaces,
            },
        )
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
            let _ = OpHeader::decode(&bytes);
            let _ = UsbDevice::decode(&bytes);
            let _ = UsbInterface::decode(&bytes);
            let _ = IsoPacketDescriptor::decode(&bytes);
            let _ = decode_devlist(&bytes);
            let _ = decode_import_request(&bytes);
            let _ = ImportReply::decode(&bytes);
        }

        #[test]
        fn devlist_parser_survives_plausible_garbage(count in 0u32..4, tail in proptest::collection::vec(any::<u8>(), 0..1400)) {
            let mut body = count.to_be_bytes().to_vec();
            body.extend_from_slice(&tail);
            let _ = decode_devlist(&body);
            let mut reply = OpHeader::new(OP_REP_IMPORT, 0).encode().to_vec();
            reply.extend_from_slice(&tail);
            let _ = ImportReply::decode(&reply);
        }

        #[test]
        fn urb_header_decode_is_total(bytes in any::<[u8; URB_HEADER_LEN]>()) {
            if let Ok(header) = UrbHeader::decode(&bytes) {
                prop_assert_eq!(UrbHeader::decode(&header.encode()), Ok(header));
            }
        }

        #[test]
        fn urb_header_round_trips(header in arb_urb_header()) {
            prop_assert_eq!(UrbHeader::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn reply_to_bounds_actual_length(cmd in arb_submit(), status in any::<i32>(), actual in 0usize..100_000) {
            match RetSubmit::reply_to(&cmd, status, actual) {
                Ok(ret) => {
                    prop_assert!(ret.actual_length <= cmd.transfer_buffer_length);
                    prop_assert_eq!(usize::try_from(ret.actual_length), Ok(actual));
                    prop_assert_eq!((ret.seqnum, ret.devid, ret.direction, ret.ep), (cmd.seqnum, 0, 0, 0));
                }
                Err(_) => prop_assert!(i64::try_from(actual).unwrap() > i64::from(cmd.transfer_buffer_length)),
            }
        }

        #[test]
        fn op_header_round_trips(code in any::<u16>(), status in any::<u32>()) {
            let header = OpHeader::new(code, status);
            prop_assert_eq!(OpHeader::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn device_round_trips(device in arb_device()) {
            let bytes = device.encode().unwrap();
            prop_assert_eq!(UsbDevice::decode(&bytes), Ok(device.clone()));
            let mut out = BytesMut::new();
            ImportReply::Device(device.clone()).encode(&mut out).unwrap();
            prop_assert_eq!(ImportReply::decode(&out), Ok(ImportReply::Device(device.clone())));
            prop_assert_eq!(decode_import_request(&encode_import_request(&device.busid).unwrap()), Ok(device.busid));
        }

        #[test]
        fn devlist_round_trips(entries in proptest::collection::vec(arb_entry(), 0..4)) {
            let mut out = BytesMut::new();
            encode_devlist(&mut out, &entries).unwrap();
            prop_assert_eq!(decode_devlist(&out), Ok(entries));
        }

        #[test]
        fn iso_descriptor_round_trips(fields in any::<(u32, u32, u32, i32)>()) {
            let (offset, length, actual_length, status) = fields;
            let desc = IsoPacketDescriptor { offset, length, actual_length, status };
            prop_assert_eq!(IsoPacketDescriptor::decode(&desc.encode()), Ok(desc));
        }
    }
}
