//! Parsing of raw USB descriptors into the structured form of [`crate::proto`].
//!
//! Both device backends (real devices and simulated ones) produce raw bytes
//! exactly as a device sends them, and this one parser turns them into the
//! listing, so the simulated devices are described the same way real ones are.

use bytes::Bytes;

use crate::proto::{
    AltSetting, ConfigurationDescriptor, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
};

/// Descriptor type codes (USB 2.0 table 9-5).
pub mod kind {
    pub const DEVICE: u8 = 1;
    pub const CONFIGURATION: u8 = 2;
    pub const STRING: u8 = 3;
    pub const INTERFACE: u8 = 4;
    pub const ENDPOINT: u8 = 5;
    pub const HID: u8 = 0x21;
    pub const HID_REPORT: u8 = 0x22;
}

/// Why descriptor bytes could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("device descriptor is {0} bytes, expected 18")]
    DeviceLength(usize),
    #[error("configuration descriptor is truncated ({0} bytes)")]
    ConfigTruncated(usize),
    #[error("descriptor of type {kind:#04x} at offset {offset} has invalid length {length}")]
    BadLength { kind: u8, offset: usize, length: u8 },
    #[error("expected descriptor type {expected:#04x}, found {found:#04x}")]
    WrongType { expected: u8, found: u8 },
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Parses the 18-byte device descriptor.
pub fn parse_device(raw: &[u8]) -> Result<DeviceDescriptor, DescriptorError> {
    if raw.len() < 18 || raw[0] < 18 {
        return Err(DescriptorError::DeviceLength(raw.len()));
    }
    if raw[1] != kind::DEVICE {
        return Err(DescriptorError::WrongType {
            expected: kind::DEVICE,
            found: raw[1],
        });
    }
    Ok(DeviceDescriptor {
        usb_version: le16(raw, 2),
        class: raw[4],
        subclass: raw[5],
        protocol: raw[6],
        max_packet_size0: raw[7],
        vendor_id: le16(raw, 8),
        product_id: le16(raw, 10),
        device_version: le16(raw, 12),
        manufacturer_index: raw[14],
        product_index: raw[15],
        serial_index: raw[16],
        num_configurations: raw[17],
        raw: Bytes::copy_from_slice(&raw[..18]),
    })
}

/// Parses a full configuration (configuration descriptor and all the interface,
/// endpoint and class descriptors after it, `wTotalLength` bytes).
pub fn parse_configuration(raw: &[u8]) -> Result<ConfigurationDescriptor, DescriptorError> {
    if raw.len() < 9 || raw[0] < 9 {
        return Err(DescriptorError::ConfigTruncated(raw.len()));
    }
    if raw[1] != kind::CONFIGURATION {
        return Err(DescriptorError::WrongType {
            expected: kind::CONFIGURATION,
            found: raw[1],
        });
    }
    let total = usize::from(le16(raw, 2)).min(raw.len());
    let mut config = ConfigurationDescriptor {
        value: raw[5],
        attributes: raw[7],
        max_power: raw[8],
        string_index: raw[6],
        interfaces: Vec::new(),
        raw: Bytes::copy_from_slice(&raw[..total]),
    };

    let mut offset = usize::from(raw[0]);
    while offset + 2 <= total {
        let length = raw[offset];
        let kind = raw[offset + 1];
        if length < 2 || offset + usize::from(length) > total {
            return Err(DescriptorError::BadLength {
                kind,
                offset,
                length,
            });
        }
        let d = &raw[offset..offset + usize::from(length)];
        match kind {
            kind::INTERFACE if d.len() >= 9 => {
                let alt = AltSetting {
                    alternate: d[3],
                    class: d[5],
                    subclass: d[6],
                    protocol: d[7],
                    string_index: d[8],
                    endpoints: Vec::new(),
                };
                let number = d[2];
                match config.interfaces.iter_mut().find(|i| i.number == number) {
                    Some(interface) => interface.alt_settings.push(alt),
                    None => config.interfaces.push(InterfaceDescriptor {
                        number,
                        alt_settings: vec![alt],
                    }),
                }
            }
            kind::ENDPOINT if d.len() >= 7 => {
                let endpoint = EndpointDescriptor {
                    address: d[2],
                    attributes: d[3],
                    max_packet_size: le16(d, 4),
                    interval: d[6],
                };
                // An endpoint belongs to the most recent interface descriptor.
                if let Some(alt) = config
                    .interfaces
                    .last_mut()
                    .and_then(|i| i.alt_settings.last_mut())
                {
                    alt.endpoints.push(endpoint);
                }
            }
            _ => {}
        }
        offset += usize::from(length);
    }
    Ok(config)
}

/// Decodes a string descriptor (UTF-16LE after the 2-byte header).
pub fn parse_string(raw: &[u8]) -> Option<String> {
    if raw.len() < 2 || raw[1] != kind::STRING {
        return None;
    }
    let len = usize::from(raw[0]).min(raw.len());
    let units: Vec<u16> = raw[2..len]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    Some(String::from_utf16_lossy(&units))
}

/// Encodes a string descriptor, as a device would send it.
pub fn encode_string(text: &str) -> Vec<u8> {
    let units: Vec<u16> = text.encode_utf16().take(126).collect();
    let mut out = Vec::with_capacity(2 + units.len() * 2);
    out.push((2 + units.len() * 2) as u8);
    out.push(kind::STRING);
    for unit in units {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::EndpointType;
    use proptest::prelude::*;

    /// A g_zero-like configuration: one interface, two alt settings, bulk pair
    /// in alt 0 and an isochronous pair in alt 1.
    const CONFIG: &[u8] = &[
        9, 2, 46, 0, 1, 3, 4, 0xc0, 1, //
        9, 4, 0, 0, 2, 0xff, 0, 0, 0, //
        7, 5, 0x81, 2, 0, 2, 0, //
        7, 5, 0x01, 2, 0, 2, 0, //
        9, 4, 0, 1, 2, 0xff, 0, 0, 0, //
        7, 5, 0x82, 1, 0, 4, 1,
    ];

    #[test]
    fn parses_interfaces_alt_settings_and_endpoints() {
        let mut raw = CONFIG.to_vec();
        raw[2] = raw.len() as u8;
        let config = parse_configuration(&raw).unwrap();
        assert_eq!(config.value, 3);
        assert_eq!(config.interfaces.len(), 1);
        let alts = &config.interfaces[0].alt_settings;
        assert_eq!(alts.len(), 2);
        assert_eq!(alts[0].endpoints.len(), 2);
        assert_eq!(alts[0].endpoints[0].transfer_type(), EndpointType::Bulk);
        assert_eq!(alts[0].endpoints[0].max_packet_size, 512);
        assert_eq!(
            alts[1].endpoints[0].transfer_type(),
            EndpointType::Isochronous
        );
        assert_eq!(config.alt_setting(0, 1).unwrap().endpoints[0].address, 0x82);
    }

    #[test]
    fn device_descriptor_fields() {
        let raw = [
            18, 1, 0x00, 0x02, 0xff, 0, 0, 64, 0x25, 0x05, 0xa0, 0xa4, 0x00, 0x01, 1, 2, 3, 2,
        ];
        let d = parse_device(&raw).unwrap();
        assert_eq!((d.vendor_id, d.product_id), (0x0525, 0xa4a0));
        assert_eq!(d.usb_version, 0x0200);
        assert_eq!(d.num_configurations, 2);
        assert!(parse_device(&raw[..10]).is_err());
    }

    #[test]
    fn strings_round_trip() {
        assert_eq!(
            parse_string(&encode_string("Gadget Zero")).unwrap(),
            "Gadget Zero"
        );
        assert_eq!(parse_string(&encode_string("")).unwrap(), "");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_configuration(&raw);
            let _ = parse_device(&raw);
            let _ = parse_string(&raw);
        }
    }
}
