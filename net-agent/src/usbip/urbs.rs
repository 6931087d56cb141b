//! The server side of USB/IP URB traffic for one imported device: reads
//! CMD_SUBMIT / CMD_UNLINK from a USB/IP client (vhci_hcd through a socket
//! pair, or a TCP client through the gateway), turns them into the common
//! vocabulary's `Submit` / `Cancel` on a session with the server, and writes
//! RET_SUBMIT / RET_UNLINK back.
//!
//! Rules kept here (see `proto` for the wire facts): many URBs in flight;
//! replies in the order the server completes them (FIFO per endpoint); after
//! CMD_UNLINK for a pending URB its RET_SUBMIT is never sent, only
//! RET_UNLINK; an URB is never resubmitted after a network error; isochronous
//! URBs are answered "not supported" with no fake data.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use p2p_usb_common::codec::{READ_BUFFER_CAPACITY, write_all_vectored};
use p2p_usb_common::link::LinkClient;
use p2p_usb_common::proto::{
    Completion, DeviceKey, Event, Handle, MAX_TRANSFER_LEN, Reply, Request, RequestId, SetupPacket,
    Transfer, TransferData, TransferFlags, UsbError,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::proto::{
    CmdSubmit, CmdUnlink, ISO_DESCRIPTOR_LEN, IsoPacketDescriptor, MAX_ISO_PACKETS, ProtocolError,
    RetSubmit, RetUnlink, URB_HEADER_LEN, URB_SHORT_NOT_OK, URB_ZERO_PACKET, USBIP_DIR_IN,
    USBIP_DIR_OUT, UrbHeader, data_len_out, endpoint_address, iso_descriptors_len,
};
use super::read_payload;

/// The device a USB/IP connection drives: an open handle on a session.
pub struct RemoteDevice {
    pub session: LinkClient,
    pub events: mpsc::Receiver<Event>,
    pub handle: Handle,
    pub key: DeviceKey,
}

/// Why URB service for a device ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The USB/IP client closed the connection (detach).
    ClientClosed,
    /// The session with the server broke; pending URBs failed.
    LinkLost(String),
    /// The device left the server.
    DeviceGone,
    /// The USB/IP client sent something unparsable.
    Protocol(String),
    /// Asked to stop.
    Stopped,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => write!(f, "USB/IP client closed the connection"),
            EndReason::LinkLost(reason) => write!(f, "link to the server lost: {reason}"),
            EndReason::DeviceGone => write!(f, "the device left the server"),
            EndReason::Protocol(reason) => write!(f, "USB/IP protocol error: {reason}"),
            EndReason::Stopped => write!(f, "stopped"),
        }
    }
}

/// A URB waiting for the server.
struct PendingUrb {
    cmd: CmdSubmit,
    /// Set by CMD_UNLINK: the unlink's own seqnum, answered instead of RET_SUBMIT.
    unlinked_by: Option<u32>,
}

#[derive(Default)]
struct Pending {
    by_id: HashMap<RequestId, PendingUrb>,
    by_seqnum: HashMap<u32, RequestId>,
}

/// One reply for the writer, in wire form.
struct Outgoing {
    header: [u8; URB_HEADER_LEN],
    data: Bytes,
    iso: Bytes,
}

type Replies = mpsc::UnboundedSender<(RequestId, Result<Reply, UsbError>)>;

/// Serves URBs for `device` on `stream` until one side ends or `stop` fires,
/// then closes the device's session: it served this stream alone.
pub async fn serve<S>(stream: S, mut device: RemoteDevice, stop: CancellationToken) -> EndReason
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(stream);
    // Buffered: a burst of URBs is read with one syscall, not two per URB
    // (header, then payload), and its requests leave in one flush.
    let reader = BufReader::with_capacity(READ_BUFFER_CAPACITY, reader);
    let mut batch: Vec<Bytes> = Vec::new();
    let pending: Arc<Mutex<Pending>> = Arc::default();
    // Bounded: a client that sends unlinks and refused URBs but does not
    // read the answers is stopped being read, not buffered for.
    let (to_writer, mut from_reader) = mpsc::channel::<Outgoing>(REPLY_QUEUE);
    let (replies, mut completions) = mpsc::unbounded_channel();
    let mut reader_task = tokio::spawn(read_loop(
        reader,
        device.session.clone(),
        device.handle,
        pending.clone(),
        replies,
        to_writer,
    ));

    // Replies are written from this loop directly: completions arrive here
    // in the server's order, and whatever is ready goes out in one flush.
    let reason = loop {
        let first = tokio::select! {
            ended = &mut reader_task => break ended.unwrap_or_else(|e| EndReason::Protocol(e.to_string())),
            Some((id, result)) = completions.recv() => Ready::Completion(id, result),
            Some(out) = from_reader.recv() => Ready::Reply(out),
            event = device.events.recv() => match event {
                Some(Event::DeviceLeft { key }) if key == device.key => break EndReason::DeviceGone,
                Some(Event::ShuttingDown { reason }) => break EndReason::LinkLost(reason),
                Some(_) => continue,
                None => break EndReason::LinkLost("session closed".into()),
            },
            _ = device.session.closed() => break EndReason::LinkLost("session closed".into()),
            _ = stop.cancelled() => break EndReason::Stopped,
        };
        let mut next = Some(first);
        let mut lost = None;
        while let Some(ready) = next.take() {
            let out = match ready {
                Ready::Completion(id, result) => {
                    if let Err(UsbError::Io(reason)) = &result
                        && device.session.is_closed()
                    {
                        lost = Some(reason.clone());
                        break;
                    }
                    complete(&pending, id, result)
                }
                Ready::Reply(out) => Some(out),
            };
            if let Some(out) = out {
                batch.extend([Bytes::copy_from_slice(&out.header), out.data, out.iso]);
            }
            next = completions
                .try_recv()
                .map(|(id, result)| Ready::Completion(id, result))
                .or_else(|_| from_reader.try_recv().map(Ready::Reply))
                .ok();
        }
        if write_all_vectored(&mut writer, &mut batch).await.is_err() {
            break EndReason::ClientClosed;
        }
        if let Some(reason) = lost {
            break EndReason::LinkLost(reason);
        }
    };
    reader_task.abort();
    let _ = writer.shutdown().await;
    device.session.close();
    reason
}

/// Work that is ready for the writer.
enum Ready {
    Completion(RequestId, Result<Reply, UsbError>),
    Reply(Outgoing),
}

/// Answers the reader makes itself (refusals, RET_UNLINK of finished URBs)
/// waiting for the writer, at most.
const REPLY_QUEUE: usize = 1024;

/// URBs sent to the server with one write at most.
const MAX_URB_BATCH: usize = 64;

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: BufReader<R>,
    session: LinkClient,
    handle: Handle,
    pending: Arc<Mutex<Pending>>,
    replies: Replies,
    to_writer: mpsc::Sender<Outgoing>,
) -> EndReason {
    let mut header = [0u8; URB_HEADER_LEN];
    // Submits already read, sent together once no further URB is buffered.
    let mut batch: Vec<(CmdSubmit, Transfer)> = Vec::new();
    loop {
        if reader.read_exact(&mut header).await.is_err() {
            return EndReason::ClientClosed;
        }
        let parsed = match UrbHeader::decode(&header) {
            Ok(parsed) => parsed,
            Err(e) => return EndReason::Protocol(e.to_string()),
        };
        match parsed {
            UrbHeader::Submit(cmd) => {
                let transfer = match read_submit_payload(&mut reader, &cmd).await {
                    Ok(Ok(out)) => transfer_for(handle, &cmd, out),
                    Ok(Err(refusal)) => Err(refusal),
                    Err(e) => return e,
                };
                match transfer {
                    Ok(transfer) => batch.push((cmd, transfer)),
                    Err(refusal) => {
                        let _ = to_writer.send(refusal).await;
                    }
                }
            }
            UrbHeader::Unlink(cmd) => {
                // The URB it names may be in the batch: send that first.
                if let Err(reused) =
                    submit(&session, &pending, &replies, std::mem::take(&mut batch)).await
                {
                    return reused;
                }
                if let Some(reply) = unlink(&session, &pending, cmd).await {
                    let _ = to_writer.send(reply).await;
                }
            }
            other => {
                return EndReason::Protocol(format!("unexpected {other:?} from a USB/IP client"));
            }
        }
        if (batch.len() >= MAX_URB_BATCH || !whole_urb_buffered(reader.buffer()))
            && let Err(reused) =
                submit(&session, &pending, &replies, std::mem::take(&mut batch)).await
        {
            return reused;
        }
    }
}

/// True if `buffered` starts with a whole URB (header and payload), which
/// can then be read without waiting.
fn whole_urb_buffered(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<URB_HEADER_LEN>() else {
        return false;
    };
    match UrbHeader::decode(header) {
        Ok(UrbHeader::Submit(cmd)) => {
            let out = data_len_out(&cmd, MAX_TRANSFER_LEN as usize).unwrap_or(usize::MAX);
            let iso = iso_descriptors_len(cmd.number_of_packets);
            URB_HEADER_LEN.saturating_add(out).saturating_add(iso) <= buffered.len()
        }
        Ok(_) => true,
        Err(_) => false,
    }
}

/// OUT data and iso descriptors following a CMD_SUBMIT; reading them in full
/// keeps the stream in sync even for URBs that are then refused. A URB over
/// the transfer size limit is refused alone (its data read and dropped), so
/// one oversized transfer does not cost the client its device.
async fn read_submit_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    cmd: &CmdSubmit,
) -> Result<Result<(Bytes, Vec<IsoPacketDescriptor>), Outgoing>, EndReason> {
    let protocol = |e: ProtocolError| EndReason::Protocol(e.to_string());
    let closed = |_| EndReason::ClientClosed;
    let (data, oversized) = match data_len_out(cmd, MAX_TRANSFER_LEN as usize) {
        Ok(out_len) => (read_payload(reader, out_len).await.map_err(closed)?, false),
        Err(ProtocolError::LengthOverLimit { len, .. }) => {
            if cmd.direction == USBIP_DIR_OUT {
                let mut dropped = (&mut *reader).take(len as u64);
                tokio::io::copy(&mut dropped, &mut tokio::io::sink())
                    .await
                    .map_err(closed)?;
            }
            (Bytes::new(), true)
        }
        Err(e) => return Err(protocol(e)),
    };
    let iso_len = iso_descriptors_len(cmd.number_of_packets);
    if iso_len > MAX_ISO_PACKETS * ISO_DESCRIPTOR_LEN {
        return Err(EndReason::Protocol(format!(
            "{} isochronous packets is more than any client sends",
            cmd.number_of_packets
        )));
    }
    let mut raw = vec![0u8; iso_len];
    reader
        .read_exact(&mut raw)
        .await
        .map_err(|_| EndReason::ClientClosed)?;
    let iso = raw
        .chunks_exact(ISO_DESCRIPTOR_LEN)
        .map(IsoPacketDescriptor::decode)
        .collect::<Result<Vec<_>, _>>()
        .map_err(protocol)?;
    if oversized {
        return Ok(Err(failure(
            cmd,
            &UsbError::Invalid(format!(
                "a transfer of {} bytes is over the limit of {MAX_TRANSFER_LEN}",
                cmd.transfer_buffer_length
            )),
        )));
    }
    Ok(Ok((data, iso)))
}

/// The transfer a CMD_SUBMIT asks for, or the reply that refuses it.
fn transfer_for(
    handle: Handle,
    cmd: &CmdSubmit,
    (data, iso): (Bytes, Vec<IsoPacketDescriptor>),
) -> Result<Transfer, Outgoing> {
    if !iso.is_empty() {
        return Err(iso_refusal(cmd, iso));
    }
    let Some(endpoint) = endpoint_address(cmd.ep, cmd.direction) else {
        return Err(failure(
            cmd,
            &UsbError::Invalid(format!("endpoint {}", cmd.ep)),
        ));
    };
    Ok(Transfer {
        handle,
        endpoint,
        setup: (endpoint & 0x7f == 0).then(|| SetupPacket::from_bytes(cmd.setup)),
        data: if cmd.direction == USBIP_DIR_IN {
            TransferData::In {
                length: cmd.transfer_buffer_length.max(0) as u32,
            }
        } else {
            TransferData::Out(data)
        },
        flags: TransferFlags {
            zero_packet: cmd.transfer_flags & URB_ZERO_PACKET != 0,
            // Applied on completion instead (see `complete`): a short IN with
            // URB_SHORT_NOT_OK still returns its data, as from usbip-host.
            short_not_ok: false,
        },
        timeout_ms: None,
    })
}

/// Sends a batch of transfers to the server with one write; each URB is
/// pending (and can be unlinked) from the moment its request has an id.
/// A seqnum whose URB is still pending ends the connection: vhci_hcd never
/// reuses one, and a client that does would have unlinks and replies mixed
/// up.
async fn submit(
    session: &LinkClient,
    pending: &Arc<Mutex<Pending>>,
    replies: &Replies,
    batch: Vec<(CmdSubmit, Transfer)>,
) -> Result<(), EndReason> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut reused = None;
    let (cmds, requests): (Vec<CmdSubmit>, Vec<Request>) = batch
        .into_iter()
        .map(|(cmd, transfer)| (cmd, Request::Submit(transfer)))
        .unzip();
    session
        .requests_into(requests, replies, |index, id| {
            let cmd = cmds[index];
            let mut pending = pending.lock().expect("pending lock");
            if pending.by_seqnum.insert(cmd.seqnum, id).is_some() {
                reused = Some(cmd.seqnum);
            }
            pending.by_id.insert(
                id,
                PendingUrb {
                    cmd,
                    unlinked_by: None,
                },
            );
        })
        .await;
    match reused {
        Some(seqnum) => Err(EndReason::Protocol(format!(
            "seqnum {seqnum} reused while its URB is pending"
        ))),
        None => Ok(()),
    }
}

async fn unlink(
    session: &LinkClient,
    pending: &Arc<Mutex<Pending>>,
    cmd: CmdUnlink,
) -> Option<Outgoing> {
    let target = {
        let mut pending = pending.lock().expect("pending lock");
        let id = pending.by_seqnum.get(&cmd.unlink_seqnum).copied();
        match id.and_then(|id| pending.by_id.get_mut(&id).map(|urb| (id, urb))) {
            Some((id, urb)) => {
                urb.unlinked_by = Some(cmd.seqnum);
                Some(id)
            }
            None => None,
        }
    };
    match target {
        Some(id) => {
            // The cancelled transfer's own reply carries the outcome; the
            // reply to Cancel itself says nothing more.
            drop(session.start_request(Request::Cancel { request: id }).await);
            None
        }
        // Already completed (its RET_SUBMIT is sent or queued): status 0.
        None => Some(wire(UrbHeader::RetUnlink(RetUnlink::reply_to(&cmd, 0)))),
    }
}

/// Turns the server's answer for request `id` into RET_SUBMIT, or RET_UNLINK
/// if the URB was unlinked meanwhile.
fn complete(
    pending: &Mutex<Pending>,
    id: RequestId,
    result: Result<Reply, UsbError>,
) -> Option<Outgoing> {
    let urb = {
        let mut pending = pending.lock().expect("pending lock");
        let urb = pending.by_id.remove(&id)?;
        pending.by_seqnum.remove(&urb.cmd.seqnum);
        urb
    };
    // A transfer that failed part way carries its error and what moved;
    // usbip-host reports both, and so does this.
    let (completion, error) = match result {
        Ok(Reply::Transferred(completion)) => (completion, None),
        Ok(Reply::PartlyTransferred { error, completion }) => (completion, Some(error)),
        Ok(other) => {
            let error = UsbError::Protocol(format!("unexpected reply {other:?}"));
            (Completion::default(), Some(error))
        }
        Err(error) => (Completion::default(), Some(error)),
    };
    let status = match &error {
        Some(error) => error.urb_status(),
        None => completion_status(&urb.cmd, &completion),
    };
    if let Some(unlink_seqnum) = urb.unlinked_by {
        // The status the URB ended with, as usbip-host reports it: 0 when
        // it completed before the unlink took effect.
        let ret = RetUnlink {
            seqnum: unlink_seqnum,
            devid: 0,
            direction: 0,
            ep: 0,
            status,
        };
        return Some(wire(UrbHeader::RetUnlink(ret)));
    }
    let dir_in = urb.cmd.direction == USBIP_DIR_IN;
    let actual = completion.actual_length as usize;
    if dir_in && completion.data.len() < actual {
        // The header must announce exactly the bytes that follow it, or
        // the kernel would read the next replies as data.
        return Some(failure(
            &urb.cmd,
            &UsbError::Protocol(format!(
                "the server reported {actual} bytes read but sent {}",
                completion.data.len()
            )),
        ));
    }
    match RetSubmit::reply_to(&urb.cmd, status, actual) {
        Ok(ret) => Some(Outgoing {
            header: UrbHeader::RetSubmit(ret).encode(),
            data: if dir_in {
                completion.data.slice(..actual)
            } else {
                Bytes::new()
            },
            iso: Bytes::new(),
        }),
        Err(_) => Some(failure(&urb.cmd, &UsbError::Overflow)),
    }
}

/// The status usbip-host reports for a URB that completed: -EREMOTEIO for
/// a short IN read that the URB forbade (URB_SHORT_NOT_OK), else 0.
fn completion_status(cmd: &CmdSubmit, completion: &Completion) -> i32 {
    let short = cmd.direction == USBIP_DIR_IN
        && cmd.transfer_flags & URB_SHORT_NOT_OK != 0
        && (completion.actual_length as usize) < cmd.transfer_buffer_length.max(0) as usize;
    if short {
        UsbError::ShortPacket.urb_status()
    } else {
        0
    }
}

fn wire(header: UrbHeader) -> Outgoing {
    Outgoing {
        header: header.encode(),
        data: Bytes::new(),
        iso: Bytes::new(),
    }
}

/// RET_SUBMIT carrying a failure status and no data.
fn failure(cmd: &CmdSubmit, error: &UsbError) -> Outgoing {
    let ret = RetSubmit::reply_to(cmd, error.urb_status(), 0).expect("zero length always fits");
    wire(UrbHeader::RetSubmit(ret))
}

/// Isochronous URBs: refused with -ENOSYS for the URB and each packet, the
/// packet count echoed so the client's stream stays in sync.
fn iso_refusal(cmd: &CmdSubmit, iso: Vec<IsoPacketDescriptor>) -> Outgoing {
    let status = UsbError::Unsupported("isochronous".into()).urb_status();
    let mut ret = RetSubmit::reply_to(cmd, status, 0).expect("zero length always fits");
    ret.error_count = iso.len() as i32;
    let mut descriptors = BytesMut::with_capacity(iso.len() * ISO_DESCRIPTOR_LEN);
    for packet in iso {
        descriptors.extend_from_slice(
            &IsoPacketDescriptor {
                actual_length: 0,
                status,
                ..packet
            }
            .encode(),
        );
    }
    Outgoing {
        header: UrbHeader::RetSubmit(ret).encode(),
        data: Bytes::new(),
        iso: descriptors.freeze(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usbip::proto::UrbHeader;

    fn submit_header(direction: u32, length: i32) -> [u8; URB_HEADER_LEN] {
        UrbHeader::Submit(CmdSubmit {
            seqnum: 1,
            direction,
            ep: 1,
            transfer_buffer_length: length,
            ..CmdSubmit::default()
        })
        .encode()
    }

    #[test]
    fn a_urb_counts_as_buffered_only_with_its_whole_payload() {
        let out = submit_header(USBIP_DIR_OUT, 100);
        let mut buffered = out.to_vec();
        assert!(!whole_urb_buffered(&buffered[..47]), "half a header");
        buffered.extend_from_slice(&[0; 99]);
        assert!(
            !whole_urb_buffered(&buffered),
            "one byte of OUT data missing"
        );
        buffered.push(0);
        assert!(whole_urb_buffered(&buffered));

        // An IN submit carries no data: its header is the whole URB.
        assert!(whole_urb_buffered(&submit_header(USBIP_DIR_IN, 4096)));
        // Garbage is left for the reader to report.
        assert!(!whole_urb_buffered(&[0xff; URB_HEADER_LEN]));
    }

    #[test]
    fn an_in_reply_announces_exactly_the_bytes_it_carries() {
        let answer = |actual_length: u32, data: &'static [u8]| {
            let cmd = match UrbHeader::decode(&submit_header(USBIP_DIR_IN, 64)).unwrap() {
                UrbHeader::Submit(cmd) => cmd,
                other => panic!("{other:?}"),
            };
            let pending = Mutex::new(Pending::default());
            pending.lock().unwrap().by_id.insert(
                7,
                PendingUrb {
                    cmd,
                    unlinked_by: None,
                },
            );
            let completion = Completion {
                actual_length,
                data: Bytes::from_static(data),
            };
            let outgoing = complete(&pending, 7, Ok(Reply::Transferred(completion))).unwrap();
            match UrbHeader::decode(&outgoing.header).unwrap() {
                UrbHeader::RetSubmit(ret) => (ret.status, ret.actual_length, outgoing.data),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(answer(4, b"abcdef"), (0, 4, Bytes::from_static(b"abcd")));
        let (status, actual, data) = answer(512, b"");
        assert_eq!(
            (actual, data.len()),
            (0, 0),
            "nothing announced that is not sent"
        );
        assert_eq!(
            status,
            UsbError::Protocol(String::new()).urb_status(),
            "a server contradicting itself is a protocol error"
        );
    }
}
