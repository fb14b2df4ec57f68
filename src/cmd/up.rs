//! `barnraise up`: the embedded default. One process runs a coordinator and a
//! few nodes over real loopback sockets, with a real ledger in a data dir and
//! a small model on the built-in corpus; it shows progress, serves the API
//! while it runs, and ends with a summary: loss per round, bytes moved
//! against plain data-parallel training, and the contribution table.

use anyhow::Context;
use barnraise_coordinator::config::{CoordinatorConfig, DatasetSource, Quorum};
use barnraise_coordinator::summary::{CoordinatorEvent, NetworkTotals, RunSummary};
use barnraise_node::network::shaper::{Link, LinkShape};
use barnraise_node::{NodeConfig, NodeEvent, NodeSummary};
use barnraise_trainer::ModelConfig;
use barnraise_trainer::bench::human_bytes;
use clap::Args as ClapArgs;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, ClapArgs)]
pub struct Args {
    /// Nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nodes: u32,
    /// Outer rounds (DiLoCo outer steps).
    #[arg(long, default_value_t = 6)]
    pub rounds: u64,
    /// Model preset: tiny, small, medium, large, xl.
    #[arg(long, default_value = "small")]
    pub model: String,
    /// Every node's training device: cpu, auto or cuda:N (all nodes share
    /// it; one GPU trains them in turn).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: auto (bf16 on a GPU that has it, else f32), f32 or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: barnraise_trainer::precision::Precision,
    /// Inner steps per round (DiLoCo's H).
    #[arg(long, default_value_t = 12)]
    pub inner_steps: u32,
    /// Overlapped rounds: each node trains up to this many of a round's
    /// inner steps after its commit, while its update travels and the
    /// round closes, and carries them into its next round (0: synchronous;
    /// docs/architecture.md, "Overlapped rounds").
    #[arg(long, default_value_t = 0)]
    pub overlap_steps: u32,
    /// Sequences per inner step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: u32,
    /// Tokens per sequence [default: 128, or the model's context if shorter].
    #[arg(long)]
    pub seq_len: Option<u32>,
    /// Update codec: fp32, int8[:BLOCK], topk[:CHUNK:K:BITS], and for top-k
    /// optionally ,decay=X and ,warm=K0:N (docs/codec.md). The default is the
    /// most compressed codec measured at parity with fp32 at up's scale.
    #[arg(long, default_value = DEFAULT_CODEC)]
    pub codec: String,
    /// Aggregation rule: mean, support-mean (for top-k codecs), trimmed-mean:F, centered-clip:TAU.
    #[arg(long, default_value = DEFAULT_AGGREGATION)]
    pub aggregation: String,
    /// Where the ledger, blobs and keys go [default: a new folder under ~/.barnraise/up].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A dataset directory written by `barnraise shard` (with --tokenizer,
    /// the model's vocabulary is the tokenizer's) [default: the built-in
    /// corpus].
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Address of the HTTP API while the run lasts.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http: SocketAddr,
    /// Seconds to keep the API up after the last round.
    #[arg(long, default_value_t = 0.0)]
    pub linger: f64,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Give every node a link of N Mbit/s each way, shaped in userspace
    /// (the coordinator is not shaped; docs/running-a-node.md, "A slow
    /// link, simulated").
    #[arg(long, value_name = "MBPS")]
    pub link_mbps: Option<f64>,
    /// Delay what every node receives by N ms: N between a node and the
    /// coordinator a round trip, 2N between two nodes.
    #[arg(long, value_name = "MS")]
    pub link_latency_ms: Option<u64>,
    /// Give the nodes keys derived from this seed, so that runs with the
    /// same seed plan the same shards for the same nodes (paired
    /// comparisons: docs/training.md, "What the codec costs in `up`")
    /// [default: new random keys every run].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hold a round past its deadline for a drawn worker's state instead of
    /// closing without it and settling the check in a later round (the
    /// coordinator's `verify.defer_state_checks = false`; for comparisons:
    /// docs/architecture.md, "Slow links").
    #[arg(long)]
    pub hold_state_checks: bool,
    /// Fetch the other nodes' updates only once the manifest names them,
    /// not as the coordinator announces them, and shards only when training
    /// starts, not when the plan arrives (the nodes'
    /// `prefetch_updates = false`; for comparisons: docs/architecture.md,
    /// "Slow links").
    #[arg(long)]
    pub no_prefetch: bool,
    /// Fraction of workers' shares replayed by a spot check (the
    /// coordinator's `verify.spot_check_fraction`, 0 to 1) [default: the
    /// coordinator's, 0.1]. A drawn state costs every node's round about
    /// its size over the link, so runs compared for utilization are steadier
    /// with draws fixed (0 turns them off; docs/architecture.md,
    /// "Overlapped rounds, measured in `up`").
    #[arg(long, value_name = "F")]
    pub spot_check_fraction: Option<f64>,
    /// Make every inner step of every node also wait N ms: a model of a
    /// node whose steps run on an accelerator and leave the CPU free, so
    /// that what a round waits for is the link, not cores the nodes share
    /// (for comparisons: docs/architecture.md, "Overlapped rounds where the
    /// CPU is free").
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub step_delay_ms: Option<u64>,
}

const RUN_ID: &str = "barnraise-up";

/// How long after the run's end the nodes get to apply the final manifest
/// before they are stopped.
const NODES_STOP_SECS: f64 = 60.0;

/// `--linger` as seconds a Duration can hold (at most a day; anything not a
/// number is none).
fn linger_secs(linger: f64) -> f64 {
    if linger.is_nan() {
        0.0
    } else {
        linger.clamp(0.0, 86_400.0)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("barnraise-up")
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(run_async(args))?;
    if summary.json {
        println!("{}", serde_json::to_string_pretty(&summary.report)?);
    } else {
        print!("{}", summary.report);
    }
    Ok(())
}

pub(crate) struct Finished {
    pub report: UpReport,
    json: bool,
}

fn default_data_dir() -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    super::default_home()
        .join("up")
        .join(format!("run-{stamp}"))
}

pub(crate) async fn run_async(args: Args) -> anyhow::Result<Finished> {
    let model = ModelConfig::preset(&args.model).with_context(|| {
        format!(
            "unknown model preset `{}` (try tiny, small, medium)",
            args.model
        )
    })?;
    let shape = LinkShape::new(args.link_mbps, args.link_latency_ms).map_err(anyhow::Error::msg)?;
    let links: Vec<Option<Link>> = (0..args.nodes).map(|_| shape.map(Link::new)).collect();
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let started = Instant::now();
    let seq_len = seq_len(&args, &model);

    let mut config = CoordinatorConfig {
        run_id: RUN_ID.into(),
        model: args.model.clone(),
        dataset: match &args.dataset {
            Some(path) => DatasetSource::Dir { path: path.clone() },
            None => DatasetSource::Builtin {
                shards: (args.nodes as usize * 4).max(8),
                shard_tokens: 64 * 1024,
                seed: 0,
            },
        },
        inner_steps: args.inner_steps,
        overlap_steps: args.overlap_steps,
        batch_size: args.batch_size,
        seq_len,
        codec: args.codec.clone(),
        aggregation: args.aggregation.clone(),
        quorum: Quorum::Fraction(1.0),
        min_nodes: args.nodes as usize,
        total_rounds: args.rounds,
        http: args.http,
        data_dir: data_dir.join("coordinator"),
        // `up` stops the coordinator itself, once every node has stopped
        // (below): a node behind a slow link may still be fetching the last
        // round's updates after their authors have left, and the
        // coordinator is where it turns then. This is only a bound.
        linger_secs: linger_secs(args.linger) + NODES_STOP_SECS + 30.0,
        round_deadline_secs: 600.0,
        ..CoordinatorConfig::default()
    };
    config.verify.defer_state_checks = !args.hold_state_checks;
    if let Some(fraction) = args.spot_check_fraction {
        config.verify.spot_check_fraction = fraction;
    }
    let shutdown = CancellationToken::new();
    let coordinator = barnraise_coordinator::start(config, shutdown.clone())
        .await
        .context("starting the coordinator")?;
    let mut coordinator_events = coordinator.events();
    let http = coordinator.http_addr();
    let dial = coordinator.multiaddr();
    if !args.json {
        eprintln!(
            "barnraise up: {} nodes, {} rounds of {} inner steps, model `{}` ({:.2}M params), codec {}",
            args.nodes,
            args.rounds,
            args.inner_steps,
            args.model,
            model.params_count() as f64 / 1e6,
            args.codec
        );
        eprintln!("  data dir   {}", data_dir.display());
        eprintln!("  dashboard  http://{http}/   (while the run lasts)");
        eprintln!("  API        http://{http}/api/v1/run   metrics http://{http}/metrics");
        eprintln!("  dial       {dial}");
        if let Some(shape) = shape {
            eprintln!("  links      every node: {shape} (userspace shaper)");
        }
    }

    // Ctrl-C stops everything cleanly; what was committed stays in the ledger.
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
        });
    }

    // Each node reports on its own channel; a forwarder tags events with the node's index.
    let (node_events_tx, mut node_events) = mpsc::channel::<(u32, NodeEvent)>(256);
    let mut nodes = tokio::task::JoinSet::new();
    for i in 0..args.nodes {
        if let Some(seed) = args.seed {
            seeded_node_key(&data_dir.join(format!("node-{i}")), seed, i)?;
        }
        let node_config = NodeConfig {
            coordinator: dial.clone(),
            data_dir: data_dir.join(format!("node-{i}")),
            device: args.device.clone(),
            precision: args.precision,
            run_id: RUN_ID.into(),
            max_rounds: Some(args.rounds),
            link: links[i as usize].clone(),
            prefetch_updates: !args.no_prefetch,
            fault_step_delay_ms: args.step_delay_ms,
            ..NodeConfig::default()
        };
        let (tx, mut rx) = mpsc::channel::<NodeEvent>(64);
        let forward = node_events_tx.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if forward.send((i, event)).await.is_err() {
                    break;
                }
            }
        });
        let shutdown = shutdown.clone();
        nodes.spawn(async move {
            (
                i,
                barnraise_node::run_node(node_config, shutdown, Some(tx)).await,
            )
        });
    }
    drop(node_events_tx);

    let progress = super::progress::RunProgress::new(
        args.rounds,
        args.nodes as u64,
        args.inner_steps as u64,
        !args.json,
    );
    let mut finished = false;
    while !finished {
        tokio::select! {
            event = coordinator_events.recv() => match event {
                Ok(CoordinatorEvent::RunFinished) => finished = true,
                Ok(event) => progress.coordinator(&event),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => finished = true,
            },
            Some((i, event)) = node_events.recv() => progress.node(i, &event),
            _ = shutdown.cancelled() => finished = true,
        }
    }
    progress.finish();
    let run_finished = tokio::time::Instant::now();

    // Give the nodes a moment to apply the final manifest, then stop them.
    let mut node_summaries: Vec<(u32, NodeSummary)> = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs_f64(NODES_STOP_SECS));
    tokio::pin!(deadline);
    while !nodes.is_empty() {
        tokio::select! {
            joined = nodes.join_next() => match joined {
                Some(Ok((i, Ok(summary)))) => node_summaries.push((i, summary)),
                Some(Ok((i, Err(e)))) => tracing::warn!(node = i, "node stopped with an error: {e}"),
                Some(Err(e)) => tracing::warn!("node task failed: {e}"),
                None => break,
            },
            _ = &mut deadline => {
                tracing::warn!("nodes did not stop within {NODES_STOP_SECS} s of the run's end; stopping them");
                shutdown.cancel();
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(10));
            }
        }
    }
    // The coordinator keeps its API up for --linger seconds after the last
    // round, and at least until the nodes have stopped.
    tokio::select! {
        _ = tokio::time::sleep_until(run_finished + Duration::from_secs_f64(linger_secs(args.linger))) => {}
        _ = shutdown.cancelled() => {}
    }
    shutdown.cancel();
    let summary = coordinator
        .wait()
        .await
        .context("the coordinator stopped with an error")?;
    node_summaries.sort_by_key(|(i, _)| *i);
    let samples = samples(&data_dir.join("coordinator"));
    let mut report = UpReport::new(
        &args,
        &model,
        summary,
        node_summaries,
        started.elapsed(),
        data_dir,
    );
    report.samples = samples;
    report.link = shape.map(|shape| LinkReport {
        mbps: shape.mbps,
        latency_ms: shape.latency_ms,
        nodes: links
            .iter()
            .flatten()
            .map(|link| {
                let c = link.counters();
                LinkCounts {
                    bytes_sent: c.bytes_sent.load(Ordering::Relaxed),
                    bytes_received: c.bytes_received.load(Ordering::Relaxed),
                    rate_waits: c.rate_waits.load(Ordering::Relaxed),
                    delayed_chunks: c.delayed_chunks.load(Ordering::Relaxed),
                }
            })
            .collect(),
    });
    Ok(Finished {
        report,
        json: args.json,
    })
}

/// One measured point at `up`'s default scale (`small`, 3 nodes, 6 rounds,
/// H = 12): a codec and aggregation rule, the mean held-out loss after the
/// last round and the traffic reduction against data-parallel, from
/// `barnraise up --json --seed S --codec C --aggregation A` for seeds 1, 2
/// and 3 (docs/training.md, "What the codec costs in `up`"). The seed fixes
/// the node keys and so the shard assignment, which makes the runs paired:
/// fp32 moved 1.794–1.806 over the three seeds, where runs with new keys
/// every time had moved 1.804–1.924.
pub struct Measured {
    pub codec: &'static str,
    pub aggregation: &'static str,
    pub loss: f64,
    pub reduction: f64,
}

const fn measured(
    codec: &'static str,
    aggregation: &'static str,
    loss: f64,
    reduction: f64,
) -> Measured {
    Measured {
        codec,
        aggregation,
        loss,
        reduction,
    }
}

pub const MEASURED_AT_UP_SCALE: &[Measured] = &[
    measured("fp32", "mean", 1.7979, 16.0),
    measured("int8:256", "mean", 1.7810, 64.0),
    measured("topk:4096:2048:4", "mean", 1.8017, 174.0),
    measured("topk:4096:2048:4", "support-mean", 1.9207, 173.0),
    measured(
        "topk:4096:512:4,decay=0.95,warm=4096:2",
        "mean",
        1.9126,
        231.0,
    ),
    measured(
        "topk:4096:512:4,decay=0.95,warm=4096:2",
        "support-mean",
        1.9857,
        231.0,
    ),
    measured(
        "topk:4096:128:4,decay=0.95,warm=4096:3",
        "mean",
        1.9118,
        302.0,
    ),
    measured(
        "topk:4096:128:4,decay=0.95,warm=4096:3",
        "support-mean",
        1.9532,
        301.0,
    ),
    measured(
        "topk:4096:32:2,decay=0.95,warm=4096:3",
        "support-mean",
        1.8838,
        572.0,
    ),
    measured(
        "topk:4096:32:2,decay=0.95,warm=4096:3",
        "mean",
        1.9713,
        580.0,
    ),
    measured(
        "topk:4096:64:2,decay=0.95,warm=4096:2",
        "mean",
        1.9211,
        591.0,
    ),
    measured(
        "topk:4096:64:2,decay=0.95,warm=4096:2",
        "support-mean",
        1.8920,
        602.0,
    ),
    measured("topk:4096:64:2", "mean", 2.1927, 2193.0),
];

/// `up`'s default codec: the most compressed one measured at parity at
/// `up`'s scale (+0.2% against fp32 on the mean of three paired seeds).
pub const DEFAULT_CODEC: &str = "topk:4096:2048:4";

/// `up`'s default aggregation rule, measured with [`DEFAULT_CODEC`]
/// (`support-mean` helps only the sparse codecs: +6.8% with it).
pub const DEFAULT_AGGREGATION: &str = "mean";

/// Held-out loss above parity with fp32 that still counts as parity (issue #19's bar).
pub const PARITY: f64 = 0.02;

/// `codec` and `aggregation` as the run will name them (a codec with its
/// decay and warm-up), or `None` when either does not parse.
fn canonical(codec: &str, aggregation: &str) -> Option<(String, String)> {
    let codec = codec
        .parse::<barnraise_protocol::codec::CodecSchedule>()
        .ok()?;
    let rule = aggregation
        .parse::<barnraise_protocol::aggregate::AggregationRule>()
        .ok()?;
    Some((codec.to_string(), rule.to_string()))
}

/// How a measured point is named in `up`'s summary.
fn setting_name(codec: &str, aggregation: &str) -> String {
    if aggregation == "mean" {
        codec.to_string()
    } else {
        format!("{codec} with {aggregation}")
    }
}

/// The measured loss cost of `codec` under `aggregation` against fp32 at
/// `up`'s default scale, as a fraction (0.236 = 23.6% above), if it was
/// measured.
pub fn measured_loss_cost(codec: &str, aggregation: &str) -> Option<f64> {
    let (codec, aggregation) = canonical(codec, aggregation)?;
    let loss = |codec: &str, aggregation: &str| {
        MEASURED_AT_UP_SCALE
            .iter()
            .find(|m| m.codec == codec && m.aggregation == aggregation)
            .map(|m| m.loss)
    };
    Some(loss(&codec, &aggregation)? / loss("fp32", "mean")? - 1.0)
}

/// Writes node `index`'s key derived from `seed` into `node_dir`, or checks
/// that the key already there is that one.
fn seeded_node_key(node_dir: &std::path::Path, seed: u64, index: u32) -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    for (i, part) in bytes.chunks_mut(8).enumerate() {
        let label = format!("barnraise up node {index} key part {i}");
        part.copy_from_slice(&barnraise_trainer::rng::derive_seed(seed, &label).to_le_bytes());
    }
    let key = barnraise_protocol::SigningKey::from_seed(bytes)?;
    let path = node_dir.join("node.key");
    if path.exists() {
        let existing = barnraise_protocol::SigningKey::load(&path)?;
        anyhow::ensure!(
            existing.node_id() == key.node_id(),
            "{} holds another key than --seed {seed} gives node {index}; use a new --data-dir",
            path.display()
        );
        return Ok(());
    }
    std::fs::create_dir_all(node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    key.save_new(&path)?;
    Ok(())
}

/// What `barnraise up` prints at the end (and as JSON with `--json`).
#[derive(Debug, Serialize)]
pub struct UpReport {
    pub data_dir: PathBuf,
    pub model: String,
    pub params: usize,
    pub codec: String,
    pub aggregation: String,
    pub nodes: u32,
    pub inner_steps: u32,
    /// Steps each node could train past its commit (`--overlap-steps`).
    pub overlap_steps: u32,
    pub wall_seconds: f64,
    pub rounds: Vec<barnraise_coordinator::summary::RoundSummary>,
    /// Bytes of updates the nodes uploaded in the run.
    pub update_bytes_sent: u64,
    /// What plain data-parallel training would have sent for the same steps:
    /// a ring all-reduce of fp32 gradients every inner step, 2(k−1)/k · 4P bytes per worker.
    pub data_parallel_bytes: u64,
    /// `data_parallel_bytes / update_bytes_sent`.
    pub communication_reduction: f64,
    /// fp32 pseudo-gradient size over the mean update size.
    pub compression_ratio: f64,
    /// The codec's measured held-out loss cost against fp32 at `up`'s default
    /// scale (a fraction), and whether that is within [`PARITY`].
    pub codec_loss_cost: Option<f64>,
    pub codec_at_parity: Option<bool>,
    pub nodes_in_agreement: usize,
    /// The nodes' mean utilization (`NodeLine::utilization`).
    pub mean_utilization: Option<f64>,
    /// Tokens the nodes committed ÷ seconds from the earliest first plan to
    /// the latest manifest applied: the run's throughput. On a machine whose
    /// cores the nodes share, training seconds stretch when other work
    /// competes, so utilization can rise while this does not; compare both.
    pub tokens_per_second: Option<f64>,
    pub node_summaries: Vec<NodeLine>,
    /// Who moved the bytes: the coordinator's egress and ingress by kind,
    /// what nodes served each other, and the accepted updates' total size.
    pub network: NetworkTotals,
    pub summary: RunSummary,
    /// Text from the untrained and the trained model, same prompt and seed.
    pub samples: Option<Samples>,
    /// The simulated links (`--link-mbps`, `--link-latency-ms`), if any.
    pub link: Option<LinkReport>,
}

/// The userspace links the nodes ran behind, and what went through each.
#[derive(Debug, Serialize)]
pub struct LinkReport {
    pub mbps: Option<f64>,
    pub latency_ms: u64,
    /// Per node, in node order.
    pub nodes: Vec<LinkCounts>,
}

/// One node's link counters ([`barnraise_node::network::shaper::LinkCounters`]).
#[derive(Debug, Serialize)]
pub struct LinkCounts {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rate_waits: u64,
    pub delayed_chunks: u64,
}

/// What the model learned, shown as text (`barnraise generate` on θ_0 and
/// on the last checkpoint).
#[derive(Debug, Serialize)]
pub struct Samples {
    pub prompt: String,
    pub temperature: f32,
    pub round: u64,
    pub untrained: String,
    pub trained: String,
}

const SAMPLE_PROMPT: &str = "The ";

/// Samples the run's first and last checkpoints in `coordinator_dir`; `None`
/// (with a log line) when either cannot be read.
fn samples(coordinator_dir: &std::path::Path) -> Option<Samples> {
    use barnraise_trainer::generate::{SampleConfig, cpu_model, generate};
    let cfg = SampleConfig {
        max_new_tokens: 72,
        ..SampleConfig::default()
    };
    // A run on a tokenized dataset keeps its tokenizer in the data dir.
    let tokenizer_path = coordinator_dir.join(barnraise_coordinator::record::TOKENIZER_FILE);
    let tokenizer = tokenizer_path
        .exists()
        .then(|| barnraise_trainer::data::manifest::TextTokenizer::load(&tokenizer_path));
    let text = |round: Option<u64>| -> anyhow::Result<(u64, String)> {
        let ckpt = super::export::checkpoint_in(coordinator_dir, round)?;
        let trainer = cpu_model(&ckpt.config, &ckpt.params)?;
        let round = ckpt.meta.round;
        match &tokenizer {
            None => {
                let prompt: Vec<u32> = SAMPLE_PROMPT.bytes().map(u32::from).collect();
                let out = generate(&trainer, &prompt, &cfg, &mut |_| true)?;
                let bytes: Vec<u8> = out.iter().map(|&t| t as u8).collect();
                Ok((round, String::from_utf8_lossy(&bytes).into_owned()))
            }
            Some(Err(e)) => anyhow::bail!("the run's tokenizer: {e}"),
            Some(Ok(t)) => {
                let prompt: Vec<u32> = t
                    .encode(SAMPLE_PROMPT, &tokenizer_path)?
                    .into_iter()
                    .map(u32::from)
                    .collect();
                let out = generate(&trainer, &prompt, &cfg, &mut |_| true)?;
                let text = t
                    .tokenizer
                    .decode(&out, false)
                    .map_err(|e| anyhow::anyhow!("decoding the sample: {e}"))?;
                Ok((round, text))
            }
        }
    };
    match (text(Some(0)), text(None)) {
        (Ok((_, untrained)), Ok((round, trained))) => Some(Samples {
            prompt: SAMPLE_PROMPT.into(),
            temperature: cfg.temperature,
            round,
            untrained,
            trained,
        }),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("no text sample: {e:#}");
            None
        }
    }
}

/// The sequence length `up` trains with: the one given, else 128 or the
/// model's context if shorter. One too long for the model is the
/// coordinator's clear error.
fn seq_len(args: &Args, model: &ModelConfig) -> u32 {
    args.seq_len
        .unwrap_or_else(|| 128.min(model.max_seq_len as u32))
}

/// `text` on one line: line breaks and other control characters shown as
/// escapes.
fn one_line(text: &str) -> String {
    text.chars().flat_map(char::escape_debug).collect()
}

#[derive(Debug, Serialize)]
pub struct NodeLine {
    pub index: u32,
    pub node: String,
    pub rounds_applied: u64,
    pub tokens: u64,
    pub final_params_hash: Option<String>,
    /// Blob bytes this node served to other nodes.
    pub served_to_peers_bytes: u64,
    /// Blob bytes it fetched, and how many of them came from the coordinator.
    pub downloaded_bytes: u64,
    pub from_coordinator_bytes: u64,
    /// Seconds its workers spent in inner steps.
    pub compute_seconds: f64,
    /// `compute_seconds` ÷ the wall clock from its first plan to the last
    /// manifest it applied: the share of the run it was training.
    pub utilization: Option<f64>,
    /// Where its rounds' wall clock went, in seconds.
    pub phases: PhaseSeconds,
    /// Accepted updates it began fetching before their manifest.
    pub updates_prefetched: u64,
}

/// A node's rounds by phase (`barnraise_node::daemon::RoundPhases`), in
/// seconds: training, and what the rest of the wall clock went to.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PhaseSeconds {
    /// Inner steps (`compute_seconds`).
    pub training: f64,
    /// From the plan to the commit, less the training: shards, encoding,
    /// storing, the commit's round trip.
    pub preparing_and_committing: f64,
    /// From the commit to the manifest: waiting for the other nodes and
    /// the coordinator's close.
    pub waiting_for_manifest: f64,
    /// From the manifest to the round applied: fetching the accepted
    /// updates and the outer step.
    pub applying: f64,
    /// From a round applied to the next plan.
    pub waiting_for_plan: f64,
}

impl PhaseSeconds {
    fn of(summary: &NodeSummary) -> PhaseSeconds {
        let p = &summary.phases;
        let s = |ms: u64| ms as f64 / 1e3;
        PhaseSeconds {
            training: s(summary.compute_ms),
            preparing_and_committing: s(p.plan_to_commit_ms.saturating_sub(summary.compute_ms)),
            waiting_for_manifest: s(p.commit_to_manifest_ms),
            applying: s(p.applying_ms),
            waiting_for_plan: s(p.waiting_for_plan_ms),
        }
    }

    fn mean(all: &[PhaseSeconds]) -> PhaseSeconds {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&PhaseSeconds) -> f64| all.iter().map(f).sum::<f64>() / n;
        PhaseSeconds {
            training: sum(|p| p.training),
            preparing_and_committing: sum(|p| p.preparing_and_committing),
            waiting_for_manifest: sum(|p| p.waiting_for_manifest),
            applying: sum(|p| p.applying),
            waiting_for_plan: sum(|p| p.waiting_for_plan),
        }
    }
}

/// The nodes' committed tokens ÷ seconds from the earliest first plan to
/// the latest manifest applied (`UpReport::tokens_per_second`); `None`
/// before any node both started and applied a round.
fn run_throughput<'a>(nodes: impl Iterator<Item = &'a NodeSummary>) -> Option<f64> {
    let (mut tokens, mut first, mut last) = (0u64, u64::MAX, 0u64);
    for node in nodes {
        tokens = tokens.saturating_add(node.tokens_trained);
        if let (Some(start), Some(end)) = (node.first_plan_ms, node.last_applied_ms) {
            first = first.min(start);
            last = last.max(end);
        }
    }
    let span = last.checked_sub(first).filter(|&ms| ms > 0)?;
    Some(tokens as f64 / (span as f64 / 1e3))
}

impl UpReport {
    fn new(
        args: &Args,
        model: &ModelConfig,
        summary: RunSummary,
        nodes: Vec<(u32, NodeSummary)>,
        wall: Duration,
        data_dir: PathBuf,
    ) -> UpReport {
        let params = model.params_count();
        let update_bytes_sent: u64 = summary.rounds.iter().map(|r| r.bytes_received).sum();
        let updates: u64 = summary
            .rounds
            .iter()
            .map(|r| r.accepted + r.rejected.len() as u64)
            .sum();
        // Data-parallel at equal tokens: the steps of one replica if the
        // nodes' tokens had been trained in lock step (pacing gives nodes
        // unequal steps; without it this is inner_steps × rounds).
        let tokens: u64 = nodes.iter().map(|(_, s)| s.tokens_trained).sum();
        let step_tokens = u64::from(args.batch_size) * u64::from(seq_len(args, model));
        let steps = match tokens / (step_tokens * u64::from(args.nodes.max(1))).max(1) {
            0 => args.inner_steps as u64 * summary.rounds.len() as u64,
            steps => steps,
        };
        let data_parallel_bytes = barnraise_coordinator::summary::data_parallel_bytes(
            params as u64,
            args.nodes as u64,
            steps,
        );
        let mean_update = if updates > 0 {
            update_bytes_sent as f64 / updates as f64
        } else {
            0.0
        };
        let final_hash = summary.rounds.last().map(|r| r.next_params_hash.clone());
        let network = NetworkTotals {
            peer_served_bytes: nodes.iter().map(|(_, s)| s.bytes_served_to_peers).sum(),
            ..summary.network.clone()
        };
        let tokens_per_second = run_throughput(nodes.iter().map(|(_, s)| s));
        let node_summaries: Vec<NodeLine> = nodes
            .into_iter()
            .map(|(index, s)| NodeLine {
                index,
                node: s.node.map(|n| n.to_string()).unwrap_or_default(),
                rounds_applied: s.rounds_completed,
                tokens: s.tokens_trained,
                final_params_hash: s.final_params_hash.map(|h| h.to_hex()),
                served_to_peers_bytes: s.bytes_served_to_peers,
                downloaded_bytes: s.bytes_downloaded,
                from_coordinator_bytes: s.bytes_from_coordinator,
                compute_seconds: s.compute_ms as f64 / 1e3,
                utilization: s.utilization(),
                phases: PhaseSeconds::of(&s),
                updates_prefetched: s.updates_prefetched,
            })
            .collect();
        let utilizations: Vec<f64> = node_summaries
            .iter()
            .filter_map(|n| n.utilization)
            .collect();
        let mean_utilization = (!utilizations.is_empty())
            .then(|| utilizations.iter().sum::<f64>() / utilizations.len() as f64);
        let nodes_in_agreement = node_summaries
            .iter()
            .filter(|n| n.final_params_hash.is_some() && n.final_params_hash == final_hash)
            .count();
        let codec_loss_cost = measured_loss_cost(&args.codec, &args.aggregation);
        UpReport {
            data_dir,
            model: args.model.clone(),
            params,
            codec: args.codec.clone(),
            aggregation: args.aggregation.clone(),
            nodes: args.nodes,
            inner_steps: args.inner_steps,
            overlap_steps: args.overlap_steps,
            wall_seconds: wall.as_secs_f64(),
            update_bytes_sent,
            data_parallel_bytes,
            communication_reduction: if update_bytes_sent > 0 {
                data_parallel_bytes as f64 / update_bytes_sent as f64
            } else {
                0.0
            },
            compression_ratio: if mean_update > 0.0 {
                4.0 * params as f64 / mean_update
            } else {
                0.0
            },
            codec_loss_cost,
            codec_at_parity: codec_loss_cost.map(|c| c <= PARITY),
            nodes_in_agreement,
            mean_utilization,
            tokens_per_second,
            node_summaries,
            network,
            rounds: summary.rounds.clone(),
            summary,
            samples: None,
            link: None,
        }
    }
}

impl std::fmt::Display for UpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
        writeln!(f)?;
        writeln!(
            f,
            "run finished in {:.1} s — {} nodes, model `{}` ({:.2}M params), codec {}",
            self.wall_seconds,
            self.nodes,
            self.model,
            self.params as f64 / 1e6,
            self.codec
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "round  accepted  rejected  missing  train loss  held-out loss  update bytes"
        )?;
        for r in &self.rounds {
            writeln!(
                f,
                "{:>5}  {:>8}  {:>8}  {:>7}  {:>10}  {:>13}  {:>12}",
                r.round,
                r.accepted,
                r.rejected.len(),
                r.missing,
                opt(r.mean_loss),
                opt(r.eval_loss),
                human_bytes(r.bytes_received)
            )?;
            for (node, reason) in &r.rejected {
                writeln!(
                    f,
                    "         rejected {} ({reason})",
                    &node[..node.len().min(12)]
                )?;
            }
        }
        writeln!(f)?;
        writeln!(
            f,
            "bytes moved: {} of updates; plain data-parallel would have moved {} ({:.0}x less); updates are {:.0}x smaller than fp32",
            human_bytes(self.update_bytes_sent),
            human_bytes(self.data_parallel_bytes),
            self.communication_reduction,
            self.compression_ratio
        )?;
        let setting = setting_name(&self.codec, &self.aggregation);
        match self.codec_loss_cost {
            Some(cost) => writeln!(
                f,
                "what the codec costs: at up's default scale, {setting} ended {:+.1}% from fp32 in held-out loss \
                 (mean of repeated runs; docs/training.md){}",
                cost * 100.0,
                if cost <= PARITY {
                    ": at parity".to_string()
                } else {
                    let ours = canonical(&self.codec, &self.aggregation).unwrap_or_default();
                    let others: Vec<String> = MEASURED_AT_UP_SCALE
                        .iter()
                        .filter(|m| (m.codec, m.aggregation) != (ours.0.as_str(), ours.1.as_str()))
                        .filter_map(|m| {
                            measured_loss_cost(m.codec, m.aggregation).map(|l| {
                                format!(
                                    "{} {:+.1}% at {:.0}x",
                                    setting_name(m.codec, m.aggregation),
                                    l * 100.0,
                                    m.reduction
                                )
                            })
                        })
                        .collect();
                    format!(
                        ": NOT at parity, so the traffic ratio above is bought with loss (measured: {})",
                        others.join(", ")
                    )
                }
            )?,
            None => writeln!(
                f,
                "what the codec costs: {setting} has not been measured against fp32 at up's scale"
            )?,
        }
        let n = &self.network;
        writeln!(
            f,
            "network: the coordinator sent {} ({} shards, {} checkpoints, {} updates, {} messages) \
             and received {}; nodes served each other {}; accepted updates total {}",
            human_bytes(n.coordinator_egress_bytes),
            human_bytes(n.coordinator_shard_bytes),
            human_bytes(n.coordinator_state_bytes),
            human_bytes(n.coordinator_update_bytes),
            human_bytes(n.coordinator_message_bytes),
            human_bytes(n.coordinator_ingress_bytes),
            human_bytes(n.peer_served_bytes),
            human_bytes(n.update_bytes),
        )?;
        writeln!(
            f,
            "agreement: {}/{} nodes hold the manifest's final params hash",
            self.nodes_in_agreement,
            self.node_summaries.len()
        )?;
        if let Some(mean) = self.mean_utilization {
            let each: Vec<String> = self
                .node_summaries
                .iter()
                .filter_map(|n| n.utilization.map(|u| format!("{:.0}%", u * 100.0)))
                .collect();
            writeln!(
                f,
                "utilization: the nodes trained {:.0}% of the time from their first plan to \
                 their last manifest (each: {})",
                mean * 100.0,
                each.join(", ")
            )?;
            if let Some(rate) = self.tokens_per_second {
                writeln!(
                    f,
                    "  throughput: {rate:.0} tokens/s committed from the first plan to the last \
                     manifest"
                )?;
            }
            let phases: Vec<PhaseSeconds> = self.node_summaries.iter().map(|n| n.phases).collect();
            let p = PhaseSeconds::mean(&phases);
            writeln!(
                f,
                "  a node's rounds, mean seconds: training {:.1}, preparing and committing {:.1}, \
                 waiting for the manifest {:.1}, applying {:.1}, waiting for the next plan {:.1}",
                p.training,
                p.preparing_and_committing,
                p.waiting_for_manifest,
                p.applying,
                p.waiting_for_plan
            )?;
        }
        if let Some(link) = &self.link {
            let shape = LinkShape {
                mbps: link.mbps,
                latency_ms: link.latency_ms,
            };
            let each: Vec<String> = link
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "{} out, {} in",
                        human_bytes(n.bytes_sent),
                        human_bytes(n.bytes_received)
                    )
                })
                .collect();
            writeln!(
                f,
                "links: every node behind {shape}, shaped in userspace (each: {})",
                each.join("; ")
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<14} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>13}",
            "node",
            "tokens",
            "accepted",
            "rejected",
            "missing",
            "bytes",
            "compute s",
            "credit GFLOP"
        )?;
        for c in &self.summary.contributors {
            writeln!(
                f,
                "{:<14} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10.1} {:>13.1}",
                &c.node[..c.node.len().min(12)],
                c.tokens,
                c.accepted,
                c.rejected,
                c.missing,
                human_bytes(c.bytes),
                c.compute_ms as f64 / 1000.0,
                c.credit / 1e9
            )?;
        }
        if let Some(s) = &self.samples {
            writeln!(f)?;
            writeln!(
                f,
                "what the model learned (prompt {:?}, temperature {}, same seed):",
                s.prompt, s.temperature
            )?;
            writeln!(
                f,
                "  untrained       {}",
                one_line(&format!("{}{}", s.prompt, s.untrained))
            )?;
            writeln!(
                f,
                "  after round {:<3} {}",
                s.round,
                one_line(&format!("{}{}", s.prompt, s.trained))
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "ledger and blobs kept in {}; `barnraise stats --data-dir {}` shows the table again",
            self.data_dir.display(),
            self.data_dir.join("coordinator").display()
        )
    }
}

#[cfg(test)]
mod tests {
    /// `--seed` gives each node its own key, the same one every run, and
    /// refuses to overwrite another key.
    #[test]
    fn seeded_node_keys_repeat_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let id = |path: &std::path::Path| {
            barnraise_protocol::SigningKey::load(&path.join("node.key"))
                .unwrap()
                .node_id()
        };
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        super::seeded_node_key(&a, 7, 0).unwrap();
        super::seeded_node_key(&b, 7, 0).unwrap();
        super::seeded_node_key(&c, 7, 1).unwrap();
        assert_eq!(id(&a), id(&b));
        assert_ne!(id(&a), id(&c));
        super::seeded_node_key(&a, 7, 0).expect("the same key again is fine");
        let error = super::seeded_node_key(&a, 8, 0).expect_err("another seed's key");
        assert!(error.to_string().contains("another key"), "{error}");
    }

    #[test]
    fn throughput_spans_the_earliest_plan_to_the_latest_manifest() {
        use barnraise_node::NodeSummary;
        let node = |tokens, first, last| NodeSummary {
            tokens_trained: tokens,
            first_plan_ms: first,
            last_applied_ms: last,
            ..NodeSummary::default()
        };
        // 3,000 tokens over 2 s to 12 s; a node that never applied a
        // round still counts its tokens but not its clock.
        let nodes = [
            node(1_000, Some(2_000), Some(10_000)),
            node(1_500, Some(4_000), Some(12_000)),
            node(500, Some(1_000), None),
        ];
        assert_eq!(super::run_throughput(nodes.iter()), Some(300.0));
        assert_eq!(super::run_throughput(nodes[2..].iter()), None);
        assert_eq!(super::run_throughput([].iter()), None);
    }

    #[test]
    fn codec_costs_come_from_the_measured_table() {
        use super::{
            DEFAULT_AGGREGATION, DEFAULT_CODEC, MEASURED_AT_UP_SCALE, PARITY, measured_loss_cost,
        };
        let topk = measured_loss_cost("topk", "mean").unwrap_or(f64::NAN);
        assert!((topk - (2.1927 / 1.7979 - 1.0)).abs() < 1e-12, "{topk}");
        assert!(topk > PARITY, "the old default top-k is not at parity");
        assert_eq!(measured_loss_cost("fp32", "mean"), Some(0.0));
        assert_eq!(
            measured_loss_cost("int8", "mean"),
            measured_loss_cost("int8:256", "mean"),
            "codec names are compared in canonical form"
        );
        let default = measured_loss_cost(DEFAULT_CODEC, DEFAULT_AGGREGATION).unwrap_or(f64::NAN);
        assert!(default <= PARITY, "the default is at parity: {default}");
        // No setting measured at parity sends less than the default.
        let canonical = super::canonical(DEFAULT_CODEC, DEFAULT_AGGREGATION).unwrap_or_default();
        let default_reduction = MEASURED_AT_UP_SCALE
            .iter()
            .find(|m| (m.codec, m.aggregation) == (canonical.0.as_str(), canonical.1.as_str()))
            .map(|m| m.reduction)
            .unwrap_or(f64::NAN);
        for m in MEASURED_AT_UP_SCALE {
            if measured_loss_cost(m.codec, m.aggregation).is_some_and(|c| c <= PARITY) {
                assert!(
                    m.reduction <= default_reduction,
                    "{} with {} beats the default",
                    m.codec,
                    m.aggregation
                );
            }
        }
        // A schedule is looked up by its canonical name too.
        assert!(
            measured_loss_cost("topk:4096:64:2,warm=4096:2,decay=0.95", "mean")
                .is_some_and(|c| c > PARITY)
        );
        assert_eq!(measured_loss_cost("topk:4096:1024:4", "mean"), None);
        assert_eq!(measured_loss_cost("nonsense", "mean"), None);
        assert_eq!(measured_loss_cost("fp32", "median"), None);
        assert_eq!(
            measured_loss_cost("topk:4096:64:2,decay=0.95,warm=4096:2", "trimmed-mean:0.2"),
            None,
            "a codec measured under one rule says nothing about another"
        );
    }
}
