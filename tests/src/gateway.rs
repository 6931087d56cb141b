//! A server (helper and agent, sim backend) and a client whose USB/IP
//! gateway listens on loopback: what the USB/IP tests and the full-stack
//! benchmark drive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use p2p_usb_agent::client::ClientError;
use p2p_usb_agent::usbip::client::{self as usbip, Imported, UrbData};
use p2p_usb_agent::usbip::gateway::{self, Remote};
use p2p_usb_agent::usbip::proto::{
    OP_HEADER_LEN, OP_REQ_IMPORT, OpHeader, ST_DEV_BUSY, ST_OK, USB_DEVICE_LEN, UsbDevice,
    encode_import_request,
};
use p2p_usb_agent::usbip::urbs;
use p2p_usb_agent::usbip::usbip_device;
use p2p_usb_common::access::AccessList;
use p2p_usb_common::proto::{UsbError, std_request};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::server::{ServerUnderTest, start_with_approved_client};

/// The whole stack up to a USB/IP gateway; the gateway stops when this drops.
pub struct GatewayUnderTest {
    /// The server processes (helper and agent).
    pub server: ServerUnderTest,
    /// Where the gateway listens.
    pub gateway: SocketAddr,
    remote: Arc<Remote>,
    stop: CancellationToken,
    _dir: TempDir,
}

impl GatewayUnderTest {
    /// Starts a server that shares its sim devices with one approved client,
    /// and that client's gateway on a free loopback port.
    pub async fn start() -> GatewayUnderTest {
        let dir = tempfile::tempdir().unwrap();
        let (client, server) = start_with_approved_client(dir.path(), "auto_share = true").await;
        let remote = Arc::new(Remote::new(client, server.addr().await));
        let stop = CancellationToken::new();
        let (gateway, _) = gateway::start(
            ([127, 0, 0, 1], 0).into(),
            remote.clone(),
            AccessList::default(),
            stop.clone(),
        )
        .await
        .unwrap();
        GatewayUnderTest {
            server,
            gateway,
            remote,
            stop,
            _dir: dir,
        }
    }

    /// The bus id the gateway exports VID:PID under.
    pub async fn busid(&self, vid: u16, pid: u16) -> String {
        let list = usbip::devlist(self.gateway).await.unwrap();
        usbip::busid_of(&list, vid, pid)
            .unwrap_or_else(|| panic!("{vid:04x}:{pid:04x} is not exported"))
    }

    /// Opens the device at `busid` the way `p2p-usb attach` does, without the
    /// gateway: its URBs are served on one end of a Unix socket pair, and the
    /// other end (the one vhci_hcd would hold) is returned with the device
    /// as vhci_hcd is told of it. Waits while the device is still held by a
    /// connection that just closed.
    pub async fn attach_pair(&self, busid: &str) -> (UnixStream, UsbDevice) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (opened, info) = loop {
            match self.remote.open(busid).await {
                Err(ClientError::Usb(UsbError::Busy(_)))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                opened => {
                    break opened
                        .unwrap()
                        .unwrap_or_else(|| panic!("{busid} is not shared"));
                }
            }
        };
        let (ours, kernels) = UnixStream::pair().unwrap();
        tokio::spawn(urbs::serve(ours, opened, self.stop.child_token()));
        (kernels, usbip_device(&info, self.remote.label()))
    }

    /// Imports VID:PID through the gateway.
    pub async fn import(&self, vid: u16, pid: u16) -> Imported {
        let busid = self.busid(vid, pid).await;
        usbip::import(self.gateway, &busid).await.unwrap()
    }
}

impl Drop for GatewayUnderTest {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Imports `busid` by hand and returns the bare stream, for tests that write
/// URB headers themselves. Waits while the device is still held by a
/// connection that just closed.
pub async fn import_raw(gateway: SocketAddr, busid: &str) -> tokio::net::TcpStream {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut request = OpHeader::new(OP_REQ_IMPORT, 0).encode().to_vec();
        request.extend_from_slice(&encode_import_request(busid).unwrap());
        stream.write_all(&request).await.unwrap();
        let mut header = [0u8; OP_HEADER_LEN];
        stream.read_exact(&mut header).await.unwrap();
        let status = OpHeader::decode(&header).unwrap().status;
        if status == ST_DEV_BUSY && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(status, ST_OK, "import accepted");
        let mut device = [0u8; USB_DEVICE_LEN];
        stream.read_exact(&mut device).await.unwrap();
        return stream;
    }
}

/// SET_CONFIGURATION through an imported device; the status must be 0.
pub async fn set_configuration(device: &Imported, value: u8) {
    let result = device
        .control(
            0x00,
            std_request::SET_CONFIGURATION,
            value.into(),
            0,
            UrbData::Out(Bytes::new()),
        )
        .await
        .unwrap();
    assert_eq!(result.status, 0);
}
