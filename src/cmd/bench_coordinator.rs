//! `barnraise bench coordinator`: one real coordinator (its own process: its
//! ledger, verification, HTTP server) against N simulated nodes in this
//! process, each its own libp2p swarm and identity speaking the real
//! protocol: signed joins, plan polls, signed commits, serving its update on
//! the blob protocol, manifest requests. Their updates are synthetic but
//! valid: one real pseudo-gradient per round on `tiny`, plus independent
//! noise per node, so every check runs on work that passes it, and the
//! coordinator's own costs dominate. docs/scaling.md reads its numbers.

use anyhow::{Context, bail};
use barnraise_coordinator::config::{CoordinatorConfig, DatasetSource, Quorum, VerifyConfig};
use barnraise_mesh::codec::{BlobCodec, CoordinatorCodec};
use barnraise_node::network::{BlobSource, ReadError};
use barnraise_protocol::aggregate::apply_round;
use barnraise_protocol::codec::Encoder;
use barnraise_protocol::limits::PROTOCOL_VERSION;
use barnraise_protocol::limits::{BLOB_PROTOCOL, COORDINATOR_PROTOCOL};
use barnraise_protocol::messages::now_ms;
use barnraise_protocol::messages::{
    Commit, CoordinatorRequest, CoordinatorResponse, Join, Manifest, RoundPlan, WorkerInfo,
};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::workers::{WorkerShare, share_sketch};
use barnraise_protocol::{Hash, Signed, SigningKey};
use barnraise_trainer::Trainer;
use barnraise_trainer::train::InnerConfig;
use clap::Args as ClapArgs;
use futures::StreamExt;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Simulated node counts, one run each, e.g. `--nodes 10,100,1000`.
    #[arg(long, value_delimiter = ',', default_value = "10,100",
          value_parser = clap::value_parser!(u32).range(3..=10_000))]
    pub nodes: Vec<u32>,
    /// Rounds per run (the first also carries every join).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub rounds: u64,
    /// HTTP clients requesting dashboard pages and API views while rounds close.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub http_clients: u32,
    /// Fraction of the nodes that join and then vanish: their connection
    /// closes and they never poll or commit (the last ones).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub vanish: f64,
    /// Fraction of the nodes that commit but never answer the coordinator's
    /// requests for their update (the ones before the vanishing ones).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub stall: f64,
    /// The coordinator's round deadline: with vanishing or stalling nodes,
    /// rounds close at it.
    #[arg(long, default_value_t = 600.0)]
    pub deadline_secs: f64,
    /// The run's update codec [default: the coordinator's, int8].
    #[arg(long)]
    pub codec: Option<String>,
    /// The run's aggregation rule [default: the coordinator's, trimmed-mean:0.1].
    #[arg(long)]
    pub aggregation: Option<String>,
    /// Run the usefulness probe (as a coordinator does by default).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub probe: bool,
    /// Where each run's coordinator keeps its data [default: a temporary
    /// folder, removed afterwards].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..0.5).contains(&f) => Ok(f),
        _ => Err(format!("`{text}` is not a fraction in [0, 0.5)")),
    }
}

/// One N's figures.
#[derive(Debug, Serialize)]
pub struct RunFigures {
    pub nodes: u32,
    /// Nodes that joined and vanished, and nodes that stalled every fetch.
    pub vanished: u32,
    pub stalled: u32,
    pub rounds_closed: u64,
    pub accepted: Vec<usize>,
    pub rejected: Vec<usize>,
    pub missing: Vec<usize>,
    /// θ after every round, recomputed here from the manifest and the
    /// updates, hashed as the manifest says.
    pub params_agree: bool,
    /// The coordinator process's CPU seconds while nodes joined (before the
    /// first plan), then per round (plan to manifest).
    pub join_cpu_seconds: f64,
    pub cpu_seconds_per_round: Vec<f64>,
    /// Mean over the rounds after the first, or the first if it is alone.
    pub steady_cpu_seconds_per_round: f64,
    /// Busy seconds per stage, summed over all rounds (docs/scaling.md).
    pub stage_seconds: BTreeMap<String, f64>,
    /// CPU seconds in no stage: the swarm, polls, HTTP, timers.
    pub other_cpu_seconds: f64,
    pub round_wall_seconds: Vec<f64>,
    pub peak_rss_bytes: u64,
    pub plan_bytes: usize,
    pub manifest_bytes: usize,
    pub copy_comparisons: u64,
    pub http: HttpFigures,
}

#[derive(Debug, Default, Serialize)]
pub struct HttpFigures {
    pub requests: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 by path.
    pub p99_ms_by_path: BTreeMap<String, f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    rounds: u64,
    runs: Vec<RunFigures>,
    /// Least-squares slope of log(steady CPU per round) on log(N).
    cpu_exponent: Option<f64>,
    /// The same for peak RSS.
    rss_exponent: Option<f64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut runs = Vec::new();
    for &n in &args.nodes {
        let temp;
        let dir = match &args.data_dir {
            Some(d) => d.join(format!("n{n}")),
            None => {
                temp = tempfile::tempdir().context("creating a temporary folder")?;
                temp.path().to_path_buf()
            }
        };
        if !args.json {
            eprintln!("bench coordinator: {n} nodes, {} rounds…", args.rounds);
        }
        let figures = runtime.block_on(run_one(&args, n, &dir))?;
        if !args.json {
            print_run(&figures);
        }
        runs.push(figures);
    }
    let points = |f: &dyn Fn(&RunFigures) -> f64| -> Vec<(f64, f64)> {
        runs.iter().map(|r| (f64::from(r.nodes), f(r))).collect()
    };
    let report = Report {
        model: "tiny".into(),
        rounds: args.rounds,
        cpu_exponent: fit_exponent(&points(&|r| r.steady_cpu_seconds_per_round)),
        rss_exponent: fit_exponent(&points(&|r| r.peak_rss_bytes as f64)),
        runs,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let show = |e: Option<f64>| e.map_or("-".into(), |e| format!("{e:.2}"));
        println!(
            "growth exponent against N: coordinator CPU per round {}, peak RSS {}",
            show(report.cpu_exponent),
            show(report.rss_exponent)
        );
    }
    Ok(())
}

fn print_run(r: &RunFigures) {
    println!(
        "N = {}: {} rounds closed, accepted {:?}, θ agrees: {}",
        r.nodes, r.rounds_closed, r.accepted, r.params_agree
    );
    if r.vanished + r.stalled > 0 {
        println!(
            "  {} nodes vanished after joining, {} stalled their uploads: rejected {:?}, missing {:?}",
            r.vanished, r.stalled, r.rejected, r.missing
        );
    }
    println!(
        "  coordinator CPU: joins {:.2} s, per round {} (steady {:.2} s)",
        r.join_cpu_seconds,
        r.cpu_seconds_per_round
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.steady_cpu_seconds_per_round
    );
    let stages: Vec<String> = r
        .stage_seconds
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    println!(
        "  stages (s, all rounds): {}; other {:.2}",
        stages.join(", "),
        r.other_cpu_seconds
    );
    println!(
        "  peak RSS {:.0} MB, plan {} B, manifest {} B, {} copy comparisons",
        r.peak_rss_bytes as f64 / 1e6,
        r.plan_bytes,
        r.manifest_bytes,
        r.copy_comparisons
    );
    println!(
        "  HTTP while closing: {} requests ({} failed), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.http.requests, r.http.errors, r.http.p50_ms, r.http.p99_ms, r.http.max_ms
    );
    let paths: Vec<String> = r
        .http
        .p99_ms_by_path
        .iter()
        .map(|(p, ms)| format!("{p} {ms:.0}"))
        .collect();
    println!("  HTTP p99 by path (ms): {}", paths.join(", "));
}

/// Least-squares slope of log y on log x; `None` under two points or with
/// a non-positive value.
pub fn fit_exponent(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 || points.iter().any(|&(x, y)| x <= 0.0 || y <= 0.0) {
        return None;
    }
    let logs: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.ln(), y.ln())).collect();
    let n = logs.len() as f64;
    let mx = logs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = logs.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = logs.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = logs.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// What a simulated node serves: its updates, in memory.
#[derive(Default)]
struct Blobs {
    held: Mutex<HashMap<Hash, Arc<Vec<u8>>>>,
    /// Never answer a request (`--stall`).
    stall: std::sync::atomic::AtomicBool,
}

impl Blobs {
    fn put(&self, bytes: Arc<Vec<u8>>) -> Hash {
        let hash = Hash::of(&bytes);
        if let Ok(mut map) = self.held.lock() {
            map.insert(hash, bytes);
        }
        hash
    }
}

impl BlobSource for Blobs {
    fn size(&self, hash: &Hash) -> Option<u64> {
        let map = self.held.lock().ok()?;
        map.get(hash).map(|b| b.len() as u64)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        let map = self
            .held
            .lock()
            .map_err(|_| ReadError::Failed("lock".into()))?;
        let blob = map.get(hash).ok_or(ReadError::NotFound)?;
        let start = usize::try_from(offset).map_err(|_| ReadError::OutOfRange)?;
        let end = start
            .checked_add(len as usize)
            .ok_or(ReadError::OutOfRange)?;
        blob.get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or(ReadError::OutOfRange)
    }
}

/// One simulated node: an identity, a swarm of its own (TCP, noise,
/// yamux, the coordinator and blob protocols; nothing else), and the
/// updates it serves.
struct SimNode {
    key: SigningKey,
    /// Stops its swarm (the node vanishes).
    stop: CancellationToken,
    requests: mpsc::Sender<(
        CoordinatorRequest,
        oneshot::Sender<anyhow::Result<CoordinatorResponse>>,
    )>,
    blobs: Arc<Blobs>,
    listen: Vec<String>,
}

#[derive(NetworkBehaviour)]
struct SimBehaviour {
    coordinator: request_response::Behaviour<CoordinatorCodec>,
    blob: request_response::Behaviour<BlobCodec>,
}

/// Requests to the coordinator in flight at once per node.
const SIM_QUEUE: usize = 8;

impl SimNode {
    async fn start(
        key: SigningKey,
        coordinator: PeerId,
        target: &Multiaddr,
        shutdown: CancellationToken,
    ) -> anyhow::Result<SimNode> {
        let request_config =
            request_response::Config::default().with_request_timeout(Duration::from_secs(120));
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key.to_libp2p()?)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default().nodelay(true),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )?
            .with_behaviour(|_| SimBehaviour {
                coordinator: request_response::Behaviour::with_codec(
                    CoordinatorCodec::default(),
                    [(
                        StreamProtocol::new(COORDINATOR_PROTOCOL),
                        ProtocolSupport::Outbound,
                    )],
                    request_config.clone(),
                ),
                blob: request_response::Behaviour::with_codec(
                    BlobCodec::default(),
                    [(StreamProtocol::new(BLOB_PROTOCOL), ProtocolSupport::Inbound)],
                    request_config.clone(),
                ),
            })?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse()?)?;
        let listen = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break vec![address.to_string()];
            }
        };
        swarm.dial(target.clone())?;
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == coordinator => {
                    break;
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    bail!("dialling the coordinator: {error}")
                }
                _ => {}
            }
        }
        let blobs = Arc::new(Blobs::default());
        let (requests, mut incoming) = mpsc::channel::<(
            CoordinatorRequest,
            oneshot::Sender<anyhow::Result<CoordinatorResponse>>,
        )>(SIM_QUEUE);
        let source = blobs.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut stalled = Vec::new();
            let mut pending: HashMap<
                request_response::OutboundRequestId,
                oneshot::Sender<anyhow::Result<CoordinatorResponse>>,
            > = HashMap::new();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    Some((request, reply)) = incoming.recv() => {
                        let id = swarm.behaviour_mut().coordinator.send_request(&coordinator, request);
                        pending.insert(id, reply);
                    }
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::Behaviour(SimBehaviourEvent::Coordinator(
                            request_response::Event::Message {
                                message: request_response::Message::Response { request_id, response },
                                ..
                            },
                        )) => {
                            if let Some(reply) = pending.remove(&request_id) {
                                let _ = reply.send(Ok(response));
                            }
                        }
                        SwarmEvent::Behaviour(SimBehaviourEvent::Coordinator(
                            request_response::Event::OutboundFailure { request_id, error, .. },
                        )) => {
                            if let Some(reply) = pending.remove(&request_id) {
                                let _ = reply.send(Err(anyhow::anyhow!("request failed: {error}")));
                            }
                        }
                        SwarmEvent::Behaviour(SimBehaviourEvent::Blob(
                            request_response::Event::Message {
                                message: request_response::Message::Request { request, channel, .. },
                                ..
                            },
                        )) => {
                            if source.stall.load(std::sync::atomic::Ordering::Relaxed) {
                                // Stalling: the request is never answered.
                                stalled.push(channel);
                                continue;
                            }
                            let response = barnraise_node::network::serve_blob(source.as_ref(), &request);
                            let _ = swarm.behaviour_mut().blob.send_response(channel, response);
                        }
                        _ => {}
                    },
                }
            }
        });
        Ok(SimNode {
            key,
            stop,
            requests,
            blobs,
            listen,
        })
    }

    async fn ask(&self, request: CoordinatorRequest) -> anyhow::Result<CoordinatorResponse> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((request, reply))
            .await
            .map_err(|_| anyhow::anyhow!("the node's swarm stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the node's swarm stopped"))?
    }
}

/// The coordinator child process; killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The coordinator's config for a run of `n` nodes: `tiny`, a shard per
/// node, two inner steps, quorum of everyone, spot checks off (they replay
/// real training, which synthetic updates are not; their cost is capped
/// per round by `spot_check_max`, whatever N is).
fn coordinator_config(
    args: &Args,
    n: u32,
    dir: &Path,
    key: &Path,
) -> anyhow::Result<CoordinatorConfig> {
    let defaults = CoordinatorConfig::default();
    Ok(CoordinatorConfig {
        codec: args.codec.clone().unwrap_or(defaults.codec),
        aggregation: args.aggregation.clone().unwrap_or(defaults.aggregation),
        run_id: "bench-coordinator".into(),
        model: "tiny".into(),
        dataset: DatasetSource::Builtin {
            shards: n as usize + 8,
            shard_tokens: 8 * 1024,
            seed: 0,
        },
        inner_steps: 2,
        batch_size: 4,
        seq_len: 64,
        quorum: Quorum::Fraction(1.0),
        round_deadline_secs: args.deadline_secs,
        min_nodes: n as usize,
        shards_per_node: 1,
        total_rounds: args.rounds,
        verify: VerifyConfig {
            probe: args.probe,
            spot_check_fraction: 0.0,
            ..VerifyConfig::default()
        },
        listen: vec![format!("/ip4/127.0.0.1/tcp/{}", free_port()?)],
        http: format!("127.0.0.1:{}", free_port()?).parse()?,
        data_dir: dir.join("coordinator"),
        key: Some(key.to_path_buf()),
        linger_secs: 30.0,
        ..CoordinatorConfig::default()
    })
}

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<f64>()?)
    };
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the name.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn clock_ticks() -> f64 {
    100.0
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The stage counters in the coordinator's `/metrics`.
async fn stages(http: &str) -> anyhow::Result<(BTreeMap<String, f64>, u64)> {
    let text = barnraise_coordinator::stats::fetch_bytes(http, "/metrics").await?;
    let text = String::from_utf8_lossy(&text);
    let mut out = BTreeMap::new();
    let mut comparisons = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("barnraise_stage_seconds_total{stage=\"")
            && let Some((name, value)) = rest.split_once("\"} ")
        {
            out.insert(name.to_string(), value.trim().parse::<f64>().unwrap_or(0.0));
        } else if let Some(v) = line.strip_prefix("barnraise_copy_comparisons_total ") {
            comparisons = v.trim().parse().unwrap_or(0);
        }
    }
    Ok((out, comparisons))
}

async fn run_one(args: &Args, n: u32, dir: &Path) -> anyhow::Result<RunFigures> {
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join("coordinator.key");
    let coordinator_key = SigningKey::generate()?;
    if !key_path.exists() {
        coordinator_key.save_new(&key_path)?;
    }
    let coordinator_key = SigningKey::load(&key_path)?;
    let config = coordinator_config(args, n, dir, &key_path)?;
    let config_path = dir.join("coordinator.toml");
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    let http = format!("http://{}", config.http);
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let child = Child(
        std::process::Command::new(std::env::current_exe()?)
            .args(["--log", "warn", "coordinator", "--config"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the coordinator")?,
    );
    let pid = child.0.id();
    let started = Instant::now();
    while barnraise_coordinator::stats::fetch_bytes(&http, "/api/v1/run")
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the coordinator did not answer in 120 s (log: {})",
                dir.join("coordinator.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target: Multiaddr = format!(
        "{}/p2p/{}",
        config.listen[0],
        coordinator_key.public().to_peer_id()?
    )
    .parse()?;
    let shutdown = CancellationToken::new();
    let cpu_at_start = cpu_seconds(pid)?;

    // Every node joins, a few at a time.
    let coordinator = coordinator_key.public().to_peer_id()?;
    let nodes = start_nodes(n, coordinator, &target, &shutdown).await?;
    let welcome = join_all(&nodes).await?;
    // The last nodes vanish, the ones before them stall their uploads.
    let vanished = (f64::from(n) * args.vanish).round() as u32;
    let stalled = (f64::from(n) * args.stall).round() as u32;
    let active = (n - vanished) as usize;
    for node in &nodes[active..] {
        node.stop.cancel();
    }
    for node in &nodes[active - stalled as usize..active] {
        node.blobs
            .stall
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let run = welcome.config.clone();
    let (model, schedule, rule) = barnraise_node::daemon::parse_run_config(&run)?;
    let mut theta = model.init_flat(0);
    let mut optimizer = OuterOptimizer::new(
        OuterConfig {
            lr: run.outer_lr,
            momentum: run.outer_momentum,
            ..OuterConfig::default()
        },
        theta.len(),
    );
    let mut params_agree = Hash::of_f32s(&theta) == welcome.params_hash;
    let corpus: Vec<u16> = barnraise_trainer::data::corpus::generate(7, 64 * 1024)
        .bytes()
        .map(u16::from)
        .collect();
    let mut trainer = Trainer::new(
        &model,
        barnraise_trainer::device::select(barnraise_trainer::device::DeviceSpec::Cpu)?,
        0,
    )?;

    let mut figures = RunFigures {
        nodes: n,
        vanished,
        stalled,
        rounds_closed: 0,
        accepted: vec![],
        rejected: vec![],
        missing: vec![],
        params_agree: false,
        join_cpu_seconds: 0.0,
        cpu_seconds_per_round: vec![],
        steady_cpu_seconds_per_round: 0.0,
        stage_seconds: BTreeMap::new(),
        other_cpu_seconds: 0.0,
        round_wall_seconds: vec![],
        peak_rss_bytes: 0,
        plan_bytes: 0,
        manifest_bytes: 0,
        copy_comparisons: 0,
        http: HttpFigures::default(),
    };
    let mut latencies = Vec::new();
    let mut http_errors = 0;
    let mut cpu_mark = None;
    for round in 0..args.rounds {
        let plan = wait_for_plan(&nodes[0], round).await?;
        let round_started = Instant::now();
        let cpu_now = cpu_seconds(pid)?;
        if round == 0 {
            figures.join_cpu_seconds = cpu_now - cpu_at_start;
        }
        cpu_mark.get_or_insert(cpu_now);
        let plan_body = plan.verify(Some(&coordinator_key.public()))?;
        figures.plan_bytes = figures.plan_bytes.max(plan.to_bytes()?.len());

        // One real pseudo-gradient from θ_r, and each node's noisy copy of it.
        trainer.set_flat_params(&theta)?;
        trainer.reset_optimizer()?;
        let inner = InnerConfig {
            steps: run.inner_steps as usize,
            batch_size: run.batch_size as usize,
            seq_len: run.seq_len as usize,
            seed: round,
            ..InnerConfig::default()
        };
        let report = trainer.train_inner(&corpus, &inner)?;
        let local = trainer.flat_params()?;
        let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();
        let codec = schedule.codec_at(round);
        let commits = tokio::task::spawn_blocking({
            let nodes: Vec<(SigningKey, Arc<Blobs>)> = nodes
                .iter()
                .map(|s| (s.key.clone(), s.blobs.clone()))
                .collect();
            let run_id = run.run_id.clone();
            let base = plan_body.params_hash;
            // Each node claims the tokens of the steps its plan gave it (the
            // coordinator paces nodes by their arrival times).
            let step_tokens = u64::from(run.batch_size) * u64::from(run.seq_len);
            let steps: std::collections::HashMap<barnraise_protocol::NodeId, u64> = plan_body
                .assignments
                .iter()
                .map(|a| (a.node, u64::from(a.inner_steps)))
                .collect();
            let full = report.tokens;
            let losses = report.losses.clone();
            move || -> anyhow::Result<Vec<Signed<Commit>>> {
                let mut payloads = Vec::new();
                for (i, (key, blobs)) in nodes.iter().enumerate() {
                    let tokens = steps
                        .get(&key.node_id())
                        .map_or(full, |steps| steps * step_tokens);
                    let noisy = with_noise(&delta, (round << 32) | i as u64);
                    let payload = Encoder::new(codec, noisy.len())?.encode(&noisy)?;
                    let update_bytes = payload.len() as u64;
                    let update_hash = blobs.put(Arc::new(payload));
                    let commit = Commit {
                        run_id: run_id.clone(),
                        round,
                        base_params_hash: base,
                        update_hash,
                        update_bytes,
                        tokens,
                        losses: losses.clone(),
                        compute_ms: 1,
                        workers: 1,
                        shares: vec![WorkerShare {
                            index: 0,
                            tokens,
                            delta_hash: Hash::of_f32s(&noisy),
                            delta_sketch: share_sketch(&noisy),
                            state_hash: Hash::of(&update_hash.0),
                            carried: 0,
                            held_back: 0,
                        }],
                    };
                    payloads.push(Signed::sign(key, &commit)?);
                }
                Ok(payloads)
            }
        })
        .await??;

        // Every node asks for the plan, as a polling node does, then commits.
        let stop_http = CancellationToken::new();
        let load = tokio::spawn(http_load(config.http, args.http_clients, stop_http.clone()));
        let planned: std::collections::HashSet<barnraise_protocol::NodeId> =
            plan_body.assignments.iter().map(|a| a.node).collect();
        for_each_node(&nodes[..active], |node, i| {
            let commit = commits[i].clone();
            let planned = planned.contains(&node.key.node_id());
            async move {
                let _ = node.ask(CoordinatorRequest::CurrentPlan).await?;
                if !planned {
                    return Ok(());
                }
                match node.ask(CoordinatorRequest::Commit(commit)).await? {
                    CoordinatorResponse::CommitAccepted { .. } => Ok(()),
                    other => bail!("commit refused: {other:?}"),
                }
            }
        })
        .await?;
        let (manifest, signed) = wait_for_manifest(&nodes[0], round).await?;
        stop_http.cancel();
        let (times, errors) = load.await?;
        latencies.extend(times);
        http_errors += errors;
        figures
            .round_wall_seconds
            .push(round_started.elapsed().as_secs_f64());
        let cpu_now = cpu_seconds(pid)?;
        if let Some(mark) = cpu_mark.replace(cpu_now) {
            figures.cpu_seconds_per_round.push(cpu_now - mark);
        }
        figures.manifest_bytes = figures.manifest_bytes.max(signed.to_bytes()?.len());
        figures.accepted.push(manifest.accepted.len());
        figures.rejected.push(manifest.rejected.len());
        figures.missing.push(manifest.missing.len());
        figures.rounds_closed += 1;

        // Every node reads the manifest, as a node that missed the gossip does.
        for_each_node(&nodes[..active], |node, _| async move {
            node.ask(CoordinatorRequest::Manifest { round }).await?;
            Ok(())
        })
        .await?;

        // θ_{r+1} as every node computes it.
        let by_hash: HashMap<Hash, Arc<Vec<u8>>> = nodes
            .iter()
            .flat_map(|s| {
                s.blobs
                    .held
                    .lock()
                    .map(|m| m.clone().into_iter().collect::<Vec<_>>())
                    .unwrap_or_default()
            })
            .collect();
        let inputs: Vec<(&[u8], f32)> = manifest
            .accepted
            .iter()
            .filter_map(|a| {
                by_hash
                    .get(&a.update_hash)
                    .map(|p| (p.as_slice(), a.weight))
            })
            .collect();
        apply_round(&mut theta, &mut optimizer, &rule, &inputs)?;
        params_agree &= Hash::of_f32s(&theta) == manifest.next_params_hash;
        for node in &nodes {
            if let Ok(mut map) = node.blobs.held.lock() {
                map.clear();
            }
        }
    }
    let (stage_seconds, comparisons) = stages(&http).await?;
    let total_cpu = cpu_seconds(pid)? - cpu_at_start;
    figures.peak_rss_bytes = peak_rss(pid);
    figures.other_cpu_seconds = total_cpu - stage_seconds.values().sum::<f64>();
    figures.stage_seconds = stage_seconds;
    figures.copy_comparisons = comparisons;
    figures.params_agree = params_agree;
    let steady = figures.cpu_seconds_per_round.get(1..).unwrap_or(&[]);
    let steady = if steady.is_empty() {
        &figures.cpu_seconds_per_round[..]
    } else {
        steady
    };
    figures.steady_cpu_seconds_per_round = steady.iter().sum::<f64>() / steady.len().max(1) as f64;
    figures.http = http_figures(latencies, http_errors);
    shutdown.cancel();
    drop(child);
    Ok(figures)
}

/// `delta` plus independent noise of half its RMS per coordinate: honest
/// nodes' updates agree in direction (cosine about 0.8) and are never copies.
fn with_noise(delta: &[f32], seed: u64) -> Vec<f32> {
    let rms = (delta.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / delta.len().max(1) as f64)
        .sqrt() as f32;
    let mut rng = barnraise_trainer::rng::Rng::new(seed);
    delta
        .iter()
        .map(|v| v + rng.normal() as f32 * rms * 0.5)
        .collect()
}

/// Runs `f` for every node, 64 at a time, and fails on the first error.
async fn for_each_node<'a, F, Fut>(nodes: &'a [SimNode], f: F) -> anyhow::Result<()>
where
    F: Fn(&'a SimNode, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + 'a,
{
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(nodes.iter().enumerate().map(|(i, node)| f(node, i)))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

async fn start_nodes(
    n: u32,
    coordinator: PeerId,
    target: &Multiaddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<SimNode>> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(0..n)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            seed[4..8].copy_from_slice(b"sim!");
            let shutdown = shutdown.child_token();
            async move {
                let key = SigningKey::from_seed(seed)?;
                SimNode::start(key, coordinator, target, shutdown)
                    .await
                    .with_context(|| format!("starting simulated node {i}"))
            }
        })
        .buffered(32)
        .try_collect()
        .await
}

async fn join_all(nodes: &[SimNode]) -> anyhow::Result<barnraise_protocol::messages::Welcome> {
    let welcomes: Mutex<Option<barnraise_protocol::messages::Welcome>> = Mutex::new(None);
    let welcomes = &welcomes;
    for_each_node(nodes, |node, _| async move {
        let join = Join {
            protocol_version: PROTOCOL_VERSION,
            agent: format!("barnraise-bench/{}", env!("CARGO_PKG_VERSION")),
            run_id: "bench-coordinator".into(),
            workers: vec![WorkerInfo {
                device: "cpu".into(),
                name: "simulated".into(),
                memory_bytes: 1 << 30,
            }],
            listen_addrs: node.listen.clone(),
            certificate: None,
            timestamp_ms: now_ms(),
        };
        let signed = Signed::sign(&node.key, &join)?;
        match node.ask(CoordinatorRequest::Join(signed)).await? {
            CoordinatorResponse::Welcome(w) => {
                let w = w.verify(None)?;
                if let Ok(mut slot) = welcomes.lock() {
                    slot.get_or_insert(w);
                }
                Ok(())
            }
            other => bail!("join refused: {other:?}"),
        }
    })
    .await?;
    welcomes
        .lock()
        .ok()
        .and_then(|mut w| w.take())
        .context("no welcome")
}

async fn wait_for_plan(node: &SimNode, round: u64) -> anyhow::Result<Signed<RoundPlan>> {
    let started = Instant::now();
    loop {
        if let CoordinatorResponse::Plan(Some(plan)) =
            node.ask(CoordinatorRequest::CurrentPlan).await?
            && plan.verify(None)?.round == round
        {
            return Ok(plan);
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("no plan for round {round} in 900 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_manifest(
    node: &SimNode,
    round: u64,
) -> anyhow::Result<(Manifest, Signed<Manifest>)> {
    let started = Instant::now();
    loop {
        if let CoordinatorResponse::Manifest(Some(signed)) =
            node.ask(CoordinatorRequest::Manifest { round }).await?
        {
            return Ok((signed.verify(None)?, signed));
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!("round {round} did not close in 900 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `clients` loops of dashboard and API requests until `stop`, each on its
/// own OS thread with a blocking socket, so that the latency measured is the
/// coordinator's and not this process's scheduler's; returns every latency
/// in milliseconds by path, and how many requests failed.
async fn http_load(
    http: std::net::SocketAddr,
    clients: u32,
    stop: CancellationToken,
) -> (Vec<(&'static str, f64)>, usize) {
    const PATHS: [&str; 5] = [
        "/",
        "/api/v1/overview",
        "/api/v1/nodes",
        "/api/v1/contributors",
        "/metrics",
    ];
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut times = Vec::new();
                let mut errors = 0;
                let mut k = c as usize;
                while !stop.is_cancelled() {
                    let path = PATHS[k % PATHS.len()];
                    k += 1;
                    let started = Instant::now();
                    match blocking_get(http, path) {
                        Ok(()) => times.push((path, started.elapsed().as_secs_f64() * 1e3)),
                        Err(_) => errors += 1,
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (times, errors)
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut times = Vec::new();
        let mut errors = 0;
        for t in threads {
            if let Ok((t, e)) = t.join() {
                times.extend(t);
                errors += e;
            }
        }
        (times, errors)
    })
    .await
    .unwrap_or_default()
}

/// One HTTP/1.0 GET, read to the end; an error unless the status is 200.
fn blocking_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    if body.starts_with(b"HTTP/1.1 200") || body.starts_with(b"HTTP/1.0 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not 200"))
    }
}

/// The `q` quantile of sorted values (0 when there are none).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn http_figures(times: Vec<(&'static str, f64)>, errors: usize) -> HttpFigures {
    let mut by_path: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (path, ms) in &times {
        by_path.entry((*path).to_string()).or_default().push(*ms);
    }
    let mut ms: Vec<f64> = times.into_iter().map(|(_, ms)| ms).collect();
    ms.sort_by(f64::total_cmp);
    HttpFigures {
        requests: ms.len(),
        errors,
        p50_ms: quantile(&ms, 0.5),
        p99_ms: quantile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
        p99_ms_by_path: by_path
            .into_iter()
            .map(|(path, mut v)| {
                v.sort_by(f64::total_cmp);
                (path, quantile(&v, 0.99))
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponents_fit_power_laws() {
        let linear: Vec<(f64, f64)> = [10.0, 100.0, 1000.0]
            .iter()
            .map(|&n| (n, 3.0 * n))
            .collect();
        assert!((fit_exponent(&linear).unwrap() - 1.0).abs() < 1e-9);
        let square: Vec<(f64, f64)> = [10.0, 100.0].iter().map(|&n| (n, n * n)).collect();
        assert!((fit_exponent(&square).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(fit_exponent(&[(10.0, 1.0)]), None);
        assert_eq!(fit_exponent(&[(10.0, 1.0), (100.0, 0.0)]), None);
    }

    #[test]
    fn percentiles_of_latencies() {
        let f = http_figures((1..=100).map(|v| ("/", f64::from(v))).collect(), 2);
        assert_eq!(f.requests, 100);
        assert_eq!(f.errors, 2);
        assert_eq!(f.p50_ms, 51.0);
        assert_eq!(f.p99_ms, 99.0);
        assert_eq!(f.max_ms, 100.0);
        assert_eq!(f.p99_ms_by_path.get("/"), Some(&99.0));
        assert_eq!(http_figures(vec![], 0).p99_ms, 0.0);
    }

    #[test]
    fn noisy_copies_agree_in_direction_and_are_not_copies() {
        let delta: Vec<f32> = (0..4096)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let (a, b) = (with_noise(&delta, 1), with_noise(&delta, 2));
        let cos = |x: &[f32], y: &[f32]| {
            let dot: f64 = x
                .iter()
                .zip(y)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let n = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
            dot / (n(x) * n(y))
        };
        let c = cos(&a, &b);
        assert!((0.7..0.9).contains(&c), "cosine {c}");
    }
}
