//! The coordinator service: the I/O around the round state machine.
//!
//! [`start`] loads (or resumes) the run from the data dir, starts the libp2p
//! peer and the HTTP server, and runs one actor loop that alone owns the
//! [`Rounds`] machine. The loop takes node requests from the network, ticks
//! the machine, and carries out its actions: plans are signed, stored and
//! gossiped; committed updates are fetched and checked on their own tasks;
//! rounds are closed on a blocking thread (verification, aggregation, the
//! outer step, signing and the ledger transaction) and the result fed back.
//!
//! Resuming: the ledger holds every plan, the commits of the open round and
//! every closed round with the blobs of θ after it, so a coordinator killed
//! at any point restarts on the same data dir where it stopped.

use crate::admission;
use crate::close::{self, CloseContext, Closed};
use crate::config::{ConfigError, CoordinatorConfig, Resolved};
use crate::dataset::{self, Dataset, DatasetError};
use crate::http::{self, HttpState};
use crate::ledger::{
    CheckpointRow, Ledger, LedgerError, NodeRow, RefusalRow, RoundRecord, RoundRow,
};
use crate::metrics::{Metrics, Stage};
use crate::network::{self, Client, CoordinatorTraffic, NetworkError};
use crate::params::{GlobalState, StateError};
use crate::rounds::{self, Action, CloseRound, CommitOutcome, Rounds, RoundsConfig, Start};
use crate::store::{BlobStore, StoreError};
use crate::summary::{CoordinatorEvent, LiveStatus, NetworkTotals, RunSummary};
use crate::verify;
use barnraise_protocol::credit::Unverified;
use barnraise_protocol::messages::{
    CheckpointRef, Commit, CoordinatorRequest, CoordinatorResponse, Manifest, RejectReason,
    RoundPlan, RunConfig, Welcome,
};
use barnraise_protocol::outer::OuterConfig;
use barnraise_protocol::{Hash, NodeId, OrgId, PublicKey, Signed, SigningKey, messages::now_ms};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the coordinator could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("coordinator key: {0}")]
    Identity(#[from] barnraise_protocol::identity::IdentityError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("network: {0}")]
    Network(#[from] NetworkError),
    #[error("global state: {0}")]
    State(#[from] StateError),
    #[error("closing a round: {0}")]
    Close(#[from] close::CloseError),
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot sign: {0}")]
    Sign(#[from] barnraise_protocol::wire::WireError),
    #[error("the ledger and the blob store disagree: {0}; restore the data dir from one backup")]
    Inconsistent(String),
    #[error("listen address `{addr}` is not a multiaddr: {reason}")]
    BadMultiaddr { addr: String, reason: String },
    #[error("internal: {0}")]
    Internal(String),
}

/// A running coordinator.
pub struct CoordinatorHandle {
    multiaddrs: Vec<Multiaddr>,
    http_addr: SocketAddr,
    events: broadcast::Sender<CoordinatorEvent>,
    task: JoinHandle<Result<RunSummary, CoordinatorError>>,
    ledger_path: PathBuf,
    public_key: PublicKey,
}

impl CoordinatorHandle {
    /// The first listen address, with `/p2p/<peer id>`: what nodes dial.
    pub fn multiaddr(&self) -> Multiaddr {
        self.multiaddrs
            .first()
            .cloned()
            .unwrap_or_else(Multiaddr::empty)
    }

    pub fn multiaddrs(&self) -> &[Multiaddr] {
        &self.multiaddrs
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The coordinator's signing key: nodes check plans and manifests against it.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// Live events from now on.
    pub fn events(&self) -> broadcast::Receiver<CoordinatorEvent> {
        self.events.subscribe()
    }

    pub fn ledger_path(&self) -> &std::path::Path {
        &self.ledger_path
    }

    /// Waits until the run has finished (and lingered) or shutdown was asked for.
    pub async fn wait(self) -> Result<RunSummary, CoordinatorError> {
        self.task
            .await
            .map_err(|e| CoordinatorError::Internal(format!("coordinator task: {e}")))?
    }
}

/// The ledger file inside a data dir.
pub fn ledger_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("ledger.sqlite")
}

/// Starts a coordinator for `config`, resuming the run if its data dir has one.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle, CoordinatorError> {
    let resolved = config.resolve()?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| CoordinatorError::Io {
        path: data_dir.clone(),
        source,
    })?;
    let (key, _) = SigningKey::load_or_create(&config.key_path())?;
    let listen: Vec<Multiaddr> = config
        .listen
        .iter()
        .map(|a| {
            a.parse().map_err(
                |e: libp2p::multiaddr::Error| CoordinatorError::BadMultiaddr {
                    addr: a.clone(),
                    reason: e.to_string(),
                },
            )
        })
        .collect::<Result<_, _>>()?;

    // Loading the dataset, the ledger and θ is disk and CPU work.
    let prepared = {
        let config = config.clone();
        let resolved = resolved.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || prepare(&config, &resolved, &key))
            .await
            .map_err(|e| CoordinatorError::Internal(e.to_string()))??
    };

    let topics = [
        network::topic(&config.run_id, "plans"),
        network::topic(&config.run_id, "manifests"),
    ];
    let keypair = key.to_libp2p()?;
    let local_peer = keypair.public().to_peer_id();
    let traffic = CoordinatorTraffic::new(prepared.dataset.train.iter().map(|s| s.hash));
    traffic.set_state_blobs(&[
        prepared.state_ref.blob,
        prepared.state_ref.optimizer_blob,
        prepared.checkpoint.blob,
        prepared.checkpoint.optimizer_blob,
    ]);
    let (client, net_events, event_loop, multiaddrs) = network::new(
        keypair,
        &listen,
        prepared.store.clone(),
        &topics,
        traffic.clone(),
    )
    .await?;
    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| CoordinatorError::Io {
            path: PathBuf::from(config.http.to_string()),
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| CoordinatorError::Io {
            path: PathBuf::from(config.http.to_string()),
            source,
        })?;

    let children = shutdown.child_token();
    tokio::spawn(event_loop.run(children.clone()));
    let metrics = Arc::new(Metrics::new());
    let _ = metrics.traffic.set(traffic.clone());
    let live = Arc::new(RwLock::new(LiveStatus {
        run_id: config.run_id.clone(),
        model_params: resolved.model.params_count(),
        codec: resolved.codec.to_string(),
        aggregation: resolved.aggregation.to_string(),
        inner_steps: config.inner_steps,
        total_rounds: config.total_rounds,
        train_shards: prepared.dataset.train.len(),
        multiaddrs: multiaddrs.iter().map(|a| a.to_string()).collect(),
        ..LiveStatus::default()
    }));
    let readers = crate::ledger::Readers::open(&ledger_path(&config.data_dir), HTTP_READERS)
        .map_err(CoordinatorError::from)?;
    let http_state = HttpState {
        ledger: readers,
        live: live.clone(),
        metrics: metrics.clone(),
        data_dir: Some(data_dir.clone()),
        record: Arc::default(),
        closed: Arc::default(),
    };
    {
        let children = children.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(http_listener, http_state, children).await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
    }
    let bootstrap = crate::bootstrap::BootstrapBook::new(local_peer, &multiaddrs);
    for node in prepared.ledger_nodes.iter() {
        add_node_addresses(&client, &node.node, &node.listen_addrs).await;
    }

    let (events, _) = broadcast::channel(1024);
    let (internal_tx, internal_rx) = mpsc::channel(256);
    let ledger_file = ledger_path(&data_dir);
    tracing::info!(run = %config.run_id, round = prepared.rounds.current_round(), addr = ?multiaddrs.first(), http = %http_addr, "coordinator started");
    let public_key = key.public();
    let rate_limits = config.rate_limits.clone();
    let service = Service {
        config,
        resolved,
        key,
        run_config: prepared.run_config,
        rounds: prepared.rounds,
        ledger: prepared.ledger,
        store: prepared.store,
        dataset: Arc::new(prepared.dataset),
        heldout: prepared.heldout,
        state: Some(prepared.state),
        checkpoint: prepared.checkpoint,
        state_ref: prepared.state_ref,
        open_plan: prepared.open_plan,
        net: client,
        events: events.clone(),
        metrics,
        traffic,
        recent: Arc::new(Vec::new()),
        unverified: Arc::new(prepared.unverified),
        join_limiter: crate::ratelimit::PeerLimiter::new(
            rate_limits.join_burst,
            rate_limits.joins_per_minute,
            RATE_LIMITED_PEERS,
        ),
        commit_limiter: crate::ratelimit::PeerLimiter::new(
            rate_limits.commit_burst,
            rate_limits.commits_per_minute,
            RATE_LIMITED_PEERS,
        ),
        live,
        internal_tx,
        finished_at: None,
        refusals: Default::default(),
        bootstrap,
    };
    let task = tokio::spawn(service.run(
        net_events,
        internal_rx,
        prepared.pending,
        shutdown,
        children,
    ));
    Ok(CoordinatorHandle {
        multiaddrs,
        http_addr,
        events,
        task,
        ledger_path: ledger_file,
        public_key,
    })
}

/// Everything loaded from disk before the service starts.
struct Prepared {
    store: BlobStore,
    dataset: Dataset,
    heldout: Option<Arc<Vec<u16>>>,
    ledger: Arc<Mutex<Ledger>>,
    ledger_nodes: Vec<NodeRow>,
    state: GlobalState,
    checkpoint: CheckpointRef,
    state_ref: CheckpointRef,
    rounds: Rounds,
    open_plan: Option<Signed<RoundPlan>>,
    /// Stored commits of the restored open round, to replay.
    pending: Vec<Signed<Commit>>,
    run_config: RunConfig,
    unverified: Unverified,
}

fn outer_config(config: &CoordinatorConfig) -> OuterConfig {
    OuterConfig {
        lr: config.outer_lr,
        momentum: config.outer_momentum,
        nesterov: true,
    }
}

fn parse_hash(text: &str, what: &str) -> Result<Hash, CoordinatorError> {
    text.parse()
        .map_err(|e| CoordinatorError::Inconsistent(format!("{what} `{text}` is not a hash: {e}")))
}

fn prepare(
    config: &CoordinatorConfig,
    resolved: &Resolved,
    key: &SigningKey,
) -> Result<Prepared, CoordinatorError> {
    let store = BlobStore::open(&config.data_dir.join("blobs"))?;
    let dataset = dataset::load(&config.dataset, &config.data_dir, &store)?;
    // The run record carries the dataset manifest and the tokenizer (so an
    // export can ship it).
    let keep = |name: &str, bytes: &[u8]| {
        let path = config.data_dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| CoordinatorError::Io { path, source })
    };
    keep(crate::record::DATASET_FILE, &dataset.manifest_json)?;
    if let Some(json) = &dataset.tokenizer_json {
        keep(crate::record::TOKENIZER_FILE, json)?;
    }
    let heldout = dataset.held_out_tokens().map(Arc::new);
    let ledger = Ledger::open(&ledger_path(&config.data_dir))?;
    let config_json = serde_json::to_string(config).unwrap_or_default();
    ledger.bind_run(&config.run_id, &config_json, now_ms())?;
    let outer = outer_config(config);

    // θ: after the last closed round, or θ_0.
    let last = ledger.last_round()?;
    let (state, head_manifest) = match &last {
        None => (GlobalState::initial(&resolved.model, outer), Hash::ZERO),
        Some(row) => {
            let reference = resume_reference(row)?;
            let state = GlobalState::load(&resolved.model, outer, &store, &reference)?;
            if state.params_hash().to_hex() != row.next_params_hash {
                return Err(CoordinatorError::Inconsistent(format!(
                    "round {}'s params blob does not hash to the manifest's next params",
                    row.round
                )));
            }
            (state, parse_hash(&row.manifest_hash, "manifest hash")?)
        }
    };
    let state_ref = state.save(&resolved.model, &config.run_id, &store)?;
    let checkpoint = match ledger.latest_checkpoint()? {
        Some(row) => checkpoint_ref(&row)?,
        None => {
            if last.is_none() {
                // θ_0 is the first checkpoint: retention never deletes it,
                // and an audit of the whole run starts from it.
                ledger.record_checkpoint(&checkpoint_row(&state_ref))?;
            }
            state_ref.clone()
        }
    };

    // Plans so far: shard use counts, and the open round if there is one.
    let next_round = state.round;
    let shards: Vec<Hash> = dataset.train.iter().map(|s| s.hash).collect();
    let mut plans = Vec::new();
    let mut open_plan = None;
    for (round, bytes) in ledger.plans()? {
        let signed = Signed::<RoundPlan>::from_bytes(&bytes).map_err(|e| {
            CoordinatorError::Inconsistent(format!("stored plan of round {round}: {e}"))
        })?;
        let plan = signed.verify(Some(&key.public())).map_err(|e| {
            CoordinatorError::Inconsistent(format!(
                "stored plan of round {round} (another coordinator key?): {e}"
            ))
        })?;
        if plan.round > next_round {
            continue;
        }
        if plan.round == next_round {
            open_plan = Some((signed, plan.clone()));
        }
        plans.push(plan);
    }
    let rounds_config = RoundsConfig {
        run_id: config.run_id.clone(),
        seed: crate::plan::derive(0, &config.run_id, 0, &[]),
        inner_steps: config.inner_steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        shards_per_node: config.shards_per_node,
        quorum: config.quorum,
        deadline_ms: resolved.deadline_ms,
        min_nodes: config.min_nodes,
        total_rounds: config.total_rounds,
        shards: shards.clone(),
    };
    let start = Start {
        round: next_round,
        params_hash: state.params_hash(),
        head_manifest,
        shard_uses: rounds::count_shard_uses(shards.len(), &plans),
    };
    let mut rounds = Rounds::new(rounds_config, start);
    rounds.restore_reputation(crate::reputation::replay_rows(
        ledger
            .verdicts()?
            .into_iter()
            .filter_map(|(round, node, verdict, reason)| {
                let node = node.parse::<NodeId>().ok()?;
                let outcome = crate::reputation::Outcome::of_row(&verdict, reason.as_deref());
                Some((round, node, outcome))
            }),
    ));
    // Clawback windows: a fold over every closed round's manifest.
    let mut unverified = Unverified::default();
    for round in 0..next_round {
        let Some(bytes) = ledger.manifest(round)? else {
            return Err(CoordinatorError::Inconsistent(format!(
                "the ledger has no manifest for closed round {round}"
            )));
        };
        let manifest = Signed::<Manifest>::from_bytes(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| s.verify(Some(&key.public())).map_err(|e| e.to_string()))
            .map_err(|e| {
                CoordinatorError::Inconsistent(format!("stored manifest of round {round}: {e}"))
            })?;
        unverified
            .apply(&manifest)
            .map_err(|e| CoordinatorError::Inconsistent(e.to_string()))?;
    }
    let ledger_nodes = ledger.nodes()?;
    for node in &ledger_nodes {
        if let Ok(id) = node.node.parse::<NodeId>() {
            rounds.join(id, node.workers);
        }
    }
    let mut pending = Vec::new();
    let open_signed = match open_plan {
        Some((signed, plan)) => {
            // Nodes get a full deadline from the restart to deliver.
            rounds.restore_open(plan, now_ms().saturating_add(resolved.deadline_ms));
            for bytes in ledger.pending_commits(next_round)? {
                if let Ok(commit) = Signed::<Commit>::from_bytes(&bytes) {
                    pending.push(commit);
                }
            }
            tracing::info!(
                round = next_round,
                commits = pending.len(),
                "resuming the open round"
            );
            Some(signed)
        }
        None => None,
    };
    // Nodes admitted under an earlier config are held to this one: a node
    // revoked (or an org dropped) while the coordinator was down gets no
    // more work, not even in the round restored above.
    for node in &ledger_nodes {
        let Ok(id) = node.node.parse::<NodeId>() else {
            continue;
        };
        let org = node.org.as_deref().and_then(|o| o.parse::<OrgId>().ok());
        let certificate = node
            .certificate
            .as_deref()
            .and_then(|c| c.parse::<Hash>().ok());
        if let Some(reason) =
            resolved
                .admission
                .refuses_known(&id, org.as_ref(), certificate.as_ref())
        {
            tracing::warn!(node = %id, "no longer admitted: {reason}");
            rounds.expel(&id);
        }
    }
    let run_config = RunConfig {
        run_id: config.run_id.clone(),
        model_config_json: serde_json::to_string(&resolved.model).unwrap_or_default(),
        codec: resolved.codec.to_string(),
        inner_steps: config.inner_steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        inner_lr: config.inner_lr,
        outer_lr: config.outer_lr,
        outer_momentum: config.outer_momentum,
        aggregation: resolved.aggregation.to_string(),
        total_rounds: config.total_rounds,
        dataset: dataset.train.clone(),
        held_out: dataset.held_out.clone(),
    };
    // The run config nodes are given, kept for the run record
    // (`crate::record`): the same every start, since the ledger binds the run.
    let run_config_path = config.data_dir.join(crate::record::RUN_CONFIG_FILE);
    match serde_json::to_vec_pretty(&run_config) {
        // Temp file then rename: a crash leaves the old file or the new one.
        Ok(text) => {
            let tmp = run_config_path.with_extension("json.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &run_config_path))
                .map_err(|source| CoordinatorError::Io {
                    path: run_config_path.clone(),
                    source,
                })?
        }
        Err(e) => tracing::warn!("could not write the run config for the record: {e}"),
    }
    Ok(Prepared {
        store,
        dataset,
        heldout,
        ledger: Arc::new(Mutex::new(ledger)),
        ledger_nodes,
        state,
        checkpoint,
        state_ref,
        rounds,
        open_plan: open_signed,
        pending,
        run_config,
        unverified,
    })
}

/// The state blobs a closed round left, as a reference.
fn resume_reference(row: &RoundRow) -> Result<CheckpointRef, CoordinatorError> {
    Ok(CheckpointRef {
        round: row.round + 1,
        blob: parse_hash(&row.params_blob, "params blob")?,
        bytes: 0,
        params_hash: parse_hash(&row.next_params_hash, "params hash")?,
        optimizer_blob: parse_hash(&row.optimizer_blob, "optimizer blob")?,
        optimizer_bytes: 0,
    })
}

fn checkpoint_row(c: &CheckpointRef) -> CheckpointRow {
    CheckpointRow {
        round: c.round,
        blob: c.blob.to_hex(),
        bytes: c.bytes,
        params_hash: c.params_hash.to_hex(),
        optimizer_blob: c.optimizer_blob.to_hex(),
        optimizer_bytes: c.optimizer_bytes,
    }
}

fn checkpoint_ref(row: &CheckpointRow) -> Result<CheckpointRef, CoordinatorError> {
    Ok(CheckpointRef {
        round: row.round,
        blob: parse_hash(&row.blob, "checkpoint blob")?,
        bytes: row.bytes,
        params_hash: parse_hash(&row.params_hash, "checkpoint params hash")?,
        optimizer_blob: parse_hash(&row.optimizer_blob, "optimizer blob")?,
        optimizer_bytes: row.optimizer_bytes,
    })
}

async fn add_node_addresses(client: &Client, node: &str, addrs: &[String]) {
    let Ok(id) = node.parse::<NodeId>() else {
        return;
    };
    let Ok(peer) = id.0.to_peer_id() else { return };
    let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if !addrs.is_empty() {
        let _ = client.add_addresses(peer, addrs).await;
    }
}

/// Results that come back to the actor loop from its tasks.
enum Internal {
    Checked {
        round: u64,
        node: NodeId,
        result: Result<(), RejectReason>,
    },
    Closed(Box<Result<CloseDone, CoordinatorError>>),
}

struct CloseDone {
    round: u64,
    state: GlobalState,
    manifest: Signed<Manifest>,
    closed: Closed,
    checkpoint: Option<CheckpointRef>,
    /// The blobs of θ_{round+1} and its momentum (written every round).
    state_ref: CheckpointRef,
    /// Time the close spent writing the ledger, and writing θ and signing.
    ledger_time: Duration,
    publish_time: Duration,
}

struct Service {
    config: CoordinatorConfig,
    resolved: Resolved,
    key: SigningKey,
    run_config: RunConfig,
    rounds: Rounds,
    ledger: Arc<Mutex<Ledger>>,
    store: BlobStore,
    dataset: Arc<Dataset>,
    heldout: Option<Arc<Vec<u16>>>,
    /// θ_round; `None` while a close is computing θ_{round+1} from it.
    state: Option<GlobalState>,
    checkpoint: CheckpointRef,
    /// The blobs of θ_round as written for restarts.
    state_ref: CheckpointRef,
    open_plan: Option<Signed<RoundPlan>>,
    net: Client,
    events: broadcast::Sender<CoordinatorEvent>,
    metrics: Arc<Metrics>,
    traffic: CoordinatorTraffic,
    /// Per-peer limits on joins and commits (`crate::ratelimit`).
    join_limiter: crate::ratelimit::PeerLimiter,
    commit_limiter: crate::ratelimit::PeerLimiter,
    /// Sketches of the updates accepted in the last `REPLAY_WINDOW` rounds
    /// (rebuilt from nothing on a restart: a replay of a round before the
    /// restart is left to the other checks).
    recent: Arc<Vec<verify::RecentUpdate>>,
    /// Every node's credit since its last passed spot check (the manifests
    /// folded), what a failed check voids.
    unverified: Arc<Unverified>,
    live: Arc<RwLock<LiveStatus>>,
    internal_tx: mpsc::Sender<Internal>,
    finished_at: Option<tokio::time::Instant>,
    /// Which refusals reach the ledger (deduplicated, capped per round).
    refusals: crate::refusals::RefusalLog,
    /// The coordinator and recently active nodes, for welcomes and plans.
    bootstrap: crate::bootstrap::BootstrapBook,
}

impl Service {
    async fn run(
        mut self,
        mut net_events: mpsc::Receiver<network::Event>,
        mut internal: mpsc::Receiver<Internal>,
        pending: Vec<Signed<Commit>>,
        shutdown: CancellationToken,
        children: CancellationToken,
    ) -> Result<RunSummary, CoordinatorError> {
        self.publish_reputation();
        for signed in pending {
            self.on_commit(signed, None).await;
        }
        if self.rounds.is_finished() {
            self.finished_at = Some(tokio::time::Instant::now());
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let linger = Duration::from_secs_f64(self.config.linger_secs.max(0.0));
        let result = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(message) = internal.recv() => {
                    if let Err(e) = self.on_internal(message).await {
                        break Err(e);
                    }
                }
                event = net_events.recv() => match event {
                    Some(network::Event::Request { peer, observed_ip, request, channel }) => {
                        let response = self.on_request(peer, observed_ip, request).await;
                        let _ = self.net.respond(channel, response).await;
                    }
                    None => break Err(CoordinatorError::Network(NetworkError::Stopped)),
                },
                _ = ticker.tick() => {
                    if self.finished_at.is_some_and(|at| at.elapsed() >= linger) {
                        break Ok(());
                    }
                    if let Err(e) = self.on_tick().await {
                        break Err(e);
                    }
                }
            }
        };
        children.cancel();
        let ledger = self.ledger.clone();
        let summary = tokio::task::spawn_blocking(move || match ledger.lock() {
            Ok(l) => RunSummary::from_ledger(&l).map_err(CoordinatorError::from),
            Err(_) => Err(CoordinatorError::Internal("ledger lock poisoned".into())),
        })
        .await
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        result?;
        summary.map(|mut summary| {
            let update_bytes = summary.network.update_bytes;
            summary.network = NetworkTotals {
                update_bytes,
                ..self.traffic.totals()
            };
            summary
        })
    }

    fn with_ledger<T>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError>,
    ) -> Result<T, CoordinatorError> {
        let started = std::time::Instant::now();
        let ledger = self
            .ledger
            .lock()
            .map_err(|_| CoordinatorError::Internal("ledger lock poisoned".into()))?;
        let out = f(&ledger);
        self.metrics.stages.add(Stage::Ledger, started.elapsed());
        Ok(out?)
    }

    /// Records a refusal of an authenticated sender in the ledger, once per
    /// sender and reason a round and within the per-round cap
    /// (`crate::refusals`); anything else is only counted in `/metrics`.
    /// `sender` is `None` when the sender could not be authenticated.
    fn refuse(
        &mut self,
        round: Option<u64>,
        sender: Option<&PublicKey>,
        reason: &'static str,
        detail: String,
    ) {
        let claimed = match sender {
            Some(key)
                if self
                    .refusals
                    .should_record(self.rounds.current_round(), key, reason) =>
            {
                Some(key)
            }
            _ => {
                self.metrics
                    .refusals_unrecorded
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(reason, "refusal counted, not recorded: {detail}");
                return;
            }
        };
        let row = RefusalRow {
            at_ms: now_ms(),
            round,
            claimed_node: claimed.map(|k| k.to_hex()),
            reason: reason.to_string(),
            detail,
        };
        if let Err(e) = self.with_ledger(|l| l.record_refusal(&row)) {
            tracing::warn!("could not record a refusal: {e}");
        }
    }

    /// Publishes every node's reputation to the API.
    fn publish_reputation(&self) {
        let views = self.rounds.reputations();
        if let Ok(mut live) = self.live.write() {
            live.reputation = views;
        }
    }

    fn update_live(&self) {
        let phase = if self.rounds.is_finished() {
            "finished"
        } else if self.rounds.open_plan().is_some() {
            "open"
        } else if self.state.is_none() {
            "closing"
        } else {
            "waiting"
        };
        let active = self.rounds.active_nodes().len();
        self.metrics
            .current_round
            .store(self.rounds.current_round(), Ordering::Relaxed);
        self.metrics
            .active_nodes
            .store(active as u64, Ordering::Relaxed);
        if let Ok(mut live) = self.live.write() {
            live.current_round = self.rounds.current_round();
            live.phase = phase.into();
            live.active_nodes = active;
            live.params_hash = self.rounds.params_hash().to_hex();
            live.head_manifest = self.rounds.head_manifest().to_hex();
        }
    }

    async fn on_tick(&mut self) -> Result<(), CoordinatorError> {
        for action in self.rounds.tick(now_ms()) {
            match action {
                Action::PublishPlan(plan) => self.publish_plan(plan).await?,
                Action::CloseRound(close) => self.begin_close(close)?,
                Action::RunFinished => {}
            }
        }
        self.update_live();
        Ok(())
    }

    async fn publish_plan(&mut self, mut plan: RoundPlan) -> Result<(), CoordinatorError> {
        plan.bootstrap = self.bootstrap.peers(None);
        let signed = Signed::sign(&self.key, &plan)?;
        let bytes = signed.to_bytes()?;
        let round = plan.round;
        self.with_ledger(|l| l.record_plan(round, &bytes, plan.opened_at_ms))?;
        self.open_plan = Some(signed);
        let _ = self
            .net
            .publish(network::topic(&self.config.run_id, "plans"), bytes)
            .await;
        tracing::info!(round, nodes = plan.assignments.len(), "round opened");
        let _ = self.events.send(CoordinatorEvent::RoundOpened {
            round,
            nodes: plan.assignments.len(),
        });
        Ok(())
    }

    /// Answers one request; its time, less its ledger writes, is the
    /// admission stage's.
    async fn on_request(
        &mut self,
        peer: PeerId,
        observed_ip: Option<std::net::IpAddr>,
        request: CoordinatorRequest,
    ) -> CoordinatorResponse {
        let started = std::time::Instant::now();
        let ledger_before = self.metrics.stages.seconds(Stage::Ledger);
        let response = self.answer(peer, observed_ip, request).await;
        let ledger = self.metrics.stages.seconds(Stage::Ledger) - ledger_before;
        let elapsed = started
            .elapsed()
            .saturating_sub(Duration::from_secs_f64(ledger.max(0.0)));
        self.metrics.stages.add(Stage::Admission, elapsed);
        response
    }

    async fn answer(
        &mut self,
        peer: PeerId,
        observed_ip: Option<std::net::IpAddr>,
        request: CoordinatorRequest,
    ) -> CoordinatorResponse {
        let peer_key = PublicKey::from_peer_id(&peer).ok();
        let limiter = match &request {
            CoordinatorRequest::Join(_) => Some(&mut self.join_limiter),
            CoordinatorRequest::Commit(_) => Some(&mut self.commit_limiter),
            _ => None,
        };
        if let Some(limiter) = limiter
            && !limiter.allow(peer, std::time::Instant::now())
        {
            self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return CoordinatorResponse::Refused {
                reason: format!(
                    "{}too many joins or commits from this peer; wait a minute",
                    crate::ratelimit::RETRY_LATER
                ),
            };
        }
        match request {
            CoordinatorRequest::Join(signed) => self.on_join(signed, peer_key, observed_ip).await,
            CoordinatorRequest::Commit(signed) => self.on_commit(signed, peer_key).await,
            CoordinatorRequest::Leave(signed) => match signed.verify(None) {
                Ok(leave)
                    if leave.run_id == self.config.run_id
                        && now_ms().abs_diff(leave.timestamp_ms)
                            <= admission::MAX_CLOCK_SKEW_MS =>
                {
                    self.rounds.leave(&NodeId(signed.signer));
                    tracing::info!(node = %NodeId(signed.signer).short(), "node left");
                    CoordinatorResponse::Ok
                }
                _ => CoordinatorResponse::Refused {
                    reason: "the leave notice is not valid for this run".into(),
                },
            },
            CoordinatorRequest::CurrentPlan => {
                if let Some(key) = peer_key {
                    // Polling for the plan shows the node is alive: it gets work again.
                    self.rounds.seen(&NodeId(key));
                }
                CoordinatorResponse::Plan(
                    self.open_plan
                        .clone()
                        .filter(|_| self.rounds.open_plan().is_some()),
                )
            }
            CoordinatorRequest::Manifest { round } => {
                let stored = self.with_ledger(|l| l.manifest(round));
                match stored {
                    Ok(Some(bytes)) => {
                        CoordinatorResponse::Manifest(Signed::from_bytes(&bytes).ok())
                    }
                    Ok(None) => CoordinatorResponse::Manifest(None),
                    Err(e) => {
                        tracing::warn!("reading manifest {round}: {e}");
                        CoordinatorResponse::Refused {
                            reason: "the coordinator could not read its ledger".into(),
                        }
                    }
                }
            }
        }
    }

    async fn on_join(
        &mut self,
        signed: Signed<barnraise_protocol::messages::Join>,
        peer_key: Option<PublicKey>,
        observed_ip: Option<std::net::IpAddr>,
    ) -> CoordinatorResponse {
        let now = now_ms();
        let admitted = match admission::admit(
            &signed,
            peer_key.as_ref(),
            &self.config.run_id,
            &self.resolved.admission,
            now,
        ) {
            Ok(a) => a,
            Err(refusal) => {
                self.metrics.join_refusals.fetch_add(1, Ordering::Relaxed);
                // Only a join its sender really signed can be held against it.
                let authenticated = !matches!(
                    refusal,
                    admission::JoinRefusal::BadSignature | admission::JoinRefusal::NotTheSender
                );
                self.refuse(
                    None,
                    authenticated.then_some(&signed.signer),
                    "join-refused",
                    refusal.to_string(),
                );
                tracing::info!(signer = %signed.signer.to_hex().get(..12).unwrap_or(""), "join refused: {refusal}");
                return CoordinatorResponse::Refused {
                    reason: refusal.to_string(),
                };
            }
        };
        let node = admitted.node;
        let workers = admitted.join.workers.len() as u32;
        let row = NodeRow {
            node: node.to_string(),
            org: admitted.certificate.as_ref().map(|c| c.org.to_string()),
            org_name: admitted.certificate.as_ref().map(|c| c.org_name.clone()),
            agent: admitted.join.agent.clone(),
            workers,
            listen_addrs: admitted.join.listen_addrs.clone(),
            first_seen_ms: now,
            last_seen_ms: now,
            certificate: admitted
                .join
                .certificate
                .as_ref()
                .map(|c| barnraise_protocol::certificate::certificate_id(c).to_hex()),
        };
        if let Err(e) = self.with_ledger(|l| l.upsert_node(&row)) {
            tracing::error!("recording a node: {e}");
            return CoordinatorResponse::Refused {
                reason: "the coordinator could not record the join; retry".into(),
            };
        }
        add_node_addresses(&self.net, &row.node, &row.listen_addrs).await;
        self.bootstrap.joined(node, &row.listen_addrs, observed_ip);
        let was_member = self.rounds.is_member(&node);
        self.rounds.join(node, workers);
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        if !was_member {
            tracing::info!(node = %node.short(), agent = %row.agent, "node joined");
            let _ = self.events.send(CoordinatorEvent::NodeJoined { node });
        }
        let welcome = Welcome {
            node,
            config: self.run_config.clone(),
            current_round: self.rounds.current_round(),
            params_hash: self.rounds.params_hash(),
            checkpoint: Some(self.checkpoint.clone()),
            head_manifest: self.rounds.head_manifest(),
            bootstrap: self.bootstrap.peers(Some(&node)),
        };
        self.update_live();
        match Signed::sign(&self.key, &welcome) {
            Ok(signed) => CoordinatorResponse::Welcome(signed),
            Err(e) => CoordinatorResponse::Refused {
                reason: format!("the coordinator could not sign its welcome: {e}"),
            },
        }
    }

    /// Stage 1 of verification, then the fetch. `peer_key` is `None` for
    /// commits replayed from the ledger on a restart.
    async fn on_commit(
        &mut self,
        signed: Signed<Commit>,
        peer_key: Option<PublicKey>,
    ) -> CoordinatorResponse {
        let from_network = peer_key.is_some();
        if from_network {
            self.metrics.commits.fetch_add(1, Ordering::Relaxed);
        }
        let (node, commit, body) = match verify::open_commit(&signed) {
            Ok(opened) => opened,
            Err(reason) => {
                self.metrics.rejected(reason.code());
                // Its signature did not verify: nobody to hold it against.
                self.refuse(
                    Some(self.rounds.current_round()),
                    None,
                    reason.code(),
                    "commit envelope refused".into(),
                );
                return CoordinatorResponse::Refused {
                    reason: format!(
                        "{}: the commit's signature or encoding is invalid",
                        reason.code()
                    ),
                };
            }
        };
        self.rounds.seen(&node);
        match self.rounds.commit(node, &commit, body) {
            CommitOutcome::Accepted { round } => {
                if from_network {
                    let stored =
                        signed
                            .to_bytes()
                            .map_err(CoordinatorError::from)
                            .and_then(|bytes| {
                                self.with_ledger(|l| {
                                    l.record_commit(round, &node.to_string(), &bytes, now_ms())
                                })
                            });
                    if let Err(e) = stored {
                        // The node is told it was accepted only once the commit is durable.
                        tracing::error!("storing a commit: {e}");
                        self.rounds
                            .update_checked(round, &node, Err(RejectReason::NotServed));
                        return CoordinatorResponse::Refused {
                            reason: "the coordinator could not store the commit".into(),
                        };
                    }
                }
                self.spawn_fetch(round, node, commit);
                CoordinatorResponse::CommitAccepted { round }
            }
            CommitOutcome::AlreadyHave { round } => CoordinatorResponse::CommitAccepted { round },
            CommitOutcome::Rejected { reason, in_round } => {
                self.metrics.rejected(reason.code());
                if in_round.is_none() {
                    // A commit from a node that never joined is signed by a
                    // key anyone can make: counted, not recorded.
                    let member = reason != RejectReason::UnknownNode;
                    self.refuse(
                        Some(commit.round),
                        member.then_some(&node.0),
                        reason.code(),
                        format!("commit for round {}", commit.round),
                    );
                }
                tracing::info!(node = %node.short(), round = commit.round, reason = reason.code(), "commit refused");
                CoordinatorResponse::Refused {
                    reason: format!(
                        "{}: commit for round {} refused",
                        reason.code(),
                        commit.round
                    ),
                }
            }
        }
    }

    fn spawn_fetch(&self, round: u64, node: NodeId, commit: Commit) {
        let client = self.net.clone();
        let store = self.store.clone();
        let tx = self.internal_tx.clone();
        let metrics = self.metrics.clone();
        let codec = self.resolved.codec.codec_at(round);
        let params = self.resolved.model.params_count();
        let deadline_ms = self
            .rounds
            .open_deadline_ms()
            .unwrap_or(0)
            .max(now_ms() + 1000);
        // The workers drawn for a spot check: their starting states are
        // fetched with the update, and replayed when the round closes.
        let verify = &self.config.verify;
        let drawn: Vec<(u32, Hash)> = crate::spot::drawn_shares(
            &self.key,
            &self.config.run_id,
            &node,
            &commit,
            verify.spot_check_fraction,
        )
        .into_iter()
        .take(verify.spot_check_max)
        .map(|(_, share)| (share.index, share.state_hash))
        .collect();
        let state_bytes = barnraise_trainer::Trainer::optimizer_state_len(params) as u64;
        tokio::spawn(async move {
            let mut result = fetch_and_check(
                &client,
                &store,
                &metrics,
                node,
                &commit,
                codec,
                params,
                deadline_ms,
            )
            .await;
            for (worker, hash) in drawn {
                if result.is_err() {
                    break;
                }
                result = fetch_state(&client, &store, node, hash, state_bytes, deadline_ms)
                    .await
                    .map_err(|reason| {
                        tracing::info!(
                            node = %node.short(),
                            round,
                            worker,
                            "spot check: the worker's state was not served ({})",
                            reason.code()
                        );
                        RejectReason::SpotCheck { worker }
                    });
            }
            if let Err(reason) = &result {
                tracing::info!(node = %node.short(), round, reason = reason.code(), "update rejected");
            }
            let _ = tx
                .send(Internal::Checked {
                    round,
                    node,
                    result,
                })
                .await;
        });
    }

    async fn on_internal(&mut self, message: Internal) -> Result<(), CoordinatorError> {
        match message {
            Internal::Checked {
                round,
                node,
                result,
            } => {
                self.rounds.update_checked(round, &node, result);
                Ok(())
            }
            Internal::Closed(done) => {
                let done = (*done)?;
                self.finish_close(done).await
            }
        }
    }

    fn begin_close(&mut self, close: CloseRound) -> Result<(), CoordinatorError> {
        let Some(state) = self.state.take() else {
            return Err(CoordinatorError::Internal(
                "a round closed while another was closing".into(),
            ));
        };
        self.open_plan = None;
        let job = CloseJob {
            config: self.config.clone(),
            resolved: self.resolved.clone(),
            key: self.key.clone(),
            store: self.store.clone(),
            ledger: self.ledger.clone(),
            dataset: self.dataset.clone(),
            heldout: self.heldout.clone(),
            state,
            close,
            recent: self.recent.clone(),
            unverified: self.unverified.clone(),
            run_config: self.run_config.clone(),
        };
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || job.run())
                .await
                .unwrap_or_else(|e| {
                    Err(CoordinatorError::Internal(format!("round close task: {e}")))
                });
            let _ = tx.send(Internal::Closed(Box::new(result))).await;
        });
        Ok(())
    }

    /// Deletes what the retention policy no longer keeps now that round
    /// `closed` has closed (`crate::retention`): the superseded state
    /// `old`, checkpoints past the newest `keep_checkpoints` (never θ_0),
    /// and with `keep_update_rounds` an old round's updates. Shards, the
    /// current state `keep` and kept checkpoints are never touched.
    fn apply_retention(
        &mut self,
        closed: u64,
        old: &[Hash],
        keep: &[Hash],
    ) -> Result<(), CoordinatorError> {
        let policy = &self.config.retention;
        let checkpoints = self.with_ledger(|l| l.checkpoints())?;
        let rounds: Vec<u64> = checkpoints.iter().map(|c| c.round).collect();
        let dropped = crate::retention::checkpoints_to_drop(&rounds, policy.keep_checkpoints);
        let mut protected: std::collections::HashSet<Hash> = keep.iter().copied().collect();
        protected.extend(self.dataset.train.iter().map(|s| s.hash));
        let mut doomed: Vec<Hash> = Vec::new();
        for c in &checkpoints {
            let blobs = [
                parse_hash(&c.blob, "checkpoint blob")?,
                parse_hash(&c.optimizer_blob, "optimizer blob")?,
            ];
            if dropped.contains(&c.round) {
                doomed.extend(blobs);
            } else {
                protected.extend(blobs);
            }
        }
        doomed.extend_from_slice(old);
        if let Some(round) = crate::retention::update_round_to_drop(policy, closed, &rounds) {
            for row in self.with_ledger(|l| l.updates(round))? {
                if let Some(hash) = row.update_hash.as_deref().and_then(|h| h.parse().ok()) {
                    doomed.push(hash);
                }
            }
        }
        let (mut files, mut bytes) = (0u64, 0u64);
        for hash in doomed.iter().filter(|h| !protected.contains(h)) {
            let freed = self.store.remove(hash)?;
            if freed > 0 {
                files += 1;
                bytes += freed;
            }
        }
        if files > 0 {
            tracing::info!(
                round = closed,
                files,
                bytes,
                "retention: deleted blobs the policy no longer keeps"
            );
        }
        Ok(())
    }

    async fn finish_close(&mut self, done: CloseDone) -> Result<(), CoordinatorError> {
        let stages = &self.metrics.stages;
        let t = &done.closed.timings;
        stages.add(Stage::Verify, t.verify);
        stages.add(Stage::Probe, t.probe);
        stages.add(Stage::Spot, t.spot);
        stages.add(Stage::Aggregate, t.aggregate);
        stages.add(Stage::Ledger, done.ledger_time);
        stages.add(Stage::Publish, done.publish_time);
        self.metrics
            .copy_comparisons
            .fetch_add(t.comparisons, Ordering::Relaxed);
        let published = std::time::Instant::now();
        let manifest_hash = done.manifest.body_hash();
        let actions = self
            .rounds
            .round_closed(done.round, done.state.params_hash(), manifest_hash)
            .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        // Updates and superseded state stay on disk (nodes may resync from
        // them) but leave memory, so memory does not grow with the run.
        let m = &done.closed.manifest;
        for accepted in &m.accepted {
            self.bootstrap.active(&accepted.node);
        }
        use crate::reputation::Outcome;
        let outcomes = crate::reputation::round_outcomes(
            m.accepted
                .iter()
                .map(|a| (a.node, Outcome::Accepted))
                .chain(
                    m.rejected
                        .iter()
                        .map(|r| (r.node, Outcome::of_rejection(&r.reason))),
                )
                .chain(m.missing.iter().map(|n| (*n, Outcome::Missing))),
        );
        for (node, outcome) in outcomes {
            self.rounds.record_outcome(done.round, node, outcome);
        }
        self.publish_reputation();
        for hash in m
            .accepted
            .iter()
            .map(|a| a.update_hash)
            .chain(m.rejected.iter().filter_map(|r| r.update_hash))
        {
            self.store.forget(&hash);
        }
        let old = [
            self.state_ref.blob,
            self.state_ref.optimizer_blob,
            self.checkpoint.blob,
            self.checkpoint.optimizer_blob,
        ];
        self.state = Some(done.state);
        self.state_ref = done.state_ref;
        if let Some(c) = done.checkpoint {
            self.checkpoint = c;
        }
        let keep = [
            self.state_ref.blob,
            self.state_ref.optimizer_blob,
            self.checkpoint.blob,
            self.checkpoint.optimizer_blob,
        ];
        for hash in old.iter().filter(|h| !keep.contains(h)) {
            self.store.forget(hash);
        }
        self.traffic.set_state_blobs(&keep);
        if let Err(e) = self.apply_retention(done.round, &old, &keep) {
            // Disk use grows until the next close retries; nothing is lost.
            tracing::warn!("retention: {e}");
        }
        let oldest = done.round.saturating_sub(REPLAY_WINDOW - 1);
        let recent: Vec<verify::RecentUpdate> = self
            .recent
            .iter()
            .filter(|r| r.round >= oldest)
            .cloned()
            .chain(done.closed.sketches.iter().cloned())
            .collect();
        self.recent = Arc::new(recent);
        let m = &done.closed.manifest;
        if let Err(e) = Arc::make_mut(&mut self.unverified).apply(m) {
            // The close computed the voids from this very fold; a mismatch
            // is a bug, and the ledger's credit stands as the manifest says.
            tracing::error!("clawback windows: {e}");
        }
        self.metrics.rounds_closed.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .updates_accepted
            .fetch_add(m.accepted.len() as u64, Ordering::Relaxed);
        self.metrics
            .tokens_accepted
            .fetch_add(m.accepted.iter().map(|a| a.tokens).sum(), Ordering::Relaxed);
        self.metrics
            .update_bytes_received
            .fetch_add(done.closed.bytes_received, Ordering::Relaxed);
        for r in &m.rejected {
            self.metrics.rejected(r.reason.code());
        }
        Metrics::set_f64(&self.metrics.last_train_loss, done.closed.mean_loss);
        if done.closed.eval_loss.is_some() {
            Metrics::set_f64(&self.metrics.last_eval_loss, done.closed.eval_loss);
        }
        if let Ok(bytes) = done.manifest.to_bytes() {
            let _ = self
                .net
                .publish(network::topic(&self.config.run_id, "manifests"), bytes)
                .await;
        }
        self.metrics.stages.add(Stage::Publish, published.elapsed());
        tracing::info!(
            round = done.round,
            accepted = m.accepted.len(),
            rejected = m.rejected.len(),
            missing = m.missing.len(),
            train_loss = ?done.closed.mean_loss,
            eval_loss = ?done.closed.eval_loss,
            "round closed"
        );
        let _ = self.events.send(CoordinatorEvent::RoundClosed {
            round: done.round,
            accepted: m.accepted.len(),
            rejected: m.rejected.clone(),
            missing: m.missing.len(),
            mean_loss: done.closed.mean_loss,
            eval_loss: done.closed.eval_loss,
            params_hash: m.next_params_hash,
        });
        if actions.contains(&Action::RunFinished) {
            tracing::info!("run finished");
            let _ = self.events.send(CoordinatorEvent::RunFinished);
            self.finished_at = Some(tokio::time::Instant::now());
        }
        self.update_live();
        Ok(())
    }
}

/// How many times a node may answer "not found" for its own committed update
/// before it counts as not serving it (connection failures are retried until
/// the deadline).
const DEFINITE_REFUSALS: u32 = 3;

/// A blob the node `node` committed to, from the store or else from the
/// node itself, until `deadline_ms`. A node that offers other bytes than it
/// committed to is `HashMismatch`; one that keeps refusing, or runs out the
/// clock, `NotServed`.
async fn fetch_from_author(
    client: &Client,
    store: &BlobStore,
    node: NodeId,
    hash: Hash,
    bytes: u64,
    deadline_ms: u64,
) -> Result<Arc<Vec<u8>>, RejectReason> {
    if let Ok(Some(held)) = store.get(&hash) {
        return Ok(held);
    }
    let peer = node.0.to_peer_id().map_err(|_| RejectReason::UnknownNode)?;
    let mut attempt = 0u32;
    loop {
        let left = deadline_ms.saturating_sub(now_ms());
        if left == 0 {
            return Err(RejectReason::NotServed);
        }
        let fetched = tokio::time::timeout(
            Duration::from_millis(left),
            network::fetch_blob(client, peer, hash, bytes),
        )
        .await;
        match fetched {
            Ok(Ok(fetched)) => return Ok(Arc::new(fetched)),
            // It offers other bytes than it committed to.
            Ok(Err(network::FetchError::WrongSize { .. })) => {
                return Err(RejectReason::HashMismatch);
            }
            // A node stores its blobs before committing; one that keeps
            // saying it has none will not serve them.
            Ok(Err(network::FetchError::NotFound | network::FetchError::Refused(_)))
                if attempt + 1 >= DEFINITE_REFUSALS =>
            {
                return Err(RejectReason::NotServed);
            }
            Ok(Err(e)) => {
                attempt += 1;
                tracing::debug!(node = %node.short(), attempt, "fetching {}: {e}", hash.short());
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8)))).await;
            }
            Err(_) => return Err(RejectReason::NotServed),
        }
    }
}

/// Fetches a drawn worker's starting optimizer state and keeps it for the
/// replay when the round closes.
async fn fetch_state(
    client: &Client,
    store: &BlobStore,
    node: NodeId,
    hash: Hash,
    bytes: u64,
    deadline_ms: u64,
) -> Result<(), RejectReason> {
    let state = fetch_from_author(client, store, node, hash, bytes, deadline_ms).await?;
    if Hash::of(&state) != hash {
        return Err(RejectReason::HashMismatch);
    }
    store.put(state).map(|_| ()).map_err(|e| {
        tracing::error!("storing a worker state: {e}");
        RejectReason::NotServed
    })
}

/// Fetches a committed update (unless the store already has it), then runs
/// stage 2 on a blocking thread and keeps the payload if it passes.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_check(
    client: &Client,
    store: &BlobStore,
    metrics: &Arc<Metrics>,
    node: NodeId,
    commit: &Commit,
    codec: barnraise_protocol::codec::CodecConfig,
    params: usize,
    deadline_ms: u64,
) -> Result<(), RejectReason> {
    // The exact size is known from the codec: refuse anything else before fetching a byte.
    if commit.update_bytes != codec.encoded_len(params) as u64 {
        return Err(RejectReason::WrongLength);
    }
    let payload = fetch_from_author(
        client,
        store,
        node,
        commit.update_hash,
        commit.update_bytes,
        deadline_ms,
    )
    .await?;
    let checked = {
        let payload = payload.clone();
        let commit = commit.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || {
            metrics.stages.time(Stage::Fetch, || {
                verify::check_payload(&payload, &commit, codec, params).map(|_| ())
            })
        })
        .await
        .unwrap_or(Err(RejectReason::undecodable("the check crashed")))
    };
    checked?;
    let stored = metrics.stages.time(Stage::Fetch, || store.put(payload));
    if let Err(e) = stored {
        tracing::error!("storing an update: {e}");
        return Err(RejectReason::NotServed);
    }
    Ok(())
}

/// Read-only ledger connections the HTTP API reads through.
const HTTP_READERS: usize = 4;

/// Peers whose request budgets are remembered at once.
pub const RATE_LIMITED_PEERS: usize = 100_000;

/// Rounds whose accepted updates a new update is checked against for replay.
pub const REPLAY_WINDOW: u64 = 8;

/// The run's sketch seed: every round's sketches compare with each other.
fn sketch_seed(run_id: &str) -> u64 {
    let hash = Hash::of(format!("barnraise sketch {run_id}").as_bytes());
    u64::from_le_bytes(hash.0[..8].try_into().unwrap_or([0; 8]))
}

/// A round close, owned, for a blocking thread.
struct CloseJob {
    config: CoordinatorConfig,
    resolved: Resolved,
    key: SigningKey,
    store: BlobStore,
    ledger: Arc<Mutex<Ledger>>,
    dataset: Arc<Dataset>,
    heldout: Option<Arc<Vec<u16>>>,
    state: GlobalState,
    close: CloseRound,
    recent: Arc<Vec<verify::RecentUpdate>>,
    unverified: Arc<Unverified>,
    run_config: RunConfig,
}

impl CloseJob {
    fn run(self) -> Result<CloseDone, CoordinatorError> {
        let round = self.close.plan.round;
        let mut payloads = HashMap::new();
        for c in &self.close.candidates {
            if let Some(bytes) = self.store.get(&c.commit.update_hash)? {
                payloads.insert(c.commit.update_hash, bytes);
            }
        }
        // States fetched for spot checks are read from the store only for
        // the shares the round replays (a missing one fails its check).
        let state_of = |hash: &Hash| self.store.get(hash).ok().flatten();
        let ctx = CloseContext {
            spot: Some(crate::close::SpotContext {
                key: &self.key,
                run: &self.run_config,
                state: &state_of,
                unverified: &self.unverified,
            }),
            model: &self.resolved.model,
            codec: self.resolved.codec.codec_at(round),
            rule: &self.resolved.aggregation,
            verify: &self.config.verify,
            seq_len: self.config.seq_len as usize,
            dataset: &self.dataset.train,
            shard_tokens: &self.dataset.tokens,
            heldout: self.heldout.as_deref().map(|v| v.as_slice()),
            flops_per_token: self
                .resolved
                .model
                .flops_per_token_at(self.config.seq_len as usize),
            sketch_seed: sketch_seed(&self.config.run_id),
            recent: &self.recent,
        };
        let mut state = self.state;
        let closed = close::close_round(
            &ctx,
            &self.close,
            &self.config.run_id,
            &payloads,
            &mut state.theta,
            &mut state.optimizer,
        )?;
        // The replays are done and their numbers are in the ledger rows;
        // the fetched states (8 bytes per parameter each) are not kept. A
        // share names its state by hash, so only a blob of a state's exact
        // size is deleted: a share naming a shard or a checkpoint must not
        // make the coordinator delete it.
        let state_len =
            barnraise_trainer::Trainer::optimizer_state_len(self.resolved.model.params_count())
                as u64;
        for c in &self.close.candidates {
            for share in &c.commit.shares {
                if self.store.size(&share.state_hash) != Some(state_len) {
                    continue;
                }
                if let Err(e) = self.store.remove(&share.state_hash) {
                    tracing::warn!(
                        "could not delete a spot-checked state {}: {e}",
                        share.state_hash.short()
                    );
                }
            }
        }
        state.round = round + 1;
        let started = std::time::Instant::now();
        let reference = state.save(&self.resolved.model, &self.config.run_id, &self.store)?;
        let manifest = Signed::sign(&self.key, &closed.manifest)?;
        let manifest_bytes = manifest.to_bytes()?;
        let publish_time = started.elapsed();
        let published = state.round.is_multiple_of(self.config.checkpoint_every)
            || state.round >= self.config.total_rounds;
        let checkpoint = published.then(|| reference.clone());
        let m = &closed.manifest;
        let record = RoundRecord {
            row: RoundRow {
                round,
                opened_ms: self.close.plan.opened_at_ms,
                closed_ms: self.close.closed_at_ms,
                base_params_hash: m.base_params_hash.to_hex(),
                next_params_hash: m.next_params_hash.to_hex(),
                manifest_hash: manifest.body_hash().to_hex(),
                params_blob: reference.blob.to_hex(),
                optimizer_blob: reference.optimizer_blob.to_hex(),
                accepted: m.accepted.len() as u64,
                rejected: m.rejected.len() as u64,
                missing: m.missing.len() as u64,
                mean_loss: closed.mean_loss,
                eval_loss: closed.eval_loss,
                bytes_received: closed.bytes_received,
            },
            manifest: manifest_bytes,
            updates: closed.updates.clone(),
            checkpoint: checkpoint.as_ref().map(checkpoint_row),
            voided: m
                .voided
                .iter()
                .map(|v| (v.node.to_string(), v.from_round))
                .collect(),
        };
        let started = std::time::Instant::now();
        {
            let mut ledger = self
                .ledger
                .lock()
                .map_err(|_| CoordinatorError::Internal("ledger lock poisoned".into()))?;
            ledger.close_round(&record)?;
        }
        let ledger_time = started.elapsed();
        Ok(CloseDone {
            ledger_time,
            publish_time,
            round,
            state,
            manifest,
            closed,
            checkpoint,
            state_ref: reference,
        })
    }
}
