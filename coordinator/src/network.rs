//! The coordinator's libp2p peer, in the file-sharing-example shape: [`new`]
//! returns a cloneable [`Client`] (methods send a [`Command`] to the loop),
//! a bounded stream of [`Event`]s (inbound coordinator requests), and an
//! [`EventLoop`] that alone owns the `Swarm`.
//!
//! The loop answers blob requests itself, straight from the [`BlobStore`]
//! (shards, checkpoints, optimizer state, accepted updates), and fetches
//! committed updates from nodes chunk by chunk for [`fetch_blob`].

use crate::store::BlobStore;
use crate::summary::NetworkTotals;
use barnraise_mesh::codec::{BlobCodec, CoordinatorCodec};
use barnraise_mesh::traffic::Traffic;
use barnraise_protocol::Hash;
use barnraise_protocol::limits::{BLOB_CHUNK_BYTES, BLOB_PROTOCOL, COORDINATOR_PROTOCOL};
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse,
};
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, autonat, gossipsub, identify, kad, noise, ping,
    relay, tcp, yamux,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Why the network could not start or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("libp2p setup: {0}")]
    Setup(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("no listen address came up within {0:?}")]
    NoListenAddress(Duration),
    #[error("the network loop has stopped")]
    Stopped,
    #[error("request to {peer} failed: {reason}")]
    Request { peer: PeerId, reason: String },
}

/// What the coordinator's network moved: by protocol, and its blob
/// egress by what the blob is (docs/protocol.md, "Traffic counters").
#[derive(Clone, Debug, Default)]
pub struct CoordinatorTraffic {
    pub wire: Traffic,
    pub shards_served: Arc<AtomicU64>,
    /// Checkpoints and outer-optimizer state.
    pub state_served: Arc<AtomicU64>,
    /// Everything else the coordinator holds: accepted and committed updates.
    pub updates_served: Arc<AtomicU64>,
    shards: Arc<HashSet<Hash>>,
    state: Arc<Mutex<HashSet<Hash>>>,
}

impl CoordinatorTraffic {
    /// Counters for a run whose training shards are `shards`.
    pub fn new(shards: impl IntoIterator<Item = Hash>) -> CoordinatorTraffic {
        CoordinatorTraffic {
            shards: Arc::new(shards.into_iter().collect()),
            ..CoordinatorTraffic::default()
        }
    }

    /// The blobs that now count as state (θ, momentum, checkpoints).
    pub fn set_state_blobs(&self, blobs: &[Hash]) {
        if let Ok(mut state) = self.state.lock() {
            state.clear();
            state.extend(blobs.iter().copied());
        }
    }

    fn served(&self, hash: &Hash, bytes: u64) {
        let counter = if self.shards.contains(hash) {
            &self.shards_served
        } else if self.state.lock().is_ok_and(|s| s.contains(hash)) {
            &self.state_served
        } else {
            &self.updates_served
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn totals(&self) -> NetworkTotals {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let egress = self.wire.sent();
        let blobs = get(&self.shards_served) + get(&self.state_served) + get(&self.updates_served);
        NetworkTotals {
            coordinator_egress_bytes: egress,
            coordinator_ingress_bytes: self.wire.received(),
            coordinator_shard_bytes: get(&self.shards_served),
            coordinator_state_bytes: get(&self.state_served),
            coordinator_update_bytes: get(&self.updates_served),
            coordinator_message_bytes: egress.saturating_sub(blobs),
            ..NetworkTotals::default()
        }
    }
}

#[derive(NetworkBehaviour)]
pub struct Behaviour {
    coordinator: request_response::Behaviour<CoordinatorCodec>,
    blob: request_response::Behaviour<BlobCodec>,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// The run's DHT, in server mode: nodes bootstrap from the coordinator
    /// and find each other as providers through it.
    kad: kad::Behaviour<kad::store::MemoryStore>,
    /// A circuit relay for nodes behind NATs (bounded by [`relay_config`]).
    relay: relay::Behaviour,
    /// AutoNAT: dials nodes back so they learn whether they are reachable.
    autonat: autonat::Behaviour,
}

/// Relay reservations at once, in all and per node.
pub const RELAY_MAX_RESERVATIONS: usize = 1024;
pub const RELAY_MAX_RESERVATIONS_PER_PEER: usize = 2;
/// Relayed connections at once, in all and per node.
pub const RELAY_MAX_CIRCUITS: usize = 256;
pub const RELAY_MAX_CIRCUITS_PER_PEER: usize = 8;
/// A relayed connection ends after this long or this many bytes (then the
/// peers reconnect, directly after hole punching if they can).
pub const RELAY_MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(10 * 60);
pub const RELAY_MAX_CIRCUIT_BYTES: u64 = 64 << 20;

/// The relay server's limits (docs/running-a-coordinator.md, "Relay").
pub fn relay_config() -> relay::Config {
    relay::Config {
        max_reservations: RELAY_MAX_RESERVATIONS,
        max_reservations_per_peer: RELAY_MAX_RESERVATIONS_PER_PEER,
        reservation_duration: Duration::from_secs(3600),
        max_circuits: RELAY_MAX_CIRCUITS,
        max_circuits_per_peer: RELAY_MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: RELAY_MAX_CIRCUIT_DURATION,
        max_circuit_bytes: RELAY_MAX_CIRCUIT_BYTES,
        ..relay::Config::default()
    }
    // A flood of reservations from one peer or one address is refused.
    .reservation_rate_per_peer(nonzero(4), Duration::from_secs(60))
    .reservation_rate_per_ip(nonzero(32), Duration::from_secs(60))
    .circuit_src_per_peer(nonzero(60), Duration::from_secs(60))
}

fn nonzero(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN)
}

/// What the service asks of the loop.
pub enum Command {
    Respond {
        channel: ResponseChannel<CoordinatorResponse>,
        response: CoordinatorResponse,
    },
    BlobRequest {
        peer: PeerId,
        request: BlobRequest,
        reply: oneshot::Sender<Result<BlobResponse, NetworkError>>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    },
    /// A request to another coordinator-protocol peer (tools and tests act as nodes with it).
    CoordinatorRequest {
        peer: PeerId,
        request: CoordinatorRequest,
        reply: oneshot::Sender<Result<CoordinatorResponse, NetworkError>>,
    },
}

/// What the loop hands the service.
pub enum Event {
    Request {
        peer: PeerId,
        /// The IP the peer's newest connection comes from, if direct.
        observed_ip: Option<std::net::IpAddr>,
        request: CoordinatorRequest,
        channel: ResponseChannel<CoordinatorResponse>,
    },
}

/// The IP of a direct connection's remote end (none for relayed ones).
fn remote_ip(addr: &Multiaddr) -> Option<std::net::IpAddr> {
    use libp2p::multiaddr::Protocol;
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
        _ => None,
    })
}

/// A handle to the loop; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
}

impl Client {
    async fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| NetworkError::Stopped)
    }

    pub async fn respond(
        &self,
        channel: ResponseChannel<CoordinatorResponse>,
        response: CoordinatorResponse,
    ) -> Result<(), NetworkError> {
        self.send(Command::Respond { channel, response }).await
    }

    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<(), NetworkError> {
        self.send(Command::Publish { topic, data }).await
    }

    pub async fn add_addresses(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<(), NetworkError> {
        self.send(Command::AddAddresses { peer, addrs }).await
    }

    /// Sends a coordinator-protocol request and waits for the answer.
    pub async fn coordinator_request(
        &self,
        peer: PeerId,
        request: CoordinatorRequest,
    ) -> Result<CoordinatorResponse, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::CoordinatorRequest {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetworkError::Stopped)?
    }

    pub async fn blob_request(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::BlobRequest {
            peer,
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| NetworkError::Stopped)?
    }
}

/// Why fetching a blob from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("the peer does not have the blob")]
    NotFound,
    #[error("the peer refused: {0}")]
    Refused(String),
    #[error("the peer offers {offered} bytes, the commit names {expected}")]
    WrongSize { expected: u64, offered: u64 },
    #[error("the peer answered out of protocol")]
    Protocol,
}

/// Fetches a whole blob of `size` bytes from `peer`, chunk by chunk. The
/// caller checks the hash; this only guarantees the size.
pub async fn fetch_blob(
    client: &Client,
    peer: PeerId,
    hash: Hash,
    size: u64,
) -> Result<Vec<u8>, FetchError> {
    let mut out = Vec::new();
    fetch_blob_into(client, peer, hash, size, &mut out).await?;
    Ok(out)
}

/// [`fetch_blob`] into `out`, which may already hold the start of the blob
/// from an earlier attempt: only the rest is asked for. On an error (or
/// when the future is dropped) `out` keeps every chunk that arrived, in
/// order, for the next attempt, so a transfer cut short on a slow link does
/// not start over.
pub async fn fetch_blob_into(
    client: &Client,
    peer: PeerId,
    hash: Hash,
    size: u64,
    out: &mut Vec<u8>,
) -> Result<(), FetchError> {
    // The commit names the size, so the chunks are asked for at once: a
    // `Have` first would only add a round trip to every update the round
    // waits on (200 ms on a 100 ms link). When a chunk is not served,
    // `Have` then says why.
    let total = usize::try_from(size).map_err(|_| FetchError::WrongSize {
        expected: size,
        offered: size,
    })?;
    // Up to `FETCH_CHUNKS_IN_FLIGHT` chunk requests at once, taken in order:
    // one at a time, a link's round trip is paid per chunk (on a 100 ms link
    // a 26 MB state's 26 chunks wait 5 s for round trips alone).
    if out.len() > total {
        out.clear();
    }
    out.reserve(total - out.len());
    let mut requested = out.len();
    let mut pending = futures::stream::FuturesOrdered::new();
    while out.len() < total {
        while requested < total && pending.len() < FETCH_CHUNKS_IN_FLIGHT {
            let len = (total - requested).min(BLOB_CHUNK_BYTES);
            let request = BlobRequest::Chunk {
                hash,
                offset: requested as u64,
                len: len as u32,
            };
            requested += len;
            let client = client.clone();
            pending.push_back(async move { (len, client.blob_request(peer, request).await) });
        }
        let Some((len, response)) = futures::StreamExt::next(&mut pending).await else {
            return Err(FetchError::Protocol);
        };
        match response? {
            // Each chunk must be whole: the next ones were asked for at
            // offsets that assume it.
            BlobResponse::Chunk { data } if data.len() == len => out.extend_from_slice(&data),
            BlobResponse::Chunk { .. } => return Err(FetchError::Protocol),
            BlobResponse::NotFound => {
                return Err(why_not_served(client, peer, hash, size, FetchError::NotFound).await);
            }
            BlobResponse::Refused { reason } => {
                let refused = FetchError::Refused(reason);
                return Err(why_not_served(client, peer, hash, size, refused).await);
            }
            BlobResponse::Have { .. } => return Err(FetchError::Protocol),
        }
    }
    Ok(())
}

/// Why `peer` did not serve a chunk of the `size`-byte blob `hash`: it
/// holds a blob of another size under that name (`WrongSize`), or none at
/// all (`NotFound`); otherwise its own answer stands.
async fn why_not_served(
    client: &Client,
    peer: PeerId,
    hash: Hash,
    size: u64,
    answer: FetchError,
) -> FetchError {
    match client.blob_request(peer, BlobRequest::Have { hash }).await {
        Ok(BlobResponse::Have {
            size: Some(offered),
        }) if offered != size => FetchError::WrongSize {
            expected: size,
            offered,
        },
        Ok(BlobResponse::Have { size: None } | BlobResponse::NotFound) => FetchError::NotFound,
        _ => answer,
    }
}

/// Chunk requests one blob fetch keeps in flight (a node's fetcher asks
/// one provider for at most as many chunks of one blob).
pub const FETCH_CHUNKS_IN_FLIGHT: usize = 4;

/// The gossip topic of a run's plans or manifests.
pub fn topic(run_id: &str, kind: &str) -> String {
    format!("barnraise/{run_id}/{kind}/1")
}

/// The loop that owns the swarm.
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    store: BlobStore,
    traffic: CoordinatorTraffic,
    pending_blob: HashMap<OutboundRequestId, oneshot::Sender<Result<BlobResponse, NetworkError>>>,
    pending_coordinator:
        HashMap<OutboundRequestId, oneshot::Sender<Result<CoordinatorResponse, NetworkError>>>,
    /// Where each connected peer's newest direct connection comes from.
    observed: HashMap<PeerId, std::net::IpAddr>,
    /// Blob answers read on blocking threads, back to the loop to be sent.
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
}

/// A blob answer ready to send: its channel, the blob if it was a chunk
/// (for the traffic counters), and the answer.
type Served = (ResponseChannel<BlobResponse>, Option<Hash>, BlobResponse);

impl barnraise_mesh::blobs::BlobSource for BlobStore {
    fn size(&self, hash: &Hash) -> Option<u64> {
        BlobStore::size(self, hash)
    }
    fn read(
        &self,
        hash: &Hash,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, barnraise_mesh::blobs::ReadError> {
        use barnraise_mesh::blobs::ReadError;
        match self.chunk(hash, offset, len as usize) {
            Ok(Some(data)) if data.len() == len as usize => Ok(data),
            Ok(Some(_)) => Err(ReadError::OutOfRange),
            Ok(None) => Err(ReadError::NotFound),
            Err(e) => Err(ReadError::Failed(e.to_string())),
        }
    }
}

/// Builds the swarm, starts listening, and waits until the listen addresses
/// are known (so port 0 resolves). Returns the client, the event stream, the
/// loop, and the addresses (each with `/p2p/<peer id>`).
pub async fn new(
    keypair: libp2p::identity::Keypair,
    listen: &[Multiaddr],
    store: BlobStore,
    topics: &[String],
    traffic: CoordinatorTraffic,
) -> Result<(Client, mpsc::Receiver<Event>, EventLoop, Vec<Multiaddr>), NetworkError> {
    let counted = traffic.wire.clone();
    let setup = |e: &dyn std::fmt::Display| NetworkError::Setup(e.to_string());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let rr_config =
                request_response::Config::default().with_request_timeout(Duration::from_secs(60));
            // The nodes' gossip settings and message ids exactly.
            let gossip_config = barnraise_mesh::gossip::config()?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            Ok(Behaviour {
                coordinator: request_response::Behaviour::with_codec(
                    CoordinatorCodec::counted(counted.coordinator.clone()),
                    [(
                        StreamProtocol::new(COORDINATOR_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    rr_config.clone(),
                ),
                blob: request_response::Behaviour::with_codec(
                    BlobCodec::counted(counted.blob.clone()),
                    [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Full)],
                    rr_config,
                ),
                gossipsub,
                identify: identify::Behaviour::new(identify::Config::new(
                    barnraise_mesh::IDENTIFY_PROTOCOL.into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                kad: barnraise_mesh::dht::behaviour(key.public().to_peer_id()),
                relay: relay::Behaviour::new(key.public().to_peer_id(), relay_config()),
                autonat: autonat::Behaviour::new(
                    key.public().to_peer_id(),
                    autonat::Config {
                        // LAN clusters and private networks are real
                        // deployments; dial-backs go to the address the
                        // node was observed at, nowhere else.
                        only_global_ips: false,
                        throttle_clients_global_max: 60,
                        ..autonat::Config::default()
                    },
                ),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for t in topics {
        // Subscribing makes the coordinator part of the topic's mesh, so its publishes reach nodes.
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&gossipsub::IdentTopic::new(t))
            .map_err(|e| setup(&e))?;
    }
    for addr in listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
    }
    let local = *swarm.local_peer_id();
    let mut addrs = Vec::new();
    let wait = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + wait;
    while addrs.len() < listen.len() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
        match event {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                addrs.push(address.with_p2p(local).unwrap_or_else(|a| a))
            }
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                return Err(NetworkError::Listen {
                    addr: "?".into(),
                    reason: error.to_string(),
                });
            }
            Ok(_) => {}
            Err(_) if !addrs.is_empty() => break,
            Err(_) => return Err(NetworkError::NoListenAddress(wait)),
        }
    }
    // What we listen on is where nodes reach us: the relay server puts these
    // in reservations, AutoNAT and identify announce them.
    for addr in &addrs {
        swarm.add_external_address(addr.clone());
    }
    let (command_tx, command_rx) = mpsc::channel(256);
    let (event_tx, event_rx) = mpsc::channel(256);
    let (served_tx, served_rx) = mpsc::channel(256);
    let event_loop = EventLoop {
        swarm,
        commands: command_rx,
        events: event_tx,
        store,
        traffic,
        pending_blob: HashMap::new(),
        pending_coordinator: HashMap::new(),
        observed: HashMap::new(),
        served_tx,
        served_rx,
    };
    Ok((
        Client {
            commands: command_tx,
        },
        event_rx,
        event_loop,
        addrs,
    ))
}

impl EventLoop {
    /// Runs until `shutdown` is cancelled or every client is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some((channel, chunk_of, response)) = self.served_rx.recv() => {
                    if let (Some(hash), BlobResponse::Chunk { data }) = (chunk_of, &response) {
                        self.traffic.served(&hash, data.len() as u64);
                    }
                    if self.swarm.behaviour_mut().blob.send_response(channel, response).is_err() {
                        tracing::debug!("a peer hung up before its blob answer was sent");
                    }
                }
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::Respond { channel, response } => {
                if behaviour
                    .coordinator
                    .send_response(channel, response)
                    .is_err()
                {
                    tracing::debug!("a node hung up before its answer was sent");
                }
            }
            Command::BlobRequest {
                peer,
                request,
                reply,
            } => {
                let id = behaviour.blob.send_request(&peer, request);
                self.pending_blob.insert(id, reply);
            }
            Command::Publish { topic, data } => {
                self.traffic.wire.published(data.len());
                if let Err(e) = behaviour
                    .gossipsub
                    .publish(gossipsub::IdentTopic::new(topic.clone()), data)
                {
                    // Nodes also poll for plans and manifests, so a failed publish on a tiny mesh is not fatal.
                    tracing::debug!(%topic, "gossip publish failed: {e}");
                }
            }
            Command::CoordinatorRequest {
                peer,
                request,
                reply,
            } => {
                let id = behaviour.coordinator.send_request(&peer, request);
                self.pending_coordinator.insert(id, reply);
            }
            Command::AddAddresses { peer, addrs } => {
                for addr in addrs {
                    self.swarm.add_peer_address(peer, addr);
                }
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Coordinator(event)) => self.on_coordinator(event),
            SwarmEvent::Behaviour(BehaviourEvent::Blob(event)) => self.on_blob(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // A node's self-reported listen addresses, so its updates
                // can be fetched later and other nodes find it on the DHT.
                let speaks_kad = info
                    .protocols
                    .iter()
                    .any(|p| p.as_ref() == barnraise_mesh::KAD_PROTOCOL);
                for addr in info.listen_addrs.into_iter().take(16) {
                    self.swarm.add_peer_address(peer_id, addr.clone());
                    if speaks_kad {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                ..
            })) => {
                // The coordinator publishes plans and manifests and never
                // relays: what comes back is its own message forwarded (a
                // duplicate by its content id) or something no node should
                // publish. Ignored, neither forwarded nor held against the
                // peer; nodes relay among themselves after checking the
                // coordinator's signature.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        gossipsub::MessageAcceptance::Ignore,
                    );
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                if let Some(ip) = remote_ip(endpoint.get_remote_address()) {
                    self.observed.insert(peer_id, ip);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.observed.remove(&peer_id);
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!("incoming connection failed: {error}")
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(?peer_id, "dial failed: {error}")
            }
            _ => {}
        }
    }

    fn on_coordinator(
        &mut self,
        event: request_response::Event<CoordinatorRequest, CoordinatorResponse>,
    ) {
        let Some((peer, request, channel)) =
            settle(&mut self.pending_coordinator, event, "coordinator")
        else {
            return;
        };
        match self.events.try_send(Event::Request {
            peer,
            observed_ip: self.observed.get(&peer).copied(),
            request,
            channel,
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(Event::Request { channel, .. })) => {
                let busy = CoordinatorResponse::Refused {
                    reason: format!(
                        "{}the coordinator is busy",
                        barnraise_protocol::messages::RETRY_LATER
                    ),
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .coordinator
                    .send_response(channel, busy);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn on_blob(&mut self, event: request_response::Event<BlobRequest, BlobResponse>) {
        let Some((_, request, channel)) = settle(&mut self.pending_blob, event, "blob") else {
            return;
        };
        let chunk_of = match &request {
            BlobRequest::Chunk { hash, .. } => Some(*hash),
            BlobRequest::Have { .. } => None,
        };
        // Disk reads happen on a blocking thread, never on the swarm loop;
        // the answer comes back through `served_rx`.
        let store = self.store.clone();
        let served = self.served_tx.clone();
        tokio::spawn(async move {
            let response = tokio::task::spawn_blocking(move || {
                barnraise_mesh::blobs::serve_blob(&store, &request)
            })
            .await
            .unwrap_or_else(|_| BlobResponse::Refused {
                reason: "internal error".into(),
            });
            let _ = served.send((channel, chunk_of, response)).await;
        });
    }
}

/// The part of a request-response event every protocol handles alike: a
/// response or an outbound failure settles the waiting caller in `pending`,
/// an inbound failure is logged. An inbound request is handed back to answer.
fn settle<Req, Resp>(
    pending: &mut HashMap<OutboundRequestId, oneshot::Sender<Result<Resp, NetworkError>>>,
    event: request_response::Event<Req, Resp>,
    protocol: &str,
) -> Option<(PeerId, Req, ResponseChannel<Resp>)> {
    match event {
        request_response::Event::Message {
            peer,
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        } => return Some((peer, request, channel)),
        request_response::Event::Message {
            message:
                request_response::Message::Response {
                    request_id,
                    response,
                },
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Ok(response));
            }
        }
        request_response::Event::OutboundFailure {
            peer,
            request_id,
            error,
            ..
        } => {
            if let Some(reply) = pending.remove(&request_id) {
                let _ = reply.send(Err(NetworkError::Request {
                    peer,
                    reason: error.to_string(),
                }));
            }
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            tracing::debug!(%peer, "{protocol} request from a peer failed: {error}");
        }
        request_response::Event::ResponseSent { .. } => {}
    }
    None
}
