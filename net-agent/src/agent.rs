//! `p2p-usb-agent serve`: the server-side network agent. It holds no device
//! access of its own: every client session gets its own link to the USB
//! helper, and the agent only decides who may talk (EndpointId approval) and
//! which devices they see (shares), forwarding transfers untouched.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::{Endpoint, EndpointId, Watcher};
use p2p_usb_common::access::AccessList;
use p2p_usb_common::codec::MessageCodec;
use p2p_usb_common::config::{ConfigError, ConfigFile, ServerConfig};
use p2p_usb_common::exit;
use p2p_usb_common::link::{self, handshake};
use p2p_usb_common::proto::{
    DeviceKey, Event, Handle, Message, Reply, Request, RequestId, UsbError,
};
use p2p_usb_common::service::{self, ListenError, Watchdog};
use tokio::io::AsyncRead;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::control::{
    self, ClientSummary, ControlHandler, ControlReply, ControlRequest, SharedDevice,
};
use crate::helper_link::{self, HelperState, SOFTWARE};
use crate::identity::{self, IdentityError};
use crate::net::{self, NetError, close};
use crate::policy::{Policy, PolicyError, PolicyLoadError};

/// How long start-up waits for the helper before reporting READY anyway,
/// with a STATUS saying what it is waiting for.
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long sessions get to wind down on stop.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Request ids the agent itself uses on a session's helper link; clients
/// count up from 1 and never reach them.
const INTERNAL_IDS: RequestId = 1 << 63;

/// Paths the agent uses, from the config unless overridden on the command line
/// (the template units pass per-instance paths).
#[derive(Debug, Clone)]
pub struct AgentPaths {
    pub helper_socket: PathBuf,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
}

impl AgentPaths {
    /// Config values with command-line overrides applied.
    pub fn resolve(
        config: &ServerConfig,
        helper_socket: Option<PathBuf>,
        state_dir: Option<PathBuf>,
        control_socket: Option<PathBuf>,
    ) -> Self {
        AgentPaths {
            helper_socket: helper_socket.unwrap_or_else(|| config.helper.socket.clone()),
            state_dir: state_dir.unwrap_or_else(|| config.agent.state_dir.clone()),
            control_socket: control_socket.unwrap_or_else(|| config.agent.control_socket.clone()),
        }
    }

    /// Where the server's identity key lives.
    pub fn secret_key(&self) -> PathBuf {
        self.state_dir.join("secret.key")
    }
}

/// Everything that stops the agent from serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Listen(#[from] ListenError),
}

impl AgentError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            AgentError::Config(_) => exit::CONFIG,
            AgentError::Policy(_) | AgentError::Identity(_) | AgentError::Listen(_) => exit::OS,
            AgentError::Net(_) => exit::UNAVAILABLE,
        }
    }
}

impl From<PolicyLoadError> for AgentError {
    fn from(e: PolicyLoadError) -> Self {
        match e {
            PolicyLoadError::Config(e) => AgentError::Config(e),
            PolicyLoadError::State(e) => AgentError::Policy(e),
        }
    }
}

#[derive(Debug, Default)]
struct ClientRecord {
    address: String,
    sessions: usize,
    devices: BTreeSet<String>,
}

/// The running agent, shared by its tasks.
struct Agent {
    paths: AgentPaths,
    policy: Policy,
    endpoint: Endpoint,
    helper: watch::Receiver<HelperState>,
    clients: Mutex<HashMap<EndpointId, ClientRecord>>,
    shutdown: CancellationToken,
}

impl Agent {
    fn status_line(&self) -> String {
        let helper = self.helper.borrow().clone();
        let shared = helper
            .devices()
            .iter()
            .filter(|d| self.policy.is_shared(&d.key))
            .count();
        let clients = self.clients.lock().expect("clients lock").len();
        let mut line = format!(
            "NodeId {}: {shared} device{} shared, {clients} client{}",
            self.endpoint.id(),
            plural(shared),
            plural(clients)
        );
        if let HelperState::Waiting { reason } = helper {
            line.push_str(&format!(
                "; waiting for helper at {}: {reason}",
                self.paths.helper_socket.display()
            ));
        }
        line
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl ControlHandler for Agent {
    fn handle(&self, request: ControlRequest) -> ControlReply {
        match request {
            ControlRequest::Status => ControlReply::Status {
                id: self.endpoint.id().to_string(),
                ticket: net::ticket(&self.endpoint),
                summary: self.status_line(),
            },
            ControlRequest::Devices => ControlReply::Devices(
                self.helper
                    .borrow()
                    .devices()
                    .iter()
                    .map(|d| SharedDevice {
                        device: d.clone(),
                        shared: self.policy.is_shared(&d.key),
                    })
                    .collect(),
            ),
            ControlRequest::Pending => ControlReply::Pending(self.policy.pending()),
            ControlRequest::Clients => ControlReply::Clients(
                self.clients
                    .lock()
                    .expect("clients lock")
                    .iter()
                    .map(|(id, c)| ClientSummary {
                        id: id.to_string(),
                        address: c.address.clone(),
                        sessions: c.sessions,
                        devices: c.devices.iter().cloned().collect(),
                    })
                    .collect(),
            ),
            ControlRequest::Approve(id) => match net::parse_endpoint_id(&id) {
                Err(e) => ControlReply::Failed(e.to_string()),
                Ok(id) => match self.policy.approve(&id) {
                    Ok(()) => {
                        tracing::info!(client = %id, "client approved");
                        ControlReply::Done(format!("approved {id}"))
                    }
                    Err(e) => ControlReply::Failed(e.to_string()),
                },
            },
            ControlRequest::Revoke(id) => match net::parse_endpoint_id(&id) {
                Err(e) => ControlReply::Failed(e.to_string()),
                Ok(id) => match self.policy.revoke(&id) {
                    Ok(()) => {
                        tracing::info!(client = %id, "client revoked");
                        ControlReply::Done(format!("revoked {id}; its connections are closed"))
                    }
                    Err(e) => ControlReply::Failed(e.to_string()),
                },
            },
            ControlRequest::Share(key) | ControlRequest::Unshare(key)
                if key.parse::<DeviceKey>().is_err() =>
            {
                ControlReply::Failed(key.parse::<DeviceKey>().unwrap_err().to_string())
            }
            ControlRequest::Share(key) => {
                let key: DeviceKey = key.parse().expect("checked above");
                match self.policy.share(&key) {
                    Ok(()) => {
                        tracing::info!(device = %key, "device shared");
                        let present = self.helper.borrow().devices().iter().any(|d| d.key == key);
                        ControlReply::Done(if present {
                            format!("shared {key}")
                        } else {
                            format!("shared {key} (not plugged in now; offered when it appears)")
                        })
                    }
                    Err(e) => ControlReply::Failed(e.to_string()),
                }
            }
            ControlRequest::Unshare(key) => {
                let key: DeviceKey = key.parse().expect("checked above");
                match self.policy.unshare(&key) {
                    Ok(()) => {
                        tracing::info!(device = %key, "device unshared");
                        ControlReply::Done(format!("unshared {key}"))
                    }
                    Err(e) => ControlReply::Failed(e.to_string()),
                }
            }
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn serve(
    config: &ConfigFile<ServerConfig>,
    paths: &AgentPaths,
) -> Result<(), AgentError> {
    let policy = Policy::load(config, &paths.state_dir)?;
    let relays = net::relay_urls(config, &config.value.iroh)?;
    let admins = admin_access(config)?;
    let key = identity::load_or_create(&paths.secret_key())?;
    let endpoint = net::bind_endpoint(&config.value.iroh, &relays, key, true).await?;
    tracing::info!("Server NodeId: {}", endpoint.id());
    let control_listener = control::bind(&paths.control_socket)?;
    tracing::info!(socket = %paths.control_socket.display(), "control socket ready");

    let agent = Arc::new(Agent {
        paths: paths.clone(),
        policy,
        endpoint: endpoint.clone(),
        helper: helper_link::supervise(paths.helper_socket.clone()),
        clients: Mutex::default(),
        shutdown: CancellationToken::new(),
    });
    tokio::spawn(control::serve(control_listener, admins, agent.clone()));
    tokio::spawn(log_ticket(endpoint.clone()));
    let accepting = tokio::spawn(accept_loop(agent.clone()));

    let (watchdog, mut liveness) = Watchdog::from_env();
    if let Some(watchdog) = watchdog {
        tracing::info!(
            "watchdog enabled: pinging every {:?} while healthy",
            watchdog.interval()
        );
        tokio::spawn(watchdog.run());
    }
    let stop = service::stop_signal();
    tokio::pin!(stop);
    let ready_wait = tokio::time::sleep(READY_WAIT);
    tokio::pin!(ready_wait);
    let mut helper = agent.helper.clone();
    let mut policy_changes = agent.policy.subscribe();
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    let mut ready = false;
    let mut last_status = String::new();
    let signal = loop {
        tokio::select! {
            signal = &mut stop => break signal,
            _ = helper.changed() => {
                let connected = matches!(*helper.borrow_and_update(), HelperState::Connected { .. });
                if connected && !ready {
                    ready = true;
                    last_status = agent.status_line();
                    service::notify_ready(&last_status);
                    tracing::info!("ready: {last_status}");
                }
            }
            _ = &mut ready_wait, if !ready => {
                ready = true;
                last_status = agent.status_line();
                service::notify_ready(&last_status);
                tracing::warn!("ready without the helper: {last_status}");
            }
            _ = policy_changes.changed() => {}
            _ = status_tick.tick() => {}
            Some(check) = liveness.recv() => {
                // The accept loop must still be alive for the agent to be.
                if !accepting.is_finished() {
                    check.alive();
                }
            }
        }
        if ready {
            let status = agent.status_line();
            if status != last_status {
                service::notify_status(&status);
                last_status = status;
            }
        }
    };
    tracing::info!("{signal}: stopping; closing client connections");
    service::notify_stopping("stopping: closing client connections");
    agent.shutdown.cancel();
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while !agent.clients.lock().expect("clients lock").is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    accepting.abort();
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.close()).await;
    let _ = std::fs::remove_file(&paths.control_socket);
    tracing::info!("stopped");
    Ok(())
}

/// Root, the agent's own user, and the configured admin group.
fn admin_access(config: &ConfigFile<ServerConfig>) -> Result<AccessList, ConfigError> {
    let mut access = AccessList::new([0, nix::unistd::geteuid().as_raw()], []);
    let group = &config.value.agent.admin_group;
    match nix::unistd::Group::from_name(group) {
        Ok(Some(group)) => access.allow_gid(group.gid.as_raw()),
        _ => tracing::info!(
            "admin group {group:?} does not exist; only root and the agent's user may use the control socket"
        ),
    }
    Ok(access)
}

/// Logs the ticket once the endpoint knows an address to put in it.
async fn log_ticket(endpoint: Endpoint) {
    let mut addresses = endpoint.watch_addr();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let addr = addresses.get();
            if addr.ip_addrs().next().is_some() || addr.relay_urls().next().is_some() {
                return;
            }
            if addresses.updated().await.is_err() {
                return;
            }
        }
    })
    .await;
    tracing::info!("Ticket: {}", net::ticket(&endpoint));
}

async fn accept_loop(agent: Arc<Agent>) {
    while let Some(incoming) = agent.endpoint.accept().await {
        let address = format!("{:?}", incoming.remote_addr());
        let accepting = match incoming.accept() {
            Ok(accepting) => accepting,
            Err(e) => {
                tracing::debug!("refused incoming connection from {address}: {e}");
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(30), accepting).await {
                Ok(Ok(connection)) => serve_connection(agent, connection, address).await,
                Ok(Err(e)) => tracing::debug!("handshake with {address} failed: {e}"),
                Err(_) => tracing::debug!("handshake with {address} timed out"),
            }
        });
    }
}

async fn serve_connection(agent: Arc<Agent>, connection: Connection, address: String) {
    let client = connection.remote_id();
    if !agent.policy.is_approved(&client) {
        if let Err(e) = agent.policy.record_refused(&client, &address) {
            tracing::error!("cannot record pending client: {e}");
        }
        tracing::warn!(
            client = %client,
            "refused unapproved client from {address}; to allow it run: p2p-usb-agent approve {client}"
        );
        connection.close(
            close::NOT_APPROVED.into(),
            b"this client is not approved by the server",
        );
        return;
    }
    tracing::info!(client = %client, "client connected from {address}");
    agent
        .clients
        .lock()
        .expect("clients lock")
        .entry(client)
        .or_default()
        .address = address;
    let mut policy = agent.policy.subscribe();
    let stop = agent.shutdown.child_token();
    let mut sessions = tokio::task::JoinSet::new();
    let (code, reason): (u32, &[u8]) = loop {
        tokio::select! {
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    sessions.spawn(run_session(agent.clone(), client, send, recv, stop.child_token()));
                }
                Err(e) => {
                    tracing::info!(client = %client, "client disconnected: {e}");
                    break (close::DONE, b"");
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = policy.changed() => {
                if !agent.policy.is_approved(&client) {
                    tracing::warn!(client = %client, "client revoked; closing its connection");
                    break (close::NOT_APPROVED, b"this client's approval was revoked");
                }
            }
            _ = stop.cancelled() => break (close::SHUTDOWN, b"server is shutting down"),
        }
    };
    stop.cancel();
    // Let sessions tell their client and release their devices first.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    connection.close(code.into(), reason);
    agent.clients.lock().expect("clients lock").remove(&client);
}

/// What a session remembers to authorize and filter without touching transfers.
#[derive(Default)]
struct SessionState {
    /// `ListDevices` requests whose replies must be filtered by shares.
    lists: HashSet<RequestId>,
    /// `Open` requests in flight and the device each names.
    opens: HashMap<RequestId, DeviceKey>,
    /// Open devices of this session.
    opened: HashMap<Handle, DeviceKey>,
    /// Requests the agent sent itself; their replies are not forwarded.
    internal: HashSet<RequestId>,
    next_internal: RequestId,
}

/// One client session: a bidirectional stream proxied to its own helper link.
/// When the session ends, dropping the helper link makes the helper release
/// every device the session held.
async fn run_session(
    agent: Arc<Agent>,
    client: EndpointId,
    send: SendStream,
    recv: RecvStream,
    stop: CancellationToken,
) {
    let mut from_client = FramedRead::new(recv, MessageCodec::<Message>::default());
    let mut client_writer = FramedWrite::new(send, MessageCodec::<Message>::default());
    if let Err(e) = handshake(&mut from_client, &mut client_writer, SOFTWARE).await {
        tracing::debug!(client = %client, "session handshake failed: {e}");
        return;
    }
    let client_closed = CancellationToken::new();
    let (to_client, client_queue) = mpsc::channel(1024);
    tokio::spawn(link::write_loop(
        client_writer,
        client_queue,
        client_closed.clone(),
    ));

    let (from_helper, to_helper, helper_closed) = match open_helper_link(&agent).await {
        Ok(link) => link,
        Err(reason) => {
            tracing::warn!(client = %client, "session refused: {reason}");
            let _ = to_client
                .send(Message::Event(Event::ShuttingDown { reason }))
                .await;
            // Give the writer a moment to flush the notice.
            tokio::time::sleep(Duration::from_millis(200)).await;
            client_closed.cancel();
            return;
        }
    };
    agent
        .clients
        .lock()
        .expect("clients lock")
        .entry(client)
        .or_default()
        .sessions += 1;
    tracing::debug!(client = %client, "session started");

    let state = Arc::new(Mutex::new(SessionState {
        next_internal: INTERNAL_IDS,
        ..SessionState::default()
    }));
    let mut upstream = tokio::spawn(client_to_helper(
        agent.clone(),
        from_client,
        to_helper.clone(),
        to_client.clone(),
        state.clone(),
    ));
    let mut downstream = tokio::spawn(helper_to_client(
        agent.clone(),
        client,
        from_helper,
        to_client.clone(),
        state.clone(),
    ));
    let mut policy = agent.policy.subscribe();
    loop {
        tokio::select! {
            _ = &mut upstream => break,
            _ = &mut downstream => break,
            _ = client_closed.cancelled() => break,
            _ = helper_closed.cancelled() => break,
            _ = policy.changed() => withdraw_unshared(&agent, &state, &to_helper, &to_client).await,
            _ = stop.cancelled() => {
                let _ = to_client.send(Message::Event(Event::ShuttingDown {
                    reason: "server is shutting down".into(),
                })).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
        }
    }
    upstream.abort();
    downstream.abort();
    helper_closed.cancel();
    client_closed.cancel();
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

type HelperLink = (
    FramedRead<tokio::net::unix::OwnedReadHalf, MessageCodec<Message>>,
    mpsc::Sender<Message>,
    CancellationToken,
);

async fn open_helper_link(agent: &Agent) -> Result<HelperLink, String> {
    let path = &agent.paths.helper_socket;
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| format!("USB helper unavailable at {}: {e}", path.display()))?;
    let (reader, writer) = stream.into_split();
    let mut reader = FramedRead::new(reader, MessageCodec::<Message>::default());
    let mut writer = FramedWrite::new(writer, MessageCodec::<Message>::default());
    handshake(&mut reader, &mut writer, SOFTWARE)
        .await
        .map_err(|e| format!("USB helper refused the link: {e}"))?;
    let closed = CancellationToken::new();
    let (to_helper, queue) = mpsc::channel(1024);
    tokio::spawn(link::write_loop(writer, queue, closed.clone()));
    Ok((reader, to_helper, closed))
}

async fn client_to_helper<R: AsyncRead + Unpin>(
    agent: Arc<Agent>,
    mut from_client: FramedRead<R, MessageCodec<Message>>,
    to_helper: mpsc::Sender<Message>,
    to_client: mpsc::Sender<Message>,
    state: Arc<Mutex<SessionState>>,
) {
    while let Some(frame) = from_client.next().await {
        let message = match frame {
            Ok(Ok(message)) => message,
            Ok(Err(malformed)) => {
                if let Some(id) = malformed.request_id {
                    let body = Err(UsbError::Protocol(malformed.reason));
                    let _ = to_client.send(Message::Reply { id, body }).await;
                }
                continue;
            }
            Err(e) => {
                tracing::warn!("client link failed: {e}");
                return;
            }
        };
        let Message::Request { id, body } = message else {
            continue;
        };
        if id >= INTERNAL_IDS {
            let body = Err(UsbError::Protocol("request ids must be below 2^63".into()));
            let _ = to_client.send(Message::Reply { id, body }).await;
            continue;
        }
        match &body {
            Request::ListDevices => {
                state.lock().expect("session lock").lists.insert(id);
            }
            Request::Open { key } if !agent.policy.is_shared(key) => {
                let body = Err(UsbError::NotShared(key.to_string()));
                let _ = to_client.send(Message::Reply { id, body }).await;
                continue;
            }
            Request::Open { key } => {
                state
                    .lock()
                    .expect("session lock")
                    .opens
                    .insert(id, key.clone());
            }
            Request::Close { handle } => {
                state.lock().expect("session lock").opened.remove(handle);
            }
            _ => {}
        }
        if to_helper.send(Message::Request { id, body }).await.is_err() {
            return;
        }
    }
}

async fn helper_to_client<R: AsyncRead + Unpin>(
    agent: Arc<Agent>,
    client: EndpointId,
    mut from_helper: FramedRead<R, MessageCodec<Message>>,
    to_client: mpsc::Sender<Message>,
    state: Arc<Mutex<SessionState>>,
) {
    while let Some(Ok(Ok(message))) = from_helper.next().await {
        let forward = match message {
            Message::Reply { id, body } => {
                let mut state = state.lock().expect("session lock");
                if state.internal.remove(&id) {
                    continue;
                }
                let body = if state.lists.remove(&id) {
                    body.map(|reply| match reply {
                        Reply::Devices(devices) => Reply::Devices(
                            devices
                                .into_iter()
                                .filter(|d| agent.policy.is_shared(&d.key))
                                .collect(),
                        ),
                        other => other,
                    })
                } else {
                    body
                };
                if let (Some(key), Ok(Reply::Opened { handle, .. })) =
                    (state.opens.remove(&id), &body)
                {
                    tracing::info!(client = %client, device = %key, "device opened by client");
                    if let Some(record) =
                        agent.clients.lock().expect("clients lock").get_mut(&client)
                    {
                        record.devices.insert(key.to_string());
                    }
                    state.opened.insert(*handle, key);
                }
                Message::Reply { id, body }
            }
            Message::Event(Event::DeviceArrived(device)) => {
                if !agent.policy.is_shared(&device.key) {
                    continue;
                }
                Message::Event(Event::DeviceArrived(device))
            }
            Message::Event(Event::DeviceLeft { key }) => {
                state
                    .lock()
                    .expect("session lock")
                    .opened
                    .retain(|_, k| *k != key);
                Message::Event(Event::DeviceLeft { key })
            }
            Message::Event(Event::ShuttingDown { reason }) => {
                let _ = to_client
                    .send(Message::Event(Event::ShuttingDown {
                        reason: format!("USB helper: {reason}"),
                    }))
                    .await;
                return;
            }
            Message::Hello(_) | Message::Request { .. } => continue,
        };
        if to_client.send(forward).await.is_err() {
            return;
        }
    }
}

/// After a share change: closes this session's devices that are no longer
/// shared, and tells the client they are gone.
async fn withdraw_unshared(
    agent: &Agent,
    state: &Mutex<SessionState>,
    to_helper: &mpsc::Sender<Message>,
    to_client: &mpsc::Sender<Message>,
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
                let id = state.next_internal;
                state.next_internal += 1;
                state.internal.insert(id);
                (id, handle, key)
            })
            .collect()
    };
    for (id, handle, key) in withdrawn {
        tracing::info!(device = %key, "device unshared: withdrawing it from a client");
        let _ = to_helper
            .send(Message::Request {
                id,
                body: Request::Close { handle },
            })
            .await;
        let _ = to_client
            .send(Message::Event(Event::DeviceLeft { key }))
            .await;
    }
}
