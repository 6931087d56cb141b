//! The server (real helper and agent binaries) reached over iroh by an
//! in-process client: direct and relayed paths, approval, sharing, restarts.

use std::time::Duration;

use bytes::Bytes;
use iroh::EndpointAddr;
use iroh::endpoint::Connection;
use p2p_usb_agent::client::{self, Client, ClientError};
use p2p_usb_agent::control::{ControlReply, ControlRequest};
use p2p_usb_agent::net;
use p2p_usb_common::gadget::zero;
use p2p_usb_common::link::LinkClient;
use p2p_usb_common::proto::{Event, Reply, Request, UsbError};
use p2p_usb_tests::server::{
    Network, ServerUnderTest, approving, start_client, start_with_approved_client,
};
use p2p_usb_tests::usb::{self, input, out, transfer};
use tokio::sync::mpsc;

/// Connects `client` to `addr` and asks for a session; the connection comes
/// back too, for the tests that watch it or open more sessions on it.
async fn try_open_session(
    client: &Client,
    addr: &EndpointAddr,
) -> Result<(Connection, LinkClient, mpsc::Receiver<Event>), ClientError> {
    let connection = client.connect(addr).await?;
    let (session, events) = client.session(&connection).await?;
    Ok((connection, session, events))
}

/// [`try_open_session`] for a client the server lets in.
async fn open_session(
    client: &Client,
    addr: &EndpointAddr,
) -> (Connection, LinkClient, mpsc::Receiver<Event>) {
    try_open_session(client, addr)
        .await
        .expect("an approved client gets a session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_client_uses_devices_over_a_direct_iroh_path() {
    let dir = tempfile::tempdir().unwrap();
    let (client, server) = start_with_approved_client(dir.path(), "auto_share = true").await;
    server
        .agent_notify
        .wait_for("READY=1", Duration::from_secs(15));

    let addr = server.addr().await;
    assert_eq!(addr.id.to_string(), server.id().await);
    // On start the agent prints its id and a ticket for the operator.
    let agent = server.agent.as_ref().unwrap();
    let printed = format!("Server NodeId: {}\n", server.id().await);
    tokio::time::timeout(Duration::from_secs(10), async {
        while !(agent.output().contains(&printed) && agent.output().contains("\nTicket: ")) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no NodeId and ticket lines:\n{}", agent.output()));
    let (_connection, session, _events) = open_session(&client, &addr).await;
    let devices = client::list_devices(&session).await.unwrap();
    assert_eq!(devices.len(), 2, "{devices:?}");

    // The same vocabulary as on the helper link, end to end.
    let zero_key = devices
        .iter()
        .find(|d| d.key.pid == zero::PID)
        .unwrap()
        .key
        .clone();
    let handle = usb::open_loopback(&session, &zero_key).await;
    let data = Bytes::from((0..5000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    usb::run(&session, transfer(handle, zero::EP_OUT, out(data.clone())))
        .await
        .unwrap();
    let back = usb::run(&session, transfer(handle, zero::EP_IN, input(8192)))
        .await
        .unwrap();
    assert_eq!(back.data, data);

    let status = server
        .agent_notify
        .wait_for("STATUS=NodeId", Duration::from_secs(10));
    assert!(status.text.contains(&server.id().await), "{status:?}");
    match server.control(ControlRequest::Clients).await {
        ControlReply::Clients(clients) => {
            assert_eq!(clients.len(), 1);
            assert_eq!(clients[0].id, client.id().to_string());
            assert_eq!(clients[0].devices, vec![zero_key.to_string()]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unapproved_client_is_pending_until_approved_and_revoke_cuts_it_off() {
    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), &Network::Loopback).await;
    let server = ServerUnderTest::start(
        "require_approval = true",
        "auto_share = true",
        Network::Loopback,
    );
    let addr = server.addr().await;

    match try_open_session(&client, &addr).await {
        Err(ClientError::NotApproved { client: id, .. }) => assert_eq!(id, client.id()),
        Err(other) => panic!("expected NotApproved, got {other}"),
        Ok(_) => panic!("an unapproved client got a session"),
    }
    match server.control(ControlRequest::Pending).await {
        ControlReply::Pending(pending) => {
            assert_eq!(pending.len(), 1, "{pending:?}");
            assert_eq!(pending[0].id, client.id().to_string());
        }
        other => panic!("{other:?}"),
    }
    assert!(
        server
            .agent_log()
            .contains(&format!("p2p-usb-agent approve {}", client.id()))
    );

    let approval = server
        .control(ControlRequest::Approve(client.id().to_string()))
        .await;
    assert!(matches!(approval, ControlReply::Done(_)), "{approval:?}");
    let (connection, session, _events) = open_session(&client, &addr).await;
    assert_eq!(client::list_devices(&session).await.unwrap().len(), 2);

    server
        .control(ControlRequest::Revoke(client.id().to_string()))
        .await;
    let reason = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("revoked"), "{reason}");
    assert!(
        matches!(
            try_open_session(&client, &addr).await,
            Err(ClientError::NotApproved { .. })
        ),
        "revoked client got back in"
    );

    let malformed = server
        .control(ControlRequest::Approve("not-an-id".into()))
        .await;
    assert!(
        matches!(malformed, ControlReply::Failed(ref text) if text.contains("not-an-id")),
        "{malformed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_shared_devices_are_visible_and_unsharing_withdraws_them() {
    let dir = tempfile::tempdir().unwrap();
    let (client, mut server) = start_with_approved_client(dir.path(), "auto_share = false").await;
    let (_connection, session, mut events) = open_session(&client, &server.addr().await).await;
    assert!(
        client::list_devices(&session).await.unwrap().is_empty(),
        "nothing shared by default"
    );
    let hidden = "1-1/0525:a4a0/p2p-usb-sim-zero".parse().unwrap();
    assert!(matches!(
        usb::open(&session, &hidden).await,
        Err(UsbError::NotShared(_))
    ));

    let shared = server
        .control(ControlRequest::Share(hidden.to_string()))
        .await;
    assert!(matches!(shared, ControlReply::Done(_)), "{shared:?}");
    match usb::next_event(&mut events, Duration::from_secs(5)).await {
        Event::DeviceArrived(device) => assert_eq!(device.key, hidden, "share is announced"),
        other => panic!("{other:?}"),
    }
    let devices = client::list_devices(&session).await.unwrap();
    assert_eq!(devices.len(), 1);
    let handle = usb::open(&session, &hidden).await.unwrap();
    assert!(
        usb::run(&session, transfer(handle, zero::EP_IN, input(64)))
            .await
            .is_ok()
    );

    server
        .control(ControlRequest::Unshare(hidden.to_string()))
        .await;
    assert_eq!(
        usb::next_event(&mut events, Duration::from_secs(5)).await,
        Event::DeviceLeft {
            key: hidden.clone()
        }
    );
    assert!(
        usb::run(&session, transfer(handle, zero::EP_IN, input(64)))
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.recv())
            .await
            .is_err(),
        "the device left once"
    );
    assert!(client::list_devices(&session).await.unwrap().is_empty());
    // Shares survive an agent restart.
    server
        .control(ControlRequest::Share(hidden.to_string()))
        .await;
    let agent = server.agent.as_mut().unwrap();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent
        .wait_timeout(Duration::from_secs(10))
        .expect("agent stops");
    server.start_agent();
    let listed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let ControlReply::Devices(devices) = server.control(ControlRequest::Devices).await
                && let Some(device) = devices.into_iter().find(|d| d.device.key == hidden)
            {
                return device;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the restarted agent lists the device");
    assert!(listed.shared, "the share was kept across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_path_through_a_local_relay() {
    let mut relay_config = iroh_relay::server::RelayConfig::new((std::net::Ipv4Addr::LOCALHOST, 0));
    relay_config.tls = None;
    let mut config = iroh_relay::server::ServerConfig::default();
    config.relay = Some(relay_config);
    config.quic = None;
    let relay = iroh_relay::server::Server::spawn(config).await.unwrap();
    let url = format!("http://{}", relay.http_addr().unwrap());
    let network = Network::RelayOnly(url.clone());

    let dir = tempfile::tempdir().unwrap();
    let client = start_client(dir.path(), &network).await;
    let server = ServerUnderTest::start(&approving(client.id()), "auto_share = true", network);
    // The ticket carries only the relay: there are no direct addresses.
    let ticket = loop {
        let ticket = server.ticket().await;
        if net::parse_server(&ticket)
            .unwrap()
            .relay_urls()
            .next()
            .is_some()
        {
            break ticket;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let addr = net::parse_server(&ticket).unwrap();
    assert!(addr.ip_addrs().next().is_none(), "{addr:?}");
    let before = relay.metrics().server.bytes_recv.get();
    let (connection, session, _events) = open_session(&client, &addr).await;
    let devices = client::list_devices(&session).await.unwrap();
    assert_eq!(devices.len(), 2);
    let paths = connection.paths();
    assert!(
        !paths.is_empty() && paths.iter().all(|p| p.is_relay()),
        "every path is relayed"
    );
    assert!(
        relay.metrics().server.bytes_recv.get() > before,
        "traffic went through the relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_an_agent_restart_by_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let (client, mut server) = start_with_approved_client(dir.path(), "auto_share = true").await;
    let addr = server.addr().await;
    let (_connection, session, _events) = open_session(&client, &addr).await;
    let key = client::list_devices(&session).await.unwrap()[0].key.clone();
    let handle = usb::open_loopback(&session, &key).await;
    let (_, pending) = usb::start(&session, transfer(handle, zero::EP_IN, input(512))).await;

    server
        .agent
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGKILL);
    server.agent = None;
    let failed = tokio::time::timeout(Duration::from_secs(45), pending)
        .await
        .expect("in-flight transfer ends");
    assert!(
        failed.is_err(),
        "an in-flight transfer fails, it is not replayed"
    );

    // Same state dir: same identity, same port; the helper released the device.
    server.start_agent();
    let (_connection, session, _events) = open_session(&client, &addr).await;
    let handle = usb::open(&session, &key)
        .await
        .expect("device was released by the dead agent's session");
    // The device kept its loopback configuration; nothing stale is left in it.
    usb::run(
        &session,
        transfer(handle, zero::EP_OUT, out(Bytes::from_static(b"fresh"))),
    )
    .await
    .unwrap();
    let read = usb::run(&session, transfer(handle, zero::EP_IN, input(512)))
        .await
        .unwrap();
    assert_eq!(&read.data[..], b"fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stop_notifies_clients_and_finishes_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let (client, mut server) = start_with_approved_client(dir.path(), "auto_share = true").await;
    server
        .agent_notify
        .wait_for("READY=1", Duration::from_secs(15));
    let addr = server.addr().await;
    let (_connection, session, mut events) = open_session(&client, &addr).await;
    let key = client::list_devices(&session).await.unwrap()[0].key.clone();
    usb::open(&session, &key).await.unwrap();

    let started = std::time::Instant::now();
    let agent = server.agent.as_mut().unwrap();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    match usb::next_event(&mut events, Duration::from_secs(5)).await {
        Event::ShuttingDown { reason } => assert!(reason.contains("shutting down"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let status = agent
        .wait_timeout(Duration::from_secs(10))
        .expect("stops within 10 s");
    assert!(status.success(), "{}", agent.output());
    assert!(started.elapsed() < Duration::from_secs(10));
    server
        .agent_notify
        .wait_for("STOPPING=1", Duration::from_secs(1));
    // Its device went back: a fresh agent can open it at once.
    server.start_agent();
    let (_connection, session, _events) = open_session(&client, &addr).await;
    assert!(usb::open(&session, &key).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_approved_clients_entry_is_a_config_error() {
    let server_dir = tempfile::tempdir().unwrap();
    let config = server_dir.path().join("server.toml");
    std::fs::write(
        &config,
        "[security]\napproved_clients = [\n  \"0000\",\n]\n[agent]\nstate_dir = \"/tmp/x-p2p\"\n",
    )
    .unwrap();
    let mut agent = std::process::Command::new(p2p_usb_tests::bin("p2p-usb-agent"));
    agent.arg("--config").arg(&config).arg("serve");
    if p2p_usb_tests::is_root() {
        agent.arg("--allow-root");
    }
    let output = agent.output().unwrap();
    assert_eq!(output.status.code(), Some(p2p_usb_common::exit::CONFIG));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:3:3", config.display())) && stderr.contains("0000"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_devices_and_explains_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let client_key = dir.path().join("cli.key");
    let id = p2p_usb_agent::identity::load_or_create(&client_key)
        .unwrap()
        .public();
    let server = ServerUnderTest::start(&approving(id), "auto_share = true", Network::Loopback);
    let ticket = server.ticket().await;
    let client_config = dir.path().join("client.toml");
    std::fs::write(
        &client_config,
        format!(
            "[client]\nsecret_key = \"{}\"\n\n[[servers]]\nname = \"lab\"\nid = \"{}\"\naddrs = [\"{}\"]\n\n[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"127.0.0.1:0\"\ndns_discovery = false\n",
            client_key.display(),
            server.id().await,
            net::parse_server(&ticket).unwrap().ip_addrs().next().unwrap()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(p2p_usb_tests::bin("p2p-usb"))
            .arg("--config")
            .arg(&client_config)
            .args(args)
            .output()
            .unwrap()
    };
    let id_out = run(&["id"]);
    assert_eq!(
        String::from_utf8_lossy(&id_out.stdout).trim(),
        id.to_string()
    );
    for server_arg in ["lab", ticket.as_str()] {
        let listed = run(&["list", server_arg]);
        let table = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        assert!(
            table.contains("BUSID") && table.contains("0525:a4a0") && table.contains("0525:a4ac"),
            "{table}"
        );
    }
    server.control(ControlRequest::Revoke(id.to_string())).await;
    let refused = run(&["list", "lab"]);
    assert_eq!(refused.status.code(), Some(p2p_usb_common::exit::NOPERM));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("p2p-usb-agent approve {id}")),
        "{stderr}"
    );
    let unknown = run(&["list", "nowhere"]);
    assert_eq!(unknown.status.code(), Some(p2p_usb_common::exit::DATA));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_authorized_per_session_and_replies_stay_matched() {
    let dir = tempfile::tempdir().unwrap();
    let (client, server) = start_with_approved_client(dir.path(), "auto_share = true").await;
    // Two sessions on one connection have separate handles on the server.
    let (connection, first, _e1) = open_session(&client, &server.addr().await).await;
    let (second, _e2) = client.session(&connection).await.unwrap();
    let key = client::list_devices(&first).await.unwrap()[0].key.clone();
    let handle = usb::open(&first, &key).await.unwrap();
    assert!(matches!(
        usb::open(&second, &key).await,
        Err(UsbError::Busy(_))
    ));
    let stolen = usb::run(&second, transfer(handle, zero::EP_IN, input(64))).await;
    assert!(
        matches!(stolen, Err(UsbError::Invalid(_))),
        "a handle of another session is unknown: {stolen:?}"
    );
    assert_eq!(
        first.request(Request::Close { handle }).await.unwrap(),
        Reply::Done
    );
    assert!(usb::open(&second, &key).await.is_ok());
}

/// The next message of a session read as raw frames, within 10 s.
async fn next_message(
    reader: &mut tokio_util::codec::FramedRead<
        iroh::endpoint::RecvStream,
        p2p_usb_common::codec::MessageCodec,
    >,
) -> p2p_usb_common::proto::Message {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .expect("a message in time")
        .expect("stream open")
        .unwrap()
        .unwrap()
}

/// A transfer cut short reaches each client as it can read it: with what
/// moved for a client that names `partial-transfers` in its hello, as the
/// error alone for one of an earlier release that does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_short_reaches_each_client_as_it_can_read_it() {
    use futures_util::SinkExt;
    use p2p_usb_common::codec::MessageCodec;
    use p2p_usb_common::proto::{CAP_PARTIAL_TRANSFERS, Hello, Message};
    use tokio_util::codec::{FramedRead, FramedWrite};

    let dir = tempfile::tempdir().unwrap();
    let (client, server) = start_with_approved_client(dir.path(), "auto_share = true").await;
    let addr = server.addr().await;
    let cut_after_1000 = |handle| {
        Request::Submit(usb::control_transfer(
            handle,
            zero::control::VENDOR_OUT,
            zero::control::STALL_AFTER,
            1000,
            zero::EP_IN.into(),
            out(Bytes::new()),
        ))
    };
    let read = |handle| Request::Submit(transfer(handle, zero::EP_IN, input(4096)));

    let (_connection, session, _events) = open_session(&client, &addr).await;
    let key = usb::find(&session, zero::VID, zero::PID).await.key;
    let handle = usb::open(&session, &key).await.unwrap();
    session.request(cut_after_1000(handle)).await.unwrap();
    match session.request(read(handle)).await {
        Ok(Reply::PartlyTransferred { error, completion }) => {
            assert_eq!((error, completion.data.len()), (UsbError::Stall, 1000));
        }
        other => panic!("{other:?}"),
    }
    session.request(Request::Close { handle }).await.unwrap();

    // A client of an earlier release, speaking raw frames.
    let connection = client.connect(&addr).await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let mut reader = FramedRead::new(recv, MessageCodec::default());
    let mut writer = FramedWrite::new(send, MessageCodec::default());
    let mut hello = Hello::new("earlier-release");
    hello.capabilities.retain(|c| c != CAP_PARTIAL_TRANSFERS);
    writer.send(Message::Hello(hello)).await.unwrap();
    let mut ask = async |id, body| {
        writer.send(Message::Request { id, body }).await.unwrap();
        loop {
            if let Message::Reply { id: got, body } = next_message(&mut reader).await
                && got == id
            {
                return body;
            }
        }
    };
    let handle = match ask(1, Request::Open { key }).await {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    ask(2, cut_after_1000(handle)).await.unwrap();
    assert_eq!(ask(3, read(handle)).await, Err(UsbError::Stall));
}

/// A client that reuses request ids (the protocol does not forbid it) must
/// not get past the share filter: every device list is filtered, and every
/// open the helper grants is known to the agent, so unsharing withdraws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_request_ids_do_not_get_past_the_share_filter() {
    use p2p_usb_common::codec::{FrameWriter, MessageCodec};
    use p2p_usb_common::proto::Message;
    use tokio_util::codec::{FramedRead, FramedWrite};

    let dir = tempfile::tempdir().unwrap();
    let (client, server) = start_with_approved_client(dir.path(), "auto_share = false").await;
    let zero_key: p2p_usb_common::proto::DeviceKey =
        "1-1/0525:a4a0/p2p-usb-sim-zero".parse().unwrap();
    let shared = server
        .control(ControlRequest::Share(zero_key.to_string()))
        .await;
    assert!(matches!(shared, ControlReply::Done(_)), "{shared:?}");

    let connection = client.connect(&server.addr().await).await.unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let mut reader = FramedRead::new(recv, MessageCodec::default());
    let mut writer = FramedWrite::new(send, MessageCodec::default());
    p2p_usb_common::link::handshake(&mut reader, &mut writer, "raw-test")
        .await
        .unwrap();
    let mut writer = FrameWriter::new(writer.into_inner());
    let mut next = async || loop {
        match next_message(&mut reader).await {
            Message::Event(Event::DeviceArrived(_)) => continue,
            other => return other,
        }
    };

    // The same id twice, in one write: both replies are filtered.
    for _ in 0..2 {
        writer
            .queue(&Message::Request {
                id: 1,
                body: Request::ListDevices,
            })
            .unwrap();
    }
    writer.flush().await.unwrap();
    for _ in 0..2 {
        match next().await {
            Message::Reply {
                id: 1,
                body: Ok(Reply::Devices(devices)),
            } => {
                let keys: Vec<_> = devices.iter().map(|d| d.key.clone()).collect();
                assert_eq!(keys, vec![zero_key.clone()], "only the shared device");
            }
            other => panic!("{other:?}"),
        }
    }

    // A cancel and an open under one id: the open is still recorded.
    writer
        .queue(&Message::Request {
            id: 5,
            body: Request::Cancel { request: 99 },
        })
        .unwrap();
    writer
        .queue(&Message::Request {
            id: 5,
            body: Request::Open {
                key: zero_key.clone(),
            },
        })
        .unwrap();
    writer.flush().await.unwrap();
    let mut handle = None;
    for _ in 0..2 {
        match next().await {
            Message::Reply {
                id: 5,
                body: Ok(Reply::Opened { handle: h, .. }),
            } => handle = Some(h),
            Message::Reply {
                id: 5,
                body: Ok(Reply::Done),
            } => {}
            other => panic!("{other:?}"),
        }
    }
    let handle = handle.expect("the open succeeded");
    server
        .control(ControlRequest::Unshare(zero_key.to_string()))
        .await;
    assert_eq!(
        next().await,
        Message::Event(Event::DeviceLeft {
            key: zero_key.clone()
        }),
        "the agent withdrew the device it saw opened"
    );
    writer
        .send(&Message::Request {
            id: 6,
            body: Request::Submit(transfer(handle, zero::EP_IN, input(64))),
        })
        .await
        .unwrap();
    match next().await {
        Message::Reply { id: 6, body } => assert!(body.is_err(), "{body:?}"),
        other => panic!("{other:?}"),
    }
}

/// A network namespace with a veth pair to the test's namespace, removed on drop.
struct Netns {
    name: String,
    host_side: String,
    /// The link is 10.199.SUBNET.0/24: .1 on the test's side, .2 inside.
    subnet: u8,
}

impl Netns {
    /// A new namespace; names and subnet are unique per call within the
    /// process (tests run in parallel) and differ between processes.
    fn create() -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        assert!(n < 4, "four namespaces per test process at most");
        let subnet = (20 + (pid % 50) * 4 + n) as u8;
        let name = format!("p2pusb{pid}n{n}");
        let host_side = format!("p2pu{}{n}a", pid % 100000);
        let peer_side = format!("p2pu{}{n}b", pid % 100000);
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("run ip");
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_side, "type", "veth", "peer", "name", &peer_side,
        ]);
        ip(&["link", "set", &peer_side, "netns", &name]);
        ip(&[
            "addr",
            "add",
            &format!("10.199.{subnet}.1/24"),
            "dev",
            &host_side,
        ]);
        ip(&["link", "set", &host_side, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.199.{subnet}.2/24"),
            "dev",
            &peer_side,
        ]);
        ip(&["-n", &name, "link", "set", &peer_side, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        // Multicast (mDNS) leaves by the veth: the namespace has no default route.
        ip(&[
            "-n",
            &name,
            "route",
            "add",
            "224.0.0.0/4",
            "dev",
            &peer_side,
        ]);
        Netns {
            name,
            host_side,
            subnet,
        }
    }

    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let status = std::process::Command::new("ip")
            .args(["link", "set", &self.host_side, state])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_side])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_network_fails_in_flight_transfers_and_the_client_comes_back() {
    if !p2p_usb_tests::is_root() {
        eprintln!("needs root to create network namespaces");
        return;
    }
    let netns = Netns::create();
    let subnet = netns.subnet;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("client.key");
    let text = format!(
        "[client]\nsecret_key = \"{}\"\n\n[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"10.199.{subnet}.1:0\"\ndns_discovery = false\n",
        key.display()
    );
    let config =
        p2p_usb_common::config::ConfigFile::parse(std::path::Path::new("client.toml"), text)
            .unwrap();
    let client = p2p_usb_agent::client::Client::start(config).await.unwrap();
    let server_addr = format!(
        "10.199.{subnet}.2:{}",
        p2p_usb_tests::server::free_udp_port()
    );
    let server = ServerUnderTest::start_in(
        &approving(client.id()),
        "auto_share = true",
        Network::Bind(server_addr),
        Some(&netns.name),
    );
    let addr = server.addr().await;
    let (_connection, session, _events) = open_session(&client, &addr).await;
    let key = client::list_devices(&session).await.unwrap()[0].key.clone();
    let handle = usb::open_loopback(&session, &key).await;
    let (_, pending) = usb::start(&session, transfer(handle, zero::EP_IN, input(512))).await;

    netns.link(false);
    let ended = tokio::time::timeout(Duration::from_secs(90), pending)
        .await
        .expect("the cut is noticed");
    assert!(
        ended.is_err(),
        "the in-flight transfer failed (never replayed): {ended:?}"
    );
    assert!(session.is_closed());

    netns.link(true);
    // The server's session died with the connection; the device is free again.
    let reconnected = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok((connection, session, events)) = try_open_session(&client, &addr).await
                && let Ok(handle) = usb::open(&session, &key).await
            {
                break (connection, session, events, handle);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .expect("back within a minute");
    let (_connection, session, _events, handle) = reconnected;
    usb::run(
        &session,
        transfer(handle, zero::EP_OUT, out(Bytes::from_static(b"again"))),
    )
    .await
    .unwrap();
    assert_eq!(
        &usb::run(&session, transfer(handle, zero::EP_IN, input(512)))
            .await
            .unwrap()
            .data[..],
        b"again"
    );
}

#[test]
fn local_network_discovery_finds_a_server_by_its_endpoint_id_alone() {
    if !p2p_usb_tests::is_root() {
        eprintln!("needs root to create a network namespace");
        return;
    }
    // Everything, multicast included, stays inside a namespace of the test's own.
    let netns = Netns::create();
    let subnet = netns.subnet;
    let dir = tempfile::tempdir().unwrap();
    let client_config = |local_discovery: bool| {
        let path = dir.path().join(format!("client-{local_discovery}.toml"));
        std::fs::write(
            &path,
            format!(
                "[client]\nsecret_key = \"{}\"\n\n[iroh]\nrelay_mode = \"disabled\"\nbind_addr = \"10.199.{subnet}.2:0\"\ndns_discovery = false\nlocal_discovery = {local_discovery}\n",
                dir.path().join("client.key").display()
            ),
        )
        .unwrap();
        path
    };
    let p2p_usb = |config: &std::path::Path, args: &[&str]| {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(p2p_usb_tests::bin("p2p-usb"))
            .arg("--config")
            .arg(config)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let with_mdns = client_config(true);
    let (code, client_id, err) = p2p_usb(&with_mdns, &["id"]);
    assert_eq!(code, Some(0), "{err}");
    let server = ServerUnderTest::start_in(
        &approving(client_id.trim()),
        "auto_share = true",
        Network::LocalDiscovery(format!(
            "10.199.{subnet}.2:{}",
            p2p_usb_tests::server::free_udp_port()
        )),
        Some(&netns.name),
    );
    let server_id = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(server.id());

    // Without local discovery an EndpointId alone leads nowhere here (no
    // relay, no DNS): the control case.
    let (code, _, err) = p2p_usb(&client_config(false), &["list", &server_id]);
    assert_ne!(code, Some(0), "found without discovery?\n{err}");
    // With it, the server's announcement supplies the address.
    let listed = (0..5)
        .map(|_| p2p_usb(&with_mdns, &["list", &server_id]))
        .find(|(code, _, _)| *code == Some(0));
    let (_, table, _) = listed.unwrap_or_else(|| {
        panic!(
            "not found by mDNS: {:?}",
            p2p_usb(&with_mdns, &["list", &server_id])
        )
    });
    assert!(table.contains("0525:a4a0"), "{table}");
}
