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
    RoundPlan, RunConfig, UpdateNotice, Welcome,
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

mod closing;
mod deferred;
mod early;
mod fetch;
mod requests;
mod startup;

pub use startup::start;

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

/// Results that come back to the actor loop from its tasks.
enum Internal {
    Checked {
        round: u64,
        node: NodeId,
        /// The update's hash and size, announced when it passed
        /// (`Service::announce_update`).
        update: (Hash, u64),
        result: Result<(), RejectReason>,
        /// Until when a round that could close waits for the update's
        /// drawn states, still arriving (`Rounds::states_pending`).
        states_until_ms: Option<u64>,
    },
    /// The drawn states of `node`'s update of `round`, fetched or not,
    /// when they were not waited for (`deferred`).
    StatesIn {
        round: u64,
        node: NodeId,
        results: Vec<(
            barnraise_protocol::workers::WorkerShare,
            Result<(), RejectReason>,
        )>,
    },
    /// A deferred spot check's replay; None if it could not run.
    DeferredReplayed {
        key: (u64, NodeId, u32),
        settled: Option<close::Settled>,
    },
    Closed(Box<Result<CloseDone, CoordinatorError>>),
    /// θ_{round+1}'s held-out loss, evaluated after round's manifest went out.
    Evaluated {
        round: u64,
        eval_loss: f64,
        took: Duration,
    },
}

struct CloseDone {
    round: u64,
    state: GlobalState,
    manifest: Signed<Manifest>,
    closed: Closed,
    checkpoint: Option<CheckpointRef>,
    /// The blobs of θ_{round+1} and its momentum (written every round).
    state_ref: CheckpointRef,
    /// θ_{round+1} for the next round's early checks, copied on the close's
    /// blocking thread.
    shared_theta: Arc<Vec<f32>>,
    /// The closed round's assignments (`crate::spot::PrevRound`).
    assignments: Vec<barnraise_protocol::messages::Assignment>,
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
    /// The held-out evaluation of the last closed round's θ, running while
    /// nodes train the next round; the next close waits for it.
    eval_task: Option<JoinHandle<()>>,
    /// The round close in flight (it writes the ledger off the actor's
    /// thread); shutdown waits for it, so nothing of a stopped coordinator
    /// writes the ledger after `Coordinator::wait` returns.
    close_task: Option<JoinHandle<()>>,
    /// The open round's updates probed, and drawn shares replayed, as
    /// they arrive.
    early: Option<early::EarlyChecks>,
    /// θ_round, shared with the early checks (copied off the service's
    /// thread: in the close job, or when the coordinator starts).
    shared_theta: Option<Arc<Vec<f32>>>,
    /// The last closed round, for replays of carried steps (overlapped
    /// rounds); `None` after a restart until a round closes.
    prev_round: Option<Arc<crate::spot::PrevRound>>,
    /// Spot checks whose states arrive after their round's close.
    deferred: deferred::Deferred,
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
        // Stopped between a close and its evaluation: evaluate it now.
        match self.ledger(|l| l.last_round()).await {
            Ok(Some(last)) if last.eval_loss.is_none() && last.accepted > 0 => {
                self.spawn_eval(last.round);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("reading the last round: {e}"),
        }
        for signed in pending {
            self.on_commit(signed, None).await;
        }
        if self.rounds.is_finished() {
            self.finished_at = Some(tokio::time::Instant::now());
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Validated finite and at least 0 (`CoordinatorConfig::resolve`); a
        // value past what a Duration holds lingers for ever.
        let linger =
            Duration::try_from_secs_f64(self.config.linger_secs.max(0.0)).unwrap_or(Duration::MAX);
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
        // A close in flight finishes and records its round (its result,
        // sent to the actor, is dropped with the receiver: a restart reads
        // the round from the ledger as closed). Stopping without waiting
        // let a restarted coordinator resume the round and record it a
        // second time, which the ledger refuses
        // (`coordinator_restart_resumes_and_counts_once`).
        drop(internal);
        if let Some(closing) = self.close_task.take() {
            let _ = closing.await;
        }
        // A held-out evaluation still running goes into the ledger before
        // the summary reads it (seconds at most).
        if let Some(evaluating) = self.eval_task.take() {
            let _ = evaluating.await;
        }
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

    /// Runs `f` on the ledger on tokio's blocking pool. SQLite commits with
    /// `synchronous = FULL` fsync; on the actor's async thread they would
    /// hold up the swarm's event loop too (docs/architecture.md, "Nothing
    /// blocks the runtime"). The actor still waits for the answer, so ledger
    /// writes keep their order.
    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, CoordinatorError> {
        let ledger = self.ledger.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let ledger = ledger
                .lock()
                .map_err(|_| CoordinatorError::Internal("ledger lock poisoned".into()))?;
            let out = f(&ledger);
            metrics.stages.add(Stage::Ledger, started.elapsed());
            Ok(out?)
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("ledger task: {e}")))?
    }

    /// Records a refusal of an authenticated sender in the ledger, once per
    /// sender and reason a round and within the per-round cap
    /// (`crate::refusals`); anything else is only counted in `/metrics`.
    /// `sender` is `None` when the sender could not be authenticated.
    async fn refuse(
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
        if let Err(e) = self.ledger(move |l| l.record_refusal(&row)).await {
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
        self.rounds
            .checks_out_until(self.deferred.checks_out_until());
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
        let (stored, opened_at_ms) = (bytes.clone(), plan.opened_at_ms);
        self.ledger(move |l| l.record_plan(round, &stored, opened_at_ms))
            .await?;
        self.open_plan = Some(signed);
        let input = self.shared_theta.clone().map(|theta| early::RoundInput {
            model: self.resolved.model.clone(),
            run: self.run_config.clone(),
            run_id: self.config.run_id.clone(),
            verify: self.config.verify.clone(),
            seq_len: self.config.seq_len as usize,
            codec: self.resolved.codec.codec_at(round),
            key: self.key.clone(),
            dataset: self.dataset.clone(),
            heldout: self.heldout.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            theta,
            prev: self.prev_round.clone(),
            probes: Default::default(),
        });
        self.early = Some(early::EarlyChecks::new(
            round,
            crate::pool::threads(self.config.verify.threads),
            input,
        ));
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
}

impl Service {
    /// Gossips that `node`'s update of the open round `round` passed stage
    /// 2, so that nodes fetch it while the round closes instead of after
    /// the manifest (docs/protocol.md, "Update notices"). Best effort: a
    /// notice lost costs a node only the wait it would have had anyway.
    async fn announce_update(
        &mut self,
        round: u64,
        node: NodeId,
        (update_hash, update_bytes): (Hash, u64),
    ) {
        if self.rounds.open_plan().map(|p| p.round) != Some(round) {
            return;
        }
        let notice = UpdateNotice {
            run_id: self.config.run_id.clone(),
            round,
            node,
            update_hash,
            update_bytes,
        };
        let bytes = match Signed::sign(&self.key, &notice).and_then(|s| s.to_bytes()) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(round, "could not sign an update notice: {e}");
                return;
            }
        };
        let _ = self
            .net
            .publish(network::topic(&self.config.run_id, "updates"), bytes)
            .await;
        self.metrics.update_notices.fetch_add(1, Ordering::Relaxed);
    }
}

/// Read-only ledger connections the HTTP API reads through.
const HTTP_READERS: usize = 4;

/// Peers whose request budgets are remembered at once.
pub const RATE_LIMITED_PEERS: usize = 100_000;

/// Rounds whose accepted updates a new update is checked against for replay.
pub const REPLAY_WINDOW: u64 = 8;
