//! The libp2p request-response codec for the coordinator and blob
//! protocols. The framing itself — a length prefix checked against the
//! message kind's cap, a buffer that grows only as bytes arrive — is
//! `barnraise_protocol::framing`.

pub use barnraise_protocol::framing::{read_framed, write_framed};
pub use barnraise_protocol::messages::Framed;
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse,
};
use futures::{AsyncRead, AsyncWrite};
use libp2p::StreamProtocol;
use std::io;
use std::marker::PhantomData;

/// A request-response codec for one request type and one response type.
pub struct Codec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

/// The coordinator protocol's codec (`COORDINATOR_PROTOCOL`).
pub type CoordinatorCodec = Codec<CoordinatorRequest, CoordinatorResponse>;
/// The blob protocol's codec (`BLOB_PROTOCOL`).
pub type BlobCodec = Codec<BlobRequest, BlobResponse>;

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
