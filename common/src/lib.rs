//! Shared foundation of the p2p-usb processes: the message vocabulary spoken on
//! every link, its framing codec, configuration loading, logging, local access
//! control and the systemd service glue. Everything here is free of network
//! and USB dependencies so the USB helper can link it without growing.

pub mod access;
pub mod codec;
pub mod config;
pub mod descriptors;
pub mod exit;
pub mod gadget;
pub mod link;
pub mod logging;
pub mod memory;
pub mod proto;
pub mod service;
