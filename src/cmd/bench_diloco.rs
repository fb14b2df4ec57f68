//! `barnraise bench diloco`: data-parallel vs DiLoCo fp32 vs any list of
//! compressed arms, at equal total tokens on the built-in corpus.
//!
//! The CPU thread count is rayon's: set `RAYON_NUM_THREADS` to pin it.

use barnraise_trainer::bench::{ArmSpec, DilocoBenchConfig, run_diloco};
use barnraise_trainer::device::{DeviceSpec, select};
use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Model preset: tiny, small, medium, large, xl.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// k: DiLoCo workers (and the data-parallel batch multiplier).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// H: inner steps per round.
    #[arg(long, default_value_t = 30)]
    pub inner_steps: usize,
    /// R: rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Sequences per worker per step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Sequence length (at most the preset's context).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Peak inner learning rate, every arm (default 0.006).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Outer learning rate (bench default 1.0: plain averaging).
    #[arg(long)]
    pub outer_lr: Option<f32>,
    /// Outer (Nesterov) momentum (bench default 0; DiLoCo's is 0.9).
    #[arg(long)]
    pub outer_momentum: Option<f32>,
    /// A compressed arm, repeatable:
    /// `CODEC[,h=N][,olr=X][,om=X][,rule=R][,count=1][,delay=N[,eager=1]][,overlap=S[,carry=X|,fold=1][,from=K][,eager=1]][,decay=X][,warm=K0:N]`,
    /// e.g. `--arm topk:4096:128:4,h=60,decay=0.95`. h sets the arm's inner
    /// steps (its rounds keep the tokens equal), olr/om its outer step, rule
    /// the aggregation (count=1 is rule=support-mean), delay a delayed outer
    /// step (eager: started from a stand-in for the average still
    /// travelling), overlap the steps trained after each commit (carry: the
    /// share of their progress moved onto the new θ; fold: added to the next
    /// update instead; from: none held back before round K; eager: started
    /// from the outer step's preview), decay the
    /// error-feedback decay, warm a top-k density falling from K0 to k over N
    /// rounds (docs/training.md, "bench diloco"). Default: int8:256 and
    /// topk:4096:2048:4. Arms (a) dp and (b) fp32 always run as the
    /// references.
    #[arg(long = "arm", value_name = "SPEC")]
    pub arms: Vec<ArmSpec>,
    /// Built-in corpus bytes per worker.
    #[arg(long)]
    pub corpus_bytes: Option<usize>,
    /// Held-out batches (of 8 sequences) for the loss.
    #[arg(long)]
    pub eval_batches: Option<usize>,
    /// Score the held-out loss every N rounds (and after the last).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// The first seed (data, initial weights, batches, held-out batches).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Repeat the whole bench with this many seeds (seed, seed+1, ...) and
    /// report each arm's mean, spread and per-seed losses.
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
    /// Do not train the data-parallel reference (a), a third less time with
    /// one compressed arm: traffic reductions are still against its bytes
    /// (they need no run); its loss and the gaps against it print as NaN
    /// (null in --json).
    #[arg(long)]
    pub skip_dp: bool,
    /// Do not train the DiLoCo fp32 reference (b) either, when its losses
    /// are already known (the bench is deterministic on the CPU): its loss
    /// and the gaps against it print as NaN (null in --json).
    #[arg(long)]
    pub skip_fp32: bool,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Some(mut cfg) = DilocoBenchConfig::for_preset(&args.preset) else {
        anyhow::bail!(
            "unknown preset '{}'; expected one of {}",
            args.preset,
            barnraise_trainer::model::PRESETS.join(", ")
        );
    };
    cfg.workers = args.workers;
    cfg.inner_steps = args.inner_steps;
    cfg.rounds = args.rounds;
    cfg.seed = args.seed;
    cfg.seeds = args.seeds;
    cfg.skip_dp = args.skip_dp;
    cfg.skip_fp32 = args.skip_fp32;
    if let Some(v) = args.batch_size {
        cfg.batch_size = v;
    }
    if let Some(v) = args.seq_len {
        cfg.seq_len = v;
    }
    if let Some(v) = args.lr {
        cfg.lr = v;
    }
    if let Some(v) = args.outer_lr {
        cfg.outer.lr = v;
    }
    if let Some(v) = args.outer_momentum {
        cfg.outer.momentum = v;
    }
    if !args.arms.is_empty() {
        cfg.arms = args.arms;
    }
    if let Some(v) = args.corpus_bytes {
        cfg.corpus_bytes = v;
    }
    if let Some(v) = args.eval_batches {
        cfg.eval_batches = v;
    }
    if let Some(v) = args.eval_every {
        cfg.eval_every = v;
    }
    let device = select(args.device)?;
    // Progress goes to stderr in both modes: `--json` keeps stdout clean,
    // and a bench of many arms runs for a long time.
    let report = run_diloco(&cfg, &device, &mut |p| {
        eprintln!(
            "seed {:<3} {:<16} round {:>3}/{:<3} held-out loss {:.4}",
            p.seed, p.arm, p.round, p.rounds, p.heldout_loss
        );
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
