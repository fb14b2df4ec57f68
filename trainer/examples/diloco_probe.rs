//! Sweeps single bench arms with overridden settings, to find out where a gap
//! between data-parallel and DiLoCo comes from:
//! `cargo run -p barnraise-trainer --example diloco_probe -- SPEC [SPEC ...]`.
//!
//! A SPEC is comma-separated `key=value` pairs over the `tiny` bench
//! defaults: `arm=dp|fp32|int8|int8:B|topk|topk:C:K:B`, `preset`, `k`, `H`,
//! `R`, `bs` (sequences per worker), `lr`, `warmup`, `olr`, `om`,
//! `nesterov=0|1`, `decay` (error-feedback decay), `seed`, `seeds` (run seeds `seed`..`seed+seeds-1`), `eval` (held-out batches),
//! `every` (score every N rounds). Prints one line per spec and seed: the final
//! held-out loss and the loss after every scored round; with `seeds` above 1
//! a last line with the mean and spread of the final losses. An arm on seed
//! `s` ends where the same arm of `barnraise bench diloco --seed s` does.

use barnraise_protocol::codec::CodecConfig;
use barnraise_trainer::bench::{ArmKind, ArmSpec, DilocoBenchConfig, run_arm};

type Error = Box<dyn std::error::Error>;

fn apply(spec: &str) -> Result<(DilocoBenchConfig, ArmKind), Error> {
    let pairs: Vec<(&str, &str)> = spec
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| format!("`{p}` is not key=value"))
        })
        .collect::<Result<_, _>>()?;
    let preset = pairs
        .iter()
        .find(|(k, _)| *k == "preset")
        .map_or("tiny", |(_, v)| *v);
    let mut cfg =
        DilocoBenchConfig::for_preset(preset).ok_or_else(|| format!("unknown preset {preset}"))?;
    let mut kind = ArmKind::Diloco(ArmSpec::codec(CodecConfig::Fp32));
    let mut decay = None;
    for (key, value) in pairs {
        match key {
            "preset" => {}
            "arm" if value == "dp" => kind = ArmKind::DataParallel,
            "arm" => kind = ArmKind::Diloco(ArmSpec::codec(value.parse()?)),
            "k" => cfg.workers = value.parse()?,
            "H" => cfg.inner_steps = value.parse()?,
            "R" => cfg.rounds = value.parse()?,
            "bs" => cfg.batch_size = value.parse()?,
            "lr" => cfg.lr = value.parse()?,
            "warmup" => cfg.warmup = value.parse()?,
            "olr" => cfg.outer.lr = value.parse()?,
            "om" => cfg.outer.momentum = value.parse()?,
            "nesterov" => cfg.outer.nesterov = value == "1",
            "decay" => decay = Some(value.parse()?),
            "seed" => cfg.seed = value.parse()?,
            "seeds" => cfg.seeds = value.parse()?,
            "eval" => cfg.eval_batches = value.parse()?,
            "every" => cfg.eval_every = value.parse()?,
            _ => return Err(format!("unknown key `{key}` in `{spec}`").into()),
        }
    }
    if let ArmKind::Diloco(spec) = &mut kind {
        spec.schedule.decay = decay;
    }
    Ok((cfg, kind))
}

fn main() -> Result<(), Error> {
    for spec in std::env::args().skip(1) {
        let (cfg, kind) = apply(&spec)?;
        let mut finals = Vec::new();
        for i in 0..cfg.seeds as u64 {
            let seed_cfg = DilocoBenchConfig {
                seed: cfg.seed + i,
                ..cfg.clone()
            };
            let report = run_arm(
                &seed_cfg,
                &candle_core::Device::Cpu,
                "probe",
                kind,
                &mut |_| {},
            )?;
            let curve: Vec<String> = report
                .heldout_per_round
                .iter()
                .map(|l| format!("{l:.3}"))
                .collect();
            let flushed = report
                .heldout_residual_flushed
                .map(|l| format!("  residual flushed {l:.4}"))
                .unwrap_or_default();
            println!(
                "{spec:<60} seed {:<3} final {:.4}{flushed}  tokens {}  wall {:.0}s  rounds [{}]",
                seed_cfg.seed,
                report.heldout_loss,
                report.tokens,
                report.wall_s,
                curve.join(" ")
            );
            finals.push(report.heldout_loss);
        }
        if finals.len() > 1 {
            let mean = finals.iter().sum::<f32>() / finals.len() as f32;
            let min = finals.iter().copied().fold(f32::INFINITY, f32::min);
            let max = finals.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            println!(
                "{spec:<60} mean {mean:.4} over {} seeds (min {min:.4}, max {max:.4})",
                finals.len()
            );
        }
    }
    Ok(())
}
