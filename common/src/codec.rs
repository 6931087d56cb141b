//! The one framing codec: a 4-byte big-endian length, then a MessagePack body.
//!
//! The length is checked against the limit before any buffer is sized for the
//! body, so a peer cannot make us allocate by announcing a huge frame. A frame
//! that is well-formed but whose body does not decode is reported as
//! [`Malformed`] without ending the stream, so the receiver can answer it.

use std::cell::RefCell;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::proto::{MAX_FRAME_LEN, Message, RequestId};

const LENGTH_PREFIX: usize = 4;
/// Read buffer of a framed link: room for a burst of large transfers, so
/// they arrive with a few reads instead of 8 KiB (tokio-util's default) at a
/// time. Use with `FramedRead::with_capacity`.
pub const READ_BUFFER_CAPACITY: usize = 256 * 1024;

/// Encodes and decodes [`Message`]s (or, on the agent's control socket, its
/// own request and reply types) on any byte stream.
#[derive(Debug)]
pub struct MessageCodec<T = Message> {
    frames: LengthDelimitedCodec,
    max_frame_len: usize,
    _message: PhantomData<fn() -> T>,
}

impl<T> Default for MessageCodec<T> {
    fn default() -> Self {
        Self::with_max_frame_len(MAX_FRAME_LEN)
    }
}

impl<T> MessageCodec<T> {
    /// A codec refusing frames whose body is longer than `max_frame_len`.
    pub fn with_max_frame_len(max_frame_len: usize) -> Self {
        MessageCodec {
            frames: LengthDelimitedCodec::builder()
                .length_field_length(LENGTH_PREFIX)
                .big_endian()
                .max_frame_length(max_frame_len)
                .new_codec(),
            max_frame_len,
            _message: PhantomData,
        }
    }
}

/// Failures that end a stream: after them the byte stream cannot be resynchronised.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame exceeds the limit of {max} bytes")]
    FrameTooLarge { max: usize },
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A frame whose body is not a message this build understands. The stream is
/// still in sync; the receiver should answer (with the request id, when one
/// could be recovered) and carry on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message: {reason}")]
pub struct Malformed {
    /// The id of the request, when the frame looks like a request.
    pub request_id: Option<RequestId>,
    /// The id of the request answered, when the frame looks like a reply:
    /// its waiter must still get an answer.
    pub reply_id: Option<RequestId>,
    pub reason: String,
}

impl<T: DeserializeOwned> Decoder for MessageCodec<T> {
    type Item = Result<T, Malformed>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, CodecError> {
        let frame = match self.frames.decode(src) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                keep_read_room(src);
                return Ok(None);
            }
            Err(e) if is_length_error(&e) => {
                return Err(CodecError::FrameTooLarge {
                    max: self.max_frame_len,
                });
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Some(decode_frame(frame.freeze())))
    }
}

impl<T: Serialize> Encoder<T> for MessageCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, message: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(e) = rmp_serde::encode::write(&mut dst.writer(), &message) {
            dst.truncate(start);
            return Err(e.into());
        }
        let len = dst.len() - start - LENGTH_PREFIX;
        if len > self.max_frame_len {
            dst.truncate(start);
            return Err(CodecError::FrameTooLarge {
                max: self.max_frame_len,
            });
        }
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Gives the next read a whole [`READ_BUFFER_CAPACITY`] of room. Decoded
/// frames share the read buffer, so once it is used up the buffer grows
/// into a new allocation, and `bytes` sizes those at 64 KiB at most: without
/// this, a burst of large transfers arrives 48 KiB per read.
fn keep_read_room(src: &mut BytesMut) {
    if src.capacity() - src.len() < READ_BUFFER_CAPACITY / 4 {
        src.reserve(READ_BUFFER_CAPACITY);
    }
}

fn is_length_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<tokio_util::codec::LengthDelimitedCodecError>())
}

thread_local! {
    /// The frame being decoded on this thread, so payloads can be sliced out
    /// of it instead of copied (see [`payload`]).
    static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    /// Set while a [`FrameWriter`] encodes on this thread: payloads are
    /// recorded here and referenced, not copied into the frame.
    static DEFERRING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PENDING_PAYLOAD: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Decodes one frame body whose payload fields (`#[serde(with = "payload")]`)
/// become slices of `frame`: a 64 KiB transfer is not copied on the way in.
pub fn decode_frame<T: DeserializeOwned>(frame: Bytes) -> Result<T, Malformed> {
    FRAME.with(|current| *current.borrow_mut() = Some(frame.clone()));
    let decoded = decode_body(&frame);
    FRAME.with(|current| current.borrow_mut().take());
    decoded
}

/// Payloads at least this long are sliced out of the frame they arrived in;
/// shorter ones are copied. A slice keeps its whole read buffer (up to
/// [`READ_BUFFER_CAPACITY`]) alive, which is worth it for bulk data but not
/// for a control or interrupt transfer that may wait on a device for long.
pub const SLICE_FROM: usize = 4096;

/// Serde glue for transfer payloads: written as MessagePack `bin`, read as a
/// zero-copy slice of the frame when decoded through [`decode_frame`]
/// (payloads of [`SLICE_FROM`] bytes or more).
pub mod payload {
    use bytes::Bytes;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    use super::FRAME;

    /// Writes the bytes as one `bin` value. Under a [`super::FrameWriter`]
    /// the bytes themselves are handed over by reference, not copied.
    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        if super::DEFERRING.with(std::cell::Cell::get) {
            super::PENDING_PAYLOAD.with(|pending| *pending.borrow_mut() = Some(bytes.clone()));
        }
        serializer.serialize_bytes(bytes)
    }

    /// Reads a `bin` value, slicing it out of the frame being decoded.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(PayloadVisitor)
    }

    struct PayloadVisitor;

    impl<'de> Visitor<'de> for PayloadVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte payload")
        }

        fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
            if v.len() < super::SLICE_FROM {
                return Ok(Bytes::copy_from_slice(v));
            }
            Ok(FRAME.with(|current| match current.borrow().as_ref() {
                Some(frame) => {
                    let base = frame.as_ptr() as usize;
                    let start = v.as_ptr() as usize;
                    if start >= base && start + v.len() <= base + frame.len() {
                        frame.slice(start - base..start - base + v.len())
                    } else {
                        Bytes::copy_from_slice(v)
                    }
                }
                None => Bytes::copy_from_slice(v),
            }))
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(Bytes::from(bytes))
        }
    }
}

/// What a frame carries, read from its first bytes only: enough for the
/// agent to route and authorize without decoding (or copying) transfers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind<'a> {
    /// A request with its id and the name of its kind (e.g. `Submit`).
    Request {
        id: RequestId,
        kind: &'a str,
    },
    Reply {
        id: RequestId,
    },
    Event,
    Hello,
    /// Not a message this build knows; decode it to get the details.
    Unknown,
}

/// Peeks at a frame body without decoding it.
pub fn peek(body: &[u8]) -> FrameKind<'_> {
    fn inner(body: &[u8]) -> Option<FrameKind<'_>> {
        let mut rest = body;
        if rmp::decode::read_map_len(&mut rest).ok()? != 1 {
            return None;
        }
        let (tag, mut rest) = rmp::decode::read_str_from_slice(rest).ok()?;
        match tag {
            "Hello" => Some(FrameKind::Hello),
            "Event" => Some(FrameKind::Event),
            "Request" | "Reply" => {
                if rmp::decode::read_array_len(&mut rest).ok()? != 2 {
                    return None;
                }
                let id: RequestId = rmp::decode::read_int(&mut rest).ok()?;
                if tag == "Reply" {
                    return Some(FrameKind::Reply { id });
                }
                // A unit variant is a bare string; others a one-entry map.
                let kind = match rmp::decode::read_str_from_slice(rest) {
                    Ok((kind, _)) => kind,
                    Err(_) => {
                        if rmp::decode::read_map_len(&mut rest).ok()? != 1 {
                            return None;
                        }
                        rmp::decode::read_str_from_slice(rest).ok()?.0
                    }
                };
                Some(FrameKind::Request { id, kind })
            }
            _ => None,
        }
    }
    inner(body).unwrap_or(FrameKind::Unknown)
}

/// Writes frames to a byte stream without copying transfer payloads: each
/// message's envelope is encoded into a small buffer and the payloads are
/// written from where they already are, with vectored writes. Messages queued
/// before a flush go out together. Same wire format as [`MessageCodec`].
pub struct FrameWriter<W> {
    io: W,
    pieces: Vec<Bytes>,
    max_frame_len: usize,
}

/// Collects an encoding: small writes go to `head`; the payload the
/// serializer announced is recorded as a separate piece instead.
struct HeadWriter<'a> {
    head: &'a mut BytesMut,
    payloads: &'a mut Vec<(usize, Bytes)>,
}

impl std::io::Write for HeadWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let pending = PENDING_PAYLOAD.with(|pending| {
            let mut pending = pending.borrow_mut();
            let matches = pending.as_ref().is_some_and(|p| {
                p.as_ptr() == buf.as_ptr() && p.len() == buf.len() && !buf.is_empty()
            });
            if matches { pending.take() } else { None }
        });
        match pending {
            Some(payload) => self.payloads.push((self.head.len(), payload)),
            None => self.head.extend_from_slice(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer on `io` with the protocol's frame limit.
    pub fn new(io: W) -> Self {
        FrameWriter {
            io,
            pieces: Vec::new(),
            max_frame_len: MAX_FRAME_LEN,
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.io
    }

    /// Adds a message to the next flush.
    pub fn queue<T: Serialize>(&mut self, message: &T) -> Result<(), CodecError> {
        let mut head = BytesMut::with_capacity(128);
        head.put_u32(0);
        let mut payloads = Vec::new();
        DEFERRING.with(|d| d.set(true));
        let encoded = rmp_serde::encode::write(
            &mut HeadWriter {
                head: &mut head,
                payloads: &mut payloads,
            },
            message,
        );
        DEFERRING.with(|d| d.set(false));
        PENDING_PAYLOAD.with(|p| p.borrow_mut().take());
        encoded?;
        let len = head.len() - LENGTH_PREFIX + payloads.iter().map(|(_, p)| p.len()).sum::<usize>();
        if len > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                max: self.max_frame_len,
            });
        }
        head[..LENGTH_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
        let mut head = head.freeze();
        let mut consumed = 0;
        for (offset, payload) in payloads {
            self.pieces.push(head.split_to(offset - consumed));
            consumed = offset;
            self.pieces.push(payload);
        }
        self.pieces.push(head);
        Ok(())
    }

    /// Adds an already encoded frame body to the next flush.
    pub fn queue_raw(&mut self, body: Bytes) -> Result<(), CodecError> {
        if body.len() > self.max_frame_len {
            return Err(CodecError::FrameTooLarge {
                max: self.max_frame_len,
            });
        }
        self.pieces
            .push(Bytes::copy_from_slice(&(body.len() as u32).to_be_bytes()));
        self.pieces.push(body);
        Ok(())
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), CodecError> {
        write_all_vectored(&mut self.io, &mut self.pieces).await?;
        Ok(())
    }

    /// Queues and flushes one message.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), CodecError> {
        self.queue(message)?;
        self.flush().await
    }

    /// Sends a last message, then shuts the stream down.
    pub async fn shutdown_with<T: Serialize>(&mut self, message: &T) -> Result<(), CodecError> {
        self.queue(message)?;
        self.shutdown().await
    }

    /// Flushes and shuts the stream down, so the peer sees the end.
    pub async fn shutdown(&mut self) -> Result<(), CodecError> {
        use tokio::io::AsyncWriteExt;
        self.flush().await?;
        self.io.shutdown().await?;
        Ok(())
    }
}

/// Writes (and empties) `pieces` with vectored writes, so payloads go to the
/// stream from where they are instead of being copied into a buffer first;
/// then flushes.
pub async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    pieces: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    pieces.retain(|piece| !piece.is_empty());
    let mut start = 0;
    while start < pieces.len() {
        let slices: Vec<std::io::IoSlice<'_>> = pieces[start..]
            .iter()
            .take(64)
            .map(|p| std::io::IoSlice::new(p))
            .collect();
        let mut written = writer.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let piece = &mut pieces[start];
            if written >= piece.len() {
                written -= piece.len();
                start += 1;
            } else {
                piece.advance(written);
                written = 0;
            }
        }
    }
    pieces.clear();
    writer.flush().await
}

/// Encodes a message as a frame body (without the length prefix).
pub fn encode_body(message: &Message) -> Result<Bytes, CodecError> {
    Ok(Bytes::from(rmp_serde::to_vec(message)?))
}

/// The raw framing alone, for the agent, which forwards frames it does not
/// need to decode. Same wire format, size limit and read buffering as
/// [`MessageCodec`].
pub fn frame_codec() -> FrameCodec {
    FrameCodec(
        LengthDelimitedCodec::builder()
            .length_field_length(LENGTH_PREFIX)
            .big_endian()
            .max_frame_length(MAX_FRAME_LEN)
            .new_codec(),
    )
}

/// Decoder of raw frames (see [`frame_codec`]).
#[derive(Debug)]
pub struct FrameCodec(LengthDelimitedCodec);

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<BytesMut>> {
        let frame = self.0.decode(src)?;
        if frame.is_none() {
            keep_read_room(src);
        }
        Ok(frame)
    }
}

/// Decodes one frame body; on failure recovers the request id if it can.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, Malformed> {
    rmp_serde::from_slice(body).map_err(|e| Malformed {
        request_id: id_of("Request", body),
        reply_id: id_of("Reply", body),
        reason: e.to_string(),
    })
}

/// Reads `{"Request": [id, ...]}` (or `Reply`) loosely, so an unknown
/// request kind can still be answered with an error under the right id, and
/// an unreadable reply still ends its request.
fn id_of(kind: &str, body: &[u8]) -> Option<RequestId> {
    let value = rmpv::decode::read_value(&mut &body[..]).ok()?;
    let (tag, fields) = value.as_map()?.first()?;
    if tag.as_str()? != kind {
        return None;
    }
    let id = match fields {
        rmpv::Value::Array(items) => items.first()?,
        rmpv::Value::Map(entries) => &entries.iter().find(|(k, _)| k.as_str() == Some("id"))?.1,
        _ => return None,
    };
    id.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn round_trip(message: Message) {
        let mut codec = MessageCodec::<Message>::default();
        let mut buf = BytesMut::new();
        codec.encode(message.clone(), &mut buf).unwrap();
        let decoded = codec.decode(&mut buf).unwrap().unwrap().unwrap();
        assert_eq!(decoded, message);
        assert!(buf.is_empty());
    }

    #[test]
    fn messages_round_trip() {
        round_trip(Message::Hello(Hello::new("test")));
        round_trip(Message::Request {
            id: 7,
            body: Request::Submit(Transfer {
                handle: 1,
                endpoint: 0x01,
                setup: None,
                data: TransferData::Out(Bytes::from_static(b"hello")),
                flags: TransferFlags {
                    zero_packet: true,
                    short_not_ok: false,
                },
                timeout_ms: Some(1000),
            }),
        });
        round_trip(Message::Reply {
            id: u64::MAX,
            body: Err(UsbError::Stall),
        });
        round_trip(Message::Reply {
            id: 3,
            body: Ok(Reply::Transferred(Completion {
                actual_length: 3,
                data: Bytes::from_static(&[1, 2, 3]),
            })),
        });
        round_trip(Message::Reply {
            id: 4,
            body: Ok(Reply::PartlyTransferred {
                error: UsbError::Stall,
                completion: Completion {
                    actual_length: 5000,
                    data: Bytes::from(vec![9; 5000]),
                },
            }),
        });
        round_trip(Message::Event(Event::DeviceLeft {
            key: "1-1/0525:a4a0".parse().unwrap(),
        }));
    }

    #[test]
    fn payload_is_encoded_as_msgpack_bin_not_an_integer_array() {
        let payload = vec![0xAAu8; 1000];
        let mut buf = BytesMut::new();
        MessageCodec::<Message>::default()
            .encode(
                Message::Reply {
                    id: 1,
                    body: Ok(Reply::Transferred(Completion {
                        actual_length: 1000,
                        data: Bytes::from(payload),
                    })),
                },
                &mut buf,
            )
            .unwrap();
        // bin16 header (0xc5) followed by the length; an array of 0xAA would
        // need two bytes per element (0xcc 0xaa).
        assert!(buf.windows(3).any(|w| w == [0xc5, 0x03, 0xe8]));
        assert!(buf.len() < 1100);
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_the_body() {
        let mut codec = MessageCodec::<Message>::with_max_frame_len(1024);
        let mut buf = BytesMut::from(&(1u32 << 30).to_be_bytes()[..]);
        match codec.decode(&mut buf) {
            Err(CodecError::FrameTooLarge { max }) => assert_eq!(max, 1024),
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(buf.capacity() < 1024, "no buffer sized for the body");
    }

    #[test]
    fn oversized_message_is_not_encoded() {
        let mut codec = MessageCodec::<Message>::with_max_frame_len(100);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let big = Message::Reply {
            id: 1,
            body: Ok(Reply::Transferred(Completion {
                actual_length: 200,
                data: Bytes::from(vec![0; 200]),
            })),
        };
        assert!(matches!(
            codec.encode(big, &mut buf),
            Err(CodecError::FrameTooLarge { .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn unknown_request_kind_keeps_its_id() {
        use rmpv::Value;
        let unknown = Value::Map(vec![(
            Value::from("Request"),
            Value::Array(vec![
                Value::from(42u64),
                Value::Map(vec![(Value::from("Frobnicate"), Value::Array(vec![]))]),
            ]),
        )]);
        let mut raw = Vec::new();
        rmpv::encode::write_value(&mut raw, &unknown).unwrap();

        let mut frame = BytesMut::new();
        frame.put_u32(raw.len() as u32);
        frame.extend_from_slice(&raw);
        let malformed = MessageCodec::<Message>::default()
            .decode(&mut frame)
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(malformed.request_id, Some(42));
        assert!(
            malformed.reason.contains("Frobnicate"),
            "{}",
            malformed.reason
        );
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut codec = MessageCodec::<Message>::default();
        let mut full = BytesMut::new();
        codec
            .encode(Message::Hello(Hello::new("x")), &mut full)
            .unwrap();
        let mut buf = BytesMut::new();
        for byte in &full[..full.len() - 1] {
            buf.put_u8(*byte);
            assert!(codec.decode(&mut buf).unwrap().is_none());
        }
        buf.put_u8(full[full.len() - 1]);
        assert!(codec.decode(&mut buf).unwrap().is_some());
    }

    /// Decodes a reply carrying `len` payload bytes through [`decode_frame`];
    /// true if the payload points into the frame rather than to a copy.
    fn payload_is_a_slice_of_its_frame(len: usize) -> bool {
        let message = Message::Reply {
            id: 9,
            body: Ok(Reply::Transferred(Completion {
                actual_length: len as u32,
                data: Bytes::from(vec![7u8; len]),
            })),
        };
        let frame = Bytes::from(rmp_serde::to_vec(&message).unwrap());
        let decoded: Message = decode_frame(frame.clone()).unwrap();
        assert_eq!(decoded, message);
        // Outside decode_frame the same bytes are copied, still correctly.
        assert_eq!(decode_body::<Message>(&frame).unwrap(), message);
        let Message::Reply {
            body: Ok(Reply::Transferred(c)),
            ..
        } = &decoded
        else {
            panic!("{decoded:?}")
        };
        let (base, start) = (frame.as_ptr() as usize, c.data.as_ptr() as usize);
        start > base && start + c.data.len() <= base + frame.len()
    }

    #[test]
    fn long_payloads_are_sliced_out_of_the_frame_and_short_ones_copied() {
        assert!(payload_is_a_slice_of_its_frame(SLICE_FROM));
        assert!(payload_is_a_slice_of_its_frame(64 * 1024));
        assert!(
            !payload_is_a_slice_of_its_frame(8),
            "an 8-byte payload is copied: it would keep the whole read buffer alive"
        );
    }

    #[test]
    fn reads_get_a_whole_buffer_of_room_while_frames_are_held() {
        // A decoded frame keeps its part of the read buffer; the reads after
        // it must still get READ_BUFFER_CAPACITY of room, not the 64 KiB
        // `bytes` gives a new allocation by default.
        let mut codec = MessageCodec::<Message>::default();
        let mut encoded = BytesMut::new();
        let request = |id| Message::Request {
            id,
            body: Request::Submit(Transfer {
                handle: 1,
                endpoint: 1,
                setup: None,
                data: TransferData::Out(Bytes::from(vec![1u8; 60_000])),
                flags: TransferFlags::default(),
                timeout_ms: None,
            }),
        };
        for id in 0..4 {
            codec.encode(request(id), &mut encoded).unwrap();
        }
        let mut frames = frame_codec();
        for mut buf in [
            BytesMut::with_capacity(READ_BUFFER_CAPACITY),
            BytesMut::new(),
        ] {
            let mut held = Vec::new();
            buf.extend_from_slice(&encoded);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                held.push(frame.unwrap());
            }
            assert_eq!(held.len(), 4);
            assert!(
                buf.capacity() - buf.len() >= READ_BUFFER_CAPACITY,
                "{}",
                buf.capacity()
            );
            let mut raw = Vec::new();
            buf.extend_from_slice(&encoded);
            while let Some(frame) = frames.decode(&mut buf).unwrap() {
                raw.push(frame.freeze());
            }
            assert_eq!(raw.len(), 4);
            assert!(
                buf.capacity() - buf.len() >= READ_BUFFER_CAPACITY,
                "{}",
                buf.capacity()
            );
        }
    }

    #[tokio::test]
    async fn frame_writer_output_is_what_the_decoder_reads() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(a);
        let big = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let messages = vec![
            Message::Hello(Hello::new("w")),
            Message::Request {
                id: 1,
                body: Request::Submit(Transfer {
                    handle: 2,
                    endpoint: 1,
                    setup: None,
                    data: TransferData::Out(big.clone()),
                    flags: TransferFlags {
                        zero_packet: true,
                        short_not_ok: false,
                    },
                    timeout_ms: Some(5),
                }),
            },
            Message::Reply {
                id: 3,
                body: Ok(Reply::Transferred(Completion {
                    actual_length: 0,
                    data: Bytes::new(),
                })),
            },
            Message::Reply {
                id: 4,
                body: Ok(Reply::Transferred(Completion {
                    actual_length: 70_000,
                    data: big.clone(),
                })),
            },
        ];
        for message in &messages {
            writer.queue(message).unwrap();
        }
        writer
            .queue_raw(encode_body(&messages[0]).unwrap())
            .unwrap();
        writer.flush().await.unwrap();
        drop(writer);
        let mut reader = tokio_util::codec::FramedRead::new(b, MessageCodec::<Message>::default());
        use futures_util::StreamExt;
        for expected in messages.iter().chain(std::iter::once(&messages[0])) {
            assert_eq!(&reader.next().await.unwrap().unwrap().unwrap(), expected);
        }
        assert!(reader.next().await.is_none());
    }

    #[test]
    fn peek_reads_kind_and_id_without_decoding() {
        let submit = Message::Request {
            id: 300,
            body: Request::Submit(Transfer {
                handle: 1,
                endpoint: 0x81,
                setup: None,
                data: TransferData::In { length: 64 },
                flags: TransferFlags::default(),
                timeout_ms: None,
            }),
        };
        let body = encode_body(&submit).unwrap();
        assert_eq!(
            peek(&body),
            FrameKind::Request {
                id: 300,
                kind: "Submit"
            }
        );
        let list = encode_body(&Message::Request {
            id: u64::MAX,
            body: Request::ListDevices,
        })
        .unwrap();
        assert_eq!(
            peek(&list),
            FrameKind::Request {
                id: u64::MAX,
                kind: "ListDevices"
            }
        );
        let reply = encode_body(&Message::Reply {
            id: 5,
            body: Err(UsbError::Stall),
        })
        .unwrap();
        assert_eq!(peek(&reply), FrameKind::Reply { id: 5 });
        let event =
            encode_body(&Message::Event(Event::ShuttingDown { reason: "x".into() })).unwrap();
        assert_eq!(peek(&event), FrameKind::Event);
        assert_eq!(
            peek(&encode_body(&Message::Hello(Hello::new("t"))).unwrap()),
            FrameKind::Hello
        );
        assert_eq!(peek(&[0xc1, 0x00]), FrameKind::Unknown);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any byte soup either waits for more bytes, yields a message or a
        /// `Malformed`, or ends the stream with an error: never a panic.
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut codec = MessageCodec::<Message>::with_max_frame_len(4096);
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.extend_from_slice(&chunk);
                while let Ok(Some(_)) = codec.decode(&mut buf) {}
            }
        }

        /// Well-framed random bodies never panic the body decoder or the peek.
        #[test]
        fn body_decoder_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_body::<Message>(&body);
            let _ = decode_frame::<Message>(Bytes::from(body.clone()));
            let _ = peek(&body);
        }
    }
}
