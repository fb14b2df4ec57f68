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
    CheckpointRef, CoordinatorRequest, CoordinatorResponse, Join, Manifest, RoundPlan, RunConfig,
    Welcome, WorkerInfo, now_ms,
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

mod apply;
mod catchup;
mod commit;
mod fetch;
mod join;
mod prefetch;
mod round;
mod shards_ahead;
mod train;

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
    /// Paused, or outside the node's active hours: it told the coordinator
    /// it is leaving and trains nothing until it may work again.
    StandingBy {
        reason: String,
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
    /// Relay reservations accepted over the run.
    pub relay_reservations: u64,
    pub resyncs: u64,
    /// Closed rounds replayed from their manifests while catching up.
    pub rounds_replayed: u64,
    /// The most peer addresses one welcome or plan's bootstrap list gave us.
    pub bootstrap_addrs: usize,
    pub final_params_hash: Option<Hash>,
    /// Milliseconds the workers spent in inner steps, summed over rounds.
    pub compute_ms: u64,
    /// Unix milliseconds of the first plan we acted on and of the last
    /// manifest we applied: the span [`NodeSummary::utilization`] divides by.
    pub first_plan_ms: Option<u64>,
    pub last_applied_ms: Option<u64>,
    /// `compute_ms` as it stood when the last manifest was applied: the
    /// training of rounds inside that span (a round trained and then left
    /// before its manifest came is outside it).
    pub compute_ms_applied: u64,
    /// Where the rounds' wall clock went, summed over rounds.
    pub phases: RoundPhases,
    /// Accepted updates whose fetch started before their manifest, on the
    /// coordinator's notice (`prefetch_updates`).
    pub updates_prefetched: u64,
}

/// Milliseconds a node spent in each phase of its rounds, summed; together
/// they cover the span [`NodeSummary::utilization`] divides by, so the
/// time not training can be told apart (docs/architecture.md, "Slow
/// links").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundPhases {
    /// From a plan to our commit accepted: fetching shards, training
    /// (`NodeSummary::compute_ms` of it), encoding, storing, committing.
    pub plan_to_commit_ms: u64,
    /// From the commit to the round's manifest: the other nodes' commits
    /// and the coordinator's close.
    pub commit_to_manifest_ms: u64,
    /// From the manifest to the round applied: fetching the accepted
    /// updates and the outer step.
    pub applying_ms: u64,
    /// From a round applied to the next plan.
    pub waiting_for_plan_ms: u64,
}

impl NodeSummary {
    /// Seconds training ÷ seconds of wall clock from the first plan to the
    /// last manifest applied; `None` before a round was both planned and
    /// applied.
    ///
    /// Only the training of rounds whose manifest was applied counts: a
    /// last round trained but never closed would otherwise add training
    /// time outside the span.
    pub fn utilization(&self) -> Option<f64> {
        let (first, last) = (self.first_plan_ms?, self.last_applied_ms?);
        let span = last.checked_sub(first).filter(|&span| span > 0)?;
        Some((self.compute_ms_applied as f64 / span as f64).min(1.0))
    }
}

#[cfg(test)]
mod summary_tests {
    use super::NodeSummary;

    #[test]
    fn utilization_counts_the_training_of_applied_rounds_only() {
        let mut s = NodeSummary::default();
        assert_eq!(s.utilization(), None);
        // Two rounds over 10 s, 6 s of them training, then a third round
        // trained for 9 s whose manifest never came.
        s.first_plan_ms = Some(1_000);
        s.compute_ms = 6_000;
        s.compute_ms_applied = 6_000;
        s.last_applied_ms = Some(11_000);
        s.compute_ms += 9_000;
        assert_eq!(s.utilization(), Some(0.6));
        // No span: no figure.
        s.last_applied_ms = Some(1_000);
        assert_eq!(s.utilization(), None);
    }
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
    /// Work handed to a blocking thread (hashing, saving, encoding) did not
    /// come back: it panicked, or the runtime is shutting down.
    #[error("a background task failed: {0}")]
    Background(String),
}

/// Runs `work` on tokio's blocking pool. Hashing, saving with fsync,
/// encoding and decoding a θ-sized vector take from tens of milliseconds to
/// seconds on the larger presets; on an async thread that long they would
/// stall the swarm's event loop, and with it pings, gossip and every blob
/// this node serves (docs/architecture.md, "Nothing blocks the runtime").
pub(crate) async fn off_runtime<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Background(e.to_string()))
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
        link: config.link.clone(),
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
    let prefetch = prefetch::Prefetch::new(config.prefetch_updates);
    let shards_ahead = shards_ahead::ShardsAhead::new(config.prefetch_updates);
    let router = tokio::spawn(route_events(
        network_events,
        plans_tx,
        manifests_tx,
        prefetch.clone(),
        shards_ahead.clone(),
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
        prefetch,
        shards_ahead,
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
        last_round: None,
        phase_mark_ms: None,
    };
    let result = node.run().await;
    let mut summary = node.summary.clone();
    if let Ok(status) = node.client.status().await {
        summary.reachability = Some(status.reachability.label().to_string());
        summary.hole_punches = status.hole_punches;
        summary.relay_reservations = status.relay_reservations;
    }
    // Say goodbye if we can; the coordinator copes if we cannot.
    node.leave().await;
    network_shutdown.cancel();
    let _ = network_task.await;
    // The node serves peers until its network stops (a peer may still be
    // fetching the last round's update while it leaves): the bytes are
    // read once the router has counted the last of them. Its events end
    // with the network.
    let mut router = router;
    if tokio::time::timeout(std::time::Duration::from_secs(2), &mut router)
        .await
        .is_err()
    {
        router.abort();
    }
    summary.bytes_uploaded = bytes_up.load(Ordering::Relaxed);
    summary.bytes_served_to_peers = node
        .metrics
        .blob_bytes_served_to_peers
        .load(Ordering::Relaxed);
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

/// Sorts network events: plans and manifests to the round loop (plans to
/// the shard fetcher too), update notices to the prefetcher, served bytes
/// to the counters. Full queues drop (the round loop also polls).
async fn route_events(
    mut events: mpsc::Receiver<Event>,
    plans: mpsc::Sender<(PeerId, RoundPlan)>,
    manifests: mpsc::Sender<(PeerId, Signed<Manifest>, Manifest)>,
    prefetch: prefetch::Prefetch,
    shards_ahead: shards_ahead::ShardsAhead,
    bytes_up: Arc<AtomicU64>,
    served: Served,
) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Plan { source, plan, .. } => {
                shards_ahead.offer(&plan);
                let _ = plans.try_send((source, plan));
            }
            Event::Manifest {
                source,
                manifest,
                signed,
            } => {
                let _ = manifests.try_send((source, signed, manifest));
            }
            Event::UpdateNotice { notice, .. } => {
                prefetch.offer(notice);
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
    /// θ's hash, kept in step with it: θ changes only when a manifest is
    /// applied, and that checks the hash anyway, so it is never recomputed.
    params_hash: Hash,
    optimizer: OuterOptimizer,
    /// The run's codec over rounds (warm-up, decay).
    codec: CodecSchedule,
    /// `None` only while a blocking thread holds it to encode an update.
    encoder: Option<Encoder>,
    /// One slot per worker; a slot is emptied when its worker fails and
    /// rebuilt at the next round.
    trainers: Vec<Option<Trainer>>,
    committed: Option<(u64, Hash)>,
    /// What the workers trained after the last commit, once its manifest
    /// accepted it (overlapped rounds): carried into the next round.
    tails: Option<train::Tails>,
    /// Body hash of the last manifest applied (the Welcome's head right
    /// after a sync): the next manifest must name it as `previous_manifest`.
    head_manifest: Hash,
}

impl Synced {
    /// Saves θ, the outer momentum and `record` on a blocking thread.
    async fn save(&mut self, dir: &StateDir, record: StateRecord) -> Result<(), NodeError> {
        let config = *self.optimizer.config();
        let optimizer = std::mem::replace(&mut self.optimizer, OuterOptimizer::new(config, 0));
        let theta = std::mem::take(&mut self.theta);
        let (theta, momentum) = dir
            .save_in_background(record, theta, optimizer.into_momentum())
            .await?;
        self.theta = theta;
        self.optimizer = OuterOptimizer::from_state(config, momentum);
        Ok(())
    }
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
    /// Updates fetched on the coordinator's notice, before their manifest.
    prefetch: prefetch::Prefetch,
    /// Our shards fetched as soon as a plan names them.
    shards_ahead: shards_ahead::ShardsAhead,
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
    /// (`train::states_expired`).
    spot_states: std::collections::VecDeque<train::KeptStates>,
    /// A red-team hook (docs/security.md); `None` for every real node.
    adversary: Option<Arc<dyn crate::redteam::Adversary>>,
    /// Wall clock of our last round, from its plan to its manifest applied:
    /// how much of the active hours a round needs.
    last_round: Option<Duration>,
    /// Unix ms up to which the round phases in the summary are counted, so
    /// that a round cut short (a resync) is not counted again as waiting.
    phase_mark_ms: Option<u64>,
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
        'joined: loop {
            if self.cancelled() {
                return Ok(());
            }
            if let Some(reason) = self.standby_reason() {
                if !self.stand_by(reason).await {
                    return Ok(());
                }
                synced = None;
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
                // A finished run checks nothing more: no state is fetched
                // after its last close.
                if state.run.total_rounds > 0 && state.round >= state.run.total_rounds {
                    tracing::info!(rounds = state.run.total_rounds, "the run is complete");
                    return Ok(());
                }
                if self
                    .config
                    .max_rounds
                    .is_some_and(|max| self.summary.rounds_completed >= max)
                {
                    if self.config.serve_states_before_exit {
                        self.serve_kept_states().await;
                    }
                    return Ok(());
                }
                if self.cancelled() {
                    return Ok(());
                }
                if self.standby_reason().is_some() {
                    // Stand by, then join again.
                    continue 'joined;
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

    /// Whether the node's pause switch is on.
    fn paused(&self) -> bool {
        self.config.pause.as_ref().is_some_and(|p| p.is_paused())
    }

    /// Why the node should not take work now: paused, outside its active
    /// hours, or too close to their end for a round to finish (the last
    /// round's length with a quarter's headroom).
    fn standby_reason(&self) -> Option<String> {
        if self.paused() {
            return Some("paused (`barnraise node resume` or SIGUSR2 resumes it)".into());
        }
        let schedule = self.config.schedule?;
        match schedule.open_for(crate::activity::local_second_of_day()) {
            None => Some(format!("outside its active hours {schedule}")),
            Some(left) => {
                let needed = self.last_round?.mul_f64(1.25);
                (left < needed).then(|| {
                    format!(
                        "its active hours {schedule} end in {} s, before a round of about {} s \
                         could finish",
                        left.as_secs(),
                        needed.as_secs()
                    )
                })
            }
        }
    }

    /// Says we are leaving (if we had joined), then waits until the node
    /// may work again. `false`: it was stopped meanwhile.
    async fn stand_by(&mut self, reason: String) -> bool {
        tracing::info!("standing by: {reason}");
        self.emit(NodeEvent::StandingBy {
            reason: reason.clone(),
        });
        self.leave().await;
        let mut pause = self.config.pause.clone();
        loop {
            if self.standby_reason().is_none() {
                tracing::info!("back to work");
                return true;
            }
            // Wake when the pause switch flips, else check the clock at
            // least once a minute (and right when the hours open).
            let opens_in = self.config.schedule.map_or(Duration::from_secs(60), |s| {
                s.opens_in(crate::activity::local_second_of_day())
            });
            let nap = opens_in.clamp(Duration::from_millis(200), Duration::from_secs(60));
            let flipped = async {
                match pause.as_mut() {
                    Some(switch) => switch.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return false,
                _ = flipped => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
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
