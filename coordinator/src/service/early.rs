//! Early replays: a spot check replayed as soon as the drawn worker's state
//! has arrived, while the round is still open, instead of in the close.
//!
//! Which shares a commit has drawn is known when it arrives (the draw is
//! the coordinator's signature over the commit, `crate::spot`), and the
//! replay is a function of θ_r, the plan, the shards and the state: the
//! same result whenever it runs. Run early it costs the nodes nothing (on
//! a coordinator of its own the cores are idle while nodes train) and takes
//! a worker's round of training off the path between the deadline and the
//! manifest. The close uses the results for the shares it draws
//! (`close::SpotContext::replayed`) and replays only the rest.
//!
//! Bounded: at most `verify.spot_check_max` early replays a round (the
//! most the close would run), half the close's threads at once; once the
//! round starts closing, replays not yet started are skipped and the close
//! waits for the ones running.

use super::*;
use crate::spot::SpotResult;
use tokio::sync::Semaphore;

/// One round's early replays.
#[derive(Clone)]
pub(super) struct EarlyReplays {
    round: u64,
    inner: Arc<Mutex<Early>>,
    running: Arc<Semaphore>,
}

#[derive(Default)]
struct Early {
    /// Replays started (or queued) this round.
    started: usize,
    closing: bool,
    results: HashMap<(Hash, u32), SpotResult>,
    tasks: Vec<JoinHandle<()>>,
    /// θ_r, copied once for all of the round's replays.
    theta: Option<Arc<Vec<f32>>>,
}

/// What a replay needs besides the share.
#[derive(Clone)]
pub(super) struct ReplayInput {
    pub model: barnraise_trainer::ModelConfig,
    pub run: RunConfig,
    pub assignment: barnraise_protocol::messages::Assignment,
    pub dataset: Arc<Dataset>,
    pub store: BlobStore,
    pub metrics: Arc<Metrics>,
    pub budget: usize,
}

impl EarlyReplays {
    pub(super) fn new(round: u64, threads: usize) -> EarlyReplays {
        EarlyReplays {
            round,
            inner: Arc::new(Mutex::new(Early::default())),
            running: Arc::new(Semaphore::new((threads / 2).max(1))),
        }
    }

    pub(super) fn round(&self) -> u64 {
        self.round
    }

    /// θ_r for the round's replays, copied by `make` the first time.
    pub(super) fn theta(&self, make: impl FnOnce() -> Option<Vec<f32>>) -> Option<Arc<Vec<f32>>> {
        let mut early = self.inner.lock().ok()?;
        if early.theta.is_none() {
            early.theta = make().map(Arc::new);
        }
        early.theta.clone()
    }

    /// Starts replaying `share` of the update `update` from θ_r on a
    /// blocking thread, unless the round's budget is spent or it is closing.
    pub(super) fn start(
        &self,
        update: Hash,
        share: barnraise_protocol::workers::WorkerShare,
        input: ReplayInput,
        theta: Arc<Vec<f32>>,
    ) {
        let Ok(mut early) = self.inner.lock() else {
            return;
        };
        if early.closing || early.started >= input.budget {
            return;
        }
        early.started += 1;
        let (inner, running, round) = (self.inner.clone(), self.running.clone(), self.round);
        early.tasks.push(tokio::spawn(async move {
            let Ok(_permit) = running.acquire_owned().await else {
                return;
            };
            if inner.lock().map_or(true, |e| e.closing) {
                return;
            }
            let key = (update, share.index);
            let replayed = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let state = input.store.get(&share.state_hash).ok().flatten();
                let result = match state {
                    Some(state) => crate::spot::replay(
                        &input.model,
                        &input.run,
                        round,
                        &theta,
                        &input.assignment,
                        &share,
                        &state,
                        &input.dataset.tokens,
                    ),
                    None => {
                        SpotResult::unusable(&share, "the worker's state was not served".into())
                    }
                };
                input.metrics.stages.add(Stage::Spot, started.elapsed());
                result
            })
            .await;
            match replayed {
                Ok(result) => {
                    if let Ok(mut early) = inner.lock() {
                        early.results.insert(key, result);
                    }
                }
                // The close replays it again.
                Err(e) => tracing::warn!(round, "early replay: {e}"),
            }
        }));
    }

    /// Stops new replays, waits for the running ones, and hands over what
    /// they found.
    pub(super) async fn finish(self) -> HashMap<(Hash, u32), SpotResult> {
        let tasks = match self.inner.lock() {
            Ok(mut early) => {
                early.closing = true;
                std::mem::take(&mut early.tasks)
            }
            Err(_) => return HashMap::new(),
        };
        for task in tasks {
            let _ = task.await;
        }
        self.inner
            .lock()
            .map(|mut early| std::mem::take(&mut early.results))
            .unwrap_or_default()
    }
}
