//! Stage 4 of verification, the usefulness probe: does applying an update to
//! θ_r lower the loss on a probe batch from the node's own shard, and lower
//! it more than on data the node was not given (the held-out shard)?
//!
//! An honest update was trained on its shard, so it helps there at least as
//! much as elsewhere; an update trained on other data (or made up) helps its
//! own shard no more than any other text. The margin and batch counts are in
//! [`VerifyConfig`]; `docs/running-a-coordinator.md` gives measured figures.
//!
//! The probe runs forward passes only, on the CPU, with fixed seeds so the
//! same update always gets the same verdict.

use crate::config::VerifyConfig;
use barnraise_protocol::messages::{Assignment, RejectReason, ShardInfo};
use barnraise_protocol::{Hash, NodeId, SigningKey};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{ModelConfig, Trainer};

/// Why the probe could not run (a coordinator-side problem, not the node's).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("usefulness probe: {0}")]
    Trainer(#[from] barnraise_trainer::TrainError),
    #[error("usefulness probe: no CPU device: {0}")]
    Device(String),
    #[error("usefulness probe: update has {found} values, the model has {expected}")]
    Length { expected: usize, found: usize },
}

/// How much one update lowered the probe losses (positive: it helped).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeResult {
    pub own_gain: f32,
    pub other_gain: f32,
    /// The losses behind the gains: θ_r and θ_r − Δ on the node's shard
    /// and on the held-out shard (NaN where a test builds a result by hand).
    pub own_before: f32,
    pub own_after: f32,
    pub other_before: f32,
    pub other_after: f32,
}

impl ProbeResult {
    /// A result from its four losses.
    pub fn from_losses(
        own_before: f32,
        own_after: f32,
        other_before: f32,
        other_after: f32,
    ) -> Self {
        ProbeResult {
            own_gain: own_before - own_after,
            other_gain: other_before - other_after,
            own_before,
            own_after,
            other_before,
            other_after,
        }
    }

    /// The numbers in words, for the ledger's detail column.
    pub fn describe(&self) -> String {
        format!(
            "probe: own shard {:.4} -> {:.4} (gain {:+.4}), held-out {:.4} -> {:.4} (gain {:+.4})",
            self.own_before,
            self.own_after,
            self.own_gain,
            self.other_before,
            self.other_after,
            self.other_gain
        )
    }

    /// The verdict for this measurement: it must lower its own shard's
    /// loss by more than `bar` (see [`round_bar`]), and not lower the
    /// held-out loss by `margin` more than its own.
    pub fn verdict(&self, margin: f32, bar: f32) -> Result<(), RejectReason> {
        if !(self.own_gain.is_finite() && self.other_gain.is_finite())
            || self.own_gain <= 0.0
            || self.own_gain < bar
        {
            return Err(RejectReason::NotUseful);
        }
        if self.own_gain + margin < self.other_gain {
            return Err(RejectReason::NotUseful);
        }
        Ok(())
    }
}

/// The least own-shard gain an update of this round must show, when every
/// update had the same inner steps: `fraction` × the median gain of the
/// round's probed updates (0 when there is no positive median). An honest
/// update helps about as much as the round's typical one; noise of the same
/// norm, a stale update or a near-zero one helps by a sliver of it, which
/// `gain > 0` alone let through (docs/security.md, "The usefulness probe").
pub fn round_bar(results: &[ProbeResult], fraction: f32) -> f32 {
    let equal: Vec<(ProbeResult, u32)> = results.iter().map(|r| (*r, 1)).collect();
    unit_bar(&equal, fraction)
}

/// The round's bar per unit of work: `fraction` × the median of own-shard
/// gain ÷ √steps over the round's probed updates (0 when there is no
/// positive median). An update's bar is this times the square root of its
/// own assigned steps ([`work_scale`]). The coordinator sizes work to each
/// node's speed (between H/2 and 2H), and a node given fewer steps gains
/// less for them: judged on raw gains, a node given H/2 among nodes given
/// 2H starts at 0.6 of the median and its worst draws reach the bar. Gain
/// grows about as the square root of steps (`probe_noise`: 0.106 at 5
/// steps, 0.17 at 20, in round 3 of the tiny model), so √steps evens the
/// two out where steps themselves would overcorrect. Steps are the
/// coordinator's own plan, not a node's claim, so no node can lower its bar.
pub fn unit_bar(results: &[(ProbeResult, u32)], fraction: f32) -> f32 {
    let mut gains: Vec<f32> = results
        .iter()
        .map(|(r, steps)| r.own_gain / work_scale(*steps))
        .filter(|g| g.is_finite())
        .collect();
    if gains.is_empty() || fraction.is_nan() || fraction <= 0.0 {
        return 0.0;
    }
    gains.sort_by(f32::total_cmp);
    let median = gains[(gains.len() - 1) / 2];
    (fraction * median).max(0.0)
}

/// What an update's gain is expected to scale with: √ of its assigned
/// inner steps (0 counts as 1).
pub fn work_scale(steps: u32) -> f32 {
    (steps.max(1) as f32).sqrt()
}

/// A model at θ_r and the probe's batch shape.
pub struct Probe {
    trainer: Trainer,
    theta: Vec<f32>,
    scratch: Vec<f32>,
    batches: usize,
    batch_size: usize,
    seq_len: usize,
    seed: u64,
}

impl Probe {
    /// `seed` fixes the probe batches (the coordinator uses one per round).
    pub fn new(
        model: &ModelConfig,
        theta: &[f32],
        cfg: &VerifyConfig,
        seq_len: usize,
        seed: u64,
    ) -> Result<Probe, ProbeError> {
        let device = select(DeviceSpec::Cpu).map_err(|e| ProbeError::Device(e.to_string()))?;
        let mut trainer = Trainer::new(model, device, 0)?;
        trainer.set_flat_params(theta)?;
        Ok(Probe {
            trainer,
            theta: theta.to_vec(),
            scratch: vec![0.0; theta.len()],
            batches: cfg.probe_batches.max(1),
            batch_size: cfg.probe_batch_size.max(1),
            seq_len: seq_len.min(model.max_seq_len).max(1),
            seed,
        })
    }

    fn loss(&self, tokens: &[u16], seed: u64) -> Result<f32, ProbeError> {
        let seq_len = self.seq_len.min(tokens.len().saturating_sub(1)).max(1);
        Ok(self
            .trainer
            .eval_loss_with(tokens, self.batches, self.batch_size, seq_len, seed)?)
    }

    /// The probe loss of θ_r on `tokens`, batches drawn with the probe's seed.
    pub fn base_loss(&mut self, tokens: &[u16]) -> Result<f32, ProbeError> {
        self.base_loss_seeded(tokens, self.seed)
    }

    /// The probe loss of θ_r on `tokens`, batches drawn with `seed`.
    pub fn base_loss_seeded(&mut self, tokens: &[u16], seed: u64) -> Result<f32, ProbeError> {
        self.trainer.set_flat_params(&self.theta)?;
        self.loss(tokens, seed)
    }

    /// The loss of θ_r − Δ (where the node's model ended up) on each text,
    /// as gains over the given base losses.
    pub fn measure(
        &mut self,
        delta: &[f32],
        own: &[u16],
        own_base: f32,
        other: &[u16],
        other_base: f32,
    ) -> Result<ProbeResult, ProbeError> {
        let (own_after, other_after) =
            self.losses_after(delta, own, self.seed, other, self.seed)?;
        Ok(ProbeResult::from_losses(
            own_base,
            own_after,
            other_base,
            other_after,
        ))
    }

    /// The probe losses of θ_r − Δ on `own` and on `other`, each text's
    /// batches drawn with its seed: the half of [`Probe::measure`] that
    /// needs the update.
    pub fn losses_after(
        &mut self,
        delta: &[f32],
        own: &[u16],
        own_seed: u64,
        other: &[u16],
        other_seed: u64,
    ) -> Result<(f32, f32), ProbeError> {
        if delta.len() != self.theta.len() {
            return Err(ProbeError::Length {
                expected: self.theta.len(),
                found: delta.len(),
            });
        }
        for ((s, &t), &d) in self.scratch.iter_mut().zip(&self.theta).zip(delta) {
            *s = t - d;
        }
        self.trainer.set_flat_params(&self.scratch)?;
        Ok((self.loss(own, own_seed)?, self.loss(other, other_seed)?))
    }

    /// The run's held-out loss of `params`: [`EVAL_BATCHES`] batches drawn
    /// with [`EVAL_SEED`], the same batches every round and every run, so
    /// the curve moves with the model and not with the sample. (Drawn with
    /// the round's probe seed, 2 batches of 8, two runs of the same seven
    /// honest nodes differed by up to 6% — `bench attacks`, docs/security.md.)
    pub fn eval_loss(&mut self, params: &[f32], tokens: &[u16]) -> Result<f32, ProbeError> {
        self.trainer.set_flat_params(params)?;
        let seq_len = self.seq_len.min(tokens.len().saturating_sub(1)).max(1);
        Ok(self.trainer.eval_loss_with(
            tokens,
            EVAL_BATCHES,
            self.batch_size,
            seq_len,
            EVAL_SEED,
        )?)
    }
}

/// One update's probe losses, before the round's bar is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// θ_r on the node's own shard.
    pub own_base: f32,
    /// θ_r − Δ on the node's own shard.
    pub own_after: f32,
    /// θ_r − Δ on the held-out shard.
    pub other_after: f32,
}

impl Measured {
    /// The result, given θ_r's loss on the held-out batches.
    pub fn result(&self, heldout_base: f32) -> ProbeResult {
        ProbeResult::from_losses(
            self.own_base,
            self.own_after,
            heldout_base,
            self.other_after,
        )
    }
}

impl Probe {
    /// Measures one update on its own shard (batches drawn with `seed`)
    /// and on the held-out shard (with `heldout_seed`). `own_base`: θ_r's
    /// loss on its own shard's batches when already measured (it needs no
    /// update, so it is measured while the update travels).
    pub fn measure_update(
        &mut self,
        delta: &[f32],
        own: &[u16],
        seed: u64,
        heldout: &[u16],
        heldout_seed: u64,
        own_base: Option<f32>,
    ) -> Result<Measured, ProbeError> {
        let own_base = match own_base {
            Some(base) => base,
            None => self.base_loss_seeded(own, seed)?,
        };
        let (own_after, other_after) =
            self.losses_after(delta, own, seed, heldout, heldout_seed)?;
        Ok(Measured {
            own_base,
            own_after,
            other_after,
        })
    }
}

impl Probe {
    /// The second look at an update the first look found not useful: all
    /// four losses again on `batches` batches a text, drawn with seeds of
    /// their own ([`second_look_seed`]), so it measures fresh text with
    /// less noise than the first look's `probe_batches`.
    pub fn second_look(
        &mut self,
        delta: &[f32],
        own: &[u16],
        own_seed: u64,
        heldout: &[u16],
        heldout_seed: u64,
        batches: usize,
    ) -> Result<ProbeResult, ProbeError> {
        let first = std::mem::replace(&mut self.batches, batches.max(1));
        let result = (|| {
            let own_before = self.base_loss_seeded(own, own_seed)?;
            let other_before = self.base_loss_seeded(heldout, heldout_seed)?;
            let (own_after, other_after) =
                self.losses_after(delta, own, own_seed, heldout, heldout_seed)?;
            Ok(ProbeResult::from_losses(
                own_before,
                own_after,
                other_before,
                other_after,
            ))
        })();
        self.batches = first;
        result
    }
}

/// The seed of a second look's batches, from the first look's seed: as
/// unknowable to a node when it commits, and other batches than the first.
pub fn second_look_seed(first: u64, round: u64) -> u64 {
    crate::plan::derive(first, "probe-second-look", round, &[])
}

fn first_u64(hash: &Hash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

fn signed_seed(key: &SigningKey, label: &[u8], run_id: &str, round: u64, extra: &[&[u8]]) -> u64 {
    let mut m = Vec::with_capacity(128 + run_id.len());
    m.extend_from_slice(label);
    m.extend_from_slice(&(run_id.len() as u64).to_le_bytes());
    m.extend_from_slice(run_id.as_bytes());
    m.extend_from_slice(&round.to_le_bytes());
    for e in extra {
        m.extend_from_slice(e);
    }
    first_u64(&Hash::of(&key.sign(&m).0))
}

/// The seed of one commit's probe: which of the node's shards it is
/// measured on, and the batches drawn from it. It is the coordinator's
/// signature over the commit, like the spot-check draw: no node can know
/// it when it commits, the coordinator cannot choose it (Ed25519 signs
/// deterministically), and it is known the moment the commit arrives, so
/// the update can be probed before the round closes.
pub fn commit_seed(
    key: &SigningKey,
    run_id: &str,
    round: u64,
    node: &NodeId,
    update: &Hash,
) -> u64 {
    signed_seed(
        key,
        b"barnraise probe v2\0",
        run_id,
        round,
        &[&node.0.0, &update.0],
    )
}

/// The seed of a round's held-out probe batches (one for every update of
/// the round, so θ_r's held-out loss is computed once).
pub fn heldout_seed(key: &SigningKey, run_id: &str, round: u64) -> u64 {
    signed_seed(key, b"barnraise probe held-out v2\0", run_id, round, &[])
}

/// The shard of its assignment a commit is probed on, drawn by its seed.
pub fn own_shard(assignment: &Assignment, dataset: &[ShardInfo], seed: u64) -> Option<Hash> {
    let pick = crate::plan::derive(seed, "probe-shard", 0, &[]);
    let index = assignment
        .shards
        .get((pick % assignment.shards.len().max(1) as u64) as usize)?;
    dataset.get(*index as usize).map(|s| s.hash)
}

/// The run's held-out loss of `params` ([`Probe::eval_loss`]) on a model of
/// its own: what the coordinator computes for θ_{r+1} after the manifest
/// is out, off the round's critical path.
pub fn heldout_eval(
    model: &ModelConfig,
    cfg: &VerifyConfig,
    seq_len: usize,
    params: &[f32],
    heldout: &[u16],
) -> Result<f32, ProbeError> {
    Probe::new(model, params, cfg, seq_len, 0)?.eval_loss(params, heldout)
}

/// Batches of the per-round held-out evaluation.
pub const EVAL_BATCHES: usize = 8;
/// The per-round held-out evaluation's sampling seed: fixed for good.
pub const EVAL_SEED: u64 = 0x0e7a_1b47_c4e5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let r = |own_gain, other_gain| ProbeResult {
            own_gain,
            other_gain,
            ..ProbeResult::from_losses(f32::NAN, f32::NAN, f32::NAN, f32::NAN)
        };
        let d = ProbeResult::from_losses(3.5, 3.25, 3.4, 3.3).describe();
        assert_eq!(
            d,
            "probe: own shard 3.5000 -> 3.2500 (gain +0.2500), held-out 3.4000 -> 3.3000 (gain +0.1000)"
        );
        assert!(r(0.2, 0.1).verdict(0.05, 0.0).is_ok());
        assert!(r(0.2, 0.24).verdict(0.05, 0.0).is_ok());
        assert_eq!(r(0.2, 0.3).verdict(0.05, 0.0), Err(RejectReason::NotUseful));
        assert_eq!(
            r(-0.1, -0.2).verdict(0.05, 0.0),
            Err(RejectReason::NotUseful)
        );
        assert_eq!(
            r(f32::NAN, 0.0).verdict(0.05, 0.0),
            Err(RejectReason::NotUseful)
        );
        // Under the round's bar: a sliver of gain is not enough.
        assert_eq!(
            r(0.01, 0.01).verdict(0.05, 0.02),
            Err(RejectReason::NotUseful)
        );
        assert!(r(0.03, 0.03).verdict(0.05, 0.02).is_ok());
    }

    #[test]
    fn the_round_bar_is_a_fraction_of_the_median_gain() {
        let g = |own_gain: f32| ProbeResult::from_losses(3.0, 3.0 - own_gain, 3.0, 3.0);
        // Figures of a `bench attacks` round: seven honest gains near 0.07,
        // three noise updates near 0.001 (ledger of the noise run, round 3).
        let round: Vec<ProbeResult> = [
            0.097, 0.082, 0.069, 0.051, 0.073, 0.066, 0.065, 0.0019, 0.001, -0.003,
        ]
        .into_iter()
        .map(g)
        .collect();
        let bar = round_bar(&round, 0.25);
        assert!((bar - 0.25 * 0.065).abs() < 1e-3, "{bar}");
        let verdicts: Vec<bool> = round.iter().map(|r| r.verdict(1.0, bar).is_ok()).collect();
        assert_eq!(
            verdicts,
            [
                true, true, true, true, true, true, true, false, false, false
            ]
        );
        // Off, empty, or a round where nothing helped: no bar beyond gain > 0.
        assert_eq!(round_bar(&round, 0.0), 0.0);
        assert_eq!(round_bar(&[], 0.25), 0.0);
        assert_eq!(round_bar(&[g(-0.2), g(-0.1)], 0.25), 0.0);
        assert_eq!(round_bar(&[g(f32::NAN)], 0.25), 0.0);
    }

    #[test]
    fn the_bar_scales_with_the_square_root_of_assigned_steps() {
        let g = |own_gain: f32| ProbeResult::from_losses(3.0, 3.0 - own_gain, 3.0, 3.0);
        // Two nodes paced at 2H = 20 steps and one at H/2 = 5, with the
        // short one on an unlucky draw: it gains under a quarter of the
        // raw median, though 0.45 of the long ones' per √step.
        let round = [(g(0.17), 20), (g(0.16), 20), (g(0.038), 5)];
        let raw: Vec<ProbeResult> = round.iter().map(|(r, _)| *r).collect();
        assert!(raw[2].verdict(1.0, round_bar(&raw, 0.25)).is_err());
        let unit = unit_bar(&round, 0.25);
        assert!(
            (unit - 0.25 * 0.16 / 20f32.sqrt()).abs() < 1e-6,
            "the median of gain / sqrt(steps): {unit}"
        );
        for (r, steps) in &round {
            assert!(r.verdict(1.0, unit * work_scale(*steps)).is_ok(), "{r:?}");
        }
        // A sliver still fails, whatever its steps.
        assert!(g(0.015).verdict(1.0, unit * work_scale(5)).is_err());
        assert!(g(0.03).verdict(1.0, unit * work_scale(20)).is_err());
        // Zero steps count as one, not a division by zero.
        assert_eq!(work_scale(0), 1.0);
        assert!((unit_bar(&[(g(0.1), 0)], 0.5) - 0.05).abs() < 1e-6);
    }

    #[test]
    fn honest_nodes_on_distinct_genres_pass_the_round_bar_and_noise_does_not() {
        // The regression of issue #13: honest updates trained on different
        // kinds of text (counting, sums, prose) gain very differently on
        // their own shards; all must pass. Noise of an honest norm must not.
        use barnraise_trainer::InnerConfig;
        use barnraise_trainer::data::{corpus, tokenize_bytes};
        let model = ModelConfig::preset("tiny").unwrap();
        let genres: Vec<Vec<u16>> = corpus::genres(12_000)
            .iter()
            .map(|g| tokenize_bytes(g.as_bytes()))
            .collect();
        let mixed = tokenize_bytes(corpus::generate(9, 24_000).as_bytes());
        let (warmup, heldout) = mixed.split_at(12_000);
        let inner = |seed| InnerConfig {
            steps: 20,
            batch_size: 8,
            seq_len: 64,
            warmup: 1,
            seed,
            ..InnerConfig::default()
        };
        let mut trainer = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
        trainer.train_inner(warmup, &inner(1)).unwrap();
        let theta = trainer.flat_params().unwrap();
        let update_on = |tokens: &[u16]| {
            let mut t = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
            t.set_flat_params(&theta).unwrap();
            t.train_inner(tokens, &inner(2)).unwrap();
            let local = t.flat_params().unwrap();
            theta
                .iter()
                .zip(&local)
                .map(|(a, b)| a - b)
                .collect::<Vec<f32>>()
        };
        let honest: Vec<Vec<f32>> = genres.iter().map(|g| update_on(g)).collect();
        // Assigned prose, trained on counting.
        let off_genre = update_on(&genres[0]);
        // Uniform noise with the prose update's norm.
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let raw: Vec<f32> = (0..theta.len() as u64)
            .map(|i| ((i.wrapping_mul(2_654_435_761) % 65_536) as f32 / 65_536.0) - 0.5)
            .collect();
        let scale = norm(&honest[2]) / norm(&raw);
        let noise: Vec<f32> = raw.iter().map(|x| x * scale).collect();

        let cfg = VerifyConfig::default();
        let mut probe = Probe::new(&model, &theta, &cfg, 64, 3).unwrap();
        let heldout_base = probe.base_loss(heldout).unwrap();
        let mut results = Vec::new();
        for (delta, own) in [
            (&honest[0], &genres[0]),
            (&honest[1], &genres[1]),
            (&honest[2], &genres[2]),
            (&off_genre, &genres[2]),
            (&noise, &genres[2]),
        ] {
            let own_base = probe.base_loss(own).unwrap();
            results.push(
                probe
                    .measure(delta, own, own_base, heldout, heldout_base)
                    .unwrap(),
            );
        }
        let bar = round_bar(&results, cfg.probe_min_relative_gain);
        let verdicts: Vec<bool> = results
            .iter()
            .map(|r| r.verdict(cfg.probe_margin, bar).is_ok())
            .collect();
        assert_eq!(
            (verdicts[..3].to_vec(), verdicts[4]),
            (vec![true, true, true], false),
            "every honest update passes and the noise does not; bar {bar}: {results:#?}"
        );
        // The off-genre update shows in its gain (0.22 against the honest
        // prose update's 0.82 when written), but a bar high enough to refuse
        // it would also refuse honest nodes whose data is harder than the
        // round's typical shard, so it is not refused at the default
        // (docs/security.md, "The usefulness probe").
        assert!(
            results[3].own_gain < 0.5 * results[2].own_gain,
            "{results:#?}"
        );
    }

    #[test]
    fn probe_accepts_a_trained_update_and_rejects_its_sign_flip() {
        use barnraise_trainer::InnerConfig;
        use barnraise_trainer::data::{corpus, tokenize_bytes};
        let model = ModelConfig::preset("tiny").unwrap();
        let tokens = tokenize_bytes(corpus::generate(5, 40_000).as_bytes());
        let (own, heldout) = tokens.split_at(20_000);
        let mut trainer = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
        let theta = trainer.flat_params().unwrap();
        let inner = InnerConfig {
            steps: 10,
            batch_size: 4,
            seq_len: 32,
            warmup: 1,
            ..InnerConfig::default()
        };
        trainer.train_inner(own, &inner).unwrap();
        let local = trainer.flat_params().unwrap();
        let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();

        let cfg = VerifyConfig::default();
        let mut probe = Probe::new(&model, &theta, &cfg, 32, 1).unwrap();
        let own_base = probe.base_loss(own).unwrap();
        let heldout_base = probe.base_loss(heldout).unwrap();
        let honest = probe
            .measure(&delta, own, own_base, heldout, heldout_base)
            .unwrap();
        assert!(honest.own_gain > 0.0, "{honest:?}");
        assert_eq!(honest.verdict(cfg.probe_margin, 0.0), Ok(()));
        let flipped: Vec<f32> = delta.iter().map(|d| -d).collect();
        let bad = probe
            .measure(&flipped, own, own_base, heldout, heldout_base)
            .unwrap();
        assert_eq!(
            bad.verdict(cfg.probe_margin, 0.0),
            Err(RejectReason::NotUseful),
            "{bad:?}"
        );
        let nothing = probe
            .measure(
                &vec![0.0; theta.len()],
                own,
                own_base,
                heldout,
                heldout_base,
            )
            .unwrap();
        assert_eq!(
            nothing.verdict(cfg.probe_margin, 0.0),
            Err(RejectReason::NotUseful)
        );
        assert!(
            probe
                .measure(&[0.0; 3], own, own_base, heldout, heldout_base)
                .is_err()
        );
    }
}
