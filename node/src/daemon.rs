//! The node's round loop, as docs/architecture.md ("A round, end to end")
//! describes it:
//!
//! ```text
//! join ──► sync θ_r (saved state, checkpoint, or the seeded init)
//!   └─► wait for the plan of round r (gossip, or polling the coordinator)
//!        └─► fetch the assigned shards ─► train H steps ─► Δ = θ_r − θ_local
//!             ─► encode (error feedback) ─► store as a blob ─► signed Commit
//!        └─► wait for the manifest of round r
//!             ─► fetch accepted updates ─► apply_round ─► hash == next_params_hash?
//!                  yes: save state, r += 1       no: resync (join again, load checkpoint)
//! ```
//!
//! Anything from the network is checked before use: plans and manifests by
//! the coordinator's signature, blobs by their hash, the resulting params by
//! the manifest's hash. Training and aggregation run on blocking threads.
//! A coordinator that stops answering is retried with backoff, and a node
//! that falls behind (a plan for a later round, a mismatched hash) resyncs.

use crate::config::NodeConfig;
use crate::limiter::RateLimiter;
use crate::metrics::NodeMetrics;
use crate::network::{self, Client, Event, NetworkConfig, NetworkError, Topic};
use crate::state::{StateDir, StateError, StateRecord, f32s_from_bytes, write_atomic};
use crate::store::{BlobStore, StoreError};
use crate::transfer::{FetchError, Fetcher};
use barnraise_protocol::aggregate::{AggregateError, AggregationRule, apply_round};
use barnraise_protocol::codec::{CodecSchedule, Encoder};
use barnraise_protocol::identity::IdentityError;
use barnraise_protocol::limits::PROTOCOL_VERSION;
use barnraise_protocol::messages::{
    Assignment, CheckpointRef, Commit, CoordinatorRequest, CoordinatorResponse, Join, Manifest,
    RoundPlan, RunConfig, Welcome, WorkerInfo, now_ms,
};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::{Hash, NodeId, PublicKey, Signed, SigningKey};
use barnraise_trainer::device::DeviceSpec;
use barnraise_trainer::{ModelConfig, Trainer};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod catchup;

/// What the node reports as it works (for progress bars and `barnraise up`).
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEvent {
    Joined {
        node: NodeId,
        run_id: String,
        round: u64,
    },
    Synced {
        round: u64,
        params_hash: Hash,
        from: SyncSource,
    },
    Downloading {
        what: String,
        done: u64,
        total: u64,
    },
    TrainingStarted {
        round: u64,
        steps: u32,
    },
    TrainingProgress {
        round: u64,
        step: u32,
        loss: f32,
    },
    Committed {
        round: u64,
        update_hash: Hash,
        bytes: u64,
        tokens: u64,
    },
    /// The round's plan did not assign us any work.
    Idle {
        round: u64,
    },
    RoundApplied {
        round: u64,
        params_hash: Hash,
        matched: bool,
    },
    Resynced {
        round: u64,
    },
    /// The Prometheus endpoint is up (`--metrics-addr`).
    MetricsServing {
        addr: std::net::SocketAddr,
    },
    /// A worker of this cluster node failed this round; the update leaves it out.
    WorkerFailed {
        round: u64,
        worker: usize,
        error: String,
    },
    /// A recoverable problem (the coordinator is unreachable, a peer lied).
    Warning {
        message: String,
    },
}

/// Where synced params came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncSource {
    SavedState,
    Checkpoint,
    SeededInit,
}

/// What a node did, when it stops.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeSummary {
    pub node: Option<NodeId>,
    pub rounds_completed: u64,
    pub rounds_trained: u64,
    pub tokens_trained: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    /// Of `bytes_uploaded`: blob bytes served to other nodes.
    pub bytes_served_to_peers: u64,
    /// Of `bytes_downloaded`: blob bytes fetched from the coordinator.
    pub bytes_from_coordinator: u64,
    /// How peers could reach us when we stopped (`Reachability::label`).
    pub reachability: Option<String>,
    /// Relayed links that hole punching made direct.
    pub hole_punches: u64,
    pub resyncs: u64,
    /// Closed rounds replayed from their manifests while catching up.
    pub rounds_replayed: u64,
    /// The most peer addresses one welcome or plan's bootstrap list gave us.
    pub bootstrap_addrs: usize,
    pub final_params_hash: Option<Hash>,
}

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node key: {0}")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("device: {0}")]
    Device(String),
    #[error("the coordinator refused us: {0}")]
    Refused(String),
    #[error("the run's configuration is unusable: {0}")]
    RunConfig(String),
    #[error("training failed: {0}")]
    Training(String),
    #[error("aggregation failed: {0}")]
    Aggregate(#[from] AggregateError),
    #[error("the coordinator address {0} is not usable: {1}")]
    Coordinator(Multiaddr, String),
    #[error("org certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Metrics(String),
    /// The coordinator's signed record contradicts itself (a manifest that
    /// does not extend the one before it, or params that do not replay to
    /// its hashes): the node refuses to follow it.
    #[error("the coordinator's record does not check out: {0}")]
    Chain(String),
    /// Catching up needs something that cannot be had right now (a past
    /// manifest, an accepted update); the node joins again and retries.
    #[error("could not catch up: {0}")]
    CatchUp(String),
}

/// The initial seed of θ_0 when a run starts without a checkpoint.
pub const INIT_SEED: u64 = 0;
/// Longest wait between retries of a failing coordinator request.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long we wait for a round's manifest before assuming we missed it.
const MANIFEST_PATIENCE: Duration = Duration::from_secs(600);

/// Runs a node until `shutdown` fires, `config.max_rounds` rounds are
/// applied, or an unrecoverable error (a bad key, an unusable run).
pub async fn run_node(
    config: NodeConfig,
    shutdown: CancellationToken,
    events: Option<mpsc::Sender<NodeEvent>>,
) -> Result<NodeSummary, NodeError> {
    run_node_with(config, shutdown, events, None).await
}

/// [`run_node`] with an [`Adversary`](crate::redteam::Adversary) that may
/// corrupt what the node sends: the attack suite's hostile nodes
/// (docs/security.md). `None` is an honest node.
pub async fn run_node_with(
    config: NodeConfig,
    shutdown: CancellationToken,
    events: Option<mpsc::Sender<NodeEvent>>,
    adversary: Option<Arc<dyn crate::redteam::Adversary>>,
) -> Result<NodeSummary, NodeError> {
    // Settings that can be wrong are checked before anything starts.
    let devices = config.worker_devices().map_err(NodeError::Device)?;
    let certificate = match &config.certificate {
        Some(path) => {
            let signed = barnraise_protocol::certificate::load_certificate(path)
                .map_err(|e| NodeError::Certificate(e.to_string()))?;
            // The coordinator would refuse the join; say so before anything starts.
            let body = barnraise_protocol::certificate::verify_certificate(&signed)
                .map_err(|e| NodeError::Certificate(format!("{}: {e}", path.display())))?;
            if devices.len() > body.max_workers as usize {
                return Err(NodeError::Certificate(format!(
                    "{}: the certificate allows {} workers and this node is configured with {}; \
                     use fewer devices, or ask {} for a certificate with --max-workers {}",
                    path.display(),
                    body.max_workers,
                    devices.len(),
                    body.org_name
                        .chars()
                        .filter(|c| !c.is_control())
                        .collect::<String>(),
                    devices.len()
                )));
            }
            Some(signed)
        }
        None => None,
    };
    let metrics = Arc::new(NodeMetrics::new());
    NodeMetrics::set(&metrics.workers, devices.len() as u64);
    if let Some(addr) = config.metrics_addr {
        let bound = crate::metrics::serve(addr, metrics.clone(), shutdown.child_token())
            .await
            .map_err(|e| NodeError::Metrics(e.to_string()))?;
        tracing::info!("metrics at http://{bound}/metrics");
        if let Some(events) = &events {
            let _ = events.try_send(NodeEvent::MetricsServing { addr: bound });
        }
    }
    let key_path = config.key_path();
    let (key, created) = SigningKey::load_or_create(&key_path)?;
    if created {
        tracing::info!("created node key {}", key_path.display());
    }
    let store = Arc::new(BlobStore::open(&config.data_dir.join("blobs"))?);
    let coordinator_key = match &config.coordinator_key {
        Some(hex) => Some(hex.parse::<PublicKey>().map_err(|e| {
            NodeError::Coordinator(config.coordinator.clone(), format!("coordinator_key: {e}"))
        })?),
        None => None,
    };
    let network_config = NetworkConfig {
        keypair: key.to_libp2p()?,
        listen: config.listen.clone(),
        blobs: store.clone(),
        upload: RateLimiter::new(config.upload_limit),
        coordinator_key,
        serve_coordinator: false,
    };
    let (client, network_events, mut event_loop) = network::new(network_config)?;
    let listen_addrs = event_loop
        .wait_for_listen_addrs(Duration::from_secs(10))
        .await;
    let network_shutdown = shutdown.child_token();
    let network_task = tokio::spawn(event_loop.run(network_shutdown.clone()));

    let (plans_tx, plans_rx) = mpsc::channel(16);
    let (manifests_tx, manifests_rx) = mpsc::channel(16);
    let bytes_up = Arc::new(AtomicU64::new(0));
    let coordinator_peer = Arc::new(std::sync::OnceLock::new());
    let router = tokio::spawn(route_events(
        network_events,
        plans_tx,
        manifests_tx,
        bytes_up.clone(),
        Served {
            coordinator: coordinator_peer.clone(),
            metrics: metrics.clone(),
        },
    ));

    let fetcher = Fetcher::new(
        client.clone(),
        store.clone(),
        RateLimiter::new(config.download_limit),
    )
    .with_concurrency(
        config.max_parallel_chunks,
        crate::transfer::MAX_IN_FLIGHT_PER_PROVIDER,
    );
    let data_dir_for_retention = config.data_dir.clone();
    let mut node = Node {
        adversary,
        spot_states: std::collections::VecDeque::new(),
        state: StateDir::new(&config.data_dir),
        receipts: config.data_dir.join("receipts"),
        config,
        key,
        client,
        fetcher,
        store,
        shutdown: shutdown.clone(),
        events,
        plans: plans_rx,
        manifests: manifests_rx,
        listen_addrs,
        coordinator: None,
        coordinator_peer,
        coordinator_key,
        run_id: None,
        summary: NodeSummary::default(),
        devices,
        certificate,
        metrics,
        retention: crate::retention::Retention::load(&data_dir_for_retention),
        applied: std::collections::BTreeMap::new(),
    };
    let result = node.run().await;
    let mut summary = node.summary.clone();
    summary.bytes_uploaded = bytes_up.load(Ordering::Relaxed);
    summary.bytes_served_to_peers = node
        .metrics
        .blob_bytes_served_to_peers
        .load(Ordering::Relaxed);
    if let Ok(status) = node.client.status().await {
        summary.reachability = Some(status.reachability.label().to_string());
        summary.hole_punches = status.hole_punches;
    }
    // Say goodbye if we can; the coordinator copes if we cannot.
    node.leave().await;
    network_shutdown.cancel();
    let _ = network_task.await;
    router.abort();
    match result {
        Ok(()) | Err(NodeError::Network(NetworkError::Closed)) if shutdown.is_cancelled() => {
            Ok(summary)
        }
        Ok(()) => Ok(summary),
        Err(e) => Err(e),
    }
}

/// Where served bytes are counted: all of them, and those that went to
/// other nodes rather than the coordinator.
struct Served {
    coordinator: Arc<std::sync::OnceLock<PeerId>>,
    metrics: Arc<NodeMetrics>,
}

/// Sorts network events: plans and manifests to the round loop, served
/// bytes to the counters. Full queues drop (the round loop also polls).
async fn route_events(
    mut events: mpsc::Receiver<Event>,
    plans: mpsc::Sender<(PeerId, RoundPlan)>,
    manifests: mpsc::Sender<(PeerId, Signed<Manifest>, Manifest)>,
    bytes_up: Arc<AtomicU64>,
    served: Served,
) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Plan { source, plan, .. } => {
                let _ = plans.try_send((source, plan));
            }
            Event::Manifest {
                source,
                manifest,
                signed,
            } => {
                let _ = manifests.try_send((source, signed, manifest));
            }
            Event::BlobServed { peer, bytes } => {
                bytes_up.fetch_add(bytes, Ordering::Relaxed);
                NodeMetrics::add(&served.metrics.blob_bytes_served, bytes);
                if served.coordinator.get() != Some(&peer) {
                    NodeMetrics::add(&served.metrics.blob_bytes_served_to_peers, bytes);
                }
            }
            Event::GossipRejected {
                source,
                topic,
                reason,
            } => {
                tracing::warn!(peer = %source, %topic, "rejected gossip: {reason}");
            }
            _ => {}
        }
    }
}

/// The global state of the run as this node holds it.
struct Synced {
    run: RunConfig,
    model: ModelConfig,
    rule: AggregationRule,
    round: u64,
    theta: Vec<f32>,
    optimizer: OuterOptimizer,
    /// The run's codec over rounds (warm-up, decay).
    codec: CodecSchedule,
    encoder: Encoder,
    /// One slot per worker; a slot is emptied when its worker fails and
    /// rebuilt at the next round.
    trainers: Vec<Option<Trainer>>,
    committed: Option<(u64, Hash)>,
    /// Body hash of the last manifest applied (the Welcome's head right
    /// after a sync): the next manifest must name it as `previous_manifest`.
    head_manifest: Hash,
}

struct Node {
    config: NodeConfig,
    key: SigningKey,
    client: Client,
    fetcher: Fetcher,
    store: Arc<BlobStore>,
    state: StateDir,
    receipts: std::path::PathBuf,
    shutdown: CancellationToken,
    events: Option<mpsc::Sender<NodeEvent>>,
    plans: mpsc::Receiver<(PeerId, RoundPlan)>,
    manifests: mpsc::Receiver<(PeerId, Signed<Manifest>, Manifest)>,
    listen_addrs: Vec<Multiaddr>,
    coordinator: Option<PeerId>,
    /// The coordinator's peer id, once known, for the served-bytes split.
    coordinator_peer: Arc<std::sync::OnceLock<PeerId>>,
    coordinator_key: Option<PublicKey>,
    run_id: Option<String>,
    summary: NodeSummary,
    /// One per worker (cluster mode when more than one).
    devices: Vec<DeviceSpec>,
    certificate: Option<Signed<barnraise_protocol::messages::NodeCertificate>>,
    metrics: Arc<NodeMetrics>,
    /// Which applied updates belong to which round, for pruning.
    retention: crate::retention::Retention,
    /// The manifests of the last rounds we applied, to recognise a second,
    /// different manifest for one of them (a fork).
    applied: std::collections::BTreeMap<u64, Signed<Manifest>>,
    /// Workers' starting optimizer states by round, kept for spot checks
    /// until the round after next is trained.
    spot_states: std::collections::VecDeque<(u64, Vec<Hash>)>,
    /// A red-team hook (docs/security.md); `None` for every real node.
    adversary: Option<Arc<dyn crate::redteam::Adversary>>,
}

/// Rounds whose applied manifest a node keeps to detect a fork.
pub const APPLIED_MANIFESTS_KEPT: usize = 16;

/// The longest wait between two polls for a plan or a manifest.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(8);

/// Doubling poll intervals, from a first one up to [`MAX_POLL_INTERVAL`].
#[derive(Clone, Debug)]
pub struct PollBackoff {
    next: Duration,
}

impl PollBackoff {
    pub fn new(first: Duration) -> PollBackoff {
        PollBackoff {
            next: first.min(MAX_POLL_INTERVAL),
        }
    }

    /// How long to wait before the next poll.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(MAX_POLL_INTERVAL);
        now
    }
}

/// What applying one manifest came to.
enum Applied {
    /// θ_{r+1} hashes to the manifest's value.
    Matched(Hash),
    /// An update could not be fetched or decoded: try again from a resync.
    Unavailable(String),
    /// The updates applied, but to another hash than the manifest's.
    Mismatch { hash: Hash, reason: String },
}

/// What happened to one round.
enum RoundOutcome {
    Applied,
    /// We fell behind or disagreed: join again and resync.
    Resync(String),
}

impl Node {
    fn emit(&self, event: NodeEvent) {
        if let Some(events) = &self.events {
            // Progress display must never hold up the round loop.
            let _ = events.try_send(event);
        }
    }

    fn warn(&self, message: String) {
        tracing::warn!("{message}");
        self.emit(NodeEvent::Warning { message });
    }

    fn cancelled(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }

    async fn run(&mut self) -> Result<(), NodeError> {
        let mut synced = None;
        loop {
            if self.cancelled() {
                return Ok(());
            }
            let state = match synced.take() {
                Some(state) => state,
                None => match self.join_and_sync().await? {
                    Some(state) => state,
                    None => return Ok(()),
                },
            };
            let mut state = state;
            loop {
                if self
                    .config
                    .max_rounds
                    .is_some_and(|max| self.summary.rounds_completed >= max)
                {
                    return Ok(());
                }
                if self.cancelled() {
                    return Ok(());
                }
                if state.run.total_rounds > 0 && state.round >= state.run.total_rounds {
                    tracing::info!(rounds = state.run.total_rounds, "the run is complete");
                    return Ok(());
                }
                match self.round(&mut state).await? {
                    Some(RoundOutcome::Applied) => {}
                    Some(RoundOutcome::Resync(reason)) => {
                        self.warn(format!("resyncing: {reason}"));
                        self.summary.resyncs += 1;
                        NodeMetrics::add(&self.metrics.resyncs, 1);
                        break;
                    }
                    None => return Ok(()),
                }
            }
            if let Some(fresh) = self.join_and_sync().await? {
                self.emit(NodeEvent::Resynced { round: fresh.round });
                synced = Some(fresh);
            } else {
                return Ok(());
            }
        }
    }

    /// Dials the coordinator until it answers (or we are stopped).
    async fn connect(&mut self) -> Result<Option<PeerId>, NodeError> {
        if let Some(peer) = self.coordinator {
            return Ok(Some(peer));
        }
        let addr = self.config.coordinator.clone();
        if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
            // Known before the first connection, so the network treats the
            // coordinator as our relay from its first identify on (it then
            // also connects over QUIC, for hole punching).
            self.client.add_relay(addr.clone()).await?;
        }
        if addr.is_empty() {
            return Err(NodeError::Coordinator(
                addr,
                "no coordinator address configured".into(),
            ));
        }
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.client.dial(addr.clone()).await {
                Ok(peer) => {
                    let key = match self.coordinator_key {
                        Some(key) => key,
                        None => PublicKey::from_peer_id(&peer)
                            .map_err(|e| NodeError::Coordinator(addr.clone(), e.to_string()))?,
                    };
                    self.coordinator_key = Some(key);
                    self.client.set_coordinator_key(key).await?;
                    let relay = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                        addr.clone()
                    } else {
                        addr.clone().with(Protocol::P2p(peer))
                    };
                    self.client.add_address(peer, strip_p2p(&addr)).await?;
                    self.client.add_relay(relay).await?;
                    self.coordinator = Some(peer);
                    let _ = self.coordinator_peer.set(peer);
                    tracing::info!(%peer, "connected to the coordinator at {addr}");
                    return Ok(Some(peer));
                }
                Err(NetworkError::Closed) => return Err(NetworkError::Closed.into()),
                Err(e) => {
                    self.warn(format!(
                        "coordinator unreachable ({e}); retrying in {:.1} s",
                        backoff.as_secs_f32()
                    ));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One request to the coordinator, retried with backoff until it gets an
    /// answer or we are stopped. A lost connection is re-dialled.
    async fn ask(
        &mut self,
        request: CoordinatorRequest,
    ) -> Result<Option<CoordinatorResponse>, NodeError> {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(peer) = self.connect().await? else {
                return Ok(None);
            };
            match self.client.coordinator_request(peer, request.clone()).await {
                Ok(response) => return Ok(Some(response)),
                Err(NetworkError::Closed) => return Err(NetworkError::Closed.into()),
                Err(e) => {
                    self.warn(format!(
                        "coordinator request failed ({e}); retrying in {:.1} s",
                        backoff.as_secs_f32()
                    ));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The hardware inventory a join declares: one entry per worker.
    fn worker_info(&self) -> Vec<WorkerInfo> {
        let gpus = barnraise_trainer::device::discover_gpus();
        let cuda = barnraise_trainer::device::cuda_build();
        let cpu = WorkerInfo {
            device: "cpu".into(),
            name: "cpu".into(),
            memory_bytes: 0,
        };
        self.devices
            .iter()
            .map(|spec| {
                let ordinal = match spec {
                    DeviceSpec::Cuda(n) => Some(*n),
                    DeviceSpec::Auto if cuda => Some(0),
                    _ => None,
                };
                match ordinal.and_then(|n| gpus.iter().find(|g| g.ordinal == n)) {
                    Some(gpu) if cuda => WorkerInfo {
                        device: format!("cuda:{}", gpu.ordinal),
                        name: gpu.name.clone(),
                        memory_bytes: gpu.memory_bytes,
                    },
                    _ => cpu.clone(),
                }
            })
            .collect()
    }

    /// Joins the run and brings θ to the coordinator's current round.
    async fn join_and_sync(&mut self) -> Result<Option<Synced>, NodeError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Ok(status) = self.client.status().await {
                let mut addrs = status.listen_addrs;
                addrs.extend(status.external_addrs);
                addrs.dedup();
                // A join is capped in size; a few addresses are plenty.
                addrs.truncate(16);
                self.listen_addrs = addrs;
            }
            let join = Join {
                protocol_version: PROTOCOL_VERSION,
                agent: format!("barnraise/{}", env!("CARGO_PKG_VERSION")),
                run_id: self.config.run_id.clone(),
                workers: self.worker_info(),
                listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
                certificate: self.certificate.clone(),
                timestamp_ms: now_ms(),
            };
            let signed =
                Signed::sign(&self.key, &join).map_err(|e| NodeError::RunConfig(e.to_string()))?;
            let Some(response) = self.ask(CoordinatorRequest::Join(signed)).await? else {
                return Ok(None);
            };
            let welcome = match response {
                CoordinatorResponse::Welcome(signed) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(welcome) => welcome,
                        Err(e) => {
                            self.warn(format!("ignoring a welcome that does not verify: {e}"));
                            if !self.sleep(backoff).await {
                                return Ok(None);
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                CoordinatorResponse::Refused { reason }
                    if barnraise_protocol::messages::is_retry_later(&reason) =>
                {
                    self.warn(format!("the coordinator asks us to wait: {reason}"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                CoordinatorResponse::Refused { reason } => return Err(NodeError::Refused(reason)),
                other => {
                    self.warn(format!("unexpected answer to join: {other:?}"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    continue;
                }
            };
            self.summary.node = Some(welcome.node);
            self.run_id = Some(welcome.config.run_id.clone());
            self.emit(NodeEvent::Joined {
                node: welcome.node,
                run_id: welcome.config.run_id.clone(),
                round: welcome.current_round,
            });
            tracing::info!(run = %welcome.config.run_id, round = welcome.current_round, "joined as {}", welcome.node.short());
            self.meet(&welcome.bootstrap).await?;
            for topic in [
                Topic::Plans {
                    run_id: welcome.config.run_id.clone(),
                },
                Topic::Manifests {
                    run_id: welcome.config.run_id.clone(),
                },
            ] {
                self.client.subscribe(topic).await?;
            }
            match self.sync(&welcome).await {
                Ok(Some(state)) => return Ok(Some(state)),
                Ok(None) => return Ok(None),
                Err(e @ (NodeError::Fetch(_) | NodeError::CatchUp(_))) => {
                    self.warn(format!("{e}; joining again"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn sync(&mut self, welcome: &Welcome) -> Result<Option<Synced>, NodeError> {
        let run = welcome.config.clone();
        let (model, codec, rule) = parse_run_config(&run)?;
        let params = model.params_count();
        // What `node receipts` needs to price this run's tokens as the
        // coordinator's ledger does.
        if let Some(coordinator) = self.coordinator_key {
            let facts = crate::receipts::RunFacts {
                run_id: run.run_id.clone(),
                coordinator: coordinator.to_hex(),
                flops_per_token: model.flops_per_token_at(run.seq_len as usize),
            };
            if let Err(e) = crate::receipts::write_run_facts(&self.receipts, &facts) {
                self.warn(format!(
                    "could not record the run's facts for receipts: {e}"
                ));
            }
        }
        let outer = OuterConfig {
            lr: run.outer_lr,
            momentum: run.outer_momentum,
            ..OuterConfig::default()
        };

        let Some(caught_up) = self.catch_up(welcome, &model, rule, outer).await? else {
            return Ok(None);
        };
        let catchup::CaughtUp {
            theta,
            optimizer,
            source,
            committed,
            replayed,
        } = caught_up;
        let hash = welcome.params_hash;
        self.summary.rounds_replayed += replayed;
        let mut encoder = Encoder::new(codec.codec_at(welcome.current_round), params)
            .map_err(|e| NodeError::RunConfig(e.to_string()))?
            .with_decay(codec.decay());
        if let Some(residual) = self.state.load_residual(encoder.residual().len())
            && source == SyncSource::SavedState
            && !residual.is_empty()
        {
            // Keep the error feedback across a restart.
            if let Err(e) = encoder.set_residual(&residual) {
                self.warn(format!("discarding saved codec residual: {e}"));
            }
        }
        let record = StateRecord {
            run_id: run.run_id.clone(),
            round: welcome.current_round,
            params_hash: hash.to_hex(),
            codec: run.codec.clone(),
            committed: committed.map(|(r, h): (u64, Hash)| (r, h.to_hex())),
        };
        self.state.save(&record, &theta, optimizer.momentum())?;
        self.summary.final_params_hash = Some(hash);
        self.emit(NodeEvent::Synced {
            round: welcome.current_round,
            params_hash: hash,
            from: source,
        });
        tracing::info!(round = welcome.current_round, params = %hash.short(), replayed, "synced params ({source:?})");
        Ok(Some(Synced {
            run,
            model,
            rule,
            round: welcome.current_round,
            theta,
            optimizer,
            codec,
            encoder,
            trainers: Vec::new(),
            committed,
            head_manifest: welcome.head_manifest,
        }))
    }

    async fn load_checkpoint(
        &mut self,
        checkpoint: &CheckpointRef,
        model: &ModelConfig,
        run_id: &str,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>, NodeError> {
        self.fetch(&checkpoint.blob, Some(checkpoint.bytes), None, "checkpoint")
            .await?;
        self.fetch(
            &checkpoint.optimizer_blob,
            Some(checkpoint.optimizer_bytes),
            None,
            "optimizer state",
        )
        .await?;
        let store = self.store.clone();
        let (blob, optimizer_blob, model) =
            (checkpoint.blob, checkpoint.optimizer_blob, model.clone());
        let expected_hash = checkpoint.params_hash;
        let run_id = run_id.to_string();
        let loaded =
            tokio::task::spawn_blocking(move || -> Result<(Vec<f32>, Vec<f32>), String> {
                let bytes = store.read(&blob).map_err(|e| e.to_string())?;
                let path = Path::new("checkpoint blob").join(blob.to_hex());
                let checkpoint = barnraise_trainer::checkpoint::from_bytes(&bytes, &path, &model)
                    .map_err(|e| e.to_string())?;
                if Hash::of_f32s(&checkpoint.params) != expected_hash {
                    return Err("checkpoint params do not hash to the announced value".into());
                }
                if !checkpoint.meta.run.is_empty() && checkpoint.meta.run != run_id {
                    tracing::warn!(
                        "checkpoint names run '{}', expected '{run_id}'",
                        checkpoint.meta.run
                    );
                }
                let momentum =
                    f32s_from_bytes(&store.read(&optimizer_blob).map_err(|e| e.to_string())?)
                        .filter(|m| m.len() == checkpoint.params.len())
                        .ok_or("optimizer state blob is not one f32 per parameter")?;
                Ok((checkpoint.params, momentum))
            })
            .await
            .map_err(|e| NodeError::Training(e.to_string()))?
            .map_err(|e| {
                NodeError::RunConfig(format!("checkpoint of round {}: {e}", checkpoint.round))
            })?;
        Ok(Some(loaded))
    }

    /// Providers of a blob other than the coordinator: the peer that made it
    /// (for updates) and whoever announced it on the DHT.
    async fn peer_providers(&self, hash: &Hash, author: Option<PeerId>) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = author.into_iter().collect();
        let lookup =
            tokio::time::timeout(Duration::from_secs(5), self.client.get_providers(*hash)).await;
        if let Ok(Ok(found)) = lookup {
            peers.extend(found);
        }
        let me = self.client.local_peer_id();
        peers.retain(|p| Some(*p) != self.coordinator && *p != me);
        peers.sort();
        peers.dedup();
        peers
    }

    /// Fetches blob `hash` into the store unless it is there, then announces
    /// it on the DHT: every node provides every blob it holds. Peers are
    /// asked first (`author`, then the DHT's providers); the coordinator is
    /// the provider of last resort, asked only when no peer has the blob or
    /// the peers failed, and only for the chunks still missing.
    async fn fetch(
        &mut self,
        hash: &Hash,
        size: Option<u64>,
        author: Option<PeerId>,
        what: &str,
    ) -> Result<(), NodeError> {
        if self.store.contains(hash) {
            return Ok(());
        }
        self.emit(NodeEvent::Downloading {
            what: what.to_string(),
            done: 0,
            total: size.unwrap_or(0),
        });
        let fetcher = match &self.events {
            Some(events) => {
                let events = events.clone();
                let what = what.to_string();
                self.fetcher
                    .clone()
                    .with_progress(Arc::new(move |done, total| {
                        let _ = events.try_send(NodeEvent::Downloading {
                            what: what.clone(),
                            done,
                            total,
                        });
                    }))
            }
            None => self.fetcher.clone(),
        };
        let peers = self.peer_providers(hash, author).await;
        let coordinator: Vec<PeerId> = self.coordinator.into_iter().collect();
        let report = if peers.is_empty() {
            fetcher
                .fetch(*hash, size, &coordinator, &self.shutdown)
                .await?
        } else {
            match fetcher.fetch(*hash, size, &peers, &self.shutdown).await {
                Ok(report) => report,
                Err(e @ (FetchError::Cancelled | FetchError::Store { .. })) => return Err(e.into()),
                Err(e) if coordinator.is_empty() => return Err(e.into()),
                Err(e) => {
                    tracing::info!(blob = %hash.short(), "peers could not serve {what} ({e}); asking the coordinator");
                    fetcher
                        .fetch(*hash, size, &coordinator, &self.shutdown)
                        .await?
                }
            }
        };
        self.summary.bytes_downloaded += report.bytes_fetched;
        NodeMetrics::add(&self.metrics.blob_bytes_fetched, report.bytes_fetched);
        if let Some(coordinator) = self.coordinator {
            let from_coordinator = report.bytes_from(&coordinator);
            self.summary.bytes_from_coordinator += from_coordinator;
            NodeMetrics::add(
                &self.metrics.blob_bytes_fetched_from_coordinator,
                from_coordinator,
            );
        }
        for (peer, reason) in &report.bad_providers {
            self.warn(format!(
                "peer {peer} served bad data for {what} {}: {reason}",
                hash.short()
            ));
        }
        let _ = self.client.start_providing(*hash).await;
        Ok(())
    }

    /// Polling is the fallback for gossip: the first poll after
    /// `poll_interval_ms`, each next one twice as late, up to
    /// [`MAX_POLL_INTERVAL`]. Gossip that arrives meanwhile ends the wait at once.
    fn poll_backoff(&self) -> PollBackoff {
        PollBackoff::new(Duration::from_millis(self.config.poll_interval_ms.max(50)))
    }

    /// Puts a welcome's or plan's bootstrap peers in the swarm and the DHT,
    /// so blobs are found on other nodes, not only on the coordinator.
    async fn meet(
        &mut self,
        peers: &[barnraise_protocol::messages::BootstrapPeer],
    ) -> Result<(), NodeError> {
        // The coordinator is reached the way we dialled it; its other
        // listen addresses may be on networks we cannot route to.
        let coordinator = self.coordinator_peer.get().map(|p| p.to_string());
        let others: Vec<_> = peers
            .iter()
            .filter(|p| Some(&p.peer) != coordinator.as_ref())
            .cloned()
            .collect();
        let added = self.client.add_bootstrap(&others).await?;
        self.summary.bootstrap_addrs = self.summary.bootstrap_addrs.max(added);
        tracing::debug!(peers = peers.len(), addrs = added, "bootstrap peers added");
        Ok(())
    }

    /// Waits for the plan of `round` (gossip first, polling as a fallback).
    async fn wait_for_plan(&mut self, round: u64) -> Result<Option<RoundPlan>, NodeError> {
        let mut poll = self.poll_backoff();
        loop {
            while let Ok((_, plan)) = self.plans.try_recv() {
                if plan.round >= round {
                    return Ok(Some(plan));
                }
            }
            let Some(response) = self.ask(CoordinatorRequest::CurrentPlan).await? else {
                return Ok(None);
            };
            match response {
                CoordinatorResponse::Plan(Some(signed)) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(plan) if plan.round >= round => return Ok(Some(plan)),
                        Ok(_) => {}
                        Err(e) => {
                            self.warn(format!("coordinator sent a plan that does not verify: {e}"))
                        }
                    }
                }
                CoordinatorResponse::Plan(None) => {}
                other => tracing::debug!("unexpected answer to CurrentPlan: {other:?}"),
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                Some((_, plan)) = self.plans.recv() => if plan.round >= round { return Ok(Some(plan)) },
                _ = tokio::time::sleep(poll.next()) => {}
            }
        }
    }

    /// Waits for the manifest of `round`.
    async fn wait_for_manifest(
        &mut self,
        round: u64,
    ) -> Result<Option<Result<(Signed<Manifest>, Manifest), String>>, NodeError> {
        let mut poll = self.poll_backoff();
        let started = Instant::now();
        loop {
            while let Ok((_, signed, manifest)) = self.manifests.try_recv() {
                self.check_fork(&signed, &manifest)?;
                if manifest.round == round {
                    return Ok(Some(Ok((signed, manifest))));
                }
            }
            let Some(response) = self.ask(CoordinatorRequest::Manifest { round }).await? else {
                return Ok(None);
            };
            match response {
                CoordinatorResponse::Manifest(Some(signed)) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(manifest) if manifest.round == round => {
                            return Ok(Some(Ok((signed, manifest))));
                        }
                        Ok(manifest) => self.warn(format!(
                            "asked for manifest {round}, got {}",
                            manifest.round
                        )),
                        Err(e) => self.warn(format!(
                            "coordinator sent a manifest that does not verify: {e}"
                        )),
                    }
                }
                CoordinatorResponse::Manifest(None) => {}
                other => tracing::debug!("unexpected answer to Manifest: {other:?}"),
            }
            if started.elapsed() > MANIFEST_PATIENCE {
                return Ok(Some(Err(format!(
                    "no manifest for round {round} after {} s",
                    MANIFEST_PATIENCE.as_secs()
                ))));
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                Some((_, signed, manifest)) = self.manifests.recv() => {
                    self.check_fork(&signed, &manifest)?;
                    if manifest.round == round { return Ok(Some(Ok((signed, manifest)))) }
                }
                _ = tokio::time::sleep(poll.next()) => {}
            }
        }
    }

    /// One round. `None` means we were stopped.
    async fn round(&mut self, state: &mut Synced) -> Result<Option<RoundOutcome>, NodeError> {
        let round = state.round;
        let Some(plan) = self.wait_for_plan(round).await? else {
            return Ok(None);
        };
        self.meet(&plan.bootstrap).await?;
        if plan.round > round {
            return Ok(Some(RoundOutcome::Resync(format!(
                "round {} is open but we hold round {round}",
                plan.round
            ))));
        }
        let our_hash = Hash::of_f32s(&state.theta);
        if plan.params_hash != our_hash {
            return Ok(Some(RoundOutcome::Resync(format!(
                "plan of round {round} starts from {}, we hold {}",
                plan.params_hash.short(),
                our_hash.short()
            ))));
        }
        let me = self.key.node_id();
        let assignment = plan.assignments.iter().find(|a| a.node == me).cloned();
        match (&assignment, state.committed) {
            (Some(_), Some((r, hash))) if r == round && self.store.contains(&hash) => {
                tracing::info!(
                    round,
                    "already committed {} for this round before a restart",
                    hash.short()
                );
            }
            (Some(assignment), _) => {
                let Some(()) = self.train_and_commit(state, &plan, assignment).await? else {
                    return Ok(None);
                };
            }
            (None, _) => {
                tracing::info!(round, "not assigned work this round");
                self.emit(NodeEvent::Idle { round });
            }
        }
        let Some(manifest) = self.wait_for_manifest(round).await? else {
            return Ok(None);
        };
        let (signed, manifest) = match manifest {
            Ok(found) => found,
            Err(reason) => return Ok(Some(RoundOutcome::Resync(reason))),
        };
        if manifest.base_params_hash != our_hash {
            return Ok(Some(RoundOutcome::Resync(format!(
                "manifest of round {round} is based on other params"
            ))));
        }
        if manifest.previous_manifest != state.head_manifest {
            return Err(NodeError::Chain(format!(
                "the manifest of round {round} ({}) extends manifest {}, but the last manifest \
                 we applied is {}: the coordinator has rewritten its history",
                signed.body_hash().short(),
                manifest.previous_manifest.short(),
                state.head_manifest.short()
            )));
        }
        let next_hash = match self
            .apply_manifest(
                state.rule,
                &mut state.theta,
                &mut state.optimizer,
                &manifest,
            )
            .await?
        {
            None => return Ok(None),
            Some(Applied::Unavailable(reason)) => return Ok(Some(RoundOutcome::Resync(reason))),
            Some(Applied::Mismatch { hash, reason }) => {
                self.emit(NodeEvent::RoundApplied {
                    round,
                    params_hash: hash,
                    matched: false,
                });
                return Ok(Some(RoundOutcome::Resync(reason)));
            }
            Some(Applied::Matched(hash)) => hash,
        };
        self.emit(NodeEvent::RoundApplied {
            round,
            params_hash: next_hash,
            matched: true,
        });
        state.round = round + 1;
        state.committed = None;
        state.head_manifest = signed.body_hash();
        let record = StateRecord {
            run_id: state.run.run_id.clone(),
            round: state.round,
            params_hash: next_hash.to_hex(),
            codec: state.run.codec.clone(),
            committed: None,
        };
        self.state
            .save(&record, &state.theta, state.optimizer.momentum())?;
        self.keep_receipt(&signed, &manifest);
        self.remember_applied(&signed, &manifest);
        self.prune(&manifest, state.round).await;
        self.summary.rounds_completed += 1;
        NodeMetrics::add(&self.metrics.rounds_applied, 1);
        NodeMetrics::set(&self.metrics.current_round, manifest.round + 1);
        self.summary.final_params_hash = Some(next_hash);
        tracing::info!(round, params = %next_hash.short(), accepted = manifest.accepted.len(), "round applied");
        Ok(Some(RoundOutcome::Applied))
    }

    /// Fetches the updates `manifest` accepted (each checked against its
    /// hash and size), applies them with `apply_round` on a blocking thread,
    /// and checks the result against the manifest's `next_params_hash`.
    /// The optimizer changes only when the hash matches; `theta` is left
    /// unusable by anything but a match (the caller resyncs), so that θ is
    /// never copied. `None` means we were stopped.
    async fn apply_manifest(
        &mut self,
        rule: AggregationRule,
        theta: &mut Vec<f32>,
        optimizer: &mut OuterOptimizer,
        manifest: &Manifest,
    ) -> Result<Option<Applied>, NodeError> {
        let round = manifest.round;
        for accepted in &manifest.accepted {
            let author = accepted.node.0.to_peer_id().ok();
            if let Err(e) = self
                .fetch(
                    &accepted.update_hash,
                    Some(accepted.update_bytes),
                    author,
                    "update",
                )
                .await
            {
                return match e {
                    NodeError::Fetch(FetchError::Cancelled) => Ok(None),
                    NodeError::Fetch(e) => Ok(Some(Applied::Unavailable(format!(
                        "could not fetch an accepted update of round {round}: {e}"
                    )))),
                    other => Err(other),
                };
            }
        }
        let mut payloads: Vec<(Vec<u8>, f32)> = Vec::with_capacity(manifest.accepted.len());
        for accepted in &manifest.accepted {
            let store = self.store.clone();
            let hash = accepted.update_hash;
            let bytes = tokio::task::spawn_blocking(move || store.read(&hash))
                .await
                .map_err(|e| NodeError::Training(e.to_string()))??;
            payloads.push((bytes, accepted.weight));
        }
        let mut next = std::mem::take(theta);
        let mut next_optimizer = optimizer.clone();
        let (next, next_optimizer, result) = tokio::task::spawn_blocking(move || {
            let updates: Vec<(&[u8], f32)> =
                payloads.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
            let result = apply_round(&mut next, &mut next_optimizer, &rule, &updates)
                .map(|_| Hash::of_f32s(&next));
            (next, next_optimizer, result)
        })
        .await
        .map_err(|e| NodeError::Training(e.to_string()))?;
        *theta = next;
        let next_hash = match result {
            Ok(hash) => hash,
            Err(e) => {
                return Ok(Some(Applied::Unavailable(format!(
                    "the accepted updates of round {round} do not aggregate: {e}"
                ))));
            }
        };
        if next_hash != manifest.next_params_hash {
            return Ok(Some(Applied::Mismatch {
                hash: next_hash,
                reason: format!(
                    "after round {round} our params hash to {}, the manifest says {}",
                    next_hash.short(),
                    manifest.next_params_hash.short()
                ),
            }));
        }
        *optimizer = next_optimizer;
        Ok(Some(Applied::Matched(next_hash)))
    }

    /// Keeps the manifest we applied for a round (the last
    /// [`APPLIED_MANIFESTS_KEPT`] rounds) to compare any other against.
    fn remember_applied(&mut self, signed: &Signed<Manifest>, manifest: &Manifest) {
        self.applied.insert(manifest.round, signed.clone());
        while self.applied.len() > APPLIED_MANIFESTS_KEPT {
            self.applied.pop_first();
        }
    }

    /// Two different manifests, both signed by the coordinator, for one
    /// round are proof that it forked the run's history. The node saves both
    /// under `forks/` and stops: it will not follow a coordinator that
    /// equivocates (docs/protocol.md, "The chain").
    fn check_fork(&self, signed: &Signed<Manifest>, manifest: &Manifest) -> Result<(), NodeError> {
        let Some(ours) = self.applied.get(&manifest.round) else {
            return Ok(());
        };
        if ours.body_hash() == signed.body_hash() {
            return Ok(());
        }
        let dir = self.config.data_dir.join("forks");
        let mut saved = Vec::new();
        for evidence in [ours, signed] {
            let path = dir.join(format!(
                "round-{:06}-{}.manifest",
                manifest.round,
                evidence.body_hash().short()
            ));
            let written = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| evidence.to_bytes().map_err(|e| e.to_string()))
                .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()));
            match written {
                Ok(()) => saved.push(path.display().to_string()),
                Err(e) => tracing::error!("could not save fork evidence {}: {e}", path.display()),
            }
        }
        Err(NodeError::Chain(format!(
            "the coordinator signed two different manifests for round {}: {} (which this node \
             applied) and {}. That is a fork of the run's history; the node will not follow it. \
             Evidence: {}",
            manifest.round,
            ours.body_hash().short(),
            signed.body_hash().short(),
            saved.join(", ")
        )))
    }

    /// Records the updates `manifest` accepted under its round and deletes
    /// (and stops announcing) those of rounds older than the retention
    /// window (`crate::retention`). Failures only cost disk, so they are logged.
    async fn prune(&mut self, manifest: &Manifest, current_round: u64) {
        // Rejected updates too: ours, if it was, would otherwise stay forever.
        let hashes = manifest
            .accepted
            .iter()
            .map(|a| a.update_hash)
            .chain(manifest.rejected.iter().filter_map(|r| r.update_hash));
        self.retention.record(manifest.round, hashes);
        let expired = self.retention.expire(current_round);
        for hash in &expired {
            let store = self.store.clone();
            let hash = *hash;
            let removed = tokio::task::spawn_blocking(move || store.remove(&hash)).await;
            if let Ok(Err(e)) = removed {
                tracing::debug!("pruning update {}: {e}", hash.short());
            }
            let _ = self.client.stop_providing(hash).await;
        }
        if !expired.is_empty() {
            tracing::debug!(
                round = current_round,
                "pruned {} old updates",
                expired.len()
            );
        }
        if let Err(e) = self.retention.save() {
            tracing::warn!("could not save the retention index: {e}");
        }
    }

    /// Keeps a signed manifest that names us: proof of our contribution.
    fn keep_receipt(&self, signed: &Signed<Manifest>, manifest: &Manifest) {
        let me = self.key.node_id();
        let names_us = manifest.accepted.iter().any(|a| a.node == me)
            || manifest.rejected.iter().any(|r| r.node == me)
            || manifest.missing.contains(&me);
        if !names_us {
            return;
        }
        let path = self
            .receipts
            .join(format!("round-{:06}.manifest", manifest.round));
        match signed.to_bytes() {
            Ok(bytes) => {
                if let Err(e) = write_atomic(&path, &bytes) {
                    self.warn(format!(
                        "could not keep the receipt of round {}: {e}",
                        manifest.round
                    ));
                }
            }
            Err(e) => self.warn(format!(
                "could not encode the receipt of round {}: {e}",
                manifest.round
            )),
        }
    }

    /// The worker trainers, one per device, building the missing ones.
    async fn trainers(&self, state: &mut Synced) -> Result<Vec<Option<Trainer>>, NodeError> {
        let mut slots = std::mem::take(&mut state.trainers);
        slots.resize_with(self.devices.len(), || None);
        for (slot, spec) in slots.iter_mut().zip(&self.devices) {
            if slot.is_some() {
                continue;
            }
            let device = barnraise_trainer::device::select(*spec)
                .map_err(|e| NodeError::Device(e.to_string()))?;
            let model = state.model.clone();
            let precision = self.config.precision;
            let trainer = tokio::task::spawn_blocking(move || {
                let mut trainer = Trainer::new(&model, device, INIT_SEED)?;
                let dtype = trainer.set_precision(precision)?;
                tracing::info!(
                    precision = barnraise_trainer::precision::dtype_name(dtype),
                    "worker ready"
                );
                Ok::<_, barnraise_trainer::TrainError>(trainer)
            })
            .await
            .map_err(|e| NodeError::Training(e.to_string()))?
            .map_err(|e| NodeError::Training(e.to_string()))?;
            *slot = Some(trainer);
        }
        Ok(slots)
    }

    /// Keeps this round's workers' states for spot checks and deletes
    /// those of rounds before the last one: by then the coordinator has
    /// closed them.
    fn forget_old_states(&mut self, round: u64, states: Vec<Hash>) {
        self.spot_states.push_back((round, states));
        while let Some((old, _)) = self.spot_states.front()
            && old.saturating_add(1) < round
        {
            if let Some((_, hashes)) = self.spot_states.pop_front() {
                for hash in hashes {
                    if let Err(e) = self.store.remove(&hash) {
                        tracing::debug!("could not delete spot-check state {}: {e}", hash.short());
                    }
                }
            }
        }
    }

    async fn train_and_commit(
        &mut self,
        state: &mut Synced,
        plan: &RoundPlan,
        assignment: &Assignment,
    ) -> Result<Option<()>, NodeError> {
        let round = plan.round;
        // The plan says how many of our workers it gave work to (fewer than
        // we declared on probation, or when shards run short); the others sit
        // the round out, since their tokens could not be claimed.
        let active = self.devices.len().min(assignment.workers.max(1) as usize);
        if active < self.devices.len() {
            tracing::info!(
                round,
                planned = active,
                declared = self.devices.len(),
                "the plan gives work to fewer workers than this node declared"
            );
        }
        let shards = match assignment.shard_hashes(&state.run.dataset) {
            Ok(shards) => shards,
            Err(index) => {
                // The coordinator signed a plan our run config cannot read:
                // sit the round out, the manifest still brings us along.
                self.warn(format!(
                    "skipping round {round}'s work: the plan names shard {index}, and the run's \
                     dataset has {} shards",
                    state.run.dataset.len()
                ));
                return Ok(Some(()));
            }
        };
        let worker_plans = crate::cluster::split_assignment(&shards, assignment.seed, active);
        // Shards: verified by hash on arrival, cached in the store; each
        // distinct shard is fetched and decoded once, whichever workers use it.
        let mut shard_tokens: std::collections::HashMap<Hash, Vec<u16>> =
            std::collections::HashMap::new();
        for (shard, &index) in shards.iter().zip(&assignment.shards) {
            if shard_tokens.contains_key(shard) {
                continue;
            }
            let size = state.run.dataset.get(index as usize).map(|s| s.bytes);
            match self.fetch(shard, size, None, "shard").await {
                Ok(()) => {}
                Err(NodeError::Fetch(FetchError::Cancelled)) => return Ok(None),
                Err(NodeError::Fetch(e)) => {
                    // Sit this round out; the manifest still brings us along.
                    self.warn(format!(
                        "skipping round {round}'s work: could not fetch shard {}: {e}",
                        shard.short()
                    ));
                    return Ok(Some(()));
                }
                Err(e) => return Err(e),
            }
            let bytes = self.store.read(shard)?;
            let decoded = barnraise_trainer::data::Shard::decode(
                &bytes,
                &Path::new("shard").join(shard.to_hex()),
            )
            .map_err(|e| NodeError::RunConfig(e.to_string()))?;
            shard_tokens.insert(*shard, decoded.tokens);
        }
        let worker_tokens: Vec<Vec<u16>> = worker_plans
            .iter()
            .map(|p| {
                p.shards
                    .iter()
                    .filter_map(|h| shard_tokens.get(h))
                    .flat_map(|t| t.iter().copied())
                    .collect()
            })
            .collect();
        drop(shard_tokens);
        let worker_seeds: Vec<u64> = worker_plans.iter().map(|p| p.seed).collect();
        let mut inner = barnraise_trainer::train::inner_for_round(
            &state.run,
            round,
            assignment.inner_steps,
            assignment.seed,
        );
        if let Some(micro) = self.config.micro_batch {
            inner = inner.with_micro_batches(micro as usize);
        }
        self.emit(NodeEvent::TrainingStarted {
            round,
            steps: assignment.inner_steps,
        });
        let mut slots = self.trainers(state).await?;
        let theta = state.theta.clone();
        let crash_worker = self.config.fault_crash_worker;
        // Live progress from worker 0 (the others run in step with it), and
        // a prompt stop when the node shuts down mid-loop.
        let events = self.events.clone();
        let shutdown = self.shutdown.clone();
        let progress = move |worker: usize, step: usize, loss: f32| {
            if worker == 0
                && let Some(events) = &events
            {
                let _ = events.try_send(NodeEvent::TrainingProgress {
                    round,
                    step: step as u32,
                    loss,
                });
            }
            !shutdown.is_cancelled()
        };
        let started = Instant::now();
        let trained = tokio::task::spawn_blocking(move || {
            let results = crate::cluster::train_workers(
                &mut slots[..active],
                &theta,
                &worker_tokens,
                &worker_seeds,
                &inner,
                crash_worker,
                &progress,
            );
            (slots, results)
        });
        let (slots, results) = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Ok(None),
            joined = trained => joined.map_err(|e| NodeError::Training(e.to_string()))?,
        };
        state.trainers = slots;
        let mut results = results;
        if self.config.misbehave == Some(crate::config::Misbehaviour::Inflate)
            && let Some(Ok(first)) = results.first().cloned()
        {
            tracing::warn!(
                round,
                "red-team mode: claiming worker 0's work for every worker"
            );
            for update in results.iter_mut().skip(1).flatten() {
                // Worker 0's Δ plus 10% noise: a plain copy is refused as
                // `bad-shares` at once; this one takes a spot check to catch.
                let seed = round ^ ((update.index as u64) << 32);
                let noise = crate::redteam::noise_like(&first.delta, seed);
                update.delta = first
                    .delta
                    .iter()
                    .zip(&noise)
                    .map(|(d, n)| d + 0.1 * n)
                    .collect();
                update.losses = first.losses.clone();
                update.tokens = first.tokens;
            }
        }
        let compute_ms = started.elapsed().as_millis() as u64;
        NodeMetrics::add(&self.metrics.compute_ms, compute_ms);
        for update in results.iter().filter_map(|r| r.as_ref().ok()) {
            self.metrics.add_worker_tokens(update.index, update.tokens);
        }
        let reduced = crate::cluster::reduce(results, state.theta.len());
        let update = match reduced {
            Ok(update) => update,
            Err(e) => {
                // A diverged or failed inner loop costs us this round, not the node.
                NodeMetrics::add(&self.metrics.worker_failures, self.devices.len() as u64);
                self.warn(format!("skipping round {round}'s commit: {e}"));
                return Ok(Some(()));
            }
        };
        for failure in &update.failures {
            NodeMetrics::add(&self.metrics.worker_failures, 1);
            self.warn(format!(
                "round {round}: worker {} failed and is left out of the update ({} of {} workers in it): {}",
                failure.index,
                update.workers,
                self.devices.len(),
                failure.error
            ));
            self.emit(NodeEvent::WorkerFailed {
                round,
                worker: failure.index,
                error: failure.error.clone(),
            });
        }
        let report = barnraise_trainer::InnerReport {
            tokens: update.tokens,
            losses: update.losses,
            wall: started.elapsed(),
        };
        let mut delta = update.delta;
        let workers = update.workers;
        // The workers' starting states: served until the round closes, in
        // case the coordinator spot checks a worker (docs/security.md). Only
        // the coordinator asks, and it asks this node, so they are not
        // announced in the DHT.
        let mut state_hashes = Vec::with_capacity(update.states.len());
        for bytes in update.states {
            let store = self.store.clone();
            let hash = tokio::task::spawn_blocking(move || store.put(&bytes))
                .await
                .map_err(|e| NodeError::Training(e.to_string()))??;
            state_hashes.push(hash);
        }
        self.forget_old_states(round, state_hashes);
        if let Some(misbehaviour) = self.config.misbehave
            && misbehaviour != crate::config::Misbehaviour::Inflate
        {
            tracing::warn!(
                round,
                "red-team mode: corrupting this update ({misbehaviour})"
            );
            misbehaviour.apply(&mut delta);
        }
        if let Some(adversary) = self.adversary.clone() {
            delta = tokio::task::spawn_blocking(move || {
                adversary.corrupt_delta(round, &mut delta);
                delta
            })
            .await
            .map_err(|e| NodeError::Training(e.to_string()))?;
        }
        let round_codec = state.codec.codec_at(round);
        if state.encoder.config() != round_codec {
            // The run's density warm-up moved on: same residual, new codec.
            state.encoder = Encoder::from_residual(
                round_codec,
                state.encoder.params(),
                state.encoder.residual(),
            )
            .map_err(|e| NodeError::Training(format!("codec of round {round}: {e}")))?
            .with_decay(state.codec.decay());
        }
        let mut payload = state
            .encoder
            .encode(&delta)
            .map_err(|e| NodeError::Training(format!("encoding the update: {e}")))?;
        if let Some(adversary) = &self.adversary {
            adversary.corrupt_payload(round, &mut payload);
        }
        let store = self.store.clone();
        let update_bytes = payload.len() as u64;
        let update_hash = tokio::task::spawn_blocking(move || store.put(&payload))
            .await
            .map_err(|e| NodeError::Training(e.to_string()))??;
        self.state.save_residual(state.encoder.residual())?;
        let commit = Commit {
            run_id: state.run.run_id.clone(),
            round,
            base_params_hash: plan.params_hash,
            update_hash,
            update_bytes,
            tokens: report.tokens,
            losses: report
                .losses
                .iter()
                .copied()
                .take(barnraise_protocol::limits::MAX_REPORTED_LOSSES)
                .collect(),
            compute_ms,
            workers,
            shares: update.shares,
        };
        let signed =
            Signed::sign(&self.key, &commit).map_err(|e| NodeError::Training(e.to_string()))?;
        // A busy or rate-limited coordinator asks us to retry: a few times,
        // backing off, before the commit counts as refused.
        let mut backoff = Duration::from_secs(1);
        let mut attempts = 0;
        let response = loop {
            let Some(response) = self.ask(CoordinatorRequest::Commit(signed.clone())).await? else {
                return Ok(None);
            };
            attempts += 1;
            match &response {
                CoordinatorResponse::Refused { reason }
                    if barnraise_protocol::messages::is_retry_later(reason) && attempts < 5 =>
                {
                    tracing::info!(round, "the coordinator asks us to wait: {reason}");
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                _ => break response,
            }
        };
        // Announced only once the commit is in: a copier who fetched the
        // blob from the DHT before the coordinator saw our commit would be
        // the "first" committer, and ours the copy (docs/security.md).
        let _ = self.client.start_providing(update_hash).await;
        if let Some(adversary) = &self.adversary {
            adversary.committed(round);
        }
        let spam = match &self.adversary {
            Some(adversary) => adversary.spam(round, &commit),
            None => Vec::new(),
        };
        if !spam.is_empty() {
            tracing::warn!(round, "red-team mode: sending {} extra commits", spam.len());
            for extra in spam {
                let signed = Signed::sign(&self.key, &extra)
                    .map_err(|e| NodeError::Training(e.to_string()))?;
                if self
                    .ask(CoordinatorRequest::Commit(signed))
                    .await?
                    .is_none()
                {
                    return Ok(None);
                }
            }
        }
        match response {
            CoordinatorResponse::CommitAccepted { .. } | CoordinatorResponse::Ok => {
                NodeMetrics::add(&self.metrics.updates_committed, 1);
            }
            CoordinatorResponse::Refused { reason } => {
                NodeMetrics::add(&self.metrics.commits_refused, 1);
                self.warn(format!(
                    "coordinator refused our commit for round {round}: {reason}"
                ))
            }
            other => tracing::debug!("unexpected answer to commit: {other:?}"),
        }
        state.committed = Some((round, update_hash));
        let record = StateRecord {
            run_id: state.run.run_id.clone(),
            round,
            params_hash: plan.params_hash.to_hex(),
            codec: state.run.codec.clone(),
            committed: Some((round, update_hash.to_hex())),
        };
        self.state.save_record(&record)?;
        self.summary.rounds_trained += 1;
        self.summary.tokens_trained += report.tokens;
        NodeMetrics::add(&self.metrics.rounds_trained, 1);
        NodeMetrics::add(&self.metrics.tokens_trained, report.tokens);
        NodeMetrics::add(&self.metrics.update_bytes, update_bytes);
        let losses = &report.losses;
        if let Some(&loss) = losses.last() {
            self.metrics.set_loss(loss);
        }
        tracing::info!(round, update = %update_hash.short(), bytes = update_bytes, loss = losses.last().copied().unwrap_or(f32::NAN), "committed update");
        self.emit(NodeEvent::Committed {
            round,
            update_hash,
            bytes: update_bytes,
            tokens: report.tokens,
        });
        Ok(Some(()))
    }

    async fn leave(&mut self) {
        let (Some(peer), Some(run_id)) = (self.coordinator, self.run_id.clone()) else {
            return;
        };
        let leave = barnraise_protocol::messages::Leave {
            run_id,
            timestamp_ms: now_ms(),
        };
        if let Ok(signed) = Signed::sign(&self.key, &leave) {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .coordinator_request(peer, CoordinatorRequest::Leave(signed)),
            )
            .await;
        }
    }
}

/// `addr` without its trailing `/p2p/...`, for the swarm's address book.
fn strip_p2p(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// Reads the parts of a coordinator's run config that the node acts on
/// (model, codec, aggregation rule), checking each before any is used.
pub fn parse_run_config(
    run: &RunConfig,
) -> Result<(ModelConfig, CodecSchedule, AggregationRule), NodeError> {
    let model: ModelConfig = serde_json::from_str(&run.model_config_json)
        .map_err(|e| NodeError::RunConfig(format!("model config: {e}")))?;
    model.validate().map_err(NodeError::RunConfig)?;
    let codec: CodecSchedule = run.codec.parse().map_err(NodeError::RunConfig)?;
    let rule: AggregationRule = run.aggregation.parse()?;
    Ok((model, codec, rule))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_back_off_to_a_ceiling() {
        let mut poll = PollBackoff::new(Duration::from_millis(500));
        let waits: Vec<u64> = (0..7).map(|_| poll.next().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        // A minute of quiet gossip costs 11 polls, not 120 at 500 ms.
        let mut poll = PollBackoff::new(Duration::from_millis(500));
        let mut waited = Duration::ZERO;
        let mut polls = 0;
        while waited < Duration::from_secs(60) {
            waited += poll.next();
            polls += 1;
        }
        assert_eq!(polls, 11);
        let mut huge = PollBackoff::new(Duration::from_secs(3600));
        assert_eq!(huge.next(), MAX_POLL_INTERVAL);
    }
}
