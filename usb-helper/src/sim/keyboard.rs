//! A HID boot keyboard (VID:PID 0525:a4ac, the Linux HID gadget's id) with one
//! interrupt IN endpoint. After it is opened it types a configured text, one
//! report per poll interval (key down, then key up); afterwards it NAKs, as an
//! idle keyboard does. Its class requests (SET_IDLE, SET_PROTOCOL, SET_REPORT
//! for the LEDs, ...) are answered like a real keyboard's.

use std::collections::VecDeque;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use p2p_usb_common::descriptors::{self, kind};
use p2p_usb_common::proto::{
    Completion, DeviceInfo, DeviceKey, SetupPacket, Speed, Transfer, TransferData, UsbError,
};
use tokio::time::Instant;

pub use p2p_usb_common::gadget::keyboard::{EP_REPORTS, key_for, text_of_reports};

/// Poll interval of the interrupt endpoint (bInterval at full speed).
pub const INTERVAL: Duration = Duration::from_millis(10);

const STRINGS: [&str; 3] = ["p2p-usb simulator", "Boot Keyboard", "p2p-usb-sim-kbd"];

/// The boot keyboard report descriptor of HID 1.11 appendix B.1.
pub const REPORT_DESCRIPTOR: [u8; 63] = [
    0x05, 0x01, 0x09, 0x06, 0xa1, 0x01, 0x05, 0x07, 0x19, 0xe0, 0x29, 0xe7, 0x15, 0x00, 0x25, 0x01,
    0x75, 0x01, 0x95, 0x08, 0x81, 0x02, 0x95, 0x01, 0x75, 0x08, 0x81, 0x03, 0x95, 0x05, 0x75, 0x01,
    0x05, 0x08, 0x19, 0x01, 0x29, 0x05, 0x91, 0x02, 0x95, 0x01, 0x75, 0x03, 0x91, 0x03, 0x95, 0x06,
    0x75, 0x08, 0x15, 0x00, 0x25, 0x65, 0x05, 0x07, 0x19, 0x00, 0x29, 0x65, 0x81, 0x00, 0xc0,
];

fn hid_descriptor() -> [u8; 9] {
    let [lo, hi] = (REPORT_DESCRIPTOR.len() as u16).to_le_bytes();
    [9, kind::HID, 0x11, 0x01, 0, 1, kind::HID_REPORT, lo, hi]
}

fn device_descriptor() -> [u8; 18] {
    [
        18, 1, 0x00, 0x02, 0, 0, 0, 64, // class per interface
        0x25, 0x05, 0xac, 0xa4, // 0525:a4ac
        0x00, 0x01, 1, 2, 3, 1,
    ]
}

fn configuration() -> Vec<u8> {
    let mut raw = vec![
        9, 2, 0, 0, 1, 1, 0, 0xa0, 50, // bus-powered, remote wakeup, 100 mA
        9, 4, 0, 0, 1, 3, 1, 1, 0, // HID, boot subclass, keyboard protocol
    ];
    raw.extend_from_slice(&hid_descriptor());
    raw.extend_from_slice(&[7, 5, EP_REPORTS, 3, 8, 0, INTERVAL.as_millis() as u8]);
    let total = raw.len() as u16;
    raw[2..4].copy_from_slice(&total.to_le_bytes());
    raw
}

/// The listing of the keyboard with the given bus address.
pub fn device_info(address: u8) -> DeviceInfo {
    DeviceInfo {
        key: DeviceKey {
            bus_path: "1-2".into(),
            vid: 0x0525,
            pid: 0xa4ac,
            serial: Some(STRINGS[2].into()),
        },
        bus_number: 1,
        address,
        speed: Speed::Full,
        descriptor: descriptors::parse_device(&device_descriptor()).expect("valid descriptor"),
        active_configuration: 1,
        configurations: vec![
            descriptors::parse_configuration(&configuration()).expect("valid configuration"),
        ],
        manufacturer: Some(STRINGS[0].into()),
        product: Some(STRINGS[1].into()),
        serial: Some(STRINGS[2].into()),
    }
}

/// The string descriptor with 1-based `index`.
pub fn string(index: u8) -> Option<&'static str> {
    STRINGS.get(usize::from(index).checked_sub(1)?).copied()
}

/// Keyboard state.
#[derive(Debug)]
pub struct Keyboard {
    text: String,
    pending_reports: VecDeque<[u8; 8]>,
    next_report: Instant,
    leds: u8,
    idle: u8,
    boot_protocol: bool,
}

impl Keyboard {
    /// A keyboard that will type `text` each time it is opened.
    pub fn new(text: &str) -> Self {
        Keyboard {
            text: text.into(),
            pending_reports: VecDeque::new(),
            next_report: Instant::now(),
            leds: 0,
            idle: 0,
            boot_protocol: false,
        }
    }

    /// Starts typing the text from the beginning.
    pub fn start_typing(&mut self) {
        self.pending_reports = self
            .text
            .chars()
            .filter_map(key_for)
            .flat_map(|(modifiers, usage)| [[modifiers, 0, usage, 0, 0, 0, 0, 0], [0; 8]])
            .collect();
        self.next_report = Instant::now();
    }

    /// When the next report will be ready, if any.
    pub fn next_wakeup(&self) -> Option<Instant> {
        (!self.pending_reports.is_empty()).then_some(self.next_report)
    }

    /// HID class requests on endpoint 0.
    pub fn class_request(
        &mut self,
        setup: &SetupPacket,
        data: &TransferData,
    ) -> Result<Completion, UsbError> {
        let empty = Completion {
            actual_length: 0,
            data: Bytes::new(),
        };
        let reply = |bytes: &[u8], length: u32| {
            let n = bytes.len().min(length as usize);
            Completion {
                actual_length: n as u32,
                data: Bytes::copy_from_slice(&bytes[..n]),
            }
        };
        match (setup.request_type, setup.request, data) {
            (0x21, 0x0a, _) => {
                self.idle = (setup.value >> 8) as u8;
                Ok(empty)
            }
            (0x21, 0x0b, _) => {
                self.boot_protocol = setup.value == 0;
                Ok(empty)
            }
            (0x21, 0x09, TransferData::Out(bytes)) => {
                self.leds = bytes.first().copied().unwrap_or(0);
                Ok(Completion {
                    actual_length: bytes.len() as u32,
                    data: Bytes::new(),
                })
            }
            (0xa1, 0x01, TransferData::In { length }) => Ok(reply(&[0; 8], *length)),
            (0xa1, 0x02, TransferData::In { length }) => Ok(reply(&[self.idle], *length)),
            (0xa1, 0x03, TransferData::In { length }) => {
                Ok(reply(&[u8::from(!self.boot_protocol)], *length))
            }
            _ => Err(UsbError::Stall),
        }
    }

    /// Class descriptors fetched with GET_DESCRIPTOR on the interface.
    pub fn interface_descriptor(&self, descriptor_type: u8) -> Option<Vec<u8>> {
        match descriptor_type {
            kind::HID => Some(hid_descriptor().to_vec()),
            kind::HID_REPORT => Some(REPORT_DESCRIPTOR.to_vec()),
            _ => None,
        }
    }

    /// Interrupt IN: the next report once it is due, else NAK.
    pub fn data(
        &mut self,
        transfer: &Transfer,
        now: Instant,
    ) -> Poll<Result<Completion, UsbError>> {
        let TransferData::In { length } = transfer.data else {
            return Poll::Ready(Err(UsbError::Stall));
        };
        if now < self.next_report {
            return Poll::Pending;
        }
        let Some(report) = self.pending_reports.pop_front() else {
            return Poll::Pending;
        };
        self.next_report = now + INTERVAL;
        let n = report.len().min(length as usize);
        if n < report.len() {
            return Poll::Ready(Err(UsbError::Overflow));
        }
        Poll::Ready(Ok(Completion {
            actual_length: n as u32,
            data: Bytes::copy_from_slice(&report),
        }))
    }

    /// The LED state last set by the host (num, caps, scroll lock bits).
    pub fn leds(&self) -> u8 {
        self.leds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_usb_common::proto::TransferFlags;

    #[test]
    fn descriptors_describe_a_boot_keyboard() {
        let info = device_info(3);
        let alt = &info.configurations[0].interfaces[0].alt_settings[0];
        assert_eq!((alt.class, alt.subclass, alt.protocol), (3, 1, 1));
        assert_eq!(alt.endpoints[0].address, EP_REPORTS);
        assert_eq!(alt.endpoints[0].interval, 10);
    }

    #[test]
    fn types_its_text_one_report_per_interval() {
        let mut kbd = Keyboard::new("Hi\n");
        kbd.start_typing();
        let poll = Transfer {
            handle: 1,
            endpoint: EP_REPORTS,
            setup: None,
            data: TransferData::In { length: 8 },
            flags: TransferFlags::default(),
            timeout_ms: None,
        };
        let mut now = Instant::now();
        let mut reports = Vec::new();
        while kbd.next_wakeup().is_some() {
            match kbd.data(&poll, now) {
                Poll::Ready(Ok(c)) => reports.push(<[u8; 8]>::try_from(&c.data[..]).unwrap()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => {}
            }
            assert!(kbd.data(&poll, now).is_pending(), "one report per interval");
            now += INTERVAL;
        }
        assert_eq!(reports.len(), 6);
        assert_eq!(text_of_reports(reports.iter().map(|r| &r[..])), "Hi\n");
        assert!(
            kbd.data(&poll, now + INTERVAL * 10).is_pending(),
            "idle keyboard NAKs"
        );
    }
}
