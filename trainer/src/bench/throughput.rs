//! `barnraise bench train`: how fast the inner loop trains on one device.
//! Tokens per second over timed steps (after untimed warm-up steps, which
//! pay for kernel loading and allocator growth), the FLOP rate those tokens
//! imply ([`ModelConfig::flops_per_token_at`]), model FLOP utilisation on a
//! GPU whose dense bf16 peak is known, and peak memory.

use crate::data::{corpus, tokenize_bytes};
use crate::device::{DeviceMemory, peak_memory, reset_peak_memory};
use crate::model::ModelConfig;
use crate::precision::{Precision, dtype_name};
use crate::train::{InnerConfig, PhaseSeconds, TrainError, Trainer};
use candle_core::{DType, Device};
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ThroughputConfig {
    pub preset: String,
    pub model: ModelConfig,
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
    /// Untimed steps first.
    pub warmup_steps: usize,
    pub steps: usize,
    pub precision: Precision,
    /// Dense bf16 peak of the device in FLOP/s, for MFU; `None` looks the
    /// GPU up in [`dense_bf16_peak`].
    pub peak_flops: Option<f64>,
    pub seed: u64,
    /// The one-pass CPU kernels (the default) or candle's primitives, for
    /// f32 on the CPU (crate::cpu_ops).
    pub cpu_kernels: bool,
}

/// One measurement; `barnraise bench train --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    pub preset: String,
    pub params: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The GPU's name, or the CPU's thread count in words.
    pub device_name: String,
    /// The dtype matmuls and activations computed in.
    pub precision: &'static str,
    /// Whether f32 on the CPU ran the one-pass kernels (crate::cpu_ops)
    /// rather than candle's primitives; false on a GPU and in bf16.
    pub cpu_kernels: bool,
    /// CPU threads (rayon's pool); also reported for GPU runs.
    pub threads: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub accumulation: usize,
    pub steps: usize,
    pub tokens_per_step: usize,
    /// Median and mean wall time of one timed optimizer step.
    pub step_seconds_median: f64,
    pub step_seconds_mean: f64,
    /// Timed tokens over timed wall time.
    pub tokens_per_sec: f64,
    pub flops_per_token: f64,
    /// Achieved model FLOP/s (forward and backward, by the formula).
    pub flops_per_sec: f64,
    /// The dense bf16 peak MFU is taken against, when known.
    pub peak_flops: Option<f64>,
    /// `flops_per_sec / peak_flops`.
    pub mfu: Option<f64>,
    pub peak_memory_bytes: Option<u64>,
    pub memory_source: Option<&'static str>,
    pub device_memory_bytes: Option<u64>,
    pub loss_first: f32,
    pub loss_last: f32,
    /// Mean seconds per step in each phase, from [`PHASE_STEPS`] more steps
    /// that wait for the device between phases (not in tokens/s).
    pub phase_seconds: Option<PhaseSeconds>,
}

/// Steps after the timed ones that measure the phases.
pub const PHASE_STEPS: usize = 3;

/// Dense bf16 tensor-core peaks (FLOP/s, no sparsity) by GPU name, from
/// the vendors' datasheets; the SXM figure where a part has two. A GPU not
/// here reports no MFU unless `--peak-tflops` gives its peak.
pub fn dense_bf16_peak(name: &str) -> Option<f64> {
    let name = name.to_ascii_uppercase();
    let table: &[(&str, f64)] = &[
        ("H200", 989e12),
        ("H100 PCIE", 756e12),
        ("H100", 989e12),
        ("GH200", 989e12),
        ("B200", 2250e12),
        ("A100", 312e12),
        ("A10G", 70e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("RTX 4090", 165e12),
        ("RTX 4080", 97e12),
        ("RTX 3090", 71e12),
        ("RTX 3080", 60e12),
    ];
    table
        .iter()
        .find(|(key, _)| name.contains(key))
        .map(|&(_, peak)| peak)
}

/// Trains `cfg.warmup_steps + cfg.steps` steps of the preset on the
/// built-in corpus and reports the timed part.
pub fn run_throughput(
    cfg: &ThroughputConfig,
    device: &Device,
) -> Result<ThroughputReport, TrainError> {
    if cfg.steps == 0 {
        return Err(TrainError::Config(
            "bench train needs at least one timed step".into(),
        ));
    }
    let mut trainer = Trainer::new(&cfg.model, device.clone(), cfg.seed)?;
    let dtype = trainer.set_precision(cfg.precision)?;
    trainer.set_cpu_kernels(cfg.cpu_kernels);
    let tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accumulation.max(1);
    // Enough text that every batch is a fresh window.
    let corpus_bytes = (tokens_per_step * 4).clamp(1 << 16, 1 << 24);
    let tokens = tokenize_bytes(corpus::generate(cfg.seed, corpus_bytes).as_bytes());
    let inner = |steps: usize, seed: u64| InnerConfig {
        steps,
        batch_size: cfg.batch_size,
        seq_len: cfg.seq_len,
        accumulation: cfg.accumulation.max(1),
        warmup: 1,
        seed,
        ..InnerConfig::default()
    };
    if cfg.warmup_steps > 0 {
        trainer.train_inner(&tokens, &inner(cfg.warmup_steps, cfg.seed))?;
    }
    reset_peak_memory(device);
    let mut step_seconds = Vec::with_capacity(cfg.steps);
    let mut last = Instant::now();
    let started = last;
    let report =
        trainer.train_inner_observed(&tokens, &inner(cfg.steps, cfg.seed + 1), &mut |_, _| {
            // Each step ends by reading its loss back, which waits for the
            // device: these are real step times on a GPU too.
            let now = Instant::now();
            step_seconds.push((now - last).as_secs_f64());
            last = now;
            true
        })?;
    let wall = started.elapsed().as_secs_f64();
    let memory: Option<DeviceMemory> = peak_memory(device);
    trainer.time_phases(true);
    trainer.train_inner(&tokens, &inner(PHASE_STEPS, cfg.seed + 2))?;
    let phase_seconds = trainer.phase_seconds().map(|p| PhaseSeconds {
        forward: p.forward / PHASE_STEPS as f64,
        backward: p.backward / PHASE_STEPS as f64,
        optimizer: p.optimizer / PHASE_STEPS as f64,
    });
    let (device_label, device_name) = describe(device);
    let tokens_per_sec = (tokens_per_step * cfg.steps) as f64 / wall;
    let flops_per_token = cfg.model.flops_per_token_at(cfg.seq_len);
    let flops_per_sec = tokens_per_sec * flops_per_token;
    let peak_flops = match device {
        Device::Cpu => cfg.peak_flops,
        _ => cfg.peak_flops.or_else(|| dense_bf16_peak(&device_name)),
    };
    let mut sorted = step_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(ThroughputReport {
        preset: cfg.preset.clone(),
        params: cfg.model.params_count(),
        device: device_label,
        device_name,
        precision: dtype_name(dtype),
        cpu_kernels: cfg.cpu_kernels && device.is_cpu() && dtype == DType::F32,
        threads: candle_core::utils::get_num_threads(),
        batch_size: cfg.batch_size,
        seq_len: cfg.seq_len,
        accumulation: cfg.accumulation.max(1),
        steps: cfg.steps,
        tokens_per_step,
        step_seconds_median: sorted[sorted.len() / 2],
        step_seconds_mean: step_seconds.iter().sum::<f64>() / step_seconds.len() as f64,
        tokens_per_sec,
        flops_per_token,
        flops_per_sec,
        peak_flops,
        mfu: peak_flops.map(|peak| flops_per_sec / peak),
        peak_memory_bytes: memory.map(|m| m.peak_bytes),
        memory_source: memory.map(|m| m.source),
        device_memory_bytes: memory.and_then(|m| m.total_bytes),
        loss_first: report.losses.first().copied().unwrap_or(f32::NAN),
        loss_last: report.losses.last().copied().unwrap_or(f32::NAN),
        phase_seconds,
    })
}

fn describe(device: &Device) -> (String, String) {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let stream = cuda.cuda_stream();
            let context = stream.context();
            (
                format!("cuda:{}", context.ordinal()),
                context.name().unwrap_or_else(|_| "unknown GPU".into()),
            )
        }
        _ => (
            "cpu".into(),
            format!("{} CPU threads", candle_core::utils::get_num_threads()),
        ),
    }
}

impl std::fmt::Display for ThroughputReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({:.1}M params) on {} ({}), {} compute{}, batch {} × {} × {} accumulated",
            self.preset,
            self.params as f64 / 1e6,
            self.device,
            self.device_name,
            self.precision,
            if self.cpu_kernels {
                " (one-pass CPU kernels)"
            } else {
                ""
            },
            self.batch_size,
            self.seq_len,
            self.accumulation
        )?;
        writeln!(
            f,
            "  {:>12.0} tokens/s   {:.3} s/step (median of {})   {:.2} TFLOP/s achieved",
            self.tokens_per_sec,
            self.step_seconds_median,
            self.steps,
            self.flops_per_sec / 1e12
        )?;
        match (self.mfu, self.peak_flops) {
            (Some(mfu), Some(peak)) => writeln!(
                f,
                "  MFU {:.1}% of a {:.0} TFLOP/s dense bf16 peak",
                mfu * 100.0,
                peak / 1e12
            )?,
            _ => writeln!(
                f,
                "  MFU: no peak known for this device (--peak-tflops sets one)"
            )?,
        }
        if let (Some(bytes), Some(source)) = (self.peak_memory_bytes, self.memory_source) {
            writeln!(
                f,
                "  peak memory {:.2} GiB ({source})",
                bytes as f64 / (1u64 << 30) as f64
            )?;
        }
        if let Some(p) = self.phase_seconds {
            writeln!(
                f,
                "  per step: forward {:.4} s, backward {:.4} s, optimizer {:.4} s",
                p.forward, p.backward, p.optimizer
            )?;
        }
        write!(f, "  loss {:.3} -> {:.3}", self.loss_first, self.loss_last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_gpus_have_peaks_and_others_none() {
        assert_eq!(dense_bf16_peak("NVIDIA H200"), Some(989e12));
        assert_eq!(dense_bf16_peak("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(dense_bf16_peak("NVIDIA GeForce RTX 4090"), Some(165e12));
        assert_eq!(dense_bf16_peak("Some Future Accelerator"), None);
    }

    /// The JSON a user scripts against: every field there, with values a
    /// real run produces (tokens/s from real steps, FLOPs by the formula).
    #[test]
    fn the_report_measures_real_steps_and_serialises_every_field() {
        let model = ModelConfig::preset("tiny").unwrap();
        let cfg = ThroughputConfig {
            preset: "tiny".into(),
            model: model.clone(),
            batch_size: 2,
            seq_len: 32,
            accumulation: 2,
            warmup_steps: 1,
            steps: 3,
            precision: Precision::Auto,
            peak_flops: Some(1e12),
            seed: 4,
            cpu_kernels: true,
        };
        let report = run_throughput(&cfg, &Device::Cpu).unwrap();
        assert_eq!(report.tokens_per_step, 2 * 32 * 2);
        assert_eq!(report.precision, "f32");
        assert!(report.tokens_per_sec > 0.0 && report.tokens_per_sec.is_finite());
        let expected = report.tokens_per_sec * model.flops_per_token_at(32);
        assert!((report.flops_per_sec - expected).abs() <= 1e-9 * expected);
        assert_eq!(report.mfu, Some(report.flops_per_sec / 1e12));
        assert!(report.step_seconds_median > 0.0);
        assert!(
            report.peak_memory_bytes.unwrap_or(0) > 0,
            "no peak RSS read"
        );
        assert!(report.loss_first.is_finite() && report.loss_last.is_finite());
        let json = serde_json::to_value(&report).unwrap();
        for field in [
            "preset",
            "params",
            "device",
            "device_name",
            "precision",
            "cpu_kernels",
            "threads",
            "batch_size",
            "seq_len",
            "accumulation",
            "steps",
            "tokens_per_step",
            "step_seconds_median",
            "step_seconds_mean",
            "tokens_per_sec",
            "flops_per_token",
            "flops_per_sec",
            "peak_flops",
            "mfu",
            "peak_memory_bytes",
            "memory_source",
            "device_memory_bytes",
            "loss_first",
            "loss_last",
            "phase_seconds",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        assert_eq!(json["device"], "cpu");
        assert_eq!(json["cpu_kernels"], true);
        let phases = report.phase_seconds.unwrap();
        assert!(phases.forward > 0.0 && phases.backward > 0.0 && phases.optimizer > 0.0);
        assert!(run_throughput(&ThroughputConfig { steps: 0, ..cfg }, &Device::Cpu).is_err());
    }
}
