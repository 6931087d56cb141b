//! The real `p2p-usb-helper` binary with the sim backend, started the way
//! systemd starts it, driven over its real socket.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::signal::Signal;
use p2p_usb_common::link::LinkClient;
use p2p_usb_common::proto::{
    Completion, DeviceInfo, Event, Handle, Message, Reply, Request, SetupPacket, TransferData,
    UsbError, std_request,
};
use p2p_usb_helper::sim::{keyboard, zero};
use p2p_usb_tests::usb::{self, control, control_transfer, input, out, transfer};
use p2p_usb_tests::*;
use rand::{Rng, RngCore};
use tokio::sync::mpsc;

const ZERO: (u16, u16) = (0x0525, 0xa4a0);
const KEYBOARD: (u16, u16) = (0x0525, 0xa4ac);

/// Runs `test` on a fresh runtime against a helper started the way systemd
/// starts it ([`start_activated_helper`]), with one link connected to it:
/// the setting most tests here share.
fn with_helper_link(
    extra_config: &str,
    watchdog_usec: Option<u64>,
    test: impl AsyncFnOnce(&HelperUnderTest, &LinkClient, &mut mpsc::Receiver<Event>),
) {
    let helper = start_activated_helper(extra_config, watchdog_usec);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (link, mut events) = usb::connect(&helper.socket).await;
        test(&helper, &link, &mut events).await;
    });
}

/// Finds the sim device `(vid, pid)` and opens it in the configuration it
/// is in.
async fn open_sim(link: &LinkClient, (vid, pid): (u16, u16)) -> (DeviceInfo, Handle) {
    let device = usb::find(link, vid, pid).await;
    let handle = usb::open(link, &device.key).await.unwrap();
    (device, handle)
}

/// Sends a Gadget Zero vendor command that carries no data (`FREEZE`,
/// `UNPLUG`, `STALL_ENDPOINT`); the device must accept it.
async fn vendor_command(link: &LinkClient, handle: Handle, request: u8, value: u16) {
    control(
        link,
        handle,
        zero::control::VENDOR_OUT,
        request,
        value,
        0,
        out(Bytes::new()),
    )
    .await
    .unwrap();
}

#[test]
fn socket_activation_ready_status_watchdog_and_stopping() {
    let mut helper = start_activated_helper("", Some(1_000_000));
    // systemd-socket-activate starts the helper on the first connection.
    let probe = std::os::unix::net::UnixStream::connect(&helper.socket).unwrap();
    let ready = helper.notify.wait_for("READY=1", Duration::from_secs(10));
    assert!(ready.has("STATUS=2 devices, 0 open, 0 peers"), "{ready:?}");
    drop(probe);
    let log = helper.process.output();
    assert!(
        log.contains("listening on the socket passed by systemd")
            && !log.contains("but [helper] socket"),
        "{log}"
    );

    // WATCHDOG_USEC=1s: a ping every 0.5 s while healthy.
    let since = Instant::now();
    std::thread::sleep(Duration::from_millis(3200));
    let pings = helper.notify.count_since("WATCHDOG=1", since);
    assert!((4..=9).contains(&pings), "{pings} pings in 3.2 s");

    helper.process.signal(Signal::SIGTERM);
    helper.notify.wait_for("STOPPING=1", Duration::from_secs(5));
    let status = helper
        .process
        .wait_timeout(Duration::from_secs(6))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", helper.process.output());
}

#[test]
fn a_socket_unit_naming_another_path_than_the_config_is_reported() {
    let helper = start_activated_helper("", None);
    // The helper starts on the first connection and reads its configuration then.
    let elsewhere = helper.dir.path().join("elsewhere.sock");
    let text = std::fs::read_to_string(&helper.config).unwrap().replace(
        &format!("socket = \"{}\"", helper.socket.display()),
        &format!("socket = \"{}\"", elsewhere.display()),
    );
    std::fs::write(&helper.config, text).unwrap();
    let _probe = std::os::unix::net::UnixStream::connect(&helper.socket).unwrap();
    helper.notify.wait_for("READY=1", Duration::from_secs(10));
    let expected = format!(
        "listening on {} (passed by systemd), but [helper] socket in {} is {}",
        helper.socket.display(),
        helper.config.display(),
        elsewhere.display()
    );
    let log = helper.process.output();
    assert!(log.contains(&expected), "{log}");
    // It still serves the socket it was given.
    helper_says_hello(&helper.socket).unwrap();
}

#[test]
fn status_line_counts_peers_and_open_devices() {
    with_helper_link("", None, async |helper, link, _| {
        helper.notify.wait_for("READY=1", Duration::from_secs(10));
        open_sim(link, KEYBOARD).await;
        helper
            .notify
            .wait_for("STATUS=2 devices, 1 open, 1 peer", Duration::from_secs(5));
    });
}

#[test]
fn stopped_process_sends_no_watchdog_pings() {
    let helper = start_activated_helper("", Some(1_000_000));
    let _probe = std::os::unix::net::UnixStream::connect(&helper.socket).unwrap();
    helper
        .notify
        .wait_for("WATCHDOG=1", Duration::from_secs(10));
    helper.process.signal(Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(100));
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(helper.notify.count_since("WATCHDOG=1", stopped_at), 0);
    helper.process.signal(Signal::SIGCONT);
    let resumed = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(helper.notify.count_since("WATCHDOG=1", resumed) >= 1);
}

#[test]
fn hung_usb_thread_withholds_watchdog_pings() {
    with_helper_link("", Some(1_000_000), async |helper, link, _| {
        helper
            .notify
            .wait_for("WATCHDOG=1", Duration::from_secs(10));
        let (_, handle) = open_sim(link, ZERO).await;
        // The process stays up and its socket keeps answering, but the
        // simulated USB thread hangs for 4 s: no pings may go out meanwhile.
        vendor_command(link, handle, zero::control::FREEZE, 4).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let frozen = Instant::now();
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(
            helper.notify.count_since("WATCHDOG=1", frozen),
            0,
            "pings while hung"
        );
        assert!(!usb::list(link).await.is_empty(), "main loop still serves");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let recovered = Instant::now();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            helper.notify.count_since("WATCHDOG=1", recovered) >= 1,
            "pings resume"
        );
    });
}

/// Connects, and reports whether the helper said hello (accepted) or hung
/// up after a refusal notice (rejected; the notice is returned).
fn helper_says_hello(socket: &std::path::Path) -> Result<(), String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match read_message(&mut stream) {
        Some(Message::Hello(_)) => Ok(()),
        Some(Message::Event(Event::ShuttingDown { reason })) => {
            assert!(
                read_message(&mut stream).is_none(),
                "closed after the notice"
            );
            Err(reason)
        }
        other => panic!("unexpected first message {other:?}"),
    }
}

#[test]
fn peers_outside_the_allowed_users_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    // Allow only some other uid: this test process is then the outsider.
    let config = write_sim_config(dir.path(), &socket, NOBODY - 1, "");
    let helper = start_listening_helper(dir.path(), &config, &socket, None);
    wait_for_path(&socket, Duration::from_secs(10));
    let refusal = helper_says_hello(&socket).unwrap_err();
    assert!(
        refusal.contains("is not allowed") && refusal.contains("uid="),
        "{refusal}"
    );
    assert!(
        helper.output().contains("rejected peer"),
        "{}",
        helper.output()
    );
}

#[test]
fn peer_running_as_another_uid_is_rejected_and_allowed_peers_still_served() {
    if !is_root() {
        eprintln!(
            "needs root to run a peer under another uid; covered by peers_outside_the_allowed_users_are_rejected"
        );
        return;
    }
    let helper = start_activated_helper("", None);
    std::fs::set_permissions(helper.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&helper.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut outsider = Command::new(bin("p2p-usb-agent"));
    outsider
        .arg("--config")
        .arg("/dev/null")
        .arg("--helper-socket")
        .arg(&helper.socket)
        .arg("devices")
        .uid(NOBODY)
        .gid(NOBODY);
    let result = outsider.output().unwrap();
    assert!(!result.status.success(), "nobody was served");
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("helper"),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(
        helper_says_hello(&helper.socket).is_ok(),
        "root (allowed) is still served"
    );
    assert!(helper.process.output().contains("rejected peer"));
}

fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn read_message(stream: &mut std::os::unix::net::UnixStream) -> Option<Message> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(p2p_usb_common::codec::decode_body(&body).expect("helper sends valid messages"))
}

/// The next message, which must be a reply: its id and body.
fn read_reply(stream: &mut std::os::unix::net::UnixStream) -> (u64, Result<Reply, UsbError>) {
    match read_message(stream) {
        Some(Message::Reply { id, body }) => (id, body),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn malformed_and_oversized_frames_do_not_hurt_other_peers() {
    let helper = start_activated_helper("", None);

    // A well-framed body that is not a message, then an unknown request kind:
    // both answered with protocol errors, and the connection keeps working.
    let mut a = greeted_by_hand(&helper.socket);
    a.write_all(&raw_frame(&[0xc1, 0xff, 0x00])).unwrap();
    let unknown = unknown_request(77);
    a.write_all(&raw_frame(&unknown)).unwrap();
    match read_message(&mut a) {
        Some(Message::Reply {
            id: 77,
            body: Err(UsbError::Protocol(reason)),
        }) => {
            assert!(reason.contains("Frobnicate"), "{reason}")
        }
        other => panic!("expected a protocol error for request 77, got {other:?}"),
    }

    // A frame announcing 1 GiB: the connection is closed, nothing allocated.
    let mut b = greeted_by_hand(&helper.socket);
    b.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    // The helper may already have hung up; that is the point.
    let _ = b.write_all(&[0u8; 64]);
    assert!(
        read_message(&mut b).is_none(),
        "oversized frame closes the link"
    );

    // Garbage before any hello also just closes that connection.
    let mut c = std::os::unix::net::UnixStream::connect(&helper.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let _ = read_message(&mut c);

    // The first peer is still served.
    let list = rmp_serde::to_vec(&Message::Request {
        id: 78,
        body: Request::ListDevices,
    })
    .unwrap();
    a.write_all(&raw_frame(&list)).unwrap();
    match read_message(&mut a) {
        Some(Message::Reply {
            id: 78,
            body: Ok(Reply::Devices(devices)),
        }) => assert_eq!(devices.len(), 2),
        other => panic!("{other:?}"),
    }
    assert!(helper.process.output().contains("frame exceeds the limit"));
}

#[test]
fn a_peer_that_stops_reading_cannot_grow_the_helpers_memory() {
    let helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_zero_by_hand(&mut peer);
    // 200 reads of 4 MiB from the source endpoint (800 MiB of replies), and
    // no reply read for now.
    const READS: u64 = 200;
    let max = p2p_usb_common::proto::MAX_TRANSFER_LEN;
    let mut burst = Vec::new();
    for id in 0..READS {
        burst.extend(request_frame(
            100 + id,
            Request::Submit(transfer(handle, zero::EP_IN, input(max))),
        ));
    }
    peer.write_all(&burst).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let rss_mib = std::fs::read_to_string(format!("/proc/{}/status", helper.process.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        / 1024;
    assert!(
        rss_mib < 256,
        "the helper holds {rss_mib} MiB for a peer that does not read (budget 64 MiB)"
    );
    // Nothing was lost: every read completes once the peer reads again.
    peer.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for _ in 0..READS {
        match read_message(&mut peer) {
            Some(Message::Reply {
                id,
                body: Ok(Reply::Transferred(completion)),
            }) if id >= 100 => assert_eq!(completion.actual_length, max),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_stopping_helper_does_not_wait_on_a_peer_that_does_not_read() {
    let mut helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_zero_by_hand(&mut peer);
    // Replies the peer never reads: the socket and the budget fill up.
    let max = p2p_usb_common::proto::MAX_TRANSFER_LEN;
    let mut burst = Vec::new();
    for id in 100..200 {
        burst.extend(request_frame(
            id,
            Request::Submit(transfer(handle, zero::EP_IN, input(max))),
        ));
    }
    peer.write_all(&burst).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    helper.process.signal(Signal::SIGTERM);
    helper
        .process
        .wait_timeout(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    let log = helper.process.output();
    assert!(log.contains("device released"), "{log}");
    assert!(
        !log.contains("did not finish"),
        "the connection ended by itself: {log}"
    );
    drop(peer);
}

#[test]
fn cancels_are_read_while_submits_wait_for_budget() {
    let helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_loopback_by_hand(&mut peer);
    // Sixteen reads of 4 MiB take the whole budget; the seventeenth waits.
    let max = p2p_usb_common::proto::MAX_TRANSFER_LEN;
    let waiting = 100 + reads_taking_the_whole_budget(&mut peer, handle);
    send_request(
        &mut peer,
        waiting,
        Request::Submit(transfer(handle, zero::EP_IN, input(max))),
    );
    let cancel = |peer: &mut std::os::unix::net::UnixStream, request: u64| {
        send_request(peer, 1_000_000 + request, Request::Cancel { request });
        let mut replies = vec![read_reply(peer), read_reply(peer)];
        replies.sort_by_key(|(id, _)| *id);
        assert_eq!(
            replies,
            vec![
                (request, Err(UsbError::Cancelled)),
                (1_000_000 + request, Ok(Reply::Done))
            ]
        );
    };
    // Beyond the waiting queue's limit a submit is refused, and the
    // connection stays readable.
    let last_waiting = waiting + p2p_usb_helper::server::WAITING_SUBMITS as u64 - 1;
    let mut burst = Vec::new();
    for id in waiting + 1..=last_waiting + 1 {
        burst.extend(request_frame(
            id,
            Request::Submit(transfer(handle, zero::EP_IN, input(max))),
        ));
    }
    peer.write_all(&burst).unwrap();
    match read_reply(&mut peer) {
        (id, Err(UsbError::Busy(_))) => assert_eq!(id, last_waiting + 1),
        other => panic!("{other:?}"),
    }
    cancel(&mut peer, waiting);
    cancel(&mut peer, 100);
    // The connection is still in order.
    send_request(&mut peer, 4, Request::ListDevices);
    assert!(matches!(read_reply(&mut peer), (4, Ok(Reply::Devices(_)))));
}

#[test]
fn direct_device_operations_wait_behind_the_submits_before_them() {
    let helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_loopback_by_hand(&mut peer);
    // Reads of the empty loopback take the whole budget; the write after
    // them waits for budget, and so must the operation sent after it.
    reads_taking_the_whole_budget(&mut peer, handle);
    send_request(
        &mut peer,
        200,
        Request::Submit(transfer(
            handle,
            zero::EP_OUT,
            out(Bytes::from_static(b"abc")),
        )),
    );
    send_request(
        &mut peer,
        201,
        Request::ClearHalt {
            handle,
            endpoint: zero::EP_OUT,
        },
    );
    // Freeing one read's budget lets the write start, then the operation.
    send_request(&mut peer, 300, Request::Cancel { request: 100 });
    let mut order = Vec::new();
    while order.len() < 5 {
        let (id, body) = read_reply(&mut peer);
        assert!(body.is_ok() || id == 100, "{id}: {body:?}");
        order.push(id);
    }
    let at = |id| order.iter().position(|&x| x == id).unwrap();
    assert!(at(300) < at(201), "{order:?}");
    assert!(at(200) < at(201), "{order:?}");
    assert!(
        order.contains(&101),
        "the write reached the next read: {order:?}"
    );
}

#[test]
fn a_reset_gets_through_while_reads_hold_the_whole_budget() {
    let helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_loopback_by_hand(&mut peer);
    let budget_reads = reads_taking_the_whole_budget(&mut peer, handle);
    // A device operation holds no budget: it runs, and ends the reads.
    send_request(&mut peer, 200, Request::Reset { handle });
    let mut replies: Vec<_> = (0..=budget_reads).map(|_| read_reply(&mut peer)).collect();
    replies.sort_by_key(|(id, _)| *id);
    let mut expected: Vec<_> = (100..100 + budget_reads)
        .map(|id| (id, Err(UsbError::Cancelled)))
        .collect();
    expected.push((200, Ok(Reply::Done)));
    assert_eq!(replies, expected);
}

#[test]
fn transfers_after_a_device_operation_wait_until_it_is_done() {
    let helper = start_activated_helper("", None);
    let mut peer = greeted_by_hand(&helper.socket);
    let handle = open_zero_by_hand(&mut peer);
    let halt = control_transfer(
        handle,
        zero::control::VENDOR_OUT,
        zero::control::STALL_ENDPOINT,
        zero::EP_IN.into(),
        0,
        out(Bytes::new()),
    );
    send_request(&mut peer, 3, Request::Submit(halt));
    assert!(matches!(
        read_message(&mut peer),
        Some(Message::Reply { id: 3, body: Ok(_) })
    ));
    // A pipelining client: the clear and the read behind it in one write.
    let mut burst = request_frame(
        4,
        Request::ClearHalt {
            handle,
            endpoint: zero::EP_IN,
        },
    );
    burst.extend(request_frame(
        5,
        Request::Submit(transfer(handle, zero::EP_IN, input(512))),
    ));
    peer.write_all(&burst).unwrap();
    let replies = [read_reply(&mut peer), read_reply(&mut peer)];
    assert_eq!(replies[0], (4, Ok(Reply::Done)));
    match &replies[1] {
        (5, Ok(Reply::Transferred(read))) => assert_eq!(read.actual_length, 512),
        other => panic!("the read ran before the halt was cleared: {other:?}"),
    }
}

/// Sends reads of the empty loopback, ids from 100, that together take the
/// whole in-flight budget (they wait for data that never comes); how many.
fn reads_taking_the_whole_budget(peer: &mut std::os::unix::net::UnixStream, handle: Handle) -> u64 {
    let max = p2p_usb_common::proto::MAX_TRANSFER_LEN;
    let reads = (p2p_usb_helper::server::IN_FLIGHT_BUDGET / max as usize) as u64;
    for id in 100..100 + reads {
        send_request(
            peer,
            id,
            Request::Submit(transfer(handle, zero::EP_IN, input(max))),
        );
    }
    reads
}

/// Sends one request, framed by hand.
fn send_request(peer: &mut std::os::unix::net::UnixStream, id: u64, body: Request) {
    peer.write_all(&request_frame(id, body)).unwrap();
}

/// Opens the Gadget Zero on a connection greeted by hand (request ids 1 to
/// 3) in its loopback configuration; its handle.
fn open_loopback_by_hand(peer: &mut std::os::unix::net::UnixStream) -> Handle {
    let handle = open_zero_by_hand(peer);
    send_request(
        peer,
        3,
        Request::SetConfiguration {
            handle,
            value: zero::CONFIG_LOOPBACK,
        },
    );
    match read_message(peer) {
        Some(Message::Reply {
            id: 3,
            body: Ok(Reply::Done),
        }) => handle,
        other => panic!("{other:?}"),
    }
}

/// One request, framed by hand.
fn request_frame(id: u64, body: Request) -> Vec<u8> {
    raw_frame(&rmp_serde::to_vec(&Message::Request { id, body }).unwrap())
}

/// Lists the devices and opens the Gadget Zero on a connection greeted by
/// hand (request ids 1 and 2); its handle.
fn open_zero_by_hand(peer: &mut std::os::unix::net::UnixStream) -> Handle {
    peer.write_all(&request_frame(1, Request::ListDevices))
        .unwrap();
    let key = match read_message(peer) {
        Some(Message::Reply {
            id: 1,
            body: Ok(Reply::Devices(devices)),
        }) => {
            devices
                .into_iter()
                .find(|d| (d.key.vid, d.key.pid) == ZERO)
                .unwrap()
                .key
        }
        other => panic!("{other:?}"),
    };
    peer.write_all(&request_frame(2, Request::Open { key }))
        .unwrap();
    match read_message(peer) {
        Some(Message::Reply {
            id: 2,
            body: Ok(Reply::Opened { handle, .. }),
        }) => handle,
        other => panic!("open failed: {other:?}"),
    }
}

/// A connection to the helper that exchanged hellos by hand, without the
/// link client, so that a test can go on to send what no client would.
fn greeted_by_hand(socket: &std::path::Path) -> std::os::unix::net::UnixStream {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&raw_frame(&rmp_hello())).unwrap();
    assert!(matches!(read_message(&mut stream), Some(Message::Hello(_))));
    stream
}

fn rmp_hello() -> Vec<u8> {
    rmp_serde::to_vec(&Message::Hello(p2p_usb_common::proto::Hello::new(
        "raw-test",
    )))
    .unwrap()
}

fn unknown_request(id: u64) -> Vec<u8> {
    use rmpv::Value;
    let value = Value::Map(vec![(
        Value::from("Request"),
        Value::Array(vec![
            Value::from(id),
            Value::Map(vec![(Value::from("Frobnicate"), Value::Array(vec![]))]),
        ]),
    )]);
    let mut raw = Vec::new();
    rmpv::encode::write_value(&mut raw, &value).unwrap();
    raw
}

/// Opens the Gadget Zero and switches it to its loopback configuration with
/// a real SET_CONFIGURATION control transfer (mapped by the helper).
async fn open_loopback(link: &LinkClient) -> u32 {
    let dev = usb::find(link, ZERO.0, ZERO.1).await;
    let handle = usb::open_loopback(link, &dev.key).await;
    let config = control(
        link,
        handle,
        0x80,
        std_request::GET_CONFIGURATION,
        0,
        0,
        input(1),
    )
    .await
    .unwrap();
    assert_eq!(&config.data[..], [zero::CONFIG_LOOPBACK]);
    handle
}

#[test]
fn bulk_loopback_keeps_data_and_order_with_many_transfers_in_flight() {
    with_helper_link("", None, async |_, link, _| {
        let handle = open_loopback(link).await;
        let mut rng = rand::rng();
        let payloads: Vec<Bytes> = (0..64)
            .map(|i| {
                let len = if i % 9 == 0 {
                    0
                } else {
                    rng.random_range(1..=64 * 1024)
                };
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                Bytes::from(data)
            })
            .collect();
        let read_transfer = || transfer(handle, zero::EP_IN, input(64 * 1024));
        // 32 INs in flight before any data exists, then the OUTs.
        let mut reads = Vec::new();
        for _ in 0..32 {
            reads.push(usb::start(link, read_transfer()).await.1);
        }
        let mut writes = Vec::new();
        for payload in &payloads {
            writes.push(
                usb::start(link, transfer(handle, zero::EP_OUT, out(payload.clone())))
                    .await
                    .1,
            );
        }
        for _ in 32..64 {
            reads.push(usb::start(link, read_transfer()).await.1);
        }
        for (write, payload) in writes.into_iter().zip(&payloads) {
            assert_eq!(write.await.unwrap().actual_length as usize, payload.len());
        }
        for (i, (read, payload)) in reads.into_iter().zip(&payloads).enumerate() {
            let got = read.await.unwrap();
            assert_eq!(got.actual_length as usize, payload.len(), "transfer {i}");
            assert_eq!(got.data, *payload, "transfer {i} data");
        }
    });
}

#[test]
fn keyboard_types_its_text_on_the_interrupt_endpoint() {
    let typing = "[sim]\nkeyboard_text = \"Hello p2p\\n\"\n";
    with_helper_link(typing, None, async |_, link, _| {
        let (_, handle) = open_sim(link, KEYBOARD).await;
        let report_descriptor = control(
            link,
            handle,
            0x81,
            std_request::GET_DESCRIPTOR,
            0x2200,
            0,
            input(128),
        )
        .await
        .unwrap();
        assert_eq!(
            &report_descriptor.data[..],
            &keyboard::REPORT_DESCRIPTOR[..]
        );
        control(link, handle, 0x21, 0x0a, 0, 0, out(Bytes::new()))
            .await
            .unwrap();
        let mut reports = Vec::new();
        for _ in 0..20 {
            let report = usb::run(link, transfer(handle, keyboard::EP_REPORTS, input(8)))
                .await
                .unwrap();
            reports.push(<[u8; 8]>::try_from(&report.data[..]).unwrap());
        }
        assert_eq!(
            keyboard::text_of_reports(reports.iter().map(|r| &r[..])),
            "Hello p2p\n"
        );
        // Idle now: a poll stays pending until its timeout.
        let mut idle = transfer(handle, keyboard::EP_REPORTS, input(8));
        idle.timeout_ms = Some(200);
        assert_eq!(usb::run(link, idle).await.unwrap_err(), UsbError::Timeout);
    });
}

#[test]
fn stall_is_a_typed_error_and_clear_halt_recovers() {
    with_helper_link("", None, async |_, link, _| {
        let (_, handle) = open_sim(link, ZERO).await;
        let read = || usb::run(link, transfer(handle, zero::EP_IN, input(512)));
        let stall = || {
            vendor_command(
                link,
                handle,
                zero::control::STALL_ENDPOINT,
                zero::EP_IN.into(),
            )
        };
        assert_eq!(
            read().await.unwrap().data[..],
            zero::expected_source_data(512)[..]
        );
        stall().await;
        assert_eq!(read().await.unwrap_err(), UsbError::Stall);
        assert_eq!(read().await.unwrap_err(), UsbError::Stall, "stays halted");
        let status = control(
            link,
            handle,
            0x82,
            std_request::GET_STATUS,
            0,
            zero::EP_IN.into(),
            input(2),
        )
        .await
        .unwrap();
        assert_eq!(status.data[0], 1, "GET_STATUS reports the halt");
        // CLEAR_FEATURE(ENDPOINT_HALT) as a host sends it.
        control(
            link,
            handle,
            0x02,
            std_request::CLEAR_FEATURE,
            std_request::ENDPOINT_HALT,
            zero::EP_IN.into(),
            out(Bytes::new()),
        )
        .await
        .unwrap();
        assert_eq!(read().await.unwrap().actual_length, 512);
        // The explicit request does the same.
        stall().await;
        assert_eq!(read().await.unwrap_err(), UsbError::Stall);
        assert_eq!(
            link.request(Request::ClearHalt {
                handle,
                endpoint: zero::EP_IN
            })
            .await
            .unwrap(),
            Reply::Done
        );
        assert!(read().await.is_ok());
    });
}

#[test]
fn unplug_fails_pending_transfers_and_replug_announces_the_device() {
    with_helper_link("", None, async |_, link, events| {
        let handle = open_loopback(link).await;
        let key = usb::find(link, ZERO.0, ZERO.1).await.key;
        let mut pending = Vec::new();
        for _ in 0..8 {
            pending.push(
                usb::start(link, transfer(handle, zero::EP_IN, input(512)))
                    .await
                    .1,
            );
        }
        vendor_command(link, handle, zero::control::UNPLUG, 500).await;
        for transfer in pending {
            assert_eq!(transfer.await.unwrap_err(), UsbError::NoDevice);
        }
        assert_eq!(
            usb::next_event(events, Duration::from_secs(2)).await,
            Event::DeviceLeft { key: key.clone() }
        );
        assert_eq!(
            usb::run(link, transfer(handle, zero::EP_IN, input(512)))
                .await
                .unwrap_err(),
            UsbError::Invalid(format!("no open device with handle {handle}")),
            "the stale handle is gone"
        );
        match usb::next_event(events, Duration::from_secs(3)).await {
            Event::DeviceArrived(device) => assert_eq!(device.key, key),
            other => panic!("{other:?}"),
        }
        let again = usb::open(link, &key).await.expect("reopen after replug");
        assert!(
            usb::run(link, transfer(again, zero::EP_IN, input(512)))
                .await
                .is_ok()
        );
    });
}

#[test]
fn a_connection_that_missed_a_replug_is_told_once_it_catches_up() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    with_helper_link("", None, async |helper, replugger, events| {
        // A peer that asks and does not read: once the socket is full both
        // ways, its connection waits to send a reply, takes no hotplug
        // events and stops reading requests. Requests are sent until they
        // stop going out.
        let mut stalled = greeted_by_hand(&helper.socket);
        let mut flood = stalled.try_clone().unwrap();
        let (sent, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        // The last request, sent once told to stop, has its own id: its
        // reply is the last one.
        const LAST: u64 = u64::MAX;
        let writer = std::thread::spawn({
            let (sent, stop) = (sent.clone(), stop.clone());
            move || {
                let mut id = 0;
                while !stop.load(Ordering::Acquire) {
                    id += 1;
                    flood
                        .write_all(&request_frame(id, Request::ListDevices))
                        .unwrap();
                    sent.store(id, Ordering::Release);
                }
                flood
                    .write_all(&request_frame(LAST, Request::ListDevices))
                    .unwrap();
            }
        });
        let mut last = 0;
        let mut still_since = Instant::now();
        while still_since.elapsed() < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = sent.load(Ordering::Acquire);
            if now != last {
                (last, still_since) = (now, Instant::now());
            }
            assert!(
                last < 2_000_000,
                "the helper kept reading a peer that does not read"
            );
        }

        // Meanwhile the Gadget Zero is unplugged and plugged in again, more
        // often than the stalled connection's event queue holds.
        let before = usb::find(replugger, ZERO.0, ZERO.1).await;
        let replugs = p2p_usb_helper::backend::HOTPLUG_QUEUE / 2 + 8;
        for _ in 0..replugs {
            let (_, handle) = open_sim(replugger, ZERO).await;
            vendor_command(replugger, handle, zero::control::UNPLUG, 1).await;
            loop {
                if let Event::DeviceArrived(_) =
                    usb::next_event(events, Duration::from_secs(5)).await
                {
                    break;
                }
            }
        }
        let after = usb::find(replugger, ZERO.0, ZERO.1).await;
        assert_ne!(
            before.address, after.address,
            "every replug is a new address"
        );

        // Read everything: the stalled peer learns of the replug exactly
        // once, with the device's current address.
        stop.store(true, Ordering::Release);
        let reader = tokio::task::spawn_blocking(move || {
            stalled
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut told = Vec::new();
            loop {
                match read_message(&mut stalled) {
                    Some(Message::Reply {
                        id,
                        body: Ok(Reply::Devices(_)),
                    }) => {
                        if id == LAST {
                            break;
                        }
                    }
                    Some(Message::Event(event)) => told.push(event),
                    other => panic!("{other:?}"),
                }
            }
            writer.join().unwrap();
            stalled
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            while let Some(message) = read_message(&mut stalled) {
                match message {
                    Message::Event(event) => told.push(event),
                    other => panic!("{other:?}"),
                }
            }
            told
        });
        let told = reader.await.unwrap();
        let told: Vec<String> = told
            .iter()
            .map(|event| match event {
                Event::DeviceLeft { key } => format!("{key} left"),
                Event::DeviceArrived(device) => {
                    format!("{} arrived at address {}", device.key, device.address)
                }
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            told,
            [
                format!("{} left", before.key),
                format!("{} arrived at address {}", after.key, after.address),
            ]
        );
    });
}

#[test]
fn cancel_cancels_one_transfer_and_spares_the_others() {
    with_helper_link("", None, async |_, link, _| {
        let handle = open_loopback(link).await;
        let (_, first) = usb::start(link, transfer(handle, zero::EP_IN, input(512))).await;
        let (victim, cancelled) = usb::start(link, transfer(handle, zero::EP_IN, input(512))).await;
        let (_, third) = usb::start(link, transfer(handle, zero::EP_IN, input(512))).await;
        assert_eq!(
            link.request(Request::Cancel { request: victim })
                .await
                .unwrap(),
            Reply::Done
        );
        assert_eq!(cancelled.await.unwrap_err(), UsbError::Cancelled);
        for data in [&b"one"[..], b"two"] {
            usb::run(
                link,
                transfer(handle, zero::EP_OUT, out(Bytes::copy_from_slice(data))),
            )
            .await
            .unwrap();
        }
        assert_eq!(&first.await.unwrap().data[..], b"one");
        assert_eq!(&third.await.unwrap().data[..], b"two");
    });
}

#[test]
fn zero_length_packets_and_short_not_ok() {
    with_helper_link("", None, async |_, link, _| {
        let handle = open_loopback(link).await;
        let zlp = usb::run(link, transfer(handle, zero::EP_OUT, out(Bytes::new())))
            .await
            .unwrap();
        assert_eq!(zlp.actual_length, 0);
        let read = usb::run(link, transfer(handle, zero::EP_IN, input(512)))
            .await
            .unwrap();
        assert_eq!(
            read.actual_length, 0,
            "the zero-length packet comes back as one"
        );
        usb::run(
            link,
            transfer(handle, zero::EP_OUT, out(Bytes::from_static(b"short"))),
        )
        .await
        .unwrap();
        let mut strict = transfer(handle, zero::EP_IN, input(512));
        strict.flags.short_not_ok = true;
        // A failure that still carries what was read, as the kernel reports
        // -EREMOTEIO with the data.
        assert_eq!(
            link.request(Request::Submit(strict)).await,
            Ok(Reply::PartlyTransferred {
                error: UsbError::ShortPacket,
                completion: Completion {
                    actual_length: 5,
                    data: Bytes::from_static(b"short"),
                },
            })
        );
    });
}

#[test]
fn a_transfer_cut_short_by_a_stall_passes_on_what_moved() {
    with_helper_link("", None, async |_, link, _| {
        let (_, handle) = open_sim(link, ZERO).await;
        let stall_after = |bytes: u16| {
            control(
                link,
                handle,
                zero::control::VENDOR_OUT,
                zero::control::STALL_AFTER,
                bytes,
                zero::EP_IN.into(),
                out(Bytes::new()),
            )
        };
        stall_after(1000).await.unwrap();
        let read = || link.request(Request::Submit(transfer(handle, zero::EP_IN, input(4096))));
        match read().await {
            Ok(Reply::PartlyTransferred { error, completion }) => {
                assert_eq!(error, UsbError::Stall);
                assert_eq!(completion.actual_length, 1000);
                assert_eq!(completion.data[..], zero::expected_source_data(1000)[..]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(read().await, Err(UsbError::Stall), "the endpoint halted");
        link.request(Request::ClearHalt {
            handle,
            endpoint: zero::EP_IN,
        })
        .await
        .unwrap();
        match read().await {
            Ok(Reply::Transferred(completion)) => assert_eq!(completion.actual_length, 4096),
            other => panic!("{other:?}"),
        }
        // Cut before anything moved: a plain stall, no empty partial reply.
        stall_after(0).await.unwrap();
        assert_eq!(read().await, Err(UsbError::Stall));
    });
}

#[test]
fn isochronous_endpoints_are_refused_clearly() {
    with_helper_link("", None, async |_, link, _| {
        let (_, handle) = open_sim(link, ZERO).await;
        control(
            link,
            handle,
            0x01,
            std_request::SET_INTERFACE,
            1,
            0,
            out(Bytes::new()),
        )
        .await
        .unwrap();
        match usb::run(link, transfer(handle, 0x82, input(1024))).await {
            Err(UsbError::Unsupported(reason)) => {
                assert!(reason.contains("isochronous"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn share_ceiling_hides_devices_outside_it() {
    with_helper_link(
        "[[helper.share]]\nvid = 0x0525\npid = 0xa4ac\n",
        None,
        async |_, link, _| {
            let devices = usb::list(link).await;
            assert_eq!(devices.len(), 1);
            assert_eq!(devices[0].key.pid, KEYBOARD.1);
            let hidden: p2p_usb_common::proto::DeviceKey =
                "1-1/0525:a4a0/p2p-usb-sim-zero".parse().unwrap();
            assert!(matches!(
                usb::open(link, &hidden).await,
                Err(UsbError::NotFound(_))
            ));
        },
    );
}

#[test]
fn a_device_is_held_by_one_connection_and_released_when_it_drops() {
    with_helper_link("", None, async |helper, first, _| {
        let (second, _e2) = usb::connect(&helper.socket).await;
        let key = usb::find(first, ZERO.0, ZERO.1).await.key;
        let handle = open_loopback(first).await;
        let (_, pending) = usb::start(first, transfer(handle, zero::EP_IN, input(512))).await;
        assert!(matches!(
            usb::open(&second, &key).await,
            Err(UsbError::Busy(_))
        ));
        first.close();
        assert!(pending.await.is_err());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match usb::open(&second, &key).await {
                Ok(_) => break,
                Err(UsbError::Busy(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
}

#[test]
fn control_requests_reach_the_device_descriptors() {
    with_helper_link("", None, async |_, link, _| {
        let (dev, handle) = open_sim(link, ZERO).await;
        let descriptor = control(
            link,
            handle,
            0x80,
            std_request::GET_DESCRIPTOR,
            0x0100,
            0,
            input(18),
        )
        .await
        .unwrap();
        assert_eq!(descriptor.data, dev.descriptor.raw);
        let product = control(
            link,
            handle,
            0x80,
            std_request::GET_DESCRIPTOR,
            0x0302,
            0x0409,
            input(255),
        )
        .await
        .unwrap();
        assert_eq!(
            p2p_usb_common::descriptors::parse_string(&product.data).unwrap(),
            "Gadget Zero"
        );
        let written = Bytes::from_static(b"control write test");
        control(
            link,
            handle,
            zero::control::VENDOR_OUT,
            zero::control::WRITE_BUFFER,
            0,
            0,
            out(written.clone()),
        )
        .await
        .unwrap();
        let read = control(
            link,
            handle,
            zero::control::VENDOR_IN,
            zero::control::READ_BUFFER,
            0,
            0,
            input(64),
        )
        .await
        .unwrap();
        assert_eq!(read.data, written);
        let unknown = control(link, handle, zero::control::VENDOR_IN, 0x77, 0, 0, input(4)).await;
        assert_eq!(unknown.unwrap_err(), UsbError::Stall);
        // A malformed transfer is refused before it reaches the device.
        let bad = usb::run(
            link,
            p2p_usb_common::proto::Transfer {
                setup: Some(SetupPacket {
                    request_type: 0x80,
                    request: 6,
                    value: 0x100,
                    index: 0,
                    length: 4,
                }),
                ..transfer(handle, 0x80, TransferData::In { length: 64 })
            },
        )
        .await;
        assert!(matches!(bad, Err(UsbError::Invalid(_))), "{bad:?}");
    });
}

/// Runs the helper with `config` to its exit, for the tests of what it
/// refuses to start with.
fn run_helper(config: &std::path::Path) -> Output {
    Command::new(bin("p2p-usb-helper"))
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

#[test]
fn helper_refuses_root_and_bad_configuration_with_distinct_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("helper.sock");
    let config = write_sim_config(dir.path(), &socket, 0, "");
    if is_root() {
        let refused = run_helper(&config);
        assert_eq!(refused.status.code(), Some(p2p_usb_common::exit::NOPERM));
        assert!(String::from_utf8_lossy(&refused.stderr).contains("refusing to run as root"));
    }
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[helper]\nbackend = \"sim\"\nbackedn = \"nusb\"\n").unwrap();
    let failed = run_helper(&broken);
    assert_eq!(failed.status.code(), Some(p2p_usb_common::exit::CONFIG));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(&format!(
            "Failed to load configuration: {}:3:",
            broken.display()
        )) && stderr.contains("backedn"),
        "{stderr}"
    );
    let missing = run_helper(&dir.path().join("nope.toml"));
    assert_eq!(missing.status.code(), Some(p2p_usb_common::exit::CONFIG));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("Failed to load configuration"));
}

#[test]
fn helper_runs_unprivileged_with_no_capabilities() {
    if !is_root() {
        eprintln!("needs root to start the helper as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("helper.sock");
    let config = write_sim_config(dir.path(), &socket, 0, "");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut command = Command::new(bin("p2p-usb-helper"));
    command
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .uid(NOBODY)
        .gid(NOBODY);
    let helper = Process::spawn(command, dir.path().join("helper.log"));
    wait_for_path(&socket, Duration::from_secs(10));
    let log = helper.output();
    assert!(
        log.contains(&format!("uid={NOBODY} euid={NOBODY}")),
        "{log}"
    );
    assert!(log.contains("effective caps=[] permitted caps=[]"), "{log}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", helper.pid())).unwrap();
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(cap_eff.ends_with("0000000000000000"), "{cap_eff}");
    assert!(
        status.lines().any(|l| l.starts_with("NoNewPrivs:\t1")),
        "{status}"
    );
    // It serves root (allowed_users = [0]) while running as nobody.
    assert!(helper_says_hello(&socket).is_ok());
}
