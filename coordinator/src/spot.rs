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

/// Round r − 1, as the replay of a share with `carried` steps needs it
/// (docs/architecture.md, "Overlapped rounds"): its θ, its assignments and
/// the updates its manifest accepted. The service keeps the last closed
/// round's; after a restart there is none until a round closes.
#[derive(Clone, Debug)]
pub struct PrevRound {
    pub round: u64,
    pub theta: std::sync::Arc<Vec<f32>>,
    pub assignments: Vec<Assignment>,
    /// Each accepted node's update hash.
    pub accepted: Vec<(barnraise_protocol::NodeId, Hash)>,
}

impl PrevRound {
    /// Where `node`'s workers started their tails: θ_{r−1} minus its
    /// decoded update of round r − 1 (`payload` reads a blob), and its
    /// assignment then.
    pub fn tail_start(
        &self,
        node: &barnraise_protocol::NodeId,
        payload: &dyn Fn(&Hash) -> Option<std::sync::Arc<Vec<u8>>>,
    ) -> Result<(Vec<f32>, &Assignment), String> {
        let round = self.round;
        let update = self
            .accepted
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, hash)| hash)
            .ok_or_else(|| format!("round {round} accepted no update of the node"))?;
        let assignment = self
            .assignments
            .iter()
            .find(|a| a.node == *node)
            .ok_or_else(|| format!("the node had no assignment in round {round}"))?;
        let bytes = payload(update)
            .ok_or_else(|| format!("its update of round {round} is no longer stored"))?;
        let mut decoded = vec![0.0f32; self.theta.len()];
        barnraise_protocol::codec::decode_into(&bytes, &mut decoded)
            .map_err(|e| format!("its update of round {round} does not decode: {e}"))?;
        Ok((
            barnraise_trainer::train::tail_start(&self.theta, &decoded),
            assignment,
        ))
    }
}

/// What a replay of a share with `carried` steps needs of round r − 1.
struct TailInput<'a> {
    round: u64,
    start: &'a [f32],
    assignment: &'a Assignment,
}

/// Worker `index`'s tokens and batch seed in `assignment`.
fn worker_share_tokens(
    run: &RunConfig,
    assignment: &Assignment,
    index: u32,
    shard_tokens: &dyn crate::store::ShardTokens,
) -> Result<(Vec<u16>, u64), String> {
    let workers = assignment.workers.max(1) as usize;
    let shards = assignment.shard_hashes(&run.dataset).map_err(|index| {
        format!(
            "the plan names shard {index}, past the run's {} shards",
            run.dataset.len()
        )
    })?;
    let plans = split_assignment(&shards, assignment.seed, workers);
    let plan = plans.get(index as usize).ok_or_else(|| {
        format!("the node's assignment has {workers} workers, not a worker {index}")
    })?;
    let mut tokens = Vec::new();
    for shard in &plan.shards {
        match shard_tokens.tokens(shard) {
            Some(t) => tokens.extend_from_slice(&t),
            None => return Err(format!("shard {} is not in the dataset", shard.short())),
        }
    }
    Ok((tokens, plan.seed))
}

/// What a replay reads besides the share: the run, the shards' tokens, and
/// for carried steps round r − 1 and its update blobs.
pub struct ReplayInput<'a> {
    pub model: &'a ModelConfig,
    pub run: &'a RunConfig,
    pub shard_tokens: &'a dyn crate::store::ShardTokens,
    pub prev: Option<&'a PrevRound>,
    pub payload: &'a dyn Fn(&Hash) -> Option<std::sync::Arc<Vec<u8>>>,
}

/// Replays worker `share.index` of `assignment` (round `round`) from θ_r
/// and `state`; a share with `carried` steps first replays those from
/// round r − 1 (`input.prev`).
pub fn replay(
    input: &ReplayInput<'_>,
    round: u64,
    theta: &[f32],
    assignment: &Assignment,
    share: &WorkerShare,
    state: &[u8],
) -> SpotResult {
    let unusable = |why: String| SpotResult::unusable(share, why);
    let (model, run, shard_tokens) = (input.model, input.run, input.shard_tokens);
    let tail_start = match (share.carried, input.prev) {
        (0, _) => None,
        (_, Some(prev)) if prev.round.checked_add(1) == Some(round) => {
            match prev.tail_start(&assignment.node, input.payload) {
                Ok(found) => Some(found),
                Err(why) => return unusable(format!("its carried steps: {why}")),
            }
        }
        _ => None,
    };
    let tail = tail_start.as_ref().map(|(start, assignment)| TailInput {
        round: round - 1,
        start,
        assignment,
    });
    let tail = tail.as_ref();
    if share.held_back >= assignment.inner_steps.max(1) || share.held_back > run.overlap_steps {
        return unusable(format!(
            "the share holds back {} of its {} steps (the run allows {})",
            share.held_back, assignment.inner_steps, run.overlap_steps
        ));
    }
    let (tokens, seed) = match worker_share_tokens(run, assignment, share.index, shard_tokens) {
        Ok(found) => found,
        Err(why) => return unusable(why),
    };
    let inner = barnraise_trainer::train::before_commit(
        &barnraise_trainer::train::inner_for_round(run, round, assignment.inner_steps, seed),
        share.held_back,
    );
    // The carried steps: round r − 1's worker share, from where its tail started.
    let carried = match (share.carried, tail) {
        (0, _) => None,
        (steps, _) if steps > run.overlap_steps => {
            return unusable(format!(
                "the share carries {steps} steps; the run allows {}",
                run.overlap_steps
            ));
        }
        (_, None) => {
            return unusable(format!(
                "the share carries steps of round {}, which the coordinator does not hold \
                 (it restarted since)",
                round.saturating_sub(1)
            ));
        }
        (steps, Some(tail)) => {
            if tail.start.len() != theta.len() {
                return unusable("the tail's start is not the size of θ".into());
            }
            let (tokens, seed) =
                match worker_share_tokens(run, tail.assignment, share.index, shard_tokens) {
                    Ok(found) => found,
                    Err(why) => return unusable(format!("its carried steps: {why}")),
                };
            let whole = barnraise_trainer::train::inner_for_round(
                run,
                tail.round,
                tail.assignment.inner_steps,
                seed,
            );
            Some((
                tail.start,
                tokens,
                barnraise_trainer::train::tail_of(&whole, steps),
            ))
        }
    };
    let device = match select(DeviceSpec::Cpu) {
        Ok(device) => device,
        Err(e) => return unusable(format!("no CPU device: {e}")),
    };
    let result = (|| {
        let mut trainer = Trainer::new(model, device, 0)?;
        let mut replayed = 0;
        match &carried {
            Some((start, tokens, tail)) => {
                trainer.set_flat_params(start)?;
                trainer.set_optimizer_state(state)?;
                replayed += trainer.train_inner(tokens, tail)?.tokens;
                let end = trainer.flat_params()?;
                let offset = barnraise_trainer::train::tail_offset(start, &end);
                trainer
                    .set_flat_params(&barnraise_trainer::train::carried_start(theta, &offset))?;
            }
            None => {
                trainer.set_flat_params(theta)?;
                trainer.set_optimizer_state(state)?;
            }
        }
        replayed += trainer.train_inner(&tokens, &inner)?.tokens;
        let local = trainer.flat_params()?;
        Ok::<_, barnraise_trainer::TrainError>((replayed, local))
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

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::codec::{CodecConfig, Encoder};
    use barnraise_protocol::messages::ShardInfo;
    use barnraise_trainer::train::{
        before_commit, carried_start, inner_for_round, tail_of, tail_offset, tail_start,
    };
    use std::collections::HashMap;
    use std::sync::Arc;

    /// A share of round 1 that carried 2 steps of round 0 and held 1 back,
    /// trained as a node trains it; the run and what its replay reads.
    struct Carrying {
        model: ModelConfig,
        run: RunConfig,
        shards: HashMap<Hash, Arc<Vec<u16>>>,
        prev: PrevRound,
        update: Hash,
        payload: Arc<Vec<u8>>,
        theta1: Vec<f32>,
        round1: Assignment,
        share: WorkerShare,
        state: Vec<u8>,
    }

    fn carrying() -> Carrying {
        let model = ModelConfig::preset("tiny").unwrap();
        let node = barnraise_protocol::NodeId::from_bytes([7; 32]);
        let shards: HashMap<Hash, Arc<Vec<u16>>> = (0..2u16)
            .map(|s| {
                let tokens: Vec<u16> = (0..4096u32)
                    .map(|i| ((i * 31 + u32::from(s) * 7) % 250) as u16)
                    .collect();
                (Hash::of(&[s as u8, 0x5a]), Arc::new(tokens))
            })
            .collect();
        let dataset = (0..2u8)
            .map(|s| ShardInfo {
                hash: Hash::of(&[s, 0x5a]),
                tokens: 4096,
                bytes: 8192,
            })
            .collect();
        let run = RunConfig {
            run_id: "overlap".into(),
            model_config_json: String::new(),
            codec: "int8".into(),
            inner_steps: 4,
            batch_size: 2,
            seq_len: 32,
            inner_lr: 3e-3,
            outer_lr: 1.0,
            outer_momentum: 0.0,
            aggregation: "mean".into(),
            total_rounds: 5,
            overlap_steps: 2,
            dataset,
            held_out: vec![],
        };
        let assignment = |shard: u32, seed: u64| Assignment {
            node,
            shards: vec![shard],
            seed,
            inner_steps: 4,
            workers: 1,
        };
        let (round0, round1) = (assignment(0, 11), assignment(1, 12));
        let (tokens0, seed0) = worker_share_tokens(&run, &round0, 0, &shards).unwrap();
        let (tokens1, seed1) = worker_share_tokens(&run, &round1, 0, &shards).unwrap();
        let device = select(DeviceSpec::Cpu).unwrap();
        let mut node_trainer = Trainer::new(&model, device, 0).unwrap();
        let theta0 = node_trainer.flat_params().unwrap();
        // Round 0: two of four steps before the commit; int8, so the
        // decoded update is not the update.
        let whole0 = inner_for_round(&run, 0, 4, seed0);
        node_trainer
            .train_inner(&tokens0, &before_commit(&whole0, 2))
            .unwrap();
        let local = node_trainer.flat_params().unwrap();
        let delta0: Vec<f32> = theta0.iter().zip(&local).map(|(t, l)| t - l).collect();
        let payload = Arc::new(
            Encoder::new(CodecConfig::int8_default(), delta0.len())
                .unwrap()
                .encode(&delta0)
                .unwrap(),
        );
        let decoded = barnraise_protocol::codec::decode(&payload, delta0.len()).unwrap();
        // The tail, after the commit.
        let start = tail_start(&theta0, &decoded);
        node_trainer.set_flat_params(&start).unwrap();
        let state = node_trainer.optimizer_state().unwrap();
        node_trainer
            .train_inner(&tokens0, &tail_of(&whole0, 2))
            .unwrap();
        let offset = tail_offset(&start, &node_trainer.flat_params().unwrap());
        // θ_1 is whatever the manifest made it.
        let theta1: Vec<f32> = theta0
            .iter()
            .zip(&decoded)
            .map(|(t, d)| t - 0.5 * d)
            .collect();
        // Round 1 from θ_1 plus the tail, holding one step back.
        node_trainer
            .set_flat_params(&carried_start(&theta1, &offset))
            .unwrap();
        node_trainer
            .train_inner(
                &tokens1,
                &before_commit(&inner_for_round(&run, 1, 4, seed1), 1),
            )
            .unwrap();
        let local = node_trainer.flat_params().unwrap();
        let delta1: Vec<f32> = theta1.iter().zip(&local).map(|(t, l)| t - l).collect();
        let share = WorkerShare {
            index: 0,
            tokens: (2 + 3) * 2 * 32,
            delta_hash: Hash::of_f32s(&delta1),
            delta_sketch: share_sketch(&delta1),
            state_hash: Hash::of(&state),
            carried: 2,
            held_back: 1,
        };
        let update = Hash::of(&payload);
        Carrying {
            prev: PrevRound {
                round: 0,
                theta: Arc::new(theta0),
                assignments: vec![round0],
                accepted: vec![(node, update)],
            },
            model,
            run,
            shards,
            update,
            payload,
            theta1,
            round1,
            share,
            state,
        }
    }

    fn replay_of(c: &Carrying, share: &WorkerShare, prev: Option<&PrevRound>) -> SpotResult {
        let payload = |hash: &Hash| (*hash == c.update).then(|| c.payload.clone());
        let input = ReplayInput {
            model: &c.model,
            run: &c.run,
            shard_tokens: &c.shards,
            prev,
            payload: &payload,
        };
        replay(&input, 1, &c.theta1, &c.round1, share, &c.state)
    }

    #[test]
    fn carried_steps_replay_exactly_and_a_wrong_count_does_not() {
        let c = carrying();
        let result = replay_of(&c, &c.share, Some(&c.prev));
        assert!(result.exact && result.passes(0.0), "{}", result.describe());
        assert_eq!(result.replayed_tokens, c.share.tokens);

        // One carried step claimed where two were trained.
        let fewer = WorkerShare {
            carried: 1,
            tokens: (1 + 3) * 2 * 32,
            ..c.share.clone()
        };
        let result = replay_of(&c, &fewer, Some(&c.prev));
        assert!(
            !result.exact && result.unusable.is_none(),
            "{}",
            result.describe()
        );
        // Held back two where one was.
        let more = WorkerShare {
            held_back: 2,
            ..c.share.clone()
        };
        assert!(!replay_of(&c, &more, Some(&c.prev)).passes(0.0));
        // More than the run allows either way.
        for share in [
            WorkerShare {
                carried: 3,
                ..c.share.clone()
            },
            WorkerShare {
                held_back: 3,
                ..c.share.clone()
            },
        ] {
            let result = replay_of(&c, &share, Some(&c.prev));
            assert!(result.unusable.is_some(), "{}", result.describe());
        }
    }

    #[test]
    fn carried_steps_without_the_last_round_cannot_be_replayed() {
        let c = carrying();
        // After a restart the coordinator holds no round 0.
        let result = replay_of(&c, &c.share, None);
        assert!(
            result
                .unusable
                .as_deref()
                .is_some_and(|w| w.contains("does not hold")),
            "{}",
            result.describe()
        );
        // The update of round 0 is gone from the store.
        let gone = PrevRound {
            accepted: vec![(c.prev.accepted[0].0, Hash::of(b"elsewhere"))],
            ..c.prev.clone()
        };
        let result = replay_of(&c, &c.share, Some(&gone));
        assert!(
            result
                .unusable
                .as_deref()
                .is_some_and(|w| w.contains("no longer stored")),
            "{}",
            result.describe()
        );
        // Another node's round: it had no accepted update there.
        let other = PrevRound {
            accepted: vec![],
            ..c.prev.clone()
        };
        assert!(replay_of(&c, &c.share, Some(&other)).unusable.is_some());
    }
}
