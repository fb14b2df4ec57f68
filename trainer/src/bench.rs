//! `barnraise bench diloco`: data-parallel training against DiLoCo at equal
//! total tokens, in one run, on the built-in corpus.
//!
//! Arms:
//! - (a) `dp`: the synchronous data-parallel equivalent — one model, a k-times
//!   larger batch, R·H steps;
//! - (b) `diloco-fp32`: k workers, H inner steps, R rounds, lossless updates;
//! - (c) `diloco-int8`: the same with dense int8 updates;
//! - (d) `diloco-topk`: the same with chunked top-k + error feedback.
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
//! payloads of its R updates.

use crate::data::corpus;
use crate::model::ModelConfig;
use crate::rng::derive_seed;
use crate::train::{InnerConfig, TrainError, Trainer};
use barnraise_protocol::codec::{self, CodecConfig, CodecError, Encoder};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer, weighted_mean_into};
use serde::Serialize;
use std::fmt;
use std::time::Instant;

/// How the bench is sized. Defaults finish in a few minutes on 2 CPU cores.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DilocoBenchConfig {
    pub preset: String,
    pub model: ModelConfig,
    /// k: DiLoCo workers (and the data-parallel batch multiplier).
    pub workers: usize,
    /// H: inner steps per round.
    pub inner_steps: usize,
    /// R: rounds.
    pub rounds: usize,
    /// Sequences per worker per step.
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    pub outer: OuterConfig,
    pub int8: CodecConfig,
    pub topk: CodecConfig,
    /// Error-feedback decay of the top-k arm: each round the unsent
    /// residual is multiplied by this before it is added to the new update
    /// (1 = plain error feedback, 0 = none).
    pub ef_decay: f32,
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
            int8: CodecConfig::int8_default(),
            // Half of each chunk at 4 bits, 3.02 bits/param with the mask
            // layout: the run's default (topk:4096:64:2) sends too little for
            // a few tens of rounds of a 133k-parameter model, and a quarter
            // trailed fp32 by 2.1% at R=40 where half trails by 1.1%
            // (docs/training.md).
            topk: CodecConfig::TopK {
                chunk: 4096,
                k: 2048,
                bits: 4,
            },
            ef_decay: 1.0,
            corpus_bytes: 256 * 1024,
            eval_batches: 16,
            eval_every: 1,
            seed: 1,
            seeds: 1,
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

/// One arm's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmReport {
    /// "a" .. "d".
    pub arm: String,
    pub name: String,
    /// The codec, for DiLoCo arms ("fp32", "int8:256", "topk:4096:64:2").
    pub codec: Option<String>,
    pub heldout_loss: f32,
    /// Held-out loss after each scored round (every `eval_every`-th and the
    /// last; DiLoCo: of the global params).
    pub heldout_per_round: Vec<f32>,
    /// Top-k arm only: the held-out loss had the workers' unsent
    /// error-feedback residuals been applied as one more plain-average step
    /// after the last round. How much of the gap to fp32 is update mass still
    /// waiting in the residuals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_residual_flushed: Option<f32>,
    pub tokens: u64,
    pub bytes_per_worker: u64,
    /// Bytes of (a) divided by this arm's bytes.
    pub reduction_vs_dp: f64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub gflops_per_s: f64,
}

/// One arm over every seed: the mean final held-out loss, its spread, and
/// the per-seed values (in seed order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArmSummary {
    pub arm: String,
    pub name: String,
    pub codec: Option<String>,
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
    pub reduction_vs_dp: f64,
    /// Training wall time summed over seeds.
    pub wall_s: f64,
    /// Over all seeds.
    pub tokens_per_s: f64,
    pub gflops_per_s: f64,
}

/// One seed's bench: the starting loss, every arm, and the gaps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedRun {
    pub seed: u64,
    pub initial_heldout_loss: f32,
    pub arms: Vec<ArmReport>,
    /// (b) vs (a) held-out loss, percent (positive = DiLoCo worse).
    pub fp32_vs_dp_pct: f64,
    /// (d) vs (b) held-out loss, percent.
    pub topk_vs_fp32_pct: f64,
}

/// The whole bench: config, every arm summarised over seeds, the targets on
/// the mean losses, and every seed's run in full.
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
    /// (d) vs (b) of the mean held-out losses, percent.
    pub topk_vs_fp32_pct: f64,
    /// Mean over seeds of each seed's (b) vs (a) gap, percent.
    pub fp32_vs_dp_pct_seed_mean: f64,
    /// Mean over seeds of each seed's (d) vs (b) gap, percent.
    pub topk_vs_fp32_pct_seed_mean: f64,
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

fn check_config(cfg: &DilocoBenchConfig) -> Result<(), BenchError> {
    if cfg.workers == 0 || cfg.rounds == 0 || cfg.inner_steps == 0 {
        return Err(BenchError::Config(
            "workers, rounds and inner steps must be positive".to_string(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.ef_decay) {
        return Err(BenchError::Config(format!(
            "error-feedback decay {} must be in [0, 1]",
            cfg.ef_decay
        )));
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
    Ok(())
}

/// Runs all four arms once per seed (`cfg.seed`, `cfg.seed + 1`, ...,
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
    let arms: Vec<ArmSummary> = (0..runs[0].arms.len())
        .map(|i| summarize(runs.iter().map(|r| &r.arms[i]), flops_per_token))
        .collect();
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
        fp32_vs_dp_pct: pct(arms[1].heldout_loss, arms[0].heldout_loss),
        topk_vs_fp32_pct: pct(arms[3].heldout_loss, arms[1].heldout_loss),
        fp32_vs_dp_pct_seed_mean: mean(&mut runs.iter().map(|r| r.fp32_vs_dp_pct)),
        topk_vs_fp32_pct_seed_mean: mean(&mut runs.iter().map(|r| r.topk_vs_fp32_pct)),
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

/// One arm's reports over every seed, in seed order.
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
    let tokens_per_s = tokens as f64 / wall_s.max(1e-9);
    ArmSummary {
        arm: first.arm.clone(),
        name: first.name.clone(),
        codec: first.codec.clone(),
        heldout_loss: mean as f32,
        heldout_std: var.sqrt() as f32,
        heldout_min: losses.iter().copied().fold(f32::INFINITY, f32::min),
        heldout_max: losses.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        heldout_per_seed: losses,
        tokens: first.tokens,
        bytes_per_worker: first.bytes_per_worker,
        reduction_vs_dp: first.reduction_vs_dp,
        wall_s,
        tokens_per_s,
        gflops_per_s: tokens_per_s * flops_per_token / 1e9,
    }
}

/// The four arms on one seed (`cfg.seed`).
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
    let mut arms = Vec::new();
    for (arm, kind) in [
        ("a", ArmKind::DataParallel),
        ("b", ArmKind::Diloco(CodecConfig::Fp32)),
        ("c", ArmKind::Diloco(cfg.int8)),
        ("d", ArmKind::Diloco(cfg.topk)),
    ] {
        arms.push(run_arm_on(cfg, device, &data, arm, kind, progress)?);
    }
    let dp_bytes = arms[0].bytes_per_worker as f64;
    for arm in &mut arms {
        arm.reduction_vs_dp = dp_bytes / arm.bytes_per_worker.max(1) as f64;
        arm.gflops_per_s = arm.tokens_per_s * flops_per_token / 1e9;
    }
    Ok(SeedRun {
        seed: cfg.seed,
        initial_heldout_loss: initial,
        fp32_vs_dp_pct: pct(arms[1].heldout_loss, arms[0].heldout_loss),
        topk_vs_fp32_pct: pct(arms[3].heldout_loss, arms[1].heldout_loss),
        arms,
    })
}

/// Which training procedure an arm runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArmKind {
    /// One model, a k-times batch, R·H steps.
    DataParallel,
    /// k workers, H inner steps, R rounds, updates through this codec.
    Diloco(CodecConfig),
}

/// Runs one arm alone on `cfg.seed` (for sweeps and diagnostics; `cfg.seeds`
/// is not used); `arm` is its label. It gives what [`run_diloco`] gives for
/// that arm and seed, which runs the four arms of the bench on the same data.
pub fn run_arm(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    arm: &str,
    kind: ArmKind,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    check_config(cfg)?;
    let data = corpus_data(cfg);
    let mut report = run_arm_on(cfg, device, &data, arm, kind, progress)?;
    report.gflops_per_s = report.tokens_per_s * cfg.model.flops_per_token_at(cfg.seq_len) / 1e9;
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
        ArmKind::DataParallel => {
            run_data_parallel(cfg, device, data, init_seed, eval_seed, arm, progress)
        }
        ArmKind::Diloco(codec) => {
            let name = match codec {
                CodecConfig::Fp32 => "diloco-fp32",
                CodecConfig::Int8 { .. } => "diloco-int8",
                CodecConfig::TopK { .. } => "diloco-topk",
            };
            run_diloco_arm(
                cfg, device, data, init_seed, eval_seed, arm, name, codec, progress,
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
        heldout_loss: per_round.last().copied().unwrap_or(f32::NAN),
        heldout_per_round: per_round,
        heldout_residual_flushed: None,
        tokens,
        bytes_per_worker: (cfg.rounds * cfg.inner_steps) as u64 * params * 4,
        reduction_vs_dp: 1.0,
        wall_s: train_wall,
        tokens_per_s: tokens as f64 / train_wall.max(1e-9),
        gflops_per_s: 0.0,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_diloco_arm(
    cfg: &DilocoBenchConfig,
    device: &candle_core::Device,
    data: &Data,
    init_seed: u64,
    eval_seed: u64,
    arm: &str,
    name: &str,
    codec: CodecConfig,
    progress: &mut dyn FnMut(BenchProgress<'_>),
) -> Result<ArmReport, BenchError> {
    let params = cfg.model.params_count();
    let mut workers = Vec::with_capacity(cfg.workers);
    let mut encoders = Vec::with_capacity(cfg.workers);
    for _ in 0..cfg.workers {
        workers.push(Trainer::new(&cfg.model, device.clone(), init_seed)?);
        encoders.push(Encoder::new(codec, params)?.with_decay(cfg.ef_decay));
    }
    let mut global = workers[0].flat_params()?;
    let mut outer = OuterOptimizer::new(cfg.outer, params);
    let mut evaluator = Trainer::new(&cfg.model, device.clone(), init_seed)?;
    let label = format!("{arm}: {name}");
    let (mut tokens, mut bytes, mut wall) = (0u64, 0u64, 0.0f64);
    let mut per_round = Vec::new();
    let mut decoded: Vec<Vec<f32>> = vec![vec![0.0; params]; cfg.workers];
    let mut average = vec![0.0f32; params];
    for round in 0..cfg.rounds {
        let started = Instant::now();
        let mut weights = Vec::with_capacity(cfg.workers);
        for (w, (worker, encoder)) in workers.iter_mut().zip(&mut encoders).enumerate() {
            worker.set_flat_params(&global)?;
            let seed = cfg.batch_seed(w, round);
            let report =
                worker.train_inner(&data.workers[w], &cfg.inner(round, cfg.batch_size, seed))?;
            tokens += report.tokens;
            let local = worker.flat_params()?;
            let delta: Vec<f32> = global.iter().zip(&local).map(|(g, l)| g - l).collect();
            let payload = encoder.encode(&delta)?;
            // Each worker's bytes are the same size; count worker 0's.
            if w == 0 {
                bytes += payload.len() as u64;
            }
            codec::decode_into(&payload, &mut decoded[w])?;
            weights.push(report.tokens as f32);
        }
        let inputs: Vec<(&[f32], f32)> = decoded.iter().map(Vec::as_slice).zip(weights).collect();
        weighted_mean_into(&inputs, &mut average);
        outer.step(&mut global, &average);
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
    let heldout_residual_flushed = if codec.has_error_feedback() {
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
        codec: Some(codec.to_string()),
        heldout_loss: per_round.last().copied().unwrap_or(f32::NAN),
        heldout_per_round: per_round,
        heldout_residual_flushed,
        tokens,
        bytes_per_worker: bytes,
        reduction_vs_dp: 1.0,
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
            "inner AdamW peak lr {} (warmup {}, cosine over R*H steps) for every arm; outer lr {} momentum {}{}",
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
            "{:<16} {:<16} {:>10} {:>7} {:>15} {:>14} {:>10} {:>10} {:>9} {:>8}",
            "arm",
            "codec",
            "held-out",
            "std",
            "min-max",
            "bytes/worker",
            "reduction",
            "tokens/s",
            "GFLOP/s",
            "wall s"
        )?;
        for arm in &self.arms {
            writeln!(
                f,
                "{:<16} {:<16} {:>10.4} {:>7.4} {:>15} {:>14} {:>9.1}x {:>10.0} {:>9.2} {:>8.1}",
                format!("({}) {}", arm.arm, arm.name),
                arm.codec.as_deref().unwrap_or("-"),
                arm.heldout_loss,
                arm.heldout_std,
                format!("{:.4}-{:.4}", arm.heldout_min, arm.heldout_max),
                human_bytes(arm.bytes_per_worker),
                arm.reduction_vs_dp,
                arm.tokens_per_s,
                arm.gflops_per_s,
                arm.wall_s
            )?;
        }
        write!(f, "per seed held-out: {:>6}", "seed")?;
        for arm in &self.arms {
            write!(f, " {:>8}", format!("({})", arm.arm))?;
        }
        writeln!(f, " {:>11} {:>11}", "(b) vs (a)", "(d) vs (b)")?;
        for run in &self.runs {
            write!(f, "                   {:>6}", run.seed)?;
            for arm in &run.arms {
                write!(f, " {:>8.4}", arm.heldout_loss)?;
            }
            writeln!(
                f,
                " {:>+10.2}% {:>+10.2}%",
                run.fp32_vs_dp_pct, run.topk_vs_fp32_pct
            )?;
        }
        let gaps = |target: f64, of_means: f64, seed_mean: f64, gap: fn(&SeedRun) -> f64| {
            let within = self.runs.iter().filter(|r| gap(r) <= target).count();
            if self.runs.len() == 1 {
                format!("{of_means:+.2}% held-out loss (target within {target}%)")
            } else {
                format!(
                    "{of_means:+.2}% of the mean held-out losses (mean of the per-seed gaps {seed_mean:+.2}%; {within} of {} seeds within the {target}% target)",
                    self.runs.len()
                )
            }
        };
        writeln!(
            f,
            "(b) vs (a): {}",
            gaps(
                5.0,
                self.fp32_vs_dp_pct,
                self.fp32_vs_dp_pct_seed_mean,
                |r| r.fp32_vs_dp_pct
            )
        )?;
        writeln!(
            f,
            "(d) vs (b): {}",
            gaps(
                2.0,
                self.topk_vs_fp32_pct,
                self.topk_vs_fp32_pct_seed_mean,
                |r| r.topk_vs_fp32_pct
            )
        )?;
        write!(
            f,
            "bench wall time {:.0} s (evaluation included)",
            self.wall_s
        )
    }
}
