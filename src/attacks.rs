//! The attack suite behind `barnraise bench attacks` and the attack tests
//! (docs/security.md, "The attack suite"): one in-process network per
//! attack — a real coordinator with its ledger, verification and HTTP
//! server, and real nodes over loopback libp2p, some of them hostile
//! through [`barnraise_node::redteam`] — and a clean run for comparison.

use anyhow::Context;
use barnraise_coordinator::config::{CoordinatorConfig, DatasetSource, Quorum};
use barnraise_coordinator::summary::CoordinatorEvent;
use barnraise_coordinator::{CoordinatorHandle, Ledger};
use barnraise_node::Multiaddr;
use barnraise_node::network::{self, NetworkConfig};
use barnraise_node::redteam::{Attack, Board, Player};
use barnraise_node::{NodeConfig, NodeSummary};
use barnraise_protocol::Signed;
use barnraise_protocol::identity::SigningKey;
use barnraise_protocol::messages::{CoordinatorRequest, Join, WorkerInfo, now_ms};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The shape of every run of one suite; only the attack differs.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    pub nodes: usize,
    pub attackers: usize,
    pub rounds: u64,
    pub model: String,
    pub inner_steps: u32,
    pub batch_size: u32,
    pub seq_len: u32,
    pub codec: String,
    pub aggregation: String,
    /// Seeds the nodes' keys, and so their shard assignments.
    pub seed: u64,
    /// Each run gets a fresh folder under here.
    pub data_dir: PathBuf,
    /// Fresh identities of the join flood, and garbage joins each sends.
    pub flood_peers: usize,
    pub flood_joins: usize,
    /// Overrides the coordinator's verification settings (the default
    /// spot-check fraction, say) when set.
    pub verify: Option<barnraise_coordinator::VerifyConfig>,
}

impl SuiteConfig {
    /// The suite of issue #13: 10 nodes on `tiny`, 3 of them attackers.
    pub fn standard(data_dir: PathBuf) -> SuiteConfig {
        SuiteConfig {
            nodes: 10,
            attackers: 3,
            rounds: 4,
            model: "tiny".into(),
            inner_steps: 12,
            batch_size: 8,
            seq_len: 64,
            codec: "int8".into(),
            aggregation: "trimmed-mean:0.1".into(),
            seed: 1,
            data_dir,
            flood_peers: 20,
            flood_joins: 50,
            verify: None,
        }
    }
}

/// One run's outcome, as `bench attacks --json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// `None` for the clean run.
    pub attack: Option<String>,
    /// Every poisoned update rejected, or the service attack contained.
    pub caught: bool,
    /// The loss stayed within [`NEUTRAL_GAP`] of the clean run's.
    pub neutralised: bool,
    /// What stopped it: reject reasons, refusals, counters.
    pub reasons: Vec<String>,
    /// Held-out loss after the last round.
    pub final_loss: f64,
    pub clean_loss: Option<f64>,
    /// (final − clean) / clean.
    pub loss_gap: Option<f64>,
    /// Peak resident memory of the whole process during the run (the
    /// coordinator and every node share it, so this bounds the
    /// coordinator's from above).
    pub coordinator_peak_rss_bytes: u64,
    /// The attackers' updates, and how many of them counted.
    pub attacker_updates: u64,
    pub attacker_accepted: u64,
    /// Tokens the attackers claimed and were credited, and credit taken
    /// back from them by failed spot checks (docs/security.md, "Clawback").
    pub attacker_claimed_tokens: u64,
    pub attacker_credited_tokens: u64,
    pub attacker_voided_tokens: u64,
    /// Refusal rows in the ledger, and refusals only counted in metrics.
    pub refusals_recorded: u64,
    pub refusals_unrecorded: u64,
    pub rate_limited: u64,
    pub join_refusals: u64,
    pub largest_manifest_bytes: u64,
    pub rounds_closed: u64,
    pub wall_seconds: f64,
}

/// The relative loss gap under which an attack that got through counts as
/// neutralised (issue #13's bar).
pub const NEUTRAL_GAP: f64 = 0.02;

/// Runs the clean run, then each attack, calling `done` after each.
pub async fn run_suite(
    config: &SuiteConfig,
    attacks: &[Attack],
    mut done: impl FnMut(&Outcome),
) -> anyhow::Result<Vec<Outcome>> {
    let clean = run_one(config, None, None).await?;
    done(&clean);
    let mut outcomes = vec![clean.clone()];
    for &attack in attacks {
        let outcome = run_one(config, Some(attack), Some(clean.final_loss)).await?;
        done(&outcome);
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// One network, with `attack` played by the last `config.attackers` nodes.
pub async fn run_one(
    config: &SuiteConfig,
    attack: Option<Attack>,
    clean_loss: Option<f64>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let name = attack.map_or("clean".to_string(), |a| a.name().to_string());
    let dir = config.data_dir.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    reset_peak_rss();

    let coordinator_config = CoordinatorConfig {
        run_id: format!("attacks-{name}"),
        model: config.model.clone(),
        dataset: DatasetSource::Builtin {
            shards: (config.nodes * 4).max(8),
            shard_tokens: 32 * 1024,
            seed: config.seed,
        },
        inner_steps: config.inner_steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        codec: config.codec.clone(),
        aggregation: config.aggregation.clone(),
        quorum: Quorum::Fraction(1.0),
        min_nodes: config.nodes,
        total_rounds: config.rounds,
        http: "127.0.0.1:0".parse()?,
        data_dir: dir.join("coordinator"),
        linger_secs: 3.0,
        round_deadline_secs: 600.0,
        verify: config.verify.clone().unwrap_or_default(),
        ..CoordinatorConfig::default()
    };
    let shutdown = CancellationToken::new();
    let coordinator = barnraise_coordinator::start(coordinator_config, shutdown.clone())
        .await
        .context("starting the coordinator")?;
    let mut events = coordinator.events();
    let ledger_path = coordinator.ledger_path().to_path_buf();
    let http = coordinator.http_addr();

    let board = Board::new();
    let first_attacker = config.nodes - config.attackers.min(config.nodes);
    let mut attacker_ids = BTreeSet::new();
    let mut nodes = tokio::task::JoinSet::new();
    for i in 0..config.nodes {
        let node_dir = dir.join(format!("node-{i}"));
        let key = node_key(config.seed, i)?;
        key.save_new(&node_dir.join("node.key"))
            .with_context(|| format!("writing node {i}'s key"))?;
        let hostile = attack.filter(|_| i >= first_attacker);
        if hostile.is_some() {
            attacker_ids.insert(key.node_id().to_string());
        }
        let mut node_config = NodeConfig {
            coordinator: coordinator.multiaddr(),
            data_dir: node_dir,
            device: "cpu".into(),
            run_id: format!("attacks-{name}"),
            max_rounds: Some(config.rounds),
            ..NodeConfig::default()
        };
        if hostile == Some(Attack::Inflate) {
            // The most an uncertified node may declare; one trains, four claim.
            node_config.workers =
                Some(barnraise_coordinator::admission::DEFAULT_MAX_UNCERTIFIED_WORKERS);
            node_config.misbehave = Some(barnraise_node::Misbehaviour::Inflate);
        }
        let player = Player {
            board: board.clone(),
            index: i,
            attack: hostile,
            nodes: config.nodes,
            attackers: config.attackers,
            rounds: config.rounds,
        };
        let shutdown = shutdown.clone();
        nodes.spawn(async move {
            barnraise_node::daemon::run_node_with(
                node_config,
                shutdown,
                None,
                Some(Arc::new(player)),
            )
            .await
        });
    }

    // Service attacks from outside the node set.
    let mut reasons = BTreeSet::new();
    let mut flood = None;
    match attack {
        Some(Attack::JoinFlood) => {
            let (peers, joins) = (config.flood_peers, config.flood_joins);
            let target = coordinator.multiaddr();
            let flood_dir = dir.join("flood");
            let shutdown = shutdown.clone();
            flood = Some(tokio::spawn(async move {
                join_flood(target, &flood_dir, peers, joins, shutdown).await
            }));
        }
        Some(Attack::Inflate) => {
            let refusal = sixty_four_workers(
                &coordinator,
                &format!("attacks-{name}"),
                &dir.join("greedy"),
            )
            .await?;
            reasons.insert(format!("a join declaring 64 workers: {refusal}"));
        }
        _ => {}
    }

    // Until the run ends; a stuck run is a result, not a hang.
    let mut metrics_text = String::new();
    let limit = Duration::from_secs(120 + 120 * config.rounds);
    let finished = tokio::time::timeout(limit, async {
        loop {
            match events.recv().await {
                Ok(CoordinatorEvent::RunFinished) => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if let Ok(text) = http_get(http, "/metrics").await {
        metrics_text = text;
    }
    if let Some(flood) = flood {
        match flood.await {
            Ok(Ok(sent)) => {
                reasons.insert(format!("{sent} garbage joins sent"));
            }
            Ok(Err(e)) => {
                reasons.insert(format!("the flood failed: {e:#}"));
            }
            Err(e) => {
                reasons.insert(format!("the flood task failed: {e}"));
            }
        }
    }
    let summaries = stop_nodes(nodes, &shutdown).await;
    shutdown.cancel();
    let summary = coordinator
        .wait()
        .await
        .context("the coordinator stopped with an error")?;
    let peak_rss = peak_rss();
    if summaries.len() < config.nodes {
        reasons.insert(format!(
            "{} of {} nodes stopped cleanly",
            summaries.len(),
            config.nodes
        ));
    }

    let ledger = Ledger::open_existing(&ledger_path).context("opening the run's ledger")?;
    let rounds_closed = summary.rounds.len() as u64;
    let final_loss = summary
        .rounds
        .iter()
        .rev()
        .find_map(|r| r.eval_loss)
        .unwrap_or(f64::NAN);
    let mut attacker_updates = 0;
    let mut attacker_accepted = 0;
    let mut poisoned = 0;
    let mut poisoned_rejected = 0;
    let mut largest_manifest_bytes = 0;
    for round in 0..rounds_closed {
        if let Some(bytes) = ledger.manifest(round)? {
            largest_manifest_bytes = largest_manifest_bytes.max(bytes.len() as u64);
        }
        for row in ledger.updates(round)? {
            if !attacker_ids.contains(&row.node) || row.verdict == "missing" {
                continue;
            }
            attacker_updates += 1;
            let accepted = row.verdict == "accepted";
            attacker_accepted += u64::from(accepted);
            if let Some(reason) = &row.reason {
                reasons.insert(reason.clone());
            }
            if attack.is_some_and(|a| a.poisons_updates() && poisoned_round(a, round)) {
                poisoned += 1;
                poisoned_rejected += u64::from(!accepted);
            }
        }
    }
    let (mut claimed, mut credited, mut voided) = (0, 0, 0);
    for row in &summary.contributors {
        if attacker_ids.contains(&row.node) {
            claimed += row.claimed_tokens;
            credited += row.tokens;
            voided += row.voided_tokens;
        }
    }
    let refusals = ledger.refusals()?;
    for refusal in &refusals {
        reasons.insert(format!("refused: {}", refusal.reason));
    }
    let counter = |name: &str| metric(&metrics_text, name).unwrap_or(0);
    let refusals_unrecorded = counter("barnraise_refusals_unrecorded_total");
    let rate_limited = counter("barnraise_rate_limited_total");
    let join_refusals = counter("barnraise_join_refusals_total");
    let caught = finished
        && match attack {
            None => false,
            Some(Attack::Inflate) => {
                reasons.iter().any(|r| r.starts_with("a join declaring 64"))
                    && reasons.contains("spot-check")
            }
            Some(Attack::CommitSpam) => {
                // Refusals are bounded per node and round, and the rest counted.
                refusals.len() as u64 <= (config.attackers as u64) * rounds_closed * 8
                    && refusals_unrecorded + rate_limited > 0
            }
            Some(Attack::JoinFlood) => {
                refusals.is_empty() && refusals_unrecorded + join_refusals + rate_limited > 0
            }
            Some(_) => poisoned > 0 && poisoned_rejected == poisoned,
        };
    if attack == Some(Attack::CommitSpam) || attack == Some(Attack::JoinFlood) {
        reasons.insert(format!(
            "{refusals_unrecorded} refusals counted only, {rate_limited} rate-limited, {join_refusals} joins refused"
        ));
    }
    let loss_gap = clean_loss.map(|clean| (final_loss - clean) / clean);
    Ok(Outcome {
        attack: attack.map(|a| a.name().to_string()),
        caught,
        neutralised: finished && loss_gap.is_some_and(|g| g <= NEUTRAL_GAP),
        reasons: reasons.into_iter().collect(),
        final_loss,
        clean_loss,
        loss_gap,
        coordinator_peak_rss_bytes: peak_rss,
        attacker_updates,
        attacker_accepted,
        attacker_claimed_tokens: claimed,
        attacker_credited_tokens: credited,
        attacker_voided_tokens: voided,
        refusals_recorded: refusals.len() as u64,
        refusals_unrecorded,
        rate_limited,
        join_refusals,
        largest_manifest_bytes,
        rounds_closed,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Rounds in which the attack actually sends something bad (a replay has
/// nothing to replay in round 0).
fn poisoned_round(attack: Attack, round: u64) -> bool {
    !(attack == Attack::Replay && round == 0)
}

/// Node `i`'s key for a seed: the same nodes, so the same shards, in every
/// run of a suite.
pub fn node_key(seed: u64, i: usize) -> anyhow::Result<SigningKey> {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&(i as u64).to_le_bytes());
    bytes[16..].copy_from_slice(b"barnraise-attack");
    Ok(SigningKey::from_seed(bytes)?)
}

async fn stop_nodes(
    mut nodes: tokio::task::JoinSet<Result<NodeSummary, barnraise_node::NodeError>>,
    shutdown: &CancellationToken,
) -> Vec<NodeSummary> {
    let mut summaries = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(30));
    tokio::pin!(deadline);
    while !nodes.is_empty() {
        tokio::select! {
            joined = nodes.join_next() => match joined {
                Some(Ok(Ok(summary))) => summaries.push(summary),
                Some(Ok(Err(e))) => tracing::info!("a node stopped with an error: {e}"),
                Some(Err(e)) => tracing::warn!("a node task failed: {e}"),
                None => break,
            },
            _ = &mut deadline => {
                shutdown.cancel();
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(10));
            }
        }
    }
    summaries
}

/// A client on its own fresh identity, connected to the coordinator.
async fn raw_client(
    target: &Multiaddr,
    dir: &Path,
    shutdown: &CancellationToken,
) -> anyhow::Result<(SigningKey, network::Client, barnraise_node::PeerId)> {
    let key = SigningKey::generate()?;
    let blobs = Arc::new(barnraise_node::store::BlobStore::open(dir)?);
    let (client, mut events, event_loop) = network::new(NetworkConfig {
        keypair: key.to_libp2p()?,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        blobs,
        upload: barnraise_node::limiter::RateLimiter::new(None),
        coordinator_key: None,
        serve_coordinator: false,
        link: None,
    })?;
    tokio::spawn(event_loop.run(shutdown.child_token()));
    // Nobody needs the client's events; drain them so it never blocks.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let peer = client.dial(target.clone()).await?;
    Ok((key, client, peer))
}

/// `peers` fresh identities each send `joins` joins whose signatures do not
/// check; returns how many were sent.
async fn join_flood(
    target: Multiaddr,
    dir: &Path,
    peers: usize,
    joins: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<usize> {
    let mut sent = 0;
    for p in 0..peers {
        let (key, client, peer) = raw_client(&target, &dir.join(p.to_string()), &shutdown).await?;
        let mut join = Signed::sign(&key, &join_body("garbage", 1))?;
        for j in 0..joins {
            // A changed body under the old signature: unauthenticated.
            join.body.push(j as u8);
            let _ = client
                .coordinator_request(peer, CoordinatorRequest::Join(join.clone()))
                .await;
            sent += 1;
        }
    }
    Ok(sent)
}

/// A correctly signed join for the run declaring 64 workers; returns the
/// coordinator's answer.
async fn sixty_four_workers(
    coordinator: &CoordinatorHandle,
    run_id: &str,
    dir: &Path,
) -> anyhow::Result<String> {
    let shutdown = CancellationToken::new();
    let (key, client, peer) = raw_client(&coordinator.multiaddr(), dir, &shutdown).await?;
    let join = Signed::sign(&key, &join_body(run_id, 64))?;
    let answer = client
        .coordinator_request(peer, CoordinatorRequest::Join(join))
        .await;
    shutdown.cancel();
    Ok(match answer {
        Ok(barnraise_protocol::messages::CoordinatorResponse::Refused { reason }) => {
            format!("refused ({reason})")
        }
        Ok(other) => format!("answered {other:?}"),
        Err(e) => format!("failed ({e})"),
    })
}

fn join_body(run_id: &str, workers: usize) -> Join {
    Join {
        protocol_version: barnraise_protocol::limits::PROTOCOL_VERSION,
        agent: "barnraise-attack".into(),
        run_id: run_id.into(),
        workers: (0..workers)
            .map(|_| WorkerInfo {
                device: "cpu".into(),
                name: "cpu".into(),
                memory_bytes: 1 << 30,
            })
            .collect(),
        listen_addrs: vec![],
        certificate: None,
        timestamp_ms: now_ms(),
    }
}

/// A plain HTTP/1.0 GET on loopback.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut body)).await??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A counter's value from Prometheus text.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .map(|v| v as u64)
}

/// Resets the kernel's peak-RSS mark for this process (Linux; elsewhere a no-op).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM: the process's peak resident memory since the last reset.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// One outcome per attack from suites run with several seeds: losses are
/// averaged before the gap is taken (one seed's gap is mostly the noise of
/// which shards the honest nodes drew; docs/security.md), an attack is
/// caught only if it was caught under every seed, counts add up, and memory
/// is the largest seen.
pub fn combine(per_seed: &[Vec<Outcome>]) -> Vec<Outcome> {
    let Some(first) = per_seed.first() else {
        return Vec::new();
    };
    let n = per_seed.len() as f64;
    let clean = per_seed
        .iter()
        .filter_map(|suite| suite.iter().find(|o| o.attack.is_none()))
        .map(|o| o.final_loss)
        .sum::<f64>()
        / n;
    first
        .iter()
        .map(|template| {
            let runs: Vec<&Outcome> = per_seed
                .iter()
                .filter_map(|suite| suite.iter().find(|o| o.attack == template.attack))
                .collect();
            let mut merged = template.clone();
            merged.final_loss = runs.iter().map(|o| o.final_loss).sum::<f64>() / n;
            let reasons: BTreeSet<String> = runs
                .iter()
                .flat_map(|o| o.reasons.iter().cloned())
                .collect();
            merged.reasons = reasons.into_iter().collect();
            merged.caught = runs.iter().all(|o| o.caught);
            let sum = |f: fn(&Outcome) -> u64| runs.iter().map(|o| f(o)).sum::<u64>();
            merged.attacker_updates = sum(|o| o.attacker_updates);
            merged.attacker_accepted = sum(|o| o.attacker_accepted);
            merged.attacker_claimed_tokens = sum(|o| o.attacker_claimed_tokens);
            merged.attacker_credited_tokens = sum(|o| o.attacker_credited_tokens);
            merged.attacker_voided_tokens = sum(|o| o.attacker_voided_tokens);
            merged.refusals_recorded = sum(|o| o.refusals_recorded);
            merged.refusals_unrecorded = sum(|o| o.refusals_unrecorded);
            merged.rate_limited = sum(|o| o.rate_limited);
            merged.join_refusals = sum(|o| o.join_refusals);
            merged.rounds_closed = sum(|o| o.rounds_closed);
            merged.largest_manifest_bytes = runs
                .iter()
                .map(|o| o.largest_manifest_bytes)
                .max()
                .unwrap_or(0);
            merged.coordinator_peak_rss_bytes = runs
                .iter()
                .map(|o| o.coordinator_peak_rss_bytes)
                .max()
                .unwrap_or(0);
            merged.wall_seconds = runs.iter().map(|o| o.wall_seconds).sum();
            if merged.attack.is_some() {
                merged.clean_loss = Some(clean);
                merged.loss_gap = Some((merged.final_loss - clean) / clean);
                merged.neutralised = runs.len() == per_seed.len()
                    && merged.loss_gap.is_some_and(|g| g <= NEUTRAL_GAP);
            }
            merged
        })
        .collect()
}

/// Prints the suite's outcomes as a table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<16} {:>6} {:>6} {:>8} {:>8} {:>9} {:>8}  {}\n",
        "attack", "caught", "neutr", "loss", "gap", "acc/upd", "rss MB", "reasons"
    ));
    for o in outcomes {
        out.push_str(&format!(
            "{:<16} {:>6} {:>6} {:>8.4} {:>8} {:>9} {:>8.0}  {}\n",
            o.attack.as_deref().unwrap_or("(clean)"),
            if o.attack.is_some() {
                o.caught.to_string()
            } else {
                "-".into()
            },
            if o.attack.is_some() {
                o.neutralised.to_string()
            } else {
                "-".into()
            },
            o.final_loss,
            o.loss_gap
                .map_or("-".into(), |g| format!("{:+.2}%", g * 100.0)),
            format!("{}/{}", o.attacker_accepted, o.attacker_updates),
            o.coordinator_peak_rss_bytes as f64 / 1e6,
            o.reasons.join("; ")
        ));
    }
    out
}

/// Attack names by count, for a summary line.
pub fn tally(outcomes: &[Outcome]) -> BTreeMap<&'static str, usize> {
    let mut tally = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.attack.is_some()) {
        let key = match (o.caught, o.neutralised) {
            (true, _) => "caught",
            (false, true) => "neutralised only",
            (false, false) => "got through",
        };
        *tally.entry(key).or_insert(0) += 1;
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(attack: Option<&str>, loss: f64, caught: bool) -> Outcome {
        Outcome {
            attack: attack.map(str::to_string),
            caught,
            neutralised: false,
            reasons: vec![format!("r{loss}")],
            final_loss: loss,
            clean_loss: None,
            loss_gap: None,
            coordinator_peak_rss_bytes: (loss * 100.0) as u64,
            attacker_updates: 4,
            attacker_accepted: 1,
            attacker_claimed_tokens: 10,
            attacker_credited_tokens: 5,
            attacker_voided_tokens: 0,
            refusals_recorded: 1,
            refusals_unrecorded: 2,
            rate_limited: 3,
            join_refusals: 0,
            largest_manifest_bytes: 100,
            rounds_closed: 2,
            wall_seconds: 1.0,
        }
    }

    #[test]
    fn seeds_combine_by_mean_loss_and_every_seed_must_catch() {
        let seeds = vec![
            vec![outcome(None, 2.0, false), outcome(Some("nan"), 2.02, true)],
            vec![outcome(None, 2.2, false), outcome(Some("nan"), 2.3, false)],
        ];
        let combined = combine(&seeds);
        assert_eq!(combined.len(), 2);
        let nan = &combined[1];
        assert!((nan.final_loss - 2.16).abs() < 1e-9);
        assert_eq!(nan.clean_loss, Some(2.1));
        let gap = nan.loss_gap.unwrap();
        assert!((gap - (2.16 - 2.1) / 2.1).abs() < 1e-9, "{gap}");
        assert!(!nan.neutralised, "a 2.9% gap is over the bar");
        assert!(!nan.caught, "caught under one seed only");
        assert_eq!(nan.attacker_updates, 8);
        assert_eq!(nan.coordinator_peak_rss_bytes, (2.3f64 * 100.0) as u64);
        assert_eq!(nan.reasons, vec!["r2.02".to_string(), "r2.3".to_string()]);
        assert!(combine(&[]).is_empty());
    }

    #[test]
    fn counters_are_read_from_prometheus_text() {
        let text = "# HELP barnraise_rate_limited_total x\n# TYPE barnraise_rate_limited_total counter\nbarnraise_rate_limited_total 17\nbarnraise_rate_limited_total_other 3\n";
        assert_eq!(metric(text, "barnraise_rate_limited_total"), Some(17));
        assert_eq!(metric(text, "barnraise_joins_total"), None);
    }
}
