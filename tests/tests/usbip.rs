//! The client's USB/IP gateway, driven by a USB/IP client over loopback TCP:
//! device list, import, URBs, unlink races, flags, bad input, and the stock
//! `usbip` tool.

use std::time::Duration;

use bytes::Bytes;
use p2p_usb_agent::usbip::client::{self as usbip, Imported, UrbData};
use p2p_usb_agent::usbip::proto::{
    CmdSubmit, CmdUnlink, OpHeader, ST_DEV_BUSY, ST_NODEV, URB_SHORT_NOT_OK, URB_ZERO_PACKET,
    USBIP_DIR_IN, USBIP_DIR_OUT, UrbHeader,
};
use p2p_usb_common::gadget::{keyboard, zero};
use p2p_usb_common::proto::{UsbError, std_request};
use p2p_usb_tests::gateway::{GatewayUnderTest, import_raw, set_configuration};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECONNRESET: i32 = -104;
const EPIPE: i32 = -32;
const EREMOTEIO: i32 = -121;
const ENOSYS: i32 = -38;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devlist_describes_the_shared_devices() {
    let setup = GatewayUnderTest::start().await;
    let list = usbip::devlist(setup.gateway).await.unwrap();
    assert_eq!(list.len(), 2);
    let zero_entry = list
        .iter()
        .find(|e| e.device.id_product == zero::PID)
        .unwrap();
    assert_eq!(zero_entry.device.busid, "1-1");
    assert_eq!(zero_entry.device.speed, 3, "high speed");
    assert_eq!(
        zero_entry.device.configuration_value,
        zero::CONFIG_SOURCE_SINK
    );
    assert_eq!(zero_entry.device.num_configurations, 2);
    assert_eq!(zero_entry.interfaces.len(), 1);
    assert_eq!(zero_entry.interfaces[0].class, 0xff);
    let kbd = list
        .iter()
        .find(|e| e.device.id_product == keyboard::PID)
        .unwrap();
    assert_eq!(
        (
            kbd.interfaces[0].class,
            kbd.interfaces[0].subclass,
            kbd.interfaces[0].protocol
        ),
        (3, 1, 1)
    );
    assert_eq!(kbd.device.speed, 2, "full speed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_device_moves_data_with_many_urbs_in_flight() {
    let setup = GatewayUnderTest::start().await;
    let device = setup.import(zero::VID, zero::PID).await;
    assert_eq!(device.device.busid, "1-1");
    set_configuration(&device, zero::CONFIG_LOOPBACK).await;
    let mut reads = Vec::new();
    for _ in 0..16 {
        reads.push(
            device
                .submit(zero::EP_IN, [0; 8], UrbData::In(16384), 0)
                .await
                .unwrap()
                .1,
        );
    }
    let payloads: Vec<Bytes> = (0..16u8)
        .map(|i| Bytes::from(vec![i; 1000 + usize::from(i) * 700]))
        .collect();
    let mut writes = Vec::new();
    for payload in &payloads {
        writes.push(
            device
                .submit(zero::EP_OUT, [0; 8], UrbData::Out(payload.clone()), 0)
                .await
                .unwrap()
                .1,
        );
    }
    for (write, payload) in writes.into_iter().zip(&payloads) {
        let result = write.await.unwrap();
        assert_eq!((result.status, result.actual_length), (0, payload.len()));
    }
    for (read, payload) in reads.into_iter().zip(&payloads) {
        let result = read.await.unwrap();
        assert_eq!(result.status, 0);
        assert_eq!(result.data, *payload, "URB data and order kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlink_of_a_pending_urb_answers_ret_unlink_and_never_ret_submit() {
    let setup = GatewayUnderTest::start().await;
    let device = setup.import(zero::VID, zero::PID).await;
    set_configuration(&device, zero::CONFIG_LOOPBACK).await;
    // Nothing to read yet: the IN stays pending until unlinked.
    let (seqnum, pending) = device
        .submit(zero::EP_IN, [0; 8], UrbData::In(512), 0)
        .await
        .unwrap();
    let unlinked = device.unlink(seqnum).await.unwrap();
    assert_eq!(unlinked.await.unwrap(), ECONNRESET);
    // The URB's own reply never comes: its waiter is dropped with the connection.
    let later = device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::from_static(b"after")), 0)
        .await
        .unwrap();
    assert_eq!(later.status, 0);
    let read = device
        .transfer(zero::EP_IN, UrbData::In(512), 0)
        .await
        .unwrap();
    assert_eq!(
        &read.data[..],
        b"after",
        "the unlinked IN did not swallow the data"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), pending)
            .await
            .is_err(),
        "no RET_SUBMIT after RET_UNLINK"
    );

    // Unlinking an URB that already completed: RET_UNLINK with status 0.
    let (done, result) = device
        .submit(
            zero::EP_OUT,
            [0; 8],
            UrbData::Out(Bytes::from_static(b"x")),
            0,
        )
        .await
        .unwrap();
    assert_eq!(result.await.unwrap().status, 0);
    assert_eq!(device.unlink(done).await.unwrap().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlink_racing_completion_gets_exactly_one_answer() {
    let setup = GatewayUnderTest::start().await;
    let device = setup.import(zero::VID, zero::PID).await;
    set_configuration(&device, zero::CONFIG_SOURCE_SINK).await;
    // Source IN completes at once: unlinks race the completions. A RET_SUBMIT
    // may only come if the unlink found nothing to cancel (status 0).
    for _ in 0..50 {
        let (seqnum, submitted) = device
            .submit(zero::EP_IN, [0; 8], UrbData::In(512), 0)
            .await
            .unwrap();
        let unlinked = device.unlink(seqnum).await.unwrap().await.unwrap();
        let ret_submit = tokio::time::timeout(Duration::from_millis(200), submitted).await;
        match (unlinked, ret_submit) {
            // The URB completed before the unlink: both answers go out.
            (0, Ok(Ok(result))) => assert_eq!(result.actual_length, 512),
            // Unlinked (or completed while being unlinked, as usbip-host
            // reports it): RET_UNLINK only.
            (0 | ECONNRESET, Err(_)) => {}
            other => panic!("inconsistent answers: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_length_packets_flags_stalls_and_isochronous() {
    let setup = GatewayUnderTest::start().await;
    let device = setup.import(zero::VID, zero::PID).await;
    set_configuration(&device, zero::CONFIG_LOOPBACK).await;
    let zlp = device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::new()), URB_ZERO_PACKET)
        .await
        .unwrap();
    assert_eq!((zlp.status, zlp.actual_length), (0, 0));
    let read = device
        .transfer(zero::EP_IN, UrbData::In(512), 0)
        .await
        .unwrap();
    assert_eq!(
        (read.status, read.actual_length),
        (0, 0),
        "the ZLP is a transfer of its own"
    );

    device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::from_static(b"short")), 0)
        .await
        .unwrap();
    let strict = device
        .transfer(zero::EP_IN, UrbData::In(512), URB_SHORT_NOT_OK)
        .await
        .unwrap();
    // As from usbip-host: the error status, and the bytes that did arrive.
    assert_eq!(
        (strict.status, strict.actual_length, &strict.data[..]),
        (EREMOTEIO, 5, &b"short"[..])
    );
    device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::from(vec![7u8; 512])), 0)
        .await
        .unwrap();
    let full = device
        .transfer(zero::EP_IN, UrbData::In(512), URB_SHORT_NOT_OK)
        .await
        .unwrap();
    assert_eq!((full.status, full.actual_length), (0, 512), "not short");

    // An IN cut short by a stall: as from usbip-host, the error status and
    // the bytes that did move (a mass-storage data phase can end this way).
    device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::from(vec![3u8; 2000])), 0)
        .await
        .unwrap();
    let cut = device
        .control(
            zero::control::VENDOR_OUT,
            zero::control::STALL_AFTER,
            1000,
            zero::EP_IN.into(),
            UrbData::Out(Bytes::new()),
        )
        .await
        .unwrap();
    assert_eq!(cut.status, 0);
    let partial = device
        .transfer(zero::EP_IN, UrbData::In(4096), 0)
        .await
        .unwrap();
    assert_eq!(
        (partial.status, partial.actual_length, partial.data.len()),
        (EPIPE, 1000, 1000)
    );
    assert!(partial.data.iter().all(|&b| b == 3));
    // The rest stays in the device, for the first read after the halt.
    clear_halt_in(&device).await;
    let rest = device
        .transfer(zero::EP_IN, UrbData::In(4096), 0)
        .await
        .unwrap();
    assert_eq!((rest.status, rest.data.len()), (0, 1000));

    stall_in(&device).await;
    assert_eq!(
        device
            .transfer(zero::EP_IN, UrbData::In(512), 0)
            .await
            .unwrap()
            .status,
        EPIPE
    );
    clear_halt_in(&device).await;
    assert_eq!(
        loop_back(&device, b"after clear").await,
        (0, b"after clear".to_vec())
    );

    // A port reset (SET_FEATURE(PORT_RESET) to the device's hub port, which
    // usbip-host performs as a device reset) clears a halt as well.
    stall_in(&device).await;
    let reset = device
        .control(
            0x23,
            std_request::SET_FEATURE,
            std_request::PORT_RESET,
            1,
            UrbData::Out(Bytes::new()),
        )
        .await
        .unwrap();
    assert_eq!(reset.status, 0, "PORT_RESET mapped to a device reset");
    assert_eq!(
        loop_back(&device, b"after reset").await,
        (0, b"after reset".to_vec())
    );
}

/// CLEAR_FEATURE(ENDPOINT_HALT) on the IN endpoint, as a host sends it.
async fn clear_halt_in(device: &Imported) {
    let cleared = device
        .control(
            0x02,
            std_request::CLEAR_FEATURE,
            0,
            zero::EP_IN.into(),
            UrbData::Out(Bytes::new()),
        )
        .await
        .unwrap();
    assert_eq!(
        cleared.status, 0,
        "CLEAR_FEATURE(HALT) mapped to the real operation"
    );
}

/// Tells the device to stall its IN endpoint (Gadget Zero's vendor request).
async fn stall_in(device: &Imported) {
    let stalled = device
        .control(
            zero::control::VENDOR_OUT,
            zero::control::STALL_ENDPOINT,
            zero::EP_IN.into(),
            0,
            UrbData::Out(Bytes::new()),
        )
        .await
        .unwrap();
    assert_eq!(stalled.status, 0);
}

/// Sends `data` out and reads it back through the loopback: the IN's status and bytes.
async fn loop_back(device: &Imported, data: &'static [u8]) -> (i32, Vec<u8>) {
    let sent = device
        .transfer(zero::EP_OUT, UrbData::Out(Bytes::from_static(data)), 0)
        .await
        .unwrap();
    assert_eq!(sent.status, 0);
    let read = device
        .transfer(zero::EP_IN, UrbData::In(512), 0)
        .await
        .unwrap();
    (read.status, read.data.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isochronous_urbs_are_refused_with_their_packets_echoed() {
    let setup = GatewayUnderTest::start().await;
    let busid = setup.busid(zero::VID, zero::PID).await;
    let mut stream = import_raw(setup.gateway, &busid).await;
    let mut urb = UrbHeader::Submit(CmdSubmit {
        seqnum: 9,
        devid: 0,
        direction: USBIP_DIR_IN,
        ep: 2,
        transfer_flags: 0,
        transfer_buffer_length: 3072,
        start_frame: 0,
        number_of_packets: 3,
        interval: 1,
        setup: [0; 8],
    })
    .encode()
    .to_vec();
    for i in 0..3u32 {
        urb.extend_from_slice(
            &[
                &(i * 1024).to_be_bytes()[..],
                &1024u32.to_be_bytes(),
                &[0; 8],
            ]
            .concat(),
        );
    }
    stream.write_all(&urb).await.unwrap();
    let mut header = [0u8; 48];
    stream.read_exact(&mut header).await.unwrap();
    match UrbHeader::decode(&header).unwrap() {
        UrbHeader::RetSubmit(ret) => {
            assert_eq!(
                (
                    ret.seqnum,
                    ret.status,
                    ret.actual_length,
                    ret.number_of_packets
                ),
                (9, ENOSYS, 0, 3)
            );
        }
        other => panic!("{other:?}"),
    }
    let mut descriptors = [0u8; 48];
    stream.read_exact(&mut descriptors).await.unwrap();
    for packet in descriptors.chunks(16) {
        assert_eq!(
            i32::from_be_bytes(packet[12..16].try_into().unwrap()),
            ENOSYS
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seqnum_reused_while_pending_ends_the_connection() {
    let setup = GatewayUnderTest::start().await;
    let busid = setup.busid(zero::VID, zero::PID).await;
    let mut stream = import_raw(setup.gateway, &busid).await;
    let urb = |seqnum, ep, direction, setup, length| {
        UrbHeader::Submit(CmdSubmit {
            seqnum,
            direction,
            ep,
            transfer_buffer_length: length,
            setup,
            ..CmdSubmit::default()
        })
        .encode()
    };
    // SET_CONFIGURATION(loopback): reads of the empty loopback stay pending.
    let configure = [0x00, 0x09, zero::CONFIG_LOOPBACK, 0, 0, 0, 0, 0];
    stream
        .write_all(&urb(1, 0, USBIP_DIR_OUT, configure, 0))
        .await
        .unwrap();
    let mut header = [0u8; 48];
    stream.read_exact(&mut header).await.unwrap();
    assert!(matches!(
        UrbHeader::decode(&header).unwrap(),
        UrbHeader::RetSubmit(ret) if (ret.seqnum, ret.status) == (1, 0)
    ));
    let read = urb(2, 1, USBIP_DIR_IN, [0; 8], 512);
    stream.write_all(&read).await.unwrap();
    stream.write_all(&read).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the gateway ends the connection");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_close_only_their_connection() {
    let setup = GatewayUnderTest::start().await;
    let busid = setup.busid(zero::VID, zero::PID).await;
    let mut bad = import_raw(setup.gateway, &busid).await;
    let mut garbage = [0u8; 48];
    garbage[3] = 7; // unknown URB command
    bad.write_all(&garbage).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), bad.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "connection closed after an unknown command"
    );

    // The device was released with that connection and imports again.
    let device = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match usbip::import(setup.gateway, &busid).await {
                Ok(device) => break device,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        device
            .transfer(zero::EP_IN, UrbData::In(64), 0)
            .await
            .unwrap()
            .status,
        0
    );

    // A device already imported, an unknown busid and a bad operation code
    // are refused cleanly.
    assert!(matches!(
        usbip::import(setup.gateway, &busid).await,
        Err(usbip::UsbipClientError::Refused(ST_DEV_BUSY))
    ));
    assert!(matches!(
        usbip::import(setup.gateway, "9-9").await,
        Err(usbip::UsbipClientError::Refused(ST_NODEV))
    ));
    let mut odd = tokio::net::TcpStream::connect(setup.gateway).await.unwrap();
    odd.write_all(&OpHeader::new(0x1234, 0).encode())
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), odd.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_urb_is_refused_alone() {
    let setup = GatewayUnderTest::start().await;
    let busid = setup.busid(zero::VID, zero::PID).await;
    let device = usbip::import(setup.gateway, &busid).await.unwrap();
    let max = p2p_usb_common::proto::MAX_TRANSFER_LEN as usize;
    let refused = UsbError::Invalid(String::new()).urb_status();
    let out = device
        .transfer(
            zero::EP_OUT,
            UrbData::Out(Bytes::from(vec![1u8; max + 1])),
            0,
        )
        .await
        .unwrap();
    assert_eq!((out.status, out.actual_length), (refused, 0));
    let input = device
        .transfer(zero::EP_IN, UrbData::In(max as u32 + 1), 0)
        .await
        .unwrap();
    assert_eq!((input.status, input.actual_length), (refused, 0));
    // The stream stayed in step and the device stays attached.
    let after = device
        .transfer(zero::EP_IN, UrbData::In(64), 0)
        .await
        .unwrap();
    assert_eq!((after.status, after.actual_length), (0, 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answers_is_not_buffered_for() {
    let setup = GatewayUnderTest::start().await;
    let busid = setup.busid(zero::VID, zero::PID).await;
    let mut stream = import_raw(setup.gateway, &busid).await;
    // Unlinks of URBs that never were: the gateway answers each itself.
    let burst: Vec<u8> = (0..1024u32)
        .flat_map(|seqnum| {
            UrbHeader::Unlink(CmdUnlink {
                seqnum,
                devid: 0,
                direction: 0,
                ep: 0,
                unlink_seqnum: seqnum + 1_000_000,
            })
            .encode()
        })
        .collect();
    let limit = 64 << 20;
    let mut written = 0;
    while written < limit {
        match tokio::time::timeout(Duration::from_millis(500), stream.write_all(&burst)).await {
            Ok(result) => written += result.map(|()| burst.len()).unwrap(),
            // Not read any more: the answers nobody reads are not piling up.
            Err(_) => break,
        }
    }
    assert!(
        written < limit,
        "the gateway took {written} bytes of unlinks whose answers were never read"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyboard_reports_arrive_through_usbip() {
    let setup = GatewayUnderTest::start().await;
    let device = setup.import(keyboard::VID, keyboard::PID).await;
    let mut reports = Vec::new();
    for _ in 0.."p2p-usb\n".len() * 2 {
        let report = device
            .transfer(keyboard::EP_REPORTS, UrbData::In(8), 0)
            .await
            .unwrap();
        assert_eq!(report.status, 0);
        reports.push(report.data);
    }
    assert_eq!(
        keyboard::text_of_reports(reports.iter().map(|r| &r[..])),
        "p2p-usb\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_users_outside_the_allowed_set_are_refused() {
    if !p2p_usb_tests::is_root() {
        eprintln!("needs root to connect as another local user");
        return;
    }
    let setup = GatewayUnderTest::start().await;
    // Connect as uid 65534 and send a device-list request: no answer, closed.
    let port = setup.gateway.port();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf '\\x01\\x11\\x80\\x05\\x00\\x00\\x00\\x00' >&3; timeout 5 cat <&3 | wc -c"
    );
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .uid(p2p_usb_tests::NOBODY)
        .gid(p2p_usb_tests::NOBODY)
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "0",
        "nobody got a device list"
    );
    // The gateway's own user still gets one.
    assert_eq!(usbip::devlist(setup.gateway).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_usbip_tool_lists_the_exported_devices() {
    let setup = GatewayUnderTest::start().await;
    let output = tokio::process::Command::new("usbip")
        .args([
            "--tcp-port",
            &setup.gateway.port().to_string(),
            "list",
            "-r",
            "127.0.0.1",
        ])
        .output()
        .await
        .expect("the `usbip` tool (Debian package usbip) is needed; .ci/run installs it");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("1-1") && text.contains("0525:a4a0"), "{text}");
    assert!(text.contains("1-2") && text.contains("0525:a4ac"), "{text}");
}
