//! Talking to devices over a link, the way the agent and client do.

use std::path::Path;

use bytes::Bytes;
use p2p_usb_common::gadget::zero;
use p2p_usb_common::link::LinkClient;
use p2p_usb_common::proto::{
    Completion, DeviceInfo, DeviceKey, Event, Handle, Reply, Request, RequestId, SetupPacket,
    Transfer, TransferData, TransferFlags, UsbError, std_request,
};
use tokio::sync::mpsc;

/// Connects to a helper socket and performs the hello.
pub async fn connect(socket: &Path) -> (LinkClient, mpsc::Receiver<Event>) {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    let (r, w) = stream.into_split();
    LinkClient::start(r, w, "p2p-usb-tests")
        .await
        .expect("hello")
}

/// Lists devices.
pub async fn list(link: &LinkClient) -> Vec<DeviceInfo> {
    match link.request(Request::ListDevices).await {
        Ok(Reply::Devices(devices)) => devices,
        other => panic!("ListDevices: {other:?}"),
    }
}

/// The listed device with this VID:PID.
pub async fn find(link: &LinkClient, vid: u16, pid: u16) -> DeviceInfo {
    list(link)
        .await
        .into_iter()
        .find(|d| d.key.vid == vid && d.key.pid == pid)
        .unwrap_or_else(|| panic!("no device {vid:04x}:{pid:04x}"))
}

/// Opens a device, returning its handle.
pub async fn open(link: &LinkClient, key: &DeviceKey) -> Result<Handle, UsbError> {
    match link.request(Request::Open { key: key.clone() }).await? {
        Reply::Opened { handle, .. } => Ok(handle),
        other => panic!("Open: {other:?}"),
    }
}

/// A bulk/interrupt transfer description.
pub fn transfer(handle: Handle, endpoint: u8, data: TransferData) -> Transfer {
    Transfer {
        handle,
        endpoint,
        setup: None,
        data,
        flags: TransferFlags::default(),
        timeout_ms: None,
    }
}

/// Submits a transfer and returns its id and the future of its completion.
pub async fn start(
    link: &LinkClient,
    t: Transfer,
) -> (
    RequestId,
    impl Future<Output = Result<Completion, UsbError>> + use<>,
) {
    let (id, reply) = link.start_request(Request::Submit(t)).await;
    (id, async move { completion(reply.await) })
}

/// Starts several transfers with one write; their completions, in order.
pub async fn start_all(
    link: &LinkClient,
    transfers: Vec<Transfer>,
) -> Vec<impl Future<Output = Result<Completion, UsbError>> + use<>> {
    let requests = transfers.into_iter().map(Request::Submit).collect();
    link.start_requests(requests)
        .await
        .into_iter()
        .map(|(_, reply)| async move { completion(reply.await) })
        .collect()
}

/// A transfer's reply as a result: a transfer that failed part way is its
/// error (tests that look at what moved read the reply itself).
fn completion(reply: Result<Reply, UsbError>) -> Result<Completion, UsbError> {
    match reply? {
        Reply::Transferred(c) => Ok(c),
        Reply::PartlyTransferred { error, .. } => Err(error),
        other => panic!("Submit: {other:?}"),
    }
}

/// Runs one transfer to completion.
pub async fn run(link: &LinkClient, t: Transfer) -> Result<Completion, UsbError> {
    start(link, t).await.1.await
}

/// A control transfer on endpoint 0, to submit.
pub fn control_transfer(
    handle: Handle,
    request_type: u8,
    request: u8,
    value: u16,
    index: u16,
    data: TransferData,
) -> Transfer {
    let setup = SetupPacket {
        request_type,
        request,
        value,
        index,
        length: data.len() as u16,
    };
    Transfer {
        handle,
        endpoint: if setup.is_in() { 0x80 } else { 0x00 },
        setup: Some(setup),
        data,
        flags: TransferFlags::default(),
        timeout_ms: Some(5000),
    }
}

/// Runs a control transfer on endpoint 0.
pub async fn control(
    link: &LinkClient,
    handle: Handle,
    request_type: u8,
    request: u8,
    value: u16,
    index: u16,
    data: TransferData,
) -> Result<Completion, UsbError> {
    let t = control_transfer(handle, request_type, request, value, index, data);
    run(link, t).await
}

/// A standard SET_CONFIGURATION, sent as the control transfer a host sends
/// (the helper maps it to the real operation).
pub async fn set_configuration(
    link: &LinkClient,
    handle: Handle,
    value: u8,
) -> Result<Completion, UsbError> {
    control(
        link,
        handle,
        0x00,
        std_request::SET_CONFIGURATION,
        value.into(),
        0,
        out(Bytes::new()),
    )
    .await
}

/// Opens the Gadget Zero `key` and switches it to its loopback configuration.
pub async fn open_loopback(link: &LinkClient, key: &DeviceKey) -> Handle {
    let handle = open(link, key).await.expect("open the Gadget Zero");
    set_configuration(link, handle, zero::CONFIG_LOOPBACK)
        .await
        .expect("SET_CONFIGURATION loopback");
    handle
}

/// Bytes to send OUT.
pub fn out(bytes: impl Into<Bytes>) -> TransferData {
    TransferData::Out(bytes.into())
}

/// An IN request of `length` bytes.
pub fn input(length: u32) -> TransferData {
    TransferData::In { length }
}

/// Waits for the next event of the link, with a timeout.
pub async fn next_event(events: &mut mpsc::Receiver<Event>, timeout: std::time::Duration) -> Event {
    tokio::time::timeout(timeout, events.recv())
        .await
        .expect("event within timeout")
        .expect("link open")
}
