//! `barnraise bench overlap`: the same `up` run twice on this machine, with
//! synchronous rounds and with overlapped rounds (docs/architecture.md,
//! "Overlapped rounds"), and the nodes' utilization and held-out loss of
//! each side by side.
//!
//! Utilization is each node's seconds of training over the wall clock from
//! its first plan to its last manifest (`up --json`'s `node_summaries`).
//! The two runs are one after the other, not at once: they would share the
//! cores. A multi-node `up` is not bit-for-bit repeatable (arrival order
//! differs), so the loss of either arm moves a little between runs; with
//! `--seeds N` the pairs alternate which arm runs first.

use super::up;
use anyhow::Context;
use clap::Args as ClapArgs;
use serde::Serialize;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Steps of each round the overlapped arm trains after the commit.
    #[arg(long, default_value_t = 3)]
    pub overlap: u32,
    /// Pairs of runs, seeds `--seed`, `--seed`+1, ... (`--seed` defaults to
    /// 1 here). The arms alternate which runs first from one pair to the
    /// next, so that neither always meets the machine in the same state.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub seeds: u32,
    /// Everything `barnraise up` takes (its `--overlap-steps` is set per arm;
    /// `--data-dir` gets a folder per seed and arm).
    #[command(flatten)]
    pub up: up::Args,
}

/// One arm's figures.
#[derive(Debug, Serialize)]
pub struct Arm {
    pub overlap_steps: u32,
    pub wall_seconds: f64,
    pub mean_utilization: Option<f64>,
    /// Per node, in node order.
    pub utilization: Vec<Option<f64>>,
    /// The run's throughput (`up --json`'s `tokens_per_second`): where the
    /// nodes share this machine's cores, the check that a higher
    /// utilization is more work done and not slower steps.
    pub tokens_per_second: Option<f64>,
    /// Updates accepted per round.
    pub accepted: Vec<u64>,
    /// θ's held-out loss after the last round.
    pub final_heldout_loss: Option<f64>,
    pub nodes_in_agreement: usize,
    pub data_dir: std::path::PathBuf,
}

/// The two runs of one seed.
#[derive(Debug, Serialize)]
pub struct Pair {
    pub seed: u64,
    /// `synchronous` or `overlapped`: the arm that ran first.
    pub first: &'static str,
    pub synchronous: Arm,
    pub overlapped: Arm,
    /// Overlapped mean utilization over synchronous.
    pub utilization_ratio: Option<f64>,
    /// Overlapped tokens per second over synchronous.
    pub throughput_ratio: Option<f64>,
    /// Overlapped final held-out loss over synchronous, minus one.
    pub heldout_loss_gap: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub pairs: Vec<Pair>,
    /// Means over the pairs (of those that have the figure).
    pub synchronous_mean_utilization: Option<f64>,
    pub overlapped_mean_utilization: Option<f64>,
    pub utilization_ratio: Option<f64>,
    /// The mean of the pairs' throughput ratios.
    pub mean_throughput_ratio: Option<f64>,
    pub mean_heldout_loss_gap: Option<f64>,
}

const ARMS: [&str; 2] = ["synchronous", "overlapped"];

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.overlap == 0 || args.overlap >= args.up.inner_steps {
        anyhow::bail!(
            "--overlap {} must be at least 1 and fewer than --inner-steps ({})",
            args.overlap,
            args.up.inner_steps
        );
    }
    if args.up.overlap_steps != 0 {
        anyhow::bail!("--overlap-steps is set per arm here; use --overlap");
    }
    let json = args.up.json;
    let base = args.up.data_dir.clone();
    let first_seed = args.up.seed.unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("barnraise-bench")
        .build()
        .context("starting the async runtime")?;
    let mut pairs = Vec::new();
    for i in 0..u64::from(args.seeds) {
        let seed = first_seed
            .checked_add(i)
            .context("--seed plus --seeds passes the largest seed")?;
        // Pair 0 runs synchronous first, pair 1 overlapped first, and so on.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut arms: [Option<Arm>; 2] = [None, None];
        for which in order {
            let name = ARMS[which];
            let overlap = if which == 0 { 0 } else { args.overlap };
            let mut up = args.up.clone();
            up.overlap_steps = overlap;
            up.json = true;
            up.seed = Some(seed);
            up.data_dir = base.as_ref().map(|dir| {
                if args.seeds == 1 {
                    dir.join(name)
                } else {
                    dir.join(format!("seed{seed}")).join(name)
                }
            });
            eprintln!("bench overlap: seed {seed}, {name} rounds (--overlap-steps {overlap})...");
            let finished = runtime
                .block_on(up::run_async(up))
                .with_context(|| format!("the {name} run of seed {seed}"))?;
            let arm = arm_of(finished.report, overlap);
            eprintln!(
                "bench overlap: seed {seed}, {name}: mean utilization {}, {} tokens/s, held-out {}, \
                 {:.1} s",
                fmt(arm.mean_utilization, 3),
                fmt(arm.tokens_per_second, 0),
                fmt(arm.final_heldout_loss, 4),
                arm.wall_seconds
            );
            arms[which] = Some(arm);
        }
        let [Some(synchronous), Some(overlapped)] = arms else {
            anyhow::bail!("seed {seed}: an arm did not run");
        };
        pairs.push(Pair {
            seed,
            first: ARMS[order[0]],
            utilization_ratio: ratio(overlapped.mean_utilization, synchronous.mean_utilization),
            throughput_ratio: ratio(overlapped.tokens_per_second, synchronous.tokens_per_second),
            heldout_loss_gap: ratio(
                overlapped.final_heldout_loss,
                synchronous.final_heldout_loss,
            )
            .map(|r| r - 1.0),
            synchronous,
            overlapped,
        });
    }
    let synchronous_mean_utilization = mean(pairs.iter().map(|p| p.synchronous.mean_utilization));
    let overlapped_mean_utilization = mean(pairs.iter().map(|p| p.overlapped.mean_utilization));
    let report = Report {
        utilization_ratio: ratio(overlapped_mean_utilization, synchronous_mean_utilization),
        mean_throughput_ratio: mean(pairs.iter().map(|p| p.throughput_ratio)),
        mean_heldout_loss_gap: mean(pairs.iter().map(|p| p.heldout_loss_gap)),
        synchronous_mean_utilization,
        overlapped_mean_utilization,
        pairs,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The text summary: one row per seed, then the means.
fn table(report: &Report) -> String {
    use std::fmt::Write as _;
    let gap = |g: Option<f64>| g.map_or("-".into(), |g| format!("{:+.2}%", g * 100.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:>11}  {:>10}  {:>9}  {:>9}  {:>11}  {:>13}  {:>13}  {:>8}",
        "seed",
        "first",
        "sync util",
        "ovl util",
        "ratio",
        "tokens/s ×",
        "sync held-out",
        "ovl held-out",
        "gap"
    );
    for p in &report.pairs {
        let _ = writeln!(
            out,
            "{:>6}  {:>11}  {:>10}  {:>9}  {:>9}  {:>11}  {:>13}  {:>13}  {:>8}",
            p.seed,
            p.first,
            fmt(p.synchronous.mean_utilization, 3),
            fmt(p.overlapped.mean_utilization, 3),
            fmt(p.utilization_ratio, 3),
            fmt(p.throughput_ratio, 3),
            fmt(p.synchronous.final_heldout_loss, 4),
            fmt(p.overlapped.final_heldout_loss, 4),
            gap(p.heldout_loss_gap)
        );
    }
    let _ = writeln!(
        out,
        "mean utilization {} synchronous, {} overlapped (ratio {}); throughput ratio {}; mean \
         held-out gap {}",
        fmt(report.synchronous_mean_utilization, 3),
        fmt(report.overlapped_mean_utilization, 3),
        fmt(report.utilization_ratio, 3),
        fmt(report.mean_throughput_ratio, 3),
        gap(report.mean_heldout_loss_gap)
    );
    out
}

/// The mean of the values present; `None` when there are none.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.flatten().collect();
    (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
}

fn arm_of(report: up::UpReport, overlap_steps: u32) -> Arm {
    Arm {
        overlap_steps,
        wall_seconds: report.wall_seconds,
        mean_utilization: report.mean_utilization,
        utilization: report
            .node_summaries
            .iter()
            .map(|n| n.utilization)
            .collect(),
        tokens_per_second: report.tokens_per_second,
        accepted: report.summary.rounds.iter().map(|r| r.accepted).collect(),
        final_heldout_loss: report.summary.rounds.last().and_then(|r| r.eval_loss),
        nodes_in_agreement: report.nodes_in_agreement,
        data_dir: report.data_dir,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(overlap_steps: u32, utilization: Option<f64>, loss: Option<f64>) -> Arm {
        Arm {
            overlap_steps,
            wall_seconds: 1.0,
            mean_utilization: utilization,
            utilization: vec![utilization],
            tokens_per_second: utilization.map(|u| 1000.0 * u),
            accepted: vec![1],
            final_heldout_loss: loss,
            nodes_in_agreement: 1,
            data_dir: "x".into(),
        }
    }

    #[test]
    fn means_skip_missing_figures_and_the_table_has_a_row_per_seed() {
        assert_eq!(mean([Some(1.0), None, Some(3.0)].into_iter()), Some(2.0));
        assert_eq!(mean([None, None].into_iter()), None);
        let pair = |seed, first, s, o| Pair {
            seed,
            first,
            synchronous: arm(0, Some(s), Some(2.0)),
            overlapped: arm(3, Some(o), Some(2.02)),
            utilization_ratio: Some(o / s),
            throughput_ratio: Some(0.96),
            heldout_loss_gap: Some(0.01),
        };
        let report = Report {
            pairs: vec![
                pair(7, "synchronous", 0.4, 0.5),
                pair(8, "overlapped", 0.6, 0.6),
            ],
            synchronous_mean_utilization: Some(0.5),
            overlapped_mean_utilization: Some(0.55),
            utilization_ratio: Some(1.1),
            mean_throughput_ratio: Some(0.96),
            mean_heldout_loss_gap: Some(0.01),
        };
        let text = table(&report);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 4, "{text}");
        assert!(rows[1].trim_start().starts_with("7  synchronous"), "{text}");
        assert!(rows[2].trim_start().starts_with("8   overlapped"), "{text}");
        assert!(
            rows[1].contains("1.250") && rows[1].contains("0.960") && rows[1].contains("+1.00%"),
            "{text}"
        );
        assert!(rows[3].contains("ratio 1.100"), "{text}");
        assert!(rows[3].contains("throughput ratio 0.960"), "{text}");
    }
}
