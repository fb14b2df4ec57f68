//! One function per fuzz target. Each takes libFuzzer's bytes, runs the
//! decoder the project uses on bytes from a peer or a file, and panics —
//! a finding — when the decoder breaks a promise. The bounds on memory are
//! the ones docs/security.md documents for each decoder.

use crate::alloc::{assert_within, peak_of};
use barnraise_protocol::codec::{self, CodecConfig, Encoder};
use barnraise_protocol::framing::{INITIAL_BUFFER, read_framed, write_framed};
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, Commit, CoordinatorRequest, CoordinatorResponse, Framed, Join,
    Leave, Manifest, NodeCertificate, RoundPlan, UpdateNotice, Welcome,
};
use barnraise_protocol::signed::{Message, Signed};
use barnraise_protocol::{SigningKey, wire};
use std::fmt::Debug;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

const KIB: usize = 1024;

/// Most params a codec input may claim for the harness to allocate its
/// buffers (16 MiB of f32); larger headers are checked for refusal only.
const MAX_FUZZ_PARAMS: usize = 1 << 22;

fn path() -> &'static Path {
    Path::new("fuzz-input")
}

/// The wire decoder's documented bound: list fields reserve at most
/// `wire::PREALLOC_BYTES` before their elements arrive, then grow with
/// them. An element takes at most 24 times its smallest encoding in memory
/// (an empty string is one byte on the wire and 24 in memory), and while a
/// list doubles its old and new buffers both exist (3× its elements), so a
/// decode holds at most 72 bytes per input byte plus a few reservations;
/// the bound leaves room to 128.
fn wire_bound(input: usize) -> usize {
    128 * input + 16 * barnraise_protocol::wire::PREALLOC_BYTES
}

/// JSON files (our own state and manifests): the parsed value, and error
/// messages that quote the input escaped (up to 6 bytes per input byte).
fn json_bound(input: usize) -> usize {
    32 * input + 64 * KIB
}

/// TOML config files: the document tree the parser builds, then the typed
/// config. Nested inline tables are the costly case: each `{` opens a
/// table, and a 970-byte input of them took 317 KiB at peak (found by the
/// `node_config` target against an earlier bound of 64 bytes per byte).
fn toml_bound(input: usize) -> usize {
    512 * input + 256 * KIB
}

/// Decodes `bytes` as a message body of type `T` and checks that what
/// decodes re-encodes to a fixed point no longer than the input.
fn body<T: Message + Debug>(bytes: &[u8]) -> Option<T> {
    let (decoded, peak) = peak_of(|| wire::decode::<T>(T::NAME, bytes, T::MAX_BYTES));
    assert_within(T::NAME, bytes.len(), peak, wire_bound(bytes.len()));
    let message = decoded.ok()?;
    let again = wire::encode(T::NAME, &message, T::MAX_BYTES)
        .unwrap_or_else(|e| panic!("{}: a decoded message does not re-encode: {e}", T::NAME));
    assert!(
        again.len() <= bytes.len(),
        "{}: re-encoding grew {} bytes to {}",
        T::NAME,
        bytes.len(),
        again.len()
    );
    let back: T = wire::decode(T::NAME, &again, T::MAX_BYTES)
        .unwrap_or_else(|e| panic!("{}: the re-encoding does not decode: {e}", T::NAME));
    let third = wire::encode(T::NAME, &back, T::MAX_BYTES).expect("re-encodes twice");
    assert_eq!(third, again, "{}: encode∘decode is not stable", T::NAME);
    Some(message)
}

/// Decodes a whole signed envelope of kind `T`, checks its re-encoding,
/// and verifies it (a valid signature only where the input kept one).
fn envelope<T: Message + Debug>(bytes: &[u8]) {
    let (decoded, peak) = peak_of(|| Signed::<T>::from_bytes(bytes));
    assert_within(T::NAME, bytes.len(), peak, wire_bound(bytes.len()));
    let Ok(signed) = decoded else { return };
    let again = signed.to_bytes().expect("a decoded envelope re-encodes");
    let back = Signed::<T>::from_bytes(&again).expect("the re-encoded envelope decodes");
    assert_eq!(
        back.to_bytes().expect("re-encodes twice"),
        again,
        "{}: envelope round trip",
        T::NAME
    );
    // Pinned to someone else: refused before the body is looked at.
    let stranger = SigningKey::from_seed([7; 32]).expect("a fixed seed is a key");
    if stranger.public() != signed.signer {
        assert!(signed.verify(Some(&stranger.public())).is_err());
    }
    if let Ok(message) = signed.verify(None) {
        let body = wire::encode(T::NAME, &message, T::MAX_BYTES).expect("verified re-encodes");
        assert!(body.len() <= signed.body.len());
    }
}

fn framed_round_trip<M: Framed + Debug>(bytes: &[u8], what: &str) {
    let (decoded, peak) = peak_of(|| M::from_wire(bytes));
    assert_within(what, bytes.len(), peak, wire_bound(bytes.len()));
    if let Ok(message) = decoded {
        let again = message.to_wire().expect("a decoded message re-encodes");
        let back = M::from_wire(&again).expect("the re-encoding decodes");
        assert_eq!(back.to_wire().expect("twice"), again, "{what}: not stable");
    }
}

/// Every wire message: the first byte picks the kind, the rest is the input.
/// Kinds 0–6 are message bodies (what a verified envelope decodes), 7–13
/// whole envelopes, 14–17 the request-response messages.
pub fn wire(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 20 {
        0 => {
            body::<Join>(rest);
        }
        1 => {
            if let Some(welcome) = body::<Welcome>(rest) {
                // What a node does with a welcome's run config: it must
                // refuse bad values, never panic or hang on them, and size
                // nothing it then cannot hold.
                if let Ok((model, _, _)) = barnraise_node::daemon::parse_run_config(&welcome.config)
                {
                    let params = model.params_count();
                    assert!(
                        params <= codec::MAX_UPDATE_PARAMS,
                        "a {params}-param model passed"
                    );
                    let _ = model.flops_per_token_at(welcome.config.seq_len as usize);
                }
            }
        }
        2 => {
            body::<RoundPlan>(rest);
        }
        3 => {
            body::<Commit>(rest);
        }
        4 => {
            body::<Manifest>(rest);
        }
        5 => {
            body::<NodeCertificate>(rest);
        }
        6 => {
            body::<Leave>(rest);
        }
        7 => envelope::<Join>(rest),
        8 => envelope::<Welcome>(rest),
        9 => envelope::<RoundPlan>(rest),
        10 => envelope::<Commit>(rest),
        11 => envelope::<Manifest>(rest),
        12 => envelope::<NodeCertificate>(rest),
        13 => envelope::<Leave>(rest),
        14 => framed_round_trip::<CoordinatorRequest>(rest, "coordinator request"),
        15 => framed_round_trip::<CoordinatorResponse>(rest, "coordinator response"),
        16 => framed_round_trip::<BlobRequest>(rest, "blob request"),
        17 => framed_round_trip::<BlobResponse>(rest, "blob response"),
        18 => {
            body::<UpdateNotice>(rest);
        }
        _ => envelope::<UpdateNotice>(rest),
    }
}

/// An async reader that hands out at most `step` bytes per read, as a
/// network stream does.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl futures::AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(n))
    }
}

fn read_one<M: Framed + Debug + PartialEq>(stream: &[u8], step: usize, what: &str) {
    let mut reader = Trickle { data: stream, step };
    let (result, peak) = peak_of(|| futures::executor::block_on(read_framed::<M, _>(&mut reader)));
    // The reader's buffer grows only with bytes that arrived.
    let bound = INITIAL_BUFFER + 2 * stream.len() + wire_bound(stream.len());
    assert_within(what, stream.len(), peak, bound);
    let Ok(message) = result else { return };
    let mut out = Vec::new();
    futures::executor::block_on(write_framed(
        &mut futures::io::Cursor::new(&mut out),
        &message,
    ))
    .unwrap_or_else(|e| panic!("{what}: a read message does not write back: {e}"));
    let back: M = futures::executor::block_on(read_framed(&mut futures::io::Cursor::new(&out)))
        .unwrap_or_else(|e| panic!("{what}: a written frame does not read back: {e}"));
    assert_eq!(back, message, "{what}: frame round trip");
}

/// The length-prefixed framing of the request-response protocols, read
/// from a stream that delivers a few bytes at a time. Byte 0 picks the
/// message kind, byte 1 how many bytes each read returns.
pub fn framing(data: &[u8]) {
    let [kind, step, stream @ ..] = data else {
        return;
    };
    let step = usize::from(*step).max(1) * 97;
    match kind % 4 {
        0 => read_one::<CoordinatorRequest>(stream, step, "coordinator request"),
        1 => read_one::<CoordinatorResponse>(stream, step, "coordinator response"),
        2 => read_one::<BlobRequest>(stream, step, "blob request"),
        _ => read_one::<BlobResponse>(stream, step, "blob response"),
    }
}

/// A recognisable buffer, so any write by a failed decode shows.
fn pattern(len: usize) -> Vec<f32> {
    (0..len).map(|i| (i % 97) as f32 * 0.25 - 7.0).collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Every update codec: `decode_into`, `decode_add` and `decode` agree on
/// what is valid; an error leaves the caller's buffer as it was; a valid
/// payload yields finite values, `decode_add` adds exactly
/// `acc + weight·value`, and fp32 re-encodes to the same bytes.
pub fn codec(data: &[u8]) {
    let (whole, peak) = peak_of(|| codec::decode(data, MAX_FUZZ_PARAMS));
    let header = match codec::peek_header(data) {
        Ok(header) => header,
        Err(_) => {
            assert!(whole.is_err(), "decode accepted what peek_header refused");
            assert_within("codec decode (bad header)", data.len(), peak, 4 * KIB);
            return;
        }
    };
    let Ok(params) = usize::try_from(header.params) else {
        return;
    };
    // `decode` allocates the output and nothing in proportion to the input.
    assert_within(
        "codec decode",
        data.len(),
        peak,
        4 * params.min(MAX_FUZZ_PARAMS) + 4 * KIB,
    );
    if params > MAX_FUZZ_PARAMS {
        assert!(whole.is_err(), "decode went over its max_params");
        return;
    }

    let start = pattern(params);
    let mut out = start.clone();
    let (into, peak) = peak_of(|| codec::decode_into(data, &mut out));
    assert_within("codec decode_into", data.len(), peak, 4 * KIB);
    let weight = 0.75f32;
    let mut acc = start.clone();
    let (add, peak) = peak_of(|| codec::decode_add(data, weight, &mut acc));
    assert_within("codec decode_add", data.len(), peak, 4 * KIB);

    assert_eq!(
        into.is_ok(),
        whole.is_ok(),
        "decode_into and decode disagree"
    );
    assert_eq!(add.is_ok(), whole.is_ok(), "decode_add and decode disagree");
    // The robust rule's readers (no decoded copies) check what decode checks.
    assert_eq!(
        codec::visit_kept(data, params, |_, _| {}).is_ok(),
        whole.is_ok(),
        "visit_kept and decode disagree"
    );
    assert_eq!(
        codec::values(data, params).is_ok(),
        whole.is_ok(),
        "values and decode disagree"
    );
    let Ok(values) = whole else {
        assert!(same_bits(&out, &start), "decode_into wrote before failing");
        assert!(same_bits(&acc, &start), "decode_add wrote before failing");
        return;
    };
    assert!(
        values.iter().all(|v| v.is_finite()),
        "a decoded value is not finite"
    );
    assert!(same_bits(&out, &values), "decode_into and decode differ");
    // ... and read the same values: top-k's kept ones in index order (the
    // rest +0.0), the dense formats' one at a time.
    let mut kept = vec![0.0f32; params];
    let mut last: Option<usize> = None;
    let sparse = codec::visit_kept(data, params, |i, v| {
        assert!(last.is_none_or(|l| i > l), "visit_kept out of order at {i}");
        last = Some(i);
        kept[i] = v;
    })
    .expect("visit_kept accepts what decode accepts");
    assert_eq!(sparse, matches!(header.config, CodecConfig::TopK { .. }));
    if sparse {
        assert!(same_bits(&kept, &values), "visit_kept and decode differ");
    }
    if let Some(view) = codec::values(data, params).expect("values accepts what decode accepts") {
        for (i, v) in values.iter().enumerate() {
            assert_eq!(
                view.get(i).to_bits(),
                v.to_bits(),
                "values and decode differ at {i}"
            );
        }
    } else {
        assert!(sparse, "values refused a dense format");
    }
    for i in 0..params {
        let expected = start[i] + weight * values[i];
        assert_eq!(
            acc[i].to_bits(),
            expected.to_bits(),
            "decode_add at {i}: {} + {weight}·{} gave {}",
            start[i],
            values[i],
            acc[i]
        );
    }
    // Re-encoding what was decoded gives a valid payload of the same shape;
    // for fp32 (the one canonical format) the very same bytes.
    let mut encoder = Encoder::new(header.config, params).expect("a decoded config is valid");
    let again = encoder.encode(&values).expect("decoded values re-encode");
    if header.config == CodecConfig::Fp32 {
        assert_eq!(again, data, "fp32 does not re-encode to its own bytes");
    }
    let back = codec::peek_header(&again).expect("a re-encoding has a good header");
    assert_eq!((back.config, back.params), (header.config, header.params));
    assert!(
        codec::decode(&again, MAX_FUZZ_PARAMS).is_ok(),
        "re-encoding refused"
    );
}

/// Org certificate files: what loads renders back to a file that loads to
/// the same certificate.
pub fn certificate(data: &[u8]) {
    use barnraise_protocol::certificate::{parse_certificate, render};
    let (parsed, peak) = peak_of(|| parse_certificate(data, path()));
    assert_within("certificate", data.len(), peak, 2 * data.len() + 8 * KIB);
    let Ok(cert) = parsed else { return };
    let text = render(&cert, path()).expect("a loaded certificate renders");
    let back = parse_certificate(text.as_bytes(), path()).expect("a rendered file loads");
    assert_eq!(back, cert, "certificate file round trip");
}

/// llm.c token shards: a valid file is exactly the encoding of its tokens.
pub fn shard(data: &[u8]) {
    use barnraise_trainer::data::{SHARD_HEADER_BYTES, Shard, encode_shard};
    let (decoded, peak) = peak_of(|| Shard::decode(data, path()));
    assert_within("shard", data.len(), peak, data.len() + KIB);
    let Ok(shard) = decoded else { return };
    assert_eq!(shard.hash, barnraise_protocol::Hash::of(data));
    // The encoding is canonical except for the header's reserved words,
    // which llm.c writes as zeros and readers ignore.
    let again = encode_shard(&shard.tokens, path()).expect("decoded tokens re-encode");
    assert_eq!(again.len(), data.len());
    assert_eq!(again[..12], data[..12], "shard header differs");
    assert_eq!(
        again[SHARD_HEADER_BYTES..],
        data[SHARD_HEADER_BYTES..],
        "tokens differ"
    );
}

/// The dataset manifest (`dataset.json`).
pub fn dataset_manifest(data: &[u8]) {
    use barnraise_trainer::data::DatasetManifest;
    let (parsed, peak) = peak_of(|| DatasetManifest::from_json(data, path()));
    assert_within("dataset manifest", data.len(), peak, json_bound(data.len()));
    let Ok(manifest) = parsed else { return };
    let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let back = DatasetManifest::from_json(&json, path()).expect("its JSON parses");
    assert_eq!(back, manifest, "dataset manifest round trip");
}

/// The model config a small checkpoint input is checked against: the one it
/// names, if that is a valid model of at most 64k params, else a fixed one.
fn checkpoint_config(data: &[u8]) -> barnraise_trainer::ModelConfig {
    use barnraise_trainer::ModelConfig;
    let fallback = ModelConfig {
        vocab_size: 16,
        d_model: 8,
        n_layers: 1,
        n_heads: 2,
        d_ff: 8,
        max_seq_len: 8,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
    };
    let named = safetensors::SafeTensors::read_metadata(data)
        .ok()
        .and_then(|(_, meta)| {
            let json = meta
                .metadata()
                .as_ref()?
                .get(barnraise_trainer::checkpoint::KEY_CONFIG)?
                .clone();
            serde_json::from_str::<ModelConfig>(&json).ok()
        })
        .filter(|c| {
            c.validate().is_ok()
                && [c.vocab_size, c.d_model, c.d_ff, c.n_layers]
                    .iter()
                    .all(|&d| d <= 64)
                && c.params_count() <= 1 << 16
        });
    named.unwrap_or(fallback)
}

/// safetensors checkpoints: what loads saves back to bytes that load to the
/// same checkpoint.
pub fn checkpoint(data: &[u8]) {
    use barnraise_trainer::checkpoint::{from_bytes, to_bytes};
    let expected = checkpoint_config(data);
    let (loaded, peak) = peak_of(|| from_bytes(data, path(), &expected));
    assert_within("checkpoint", data.len(), peak, 4 * data.len() + 64 * KIB);
    let Ok(ckpt) = loaded else { return };
    assert_eq!(ckpt.params.len(), expected.params_count());
    let again = to_bytes(
        path(),
        &ckpt.config,
        &ckpt.params,
        ckpt.outer_momentum.as_deref(),
        &ckpt.meta,
    )
    .expect("a loaded checkpoint saves");
    let back = from_bytes(&again, path(), &expected).expect("a saved checkpoint loads");
    assert!(same_bits(&back.params, &ckpt.params), "params round trip");
    assert_eq!(back.meta, ckpt.meta);
    assert_eq!(back.config, ckpt.config);
    match (&back.outer_momentum, &ckpt.outer_momentum) {
        (Some(a), Some(b)) => assert!(same_bits(a, b), "momentum round trip"),
        (None, None) => {}
        _ => panic!("momentum lost or invented in the round trip"),
    }
}

/// `run.toml`: parsing and then resolving every field refuses bad values
/// with an error.
pub fn run_config(data: &[u8]) {
    use barnraise_coordinator::CoordinatorConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (parsed, peak) =
        peak_of(|| CoordinatorConfig::from_toml_str(text, path(), Path::new("/run")));
    assert_within("run.toml", data.len(), peak, toml_bound(data.len()));
    if let Ok(config) = parsed {
        let (_, peak) = peak_of(|| config.resolve());
        assert_within("run.toml resolve", data.len(), peak, toml_bound(data.len()));
    }
}

/// `node.toml`: parsing, then the worker list it implies.
pub fn node_config(data: &[u8]) {
    use barnraise_node::NodeConfig;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (parsed, peak) = peak_of(|| NodeConfig::from_toml_str(text));
    assert_within("node.toml", data.len(), peak, toml_bound(data.len()));
    if let Ok(config) = parsed {
        let (devices, _) = peak_of(|| config.worker_devices());
        if let Ok(devices) = devices {
            assert!(devices.len() <= barnraise_node::cluster::MAX_WORKERS);
        }
    }
}

/// Receipts: a signed manifest file read for one node (byte 0 even), or
/// `receipts/run.json` (odd).
pub fn receipt(data: &[u8]) {
    use barnraise_node::receipts::{parse_receipt, parse_run_facts, totals};
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 1 {
        let (facts, peak) = peak_of(|| parse_run_facts(rest));
        assert_within("run.json", rest.len(), peak, json_bound(rest.len()));
        if let Ok(facts) = facts {
            let _ = totals(&[], Some(&facts));
        }
        return;
    }
    let me = SigningKey::from_seed([1; 32]).expect("a fixed seed is a key");
    let (receipt, peak) = peak_of(|| parse_receipt(rest, &me.node_id(), None));
    assert_within("receipt", rest.len(), peak, wire_bound(rest.len()));
    if let Ok(receipt) = receipt {
        let t = totals(std::slice::from_ref(&receipt), None);
        assert!(t.rounds <= 1);
    }
}

/// The blob store's download journal: the first 8 bytes are the blob size
/// the journal is opened for, the rest the journal file.
pub fn blob_journal(data: &[u8]) {
    use barnraise_node::store::parse_journal;
    let Some((size, journal)) = data.split_first_chunk::<8>() else {
        return;
    };
    let size = u64::from_le_bytes(*size);
    let (records, peak) = peak_of(|| parse_journal(journal, size));
    assert_within("blob journal", journal.len(), peak, 2 * journal.len() + KIB);
    if let Some(records) = records {
        assert_eq!(records.len(), journal.len().saturating_sub(16) / 40);
    }
}

/// The node's `state/state.json`.
pub fn node_state(data: &[u8]) {
    use barnraise_node::state::StateRecord;
    let (parsed, peak) = peak_of(|| StateRecord::from_json(data));
    assert_within("state.json", data.len(), peak, json_bound(data.len()));
    let Ok(record) = parsed else { return };
    let json = serde_json::to_vec(&record).expect("a record serializes");
    assert_eq!(
        StateRecord::from_json(&json).expect("its JSON parses"),
        record
    );
}

struct Api {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    _dir: tempfile::TempDir,
}

fn api() -> &'static Api {
    use barnraise_coordinator::http::{HttpState, router};
    use std::sync::{Arc, Mutex, OnceLock, RwLock};
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir");
        let ledger = barnraise_coordinator::Ledger::open(&dir.path().join("ledger.sqlite"))
            .expect("a new ledger");
        ledger.bind_run("fuzz-run", "{}", 1).expect("bind run");
        let node = SigningKey::from_seed([3; 32]).expect("a key").node_id();
        ledger
            .upsert_node(&barnraise_coordinator::ledger::NodeRow {
                node: node.to_string(),
                org: None,
                org_name: None,
                agent: "barnraise/fuzz".into(),
                workers: 1,
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
                first_seen_ms: 1,
                last_seen_ms: 2,
                certificate: None,
            })
            .expect("a node row");
        let state = HttpState {
            ledger: barnraise_coordinator::ledger::Readers::shared(Arc::new(Mutex::new(ledger))),
            live: Arc::new(RwLock::new(Default::default())),
            metrics: Arc::new(barnraise_coordinator::metrics::Metrics::new()),
            // No data dir: the record's paths answer 404 (a data dir the
            // fuzzer's ledger cannot build a record from would be a 500).
            data_dir: None,
            record: Arc::default(),
            closed: Arc::default(),
        };
        Api {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
            router: router(state),
            _dir: dir,
        }
    })
}

/// The HTTP API and dashboard: any request path (the input, as a URI) is
/// answered, never with a server error.
pub fn http_api(data: &[u8]) {
    use tower::ServiceExt;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let uri = if text.starts_with('/') {
        text.to_string()
    } else {
        format!("/{text}")
    };
    let Ok(request) = axum::http::Request::get(uri.as_str()).body(axum::body::Body::empty()) else {
        return;
    };
    let api = api();
    let response = api
        .runtime
        .block_on(api.router.clone().oneshot(request))
        .expect("the router is infallible");
    assert!(
        !response.status().is_server_error(),
        "GET {uri:?} answered {}",
        response.status()
    );
}
