//! A link is a byte stream carrying [`Message`]s: the helper socket or an iroh
//! stream. This module holds the hello handshake both ends perform and the
//! requesting end's multiplexer, which keeps many requests in flight and
//! matches replies by id.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::codec::{CodecError, FrameWriter, Malformed, MessageCodec, READ_BUFFER_CAPACITY};
use crate::proto::{Event, Hello, Message, Reply, Request, RequestId, UsbError};

/// How long a peer may take to say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered for a slow consumer before further ones are dropped.
const EVENT_QUEUE: usize = 256;

/// Why a link could not be set up or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("peer closed the connection")]
    Closed,
    #[error("peer did not say hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("peer's first message was not a hello")]
    NotHello,
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Incompatible(UsbError),
}

/// Sends our hello and waits for the peer's. Both ends call this first.
pub async fn handshake<R, W>(
    reader: &mut FramedRead<R, MessageCodec>,
    writer: &mut FramedWrite<W, MessageCodec>,
    software: &str,
) -> Result<Hello, LinkError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.send(Message::Hello(Hello::new(software))).await?;
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
        .await
        .map_err(|_| LinkError::HelloTimeout(HELLO_TIMEOUT))?;
    judge_hello(first)
}

/// Judges a peer's first message: its hello (checked for compatibility), a
/// refusal that carries the reason, or a protocol error. Shared with the
/// agent's proxy, which reads raw frames.
pub fn judge_hello(
    first: Option<Result<Result<Message, Malformed>, CodecError>>,
) -> Result<Hello, LinkError> {
    match first {
        Some(Ok(Ok(Message::Hello(hello)))) => {
            hello.check_compatible().map_err(LinkError::Incompatible)?;
            Ok(hello)
        }
        Some(Ok(Ok(Message::Event(Event::ShuttingDown { reason })))) => {
            Err(LinkError::Refused(reason))
        }
        Some(Ok(_)) => Err(LinkError::NotHello),
        Some(Err(e)) => Err(e.into()),
        None => Err(LinkError::Closed),
    }
}

/// Where a reply goes: a future waiting for just that reply, or a stream of
/// replies that must stay in arrival order (transfers of one USB/IP device).
#[derive(Debug)]
enum Waiter {
    One(oneshot::Sender<Result<Reply, UsbError>>),
    Stream(mpsc::UnboundedSender<(RequestId, Result<Reply, UsbError>)>),
}

impl Waiter {
    fn deliver(self, id: RequestId, body: Result<Reply, UsbError>) {
        match self {
            Waiter::One(tx) => {
                let _ = tx.send(body);
            }
            Waiter::Stream(tx) => {
                let _ = tx.send((id, body));
            }
        }
    }
}

type Waiters = Arc<Mutex<HashMap<RequestId, Waiter>>>;
type SharedWriter = Arc<tokio::sync::Mutex<FrameWriter<Box<dyn AsyncWrite + Send + Unpin>>>>;

/// The requesting end of a link. Cheap to clone; all clones share the link,
/// which closes when the last clone is dropped (or on [`LinkClient::close`]).
#[derive(Debug, Clone)]
pub struct LinkClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Requests are written by the task that makes them: no hand-off to a
    /// writer task, so a request costs no extra thread wake-up.
    writer: SharedWriter,
    waiters: Waiters,
    /// Cancelled when the link ends, from either side.
    closed: CancellationToken,
    next_id: AtomicU64,
    peer: Hello,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkClient")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// The error every request sees once the link is gone.
pub fn link_lost() -> UsbError {
    UsbError::Io("link to peer lost".into())
}

impl LinkClient {
    /// Performs the handshake on `reader`/`writer` and starts the link's
    /// reader task. Events pushed by the peer arrive on the returned
    /// receiver; if it is not drained, further events are dropped (with a
    /// warning) rather than stalling replies.
    pub async fn start<R, W>(
        reader: R,
        writer: W,
        software: &str,
    ) -> Result<(LinkClient, mpsc::Receiver<Event>), LinkError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut reader =
            FramedRead::with_capacity(reader, MessageCodec::default(), READ_BUFFER_CAPACITY);
        let mut writer = FramedWrite::new(writer, MessageCodec::default());
        let peer = handshake(&mut reader, &mut writer, software).await?;
        let writer: Box<dyn AsyncWrite + Send + Unpin> = Box::new(writer.into_inner());
        let writer: SharedWriter = Arc::new(tokio::sync::Mutex::new(FrameWriter::new(writer)));

        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let waiters: Waiters = Arc::default();
        let closed = CancellationToken::new();
        tokio::spawn(read_loop(
            reader,
            waiters.clone(),
            events_tx,
            Arc::downgrade(&writer),
            closed.clone(),
        ));
        Ok((
            LinkClient {
                inner: Arc::new(Inner {
                    writer,
                    waiters,
                    closed,
                    next_id: AtomicU64::new(1),
                    peer,
                }),
            },
            events,
        ))
    }

    /// The peer's hello.
    pub fn peer(&self) -> &Hello {
        &self.inner.peer
    }

    /// True once the link is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Resolves when the link is gone.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await
    }

    /// Closes the link from this end; pending requests fail and the peer
    /// sees the stream end.
    pub fn close(&self) {
        self.inner.closed.cancel();
        let writer = self.inner.writer.clone();
        tokio::spawn(async move {
            let _ = writer.lock().await.shutdown().await;
        });
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, body: Request) -> Result<Reply, UsbError> {
        self.start_request(body).await.1.await
    }

    /// Sends a request and returns its id (for `Cancel`) with the future
    /// of its reply. The request is on its way when this returns.
    pub async fn start_request(
        &self,
        body: Request,
    ) -> (
        RequestId,
        impl Future<Output = Result<Reply, UsbError>> + use<>,
    ) {
        self.start_requests(vec![body])
            .await
            .pop()
            .expect("one request, one reply")
    }

    /// Sends several requests with one write, each with its own reply as
    /// with [`LinkClient::start_request`]. A caller holding a burst of
    /// requests (the URBs of one read from a USB/IP client) saves the peer
    /// a wake-up per request.
    pub async fn start_requests(
        &self,
        bodies: Vec<Request>,
    ) -> Vec<(
        RequestId,
        impl Future<Output = Result<Reply, UsbError>> + use<>,
    )> {
        let (waiters, replies): (Vec<_>, Vec<_>) = bodies
            .into_iter()
            .map(|body| {
                let (tx, rx) = oneshot::channel();
                ((body, Waiter::One(tx)), rx)
            })
            .unzip();
        let ids = self.send_requests(waiters, |_, _| {}).await;
        ids.into_iter()
            .zip(replies)
            .map(|(id, rx)| {
                (
                    id,
                    async move { rx.await.unwrap_or_else(|_| Err(link_lost())) },
                )
            })
            .collect()
    }

    /// Sends requests, with one write, whose replies go to `replies` in the
    /// order they arrive on the link. `register` learns each request's index
    /// in `bodies` and its id before the requests leave, so a reply can never
    /// overtake the caller's bookkeeping. If the link is or goes down,
    /// `replies` receives a `link_lost` error for each.
    pub async fn requests_into(
        &self,
        bodies: Vec<Request>,
        replies: &mpsc::UnboundedSender<(RequestId, Result<Reply, UsbError>)>,
        register: impl FnMut(usize, RequestId),
    ) -> Vec<RequestId> {
        let batch = bodies
            .into_iter()
            .map(|body| (body, Waiter::Stream(replies.clone())))
            .collect();
        self.send_requests(batch, register).await
    }

    async fn send_requests(
        &self,
        batch: Vec<(Request, Waiter)>,
        mut register: impl FnMut(usize, RequestId),
    ) -> Vec<RequestId> {
        let inner = &self.inner;
        let mut ids = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        {
            let mut waiters = inner.waiters.lock().expect("waiters lock");
            for (index, (body, waiter)) in batch.into_iter().enumerate() {
                let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
                register(index, id);
                waiters.insert(id, waiter);
                ids.push(id);
                messages.push(Message::Request { id, body });
            }
        }
        // The reader cancels `closed` before failing the waiters, so a waiter
        // inserted after that is caught here.
        let sent = !inner.closed.is_cancelled() && {
            let mut writer = inner.writer.lock().await;
            messages.iter().all(|m| writer.queue(m).is_ok()) && writer.flush().await.is_ok()
        };
        if !sent {
            inner.closed.cancel();
            let orphaned: Vec<(RequestId, Waiter)> = {
                let mut waiters = inner.waiters.lock().expect("waiters lock");
                ids.iter()
                    .filter_map(|&id| waiters.remove(&id).map(|w| (id, w)))
                    .collect()
            };
            for (id, waiter) in orphaned {
                waiter.deliver(id, Err(link_lost()));
            }
        }
        ids
    }
}

/// Writes queued messages until the link closes. Shared by both ends of a link.
pub async fn write_loop<W: AsyncWrite + Unpin, T: serde::Serialize>(
    mut writer: FrameWriter<W>,
    mut outgoing: mpsc::Receiver<T>,
    closed: CancellationToken,
) {
    // Feed everything already queued, then flush once: one syscall for a
    // burst. The messages themselves are dropped only once written, so
    // whatever they hold (the helper's in-flight budget) lasts until then.
    let mut burst = Vec::new();
    loop {
        let first = tokio::select! {
            message = outgoing.recv() => match message {
                Some(message) => message,
                None => break,
            },
            _ = closed.cancelled() => break,
        };
        // A peer that stopped reading holds the flush; closing ends it.
        let written = tokio::select! {
            written = write_burst(&mut writer, first, &mut outgoing, &mut burst) => written,
            _ = closed.cancelled() => break,
        };
        if let Err(e) = written {
            tracing::debug!("link write failed: {e}");
            break;
        }
        burst.clear();
    }
    closed.cancel();
    // Say goodbye properly where the transport allows it (ends the stream),
    // but not at the mercy of a peer that does not read.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer.shutdown()).await;
}

async fn write_burst<W: AsyncWrite + Unpin, T: serde::Serialize>(
    writer: &mut FrameWriter<W>,
    first: T,
    outgoing: &mut mpsc::Receiver<T>,
    burst: &mut Vec<T>,
) -> Result<(), CodecError> {
    writer.queue(&first)?;
    burst.push(first);
    while let Ok(next) = outgoing.try_recv() {
        writer.queue(&next)?;
        burst.push(next);
    }
    writer.flush().await
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: FramedRead<R, MessageCodec>,
    waiters: Waiters,
    events: mpsc::Sender<Event>,
    writer: std::sync::Weak<tokio::sync::Mutex<FrameWriter<Box<dyn AsyncWrite + Send + Unpin>>>>,
    closed: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            frame = reader.next() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = closed.cancelled() => break,
        };
        match frame {
            Ok(Ok(Message::Reply { id, body })) => {
                let waiter = waiters.lock().expect("waiters lock").remove(&id);
                if let Some(waiter) = waiter {
                    waiter.deliver(id, body);
                }
            }
            Ok(Ok(Message::Event(event))) => {
                if let Err(mpsc::error::TrySendError::Full(event)) = events.try_send(event) {
                    tracing::warn!(?event, "event consumer is not keeping up; dropping event");
                }
            }
            Ok(Ok(Message::Request { id, body })) => {
                let answer = Message::Reply {
                    id,
                    body: Err(UsbError::Unsupported(format!(
                        "{} requests are not served on this end of the link",
                        body.kind()
                    ))),
                };
                if let Some(writer) = writer.upgrade() {
                    let _ = writer.lock().await.send(&answer).await;
                }
            }
            Ok(Ok(Message::Hello(_))) => {
                tracing::warn!("peer sent a second hello; ignoring it");
            }
            Ok(Err(malformed)) => {
                tracing::warn!("peer sent a malformed message: {malformed}");
                if let Some(id) = malformed.reply_id {
                    let waiter = waiters.lock().expect("waiters lock").remove(&id);
                    if let Some(waiter) = waiter {
                        waiter.deliver(id, Err(UsbError::Protocol(malformed.reason)));
                    }
                }
            }
            Err(e) => {
                tracing::warn!("link failed: {e}");
                break;
            }
        }
    }
    // Stop the writer, then fail every request still waiting.
    closed.cancel();
    let orphaned: Vec<(RequestId, Waiter)> =
        waiters.lock().expect("waiters lock").drain().collect();
    for (id, waiter) in orphaned {
        waiter.deliver(id, Err(link_lost()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Completion;
    use crate::proto::DeviceKey;
    use bytes::Bytes;

    /// A tiny server that answers every request with its id as data, in
    /// reverse order of arrival per batch of two, to prove replies are matched by id.
    async fn serve(stream: tokio::net::UnixStream) {
        let (r, w) = stream.into_split();
        let mut reader = FramedRead::new(r, MessageCodec::default());
        let mut writer = FramedWrite::new(w, MessageCodec::default());
        handshake(&mut reader, &mut writer, "test-server")
            .await
            .unwrap();
        let mut held: Option<RequestId> = None;
        while let Some(Ok(Ok(Message::Request { id, .. }))) = reader.next().await {
            let reply = |id: RequestId| Message::Reply {
                id,
                body: Ok(Reply::Transferred(Completion {
                    actual_length: 8,
                    data: Bytes::copy_from_slice(&id.to_be_bytes()),
                })),
            };
            match held.take() {
                None => held = Some(id),
                Some(first) => {
                    writer.send(reply(id)).await.unwrap();
                    writer.send(reply(first)).await.unwrap();
                }
            }
        }
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_when_out_of_order() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(serve(b));
        let (r, w) = a.into_split();
        let (client, _events) = LinkClient::start(r, w, "test-client").await.unwrap();
        assert!(client.peer().software.starts_with("test-server"));
        let mut pending = Vec::new();
        for _ in 0..10 {
            pending.push(client.start_request(Request::ListDevices).await);
        }
        for (id, reply) in pending {
            match reply.await.unwrap() {
                Reply::Transferred(c) => assert_eq!(c.data[..], id.to_be_bytes()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn an_unreadable_reply_still_ends_its_request() {
        use tokio::io::AsyncWriteExt;
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let (r, w) = b.into_split();
            let mut reader = FramedRead::new(r, MessageCodec::default());
            let mut writer = FramedWrite::new(w, MessageCodec::default());
            handshake(&mut reader, &mut writer, "test-server")
                .await
                .unwrap();
            let Some(Ok(Ok(Message::Request { id, .. }))) = reader.next().await else {
                return;
            };
            use rmpv::Value;
            let bogus = Value::Map(vec![(
                Value::from("Reply"),
                Value::Array(vec![
                    Value::from(id),
                    Value::Map(vec![(Value::from("Ok"), Value::from("no such reply"))]),
                ]),
            )]);
            let mut body = Vec::new();
            rmpv::encode::write_value(&mut body, &bogus).unwrap();
            let mut w = writer.into_inner();
            w.write_all(&(body.len() as u32).to_be_bytes())
                .await
                .unwrap();
            w.write_all(&body).await.unwrap();
            // Keep the link open: the answer must come from the reply itself.
            while reader.next().await.is_some() {}
        });
        let (r, w) = a.into_split();
        let (client, _events) = LinkClient::start(r, w, "test-client").await.unwrap();
        let answer =
            tokio::time::timeout(Duration::from_secs(5), client.request(Request::ListDevices))
                .await
                .expect("answered, not left waiting");
        assert!(matches!(answer, Err(UsbError::Protocol(_))), "{answer:?}");
    }

    #[tokio::test]
    async fn each_request_of_a_batch_gets_its_own_reply() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (r, w) = a.into_split();
        let server = tokio::spawn(async move {
            let (r, w) = b.into_split();
            let mut reader = FramedRead::new(r, MessageCodec::default());
            let mut writer = FramedWrite::new(w, MessageCodec::default());
            handshake(&mut reader, &mut writer, "s").await.unwrap();
            // Read the whole batch, then answer it in reverse order.
            let mut ids = Vec::new();
            for _ in 0..3 {
                match reader.next().await {
                    Some(Ok(Ok(Message::Request { id, .. }))) => ids.push(id),
                    other => panic!("{other:?}"),
                }
            }
            for id in ids.into_iter().rev() {
                let reply = Message::Reply {
                    id,
                    body: Ok(Reply::Transferred(Completion {
                        actual_length: 8,
                        data: Bytes::copy_from_slice(&id.to_be_bytes()),
                    })),
                };
                writer.send(reply).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        let (client, _events) = LinkClient::start(r, w, "c").await.unwrap();
        let batch = client.start_requests(vec![Request::ListDevices; 3]).await;
        let ids: Vec<RequestId> = batch.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 3);
        for (id, reply) in batch {
            match reply.await.unwrap() {
                Reply::Transferred(c) => assert_eq!(c.data[..], id.to_be_bytes()),
                other => panic!("{other:?}"),
            }
        }
        server.abort();
    }

    #[tokio::test]
    async fn pending_requests_fail_when_the_link_drops() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let (r, w) = b.into_split();
            let mut reader = FramedRead::new(r, MessageCodec::default());
            let mut writer = FramedWrite::new(w, MessageCodec::default());
            handshake(&mut reader, &mut writer, "s").await.unwrap();
            reader.next().await; // read one request, then hang up
        });
        let (r, w) = a.into_split();
        let (client, _events) = LinkClient::start(r, w, "c").await.unwrap();
        let result = client.request(Request::ListDevices).await;
        assert_eq!(result, Err(link_lost()));
        server.await.unwrap();
        client.closed().await;
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn handshake_rejects_a_peer_that_does_not_say_hello() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut writer = FramedWrite::new(b, MessageCodec::default());
            let key: DeviceKey = "1-1/0525:a4a0".parse().unwrap();
            writer
                .send(Message::Event(Event::DeviceLeft { key }))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let (r, w) = a.into_split();
        let err = LinkClient::start(r, w, "c").await.unwrap_err();
        assert!(matches!(err, LinkError::NotHello), "{err}");
    }

    #[tokio::test]
    async fn a_refusal_instead_of_hello_carries_the_reason() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut writer = FramedWrite::new(b, MessageCodec::default());
            let reason = "peer not approved".to_string();
            writer
                .send(Message::Event(Event::ShuttingDown { reason }))
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let (r, w) = a.into_split();
        let err = LinkClient::start(r, w, "c").await.unwrap_err();
        assert!(
            matches!(&err, LinkError::Refused(reason) if reason == "peer not approved"),
            "{err}"
        );
    }
}
