//! Writes the fuzz seed corpus (fuzz/corpus/) from a real run.
//!
//! `cargo run --example fuzz_seeds -- UP_DIR OUT_DIR [DOCS_DIR]` reads the data dir that
//! `barnraise up --data-dir UP_DIR` left behind — the coordinator's ledger
//! (signed plans, commits and manifests, the run config), its blobs
//! (updates, shards, checkpoints), the nodes' receipts and state — and
//! writes one small file per seed under `OUT_DIR/<target>/`, named by its
//! hash. Messages a run does not keep (join, welcome, leave, the framed
//! requests) are rebuilt from the run's own values and signed with fresh
//! keys; large blobs are cut down (the first chunk of an update re-encoded,
//! the first tokens of a shard, a checkpoint of a small model) so the
//! corpus stays small. `DOCS_DIR` adds the TOML examples from the docs.

use anyhow::{Context, Result, bail};
use barnraise_coordinator::CoordinatorConfig;
use barnraise_protocol::codec::{self, CodecConfig, Encoder};
use barnraise_protocol::framing::write_framed;
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, BootstrapPeer, CheckpointRef, Commit, CoordinatorRequest,
    CoordinatorResponse, Framed, Join, Leave, Manifest, NodeCertificate, RoundPlan, RunConfig,
    ShardInfo, UpdateNotice, Welcome, WorkerInfo,
};
use barnraise_protocol::signed::{Message, Signed};
use barnraise_protocol::{Hash, SigningKey};
use barnraise_trainer::ModelConfig;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The selector bytes of the `wire` target (see fuzz/src/targets.rs).
const BODY: [u8; 7] = [0, 1, 2, 3, 4, 5, 6];
const ENVELOPE: u8 = 7;
const RPC: u8 = 14;
/// An update notice's body and envelope.
const NOTICE_BODY: u8 = 18;
const NOTICE_ENVELOPE: u8 = 19;

struct Corpus {
    out: PathBuf,
    counts: BTreeMap<&'static str, usize>,
}

impl Corpus {
    fn add(&mut self, target: &'static str, bytes: &[u8]) -> Result<()> {
        let dir = self.out.join(target);
        fs::create_dir_all(&dir)?;
        let name = &Hash::of(bytes).to_hex()[..16];
        fs::write(dir.join(name), bytes)?;
        *self.counts.entry(target).or_default() += 1;
        Ok(())
    }

    fn add_prefixed(&mut self, target: &'static str, prefix: &[u8], bytes: &[u8]) -> Result<()> {
        let mut all = prefix.to_vec();
        all.extend_from_slice(bytes);
        self.add(target, &all)
    }
}

fn main() -> Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (up, out, docs) = match args.as_slice() {
        [up, out] => (up, out, None),
        [up, out, docs] => (up, out, Some(docs)),
        _ => bail!("usage: fuzz_seeds UP_DATA_DIR OUT_DIR [DOCS_DIR]"),
    };
    let mut corpus = Corpus {
        out: out.clone(),
        counts: BTreeMap::new(),
    };
    let run = read_ledger(&up.join("coordinator/ledger.sqlite"))?;
    wire_and_framing(&mut corpus, &run)?;
    blobs(&mut corpus, &up.join("coordinator/blobs"), &run)?;
    nodes(&mut corpus, up)?;
    configs(&mut corpus, &run, docs.map(PathBuf::as_path))?;
    certificates(&mut corpus)?;
    journals(&mut corpus)?;
    http_paths(&mut corpus, &run)?;
    for (target, n) in &corpus.counts {
        println!("{target:>18}  {n} seeds");
    }
    Ok(())
}

/// What the coordinator's ledger kept of the run.
struct Run {
    config: CoordinatorConfig,
    plans: Vec<Signed<RoundPlan>>,
    commits: Vec<Signed<Commit>>,
    manifests: Vec<Signed<Manifest>>,
}

fn read_ledger(path: &Path) -> Result<Run> {
    let ledger = barnraise_coordinator::Ledger::open_existing(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let config_json = ledger
        .run_config_json()?
        .context("the ledger has no run config")?;
    let config: CoordinatorConfig = serde_json::from_str(&config_json)?;
    let mut run = Run {
        config,
        plans: Vec::new(),
        commits: Vec::new(),
        manifests: Vec::new(),
    };
    for (round, plan) in ledger.plans()? {
        run.plans.push(Signed::from_bytes(&plan)?);
        for commit in ledger.pending_commits(round)? {
            run.commits.push(Signed::from_bytes(&commit)?);
        }
        if let Some(manifest) = ledger.manifest(round)? {
            run.manifests.push(Signed::from_bytes(&manifest)?);
        }
    }
    Ok(run)
}

fn add_signed<T: Message>(corpus: &mut Corpus, signed: &Signed<T>, kind: u8) -> Result<()> {
    corpus.add_prefixed("wire", &[BODY[kind as usize]], &signed.body)?;
    corpus.add_prefixed("wire", &[ENVELOPE + kind], &signed.to_bytes()?)
}

fn add_rpc<M: Framed>(corpus: &mut Corpus, selector: u8, framing_kind: u8, m: &M) -> Result<()> {
    corpus.add_prefixed("wire", &[RPC + selector], &m.to_wire()?)?;
    let mut framed = Vec::new();
    futures::executor::block_on(write_framed(&mut futures::io::Cursor::new(&mut framed), m))?;
    // Byte 1 sets how many bytes each read returns (× 97): whole, and a trickle.
    corpus.add_prefixed("framing", &[framing_kind, 255], &framed)?;
    corpus.add_prefixed("framing", &[framing_kind, 1], &framed)
}

fn run_config(run: &Run) -> Result<(RunConfig, ModelConfig)> {
    let resolved = run.config.resolve()?;
    let shard = |seed: u8| ShardInfo {
        hash: Hash::of(&[seed]),
        tokens: 4096,
        bytes: 4096 * 2 + 1024,
    };
    let config = RunConfig {
        run_id: run.config.run_id.clone(),
        model_config_json: serde_json::to_string(&resolved.model)?,
        codec: resolved.codec.to_string(),
        inner_steps: run.config.inner_steps,
        batch_size: run.config.batch_size,
        seq_len: run.config.seq_len,
        inner_lr: run.config.inner_lr,
        outer_lr: run.config.outer_lr,
        outer_momentum: run.config.outer_momentum,
        aggregation: resolved.aggregation.to_string(),
        total_rounds: run.config.total_rounds,
        overlap_steps: 0,
        dataset: (0..3).map(shard).collect(),
        held_out: vec![shard(9)],
    };
    Ok((config, resolved.model))
}

fn wire_and_framing(corpus: &mut Corpus, run: &Run) -> Result<()> {
    // The run's own signed messages, a few of each.
    for plan in run.plans.iter().take(2) {
        add_signed(corpus, plan, 2)?;
        add_rpc(corpus, 1, 1, &CoordinatorResponse::Plan(Some(plan.clone())))?;
    }
    for commit in run.commits.iter().take(3) {
        add_signed(corpus, commit, 3)?;
        add_rpc(corpus, 0, 0, &CoordinatorRequest::Commit(commit.clone()))?;
    }
    for manifest in run.manifests.iter().take(2) {
        add_signed(corpus, manifest, 4)?;
        add_rpc(
            corpus,
            1,
            1,
            &CoordinatorResponse::Manifest(Some(manifest.clone())),
        )?;
    }
    // What the run did not keep, rebuilt from its values.
    let coordinator = SigningKey::from_seed([11; 32])?;
    let node = SigningKey::from_seed([12; 32])?;
    let org = SigningKey::from_seed([13; 32])?;
    let cert = Signed::sign(&org, &certificate_body(&org, &node))?;
    add_signed(corpus, &cert, 5)?;
    let run_id = run.config.run_id.clone();
    for certificate in [None, Some(cert)] {
        let join = Signed::sign(
            &node,
            &Join {
                protocol_version: barnraise_protocol::limits::PROTOCOL_VERSION,
                agent: "barnraise/0.1.0".into(),
                run_id: run_id.clone(),
                workers: vec![WorkerInfo {
                    device: "cpu".into(),
                    name: "x86_64 (2 threads)".into(),
                    memory_bytes: 24 << 30,
                }],
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/40123".into()],
                certificate,
                timestamp_ms: 1_764_000_000_000,
            },
        )?;
        add_signed(corpus, &join, 0)?;
        add_rpc(corpus, 0, 0, &CoordinatorRequest::Join(join))?;
    }
    let (config, _) = run_config(run)?;
    let head = run
        .manifests
        .last()
        .map(Signed::body_hash)
        .unwrap_or(Hash::ZERO);
    for checkpoint in [
        None,
        Some(CheckpointRef {
            round: 1,
            blob: Hash::of(b"checkpoint"),
            bytes: 532_000,
            params_hash: Hash::of(b"params"),
            optimizer_blob: Hash::of(b"momentum"),
            optimizer_bytes: 531_000,
        }),
    ] {
        let welcome = Signed::sign(
            &coordinator,
            &Welcome {
                node: node.node_id(),
                config: config.clone(),
                current_round: 2,
                params_hash: Hash::of(b"params"),
                checkpoint,
                head_manifest: head,
                bootstrap: vec![BootstrapPeer {
                    peer: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN".into(),
                    addrs: vec!["/ip4/203.0.113.7/udp/4001/quic-v1".into()],
                }],
            },
        )?;
        add_signed(corpus, &welcome, 1)?;
        add_rpc(corpus, 1, 1, &CoordinatorResponse::Welcome(welcome))?;
    }
    let leave = Signed::sign(
        &node,
        &Leave {
            run_id,
            timestamp_ms: 1_764_000_000_000,
        },
    )?;
    add_signed(corpus, &leave, 6)?;
    let notice = Signed::sign(
        &coordinator,
        &UpdateNotice {
            run_id: run.config.run_id.clone(),
            round: 2,
            node: node.node_id(),
            update_hash: Hash::of(b"update"),
            update_bytes: 1_242_720,
        },
    )?;
    corpus.add_prefixed("wire", &[NOTICE_BODY], &notice.body)?;
    corpus.add_prefixed("wire", &[NOTICE_ENVELOPE], &notice.to_bytes()?)?;
    add_rpc(corpus, 0, 0, &CoordinatorRequest::Leave(leave))?;
    add_rpc(corpus, 0, 0, &CoordinatorRequest::CurrentPlan)?;
    add_rpc(corpus, 0, 0, &CoordinatorRequest::Manifest { round: 3 })?;
    add_rpc(
        corpus,
        1,
        1,
        &CoordinatorResponse::CommitAccepted { round: 3 },
    )?;
    add_rpc(corpus, 1, 1, &CoordinatorResponse::Ok)?;
    add_rpc(
        corpus,
        1,
        1,
        &CoordinatorResponse::Refused {
            reason: "round 3 is closed".into(),
        },
    )?;
    let blob = run
        .commits
        .first()
        .and_then(|c| c.verify(None).ok())
        .map(|c| c.update_hash)
        .unwrap_or(Hash::ZERO);
    add_rpc(corpus, 2, 2, &BlobRequest::Have { hash: blob })?;
    add_rpc(
        corpus,
        2,
        2,
        &BlobRequest::Chunk {
            hash: blob,
            offset: 1 << 20,
            len: 1 << 20,
        },
    )?;
    add_rpc(corpus, 3, 3, &BlobResponse::Have { size: Some(3_900) })?;
    add_rpc(corpus, 3, 3, &BlobResponse::NotFound)?;
    add_rpc(
        corpus,
        3,
        3,
        &BlobResponse::Chunk {
            data: (0..200u8).collect(),
        },
    )
}

fn certificate_body(org: &SigningKey, node: &SigningKey) -> NodeCertificate {
    NodeCertificate {
        org: org.org_id(),
        org_name: "Example University".into(),
        node: node.node_id(),
        issued_ms: 1_764_000_000_000,
        expires_ms: 1_795_536_000_000,
        max_workers: 8,
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Updates, shards and checkpoints from the coordinator's blob store.
fn blobs(corpus: &mut Corpus, dir: &Path, run: &Run) -> Result<()> {
    let (_, model) = run_config(run)?;
    let mut update: Option<Vec<f32>> = None;
    let mut shards = 0;
    for path in files_under(dir) {
        let bytes = fs::read(&path)?;
        if let Ok(header) = codec::peek_header(&bytes) {
            if update.is_none()
                && let Ok(values) = codec::decode(&bytes, codec::MAX_UPDATE_PARAMS)
            {
                println!(
                    "update {} ({}, {} params)",
                    path.display(),
                    header.config,
                    header.params
                );
                update = Some(values);
            }
        } else if let Ok(shard) = barnraise_trainer::data::Shard::decode(&bytes, &path) {
            if shards < 2 {
                let head = &shard.tokens[..shard.tokens.len().min(1024 + shards * 512)];
                corpus.add(
                    "shard",
                    &barnraise_trainer::data::encode_shard(head, &path)?,
                )?;
                shards += 1;
            }
        } else if let Ok(ckpt) = barnraise_trainer::checkpoint::from_bytes(&bytes, &path, &model) {
            small_checkpoints(corpus, &ckpt)?;
        }
    }
    // The first 4096 values of a real update, in every codec and layout.
    let values = update.context("no update payload among the coordinator's blobs")?;
    let head = &values[..values.len().min(4096)];
    for spec in [
        "fp32",
        "int8:256",
        "int8:1024",
        "topk:4096:64:2",
        "topk:1024:16:4",
        "topk:4096:2048:4",
        "topk:512:256:8",
        "topk:64:64:2",
    ] {
        let config: CodecConfig = spec.parse()?;
        let mut encoder = Encoder::new(config, head.len())?;
        corpus.add("codec", &encoder.encode(head)?)?;
    }
    Ok(())
}

/// Checkpoints of a small model in the real format, params taken from the
/// run's checkpoint: with and without the outer momentum.
fn small_checkpoints(
    corpus: &mut Corpus,
    real: &barnraise_trainer::checkpoint::Checkpoint,
) -> Result<()> {
    use barnraise_trainer::checkpoint::{CheckpointMeta, to_bytes};
    let small = ModelConfig {
        vocab_size: 16,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        d_ff: 8,
        max_seq_len: 8,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
    };
    let n = small.params_count();
    let params = real.params[..n].to_vec();
    let momentum = vec![0.001f32; n];
    let meta = CheckpointMeta {
        run: real.meta.run.clone(),
        round: real.meta.round,
        params_hash: Hash::of_f32s(&params),
    };
    let path = Path::new("seed");
    corpus.add("checkpoint", &to_bytes(path, &small, &params, None, &meta)?)?;
    corpus.add(
        "checkpoint",
        &to_bytes(path, &small, &params, Some(&momentum), &meta)?,
    )
}

/// Receipts, run facts and saved state of each node.
fn nodes(corpus: &mut Corpus, up: &Path) -> Result<()> {
    for entry in fs::read_dir(up)?.flatten() {
        let dir = entry.path();
        if !dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("node-"))
        {
            continue;
        }
        let receipts = dir.join("receipts");
        for (i, path) in files_under(&receipts).iter().enumerate() {
            let bytes = fs::read(path)?;
            if path.extension().is_some_and(|e| e == "manifest") && i < 2 {
                corpus.add_prefixed("receipt", &[0], &bytes)?;
            } else if path.file_name().is_some_and(|n| n == "run.json") {
                corpus.add_prefixed("receipt", &[1], &bytes)?;
            }
        }
        if let Ok(state) = fs::read(dir.join("state/state.json")) {
            corpus.add("node_state", &state)?;
        }
    }
    Ok(())
}

/// `run.toml` and `node.toml`: the run's own config as TOML, a node config
/// like `up` builds, and the examples in the docs.
fn configs(corpus: &mut Corpus, run: &Run, docs: Option<&Path>) -> Result<()> {
    corpus.add("run_config", toml::to_string(&run.config)?.as_bytes())?;
    let node = barnraise_node::NodeConfig {
        data_dir: "/var/lib/barnraise".into(),
        device: "cpu".into(),
        workers: Some(2),
        ..Default::default()
    };
    corpus.add("node_config", toml::to_string(&node)?.as_bytes())?;
    let Some(docs) = docs else { return Ok(()) };
    for (file, target) in [
        ("running-a-coordinator.md", "run_config"),
        ("running-a-node.md", "node_config"),
        ("institutions.md", "node_config"),
    ] {
        let Ok(text) = fs::read_to_string(docs.join(file)) else {
            continue;
        };
        for block in text.split("```toml\n").skip(1) {
            if let Some((toml, _)) = block.split_once("```") {
                corpus.add(target, toml.as_bytes())?;
            }
        }
    }
    Ok(())
}

fn certificates(corpus: &mut Corpus) -> Result<()> {
    use barnraise_protocol::certificate::render;
    let org = SigningKey::from_seed([21; 32])?;
    let node = SigningKey::from_seed([22; 32])?;
    let mut body = certificate_body(&org, &node);
    let cert = Signed::sign(&org, &body)?;
    corpus.add("certificate", render(&cert, Path::new("seed"))?.as_bytes())?;
    body.expires_ms = body.issued_ms + 1;
    body.org_name = "Another Lab".into();
    let expired = Signed::sign(&org, &body)?;
    corpus.add(
        "certificate",
        render(&expired, Path::new("seed"))?.as_bytes(),
    )
}

/// A download journal as the blob store writes it: a three-chunk blob with
/// two chunks done.
fn journals(corpus: &mut Corpus) -> Result<()> {
    use barnraise_node::store::{BlobStore, chunk_range};
    let dir = tempfile::tempdir()?;
    let store = BlobStore::open(dir.path())?;
    let size = 2 * barnraise_protocol::limits::BLOB_CHUNK_BYTES as u64 + 777;
    let blob: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let hash = Hash::of(&blob);
    let partial = store.partial(hash, size)?;
    for index in [0u64, 2] {
        let (offset, len) = chunk_range(size, index);
        partial.write_chunk(index, &blob[offset as usize..(offset + len) as usize])?;
    }
    let journal = fs::read(
        dir.path()
            .join(format!("partial/{}.journal", hash.to_hex())),
    )?;
    corpus.add_prefixed("blob_journal", &size.to_le_bytes(), &journal)
}

fn http_paths(corpus: &mut Corpus, run: &Run) -> Result<()> {
    let node = run
        .commits
        .first()
        .map(|c| c.signer.to_hex())
        .unwrap_or_default();
    for path in [
        "/".to_string(),
        "/api/v1/run".into(),
        "/api/v1/overview".into(),
        "/api/v1/rounds".into(),
        "/api/v1/rounds/1".into(),
        "/api/v1/nodes".into(),
        format!("/api/v1/nodes/{node}"),
        format!("/nodes/{node}"),
        "/api/v1/contributors".into(),
        "/api/v1/orgs".into(),
        "/api/v1/orgs/none".into(),
        "/orgs/none".into(),
        "/rounds/0".into(),
        "/metrics".into(),
    ] {
        corpus.add("http_api", path.as_bytes())?;
    }
    Ok(())
}
