//! Training our share of a round: the assigned shards are fetched and
//! decoded, the workers run their inner steps from θ_r, and their updates
//! are reduced to the node's one update (cluster mode averages them by
//! tokens). `commit.rs` encodes, stores and commits it.

use super::{INIT_SEED, Node, NodeError, NodeEvent, Synced, off_runtime};
use crate::cluster::{Carried, ClusterUpdate, WorkerFailure, WorkerUpdate};
use crate::metrics::NodeMetrics;
use crate::transfer::FetchError;
use barnraise_protocol::Hash;
use barnraise_protocol::messages::{Assignment, RoundPlan};
use barnraise_trainer::Trainer;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// How one phase of our work in a round ended, when nothing failed outright.
pub(super) enum Phase<T> {
    Done(T),
    /// We sit this round out (the reason is logged); the manifest still
    /// brings θ along.
    SatOut,
    /// The node is stopping.
    Stopped,
}

/// The node's update for a round, before encoding.
pub(super) struct Trained {
    pub update: ClusterUpdate,
    pub compute_ms: u64,
    /// The steps the workers hold back past the commit, if any.
    pub tail: Option<TailPlan>,
}

/// Overlapped rounds (docs/architecture.md, "Overlapped rounds"): the
/// steps of a round's plan the workers train after the commit, while the
/// update travels and the round closes.
pub(super) struct TailPlan {
    pub round: u64,
    /// The workers' tokens and seeds in the round.
    pub tokens: Vec<Vec<u16>>,
    pub seeds: Vec<u64>,
    /// The last steps of the round's plan (`barnraise_trainer::train::tail_of`).
    pub inner: barnraise_trainer::InnerConfig,
}

/// The tails of [`Node::start_tail`], training: the trainers, each
/// worker's tail, and the milliseconds it took.
pub(super) type TailJob = tokio::task::JoinHandle<(
    Vec<Option<Trainer>>,
    Vec<Result<Carried, WorkerFailure>>,
    u64,
)>;

/// Tails trained after round `round`'s commit, by worker index (`None`
/// for a worker whose tail failed), for round `round` + 1.
pub(super) struct Tails {
    pub round: u64,
    pub carried: Vec<Option<Carried>>,
}

impl Node {
    /// The worker trainers, one per device, building the missing ones.
    pub(super) async fn trainers(
        &self,
        state: &mut Synced,
    ) -> Result<Vec<Option<Trainer>>, NodeError> {
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
            let trainer = off_runtime(move || {
                let mut trainer = Trainer::new(&model, device, INIT_SEED)?;
                let dtype = trainer.set_precision(precision)?;
                tracing::info!(
                    precision = barnraise_trainer::precision::dtype_name(dtype),
                    "worker ready"
                );
                Ok::<_, barnraise_trainer::TrainError>(trainer)
            })
            .await?
            .map_err(|e| NodeError::Training(e.to_string()))?;
            *slot = Some(trainer);
        }
        Ok(slots)
    }

    /// Keeps this round's workers' states for spot checks and deletes
    /// those whose time is up ([`states_expired`]).
    pub(super) fn forget_old_states(&mut self, round: u64, states: Vec<Hash>, bytes: u64) {
        self.spot_states.push_back(KeptStates {
            round,
            hashes: states,
            bytes,
            stored: std::time::Instant::now(),
        });
        while let Some(front) = self.spot_states.front()
            && states_expired(front.round, front.bytes, front.stored.elapsed(), round)
        {
            if let Some(kept) = self.spot_states.pop_front() {
                for hash in kept.hashes {
                    if let Err(e) = self.store.remove(&hash) {
                        tracing::debug!("could not delete spot-check state {}: {e}", hash.short());
                    }
                }
            }
        }
    }

    /// Our work in round `plan.round`: train, then encode and commit
    /// (`commit.rs`), and what to train after the commit. `None` means we
    /// were stopped.
    pub(super) async fn train_and_commit(
        &mut self,
        state: &mut Synced,
        plan: &RoundPlan,
        assignment: &Assignment,
    ) -> Result<Option<Option<TailPlan>>, NodeError> {
        let mut trained = match self.train(state, plan.round, assignment).await? {
            Phase::Done(trained) => trained,
            Phase::SatOut => return Ok(Some(None)),
            Phase::Stopped => return Ok(None),
        };
        let tail = trained.tail.take();
        Ok(self
            .commit_update(state, plan, trained)
            .await?
            .map(|()| tail.filter(|_| state.committed.is_some_and(|(r, _)| r == plan.round))))
    }

    /// Starts training the workers' tails on a blocking thread, from θ_r
    /// minus our decoded update (the point the commit sent, so a replay can
    /// start there too). The workers' trainers go with it until
    /// [`Node::finish_tail`]. None when the update cannot be read back
    /// (then nothing is carried).
    pub(super) fn start_tail(&mut self, state: &mut Synced, plan: TailPlan) -> Option<TailJob> {
        let (round, update) = state.committed?;
        if round != plan.round {
            return None;
        }
        let mut slots = std::mem::take(&mut state.trainers);
        let theta = state.theta.clone();
        let store = self.store.clone();
        let shutdown = self.shutdown.clone();
        let pause = self.config.pause.clone();
        let step_delay = self.config.step_delay();
        let progress = move |_worker: usize, _step: usize, _loss: f32| {
            if let Some(delay) = step_delay {
                std::thread::sleep(delay);
            }
            !shutdown.is_cancelled() && !pause.as_ref().is_some_and(|p| p.is_paused())
        };
        tracing::debug!(
            round,
            steps = plan.inner.steps,
            "training the held-back steps"
        );
        Some(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let start = store
                .read(&update)
                .map_err(|e| e.to_string())
                .and_then(|payload| {
                    let mut decoded = vec![0.0f32; theta.len()];
                    barnraise_protocol::codec::decode_into(&payload, &mut decoded)
                        .map_err(|e| e.to_string())?;
                    Ok(barnraise_trainer::train::tail_start(&theta, &decoded))
                });
            drop(theta);
            let results = match start {
                Ok(start) => {
                    let workers = plan.tokens.len().min(slots.len());
                    crate::cluster::train_tails(
                        &mut slots[..workers],
                        &start,
                        &plan.tokens,
                        &plan.seeds,
                        &plan.inner,
                        &progress,
                    )
                }
                Err(error) => vec![Err(WorkerFailure {
                    index: 0,
                    error: format!("reading our update back: {error}"),
                })],
            };
            (slots, results, started.elapsed().as_millis() as u64)
        }))
    }

    /// Waits for the tails [`Node::start_tail`] started, takes the
    /// trainers back and keeps the tails for the next round if the
    /// manifest `accepted` our update. `None` means we were stopped.
    pub(super) async fn finish_tail(
        &mut self,
        state: &mut Synced,
        round: u64,
        job: TailJob,
        accepted: bool,
    ) -> Result<Option<()>, NodeError> {
        let (slots, results, compute_ms) = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Ok(None),
            joined = job => joined.map_err(|e| NodeError::Background(e.to_string()))?,
        };
        state.trainers = slots;
        NodeMetrics::add(&self.metrics.compute_ms, compute_ms);
        self.summary.compute_ms += compute_ms;
        let mut carried = Vec::new();
        for result in results {
            match result {
                // Its tokens are counted with the next round's, whose
                // commit claims them.
                Ok(tail) => carried.push(Some(tail)),
                Err(failure) => {
                    // Not an error of the round: the next one starts from θ as synchronous rounds do.
                    tracing::info!(
                        round,
                        worker = failure.index,
                        "held-back steps not carried: {}",
                        failure.error
                    );
                    carried.push(None);
                }
            }
        }
        state.tails =
            (accepted && carried.iter().any(Option::is_some)).then_some(Tails { round, carried });
        Ok(Some(()))
    }

    /// Fetches the assigned shards, runs the planned workers' inner steps
    /// and reduces their updates to one.
    async fn train(
        &mut self,
        state: &mut Synced,
        round: u64,
        assignment: &Assignment,
    ) -> Result<Phase<Trained>, NodeError> {
        let entered = Instant::now();
        if let Some(reason) = self.standby_reason() {
            // Paused, or our hours are ending: say so before the round counts on us.
            self.warn(format!("leaving round {round}'s work: {reason}"));
            self.leave().await;
            return Ok(Phase::SatOut);
        }
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
                // The coordinator signed a plan our run config cannot read.
                self.warn(format!(
                    "skipping round {round}'s work: the plan names shard {index}, and the run's \
                     dataset has {} shards",
                    state.run.dataset.len()
                ));
                return Ok(Phase::SatOut);
            }
        };
        let worker_plans = crate::cluster::split_assignment(&shards, assignment.seed, active);
        let loading = Instant::now();
        let shard_tokens = match self.load_shards(state, round, &shards, assignment).await? {
            Phase::Done(tokens) => tokens,
            Phase::SatOut => return Ok(Phase::SatOut),
            Phase::Stopped => return Ok(Phase::Stopped),
        };
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
        let shards_ms = loading.elapsed().as_millis() as u64;
        let worker_seeds: Vec<u64> = worker_plans.iter().map(|p| p.seed).collect();
        let mut whole = barnraise_trainer::train::inner_for_round(
            &state.run,
            round,
            assignment.inner_steps,
            assignment.seed,
        );
        if let Some(micro) = self.config.micro_batch {
            whole = whole.with_micro_batches(micro as usize);
        }
        // Overlapped rounds: the last steps wait until after the commit
        // (none in the run's last round, which has no next one to carry
        // them into), and the last round's tails start this one.
        let held_back = if round.saturating_add(1) < state.run.total_rounds {
            state
                .run
                .overlap_steps
                .min(assignment.inner_steps.saturating_sub(1))
        } else {
            0
        };
        let inner = barnraise_trainer::train::before_commit(&whole, held_back);
        let carried = state
            .tails
            .take()
            .filter(|t| t.round.checked_add(1) == Some(round))
            .map(|t| t.carried)
            .unwrap_or_default();
        if carried.iter().any(Option::is_some) {
            tracing::debug!(round, "starting from the steps carried from the last round");
        }
        let tail = (held_back > 0).then(|| TailPlan {
            round,
            tokens: worker_tokens.clone(),
            seeds: worker_seeds.clone(),
            inner: barnraise_trainer::train::tail_of(&whole, held_back),
        });
        self.emit(NodeEvent::TrainingStarted {
            round,
            steps: assignment.inner_steps,
        });
        let mut slots = self.trainers(state).await?;
        let theta = state.theta.clone();
        let params = theta.len();
        let crash_worker = self.config.fault_crash_worker;
        let inflate = self.config.misbehave == Some(crate::config::Misbehaviour::Inflate);
        // Live progress from worker 0 (the others run in step with it), and
        // a prompt stop when the node shuts down mid-loop.
        let events = self.events.clone();
        let shutdown = self.shutdown.clone();
        let pause = self.config.pause.clone();
        let step_delay = self.config.step_delay();
        let progress = move |worker: usize, step: usize, loss: f32| {
            if let Some(delay) = step_delay {
                std::thread::sleep(delay);
            }
            if worker == 0
                && let Some(events) = &events
            {
                let _ = events.try_send(NodeEvent::TrainingProgress {
                    round,
                    step: step as u32,
                    loss,
                });
            }
            !shutdown.is_cancelled() && !pause.as_ref().is_some_and(|p| p.is_paused())
        };
        tracing::debug!(
            round,
            setup_ms = entered.elapsed().as_millis() as u64,
            shards_ms = shards_ms,
            shards = shards.len(),
            "training starts"
        );
        let started = Instant::now();
        let trained = off_runtime(move || {
            let overlap = crate::cluster::Overlap {
                carried: &carried,
                held_back,
            };
            let mut results = crate::cluster::train_workers(
                &mut slots[..active],
                &theta,
                &worker_tokens,
                &worker_seeds,
                &inner,
                &overlap,
                crash_worker,
                &progress,
            );
            drop(theta);
            if inflate {
                claim_worker_zero_for_all(&mut results, round);
            }
            let tokens: Vec<(usize, u64)> = results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|u| (u.index, u.tokens))
                .collect();
            (slots, tokens, crate::cluster::reduce(results, params))
        });
        let (slots, tokens, reduced) = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Ok(Phase::Stopped),
            joined = trained => joined?,
        };
        state.trainers = slots;
        if self.paused() {
            // Paused mid-round: the workers stopped; this round's work is dropped.
            self.warn(format!("paused during round {round}: its work is dropped"));
            self.leave().await;
            return Ok(Phase::SatOut);
        }
        let compute_ms = started.elapsed().as_millis() as u64;
        NodeMetrics::add(&self.metrics.compute_ms, compute_ms);
        self.summary.compute_ms += compute_ms;
        for (worker, tokens) in tokens {
            self.metrics.add_worker_tokens(worker, tokens);
        }
        let update = match reduced {
            Ok(update) => update,
            Err(e) => {
                // A diverged or failed inner loop costs us this round, not the node.
                NodeMetrics::add(&self.metrics.worker_failures, self.devices.len() as u64);
                self.warn(format!("skipping round {round}'s commit: {e}"));
                return Ok(Phase::SatOut);
            }
        };
        for failure in &update.failures {
            self.worker_failed(round, failure, update.workers);
        }
        Ok(Phase::Done(Trained {
            update,
            compute_ms,
            tail,
        }))
    }

    /// The assigned shards' tokens, by shard hash: each verified by hash on
    /// arrival, cached in the store, and fetched and decoded once whichever
    /// workers use it.
    async fn load_shards(
        &mut self,
        state: &Synced,
        round: u64,
        shards: &[Hash],
        assignment: &Assignment,
    ) -> Result<Phase<HashMap<Hash, Vec<u16>>>, NodeError> {
        let mut tokens = HashMap::new();
        for (shard, &index) in shards.iter().zip(&assignment.shards) {
            if tokens.contains_key(shard) {
                continue;
            }
            let size = state.run.dataset.get(index as usize).map(|s| s.bytes);
            // Started when the plan came, perhaps while we applied the last
            // round (`super::shards_ahead`); whatever it did not bring is
            // fetched below.
            if let Some(ahead) = self.shards_ahead.take(shard, round) {
                match ahead.await {
                    Ok(Ok(Some(report))) => self.record_fetch(&report, "shard"),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(shard = %shard.short(), "fetching ahead failed ({e}); fetching again")
                    }
                    Err(e) => {
                        tracing::debug!(shard = %shard.short(), "fetching ahead stopped ({e}); fetching again")
                    }
                }
            }
            let fetched = self.fetch(shard, size, None, "shard").await;
            self.shards_ahead.release(shard);
            match fetched {
                Ok(()) => {}
                Err(NodeError::Fetch(FetchError::Cancelled)) => return Ok(Phase::Stopped),
                Err(NodeError::Fetch(e)) => {
                    self.warn(format!(
                        "skipping round {round}'s work: could not fetch shard {}: {e}",
                        shard.short()
                    ));
                    return Ok(Phase::SatOut);
                }
                Err(e) => return Err(e),
            }
            let store = self.store.clone();
            let hash = *shard;
            let decoded = off_runtime(move || {
                let bytes = store.read(&hash)?;
                barnraise_trainer::data::Shard::decode(
                    &bytes,
                    &Path::new("shard").join(hash.to_hex()),
                )
                .map_err(|e| NodeError::RunConfig(e.to_string()))
            })
            .await??;
            tokens.insert(*shard, decoded.tokens);
        }
        Ok(Phase::Done(tokens))
    }

    /// Says that a worker failed and was left out of the round's update.
    fn worker_failed(&self, round: u64, failure: &WorkerFailure, included: u32) {
        NodeMetrics::add(&self.metrics.worker_failures, 1);
        self.warn(format!(
            "round {round}: worker {} failed and is left out of the update ({included} of {} \
             workers in it): {}",
            failure.index,
            self.devices.len(),
            failure.error
        ));
        self.emit(NodeEvent::WorkerFailed {
            round,
            worker: failure.index,
            error: failure.error.clone(),
        });
    }
}

/// Red-team mode `inflate` (docs/security.md): every worker claims worker
/// 0's work, plus 10% noise. A plain copy is refused as `bad-shares` at
/// once; this one takes a spot check to catch.
fn claim_worker_zero_for_all(results: &mut [Result<WorkerUpdate, WorkerFailure>], round: u64) {
    let Some(Ok(first)) = results.first().cloned() else {
        return;
    };
    tracing::warn!(
        round,
        "red-team mode: claiming worker 0's work for every worker"
    );
    for update in results.iter_mut().skip(1).flatten() {
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

impl Node {
    /// Waits, still serving, until no coordinator may fetch a starting
    /// state this node committed (`limits::state_serve_ms` after each
    /// commit), or until shutdown.
    pub(super) async fn serve_kept_states(&self) {
        let now = std::time::Instant::now();
        let Some(until) = served_until(self.spot_states.iter()) else {
            return;
        };
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            return;
        }
        tracing::info!(
            seconds = left.as_secs(),
            "serving the last rounds' spot-check states before leaving (a coordinator may check them after its close; Ctrl-C leaves now)"
        );
        tokio::select! {
            _ = tokio::time::sleep(left) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }
}

/// Until when a coordinator may still fetch any of `kept`.
fn served_until<'a>(kept: impl Iterator<Item = &'a KeptStates>) -> Option<std::time::Instant> {
    kept.map(|k| {
        k.stored
            + std::time::Duration::from_millis(barnraise_protocol::limits::state_serve_ms(k.bytes))
    })
    .max()
}

/// One round's workers' starting states, kept for spot checks.
#[derive(Debug)]
pub(super) struct KeptStates {
    round: u64,
    hashes: Vec<Hash>,
    bytes: u64,
    stored: std::time::Instant,
}

/// Whether the states a node committed in `committed` (`bytes` of them,
/// stored `age` ago) may go now that it commits `round`: once that round's
/// close is past (two rounds on) and the time the protocol asks a node to
/// serve them has run out (`limits::state_serve_ms`), since a coordinator
/// may check a drawn worker after the close (docs/security.md, "Deferred
/// spot checks").
fn states_expired(committed: u64, bytes: u64, age: std::time::Duration, round: u64) -> bool {
    let served_ms = barnraise_protocol::limits::state_serve_ms(bytes);
    committed.saturating_add(1) < round && age.as_millis() >= u128::from(served_ms)
}

#[cfg(test)]
mod tests {
    use super::{KeptStates, served_until, states_expired};
    use std::time::Duration;

    #[test]
    fn a_node_leaving_serves_its_states_until_the_last_may_be_fetched() {
        assert_eq!(served_until(std::iter::empty()), None);
        let t0 = std::time::Instant::now();
        let kept = |round, bytes, after_ms| KeptStates {
            round,
            hashes: vec![],
            bytes,
            stored: t0 + Duration::from_millis(after_ms),
        };
        // 26 MB committed at 0 s is served until 86 s; 1 MB committed at
        // 30 s until 91 s.
        let states = [kept(4, 26_000_000, 0), kept(5, 1_000_000, 30_000)];
        assert_eq!(
            served_until(states.iter()),
            Some(t0 + Duration::from_millis(91_000))
        );
    }

    #[test]
    fn spot_check_states_are_kept_two_rounds_and_the_time_they_are_served() {
        let mb26 = 26_000_000;
        // Served 60 s plus 26 s for 26 MB.
        let served = Duration::from_millis(86_000);
        assert!(states_expired(3, mb26, served, 5));
        // Not before two rounds on, however long ago.
        assert!(!states_expired(3, mb26, Duration::from_secs(3600), 4));
        // Not before the time is up, however many rounds on.
        assert!(!states_expired(
            3,
            mb26,
            served - Duration::from_millis(1),
            50
        ));
        // A bigger state is served for longer.
        assert!(!states_expired(3, 10 * mb26, served, 5));
    }
}
