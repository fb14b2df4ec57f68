//! Early checks: an update probed, and its drawn spot checks replayed, as
//! soon as it (and the drawn workers' states) have arrived, while the
//! round is still open, instead of in the close.
//!
//! Both are known the moment a commit arrives: the spot-check draw and the
//! probe's seed are the coordinator's signatures over the commit
//! (`crate::spot`, `crate::probe::commit_seed`). Each check is a function
//! of θ_r, the plan, the shards and what the node sent, so it gives the
//! same result whenever it runs. Run early they cost the nodes nothing (on
//! a coordinator of its own the cores are idle while nodes train) and leave
//! the close only the updates that came last. The close uses the results
//! (`close::Early`) and runs the rest itself.
//!
//! Bounded: at most `verify.probe_max` probes and `verify.spot_check_max`
//! replays a round (the most the close would run), on half the close's
//! threads at once; once the round starts closing, checks not yet started
//! are skipped and the close waits for the ones running.

use super::*;
use crate::close::Early;
use crate::probe::Measured;
use crate::spot::SpotResult;
use crate::store::ShardTokens;
use tokio::sync::Semaphore;

/// One round's early checks.
#[derive(Clone)]
pub(super) struct EarlyChecks {
    round: u64,
    /// What every check of the round needs; None: no early checks.
    input: Option<Arc<RoundInput>>,
    inner: Arc<Mutex<State>>,
    running: Arc<Semaphore>,
}

#[derive(Default)]
struct State {
    bases_started: usize,
    probes_started: usize,
    replays_started: usize,
    closing: bool,
    found: Early,
    tasks: Vec<JoinHandle<()>>,
}

/// What every early check of a round needs, made once a round.
pub(super) struct RoundInput {
    pub model: barnraise_trainer::ModelConfig,
    pub run: RunConfig,
    pub run_id: String,
    pub verify: crate::config::VerifyConfig,
    pub seq_len: usize,
    pub codec: barnraise_protocol::codec::CodecConfig,
    pub key: SigningKey,
    pub dataset: Arc<Dataset>,
    pub heldout: Option<Arc<Vec<u16>>>,
    pub store: BlobStore,
    pub metrics: Arc<Metrics>,
    /// θ_r.
    pub theta: Arc<Vec<f32>>,
    /// Round r − 1, for replays of carried steps; `None` after a restart.
    pub prev: Option<Arc<crate::spot::PrevRound>>,
    /// Probe models on θ_r that finished checks left for the next ones
    /// (an update's base and its probe are two checks); emptied when the
    /// round closes, so deferred checks that keep this input keep no model.
    pub probes: Mutex<Vec<crate::probe::Probe>>,
}

type Assignment = barnraise_protocol::messages::Assignment;

/// One early check.
enum Job {
    /// θ_r's loss on the shard and batches a commit is probed on: known
    /// from the commit alone, so it runs while the update is fetched.
    Base(Commit),
    Probe(Commit),
    Replay(Hash, barnraise_protocol::workers::WorkerShare),
}

impl EarlyChecks {
    /// The checks of round `round` (none without `input`).
    pub(super) fn new(round: u64, threads: usize, input: Option<RoundInput>) -> EarlyChecks {
        EarlyChecks {
            round,
            input: input.map(Arc::new),
            inner: Arc::new(Mutex::new(State::default())),
            running: Arc::new(Semaphore::new((threads / 2).max(1))),
        }
    }

    pub(super) fn round(&self) -> u64 {
        self.round
    }

    /// What the round's checks run on (θ_r among it), if they run.
    pub(super) fn input(&self) -> Option<Arc<RoundInput>> {
        self.input.clone()
    }

    /// Measures θ_r on what `commit`'s update will be probed on, before
    /// the update is in: the third of its probe that does not need it.
    pub(super) fn base(&self, commit: Commit, assignment: Assignment) {
        self.spawn(Job::Base(commit), assignment);
    }

    /// Probes `commit`'s update (stored and checked by stage 2) from θ_r.
    pub(super) fn probe(&self, commit: Commit, assignment: Assignment) {
        self.spawn(Job::Probe(commit), assignment);
    }

    /// Replays `share` of the update `update` (its state stored) from θ_r.
    pub(super) fn replay(
        &self,
        update: Hash,
        share: barnraise_protocol::workers::WorkerShare,
        assignment: Assignment,
    ) {
        self.spawn(Job::Replay(update, share), assignment);
    }

    fn spawn(&self, job: Job, assignment: Assignment) {
        let Some(input) = self.input.clone() else {
            return;
        };
        if matches!(job, Job::Probe(_) | Job::Base(_))
            && (!input.verify.probe || input.heldout.is_none())
        {
            return;
        }
        let Ok(mut state) = self.inner.lock() else {
            return;
        };
        let within = match job {
            Job::Base(_) => {
                state.bases_started += 1;
                state.bases_started <= input.verify.probe_max
            }
            Job::Probe(_) => {
                state.probes_started += 1;
                state.probes_started <= input.verify.probe_max
            }
            Job::Replay(..) => {
                state.replays_started += 1;
                state.replays_started <= input.verify.spot_check_max
            }
        };
        if state.closing || !within {
            return;
        }
        let (inner, running, round) = (self.inner.clone(), self.running.clone(), self.round);
        state.tasks.push(tokio::spawn(async move {
            let Ok(_permit) = running.acquire_owned().await else {
                return;
            };
            if inner.lock().map_or(true, |state| state.closing) {
                return;
            }
            let (heldout_base, own_base) = match inner.lock() {
                Ok(state) => (
                    state.found.heldout_base,
                    match &job {
                        Job::Probe(commit) => state
                            .found
                            .bases
                            .get(&(assignment.node, commit.update_hash))
                            .copied(),
                        _ => None,
                    },
                ),
                Err(_) => (None, None),
            };
            let ran = tokio::task::spawn_blocking(move || {
                run(job, &input, &assignment, round, heldout_base, own_base)
            })
            .await;
            match ran {
                Ok(Some(done)) => {
                    if let Ok(mut state) = inner.lock() {
                        done.record(&mut state.found);
                    }
                }
                Ok(None) => {}
                // The close runs it again.
                Err(e) => tracing::warn!(round, "early check: {e}"),
            }
        }));
    }

    /// Stops new checks, waits for the running ones, and hands over what
    /// they found.
    pub(super) async fn finish(self) -> Early {
        let tasks = match self.inner.lock() {
            Ok(mut state) => {
                state.closing = true;
                std::mem::take(&mut state.tasks)
            }
            Err(_) => return Early::default(),
        };
        for task in tasks {
            let _ = task.await;
        }
        // No check of this round runs any more: its probe models go.
        if let Some(input) = &self.input
            && let Ok(mut pool) = input.probes.lock()
        {
            pool.clear();
        }
        self.inner
            .lock()
            .map(|mut state| std::mem::take(&mut state.found))
            .unwrap_or_default()
    }
}

/// What one early check found.
enum Done {
    Base {
        node: NodeId,
        update: Hash,
        heldout_base: Option<f32>,
        own_base: f32,
    },
    Probe {
        node: NodeId,
        update: Hash,
        heldout_base: Option<f32>,
        measured: Measured,
    },
    Replay(NodeId, Hash, u32, SpotResult),
}

impl Done {
    fn record(self, found: &mut Early) {
        match self {
            Done::Base {
                node,
                update,
                heldout_base,
                own_base,
            } => {
                found.heldout_base = found.heldout_base.or(heldout_base);
                found.bases.insert((node, update), own_base);
            }
            Done::Probe {
                node,
                update,
                heldout_base,
                measured,
            } => {
                found.heldout_base = found.heldout_base.or(heldout_base);
                found.probes.insert((node, update), measured);
            }
            Done::Replay(node, update, worker, result) => {
                found.replays.insert((node, update, worker), result);
            }
        }
    }
}

/// Runs one check on a blocking thread; None when it could not run (the
/// close then runs it, and says why if it fails there too). `own_base`:
/// the probe's base loss, when an earlier [`Job::Base`] measured it.
fn run(
    job: Job,
    input: &RoundInput,
    assignment: &Assignment,
    round: u64,
    heldout_base: Option<f32>,
    own_base: Option<f32>,
) -> Option<Done> {
    let started = std::time::Instant::now();
    let done = match job {
        Job::Replay(update, share) => {
            let result = replay_now(input, round, assignment, &share)?;
            input.metrics.stages.add(Stage::Spot, started.elapsed());
            Done::Replay(assignment.node, update, share.index, result)
        }
        Job::Base(commit) => {
            let heldout = input.heldout.as_deref()?;
            let (seed, own) = probed_on(input, assignment, round, &commit)?;
            let mut probe = take_probe(input, round)?;
            let heldout_base = heldout_base.or_else(|| {
                probe
                    .base_loss_seeded(heldout, heldout_seed(input, round))
                    .ok()
            });
            let own_base = probe
                .base_loss_seeded(&own, seed)
                .map_err(|e| tracing::debug!(round, "early probe base: {e}"))
                .ok()?;
            give_back(input, probe);
            input.metrics.stages.add(Stage::Probe, started.elapsed());
            Done::Base {
                node: assignment.node,
                update: commit.update_hash,
                heldout_base,
                own_base,
            }
        }
        Job::Probe(commit) => {
            let heldout = input.heldout.as_deref()?;
            let (seed, own) = probed_on(input, assignment, round, &commit)?;
            let payload = input.store.get(&commit.update_hash).ok().flatten()?;
            let params = input.theta.len();
            let values = verify::check_payload(&payload, &commit, input.codec, params).ok()?;
            let mut probe = take_probe(input, round)?;
            let heldout_seed = heldout_seed(input, round);
            let heldout_base =
                heldout_base.or_else(|| probe.base_loss_seeded(heldout, heldout_seed).ok());
            let measured = probe
                .measure_update(&values, &own, seed, heldout, heldout_seed, own_base)
                .map_err(|e| tracing::debug!(round, "early probe: {e}; the close probes it"))
                .ok()?;
            give_back(input, probe);
            input.metrics.stages.add(Stage::Probe, started.elapsed());
            Done::Probe {
                node: assignment.node,
                update: commit.update_hash,
                heldout_base,
                measured,
            }
        }
    };
    Some(done)
}

/// The probe's seed for `commit` and the tokens of the shard it draws.
fn probed_on(
    input: &RoundInput,
    assignment: &Assignment,
    round: u64,
    commit: &Commit,
) -> Option<(u64, Arc<Vec<u16>>)> {
    let seed = crate::probe::commit_seed(
        &input.key,
        &input.run_id,
        round,
        &assignment.node,
        &commit.update_hash,
    );
    let own = crate::probe::own_shard(assignment, &input.dataset.train, seed)
        .and_then(|h| input.dataset.tokens.tokens(&h))?;
    Some((seed, own))
}

/// A probe model on θ_r: one an earlier check left, or a new one (a model
/// built and θ copied into it). Every loss sets its parameters first, so
/// what an earlier check did to it does not matter.
fn take_probe(input: &RoundInput, round: u64) -> Option<crate::probe::Probe> {
    if let Some(probe) = input.probes.lock().ok().and_then(|mut pool| pool.pop()) {
        return Some(probe);
    }
    crate::probe::Probe::new(&input.model, &input.theta, &input.verify, input.seq_len, 0)
        .map_err(|e| tracing::debug!(round, "early probe: {e}"))
        .ok()
}

/// Leaves `probe` for the round's next check.
fn give_back(input: &RoundInput, probe: crate::probe::Probe) {
    if let Ok(mut pool) = input.probes.lock() {
        pool.push(probe);
    }
}

fn heldout_seed(input: &RoundInput, round: u64) -> u64 {
    crate::probe::heldout_seed(&input.key, &input.run_id, round)
}

/// Replays `share` of `assignment` from the round's θ and the state in the
/// store; None when the state is not there.
pub(super) fn replay_now(
    input: &RoundInput,
    round: u64,
    assignment: &Assignment,
    share: &barnraise_protocol::workers::WorkerShare,
) -> Option<SpotResult> {
    let state = input.store.get(&share.state_hash).ok().flatten()?;
    let payload = |hash: &Hash| input.store.get(hash).ok().flatten();
    Some(crate::spot::replay(
        &crate::spot::ReplayInput {
            model: &input.model,
            run: &input.run,
            shard_tokens: &input.dataset.tokens,
            prev: input.prev.as_deref(),
            payload: &payload,
        },
        round,
        &input.theta,
        assignment,
        share,
        &state,
    ))
}
