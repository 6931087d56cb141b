//! Feeds arbitrary bytes to the link decoder (framing, MessagePack body,
//! zero-copy payloads, the agent's frame peek): it must never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use p2p_usb_common::codec::{MessageCodec, decode_frame, peek};
use p2p_usb_common::proto::Message;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = MessageCodec::<Message>::with_max_frame_len(64 * 1024);
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buffer) {}
    let _ = decode_frame::<Message>(bytes::Bytes::copy_from_slice(data));
    let _ = peek(data);
});
