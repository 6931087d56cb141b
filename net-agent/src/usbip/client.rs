//! A small USB/IP client: what `usbip list`/`usbip attach` and vhci_hcd do on
//! the wire, in user space. The demo, the tests and the benchmarks use it to
//! drive the gateway, or the socket pair `p2p-usb attach` hands vhci_hcd,
//! without root.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use p2p_usb_common::codec::{READ_BUFFER_CAPACITY, write_all_vectored};
use p2p_usb_common::proto::MAX_TRANSFER_LEN;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::proto::{
    CmdSubmit, CmdUnlink, DevlistEntry, ISO_DESCRIPTOR_LEN, ImportReply, MAX_ISO_PACKETS,
    OP_HEADER_LEN, OP_REP_DEVLIST, OP_REP_IMPORT, OP_REQ_DEVLIST, OP_REQ_IMPORT, OpHeader,
    ProtocolError, ST_OK, URB_HEADER_LEN, USB_DEVICE_LEN, USBIP_DIR_IN, USBIP_DIR_OUT, UrbHeader,
    UsbDevice, decode_devlist, encode_import_request, iso_descriptors_len,
};
use super::read_payload;

/// Failures of the USB/IP client.
#[derive(Debug, thiserror::Error)]
pub enum UsbipClientError {
    #[error("USB/IP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("USB/IP protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: status {0}")]
    Refused(u32),
    #[error("the connection closed before the reply")]
    Closed,
}

/// Lists the devices a USB/IP server exports (`usbip list -r`).
pub async fn devlist(server: SocketAddr) -> Result<Vec<DevlistEntry>, UsbipClientError> {
    let mut stream = TcpStream::connect(server).await?;
    stream
        .write_all(&OpHeader::new(OP_REQ_DEVLIST, 0).encode())
        .await?;
    let mut header = [0u8; OP_HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let header = OpHeader::decode(&header)?.expect(OP_REP_DEVLIST)?;
    if header.status != ST_OK {
        return Err(UsbipClientError::Refused(header.status));
    }
    let mut body = Vec::new();
    stream.read_to_end(&mut body).await?;
    Ok(decode_devlist(&body)?)
}

/// The bus id under which a device list exports VID:PID, if it does.
pub fn busid_of(entries: &[DevlistEntry], vid: u16, pid: u16) -> Option<String> {
    entries
        .iter()
        .find(|e| e.device.id_vendor == vid && e.device.id_product == pid)
        .map(|e| e.device.busid.clone())
}

/// What a URB came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrbResult {
    /// 0 or a negative errno, as usbip-host reports it.
    pub status: i32,
    pub actual_length: usize,
    /// IN data.
    pub data: Bytes,
}

/// The direction and payload of a URB.
#[derive(Debug, Clone)]
pub enum UrbData {
    In(u32),
    Out(Bytes),
}

enum Waiter {
    Submit {
        dir_in: bool,
        tx: oneshot::Sender<UrbResult>,
    },
    Unlink(oneshot::Sender<i32>),
}

/// An imported device: URBs go out, replies are matched by seqnum.
pub struct Imported {
    /// The device as the import reply described it.
    pub device: UsbDevice,
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    /// URBs waiting for their reply; `None` once the reply reader has ended.
    waiters: Arc<Mutex<Option<HashMap<u32, Waiter>>>>,
    next_seqnum: AtomicU32,
}

/// Imports `busid` (`usbip attach`, minus the kernel).
pub async fn import(server: SocketAddr, busid: &str) -> Result<Imported, UsbipClientError> {
    let mut stream = TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let mut request = OpHeader::new(OP_REQ_IMPORT, 0).encode().to_vec();
    request.extend_from_slice(&encode_import_request(busid)?);
    stream.write_all(&request).await?;
    let mut reply = vec![0u8; OP_HEADER_LEN];
    stream.read_exact(&mut reply).await?;
    let header = OpHeader::decode(&reply)?.expect(OP_REP_IMPORT)?;
    if header.status == ST_OK {
        let mut device = [0u8; USB_DEVICE_LEN];
        stream.read_exact(&mut device).await?;
        reply.extend_from_slice(&device);
    }
    let device = match ImportReply::decode(&reply)? {
        ImportReply::Device(device) => device,
        ImportReply::Refused(status) => return Err(UsbipClientError::Refused(status)),
    };
    let (reader, writer) = stream.into_split();
    Ok(Imported::over(device, reader, writer))
}

impl Imported {
    /// Drives `device` on a stream that is already attached: what vhci_hcd
    /// does with its end of the socket pair `p2p-usb attach` hands it. Call it
    /// inside a Tokio runtime: replies are read by a task of their own.
    pub fn over<R, W>(device: UsbDevice, reader: R, writer: W) -> Imported
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        // Buffered as vhci_hcd reads in the kernel: a header and its payload do
        // not cost a system call each.
        let mut reader = BufReader::with_capacity(READ_BUFFER_CAPACITY, reader);
        let waiters = Arc::new(Mutex::new(Some(HashMap::new())));
        let table = waiters.clone();
        tokio::spawn(async move {
            read_replies(&mut reader, &table).await;
            // Whatever is still waiting, or asks later, learns the
            // connection is gone.
            table.lock().expect("waiters lock").take();
        });
        Imported {
            device,
            writer: tokio::sync::Mutex::new(Box::new(writer)),
            waiters,
            next_seqnum: AtomicU32::new(1),
        }
    }

    /// Sends CMD_SUBMIT; returns its seqnum and the future of its RET_SUBMIT.
    pub async fn submit(
        &self,
        endpoint: u8,
        setup: [u8; 8],
        data: UrbData,
        transfer_flags: u32,
    ) -> Result<
        (
            u32,
            impl Future<Output = Result<UrbResult, UsbipClientError>> + use<>,
        ),
        UsbipClientError,
    > {
        let seqnum = self.next_seqnum.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let (direction, length, payload) = match &data {
            UrbData::In(length) => (USBIP_DIR_IN, *length as i32, Bytes::new()),
            UrbData::Out(bytes) => (USBIP_DIR_OUT, bytes.len() as i32, bytes.clone()),
        };
        self.wait_for(
            seqnum,
            Waiter::Submit {
                dir_in: direction == USBIP_DIR_IN,
                tx,
            },
        )?;
        let cmd = CmdSubmit {
            seqnum,
            devid: self.device.devid(),
            direction,
            ep: u32::from(endpoint & 0x0f),
            transfer_flags,
            transfer_buffer_length: length,
            start_frame: 0,
            number_of_packets: 0,
            interval: 0,
            setup,
        };
        // Header and payload in one write, as vhci_hcd sends a URB.
        let mut pieces = vec![
            Bytes::copy_from_slice(&UrbHeader::Submit(cmd).encode()),
            payload,
        ];
        if let Err(e) = write_all_vectored(&mut *self.writer.lock().await, &mut pieces).await {
            self.forget(seqnum);
            return Err(e.into());
        }
        Ok((seqnum, async move {
            rx.await.map_err(|_| UsbipClientError::Closed)
        }))
    }

    /// Sends CMD_UNLINK for `seqnum`; resolves to RET_UNLINK's status.
    pub async fn unlink(
        &self,
        seqnum: u32,
    ) -> Result<impl Future<Output = Result<i32, UsbipClientError>> + use<>, UsbipClientError> {
        let own = self.next_seqnum.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.wait_for(own, Waiter::Unlink(tx))?;
        let cmd = CmdUnlink {
            seqnum: own,
            devid: self.device.devid(),
            direction: USBIP_DIR_OUT,
            ep: 0,
            unlink_seqnum: seqnum,
        };
        let written = self
            .writer
            .lock()
            .await
            .write_all(&UrbHeader::Unlink(cmd).encode())
            .await;
        if let Err(e) = written {
            self.forget(own);
            return Err(e.into());
        }
        Ok(async move { rx.await.map_err(|_| UsbipClientError::Closed) })
    }

    /// Registers the waiter of `seqnum`, unless no reply can come any more.
    fn wait_for(&self, seqnum: u32, waiter: Waiter) -> Result<(), UsbipClientError> {
        match self.waiters.lock().expect("waiters lock").as_mut() {
            Some(waiters) => {
                waiters.insert(seqnum, waiter);
                Ok(())
            }
            None => Err(UsbipClientError::Closed),
        }
    }

    /// Drops the waiter of a command that was never sent.
    fn forget(&self, seqnum: u32) {
        if let Some(waiters) = self.waiters.lock().expect("waiters lock").as_mut() {
            waiters.remove(&seqnum);
        }
    }

    /// Runs one URB to completion.
    pub async fn transfer(
        &self,
        endpoint: u8,
        data: UrbData,
        transfer_flags: u32,
    ) -> Result<UrbResult, UsbipClientError> {
        self.submit(endpoint, [0; 8], data, transfer_flags)
            .await?
            .1
            .await
    }

    /// A control transfer; the direction comes from bmRequestType.
    pub async fn control(
        &self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: UrbData,
    ) -> Result<UrbResult, UsbipClientError> {
        let length = match &data {
            UrbData::In(n) => *n as u16,
            UrbData::Out(bytes) => bytes.len() as u16,
        };
        let setup = p2p_usb_common::proto::SetupPacket {
            request_type,
            request,
            value,
            index,
            length,
        }
        .to_bytes();
        let endpoint = if request_type & 0x80 != 0 { 0x80 } else { 0x00 };
        self.submit(endpoint, setup, data, 0).await?.1.await
    }

    /// Closes the connection (a detach, as far as the server can tell).
    pub async fn close(self) {
        let _ = self.writer.lock().await.shutdown().await;
    }
}

/// Reads RET_SUBMIT and RET_UNLINK until the stream ends or breaks, handing
/// each to its waiter.
async fn read_replies<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    table: &Mutex<Option<HashMap<u32, Waiter>>>,
) {
    let take = |seqnum: u32| {
        table
            .lock()
            .expect("waiters lock")
            .as_mut()
            .and_then(|waiters| waiters.remove(&seqnum))
    };
    let mut header = [0u8; URB_HEADER_LEN];
    while reader.read_exact(&mut header).await.is_ok() {
        let Ok(parsed) = UrbHeader::decode(&header) else {
            return;
        };
        match parsed {
            UrbHeader::RetSubmit(ret) => {
                let waiter = take(ret.seqnum);
                let dir_in = matches!(waiter, Some(Waiter::Submit { dir_in: true, .. }));
                let length = if dir_in {
                    ret.actual_length.max(0) as usize
                } else {
                    0
                };
                let iso_len = iso_descriptors_len(ret.number_of_packets);
                // Lengths from the wire are bounded before they are allocated.
                if length > MAX_TRANSFER_LEN as usize
                    || iso_len > MAX_ISO_PACKETS * ISO_DESCRIPTOR_LEN
                {
                    return;
                }
                let mut iso = vec![0u8; iso_len];
                let Ok(data) = read_payload(reader, length).await else {
                    return;
                };
                if reader.read_exact(&mut iso).await.is_err() {
                    return;
                }
                if let Some(Waiter::Submit { tx, .. }) = waiter {
                    let _ = tx.send(UrbResult {
                        status: ret.status,
                        actual_length: ret.actual_length.max(0) as usize,
                        data,
                    });
                }
            }
            UrbHeader::RetUnlink(ret) => {
                if let Some(Waiter::Unlink(tx)) = take(ret.seqnum) {
                    let _ = tx.send(ret.status);
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urbs_fail_instead_of_waiting_once_the_server_is_gone() {
        let (ours, theirs) = tokio::net::UnixStream::pair().unwrap();
        let (reader, writer) = ours.into_split();
        let device = Imported::over(UsbDevice::default(), reader, writer);
        let (_, reply) = device
            .submit(0x81, [0; 8], UrbData::In(64), 0)
            .await
            .unwrap();
        // A server that sends one garbage header and leaves.
        let (_their_reader, mut their_writer) = theirs.into_split();
        their_writer
            .write_all(&[0xff; URB_HEADER_LEN])
            .await
            .unwrap();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(5), reply)
            .await
            .expect("the pending URB is answered");
        assert!(
            matches!(answered, Err(UsbipClientError::Closed)),
            "{answered:?}"
        );
        // Later URBs fail at once rather than wait for a reader that is gone.
        let later = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            device.transfer(0x81, UrbData::In(64), 0),
        )
        .await
        .expect("answered at once");
        assert!(later.is_err(), "{later:?}");
    }
}
