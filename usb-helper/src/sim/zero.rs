//! A Gadget Zero look-alike (Linux `g_zero`, VID:PID 0525:a4a0): the device
//! the kernel's `usbtest` driver exercises. Two configurations as in g_zero:
//! "source/sink" (value 3: bulk IN produces a pattern, bulk OUT swallows data;
//! alt setting 1 adds isochronous endpoints) and "loopback" (value 2: what goes
//! OUT comes back IN, in order, packet boundaries kept). Vendor requests on
//! endpoint 0 let tests drive faults in-band (see [`control`]).

use std::collections::VecDeque;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use p2p_usb_common::descriptors;
use p2p_usb_common::proto::{
    Completion, DeviceInfo, DeviceKey, SetupPacket, Speed, Transfer, TransferData, UsbError,
};

use super::Effect;

pub use p2p_usb_common::gadget::zero::{
    CONFIG_LOOPBACK, CONFIG_SOURCE_SINK, EP_IN, EP_OUT, control, pattern_byte,
};

/// Bytes the loopback buffers before OUT transfers have to wait (NAK).
pub const LOOPBACK_CAPACITY: usize = 4 * 1024 * 1024;

const STRINGS: [&str; 5] = [
    "p2p-usb simulator",
    "Gadget Zero",
    "p2p-usb-sim-zero",
    "source and sink data",
    "loop input to output",
];

fn device_descriptor() -> [u8; 18] {
    [
        18, 1, 0x00, 0x02, // bcdUSB 2.00
        0xff, 0, 0, 64, // vendor class, ep0 max packet 64
        0x25, 0x05, 0xa0, 0xa4, // 0525:a4a0
        0x00, 0x01, 1, 2, 3, 2, // bcdDevice 1.00, strings 1/2/3, two configurations
    ]
}

fn with_total_length(mut raw: Vec<u8>) -> Vec<u8> {
    let total = raw.len() as u16;
    raw[2..4].copy_from_slice(&total.to_le_bytes());
    raw
}

fn source_sink_config() -> Vec<u8> {
    with_total_length(vec![
        9,
        2,
        0,
        0,
        1,
        CONFIG_SOURCE_SINK,
        4,
        0xc0,
        1, // self-powered, 2 mA
        9,
        4,
        0,
        0,
        2,
        0xff,
        0,
        0,
        0, // interface 0 alt 0: bulk pair
        7,
        5,
        EP_IN,
        2,
        0x00,
        0x02,
        0, //
        7,
        5,
        EP_OUT,
        2,
        0x00,
        0x02,
        0, //
        9,
        4,
        0,
        1,
        4,
        0xff,
        0,
        0,
        0, // interface 0 alt 1: bulk pair + isochronous pair
        7,
        5,
        EP_IN,
        2,
        0x00,
        0x02,
        0, //
        7,
        5,
        EP_OUT,
        2,
        0x00,
        0x02,
        0, //
        7,
        5,
        0x82,
        1,
        0x00,
        0x04,
        4, //
        7,
        5,
        0x02,
        1,
        0x00,
        0x04,
        4,
    ])
}

fn loopback_config() -> Vec<u8> {
    with_total_length(vec![
        9,
        2,
        0,
        0,
        1,
        CONFIG_LOOPBACK,
        5,
        0xc0,
        1, //
        9,
        4,
        0,
        0,
        2,
        0xff,
        0,
        0,
        0, //
        7,
        5,
        EP_IN,
        2,
        0x00,
        0x02,
        0, //
        7,
        5,
        EP_OUT,
        2,
        0x00,
        0x02,
        0,
    ])
}

/// The listing of a Gadget Zero with the given bus address (source/sink active,
/// as the host's USB core would choose it first).
pub fn device_info(address: u8) -> DeviceInfo {
    let descriptor = descriptors::parse_device(&device_descriptor()).expect("valid descriptor");
    let configurations = [source_sink_config(), loopback_config()]
        .iter()
        .map(|raw| descriptors::parse_configuration(raw).expect("valid configuration"))
        .collect();
    DeviceInfo {
        key: DeviceKey {
            bus_path: "1-1".into(),
            vid: 0x0525,
            pid: 0xa4a0,
            serial: Some(STRINGS[2].into()),
        },
        bus_number: 1,
        address,
        speed: Speed::High,
        descriptor,
        active_configuration: CONFIG_SOURCE_SINK,
        configurations,
        manufacturer: Some(STRINGS[0].into()),
        product: Some(STRINGS[1].into()),
        serial: Some(STRINGS[2].into()),
    }
}

/// The string descriptor with 1-based `index`.
pub fn string(index: u8) -> Option<&'static str> {
    STRINGS.get(usize::from(index).checked_sub(1)?).copied()
}

/// Device state behind the descriptors.
#[derive(Debug, Default)]
pub struct Zero {
    /// Loopback: OUT transfers waiting to be read back, boundaries kept.
    /// Each OUT transfer counts as ended, as a short packet or the
    /// zero-length packet of URB_ZERO_PACKET ends it on a real bus.
    looped: VecDeque<Bytes>,
    looped_bytes: usize,
    /// The control test buffer of requests 0x5b/0x5c.
    control_buffer: Vec<u8>,
}

impl Zero {
    /// Forgets buffered data, as a configuration change or reset would.
    pub fn reset(&mut self) {
        self.looped.clear();
        self.looped_bytes = 0;
    }

    /// Vendor requests on endpoint 0.
    pub fn vendor_request(
        &mut self,
        setup: &SetupPacket,
        data: &TransferData,
    ) -> Result<(Completion, Option<Effect>), UsbError> {
        let done = |effect| {
            Ok((
                Completion {
                    actual_length: 0,
                    data: Bytes::new(),
                },
                effect,
            ))
        };
        match (setup.request_type, setup.request, data) {
            (control::VENDOR_OUT, control::WRITE_BUFFER, TransferData::Out(bytes))
                if bytes.len() <= 4096 =>
            {
                self.control_buffer = bytes.to_vec();
                Ok((
                    Completion {
                        actual_length: bytes.len() as u32,
                        data: Bytes::new(),
                    },
                    None,
                ))
            }
            (control::VENDOR_IN, control::READ_BUFFER, TransferData::In { length }) => {
                let n = self.control_buffer.len().min(*length as usize);
                Ok((
                    Completion {
                        actual_length: n as u32,
                        data: Bytes::copy_from_slice(&self.control_buffer[..n]),
                    },
                    None,
                ))
            }
            (control::VENDOR_OUT, control::STALL_ENDPOINT, _) => {
                done(Some(Effect::Stall(setup.value as u8)))
            }
            (control::VENDOR_OUT, control::UNPLUG, _) => {
                let ms = if setup.value == 0 { 500 } else { setup.value };
                done(Some(Effect::Unplug(u64::from(ms))))
            }
            (control::VENDOR_OUT, control::DELAY_COMPLETIONS, _) => {
                done(Some(Effect::Delay(u64::from(setup.value))))
            }
            (control::VENDOR_OUT, control::FREEZE, _) => {
                done(Some(Effect::Freeze(u64::from(setup.value))))
            }
            (control::VENDOR_OUT, control::STALL_AFTER, _) => done(Some(Effect::StallAfter {
                endpoint: setup.index as u8,
                bytes: usize::from(setup.value),
            })),
            _ => Err(UsbError::Stall),
        }
    }

    /// Tries to complete the transfer at the head of a bulk endpoint queue.
    /// `Poll::Pending` means the device is NAKing: wait for more data or room.
    pub fn data(&mut self, config: u8, transfer: &Transfer) -> Poll<Result<Completion, UsbError>> {
        match (config, &transfer.data) {
            (CONFIG_SOURCE_SINK, TransferData::In { length }) => {
                let data: Bytes = (0..*length as usize).map(pattern_byte).collect();
                Poll::Ready(Ok(Completion {
                    actual_length: *length,
                    data,
                }))
            }
            (CONFIG_SOURCE_SINK, TransferData::Out(bytes)) => Poll::Ready(Ok(Completion {
                actual_length: bytes.len() as u32,
                data: Bytes::new(),
            })),
            (CONFIG_LOOPBACK, TransferData::Out(bytes)) => {
                if self.looped_bytes >= LOOPBACK_CAPACITY {
                    return Poll::Pending;
                }
                self.looped_bytes += bytes.len();
                self.looped.push_back(bytes.clone());
                Poll::Ready(Ok(Completion {
                    actual_length: bytes.len() as u32,
                    data: Bytes::new(),
                }))
            }
            (CONFIG_LOOPBACK, TransferData::In { length }) => {
                let Some(front) = self.looped.front_mut() else {
                    return Poll::Pending;
                };
                let length = *length as usize;
                let data = if front.len() <= length {
                    self.looped.pop_front().unwrap_or_default()
                } else {
                    // The host asked for less than the device has queued: it
                    // gets full packets now and the rest on the next IN.
                    front.split_to(length)
                };
                self.looped_bytes -= data.len();
                Poll::Ready(Ok(Completion {
                    actual_length: data.len() as u32,
                    data,
                }))
            }
            _ => Poll::Ready(Err(UsbError::Stall)),
        }
    }
}

/// Builds an IN payload of `length` pattern bytes; used by tests to check data.
pub fn expected_source_data(length: usize) -> BytesMut {
    (0..length).map(pattern_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_usb_common::proto::TransferFlags;

    fn t(data: TransferData) -> Transfer {
        Transfer {
            handle: 1,
            endpoint: if data.is_in() { EP_IN } else { EP_OUT },
            setup: None,
            data,
            flags: TransferFlags::default(),
            timeout_ms: None,
        }
    }

    #[test]
    fn descriptors_describe_two_configurations() {
        let info = device_info(2);
        assert_eq!(info.configurations.len(), 2);
        assert_eq!(info.active_config().unwrap().value, CONFIG_SOURCE_SINK);
        assert_eq!(info.descriptor.num_configurations, 2);
        let ss = &info.configurations[0];
        assert_eq!(ss.interfaces[0].alt_settings.len(), 2);
    }

    #[test]
    fn loopback_keeps_order_and_boundaries() {
        let mut zero = Zero::default();
        let out = |b: &'static [u8]| t(TransferData::Out(Bytes::from_static(b)));
        assert!(
            zero.data(CONFIG_LOOPBACK, &t(TransferData::In { length: 8 }))
                .is_pending()
        );
        assert!(zero.data(CONFIG_LOOPBACK, &out(b"abc")).is_ready());
        assert!(zero.data(CONFIG_LOOPBACK, &out(b"")).is_ready());
        assert!(zero.data(CONFIG_LOOPBACK, &out(b"defgh")).is_ready());
        let read = |zero: &mut Zero, n| match zero
            .data(CONFIG_LOOPBACK, &t(TransferData::In { length: n }))
        {
            Poll::Ready(Ok(c)) => c.data,
            other => panic!("{other:?}"),
        };
        assert_eq!(&read(&mut zero, 512)[..], b"abc");
        assert_eq!(&read(&mut zero, 512)[..], b"", "zero-length packet kept");
        assert_eq!(&read(&mut zero, 2)[..], b"de");
        assert_eq!(&read(&mut zero, 512)[..], b"fgh");
    }

    #[test]
    fn loopback_applies_backpressure() {
        let mut zero = Zero::default();
        let chunk = Bytes::from(vec![0u8; LOOPBACK_CAPACITY]);
        assert!(
            zero.data(CONFIG_LOOPBACK, &t(TransferData::Out(chunk.clone())))
                .is_ready()
        );
        assert!(
            zero.data(CONFIG_LOOPBACK, &t(TransferData::Out(chunk)))
                .is_pending()
        );
    }

    #[test]
    fn source_produces_the_g_zero_pattern() {
        let mut zero = Zero::default();
        match zero.data(CONFIG_SOURCE_SINK, &t(TransferData::In { length: 200 })) {
            Poll::Ready(Ok(c)) => assert_eq!(c.data[..], expected_source_data(200)[..]),
            other => panic!("{other:?}"),
        }
    }
}
