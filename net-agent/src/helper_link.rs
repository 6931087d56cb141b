//! The agent's connection to the USB helper over its Unix socket: connect,
//! say hello, keep a live device table from the helper's events, and
//! reconnect with backoff whenever the helper goes away (a restart, a crash,
//! or socket activation starting it for the first time).

use std::path::{Path, PathBuf};
use std::time::Duration;

use p2p_usb_common::link::{LinkClient, LinkError};
use p2p_usb_common::proto::{DeviceInfo, Event, Reply, Request, UsbError};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// Program name sent in hellos.
pub const SOFTWARE: &str = "p2p-usb-agent";

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why the helper could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HelperLinkError {
    #[error("cannot connect to the helper at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("helper at {} refused the link: {source}", path.display())]
    Handshake { path: PathBuf, source: LinkError },
    #[error("helper request failed: {0}")]
    Request(#[from] UsbError),
}

/// Opens one link to the helper (hello included). Each network client gets
/// its own, so the helper's per-connection cleanup releases exactly that
/// client's devices when it goes.
pub async fn connect(path: &Path) -> Result<(LinkClient, mpsc::Receiver<Event>), HelperLinkError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| HelperLinkError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (reader, writer) = stream.into_split();
    LinkClient::start(reader, writer, SOFTWARE)
        .await
        .map_err(|source| HelperLinkError::Handshake {
            path: path.to_path_buf(),
            source,
        })
}

/// Lists the helper's devices over a fresh link.
pub async fn list_devices(path: &Path) -> Result<Vec<DeviceInfo>, HelperLinkError> {
    let (link, _events) = connect(path).await?;
    let devices = fetch_devices(&link).await?;
    link.close();
    Ok(devices)
}

async fn fetch_devices(link: &LinkClient) -> Result<Vec<DeviceInfo>, UsbError> {
    match link.request(Request::ListDevices).await? {
        Reply::Devices(devices) => Ok(devices),
        other => Err(UsbError::Protocol(format!(
            "expected a device list, got {other:?}"
        ))),
    }
}

/// What the agent currently knows about the helper.
#[derive(Debug, Clone)]
pub enum HelperState {
    /// Not connected (yet, or any more), with the last reason.
    Waiting { reason: String },
    /// Connected; the device table is kept current from hotplug events.
    Connected {
        link: LinkClient,
        devices: Vec<DeviceInfo>,
    },
}

impl HelperState {
    /// The device table, empty while disconnected.
    pub fn devices(&self) -> &[DeviceInfo] {
        match self {
            HelperState::Connected { devices, .. } => devices,
            HelperState::Waiting { .. } => &[],
        }
    }
}

/// Keeps a link to the helper up for as long as the returned receiver lives.
pub fn supervise(path: PathBuf) -> watch::Receiver<HelperState> {
    let (state, receiver) = watch::channel(HelperState::Waiting {
        reason: "not connected yet".into(),
    });
    tokio::spawn(async move {
        let mut backoff = BACKOFF_START;
        loop {
            let reason = match session(&path, &state).await {
                Ok(reason) => {
                    backoff = BACKOFF_START;
                    reason
                }
                Err(e) => e.to_string(),
            };
            if state
                .send(HelperState::Waiting {
                    reason: reason.clone(),
                })
                .is_err()
            {
                return;
            }
            tracing::warn!(socket = %path.display(), "helper link down: {reason}; retrying in {backoff:?}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    receiver
}

/// One connected period; returns why it ended.
async fn session(
    path: &Path,
    state: &watch::Sender<HelperState>,
) -> Result<String, HelperLinkError> {
    let (link, mut events) = connect(path).await?;
    let mut devices = fetch_devices(&link).await?;
    tracing::info!(
        socket = %path.display(),
        helper = %link.peer().software,
        "connected to the helper: {} device(s)",
        devices.len()
    );
    let _ = state.send(HelperState::Connected {
        link: link.clone(),
        devices: devices.clone(),
    });
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::DeviceArrived(device)) => {
                    tracing::info!(device = %device.key, product = device.display_name(), "device arrived");
                    devices.retain(|d| d.key != device.key);
                    devices.push(device);
                }
                Some(Event::DeviceLeft { key }) => {
                    tracing::info!(device = %key, "device left");
                    devices.retain(|d| d.key != key);
                }
                Some(Event::ShuttingDown { reason }) => {
                    link.close();
                    return Ok(format!("helper is shutting down: {reason}"));
                }
                None => return Ok("helper closed the link".into()),
            },
            _ = link.closed() => return Ok("helper closed the link".into()),
        }
        if state
            .send(HelperState::Connected {
                link: link.clone(),
                devices: devices.clone(),
            })
            .is_err()
        {
            link.close();
            return Ok("agent stopping".into());
        }
    }
}

/// Formats devices as the `devices` command prints them.
pub fn device_table(devices: &[DeviceInfo]) -> String {
    device_table_with_shares(devices, None)
}

/// Like [`device_table`], with a SHARED column when `shared` is given.
pub fn device_table_with_shares(devices: &[DeviceInfo], shared: Option<&[bool]>) -> String {
    let mut header = vec!["KEY", "VID:PID", "SPEED"];
    if shared.is_some() {
        header.push("SHARED");
    }
    header.push("PRODUCT");
    let mut rows: Vec<Vec<String>> = vec![header.into_iter().map(String::from).collect()];
    for (i, d) in devices.iter().enumerate() {
        let mut row = vec![
            d.key.to_string(),
            format!("{:04x}:{:04x}", d.key.vid, d.key.pid),
            d.speed.label().to_string(),
        ];
        if let Some(shared) = shared {
            row.push(
                if shared.get(i).copied().unwrap_or(false) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
            );
        }
        row.push(d.display_name());
        rows.push(row);
    }
    format_table(&rows)
}

/// Left-aligned columns separated by two spaces.
pub fn format_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(c, cell)| format!("{cell:w$}", w = widths[c]))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}
