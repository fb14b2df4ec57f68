//! The request-response framing shared by the coordinator and blob
//! protocols: a `u32` little-endian length, then that many bytes of the
//! message's own wire encoding (`X::encode` / `X::decode` in
//! `barnraise_protocol::messages`).
//!
//! The reader refuses a length over the protocol's cap *before* it allocates
//! the buffer, so a peer claiming a 4 GiB message costs us four bytes of
//! reading, never 4 GiB of memory.

pub use barnraise_protocol::messages::Framed;
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse,
};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;
use std::marker::PhantomData;

/// The first allocation for an incoming message; it grows with the data.
const INITIAL_BUFFER: usize = 64 * 1024;

/// Reads one length-prefixed message, refusing over-cap lengths before
/// allocating.
pub async fn read_framed<M: Framed, T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<M> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_le_bytes(prefix) as usize;
    if len > M::MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "peer announced a {len}-byte message; the limit is {} bytes",
                M::MAX_BYTES
            ),
        ));
    }
    // Grow the buffer as bytes actually arrive, so a peer that announces a
    // large (but allowed) message and sends little costs little memory.
    let mut buf = Vec::with_capacity(len.min(INITIAL_BUFFER));
    (&mut *io).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("message cut short at {} of {len} bytes", buf.len()),
        ));
    }
    M::from_wire(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Writes one length-prefixed message (refusing to send one over its cap).
pub async fn write_framed<M: Framed, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    message: &M,
) -> io::Result<()> {
    let bytes = message
        .to_wire()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if bytes.len() > M::MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message over its protocol's size limit",
        ));
    }
    // Checked just above: the length fits in u32 because every cap does.
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too long"))?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// A request-response codec for one request type and one response type.
pub struct Codec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec(PhantomData)
    }
}

impl<Req: Framed + 'static, Resp: Framed + 'static> libp2p::request_response::Codec
    for Codec<Req, Resp>
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Req> {
        read_framed(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        read_framed(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Req,
    ) -> io::Result<()> {
        write_framed(io, &request).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()> {
        write_framed(io, &response).await
    }
}

pub type CoordinatorCodec = Codec<CoordinatorRequest, CoordinatorResponse>;
pub type BlobCodec = Codec<BlobRequest, BlobResponse>;

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::Hash;
    use barnraise_protocol::limits::MAX_BLOB_REQUEST_BYTES;

    #[tokio::test]
    async fn round_trip_and_cap() {
        let request = BlobRequest::Chunk {
            hash: Hash::of(b"x"),
            offset: 7,
            len: 1024,
        };
        let mut buf = Vec::new();
        write_framed(&mut futures::io::Cursor::new(&mut buf), &request)
            .await
            .unwrap();
        let back: BlobRequest = read_framed(&mut futures::io::Cursor::new(&buf))
            .await
            .unwrap();
        assert_eq!(back, request);
        // A length prefix one over the cap is refused without reading on.
        let mut hostile = ((MAX_BLOB_REQUEST_BYTES + 1) as u32).to_le_bytes().to_vec();
        hostile.extend_from_slice(&[0u8; 16]);
        let err = read_framed::<BlobRequest, _>(&mut futures::io::Cursor::new(&hostile))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A truncated body is an error, not a hang or a panic.
        let short = [10u8, 0, 0, 0, 1, 2];
        assert!(
            read_framed::<BlobRequest, _>(&mut futures::io::Cursor::new(&short))
                .await
                .is_err()
        );
    }
}
