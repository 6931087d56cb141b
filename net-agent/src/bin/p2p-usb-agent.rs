use std::path::PathBuf;

use clap::{Parser, Subcommand};
use p2p_usb_agent::agent::{self, AgentPaths};
use p2p_usb_agent::helper_link;
use p2p_usb_common::config;
use p2p_usb_common::exit;

const PROGRAM: &str = "p2p-usb-agent";

/// The p2p-usb server agent: serves the USB helper's devices to approved clients.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file [default: $CREDENTIALS_DIRECTORY/server.toml, else /etc/p2p-usb/server.toml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Helper socket [default: [helper] socket from the configuration]
    #[arg(long, global = true)]
    helper_socket: Option<PathBuf>,
    /// State directory [default: [agent] state_dir from the configuration]
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Control socket [default: [agent] control_socket from the configuration]
    #[arg(long, global = true)]
    control_socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default; what the systemd unit runs)
    Serve,
    /// Print the helper's devices and exit
    Devices,
}

fn main() {
    let args = Args::parse();
    let path = config::server_config_path(args.config.as_deref());
    let file = match config::load_server_config(&path) {
        Ok(file) => file,
        Err(e) => exit::fail(PROGRAM, e, exit::CONFIG),
    };
    p2p_usb_common::logging::init(Some(file.value.server.log_level), PROGRAM);
    let paths = AgentPaths::resolve(
        &file.value,
        args.helper_socket,
        args.state_dir,
        args.control_socket,
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => exit::fail(PROGRAM, format!("cannot start the runtime: {e}"), exit::OS),
    };
    runtime.block_on(async {
        match args.command.unwrap_or(Command::Serve) {
            Command::Serve => agent::serve(&file, &paths).await,
            Command::Devices => match helper_link::list_devices(&paths.helper_socket).await {
                Ok(devices) => println!("{}", helper_link::device_table(&devices)),
                Err(e) => exit::fail(PROGRAM, e, exit::UNAVAILABLE),
            },
        }
    });
}
