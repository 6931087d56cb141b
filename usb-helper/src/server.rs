//! The helper's side of the helper socket: one long-lived listener, many agent
//! connections over its life. Each connection is checked by kernel
//! credentials before a byte is read, speaks the common vocabulary, and owns
//! the devices it opened: when it drops, they are closed and given back.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use p2p_usb_common::access::{AccessList, PeerCredentials};
use p2p_usb_common::codec::{FrameWriter, MessageCodec, READ_BUFFER_CAPACITY, SLICE_FROM};
use p2p_usb_common::config::ShareRule;
use p2p_usb_common::link::{self, handshake};
use p2p_usb_common::proto::{
    CAP_PARTIAL_TRANSFERS, Completion, DeviceInfo, DeviceKey, Event, Handle, MAX_TRANSFER_LEN,
    Message, Reply, Request, RequestId, Transfer, TransferData, UsbError, std_request,
};
use p2p_usb_common::service::{self, LivenessRequests};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, BackendEvent, Device, PlugIn, is_plug_in};
use crate::transfer::{Outgoing, ReplySink};

/// Program name sent in the hello.
pub const SOFTWARE: &str = "p2p-usb-helper";
/// Bytes of transfers one connection may have in flight; further submits
/// wait, which pushes back on the agent instead of growing memory.
pub const IN_FLIGHT_BUDGET: usize = 64 * 1024 * 1024;
/// Messages queued towards one connection.
const OUTGOING_QUEUE: usize = 1024;
/// Submits held back for budget, per connection: up to this many, carrying
/// up to [`WAITING_BYTES`]; beyond that new submits are refused (Busy).
pub const WAITING_SUBMITS: usize = 4096;
pub const WAITING_BYTES: usize = 16 * 1024 * 1024;
/// How long connections get to release their devices on stop.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything connections share.
pub struct Helper {
    backend: Backend,
    ceiling: Vec<ShareRule>,
    access: AccessList,
    /// Which connection holds each open device: a device is opened by one
    /// connection at a time.
    opened: Mutex<HashMap<DeviceKey, u64>>,
    peers: AtomicUsize,
}

impl Helper {
    /// A helper serving `backend`'s devices inside `ceiling` to peers in `access`.
    pub fn new(backend: Backend, ceiling: Vec<ShareRule>, access: AccessList) -> Arc<Helper> {
        Arc::new(Helper {
            backend,
            ceiling,
            access,
            opened: Mutex::default(),
            peers: AtomicUsize::new(0),
        })
    }

    /// True if the share ceiling lets agents see this device at all.
    pub fn visible(&self, device: &DeviceInfo) -> bool {
        self.ceiling.iter().any(|rule| rule.matches(device))
    }

    /// Devices agents may see.
    pub fn visible_devices(&self) -> Vec<DeviceInfo> {
        self.backend
            .devices()
            .into_iter()
            .filter(|d| self.visible(d))
            .collect()
    }

    /// The one-line state for `systemctl status`.
    pub fn status_line(&self) -> String {
        let devices = self.visible_devices().len();
        let open = self.opened.lock().expect("opened lock").len();
        let peers = self.peers.load(Ordering::Relaxed);
        format!(
            "{devices} device{}, {open} open, {peers} peer{}",
            plural(devices),
            plural(peers)
        )
    }

    /// Serves `listener` until `stop` resolves, answering the watchdog's
    /// liveness checks only while this loop and the USB backend both respond.
    /// On stop every connection releases its devices (within [`STOP_GRACE`]).
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        mut liveness: LivenessRequests,
        stop: impl Future<Output = &'static str>,
    ) {
        let shutdown = CancellationToken::new();
        let mut connections = JoinSet::new();
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_status = String::new();
        let mut next_connection = 1u64;
        tokio::pin!(stop);
        // No connection holds a device yet: any shared device without its
        // kernel drivers was left so by an earlier helper that died.
        self.backend
            .hand_back_driverless(|device| self.visible(device))
            .await;
        service::notify_ready(&self.status_line());
        tracing::info!(
            backend = self.backend.name(),
            "ready: {}",
            self.status_line()
        );
        let signal = loop {
            tokio::select! {
                signal = &mut stop => break signal,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let id = next_connection;
                        next_connection += 1;
                        connections.spawn(self.clone().connection(id, stream, shutdown.child_token()));
                    }
                    Err(e) => {
                        tracing::error!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(check) = liveness.recv() => {
                    let helper = self.clone();
                    tokio::spawn(async move {
                        if helper.backend.healthy().await {
                            check.alive();
                        } else {
                            tracing::error!("USB backend did not answer the liveness check");
                        }
                    });
                }
                _ = status_tick.tick() => {
                    let status = self.status_line();
                    if status != last_status {
                        service::notify_status(&status);
                        last_status = status;
                    }
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        };
        tracing::info!("{signal}: stopping; releasing devices");
        service::notify_stopping("stopping: releasing devices");
        shutdown.cancel();
        let drained = tokio::time::timeout(STOP_GRACE, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("connections did not finish within {STOP_GRACE:?}");
        }
    }

    async fn connection(self: Arc<Self>, id: u64, stream: UnixStream, shutdown: CancellationToken) {
        let peer = match PeerCredentials::of_unix_socket(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("cannot read peer credentials: {e}; closing");
                return;
            }
        };
        if !self.access.allows(&peer) {
            tracing::warn!(peer = %peer, "rejected peer: not an allowed user or group");
            // Say why, then hang up; nothing the peer sent has been read.
            let reason = format!(
                "{peer} is not allowed on this socket ([helper] allowed_users / allowed_groups)"
            );
            let mut writer = FrameWriter::new(stream);
            let notice = Message::Event(Event::ShuttingDown { reason });
            let _ =
                tokio::time::timeout(Duration::from_secs(1), writer.shutdown_with(&notice)).await;
            return;
        }
        self.peers.fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %peer, connection = id, "agent connected");
        let reason = Connection::run(&self, id, stream, shutdown).await;
        self.peers.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(peer = %peer, connection = id, "agent disconnected: {reason}");
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// One agent connection and the devices it holds.
struct Connection<'a> {
    helper: &'a Arc<Helper>,
    id: u64,
    outgoing: mpsc::Sender<Outgoing>,
    devices: HashMap<Handle, Arc<Device>>,
    next_handle: Handle,
    /// Devices announced to this peer, and which plug-in of each: so
    /// `DeviceLeft` goes only where `DeviceArrived` went, and a replug the
    /// peer has not been told of yet is still told.
    announced: HashMap<DeviceKey, PlugIn>,
    budget: Arc<Semaphore>,
    /// Submits waiting for budget, in arrival order (device operations too,
    /// so they keep their place). The connection keeps reading meanwhile, so
    /// a Cancel (of one of these, or of a transfer holding the budget) is
    /// still seen: vhci_hcd waits for the answer to an unlink, and would
    /// wait forever behind a helper that stopped reading.
    waiting: VecDeque<Waiting>,
    waiting_bytes: usize,
    /// A device operation is running: what comes after it waits until it
    /// is done, as usbip-host carries out SET_CONFIGURATION, SET_INTERFACE
    /// and resets before it reads the next URB.
    operating: bool,
    /// Told when the running operation is done.
    operation_done: mpsc::UnboundedSender<()>,
    /// The peer reads `Reply::PartlyTransferred`.
    partial_replies: bool,
    shutdown: CancellationToken,
}

/// A submit or device operation waiting for budget.
struct Waiting {
    id: RequestId,
    work: Work,
    device: Arc<Device>,
    cost: u32,
}

/// What a request asks of a device, once it may start.
enum Work {
    /// A transfer for the device.
    Transfer(Transfer),
    /// A device operation (`SetInterface`, `ClearHalt`, …), asked for
    /// directly or as the standard control request a host sends: it runs
    /// in order with the transfers around it.
    Operation { request: Request, asked_as: AskedAs },
}

/// How a device operation was asked for, and so how its success is answered.
#[derive(Clone, Copy)]
enum AskedAs {
    /// The control transfer a host sends: answered as a transfer.
    ControlTransfer,
    /// The vocabulary's own request: answered `Done`.
    Request,
}

impl AskedAs {
    fn done(self) -> Reply {
        match self {
            AskedAs::ControlTransfer => Reply::Transferred(Completion::default()),
            AskedAs::Request => Reply::Done,
        }
    }
}

impl Work {
    /// OUT bytes the work carries, counted against `WAITING_BYTES`.
    fn out_bytes(&self) -> usize {
        match self {
            Work::Transfer(Transfer {
                data: TransferData::Out(bytes),
                ..
            }) => bytes.len(),
            Work::Transfer(_) | Work::Operation { .. } => 0,
        }
    }
}

impl<'a> Connection<'a> {
    /// A connection that holds nothing yet and has announced the devices
    /// there are now.
    fn new(
        helper: &'a Arc<Helper>,
        id: u64,
        outgoing: mpsc::Sender<Outgoing>,
        operation_done: mpsc::UnboundedSender<()>,
        partial_replies: bool,
        shutdown: CancellationToken,
    ) -> Self {
        Connection {
            helper,
            id,
            outgoing,
            devices: HashMap::new(),
            next_handle: 1,
            announced: helper
                .visible_devices()
                .iter()
                .map(|d| (d.key.clone(), PlugIn::of(d)))
                .collect(),
            budget: Arc::new(Semaphore::new(IN_FLIGHT_BUDGET)),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            operating: false,
            operation_done,
            partial_replies,
            shutdown,
        }
    }

    async fn run(
        helper: &'a Arc<Helper>,
        id: u64,
        stream: UnixStream,
        shutdown: CancellationToken,
    ) -> String {
        let (reader, writer) = stream.into_split();
        let mut reader =
            FramedRead::with_capacity(reader, MessageCodec::default(), READ_BUFFER_CAPACITY);
        let mut writer = FramedWrite::new(writer, MessageCodec::default());
        let mut hotplug = helper.backend.subscribe();
        let peer = match handshake(&mut reader, &mut writer, SOFTWARE).await {
            Ok(peer) => peer,
            Err(e) => return format!("handshake failed: {e}"),
        };
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_QUEUE);
        let (operation_done, mut operations_done) = mpsc::unbounded_channel();
        let writer_closed = CancellationToken::new();
        let writer_task = tokio::spawn(link::write_loop(
            FrameWriter::new(writer.into_inner()),
            outgoing_rx,
            writer_closed.clone(),
        ));
        let mut conn = Connection::new(
            helper,
            id,
            outgoing,
            operation_done,
            peer.supports(CAP_PARTIAL_TRANSFERS),
            shutdown.clone(),
        );
        let budget = conn.budget.clone();
        let reason = loop {
            let next_cost = conn
                .waiting
                .front()
                .filter(|_| !conn.operating)
                .map(|w| w.cost);
            tokio::select! {
                Ok(permit) = budget.clone().acquire_many_owned(next_cost.unwrap_or(1)), if next_cost.is_some() => {
                    conn.submit_waiting(permit);
                }
                Some(()) = operations_done.recv() => conn.operating = false,
                frame = reader.next() => match frame {
                    None => break "closed by peer".to_string(),
                    Some(Err(e)) => break format!("closing: {e}"),
                    Some(Ok(Err(malformed))) => {
                        tracing::warn!(connection = id, "malformed message: {}", malformed.reason);
                        if let Some(request) = malformed.request_id {
                            conn.reply(request, Err(UsbError::Protocol(malformed.reason))).await;
                        }
                    }
                    Some(Ok(Ok(Message::Request { id: request, body }))) => conn.handle(request, body).await,
                    Some(Ok(Ok(other))) => {
                        tracing::warn!(connection = id, "ignoring unexpected message {other:?}");
                    }
                },
                event = next_hotplug(&mut hotplug, id) => match event {
                    Some(event) => conn.hotplug(event).await,
                    None => {
                        // The events still queued are older than the
                        // catch-up: replayed after it, they would undo it.
                        hotplug = hotplug.resubscribe();
                        conn.catch_up().await;
                    }
                },
                _ = writer_closed.cancelled() => break "peer stopped reading".to_string(),
                _ = shutdown.cancelled() => {
                    let _ = conn.outgoing.try_send(Message::Event(Event::ShuttingDown {
                        reason: "helper is stopping".into(),
                    }).into());
                    // A peer that does not read is not waited for: its writer
                    // gives up after a moment, which also frees the device
                    // workers blocked on its full queue.
                    let writer_closed = writer_closed.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        writer_closed.cancel();
                    });
                    break "helper stopping".to_string();
                }
            }
        };
        conn.close_all().await;
        drop(conn);
        let _ = writer_task.await;
        reason
    }

    /// Queues a reply, waiting for room unless the helper is stopping.
    async fn reply(&self, id: RequestId, body: Result<Reply, UsbError>) {
        tokio::select! {
            _ = self.outgoing.send(Message::Reply { id, body }.into()) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    async fn handle(&mut self, id: RequestId, request: Request) {
        match request {
            Request::ListDevices => {
                let devices = self.helper.visible_devices();
                self.reply(id, Ok(Reply::Devices(devices))).await;
            }
            Request::Open { key } => {
                let result = self.open(key).await;
                self.reply(id, result).await;
            }
            Request::Close { handle } => {
                let result = match self.devices.remove(&handle) {
                    Some(device) => {
                        self.fail_waiting(&device).await;
                        self.release(&device).await;
                        Ok(Reply::Done)
                    }
                    None => Err(unknown_handle(handle)),
                };
                self.reply(id, result).await;
            }
            Request::Submit(transfer) => self.submit(id, transfer).await,
            Request::Cancel { request } => {
                if let Some(at) = self.waiting.iter().position(|w| w.id == request) {
                    if let Some(cancelled) = self.waiting.remove(at) {
                        self.waiting_bytes -= cancelled.work.out_bytes();
                    }
                    self.reply(request, Err(UsbError::Cancelled)).await;
                } else {
                    for device in self.devices.values() {
                        device.cancel(request);
                    }
                }
                self.reply(id, Ok(Reply::Done)).await;
            }
            Request::SetConfiguration { handle, .. }
            | Request::SetInterface { handle, .. }
            | Request::ClearHalt { handle, .. }
            | Request::Reset { handle } => {
                let Some(device) = self.devices.get(&handle).cloned() else {
                    return self.reply(id, Err(unknown_handle(handle))).await;
                };
                let work = Work::Operation {
                    request,
                    asked_as: AskedAs::Request,
                };
                self.enqueue(id, work, device, 0).await;
            }
        }
    }

    async fn open(&mut self, key: DeviceKey) -> Result<Reply, UsbError> {
        let visible = self
            .helper
            .backend
            .devices()
            .into_iter()
            .any(|d| d.key == key && self.helper.visible(&d));
        if !visible {
            // Outside the ceiling a device does not exist for the agent.
            return Err(UsbError::NotFound(key.to_string()));
        }
        {
            let mut opened = self.helper.opened.lock().expect("opened lock");
            if let Some(holder) = opened.get(&key) {
                return Err(UsbError::Busy(if *holder == self.id {
                    format!("{key} is already open on this connection")
                } else {
                    format!("{key} is open on another connection")
                }));
            }
            opened.insert(key.clone(), self.id);
        }
        match self.helper.backend.open(&key).await {
            Ok(device) => {
                let handle = self.next_handle;
                self.next_handle += 1;
                let info = device.info();
                self.devices.insert(handle, Arc::new(device));
                tracing::info!(device = %key, connection = self.id, handle, "device opened");
                Ok(Reply::Opened {
                    handle,
                    device: info,
                })
            }
            Err(e) => {
                self.helper.opened.lock().expect("opened lock").remove(&key);
                tracing::warn!(device = %key, "open failed: {e}");
                Err(e)
            }
        }
    }

    async fn submit(&mut self, id: RequestId, transfer: Transfer) {
        let Some(device) = self.devices.get(&transfer.handle).cloned() else {
            return self.reply(id, Err(unknown_handle(transfer.handle))).await;
        };
        // The USB core's own requests (SET_CONFIGURATION, …) become the real
        // operations, as in usbip-host (passing them through raw would
        // desynchronise the host's view of the device). Operations hold no
        // budget: a reset must get through while reads hold all of it.
        let (work, cost) = match special_request(&transfer) {
            Some(request) => {
                let asked_as = AskedAs::ControlTransfer;
                (Work::Operation { request, asked_as }, 0)
            }
            None => {
                let cost = budget_cost(&transfer.data);
                (Work::Transfer(transfer), cost)
            }
        };
        self.enqueue(id, work, device, cost).await;
    }

    /// Starts `work` if nothing waits or runs before it and the budget
    /// allows; otherwise it waits its turn.
    async fn enqueue(&mut self, id: RequestId, mut work: Work, device: Arc<Device>, cost: u32) {
        if self.waiting.is_empty()
            && !self.operating
            && let Ok(permit) = self.budget.clone().try_acquire_many_owned(cost)
        {
            return self.start(id, work, device, permit);
        }
        if self.waiting.len() >= WAITING_SUBMITS || self.waiting_bytes >= WAITING_BYTES {
            // Refused rather than read no further: the connection must stay
            // readable for the cancels that free the budget.
            return self
                .reply(
                    id,
                    Err(UsbError::Busy(format!(
                        "more than {WAITING_SUBMITS} requests or {} MiB wait for the in-flight budget",
                        WAITING_BYTES >> 20
                    ))),
                )
                .await;
        }
        if let Work::Transfer(Transfer {
            data: TransferData::Out(bytes),
            ..
        }) = &mut work
        {
            // A waiting payload is copied out of the read buffer, which it
            // would otherwise keep alive for as long as it waits.
            *bytes = Bytes::copy_from_slice(bytes);
        }
        self.waiting_bytes += work.out_bytes();
        self.waiting.push_back(Waiting {
            id,
            work,
            device,
            cost,
        });
    }

    /// Starts work that has its budget: a transfer goes to the device; an
    /// operation runs while what comes after it waits.
    fn start(
        &mut self,
        id: RequestId,
        work: Work,
        device: Arc<Device>,
        permit: OwnedSemaphorePermit,
    ) {
        let (request, asked_as) = match work {
            Work::Transfer(transfer) => {
                let reply = ReplySink::new(id, self.outgoing.clone(), Some(permit))
                    .with_partial_replies(self.partial_replies);
                return device.submit(transfer, reply);
            }
            Work::Operation { request, asked_as } => (request, asked_as),
        };
        self.operating = true;
        let outgoing = self.outgoing.clone();
        let operation_done = self.operation_done.clone();
        tokio::spawn(async move {
            let body = device_operation(&device, &request)
                .await
                .map(|()| asked_as.done());
            drop(permit);
            let _ = outgoing.send(Message::Reply { id, body }.into()).await;
            let _ = operation_done.send(());
        });
    }

    /// Starts the first waiting transfer with the budget it waited for, and
    /// those after it that fit now, up to an operation.
    fn submit_waiting(&mut self, permit: OwnedSemaphorePermit) {
        let mut permit = Some(permit);
        while !self.operating
            && let Some(next) = self.waiting.front()
        {
            let permit = match permit.take() {
                Some(permit) => permit,
                None => match self.budget.clone().try_acquire_many_owned(next.cost) {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let Some(waiting) = self.waiting.pop_front() else {
                break;
            };
            self.waiting_bytes -= waiting.work.out_bytes();
            self.start(waiting.id, waiting.work, waiting.device, permit);
        }
    }

    /// Fails the waiting submits of a device that is being released.
    async fn fail_waiting(&mut self, device: &Arc<Device>) {
        let (gone, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
            std::mem::take(&mut self.waiting)
                .into_iter()
                .partition(|w| Arc::ptr_eq(&w.device, device));
        self.waiting = kept;
        for waiting in gone {
            self.waiting_bytes -= waiting.work.out_bytes();
            self.reply(waiting.id, Err(UsbError::NoDevice)).await;
        }
    }

    async fn hotplug(&mut self, event: BackendEvent) {
        match event {
            BackendEvent::Arrived(device) => self.arrived(device).await,
            BackendEvent::Left(device) => self.left(&device.key, PlugIn::of(&device)).await,
        }
    }

    /// Announces a device, unless the ceiling hides it or this plug-in is
    /// announced already (a catch-up ran ahead of the event). Any other
    /// plug-in under the same key is gone, seen leaving or not: what the
    /// peer held of it is released, and it leaves before this one arrives.
    async fn arrived(&mut self, device: DeviceInfo) {
        if !self.helper.visible(&device) {
            return;
        }
        let plug_in = PlugIn::of(&device);
        let earlier: Vec<PlugIn> = self
            .held_plug_ins()
            .into_iter()
            .chain(
                self.announced
                    .get(&device.key)
                    .map(|p| (device.key.clone(), *p)),
            )
            .filter(|(key, held)| *key == device.key && *held != plug_in)
            .map(|(_, held)| held)
            .collect();
        for gone in earlier {
            self.left(&device.key, gone).await;
        }
        if self.announced.get(&device.key) == Some(&plug_in) {
            return;
        }
        self.announced.insert(device.key.clone(), plug_in);
        self.send_event(Event::DeviceArrived(device)).await;
    }

    /// Releases what the peer held of this plug-in and tells the peer the
    /// device left, if it was announced or held. A handle is matched by its
    /// plug-in, so late news of an earlier plug-in spares a handle on the
    /// current one.
    async fn left(&mut self, key: &DeviceKey, plug_in: PlugIn) {
        let stale: Vec<Handle> = self
            .devices
            .iter()
            .filter(|(_, d)| is_plug_in(&d.info(), key, plug_in))
            .map(|(h, _)| *h)
            .collect();
        let held = !stale.is_empty();
        for handle in stale {
            if let Some(device) = self.devices.remove(&handle) {
                self.fail_waiting(&device).await;
                self.release(&device).await;
            }
        }
        // Whatever plug-in of the key was announced is the one held, if
        // any: `arrived` lets go of held plug-ins before it announces
        // another. Once told, the peer counts the key as gone, so a later
        // arrival of the current plug-in is announced again.
        if held || self.announced.get(key) == Some(&plug_in) {
            self.announced.remove(key);
            self.send_event(Event::DeviceLeft { key: key.clone() })
                .await;
        }
    }

    /// The plug-ins of the devices the peer holds open.
    fn held_plug_ins(&self) -> Vec<(DeviceKey, PlugIn)> {
        self.devices
            .values()
            .map(|d| {
                let info = d.info();
                (info.key.clone(), PlugIn::of(&info))
            })
            .collect()
    }

    /// Queues an event, waiting for room as replies do: dropped, it would
    /// leave the peer's device table wrong until the peer lists the
    /// devices again.
    async fn send_event(&self, event: Event) {
        tokio::select! {
            _ = self.outgoing.send(Message::Event(event).into()) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    /// After missed hotplug events: plug-ins announced or held but gone
    /// leave (and are released), plug-ins there but not announced arrive. A
    /// device replugged meanwhile is both.
    async fn catch_up(&mut self) {
        let present = self.helper.visible_devices();
        let gone: Vec<(DeviceKey, PlugIn)> = self
            .announced
            .iter()
            .map(|(key, plug_in)| (key.clone(), *plug_in))
            .chain(self.held_plug_ins())
            .filter(|(key, plug_in)| !present.iter().any(|d| is_plug_in(d, key, *plug_in)))
            .collect();
        for (key, plug_in) in gone {
            self.left(&key, plug_in).await;
        }
        for device in present {
            self.arrived(device).await;
        }
    }

    async fn release(&self, device: &Device) {
        let key = device.info().key;
        device.close().await;
        self.helper.opened.lock().expect("opened lock").remove(&key);
        tracing::info!(device = %key, connection = self.id, "device released");
    }

    async fn close_all(&mut self) {
        for (_, device) in std::mem::take(&mut self.devices) {
            self.release(&device).await;
        }
    }
}

/// The next hotplug event, or `None` when this connection fell behind and
/// missed some: it then compares what it announced with the devices there
/// are now, instead of the backend waiting for it.
async fn next_hotplug(
    events: &mut broadcast::Receiver<BackendEvent>,
    connection: u64,
) -> Option<BackendEvent> {
    match events.recv().await {
        Ok(event) => Some(event),
        Err(broadcast::error::RecvError::Lagged(n)) => {
            tracing::warn!(connection, "missed {n} hotplug events; catching up");
            None
        }
        Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
    }
}

/// The share of [`IN_FLIGHT_BUDGET`] a transfer holds until its reply is
/// written: the bytes it carries or asks for, and for an OUT payload sliced
/// out of a read buffer at least a quarter of that buffer, which the slice
/// keeps alive (so pending transfers cannot hold more than 4 × the budget).
fn budget_cost(data: &TransferData) -> u32 {
    let pinned = match data {
        TransferData::Out(bytes) if bytes.len() >= SLICE_FROM => READ_BUFFER_CAPACITY / 4,
        _ => 1,
    };
    data.len().max(pinned as u32).min(MAX_TRANSFER_LEN)
}

fn unknown_handle(handle: Handle) -> UsbError {
    UsbError::Invalid(format!("no open device with handle {handle}"))
}

/// The standard requests usbip-host performs itself instead of forwarding,
/// turned into the matching vocabulary request.
pub fn special_request(transfer: &Transfer) -> Option<Request> {
    let setup = transfer.setup?;
    let handle = transfer.handle;
    match (setup.request_type, setup.request) {
        (0x00, std_request::SET_CONFIGURATION) => Some(Request::SetConfiguration {
            handle,
            value: setup.value as u8,
        }),
        (0x01, std_request::SET_INTERFACE) => Some(Request::SetInterface {
            handle,
            interface: setup.index as u8,
            alt_setting: setup.value as u8,
        }),
        (0x02, std_request::CLEAR_FEATURE) if setup.value == std_request::ENDPOINT_HALT => {
            Some(Request::ClearHalt {
                handle,
                endpoint: setup.index as u8,
            })
        }
        (0x23, std_request::SET_FEATURE) if setup.value == std_request::PORT_RESET => {
            Some(Request::Reset { handle })
        }
        _ => None,
    }
}

async fn device_operation(device: &Device, request: &Request) -> Result<(), UsbError> {
    match *request {
        Request::SetConfiguration { value, .. } => device.set_configuration(value).await,
        Request::SetInterface {
            interface,
            alt_setting,
            ..
        } => device.set_interface(interface, alt_setting).await,
        Request::ClearHalt { endpoint, .. } => device.clear_halt(endpoint).await,
        Request::Reset { .. } => device.reset().await,
        _ => Err(UsbError::Invalid(format!(
            "{} is not a device operation",
            request.kind()
        ))),
    }
}
