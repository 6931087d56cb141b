//! A whole server (helper + agent, real binaries) and in-process clients,
//! for the network tests and benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use iroh::EndpointAddr;
use p2p_usb_agent::client::Client;
use p2p_usb_agent::control::{self, ControlReply, ControlRequest};
use p2p_usb_agent::net;
use p2p_usb_common::config::ConfigFile;

use crate::{NotifySocket, Process, bin, is_root, unique, wait_for_path};

/// How the server's iroh endpoint is reached in a test.
#[derive(Debug, Clone)]
pub enum Network {
    /// Loopback, relays off, a free fixed port (so restarts keep the address).
    Loopback,
    /// Only through this relay URL; no direct paths at all.
    RelayOnly(String),
    /// Bound to this address (e.g. inside a network namespace).
    Bind(String),
    /// Bound to this address inside a network namespace and announced on
    /// the local network (mDNS); clients need nothing but its EndpointId.
    LocalDiscovery(String),
}

impl Network {
    fn iroh_section(&self) -> String {
        match self {
            Network::Loopback => format!(
                "[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"127.0.0.1:{}\"\ndns_discovery = false\n",
                free_udp_port()
            ),
            Network::Bind(addr) => format!(
                "[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"{addr}\"\ndns_discovery = false\n"
            ),
            Network::LocalDiscovery(addr) => format!(
                "[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"{addr}\"\ndns_discovery = false\nlocal_discovery = true\n"
            ),
            Network::RelayOnly(url) => format!(
                "[iroh]\nrelay_mode = \"custom\"\nrelay_urls = [\"{url}\"]\ndirect_connections = false\ndns_discovery = false\n"
            ),
        }
    }
}

/// A free UDP port on loopback (released before use; good enough for tests).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Helper and agent running with the sim backend.
pub struct ServerUnderTest {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub helper: Process,
    pub agent: Option<Process>,
    pub agent_notify: NotifySocket,
    pub control: PathBuf,
    /// Prefix (`ip netns exec NAME`) for processes, when set.
    pub netns: Option<String>,
}

impl ServerUnderTest {
    /// Starts helper and agent. `security` and `usb` are TOML bodies of those
    /// sections; `network` decides how iroh is reached.
    pub fn start(security: &str, usb: &str, network: Network) -> ServerUnderTest {
        Self::start_in(security, usb, network, None)
    }

    /// Like [`ServerUnderTest::start`], inside network namespace `netns`.
    pub fn start_in(
        security: &str,
        usb: &str,
        network: Network,
        netns: Option<&str>,
    ) -> ServerUnderTest {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("helper.sock");
        let control = dir.path().join("control.sock");
        let text = format!(
            r#"[server]
log_level = "debug"

[usb]
{usb}

[security]
{security}

[helper]
backend = "sim"
socket = "{socket}"
allowed_users = [{uid}]

[[helper.share]]
all = true

[agent]
state_dir = "{state}"
control_socket = "{control}"

{iroh}"#,
            socket = socket.display(),
            uid = nix::unistd::geteuid(),
            state = dir.path().join("state").display(),
            control = control.display(),
            iroh = network.iroh_section(),
        );
        let config = dir.path().join("server.toml");
        std::fs::write(&config, text).expect("write config");
        let mut helper = command(netns, &bin("p2p-usb-helper"));
        helper
            .arg("--config")
            .arg(&config)
            .arg("--listen")
            .arg(&socket)
            .env("RUST_LOG", "debug");
        if is_root() {
            helper.arg("--allow-root");
        }
        let helper = Process::spawn(helper, dir.path().join("helper.log"));
        wait_for_path(&socket, Duration::from_secs(10));
        let agent_notify = NotifySocket::bind(dir.path());
        let mut server = ServerUnderTest {
            dir,
            config,
            helper,
            agent: None,
            agent_notify,
            control,
            netns: netns.map(str::to_string),
        };
        server.start_agent();
        server
    }

    /// (Re)starts the agent process and waits for its control socket.
    pub fn start_agent(&mut self) {
        let _ = std::fs::remove_file(&self.control);
        let mut agent = command(self.netns.as_deref(), &bin("p2p-usb-agent"));
        agent
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("RUST_LOG", "debug")
            .env("NOTIFY_SOCKET", &self.agent_notify.path);
        if is_root() {
            agent.arg("--allow-root");
        }
        let log = self.dir.path().join(format!("agent-{}.log", unique()));
        self.agent = Some(Process::spawn(agent, log));
        wait_for_path(&self.control, Duration::from_secs(20));
    }

    /// Asks the running agent over its control socket.
    pub async fn control(&self, request: ControlRequest) -> ControlReply {
        control::request(&self.control, request)
            .await
            .expect("control request")
    }

    /// The agent's ticket (id plus current addresses).
    pub async fn ticket(&self) -> String {
        match self.control(ControlRequest::Status).await {
            ControlReply::Status { ticket, .. } => ticket,
            other => panic!("{other:?}"),
        }
    }

    /// The agent's address, from its ticket: what a client connects to.
    pub async fn addr(&self) -> EndpointAddr {
        net::parse_server(&self.ticket().await).expect("the agent's ticket parses")
    }

    /// The agent's EndpointId.
    pub async fn id(&self) -> String {
        match self.control(ControlRequest::Status).await {
            ControlReply::Status { id, .. } => id,
            other => panic!("{other:?}"),
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Process::output).unwrap_or_default()
    }
}

fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// An in-process client with its own key and the given `[iroh]` network.
pub async fn start_client(dir: &Path, network: &Network) -> Arc<Client> {
    let key = dir.join(format!("client-{}.key", unique()));
    let iroh = match network {
        Network::RelayOnly(_) => network.iroh_section(),
        _ => "[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"127.0.0.1:0\"\ndns_discovery = false\n".to_string(),
    };
    let text = format!(
        "[client]\nlog_level = \"debug\"\nsecret_key = \"{}\"\n\n{iroh}",
        key.display()
    );
    let config = ConfigFile::parse(Path::new("client.toml"), text).expect("client config");
    Arc::new(Client::start(config).await.expect("client start"))
}

/// The `[security]` body that approves the client `id`.
pub fn approving(id: impl std::fmt::Display) -> String {
    format!("approved_clients = [\"{id}\"]")
}

/// An in-process client (its key in `dir`) and a server on loopback that
/// approves it, with `usb` as the server's `[usb]` body: where most network
/// tests and the USB/IP gateway begin.
pub async fn start_with_approved_client(dir: &Path, usb: &str) -> (Arc<Client>, ServerUnderTest) {
    let client = start_client(dir, &Network::Loopback).await;
    let server = ServerUnderTest::start(&approving(client.id()), usb, Network::Loopback);
    (client, server)
}
