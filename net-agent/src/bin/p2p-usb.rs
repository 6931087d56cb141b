use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use p2p_usb_agent::attach::{self, AttachError};
use p2p_usb_agent::attachments::{self, DetachError};
use p2p_usb_agent::client::{self, Client, ClientError};
use p2p_usb_agent::demo::{self, DemoOptions};
use p2p_usb_agent::helper_link::format_table;
use p2p_usb_agent::usbip::gateway::{self, Remote};
use p2p_usb_agent::vhci;
use p2p_usb_common::access::AccessList;
use p2p_usb_common::exit;
use tokio_util::sync::CancellationToken;

const PROGRAM: &str = "p2p-usb";

/// The p2p-usb client: use USB devices of a remote p2p-usb server as if they were plugged in here.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Client configuration [default: ~/.config/p2p-usb/client.toml, else /etc/p2p-usb/client.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this client's EndpointId (what a server admin approves)
    Id,
    /// List the devices a server offers. SERVER: a ticket, an EndpointId, or a [[servers]] name
    List { server: String },
    /// Attach a remote device to this machine's kernel (vhci_hcd); runs until detached.
    /// DEVICE: stable key, bus id (e.g. 1-1.2) or VID:PID
    Attach { server: String, device: String },
    /// End an attach: TARGET is a vhci port, or a DEVICE of one of your `p2p-usb attach`
    /// processes (also one that is reconnecting and holds no port); see `status`
    Detach { target: String },
    /// Show devices attached through vhci_hcd, and your attach processes
    Status,
    /// Serve a server's devices as standard USB/IP on loopback, for `usbip attach` and usbip-win2
    ServeUsbip {
        server: String,
        /// Listen address [default: [gateway] listen, 127.0.0.1:3240]
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run helper, server agent and client on this machine with simulated devices, and report
    Demo {
        /// MiB to send through the bulk loopback
        #[arg(long, default_value_t = 64)]
        bulk_mib: usize,
    },
}

fn main() {
    p2p_usb_common::memory::reuse_freed_buffers();
    let args = Args::parse();
    let runtime = match p2p_usb_common::service::runtime() {
        Ok(runtime) => runtime,
        Err(e) => exit::fail(PROGRAM, format!("cannot start the runtime: {e}"), exit::OS),
    };
    let code = runtime.block_on(run(args));
    std::process::exit(code);
}

async fn run(args: Args) -> i32 {
    if let Command::Demo { bulk_mib } = args.command {
        p2p_usb_common::logging::init(Some(p2p_usb_common::config::LogLevel::Warn), PROGRAM);
        let options = DemoOptions {
            bulk_bytes: bulk_mib.max(1) * 1024 * 1024,
            ..DemoOptions::default()
        };
        return match demo::run(options).await {
            Ok(()) => exit::OK,
            Err(e) => fail(e, exit::FAILURE),
        };
    }
    if let Command::Detach { target } = args.command {
        return match attachments::detach(&vhci::default_root(), &target).await {
            Ok(done) => {
                println!("{done}");
                exit::OK
            }
            Err(e @ (DetachError::NoAttach { .. } | DetachError::Ambiguous { .. })) => {
                fail(e, exit::DATA)
            }
            Err(e) => fail(e, exit::OS),
        };
    }
    if let Command::Status = args.command {
        return status();
    }
    let config = match client::load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(e) => return fail(e, exit::CONFIG),
    };
    p2p_usb_common::logging::init(Some(config.value.client.log_level), PROGRAM);
    let gateway_listen = config.value.gateway.listen;
    let gateway_users = match AccessList::resolve(&config, &config.value.gateway.allowed_users, &[])
    {
        Ok(users) => users,
        Err(e) => return fail(e, exit::CONFIG),
    };
    let client = match Client::start(config).await {
        Ok(client) => Arc::new(client),
        Err(e) => return fail(&e, client_code(&e)),
    };
    let code = match args.command {
        Command::Id => {
            println!("{}", client.id());
            exit::OK
        }
        Command::List { server } => list(&client, &server).await,
        Command::Attach { server, device } => {
            let stop = CancellationToken::new();
            let on_signal = stop.clone();
            tokio::spawn(async move {
                p2p_usb_common::service::stop_signal().await;
                on_signal.cancel();
            });
            match attach::run(client.clone(), &server, &device, stop).await {
                Ok(()) => exit::OK,
                Err(AttachError::Client(e)) => fail(&e, client_code(&e)),
                Err(AttachError::Vhci(e)) => fail(e, exit::NOPERM),
                Err(e) => fail(e, exit::FAILURE),
            }
        }
        Command::ServeUsbip { server, listen } => {
            serve_usbip(
                &client,
                &server,
                listen.unwrap_or(gateway_listen),
                gateway_users,
            )
            .await
        }
        Command::Detach { .. } | Command::Status | Command::Demo { .. } => {
            unreachable!("handled above")
        }
    };
    if let Ok(client) = Arc::try_unwrap(client) {
        client.shutdown().await;
    }
    code
}

async fn serve_usbip(
    client: &Arc<Client>,
    server: &str,
    listen: SocketAddr,
    users: AccessList,
) -> i32 {
    let server = match client.resolve(server) {
        Ok(server) => server,
        Err(e) => return fail(&e, client_code(&e)),
    };
    if !listen.ip().is_loopback() {
        tracing::warn!(
            "the USB/IP gateway listens on {listen}, which is not loopback: the peer-user check only works for local connections, so remote hosts will be refused"
        );
    }
    let stop = CancellationToken::new();
    let id = server.id;
    let remote = Arc::new(Remote::new(client.clone(), server));
    let (bound, serving) = match gateway::start(listen, remote, users, stop.clone()).await {
        Ok(started) => started,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}"), exit::OS),
    };
    println!(
        "serving USB/IP for {id} on {bound}; attach with: usbip attach -r {} -b BUSID",
        bound.ip()
    );
    p2p_usb_common::service::stop_signal().await;
    stop.cancel();
    let _ = serving.await;
    exit::OK
}

async fn list(client: &Client, server: &str) -> i32 {
    let listed = async {
        let addr = client.resolve(server)?;
        let connection = client.connect(&addr).await?;
        let (session, _events) = client.session(&connection).await?;
        let devices = client::list_devices(&session).await?;
        session.close();
        connection.close(0u32.into(), b"done");
        Ok::<_, ClientError>(devices)
    }
    .await;
    match listed {
        Ok(devices) if devices.is_empty() => {
            println!("the server offers no devices");
            exit::OK
        }
        Ok(devices) => {
            let mut rows = vec![vec![
                "KEY".into(),
                "BUSID".into(),
                "VID:PID".into(),
                "SPEED".into(),
                "PRODUCT".into(),
            ]];
            for d in &devices {
                rows.push(vec![
                    d.key.to_string(),
                    d.key.bus_path.clone(),
                    format!("{:04x}:{:04x}", d.key.vid, d.key.pid),
                    d.speed.label().into(),
                    d.display_name(),
                ]);
            }
            println!("{}", format_table(&rows));
            exit::OK
        }
        Err(e) => fail(&e, client_code(&e)),
    }
}

fn status() -> i32 {
    let ports = match vhci::ports(&vhci::default_root()) {
        Ok(ports) => ports,
        Err(e) => return fail(e, exit::OS),
    };
    let records = attachments::list().unwrap_or_else(|e| {
        eprintln!("{PROGRAM}: attach records not read: {e}");
        Vec::new()
    });
    let mut rows = vec![vec![
        "PORT".to_string(),
        "SPEED".into(),
        "DEVID".into(),
        "ATTACHED BY".into(),
    ]];
    for port in ports.iter().filter(|p| !p.is_free()) {
        let record = records
            .iter()
            .find(|r| r.attached.is_some_and(|slot| slot.is(port)))
            .map(attachments::describe)
            .unwrap_or_else(|| "another process (e.g. usbip attach)".into());
        rows.push(vec![
            port.port.to_string(),
            port.speed.to_string(),
            format!("{:08x}", port.devid),
            record,
        ]);
    }
    // Attach processes between reconnects hold no port (and one whose port
    // was freed behind its back holds it no more).
    let on_no_port = |r: &&attachments::AttachRecord| {
        !r.attached
            .is_some_and(|slot| ports.iter().any(|port| slot.is(port)))
    };
    for record in records.iter().filter(on_no_port) {
        rows.push(vec![
            "-".into(),
            "-".into(),
            "-".into(),
            attachments::describe(record),
        ]);
    }
    if rows.len() == 1 {
        println!("no device is attached through vhci_hcd");
    } else {
        println!("{}", format_table(&rows));
    }
    exit::OK
}

fn client_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Config(_) => exit::CONFIG,
        ClientError::Addr(_) | ClientError::UnknownServer(_) | ClientError::NoSuchDevice { .. } => {
            exit::DATA
        }
        ClientError::NotApproved { .. } => exit::NOPERM,
        ClientError::Connect { .. } | ClientError::Session { .. } | ClientError::Net(_) => {
            exit::UNAVAILABLE
        }
        ClientError::Identity(_) => exit::OS,
        ClientError::Usb(_) => exit::FAILURE,
    }
}

fn fail(e: impl std::fmt::Display, code: i32) -> i32 {
    eprintln!("{PROGRAM}: error: {e}");
    code
}
