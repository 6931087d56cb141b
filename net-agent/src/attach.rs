//! `p2p-usb attach`: makes a remote device appear in this machine's kernel
//! through vhci_hcd.
//!
//! Privilege split: this process does all the networking as the invoking
//! user. The one privileged act, writing to vhci_hcd's `attach` file, is
//! granted by the `p2p-usb-attach` group (the client udev rule makes that
//! file group-writable), so nothing network-facing ever runs as root. The
//! kernel takes the USB/IP stream from one end of a socket pair we create;
//! this process serves the other end.
//!
//! If the link to the server breaks, the device is detached (pending URBs
//! fail, nothing is replayed) and attached again by its stable key once the
//! server is back. If the device leaves the server, it is detached and
//! attached again if it returns within [`RETURN_WAIT`].

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use p2p_usb_common::proto::{DeviceInfo, DeviceKey, UsbError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::attachments::{RecordFile, VhciSlot};
use crate::client::{self, Client, ClientError};
use crate::print_line;
use crate::usbip::gateway::Remote;
use crate::usbip::urbs::{self, EndReason, RemoteDevice};
use crate::usbip::{speed_code, usbip_device};
use crate::vhci::{self, VhciError};

/// How long a device that left the server is waited for.
pub const RETURN_WAIT: Duration = Duration::from_secs(60);
/// How long the server may take to open a device (resetting it and claiming
/// its interfaces included) before the attempt counts as timed out.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Why attaching stopped.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Vhci(#[from] VhciError),
    #[error("cannot create the socket pair for the kernel: {0}")]
    Socket(std::io::Error),
    #[error("{key} left the server and did not come back within {RETURN_WAIT:?}{last}")]
    Gone {
        key: DeviceKey,
        /// Why the server could not be asked, the last time it could not.
        last: String,
    },
}

/// Attaches `device` of `server` until detached, stopped, or gone for good.
pub async fn run(
    client: Arc<Client>,
    server: &str,
    device: &str,
    stop: CancellationToken,
) -> Result<(), AttachError> {
    let remote = Remote::new(client.clone(), client.resolve(server)?);
    let root = vhci::default_root();
    // The first attach must succeed as asked; later ones go by stable key.
    let Some(first) = stop.run_until_cancelled(remote.session()).await else {
        return Ok(());
    };
    let (session, events) = first?;
    let Some(devices) = stop
        .run_until_cancelled(client::list_devices(&session))
        .await
    else {
        return Ok(());
    };
    let devices = devices.map_err(ClientError::from)?;
    let key = client::pick_device(&devices, device)?.key.clone();
    // What `status` and `detach DEVICE` know of this process.
    let mut record = RecordFile::create(remote.id().to_string(), key.clone());
    let mut say = |attached: Option<VhciSlot>, state: String| {
        if let Some(record) = &mut record {
            record.set(attached, state);
        }
    };
    let mut opened = Some((session, events));
    let mut backoff = BACKOFF_START;
    // Not reset by a successful attach: a kernel stream that keeps failing
    // the same way is not attached again and again without a pause.
    let mut stream_backoff = BACKOFF_START;
    // Once the device has been attached, failures to open it again that can
    // pass (the server still releasing it from the lost session, a helper
    // restarting) are waited out; before that, they are the answer.
    let mut attached_before = false;
    // Since when the attached device has been missing: the wait for its
    // return counts from there, however often it is listed but cannot be
    // opened meanwhile.
    let mut gone_since: Option<Instant> = None;
    loop {
        let (session, events) = match opened.take() {
            Some(opened) => opened,
            None => match stop.run_until_cancelled(remote.session()).await {
                None => return Ok(()),
                Some(Ok(opened)) => opened,
                Some(Err(e @ ClientError::NotApproved { .. })) => return Err(e.into()),
                Some(Err(e)) => {
                    tracing::warn!(device = %key, "reconnecting in {backoff:?}: {e}");
                    say(None, format!("reconnecting: {e}"));
                    if !back_off(&mut backoff, &stop).await {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        let opening = tokio::time::timeout(OPEN_TIMEOUT, open(&session, &key));
        let result = match stop.run_until_cancelled(opening).await {
            None => {
                session.close();
                return Ok(());
            }
            Some(Err(_elapsed)) => Err(OpenError::Failed(UsbError::Timeout)),
            Some(Ok(result)) => result,
        };
        let info = match result {
            Ok(info) => info,
            Err(OpenError::Gone(e)) if attached_before => {
                session.close();
                let since = *gone_since.get_or_insert_with(Instant::now);
                tracing::warn!(device = %key, "cannot open it again ({e}); waiting for it");
                say(None, format!("waiting for the device: {e}"));
                // Listed but not openable (still re-enumerating, say): a
                // pause before trying again, and no longer than the wait.
                if !back_off(&mut backoff, &stop).await
                    || !wait_for_return(&remote, &key, since + RETURN_WAIT, &stop).await?
                {
                    return Ok(());
                }
                continue;
            }
            Err(OpenError::Failed(e)) if attached_before && passing(&e) => {
                session.close();
                tracing::warn!(device = %key, "re-attaching in {backoff:?}: {e}");
                say(None, format!("re-attaching: {e}"));
                if !back_off(&mut backoff, &stop).await {
                    return Ok(());
                }
                continue;
            }
            Err(OpenError::Gone(e) | OpenError::Failed(e)) => {
                session.close();
                return Err(ClientError::Usb(e).into());
            }
        };
        if stop.is_cancelled() {
            // Stopped while the device was being opened: not attached at all.
            session.close();
            return Ok(());
        }
        backoff = BACKOFF_START;
        attached_before = true;
        gone_since = None;
        let (handle, info) = info;
        let usbip = usbip_device(&info, remote.label());
        let (ours, kernels) =
            std::os::unix::net::UnixStream::pair().map_err(AttachError::Socket)?;
        let port = vhci::attach_free_port(
            &root,
            kernels.as_fd(),
            usbip.devid(),
            speed_code(info.speed),
        )?;
        // The kernel holds its own reference to its end now.
        drop(kernels);
        let slot = VhciSlot {
            port: port.port,
            devid: usbip.devid(),
        };
        say(Some(slot), format!("attached as busid {}", usbip.busid));
        tracing::info!(device = %key, port = port.port, "attached {} at vhci port {}", info.display_name(), port.port);
        print_line(&format!(
            "attached {key} ({}) at vhci port {}",
            info.display_name(),
            port.port
        ));
        ours.set_nonblocking(true).map_err(AttachError::Socket)?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(AttachError::Socket)?;
        let reason = urbs::serve(
            stream,
            RemoteDevice {
                session,
                events,
                handle,
                key: key.clone(),
            },
            stop.child_token(),
        )
        .await;
        tracing::info!(device = %key, port = port.port, "detached: {reason}");
        match reason {
            EndReason::ClientClosed | EndReason::Stopped => {
                print_line(&format!("detached {key} from vhci port {}", port.port));
                return Ok(());
            }
            EndReason::DeviceGone => {
                print_line(&format!(
                    "{key} left the server; detached, waiting for it to come back"
                ));
                say(None, "waiting for the device to come back".into());
                let since = *gone_since.insert(Instant::now());
                if !wait_for_return(&remote, &key, since + RETURN_WAIT, &stop).await? {
                    return Ok(());
                }
            }
            EndReason::LinkLost(reason) => {
                print_line(&format!(
                    "lost the server ({reason}); detached {key}, re-attaching when it is back"
                ));
                say(None, format!("reconnecting: {reason}"));
            }
            EndReason::Protocol(reason) => {
                print_line(&format!(
                    "the kernel's USB/IP stream could not be read ({reason}); detached {key}, attaching it again in {stream_backoff:?}"
                ));
                say(None, format!("attaching again: {reason}"));
                if !back_off(&mut stream_backoff, &stop).await {
                    return Ok(());
                }
            }
        }
    }
}

enum OpenError {
    /// The device is not there to open (not listed, not shared, unplugged).
    Gone(UsbError),
    Failed(UsbError),
}

async fn open(
    session: &p2p_usb_common::link::LinkClient,
    key: &DeviceKey,
) -> Result<(u32, DeviceInfo), OpenError> {
    client::open_device(session, key)
        .await
        .map_err(|e| match e {
            UsbError::NotFound(_) | UsbError::NotShared(_) | UsbError::NoDevice => {
                OpenError::Gone(e)
            }
            e => OpenError::Failed(e),
        })
}

/// Waits `backoff`, then doubles it (up to [`BACKOFF_MAX`]); false if
/// stopped meanwhile.
async fn back_off(backoff: &mut Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = stop.cancelled() => return false,
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    true
}

/// True for an open failure that goes away by itself: the device still held
/// by the session the server is tearing down, or the server's own link to
/// its USB helper down for a restart.
fn passing(error: &UsbError) -> bool {
    matches!(
        error,
        UsbError::Busy(_) | UsbError::Io(_) | UsbError::Timeout
    )
}

/// Polls the server until the device is listed again, until `deadline`;
/// false if stopped.
async fn wait_for_return(
    remote: &Remote,
    key: &DeviceKey,
    deadline: Instant,
    stop: &CancellationToken,
) -> Result<bool, AttachError> {
    let mut last = String::new();
    while Instant::now() < deadline {
        let Some(connected) = stop.run_until_cancelled(remote.session()).await else {
            return Ok(false);
        };
        match connected {
            Ok((session, _events)) => {
                let listed = client::list_devices(&session).await;
                session.close();
                match listed {
                    Ok(listed) if listed.iter().any(|d| d.key == *key) => return Ok(true),
                    Ok(_) => last.clear(),
                    Err(e) => last = format!(" (last: {e})"),
                }
            }
            Err(e) => {
                tracing::debug!(device = %key, "waiting for the device: {e}");
                last = format!(" (last: {e})");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return Ok(false),
        }
    }
    Err(AttachError::Gone {
        key: key.clone(),
        last,
    })
}
