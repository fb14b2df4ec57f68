//! The verification pipeline, stages 1–3 (docs/protocol.md, "Verification and reject reasons"),
//! cheapest first; stage 4 (usefulness) is in [`crate::probe`].
//!
//! 1. envelope: the signature (here) and node, round, duplicate and size
//!    rules (in [`crate::rounds::Rounds::commit`], which knows the round);
//! 2. payload: the fetched bytes hash to the commit, decode with the run's
//!    codec, have the model's length, are all finite;
//! 3. statistics over the round: copies of an earlier committer's update,
//!    norm against the round's median, direction against the coordinate-wise
//!    median (a robust centre a minority cannot drag).
//!
//! Every rejection is a [`RejectReason`]; nothing here panics on any input.

use crate::config::VerifyConfig;
use barnraise_protocol::codec::{self, CodecConfig, CodecError};
use barnraise_protocol::messages::{Commit, RejectReason};
use barnraise_protocol::{Hash, NodeId, Signed};

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
        Sketch { buckets, norm }
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
    let norms: Vec<f64> = updates.iter().map(|u| norm(u.values)).collect();
    let mut verdicts: Vec<Result<(), RejectReason>> = vec![Ok(()); updates.len()];

    // Copies and replays, by direction whatever the scale: cosine between
    // sketches (O(P) each, then O(D) per pair). The first committer keeps
    // the credit; an update that repeats an earlier round's is a replay.
    let sketches: Vec<Sketch> = updates
        .iter()
        .map(|u| Sketch::of(u.values, sketch_seed))
        .collect();
    for j in 0..updates.len() {
        for i in 0..j {
            if verdicts[i].is_err() {
                continue;
            }
            if updates[i].hash == updates[j].hash
                || sketches[i].cosine(&sketches[j]) > cfg.duplicate_cosine
            {
                verdicts[j] = Err(RejectReason::Copycat {
                    of: updates[i].node,
                });
                break;
            }
        }
        if verdicts[j].is_ok()
            && let Some(old) = recent
                .iter()
                .find(|old| sketches[j].cosine(&old.sketch) > cfg.duplicate_cosine)
        {
            verdicts[j] = Err(RejectReason::Replay {
                of: old.node,
                round: old.round,
            });
        }
    }
    for (v, &n) in verdicts.iter_mut().zip(&norms) {
        if v.is_ok() && n == 0.0 {
            *v = Err(RejectReason::NormTooSmall);
        }
    }

    // Norm against the median of the remaining updates.
    let live: Vec<usize> = (0..updates.len())
        .filter(|&i| verdicts[i].is_ok())
        .collect();
    if live.len() >= MIN_UPDATES_FOR_STATISTICS {
        let mut sorted: Vec<f64> = live.iter().map(|&i| norms[i]).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[(sorted.len() - 1) / 2];
        for &i in &live {
            if norms[i] > cfg.max_norm_ratio * median {
                verdicts[i] = Err(RejectReason::NormTooLarge);
            } else if norms[i] < cfg.min_norm_ratio * median {
                verdicts[i] = Err(RejectReason::NormTooSmall);
            }
        }
    }

    // Direction against the coordinate-wise median of what is still in.
    let live: Vec<usize> = (0..updates.len())
        .filter(|&i| verdicts[i].is_ok())
        .collect();
    let mut cosines = vec![None; updates.len()];
    if live.len() >= MIN_UPDATES_FOR_STATISTICS {
        let views: Vec<&[f32]> = live.iter().map(|&i| updates[i].values).collect();
        let centre = coordinate_median(&views);
        for &i in &live {
            let c = cosine(updates[i].values, &centre);
            cosines[i] = Some(c);
            if c < cfg.min_cosine {
                verdicts[i] = Err(RejectReason::SignFlipped);
            }
        }
    }
    verdicts
        .into_iter()
        .zip(norms)
        .zip(cosines)
        .zip(sketches)
        .map(|(((v, norm), cosine_to_centre), sketch)| {
            (
                v,
                UpdateStats {
                    norm,
                    cosine_to_centre,
                    sketch,
                },
            )
        })
        .collect()
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
        // One full-length cosine per surviving update (to the centre), none
        // per pair (the old check computed one per pair: 10 here).
        assert_eq!(full, 3);

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
