//! `barnraise bench diloco`: data-parallel training against DiLoCo at equal
//! total tokens, in one run, on the built-in corpus.
//!
//! Arms:
//! - (a) `dp`: the synchronous data-parallel equivalent — one model, a k-times
//!   larger batch, R·H steps;
//! - (b) `diloco-fp32`: k workers, H inner steps, R rounds, lossless updates;
//! - (c), (d), ...: one per [`ArmSpec`] in the config — a codec, and
//!   optionally its own H (rounds R·H/H' keep tokens equal), outer step,
//!   error-feedback decay and density warm-up. By default `int8:256` and
//!   `topk:4096:2048:4`.
//!
//! Every arm starts from the same seeded weights, sees the same total number
//! of tokens from the same distribution, uses the same inner schedule (warmup,
//! then cosine over R·H steps), and is scored on the same held-out batches.
//! DiLoCo arms run their k workers one after another in this process and
//! aggregate exactly as the protocol does: decode each worker's payload,
//! weighted mean by tokens, Nesterov outer step.
//!
//! Bytes are what one worker uploads over the whole run: for (a) one fp32
//! gradient per step (the parameter-server convention; a ring all-reduce
//! moves 2(k−1)/k times that per worker), for DiLoCo arms the encoded
//! payloads of its rounds. Each arm reports its loss gap to (b) and to (a)
//! and whether it is on the Pareto frontier of traffic against loss.

mod arm;
pub mod throughput;

pub use arm::ArmSpec;
pub use barnraise_protocol::codec::{CodecSchedule, DensityWarmup};

use crate::data::corpus;
use crate::model::ModelConfig;
use crate::rng::derive_seed;
use crate::train::{InnerConfig, TrainError, Trainer, tail_start};
use barnraise_protocol::aggregate::{AggregationRule, aggregate_dense_into};
use barnraise_protocol::codec::{self, CodecConfig, CodecError, Encoder};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer, weighted_mean_into};
use serde::Serialize;
use std::fmt;
use std::time::Instant;

/// The loss gap to DiLoCo fp32, in percent, within which an arm counts as
/// at parity.
pub const PARITY_PCT: f64 = 2.0;

/// Labels of the compressed arms: (c) onwards.
const ARM_LABELS: &str = "cdefghijklmnopqrstuvwxyz";

/// How the bench is sized. Defaults finish in a few minutes on 2 CPU cores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DilocoBenchConfig {
    pub preset: String,
    pub model: ModelConfig,
    /// k: DiLoCo workers (and the data-parallel batch multiplier).
    pub workers: usize,
    /// H: inner steps per round of (a) and (b), and of every arm that does
    /// not set its own.
    pub inner_steps: usize,
    /// R: rounds at that H.
    pub rounds: usize,
    /// Sequences per worker per step.
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    pub outer: OuterConfig,
    /// The compressed arms, (c) onwards.
    pub arms: Vec<ArmSpec>,
    /// Built-in corpus bytes per worker (each worker its own seed).
    pub corpus_bytes: usize,
    /// Held-out batches of 8 sequences for the final loss.
    pub eval_batches: usize,
    /// Score the held-out loss after every this many rounds (and always after
    /// the last); 1 scores every round.
    pub eval_every: usize,
    /// The first seed (data, initial weights, batches, held-out batches).
    pub seed: u64,
    /// How many times the whole bench runs, with seeds `seed`, `seed + 1`,
    /// ...; the report gives every arm's mean, spread and per-seed losses.
    pub seeds: usize,
    /// Do not train the data-parallel reference (a): a third less time
    /// with one compressed arm. Its bytes (what the traffic reductions are
    /// against) need no run; its loss and every gap against it are NaN.
    pub skip_dp: bool,
    /// Do not train the DiLoCo fp32 reference (b) either, for a run whose
    /// reference losses are already known (the bench is deterministic on
    /// the CPU): its loss and every gap against it are NaN.
    pub skip_fp32: bool,
}

impl DilocoBenchConfig {
    /// The defaults for a preset: k=4, H=30, R=10.
    pub fn for_preset(preset: &str) -> Option<Self> {
        let model = ModelConfig::preset(preset)?;
        let seq_len = model.max_seq_len.min(128);
        Some(DilocoBenchConfig {
            preset: preset.to_string(),
            model,
            workers: 4,
            inner_steps: 30,
            rounds: 10,
            batch_size: 8,
            seq_len,
            // Best of {1.5e-3, 3e-3, 6e-3, 1.2e-2} for the data-parallel arm
            // and for DiLoCo alike (docs/training.md has the sweep).
            lr: 6e-3,
            warmup: 20,
            // Plain averaging: at tens of rounds it beat DiLoCo's Nesterov
            // 0.7/0.9 (whose momentum needs hundreds of rounds) and 0.7/0.5.
            outer: OuterConfig {
                lr: 1.0,
                momentum: 0.0,
                nesterov: true,
            },
            // Dense int8, and half of each chunk at 4 bits (3.02 bits/param
            // with the mask layout), which trailed fp32 by 1.1% at R=40
            // (docs/training.md).
            arms: vec![
                ArmSpec::codec(CodecConfig::int8_default()),
                ArmSpec::codec(CodecConfig::TopK {
                    chunk: 4096,
                    k: 2048,
                    bits: 4,
                }),
            ],
            corpus_bytes: 256 * 1024,
            eval_batches: 16,
            eval_every: 1,
            seed: 1,
            seeds: 1,
            skip_dp: false,
            skip_fp32: false,
        })
    }

    /// The batch-sampler seed of worker `worker` in round `round`.
    fn batch_seed(&self, worker: usize, round: usize) -> u64 {
        derive_seed(self.seed, &format!("worker {worker} round {round}"))
    }

    /// Whether the held-out loss is scored after `round` (0-based).
    fn evaluates_after(&self, round: usize) -> bool {
        round + 1 == self.rounds || (round + 1).is_multiple_of(self.eval_every.max(1))
    }

    /// Tokens every arm trains on: k · R · H · batch · seq.
    pub fn total_tokens(&self) -> u64 {
        (self.workers * self.rounds * self.inner_steps * self.batch_size * self.seq_len) as u64
    }

    /// The config one arm runs under: its own H (with rounds that keep the
    /// tokens equal) and outer step. The inner schedule spans the same R·H
    /// steps whatever the arm's H.
    pub fn for_arm(&self, spec: &ArmSpec) -> Result<DilocoBenchConfig, BenchError> {
        let mut cfg = self.clone();
        if let Some(h) = spec.inner_steps {
            let steps = self.rounds * self.inner_steps;
            if h == 0 || !steps.is_multiple_of(h) {
                return Err(BenchError::Config(format!(
                    "arm `{spec}`: h={h} must divide the run's R·H = {steps} inner steps, \
                     so that the arm trains on the same tokens"
                )));
            }
            cfg.inner_steps = h;
            cfg.rounds = steps / h;
        }
        if spec.overlap as usize >= cfg.inner_steps {
            return Err(BenchError::Config(format!(
                "arm `{spec}`: overlap={} must be fewer than the arm's H = {} steps",
                spec.overlap, cfg.inner_steps
            )));
        }
        if let Some(lr) = spec.outer_lr {
            cfg.outer.lr = lr;
        }
        if let Some(m) = spec.outer_momentum {
            cfg.outer.momentum = m;
        }
        Ok(cfg)
    }

    fn inner(&self, round: usize, batch_size: usize, seed: u64) -> InnerConfig {
        InnerConfig {
            steps: self.inner_steps,
            batch_size,
            seq_len: self.seq_len,
            lr: self.lr,
            min_lr: self.lr * 0.1,
            warmup: self.warmup,
            schedule_steps: self.rounds * self.inner_steps,
            start_step: round * self.inner_steps,
            seed,
            ..InnerConfig::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: {0}")]
    Config(String),
    #[error("bench training failed: {0}")]
    Train(#[from] TrainError),
    #[error("bench codec failed: {0}")]
    Codec(#[from] CodecError),
}

/// One arm's result on one seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmReport {
    /// "a", "b", "c", ...
    pub arm: String,
    pub name: String,
    /// The codec, for DiLoCo arms ("fp32", "int8:256", "topk:4096:64:2").
    pub codec: Option<String>,
    /// The whole arm as given (codec and overrides), for DiLoCo arms.
    pub spec: Option<String>,
    /// This arm's H and R (R·H is the same for every arm).
    pub inner_steps: usize,
    pub rounds: usize,
    pub heldout_loss: f32,
    /// Held-out loss after each scored round (every `eval_every`-th and the
    /// last; DiLoCo: of the global params).
    pub heldout_per_round: Vec<f32>,
    /// Top-k arms only: the held-out loss had the workers' unsent
    /// error-feedback residuals been applied as one more plain-average step
    /// after the last round. How much of the gap to fp32 is update mass still
    /// waiting in the residuals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_residual_flushed: Option<f32>,
    pub tokens: u64,
    pub bytes_per_worker: u64,
    /// Bits per parameter of one upload: a payload for DiLoCo arms (the mean
    /// over rounds when the density changes), a gradient (32) for (a).
    pub bits_per_param: f64,
    /// Bytes of (a) divided by this arm's bytes.
    pub reduction_vs_dp: f64,
    /// Held-out loss against (b)'s and (a)'s, percent (positive = worse).
    pub gap_vs_fp32_pct: f64,
    pub gap_vs_dp_pct: f64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub gflops_per_s: f64,
}

/// One arm over every seed: the mean final held-out loss, its spread, the
/// per-seed values (in seed order), and its place against the references.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub name: String,
    pub codec: Option<String>,
    pub spec: Option<String>,
    pub inner_steps: usize,
    pub rounds: usize,
    /// Mean over seeds of the final held-out loss.
    pub heldout_loss: f32,
    /// Sample standard deviation over seeds (0 with one seed).
    pub heldout_std: f32,
    pub heldout_min: f32,
    pub heldout_max: f32,
    pub heldout_per_seed: Vec<f32>,
    /// Tokens of one seed's run (the same for every seed).
    pub tokens: u64,
    /// Bytes one worker uploads in one seed's run.
    pub bytes_per_worker: u64,
    pub bits_per_param: f64,
    pub reduction_vs_dp: f64,
    /// The mean held-out loss against (b)'s mean, percent.
    pub gap_vs_fp32_pct: f64,
    /// The mean over seeds of each seed's gap to (b), percent.
    pub gap_vs_fp32_pct_seed_mean: f64,
    /// The mean held-out loss against (a)'s mean, percent.
    pub gap_vs_dp_pct: f64,
    /// Seeds on which this arm is within [`PARITY_PCT`] of (b).
    pub seeds_at_parity: usize,
    /// No other arm sends less with a lower mean loss (or as little with a
    /// lower one, or less with the same).
    pub pareto: bool,
    /// Training wall time summed over seeds.
    pub wall_s: f64,
    /// Over all seeds.
    pub tokens_per_s: f64,
    pub gflops_per_s: f64,
}

/// One seed's bench: the starting loss and every arm.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedRun {
    pub seed: u64,
    pub initial_heldout_loss: f32,
    pub arms: Vec<ArmReport>,
    /// (b) vs (a) held-out loss, percent (positive = DiLoCo worse).
    pub fp32_vs_dp_pct: f64,
}

/// The whole bench: config, every arm summarised over seeds (the Pareto
/// table), and every seed's run in full.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DilocoBenchReport {
    pub config: DilocoBenchConfig,
    pub params: usize,
    pub flops_per_token: f64,
    pub threads: usize,
    /// Mean over seeds.
    pub initial_heldout_loss: f32,
    pub arms: Vec<ArmSummary>,
    /// (b) vs (a) of the mean held-out losses, percent (positive = DiLoCo
    /// worse); each seed's own gap is in `runs`.
    pub fp32_vs_dp_pct: f64,
    /// Mean over seeds of each seed's (b) vs (a) gap, percent.
    pub fp32_vs_dp_pct_seed_mean: f64,
    /// The parity margin: [`PARITY_PCT`].
    pub parity_pct: f64,
    /// The compressed arm with the largest traffic reduction whose mean loss
    /// is within `parity_pct` of (b), if any.
    pub best_at_parity: Option<String>,
    /// Every seed's run, in seed order.
    pub runs: Vec<SeedRun>,
    /// Wall time of the whole bench, evaluation included.
    pub wall_s: f64,
}

/// Progress while the bench runs.
#[derive(Debug, Clone)]
pub struct BenchProgress<'a> {
    pub seed: u64,
    pub arm: &'a str,
    pub round: usize,
    pub rounds: usize,
    pub heldout_loss: f32,
}

struct Data {
    /// Per-worker token streams.
    workers: Vec<Vec<u16>>,
    /// All workers' streams concatenated, for the data-parallel arm.
    all: Vec<u16>,
    heldout: Vec<u16>,
}

fn corpus_data(cfg: &DilocoBenchConfig) -> Data {
    let tokens = |seed: u64| {
        crate::data::tokenize_bytes(corpus::generate(seed, cfg.corpus_bytes).as_bytes())
    };
    let workers: Vec<Vec<u16>> = (0..cfg.workers)
        .map(|w| tokens(derive_seed(cfg.seed, &format!("corpus worker {w}"))))
        .collect();
    let all = workers.concat();
    let heldout = tokens(derive_seed(cfg.seed, "corpus heldout"));
    Data {
        workers,
        all,
        heldout,
    }
}

/// Refuses a config that cannot run, before anything trains.
fn check_config(cfg: &DilocoBenchConfig) -> Result<(), BenchError> {
    if cfg.workers == 0 || cfg.rounds == 0 || cfg.inner_steps == 0 {
        return Err(BenchError::Config(
            "workers, rounds and inner steps must be positive".to_string(),
        ));
    }
    if cfg.seeds == 0 {
        return Err(BenchError::Config("seeds must be positive".to_string()));
    }
    if cfg.corpus_bytes <= cfg.seq_len + 1 {
        return Err(BenchError::Config(format!(
            "corpus of {} bytes is shorter than one sequence",
            cfg.corpus_bytes
        )));
    }
    if cfg.arms.len() > ARM_LABELS.len() {
        return Err(BenchError::Config(format!(
            "{} arms given; at most {} fit the labels (c) to (z)",
            cfg.arms.len(),
            ARM_LABELS.len()
        )));
    }
    for spec in &cfg.arms {
        spec.validate()
            .map_err(|e| BenchError::Config(format!("arm `{spec}`: {e}")))?;
        cfg.for_arm(spec)?;
    }
    Ok(())
}

/// Runs every arm once per seed (`cfg.seed`, `cfg.seed + 1`, ...,
/// `cfg.seeds` of them). Each seed's run depends on its seed alone, so seed
/// `s` here gives what a one-seed bench with `seed = s` gives. `progress` is
/// called after every scored round of every arm of every seed.
pub fn run_diloco(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<DilocoBenchReport, BenchError> {
    check_config(cfg)?;
    let started = Instant::now();
    let runs = (0..cfg.seeds as u64)
        .map(|i| {
            let seed_cfg = DilocoBenchConfig {
                seed: cfg.seed.wrapping_add(i),
                seeds: 1,
                ..cfg.clone()
            };
            run_seed(&seed_cfg, device, progress)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let flops_per_token = cfg.model.flops_per_token_at(cfg.seq_len);
    let mut arms: Vec<ArmSummary> = (0..runs[0].arms.len())
        .map(|i| summarize(runs.iter().map(|r| &r.arms[i]), flops_per_token))
        .collect();
    let (dp, fp32) = (arms[0].heldout_loss, arms[1].heldout_loss);
    for arm in &mut arms {
        arm.gap_vs_fp32_pct = pct(arm.heldout_loss, fp32);
        arm.gap_vs_dp_pct = pct(arm.heldout_loss, dp);
    }
    mark_pareto(&mut arms);
    let best_at_parity = arms[2..]
        .iter()
        .filter(|a| a.gap_vs_fp32_pct <= PARITY_PCT)
        .max_by(|x, y| x.reduction_vs_dp.total_cmp(&y.reduction_vs_dp))
        .map(|a| a.arm.clone());
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = xs.collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    Ok(DilocoBenchReport {
        params: cfg.model.params_count(),
        flops_per_token,
        threads: candle_core::utils::get_num_threads(),
        initial_heldout_loss: mean(&mut runs.iter().map(|r| f64::from(r.initial_heldout_loss)))
            as f32,
        fp32_vs_dp_pct: pct(fp32, dp),
        fp32_vs_dp_pct_seed_mean: mean(&mut runs.iter().map(|r| r.fp32_vs_dp_pct)),
        parity_pct: PARITY_PCT,
        best_at_parity,
        arms,
        runs,
        config: cfg.clone(),
        wall_s: started.elapsed().as_secs_f64(),
    })
}

/// `x` against `base`, percent (positive = `x` is larger).
fn pct(x: f32, base: f32) -> f64 {
    f64::from((x - base) / base) * 100.0
}

/// Marks the arms no other arm dominates in (traffic reduction, mean loss).
fn mark_pareto(arms: &mut [ArmSummary]) {
    let points: Vec<(f64, f32)> = arms
        .iter()
        .map(|a| (a.reduction_vs_dp, a.heldout_loss))
        .collect();
    for (i, arm) in arms.iter_mut().enumerate() {
        let (reduction, loss) = points[i];
        // An arm that was not run (a skipped dp) has no loss to be on it.
        arm.pareto = loss.is_finite()
            && !points.iter().enumerate().any(|(j, &(r, l))| {
                j != i && r >= reduction && l <= loss && (r > reduction || l < loss)
            });
    }
}

/// One arm's reports over every seed, in seed order. The gaps of the means
/// are filled in by the caller, which knows the references.
fn summarize<'a>(reports: impl Iterator<Item = &'a ArmReport>, flops_per_token: f64) -> ArmSummary {
    let reports: Vec<&ArmReport> = reports.collect();
    let first = reports[0];
    let losses: Vec<f32> = reports.iter().map(|r| r.heldout_loss).collect();
    let n = losses.len() as f64;
    let mean = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / n;
    let var = if losses.len() > 1 {
        losses
            .iter()
            .map(|&l| (f64::from(l) - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0)
    } else {
        0.0
    };
    let wall_s: f64 = reports.iter().map(|r| r.wall_s).sum();
    let tokens: u64 = reports.iter().map(|r| r.tokens).sum();
    // An arm that was not run has no wall time, and no rate.
    let tokens_per_s = if wall_s > 0.0 {
        tokens as f64 / wall_s
    } else {
        0.0
    };
    ArmSummary {
        arm: first.arm.clone(),
        name: first.name.clone(),
        codec: first.codec.clone(),
        spec: first.spec.clone(),
        inner_steps: first.inner_steps,
        rounds: first.rounds,
        heldout_loss: mean as f32,
        heldout_std: var.sqrt() as f32,
        heldout_min: losses.iter().copied().fold(f32::INFINITY, f32::min),
        heldout_max: losses.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        heldout_per_seed: losses,
        tokens: first.tokens,
        bytes_per_worker: first.bytes_per_worker,
        bits_per_param: first.bits_per_param,
        reduction_vs_dp: first.reduction_vs_dp,
        gap_vs_fp32_pct: 0.0,
        gap_vs_fp32_pct_seed_mean: reports.iter().map(|r| r.gap_vs_fp32_pct).sum::<f64>() / n,
        gap_vs_dp_pct: 0.0,
        seeds_at_parity: reports
            .iter()
            .filter(|r| r.gap_vs_fp32_pct <= PARITY_PCT)
            .count(),
        pareto: false,
        wall_s,
        tokens_per_s,
        gflops_per_s: tokens_per_s * flops_per_token / 1e9,
    }
}

/// Every arm on one seed (`cfg.seed`).
fn run_seed(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<SeedRun, BenchError> {
    let data = corpus_data(cfg);
    let init_seed = derive_seed(cfg.seed, "init");
    let eval_seed = derive_seed(cfg.seed, "eval");
    let initial = Trainer::new(&cfg.model, device.clone(), init_seed)?.eval_loss_with(
        &data.heldout,
        cfg.eval_batches,
        crate::train::EVAL_BATCH_SIZE,
        cfg.seq_len,
        eval_seed,
    )?;
    let flops_per_token = cfg.model.flops_per_token_at(cfg.seq_len);
    let mut kinds = vec![
        ("a".to_string(), ArmKind::DataParallel),
        (
            "b".to_string(),
            ArmKind::Diloco(ArmSpec::codec(CodecConfig::Fp32)),
        ),
    ];
    kinds.extend(
        cfg.arms
            .iter()
            .zip(ARM_LABELS.chars())
            .map(|(spec, label)| (label.to_string(), ArmKind::Diloco(*spec))),
    );
    let mut arms = Vec::new();
    for (arm, kind) in kinds {
        arms.push(run_arm_on(cfg, device, &data, &arm, kind, progress)?);
    }
    let dp_bytes = arms[0].bytes_per_worker as f64;
    let (dp, fp32) = (arms[0].heldout_loss, arms[1].heldout_loss);
    for arm in &mut arms {
        arm.reduction_vs_dp = dp_bytes / arm.bytes_per_worker.max(1) as f64;
        arm.gflops_per_s = arm.tokens_per_s * flops_per_token / 1e9;
        arm.gap_vs_fp32_pct = pct(arm.heldout_loss, fp32);
        arm.gap_vs_dp_pct = pct(arm.heldout_loss, dp);
    }
    Ok(SeedRun {
        seed: cfg.seed,
        initial_heldout_loss: initial,
        fp32_vs_dp_pct: pct(fp32, dp),
        arms,
    })
}

/// Which training procedure an arm runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArmKind {
    /// One model, a k-times batch, R·H steps.
    DataParallel,
    /// k workers, updates through the arm's codec, with its settings.
    Diloco(ArmSpec),
}

/// Runs one arm alone on `cfg.seed` (for sweeps and diagnostics; `cfg.seeds`
/// and `cfg.arms` are not used); `arm` is its label. It gives what
/// [`run_diloco`] gives for that arm and seed. Its gaps are left at 0 and
/// its reduction is against the data-parallel bytes of `cfg`.
pub fn run_arm(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    arm: &str,
    kind: ArmKind,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    check_config(&DilocoBenchConfig {
        arms: Vec::new(),
        ..cfg.clone()
    })?;
    if let ArmKind::Diloco(spec) = &kind {
        spec.validate()
            .map_err(|e| BenchError::Config(format!("arm `{spec}`: {e}")))?;
    }
    let data = corpus_data(cfg);
    let mut report = run_arm_on(cfg, device, &data, arm, kind, progress)?;
    report.gflops_per_s = report.tokens_per_s * cfg.model.flops_per_token_at(cfg.seq_len) / 1e9;
    let dp_bytes = (cfg.rounds * cfg.inner_steps * cfg.model.params_count() * 4) as f64;
    report.reduction_vs_dp = dp_bytes / report.bytes_per_worker.max(1) as f64;
    Ok(report)
}

fn run_arm_on(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    data: &Data,
    arm: &str,
    kind: ArmKind,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    let init_seed = derive_seed(cfg.seed, "init");
    let eval_seed = derive_seed(cfg.seed, "eval");
    match kind {
        ArmKind::DataParallel if cfg.skip_dp => {
            let bytes = (cfg.rounds * cfg.inner_steps) as u64 * cfg.model.params_count() as u64 * 4;
            Ok(skipped(cfg, arm, "dp (not run)", bytes))
        }
        ArmKind::Diloco(_) if cfg.skip_fp32 && arm == "b" => {
            let upload = CodecConfig::Fp32.encoded_len(cfg.model.params_count()) as u64;
            Ok(skipped(
                cfg,
                arm,
                "diloco-fp32 (not run)",
                cfg.rounds as u64 * upload,
            ))
        }
        ArmKind::DataParallel => {
            run_data_parallel(cfg, device, data, init_seed, eval_seed, arm, progress)
        }
        ArmKind::Diloco(spec) => {
            let arm_cfg = cfg.for_arm(&spec)?;
            run_diloco_arm(
                &arm_cfg, device, data, init_seed, eval_seed, arm, &spec, progress,
            )
        }
    }
}

fn eval(
    trainer: &Trainer,
    cfg: &DilocoBenchConfig,
    data: &Data,
    eval_seed: u64,
) -> Result<f32, TrainError> {
    trainer.eval_loss_with(
        &data.heldout,
        cfg.eval_batches,
        crate::train::EVAL_BATCH_SIZE,
        cfg.seq_len,
        eval_seed,
    )
}

/// Arm (a) when it is not run: what it would send, which depends on the
/// config alone, and NaN for everything a run would have measured.
/// A reference arm not run: its traffic (`bytes_per_worker`) needs no run;
/// its loss and every gap against it are NaN.
fn skipped(cfg: &DilocoBenchConfig, arm: &str, name: &str, bytes_per_worker: u64) -> ArmReport {
    ArmReport {
        arm: arm.to_string(),
        name: name.to_string(),
        codec: None,
        spec: None,
        inner_steps: cfg.inner_steps,
        rounds: cfg.rounds,
        heldout_loss: f32::NAN,
        heldout_per_round: Vec::new(),
        heldout_residual_flushed: None,
        tokens: (cfg.rounds * cfg.inner_steps * cfg.workers * cfg.batch_size * cfg.seq_len) as u64,
        bytes_per_worker,
        bits_per_param: 32.0,
        // Against the data-parallel bytes, set with the other arms'.
        reduction_vs_dp: 1.0,
        gap_vs_fp32_pct: f64::NAN,
        gap_vs_dp_pct: f64::NAN,
        wall_s: 0.0,
        tokens_per_s: 0.0,
        gflops_per_s: 0.0,
    }
}

fn run_data_parallel(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    data: &Data,
    init_seed: u64,
    eval_seed: u64,
    arm: &str,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    let label = format!("{arm}: dp");
    let mut trainer = Trainer::new(&cfg.model, device.clone(), init_seed)?;
    let mut tokens = 0;
    let mut train_wall = 0.0;
    let mut per_round = Vec::new();
    for round in 0..cfg.rounds {
        let inner = cfg.inner(
            round,
            cfg.batch_size * cfg.workers,
            // Worker 0's batch seed: with k=1 both arms draw the same batches
            // from the same stream, so DiLoCo with plain averaging reduces to
            // this arm (a test holds the two together).
            cfg.batch_seed(0, round),
        );
        let report = trainer.train_inner(&data.all, &inner)?;
        tokens += report.tokens;
        train_wall += report.wall.as_secs_f64();
        if !cfg.evaluates_after(round) {
            continue;
        }
        let loss = eval(&trainer, cfg, data, eval_seed)?;
        per_round.push(loss);
        progress(BenchProgress {
            seed: cfg.seed,
            arm: &label,
            round: round + 1,
            rounds: cfg.rounds,
            heldout_loss: loss,
        });
    }
    let params = cfg.model.params_count() as u64;
    Ok(ArmReport {
        arm: arm.to_string(),
        name: "dp".to_string(),
        codec: None,
        spec: None,
        inner_steps: cfg.inner_steps,
        rounds: cfg.rounds,
        heldout_loss: per_round.last().copied().unwrap_or(f32::NAN),
        heldout_per_round: per_round,
        heldout_residual_flushed: None,
        tokens,
        bytes_per_worker: (cfg.rounds * cfg.inner_steps) as u64 * params * 4,
        bits_per_param: 32.0,
        reduction_vs_dp: 1.0,
        gap_vs_fp32_pct: 0.0,
        gap_vs_dp_pct: 0.0,
        wall_s: train_wall,
        tokens_per_s: tokens as f64 / train_wall.max(1e-9),
        gflops_per_s: 0.0,
    })
}

/// One DiLoCo arm; `cfg` is already the arm's (see
/// [`DilocoBenchConfig::for_arm`]).
#[allow(clippy::too_many_arguments)]
fn run_diloco_arm(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    data: &Data,
    init_seed: u64,
    eval_seed: u64,
    arm: &str,
    spec: &ArmSpec,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    let name = match spec.schedule.codec {
        CodecConfig::Fp32 => "diloco-fp32",
        CodecConfig::Int8 { .. } => "diloco-int8",
        CodecConfig::TopK { .. } => "diloco-topk",
    };
    let params = cfg.model.params_count();
    let mut workers = Vec::with_capacity(cfg.workers);
    let mut encoders = Vec::with_capacity(cfg.workers);
    for _ in 0..cfg.workers {
        workers.push(Trainer::new(&cfg.model, device.clone(), init_seed)?);
        encoders.push(
            Encoder::new(spec.schedule.codec_at(0), params)?.with_decay(spec.schedule.decay()),
        );
    }
    let mut global = workers[0].flat_params()?;
    let mut outer = OuterOptimizer::new(cfg.outer, params);
    let mut evaluator = Trainer::new(&cfg.model, device.clone(), init_seed)?;
    let label = format!("{arm}: {name}");
    let (mut tokens, mut bytes, mut wall) = (0u64, 0u64, 0.0f64);
    let mut per_round = Vec::new();
    let mut decoded: Vec<Vec<f32>> = vec![vec![0.0; params]; cfg.workers];
    let mut average = vec![0.0f32; params];
    // θ of the last `delay` + 1 rounds: the workers of round r train from
    // θ_{r−delay} (θ_0 at first) while the outer step moves θ_r.
    // (kept only with a delay: a synchronous arm trains from θ_r itself).
    let mut thetas: std::collections::VecDeque<Vec<f32>> = std::collections::VecDeque::new();
    if spec.delay > 0 {
        thetas.push_back(global.clone());
    }
    // With `overlap=S`: what each worker's last S steps of the previous
    // round added, to start this round from θ_r plus it.
    let held_back = spec.overlap as usize;
    let mut carried: Vec<Option<Vec<f32>>> = vec![None; cfg.workers];
    let mut start = Vec::new();
    for round in 0..cfg.rounds {
        // `from=K`: no steps held back before round K.
        let overlap = if round >= spec.overlap_from as usize {
            held_back
        } else {
            0
        };
        let base: &[f32] = thetas.front().unwrap_or(&global);
        let started = Instant::now();
        let codec = spec.schedule.codec_at(round as u64);
        let mut weights = Vec::with_capacity(cfg.workers);
        for (w, (worker, encoder)) in workers.iter_mut().zip(&mut encoders).enumerate() {
            if encoder.config() != codec {
                // The density warm-up moved on: same residual, sparser codec.
                *encoder = Encoder::from_residual(codec, params, encoder.residual())?
                    .with_decay(spec.schedule.decay());
            }
            // With `fold=1` the carried steps' progress joins this round's
            // update instead of moving its start.
            let mut folded = None;
            match carried[w].take() {
                Some(offset) if spec.fold => {
                    worker.set_flat_params(base)?;
                    folded = Some(offset);
                }
                Some(offset) => {
                    let carry = spec.carry.unwrap_or(1.0);
                    start.clear();
                    start.extend(base.iter().zip(&offset).map(|(b, o)| b + carry * o));
                    worker.set_flat_params(&start)?;
                }
                // Eager: θ_{r−1} (all a worker knows of the global θ while
                // round r−1's updates travel) minus its own decoded update
                // of round r−1, the proxy for the round's average; its
                // update is then measured from there.
                None if spec.eager && spec.delay > 0 && round > 0 => {
                    start.clear();
                    start.extend(base.iter().zip(&decoded[w]).map(|(b, d)| b - d));
                    worker.set_flat_params(&start)?;
                }
                None => worker.set_flat_params(base)?,
            }
            let origin: &[f32] = if spec.eager && spec.delay > 0 && round > 0 {
                &start
            } else {
                base
            };
            let seed = cfg.batch_seed(w, round);
            let mut inner = cfg.inner(round, cfg.batch_size, seed);
            inner.steps -= overlap;
            let report = worker.train_inner(&data.workers[w], &inner)?;
            tokens += report.tokens;
            let local = worker.flat_params()?;
            let mut delta: Vec<f32> = origin.iter().zip(&local).map(|(g, l)| g - l).collect();
            if let Some(offset) = &folded {
                // Δ is θ minus where the worker got to; the steps carried
                // in moved it by `offset` on top.
                delta.iter_mut().zip(offset).for_each(|(d, o)| *d -= o);
            }
            let payload = encoder.encode(&delta)?;
            // Each worker's bytes are the same size; count worker 0's.
            if w == 0 {
                bytes += payload.len() as u64;
            }
            codec::decode_into(&payload, &mut decoded[w])?;
            let mut weight = report.tokens;
            if overlap > 0 {
                // The round's last S steps, while the update travels: from
                // θ_r − decoded Δ (what the node sent, so a replay can start
                // there too), on the rest of the round's batches: the ones
                // the synchronous arm's last S steps draw.
                // With `eager=1`: from where the outer step would take θ_r
                // were the worker's own update the round's average.
                let sent: Vec<f32> = if spec.eager {
                    let mut preview = Vec::with_capacity(params);
                    outer.preview_into(base, &decoded[w], &mut preview);
                    preview
                } else {
                    tail_start(base, &decoded[w])
                };
                worker.set_flat_params(&sent)?;
                let mut tail = cfg.inner(round, cfg.batch_size, seed);
                tail.steps = overlap;
                tail.start_step += cfg.inner_steps - overlap;
                tail.skip_batches = (cfg.inner_steps - overlap) * tail.accumulation.max(1);
                let report = worker.train_inner(&data.workers[w], &tail)?;
                tokens += report.tokens;
                weight += report.tokens;
                let after = worker.flat_params()?;
                carried[w] = Some(after.iter().zip(&sent).map(|(a, s)| a - s).collect());
            }
            weights.push(weight as f32);
        }
        let inputs: Vec<(&[f32], f32)> = decoded.iter().map(Vec::as_slice).zip(weights).collect();
        match &spec.rule {
            None | Some(AggregationRule::Mean) => weighted_mean_into(&inputs, &mut average),
            Some(rule) => aggregate_dense_into(rule, &inputs, &mut average)
                .map_err(|e| BenchError::Config(e.to_string()))?,
        }
        outer.step(&mut global, &average);
        if spec.delay > 0 {
            thetas.push_back(global.clone());
            while thetas.len() > spec.delay as usize + 1 {
                thetas.pop_front();
            }
        }
        wall += started.elapsed().as_secs_f64();
        if !cfg.evaluates_after(round) {
            continue;
        }
        evaluator.set_flat_params(&global)?;
        let loss = eval(&evaluator, cfg, data, eval_seed)?;
        per_round.push(loss);
        progress(BenchProgress {
            seed: cfg.seed,
            arm: &label,
            round: round + 1,
            rounds: cfg.rounds,
            heldout_loss: loss,
        });
    }
    let heldout_residual_flushed = if spec.schedule.codec.has_error_feedback() {
        let residuals: Vec<(&[f32], f32)> = encoders.iter().map(|e| (e.residual(), 1.0)).collect();
        weighted_mean_into(&residuals, &mut average);
        let flushed: Vec<f32> = global.iter().zip(&average).map(|(g, r)| g - r).collect();
        evaluator.set_flat_params(&flushed)?;
        Some(eval(&evaluator, cfg, data, eval_seed)?)
    } else {
        None
    };
    Ok(ArmReport {
        arm: arm.to_string(),
        name: name.to_string(),
        codec: Some(spec.schedule.codec.to_string()),
        spec: Some(spec.to_string()),
        inner_steps: cfg.inner_steps,
        rounds: cfg.rounds,
        heldout_loss: per_round.last().copied().unwrap_or(f32::NAN),
        heldout_per_round: per_round,
        heldout_residual_flushed,
        tokens,
        bytes_per_worker: bytes,
        bits_per_param: bytes as f64 * 8.0 / (cfg.rounds * params).max(1) as f64,
        reduction_vs_dp: 1.0,
        gap_vs_fp32_pct: 0.0,
        gap_vs_dp_pct: 0.0,
        wall_s: wall,
        tokens_per_s: tokens as f64 / wall.max(1e-9),
        gflops_per_s: 0.0,
    })
}

/// Bytes in decimal units for tables (kB, MB, GB).
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

impl fmt::Display for DilocoBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let seeds = match c.seeds {
            1 => format!("seed {}", c.seed),
            n => format!(
                "{n} seeds ({}..={})",
                c.seed,
                c.seed.wrapping_add(n as u64 - 1)
            ),
        };
        writeln!(
            f,
            "DiLoCo bench: preset {} ({} params, {:.1} MFLOP/token), k={} H={} R={}, batch {}x{} per worker, {} tokens per arm, {}, {} threads",
            c.preset,
            self.params,
            self.flops_per_token / 1e6,
            c.workers,
            c.inner_steps,
            c.rounds,
            c.batch_size,
            c.seq_len,
            c.total_tokens(),
            seeds,
            self.threads
        )?;
        writeln!(
            f,
            "inner AdamW peak lr {} (warmup {}, cosine over R*H steps) for every arm; outer lr {} momentum {}{} unless an arm sets its own",
            c.lr,
            c.warmup,
            c.outer.lr,
            c.outer.momentum,
            if c.outer.nesterov { " (Nesterov)" } else { "" }
        )?;
        writeln!(
            f,
            "initial held-out loss {:.4}{}",
            self.initial_heldout_loss,
            if c.seeds > 1 { " (mean)" } else { "" }
        )?;
        writeln!(
            f,
            "{:<16} {:<34} {:>4} {:>4} {:>6} {:>9} {:>7} {:>9} {:>9} {:>12} {:>10} {:>9} {:>8}",
            "arm",
            "spec",
            "H",
            "R",
            "bits/p",
            "held-out",
            "std",
            "vs fp32",
            "vs dp",
            "bytes/worker",
            "reduction",
            "tokens/s",
            "wall s"
        )?;
        for arm in &self.arms {
            writeln!(
                f,
                "{:<16} {:<34} {:>4} {:>4} {:>6.2} {:>9.4} {:>7.4} {:>+8.2}% {:>+8.2}% {:>12} {:>9.1}x {:>9.0} {:>8.1}{}",
                format!("({}) {}", arm.arm, arm.name),
                arm.spec.as_deref().unwrap_or("-"),
                arm.inner_steps,
                arm.rounds,
                arm.bits_per_param,
                arm.heldout_loss,
                arm.heldout_std,
                arm.gap_vs_fp32_pct,
                arm.gap_vs_dp_pct,
                human_bytes(arm.bytes_per_worker),
                arm.reduction_vs_dp,
                arm.tokens_per_s,
                arm.wall_s,
                if arm.pareto { "  pareto" } else { "" }
            )?;
        }
        if self.runs.len() > 1 {
            write!(f, "per seed held-out: {:>6}", "seed")?;
            for arm in &self.arms {
                write!(f, " {:>8}", format!("({})", arm.arm))?;
            }
            writeln!(f)?;
            for run in &self.runs {
                write!(f, "                   {:>6}", run.seed)?;
                for arm in &run.arms {
                    write!(f, " {:>8.4}", arm.heldout_loss)?;
                }
                writeln!(f)?;
            }
        }
        writeln!(
            f,
            "(b) vs (a): {:+.2}% of the mean held-out losses (mean of the per-seed gaps {:+.2}%)",
            self.fp32_vs_dp_pct, self.fp32_vs_dp_pct_seed_mean
        )?;
        match self
            .best_at_parity
            .as_ref()
            .and_then(|label| self.arms.iter().find(|a| &a.arm == label))
        {
            Some(best) => writeln!(
                f,
                "most compressed at parity (within {}% of (b) on the mean): ({}) {}, {:.1}x less than dp, {:+.2}% ({} of {} seeds within)",
                self.parity_pct,
                best.arm,
                best.spec.as_deref().unwrap_or("-"),
                best.reduction_vs_dp,
                best.gap_vs_fp32_pct,
                best.seeds_at_parity,
                self.runs.len()
            )?,
            None => writeln!(
                f,
                "no compressed arm is within {}% of (b) on the mean",
                self.parity_pct
            )?,
        }
        write!(
            f,
            "bench wall time {:.0} s (evaluation included)",
            self.wall_s
        )
    }
}
