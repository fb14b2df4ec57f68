//! The libp2p request-response codec for the coordinator and blob
//! protocols, over `barnraise_protocol::framing` (shared with the node): a
//! length prefix checked against the message kind's cap, and a buffer that
//! grows only as bytes arrive, so no peer can make us reserve memory by
//! claiming a large frame.

use barnraise_protocol::framing::{read_framed as read_frame, write_framed as write_frame};
pub use barnraise_protocol::messages::Framed as Frame;
use futures::{AsyncRead, AsyncWrite};
use libp2p::StreamProtocol;
use std::io;
use std::marker::PhantomData;

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
