//! `p2p-usb-agent serve`: the server-side network agent. It holds no device
//! access of its own: every client session gets its own link to the USB
//! helper, and the agent only decides who may talk (EndpointId approval) and
//! which devices they see (shares), forwarding transfers untouched.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointId, Watcher};
use p2p_usb_common::access::AccessList;
use p2p_usb_common::config::{ConfigError, ConfigFile, ServerConfig};
use p2p_usb_common::exit;
use p2p_usb_common::proto::{DeviceInfo, DeviceKey};
use p2p_usb_common::service::{self, ListenError, Watchdog};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control::{
    self, ClientSummary, ControlHandler, ControlReply, ControlRequest, SharedDevice,
};
use crate::helper_link::{self, HelperState};
use crate::identity::{self, IdentityError};
use crate::net::{self, NetError, close};
pub use crate::paths::AgentPaths;
use crate::paths::Scope;
use crate::policy::{Policy, PolicyError, PolicyLoadError};
use crate::print_line;
use crate::session;

/// How long start-up waits for the helper before reporting READY anyway,
/// with a STATUS saying what it is waiting for.
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How long sessions get to wind down on stop.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping agent leaves a client's connection open after its
/// sessions told the client: the client has the notice once its transport
/// acknowledged it, but reads it only when its task next runs, and closing
/// the connection first would discard it unread.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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

/// What the agent tracks of a connected client, for `clients`.
#[derive(Debug, Default)]
pub(crate) struct ClientRecord {
    pub(crate) address: String,
    /// Connections from this client (a client may hold more than one).
    pub(crate) connections: usize,
    pub(crate) sessions: usize,
    pub(crate) devices: BTreeSet<String>,
}

/// The running agent, shared by its tasks.
pub(crate) struct Agent {
    pub(crate) paths: AgentPaths,
    pub(crate) policy: Policy,
    endpoint: Endpoint,
    helper: watch::Receiver<HelperState>,
    pub(crate) clients: Mutex<HashMap<EndpointId, ClientRecord>>,
    shutdown: CancellationToken,
}

impl Agent {
    /// Changes the record of `client`, creating it on first use: the
    /// connection and each of its sessions add to the same record.
    pub(crate) fn update_client(&self, client: EndpointId, update: impl FnOnce(&mut ClientRecord)) {
        update(
            self.clients
                .lock()
                .expect("clients lock")
                .entry(client)
                .or_default(),
        );
    }

    /// The helper's devices that are shared now; `None` while the agent's
    /// own link to the helper is down and it does not know.
    pub(crate) fn shared_devices(&self) -> Option<Vec<DeviceInfo>> {
        let helper = self.helper.borrow();
        match &*helper {
            HelperState::Connected { devices, .. } => Some(
                devices
                    .iter()
                    .filter(|d| self.policy.is_shared(&d.key))
                    .cloned()
                    .collect(),
            ),
            HelperState::Waiting { .. } => None,
        }
    }

    fn status_line(&self) -> String {
        let shared = self.shared_devices().map_or(0, |devices| devices.len());
        let helper = self.helper.borrow().clone();
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
    scope: &Scope,
) -> Result<(), AgentError> {
    let policy = Policy::load(config, &paths.state_dir)?;
    let relays = net::relay_urls(config, &config.value.iroh)?;
    let admins = admin_access(config, scope)?;
    let key = identity::load_or_create(&paths.secret_key())?;
    let endpoint = net::bind_endpoint(&config.value.iroh, &relays, key, true).await?;
    // Printed, not logged: the line the operator looks for, whatever the log
    // level. A closed stdout is no reason to stop serving.
    print_line(&format!("Server NodeId: {}", endpoint.id()));
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

/// Root, the agent's own user, and the configured admin group; for a user's
/// own agent, that user and root alone.
fn admin_access(
    config: &ConfigFile<ServerConfig>,
    scope: &Scope,
) -> Result<AccessList, ConfigError> {
    let mut access = AccessList::new([0, nix::unistd::geteuid().as_raw()], []);
    if scope.is_personal() {
        return Ok(access);
    }
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
    print_line(&format!("Ticket: {}", net::ticket(&endpoint)));
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
    // Subscribed before the check, so a revocation right after it is seen.
    let mut policy = agent.policy.subscribe();
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
    agent.update_client(client, |record| {
        record.address = address;
        record.connections += 1;
    });
    let stop = agent.shutdown.child_token();
    let mut sessions = tokio::task::JoinSet::new();
    let (code, reason): (u32, &[u8]) = loop {
        tokio::select! {
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    sessions.spawn(session::run(agent.clone(), client, send, recv, stop.child_token()));
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
    if code == close::SHUTDOWN {
        let _ = tokio::time::timeout(CLOSE_GRACE, connection.closed()).await;
    }
    connection.close(code.into(), reason);
    let mut clients = agent.clients.lock().expect("clients lock");
    if let Some(record) = clients.get_mut(&client) {
        record.connections = record.connections.saturating_sub(1);
        if record.connections == 0 {
            clients.remove(&client);
        }
    }
}
