//! The DiLoCo bench without the CLI (for measuring while the `barnraise`
//! binary is unavailable, or from the trainer crate alone):
//! `cargo run --release -p barnraise-trainer --example bench_diloco -- [preset] [k] [H] [R] [--seeds N] [--seed S] [--eval-every N] [--json]`,
//! with `BENCH_OUTER_LR`, `BENCH_OUTER_MOMENTUM`, `BENCH_TOPK` overriding the outer step and the top-k codec.
//! `barnraise bench diloco` is the documented front end with every flag.

use barnraise_trainer::bench::{DilocoBenchConfig, run_diloco};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = Vec::new();
    let (mut json, mut seeds, mut seed, mut eval_every) = (false, None, None, None);
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        let mut value = |flag: &str| argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--json" => json = true,
            "--seeds" => seeds = Some(value("--seeds")?.parse()?),
            "--seed" => seed = Some(value("--seed")?.parse()?),
            "--eval-every" => eval_every = Some(value("--eval-every")?.parse()?),
            _ => args.push(arg),
        }
    }
    let preset = args.first().map(String::as_str).unwrap_or("tiny");
    let mut cfg =
        DilocoBenchConfig::for_preset(preset).ok_or_else(|| format!("unknown preset {preset}"))?;
    let number = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    cfg.workers = number(1, cfg.workers)?;
    cfg.inner_steps = number(2, cfg.inner_steps)?;
    cfg.rounds = number(3, cfg.rounds)?;
    cfg.seeds = seeds.unwrap_or(cfg.seeds);
    cfg.seed = seed.unwrap_or(cfg.seed);
    cfg.eval_every = eval_every.unwrap_or(cfg.eval_every);
    // Outer-optimizer experiments without the CLI.
    if let Ok(v) = std::env::var("BENCH_OUTER_LR") {
        cfg.outer.lr = v.parse()?;
    }
    if let Ok(v) = std::env::var("BENCH_OUTER_MOMENTUM") {
        cfg.outer.momentum = v.parse()?;
    }
    if let Ok(v) = std::env::var("BENCH_TOPK") {
        cfg.topk = v.parse()?;
    }
    let report = run_diloco(&cfg, &candle_core::Device::Cpu, &mut |p| {
        eprintln!(
            "seed {:<3} {:<16} round {:>3}/{:<3} held-out loss {:.4}",
            p.seed, p.arm, p.round, p.rounds, p.heldout_loss
        );
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
