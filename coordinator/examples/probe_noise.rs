//! How often the usefulness probe refuses an honest update by the luck of
//! its batches, with and without the second look (docs/security.md, "The
//! usefulness probe").
//!
//! `cargo run --release -p barnraise-coordinator --example probe_noise -- [round] [rounds] [nodes] [second-look-batches] [steps,steps,...]`
//!
//! It first runs DiLoCo the way the NAT end-to-end test does (tiny model,
//! `nodes` (default 3) nodes on shards of their own, 10 inner steps of 8 ×
//! 64 tokens, the run's learning-rate schedule over 4 rounds, each node's
//! AdamW state kept across rounds, the outer Nesterov step on the mean Δ)
//! up to round `round` (default 3, the last, where gains are smallest).
//! Then, with that round's θ_r and honest updates, `rounds` (default 2000)
//! simulated closes: each probes every update with fresh seeds, sets the
//! round's bar from the first looks the way the close does, and gives a
//! second look to every update under it. Every update is honest, so every
//! refusal is a false one.
//!
//! The last argument gives each node's inner steps in the probed round, as
//! the coordinator's pacing sizes them (between H/2 and 2H by speed); by
//! default every node takes H = 10. The bar is set on gain per √(assigned
//! steps), as the close does, unless the environment has `PROBE_NOISE_RAW_GAIN=1`, which judges
//! raw gains as the close did before.

use barnraise_coordinator::VerifyConfig;
use barnraise_coordinator::probe::{Probe, ProbeResult, unit_bar, work_scale};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer, weighted_mean_into};
use barnraise_trainer::data::{corpus, tokenize_bytes};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{InnerConfig, ModelConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: usize| -> Result<usize, String> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse()
                .map_err(|_| format!("argument {i}: `{s}` is not a count"))
        })
    };
    let probed_round = arg(1, 3)?;
    let rounds = arg(2, 2000)?;
    let nodes = arg(3, 3)?.max(1);
    let second_batches = arg(4, VerifyConfig::default().probe_second_look_batches)?;
    let sized: Vec<usize> = match args.get(5) {
        Some(list) => list
            .split(',')
            .map(|s| s.parse().map_err(|_| format!("steps `{s}` is not a count")))
            .collect::<Result<_, _>>()?,
        None => vec![10; nodes],
    };
    if sized.len() != nodes {
        return Err(format!("{} steps given for {nodes} nodes", sized.len()).into());
    }
    let raw_gain = std::env::var_os("PROBE_NOISE_RAW_GAIN").is_some();
    let model = ModelConfig::preset("tiny").ok_or("no tiny preset")?;
    let (steps, seq_len, shard_tokens) = (10, 64, 16 * 1024);
    let total_rounds = (probed_round + 1).max(4);
    let text = tokenize_bytes(corpus::generate(7, shard_tokens * (nodes + 1)).as_bytes());
    let shards: Vec<&[u16]> = text.chunks(shard_tokens).collect();
    let heldout = shards[nodes];
    let cfg = VerifyConfig::default();
    let device = select(DeviceSpec::Cpu)?;
    let inner = |round: usize, steps: usize, seed: u64| InnerConfig {
        steps,
        batch_size: 8,
        seq_len,
        lr: 3e-3,
        min_lr: 3e-4,
        schedule_steps: total_rounds * steps,
        start_step: round * steps,
        seed,
        ..InnerConfig::default()
    };
    let mut theta = Trainer::new(&model, device.clone(), 0)?.flat_params()?;
    let mut trainers = (0..nodes)
        .map(|_| Trainer::new(&model, device.clone(), 0))
        .collect::<Result<Vec<_>, _>>()?;
    let mut outer = OuterOptimizer::new(OuterConfig::default(), theta.len());
    let mut updates: Vec<Vec<f32>> = Vec::new();
    for round in 0..=probed_round {
        updates.clear();
        for (n, trainer) in trainers.iter_mut().enumerate() {
            trainer.set_flat_params(&theta)?;
            let steps = if round == probed_round {
                sized[n]
            } else {
                steps
            };
            trainer.train_inner(shards[n], &inner(round, steps, (round * nodes + n) as u64))?;
            let local = trainer.flat_params()?;
            updates.push(theta.iter().zip(&local).map(|(a, b)| a - b).collect());
        }
        if round < probed_round {
            let weighted: Vec<(&[f32], f32)> =
                updates.iter().map(|u| (u.as_slice(), 1.0)).collect();
            let mut mean = vec![0.0; theta.len()];
            weighted_mean_into(&weighted, &mut mean);
            outer.step(&mut theta, &mean);
        }
    }
    let mut probe = Probe::new(&model, &theta, &cfg, seq_len, 0)?;
    println!(
        "tiny, round {probed_round} of a {total_rounds}-round run, {nodes} honest updates of {sized:?} steps, {rounds} closes; \
         first look {} batches of {}, second look {second_batches}, bar {} x the round's median",
        cfg.probe_batches, cfg.probe_batch_size, cfg.probe_min_relative_gain
    );
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut first_refused, mut refused) = (0usize, 0usize);
    let mut ratios: Vec<f32> = Vec::new();
    let mut gains: Vec<Vec<f32>> = vec![Vec::new(); nodes];
    for _ in 0..rounds {
        let heldout_seed = next();
        let mut firsts: Vec<ProbeResult> = Vec::new();
        for (n, delta) in updates.iter().enumerate() {
            let r = probe.second_look(
                delta,
                shards[n],
                next(),
                heldout,
                heldout_seed,
                cfg.probe_batches,
            )?;
            gains[n].push(r.own_gain);
            firsts.push(r);
        }
        let judged: Vec<(ProbeResult, u32)> = firsts
            .iter()
            .zip(&sized)
            .map(|(r, &steps)| (*r, if raw_gain { 1 } else { steps as u32 }))
            .collect();
        let unit = unit_bar(&judged, cfg.probe_min_relative_gain);
        for (n, (first, steps)) in judged.iter().enumerate() {
            let bar = unit * work_scale(*steps);
            if bar > 0.0 {
                ratios.push(first.own_gain / bar * cfg.probe_min_relative_gain);
            }
            if first.verdict(cfg.probe_margin, bar).is_ok() {
                continue;
            }
            first_refused += 1;
            if second_batches == 0 {
                refused += 1;
                continue;
            }
            let second = probe.second_look(
                &updates[n],
                shards[n],
                next(),
                heldout,
                next(),
                second_batches,
            )?;
            if second.verdict(cfg.probe_margin, bar).is_err() {
                refused += 1;
            }
        }
    }
    for (n, g) in gains.iter().enumerate() {
        let mean = g.iter().sum::<f32>() / g.len().max(1) as f32;
        let var = g.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / g.len().max(1) as f32;
        println!(
            "update {n}: first-look own gain mean {mean:+.4}, sd {:.4} (cv {:.2})",
            var.sqrt(),
            var.sqrt() / mean.abs().max(f32::EPSILON)
        );
    }
    ratios.sort_by(f32::total_cmp);
    let q = |p: f64| ratios[((ratios.len() - 1) as f64 * p) as usize];
    if !ratios.is_empty() {
        println!(
            "first-look gain / the median it is held to: min {:.3}, 0.1% {:.3}, 1% {:.3}, 5% {:.3}, median {:.3}",
            ratios[0],
            q(0.001),
            q(0.01),
            q(0.05),
            q(0.5)
        );
    }
    let probes = rounds * nodes;
    println!(
        "honest updates refused: first look alone {first_refused}/{probes} ({:.3}%), \
         after the second look {refused}/{probes} ({:.3}%)",
        100.0 * first_refused as f64 / probes as f64,
        100.0 * refused as f64 / probes as f64
    );
    Ok(())
}
