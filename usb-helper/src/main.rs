use std::path::PathBuf;

use clap::Parser;
use p2p_usb_helper::HelperOptions;

/// Holds USB device access for p2p-usb and serves it to the local agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file [default: $CREDENTIALS_DIRECTORY/server.toml, else /etc/p2p-usb/server.toml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// The helper's Unix socket: bound when not started by socket activation;
    /// with activation, the path the passed socket should have
    /// [default: [helper] socket from the configuration]
    #[arg(long)]
    listen: Option<PathBuf>,
    /// Development only: allow running as root (capabilities are still dropped)
    #[arg(long)]
    allow_root: bool,
}

fn main() {
    p2p_usb_common::memory::reuse_freed_buffers();
    let args = Args::parse();
    let options = HelperOptions {
        config: args.config,
        listen: args.listen,
        allow_root: args.allow_root,
    };
    if let Err(e) = p2p_usb_helper::run(options) {
        tracing::error!("{e}");
        p2p_usb_common::exit::fail("p2p-usb-helper", &e, e.exit_code());
    }
}
