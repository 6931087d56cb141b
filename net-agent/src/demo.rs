//! `p2p-usb demo`: the whole system on one machine, with no USB hardware, no
//! root and no internet. It starts the real helper (simulated devices) and a
//! real server agent as child processes, connects this client to the agent
//! over iroh on loopback, serves the devices through the USB/IP gateway and
//! drives them with a USB/IP client: bulk loopback with integrity checks,
//! round-trip latency, and the keyboard's interrupt endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use p2p_usb_common::access::AccessList;
use p2p_usb_common::config::ConfigFile;
use p2p_usb_common::gadget::{keyboard, zero};
use p2p_usb_common::proto::std_request;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::control::{self, ControlReply, ControlRequest};
use crate::identity;
use crate::net;
use crate::usbip::client::{self as usbip_client, Imported, UrbData};
use crate::usbip::gateway::{self, Remote};

/// What the demo types on the simulated keyboard.
pub const KEYBOARD_TEXT: &str = "hello from p2p-usb\n";

/// Sizes of the demo's traffic.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// Bytes sent through the bulk loopback (and checked on return).
    pub bulk_bytes: usize,
    /// Bytes per bulk transfer.
    pub transfer_size: usize,
    /// Transfers kept in flight in each direction.
    pub in_flight: usize,
    /// 64-byte round trips for the latency figures.
    pub round_trips: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            bulk_bytes: 64 * 1024 * 1024,
            transfer_size: 64 * 1024,
            in_flight: 16,
            round_trips: 2000,
        }
    }
}

/// A failed step of the demo.
#[derive(Debug, thiserror::Error)]
#[error("demo failed while {step}: {reason}")]
pub struct DemoError {
    pub step: &'static str,
    pub reason: String,
}

fn step<T, E: std::fmt::Display>(step: &'static str, result: Result<T, E>) -> Result<T, DemoError> {
    result.map_err(|e| DemoError {
        step,
        reason: e.to_string(),
    })
}

fn fail<T>(step: &'static str, reason: impl Into<String>) -> Result<T, DemoError> {
    Err(DemoError {
        step,
        reason: reason.into(),
    })
}

/// Child processes that are stopped (SIGTERM, then SIGKILL) when dropped.
struct Children(Vec<(&'static str, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        for (_, child) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the demo and prints its report.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let dir = step(
        "creating a work directory",
        tempfile::Builder::new().prefix("p2p-usb-demo-").tempdir(),
    )?;
    let bins = step("finding the binaries", sibling_binaries())?;
    eprintln!(
        "p2p-usb demo: everything runs on this machine; work files in {}",
        dir.path().display()
    );

    let client_key = dir.path().join("client.key");
    let client_id = step(
        "creating the client identity",
        identity::load_or_create(&client_key),
    )?
    .public();
    let server_config = write_server_config(dir.path(), &client_id.to_string());
    let socket = dir.path().join("helper.sock");
    let mut children = Children(Vec::new());
    let mut helper = Command::new(&bins.0);
    helper
        .arg("--config")
        .arg(&server_config)
        .arg("--listen")
        .arg(&socket);
    if nix::unistd::geteuid().is_root() {
        helper.arg("--allow-root");
    }
    children.0.push((
        "helper",
        step(
            "starting p2p-usb-helper",
            spawn(helper, &dir.path().join("helper.log")),
        )?,
    ));
    step(
        "waiting for the helper socket",
        wait_for(&socket, Duration::from_secs(10)).await,
    )?;
    let mut agent = Command::new(&bins.1);
    agent.arg("--config").arg(&server_config).arg("serve");
    if nix::unistd::geteuid().is_root() {
        agent.arg("--allow-root");
    }
    children.0.push((
        "agent",
        step(
            "starting p2p-usb-agent",
            spawn(agent, &dir.path().join("agent.log")),
        )?,
    ));
    let control_socket = dir.path().join("control.sock");
    step(
        "waiting for the agent",
        wait_for(&control_socket, Duration::from_secs(20)).await,
    )?;
    let ticket = match step(
        "asking the agent for its ticket",
        control::request(&control_socket, ControlRequest::Status).await,
    )? {
        ControlReply::Status { ticket, .. } => ticket,
        other => return fail("asking the agent for its ticket", format!("{other:?}")),
    };
    eprintln!("  helper and agent are up; server ticket {ticket}");

    let client_config = ConfigFile::parse(
        Path::new("(demo client)"),
        format!(
            "[client]\nlog_level = \"warn\"\nsecret_key = \"{}\"\n\n{}",
            client_key.display(),
            LOOPBACK_IROH
        ),
    );
    let client = Arc::new(step(
        "starting the client",
        Client::start(step("client configuration", client_config)?).await,
    )?);
    let server = step("reading the ticket", net::parse_server(&ticket))?;
    let remote = Arc::new(Remote::new(client.clone(), server));
    let stop = CancellationToken::new();
    let (gateway_addr, _) = step(
        "binding the USB/IP gateway",
        gateway::start(
            ([127, 0, 0, 1], 0).into(),
            remote,
            AccessList::default(),
            stop.clone(),
        )
        .await,
    )?;
    eprintln!("  client {client_id} connected through the USB/IP gateway on {gateway_addr}");

    let report = drive(gateway_addr, options).await;
    stop.cancel();
    drop(children);
    if let Ok(client) = Arc::try_unwrap(client) {
        client.shutdown().await;
    }
    let report = report?;
    println!("{report}");
    Ok(())
}

/// The client-side USB/IP traffic and its report.
async fn drive(gateway: SocketAddr, options: DemoOptions) -> Result<String, DemoError> {
    let devices = step(
        "listing devices over USB/IP",
        usbip_client::devlist(gateway).await,
    )?;
    let mut report = String::from(
        "\np2p-usb demo report\n===================\nDevices exported by the server (as `usbip list` sees them):\n",
    );
    for entry in &devices {
        let d = &entry.device;
        report.push_str(&format!(
            "  busid {:<6} {:04x}:{:04x}  speed code {}  {} interface(s)\n",
            d.busid, d.id_vendor, d.id_product, d.speed, d.num_interfaces
        ));
    }
    let Some(zero_busid) = usbip_client::busid_of(&devices, zero::VID, zero::PID) else {
        return fail("finding the Gadget Zero", "not exported");
    };
    let Some(keyboard_busid) = usbip_client::busid_of(&devices, keyboard::VID, keyboard::PID)
    else {
        return fail("finding the keyboard", "not exported");
    };

    let zero = step(
        "importing the Gadget Zero",
        usbip_client::import(gateway, &zero_busid).await,
    )?;
    set_configuration(&zero, zero::CONFIG_LOOPBACK).await?;
    let (mib_s, elapsed) = bulk_loopback(&zero, options).await?;
    report.push_str(&format!(
        "Bulk loopback (Gadget Zero {zero_busid}): {} MiB out and back in {:.2} s = {:.1} MiB/s, {} transfers of {} KiB, {} in flight, every byte verified\n",
        options.bulk_bytes / (1024 * 1024),
        elapsed.as_secs_f64(),
        mib_s,
        options.bulk_bytes / options.transfer_size,
        options.transfer_size / 1024,
        options.in_flight
    ));
    set_configuration(&zero, zero::CONFIG_SOURCE_SINK).await?;
    let (p50, p99) = round_trips(&zero, options.round_trips).await?;
    report.push_str(&format!(
        "Latency: {} round trips of a 64-byte IN transfer: p50 {:.0} us, p99 {:.0} us\n",
        options.round_trips, p50, p99
    ));
    zero.close().await;

    let keyboard = step(
        "importing the keyboard",
        usbip_client::import(gateway, &keyboard_busid).await,
    )?;
    let typed = read_keyboard(&keyboard).await?;
    report.push_str(&format!(
        "Keyboard ({keyboard_busid}): interrupt endpoint delivered {typed:?} as typed\n"
    ));
    keyboard.close().await;
    report.push_str("All checks passed.\n");
    Ok(report)
}

async fn set_configuration(device: &Imported, value: u8) -> Result<(), DemoError> {
    let result = step(
        "setting the configuration",
        device
            .control(
                0x00,
                std_request::SET_CONFIGURATION,
                value.into(),
                0,
                UrbData::Out(Bytes::new()),
            )
            .await,
    )?;
    if result.status != 0 {
        return fail(
            "setting the configuration",
            format!("status {}", result.status),
        );
    }
    Ok(())
}

async fn bulk_loopback(
    device: &Imported,
    options: DemoOptions,
) -> Result<(f64, Duration), DemoError> {
    let size = options.transfer_size;
    let rounds = options.bulk_bytes / size;
    let mut payloads = Vec::with_capacity(options.in_flight * 2);
    let mut rng = rand::rng();
    for _ in 0..options.in_flight * 2 {
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        payloads.push(Bytes::from(data));
    }
    let started = Instant::now();
    let mut window = std::collections::VecDeque::new();
    let mut last_progress = Instant::now();
    for round in 0..rounds {
        if window.len() == options.in_flight {
            let (expected, write, read) = window.pop_front().expect("window is full");
            check_pair(expected, write, read).await?;
        }
        let payload: Bytes = payloads[round % payloads.len()].clone();
        let write = step(
            "bulk OUT",
            device
                .submit(zero::EP_OUT, [0; 8], UrbData::Out(payload.clone()), 0)
                .await,
        )?
        .1;
        let read = step(
            "bulk IN",
            device
                .submit(zero::EP_IN, [0; 8], UrbData::In(size as u32), 0)
                .await,
        )?
        .1;
        window.push_back((payload, write, read));
        if last_progress.elapsed() > Duration::from_millis(500) {
            last_progress = Instant::now();
            eprint!("\r  bulk loopback: {:>3}%", round * 100 / rounds);
        }
    }
    while let Some((expected, write, read)) = window.pop_front() {
        check_pair(expected, write, read).await?;
    }
    eprintln!("\r  bulk loopback: 100%");
    let elapsed = started.elapsed();
    Ok((
        options.bulk_bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64(),
        elapsed,
    ))
}

async fn check_pair(
    expected: Bytes,
    write: impl Future<Output = Result<usbip_client::UrbResult, usbip_client::UsbipClientError>>,
    read: impl Future<Output = Result<usbip_client::UrbResult, usbip_client::UsbipClientError>>,
) -> Result<(), DemoError> {
    let written = step("bulk OUT", write.await)?;
    let read = step("bulk IN", read.await)?;
    if written.status != 0 || read.status != 0 {
        return fail(
            "bulk loopback",
            format!("status {} / {}", written.status, read.status),
        );
    }
    if read.data != expected {
        return fail(
            "bulk loopback",
            "data came back different from what was sent",
        );
    }
    Ok(())
}

async fn round_trips(device: &Imported, count: usize) -> Result<(f64, f64), DemoError> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let result = step(
            "64-byte round trip",
            device.transfer(zero::EP_IN, UrbData::In(64), 0).await,
        )?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        let expected: Vec<u8> = (0..64).map(zero::pattern_byte).collect();
        if result.status != 0 || result.data[..] != expected[..] {
            return fail("64-byte round trip", "wrong data from the source endpoint");
        }
    }
    samples.sort_by(f64::total_cmp);
    let at = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    Ok((at(50), at(99)))
}

async fn read_keyboard(keyboard: &Imported) -> Result<String, DemoError> {
    let reports_wanted = KEYBOARD_TEXT.chars().count() * 2;
    let mut reports = Vec::new();
    for _ in 0..reports_wanted {
        let report = step(
            "reading the keyboard",
            tokio::time::timeout(
                Duration::from_secs(5),
                keyboard.transfer(keyboard::EP_REPORTS, UrbData::In(8), 0),
            )
            .await
            .map_err(|_| "no report within 5 s".to_string())
            .and_then(|r| r.map_err(|e| e.to_string())),
        )?;
        reports.push(report.data);
    }
    let typed = keyboard::text_of_reports(reports.iter().map(|r| &r[..]));
    if typed != KEYBOARD_TEXT {
        return fail(
            "reading the keyboard",
            format!("typed {typed:?}, expected {KEYBOARD_TEXT:?}"),
        );
    }
    Ok(typed)
}

/// Relays and lookups off, loopback only: nothing leaves the machine.
const LOOPBACK_IROH: &str =
    "[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"127.0.0.1:0\"\ndns_discovery = false\n";

fn write_server_config(dir: &Path, client_id: &str) -> PathBuf {
    let text = format!(
        r#"[server]
log_level = "warn"

[usb]
auto_share = true

[security]
approved_clients = ["{client_id}"]

[helper]
backend = "sim"
socket = "{socket}"
allowed_users = [{uid}]

[[helper.share]]
all = true

[sim]
keyboard_text = {text:?}

[agent]
state_dir = "{state}"
control_socket = "{control}"

{LOOPBACK_IROH}"#,
        socket = dir.join("helper.sock").display(),
        uid = nix::unistd::geteuid(),
        text = KEYBOARD_TEXT,
        state = dir.join("state").display(),
        control = dir.join("control.sock").display(),
    );
    let path = dir.join("server.toml");
    let _ = std::fs::write(&path, text);
    path
}

/// The helper and agent binaries installed next to this one.
fn sibling_binaries() -> Result<(PathBuf, PathBuf), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe
        .parent()
        .ok_or("no directory for the current executable")?;
    let helper = dir.join("p2p-usb-helper");
    let agent = dir.join("p2p-usb-agent");
    for path in [&helper, &agent] {
        if !path.exists() {
            return Err(format!(
                "{} is missing (build or install all three binaries)",
                path.display()
            ));
        }
    }
    Ok((helper, agent))
}

fn spawn(mut command: Command, log: &Path) -> std::io::Result<Child> {
    let out = std::fs::File::create(log)?;
    command
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .spawn()
}

async fn wait_for(path: &Path, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {timeout:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
