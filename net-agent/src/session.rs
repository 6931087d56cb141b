//! One client session on the server: a bidirectional iroh stream proxied to
//! its own link to the USB helper. The agent reads only the first bytes of
//! each frame (kind and request id) and forwards transfers as the raw frames
//! they arrived in: it authorizes and routes without decoding, copying or
//! re-encoding payloads. Only the few messages it must judge (device lists,
//! opens, closes, hotplug events) are decoded.
//!
//! When the session ends, its helper link closes and the helper releases
//! every device the session held.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use iroh::EndpointId;
use iroh::endpoint::{RecvStream, SendStream};
use p2p_usb_common::codec::{
    CodecError, FrameCodec, FrameKind, FrameWriter, READ_BUFFER_CAPACITY, decode_frame,
    encode_body, frame_codec, peek,
};
use p2p_usb_common::link::judge_hello;
use p2p_usb_common::proto::{
    CAP_PARTIAL_TRANSFERS, DeviceKey, Event, Handle, Hello, Message, Reply, Request, RequestId,
    UsbError,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::helper_link::SOFTWARE;
use crate::quic_writer::QuicWriter;

/// Request ids the agent itself uses on a session's helper link; clients
/// count up from 1 and never reach them.
const INTERNAL_IDS: RequestId = 1 << 63;

/// How long a stopping session waits for the client's transport to
/// acknowledge its last notice (the stream's end); the agent then still
/// leaves the connection open a moment for the client to read it.
const FINISH_WAIT: Duration = Duration::from_secs(1);
/// How long a stopping session gives its downstream to send that notice
/// and finish: longer than [`FINISH_WAIT`], so the wait is never cut off
/// half way (the connection then closes, and with it whatever the client
/// has not read yet).
const NOTICE_WAIT: Duration = Duration::from_millis(1500);

/// Frames forwarded per flush at most, so one direction of a busy session
/// cannot hold back its own bytes for long.
const MAX_BURST: usize = 64;

type Reader<R> = FramedRead<R, FrameCodec>;

/// Counts the frames queued since the last flush, so each direction of the
/// proxy forwards what is already readable in one burst.
#[derive(Default)]
struct Burst {
    queued: usize,
}

impl Burst {
    /// The next frame if one is readable now and the burst has room; `None`
    /// means: flush, then wait (the count starts again).
    fn ready<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut Reader<R>,
    ) -> Option<Option<std::io::Result<bytes::BytesMut>>> {
        let ready = if self.queued < MAX_BURST {
            reader.next().now_or_never()
        } else {
            None
        };
        if ready.is_none() {
            self.queued = 0;
        }
        ready
    }
}
type Writer<W> = FrameWriter<W>;

/// A request whose reply the agent must see before the client does. It goes
/// to the helper under an id of the agent's own, so that only the reply to
/// that very request is judged, whatever ids the client reuses.
enum Judged {
    /// Its reply loses the devices that are not shared.
    List { client_id: RequestId },
    /// Its reply is checked against the shares again and recorded.
    Open {
        client_id: RequestId,
        key: DeviceKey,
    },
}

/// What a session remembers to authorize and filter without touching transfers.
#[derive(Default)]
struct SessionState {
    /// Judged requests in flight, by the id the helper knows them by.
    judged: HashMap<RequestId, Judged>,
    /// Open devices of this session.
    opened: HashMap<Handle, DeviceKey>,
    /// Shared devices the client has been told of (present at the start,
    /// or announced since), so share changes are announced once.
    announced: HashSet<DeviceKey>,
    /// Requests the agent sent itself; their replies are not forwarded.
    internal: HashSet<RequestId>,
    next_internal: RequestId,
}

impl SessionState {
    fn internal_id(&mut self) -> RequestId {
        let id = self.next_internal;
        self.next_internal += 1;
        id
    }

    /// Re-addresses a judged request to an id of the agent's own.
    fn judge(&mut self, judged: Judged, body: Request) -> Option<Bytes> {
        let id = self.internal_id();
        self.judged.insert(id, judged);
        encode_body(&Message::Request { id, body }).ok()
    }
}

/// Runs one session until the client or the helper ends it, or `stop` fires.
pub(crate) async fn run(
    agent: Arc<Agent>,
    client: EndpointId,
    send: SendStream,
    recv: RecvStream,
    stop: CancellationToken,
) {
    let mut from_client = FramedRead::with_capacity(recv, frame_codec(), READ_BUFFER_CAPACITY);
    let mut to_client = FrameWriter::new(QuicWriter::new(send));
    let client_hello = match handshake(&mut from_client, &mut to_client, Hello::new(SOFTWARE)).await
    {
        Ok(hello) => hello,
        Err(e) => {
            tracing::debug!(client = %client, "session handshake failed: {e}");
            return;
        }
    };
    let (from_helper, to_helper) = match open_helper_link(&agent, &client_hello).await {
        Ok(link) => link,
        Err(reason) => {
            tracing::warn!(client = %client, "session refused: {reason}");
            let _ = to_client
                .send(&Message::Event(Event::ShuttingDown { reason }))
                .await;
            return finish(to_client).await;
        }
    };
    agent.update_client(client, |record| record.sessions += 1);
    tracing::debug!(client = %client, "session started");

    let state = Arc::new(Mutex::new(SessionState {
        next_internal: INTERNAL_IDS,
        announced: agent
            .shared_devices()
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.key)
            .collect(),
        ..SessionState::default()
    }));
    let (notices, notices_rx) = mpsc::channel::<Message>(64);
    let (internal, internal_rx) = mpsc::channel::<Message>(16);
    let mut upstream = tokio::spawn(client_to_helper(
        agent.clone(),
        from_client,
        to_helper,
        internal_rx,
        notices.clone(),
        state.clone(),
    ));
    let mut downstream = tokio::spawn(helper_to_client(
        agent.clone(),
        client,
        from_helper,
        to_client,
        notices_rx,
        internal.clone(),
        state.clone(),
    ));
    let mut policy = agent.policy.subscribe();
    loop {
        tokio::select! {
            _ = &mut upstream => break,
            _ = &mut downstream => break,
            _ = policy.changed() => {
                withdraw_unshared(&agent, &state, &internal, &notices).await;
                announce_share_changes(&agent, &state, &notices).await;
            }
            _ = stop.cancelled() => {
                // Nothing more from the client reaches the helper (a revoked
                // client is cut off now); replies still flow for a moment.
                upstream.abort();
                let _ = notices.send(Message::Event(Event::ShuttingDown {
                    reason: "server is shutting down".into(),
                })).await;
                let _ = tokio::time::timeout(NOTICE_WAIT, &mut downstream).await;
                break;
            }
        }
    }
    upstream.abort();
    downstream.abort();
    let opened: Vec<DeviceKey> = state
        .lock()
        .expect("session lock")
        .opened
        .values()
        .cloned()
        .collect();
    if let Some(record) = agent.clients.lock().expect("clients lock").get_mut(&client) {
        record.sessions = record.sessions.saturating_sub(1);
        for key in &opened {
            record.devices.remove(&key.to_string());
        }
    }
    tracing::debug!(client = %client, "session ended");
}

/// The hello exchange, on raw frames: sends `ours`, returns the peer's.
async fn handshake<R, W>(
    reader: &mut Reader<R>,
    writer: &mut Writer<W>,
    ours: Hello,
) -> Result<Hello, String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer
        .send(&Message::Hello(ours))
        .await
        .map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(p2p_usb_common::link::HELLO_TIMEOUT, reader.next())
        .await
        .map_err(|_| "no hello in time".to_string())?;
    let first = first.map(|frame| {
        frame
            .map(|frame| decode_frame::<Message>(frame.freeze()))
            .map_err(CodecError::from)
    });
    judge_hello(first).map_err(|e| e.to_string())
}

type HelperLink = (
    Reader<tokio::net::unix::OwnedReadHalf>,
    Writer<tokio::net::unix::OwnedWriteHalf>,
);

/// A link to the helper for a client that said `client` in its hello.
async fn open_helper_link(agent: &Agent, client: &Hello) -> Result<HelperLink, String> {
    let path = &agent.paths.helper_socket;
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("USB helper unavailable at {}: {e}", path.display()))?;
    let (reader, writer) = stream.into_split();
    let mut reader = FramedRead::with_capacity(reader, frame_codec(), READ_BUFFER_CAPACITY);
    let mut writer = FrameWriter::new(writer);
    // Replies pass through as they are: the helper may only use what the
    // client reads.
    let mut hello = Hello::new(SOFTWARE);
    hello
        .capabilities
        .retain(|capability| capability != CAP_PARTIAL_TRANSFERS || client.supports(capability));
    handshake(&mut reader, &mut writer, hello)
        .await
        .map_err(|e| format!("USB helper refused the link: {e}"))?;
    Ok((reader, writer))
}

fn reply(id: RequestId, error: UsbError) -> Message {
    Message::Reply {
        id,
        body: Err(error),
    }
}

/// Client to helper: requests, forwarded as they came unless they need a decision.
async fn client_to_helper<R, W>(
    agent: Arc<Agent>,
    mut from_client: Reader<R>,
    mut to_helper: Writer<W>,
    mut internal: mpsc::Receiver<Message>,
    notices: mpsc::Sender<Message>,
    state: Arc<Mutex<SessionState>>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut burst = Burst::default();
    loop {
        // The agent's own requests go first: a withdrawal must reach the
        // helper before anything the client sends after hearing of it.
        if let Ok(message) = internal.try_recv() {
            if to_helper.queue(&message).is_err() {
                return;
            }
            continue;
        }
        // Frames that are already here are queued and go out together;
        // the link is flushed only before waiting.
        let next = match burst.ready(&mut from_client) {
            Some(next) => next,
            None => {
                if to_helper.flush().await.is_err() {
                    return;
                }
                tokio::select! {
                    biased;
                    Some(message) = internal.recv() => {
                        if to_helper.queue(&message).is_err() {
                            return;
                        }
                        continue;
                    }
                    next = from_client.next() => next,
                }
            }
        };
        let frame = match next {
            Some(Ok(frame)) => frame.freeze(),
            Some(Err(e)) => {
                // A client that closes its connection or resets the
                // stream (a detach, a stopped process) is leaving, not
                // failing; anything else, such as an oversized frame, is.
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotConnected | std::io::ErrorKind::ConnectionReset
                ) {
                    tracing::info!("client link ended: {e}");
                } else {
                    tracing::warn!("client link failed: {e}");
                }
                // What the client sent before leaving still reaches the helper.
                let _ = to_helper.flush().await;
                return;
            }
            None => {
                let _ = to_helper.flush().await;
                return;
            }
        };
        let forward = match peek(&frame) {
            FrameKind::Request { id, .. } if id >= INTERNAL_IDS => {
                let _ = notices
                    .send(reply(
                        id,
                        UsbError::Protocol("request ids must be below 2^63".into()),
                    ))
                    .await;
                None
            }
            FrameKind::Request {
                id,
                kind: "ListDevices",
            } => state
                .lock()
                .expect("session lock")
                .judge(Judged::List { client_id: id }, Request::ListDevices),
            FrameKind::Request {
                kind: "Open" | "Close",
                ..
            } => judge(&agent, frame, &notices, &state).await,
            FrameKind::Request { .. } => Some(frame),
            FrameKind::Unknown => {
                if let Err(malformed) = decode_frame::<Message>(frame.clone())
                    && let Some(id) = malformed.request_id
                {
                    let _ = notices
                        .send(reply(id, UsbError::Protocol(malformed.reason)))
                        .await;
                }
                None
            }
            FrameKind::Reply { .. } | FrameKind::Event | FrameKind::Hello => None,
        };
        if let Some(frame) = forward {
            if to_helper.queue_raw(frame).is_err() {
                return;
            }
            burst.queued += 1;
        }
    }
}

/// Opens and closes are decoded: opens of unshared devices are refused here,
/// and the session learns which devices it holds. Returns the frame to
/// forward, if any.
async fn judge(
    agent: &Agent,
    frame: Bytes,
    notices: &mpsc::Sender<Message>,
    state: &Mutex<SessionState>,
) -> Option<Bytes> {
    match decode_frame::<Message>(frame.clone()) {
        Ok(Message::Request {
            id,
            body: Request::Open { key },
        }) => {
            if !agent.policy.is_shared(&key) {
                let _ = notices
                    .send(reply(id, UsbError::NotShared(key.to_string())))
                    .await;
                return None;
            }
            let body = Request::Open { key: key.clone() };
            state
                .lock()
                .expect("session lock")
                .judge(Judged::Open { client_id: id, key }, body)
        }
        Ok(Message::Request {
            body: Request::Close { handle },
            ..
        }) => {
            state.lock().expect("session lock").opened.remove(&handle);
            Some(frame)
        }
        Ok(_) => Some(frame),
        Err(malformed) => {
            if let Some(id) = malformed.request_id {
                let _ = notices
                    .send(reply(id, UsbError::Protocol(malformed.reason)))
                    .await;
            }
            None
        }
    }
}

/// Helper to client: replies and events, raw unless filtered.
async fn helper_to_client<R: AsyncRead + Unpin>(
    agent: Arc<Agent>,
    client: EndpointId,
    mut from_helper: Reader<R>,
    mut to_client: Writer<QuicWriter>,
    mut notices: mpsc::Receiver<Message>,
    internal: mpsc::Sender<Message>,
    state: Arc<Mutex<SessionState>>,
) {
    let mut burst = Burst::default();
    loop {
        // As upstream: what is ready goes out in one flush.
        let next = match burst.ready(&mut from_helper) {
            Some(next) => next,
            None => {
                if to_client.flush().await.is_err() {
                    return;
                }
                tokio::select! {
                    next = from_helper.next() => next,
                    Some(notice) = notices.recv() => {
                        let last = matches!(notice, Message::Event(Event::ShuttingDown { .. }));
                        if to_client.send(&notice).await.is_err() {
                            return;
                        }
                        if last {
                            return finish(to_client).await;
                        }
                        continue;
                    }
                }
            }
        };
        let frame = match next {
            Some(Ok(frame)) => frame.freeze(),
            _ => {
                // The helper's last replies still reach the client.
                let _ = to_client.flush().await;
                return;
            }
        };
        let (frame, last) = match peek(&frame) {
            FrameKind::Reply { id } if id >= INTERNAL_IDS => {
                let judged = {
                    let mut state = state.lock().expect("session lock");
                    if state.internal.remove(&id) {
                        continue;
                    }
                    state.judged.remove(&id)
                };
                let Some(judged) = judged else { continue };
                let (frame, withdraw) = filter_reply(&agent, client, &frame, judged, &state);
                if let Some(close) = withdraw {
                    // Not awaited here: the request direction may itself be
                    // waiting on this one.
                    let internal = internal.clone();
                    tokio::spawn(async move { internal.send(close).await });
                }
                match frame {
                    Some(frame) => (frame, false),
                    None => continue,
                }
            }
            FrameKind::Reply { .. } => (frame, false),
            FrameKind::Event => match filter_event(&agent, &frame, &state) {
                Some(filtered) => filtered,
                None => continue,
            },
            _ => continue,
        };
        if to_client.queue_raw(frame).is_err() {
            return;
        }
        burst.queued += 1;
        if last {
            if to_client.flush().await.is_err() {
                return;
            }
            return finish(to_client).await;
        }
    }
}

/// Ends the stream and waits (briefly) until the client's transport has it
/// all, so a closing connection does not swallow the last notice.
async fn finish(mut to_client: Writer<QuicWriter>) {
    let _ = to_client.shutdown().await;
    let _ = tokio::time::timeout(FINISH_WAIT, to_client.get_mut().get_mut().stopped()).await;
}

/// The reply to a judged request, under the client's own id: device lists
/// lose unshared devices; an open is recorded, or, when its device stopped
/// being shared while the helper opened it, undone (the request to close it
/// is returned) and refused.
fn filter_reply(
    agent: &Agent,
    client: EndpointId,
    frame: &Bytes,
    judged: Judged,
    state: &Mutex<SessionState>,
) -> (Option<Bytes>, Option<Message>) {
    let body = match decode_frame::<Message>(frame.clone()) {
        Ok(Message::Reply { body, .. }) => body,
        _ => Err(UsbError::Protocol(
            "the USB helper sent a reply the agent cannot read".into(),
        )),
    };
    let mut withdraw = None;
    let (id, body) = match judged {
        Judged::List { client_id } => (
            client_id,
            body.map(|reply| match reply {
                Reply::Devices(devices) => Reply::Devices(
                    devices
                        .into_iter()
                        .filter(|d| agent.policy.is_shared(&d.key))
                        .collect(),
                ),
                other => other,
            }),
        ),
        Judged::Open { client_id, key } => match body {
            Ok(Reply::Opened { handle, device }) => {
                // Checked under the session lock, which a withdrawal after a
                // share change also takes: either it sees this device as
                // open, or this sees the new shares.
                let mut state = state.lock().expect("session lock");
                if agent.policy.is_shared(&key) {
                    tracing::info!(client = %client, device = %key, "device opened by client");
                    if let Some(record) =
                        agent.clients.lock().expect("clients lock").get_mut(&client)
                    {
                        record.devices.insert(key.to_string());
                    }
                    state.opened.insert(handle, key);
                    (client_id, Ok(Reply::Opened { handle, device }))
                } else {
                    let id = state.internal_id();
                    state.internal.insert(id);
                    withdraw = Some(Message::Request {
                        id,
                        body: Request::Close { handle },
                    });
                    (client_id, Err(UsbError::NotShared(key.to_string())))
                }
            }
            other => (client_id, other),
        },
    };
    (encode_body(&Message::Reply { id, body }).ok(), withdraw)
}

/// Hotplug events only for shared devices; a helper shutdown ends the session.
fn filter_event(
    agent: &Agent,
    frame: &Bytes,
    state: &Mutex<SessionState>,
) -> Option<(Bytes, bool)> {
    match decode_frame::<Message>(frame.clone()).ok()? {
        Message::Event(Event::DeviceArrived(device)) => {
            if !agent.policy.is_shared(&device.key) {
                return None;
            }
            // Once: a share announced it already if the two crossed.
            let fresh = state
                .lock()
                .expect("session lock")
                .announced
                .insert(device.key);
            fresh.then(|| (frame.clone(), false))
        }
        Message::Event(Event::DeviceLeft { key }) => {
            // Unshared devices do not exist for clients, not even leaving,
            // unless this session had opened one.
            let mut state = state.lock().expect("session lock");
            let held = state.opened.values().any(|k| *k == key);
            state.opened.retain(|_, k| *k != key);
            state.announced.remove(&key);
            (held || agent.policy.is_shared(&key)).then(|| (frame.clone(), false))
        }
        Message::Event(Event::ShuttingDown { reason }) => {
            let notice = Message::Event(Event::ShuttingDown {
                reason: format!("USB helper: {reason}"),
            });
            Some((encode_body(&notice).ok()?, true))
        }
        _ => None,
    }
}

/// After a share change: closes this session's devices that are no longer
/// shared, and tells the client they are gone.
async fn withdraw_unshared(
    agent: &Agent,
    state: &Mutex<SessionState>,
    internal: &mpsc::Sender<Message>,
    notices: &mpsc::Sender<Message>,
) {
    let withdrawn: Vec<(RequestId, Handle, DeviceKey)> = {
        let mut state = state.lock().expect("session lock");
        let gone: Vec<(Handle, DeviceKey)> = state
            .opened
            .iter()
            .filter(|(_, key)| !agent.policy.is_shared(key))
            .map(|(h, k)| (*h, k.clone()))
            .collect();
        gone.into_iter()
            .map(|(handle, key)| {
                state.opened.remove(&handle);
                let id = state.internal_id();
                state.internal.insert(id);
                (id, handle, key)
            })
            .collect()
    };
    for (id, handle, key) in withdrawn {
        tracing::info!(device = %key, "device unshared: withdrawing it from a client");
        state.lock().expect("session lock").announced.remove(&key);
        let _ = internal
            .send(Message::Request {
                id,
                body: Request::Close { handle },
            })
            .await;
        let _ = notices
            .send(Message::Event(Event::DeviceLeft { key }))
            .await;
    }
}

/// After a share change: devices now shared are announced as arrived, and
/// devices no longer shared (and not open here: those are withdrawn) as
/// gone, so a client's view follows `share` and `unshare` without re-listing.
async fn announce_share_changes(
    agent: &Agent,
    state: &Mutex<SessionState>,
    notices: &mpsc::Sender<Message>,
) {
    // Without the agent's own view of the helper's devices, nothing is
    // known to have changed; the session's helper events still flow.
    let Some(shared) = agent.shared_devices() else {
        return;
    };
    let events: Vec<Event> = {
        let mut state = state.lock().expect("session lock");
        let gone: Vec<DeviceKey> = state
            .announced
            .iter()
            .filter(|key| {
                !shared.iter().any(|d| d.key == **key) && !state.opened.values().any(|k| k == *key)
            })
            .cloned()
            .collect();
        let mut events = Vec::new();
        for key in gone {
            state.announced.remove(&key);
            events.push(Event::DeviceLeft { key });
        }
        for device in shared {
            if state.announced.insert(device.key.clone()) {
                events.push(Event::DeviceArrived(device));
            }
        }
        events
    };
    for event in events {
        let _ = notices.send(Message::Event(event)).await;
    }
}
