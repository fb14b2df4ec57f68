//! `barnraise node`: run the node daemon, check a machine with `doctor`, or
//! list the signed receipts of this node's contributions.
//!
//! Settings come from, in increasing precedence: defaults, the TOML file of
//! `--config` (or `<data dir>/node.toml` when it exists), `BARNRAISE_*`
//! environment variables, and flags.

use anyhow::Context;
use barnraise_node::doctor::{Verdict, run_doctor};
use barnraise_node::{CancellationToken, Multiaddr, NodeConfig, run_node};
use barnraise_protocol::PublicKey;
use clap::{Args as ClapArgs, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Check this machine and its link to the coordinator, with advice.
    Doctor {
        #[command(flatten)]
        settings: Settings,
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the signed manifests that name this node (proof of
    /// contribution), with totals in the coordinator ledger's terms.
    Receipts {
        #[command(flatten)]
        settings: Settings,
        /// Print the receipts and totals as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause the node running on this data dir: it drops the round it is
    /// training, tells the coordinator it is leaving, and waits (SIGUSR1).
    Pause {
        /// The running node's data dir [default: ~/.barnraise].
        #[arg(long, env = "BARNRAISE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Resume a paused node: it joins again and takes work (SIGUSR2).
    Resume {
        /// The running node's data dir [default: ~/.barnraise].
        #[arg(long, env = "BARNRAISE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

/// Settings shared by the daemon and its subcommands.
#[derive(Debug, Clone, ClapArgs)]
struct Settings {
    /// The coordinator's multiaddr, e.g. /ip4/203.0.113.5/tcp/4001/p2p/12D3Koo...
    #[arg(long, env = "BARNRAISE_COORDINATOR")]
    coordinator: Option<Multiaddr>,
    /// Where the node keeps its key, blobs and state [default: ~/.barnraise].
    #[arg(long, env = "BARNRAISE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Training device: auto, cpu or cuda:N; a list (cuda:0,cuda:1) runs
    /// one worker per device (cluster mode).
    #[arg(long, env = "BARNRAISE_DEVICE")]
    device: Option<String>,
    /// Compute precision: auto (bf16 on a GPU that has it, else f32), f32 or bf16.
    #[arg(long, env = "BARNRAISE_PRECISION")]
    precision: Option<barnraise_trainer::precision::Precision>,
    /// Most sequences per forward pass; a larger run batch is split into
    /// micro-batches (for GPUs short of memory).
    #[arg(long, env = "BARNRAISE_MICRO_BATCH", value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch: Option<u32>,
    /// Cluster mode: drive N workers that split this node's assignment and
    /// upload one reduced update [default: one per listed device].
    #[arg(long, env = "BARNRAISE_WORKERS")]
    workers: Option<u32>,
    /// Org certificate to present when joining (made by `barnraise org enroll`).
    #[arg(long, env = "BARNRAISE_CERTIFICATE")]
    certificate: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9101.
    #[arg(long, env = "BARNRAISE_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Listen address (repeatable) [default: all interfaces, TCP and QUIC, random ports].
    #[arg(long, env = "BARNRAISE_LISTEN", value_delimiter = ',')]
    listen: Vec<Multiaddr>,
    /// Key file [default: <data dir>/node.key].
    #[arg(long, env = "BARNRAISE_KEY")]
    key: Option<PathBuf>,
    /// Upload cap, bytes per second; suffixes k, M, G (e.g. 5M).
    #[arg(long, env = "BARNRAISE_UPLOAD_LIMIT", value_parser = parse_rate)]
    upload_limit: Option<u64>,
    /// Download cap, bytes per second; suffixes k, M, G.
    #[arg(long, env = "BARNRAISE_DOWNLOAD_LIMIT", value_parser = parse_rate)]
    download_limit: Option<u64>,
    /// Stop after this many rounds.
    #[arg(long, env = "BARNRAISE_MAX_ROUNDS")]
    max_rounds: Option<u64>,
    /// Active hours in local time, e.g. 22:00-07:00 (past midnight) or
    /// 09:00-17:00; outside them the node leaves the run and waits.
    #[arg(long, env = "BARNRAISE_SCHEDULE")]
    schedule: Option<barnraise_node::activity::Schedule>,
    /// Most threads training may use [default: all cores].
    #[arg(long, env = "BARNRAISE_THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// The run to join (default: whatever run the coordinator hosts).
    #[arg(long, env = "BARNRAISE_RUN_ID")]
    run_id: Option<String>,
    /// The coordinator's public key in hex, if it should be pinned.
    #[arg(long, env = "BARNRAISE_COORDINATOR_KEY")]
    coordinator_key: Option<String>,
    /// TOML config file [default: <data dir>/node.toml if it exists].
    #[arg(long, env = "BARNRAISE_CONFIG")]
    config: Option<PathBuf>,
}

/// Parses "1500", "64k", "5M", "1G" (powers of 1000, as link speeds are quoted).
fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text
        .trim()
        .trim_end_matches("/s")
        .trim_end_matches(['B', 'b']);
    let (number, scale) = match text.chars().last() {
        Some('k' | 'K') => (&text[..text.len() - 1], 1_000u64),
        Some('m' | 'M') => (&text[..text.len() - 1], 1_000_000),
        Some('g' | 'G') => (&text[..text.len() - 1], 1_000_000_000),
        _ => (text, 1),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a rate like 500k or 5M"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("`{text}` is not a rate"));
    }
    Ok((value * scale as f64) as u64)
}

impl Settings {
    /// Defaults, then the config file, then env and flags.
    fn resolve(self) -> anyhow::Result<NodeConfig> {
        let data_dir = self.data_dir.clone().unwrap_or_else(super::default_home);
        let file = self
            .config
            .clone()
            .or_else(|| Some(data_dir.join("node.toml")).filter(|p| p.exists()));
        let mut config = match &file {
            Some(path) => NodeConfig::from_toml_file(path)?,
            None => NodeConfig {
                data_dir: data_dir.clone(),
                listen: default_listen()?,
                ..NodeConfig::default()
            },
        };
        // A file that leaves these out gets the daemon's defaults, not the
        // library's test-friendly ones (relative dir, loopback only).
        let library_defaults = NodeConfig::default();
        if self.data_dir.is_some() || config.data_dir == library_defaults.data_dir {
            config.data_dir = data_dir;
        }
        if file.is_some() && config.listen == library_defaults.listen {
            config.listen = default_listen()?;
        }
        if let Some(v) = self.coordinator {
            config.coordinator = v;
        }
        if let Some(v) = self.device {
            config.device = v;
        }
        if let Some(v) = self.precision {
            config.precision = v;
        }
        if let Some(v) = self.micro_batch {
            config.micro_batch = Some(v);
        }
        if !self.listen.is_empty() {
            config.listen = self.listen;
        }
        if self.workers.is_some() {
            config.workers = self.workers;
        }
        if self.certificate.is_some() {
            config.certificate = self.certificate;
        }
        if self.metrics_addr.is_some() {
            config.metrics_addr = self.metrics_addr;
        }
        if self.key.is_some() {
            config.key = self.key;
        }
        if self.upload_limit.is_some() {
            config.upload_limit = self.upload_limit;
        }
        if self.download_limit.is_some() {
            config.download_limit = self.download_limit;
        }
        if self.max_rounds.is_some() {
            config.max_rounds = self.max_rounds;
        }
        if self.schedule.is_some() {
            config.schedule = self.schedule;
        }
        if self.threads.is_some() {
            config.threads = self.threads;
        }
        if let Some(v) = self.run_id {
            config.run_id = v;
        }
        if self.coordinator_key.is_some() {
            config.coordinator_key = self.coordinator_key;
        }
        Ok(config)
    }
}

fn default_listen() -> anyhow::Result<Vec<Multiaddr>> {
    Ok(vec![
        "/ip4/0.0.0.0/tcp/0"
            .parse()
            .context("default TCP listen address")?,
        "/ip4/0.0.0.0/udp/0/quic-v1"
            .parse()
            .context("default QUIC listen address")?,
    ])
}

fn require_coordinator(config: &NodeConfig) -> anyhow::Result<()> {
    if config.coordinator.is_empty() {
        anyhow::bail!(
            "no coordinator given: pass --coordinator <multiaddr>, set BARNRAISE_COORDINATOR, or put `coordinator = \"...\"` in the config file"
        );
    }
    Ok(())
}

/// Progress bars only on a terminal and with text logs (JSON logs are for
/// machines, and bars would interleave with them).
fn want_bars() -> bool {
    let json_flag = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || std::env::args().any(|a| a == "--log-format=json")
        || std::env::var("BARNRAISE_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    std::io::stderr().is_terminal() && !json_flag
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Before the runtime starts any thread: the thread cap goes through the
    // environment, which candle's matmuls read.
    let daemon = match &args.command {
        None => {
            let config = args.settings.clone().resolve()?;
            require_coordinator(&config)?;
            if let Some(threads) = config.threads {
                cap_training_threads(threads);
            }
            Some(config)
        }
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match args.command {
        None => match daemon {
            Some(config) => runtime.block_on(run_daemon(config)),
            None => anyhow::bail!("no node configuration"),
        },
        Some(NodeCommand::Pause { data_dir }) => signal_node(data_dir, Signal::Pause),
        Some(NodeCommand::Resume { data_dir }) => signal_node(data_dir, Signal::Resume),
        Some(NodeCommand::Doctor { settings, json }) => {
            let config = settings.resolve()?;
            require_coordinator(&config)?;
            runtime.block_on(doctor(config, json))
        }
        Some(NodeCommand::Receipts { settings, json }) => receipts(settings.resolve()?, json),
    }
}

/// Caps candle's matmul threads (`RAYON_NUM_THREADS`, which `--threads`
/// overrides).
#[allow(unsafe_code)]
fn cap_training_threads(threads: u32) {
    // SAFETY: called before the async runtime (or any other thread) starts,
    // so nothing reads the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
}

/// The file that holds the running daemon's process id.
fn pid_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("node.pid")
}

#[derive(Clone, Copy, Debug)]
enum Signal {
    Pause,
    Resume,
}

/// `barnraise node pause|resume`: signals the daemon whose pid file is in
/// the data dir, after checking the process is a barnraise node.
#[cfg(unix)]
#[allow(unsafe_code)]
fn signal_node(data_dir: Option<PathBuf>, signal: Signal) -> anyhow::Result<()> {
    let data_dir = data_dir.unwrap_or_else(super::default_home);
    let path = pid_path(&data_dir);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no node is running on {} (no {}); start one with `barnraise node`",
            data_dir.display(),
            path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|&p| p > 0)
        .with_context(|| format!("{} does not hold a process id", path.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains("barnraise");
    if !ours && std::path::Path::new("/proc/self").exists() {
        anyhow::bail!(
            "process {pid} from {} is not a running barnraise node (a stale pid file; the node \
             is not running)",
            path.display()
        );
    }
    let (number, verb) = match signal {
        Signal::Pause => (libc::SIGUSR1, "paused"),
        Signal::Resume => (libc::SIGUSR2, "resumed"),
    };
    // SAFETY: kill only sends a signal to the process id read above.
    if unsafe { libc::kill(pid, number) } != 0 {
        anyhow::bail!(
            "could not signal node process {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    eprintln!("node {pid} on {} {verb}", data_dir.display());
    Ok(())
}

#[cfg(not(unix))]
fn signal_node(_data_dir: Option<PathBuf>, _signal: Signal) -> anyhow::Result<()> {
    anyhow::bail!("pause and resume need a Unix signal; stop the node with Ctrl-C instead")
}

/// Removes the pid file when the daemon stops.
struct PidFile(PathBuf);

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn run_daemon(mut config: NodeConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("stopping (Ctrl-C); the node resumes from its data dir next time");
            on_signal.cancel();
        }
    });
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let pid = pid_path(&config.data_dir);
    std::fs::write(&pid, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid.display()))?;
    let _pid_file = PidFile(pid);
    let (pause_tx, pause) = barnraise_node::activity::pause_switch();
    config.pause = Some(pause);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut pause_signal = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
        let mut resume_signal = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
        tokio::spawn(async move {
            loop {
                let paused = tokio::select! {
                    Some(()) = pause_signal.recv() => true,
                    Some(()) = resume_signal.recv() => false,
                    else => break,
                };
                tracing::info!(
                    "{}",
                    if paused {
                        "pausing (SIGUSR1)"
                    } else {
                        "resuming (SIGUSR2)"
                    }
                );
                if pause_tx.send(paused).is_err() {
                    break;
                }
            }
        });
    }
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(256);
    let display = barnraise_node::progress::spawn_display(events_rx, want_bars());
    let summary_path = config.data_dir.join("last-run.json");
    let result = run_node(config, shutdown, Some(events_tx)).await;
    let _ = display.await;
    let summary = result?;
    // What this run did, for scripts and service monitors.
    let record = serde_json::json!({
        "node": summary.node.map(|n| n.to_string()),
        "rounds_applied": summary.rounds_completed,
        "rounds_trained": summary.rounds_trained,
        "rounds_replayed": summary.rounds_replayed,
        "bootstrap_addrs": summary.bootstrap_addrs,
        "tokens_trained": summary.tokens_trained,
        "resyncs": summary.resyncs,
        "bytes_uploaded": summary.bytes_uploaded,
        "bytes_served_to_peers": summary.bytes_served_to_peers,
        "bytes_downloaded": summary.bytes_downloaded,
        "bytes_from_coordinator": summary.bytes_from_coordinator,
        "updates_prefetched": summary.updates_prefetched,
        "reachability": summary.reachability,
        "hole_punches": summary.hole_punches,
        "relay_reservations": summary.relay_reservations,
        "final_params_hash": summary.final_params_hash.map(|h| h.to_hex()),
    });
    if let Err(e) = std::fs::write(&summary_path, format!("{record:#}\n")) {
        tracing::warn!("could not write {}: {e}", summary_path.display());
    }
    let params = summary
        .final_params_hash
        .map(|h| h.short())
        .unwrap_or_else(|| "-".into());
    eprintln!(
        "node stopped: {} rounds applied, {} trained, {} tokens, {} resyncs, {:.1} MB up ({:.1} MB to other nodes), \
         {:.1} MB down ({:.1} MB from the coordinator), reachability {}, params {params}",
        summary.rounds_completed,
        summary.rounds_trained,
        summary.tokens_trained,
        summary.resyncs,
        summary.bytes_uploaded as f64 / 1e6,
        summary.bytes_served_to_peers as f64 / 1e6,
        summary.bytes_downloaded as f64 / 1e6,
        summary.bytes_from_coordinator as f64 / 1e6,
        summary.reachability.as_deref().unwrap_or("unknown"),
    );
    Ok(())
}

async fn doctor(config: NodeConfig, json: bool) -> anyhow::Result<()> {
    let checks = run_doctor(&config).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for check in &checks {
            let mark = match check.verdict {
                Verdict::Ok => "ok  ",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
            };
            println!("[{mark}] {:<15} {}", check.name, check.finding);
            if let Some(advice) = &check.advice {
                println!("       {:<15} -> {advice}", "");
            }
        }
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        anyhow::bail!("some checks failed; see the advice above");
    }
    Ok(())
}

fn receipts(config: NodeConfig, json: bool) -> anyhow::Result<()> {
    use barnraise_node::receipts::{self, Verdict};
    let dir = config.data_dir.join("receipts");
    let key = barnraise_protocol::SigningKey::load(&config.key_path())?;
    let me = key.node_id();
    let facts = receipts::read_run_facts(&dir)?;
    // The pinned key, else the one the node recorded when it joined.
    let pinned: Option<PublicKey> = config
        .coordinator_key
        .clone()
        .or_else(|| facts.as_ref().map(|f| f.coordinator.clone()))
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("coordinator key")?;
    let (kept, bad) = receipts::read_receipts(&dir, &me, pinned.as_ref())?;
    let totals = receipts::totals(&kept, facts.as_ref());
    if json {
        let out = serde_json::json!({
            "node": me.to_string(),
            "receipts": kept,
            "unverified": bad,
            "totals": totals,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if kept.is_empty() && bad.is_empty() {
        println!("no receipts yet in {}", dir.display());
        return Ok(());
    }
    println!("node {me}");
    for receipt in &kept {
        let status = match &receipt.verdict {
            Verdict::Accepted {
                tokens,
                weight,
                update_bytes,
                compute_ms,
            } => format!(
                "accepted  {tokens} tokens, weight {weight:.3}, {update_bytes} B, {:.1} s",
                *compute_ms as f64 / 1000.0
            ),
            Verdict::Rejected { reason } => format!("rejected  ({reason})"),
            Verdict::Missing => "missing   (no commit by the deadline)".into(),
            Verdict::NotNamed => "not named".into(),
        };
        let voided = receipt
            .voided
            .as_ref()
            .map(|v| {
                format!(
                    "  voids {} tokens credited since round {}",
                    v.tokens, v.from_round
                )
            })
            .unwrap_or_default();
        println!(
            "round {:>6}  {status}{voided}  manifest {}  signed by {}",
            receipt.round,
            &receipt.manifest[..12],
            &receipt.signer[..12]
        );
    }
    for b in &bad {
        println!("{}: does not verify: {}", b.path.display(), b.error);
    }
    let rejections: Vec<String> = totals
        .rejections
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    println!(
        "total: {} rounds, {} accepted, {} rejected{}, {} missing, {} tokens{}, {:.1} s compute, credit {}",
        totals.rounds,
        totals.accepted,
        totals.rejected,
        if rejections.is_empty() {
            String::new()
        } else {
            format!(" ({})", rejections.join(", "))
        },
        totals.missing,
        totals.tokens,
        if totals.voided_tokens > 0 {
            format!(" ({} voided by a failed spot check)", totals.voided_tokens)
        } else {
            String::new()
        },
        totals.compute_ms as f64 / 1000.0,
        totals
            .credit
            .map(|c| format!("{c:.3e} FLOP"))
            .unwrap_or_else(|| "unknown (no receipts/run.json)".into()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1500"), Ok(1500));
        assert_eq!(parse_rate("64k"), Ok(64_000));
        assert_eq!(parse_rate("5M"), Ok(5_000_000));
        assert_eq!(parse_rate("1.5MB/s"), Ok(1_500_000));
        assert!(parse_rate("fast").is_err());
    }
}
