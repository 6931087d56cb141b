//! Drives a real device's interrupt IN endpoint through a running helper (the
//! usbfs backend), for the VM scenarios: transfer timeouts, a timeout behind
//! transfers that wait, cancels, and a report that still arrives afterwards.
//! Made for an idle HID keyboard (QEMU's usb-kbd answers NAK until a key is
//! pressed); prints one `ok:` line per check and `waiting for a key press`
//! when the scenario should press one. Exits non-zero on the first failure.
//!
//! Run: `usbfs-probe SOCKET VID:PID` as a user the helper allows.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use p2p_usb_common::link::LinkClient;
use p2p_usb_common::proto::{EndpointType, Handle, Request, UsbError};
use p2p_usb_tests::usb;

/// The timeout given to the transfers that are meant to time out.
const TIMEOUT: Duration = Duration::from_millis(300);
/// How long a report may take after the scenario pressed a key.
const KEY_WAIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket, vid_pid] = args.as_slice() else {
        eprintln!("usage: usbfs-probe SOCKET VID:PID");
        return ExitCode::from(64);
    };
    let Some((vid, pid)) = vid_pid.split_once(':').and_then(|(v, p)| {
        Some((
            u16::from_str_radix(v, 16).ok()?,
            u16::from_str_radix(p, 16).ok()?,
        ))
    }) else {
        eprintln!("usbfs-probe: {vid_pid}: expected VID:PID in hex");
        return ExitCode::from(64);
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(probe(PathBuf::from(socket), vid, pid)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("FAIL: {failure}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(socket: PathBuf, vid: u16, pid: u16) -> Result<(), String> {
    let (link, _events) = usb::connect(&socket).await;
    let device = usb::find(&link, vid, pid).await;
    let endpoint = device
        .active_config()
        .into_iter()
        .flat_map(|c| &c.interfaces)
        .filter_map(|i| i.alt_settings.first())
        .flat_map(|a| &a.endpoints)
        .find(|e| e.address & 0x80 != 0 && e.transfer_type() == EndpointType::Interrupt)
        .ok_or("the device has no interrupt IN endpoint")?;
    let (address, size) = (endpoint.address, u32::from(endpoint.max_packet_size));
    let handle = usb::open(&link, &device.key)
        .await
        .map_err(|e| format!("open: {e}"))?;
    println!("ok: opened {vid:04x}:{pid:04x}, interrupt IN {address:#04x} of {size} bytes");

    let started = Instant::now();
    let alone = read(&link, handle, address, size, Some(TIMEOUT)).await;
    let took = started.elapsed();
    expect_timeout("a lone read", alone, took)?;
    println!("ok: a lone read timed out after {took:?}");

    // Three reads without a timeout wait ahead of one with a timeout: it
    // times out all the same, and they stay pending (resubmitted, in order).
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let (id, reply) = usb::start(&link, usb::transfer(handle, address, usb::input(size))).await;
        waiting.push((id, Box::pin(reply)));
    }
    let started = Instant::now();
    let behind = read(&link, handle, address, size, Some(TIMEOUT)).await;
    let took = started.elapsed();
    expect_timeout("a read behind three waiting ones", behind, took)?;
    tokio::time::sleep(TIMEOUT).await;
    for (_, reply) in &mut waiting {
        if let Some(reply) = reply.as_mut().now_or_never() {
            return Err(format!(
                "a waiting read ended with the timeout of another: {reply:?}"
            ));
        }
    }
    println!("ok: a read behind three waiting ones timed out after {took:?}; they still wait");

    // Cancel the first two; the third waits on for a key.
    let mut waiting = waiting.into_iter();
    for (id, reply) in waiting.by_ref().take(2) {
        let _ = link.request(Request::Cancel { request: id }).await;
        match tokio::time::timeout(Duration::from_secs(5), reply).await {
            Ok(Err(UsbError::Cancelled)) => {}
            other => return Err(format!("a cancelled read ended with {other:?}")),
        }
    }
    println!("ok: two waiting reads cancelled");

    let (_, last) = waiting.next().expect("three reads");
    println!("waiting for a key press");
    match tokio::time::timeout(KEY_WAIT, last).await {
        Ok(Ok(report)) if report.actual_length > 0 => {
            println!(
                "ok: the third read got a report of {} bytes: {:02x?}",
                report.actual_length,
                &report.data[..]
            );
            Ok(())
        }
        other => Err(format!("the read left waiting ended with {other:?}")),
    }
}

async fn read(
    link: &LinkClient,
    handle: Handle,
    address: u8,
    size: u32,
    timeout: Option<Duration>,
) -> Result<p2p_usb_common::proto::Completion, UsbError> {
    let mut transfer = usb::transfer(handle, address, usb::input(size));
    transfer.timeout_ms = timeout.map(|t| t.as_millis() as u32);
    usb::run(link, transfer).await
}

fn expect_timeout(
    what: &str,
    result: Result<p2p_usb_common::proto::Completion, UsbError>,
    took: Duration,
) -> Result<(), String> {
    match result {
        Err(UsbError::Timeout) if took >= TIMEOUT && took < 10 * TIMEOUT => Ok(()),
        Err(UsbError::Timeout) => Err(format!(
            "{what} timed out after {took:?}, not about {TIMEOUT:?}"
        )),
        other => Err(format!(
            "{what} with a {TIMEOUT:?} timeout ended with {other:?} after {took:?}"
        )),
    }
}
