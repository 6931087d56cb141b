//! Helper link benchmark: the real helper binary (sim backend, Gadget Zero in
//! loopback) next to a raw Unix-socket echo of the same sizes, measured in the
//! same process, in alternating rounds.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p p2p-usb-tests --bench helper_link`

use std::time::{Duration, Instant};

use bytes::Bytes;
use p2p_usb_common::link::LinkClient;
use p2p_usb_helper::sim::zero;
use p2p_usb_tests::measure::{
    CpuMeter, ROUNDS, RoundTrips, Throughput, keep_in_flight, mib_per_s, print_bulk_rows,
    two_worker_runtime,
};
use p2p_usb_tests::usb::{self, input, out, transfer};
use p2p_usb_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Bytes moved per round of a bulk measurement.
const BULK_BYTES: usize = 256 * 1024 * 1024;
/// Round trips per round of the latency measurement.
const RTT_ROUNDS: usize = 4_000;

fn main() {
    p2p_usb_common::memory::reuse_freed_buffers();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    let config = write_sim_config(dir.path(), &socket, nix::unistd::geteuid().as_raw(), "");
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("log_level = \"debug\"", "log_level = \"warn\"");
    std::fs::write(&config, config_text).unwrap();
    let helper = start_listening_helper(dir.path(), &config, &socket, None);
    // The bench process holds both the link client and the echo.
    let cpu = CpuMeter::new(&[helper.child.id()]);
    wait_for_path(&socket, Duration::from_secs(10));

    let rt = two_worker_runtime();
    rt.block_on(async {
        let (link, _events) = usb::connect(&socket).await;
        let zero_key = usb::find(&link, 0x0525, 0xa4a0).await.key;
        let handle = usb::open(&link, &zero_key).await.unwrap();
        let echo = spawn_echo_server(dir.path()).await;

        println!(
            "helper link vs raw Unix-socket echo (same process, same sizes, {ROUNDS} alternating rounds)"
        );
        println!("{}", Throughput::header("helper", "raw"));
        let (link, echo, cpu) = (&link, echo.as_path(), &cpu);
        print_bulk_rows(
            cpu,
            BULK_BYTES,
            async || {
                usb::set_configuration(link, handle, zero::CONFIG_LOOPBACK)
                    .await
                    .unwrap();
            },
            move |depth, size| bulk_helper(link, handle, depth, size),
            move |depth, size| bulk_echo(echo, depth, size),
        )
        .await;

        usb::set_configuration(link, handle, zero::CONFIG_SOURCE_SINK)
            .await
            .unwrap();
        let result =
            RoundTrips::compare(move || rtt_helper(link, handle), move || rtt_echo(echo)).await;
        println!("{}", RoundTrips::header("helper", "raw"));
        for row in result.rows() {
            println!("{row}");
        }
    });
}

/// Keeps `depth` OUT and `depth` IN transfers of `size` in flight through the
/// loopback until `BULK_BYTES` came back; MiB/s of payload returned.
async fn bulk_helper(link: &LinkClient, handle: u32, depth: usize, size: usize) -> f64 {
    let payload = Bytes::from(vec![0x5a; size]);
    let rounds = BULK_BYTES / size;
    let started = Instant::now();
    keep_in_flight(
        rounds,
        depth,
        async || {
            // The pair leaves in one write, as a client with both at hand sends them.
            let mut pair = usb::start_all(
                link,
                vec![
                    transfer(handle, zero::EP_OUT, out(payload.clone())),
                    transfer(handle, zero::EP_IN, input(size as u32)),
                ],
            )
            .await
            .into_iter();
            (pair.next().unwrap(), pair.next().unwrap())
        },
        |(w, r)| check_pair(w, r, size),
    )
    .await;
    mib_per_s(rounds * size, started.elapsed())
}

async fn check_pair(
    write: impl Future<
        Output = Result<p2p_usb_common::proto::Completion, p2p_usb_common::proto::UsbError>,
    >,
    read: impl Future<
        Output = Result<p2p_usb_common::proto::Completion, p2p_usb_common::proto::UsbError>,
    >,
    size: usize,
) {
    assert_eq!(write.await.unwrap().actual_length as usize, size);
    assert_eq!(read.await.unwrap().actual_length as usize, size);
}

/// One 64-byte IN from the source endpoint at a time: request, reply.
async fn rtt_helper(link: &LinkClient, handle: u32) -> Vec<f64> {
    let mut samples = Vec::with_capacity(RTT_ROUNDS);
    for _ in 0..RTT_ROUNDS {
        let started = Instant::now();
        let reply = usb::run(link, transfer(handle, zero::EP_IN, input(64)))
            .await
            .unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(reply.actual_length, 64);
    }
    samples
}

/// A raw echo server on its own thread and runtime (as the helper has its own process).
async fn spawn_echo_server(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("echo.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let rt = two_worker_runtime();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    // A buffer as large as the biggest transfer: the echo
                    // moves each message with one read and one write.
                    let (mut r, mut w) = stream.into_split();
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n @ 1..) = r.read(&mut buf).await {
                        if w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    path
}

/// Echoes `BULK_BYTES` in `size` messages with at most `depth` outstanding.
async fn bulk_echo(path: &std::path::Path, depth: usize, size: usize) -> f64 {
    let stream = UnixStream::connect(path).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let rounds = BULK_BYTES / size;
    let credits = std::sync::Arc::new(tokio::sync::Semaphore::new(depth));
    let started = Instant::now();
    let writer_credits = credits.clone();
    let writer = tokio::spawn(async move {
        let payload = vec![0x5a; size];
        for _ in 0..rounds {
            writer_credits.acquire().await.unwrap().forget();
            w.write_all(&payload).await.unwrap();
        }
        w
    });
    let mut buf = vec![0u8; size];
    for _ in 0..rounds {
        r.read_exact(&mut buf).await.unwrap();
        credits.add_permits(1);
    }
    let _w = writer.await.unwrap();
    mib_per_s(rounds * size, started.elapsed())
}

async fn rtt_echo(path: &std::path::Path) -> Vec<f64> {
    let mut stream = UnixStream::connect(path).await.unwrap();
    let mut buf = [0u8; 64];
    let mut samples = Vec::with_capacity(RTT_ROUNDS);
    for _ in 0..RTT_ROUNDS {
        let started = Instant::now();
        stream.write_all(&[7u8; 64]).await.unwrap();
        stream.read_exact(&mut buf).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples
}
