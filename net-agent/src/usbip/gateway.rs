//! `p2p-usb serve-usbip`: a standard USB/IP server on loopback that exports a
//! p2p-usb server's devices, so the stock `usbip attach` (Linux) and
//! usbip-win2 (Windows) can import them. Only allowed local users are served:
//! otherwise any local user could drive the remote device.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use iroh::EndpointAddr;
use p2p_usb_common::access::{AccessList, PeerCredentials};
use p2p_usb_common::proto::{DeviceInfo, UsbError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::proto::{
    BUSID_LEN, ImportReply, OP_HEADER_LEN, OP_REP_DEVLIST, OP_REQ_DEVLIST, OP_REQ_IMPORT, OpHeader,
    ST_DEV_BUSY, ST_ERROR, ST_NA, ST_NODEV, ST_OK, decode_import_request, encode_devlist,
};
use super::urbs::{self, RemoteDevice};
use super::{devlist_entry, usbip_device};
use crate::client::{self, Client, ClientError};
use crate::peer_uid;

/// How long USB/IP connections get to end their sessions on stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// The server a gateway exports, with one connection shared by all sessions.
pub struct Remote {
    client: Arc<Client>,
    server: EndpointAddr,
    label: String,
    connection: Mutex<Option<iroh::endpoint::Connection>>,
}

impl Remote {
    /// A remote server reached through `client`.
    pub fn new(client: Arc<Client>, server: EndpointAddr) -> Remote {
        let label = server.id.fmt_short().to_string();
        Remote {
            client,
            server,
            label,
            connection: Mutex::new(None),
        }
    }

    /// A new session, reconnecting first if the connection is gone.
    pub async fn session(
        &self,
    ) -> Result<
        (
            p2p_usb_common::link::LinkClient,
            tokio::sync::mpsc::Receiver<p2p_usb_common::proto::Event>,
        ),
        ClientError,
    > {
        // The lock guards the connection handle, and makes one caller at a
        // time reconnect; a session hello runs without it, so one slow
        // server answer does not hold up every other USB/IP request.
        let existing = self
            .connection
            .lock()
            .await
            .clone()
            .filter(|c| c.close_reason().is_none());
        if let Some(existing) = &existing {
            match self.client.session(existing).await {
                Ok(session) => return Ok(session),
                Err(ClientError::NotApproved { .. }) => {}
                Err(e) => {
                    tracing::debug!("session on the existing connection failed: {e}; reconnecting")
                }
            }
        }
        let mut connection = self.connection.lock().await;
        // Another caller reconnected meanwhile: use its connection.
        let replaced = connection.clone().filter(|current| {
            current.close_reason().is_none()
                && existing
                    .as_ref()
                    .is_none_or(|e| e.stable_id() != current.stable_id())
        });
        let current = match replaced {
            Some(current) => current,
            None => {
                let fresh = self.client.connect(&self.server).await?;
                *connection = Some(fresh.clone());
                fresh
            }
        };
        drop(connection);
        self.client.session(&current).await
    }

    /// Opens the device at bus path `busid` on a new session, ready for
    /// [`urbs::serve`]; `None` if the server shares no such device.
    pub async fn open(
        &self,
        busid: &str,
    ) -> Result<Option<(RemoteDevice, DeviceInfo)>, ClientError> {
        let (session, events) = self.session().await?;
        let opened = async {
            let devices = client::list_devices(&session).await?;
            let Some(listed) = devices.into_iter().find(|d| d.key.bus_path == busid) else {
                return Ok(None);
            };
            Ok(Some(client::open_device(&session, &listed.key).await?))
        }
        .await;
        match opened {
            Ok(Some((handle, device))) => Ok(Some((
                RemoteDevice {
                    session,
                    events,
                    handle,
                    key: device.key.clone(),
                },
                device,
            ))),
            unopened => {
                session.close();
                unopened.map(|_| None)
            }
        }
    }

    /// The server's EndpointId.
    pub fn id(&self) -> iroh::EndpointId {
        self.server.id
    }

    /// The short server name used in USB/IP device paths.
    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Binds `listen` and serves USB/IP there in the background until `stop`
/// fires. `allowed` lists local users besides root and the gateway's own
/// user. Returns the bound address (port 0 picks a free one) and the task.
pub async fn start(
    listen: SocketAddr,
    remote: Arc<Remote>,
    allowed: AccessList,
    stop: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(listener, remote, allowed, stop))))
}

async fn serve(
    listener: TcpListener,
    remote: Arc<Remote>,
    mut allowed: AccessList,
    stop: CancellationToken,
) {
    allowed.allow_uid(0);
    allowed.allow_uid(nix::unistd::geteuid().as_raw());
    let allowed = Arc::new(allowed);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, typically: wait rather than spin.
                    tracing::warn!("gateway accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        let remote = remote.clone();
        let allowed = allowed.clone();
        let stop = stop.child_token();
        connections.spawn(async move {
            if let Err(reason) = serve_connection(stream, peer, remote, &allowed, stop).await {
                tracing::warn!(peer = %peer, "USB/IP connection ended: {reason}");
            }
        });
    }
    // Imports end their sessions on stop; give them a moment to say so to
    // the server, so the devices are released there rather than timed out.
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("USB/IP connections did not end within {STOP_GRACE:?}");
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    remote: Arc<Remote>,
    allowed: &AccessList,
    stop: CancellationToken,
) -> Result<(), String> {
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let uid = peer_uid::tcp_peer_uid(local, peer)
        .map_err(|e| format!("cannot identify the local user: {e}"))?;
    match uid {
        Some(uid) if allowed.allows(&PeerCredentials::of_uid(uid)) => {
            tracing::debug!(peer = %peer, uid, "USB/IP client accepted");
        }
        other => {
            return Err(format!(
                "refused: local user {} is not allowed (add it to [gateway] allowed_users)",
                other.map_or("unknown".into(), |u| u.to_string())
            ));
        }
    }
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut header = [0u8; OP_HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let header = OpHeader::decode(&header).map_err(|e| e.to_string())?;
    match header.code {
        OP_REQ_DEVLIST => devlist(stream, &remote).await,
        OP_REQ_IMPORT => import(stream, &remote, stop).await,
        other => Err(format!("unknown USB/IP operation {other:#06x}")),
    }
}

async fn devlist(mut stream: TcpStream, remote: &Remote) -> Result<(), String> {
    let listed = async {
        let (session, _events) = remote.session().await?;
        let devices = client::list_devices(&session).await?;
        session.close();
        Ok::<_, ClientError>(devices)
    }
    .await;
    let mut out = BytesMut::new();
    match listed {
        Ok(devices) => {
            let entries: Vec<_> = devices
                .iter()
                .map(|d| devlist_entry(d, remote.label()))
                .collect();
            out.extend_from_slice(&OpHeader::new(OP_REP_DEVLIST, ST_OK).encode());
            encode_devlist(&mut out, &entries).map_err(|e| e.to_string())?;
        }
        Err(e) => {
            tracing::warn!("device list for a USB/IP client failed: {e}");
            out.extend_from_slice(&OpHeader::new(OP_REP_DEVLIST, ST_NA).encode());
            out.extend_from_slice(&0u32.to_be_bytes());
        }
    }
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    stream.shutdown().await.map_err(|e| e.to_string())
}

async fn import(
    mut stream: TcpStream,
    remote: &Remote,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut busid = [0u8; BUSID_LEN];
    stream
        .read_exact(&mut busid)
        .await
        .map_err(|e| e.to_string())?;
    let busid = decode_import_request(&busid).map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    let (opened, device) = match remote.open(&busid).await {
        Ok(Some(opened)) => opened,
        Ok(None) => {
            ImportReply::Refused(ST_NODEV)
                .encode(&mut out)
                .map_err(|e| e.to_string())?;
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            return Err(format!("import of unknown busid {busid:?}"));
        }
        Err(e) => {
            let status = match &e {
                ClientError::Usb(UsbError::Busy(_)) => ST_DEV_BUSY,
                _ => ST_ERROR,
            };
            ImportReply::Refused(status)
                .encode(&mut out)
                .map_err(|e| e.to_string())?;
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            return Err(format!("import of {busid} failed: {e}"));
        }
    };
    ImportReply::Device(usbip_device(&device, remote.label()))
        .encode(&mut out)
        .map_err(|e| e.to_string())?;
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    tracing::info!(device = %device.key, "imported by a USB/IP client");
    let reason = urbs::serve(stream, opened, stop).await;
    tracing::info!(device = %device.key, "USB/IP import ended: {reason}");
    Ok(())
}
