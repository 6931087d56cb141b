//! The network side of p2p-usb: the server agent (`p2p-usb-agent`) that
//! reaches devices only through the USB helper's socket, and the client
//! (`p2p-usb`) that attaches remote devices through vhci_hcd or serves them
//! as standard USB/IP.

pub mod agent;
pub mod attach;
pub mod attachments;
pub mod client;
pub mod control;
pub mod demo;
pub mod helper_link;
pub mod identity;
pub mod net;
pub mod paths;
pub mod peer_uid;
pub mod policy;
mod quic_writer;
mod session;
pub mod usbip;
pub mod vhci;

/// One line to standard output, where `println!` would panic if it is
/// closed (a pipe whose reader left): long-running commands keep going.
pub(crate) fn print_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}
