//! `barnraise bench overlap`: the same `up` run twice on this machine, with
//! synchronous rounds and with overlapped rounds (docs/architecture.md,
//! "Overlapped rounds"), and the nodes' utilization and held-out loss of
//! each side by side.
//!
//! Utilization is each node's seconds of training over the wall clock from
//! its first plan to its last manifest (`up --json`'s `node_summaries`).
//! The two runs are one after the other, not at once: they would share the
//! cores. A multi-node `up` is not bit-for-bit repeatable (arrival order
//! differs), so the loss of either arm moves a little between runs.

use super::up;
use anyhow::Context;
use clap::Args as ClapArgs;
use serde::Serialize;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Steps of each round the overlapped arm trains after the commit.
    #[arg(long, default_value_t = 3)]
    pub overlap: u32,
    /// Everything `barnraise up` takes (its `--overlap-steps` is set per arm;
    /// `--data-dir` gets a folder per arm).
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
    /// Updates accepted per round.
    pub accepted: Vec<u64>,
    /// θ's held-out loss after the last round.
    pub final_heldout_loss: Option<f64>,
    pub nodes_in_agreement: usize,
    pub data_dir: std::path::PathBuf,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub synchronous: Arm,
    pub overlapped: Arm,
    /// Overlapped mean utilization over synchronous.
    pub utilization_ratio: Option<f64>,
    /// Overlapped final held-out loss over synchronous, minus one.
    pub heldout_loss_gap: Option<f64>,
}

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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("barnraise-bench")
        .build()
        .context("starting the async runtime")?;
    let mut arms = Vec::new();
    for (name, overlap) in [("synchronous", 0), ("overlapped", args.overlap)] {
        let mut up = args.up.clone();
        up.overlap_steps = overlap;
        up.json = true;
        up.data_dir = base.as_ref().map(|dir| dir.join(name));
        eprintln!("bench overlap: {name} rounds (--overlap-steps {overlap})...");
        let finished = runtime
            .block_on(up::run_async(up))
            .with_context(|| format!("the {name} run"))?;
        let arm = arm_of(finished.report, overlap);
        eprintln!(
            "bench overlap: {name}: mean utilization {}, held-out {}, {:.1} s",
            fmt(arm.mean_utilization, 3),
            fmt(arm.final_heldout_loss, 4),
            arm.wall_seconds
        );
        arms.push(arm);
    }
    let overlapped = arms.pop().context("the overlapped arm")?;
    let synchronous = arms.pop().context("the synchronous arm")?;
    let report = Report {
        utilization_ratio: ratio(overlapped.mean_utilization, synchronous.mean_utilization),
        heldout_loss_gap: ratio(
            overlapped.final_heldout_loss,
            synchronous.final_heldout_loss,
        )
        .map(|r| r - 1.0),
        synchronous,
        overlapped,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("                      synchronous  overlapped");
        let row = |name: &str, a: String, b: String| println!("{name:<22}{a:>11}  {b:>10}");
        row(
            "overlap steps",
            report.synchronous.overlap_steps.to_string(),
            report.overlapped.overlap_steps.to_string(),
        );
        row(
            "mean utilization",
            fmt(report.synchronous.mean_utilization, 3),
            fmt(report.overlapped.mean_utilization, 3),
        );
        row(
            "final held-out loss",
            fmt(report.synchronous.final_heldout_loss, 4),
            fmt(report.overlapped.final_heldout_loss, 4),
        );
        row(
            "wall seconds",
            format!("{:.1}", report.synchronous.wall_seconds),
            format!("{:.1}", report.overlapped.wall_seconds),
        );
        println!(
            "utilization ratio {}, held-out loss gap {}",
            fmt(report.utilization_ratio, 3),
            report
                .heldout_loss_gap
                .map_or("-".into(), |g| format!("{:+.2}%", g * 100.0))
        );
    }
    Ok(())
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
