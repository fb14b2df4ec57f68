//! barnraise-mesh: the part of the libp2p network that node and coordinator
//! build from the same code, so both ends speak exactly the same protocol
//! (docs/protocol.md, "Transports"):
//! - [`blobs`]: the answer to the blob protocol, from any [`blobs::BlobSource`];
//! - [`codec`]: the request-response codec of the coordinator and blob
//!   protocols, over the one framing in `barnraise_protocol::framing`;
//! - [`gossip`]: the gossipsub settings, among them content-addressed
//!   message ids, so a plan or manifest has the same id on every peer;
//! - [`dht`]: the Kademlia DHT that finds who provides a blob, with its
//!   bounds and record lifetimes;
//! - [`traffic`]: byte counters by protocol, filled in by the codec;
//! - the protocol names of identify and Kademlia.
//!
//! Each side keeps its own blob store (the node's resumes partial downloads,
//! the coordinator's caches small blobs in memory); the node's multi-provider
//! fetcher lives in `node/src/transfer.rs`, and the coordinator only pulls a
//! committed update from its author.

pub mod blobs;
pub mod codec;
pub mod dht;
pub mod gossip;
pub mod traffic;

/// Identify protocol version string, the same on every peer of a run.
pub const IDENTIFY_PROTOCOL: &str = "/barnraise/id/1";
/// The run's Kademlia protocol (a private DHT, not the public IPFS one).
pub const KAD_PROTOCOL: &str = "/barnraise/kad/1";
