//! `barnraise node doctor`: checks what a node needs before it joins a run
//! — identity, compute, disk, the coordinator, reachability, and the link to
//! the coordinator — and says for each, in plain words, what is fine and
//! what to do about what is not.
//!
//! Doctor never joins the run (joining would make the coordinator plan work
//! for us); it only dials the coordinator, asks for the current plan, and
//! reads a few chunks of a shard to measure throughput.

use crate::config::NodeConfig;
use crate::limiter::RateLimiter;
use crate::network::{self, NetworkConfig, Reachability};
use crate::store::BlobStore;
use barnraise_protocol::limits::BLOB_CHUNK_BYTES;
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, CoordinatorResponse, RoundPlan,
};
use barnraise_protocol::{PublicKey, SigningKey};
use libp2p::multiaddr::Protocol;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One line of the doctor's report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    /// What was found.
    pub finding: String,
    /// What to do, when something should be done.
    pub advice: Option<String>,
}

fn check(
    name: &'static str,
    verdict: Verdict,
    finding: impl Into<String>,
    advice: Option<&str>,
) -> Check {
    Check {
        name,
        verdict,
        finding: finding.into(),
        advice: advice.map(str::to_string),
    }
}

/// Chunks read to measure throughput (8 MiB at most).
const THROUGHPUT_CHUNKS: u64 = 8;
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs every check. Never fails: problems are verdicts.
pub async fn run_doctor(config: &NodeConfig) -> Vec<Check> {
    let mut checks = Vec::new();
    let key = identity(config, &mut checks);
    certificate(config, key.as_ref(), &mut checks);
    compute(config, &mut checks);
    disk(config, &mut checks);
    if let Some(key) = key {
        network_checks(config, &key, &mut checks).await;
    }
    checks
}

fn identity(config: &NodeConfig, checks: &mut Vec<Check>) -> Option<SigningKey> {
    let path = config.key_path();
    match SigningKey::load(&path) {
        Ok(key) => {
            let peer = key
                .public()
                .to_peer_id()
                .map(|p| p.to_string())
                .unwrap_or_default();
            checks.push(check(
                "identity",
                Verdict::Ok,
                format!(
                    "node id {} (peer {peer}) from {}",
                    key.node_id(),
                    path.display()
                ),
                None,
            ));
            Some(key)
        }
        Err(barnraise_protocol::identity::IdentityError::Missing { .. }) => {
            checks.push(check(
                "identity",
                Verdict::Ok,
                format!(
                    "no key at {} yet; the first `barnraise node` run creates one",
                    path.display()
                ),
                None,
            ));
            // A throwaway key is enough to test the network.
            SigningKey::generate().ok()
        }
        Err(e) => {
            checks.push(check(
                "identity",
                Verdict::Fail,
                e.to_string(),
                Some("fix or move the key file; a node cannot start without its key"),
            ));
            None
        }
    }
}

fn compute(config: &NodeConfig, checks: &mut Vec<Check>) {
    let gpus = barnraise_trainer::device::discover_gpus();
    let cuda = barnraise_trainer::device::cuda_build();
    let finding = if gpus.is_empty() {
        "no GPU found; the node trains on the CPU".to_string()
    } else {
        gpus.iter()
            .map(|g| {
                format!(
                    "cuda:{} {} ({:.1} GiB)",
                    g.ordinal,
                    g.name,
                    g.memory_bytes as f64 / (1u64 << 30) as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Every worker's device must open, as the daemon will open them.
    let selected = config.worker_devices().and_then(|specs| {
        specs
            .iter()
            .map(|s| {
                let device = barnraise_trainer::device::select(*s).map_err(|e| e.to_string())?;
                // The precision policy must hold on this device too.
                let dtype = config
                    .precision
                    .compute_dtype(&device)
                    .map_err(|e| e.to_string())?;
                Ok(format!(
                    "{device:?} in {}",
                    barnraise_trainer::precision::dtype_name(dtype)
                ))
            })
            .collect::<Result<Vec<String>, String>>()
    });
    let on = |devices: &[String]| match devices {
        [one] => one.clone(),
        many => format!("{} workers ({})", many.len(), many.join(", ")),
    };
    match selected {
        Err(e) => checks.push(check(
            "compute",
            Verdict::Fail,
            format!("{finding}; device `{}`: {e}", config.device),
            Some(
                "use --device auto, cpu or cuda:N with N a GPU listed here (a list such as cuda:0,cuda:1 for one worker each)",
            ),
        )),
        Ok(devices) if !gpus.is_empty() && !cuda => checks.push(check(
            "compute",
            Verdict::Warn,
            format!(
                "{finding}; this binary cannot use them and trains on {}",
                on(&devices)
            ),
            Some(
                "rebuild with `cargo build --release --features cuda` to train on the GPU (scripts/cuda-toolchain.sh installs nvcc if you have none)",
            ),
        )),
        Ok(devices) => checks.push(check(
            "compute",
            Verdict::Ok,
            format!("{finding}; training on {}", on(&devices)),
            None,
        )),
    }
}

/// The org certificate, when one is configured: that it loads, is signed by
/// its org, names this node's key and is within its dates. Revocation and
/// the run's org list are the coordinator's to check.
fn certificate(config: &NodeConfig, key: Option<&SigningKey>, checks: &mut Vec<Check>) {
    use barnraise_protocol::certificate::{format_utc, load_certificate, verify_certificate};
    let Some(path) = &config.certificate else {
        return;
    };
    let body = match load_certificate(path).and_then(|signed| {
        verify_certificate(&signed).map_err(|e| {
            barnraise_protocol::certificate::CertificateFileError::Invalid {
                path: path.clone(),
                source: e,
            }
        })
    }) {
        Ok(body) => body,
        Err(e) => {
            checks.push(check(
                "certificate",
                Verdict::Fail,
                e.to_string(),
                Some("ask your org admin for a new one (`barnraise org enroll --node <your node id>`)"),
            ));
            return;
        }
    };
    let now = barnraise_protocol::messages::now_ms();
    let org = format!("{} ({})", body.org_name, body.org);
    let (verdict, finding, advice) = match key.map(|k| k.node_id()) {
        Some(me) if me != body.node => (
            Verdict::Fail,
            format!("{org} certifies node {}, not this node ({me})", body.node),
            Some("the certificate was made for another key; send your node id to your org admin"),
        ),
        _ if body.expires_ms <= now => (
            Verdict::Fail,
            format!(
                "{org}'s certificate expired at {}",
                format_utc(body.expires_ms)
            ),
            Some("ask your org admin to enroll this node again"),
        ),
        _ if body.expires_ms - now < 14 * 24 * 3600 * 1000 => (
            Verdict::Warn,
            format!(
                "{org} until {} (less than two weeks)",
                format_utc(body.expires_ms)
            ),
            Some("ask your org admin for a renewal before it expires"),
        ),
        _ => (
            Verdict::Ok,
            format!("{org} until {}", format_utc(body.expires_ms)),
            None,
        ),
    };
    checks.push(check("certificate", verdict, finding, advice));
}

fn disk(config: &NodeConfig, checks: &mut Vec<Check>) {
    let dir = &config.data_dir;
    if let Err(e) = std::fs::create_dir_all(dir) {
        checks.push(check(
            "disk",
            Verdict::Fail,
            format!("cannot create {}: {e}", dir.display()),
            Some("choose a writable --data-dir"),
        ));
        return;
    }
    match free_bytes(dir) {
        Some(free) => {
            let gib = free as f64 / (1u64 << 30) as f64;
            let finding = format!("{gib:.1} GiB free in {}", dir.display());
            let (verdict, advice) = if gib < 1.0 {
                (
                    Verdict::Fail,
                    Some(
                        "free some space or point --data-dir at a larger disk: shards, updates and checkpoints need room",
                    ),
                )
            } else if gib < 10.0 {
                (
                    Verdict::Warn,
                    Some(
                        "enough for small models; larger runs need tens of GiB for checkpoints and shards",
                    ),
                )
            } else {
                (Verdict::Ok, None)
            };
            checks.push(check("disk", verdict, finding, advice));
        }
        None => checks.push(check(
            "disk",
            Verdict::Warn,
            format!("could not measure free space in {}", dir.display()),
            None,
        )),
    }
}

/// Free bytes on the file system holding `dir`, via POSIX `df -Pk` (no
/// extra crate for one number).
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let output = std::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let line = text.lines().nth(1)?;
    let available_kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kib * 1024)
}

async fn network_checks(config: &NodeConfig, key: &SigningKey, checks: &mut Vec<Check>) {
    let scratch = match tempdir_for_doctor(config) {
        Some(store) => store,
        None => {
            checks.push(check(
                "coordinator",
                Verdict::Fail,
                "could not open a scratch store in the data dir",
                None,
            ));
            return;
        }
    };
    let keypair = match key.to_libp2p() {
        Ok(k) => k,
        Err(e) => {
            checks.push(check("coordinator", Verdict::Fail, e.to_string(), None));
            return;
        }
    };
    let network_config = NetworkConfig {
        keypair,
        listen: config.listen.clone(),
        blobs: scratch,
        upload: RateLimiter::unlimited(),
        coordinator_key: None,
        serve_coordinator: false,
        link: None,
    };
    let (client, _events, mut event_loop) = match network::new(network_config) {
        Ok(parts) => parts,
        Err(e) => {
            checks.push(check(
                "network",
                Verdict::Fail,
                e.to_string(),
                Some("check --listen: the port may be in use"),
            ));
            return;
        }
    };
    let listen = event_loop
        .wait_for_listen_addrs(Duration::from_secs(5))
        .await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(event_loop.run(shutdown.clone()));

    let coordinator = config.coordinator.clone();
    if coordinator
        .iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
    {
        // As the daemon does: the coordinator is our relay and AutoNAT server.
        let _ = client.add_relay(coordinator.clone()).await;
    }
    let dialled = tokio::time::timeout(DIAL_TIMEOUT, client.dial(coordinator.clone())).await;
    let peer = match dialled {
        Ok(Ok(peer)) => {
            checks.push(check(
                "coordinator",
                Verdict::Ok,
                format!("reached {coordinator} (peer {peer})"),
                None,
            ));
            Some(peer)
        }
        Ok(Err(e)) => {
            checks.push(check(
                "coordinator",
                Verdict::Fail,
                e.to_string(),
                Some("check the address (it should end in /p2p/<peer id>), that the coordinator runs, and that no firewall blocks the port"),
            ));
            None
        }
        Err(_) => {
            checks.push(check(
                "coordinator",
                Verdict::Fail,
                format!(
                    "no answer from {coordinator} in {} s",
                    DIAL_TIMEOUT.as_secs()
                ),
                Some("the host may be down or a firewall may drop the packets"),
            ));
            None
        }
    };
    if let Some(peer) = peer {
        if let Ok(expected) = PublicKey::from_peer_id(&peer)
            && let Some(configured) = config
                .coordinator_key
                .as_ref()
                .and_then(|k| k.parse::<PublicKey>().ok())
            && configured != expected
        {
            checks.push(check(
                "coordinator key",
                Verdict::Fail,
                format!("the coordinator at this address has key {expected}, not the configured {configured}"),
                Some("you may be talking to the wrong coordinator; check the address and coordinator_key"),
            ));
        }
        link_checks(&client, peer, checks).await;
    }
    // Without the coordinator there is no one to dial us back: no waiting.
    let wait = if peer.is_some() {
        REACHABILITY_WAIT
    } else {
        Duration::ZERO
    };
    reachability(&client, &listen, wait, checks).await;
    shutdown.cancel();
    let _ = task.await;
}

fn tempdir_for_doctor(config: &NodeConfig) -> Option<Arc<BlobStore>> {
    // Doctor serves nothing, but the network wants a source; an empty
    // store under the data dir is enough and leaves the real one alone.
    BlobStore::open(&config.data_dir.join("doctor"))
        .ok()
        .map(Arc::new)
}

async fn link_checks(client: &network::Client, peer: libp2p::PeerId, checks: &mut Vec<Check>) {
    // Round trip: the median of a few small requests.
    let mut samples = Vec::new();
    let mut plan: Option<RoundPlan> = None;
    for _ in 0..5 {
        let started = Instant::now();
        match tokio::time::timeout(
            Duration::from_secs(10),
            client.coordinator_request(peer, CoordinatorRequest::CurrentPlan),
        )
        .await
        {
            Ok(Ok(response)) => {
                samples.push(started.elapsed());
                if let CoordinatorResponse::Plan(Some(signed)) = response {
                    plan = signed
                        .verify(PublicKey::from_peer_id(&peer).ok().as_ref())
                        .ok();
                }
            }
            _ => break,
        }
    }
    samples.sort();
    match samples.get(samples.len() / 2) {
        Some(rtt) => {
            let ms = rtt.as_secs_f64() * 1000.0;
            let (verdict, advice) = if ms > 500.0 {
                (
                    Verdict::Warn,
                    Some(
                        "a slow link makes rounds wait on you; a wired connection or a closer coordinator helps",
                    ),
                )
            } else {
                (Verdict::Ok, None)
            };
            checks.push(check(
                "round trip",
                verdict,
                format!(
                    "{ms:.1} ms to the coordinator (median of {})",
                    samples.len()
                ),
                advice,
            ));
        }
        None => checks.push(check(
            "round trip",
            Verdict::Fail,
            "the coordinator accepted the connection but did not answer requests",
            Some("it may be overloaded or run another protocol version; ask its operator"),
        )),
    }
    // Throughput: a few chunks of the largest update the last closed round
    // accepted, which the coordinator keeps and serves. (Plans name shards
    // by their index in the run's dataset, which only a joined node has.)
    let last_closed = plan.as_ref().and_then(|p| p.round.checked_sub(1));
    let mut shard = None;
    if let Some(round) = last_closed
        && let Ok(Ok(CoordinatorResponse::Manifest(Some(signed)))) = tokio::time::timeout(
            Duration::from_secs(10),
            client.coordinator_request(peer, CoordinatorRequest::Manifest { round }),
        )
        .await
        && let Ok(manifest) = signed.verify(PublicKey::from_peer_id(&peer).ok().as_ref())
    {
        shard = manifest
            .accepted
            .iter()
            .max_by_key(|a| a.update_bytes)
            .map(|a| a.update_hash);
    }
    let Some(shard) = shard else {
        checks.push(check(
            "throughput",
            Verdict::Warn,
            "not measured: no round has closed with an accepted update to read",
            Some("run doctor again once the run has closed a round"),
        ));
        return;
    };
    let size = match client
        .blob_request(peer, BlobRequest::Have { hash: shard })
        .await
    {
        Ok(BlobResponse::Have { size: Some(size) }) => size,
        _ => {
            checks.push(check(
                "throughput",
                Verdict::Warn,
                "not measured: the coordinator does not serve the last round's update",
                None,
            ));
            return;
        }
    };
    let started = Instant::now();
    let mut bytes = 0u64;
    for index in 0..THROUGHPUT_CHUNKS {
        let offset = index * BLOB_CHUNK_BYTES as u64;
        if offset >= size {
            break;
        }
        let len = (size - offset).min(BLOB_CHUNK_BYTES as u64) as u32;
        match client
            .blob_request(
                peer,
                BlobRequest::Chunk {
                    hash: shard,
                    offset,
                    len,
                },
            )
            .await
        {
            Ok(BlobResponse::Chunk { data }) => bytes += data.len() as u64,
            _ => break,
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-6);
    let mbps = bytes as f64 * 8.0 / seconds / 1e6;
    let (verdict, advice) = if mbps < 10.0 {
        (
            Verdict::Warn,
            Some(
                "under 10 Mbit/s; fine for small models with top-k updates, slow for checkpoints of large ones",
            ),
        )
    } else {
        (Verdict::Ok, None)
    };
    checks.push(check(
        "throughput",
        verdict,
        format!("{mbps:.1} Mbit/s from the coordinator ({bytes} bytes read)"),
        advice,
    ));
}

/// How long `doctor` waits for AutoNAT and the relay to settle.
const REACHABILITY_WAIT: Duration = Duration::from_secs(15);

async fn reachability(
    client: &network::Client,
    listen: &[libp2p::Multiaddr],
    wait: Duration,
    checks: &mut Vec<Check>,
) {
    // AutoNAT asks the coordinator to dial us back a couple of seconds
    // after we connect; a private node then reserves a relay slot. Wait for
    // a verdict, but not forever.
    let deadline = tokio::time::Instant::now() + wait;
    let status = loop {
        let status = match client.status().await {
            Ok(status) => status,
            Err(e) => {
                checks.push(check("reachability", Verdict::Warn, e.to_string(), None));
                return;
            }
        };
        let settled = matches!(
            status.reachability,
            Reachability::Public(_) | Reachability::Relayed(_)
        );
        if settled || tokio::time::Instant::now() >= deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let public_listen = listen.iter().find(|addr| {
        addr.iter().any(|p| match p {
            Protocol::Ip4(ip) => is_public(IpAddr::V4(ip)),
            Protocol::Ip6(ip) => is_public(IpAddr::V6(ip)),
            _ => false,
        })
    });
    let listen = &status.listen_addrs;
    let public_listen = listen
        .iter()
        .find(|addr| {
            addr.iter().any(|p| match p {
                Protocol::Ip4(ip) => is_public(IpAddr::V4(ip)),
                Protocol::Ip6(ip) => is_public(IpAddr::V6(ip)),
                _ => false,
            })
        })
        .or(public_listen);
    let (verdict, finding, advice) = match (&status.reachability, public_listen) {
        (Reachability::Public(addr), _) => (
            Verdict::Ok,
            format!("public: peers reached us at {addr}"),
            None,
        ),
        (Reachability::Relayed(addr), _) => (
            Verdict::Ok,
            format!(
                "behind NAT: the coordinator could not dial us back, so peers reach us through \
                 its relay at {addr}; hole punching (over QUIC) upgrades links to direct ones \
                 where both routers allow it"
            ),
            Some(
                "relayed transfers go through the coordinator and are capped; forwarding the listen port (a fixed --listen port) makes you directly reachable",
            ),
        ),
        (_, Some(addr)) => (Verdict::Ok, format!("public address {addr}"), None),
        (Reachability::Private, None) => (
            Verdict::Warn,
            "behind NAT: peers cannot dial us directly".to_string(),
            Some(
                "that works (peers fetch your updates over your link to the coordinator, or via relay), but forwarding the listen port on your router makes transfers faster",
            ),
        ),
        (Reachability::Unknown, None) => (
            Verdict::Warn,
            format!(
                "probably behind NAT: listening only on private addresses ({})",
                listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some(
                "that works through your connection to the coordinator; forward the listen port on your router (and use --listen with a fixed port) to be directly reachable",
            ),
        ),
    };
    checks.push(check("reachability", verdict, finding, advice));
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            // 100.64.0.0/10 is carrier-grade NAT space: private in practice.
            let shared = v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64;
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || shared)
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_unique_local()
                || v6.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        assert!(!is_public("127.0.0.1".parse().unwrap()));
        assert!(!is_public("192.168.1.4".parse().unwrap()));
        assert!(!is_public("100.64.0.1".parse().unwrap()));
        assert!(is_public("8.8.8.8".parse().unwrap()));
        assert!(!is_public("fd00::1".parse().unwrap()));
    }

    #[tokio::test]
    async fn doctor_reports_an_unreachable_coordinator_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            // Port 9 on loopback: nothing listens, the dial fails at once.
            coordinator: "/ip4/127.0.0.1/tcp/9".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            device: "cpu".into(),
            ..NodeConfig::default()
        };
        let checks = run_doctor(&config).await;
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        for name in ["identity", "compute", "disk", "coordinator", "reachability"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let coordinator = checks.iter().find(|c| c.name == "coordinator").unwrap();
        assert_eq!(coordinator.verdict, Verdict::Fail);
        assert!(
            coordinator
                .advice
                .as_deref()
                .unwrap_or("")
                .contains("address")
        );
        let compute = checks.iter().find(|c| c.name == "compute").unwrap();
        assert_eq!(compute.verdict, Verdict::Ok, "{compute:?}");
        assert!(compute.finding.contains("Cpu in f32"), "{compute:?}");
    }

    #[test]
    fn certificate_and_workers_are_checked_before_joining() {
        use barnraise_protocol::Signed;
        use barnraise_protocol::messages::NodeCertificate;
        let dir = tempfile::tempdir().unwrap();
        let node = SigningKey::from_seed([3; 32]).unwrap();
        let org = SigningKey::from_seed([4; 32]).unwrap();
        let now = barnraise_protocol::messages::now_ms();
        let write = |name: &str, for_node: &SigningKey, expires_ms: u64| {
            let cert = Signed::sign(
                &org,
                &NodeCertificate {
                    org: org.org_id(),
                    org_name: "Lab".into(),
                    node: for_node.node_id(),
                    issued_ms: now - 1000,
                    expires_ms,
                    max_workers: 8,
                },
            )
            .unwrap();
            let path = dir.path().join(name);
            barnraise_protocol::certificate::save_certificate(&path, &cert).unwrap();
            path
        };
        let verdict = |path: std::path::PathBuf| {
            let config = NodeConfig {
                certificate: Some(path),
                ..NodeConfig::default()
            };
            let mut checks = Vec::new();
            certificate(&config, Some(&node), &mut checks);
            checks.pop().map(|c| (c.verdict, c.finding)).unwrap()
        };
        let day = 24 * 3600 * 1000;
        assert_eq!(
            verdict(write("ok.cert", &node, now + 100 * day)).0,
            Verdict::Ok
        );
        assert_eq!(
            verdict(write("soon.cert", &node, now + day)).0,
            Verdict::Warn
        );
        let (v, finding) = verdict(write(
            "other.cert",
            &SigningKey::from_seed([5; 32]).unwrap(),
            now + 100 * day,
        ));
        assert_eq!(v, Verdict::Fail);
        assert!(finding.contains("not this node"), "{finding}");
        let (v, _) = verdict(dir.path().join("missing.cert"));
        assert_eq!(v, Verdict::Fail);

        let mut checks = Vec::new();
        let cluster = NodeConfig {
            device: "cpu".into(),
            workers: Some(3),
            ..NodeConfig::default()
        };
        compute(&cluster, &mut checks);
        assert_eq!(checks[0].verdict, Verdict::Ok);
        assert!(checks[0].finding.contains("3 workers"), "{:?}", checks[0]);
        let bad = NodeConfig {
            device: "cpu,cpu".into(),
            workers: Some(3),
            ..NodeConfig::default()
        };
        compute(&bad, &mut checks);
        assert_eq!(checks[1].verdict, Verdict::Fail);
    }
}
