//! Cluster mode: one node drives several workers — the GPUs of an institution's
//! machine, or CPU replicas — and uploads ONE update per round.
//!
//! ```text
//! Assignment (shards, seed) ──split──► worker 0: shards[0..], seed
//!                                      worker 1: shards[k..], worker_seed(seed, 1)
//!                                      ...
//! each worker: θ_r ─► H inner steps on its shards ─► Δ_i, tokens_i
//! reduce: Δ = Σ_i (tokens_i / Σ tokens) · Δ_i   (fixed order, f64 weights)
//! ─► one compressed update, Commit { tokens: Σ tokens_i, workers: finished }
//! ```
//!
//! The reduction is exact (dense, in memory, before compression) and uses the
//! same token weighting the coordinator applies across nodes, so a cluster of
//! N workers lands on the same θ_{r+1} as N separate nodes fed the same shards
//! and seeds, while moving 1/N of the bytes over the WAN. A worker that fails
//! or panics mid-round is left out: the update is the token-weighted mean of
//! the workers that finished, and claims only their tokens; if none finished,
//! the node commits nothing that round. A partial Δ is never sent.

use barnraise_protocol::Hash;
use barnraise_protocol::outer::weighted_mean_into;
use barnraise_protocol::workers::{WorkerShare, share_sketch};
use barnraise_trainer::{InnerConfig, Trainer};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Most workers one node may drive (the coordinator refuses joins that
/// declare more).
pub const MAX_WORKERS: usize = barnraise_protocol::limits::MAX_WORKERS_PER_NODE;

pub use barnraise_protocol::workers::{WorkerPlan, split_assignment, worker_seed};

/// What one worker produced in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerUpdate {
    pub index: usize,
    pub tokens: u64,
    /// Training loss per inner step.
    pub losses: Vec<f32>,
    /// Δ_i = θ_r − θ_i after the inner steps.
    pub delta: Vec<f32>,
    /// The worker's inner optimizer state when the round started
    /// ([`Trainer::optimizer_state`]), or where its carried steps did: what
    /// a spot check replays from.
    pub state: Vec<u8>,
    /// Steps of its last round it carried into this one ([`Carried`]).
    pub carried: u32,
    /// Steps of this round's plan it trains after the commit.
    pub held_back: u32,
}

/// A worker that did not finish its round, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerFailure {
    pub index: usize,
    pub error: String,
}

/// The node's one update for the round.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterUpdate {
    /// Token-weighted mean of the finished workers' Δ.
    pub delta: Vec<f32>,
    /// Tokens of the finished workers, summed.
    pub tokens: u64,
    /// Per inner step, the token-weighted mean of the finished workers' losses.
    pub losses: Vec<f32>,
    /// Workers whose Δ is in `delta`.
    pub workers: u32,
    /// Workers left out, with their errors.
    pub failures: Vec<WorkerFailure>,
    /// The finished workers' shares, in worker order, for the commit.
    pub shares: Vec<WorkerShare>,
    /// Their optimizer states at the round's start, in the same order; the
    /// node serves them (by `shares[i].state_hash`) until the round closes.
    pub states: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReduceError {
    #[error("no worker finished the round ({})", describe(.0))]
    NoWorkerFinished(Vec<WorkerFailure>),
    #[error(
        "worker {index} produced {found} values where {expected} were expected; its update is left out"
    )]
    WrongLength {
        index: usize,
        found: usize,
        expected: usize,
    },
}

fn describe(failures: &[WorkerFailure]) -> String {
    if failures.is_empty() {
        return "no workers".into();
    }
    failures
        .iter()
        .map(|f| format!("worker {}: {}", f.index, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Runs `train` once per worker, each on its own thread with exclusive use of
/// its slot in `workers` (a trainer, say), and collects what each produced.
/// A panic in one worker is caught and reported as that worker's failure;
/// the others are unaffected. One worker runs on the calling thread.
pub fn run_workers<T, F>(workers: &mut [T], train: F) -> Vec<Result<WorkerUpdate, WorkerFailure>>
where
    T: Send,
    F: Fn(usize, &mut T) -> Result<WorkerUpdate, String> + Sync,
{
    run_each(workers, train)
        .into_iter()
        .enumerate()
        .map(|(index, result)| result.map(|update| WorkerUpdate { index, ..update }))
        .collect()
}

/// [`run_workers`] for any result.
fn run_each<T, R, F>(workers: &mut [T], train: F) -> Vec<Result<R, WorkerFailure>>
where
    T: Send,
    R: Send,
    F: Fn(usize, &mut T) -> Result<R, String> + Sync,
{
    let guarded = |index: usize, slot: &mut T| -> Result<R, WorkerFailure> {
        match catch_unwind(AssertUnwindSafe(|| train(index, slot))) {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(error)) => Err(WorkerFailure { index, error }),
            Err(panic) => Err(WorkerFailure {
                index,
                error: format!("the worker crashed: {}", panic_message(&panic)),
            }),
        }
    };
    if let [only] = workers {
        return vec![guarded(0, only)];
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(index, slot)| {
                let guarded = &guarded;
                std::thread::Builder::new()
                    .name(format!("barnraise-worker-{index}"))
                    .spawn_scoped(scope, move || guarded(index, slot))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(index, handle)| match handle {
                Ok(handle) => handle.join().unwrap_or_else(|panic| {
                    Err(WorkerFailure {
                        index,
                        error: format!("the worker crashed: {}", panic_message(&panic)),
                    })
                }),
                Err(e) => Err(WorkerFailure {
                    index,
                    error: format!("could not start the worker's thread: {e}"),
                }),
            })
            .collect()
    })
}

/// A worker's tail (overlapped rounds, docs/architecture.md): the last
/// steps of its round's plan, trained after the node's commit while the
/// update travelled, and carried into its next round.
#[derive(Clone, Debug, PartialEq)]
pub struct Carried {
    pub steps: u32,
    pub tokens: u64,
    /// What the tail added (`barnraise_trainer::train::tail_offset`).
    pub offset: Vec<f32>,
    /// The worker's optimizer state where the tail started: what a spot
    /// check of the next round replays from.
    pub state: Vec<u8>,
}

/// Overlapped rounds in one round's training: each worker's carried steps
/// (by worker index; none for synchronous rounds) and how many steps of
/// the plan every worker holds back past the commit (`inner` excludes them).
#[derive(Clone, Copy, Debug, Default)]
pub struct Overlap<'a> {
    pub carried: &'a [Option<Carried>],
    pub held_back: u32,
}

/// Trains every worker's tail: worker `i` starts from `start` (θ_r minus
/// the node's decoded update, `barnraise_trainer::train::tail_start`) and
/// trains `tail` (with `seeds[i]`) on `tokens[i]`. A worker whose trainer
/// is missing or fails carries nothing (and its slot is emptied).
pub fn train_tails(
    slots: &mut [Option<Trainer>],
    start: &[f32],
    tokens: &[Vec<u16>],
    seeds: &[u64],
    tail: &InnerConfig,
    progress: &(dyn Fn(usize, usize, f32) -> bool + Sync),
) -> Vec<Result<Carried, WorkerFailure>> {
    let results = run_each(slots, |index, slot| {
        let (trainer, tokens, inner) = worker_inputs(slot, index, tokens, seeds, tail)?;
        let trained = (|| {
            trainer.set_flat_params(start)?;
            let state = trainer.optimizer_state()?;
            let report = trainer.train_inner_observed(tokens, &inner, &mut |step, loss| {
                progress(index, step, loss)
            })?;
            let end = trainer.flat_params()?;
            Ok::<_, barnraise_trainer::TrainError>(Carried {
                steps: inner.steps as u32,
                tokens: report.tokens,
                offset: barnraise_trainer::train::tail_offset(start, &end),
                state,
            })
        })();
        trained.map_err(|e| e.to_string())
    });
    empty_failed_slots(slots, &results);
    results
}

/// Worker `index`'s trainer, tokens and `inner` with its seed.
fn worker_inputs<'a>(
    slot: &'a mut Option<Trainer>,
    index: usize,
    tokens: &'a [Vec<u16>],
    seeds: &[u64],
    inner: &InnerConfig,
) -> Result<(&'a mut Trainer, &'a [u16], InnerConfig), String> {
    let trainer = slot
        .as_mut()
        .ok_or_else(|| "the worker has no trainer".to_string())?;
    let (Some(tokens), Some(&seed)) = (tokens.get(index), seeds.get(index)) else {
        return Err(format!("worker {index} has no share of the assignment"));
    };
    let inner = InnerConfig {
        seed,
        ..inner.clone()
    };
    Ok((trainer, tokens, inner))
}

/// Empties the slot of every worker that failed: it may hold a broken
/// optimizer or device state, and the node rebuilds it next round.
fn empty_failed_slots<R>(slots: &mut [Option<Trainer>], results: &[Result<R, WorkerFailure>]) {
    for failed in results.iter().filter_map(|r| r.as_ref().err()) {
        if let Some(slot) = slots.get_mut(failed.index) {
            *slot = None;
        }
    }
}

/// One round of training on every worker: worker `i` starts from `theta`,
/// trains `inner` (with `seeds[i]`) on `tokens[i]`, and reports
/// Δ_i = θ_r − θ_i. Workers whose trainer is missing, fails or panics come
/// back as failures and their slot is emptied (a failed worker may hold a
/// broken optimizer or device state; the node rebuilds it next round).
/// `crash` makes that worker panic, to test the path a real crash takes.
/// `progress(worker, step, loss)` is called after every inner step of every
/// worker; returning `false` stops that worker (the node is shutting down).
#[allow(clippy::too_many_arguments)]
pub fn train_workers(
    slots: &mut [Option<Trainer>],
    theta: &[f32],
    tokens: &[Vec<u16>],
    seeds: &[u64],
    inner: &InnerConfig,
    overlap: &Overlap<'_>,
    crash: Option<usize>,
    progress: &(dyn Fn(usize, usize, f32) -> bool + Sync),
) -> Vec<Result<WorkerUpdate, WorkerFailure>> {
    let results = run_workers(slots, |index, slot| {
        if crash == Some(index) {
            panic!("fault injection: worker {index} crashes mid-round");
        }
        let (trainer, tokens, inner) = worker_inputs(slot, index, tokens, seeds, inner)?;
        let carry = overlap.carried.get(index).and_then(Option::as_ref);
        if let Some(carry) = carry
            && carry.offset.len() != theta.len()
        {
            return Err(format!(
                "worker {index}'s carried steps moved {} values, θ has {}",
                carry.offset.len(),
                theta.len()
            ));
        }
        let trained = (|| {
            // With carried steps the worker starts from θ_r plus what they
            // added, and a replay starts where they did.
            let state = match carry {
                Some(carry) => {
                    trainer.set_flat_params(&barnraise_trainer::train::carried_start(
                        theta,
                        &carry.offset,
                    ))?;
                    carry.state.clone()
                }
                None => {
                    trainer.set_flat_params(theta)?;
                    trainer.optimizer_state()?
                }
            };
            let report = trainer.train_inner_observed(tokens, &inner, &mut |step, loss| {
                progress(index, step, loss)
            })?;
            let local = trainer.flat_params()?;
            // Δ = θ_r − θ_local, element by element.
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(t, l)| t - l).collect();
            Ok::<_, barnraise_trainer::TrainError>(WorkerUpdate {
                index,
                tokens: report.tokens + carry.map_or(0, |c| c.tokens),
                losses: report.losses,
                delta,
                state,
                carried: carry.map_or(0, |c| c.steps),
                held_back: overlap.held_back,
            })
        })();
        trained.map_err(|e| e.to_string())
    });
    empty_failed_slots(slots, &results);
    results
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panicked".into())
}

/// Reduces the workers' results to the node's one update: the exact
/// token-weighted mean of every finished worker's Δ (weights computed in f64
/// in worker order, as the coordinator weights nodes), their summed tokens,
/// and the failures. Errors when no worker finished — the node then commits
/// nothing rather than a partial update.
pub fn reduce(
    results: Vec<Result<WorkerUpdate, WorkerFailure>>,
    params: usize,
) -> Result<ClusterUpdate, ReduceError> {
    let mut finished = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(update) if update.delta.len() == params => finished.push(update),
            Ok(update) => {
                let error = ReduceError::WrongLength {
                    index: update.index,
                    found: update.delta.len(),
                    expected: params,
                };
                failures.push(WorkerFailure {
                    index: update.index,
                    error: error.to_string(),
                });
            }
            Err(failure) => failures.push(failure),
        }
    }
    if finished.is_empty() {
        return Err(ReduceError::NoWorkerFinished(failures));
    }
    finished.sort_by_key(|u| u.index);
    let tokens: u64 = finished.iter().map(|u| u.tokens).sum();
    let worker_shares: Vec<WorkerShare> = finished
        .iter()
        .map(|u| WorkerShare {
            index: u.index as u32,
            tokens: u.tokens,
            delta_hash: Hash::of_f32s(&u.delta),
            delta_sketch: share_sketch(&u.delta),
            state_hash: Hash::of(&u.state),
            carried: u.carried,
            held_back: u.held_back,
        })
        .collect();
    let states: Vec<Vec<u8>> = finished
        .iter_mut()
        .map(|u| std::mem::take(&mut u.state))
        .collect();
    let shares = token_shares(&finished);
    let delta = if let [only] = finished.as_mut_slice() {
        std::mem::take(&mut only.delta)
    } else {
        let mut out = vec![0.0f32; params];
        let inputs: Vec<(&[f32], f32)> = finished
            .iter()
            .zip(&shares)
            .map(|(u, &s)| (u.delta.as_slice(), s))
            .collect();
        weighted_mean_into(&inputs, &mut out);
        out
    };
    let steps = finished.iter().map(|u| u.losses.len()).max().unwrap_or(0);
    let losses = (0..steps)
        .map(|step| {
            let (mut sum, mut weight) = (0.0f64, 0.0f64);
            for (u, &s) in finished.iter().zip(&shares) {
                if let Some(&loss) = u.losses.get(step) {
                    sum += f64::from(s) * f64::from(loss);
                    weight += f64::from(s);
                }
            }
            if weight > 0.0 {
                (sum / weight) as f32
            } else {
                f32::NAN
            }
        })
        .collect();
    Ok(ClusterUpdate {
        delta,
        tokens,
        losses,
        workers: finished.len() as u32,
        failures,
        shares: worker_shares,
        states,
    })
}

/// Each worker's share of the update: its tokens over the total, computed in
/// f64 and rounded to f32 — the coordinator's manifest weights, so reducing
/// here and aggregating there give the same sums. Equal shares when no
/// worker reports tokens.
fn token_shares(finished: &[WorkerUpdate]) -> Vec<f32> {
    let total: f64 = finished.iter().map(|u| u.tokens as f64).sum();
    finished
        .iter()
        .map(|u| {
            if total > 0.0 {
                (u.tokens as f64 / total) as f32
            } else {
                (1.0 / finished.len() as f64) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(n: u8) -> Vec<Hash> {
        (0..n).map(|i| Hash::of(&[i])).collect()
    }

    fn update(index: usize, tokens: u64, value: f32) -> WorkerUpdate {
        WorkerUpdate {
            index,
            tokens,
            losses: vec![value; 3],
            delta: vec![value; 4],
            state: vec![index as u8; 8],
            carried: 0,
            held_back: 0,
        }
    }

    #[test]
    fn split_covers_every_shard_once_in_order() {
        let shards = hashes(7);
        let plans = split_assignment(&shards, 42, 3);
        let lens: Vec<usize> = plans.iter().map(|p| p.shards.len()).collect();
        assert_eq!(lens, vec![3, 2, 2]);
        let joined: Vec<Hash> = plans.iter().flat_map(|p| p.shards.clone()).collect();
        assert_eq!(joined, shards);
        assert_eq!(plans[0].seed, 42, "worker 0 keeps the assignment's seed");
        assert_ne!(plans[1].seed, plans[2].seed);
        assert_ne!(plans[1].seed, 42);
        assert_eq!(split_assignment(&shards, 42, 3), plans, "deterministic");
    }

    #[test]
    fn fewer_shards_than_workers_gives_everyone_all_shards() {
        let shards = hashes(1);
        let plans = split_assignment(&shards, 5, 3);
        assert_eq!(plans.len(), 3);
        assert!(plans.iter().all(|p| p.shards == shards));
        let seeds: std::collections::HashSet<u64> = plans.iter().map(|p| p.seed).collect();
        assert_eq!(seeds.len(), 3);
    }

    #[test]
    fn reduce_weights_by_tokens() {
        let reduced = reduce(vec![Ok(update(0, 100, 1.0)), Ok(update(1, 300, 5.0))], 4).unwrap();
        // (100·1 + 300·5) / 400 = 4
        assert_eq!(reduced.delta, vec![4.0; 4]);
        assert_eq!(reduced.tokens, 400);
        assert_eq!(reduced.workers, 2);
        assert_eq!(reduced.losses, vec![4.0; 3]);
        assert!(reduced.failures.is_empty());
        // One share per worker, naming its own Δ, tokens and starting state.
        assert_eq!(reduced.shares.len(), 2);
        for (i, (share, value)) in reduced.shares.iter().zip([1.0f32, 5.0]).enumerate() {
            assert_eq!(share.index, i as u32);
            assert_eq!(share.delta_hash, Hash::of_f32s(&[value; 4]));
            assert_eq!(share.state_hash, Hash::of(&[i as u8; 8]));
            assert_eq!(reduced.states[i], vec![i as u8; 8]);
        }
        assert_eq!(reduced.shares.iter().map(|s| s.tokens).sum::<u64>(), 400);
    }

    #[test]
    fn a_failed_worker_is_left_out_and_its_tokens_not_claimed() {
        let reduced = reduce(
            vec![
                Ok(update(0, 100, 2.0)),
                Err(WorkerFailure {
                    index: 1,
                    error: "out of memory".into(),
                }),
                Ok(WorkerUpdate {
                    delta: vec![9.0; 3],
                    ..update(2, 100, 9.0)
                }),
            ],
            4,
        )
        .unwrap();
        assert_eq!(reduced.delta, vec![2.0; 4]);
        assert_eq!(reduced.tokens, 100);
        assert_eq!(reduced.workers, 1);
        let failed: Vec<usize> = reduced.failures.iter().map(|f| f.index).collect();
        assert_eq!(failed, vec![1, 2], "the wrong-length update is refused too");
    }

    #[test]
    fn nothing_finished_is_an_error_not_an_update() {
        let err = reduce(
            vec![Err(WorkerFailure {
                index: 0,
                error: "boom".into(),
            })],
            4,
        )
        .unwrap_err();
        assert!(err.to_string().contains("worker 0: boom"), "{err}");
    }

    #[test]
    fn a_panicking_worker_is_caught_and_the_others_finish() {
        let mut slots = vec![0u32; 3];
        let results = run_workers(&mut slots, |index, slot| {
            *slot += 1;
            if index == 1 {
                panic!("worker one fell over");
            }
            Ok(update(99, 10, index as f32))
        });
        assert_eq!(results.len(), 3);
        assert!(matches!(&results[1], Err(f) if f.index == 1 && f.error.contains("fell over")));
        assert_eq!(results[0].as_ref().unwrap().index, 0, "index is the slot's");
        assert_eq!(results[2].as_ref().unwrap().index, 2);
        assert_eq!(slots, vec![1, 1, 1], "every worker ran on its own slot");
        let reduced = reduce(results, 4).unwrap();
        assert_eq!(reduced.workers, 2);
        assert_eq!(reduced.delta, vec![1.0; 4]);
    }
}
