//! Full-stack benchmark: USB/IP client -> client -> iroh -> agent -> helper
//! -> simulated Gadget Zero, next to a raw iroh stream echo between the same
//! kind of endpoints (loopback, relays off), in alternating rounds of the
//! same run. The USB/IP client reaches the client both ways the product
//! offers: loopback TCP to the gateway (`p2p-usb serve-usbip`) and a Unix
//! socket pair (`p2p-usb attach`, where vhci_hcd holds the other end).
//! Also reports each process's peak resident memory after both.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p p2p-usb-tests --bench full_stack`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use iroh::endpoint::{Connection, RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, RelayMode, SecretKey};
use p2p_usb_agent::usbip::client::{self as usbip, Imported, UrbData};
use p2p_usb_agent::usbip::proto::{CmdSubmit, USBIP_DIR_IN, UrbHeader};
use p2p_usb_common::gadget::zero;
use p2p_usb_tests::gateway::{GatewayUnderTest, import_raw, set_configuration};
use p2p_usb_tests::measure::{
    CpuMeter, ROUNDS, RoundTrips, Throughput, keep_in_flight, mib_per_s, print_bulk_rows,
    two_worker_runtime,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes moved per round of a bulk measurement.
const BULK_BYTES: usize = 64 * 1024 * 1024;
/// Round trips per round of the latency measurement.
const RTT_ROUNDS: usize = 1000;
const ALPN: &[u8] = b"bench/echo";

fn main() {
    p2p_usb_common::memory::reuse_freed_buffers();
    let rt = two_worker_runtime();
    rt.block_on(async {
        let setup = GatewayUnderTest::start().await;
        let gateway_addr = setup.gateway;
        let busid = setup.busid(zero::VID, zero::PID).await;
        let device = usbip::import(gateway_addr, &busid).await.unwrap();
        let echo = &EchoPeer::start().await;
        // The bench process holds the USB/IP client, the client side and
        // both ends of the echo.
        let cpu = &CpuMeter::new(&[
            setup.server.helper.child.id(),
            setup.server.agent.as_ref().unwrap().child.id(),
        ]);

        println!(
            "full stack (USB/IP -> iroh -> agent -> helper -> sim) vs raw iroh stream echo, same run, {ROUNDS} alternating rounds"
        );
        println!(
            "gateway: USB/IP over loopback TCP to the gateway (p2p-usb serve-usbip, as `usbip attach` uses it)"
        );
        let busid = busid.as_str();
        measure_path("gateway", cpu, echo, device, import_raw(gateway_addr, busid)).await;
        println!(
            "attach: USB/IP over a Unix socket pair (p2p-usb attach, as vhci_hcd uses it)"
        );
        let (stream, described) = setup.attach_pair(busid).await;
        let (reader, writer) = stream.into_split();
        let attached = Imported::over(described, reader, writer);
        let pair = async { setup.attach_pair(busid).await.0 };
        measure_path("attach", cpu, echo, attached, pair).await;
        let rss = |pid: u32| vm_hwm(&format!("/proc/{pid}/status"));
        let helper_rss = rss(setup.server.helper.child.id());
        let agent_rss = rss(setup.server.agent.as_ref().unwrap().child.id());
        let client_rss = vm_hwm("/proc/self/status");
        println!(
            "peak resident memory: helper {helper_rss} KiB, agent {agent_rss} KiB, client+gateway+bench {client_rss} KiB"
        );
    });
}

/// The bulk table and the round trips of one way into the client: bulk
/// through `device`, then, once it is closed, round trips on one connection
/// from `connect`, kept for every block as `usbip attach` and vhci_hcd keep
/// theirs for as long as the device is attached.
async fn measure_path<S: AsyncRead + AsyncWrite + Unpin>(
    label: &str,
    cpu: &CpuMeter,
    echo: &EchoPeer,
    device: Imported,
    connect: impl Future<Output = S>,
) {
    println!("{}", Throughput::header(label, "iroh"));
    let imported = &device;
    print_bulk_rows(
        cpu,
        BULK_BYTES,
        async || set_configuration(imported, zero::CONFIG_LOOPBACK).await,
        move |depth, size| bulk_stack(imported, depth, size),
        move |depth, size| echo.bulk(depth, size),
    )
    .await;
    set_configuration(imported, zero::CONFIG_SOURCE_SINK).await;
    device.close().await;
    let connection = &tokio::sync::Mutex::new(connect.await);
    let result = RoundTrips::compare(
        move || async move { rtt_stack(&mut *connection.lock().await).await },
        move || echo.rtt(),
    )
    .await;
    println!("{}", RoundTrips::header(label, "iroh"));
    for row in result.rows() {
        println!("{row}");
    }
}

fn vm_hwm(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn bulk_stack(device: &Imported, depth: usize, size: usize) -> f64 {
    let payload = Bytes::from(vec![0x5a; size]);
    let rounds = BULK_BYTES / size;
    let started = Instant::now();
    keep_in_flight(
        rounds,
        depth,
        async || {
            let w = device
                .submit(zero::EP_OUT, [0; 8], UrbData::Out(payload.clone()), 0)
                .await
                .unwrap()
                .1;
            let r = device
                .submit(zero::EP_IN, [0; 8], UrbData::In(size as u32), 0)
                .await
                .unwrap()
                .1;
            (w, r)
        },
        |(w, r)| check(w, r, size),
    )
    .await;
    mib_per_s(rounds * size, started.elapsed())
}

async fn check(
    w: impl Future<Output = Result<usbip::UrbResult, usbip::UsbipClientError>>,
    r: impl Future<Output = Result<usbip::UrbResult, usbip::UsbipClientError>>,
    size: usize,
) {
    assert_eq!(w.await.unwrap().actual_length, size);
    assert_eq!(r.await.unwrap().actual_length, size);
}

/// One 64-byte IN at a time over an attached USB/IP connection, read in the
/// measuring task itself, as the iroh baseline reads its echo.
async fn rtt_stack<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Vec<f64> {
    let mut samples = Vec::with_capacity(RTT_ROUNDS);
    let mut answer = [0u8; 48 + 64];
    for seqnum in 1..=RTT_ROUNDS as u32 {
        let command = UrbHeader::Submit(CmdSubmit {
            seqnum,
            direction: USBIP_DIR_IN,
            ep: u32::from(zero::EP_IN & 0x0f),
            transfer_buffer_length: 64,
            ..CmdSubmit::default()
        })
        .encode();
        let started = Instant::now();
        stream.write_all(&command).await.unwrap();
        stream.read_exact(&mut answer).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        match UrbHeader::decode(answer[..48].try_into().unwrap()).unwrap() {
            UrbHeader::RetSubmit(ret) => {
                assert_eq!((ret.seqnum, ret.status, ret.actual_length), (seqnum, 0, 64))
            }
            other => panic!("{other:?}"),
        }
    }
    samples
}

/// Two iroh endpoints on loopback with relays off; the echoing one on its own
/// thread and runtime, as the agent has its own process.
struct EchoPeer {
    client: Endpoint,
    server: EndpointAddr,
}

impl EchoPeer {
    async fn start() -> EchoPeer {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = two_worker_runtime();
            rt.block_on(async move {
                let server = endpoint(true).await;
                let addr = EndpointAddr::new(server.id()).with_ip_addr(server.bound_sockets()[0]);
                tx.send(addr).unwrap();
                while let Some(incoming) = server.accept().await {
                    tokio::spawn(async move {
                        let connection = incoming.accept().unwrap().await.unwrap();
                        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                            tokio::spawn(async move {
                                // One read and one write per message, as large
                                // as the biggest transfer.
                                let mut buf = vec![0u8; 256 * 1024];
                                while let Ok(Some(n)) = recv.read(&mut buf).await {
                                    if send.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                    });
                }
            });
        });
        let server = rx.await.unwrap();
        EchoPeer {
            client: endpoint(false).await,
            server,
        }
    }

    /// A new connection to the echoing endpoint and a stream on it, which
    /// each measurement opens before it starts the clock.
    async fn open(&self) -> (Connection, SendStream, RecvStream) {
        let connection = self
            .client
            .connect(self.server.clone(), ALPN)
            .await
            .unwrap();
        let (send, recv) = connection.open_bi().await.unwrap();
        (connection, send, recv)
    }

    async fn bulk(&self, depth: usize, size: usize) -> f64 {
        let (connection, mut send, mut recv) = self.open().await;
        let rounds = BULK_BYTES / size;
        let credits = Arc::new(tokio::sync::Semaphore::new(depth));
        let started = Instant::now();
        let writer_credits = credits.clone();
        let writer = tokio::spawn(async move {
            let payload = vec![0x5a; size];
            for _ in 0..rounds {
                writer_credits.acquire().await.unwrap().forget();
                send.write_all(&payload).await.unwrap();
            }
            send
        });
        let mut buf = vec![0u8; size];
        for _ in 0..rounds {
            recv.read_exact(&mut buf).await.unwrap();
            credits.add_permits(1);
        }
        let mut send = writer.await.unwrap();
        let elapsed = started.elapsed();
        send.finish().unwrap();
        connection.close(0u32.into(), b"");
        mib_per_s(rounds * size, elapsed)
    }

    async fn rtt(&self) -> Vec<f64> {
        let (connection, mut send, mut recv) = self.open().await;
        let mut buf = [0u8; 64];
        let mut samples = Vec::with_capacity(RTT_ROUNDS);
        for _ in 0..RTT_ROUNDS {
            let started = Instant::now();
            send.write_all(&[7u8; 64]).await.unwrap();
            recv.read_exact(&mut buf).await.unwrap();
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        connection.close(0u32.into(), b"");
        samples
    }
}

async fn endpoint(accept: bool) -> Endpoint {
    let mut builder = Endpoint::builder(presets::Minimal)
        .crypto_provider(p2p_usb_agent::net::crypto_provider())
        .secret_key(SecretKey::generate())
        .relay_mode(RelayMode::Disabled)
        .portmapper_config(iroh::endpoint::PortmapperConfig::Disabled)
        .clear_ip_transports()
        .bind_addr(SocketAddr::from(([127, 0, 0, 1], 0)))
        .unwrap();
    if accept {
        builder = builder.alpns(vec![ALPN.to_vec()]);
    }
    builder.bind().await.unwrap()
}
