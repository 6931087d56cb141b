//! The network side of p2p-usb: the server agent (`p2p-usb-agent`) that
//! reaches devices only through the USB helper's socket, and the client
//! (`p2p-usb`).

pub mod agent;
pub mod helper_link;
