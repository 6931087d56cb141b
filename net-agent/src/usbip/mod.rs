//! Standard USB/IP on the client side: the wire protocol, the URB engine
//! shared by the vhci attach path and the loopback gateway, the gateway
//! itself, and a small USB/IP client used by the demo, tests and benchmarks.

pub mod client;
pub mod gateway;
pub mod proto;
pub mod urbs;

use bytes::{Bytes, BytesMut};
use p2p_usb_common::proto::{DeviceInfo, Speed};
use tokio::io::{AsyncRead, AsyncReadExt};

use proto::{DevlistEntry, USB_SPEED_SUPER, UsbDevice, UsbInterface};

/// The vhci/USB/IP speed code for a device. SuperSpeed+ is reported as
/// SuperSpeed: kernels before 2024 refuse code 6 on attach.
pub fn speed_code(speed: Speed) -> u32 {
    match speed {
        Speed::SuperPlus => USB_SPEED_SUPER,
        other => other.usbip_code(),
    }
}

/// How a remote device is described to USB/IP clients: its bus path on the
/// server is the busid, and the path names the server.
pub fn usbip_device(device: &DeviceInfo, server: &str) -> UsbDevice {
    // Counted as the devlist lists them (interfaces with a setting; the
    // field is one byte), so the two always agree.
    let interfaces = device.active_config().map_or(0, |c| {
        c.interfaces
            .iter()
            .filter(|i| !i.alt_settings.is_empty())
            .count()
            .min(usize::from(u8::MAX))
    });
    UsbDevice {
        path: format!("/p2p-usb/{server}/{}", device.key.bus_path),
        busid: device.key.bus_path.clone(),
        busnum: u32::from(device.bus_number),
        devnum: u32::from(device.address),
        speed: speed_code(device.speed),
        id_vendor: device.key.vid,
        id_product: device.key.pid,
        bcd_device: device.descriptor.device_version,
        device_class: device.descriptor.class,
        device_subclass: device.descriptor.subclass,
        device_protocol: device.descriptor.protocol,
        configuration_value: device.active_configuration,
        num_configurations: device.descriptor.num_configurations,
        num_interfaces: interfaces as u8,
    }
}

/// A devlist entry: the device and the first alternate setting of each
/// interface of its active configuration.
pub fn devlist_entry(device: &DeviceInfo, server: &str) -> DevlistEntry {
    let interfaces = device
        .active_config()
        .map(|c| {
            c.interfaces
                .iter()
                .filter_map(|i| i.alt_settings.first())
                .take(usize::from(u8::MAX))
                .map(|a| UsbInterface {
                    class: a.class,
                    subclass: a.subclass,
                    protocol: a.protocol,
                })
                .collect()
        })
        .unwrap_or_default();
    DevlistEntry {
        device: usbip_device(device, server),
        interfaces,
    }
}

/// Reads a URB's `length` payload bytes, without zeroing a buffer first:
/// shared by the URB engine (OUT data) and the client (IN data).
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: usize,
) -> std::io::Result<Bytes> {
    let mut data = BytesMut::with_capacity(length);
    while data.len() < length {
        let wanted = (length - data.len()) as u64;
        if (&mut *reader).take(wanted).read_buf(&mut data).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::p2p_usb_common_test_device;
    use p2p_usb_common::proto::{AltSetting, ConfigurationDescriptor, InterfaceDescriptor};

    #[test]
    fn any_device_a_server_describes_can_be_listed() {
        let setting = AltSetting {
            alternate: 0,
            class: 8,
            subclass: 6,
            protocol: 0x50,
            string_index: 0,
            endpoints: vec![],
        };
        let mut interfaces: Vec<InterfaceDescriptor> = (0..300)
            .map(|n| InterfaceDescriptor {
                number: n as u8,
                alt_settings: vec![setting.clone()],
            })
            .collect();
        // An interface without settings is not listed, and not counted.
        interfaces[1].alt_settings.clear();
        let mut device = p2p_usb_common_test_device("1-1", 0x1234, 0x5678);
        device.configurations = vec![ConfigurationDescriptor {
            value: 1,
            attributes: 0x80,
            max_power: 50,
            string_index: 0,
            interfaces,
            raw: Default::default(),
        }];
        let entry = devlist_entry(&device, "server");
        assert_eq!(
            usize::from(entry.device.num_interfaces),
            entry.interfaces.len()
        );
        assert_eq!(entry.interfaces.len(), 255);
        let mut out = bytes::BytesMut::new();
        proto::encode_devlist(&mut out, &[entry]).expect("encodes");
    }
}
