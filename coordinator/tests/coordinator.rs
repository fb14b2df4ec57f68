//! The coordinator service over real loopback sockets, driven by minimal
//! fake nodes built from the coordinator's own network module: two honest
//! nodes that really train, one that commits and never serves, garbage and
//! wrong-round commits, a leave, a coordinator restart in the middle of a
//! round, the HTTP API and the ledger afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use barnraise_coordinator::network::{self, Client};
use barnraise_coordinator::store::BlobStore;
use barnraise_coordinator::{
    CancellationToken, CoordinatorConfig, CoordinatorEvent, CoordinatorHandle, DatasetSource,
    Quorum,
};
use barnraise_protocol::aggregate::{AggregationRule, apply_round};
use barnraise_protocol::codec::{CodecConfig, Encoder};
use barnraise_protocol::limits::PROTOCOL_VERSION;
use barnraise_protocol::messages::*;
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::{Hash, Signed, SigningKey};
use barnraise_trainer::data::Shard;
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{InnerConfig, ModelConfig, Trainer};
use libp2p::{Multiaddr, PeerId};
use std::path::Path;
use std::sync::Arc;
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
        let (client, _events, event_loop, addrs) =
            network::new(key.to_libp2p().unwrap(), &[listen], store.clone(), &[])
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
        match self
            .request(CoordinatorRequest::Join(
                Signed::sign(&self.key, &join).unwrap(),
            ))
            .await
        {
            CoordinatorResponse::Welcome(w) => w.verify(None).unwrap(),
            other => panic!("join refused: {other:?}"),
        }
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
        let info = welcome
            .config
            .dataset
            .iter()
            .find(|s| s.hash == assignment.shards[0])
            .unwrap();
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
        let inner = InnerConfig {
            steps: cfg.inner_steps as usize,
            batch_size: cfg.batch_size as usize,
            seq_len: cfg.seq_len as usize,
            lr: f64::from(cfg.inner_lr),
            warmup: 1,
            seed: assignment.seed,
            ..InnerConfig::default()
        };
        let theta = theta.to_vec();
        let (payload, report) = tokio::task::spawn_blocking(move || {
            let mut trainer = Trainer::new(&model, select(DeviceSpec::Cpu).unwrap(), 0).unwrap();
            trainer.set_flat_params(&theta).unwrap();
            let report = trainer.train_inner(&tokens, &inner).unwrap();
            let local = trainer.flat_params().unwrap();
            let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();
            let codec: CodecConfig = "int8".parse().unwrap();
            (
                Encoder::new(codec, delta.len())
                    .unwrap()
                    .encode(&delta)
                    .unwrap(),
                report,
            )
        })
        .await
        .unwrap();
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{path}: {out}"
    );
    out
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
    let shards: std::collections::HashSet<Hash> = plan0
        .assignments
        .iter()
        .flat_map(|a| a.shards.clone())
        .collect();
    assert_eq!(shards.len(), 3, "no shard twice in a round");

    let (commit_a, payload_a) = honest_a.train(&plan0, &theta0, &welcome).await;
    let (commit_b, payload_b) = honest_b.train(&plan0, &theta0, &welcome).await;

    // Signed garbage: a tampered commit.
    let mut garbage = Signed::sign(&honest_a.key, &commit_a).unwrap();
    garbage.body[5] ^= 0xFF;
    let refused = honest_a.request(CoordinatorRequest::Commit(garbage)).await;
    assert!(
        matches!(&refused, CoordinatorResponse::Refused { reason } if reason.starts_with("bad-signature")),
        "{refused:?}"
    );
    // A commit for the wrong round.
    let mut future = commit_b.clone();
    future.round = 7;
    let refused = honest_b.commit(&future).await;
    assert!(
        matches!(&refused, CoordinatorResponse::Refused { reason } if reason.starts_with("wrong-round")),
        "{refused:?}"
    );

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
    assert_eq!((round, accepted), (0, 2));
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
    assert!(
        http_get(http, "/")
            .await
            .contains("<title>barnraise coordinator</title>")
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
        (2, 2 * commit_a.tokens),
        "counted once per round"
    );
    assert_eq!(row(&honest_b).accepted, 2);
    assert_eq!((row(&lazy).accepted, row(&lazy).credit), (0, 0.0));
    let from_disk = barnraise_coordinator::stats::read_contributors(data.path()).unwrap();
    assert_eq!(from_disk, summary.contributors);
    shutdown.cancel();
}
