//! `barnraise bench train`: inner-loop throughput on one device — tokens/s,
//! achieved FLOP/s, MFU against the GPU's dense bf16 peak, and peak memory.
//! `scripts/compare-torch.sh` runs it beside the PyTorch reference.
//!
//! The CPU thread count is rayon's: set `RAYON_NUM_THREADS` to pin it.

use barnraise_trainer::bench::throughput::{ThroughputConfig, run_throughput};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::model::{ModelConfig, PRESETS};
use barnraise_trainer::precision::Precision;
use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Model preset: tiny, small, medium, large, xl.
    #[arg(long, default_value = "small")]
    pub model: String,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Sequence length [default: the preset's context].
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub accumulation: usize,
    /// Untimed steps first (kernel loading, allocator growth).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// auto (bf16 on a GPU that has it, else f32), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: Precision,
    /// The device's dense bf16 peak in TFLOP/s, for MFU on a GPU the
    /// built-in table does not know (or on the CPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Seed of the weights and batches.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// f32 on the CPU through candle's primitive ops, autograd and
    /// optimizer ops instead of barnraise's CPU path (one-pass kernels, a
    /// hand-written backward, a fused AdamW), to compare the two.
    #[arg(long)]
    pub no_cpu_kernels: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(model) = ModelConfig::preset(&args.model) else {
        anyhow::bail!(
            "unknown model '{}'; expected one of {}",
            args.model,
            PRESETS.join(", ")
        );
    };
    let seq_len = args.seq_len.unwrap_or(model.max_seq_len);
    if seq_len == 0 || seq_len > model.max_seq_len {
        anyhow::bail!(
            "--seq-len {seq_len} must be between 1 and the model's context, {}",
            model.max_seq_len
        );
    }
    if args.batch_size == 0 || args.accumulation == 0 || args.steps == 0 {
        anyhow::bail!("--batch-size, --accumulation and --steps must be at least 1");
    }
    // Bounds the token buffers (and keeps their sizes from overflowing).
    const MOST_SEQUENCES: usize = 1 << 16;
    if args.batch_size.saturating_mul(args.accumulation) > MOST_SEQUENCES {
        anyhow::bail!("--batch-size × --accumulation is over {MOST_SEQUENCES} sequences a step");
    }
    if args
        .peak_tflops
        .is_some_and(|p| !(p.is_finite() && p > 0.0))
    {
        anyhow::bail!("--peak-tflops must be a positive number");
    }
    let device = select(args.device)?;
    let cfg = ThroughputConfig {
        preset: args.model,
        model,
        batch_size: args.batch_size,
        seq_len,
        accumulation: args.accumulation,
        warmup_steps: args.warmup,
        steps: args.steps,
        precision: args.precision,
        peak_flops: args.peak_tflops.map(|t| t * 1e12),
        seed: args.seed,
        cpu_kernels: !args.no_cpu_kernels,
    };
    eprintln!(
        "bench train: {} on {}, {} warm-up + {} timed steps of {} × {} × {}",
        cfg.preset,
        args.device,
        cfg.warmup_steps,
        cfg.steps,
        cfg.batch_size,
        seq_len,
        cfg.accumulation
    );
    let report = run_throughput(&cfg, &device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
