//! The node's network layer: one libp2p swarm (TCP and QUIC, noise, yamux;
//! TCP optionally through a userspace link shaper, [`shaper`])
//! running identify, ping, Kademlia, gossipsub, two request-response
//! protocols, AutoNAT, a relay client and DCUtR, under connection limits.
//!
//! Shaped like rust-libp2p's file-sharing example: [`new`] returns a
//! cloneable [`Client`] whose methods send a [`Command`] with a `oneshot`
//! reply, a bounded stream of [`Event`]s, and an [`EventLoop`] that alone owns
//! the `Swarm` and keeps the `pending_*` maps keyed by request id.
//!
//! Protocols (names and caps in `barnraise_protocol::limits`):
//! - `/barnraise/coordinator/1`: the node asks, the coordinator answers
//!   (`CoordinatorRequest` → `CoordinatorResponse`).
//! - `/barnraise/blob/1`: anyone asks, anyone with the blob answers
//!   (`Have` → size, `Chunk` → at most `BLOB_CHUNK_BYTES` bytes). Both use
//!   the length-prefixed framing of [`codec`].
//! - gossipsub topics `barnraise/{run}/plans/1`, `barnraise/{run}/manifests/1`
//!   and `barnraise/{run}/updates/1` carry the coordinator's signed plans,
//!   manifests and update notices. Validation is manual
//!   and strict: a message is accepted only if it parses, its signature
//!   verifies, its signer is the coordinator, and its run matches the topic;
//!   anything else is reported `Reject`, which costs the forwarding peer
//!   gossipsub score.
//!
//! Nothing that arrives from the network can panic the loop: every decode is
//! size-capped and fallible, every channel is bounded, and a full event
//! channel drops the event with a warning rather than stalling the swarm
//! (plans and manifests are also polled, so a dropped one is recovered).

pub mod codec;
mod event_loop;
pub mod shaper;

use crate::limiter::RateLimiter;
use crate::store::{BlobStore, StoreError};
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse, Manifest, RoundPlan,
    UpdateNotice,
};
use barnraise_protocol::{Hash, PublicKey, Signed};
use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use event_loop::EventLoop;

/// Largest gossip message: a manifest in its envelope, plus gossipsub's own framing.
pub use barnraise_mesh::gossip::MAX_GOSSIP_BYTES;
/// Queue depth of the command and event channels.
const CHANNEL_DEPTH: usize = 256;
/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent streams per connection and protocol; more inbound requests wait.
pub const MAX_CONCURRENT_STREAMS: usize = 32;
/// Connections the node keeps at most, in total and per peer.
pub const MAX_ESTABLISHED_CONNECTIONS: u32 = 256;
pub const MAX_CONNECTIONS_PER_PEER: u32 = 4;
pub const MAX_PENDING_CONNECTIONS: u32 = 64;

/// What went wrong on the network.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetworkError {
    #[error("could not start the network: {0}")]
    Build(String),
    #[error("could not listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("could not connect to {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("request to peer {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
    #[error("could not publish on {topic}: {reason}")]
    Publish { topic: String, reason: String },
    #[error("the network task has stopped")]
    Closed,
}

/// Which gossip topic a message came on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Plans {
        run_id: String,
    },
    Manifests {
        run_id: String,
    },
    /// The coordinator's notices of updates that passed stage 2, fetched
    /// before the manifest (`crate::daemon`'s prefetch).
    Updates {
        run_id: String,
    },
}

impl Topic {
    /// The topic's name on the wire.
    pub fn name(&self) -> String {
        match self {
            Topic::Plans { run_id } => format!("barnraise/{run_id}/plans/1"),
            Topic::Manifests { run_id } => format!("barnraise/{run_id}/manifests/1"),
            Topic::Updates { run_id } => format!("barnraise/{run_id}/updates/1"),
        }
    }

    pub fn run_id(&self) -> &str {
        match self {
            Topic::Plans { run_id } | Topic::Manifests { run_id } | Topic::Updates { run_id } => {
                run_id
            }
        }
    }
}

/// What AutoNAT and our listeners say about reachability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reachability {
    /// Peers dialled us back at this address.
    Public(Multiaddr),
    /// Peers could not dial us; we are reachable through a relay at this address.
    Relayed(Multiaddr),
    /// Peers could not dial us and no relay reservation is up.
    Private,
    /// Not enough peers have tried yet.
    Unknown,
}

impl Reachability {
    /// One word for summaries and JSON: `public`, `relayed`, `private`, `unknown`.
    pub fn label(&self) -> &'static str {
        match self {
            Reachability::Public(_) => "public",
            Reachability::Relayed(_) => "relayed",
            Reachability::Private => "private",
            Reachability::Unknown => "unknown",
        }
    }
}

/// A snapshot of the swarm for `doctor` and logs.
#[derive(Clone, Debug)]
pub struct NetworkStatus {
    pub peer_id: PeerId,
    pub listen_addrs: Vec<Multiaddr>,
    pub external_addrs: Vec<Multiaddr>,
    pub reachability: Reachability,
    pub connected_peers: Vec<PeerId>,
    /// Relayed links upgraded to direct ones by hole punching (DCUtR), and
    /// attempts that failed.
    pub hole_punches: u64,
    pub hole_punches_failed: u64,
    /// Relay reservations accepted since start: whether the node was ever
    /// reachable through a relay, which `reachability` (the state now)
    /// does not say once a reservation has lapsed or before one is made.
    pub relay_reservations: u64,
}

/// What the network reports to the node.
#[derive(Debug)]
pub enum Event {
    /// A round plan that passed validation.
    Plan {
        source: PeerId,
        plan: RoundPlan,
        signed: Signed<RoundPlan>,
    },
    /// A manifest that passed validation.
    Manifest {
        source: PeerId,
        manifest: Manifest,
        signed: Signed<Manifest>,
    },
    /// An update notice that passed validation.
    UpdateNotice {
        source: PeerId,
        notice: UpdateNotice,
    },
    /// Gossip that failed validation and was rejected (the peer was penalized).
    GossipRejected {
        source: PeerId,
        topic: String,
        reason: String,
    },
    /// A coordinator-protocol request (only when serving that protocol; the
    /// coordinator side of tests).
    CoordinatorRequest {
        peer: PeerId,
        request: CoordinatorRequest,
        channel: ResponseChannel<CoordinatorResponse>,
    },
    /// We served `bytes` of blob data to `peer`.
    BlobServed {
        peer: PeerId,
        bytes: u64,
    },
    PeerConnected {
        peer: PeerId,
    },
    PeerDisconnected {
        peer: PeerId,
    },
    ReachabilityChanged(Reachability),
}

pub use barnraise_mesh::blobs::{BlobSource, ReadError, serve_blob};

impl BlobSource for BlobStore {
    fn size(&self, hash: &Hash) -> Option<u64> {
        BlobStore::size(self, hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        self.read_range(hash, offset, len).map_err(ReadError::from)
    }
    fn background(&self, hash: &Hash) -> bool {
        self.is_background(hash)
    }
}

impl From<StoreError> for ReadError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ReadError::NotFound,
            StoreError::Range { .. } => ReadError::OutOfRange,
            other => ReadError::Failed(other.to_string()),
        }
    }
}

/// How to build the network.
pub struct NetworkConfig {
    pub keypair: libp2p::identity::Keypair,
    pub listen: Vec<Multiaddr>,
    /// What we serve on the blob protocol.
    pub blobs: Arc<dyn BlobSource>,
    /// Cap on the bytes we serve per second.
    pub upload: RateLimiter,
    /// The key whose signatures gossip must carry; settable later.
    pub coordinator_key: Option<PublicKey>,
    /// Answer the coordinator protocol (a coordinator, or a fake one in tests).
    pub serve_coordinator: bool,
    /// Shape every TCP connection's bytes through this link (`up
    /// --link-mbps/--link-latency-ms`; `None` for a real node).
    pub link: Option<shaper::Link>,
}

/// The commands a [`Client`] sends the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetworkError>>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Coordinator {
        peer: PeerId,
        request: CoordinatorRequest,
        reply: oneshot::Sender<Result<CoordinatorResponse, NetworkError>>,
    },
    Blob {
        peer: PeerId,
        request: BlobRequest,
        reply: oneshot::Sender<Result<BlobResponse, NetworkError>>,
    },
    RespondCoordinator {
        channel: ResponseChannel<CoordinatorResponse>,
        response: CoordinatorResponse,
    },
    Subscribe {
        topic: Topic,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    SetCoordinatorKey {
        key: PublicKey,
    },
    AddRelay {
        addr: Multiaddr,
    },
    StartProviding {
        hash: Hash,
    },
    StopProviding {
        hash: Hash,
    },
    GetProviders {
        hash: Hash,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Penalize {
        peer: PeerId,
        reason: String,
    },
    PeerScore {
        peer: PeerId,
        reply: oneshot::Sender<Option<f64>>,
    },
    Status {
        reply: oneshot::Sender<NetworkStatus>,
    },
}

/// A cheap handle to the network task.
#[derive(Clone, Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
}

/// Builds the swarm and starts listening. Run the returned [`EventLoop`]
/// (e.g. `tokio::spawn(event_loop.run(shutdown))`) before using the client.
pub fn new(
    config: NetworkConfig,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop), NetworkError> {
    let local_peer_id = config.keypair.public().to_peer_id();
    let (command_tx, command_rx) = mpsc::channel(CHANNEL_DEPTH);
    let (event_tx, event_rx) = mpsc::channel(CHANNEL_DEPTH);
    let event_loop = EventLoop::new(config, command_rx, event_tx)?;
    Ok((
        Client {
            commands: command_tx,
            local_peer_id,
        },
        event_rx,
        event_loop,
    ))
}

impl Client {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetworkError> {
        let (reply, receive) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| NetworkError::Closed)?;
        receive.await.map_err(|_| NetworkError::Closed)
    }

    async fn tell(&self, command: Command) -> Result<(), NetworkError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetworkError::Closed)
    }

    /// Connects to `addr` and returns the peer there.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetworkError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Tells the swarm (and Kademlia) where `peer` can be reached.
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), NetworkError> {
        self.tell(Command::AddAddress { peer, addr }).await
    }

    /// Adds a welcome's or plan's bootstrap peers to the swarm and the DHT
    /// routing table (what parses, within the protocol's bounds); returns how
    /// many addresses were added.
    pub async fn add_bootstrap(
        &self,
        peers: &[barnraise_protocol::messages::BootstrapPeer],
    ) -> Result<usize, NetworkError> {
        let addrs = barnraise_mesh::dht::bootstrap_addrs(peers, &self.local_peer_id);
        let added = addrs.len();
        for (peer, addr) in addrs {
            self.add_address(peer, addr).await?;
        }
        Ok(added)
    }

    pub async fn coordinator_request(
        &self,
        peer: PeerId,
        request: CoordinatorRequest,
    ) -> Result<CoordinatorResponse, NetworkError> {
        self.ask(|reply| Command::Coordinator {
            peer,
            request,
            reply,
        })
        .await?
    }

    pub async fn blob_request(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, NetworkError> {
        self.ask(|reply| Command::Blob {
            peer,
            request,
            reply,
        })
        .await?
    }

    /// Answers a coordinator-protocol request (serving side).
    pub async fn respond_coordinator(
        &self,
        channel: ResponseChannel<CoordinatorResponse>,
        response: CoordinatorResponse,
    ) -> Result<(), NetworkError> {
        self.tell(Command::RespondCoordinator { channel, response })
            .await
    }

    pub async fn subscribe(&self, topic: Topic) -> Result<(), NetworkError> {
        self.ask(|reply| Command::Subscribe { topic, reply })
            .await?
    }

    pub async fn publish(&self, topic: Topic, data: Vec<u8>) -> Result<(), NetworkError> {
        self.ask(|reply| Command::Publish { topic, data, reply })
            .await?
    }

    /// Pins whose signature gossip must carry.
    pub async fn set_coordinator_key(&self, key: PublicKey) -> Result<(), NetworkError> {
        self.tell(Command::SetCoordinatorKey { key }).await
    }

    /// A relay (`/.../p2p/<relay>`) to listen through if AutoNAT finds us private.
    pub async fn add_relay(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.tell(Command::AddRelay { addr }).await
    }

    /// Announces on Kademlia that we hold blob `hash`.
    pub async fn start_providing(&self, hash: Hash) -> Result<(), NetworkError> {
        self.tell(Command::StartProviding { hash }).await
    }

    /// Stops announcing blob `hash` (it was pruned).
    pub async fn stop_providing(&self, hash: Hash) -> Result<(), NetworkError> {
        self.tell(Command::StopProviding { hash }).await
    }

    /// Peers that announced blob `hash` on Kademlia (empty when none answer).
    pub async fn get_providers(&self, hash: Hash) -> Result<Vec<PeerId>, NetworkError> {
        self.ask(|reply| Command::GetProviders { hash, reply })
            .await
    }

    /// Lowers `peer`'s score (gossipsub application score), e.g. for serving
    /// bytes that did not match their hash.
    pub async fn penalize(
        &self,
        peer: PeerId,
        reason: impl Into<String>,
    ) -> Result<(), NetworkError> {
        self.tell(Command::Penalize {
            peer,
            reason: reason.into(),
        })
        .await
    }

    /// The gossipsub score of `peer` (None if unknown).
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, NetworkError> {
        self.ask(|reply| Command::PeerScore { peer, reply }).await
    }

    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        self.ask(|reply| Command::Status { reply }).await
    }
}
