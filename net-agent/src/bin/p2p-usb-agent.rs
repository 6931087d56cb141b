use std::path::PathBuf;

use clap::{Parser, Subcommand};
use p2p_usb_agent::agent::{self, AgentPaths};
use p2p_usb_agent::control::{self, ControlReply, ControlRequest};
use p2p_usb_agent::paths::{Purpose, Scope};
use p2p_usb_agent::{helper_link, identity};
use p2p_usb_common::config::{self, ConfigError, ConfigFile, ServerConfig};
use p2p_usb_common::exit;

const PROGRAM: &str = "p2p-usb-agent";

/// The p2p-usb server agent: serves the USB helper's devices to approved clients over iroh.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file [default: $CREDENTIALS_DIRECTORY/server.toml, else /etc/p2p-usb/server.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Helper socket [default: [helper] socket from the configuration]
    #[arg(long, global = true)]
    helper_socket: Option<PathBuf>,
    /// State directory [default: [agent] state_dir from the configuration, else /var/lib/p2p-usb
    /// for the system's agent (a service or root), ~/.local/state/p2p-usb for a user's own]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Control socket [default: [agent] control_socket from the configuration, else
    /// /run/p2p-usb-agent/control.sock, or $XDG_RUNTIME_DIR/p2p-usb-agent/control.sock for a
    /// user's own agent]
    #[arg(long, global = true)]
    control_socket: Option<PathBuf>,
    /// Development only: let `serve` run as root (the agent faces the network;
    /// it runs as the p2p-usb service user or as a normal user)
    #[arg(long, global = true)]
    allow_root: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default; what the systemd unit runs)
    Serve,
    /// Print the devices (from the running agent, else straight from the helper) and exit
    Devices,
    /// Print this server's EndpointId (or, with --ticket, a ticket clients can use)
    Id {
        #[arg(long)]
        ticket: bool,
    },
    /// Show the running agent's status line
    Status,
    /// Approve a client EndpointId
    Approve { id: String },
    /// Revoke a client EndpointId (also one approved in the config file)
    Revoke { id: String },
    /// List clients that were refused and wait for approval
    Pending,
    /// List connected clients
    Clients,
    /// Offer a device (stable key, see `devices`) to approved clients
    Share { key: String },
    /// Stop offering a device
    Unshare { key: String },
}

fn main() {
    p2p_usb_common::memory::reuse_freed_buffers();
    let args = Args::parse();
    let command = args.command.unwrap_or(Command::Serve);
    let path = config::server_config_path(args.config.as_deref());
    // Admin commands only need the control socket: an admin who cannot read
    // the root-only config still gets the defaults.
    let file = match (config::load_server_config(&path), &command) {
        (Ok(file), _) => file,
        (
            Err(ConfigError::Read { .. }),
            Command::Approve { .. }
            | Command::Revoke { .. }
            | Command::Pending
            | Command::Clients
            | Command::Share { .. }
            | Command::Unshare { .. }
            | Command::Status
            | Command::Id { .. }
            | Command::Devices,
        ) => ConfigFile::parse(&path, String::new()).expect("empty configuration is valid"),
        (Err(e), _) => exit::fail(PROGRAM, e, exit::CONFIG),
    };
    p2p_usb_common::logging::init(Some(file.value.server.log_level), PROGRAM);
    for note in file.inert_settings() {
        tracing::warn!("{note}");
    }
    let serving = matches!(command, Command::Serve);
    if serving && nix::unistd::geteuid().is_root() && !args.allow_root {
        exit::fail(
            PROGRAM,
            "refusing to serve as root: the agent faces the network; run it as the p2p-usb \
             service user (p2p-usb-agent.service) or as a normal user, or pass --allow-root \
             for development",
            exit::NOPERM,
        );
    }
    let scope = Scope::detect();
    let paths = AgentPaths::resolve(
        &file.value,
        AgentPaths {
            helper_socket: args.helper_socket,
            state_dir: args.state_dir,
            control_socket: args.control_socket,
        },
        &scope,
        if serving {
            Purpose::Serve
        } else {
            Purpose::Command
        },
    );
    let runtime = match p2p_usb_common::service::runtime() {
        Ok(runtime) => runtime,
        Err(e) => exit::fail(PROGRAM, format!("cannot start the runtime: {e}"), exit::OS),
    };
    runtime.block_on(run(command, &file, &paths, &scope));
}

async fn run(command: Command, file: &ConfigFile<ServerConfig>, paths: &AgentPaths, scope: &Scope) {
    let ask = |request| control::request(&paths.control_socket, request);
    match command {
        Command::Serve => {
            if let Err(e) = agent::serve(file, paths, scope).await {
                tracing::error!("{e}");
                exit::fail(PROGRAM, &e, e.exit_code());
            }
        }
        Command::Devices => match ask(ControlRequest::Devices).await {
            Ok(ControlReply::Devices(devices)) => {
                let (devices, shared): (Vec<_>, Vec<_>) =
                    devices.into_iter().map(|d| (d.device, d.shared)).unzip();
                println!(
                    "{}",
                    helper_link::device_table_with_shares(&devices, Some(&shared))
                );
            }
            Ok(other) => unexpected(other),
            Err(_) => match helper_link::list_devices(&paths.helper_socket).await {
                Ok(devices) => println!("{}", helper_link::device_table(&devices)),
                Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
            },
        },
        Command::Id { ticket } => match ask(ControlRequest::Status).await {
            Ok(ControlReply::Status { id, ticket: t, .. }) => {
                println!("{}", if ticket { t } else { id })
            }
            Ok(other) => unexpected(other),
            Err(e) if ticket => exit::fail(
                PROGRAM,
                format!("{e} (a ticket needs the running agent)"),
                exit::UNAVAILABLE,
            ),
            Err(_) => match identity::load(&paths.secret_key()) {
                Ok(key) => println!("{}", key.public()),
                Err(e) => exit::fail(
                    PROGRAM,
                    format!("{e} (start the agent once to create its identity)"),
                    exit::UNAVAILABLE,
                ),
            },
        },
        Command::Status => match ask(ControlRequest::Status).await {
            Ok(ControlReply::Status {
                summary, ticket, ..
            }) => println!("{summary}\nticket: {ticket}"),
            Ok(other) => unexpected(other),
            Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
        },
        Command::Pending => match ask(ControlRequest::Pending).await {
            Ok(ControlReply::Pending(clients)) if clients.is_empty() => {
                println!("no client is waiting for approval")
            }
            Ok(ControlReply::Pending(clients)) => {
                println!(
                    "{:<64}  {:>8}  {:>10}  LAST ADDRESS",
                    "ENDPOINT ID", "ATTEMPTS", "LAST SEEN"
                );
                for c in clients {
                    println!(
                        "{:<64}  {:>8}  {:>10}  {}",
                        c.id, c.attempts, c.last_seen, c.address
                    );
                }
            }
            Ok(other) => unexpected(other),
            Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
        },
        Command::Clients => match ask(ControlRequest::Clients).await {
            Ok(ControlReply::Clients(clients)) if clients.is_empty() => {
                println!("no client is connected")
            }
            Ok(ControlReply::Clients(clients)) => {
                for c in clients {
                    println!(
                        "{}  sessions={}  from {}  devices: {}",
                        c.id,
                        c.sessions,
                        c.address,
                        c.devices.join(", ")
                    );
                }
            }
            Ok(other) => unexpected(other),
            Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
        },
        Command::Approve { id } => done(ask(ControlRequest::Approve(id)).await),
        Command::Revoke { id } => done(ask(ControlRequest::Revoke(id)).await),
        Command::Share { key } => done(ask(ControlRequest::Share(key)).await),
        Command::Unshare { key } => done(ask(ControlRequest::Unshare(key)).await),
    }
}

fn done(reply: Result<ControlReply, control::ControlError>) {
    match reply {
        Ok(ControlReply::Done(text)) => println!("{text}"),
        Ok(ControlReply::Failed(text)) => exit::fail(PROGRAM, text, exit::DATA),
        Ok(other) => unexpected(other),
        Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
    }
}

fn unexpected(reply: ControlReply) -> ! {
    if let ControlReply::Failed(text) = reply {
        exit::fail(PROGRAM, text, exit::NOPERM);
    }
    exit::fail(
        PROGRAM,
        format!("unexpected reply from the agent: {reply:?}"),
        exit::SOFTWARE,
    )
}
