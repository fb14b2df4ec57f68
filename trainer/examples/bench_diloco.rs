//! The DiLoCo bench without the CLI (for measuring while the `barnraise`
//! binary is unavailable, or from the trainer crate alone):
//! `cargo run --release -p barnraise-trainer --example bench_diloco -- [preset] [k] [H] [R] [--json]`,
//! with `BENCH_OUTER_LR`, `BENCH_OUTER_MOMENTUM`, `BENCH_TOPK` overriding the outer step and the top-k codec.
//! `barnraise bench diloco` is the documented front end with every flag.

use barnraise_trainer::bench::{DilocoBenchConfig, run_diloco};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--json").collect();
    let json = std::env::args().any(|a| a == "--json");
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
            "{:<16} round {:>3}/{:<3} held-out loss {:.4}",
            p.arm, p.round, p.rounds, p.heldout_loss
        );
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
