//! The two device backends behind one interface: real devices through usbfs
//! (`nusb`) and the built-in simulated devices. The server never knows which
//! one it talks to.

use std::time::Duration;

use p2p_usb_common::config::{BackendKind, ServerConfig};
use p2p_usb_common::proto::{DeviceInfo, DeviceKey, RequestId, Transfer, UsbError};
use tokio::sync::broadcast;

use crate::sim::{SimBackend, SimDevice};
use crate::transfer::ReplySink;
use crate::usbfs::{UsbfsBackend, UsbfsDevice};

/// A device appeared or disappeared. Both carry the device as it was
/// seen, so a listener can tell which plug-in of a key an event is about.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    Arrived(DeviceInfo),
    Left(DeviceInfo),
}

/// One plug-in of a device. The stable key outlives an unplug and replug on
/// purpose (clients find the device again by it); the bus address does not,
/// as the kernel numbers every enumeration anew. A handle opened on one
/// plug-in is dead on the next, so a replug must reach its holder as the
/// device leaving and arriving, even when nobody saw it happen. (Addresses
/// run from 1 to 127 and wrap: a replug unseen that lands on the very
/// address it had is missed.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlugIn {
    bus: u8,
    address: u8,
}

impl PlugIn {
    /// The plug-in `device` describes.
    pub fn of(device: &DeviceInfo) -> PlugIn {
        PlugIn {
            bus: device.bus_number,
            address: device.address,
        }
    }
}

/// True if `device` is the plug-in `plug_in` of `key`.
pub fn is_plug_in(device: &DeviceInfo, key: &DeviceKey, plug_in: PlugIn) -> bool {
    device.key == *key && PlugIn::of(device) == plug_in
}

/// The events that take a listener from the devices `known` to the devices
/// `now` (each seen through `info`, so a caller's own entries need no copy):
/// departures first, so a device plugged in again between two looks leaves
/// before it arrives.
pub fn hotplug_changes<T>(
    known: &[T],
    now: &[T],
    info: impl Fn(&T) -> &DeviceInfo,
) -> Vec<BackendEvent> {
    let missing_from = |list: &[T], device: &DeviceInfo| {
        !list
            .iter()
            .any(|other| is_plug_in(info(other), &device.key, PlugIn::of(device)))
    };
    let left = known
        .iter()
        .map(&info)
        .filter(|k| missing_from(now, k))
        .map(|k| BackendEvent::Left(k.clone()));
    let arrived = now
        .iter()
        .map(&info)
        .filter(|n| missing_from(known, n))
        .map(|n| BackendEvent::Arrived(n.clone()));
    left.chain(arrived).collect()
}

/// Hotplug events kept for a connection that is slow to take them. One that
/// falls further behind catches up from the device listing instead.
pub const HOTPLUG_QUEUE: usize = 64;

/// How long the backend's USB thread may take to answer a liveness check.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The device source this helper runs.
pub enum Backend {
    Sim(SimBackend),
    Usbfs(UsbfsBackend),
}

/// Why a backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("USB backend: {0}")]
    Usbfs(String),
}

impl Backend {
    /// Starts the backend named in the configuration.
    pub fn start(config: &ServerConfig) -> Result<Backend, BackendError> {
        Ok(match config.helper.backend {
            BackendKind::Sim => Backend::Sim(SimBackend::start(&config.sim)),
            BackendKind::Nusb => Backend::Usbfs(UsbfsBackend::start()?),
        })
    }

    /// Which backend this is, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sim(_) => "sim",
            Backend::Usbfs(_) => "nusb",
        }
    }

    /// Every device currently present (before the share ceiling).
    pub fn devices(&self) -> Vec<DeviceInfo> {
        match self {
            Backend::Sim(b) => b.devices(),
            Backend::Usbfs(b) => b.devices(),
        }
    }

    /// Hotplug events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        match self {
            Backend::Sim(b) => b.subscribe(),
            Backend::Usbfs(b) => b.subscribe(),
        }
    }

    /// Opens and claims a device: every interface of its active
    /// configuration, with kernel drivers detached.
    pub async fn open(&self, key: &DeviceKey) -> Result<Device, UsbError> {
        match self {
            Backend::Sim(b) => b.open(key).await.map(Device::Sim),
            Backend::Usbfs(b) => b.open(key).await.map(|d| Device::Usbfs(Box::new(d))),
        }
    }

    /// Re-attaches kernel drivers to interfaces of `wanted` devices that have
    /// none, as an earlier helper killed mid-session leaves them. Simulated
    /// devices have no kernel drivers.
    pub async fn hand_back_driverless(&self, wanted: impl Fn(&DeviceInfo) -> bool) {
        match self {
            Backend::Sim(_) => {}
            Backend::Usbfs(b) => b.hand_back_driverless(wanted).await,
        }
    }

    /// True if the backend's USB machinery answers within [`HEALTH_TIMEOUT`].
    pub async fn healthy(&self) -> bool {
        match self {
            Backend::Sim(b) => b.healthy().await,
            Backend::Usbfs(b) => b.healthy().await,
        }
    }
}

/// An open, claimed device. Dropping it without [`Device::close`] still
/// releases it, but `close` waits until the kernel drivers are back.
pub enum Device {
    Sim(SimDevice),
    Usbfs(Box<UsbfsDevice>),
}

impl Device {
    /// The device as it was when opened (active configuration kept current).
    pub fn info(&self) -> DeviceInfo {
        match self {
            Device::Sim(d) => d.info(),
            Device::Usbfs(d) => d.info(),
        }
    }

    /// Queues a transfer. Transfers on one endpoint complete in submission
    /// order; `reply` receives exactly one result.
    pub fn submit(&self, transfer: Transfer, reply: ReplySink) {
        match self {
            Device::Sim(d) => d.submit(transfer, reply),
            Device::Usbfs(d) => d.submit(transfer, reply),
        }
    }

    /// Cancels the transfer submitted as request `id`, if it is still pending.
    /// Its reply then reports `Cancelled` (or its result, if it had finished).
    pub fn cancel(&self, id: RequestId) {
        match self {
            Device::Sim(d) => d.cancel(id),
            Device::Usbfs(d) => d.cancel(id),
        }
    }

    /// SET_CONFIGURATION, releasing and re-claiming interfaces around it.
    pub async fn set_configuration(&self, value: u8) -> Result<(), UsbError> {
        match self {
            Device::Sim(d) => d.set_configuration(value).await,
            Device::Usbfs(d) => d.set_configuration(value).await,
        }
    }

    /// SET_INTERFACE.
    pub async fn set_interface(&self, interface: u8, alt: u8) -> Result<(), UsbError> {
        match self {
            Device::Sim(d) => d.set_interface(interface, alt).await,
            Device::Usbfs(d) => d.set_interface(interface, alt).await,
        }
    }

    /// CLEAR_FEATURE(ENDPOINT_HALT) plus the host-side toggle reset.
    pub async fn clear_halt(&self, endpoint: u8) -> Result<(), UsbError> {
        match self {
            Device::Sim(d) => d.clear_halt(endpoint).await,
            Device::Usbfs(d) => d.clear_halt(endpoint).await,
        }
    }

    /// Port reset, keeping the claim.
    pub async fn reset(&self) -> Result<(), UsbError> {
        match self {
            Device::Sim(d) => d.reset().await,
            Device::Usbfs(d) => d.reset().await,
        }
    }

    /// Fails pending transfers with `Cancelled`, releases the interfaces and
    /// gives the device back to its kernel drivers.
    pub async fn close(&self) {
        match self {
            Device::Sim(d) => d.close().await,
            Device::Usbfs(d) => d.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{keyboard, zero};

    #[test]
    fn a_replug_between_two_looks_leaves_before_it_arrives() {
        let (zero_before, keyboard) = (zero::device_info(2), keyboard::device_info(3));
        let zero_after = zero::device_info(4);
        assert_eq!(zero_before.key, zero_after.key, "a replug keeps the key");
        let known = [zero_before.clone(), keyboard.clone()];
        assert_eq!(
            hotplug_changes(&known, &[keyboard.clone(), zero_after.clone()], |d| d),
            vec![
                BackendEvent::Left(zero_before.clone()),
                BackendEvent::Arrived(zero_after),
            ]
        );
        assert_eq!(
            hotplug_changes(&known, &[keyboard.clone(), zero_before.clone()], |d| d),
            vec![],
            "the same plug-in in another order is no change"
        );
        assert_eq!(
            hotplug_changes(&known, &[zero_before], |d| d),
            vec![BackendEvent::Left(keyboard.clone())]
        );
        assert_eq!(
            hotplug_changes(&[], std::slice::from_ref(&keyboard), |d| d),
            vec![BackendEvent::Arrived(keyboard)]
        );
    }
}
