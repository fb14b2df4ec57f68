//! The libp2p request-response codec for the coordinator and blob
//! protocols. The framing itself — a length prefix checked against the
//! message kind's cap, a buffer that grows only as bytes arrive — is
//! `barnraise_protocol::framing`.

pub use barnraise_protocol::framing::{read_framed, read_framed_counted, write_framed};
pub use barnraise_protocol::messages::Framed;
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse,
};
use futures::{AsyncRead, AsyncWrite};
use libp2p::StreamProtocol;
use std::io;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use crate::traffic::Counter;

/// A request-response codec for one request type and one response type,
/// counting the bytes it writes and reads into a shared [`Counter`].
pub struct Codec<Req, Resp> {
    counter: Arc<Counter>,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec that counts into `counter` (every clone counts there too).
    pub fn counted(counter: Arc<Counter>) -> Self {
        Codec {
            counter,
            types: PhantomData,
        }
    }

    fn sent(&self, bytes: u64) {
        self.counter.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    fn received(&self, bytes: u64) {
        self.counter.received.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The coordinator protocol's codec (`COORDINATOR_PROTOCOL`).
pub type CoordinatorCodec = Codec<CoordinatorRequest, CoordinatorResponse>;
/// The blob protocol's codec (`BLOB_PROTOCOL`).
pub type BlobCodec = Codec<BlobRequest, BlobResponse>;

impl<Req, Resp> Default for Codec<Req, Resp> {
    fn default() -> Self {
        Codec::counted(Arc::default())
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec::counted(Arc::clone(&self.counter))
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
        let (request, bytes) = read_framed_counted(io).await?;
        self.received(bytes);
        Ok(request)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Resp> {
        let (response, bytes) = read_framed_counted(io).await?;
        self.received(bytes);
        Ok(response)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: Req,
    ) -> io::Result<()> {
        let bytes = write_framed(io, &request).await?;
        self.sent(bytes);
        Ok(())
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: Resp,
    ) -> io::Result<()> {
        let bytes = write_framed(io, &response).await?;
        self.sent(bytes);
        Ok(())
    }
}
