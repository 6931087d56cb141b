//! An iroh send stream as a sink for frames. iroh's `SendStream` takes one
//! buffer per write (it has no vectored write) and wakes its connection for
//! every write. A frame goes out as a length prefix, a head and a payload, so
//! a burst of eight frames would cost 24 stream writes. [`QuicWriter`] gathers
//! each vectored write into one owned chunk and hands it to the stream
//! without a further copy: a burst costs one write and one wake-up.

use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use iroh::endpoint::SendStream;
use tokio::io::AsyncWrite;

/// Bytes gathered into one chunk per write at most; a stream held back by
/// flow control then re-gathers little when it is polled again.
const MAX_CHUNK: usize = 256 * 1024;

/// A `SendStream` with real vectored writes.
#[derive(Debug)]
pub struct QuicWriter {
    stream: SendStream,
}

impl QuicWriter {
    /// Wraps `stream`.
    pub fn new(stream: SendStream) -> Self {
        QuicWriter { stream }
    }

    /// The stream, for what `AsyncWrite` does not cover (`stopped`, `reset`).
    pub fn get_mut(&mut self) -> &mut SendStream {
        &mut self.stream
    }
}

/// The first `MAX_CHUNK` bytes of `slices`, in one buffer.
fn gather(slices: &[IoSlice<'_>]) -> Bytes {
    let total = slices.iter().map(|s| s.len()).sum::<usize>().min(MAX_CHUNK);
    let mut chunk = BytesMut::with_capacity(total);
    for slice in slices {
        let room = total - chunk.len();
        if room == 0 {
            break;
        }
        chunk.extend_from_slice(&slice[..slice.len().min(room)]);
    }
    chunk.freeze()
}

impl AsyncWrite for QuicWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The `AsyncWrite` method, not the inherent one with iroh's error type.
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().stream), cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut chunks = [gather(slices)];
        let mut pending: &mut [Bytes] = &mut chunks;
        // Cancel-safe: when this is pending, nothing was written.
        pin!(self.get_mut().stream.write_many_chunks(&mut pending))
            .poll(cx)
            .map_err(io::Error::from)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_joins_slices_in_order_up_to_the_limit() {
        let a = [1u8; 4];
        let b = vec![2u8; MAX_CHUNK];
        let joined = gather(&[IoSlice::new(&a), IoSlice::new(&[]), IoSlice::new(&b)]);
        assert_eq!(joined.len(), MAX_CHUNK);
        assert_eq!(&joined[..4], &a);
        assert!(joined[4..].iter().all(|&x| x == 2));
        assert_eq!(
            gather(&[IoSlice::new(&a)]),
            Bytes::from_static(&[1, 1, 1, 1])
        );
    }
}
