//! Framing of the request-response protocols: a u32 little-endian length,
//! then that many bytes of the message's own encoding. The length is checked
//! against the message kind's cap before anything is allocated, so a peer
//! cannot make us reserve memory by claiming a huge frame.

pub use barnraise_protocol::messages::Framed as Frame;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use std::io;
use std::marker::PhantomData;

/// Reads one frame of `T`, refusing an over-long length before allocating.
pub async fn read_frame<T: Frame, R: AsyncRead + Unpin>(io: &mut R) -> io::Result<T> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > T::MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "frame of {len} bytes exceeds the {}-byte limit",
                T::MAX_BYTES
            ),
        ));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    T::from_wire(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

/// Writes one frame of `T`.
pub async fn write_frame<T: Frame, W: AsyncWrite + Unpin>(io: &mut W, value: &T) -> io::Result<()> {
    let body = value
        .to_wire()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "frame too large"))?;
    io.write_all(&len.to_le_bytes()).await?;
    io.write_all(&body).await?;
    io.close().await
}

/// A request-response codec for a request type and a response type.
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

impl<Req: Frame, Resp: Frame> libp2p::request_response::Codec for Codec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Req> {
        read_frame(io).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        read_frame(io).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Req,
    ) -> io::Result<()> {
        write_frame(io, &req).await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()> {
        write_frame(io, &res).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::Hash;
    use barnraise_protocol::messages::{BlobRequest, CoordinatorRequest};

    #[test]
    fn frames_round_trip_and_refuse_huge_lengths() {
        futures::executor::block_on(async {
            let request = BlobRequest::Chunk {
                hash: Hash::of(b"x"),
                offset: 5,
                len: 10,
            };
            let mut buf = Vec::new();
            write_frame(&mut futures::io::Cursor::new(&mut buf), &request)
                .await
                .unwrap();
            let back: BlobRequest = read_frame(&mut futures::io::Cursor::new(&buf))
                .await
                .unwrap();
            assert_eq!(back, request);
            // A length prefix over the cap is refused before the body is read.
            let mut hostile = (u32::MAX).to_le_bytes().to_vec();
            hostile.extend_from_slice(&[0; 8]);
            let err = read_frame::<BlobRequest, _>(&mut futures::io::Cursor::new(&hostile))
                .await
                .err()
                .unwrap();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            // Garbage of an allowed length is an error, not a panic.
            let mut garbage = 8u32.to_le_bytes().to_vec();
            garbage.extend_from_slice(&[0xFF; 8]);
            assert!(
                read_frame::<CoordinatorRequest, _>(&mut futures::io::Cursor::new(&garbage))
                    .await
                    .is_err()
            );
        });
    }
}
