//! A node's workers: how an assignment is split between them, what each
//! worker's share of a commit says, and which shares the coordinator spot
//! checks (docs/security.md, "Spot checks").
//!
//! A node of N workers commits one update, the token-weighted mean of its
//! workers' pseudo-gradients Δ_i. So that the work behind it can be checked,
//! the commit also carries one [`WorkerShare`] per worker: its tokens, the
//! hash and a small sketch of its Δ_i, and the hash of the worker's inner
//! optimizer state at the start of the round (a blob the node serves until
//! the round closes). After the commit, the coordinator draws a fraction of
//! the shares with a selector only it can compute (its signature over the
//! commit), fetches the drawn workers' states, replays their rounds from θ_r,
//! their shards, seeds and states, and compares the result with the share.
//! A worker that was not trained, or trained less than claimed, cannot
//! produce a state that replays to its committed Δ_i.

use crate::hash::Hash;
use serde::{Deserialize, Serialize};

/// Buckets of a share's sketch of Δ_i.
pub const SHARE_SKETCH_DIM: usize = 32;

/// Seed of every share sketch: fixed, so a sketch means the same on every
/// machine and in every run.
pub const SHARE_SKETCH_SEED: u64 = 0x5eed_5ca1_ab1e_0001;

/// What one worker contributed to a commit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerShare {
    /// The worker's index in the node's split of its assignment.
    pub index: u32,
    /// Tokens the worker trained on.
    pub tokens: u64,
    /// SHA-256 of Δ_i = θ_r − θ_i as f32 little-endian.
    pub delta_hash: Hash,
    /// [`share_sketch`] of Δ_i: how far a replay lands from it, in numbers,
    /// when the hashes differ (a GPU does not replay bit for bit).
    #[serde(deserialize_with = "crate::wire::seq")]
    pub delta_sketch: Vec<f32>,
    /// Hash of the worker's inner optimizer state where its replay begins:
    /// the round's start, or with `carried` steps the start of those.
    pub state_hash: Hash,
    /// Overlap (docs/architecture.md, "Overlapped rounds"): steps of the
    /// previous round's plan this worker trained at the start of this
    /// round, after its previous commit, while that update travelled. They
    /// began from θ_{r−1} minus the node's decoded update of round r − 1
    /// (a point anyone can recompute), on the last `carried` steps' batches
    /// of the worker's round r − 1 share, and what they added moved onto
    /// θ_r, where this round's steps start. Equal to the node's
    /// `held_back` of round r − 1 for the same worker, and 0 when that
    /// update was not accepted.
    pub carried: u32,
    /// Steps of this round's plan the worker trains after this commit (it
    /// committed after the plan's steps minus these); carried into the next.
    pub held_back: u32,
}

/// One worker's part of a node's assignment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerPlan {
    pub index: usize,
    pub shards: Vec<Hash>,
    pub seed: u64,
}

/// The seed worker `index` samples batches with. Worker 0 uses the
/// assignment's seed itself, so a one-worker node trains exactly as before
/// cluster mode existed; the others get seeds derived from it, the same on
/// every machine.
pub fn worker_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut bytes = [0u8; 24];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(b"worker\0\0");
    bytes[16..].copy_from_slice(&(index as u64).to_le_bytes());
    first_u64(&Hash::of(&bytes))
}

/// Splits an assignment's shards between `workers` workers in contiguous,
/// near-equal runs (the first ones take the remainder). The coordinator
/// gives a node of N workers N shares of shards, so each worker normally gets
/// exactly one share. With fewer shards than workers every worker trains on
/// all the shards, each with its own seed, so no worker sits idle and none
/// trains on nothing.
pub fn split_assignment(shards: &[Hash], seed: u64, workers: usize) -> Vec<WorkerPlan> {
    let workers = workers.max(1);
    if shards.len() < workers {
        return (0..workers)
            .map(|index| WorkerPlan {
                index,
                shards: shards.to_vec(),
                seed: worker_seed(seed, index),
            })
            .collect();
    }
    let base = shards.len() / workers;
    let extra = shards.len() % workers;
    let mut start = 0;
    (0..workers)
        .map(|index| {
            let len = base + usize::from(index < extra);
            let plan = WorkerPlan {
                index,
                shards: shards[start..start + len].to_vec(),
                seed: worker_seed(seed, index),
            };
            start += len;
            plan
        })
        .collect()
}

/// A count sketch: coordinate i adds ±x_i to one of `dim` buckets, bucket
/// and sign drawn from a seeded hash of i. Linear, so the sketch of a
/// difference is the difference of the sketches, and inner products and
/// norms are preserved in expectation.
pub fn count_sketch(values: &[f32], seed: u64, dim: usize) -> Vec<f64> {
    let dim = dim.max(1);
    let mut buckets = vec![0.0f64; dim];
    for (i, &v) in values.iter().enumerate() {
        let h = splitmix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let value = f64::from(v);
        buckets[(h % dim as u64) as usize] += if h >> 63 == 1 { -value } else { value };
    }
    buckets
}

/// The sketch a [`WorkerShare`] carries.
pub fn share_sketch(delta: &[f32]) -> Vec<f32> {
    count_sketch(delta, SHARE_SKETCH_SEED, SHARE_SKETCH_DIM)
        .into_iter()
        .map(|b| b as f32)
        .collect()
}

/// ‖claimed − replayed‖ / ‖replayed‖ of two share sketches: about 0 for an
/// honest share replayed on other hardware, about 1 or more for a Δ_i that
/// is not what the replay produces. Infinite when the lengths differ or the
/// replay's sketch is zero and the claim's is not.
pub fn sketch_distance(claimed: &[f32], replayed: &[f32]) -> f64 {
    if claimed.len() != replayed.len() {
        return f64::INFINITY;
    }
    let diff: f64 = claimed
        .iter()
        .zip(replayed)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = replayed
        .iter()
        .map(|b| f64::from(*b).powi(2))
        .sum::<f64>()
        .sqrt();
    if diff == 0.0 {
        0.0
    } else if norm == 0.0 || !diff.is_finite() {
        f64::INFINITY
    } else {
        diff / norm
    }
}

/// Two shares of one commit closer than this cosine (on their sketches, in
/// either sign) are one worker's Δ claimed twice.
pub const COPIED_SHARE_COSINE: f64 = 0.9999;

/// The first pair of shares (by index) that are the same Δ: equal hashes, or
/// sketches pointing the same way whatever their scale. Workers of one node
/// train on different shards with different seeds, so their Δ_i never
/// coincide; a node that claims a worker it did not run by copying one it
/// did is caught here at no cost, before any spot check (docs/security.md).
pub fn copied_shares(shares: &[WorkerShare]) -> Option<(u32, u32)> {
    let norm = |v: &[f32]| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    for (i, a) in shares.iter().enumerate() {
        for b in &shares[i + 1..] {
            if a.delta_hash == b.delta_hash {
                return Some((a.index, b.index));
            }
            let (na, nb) = (norm(&a.delta_sketch), norm(&b.delta_sketch));
            if na == 0.0 || nb == 0.0 || a.delta_sketch.len() != b.delta_sketch.len() {
                continue;
            }
            let dot: f64 = a
                .delta_sketch
                .iter()
                .zip(&b.delta_sketch)
                .map(|(&x, &y)| f64::from(x) * f64::from(y))
                .sum();
            if (dot / (na * nb)).abs() >= COPIED_SHARE_COSINE {
                return Some((a.index, b.index));
            }
        }
    }
    None
}

/// What the coordinator signs to draw the spot checks of one commit: the
/// run, the round, the node, the commit's body hash and the share's index.
/// The signature is unknown to the node until it has committed, and
/// deterministic, so the coordinator can redo the draw when it closes the
/// round and an auditor holding the signature can check it.
pub fn selection_message(
    run_id: &str,
    round: u64,
    node: &[u8; 32],
    commit_body: &Hash,
    index: u32,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + run_id.len());
    m.extend_from_slice(b"barnraise spot check v1\0");
    m.extend_from_slice(&(run_id.len() as u64).to_le_bytes());
    m.extend_from_slice(run_id.as_bytes());
    m.extend_from_slice(&round.to_le_bytes());
    m.extend_from_slice(node);
    m.extend_from_slice(&commit_body.0);
    m.extend_from_slice(&index.to_le_bytes());
    m
}

/// Whether a share is checked: the selector (the coordinator's signature of
/// [`selection_message`]) hashed to a number in [0, 1), below `fraction`.
pub fn is_selected(selector: &[u8], fraction: f64) -> bool {
    if fraction >= 1.0 {
        return true;
    }
    if fraction.is_nan() || fraction <= 0.0 {
        return false;
    }
    (draw_rank(selector) as f64 / 2f64.powi(64)) < fraction
}

/// The selector's draw as a number: shares are selected below the fraction,
/// and replayed lowest first when a round draws more than it may replay.
pub fn draw_rank(selector: &[u8]) -> u64 {
    first_u64(&Hash::of(selector))
}

/// Probability that a node which fakes `faked` of its shares in a round is
/// spot checked on at least one of them, at `fraction` per share; over `rounds`
/// such rounds.
pub fn detection_probability(fraction: f64, faked: u32, rounds: u32) -> f64 {
    let miss = (1.0 - fraction.clamp(0.0, 1.0)).powf(f64::from(faked) * f64::from(rounds));
    1.0 - miss
}

fn first_u64(hash: &Hash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_contiguous_and_seeds_distinct() {
        let shards: Vec<Hash> = (0..5u8).map(|i| Hash::of(&[i])).collect();
        let plans = split_assignment(&shards, 9, 2);
        assert_eq!(plans[0].shards, shards[..3].to_vec());
        assert_eq!(plans[1].shards, shards[3..].to_vec());
        assert_eq!(plans[0].seed, 9, "worker 0 keeps the assignment's seed");
        assert_ne!(plans[1].seed, 9);
        let few = split_assignment(&shards[..1], 9, 3);
        assert!(few.iter().all(|p| p.shards == shards[..1].to_vec()));
        assert_eq!(split_assignment(&shards, 9, 0).len(), 1);
    }

    #[test]
    fn sketches_measure_how_far_a_replay_lands() {
        let delta: Vec<f32> = (0..5000)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-4)
            .collect();
        let same = share_sketch(&delta);
        assert_eq!(same.len(), SHARE_SKETCH_DIM);
        assert_eq!(sketch_distance(&same, &share_sketch(&delta)), 0.0);
        // Rounding noise far below the update: a small distance.
        let noisy: Vec<f32> = delta.iter().map(|x| x * (1.0 + 1e-5)).collect();
        assert!(sketch_distance(&share_sketch(&noisy), &same) < 1e-3);
        // Another update altogether: a distance near or above 1.
        let other: Vec<f32> = delta.iter().rev().copied().collect();
        assert!(sketch_distance(&share_sketch(&other), &same) > 0.5);
        // Nothing trained: all of it is missing.
        let zero = share_sketch(&vec![0.0; 5000]);
        assert!((sketch_distance(&zero, &same) - 1.0).abs() < 1e-9);
        assert_eq!(sketch_distance(&same, &zero), f64::INFINITY);
        assert_eq!(sketch_distance(&same[..3], &same), f64::INFINITY);
    }

    #[test]
    fn selection_follows_the_fraction_and_the_message() {
        let picked = (0..10_000u32)
            .filter(|i| {
                let m = selection_message("run", 3, &[7; 32], &Hash::of(b"c"), *i);
                is_selected(&Hash::of(&m).0, 0.1)
            })
            .count();
        assert!((850..1150).contains(&picked), "{picked} of 10,000 at 10%");
        assert!(is_selected(b"x", 1.0) && !is_selected(b"x", 0.0) && !is_selected(b"x", f64::NAN));
        let a = selection_message("run", 3, &[7; 32], &Hash::of(b"c"), 0);
        assert_ne!(a, selection_message("run", 4, &[7; 32], &Hash::of(b"c"), 0));
        assert_ne!(a, selection_message("run", 3, &[7; 32], &Hash::of(b"d"), 0));
        assert_ne!(a, selection_message("run", 3, &[7; 32], &Hash::of(b"c"), 1));
    }

    #[test]
    fn detection_grows_with_rounds_and_faked_shares() {
        assert!((detection_probability(0.1, 1, 1) - 0.1).abs() < 1e-12);
        assert!((detection_probability(0.1, 3, 10) - (1.0 - 0.9f64.powi(30))).abs() < 1e-12);
        assert_eq!(detection_probability(0.0, 3, 10), 0.0);
    }
}
