//! Aggregation: how a round's accepted updates become θ_{r+1}.
//!
//! The coordinator and every node call [`apply_round`] with the manifest's
//! accepted updates, in the manifest's order, and must end with the same bits;
//! the manifest's `next_params_hash` proves they did. So everything here runs
//! in a fixed order: weights are normalised in f64 in list order, sums run in
//! list order, sorts break ties by position, and no work is split across
//! threads.
//!
//! Rules:
//! - `mean`: the token-weighted mean, streamed — each payload is decoded and
//!   added in place, so n updates never become n dense copies;
//! - `trimmed-mean:F`: per coordinate, drop the ⌊F·n⌋ smallest and largest
//!   values, then take the weighted mean of the rest (robust to a minority of
//!   outliers per coordinate);
//! - `centered-clip:TAU[:ITERS]`: start from the coordinate-wise median and
//!   move towards each update by at most TAU in L2 norm per iteration
//!   (Karimireddy et al.'s centred clipping), weighted by tokens;
//! - `support-mean`: for sparse (top-k) updates, each coordinate is the
//!   token-weighted mean over the updates that sent it (a non-zero value),
//!   not over all of them, so a coordinate only some workers picked is not
//!   shrunk by the others' zeros (docs/training.md, the Pareto frontier).
//!   On dense updates it is the mean. Streamed like `mean`, with two more
//!   dense vectors (the decoded payload and each coordinate's weight).
//!
//! The robust rules need the decoded updates side by side; they cost n dense
//! vectors of memory, which is why `mean` is the default.

use crate::codec::{self, CodecError};
use crate::outer::OuterOptimizer;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How accepted updates are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum AggregationRule {
    #[default]
    Mean,
    TrimmedMean {
        trim: f32,
    },
    CenteredClip {
        tau: f32,
        iterations: u32,
    },
    SupportMean,
}

/// Why a round could not be aggregated.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("update {index} does not decode: {source}")]
    Decode { index: usize, source: CodecError },
    #[error("update {index} has a non-finite or negative weight {weight}")]
    BadWeight { index: usize, weight: f32 },
    #[error("params ({params}) and optimizer momentum ({momentum}) lengths differ")]
    StateLength { params: usize, momentum: usize },
    #[error(
        "invalid aggregation rule `{0}`: expected mean, support-mean, trimmed-mean:F (0 <= F < 0.5) or centered-clip:TAU[:ITERS]"
    )]
    BadRule(String),
}

impl FromStr for AggregationRule {
    type Err = AggregateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AggregateError::BadRule(s.to_string());
        let mut parts = s.trim().split(':');
        let name = parts.next().unwrap_or_default();
        let numbers: Vec<&str> = parts.collect();
        let rule = match (name, numbers.as_slice()) {
            ("mean", []) => AggregationRule::Mean,
            ("support-mean", []) => AggregationRule::SupportMean,
            ("trimmed-mean", [f]) => {
                let trim: f32 = f.parse().map_err(|_| bad())?;
                if !(0.0..0.5).contains(&trim) {
                    return Err(bad());
                }
                AggregationRule::TrimmedMean { trim }
            }
            ("centered-clip", [tau, rest @ ..]) if rest.len() <= 1 => {
                let tau: f32 = tau.parse().map_err(|_| bad())?;
                let iterations = match rest {
                    [n] => n.parse().map_err(|_| bad())?,
                    _ => 3,
                };
                let positive_tau = tau.is_finite() && tau > 0.0;
                if !positive_tau || !(1..=100).contains(&iterations) {
                    return Err(bad());
                }
                AggregationRule::CenteredClip { tau, iterations }
            }
            _ => return Err(bad()),
        };
        Ok(rule)
    }
}

impl fmt::Display for AggregationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AggregationRule::Mean => f.write_str("mean"),
            AggregationRule::SupportMean => f.write_str("support-mean"),
            AggregationRule::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
            AggregationRule::CenteredClip { tau, iterations } => {
                write!(f, "centered-clip:{tau}:{iterations}")
            }
        }
    }
}

/// Normalised f32 weights, computed in f64 in list order.
fn normalised(weights: impl Iterator<Item = f32>) -> Result<Vec<f32>, AggregateError> {
    let weights: Vec<f32> = weights.collect();
    let mut total = 0.0f64;
    for (index, &weight) in weights.iter().enumerate() {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(AggregateError::BadWeight { index, weight });
        }
        total += f64::from(weight);
    }
    if total <= 0.0 {
        // All-zero weights: fall back to equal shares rather than dividing by zero.
        let n = weights.len().max(1) as f64;
        return Ok(weights.iter().map(|_| (1.0 / n) as f32).collect());
    }
    Ok(weights
        .iter()
        .map(|&w| (f64::from(w) / total) as f32)
        .collect())
}

/// Writes the aggregate of `updates` (encoded payloads with their weights)
/// into `out`. With no updates, `out` is zeroed.
pub fn aggregate_into(
    rule: &AggregationRule,
    updates: &[(&[u8], f32)],
    out: &mut [f32],
) -> Result<(), AggregateError> {
    out.fill(0.0);
    if updates.is_empty() {
        return Ok(());
    }
    let shares = normalised(updates.iter().map(|u| u.1))?;
    if let AggregationRule::Mean | AggregationRule::SupportMean = rule {
        // Validate every payload before adding any, so an error leaves `out` zeroed
        // rather than holding a partial sum.
        for (index, (payload, _)) in updates.iter().enumerate() {
            let header = codec::peek_header(payload)
                .map_err(|source| AggregateError::Decode { index, source })?;
            if header.params != out.len() as u64 {
                let source = CodecError::BufferLength {
                    expected: header.params as usize,
                    got: out.len(),
                };
                return Err(AggregateError::Decode { index, source });
            }
        }
        if let AggregationRule::SupportMean = rule {
            let mut support = SupportMean::new(out.len());
            let mut decoded = vec![0.0f32; out.len()];
            for (index, ((payload, _), &share)) in updates.iter().zip(&shares).enumerate() {
                if let Err(source) = codec::decode_into(payload, &mut decoded) {
                    out.fill(0.0);
                    return Err(AggregateError::Decode { index, source });
                }
                support.add(&decoded, share, out);
            }
            support.finish(out);
            return Ok(());
        }
        for (index, ((payload, _), &share)) in updates.iter().zip(&shares).enumerate() {
            if let Err(source) = codec::decode_add(payload, share, out) {
                out.fill(0.0);
                return Err(AggregateError::Decode { index, source });
            }
        }
        return Ok(());
    }
    if let AggregationRule::TrimmedMean { trim } = *rule
        && (trimmed_mean_sparse(updates, &shares, trim, out)?
            || trimmed_mean_of_payloads(updates, &shares, trim, out)?)
    {
        return Ok(());
    }
    let mut dense = Vec::with_capacity(updates.len());
    for (index, (payload, _)) in updates.iter().enumerate() {
        let mut values = vec![0.0f32; out.len()];
        codec::decode_into(payload, &mut values)
            .map_err(|source| AggregateError::Decode { index, source })?;
        dense.push(values);
    }
    let views: Vec<&[f32]> = dense.iter().map(|v| v.as_slice()).collect();
    combine_dense(rule, &views, &shares, out);
    Ok(())
}

/// [`aggregate_into`] for updates already decoded (`bench diloco` keeps
/// them dense): the same weights and the same rule, so the same result.
pub fn aggregate_dense_into(
    rule: &AggregationRule,
    updates: &[(&[f32], f32)],
    out: &mut [f32],
) -> Result<(), AggregateError> {
    out.fill(0.0);
    if updates.is_empty() {
        return Ok(());
    }
    let shares = normalised(updates.iter().map(|u| u.1))?;
    let views: Vec<&[f32]> = updates.iter().map(|u| u.0).collect();
    combine_dense(rule, &views, &shares, out);
    Ok(())
}

fn combine_dense(rule: &AggregationRule, views: &[&[f32]], shares: &[f32], out: &mut [f32]) {
    match *rule {
        AggregationRule::Mean => {
            let pairs: Vec<(&[f32], f32)> =
                views.iter().copied().zip(shares.iter().copied()).collect();
            crate::outer::weighted_mean_into(&pairs, out);
        }
        AggregationRule::SupportMean => {
            let mut support = SupportMean::new(out.len());
            for (view, &share) in views.iter().zip(shares) {
                support.add(view, share, out);
            }
            support.finish(out);
        }
        AggregationRule::TrimmedMean { trim } => trimmed_mean_into(views, shares, trim, out),
        AggregationRule::CenteredClip { tau, iterations } => {
            centered_clip_into(views, shares, tau, iterations, out)
        }
    }
}

/// The running sums of `support-mean`: `out` holds Σ sᵢxᵢ over the updates
/// added so far and `weight` Σ sᵢ over those whose value was non-zero, per
/// coordinate; [`SupportMean::finish`] divides. Every sum runs in f32, in
/// list order, so the payload and the dense paths (and every machine) get
/// the same bits.
struct SupportMean {
    weight: Vec<f32>,
}

impl SupportMean {
    fn new(len: usize) -> Self {
        SupportMean {
            weight: vec![0.0; len],
        }
    }

    fn add(&mut self, values: &[f32], share: f32, out: &mut [f32]) {
        for ((o, w), &x) in out.iter_mut().zip(&mut self.weight).zip(values) {
            if x != 0.0 {
                *o += share * x;
                *w += share;
            }
        }
    }

    fn finish(self, out: &mut [f32]) {
        for (o, w) in out.iter_mut().zip(self.weight) {
            if w > 0.0 {
                *o /= w;
            }
        }
    }
}

/// Per coordinate: order the values by (value, position), drop ⌊trim·n⌋
/// at each end, and take the share-weighted mean of the rest, renormalised
/// over what is kept. The two cut points are found by selection, O(n) per
/// coordinate rather than a sort's O(n log n) (at 1,000 updates the sort was
/// the close's largest cost, docs/scaling.md), and the kept values are summed
/// in position order, so every machine adds the same numbers in the same order.
pub fn trimmed_mean_into(updates: &[&[f32]], shares: &[f32], trim: f32, out: &mut [f32]) {
    trimmed_mean_by(updates.len(), shares, trim, out, |i, column| {
        column.extend(updates.iter().map(|u| u[i]));
    });
}

/// [`trimmed_mean_into`] with coordinate i's values (one per update, in
/// order) written by `fill(i, column)`: from decoded updates, or read from
/// the payloads themselves.
fn trimmed_mean_by(
    n: usize,
    shares: &[f32],
    trim: f32,
    out: &mut [f32],
    mut fill: impl FnMut(usize, &mut Vec<f32>),
) {
    let cut = ((trim as f64) * n as f64).floor() as usize;
    let cut = cut.min(n.saturating_sub(1) / 2);
    let order = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let mut column: Vec<f32> = Vec::with_capacity(n);
    let mut keys: Vec<(f32, usize)> = Vec::with_capacity(n);
    for (i, o) in out.iter_mut().enumerate() {
        column.clear();
        fill(i, &mut column);
        let (low, high) = if cut == 0 {
            (None, None)
        } else {
            keys.clear();
            keys.extend(column.iter().copied().zip(0..));
            let low = *keys.select_nth_unstable_by(cut, order).1;
            let high = *keys.select_nth_unstable_by(n - cut - 1, order).1;
            (Some(low), Some(high))
        };
        let mut weight = 0.0f64;
        let mut sum = 0.0f64;
        for (j, &value) in column.iter().enumerate() {
            let key = (value, j);
            if low.is_some_and(|l| order(&key, &l).is_lt())
                || high.is_some_and(|h| order(&key, &h).is_gt())
            {
                continue;
            }
            weight += f64::from(shares[j]);
            sum += f64::from(shares[j]) * f64::from(value);
        }
        *o = if weight > 0.0 {
            (sum / weight) as f32
        } else {
            0.0
        };
    }
}

/// [`trimmed_mean_into`] over fp32 or int8 payloads, each value read from
/// its payload when its coordinate's turn comes: no decoded copies beside
/// the payloads the caller already holds. `Ok(false)`, touching nothing,
/// when a payload is top-k.
fn trimmed_mean_of_payloads(
    updates: &[(&[u8], f32)],
    shares: &[f32],
    trim: f32,
    out: &mut [f32],
) -> Result<bool, AggregateError> {
    let mut views = Vec::with_capacity(updates.len());
    for (index, (payload, _)) in updates.iter().enumerate() {
        match codec::values(payload, out.len()) {
            Ok(Some(view)) => views.push(view),
            Ok(None) => return Ok(false),
            Err(source) => return Err(AggregateError::Decode { index, source }),
        }
    }
    // A block of coordinates at a time, read from each payload in one run
    // (reading one value from each of N payloads per coordinate was 1.7×
    // slower than over decoded copies at 1,000 updates).
    const BLOCK: usize = 256;
    let n = views.len();
    let mut block = vec![0.0f32; n * BLOCK];
    let params = out.len();
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let start = b * BLOCK;
        for (view, row) in views.iter().zip(block.chunks_mut(BLOCK)) {
            for (c, slot) in row.iter_mut().enumerate().take(params - start) {
                *slot = view.get(start + c);
            }
        }
        trimmed_mean_by(n, shares, trim, out, |c, column| {
            column.extend(block.chunks(BLOCK).map(|row| row[c]));
        });
    }
    Ok(true)
}

/// [`trimmed_mean_into`] over top-k payloads without decoding them densely:
/// it holds each update's kept values (1.6% of them at the default
/// 4096:64), not N dense copies (docs/scaling.md). Returns `Ok(false)`,
/// touching nothing, when a payload is not sparse. The result has the same
/// bits as the dense rule: the same values are cut (absent values are +0.0,
/// ordered by position among equal values), the kept shares are summed over
/// every position in order, and the kept values likewise, where an absent
/// one would add s·(+0.0), which leaves an f64 sum that is never −0.0 as it
/// was.
fn trimmed_mean_sparse(
    updates: &[(&[u8], f32)],
    shares: &[f32],
    trim: f32,
    out: &mut [f32],
) -> Result<bool, AggregateError> {
    let n = updates.len();
    let params = out.len();
    if params > u32::MAX as usize || n > u32::MAX as usize {
        return Ok(false);
    }
    // Every payload checked and its kept values held as (position, update,
    // value) before `out` is touched; a dense one sends the caller to the
    // dense rule.
    let mut kept: Vec<(u32, u32, f32)> = Vec::new();
    for (index, (payload, _)) in updates.iter().enumerate() {
        let update = index as u32;
        let sparse = codec::visit_kept(payload, params, |i, v| {
            kept.push((i as u32, update, v));
        })
        .map_err(|source| AggregateError::Decode { index, source })?;
        if !sparse {
            return Ok(false);
        }
    }
    // By coordinate, then update: a counting sort, stable (updates came in order).
    let mut start = vec![0usize; params + 1];
    for &(i, _, _) in &kept {
        start[i as usize + 1] += 1;
    }
    for i in 0..params {
        start[i + 1] += start[i];
    }
    let mut columns: Vec<(u32, f32)> = vec![(0, 0.0); kept.len()];
    let mut next = start.clone();
    for (i, j, v) in kept.drain(..) {
        columns[next[i as usize]] = (j, v);
        next[i as usize] += 1;
    }
    drop(next);
    drop(kept);

    let cut = ((trim as f64) * n as f64).floor() as usize;
    let cut = cut.min(n.saturating_sub(1) / 2);
    let order = |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    // This coordinate's value per update: +0.0 unless stored.
    let mut value = vec![0.0f32; n];
    let mut cut_out = vec![false; n];
    let mut explicit: Vec<(f32, usize)> = Vec::new();
    let mut marked: Vec<usize> = Vec::new();
    for (i, o) in out.iter_mut().enumerate() {
        let entries = &columns[start[i]..start[i + 1]];
        for &(j, v) in entries {
            value[j as usize] = v;
        }
        marked.clear();
        if cut > 0 {
            explicit.clear();
            explicit.extend(entries.iter().map(|&(j, v)| (v, j as usize)));
            explicit.sort_unstable_by(order);
            // The whole order: stored values below +0.0, then every +0.0
            // (stored or absent) by position, then stored values above.
            let below = explicit.partition_point(|&(v, _)| v.total_cmp(&0.0).is_lt());
            let above = explicit.partition_point(|&(v, _)| !v.total_cmp(&0.0).is_gt());
            let is_zero = |j: &usize| value[*j].to_bits() == 0;
            // The lowest `cut` and the highest `cut` (disjoint: 2·cut < n).
            let lowest = explicit[..below]
                .iter()
                .map(|&(_, j)| j)
                .chain((0..n).filter(is_zero))
                .chain(explicit[above..].iter().map(|&(_, j)| j))
                .take(cut);
            marked.extend(lowest);
            let highest = explicit[above..]
                .iter()
                .rev()
                .map(|&(_, j)| j)
                .chain((0..n).rev().filter(is_zero))
                .chain(explicit[..below].iter().rev().map(|&(_, j)| j))
                .take(cut);
            marked.extend(highest);
            for &j in &marked {
                cut_out[j] = true;
            }
        }
        let mut weight = 0.0f64;
        for (j, &share) in shares.iter().enumerate() {
            if !cut_out[j] {
                weight += f64::from(share);
            }
        }
        let mut sum = 0.0f64;
        for &(j, v) in entries {
            if !cut_out[j as usize] {
                sum += f64::from(shares[j as usize]) * f64::from(v);
            }
        }
        *o = if weight > 0.0 {
            (sum / weight) as f32
        } else {
            0.0
        };
        for &j in &marked {
            cut_out[j] = false;
        }
        for &(j, _) in entries {
            value[j as usize] = 0.0;
        }
    }
    Ok(true)
}

/// Centred clipping: v₀ = coordinate-wise median; then ITERS times
/// v ← v + Σ_j s_j · clip(x_j − v, τ), where clip scales a vector down to L2
/// norm τ if it is longer.
pub fn centered_clip_into(
    updates: &[&[f32]],
    shares: &[f32],
    tau: f32,
    iterations: u32,
    out: &mut [f32],
) {
    let n = updates.len();
    let mut column: Vec<(f32, usize)> = Vec::with_capacity(n);
    for (i, o) in out.iter_mut().enumerate() {
        column.clear();
        column.extend(updates.iter().enumerate().map(|(j, u)| (u[i], j)));
        column.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *o = if n % 2 == 1 {
            column[n / 2].0
        } else {
            0.5 * column[n / 2 - 1].0 + 0.5 * column[n / 2].0
        };
    }
    let mut step = vec![0.0f32; out.len()];
    for _ in 0..iterations {
        step.fill(0.0);
        for (update, &share) in updates.iter().zip(shares) {
            let mut norm2 = 0.0f64;
            for (&x, &v) in update.iter().zip(out.iter()) {
                let d = f64::from(x - v);
                norm2 += d * d;
            }
            let norm = norm2.sqrt();
            let scale = if norm > f64::from(tau) {
                (f64::from(tau) / norm) as f32
            } else {
                1.0
            };
            let factor = share * scale;
            for ((s, &x), &v) in step.iter_mut().zip(update.iter()).zip(out.iter()) {
                let diff = x - v;
                *s += factor * diff;
            }
        }
        for (o, &s) in out.iter_mut().zip(&step) {
            *o += s;
        }
    }
}

/// Aggregates the round's updates and applies the outer step: `theta` holds
/// θ_r on entry and θ_{r+1} on return. With no updates the round changes
/// nothing (θ and momentum stay as they are). On error neither `theta` nor
/// the optimizer is touched.
pub fn apply_round(
    theta: &mut [f32],
    optimizer: &mut OuterOptimizer,
    rule: &AggregationRule,
    updates: &[(&[u8], f32)],
) -> Result<(), AggregateError> {
    if optimizer.momentum().len() != theta.len() {
        return Err(AggregateError::StateLength {
            params: theta.len(),
            momentum: optimizer.momentum().len(),
        });
    }
    if updates.is_empty() {
        return Ok(());
    }
    let mut delta = vec![0.0f32; theta.len()];
    aggregate_into(rule, updates, &mut delta)?;
    optimizer.step(theta, &delta);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecConfig, Encoder};
    use crate::outer::OuterConfig;

    fn encode(values: &[f32]) -> Vec<u8> {
        Encoder::new(CodecConfig::Fp32, values.len())
            .unwrap()
            .encode(values)
            .unwrap()
    }

    #[test]
    fn dense_updates_aggregate_as_their_payloads_do() {
        let updates = [
            vec![1.0f32, -2.0, 3.0, 0.5],
            vec![9.0, 0.0, -1.0, 0.25],
            vec![2.0, 2.0, 2.0, 2.0],
            vec![-4.0, 1.0, 0.0, 8.0],
            vec![0.5, 0.5, 0.5, 0.5],
        ];
        let weights = [3.0f32, 1.0, 2.0, 2.0, 5.0];
        let payloads: Vec<Vec<u8>> = updates.iter().map(|u| encode(u)).collect();
        for rule in [
            "mean",
            "support-mean",
            "trimmed-mean:0.2",
            "centered-clip:1.0",
        ] {
            let rule: AggregationRule = rule.parse().unwrap();
            let encoded: Vec<(&[u8], f32)> =
                payloads.iter().map(Vec::as_slice).zip(weights).collect();
            let dense: Vec<(&[f32], f32)> =
                updates.iter().map(Vec::as_slice).zip(weights).collect();
            let (mut a, mut b) = (vec![0.0f32; 4], vec![7.0f32; 4]);
            aggregate_into(&rule, &encoded, &mut a).unwrap();
            aggregate_dense_into(&rule, &dense, &mut b).unwrap();
            if rule == AggregationRule::Mean {
                // The payload path streams (decode-add), the dense one sums
                // columns: equal up to rounding.
                assert!(
                    a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6),
                    "{a:?} {b:?}"
                );
            } else {
                assert_eq!(a, b, "{rule}");
            }
        }
        let mut out = vec![1.0f32; 4];
        aggregate_dense_into(&AggregationRule::Mean, &[], &mut out).unwrap();
        assert_eq!(out, vec![0.0; 4]);
        assert!(
            aggregate_dense_into(
                &AggregationRule::Mean,
                &[(&[1.0f32][..], f32::NAN)],
                &mut [0.0]
            )
            .is_err()
        );
    }

    /// `support-mean` averages each coordinate over the updates that sent
    /// it: a coordinate only one update picked keeps that update's value,
    /// one nobody picked stays 0, and dense updates get the weighted mean.
    /// Payloads and dense vectors give the same bits; a bad payload leaves
    /// nothing behind.
    #[test]
    fn support_mean_averages_over_the_senders_only() {
        let rule: AggregationRule = "support-mean".parse().unwrap();
        assert_eq!(rule, AggregationRule::SupportMean);
        assert_eq!(rule.to_string(), "support-mean");
        let (a, b) = ([2.0f32, 0.0, 4.0, 0.0], [0.0f32, 0.0, 8.0, 6.0]);
        let mut out = [9.0f32; 4];
        aggregate_dense_into(&rule, &[(&a, 1.0), (&b, 3.0)], &mut out).unwrap();
        assert_eq!(out, [2.0, 0.0, (4.0 + 24.0) / 4.0, 6.0]);
        let mut mean = [0.0f32; 4];
        aggregate_dense_into(&AggregationRule::Mean, &[(&a, 1.0), (&b, 3.0)], &mut mean).unwrap();
        assert_eq!(
            mean,
            [0.5, 0.0, 7.0, 4.5],
            "the mean shrinks what one update sent"
        );

        let (c, d) = ([1.0f32, -2.0, 3.0], [3.0f32, 2.0, -1.0]);
        let (mut supported, mut mean) = ([0.0f32; 3], [0.0f32; 3]);
        aggregate_dense_into(&rule, &[(&c, 1.0), (&d, 1.0)], &mut supported).unwrap();
        aggregate_dense_into(&AggregationRule::Mean, &[(&c, 1.0), (&d, 1.0)], &mut mean).unwrap();
        for (x, y) in supported.iter().zip(&mean) {
            assert!((x - y).abs() < 1e-6, "{supported:?} vs {mean:?}");
        }

        // Top-k payloads with disjoint supports: each coordinate is the one
        // sender's decoded value, where the mean would halve it.
        let n = 256;
        let first: Vec<f32> = (0..n)
            .map(|i| if i < 128 { 1.0 + i as f32 } else { 0.0 })
            .collect();
        let second: Vec<f32> = (0..n)
            .map(|i| if i >= 128 { -(i as f32) } else { 0.0 })
            .collect();
        let codec = CodecConfig::TopK {
            chunk: 256,
            k: 128,
            bits: 4,
        };
        let payloads: Vec<Vec<u8>> = [&first, &second]
            .iter()
            .map(|v| Encoder::new(codec, n).unwrap().encode(v).unwrap())
            .collect();
        let mut decoded = vec![vec![0.0f32; n]; 2];
        for (payload, out) in payloads.iter().zip(&mut decoded) {
            codec::decode_into(payload, out).unwrap();
        }
        let encoded: Vec<(&[u8], f32)> = payloads.iter().map(|p| (p.as_slice(), 1.0)).collect();
        let mut out = vec![0.0f32; n];
        aggregate_into(&rule, &encoded, &mut out).unwrap();
        for i in 0..n {
            let sent = decoded[0][i] + decoded[1][i];
            assert!(
                (out[i] - sent).abs() <= 1e-6 * sent.abs().max(1.0),
                "{i}: {} vs {sent}",
                out[i]
            );
        }
        assert!(out.iter().filter(|x| **x != 0.0).count() > n / 2);

        let broken = [(payloads[0].as_slice(), 1.0), (&payloads[1][..20], 1.0)];
        let mut out = vec![5.0f32; n];
        assert!(aggregate_into(&rule, &broken, &mut out).is_err());
        assert!(
            out.iter().all(|x| *x == 0.0),
            "a bad payload leaves a zeroed output"
        );
    }

    #[test]
    fn rules_parse_and_print() {
        for text in [
            "mean",
            "support-mean",
            "trimmed-mean:0.2",
            "centered-clip:1.5:4",
        ] {
            let rule: AggregationRule = text.parse().unwrap();
            assert_eq!(rule.to_string().parse::<AggregationRule>().unwrap(), rule);
        }
        assert_eq!(
            "centered-clip:2".parse::<AggregationRule>().unwrap(),
            AggregationRule::CenteredClip {
                tau: 2.0,
                iterations: 3
            }
        );
        for bad in [
            "",
            "median",
            "trimmed-mean",
            "trimmed-mean:0.5",
            "trimmed-mean:x",
            "centered-clip:-1",
            "mean:1",
            "support-mean:1",
        ] {
            assert!(bad.parse::<AggregationRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mean_is_token_weighted() {
        let a = encode(&[1.0, 2.0]);
        let b = encode(&[4.0, -1.0]);
        let mut out = [0.0; 2];
        aggregate_into(&AggregationRule::Mean, &[(&a, 1.0), (&b, 3.0)], &mut out).unwrap();
        assert!(
            (out[0] - 3.25).abs() < 1e-6 && (out[1] - (-0.25)).abs() < 1e-6,
            "{out:?}"
        );
    }

    /// `n` updates of `len` values from `value`, encoded with `config`, with
    /// uneven weights: (payloads, weights, shares, decoded).
    struct Case {
        payloads: Vec<Vec<u8>>,
        weights: Vec<f32>,
        shares: Vec<f32>,
        dense: Vec<Vec<f32>>,
    }

    impl Case {
        fn new(config: CodecConfig, n: usize, len: usize, mut value: impl FnMut() -> f32) -> Case {
            let payloads: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let values: Vec<f32> = (0..len).map(|_| value()).collect();
                    Encoder::new(config, len).unwrap().encode(&values).unwrap()
                })
                .collect();
            let weights: Vec<f32> = (0..n).map(|j| 1.0 + (j % 7) as f32).collect();
            let shares = normalised(weights.iter().copied()).unwrap();
            let dense = payloads
                .iter()
                .map(|p| codec::decode(p, len).unwrap())
                .collect();
            Case {
                payloads,
                weights,
                shares,
                dense,
            }
        }

        fn inputs(&self) -> Vec<(&[u8], f32)> {
            self.payloads
                .iter()
                .map(|p| p.as_slice())
                .zip(self.weights.iter().copied())
                .collect()
        }

        /// The dense rule's result, as bits.
        fn expected(&self, trim: f32) -> Vec<u32> {
            let views: Vec<&[f32]> = self.dense.iter().map(|v| v.as_slice()).collect();
            let mut out = vec![0.0f32; views[0].len()];
            trimmed_mean_into(&views, &self.shares, trim, &mut out);
            out.iter().map(|v| v.to_bits()).collect()
        }
    }

    /// A seeded generator of `levels` evenly spaced values in [-1, 1):
    /// few levels make ties.
    fn levels(seed: u64, levels: u64) -> impl FnMut() -> f32 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % levels) as f32 * 2.0 / levels as f32 - 1.0
        }
    }

    fn bits(values: &[f32]) -> Vec<u32> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn sparse_trimmed_mean_has_the_dense_bits() {
        let len = 1000;
        // Mask and index layouts, few and many updates, 2 to 8 value bits.
        for (n, chunk, k, b) in [
            (1, 64, 8, 2),
            (2, 64, 8, 4),
            (5, 128, 4, 2),
            (41, 64, 16, 8),
            (40, 32, 32, 2),
            (23, 4096, 64, 2),
        ] {
            let config = CodecConfig::TopK { chunk, k, bits: b };
            let case = Case::new(config, n, len, levels(n as u64, 9));
            let inputs = case.inputs();
            for trim in [0.0f32, 0.1, 0.25, 0.49] {
                let mut sparse = vec![0.0f32; len];
                assert!(trimmed_mean_sparse(&inputs, &case.shares, trim, &mut sparse).unwrap());
                assert_eq!(
                    bits(&sparse),
                    case.expected(trim),
                    "{config}, n {n}, trim {trim}"
                );
                // And through the public entry point.
                let mut via_rule = vec![0.0f32; len];
                aggregate_into(
                    &AggregationRule::TrimmedMean { trim },
                    &inputs,
                    &mut via_rule,
                )
                .unwrap();
                assert_eq!(bits(&via_rule), case.expected(trim));
            }
        }
        // A dense payload is left to the dense rule.
        let fp32 = encode(&[1.0; 4]);
        let mut out = [0.0f32; 4];
        assert!(!trimmed_mean_sparse(&[(&fp32, 1.0)], &[1.0], 0.1, &mut out).unwrap());
    }

    #[test]
    fn trimmed_mean_read_from_dense_payloads_has_the_decoded_bits() {
        let len = 700;
        for config in [CodecConfig::Fp32, CodecConfig::Int8 { block: 64 }] {
            let case = Case::new(config, 17, len, levels(5, 1000));
            for trim in [0.0f32, 0.2] {
                let mut read = vec![0.0f32; len];
                assert!(
                    trimmed_mean_of_payloads(&case.inputs(), &case.shares, trim, &mut read)
                        .unwrap()
                );
                assert_eq!(bits(&read), case.expected(trim), "{config}, trim {trim}");
            }
        }
        // A corrupt int8 scale is the same error as decoding it.
        let mut bad = Encoder::new(CodecConfig::Int8 { block: 64 }, len)
            .unwrap()
            .encode(&vec![0.5; len])
            .unwrap();
        bad[codec::HEADER_LEN + 3] = 0xFF;
        let mut out = vec![0.0f32; len];
        let err = aggregate_into(
            &AggregationRule::TrimmedMean { trim: 0.1 },
            &[(&bad, 1.0)],
            &mut out,
        )
        .unwrap_err();
        assert!(
            matches!(err, AggregateError::Decode { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn trimmed_mean_by_selection_keeps_what_a_sort_keeps() {
        // Ties included: values drawn from a few levels.
        let n = 41;
        let len = 300;
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 9) as f32 * 0.5 - 2.0
        };
        let updates: Vec<Vec<f32>> = (0..n).map(|_| (0..len).map(|_| next()).collect()).collect();
        let shares: Vec<f32> = (0..n).map(|j| 1.0 + (j % 5) as f32).collect();
        let views: Vec<&[f32]> = updates.iter().map(|u| u.as_slice()).collect();
        for trim in [0.0f32, 0.1, 0.25, 0.49] {
            let mut out = vec![0.0f32; len];
            trimmed_mean_into(&views, &shares, trim, &mut out);
            let cut = ((trim as f64 * n as f64).floor() as usize).min((n - 1) / 2);
            for i in 0..len {
                let mut sorted: Vec<(f32, usize)> = (0..n).map(|j| (views[j][i], j)).collect();
                sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let mut kept: Vec<usize> = sorted[cut..n - cut].iter().map(|k| k.1).collect();
                kept.sort_unstable();
                let (mut weight, mut sum) = (0.0f64, 0.0f64);
                for j in kept {
                    weight += f64::from(shares[j]);
                    sum += f64::from(shares[j]) * f64::from(views[j][i]);
                }
                assert_eq!(
                    out[i].to_bits(),
                    ((sum / weight) as f32).to_bits(),
                    "trim {trim}, coordinate {i}"
                );
            }
        }
    }

    #[test]
    fn trimmed_mean_ignores_an_outlier() {
        let honest: Vec<Vec<u8>> = (0..4)
            .map(|i| encode(&[1.0 + i as f32 * 0.01; 3]))
            .collect();
        let evil = encode(&[1000.0; 3]);
        let mut updates: Vec<(&[u8], f32)> = honest.iter().map(|u| (u.as_slice(), 1.0)).collect();
        updates.push((&evil, 1.0));
        let mut out = [0.0; 3];
        aggregate_into(&"trimmed-mean:0.2".parse().unwrap(), &updates, &mut out).unwrap();
        assert!(out.iter().all(|&v| (1.0..1.05).contains(&v)), "{out:?}");
        aggregate_into(&AggregationRule::Mean, &updates, &mut out).unwrap();
        assert!(
            out[0] > 100.0,
            "the plain mean is pulled by the outlier: {out:?}"
        );
    }

    #[test]
    fn centered_clip_bounds_an_outlier() {
        let honest: Vec<Vec<u8>> = (0..4).map(|_| encode(&[0.5, -0.5])).collect();
        let evil = encode(&[1e6, 1e6]);
        let mut updates: Vec<(&[u8], f32)> = honest.iter().map(|u| (u.as_slice(), 1.0)).collect();
        updates.push((&evil, 1.0));
        let mut out = [0.0; 2];
        aggregate_into(&"centered-clip:0.1:3".parse().unwrap(), &updates, &mut out).unwrap();
        // Each iteration moves at most share·tau = 0.2·0.1 towards the outlier.
        assert!((out[0] - 0.5).abs() <= 3.0 * 0.2 * 0.1 + 1e-6, "{out:?}");
    }

    #[test]
    fn apply_round_matches_a_hand_computed_step() {
        let mut theta = vec![1.0f32, -1.0];
        let mut optimizer = OuterOptimizer::new(OuterConfig::default(), 2);
        let a = encode(&[0.2, 0.0]);
        let b = encode(&[0.0, -0.4]);
        apply_round(
            &mut theta,
            &mut optimizer,
            &AggregationRule::Mean,
            &[(&a, 1.0), (&b, 1.0)],
        )
        .unwrap();
        // mean Δ = (0.1, -0.2); m = Δ; nesterov u = Δ + 0.9·m = 1.9·Δ; θ -= 0.7·u.
        let expected = [1.0 - 0.7 * 1.9 * 0.1, -1.0 + 0.7 * 1.9 * 0.2];
        for (t, e) in theta.iter().zip(expected) {
            assert!((t - e).abs() < 1e-6, "{theta:?} vs {expected:?}");
        }
    }

    #[test]
    fn errors_leave_state_untouched() {
        let mut theta = vec![1.0f32; 4];
        let mut optimizer = OuterOptimizer::new(OuterConfig::default(), 4);
        let good = encode(&[0.1; 4]);
        let short = encode(&[0.1; 3]);
        let garbage = vec![7u8; 40];
        for bad in [&short, &garbage] {
            let before = theta.clone();
            let result = apply_round(
                &mut theta,
                &mut optimizer,
                &AggregationRule::Mean,
                &[(&good, 1.0), (bad, 1.0)],
            );
            assert!(result.is_err());
            assert_eq!(theta, before);
            assert!(optimizer.momentum().iter().all(|&m| m == 0.0));
        }
        let result = apply_round(
            &mut theta,
            &mut optimizer,
            &AggregationRule::Mean,
            &[(&good, f32::NAN)],
        );
        assert!(matches!(result, Err(AggregateError::BadWeight { .. })));
        // No updates: nothing moves.
        apply_round(&mut theta, &mut optimizer, &AggregationRule::Mean, &[]).unwrap();
        assert_eq!(theta, vec![1.0; 4]);
    }

    #[test]
    fn same_inputs_same_bits() {
        let updates: Vec<Vec<u8>> = (0..5)
            .map(|j| {
                encode(
                    &(0..1000)
                        .map(|i| ((i * 7 + j * 13) % 17) as f32 * 0.01 - 0.08)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let list: Vec<(&[u8], f32)> = updates
            .iter()
            .enumerate()
            .map(|(j, u)| (u.as_slice(), 1.0 + j as f32))
            .collect();
        for rule in ["mean", "trimmed-mean:0.2", "centered-clip:0.5"] {
            let rule: AggregationRule = rule.parse().unwrap();
            let run = || {
                let mut theta = vec![0.5f32; 1000];
                let mut optimizer = OuterOptimizer::new(OuterConfig::default(), 1000);
                for _ in 0..3 {
                    apply_round(&mut theta, &mut optimizer, &rule, &list).unwrap();
                }
                crate::Hash::of_f32s(&theta)
            };
            assert_eq!(run(), run());
        }
    }
}
