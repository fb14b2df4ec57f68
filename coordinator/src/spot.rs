//! Spot checks (docs/security.md, "Spot checks"): which worker shares of a
//! commit the coordinator replays, and the replay itself.
//!
//! The draw is the coordinator's signature over the commit (see
//! `barnraise_protocol::workers::selection_message`), so a node cannot know
//! when it trains which of its workers will be checked, and the coordinator
//! redraws the same shares when it closes the round. The replay trains the
//! drawn worker's round again on the CPU, from θ_r, the worker's shards and
//! seed, and the optimizer state the node committed to, and compares Δ_i
//! with the committed hash (exact) and sketch (within a tolerance, for
//! nodes whose hardware does not replay bit for bit).

use barnraise_protocol::messages::{Assignment, Commit, RunConfig};
use barnraise_protocol::workers::{
    WorkerShare, draw_rank, is_selected, selection_message, share_sketch, sketch_distance,
    split_assignment,
};
use barnraise_protocol::{Hash, NodeId, SigningKey};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{ModelConfig, Trainer};

/// The shares of `commit` drawn for a spot check, each with its rank (the
/// draw's number: when a round draws more shares than it may replay, the
/// lowest ranks are replayed, so when a node commits does not matter),
/// lowest rank first.
pub fn drawn_shares<'a>(
    key: &SigningKey,
    run_id: &str,
    node: &NodeId,
    commit: &'a Commit,
    fraction: f64,
) -> Vec<(u64, &'a WorkerShare)> {
    let mut drawn = commit
        .shares
        .iter()
        .filter_map(|share| {
            let message = selection_message(
                run_id,
                commit.round,
                &node.0.0,
                &commit.update_hash,
                share.index,
            );
            let selector = key.sign(&message).0;
            is_selected(&selector, fraction).then(|| (draw_rank(&selector), share))
        })
        .collect::<Vec<_>>();
    drawn.sort_by_key(|(rank, share)| (*rank, share.index));
    drawn
}

/// What a replay found.
#[derive(Clone, Debug, PartialEq)]
pub struct SpotResult {
    pub worker: u32,
    /// The replay's Δ_i hashes to the committed one.
    pub exact: bool,
    /// `sketch_distance(committed sketch, replay's sketch)`.
    pub distance: f64,
    pub replayed_tokens: u64,
    pub claimed_tokens: u64,
    /// Set when the replay could not run on what the node gave (a state of
    /// the wrong size, moments that are not finite, shards it was not given).
    pub unusable: Option<String>,
}

impl SpotResult {
    /// A share that could not be replayed, and why: it fails its check.
    pub fn unusable(share: &WorkerShare, why: String) -> SpotResult {
        SpotResult {
            worker: share.index,
            exact: false,
            distance: f64::INFINITY,
            replayed_tokens: 0,
            claimed_tokens: share.tokens,
            unusable: Some(why),
        }
    }

    /// Whether the share stands: an exact replay, or one within `tolerance`
    /// of the committed sketch, on the claimed tokens.
    pub fn passes(&self, tolerance: f64) -> bool {
        self.unusable.is_none()
            && self.replayed_tokens == self.claimed_tokens
            && (self.exact || self.distance <= tolerance)
    }

    /// The numbers, for the ledger and the API.
    pub fn describe(&self) -> String {
        if let Some(why) = &self.unusable {
            return format!(
                "spot check of worker {}: could not replay: {why}",
                self.worker
            );
        }
        format!(
            "spot check of worker {}: {}, sketch distance {:.4}, replayed {} tokens of {} claimed",
            self.worker,
            if self.exact {
                "exact replay"
            } else {
                "replay differs from the committed Δ"
            },
            self.distance,
            self.replayed_tokens,
            self.claimed_tokens
        )
    }
}

/// Replays worker `share.index` of `assignment` from θ_r and `state`.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    model: &ModelConfig,
    run: &RunConfig,
    round: u64,
    theta: &[f32],
    assignment: &Assignment,
    share: &WorkerShare,
    state: &[u8],
    shard_tokens: &dyn crate::store::ShardTokens,
) -> SpotResult {
    let unusable = |why: String| SpotResult::unusable(share, why);
    let workers = assignment.workers.max(1) as usize;
    let shards = match assignment.shard_hashes(&run.dataset) {
        Ok(shards) => shards,
        Err(index) => {
            return unusable(format!(
                "the plan names shard {index}, past the run's {} shards",
                run.dataset.len()
            ));
        }
    };
    let plans = split_assignment(&shards, assignment.seed, workers);
    let Some(plan) = plans.get(share.index as usize) else {
        return unusable(format!(
            "the node's assignment has {workers} workers, not a worker {}",
            share.index
        ));
    };
    let mut tokens = Vec::new();
    for shard in &plan.shards {
        match shard_tokens.tokens(shard) {
            Some(t) => tokens.extend_from_slice(&t),
            None => return unusable(format!("shard {} is not in the dataset", shard.short())),
        }
    }
    let inner =
        barnraise_trainer::train::inner_for_round(run, round, assignment.inner_steps, plan.seed);
    let device = match select(DeviceSpec::Cpu) {
        Ok(device) => device,
        Err(e) => return unusable(format!("no CPU device: {e}")),
    };
    let result = (|| {
        let mut trainer = Trainer::new(model, device, 0)?;
        trainer.set_flat_params(theta)?;
        trainer.set_optimizer_state(state)?;
        let report = trainer.train_inner(&tokens, &inner)?;
        let local = trainer.flat_params()?;
        Ok::<_, barnraise_trainer::TrainError>((report.tokens, local))
    })();
    match result {
        Ok((replayed_tokens, local)) => {
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(t, l)| t - l).collect();
            SpotResult {
                worker: share.index,
                exact: Hash::of_f32s(&delta) == share.delta_hash,
                distance: sketch_distance(&share.delta_sketch, &share_sketch(&delta)),
                replayed_tokens,
                claimed_tokens: share.tokens,
                unusable: None,
            }
        }
        Err(e) => unusable(e.to_string()),
    }
}
