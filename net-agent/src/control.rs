//! The agent's local control socket: how `p2p-usb-agent approve`, `pending`,
//! `revoke`, `share` and friends reach the running agent. The socket is
//! world-connectable (mode 0666) on purpose; what decides is the peer's
//! kernel-verified identity: root, the agent's own user, or a member of the
//! admin group.

use std::path::Path;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use p2p_usb_common::access::{AccessList, PeerCredentials};
use p2p_usb_common::codec::{FrameWriter, MessageCodec};
use p2p_usb_common::proto::DeviceInfo;
use p2p_usb_common::service::{self, ListenError};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

use crate::policy::PendingClient;

/// What an admin can ask the running agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Identity, ticket and a one-line summary.
    Status,
    /// The helper's devices and whether each is shared.
    Devices,
    /// Clients refused and waiting for approval.
    Pending,
    /// Clients connected now.
    Clients,
    Approve(String),
    Revoke(String),
    Share(String),
    Unshare(String),
}

/// The agent's answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    Status {
        id: String,
        ticket: String,
        summary: String,
    },
    Devices(Vec<SharedDevice>),
    Pending(Vec<PendingClient>),
    Clients(Vec<ClientSummary>),
    /// The change was made; the text says what happened.
    Done(String),
    /// The request was refused or failed; the text says why.
    Failed(String),
}

/// A device and whether it is offered to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedDevice {
    pub device: DeviceInfo,
    pub shared: bool,
}

/// A connected client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientSummary {
    pub id: String,
    pub address: String,
    pub sessions: usize,
    /// Devices it has open (stable keys).
    pub devices: Vec<String>,
}

/// Answers control requests; implemented by the agent.
pub trait ControlHandler: Send + Sync + 'static {
    /// Carries out one request.
    fn handle(&self, request: ControlRequest) -> ControlReply;
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the agent's control socket {}: {source}", path.display())]
    Connect {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the agent closed the control connection (are you root or in the admin group?)")]
    Refused,
    #[error("control socket: {0}")]
    Protocol(String),
}

/// Binds the control socket (replacing a stale one) with mode 0666.
pub fn bind(path: &Path) -> Result<UnixListener, ListenError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ListenError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let listener = service::bind_unix_listener(path, 0o666)?;
    UnixListener::from_std(listener).map_err(|source| ListenError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Serves control connections until the listener fails.
pub async fn serve(listener: UnixListener, access: AccessList, handler: Arc<dyn ControlHandler>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let peer = match PeerCredentials::of_unix_socket(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("control socket: cannot read peer credentials: {e}");
                continue;
            }
        };
        if !access.allows(&peer) {
            tracing::warn!(peer = %peer, "control socket: refused (not root, the agent user, or the admin group)");
            let reason =
                format!("refused: {peer} is not root, the agent's user, or in the admin group");
            tokio::spawn(async move {
                let mut writer = FrameWriter::new(stream);
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(1),
                    writer.shutdown_with(&ControlReply::Failed(reason)),
                )
                .await;
            });
            continue;
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, MessageCodec::<ControlRequest>::default());
            while let Some(Ok(Ok(request))) = framed.next().await {
                tracing::info!(peer = %peer, ?request, "control request");
                let reply = handler.handle(request);
                let mut out =
                    Framed::new(framed.get_mut(), MessageCodec::<ControlReply>::default());
                if out.send(reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends one request to the running agent and returns its reply.
pub async fn request(path: &Path, request: ControlRequest) -> Result<ControlReply, ControlError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut framed = Framed::new(stream, MessageCodec::<ControlRequest>::default());
    framed
        .send(request)
        .await
        .map_err(|e| ControlError::Protocol(e.to_string()))?;
    let mut replies = Framed::new(framed.into_inner(), MessageCodec::<ControlReply>::default());
    match replies.next().await {
        Some(Ok(Ok(reply))) => Ok(reply),
        Some(Ok(Err(malformed))) => Err(ControlError::Protocol(malformed.reason)),
        Some(Err(e)) => Err(ControlError::Protocol(e.to_string())),
        None => Err(ControlError::Refused),
    }
}
