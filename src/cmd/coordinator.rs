//! `barnraise coordinator`: runs a coordinator for the run described by a
//! TOML run config (reference: docs/running-a-coordinator.md) until the run
//! ends or Ctrl-C, then prints the contribution table.

use anyhow::Context;
use barnraise_coordinator::{CancellationToken, CoordinatorConfig, CoordinatorEvent};
use clap::Args as ClapArgs;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<CoordinatorCommand>,
    /// The run config (TOML): model, dataset, hyperparameters, quorum, admission.
    #[arg(long, env = "BARNRAISE_RUN_CONFIG")]
    config: Option<PathBuf>,
    /// Data dir (ledger, blobs, key); overrides the config's `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTP API address; overrides the config's `http`.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// libp2p listen multiaddr (repeatable); overrides the config's `listen`.
    #[arg(long)]
    listen: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum CoordinatorCommand {
    /// Write the run's public record (signed plans and manifests, run
    /// config, ledger totals, an index of hashes) to a new directory, for
    /// anyone to host and `barnraise audit` to check.
    ExportRecord {
        /// The coordinator's data dir (its ledger and run config).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the record (must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(CoordinatorCommand::ExportRecord { data_dir, out }) = args.command {
        let index = barnraise_coordinator::record::export(&data_dir, &out)
            .with_context(|| format!("exporting the record of {}", data_dir.display()))?;
        println!(
            "wrote the record of run '{}' ({} rounds, {} files, head manifest {}) to {}",
            index.run_id,
            index.rounds,
            index.files.len() + 1,
            &index.head_manifest[..12],
            out.display()
        );
        println!("check it with: barnraise audit --record {}", out.display());
        return Ok(());
    }
    let Some(config_path) = args.config else {
        anyhow::bail!(
            "--config is required to run a coordinator (or use a subcommand: export-record)"
        );
    };
    let mut config = CoordinatorConfig::load(&config_path)?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(http) = args.http {
        config.http = http;
    }
    if !args.listen.is_empty() {
        config.listen = args.listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let handle = barnraise_coordinator::start(config, shutdown.clone()).await?;
        println!("coordinator listening on {}", handle.multiaddr());
        println!("HTTP API and dashboard on http://{}", handle.http_addr());
        let mut events = handle.events();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                let loss =
                    |l: Option<f64>| l.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
                match event {
                    CoordinatorEvent::RoundClosed {
                        round,
                        accepted,
                        rejected,
                        mean_loss,
                        eval_loss,
                        ..
                    } => {
                        // The held-out loss of every round but the last follows
                        // the manifest (RoundEvaluated).
                        let eval = eval_loss
                            .map(|v| format!(", eval loss {v:.3}"))
                            .unwrap_or_default();
                        println!(
                            "round {round}: {accepted} accepted, {} rejected, train loss {}{eval}",
                            rejected.len(),
                            loss(mean_loss),
                        );
                    }
                    CoordinatorEvent::RoundEvaluated { round, eval_loss } => {
                        println!("round {round}: eval loss {eval_loss:.3}");
                    }
                    _ => {}
                }
            }
        });
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping (Ctrl-C)…");
                stopper.cancel();
            }
        });
        let summary = handle.wait().await?;
        print!(
            "{}",
            barnraise_coordinator::stats::render_contributors(&summary.contributors)
        );
        Ok(())
    })
}
