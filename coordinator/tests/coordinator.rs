//! The coordinator service over real loopback sockets, driven by minimal
//! fake nodes built from the coordinator's own network module: two honest
//! nodes that really train, one that commits and never serves, garbage and
//! wrong-round commits, a leave, a coordinator restart in the middle of a
//! round, the HTTP API and the ledger afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use barnraise_coordinator::http::HttpState;
use barnraise_coordinator::ledger::{
    ContributorRow, Ledger, NodeDetail, NodeRow, OrgDetail, OrgRow, RefusalRow, RoundRecord,
    RoundRow, UpdateRow,
};
use barnraise_coordinator::metrics::Metrics;
use barnraise_coordinator::network::{self, Client};
use barnraise_coordinator::stats::{self, By, Format};
use barnraise_coordinator::store::BlobStore;
use barnraise_coordinator::summary::LiveStatus;
use barnraise_coordinator::{
    CancellationToken, CoordinatorConfig, CoordinatorEvent, CoordinatorHandle, DatasetSource,
    Quorum,
};
use barnraise_protocol::aggregate::{AggregationRule, apply_round};
use barnraise_protocol::codec::{CodecConfig, Encoder};
use barnraise_protocol::limits::PROTOCOL_VERSION;
use barnraise_protocol::messages::*;
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::workers::{WorkerShare, share_sketch};
use barnraise_protocol::{Hash, Signed, SigningKey};
use barnraise_trainer::data::Shard;
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{ModelConfig, Trainer};
use libp2p::{Multiaddr, PeerId};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;

// Long enough never to decide the test on a loaded machine: rounds here close
// because every assigned node is resolved, not by the clock.
const DEADLINE_SECS: f64 = 60.0;

fn config(data_dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        run_id: "loopback".into(),
        model: "tiny".into(),
        dataset: DatasetSource::Builtin {
            shards: 6,
            shard_tokens: 4096,
            seed: 1,
        },
        inner_steps: 6,
        batch_size: 4,
        seq_len: 32,
        codec: "int8".into(),
        aggregation: "mean".into(),
        quorum: Quorum::Fraction(1.0),
        round_deadline_secs: DEADLINE_SECS,
        min_nodes: 3,
        total_rounds: 2,
        linger_secs: 0.5,
        data_dir: data_dir.to_path_buf(),
        // This test's fake nodes send bursts of bad commits on purpose, to
        // exercise the refusal paths behind the rate limit.
        rate_limits: barnraise_coordinator::config::RateLimits {
            commit_burst: 1000,
            ..Default::default()
        },
        // Every worker share is replayed: the honest nodes' work must check
        // out over the network, state fetch included.
        verify: barnraise_coordinator::config::VerifyConfig {
            spot_check_fraction: 1.0,
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    }
}

/// A node with just enough behaviour to exercise the coordinator.
struct FakeNode {
    key: SigningKey,
    client: Client,
    store: BlobStore,
    addrs: Vec<Multiaddr>,
    coordinator: PeerId,
    _dir: tempfile::TempDir,
}

impl FakeNode {
    async fn start(seed: u8, coordinator: &Multiaddr, shutdown: &CancellationToken) -> FakeNode {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_seed([seed; 32]).unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        let (client, _events, event_loop, addrs) = network::new(
            key.to_libp2p().unwrap(),
            &[listen],
            store.clone(),
            &[],
            network::CoordinatorTraffic::default(),
        )
        .await
        .unwrap();
        tokio::spawn(event_loop.run(shutdown.child_token()));
        let coordinator_peer = peer_of(coordinator);
        client
            .add_addresses(coordinator_peer, vec![coordinator.clone()])
            .await
            .unwrap();
        FakeNode {
            key,
            client,
            store,
            addrs,
            coordinator: coordinator_peer,
            _dir: dir,
        }
    }

    async fn request(&self, request: CoordinatorRequest) -> CoordinatorResponse {
        for _ in 0..50 {
            match self
                .client
                .coordinator_request(self.coordinator, request.clone())
                .await
            {
                Ok(response) => return response,
                // The coordinator may be restarting; try again.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        panic!("the coordinator never answered");
    }

    async fn join(&self) -> Welcome {
        match self.request(self.join_request()).await {
            CoordinatorResponse::Welcome(w) => w.verify(None).unwrap(),
            other => panic!("join refused: {other:?}"),
        }
    }

    fn join_request(&self) -> CoordinatorRequest {
        let join = Join {
            protocol_version: PROTOCOL_VERSION,
            agent: "fake-node/0".into(),
            run_id: "loopback".into(),
            workers: vec![WorkerInfo {
                device: "cpu".into(),
                name: "test".into(),
                memory_bytes: 1 << 30,
            }],
            listen_addrs: self.addrs.iter().map(|a| a.to_string()).collect(),
            certificate: None,
            timestamp_ms: now_ms(),
        };
        CoordinatorRequest::Join(Signed::sign(&self.key, &join).unwrap())
    }

    async fn plan(&self, round: u64) -> RoundPlan {
        for _ in 0..200 {
            if let CoordinatorResponse::Plan(Some(signed)) =
                self.request(CoordinatorRequest::CurrentPlan).await
            {
                let plan = signed.verify(None).unwrap();
                if plan.round == round {
                    return plan;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no plan for round {round}");
    }

    async fn commit(&self, commit: &Commit) -> CoordinatorResponse {
        self.request(CoordinatorRequest::Commit(
            Signed::sign(&self.key, commit).unwrap(),
        ))
        .await
    }

    /// Trains the node's assignment from θ, stores the update, and returns its commit.
    async fn train(&self, plan: &RoundPlan, theta: &[f32], welcome: &Welcome) -> (Commit, Vec<u8>) {
        let assignment = plan
            .assignments
            .iter()
            .find(|a| a.node == self.key.node_id())
            .expect("assigned");
        let info = &welcome.config.dataset[assignment.shards[0] as usize];
        let bytes = network::fetch_blob(&self.client, self.coordinator, info.hash, info.bytes)
            .await
            .unwrap();
        assert_eq!(
            Hash::of(&bytes),
            info.hash,
            "the coordinator serves the shard it names"
        );
        let tokens = Shard::decode(&bytes, Path::new("shard")).unwrap().tokens;
        let model: ModelConfig = serde_json::from_str(&welcome.config.model_config_json).unwrap();
        let cfg = &welcome.config;
        // As a node trains: the run's schedule for this round, from a
        // fresh optimizer state, which it serves for a spot check.
        let inner = barnraise_trainer::train::inner_for_round(
            cfg,
            plan.round,
            assignment.inner_steps,
            assignment.seed,
        );
        let theta = theta.to_vec();
        let (payload, report, share, state) = tokio::task::spawn_blocking(move || {
            let mut trainer = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
            trainer.set_flat_params(&theta).unwrap();
            let state = trainer.optimizer_state().unwrap();
            let report = trainer.train_inner(&tokens, &inner).unwrap();
            let local = trainer.flat_params().unwrap();
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();
            let codec: CodecConfig = "int8".parse().unwrap();
            let share = WorkerShare {
                index: 0,
                tokens: report.tokens,
                delta_hash: Hash::of_f32s(&delta),
                delta_sketch: share_sketch(&delta),
                state_hash: Hash::of(&state),
                carried: 0,
                held_back: 0,
            };
            (
                Encoder::new(codec, delta.len())
                    .unwrap()
                    .encode(&delta)
                    .unwrap(),
                report,
                share,
                state,
            )
        })
        .await
        .unwrap();
        self.store.put(Arc::new(state)).unwrap();
        self.store.put(Arc::new(payload.clone())).unwrap();
        let commit = Commit {
            run_id: plan.run_id.clone(),
            round: plan.round,
            base_params_hash: plan.params_hash,
            update_hash: Hash::of(&payload),
            update_bytes: payload.len() as u64,
            tokens: report.tokens,
            losses: report.losses,
            compute_ms: report.wall.as_millis() as u64,
            workers: 1,
            shares: vec![share],
        };
        (commit, payload)
    }
}

fn peer_of(addr: &Multiaddr) -> PeerId {
    addr.iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
            _ => None,
        })
        .expect("multiaddr ends in /p2p/")
}

async fn next_close(events: &mut broadcast::Receiver<CoordinatorEvent>) -> CoordinatorEvent {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Ok(event @ CoordinatorEvent::RoundClosed { .. })) => return event,
            Ok(Ok(_)) => {}
            other => panic!("no round close: {other:?}"),
        }
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let (status, body) = http_fetch(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_runs_rounds_rejects_bad_input_and_resumes_after_restart() {
    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let first = CancellationToken::new();
    let coordinator: CoordinatorHandle =
        barnraise_coordinator::start(config(data.path()), first.clone())
            .await
            .unwrap();
    let mut events = coordinator.events();
    let addr = coordinator.multiaddr();
    let coordinator_key = coordinator.public_key();

    let honest_a = FakeNode::start(11, &addr, &shutdown).await;
    let honest_b = FakeNode::start(12, &addr, &shutdown).await;
    let lazy = FakeNode::start(13, &addr, &shutdown).await;
    let welcome = honest_a.join().await;
    honest_b.join().await;
    lazy.join().await;

    // θ_0 is the trainer's init with seed 0, and the welcome's checkpoint blob holds it.
    let model: ModelConfig = serde_json::from_str(&welcome.config.model_config_json).unwrap();
    let theta0 = model.init_flat(0);
    assert_eq!(Hash::of_f32s(&theta0), welcome.params_hash);
    let trainer = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
    assert_eq!(
        trainer.params_hash().unwrap(),
        welcome.params_hash,
        "θ_0 is what Trainer::new(config, device, 0) starts from"
    );
    let checkpoint = welcome.checkpoint.clone().expect("a checkpoint of θ_0");
    let ckpt_bytes = network::fetch_blob(
        &honest_a.client,
        honest_a.coordinator,
        checkpoint.blob,
        checkpoint.bytes,
    )
    .await
    .unwrap();
    let ckpt =
        barnraise_trainer::checkpoint::from_bytes(&ckpt_bytes, Path::new("ckpt"), &model).unwrap();
    assert_eq!(Hash::of_f32s(&ckpt.params), welcome.params_hash);

    // Round 0.
    let plan0 = honest_a.plan(0).await;
    assert_eq!(plan0.assignments.len(), 3);
    let shards: std::collections::HashSet<u32> = plan0
        .assignments
        .iter()
        .flat_map(|a| a.shards.clone())
        .collect();
    assert_eq!(shards.len(), 3, "no shard twice in a round");

    let (commit_a, payload_a) = honest_a.train(&plan0, &theta0, &welcome).await;
    let (commit_b, payload_b) = honest_b.train(&plan0, &theta0, &welcome).await;

    // Signed garbage: tampered commits, twenty of them. Nobody can be
    // held to them, so they are counted in /metrics, not written to the
    // ledger (checked below).
    for i in 0..20 {
        let mut garbage = Signed::sign(&honest_a.key, &commit_a).unwrap();
        garbage.body[5 + i] ^= 0xFF;
        let refused = honest_a.request(CoordinatorRequest::Commit(garbage)).await;
        assert!(
            matches!(&refused, CoordinatorResponse::Refused { reason } if reason.starts_with("bad-signature")),
            "{refused:?}"
        );
    }
    // Commits for the wrong round, twenty: the manifest records one.
    for round in 7..27 {
        let mut future = commit_b.clone();
        future.round = round;
        let refused = honest_b.commit(&future).await;
        assert!(
            matches!(&refused, CoordinatorResponse::Refused { reason } if reason.starts_with("wrong-round")),
            "{refused:?}"
        );
    }

    assert_eq!(
        honest_a.commit(&commit_a).await,
        CoordinatorResponse::CommitAccepted { round: 0 }
    );
    assert_eq!(
        honest_a.commit(&commit_a).await,
        CoordinatorResponse::CommitAccepted { round: 0 },
        "a retry is harmless"
    );
    let mut second = commit_a.clone();
    second.update_hash = Hash::of(b"another update");
    let refused = honest_a.commit(&second).await;
    assert!(
        matches!(&refused, CoordinatorResponse::Refused { reason } if reason.starts_with("duplicate-commit")),
        "{refused:?}"
    );
    assert_eq!(
        honest_b.commit(&commit_b).await,
        CoordinatorResponse::CommitAccepted { round: 0 }
    );
    // The lazy node commits to an update it never serves.
    let mut lazy_commit = commit_b.clone();
    lazy_commit.update_hash = Hash::of(b"never served");
    assert_eq!(
        lazy.commit(&lazy_commit).await,
        CoordinatorResponse::CommitAccepted { round: 0 }
    );
    // ... and leaves: it keeps its place in round 0 and gets no work after.
    let leave = Leave {
        run_id: "loopback".into(),
        timestamp_ms: now_ms(),
    };
    assert_eq!(
        lazy.request(CoordinatorRequest::Leave(
            Signed::sign(&lazy.key, &leave).unwrap()
        ))
        .await,
        CoordinatorResponse::Ok
    );

    let CoordinatorEvent::RoundClosed {
        round,
        accepted,
        rejected,
        params_hash,
        ..
    } = next_close(&mut events).await
    else {
        unreachable!()
    };
    assert_eq!((round, accepted), (0, 2), "{rejected:?}");
    let reason_of = |node: &FakeNode| -> Vec<&str> {
        rejected
            .iter()
            .filter(|r| r.node == node.key.node_id())
            .map(|r| r.reason.code())
            .collect()
    };
    assert_eq!(reason_of(&lazy), vec!["not-served"]);
    assert_eq!(reason_of(&honest_a), vec!["duplicate-commit"]);
    assert_eq!(reason_of(&honest_b), vec!["wrong-round"]);

    // The manifest is signed by the coordinator and every node can recompute θ_1 from it.
    let CoordinatorResponse::Manifest(Some(signed)) = honest_b
        .request(CoordinatorRequest::Manifest { round: 0 })
        .await
    else {
        panic!("no manifest for round 0")
    };
    let manifest = signed.verify(Some(&coordinator_key)).unwrap();
    assert_eq!(manifest.previous_manifest, Hash::ZERO);
    assert_eq!(manifest.next_params_hash, params_hash);
    let payloads = [
        (commit_a.update_hash, payload_a),
        (commit_b.update_hash, payload_b),
    ];
    let inputs: Vec<(&[u8], f32)> = manifest
        .accepted
        .iter()
        .map(|a| {
            (
                payloads
                    .iter()
                    .find(|(h, _)| *h == a.update_hash)
                    .unwrap()
                    .1
                    .as_slice(),
                a.weight,
            )
        })
        .collect();
    let mut theta1 = theta0.clone();
    let mut optimizer = OuterOptimizer::new(
        OuterConfig {
            lr: 0.7,
            momentum: 0.9,
            nesterov: true,
        },
        theta1.len(),
    );
    apply_round(&mut theta1, &mut optimizer, &AggregationRule::Mean, &inputs).unwrap();
    assert_eq!(
        Hash::of_f32s(&theta1),
        manifest.next_params_hash,
        "a node reproduces θ_1 bit for bit"
    );

    // Round 1 has the two honest nodes.
    let plan1 = honest_a.plan(1).await;
    assert_eq!(plan1.previous_manifest, signed.body_hash());
    assert_eq!(plan1.assignments.len(), 2);
    let (commit_a1, _) = honest_a.train(&plan1, &theta1, &welcome).await;
    assert_eq!(
        honest_a.commit(&commit_a1).await,
        CoordinatorResponse::CommitAccepted { round: 1 }
    );

    // The HTTP API while it runs.
    let http = coordinator.http_addr();
    assert!(
        http_get(http, "/api/v1/run")
            .await
            .contains("\"run_id\":\"loopback\"")
    );
    assert!(
        http_get(http, "/metrics")
            .await
            .contains("barnraise_rounds_closed_total 1")
    );
    assert!(
        http_get(http, "/api/v1/rounds/0")
            .await
            .contains("not-served")
    );
    let round0: serde_json::Value =
        serde_json::from_str(&http_get(http, "/api/v1/rounds/0").await).unwrap();
    let wrong_round = round0
        .as_array()
        .unwrap()
        .iter()
        .filter(|u| u["reason"] == "wrong-round")
        .count();
    assert_eq!(wrong_round, 1, "twenty wrong-round commits, recorded once");
    let metrics = http_get(http, "/metrics").await;
    let unrecorded: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("barnraise_refusals_unrecorded_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(unrecorded >= 20, "{metrics}");
    let node_a = http_get(http, &format!("/api/v1/nodes/{}", honest_a.key.node_id())).await;
    assert!(
        !node_a.contains("bad-signature"),
        "unauthenticated garbage reached the ledger: {node_a}"
    );
    assert!(
        http_get(http, "/api/v1/nodes")
            .await
            .contains("fake-node/0")
    );
    assert!(
        http_get(http, "/api/v1/rounds")
            .await
            .contains("\"round\":0")
    );
    let home = http_get(http, "/").await;
    assert!(home.contains("<title>barnraise coordinator</title>"));
    // The traffic ratio names the codec and H it is for.
    assert!(
        home.contains("than data-parallel would move (codec int8:256, H = "),
        "{home}"
    );
    let live_rows = barnraise_coordinator::stats::fetch_contributors(&format!("http://{http}"))
        .await
        .unwrap();
    assert_eq!(live_rows.len(), 3);

    // Kill the coordinator in the middle of round 1 and start it again on the same data dir.
    first.cancel();
    let summary = coordinator.wait().await.unwrap();
    assert_eq!(summary.rounds.len(), 1);
    let second_run = CancellationToken::new();
    let coordinator = barnraise_coordinator::start(config(data.path()), second_run.clone())
        .await
        .unwrap();
    assert_eq!(
        coordinator.public_key(),
        coordinator_key,
        "same key, same run"
    );
    let mut events = coordinator.events();
    let new_addr = coordinator.multiaddr();
    for node in [&honest_a, &honest_b] {
        node.client
            .add_addresses(peer_of(&new_addr), vec![new_addr.clone()])
            .await
            .unwrap();
    }
    let resumed = honest_b.plan(1).await;
    assert_eq!(
        resumed, plan1,
        "the open round resumes with its signed plan"
    );
    let (commit_b1, _) = honest_b.train(&plan1, &theta1, &welcome).await;
    assert_eq!(
        honest_b.commit(&commit_b1).await,
        CoordinatorResponse::CommitAccepted { round: 1 }
    );
    let CoordinatorEvent::RoundClosed {
        round, accepted, ..
    } = next_close(&mut events).await
    else {
        unreachable!()
    };
    assert_eq!(
        (round, accepted),
        (1, 2),
        "node A's commit from before the restart was not lost"
    );

    let summary = tokio::time::timeout(Duration::from_secs(30), coordinator.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        summary.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![0, 1]
    );
    let row = |node: &FakeNode| {
        summary
            .contributors
            .iter()
            .find(|c| c.node == node.key.node_id().to_string())
            .unwrap()
            .clone()
    };
    assert_eq!(
        (row(&honest_a).accepted, row(&honest_a).tokens),
        (2, commit_a.tokens + commit_a1.tokens),
        "counted once per round (the plans may size rounds differently: `pace`)"
    );
    assert_eq!(row(&honest_b).accepted, 2);
    assert_eq!((row(&lazy).accepted, row(&lazy).credit), (0, 0.0));
    // Every share was drawn for a spot check: the honest fake nodes' rounds
    // replayed bit for bit on the coordinator, from the states they served.
    let ledger =
        Ledger::open_existing(&barnraise_coordinator::ledger::ledger_path(data.path())).unwrap();
    let mut exact = 0;
    for round in 0..2 {
        for update in ledger.updates(round).unwrap() {
            if update.verdict == "accepted" {
                let detail = update.detail.unwrap_or_default();
                assert!(
                    detail.contains("spot check of worker 0: exact replay"),
                    "{detail}"
                );
                exact += 1;
            }
        }
    }
    assert_eq!(exact, 4);
    let from_disk = barnraise_coordinator::stats::read_contributors(data.path()).unwrap();
    assert_eq!(from_disk, summary.contributors);
    shutdown.cancel();
}

// ---- Contribution accounting: the stats API, CSV and dashboard against the ledger ----

/// An org name and an agent string a hostile operator might choose.
const HOSTILE_ORG: &str = "Acme, \"Labs\" <script>alert(1)</script>";
const HOSTILE_AGENT: &str = "<img src=x onerror=alert(1)>";

fn node_hex(seed: u8) -> String {
    SigningKey::from_seed([seed; 32])
        .unwrap()
        .node_id()
        .to_string()
}

fn update_row(node: &str, verdict: &str, reason: Option<&str>, tokens: u64) -> UpdateRow {
    let accepted = verdict == "accepted";
    let delivered = verdict != "missing";
    UpdateRow {
        node: node.into(),
        update_hash: delivered.then(|| format!("{node}-{verdict}")),
        verdict: verdict.into(),
        reason: reason.map(str::to_string),
        detail: None,
        tokens: if delivered { tokens } else { 0 },
        compute_ms: if delivered { 1500 } else { 0 },
        bytes: if delivered { 1000 } else { 0 },
        weight: if accepted { 0.5 } else { 0.0 },
        mean_loss: delivered.then_some(3.0),
        credit: if accepted { tokens as f64 * 6.5e5 } else { 0.0 },
    }
}

/// Three closed rounds written through the ledger's public API: nodes A and
/// B of one org (with a hostile name), independent node C. Round 1: B's
/// update is rejected (norm-too-large) and C misses the round, then commits
/// after the close (refused as late). Round 2: C's update is rejected as late.
fn accounting_ledger(data_dir: &Path) -> (Ledger, [String; 3], String) {
    let (a, b, c) = (node_hex(11), node_hex(12), node_hex(13));
    let org = "ab".repeat(32);
    let mut ledger = Ledger::open(&barnraise_coordinator::ledger::ledger_path(data_dir)).unwrap();
    let run_config = serde_json::to_string(&config(data_dir)).unwrap();
    ledger.bind_run("loopback", &run_config, 1).unwrap();
    for (node, org) in [(&a, Some(&org)), (&b, Some(&org)), (&c, None)] {
        ledger
            .upsert_node(&NodeRow {
                node: node.clone(),
                org: org.cloned(),
                org_name: org.map(|_| HOSTILE_ORG.to_string()),
                agent: HOSTILE_AGENT.into(),
                workers: 1,
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                first_seen_ms: 1_000,
                last_seen_ms: 2_000,
                certificate: None,
            })
            .unwrap();
    }
    let rounds = [
        vec![
            update_row(&a, "accepted", None, 100),
            update_row(&b, "accepted", None, 200),
            update_row(&c, "accepted", None, 300),
        ],
        vec![
            update_row(&a, "accepted", None, 100),
            update_row(&b, "rejected", Some("norm-too-large"), 200),
            update_row(&c, "missing", None, 0),
        ],
        vec![
            update_row(&a, "accepted", None, 100),
            update_row(&b, "accepted", None, 200),
            update_row(&c, "rejected", Some("late"), 300),
        ],
    ];
    for (round, updates) in rounds.into_iter().enumerate() {
        let round = round as u64;
        let count = |v: &str| updates.iter().filter(|u| u.verdict == v).count() as u64;
        let record = RoundRecord {
            row: RoundRow {
                round,
                opened_ms: 10_000 * round,
                closed_ms: 10_000 * round + 5_000,
                base_params_hash: format!("base{round}"),
                next_params_hash: format!("next{round}"),
                manifest_hash: format!("manifest{round}"),
                params_blob: "p".into(),
                optimizer_blob: "o".into(),
                accepted: count("accepted"),
                rejected: count("rejected"),
                missing: count("missing"),
                mean_loss: Some(4.0 - round as f64),
                eval_loss: Some(4.5 - round as f64),
                bytes_received: updates.iter().map(|u| u.bytes).sum(),
            },
            manifest: vec![round as u8],
            updates,
            checkpoint: None,
            voided: vec![],
        };
        ledger.close_round(&record).unwrap();
        if round == 1 {
            ledger
                .record_refusal(&RefusalRow {
                    at_ms: 16_000,
                    round: Some(1),
                    claimed_node: Some(c.clone()),
                    reason: "late".into(),
                    detail: "commit for round 1".into(),
                })
                .unwrap();
        }
    }
    (ledger, [a, b, c], org)
}

/// GET over a raw socket: (status, body).
async fn http_fetch(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Serves `ledger` over HTTP on a loopback port.
async fn serve_ledger(
    ledger: Ledger,
    shutdown: &CancellationToken,
) -> (std::net::SocketAddr, Arc<Mutex<Ledger>>) {
    let (addr, ledger, _) = serve_ledger_with(ledger, Arc::new(Metrics::new()), shutdown).await;
    (addr, ledger)
}

/// [`serve_ledger`] with the metrics the server reads (its cache follows
/// `rounds_closed`).
async fn serve_ledger_with(
    ledger: Ledger,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> (std::net::SocketAddr, Arc<Mutex<Ledger>>, Arc<Metrics>) {
    let ledger = Arc::new(Mutex::new(ledger));
    let live = LiveStatus {
        run_id: "loopback".into(),
        phase: "finished".into(),
        total_rounds: 3,
        current_round: 3,
        ..LiveStatus::default()
    };
    let state = HttpState {
        ledger: barnraise_coordinator::ledger::Readers::shared(ledger.clone()),
        live: Arc::new(RwLock::new(live)),
        metrics: metrics.clone(),
        data_dir: None,
        record: Arc::default(),
        closed: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(barnraise_coordinator::http::serve(
        listener,
        state,
        shutdown.child_token(),
    ));
    (addr, ledger, metrics)
}

/// The overview and contributor totals scan every update row, so the API
/// keeps them until the next round closes: a write to the ledger shows once
/// `rounds_closed` moves, and not before.
#[tokio::test]
async fn run_totals_are_read_again_when_a_round_closes() {
    let data = tempfile::tempdir().unwrap();
    let path = barnraise_coordinator::ledger::ledger_path(data.path());
    let empty = Ledger::open(&path).unwrap();
    let shutdown = CancellationToken::new();
    let (http, _ledger, metrics) =
        serve_ledger_with(empty, Arc::new(Metrics::new()), &shutdown).await;
    let count = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let (status, body) = http_fetch(http, "/api/v1/contributors").await;
    assert_eq!((status, count(&body)), (200, 0));
    let (status, before) = http_fetch(http, "/api/v1/overview").await;
    assert_eq!(status, 200, "{before}");
    // Three rounds land in the ledger through another connection.
    drop(accounting_ledger(data.path()));
    let (_, body) = http_fetch(http, "/api/v1/contributors").await;
    assert_eq!(count(&body), 0, "kept until a round closes");
    assert_eq!(http_fetch(http, "/api/v1/overview").await.1, before);
    metrics
        .rounds_closed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (_, body) = http_fetch(http, "/api/v1/contributors").await;
    assert_eq!(count(&body), 3, "read again after the close");
    assert_ne!(http_fetch(http, "/api/v1/overview").await.1, before);
    let (status, home) = http_fetch(http, "/").await;
    assert_eq!(status, 200);
    assert!(
        home.contains(&format!("/nodes/{}", node_hex(11))),
        "the dashboard lists the new contributors"
    );
    shutdown.cancel();
}

/// A minimal RFC 4180 reader for the test: quoted fields, doubled quotes, CRLF.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match (quoted, ch) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, ch) => field.push(ch),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, ch) => field.push(ch),
        }
    }
    assert!(
        field.is_empty() && row.is_empty(),
        "CSV ends with a line break"
    );
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_api_and_csv_agree_with_the_ledger() {
    let data = tempfile::tempdir().unwrap();
    let (ledger, [a, b, c], org) = accounting_ledger(data.path());
    let expected = ledger.contributors().unwrap();
    let expected_orgs = ledger.orgs().unwrap();
    let shutdown = CancellationToken::new();
    let (http, ledger) = serve_ledger(ledger, &shutdown).await;

    // The numbers themselves, straight from the ledger.
    let find = |node: &str| expected.iter().find(|r| r.node == node).unwrap().clone();
    let (ra, rb, rc) = (find(&a), find(&b), find(&c));
    assert_eq!(
        (ra.tokens, ra.accepted, ra.rejected, ra.missing, ra.late),
        (300, 3, 0, 0, 0)
    );
    assert_eq!((rb.tokens, rb.accepted, rb.rejected), (400, 2, 1));
    assert_eq!(rb.rejections.get("norm-too-large"), Some(&1));
    assert_eq!(
        rb.credit,
        400.0 * 6.5e5,
        "a rejected update earns no credit"
    );
    assert_eq!(rb.bytes, 3000, "bytes count every delivered update");
    assert_eq!(
        (rc.accepted, rc.rejected, rc.missing, rc.late),
        (1, 1, 1, 2),
        "C was late twice: refused after round 1 closed, rejected as late in round 2"
    );
    assert_eq!(rc.compute_ms, 1500, "compute of accepted updates only");
    assert_eq!(expected_orgs.len(), 2);
    let acme = expected_orgs
        .iter()
        .find(|o| o.org.as_deref() == Some(org.as_str()))
        .unwrap();
    assert_eq!(
        (acme.nodes, acme.tokens, acme.accepted, acme.rejected),
        (2, 700, 5, 1)
    );
    assert_eq!(acme.credit, ra.credit + rb.credit);
    assert_eq!(acme.org_name.as_deref(), Some(HOSTILE_ORG));
    let independent = expected_orgs.iter().find(|o| o.org.is_none()).unwrap();
    assert_eq!((independent.nodes, independent.late), (1, 2));

    // The JSON API says the same.
    let (status, body) = http_fetch(http, "/api/v1/contributors").await;
    assert_eq!(status, 200);
    let api_rows: Vec<ContributorRow> = serde_json::from_str(&body).unwrap();
    assert_eq!(api_rows, expected);
    let (status, body) = http_fetch(http, "/api/v1/orgs").await;
    assert_eq!(status, 200);
    let api_orgs: Vec<OrgRow> = serde_json::from_str(&body).unwrap();
    assert_eq!(api_orgs, expected_orgs);
    let (status, body) = http_fetch(http, &format!("/api/v1/orgs/{org}")).await;
    assert_eq!(status, 200);
    let detail: OrgDetail = serde_json::from_str(&body).unwrap();
    assert_eq!(&detail.totals, acme);
    assert_eq!(detail.nodes.len(), 2);
    let (status, body) = http_fetch(http, &format!("/api/v1/nodes/{c}")).await;
    assert_eq!(status, 200);
    let detail: NodeDetail = serde_json::from_str(&body).unwrap();
    assert_eq!(detail.totals.as_ref(), Some(&rc));
    let history: Vec<(u64, &str, &str)> = detail
        .history
        .iter()
        .map(|h| (h.round, h.verdict.as_str(), h.timeliness.as_str()))
        .collect();
    assert_eq!(
        history,
        vec![
            (0, "accepted", "on-time"),
            (1, "missing", "late"),
            (2, "rejected", "late")
        ]
    );
    assert_eq!(detail.refusals.len(), 1);
    let (status, body) = http_fetch(http, "/api/v1/overview").await;
    assert_eq!(status, 200);
    let overview: serde_json::Value = serde_json::from_str(&body).unwrap();
    let round1 = &overview["rounds"][1];
    assert_eq!(
        (
            &round1["accepted"],
            &round1["rejected"],
            &round1["missing"],
            &round1["late"]
        ),
        (
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(1)
        )
    );
    // Two nodes delivered in round 1: data-parallel is a 2-way ring all-reduce
    // of the tiny model's fp32 gradients for H = 6 steps.
    let params = ModelConfig::preset("tiny").unwrap().params_count() as u64;
    assert_eq!(
        round1["data_parallel_bytes"],
        serde_json::json!(barnraise_coordinator::summary::data_parallel_bytes(
            params, 2, 6
        ))
    );
    assert_eq!(
        barnraise_coordinator::summary::data_parallel_bytes(params, 2, 6),
        2 * 4 * params * 6,
        "2(k-1)/k * 4P per node per step, k = 2 nodes"
    );

    // CSV from the API's rows, by node and by org, reads back to the ledger's values.
    let remote = barnraise_coordinator::stats::fetch_contributors(&format!("http://{http}"))
        .await
        .unwrap();
    let csv = stats::render(&remote, By::Node, Format::Csv).unwrap();
    assert!(csv.ends_with("\r\n"));
    let table = parse_csv(&csv);
    assert_eq!(table[0], stats::node_columns());
    assert_eq!(table.len(), expected.len() + 1);
    for (line, row) in table[1..].iter().zip(&expected) {
        assert_eq!(line[0], row.node);
        assert_eq!(line[1], row.org.clone().unwrap_or_default());
        assert_eq!(line[2], row.org_name.clone().unwrap_or_default());
        let numbers: Vec<u64> = line[3..12].iter().map(|f| f.parse().unwrap()).collect();
        assert_eq!(
            numbers,
            vec![
                row.tokens,
                row.voided_tokens,
                row.claimed_tokens,
                row.accepted,
                row.rejected,
                row.missing,
                row.late,
                row.bytes,
                row.compute_ms
            ]
        );
        assert_eq!(line[12].parse::<f64>().unwrap(), row.credit);
        let reasons: Vec<String> = row
            .rejections
            .iter()
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        assert_eq!(line[13], reasons.join(";"));
    }
    let org_csv = parse_csv(&stats::render(&remote, By::Org, Format::Csv).unwrap());
    assert_eq!(org_csv[0], stats::org_columns());
    assert_eq!(org_csv.len(), expected_orgs.len() + 1);
    for (line, row) in org_csv[1..].iter().zip(&expected_orgs) {
        assert_eq!(line[0], row.org.clone().unwrap_or_default());
        assert_eq!(line[1], row.org_name.clone().unwrap_or_default());
        assert_eq!(line[2].parse::<u64>().unwrap(), row.nodes);
        assert_eq!(line[3].parse::<u64>().unwrap(), row.tokens);
        assert_eq!(line[4].parse::<u64>().unwrap(), row.voided_tokens);
        assert_eq!(line[5].parse::<u64>().unwrap(), row.claimed_tokens);
        assert_eq!(line[12].parse::<f64>().unwrap(), row.credit);
    }
    // The JSON format is the API's rows again.
    let json = stats::render(&remote, By::Org, Format::Json).unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<OrgRow>>(&json).unwrap(),
        expected_orgs
    );

    // The data dir gives the same rows as the running API.
    drop(ledger);
    shutdown.cancel();
    assert_eq!(
        barnraise_coordinator::stats::read_contributors(data.path()).unwrap(),
        expected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_pages_escape_node_strings_and_answer_404_for_unknown_ids() {
    let data = tempfile::tempdir().unwrap();
    let (ledger, [a, b, c], org) = accounting_ledger(data.path());
    let shutdown = CancellationToken::new();
    let (http, _ledger) = serve_ledger(ledger, &shutdown).await;
    let escaped_org = "Acme, &quot;Labs&quot; &lt;script&gt;alert(1)&lt;/script&gt;";

    let (status, home) = http_fetch(http, "/").await;
    assert_eq!(status, 200, "{home}");
    assert!(home.contains("<title>barnraise coordinator</title>"));
    for node in [&a, &b, &c] {
        assert!(
            home.contains(&format!(r#"href="/nodes/{node}""#)),
            "leaderboard row of {node}"
        );
    }
    assert!(home.contains(&format!(r#"href="/orgs/{org}""#)));
    assert!(home.contains(r#"href="/orgs/independent""#));
    assert!(home.contains(escaped_org), "{home}");
    assert!(home.contains("<svg") && home.contains("Loss per round"));
    assert!(home.contains("data-parallel"));
    // B's row comes first: most credit (400 accepted tokens against 300).
    let first = home.find(&format!("/nodes/{b}")).unwrap();
    assert!(first < home.find(&format!("/nodes/{a}")).unwrap());
    assert!(first < home.find(&format!("/nodes/{c}")).unwrap());

    let (status, page) = http_fetch(http, &format!("/nodes/{c}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("late") && page.contains("missing"), "{page}");
    assert!(
        page.contains("commit for round 1"),
        "the late refusal is listed"
    );
    let (status, page) = http_fetch(http, &format!("/nodes/{b}")).await;
    assert_eq!(status, 200);
    assert!(page.contains("norm-too-large"), "{page}");
    assert!(
        page.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{page}"
    );
    let (status, page) = http_fetch(http, &format!("/orgs/{org}")).await;
    assert_eq!(status, 200);
    assert!(page.contains(escaped_org));
    assert!(page.contains(&format!("/nodes/{a}")) && !page.contains(&format!("/nodes/{c}")));
    let (status, page) = http_fetch(http, "/orgs/independent").await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("/nodes/{c}")));
    let (status, page) = http_fetch(http, "/rounds/1").await;
    assert_eq!(status, 200);
    assert!(page.contains("norm-too-large") && page.contains("missing"));

    // Nothing a node sends turns into markup, on any page.
    for path in [
        "/".to_string(),
        format!("/nodes/{a}"),
        format!("/orgs/{org}"),
        "/rounds/0".into(),
    ] {
        let (_, page) = http_fetch(http, &path).await;
        assert!(!page.contains("<script"), "{path}: {page}");
        assert!(!page.contains("<img"), "{path}: {page}");
    }

    // Unknown and malformed ids: real 404 pages, and JSON 404s under /api.
    let unknown_node = node_hex(99);
    for path in [
        format!("/nodes/{unknown_node}"),
        "/nodes/not-a-node".into(),
        "/nodes/%3Cscript%3Ealert(1)%3C%2Fscript%3E".into(),
        format!("/nodes/{}", &a[..12]),
        format!("/orgs/{}", "cd".repeat(32)),
        "/orgs/nope".into(),
        "/rounds/99".into(),
        "/rounds/-1".into(),
        "/rounds/abc".into(),
        "/rounds/99999999999999999999999".into(),
        "/no/such/page".into(),
    ] {
        let (status, page) = http_fetch(http, &path).await;
        assert_eq!(status, 404, "{path}: {page}");
        assert!(page.contains("<h1>Not found</h1>"), "{path}: {page}");
        assert!(!page.contains("<script"), "{path}: {page}");
    }
    for path in [
        format!("/api/v1/nodes/{unknown_node}"),
        "/api/v1/nodes/zz".into(),
        "/api/v1/orgs/zz".into(),
        "/api/v1/rounds/99".into(),
        "/api/v1/rounds/x".into(),
        "/api/v1/nothing".into(),
    ] {
        let (status, body) = http_fetch(http, &path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(),
            "{path}: {body}"
        );
    }
    // The old endpoints still answer.
    for path in [
        "/api/v1/run",
        "/api/v1/rounds",
        "/api/v1/rounds/2",
        "/api/v1/nodes",
        "/metrics",
    ] {
        assert_eq!(http_fetch(http, path).await.0, 200, "{path}");
    }
    shutdown.cancel();
}

/// Bounded state (issue #13): one peer's flood of joins is refused with
/// "retry later" past its burst, other peers are not affected, and the
/// refusals are counted in /metrics rather than written anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_joins_from_one_peer_is_rate_limited() {
    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = barnraise_coordinator::start(config(data.path()), shutdown.clone())
        .await
        .unwrap();
    let flooder = FakeNode::start(61, &coordinator.multiaddr(), &shutdown).await;
    let join = flooder.join_request();
    let (mut welcomed, mut limited) = (0, 0);
    for _ in 0..30 {
        match flooder.request(join.clone()).await {
            CoordinatorResponse::Welcome(_) => welcomed += 1,
            CoordinatorResponse::Refused { reason }
                if barnraise_protocol::messages::is_retry_later(&reason) =>
            {
                limited += 1
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    let burst = barnraise_coordinator::config::RateLimits::default().join_burst;
    assert_eq!((welcomed, limited), (burst, 30 - burst));
    let other = FakeNode::start(62, &coordinator.multiaddr(), &shutdown).await;
    other.join().await;
    let metrics = http_get(coordinator.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(&format!("barnraise_rate_limited_total {}", 30 - burst)),
        "{metrics}"
    );
    shutdown.cancel();
}

/// A flood of relay reservations from one peer (issue #12): the relay
/// server grants at most its per-peer rate (4 a minute) and refuses the
/// rest, and keeps serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_relay_reservations_from_one_peer_is_refused() {
    use futures::StreamExt;
    use libp2p::multiaddr::Protocol;
    use libp2p::relay;
    use libp2p::swarm::SwarmEvent;

    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let coordinator = barnraise_coordinator::start(config(data.path()), shutdown.clone())
        .await
        .unwrap();
    let relay_addr = coordinator.multiaddr();
    let client = |seed: u8| {
        let key = SigningKey::from_seed([seed; 32])
            .unwrap()
            .to_libp2p()
            .unwrap();
        libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .unwrap()
            .with_relay_client(libp2p::noise::Config::new, libp2p::yamux::Config::default)
            .unwrap()
            .with_behaviour(|_, relay| relay)
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    };
    // Counts granted and refused reservations out of `tries` listen
    // requests, made one after another once connected to the relay.
    async fn reserve(
        swarm: &mut libp2p::Swarm<relay::client::Behaviour>,
        relay: &Multiaddr,
        tries: usize,
    ) -> (usize, usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        swarm.dial(relay.clone()).unwrap();
        loop {
            let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
                .await
                .expect("connected to the relay");
            if let SwarmEvent::ConnectionEstablished { .. } = event {
                break;
            }
        }
        let circuit = relay.clone().with(Protocol::P2pCircuit);
        let (mut granted, mut refused) = (0, 0);
        for _ in 0..tries {
            let listener = swarm.listen_on(circuit.clone()).unwrap();
            loop {
                let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
                    .await
                    .expect("every reservation request is answered");
                match event {
                    // On one connection a new request renews the slot (and
                    // closes the old listener); the server's per-peer rate
                    // counts every request.
                    SwarmEvent::Behaviour(relay::client::Event::ReservationReqAccepted {
                        ..
                    }) => {
                        granted += 1;
                        break;
                    }
                    SwarmEvent::ListenerClosed {
                        listener_id,
                        reason,
                        ..
                    } if listener_id == listener => {
                        assert!(reason.is_err(), "a refusal closes with an error");
                        refused += 1;
                        break;
                    }
                    _ => {}
                }
            }
        }
        (granted, refused)
    }
    let mut flooder = client(71);
    let (granted, refused) = reserve(&mut flooder, &relay_addr, 12).await;
    eprintln!("relay reservations from one peer: {granted} granted, {refused} refused of 12");
    assert!(
        (1..=4).contains(&granted) && refused == 12 - granted,
        "{granted} granted, {refused} refused of 12"
    );
    // Someone else still gets a slot.
    let mut other = client(72);
    assert_eq!(reserve(&mut other, &relay_addr, 1).await, (1, 0));
    shutdown.cancel();
}

/// A swarm of the coordinator's network stack serving `store`.
async fn blob_peer(
    seed: u8,
    store: BlobStore,
    shutdown: &CancellationToken,
) -> (Client, Vec<Multiaddr>, PeerId) {
    let key = SigningKey::from_seed([seed; 32]).unwrap();
    let listen: Multiaddr = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
    let keypair = key.to_libp2p().unwrap();
    let peer = keypair.public().to_peer_id();
    let (client, _events, event_loop, addrs) = network::new(
        keypair,
        &[listen],
        store,
        &[],
        network::CoordinatorTraffic::default(),
    )
    .await
    .unwrap();
    tokio::spawn(event_loop.run(shutdown.child_token()));
    (client, addrs, peer)
}

/// `fetch_blob` keeps several chunk requests in flight: a blob of several
/// chunks and a short last one arrives whole and in order, a transfer
/// resumes from what already arrived, and a peer that holds another size
/// than asked for is caught: a larger size asked for ends in a refused
/// chunk, which `Have` then explains, and a smaller one brings bytes that do
/// not hash to the name (the check every caller makes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_of_many_chunks_arrives_whole_and_in_order() {
    let shutdown = CancellationToken::new();
    let (serving, fetching) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store = BlobStore::open(serving.path()).unwrap();
    let chunk = barnraise_protocol::limits::BLOB_CHUNK_BYTES;
    let blob: Vec<u8> = (0..(2 * network::FETCH_CHUNKS_IN_FLIGHT * chunk + 12_345))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let hash = store.put(Arc::new(blob.clone())).unwrap();
    let (_server, server_addrs, server_peer) = blob_peer(61, store, &shutdown).await;
    let (client, _, _) = blob_peer(62, BlobStore::open(fetching.path()).unwrap(), &shutdown).await;
    client
        .add_addresses(server_peer, server_addrs)
        .await
        .unwrap();
    let size = blob.len() as u64;
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        network::fetch_blob(&client, server_peer, hash, size),
    )
    .await
    .expect("the fetch finishes")
    .expect("the blob is served");
    assert_eq!(got.len(), blob.len());
    assert!(got == blob, "the chunks came back out of order or altered");
    // A transfer cut short resumes where it stopped: given a start (here
    // zeros, so that a fetch from the beginning would show), only the rest
    // is asked for.
    let start = chunk + 100;
    let mut resumed = vec![0u8; start];
    network::fetch_blob_into(&client, server_peer, hash, size, &mut resumed)
        .await
        .expect("the rest is served");
    assert_eq!(resumed.len(), blob.len());
    assert!(resumed[..start].iter().all(|&b| b == 0));
    assert!(resumed[start..] == blob[start..]);
    assert!(matches!(
        network::fetch_blob(&client, server_peer, hash, size + 1).await,
        Err(network::FetchError::WrongSize { .. })
    ));
    let short = network::fetch_blob(&client, server_peer, hash, size - 1)
        .await
        .expect("a shorter range is served");
    assert_ne!(Hash::of(&short), hash);
    assert!(matches!(
        network::fetch_blob(&client, server_peer, Hash::of(b"nothing"), 10).await,
        Err(network::FetchError::NotFound)
    ));
    shutdown.cancel();
}

/// Deferred spot checks (docs/security.md, "Deferred spot checks"): a node
/// commits in time and withholds its drawn worker's state. The round does
/// not wait past its grace for the state; the update counts, and the failed
/// check settles in the next close, which voids the node's credit of the
/// round before. Run with a grace that outlasts the fetch's refusals (the
/// failure is known before the close) and with none (it comes after).
/// Round 0 with two nodes, one of which names a starting state it never
/// serves, both committed: the setting of the deferred-check tests.
struct WithheldRound {
    coordinator: CoordinatorHandle,
    events: broadcast::Receiver<CoordinatorEvent>,
    honest: FakeNode,
    withholder: FakeNode,
    commit_h: Commit,
    commit_w: Commit,
    /// When the commits went in.
    committed: std::time::Instant,
}

async fn withheld_round(
    mut config: CoordinatorConfig,
    seeds: (u8, u8),
    shutdown: &CancellationToken,
) -> WithheldRound {
    config.min_nodes = 2;
    config.verify.probe = false;
    let coordinator = barnraise_coordinator::start(config, shutdown.clone())
        .await
        .unwrap();
    let events = coordinator.events();
    let addr = coordinator.multiaddr();
    let honest = FakeNode::start(seeds.0, &addr, shutdown).await;
    let withholder = FakeNode::start(seeds.1, &addr, shutdown).await;
    let welcome = honest.join().await;
    withholder.join().await;
    let model: ModelConfig = serde_json::from_str(&welcome.config.model_config_json).unwrap();
    let theta0 = model.init_flat(0);
    let plan0 = honest.plan(0).await;
    let (commit_h, _) = honest.train(&plan0, &theta0, &welcome).await;
    let (mut commit_w, _) = withholder.train(&plan0, &theta0, &welcome).await;
    // Its worker's starting state, named and never served. (Round 0's
    // states are fresh, the same bytes on every node: the coordinator
    // would have the honest node's copy.)
    commit_w.shares[0].state_hash = Hash::of(b"a state never served");
    let committed = std::time::Instant::now();
    for (node, commit) in [(&honest, &commit_h), (&withholder, &commit_w)] {
        assert_eq!(
            node.commit(commit).await,
            CoordinatorResponse::CommitAccepted { round: 0 }
        );
    }
    WithheldRound {
        coordinator,
        events,
        honest,
        withholder,
        commit_h,
        commit_w,
        committed,
    }
}

/// With no memory for another round's θ (`verify.deferred_memory_mb = 0`)
/// a round holds for its drawn states as without deferred checks: the
/// withheld state fails its check in its own round, nothing is deferred,
/// and `/metrics` counts the round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_whose_theta_does_not_fit_the_deferral_budget_holds_for_its_states() {
    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut config = config(data.path());
    config.verify.deferred_memory_mb = 0;
    config.verify.state_wait_max_secs = 0.0;
    config.round_deadline_secs = 6.0;
    // The honest node stays up to serve its update.
    let WithheldRound {
        coordinator,
        mut events,
        honest: _honest,
        withholder,
        ..
    } = withheld_round(config, (23, 24), &shutdown).await;
    let CoordinatorEvent::RoundClosed {
        round,
        accepted,
        rejected,
        ..
    } = next_close(&mut events).await
    else {
        unreachable!()
    };
    assert_eq!((round, accepted), (0, 1), "{rejected:?}");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].node, withholder.key.node_id());
    assert_eq!(rejected[0].reason.code(), "spot-check");
    let text = http_get(coordinator.http_addr(), "/metrics").await;
    for (name, value) in [
        ("barnraise_spot_checks_deferred_total", "0"),
        ("barnraise_rounds_held_for_memory_total", "1"),
    ] {
        assert!(
            text.lines().any(|l| l == format!("{name} {value}")),
            "{name} {value}: {text}"
        );
    }
    shutdown.cancel();
    let _ = coordinator.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withheld_state_is_settled_in_the_next_round_without_holding_the_round() {
    for grace in [5.0, 0.0] {
        let data = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let mut config = config(data.path());
        config.verify.state_grace_secs = grace;
        let WithheldRound {
            coordinator,
            mut events,
            honest,
            withholder,
            commit_h,
            commit_w,
            committed,
        } = withheld_round(config, (21, 22), &shutdown).await;
        let CoordinatorEvent::RoundClosed {
            round,
            accepted,
            rejected,
            ..
        } = next_close(&mut events).await
        else {
            unreachable!()
        };
        // Closed long before the 60 s deadline, with both updates counted.
        assert!(
            committed.elapsed() < Duration::from_secs(30),
            "grace {grace}: the round waited {:?}",
            committed.elapsed()
        );
        assert_eq!((round, accepted), (0, 2), "grace {grace}: {rejected:?}");

        // The withheld state's verdict is in before round 1 closes (with
        // no grace it comes after round 0's close), and at least that
        // share was deferred.
        let metric = |text: &str, name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        for attempt in 0.. {
            let text = http_get(coordinator.http_addr(), "/metrics").await;
            let deferred = metric(&text, "barnraise_spot_checks_deferred_total");
            if deferred >= 1 && metric(&text, "barnraise_spot_checks_settled_total") == deferred {
                break;
            }
            assert!(attempt < 300, "grace {grace}: no verdict: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Round 1: both commit on the wrong base (rejected at once), so it
        // closes as soon as they have; its manifest settles the check.
        let plan1 = honest.plan(1).await;
        for node in [&honest, &withholder] {
            let mut stale = commit_h.clone();
            stale.round = plan1.round;
            stale.update_hash = Hash::of(node.key.node_id().to_string().as_bytes());
            let _ = node.commit(&stale).await;
        }
        let _ = next_close(&mut events).await;
        let ledger =
            Ledger::open_existing(&barnraise_coordinator::ledger::ledger_path(data.path()))
                .unwrap();
        let manifest: Signed<Manifest> =
            Signed::from_bytes(&ledger.manifest(1).unwrap().unwrap()).unwrap();
        let manifest = manifest.verify(None).unwrap();
        assert_eq!(
            manifest.voided,
            vec![VoidedCredit {
                node: withholder.key.node_id(),
                from_round: 0,
                tokens: commit_w.tokens,
            }],
            "grace {grace}"
        );
        // The honest node's share replayed exactly in round 0: verified
        // there, given the grace to fetch it (with none it may be deferred
        // too, and a deferred pass lists nothing).
        let m0: Signed<Manifest> =
            Signed::from_bytes(&ledger.manifest(0).unwrap().unwrap()).unwrap();
        let verified = m0.verify(None).unwrap().verified;
        if grace > 0.0 {
            assert_eq!(verified, vec![honest.key.node_id()]);
        } else {
            assert!(!verified.contains(&withholder.key.node_id()));
        }
        let withheld = ledger
            .contributors()
            .unwrap()
            .into_iter()
            .find(|c| c.node == withholder.key.node_id().to_string())
            .unwrap();
        assert_eq!(
            (withheld.tokens, withheld.voided_tokens),
            (0, commit_w.tokens)
        );
        shutdown.cancel();
        let _ = coordinator.wait().await;
    }
}

/// The run's last round has no later close to settle a deferred check in,
/// so it holds for its drawn states as before: a state never served fails
/// the check in that round's own manifest, and nothing is deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_round_checks_its_drawn_states_before_it_closes() {
    let data = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let mut config = config(data.path());
    config.total_rounds = 1;
    let WithheldRound {
        coordinator,
        mut events,
        honest,
        withholder,
        ..
    } = withheld_round(config, (23, 24), &shutdown).await;
    let CoordinatorEvent::RoundClosed {
        round,
        accepted,
        rejected,
        ..
    } = next_close(&mut events).await
    else {
        unreachable!()
    };
    assert_eq!((round, accepted), (0, 1), "{rejected:?}");
    let ledger =
        Ledger::open_existing(&barnraise_coordinator::ledger::ledger_path(data.path())).unwrap();
    let manifest: Signed<Manifest> =
        Signed::from_bytes(&ledger.manifest(0).unwrap().unwrap()).unwrap();
    let manifest = manifest.verify(None).unwrap();
    assert_eq!(
        manifest
            .rejected
            .iter()
            .map(|r| (r.node, r.reason.code()))
            .collect::<Vec<_>>(),
        vec![(withholder.key.node_id(), "spot-check")]
    );
    assert_eq!(manifest.verified, vec![honest.key.node_id()]);
    let text = http_get(coordinator.http_addr(), "/metrics").await;
    assert!(
        text.lines()
            .any(|l| l == "barnraise_spot_checks_deferred_total 0"),
        "{text}"
    );
    shutdown.cancel();
    let _ = coordinator.wait().await;
}
