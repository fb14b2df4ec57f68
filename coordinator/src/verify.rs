//! The verification pipeline, stages 1–3 (docs/protocol.md, "Verification and reject reasons"),
//! cheapest first; stage 4 (usefulness) is in [`crate::probe`].
//!
//! 1. envelope: the signature (here) and node, round, duplicate and size
//!    rules (in [`crate::rounds::Rounds::commit`], which knows the round);
//! 2. payload: the fetched bytes hash to the commit, decode with the run's
//!    codec, have the model's length, are all finite;
//! 3. statistics over the round: copies of an earlier committer's update,
//!    norm against the round's median, direction against the coordinate-wise
//!    median (a robust centre a minority cannot drag); all of it on each
//!    update's norm and count sketch, so the cost is linear in the round's
//!    size and independent of the model's (docs/scaling.md).
//!
//! Every rejection is a [`RejectReason`]; nothing here panics on any input.

use crate::config::VerifyConfig;
use barnraise_protocol::codec::{self, CodecConfig, CodecError};
use barnraise_protocol::messages::{Commit, RejectReason};
use barnraise_protocol::{Hash, NodeId, Signed};
use std::collections::HashMap;

/// Stage 1, signature: opens a signed commit, naming its signer.
pub fn open_commit(signed: &Signed<Commit>) -> Result<(NodeId, Commit, Hash), RejectReason> {
    match signed.verify(None) {
        Ok(commit) => Ok((NodeId(signed.signer), commit, signed.body_hash())),
        Err(barnraise_protocol::signed::SignedError::Wire(_))
            if signed.body.len() > barnraise_protocol::limits::MAX_COMMIT_BYTES =>
        {
            Err(RejectReason::Oversized)
        }
        Err(barnraise_protocol::signed::SignedError::Wire(e)) => {
            Err(RejectReason::undecodable(e.to_string()))
        }
        Err(_) => Err(RejectReason::BadSignature),
    }
}

/// Stage 2: checks a fetched payload against its commit and the run, and
/// returns the dense update for stage 3.
pub fn check_payload(
    payload: &[u8],
    commit: &Commit,
    codec_config: CodecConfig,
    params: usize,
) -> Result<Vec<f32>, RejectReason> {
    if payload.len() as u64 != commit.update_bytes || Hash::of(payload) != commit.update_hash {
        return Err(RejectReason::HashMismatch);
    }
    let header =
        codec::peek_header(payload).map_err(|e| RejectReason::undecodable(e.to_string()))?;
    if header.config != codec_config {
        return Err(RejectReason::undecodable(format!(
            "payload uses codec {}, the run uses {codec_config}",
            header.config
        )));
    }
    if header.params != params as u64 {
        return Err(RejectReason::WrongLength);
    }
    let dense = codec::decode(payload, params).map_err(|e| match e {
        CodecError::NonFiniteValue { .. }
        | CodecError::BadScale { .. }
        | CodecError::BadRange { .. } => RejectReason::NonFinite,
        other => RejectReason::undecodable(other.to_string()),
    })?;
    // The codec already refuses non-finite values; this is the contract, checked once more.
    if dense.iter().any(|v| !v.is_finite()) {
        return Err(RejectReason::NonFinite);
    }
    Ok(dense)
}

/// L2 norm, accumulated in f64.
pub fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

thread_local! {
    /// Full-vector cosines computed on this thread (O(P) each): stage 3
    /// computes one per update, never one per pair. Tests count them.
    pub static FULL_COSINES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    FULL_COSINES.with(|n| n.set(n.get() + 1));
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let (na, nb) = (norm(a), norm(b));
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Coordinate-wise median (the lower median for an even count).
pub fn coordinate_median(updates: &[&[f32]]) -> Vec<f32> {
    let Some(first) = updates.first() else {
        return Vec::new();
    };
    let n = updates.len();
    let mut column = Vec::with_capacity(n);
    (0..first.len())
        .map(|i| {
            column.clear();
            column.extend(updates.iter().map(|u| u.get(i).copied().unwrap_or(0.0)));
            column.sort_by(f32::total_cmp);
            column[(n - 1) / 2]
        })
        .collect()
}

/// What stage 3 measured about one update (kept for the ledger and metrics).
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateStats {
    pub norm: f64,
    /// Cosine to the round's robust centre, when there were enough updates to have one.
    pub cosine_to_centre: Option<f64>,
    /// The update's direction, for copy and replay checks in later rounds.
    pub sketch: Sketch,
}

/// Buckets of an update's sketch.
pub const SKETCH_DIM: usize = 1024;

/// A count sketch of an update: coordinate i adds ±x_i to one of
/// [`SKETCH_DIM`] buckets, bucket and sign drawn from a seeded hash of i.
/// Linear, so a scaled copy has exactly the sketch of the original, scaled;
/// inner products are preserved in expectation, so the cosine of two
/// sketches estimates the cosine of the updates (standard deviation about
/// (1 − c²)/√D: 0.011 at c = 0.8). Costs one pass over the update and
/// 8 KiB to keep (1,024 f64), where comparing full vectors costs O(P) per pair.
#[derive(Clone, Debug, PartialEq)]
pub struct Sketch {
    buckets: Vec<f64>,
    norm: f64,
    /// Its keys in the copy index, computed once: a sketch stays in the
    /// replay window for 8 rounds.
    keys: std::sync::OnceLock<[u64; BANDS]>,
}

impl Sketch {
    pub fn of(values: &[f32], seed: u64) -> Sketch {
        let mut buckets = vec![0.0f64; SKETCH_DIM];
        for (i, &v) in values.iter().enumerate() {
            let h = splitmix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let bucket = (h % SKETCH_DIM as u64) as usize;
            let value = f64::from(v);
            buckets[bucket] += if h >> 63 == 1 { -value } else { value };
        }
        let norm = buckets.iter().map(|b| b * b).sum::<f64>().sqrt();
        Sketch {
            buckets,
            norm,
            keys: std::sync::OnceLock::new(),
        }
    }

    /// The coordinate-wise median of sketches (the lower median for an even count).
    pub fn median<'a>(sketches: impl Iterator<Item = &'a Sketch>) -> Sketch {
        let all: Vec<&Sketch> = sketches.collect();
        let mut column = Vec::with_capacity(all.len());
        let buckets: Vec<f64> = (0..SKETCH_DIM)
            .map(|d| {
                column.clear();
                column.extend(all.iter().map(|s| s.buckets[d]));
                column.sort_by(f64::total_cmp);
                column
                    .get(column.len().saturating_sub(1) / 2)
                    .copied()
                    .unwrap_or(0.0)
            })
            .collect();
        let norm = buckets.iter().map(|b| b * b).sum::<f64>().sqrt();
        Sketch {
            buckets,
            norm,
            keys: std::sync::OnceLock::new(),
        }
    }

    /// Its keys in the copy index ([`band_keys`]).
    fn keys(&self) -> &[u64; BANDS] {
        self.keys.get_or_init(|| band_keys(self))
    }

    /// The cosine between two sketches (0 when either is zero).
    pub fn cosine(&self, other: &Sketch) -> f64 {
        if self.norm == 0.0 || other.norm == 0.0 {
            return 0.0;
        }
        let dot: f64 = self
            .buckets
            .iter()
            .zip(&other.buckets)
            .map(|(a, b)| a * b)
            .sum();
        dot / (self.norm * other.norm)
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// An update accepted in an earlier round, remembered by its sketch so a
/// replay of it is caught.
#[derive(Clone, Debug, PartialEq)]
pub struct RecentUpdate {
    pub node: NodeId,
    pub round: u64,
    pub sketch: Sketch,
}

/// One update entering stage 3: who sent it, its content hash, its dense values.
pub struct RoundUpdate<'a> {
    pub node: NodeId,
    pub hash: Hash,
    pub values: &'a [f32],
}

/// What stage 3 needs of an update: O(1) in the model's size, so a round's
/// statistics never hold the dense updates at once (the close decodes one
/// at a time, [`UpdateSummary::of`], and drops it).
#[derive(Clone, Debug)]
pub struct UpdateSummary {
    pub node: NodeId,
    pub hash: Hash,
    pub norm: f64,
    pub sketch: Sketch,
    /// The inner steps the node was planned for (`crate::pace` varies them):
    /// the norm check compares `norm / √steps`, since an update of more
    /// steps moves further.
    pub steps: u32,
}

impl UpdateSummary {
    pub fn of(update: &RoundUpdate<'_>, sketch_seed: u64) -> UpdateSummary {
        UpdateSummary {
            node: update.node,
            hash: update.hash,
            norm: norm(update.values),
            sketch: Sketch::of(update.values, sketch_seed),
            steps: 1,
        }
    }

    /// The same summary for an update of `steps` planned inner steps.
    pub fn with_steps(mut self, steps: u32) -> UpdateSummary {
        self.steps = steps.max(1);
        self
    }

    /// The norm the round's norm check compares.
    fn norm_per_step(&self) -> f64 {
        self.norm / f64::from(self.steps.max(1)).sqrt()
    }
}

/// Stage 3's verdicts, one per update in commit order, and how many pairs
/// of sketches it compared (the copy and replay checks' cost).
pub struct Statistics {
    pub verdicts: Vec<(Result<(), RejectReason>, UpdateStats)>,
    pub comparisons: u64,
}

/// The fewest updates for which a median says anything about an outlier.
pub const MIN_UPDATES_FOR_STATISTICS: usize = 3;

/// Stage 3 over a round's updates, given in commit order. Returns one
/// verdict per update, in the same order.
pub fn round_statistics(
    updates: &[RoundUpdate<'_>],
    cfg: &VerifyConfig,
    sketch_seed: u64,
    recent: &[RecentUpdate],
) -> Vec<(Result<(), RejectReason>, UpdateStats)> {
    let summaries = updates
        .iter()
        .map(|u| UpdateSummary::of(u, sketch_seed))
        .collect();
    judge_round(summaries, cfg, recent).verdicts
}

/// Bands of the copy index: an update is compared only with updates that
/// share all [`BAND_BITS`] signs of at least one band (docs/scaling.md).
pub const BANDS: usize = 8;
/// Sign bits per band.
pub const BAND_BITS: usize = 64;
/// Most earlier updates one update is compared with. Honest rounds come
/// nowhere near it; it bounds what a crowd of near-identical updates (each
/// just under the duplicate threshold) can cost, at the price of possibly
/// missing a copy hidden behind that crowd, which the probe and spot checks
/// still face.
pub const MAX_CANDIDATES: usize = 256;

/// The random hyperplanes of the copy index: `BANDS × BAND_BITS` rows of
/// ±1 over the sketch's buckets, from a fixed seed. They need not be secret:
/// whoever could steer an update across them could as well push its cosine
/// under `duplicate_cosine`, which the check never claimed to stop.
fn hyperplanes() -> &'static [Vec<f64>] {
    static PLANES: std::sync::OnceLock<Vec<Vec<f64>>> = std::sync::OnceLock::new();
    PLANES.get_or_init(|| {
        (0..BANDS * BAND_BITS)
            .map(|row| {
                (0..SKETCH_DIM)
                    .map(|col| {
                        let h =
                            splitmix64(0x6261_726E_7261_6973 ^ ((row * SKETCH_DIM + col) as u64));
                        if h >> 63 == 1 { -1.0 } else { 1.0 }
                    })
                    .collect()
            })
            .collect()
    })
}

/// The keys of a sketch in the copy index, one per band: the signs of its
/// projections on the band's hyperplanes (SimHash). Two sketches at angle
/// α agree on one sign with probability 1 − α/π, so on a whole band with
/// (1 − α/π)^64: at the duplicate threshold (cosine 0.9999) 0.75 per band,
/// and with 8 bands a pair is missed with probability 1.6·10⁻⁵; an exact or
/// scaled copy has the same keys and is never missed. Honest updates at
/// cosine 0.8 collide on some band with probability 3.4·10⁻⁶, at 0.95 with
/// 0.009: the comparisons stay about linear in the round's size.
fn band_keys(sketch: &Sketch) -> [u64; BANDS] {
    let planes = hyperplanes();
    let mut keys = [0u64; BANDS];
    for (band, key) in keys.iter_mut().enumerate() {
        for bit in 0..BAND_BITS {
            let plane = &planes[band * BAND_BITS + bit];
            let dot: f64 = plane.iter().zip(&sketch.buckets).map(|(p, b)| p * b).sum();
            if dot >= 0.0 {
                *key |= 1 << bit;
            }
        }
    }
    keys
}

/// Sketches indexed by band key, for candidate pairs.
#[derive(Default)]
struct CopyIndex {
    buckets: HashMap<(usize, u64), Vec<usize>>,
}

impl CopyIndex {
    fn insert(&mut self, keys: &[u64; BANDS], index: usize) {
        for (band, &key) in keys.iter().enumerate() {
            self.buckets.entry((band, key)).or_default().push(index);
        }
    }

    /// Everything sharing a band with `keys`, ascending, once each.
    fn candidates(&self, keys: &[u64; BANDS]) -> Vec<usize> {
        let mut found: Vec<usize> = keys
            .iter()
            .enumerate()
            .filter_map(|(band, key)| self.buckets.get(&(band, *key)))
            .flatten()
            .copied()
            .collect();
        found.sort_unstable();
        found.dedup();
        found
    }
}

/// Stage 3 over a round's summaries, in commit order: copies and replays
/// (through the copy index, so not every pair is compared), norm against
/// the median, direction against the coordinate-wise median of the sketches.
pub fn judge_round(
    updates: Vec<UpdateSummary>,
    cfg: &VerifyConfig,
    recent: &[RecentUpdate],
) -> Statistics {
    let mut verdicts: Vec<Result<(), RejectReason>> = vec![Ok(()); updates.len()];
    let mut comparisons = 0u64;

    // Copies and replays, by direction whatever the scale. The first
    // committer keeps the credit; an update that repeats an earlier round's
    // is a replay. Identical payloads have identical sketches, so they
    // meet in the index too.
    let mut past = CopyIndex::default();
    for (i, old) in recent.iter().enumerate() {
        past.insert(old.sketch.keys(), i);
    }
    let mut index = CopyIndex::default();
    for j in 0..updates.len() {
        if updates[j].norm == 0.0 {
            // Nothing to copy and no direction: every zero update would
            // share every band.
            verdicts[j] = Err(RejectReason::NormTooSmall);
            continue;
        }
        let keys = *updates[j].sketch.keys();
        for i in index.candidates(&keys).into_iter().take(MAX_CANDIDATES) {
            comparisons += 1;
            if updates[i].hash == updates[j].hash
                || updates[i].sketch.cosine(&updates[j].sketch) > cfg.duplicate_cosine
            {
                verdicts[j] = Err(RejectReason::Copycat {
                    of: updates[i].node,
                });
                break;
            }
        }
        if verdicts[j].is_ok() {
            for i in past.candidates(&keys).into_iter().take(MAX_CANDIDATES) {
                comparisons += 1;
                if updates[j].sketch.cosine(&recent[i].sketch) > cfg.duplicate_cosine {
                    verdicts[j] = Err(RejectReason::Replay {
                        of: recent[i].node,
                        round: recent[i].round,
                    });
                    break;
                }
            }
        }
        if verdicts[j].is_ok() {
            index.insert(&keys, j);
        }
    }
    // Norm against the median of the remaining updates.
    let live: Vec<usize> = (0..updates.len())
        .filter(|&i| verdicts[i].is_ok())
        .collect();
    if live.len() >= MIN_UPDATES_FOR_STATISTICS {
        let mut sorted: Vec<f64> = live.iter().map(|&i| updates[i].norm_per_step()).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[(sorted.len() - 1) / 2];
        for &i in &live {
            let scaled = updates[i].norm_per_step();
            if scaled > cfg.max_norm_ratio * median {
                verdicts[i] = Err(RejectReason::NormTooLarge);
            } else if scaled < cfg.min_norm_ratio * median {
                verdicts[i] = Err(RejectReason::NormTooSmall);
            }
        }
    }

    // Direction against the coordinate-wise median of what is still in,
    // taken over the sketches: a robust centre a minority cannot drag, at
    // O(D) per update instead of O(P) (the sketch's cosine estimates the
    // full one, standard deviation about (1 − c²)/√D).
    let live: Vec<usize> = (0..updates.len())
        .filter(|&i| verdicts[i].is_ok())
        .collect();
    let mut cosines = vec![None; updates.len()];
    if live.len() >= MIN_UPDATES_FOR_STATISTICS {
        let centre = Sketch::median(live.iter().map(|&i| &updates[i].sketch));
        for &i in &live {
            let c = updates[i].sketch.cosine(&centre);
            cosines[i] = Some(c);
            if c < cfg.min_cosine {
                verdicts[i] = Err(RejectReason::SignFlipped);
            }
        }
    }
    let verdicts = verdicts
        .into_iter()
        .zip(updates)
        .zip(cosines)
        .map(|((v, u), cosine_to_centre)| {
            (
                v,
                UpdateStats {
                    norm: u.norm,
                    cosine_to_centre,
                    sketch: u.sketch,
                },
            )
        })
        .collect();
    Statistics {
        verdicts,
        comparisons,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use barnraise_protocol::SigningKey;
    use barnraise_protocol::codec::Encoder;

    /// A synthetic honest update: a direction shared by every node plus a
    /// per-node wiggle (cosine between two of them is about 0.8).
    pub(crate) fn honest(seed: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let base = ((i * 37 % 101) as f32 / 101.0) - 0.5;
                let noise = (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97) % 1000)
                    as f32
                    / 1000.0
                    - 0.5)
                    * 0.3;
                (base + noise) * 0.01
            })
            .collect()
    }

    fn commit_for(payload: &[u8]) -> Commit {
        Commit {
            run_id: "r".into(),
            round: 0,
            base_params_hash: Hash::ZERO,
            update_hash: Hash::of(payload),
            update_bytes: payload.len() as u64,
            tokens: 10,
            losses: vec![],
            compute_ms: 1,
            workers: 1,
            shares: vec![],
        }
    }

    #[test]
    fn signed_garbage_is_bad_signature() {
        let key = SigningKey::from_seed([3; 32]).unwrap();
        let commit = commit_for(b"x");
        let mut signed = Signed::sign(&key, &commit).unwrap();
        assert!(open_commit(&signed).is_ok());
        signed.body[3] ^= 0x40;
        assert_eq!(open_commit(&signed).err(), Some(RejectReason::BadSignature));
        let mut forged = Signed::sign(&key, &commit).unwrap();
        forged.signer = SigningKey::from_seed([4; 32]).unwrap().public();
        assert_eq!(open_commit(&forged).err(), Some(RejectReason::BadSignature));
    }

    #[test]
    fn payload_checks_name_each_fault() {
        let values = honest(1, 64);
        let payload = Encoder::new(CodecConfig::Fp32, 64)
            .unwrap()
            .encode(&values)
            .unwrap();
        let commit = commit_for(&payload);
        assert_eq!(
            check_payload(&payload, &commit, CodecConfig::Fp32, 64).unwrap(),
            values
        );

        let mut tampered = payload.clone();
        tampered[40] ^= 1;
        assert_eq!(
            check_payload(&tampered, &commit, CodecConfig::Fp32, 64),
            Err(RejectReason::HashMismatch)
        );

        assert_eq!(
            check_payload(&payload, &commit, CodecConfig::Fp32, 65),
            Err(RejectReason::WrongLength)
        );
        assert!(matches!(
            check_payload(&payload, &commit, CodecConfig::int8_default(), 64),
            Err(RejectReason::Undecodable(_))
        ));

        // NaN written straight into an fp32 payload (the encoder itself refuses NaN).
        let mut nan = payload.clone();
        let at = codec::HEADER_LEN + 4 * 5;
        nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            check_payload(&nan, &commit_for(&nan), CodecConfig::Fp32, 64),
            Err(RejectReason::NonFinite)
        );

        let garbage = vec![0xAB; 100];
        assert!(matches!(
            check_payload(&garbage, &commit_for(&garbage), CodecConfig::Fp32, 64),
            Err(RejectReason::Undecodable(_))
        ));
    }

    fn run(updates: &[(u8, Vec<f32>)]) -> Vec<Result<(), RejectReason>> {
        let list: Vec<RoundUpdate<'_>> = updates
            .iter()
            .map(|(id, v)| RoundUpdate {
                node: NodeId::from_bytes([*id; 32]),
                hash: Hash::of_f32s(v),
                values: v,
            })
            .collect();
        round_statistics(&list, &VerifyConfig::default(), 7, &[])
            .into_iter()
            .map(|(v, _)| v)
            .collect()
    }

    #[test]
    fn statistics_pass_honest_updates() {
        let updates: Vec<(u8, Vec<f32>)> =
            (1..=4).map(|i| (i, honest(u32::from(i), 500))).collect();
        assert!(
            run(&updates).iter().all(|v| v.is_ok()),
            "{:?}",
            run(&updates)
        );
    }

    #[test]
    fn scaled_copies_and_replays_are_caught_by_direction() {
        let original = honest(1, 20_000);
        let node = |n: u8| NodeId::from_bytes([n; 32]);
        let values: Vec<(u8, Vec<f32>)> = vec![
            (1, original.clone()),
            (2, honest(2, 20_000)),
            (3, original.iter().map(|v| v * 1.02).collect()),
            (4, original.iter().map(|v| v * 0.5).collect()),
            (5, honest(5, 20_000)),
        ];
        let hashes: Vec<Hash> = values.iter().map(|(n, _)| Hash::of(&[*n])).collect();
        let list: Vec<RoundUpdate<'_>> = values
            .iter()
            .zip(&hashes)
            .map(|((n, v), h)| RoundUpdate {
                node: node(*n),
                hash: *h,
                values: v,
            })
            .collect();
        let before = FULL_COSINES.with(|n| n.get());
        let verdicts = round_statistics(&list, &VerifyConfig::default(), 7, &[]);
        let full = FULL_COSINES.with(|n| n.get()) - before;
        let verdicts: Vec<_> = verdicts.into_iter().map(|(v, _)| v).collect();
        assert_eq!(verdicts[0], Ok(()));
        assert_eq!(verdicts[1], Ok(()));
        assert_eq!(
            verdicts[2],
            Err(RejectReason::Copycat { of: node(1) }),
            "x1.02"
        );
        assert_eq!(
            verdicts[3],
            Err(RejectReason::Copycat { of: node(1) }),
            "x0.5"
        );
        assert_eq!(verdicts[4], Ok(()));
        // No full-length cosine at all: the centre and every comparison are
        // taken on sketches (the first version computed one per pair: 10 here).
        assert_eq!(full, 0);

        // A later round: node 5 sends node 2's old update, scaled.
        let recent = vec![RecentUpdate {
            node: node(2),
            round: 3,
            sketch: Sketch::of(&values[1].1, 7),
        }];
        let replayed: Vec<f32> = values[1].1.iter().map(|v| v * 1.3).collect();
        let fresh = honest(9, 20_000);
        let list = vec![
            RoundUpdate {
                node: node(5),
                hash: Hash::of(b"a"),
                values: &replayed,
            },
            RoundUpdate {
                node: node(9),
                hash: Hash::of(b"b"),
                values: &fresh,
            },
        ];
        let verdicts = round_statistics(&list, &VerifyConfig::default(), 7, &recent);
        assert_eq!(
            verdicts[0].0,
            Err(RejectReason::Replay {
                of: node(2),
                round: 3
            })
        );
        assert_eq!(verdicts[1].0, Ok(()));
    }

    #[test]
    fn copy_detection_compares_about_linearly_many_pairs() {
        // 1,000 honest updates (pairwise cosine about 0.8), with a scaled
        // copy of every hundredth one committed later.
        let n = 1000;
        // A shared direction plus independent noise of half its norm.
        let shared = honest(0, 3000);
        let noisy = |seed: u64| -> Vec<f32> {
            shared
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let h = splitmix64(seed.wrapping_mul(0x1_0000_0001) ^ i as u64);
                    b + ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.005
                })
                .collect()
        };
        let mut values: Vec<Vec<f32>> = (0..n as u64).map(noisy).collect();
        let c = cosine(&values[0], &values[1]);
        assert!((0.6..0.95).contains(&c), "honest pairs at cosine {c}");
        for k in 0..10 {
            let copy: Vec<f32> = values[k * 100].iter().map(|v| v * 1.5).collect();
            values.push(copy);
        }
        let node = |i: usize| NodeId::from_bytes(Hash::of(&i.to_le_bytes()).0);
        let summaries: Vec<UpdateSummary> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                UpdateSummary::of(
                    &RoundUpdate {
                        node: node(i),
                        hash: Hash::of_f32s(v),
                        values: v,
                    },
                    7,
                )
            })
            .collect();
        let stats = judge_round(summaries, &VerifyConfig::default(), &[]);
        for k in 0..10 {
            assert_eq!(
                stats.verdicts[n + k].0,
                Err(RejectReason::Copycat { of: node(k * 100) })
            );
        }
        let rejected = stats.verdicts.iter().filter(|(v, _)| v.is_err()).count();
        assert_eq!(rejected, 10, "only the copies");
        // Every pair would be 509,545 comparisons; the index makes ten (the
        // copies meeting their originals) plus chance collisions.
        assert!(
            stats.comparisons <= 10 + n as u64 / 10,
            "{} comparisons",
            stats.comparisons
        );
        assert!(stats.comparisons >= 10);
    }

    #[test]
    fn the_norm_check_allows_for_a_nodes_planned_steps() {
        let node = |i: u8| NodeId::from_bytes([i; 32]);
        // Five honest updates of one step each; node 0's is five times longer.
        let mut values: Vec<Vec<f32>> = (0..5).map(|i| honest(i, 512)).collect();
        values[0].iter_mut().for_each(|v| *v *= 5.0);
        let judge = |steps: u32| {
            let summaries = values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let update = RoundUpdate {
                        node: node(i as u8),
                        hash: Hash::of_f32s(v),
                        values: v,
                    };
                    let planned = if i == 0 { steps } else { 1 };
                    UpdateSummary::of(&update, 7).with_steps(planned)
                })
                .collect();
            judge_round(summaries, &VerifyConfig::default(), &[]).verdicts[0]
                .0
                .clone()
        };
        // Planned for one step like the others, it is an outlier.
        assert_eq!(judge(1), Err(RejectReason::NormTooLarge));
        // Planned for 16 steps (`crate::pace` gives fast nodes more),
        // 5× the norm is 1.25× per √step: in.
        assert_eq!(judge(16), Ok(()));
    }

    #[test]
    fn a_crowd_of_zero_updates_costs_no_comparisons() {
        let zeros = vec![vec![0.0f32; 100]; 200];
        let summaries: Vec<UpdateSummary> = zeros
            .iter()
            .enumerate()
            .map(|(i, v)| {
                UpdateSummary::of(
                    &RoundUpdate {
                        node: NodeId::from_bytes([i as u8; 32]),
                        hash: Hash::of(&i.to_le_bytes()),
                        values: v,
                    },
                    7,
                )
            })
            .collect();
        let stats = judge_round(summaries, &VerifyConfig::default(), &[]);
        assert_eq!(stats.comparisons, 0);
        assert!(
            stats
                .verdicts
                .iter()
                .all(|(v, _)| *v == Err(RejectReason::NormTooSmall))
        );
    }

    #[test]
    fn sketch_cosines_track_full_cosines() {
        for (a, b) in [(1, 2), (3, 4), (5, 6)] {
            let (x, y) = (honest(a, 50_000), honest(b, 50_000));
            let full = cosine(&x, &y);
            let sketched = Sketch::of(&x, 11).cosine(&Sketch::of(&y, 11));
            assert!(
                (full - sketched).abs() < 0.05,
                "full {full:.4}, sketched {sketched:.4}"
            );
        }
        let x = honest(1, 1000);
        let flipped: Vec<f32> = x.iter().map(|v| -v).collect();
        assert!((Sketch::of(&x, 1).cosine(&Sketch::of(&flipped, 1)) + 1.0).abs() < 1e-9);
        assert_eq!(Sketch::of(&[0.0; 10], 1).cosine(&Sketch::of(&x, 1)), 0.0);
    }

    #[test]
    fn statistics_catch_huge_tiny_flipped_and_copies() {
        let a = honest(1, 500);
        let huge: Vec<f32> = honest(2, 500).iter().map(|v| v * 1000.0).collect();
        let flipped: Vec<f32> = honest(3, 500).iter().map(|v| -v).collect();
        let zero = vec![0.0f32; 500];
        let tiny: Vec<f32> = honest(6, 500).iter().map(|v| v * 1e-4).collect();
        let copy = a.clone();
        let near_copy: Vec<f32> = a.iter().map(|v| v * 1.000_01).collect();
        let updates = vec![
            (1, a),
            (2, huge),
            (3, flipped),
            (4, honest(4, 500)),
            (5, honest(5, 500)),
            (6, zero),
            (7, copy),
            (8, near_copy),
            (9, tiny),
        ];
        let verdicts = run(&updates);
        let first = NodeId::from_bytes([1; 32]);
        assert_eq!(verdicts[0], Ok(()));
        assert_eq!(verdicts[1], Err(RejectReason::NormTooLarge));
        assert_eq!(verdicts[2], Err(RejectReason::SignFlipped));
        assert_eq!(verdicts[3], Ok(()));
        assert_eq!(verdicts[4], Ok(()));
        assert_eq!(verdicts[5], Err(RejectReason::NormTooSmall));
        assert_eq!(
            verdicts[6],
            Err(RejectReason::Copycat { of: first }),
            "exact copy: the first committer keeps the credit"
        );
        assert_eq!(verdicts[7], Err(RejectReason::Copycat { of: first }));
        assert_eq!(verdicts[8], Err(RejectReason::NormTooSmall));
    }

    #[test]
    fn median_and_cosine() {
        let a = [1.0f32, -5.0, 3.0];
        let b = [2.0f32, 0.0, 3.0];
        let c = [9.0f32, 1.0, -3.0];
        assert_eq!(coordinate_median(&[&a, &b, &c]), vec![2.0, 0.0, 3.0]);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-12);
        assert!((cosine(&a, &a.map(|v| -v)) + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&a, &[0.0; 3]), 0.0);
    }
}
