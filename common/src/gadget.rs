//! What a host needs to know to drive the two device kinds the project
//! simulates: Linux's Gadget Zero (the `usbtest` target) and a HID boot
//! keyboard. The helper's simulator implements them; the demo, tests and
//! benchmarks drive them from the other end of the stack.

/// Gadget Zero (Linux `g_zero`), VID:PID 0525:a4a0.
pub mod zero {
    pub const VID: u16 = 0x0525;
    pub const PID: u16 = 0xa4a0;
    /// `bConfigurationValue` of the source/sink configuration.
    pub const CONFIG_SOURCE_SINK: u8 = 3;
    /// `bConfigurationValue` of the loopback configuration.
    pub const CONFIG_LOOPBACK: u8 = 2;
    /// Bulk IN endpoint (source, or loopback IN).
    pub const EP_IN: u8 = 0x81;
    /// Bulk OUT endpoint (sink, or loopback OUT).
    pub const EP_OUT: u8 = 0x01;

    /// The byte g_zero's "pattern 1" puts at offset `i` of every IN transfer.
    pub fn pattern_byte(i: usize) -> u8 {
        (i % 63) as u8
    }

    /// Vendor requests on endpoint 0: 0x5b/0x5c are g_zero's own control
    /// write/read test; the 0xe0 range is the simulator's fault injection,
    /// usable end to end through every hop of the stack.
    pub mod control {
        /// Vendor OUT: store up to 4096 bytes (g_zero's control write test).
        pub const WRITE_BUFFER: u8 = 0x5b;
        /// Vendor IN: read back the stored bytes.
        pub const READ_BUFFER: u8 = 0x5c;
        /// Vendor OUT, wValue = endpoint address: halt that endpoint.
        pub const STALL_ENDPOINT: u8 = 0xe0;
        /// Vendor OUT, wValue = milliseconds: unplug, then replug after that long (0 = 500 ms).
        pub const UNPLUG: u8 = 0xe1;
        /// Vendor OUT, wValue = milliseconds: delay every later completion of the device.
        pub const DELAY_COMPLETIONS: u8 = 0xe2;
        /// Vendor OUT, wValue = seconds: hang the simulated USB thread (a stuck USB stack).
        pub const FREEZE: u8 = 0xe3;
        /// Vendor OUT, wValue = bytes, wIndex = endpoint address: if the
        /// next transfer on that endpoint asks for more, the device moves
        /// that many bytes and then stalls (a device ending a data phase
        /// early); what it did not move stays for later.
        pub const STALL_AFTER: u8 = 0xe4;
        /// `bmRequestType` of a vendor, device-recipient, host-to-device request.
        pub const VENDOR_OUT: u8 = 0x40;
        /// `bmRequestType` of a vendor, device-recipient, device-to-host request.
        pub const VENDOR_IN: u8 = 0xc0;
    }
}

/// A HID boot keyboard, VID:PID 0525:a4ac (the Linux HID gadget's id).
pub mod keyboard {
    pub const VID: u16 = 0x0525;
    pub const PID: u16 = 0xa4ac;
    /// The interrupt IN endpoint carrying the 8-byte boot reports.
    pub const EP_REPORTS: u8 = 0x81;

    /// The boot-protocol report for one character: (modifiers, usage id).
    pub fn key_for(c: char) -> Option<(u8, u8)> {
        const SHIFT: u8 = 0x02;
        Some(match c {
            'a'..='z' => (0, 0x04 + (c as u8 - b'a')),
            'A'..='Z' => (SHIFT, 0x04 + (c as u8 - b'A')),
            '1'..='9' => (0, 0x1e + (c as u8 - b'1')),
            '0' => (0, 0x27),
            '\n' => (0, 0x28),
            ' ' => (0, 0x2c),
            '-' => (0, 0x2d),
            '_' => (SHIFT, 0x2d),
            '.' => (0, 0x37),
            '/' => (0, 0x38),
            ':' => (SHIFT, 0x33),
            _ => return None,
        })
    }

    /// Turns boot reports back into text: the inverse of typing, for checks.
    pub fn text_of_reports<'a>(reports: impl IntoIterator<Item = &'a [u8]>) -> String {
        let mut text = String::new();
        for report in reports {
            let (Some(&modifiers), Some(&usage)) = (report.first(), report.get(2)) else {
                continue;
            };
            if usage == 0 {
                continue;
            }
            let c = ('\0'..='\u{7f}').find(|&c| key_for(c) == Some((modifiers, usage)));
            text.extend(c);
        }
        text
    }
}
