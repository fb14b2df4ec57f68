//! The messages of a round, in the order they appear.
//!
//! ```text
//! node                                   coordinator
//!  | -- Signed<Join> (version, hardware, cert) -->|
//!  |<-- Signed<Welcome> (run config, round, θ hash, checkpoint) --|
//!  |<-- Signed<RoundPlan> (per-node shards, H, seed, deadline) ---|  also gossiped
//!  |   ... fetch shard, train H steps, encode Δ, store as blob ...
//!  | -- Signed<Commit> (round, update hash, size, tokens, losses) -->|
//!  |   ... coordinator fetches the update blob and verifies it ...
//!  |<-- Signed<Manifest> (accepted/rejected, next θ hash, chain) --|  also gossiped
//! ```
//!
//! Every message here travels inside a [`Signed`] envelope; the envelope's
//! signer is the sender's identity, so messages do not repeat it.

use crate::hash::Hash;
use crate::identity::{NodeId, OrgId};
use crate::limits::*;
use crate::signed::{Message, MessageKind, Signed};
use serde::{Deserialize, Serialize};

/// A training device a node offers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// "cpu" or "cuda:N".
    pub device: String,
    /// Human-readable device name (GPU model, CPU brand).
    pub name: String,
    pub memory_bytes: u64,
}

/// A node's request to take part in a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub protocol_version: u32,
    /// Software name and version, e.g. "barnraise/0.1.0".
    pub agent: String,
    pub run_id: String,
    #[serde(deserialize_with = "crate::wire::seq")]
    pub workers: Vec<WorkerInfo>,
    /// Multiaddrs the node listens on, so peers can fetch its updates.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub listen_addrs: Vec<String>,
    /// Certificate from the node's org, if it has one.
    pub certificate: Option<Signed<NodeCertificate>>,
    /// Milliseconds since the Unix epoch; joins far from the coordinator's
    /// clock are refused, so an old join cannot be replayed.
    pub timestamp_ms: u64,
}

/// A content-addressed shard of the dataset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub hash: Hash,
    pub tokens: u64,
    pub bytes: u64,
}

/// The hyperparameters every party of a run agrees on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub run_id: String,
    /// The trainer's model config, as JSON; its hash is part of the run's identity.
    pub model_config_json: String,
    /// Update codec, e.g. "topk:4096:64:2".
    pub codec: String,
    pub inner_steps: u32,
    pub batch_size: u32,
    pub seq_len: u32,
    pub inner_lr: f32,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    /// Aggregation rule name, e.g. "mean", "trimmed-mean:0.2".
    pub aggregation: String,
    pub total_rounds: u64,
    /// The most inner steps of a round a node may train after its commit,
    /// while its update travels, carrying them into its next round
    /// (docs/architecture.md, "Overlapped rounds"); 0: synchronous rounds.
    #[serde(default)]
    pub overlap_steps: u32,
    #[serde(deserialize_with = "crate::wire::seq")]
    pub dataset: Vec<ShardInfo>,
    /// Shards held out for evaluation; never assigned for training.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub held_out: Vec<ShardInfo>,
}

/// Where to get the global params a round starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRef {
    /// The round whose start these params are (θ_round).
    pub round: u64,
    pub blob: Hash,
    pub bytes: u64,
    pub params_hash: Hash,
    /// The outer optimizer state travels with θ so a resyncing node continues
    /// bit-identically; this names that blob.
    pub optimizer_blob: Hash,
    pub optimizer_bytes: u64,
}

/// The coordinator's answer to a `Join`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub node: NodeId,
    pub config: RunConfig,
    /// The round now open (or about to open).
    pub current_round: u64,
    /// Hash of θ_current_round.
    pub params_hash: Hash,
    pub checkpoint: Option<CheckpointRef>,
    /// Hash of the latest manifest, the head of the chain.
    pub head_manifest: Hash,
    /// Peers to bootstrap the run's DHT from: the coordinator first, then
    /// recently active nodes (at most [`crate::limits::MAX_BOOTSTRAP_PEERS`]).
    #[serde(deserialize_with = "crate::wire::seq")]
    pub bootstrap: Vec<BootstrapPeer>,
}

/// A peer of the run and where it listens, as libp2p text (a peer id and
/// multiaddrs). Receivers parse them and skip what does not parse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapPeer {
    pub peer: String,
    /// At most [`crate::limits::MAX_BOOTSTRAP_ADDRS`].
    #[serde(deserialize_with = "crate::wire::seq")]
    pub addrs: Vec<String>,
}

/// One node's work in a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub node: NodeId,
    /// The shards to train on, as indices into the run config's `dataset`
    /// (which every node has from its welcome): three bytes on the wire
    /// instead of a 32-byte hash, so a plan for 10,000 nodes stays under
    /// [`crate::limits::MAX_ROUND_PLAN_BYTES`] (docs/protocol.md, "Plan size").
    #[serde(deserialize_with = "crate::wire::seq")]
    pub shards: Vec<u32>,
    pub seed: u64,
    pub inner_steps: u32,
    /// How many of the node's workers this assignment is for: all it
    /// declared, or fewer (a node on probation gets one worker's share, and
    /// when shards run short a node gets as many shares as are left). The
    /// node trains this many workers and may claim this many workers' tokens.
    pub workers: u32,
}

impl Assignment {
    /// The hashes of the assignment's shards, looked up in the run's
    /// `dataset`; an index past its end (a plan for another dataset, or a
    /// coordinator's fault) is returned as the error.
    pub fn shard_hashes(&self, dataset: &[ShardInfo]) -> Result<Vec<Hash>, u32> {
        self.shards
            .iter()
            .map(|&i| dataset.get(i as usize).map(|s| s.hash).ok_or(i))
            .collect()
    }
}

/// The coordinator's signed plan that opens a round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundPlan {
    pub run_id: String,
    pub round: u64,
    /// Hash of θ_round that every assignment starts from.
    pub params_hash: Hash,
    pub previous_manifest: Hash,
    #[serde(deserialize_with = "crate::wire::seq")]
    pub assignments: Vec<Assignment>,
    pub opened_at_ms: u64,
    pub deadline_ms: u64,
    /// As in the [`Welcome`]: the coordinator and recently active nodes, so
    /// that nodes meet each other, and not only the coordinator.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub bootstrap: Vec<BootstrapPeer>,
}

/// The coordinator's word that an update of the open round arrived and
/// passed its checks of form (stage 2), gossiped so that nodes can fetch it
/// while the round is still closing (docs/protocol.md, "Update notices").
/// It promises nothing: only the manifest accepts an update, and the blob
/// is checked against its hash on arrival like any other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateNotice {
    pub run_id: String,
    pub round: u64,
    /// The node that committed the update, which serves it first.
    pub node: NodeId,
    pub update_hash: Hash,
    pub update_bytes: u64,
}

/// A node's claim that it finished its assignment: the update is a blob it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub run_id: String,
    pub round: u64,
    /// The θ_round the update was trained from.
    pub base_params_hash: Hash,
    pub update_hash: Hash,
    pub update_bytes: u64,
    pub tokens: u64,
    /// Training loss per inner step.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub losses: Vec<f32>,
    pub compute_ms: u64,
    /// Workers whose pseudo-gradients this update reduces (cluster mode).
    pub workers: u32,
    /// One per worker in the update, in worker order: its tokens, Δ_i's hash
    /// and sketch, and its optimizer state's hash, for spot checks
    /// (docs/security.md, "Spot checks").
    #[serde(deserialize_with = "crate::wire::seq")]
    pub shares: Vec<crate::workers::WorkerShare>,
}

/// How a coordinator's refusal that is worth retrying begins (busy, rate
/// limited): a node backs off and asks again instead of giving up.
pub const RETRY_LATER: &str = "retry later: ";

/// Whether a refusal's reason says to retry later.
pub fn is_retry_later(reason: &str) -> bool {
    reason.starts_with(RETRY_LATER)
}

/// Why the coordinator refused an update. Recorded in the manifest and the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    BadSignature,
    UnknownNode,
    WrongRound,
    WrongBase,
    DuplicateCommit,
    Oversized,
    NotServed,
    HashMismatch,
    Undecodable(String),
    WrongLength,
    NonFinite,
    NormTooLarge,
    NormTooSmall,
    SignFlipped,
    Copycat {
        of: NodeId,
    },
    NotUseful,
    Late,
    /// The direction of an update accepted in an earlier round (`round`,
    /// from `of`): a stale replay.
    Replay {
        of: NodeId,
        round: u64,
    },
    /// The commit's worker shares do not add up: not one per worker, a
    /// worker the assignment does not have, tokens that do not sum to the
    /// commit's, or a sketch of the wrong size.
    BadShares,
    /// A spot check replayed this worker's round and did not get the Δ the
    /// commit claims (or the node did not serve the worker's state).
    SpotCheck {
        worker: u32,
    },
}

impl RejectReason {
    /// An `Undecodable` whose text is cut to
    /// [`crate::limits::MAX_TEXT_BYTES`] (at a character boundary), so a
    /// decoder's long error cannot grow a manifest.
    pub fn undecodable(text: impl Into<String>) -> RejectReason {
        let mut text = text.into();
        if text.len() > crate::limits::MAX_TEXT_BYTES {
            let mut end = crate::limits::MAX_TEXT_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        RejectReason::Undecodable(text)
    }

    /// A short stable name for tables, metrics and the ledger.
    pub fn code(&self) -> &'static str {
        match self {
            RejectReason::BadSignature => "bad-signature",
            RejectReason::UnknownNode => "unknown-node",
            RejectReason::WrongRound => "wrong-round",
            RejectReason::WrongBase => "wrong-base",
            RejectReason::DuplicateCommit => "duplicate-commit",
            RejectReason::Oversized => "oversized",
            RejectReason::NotServed => "not-served",
            RejectReason::HashMismatch => "hash-mismatch",
            RejectReason::Undecodable(_) => "undecodable",
            RejectReason::WrongLength => "wrong-length",
            RejectReason::NonFinite => "non-finite",
            RejectReason::NormTooLarge => "norm-too-large",
            RejectReason::NormTooSmall => "norm-too-small",
            RejectReason::SignFlipped => "sign-flipped",
            RejectReason::Copycat { .. } => "copycat",
            RejectReason::NotUseful => "not-useful",
            RejectReason::Late => "late",
            RejectReason::Replay { .. } => "replay",
            RejectReason::BadShares => "bad-shares",
            RejectReason::SpotCheck { .. } => "spot-check",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcceptedUpdate {
    pub node: NodeId,
    pub update_hash: Hash,
    pub update_bytes: u64,
    pub tokens: u64,
    /// Aggregation weight (normalized; the weights of a manifest sum to 1).
    pub weight: f32,
    pub compute_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RejectedUpdate {
    pub node: NodeId,
    pub update_hash: Option<Hash>,
    pub reason: RejectReason,
}

/// Credit a manifest takes back: `node`'s accepted `tokens` from
/// `from_round` up to the manifest's round, none of them backed by a passed
/// spot check ([`crate::credit`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoidedCredit {
    pub node: NodeId,
    pub from_round: u64,
    pub tokens: u64,
}

/// The coordinator's signed result of a round. Manifests form a hash chain
/// through `previous_manifest` (the body hash of the previous manifest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub round: u64,
    pub previous_manifest: Hash,
    /// Hash of θ_round.
    pub base_params_hash: Hash,
    #[serde(deserialize_with = "crate::wire::seq")]
    pub accepted: Vec<AcceptedUpdate>,
    #[serde(deserialize_with = "crate::wire::seq")]
    pub rejected: Vec<RejectedUpdate>,
    /// Nodes that were assigned work and did not commit by the deadline.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub missing: Vec<NodeId>,
    /// Accepted nodes whose workers a spot check replayed this round and
    /// found as committed: their unverified credit so far stands
    /// ([`crate::credit`]).
    #[serde(deserialize_with = "crate::wire::seq")]
    pub verified: Vec<NodeId>,
    /// Credit taken back this round from nodes that failed a spot check:
    /// what they were credited since their last verified round.
    #[serde(deserialize_with = "crate::wire::seq")]
    pub voided: Vec<VoidedCredit>,
    pub aggregation: String,
    /// Hash of θ_{round+1}.
    pub next_params_hash: Hash,
    pub closed_at_ms: u64,
}

/// An org's statement that a node belongs to it, until `expires_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCertificate {
    pub org: OrgId,
    pub org_name: String,
    pub node: NodeId,
    pub issued_ms: u64,
    pub expires_ms: u64,
    /// How many workers the org vouches the node runs: the most a join under
    /// this certificate may declare (1 to `MAX_WORKERS_PER_NODE`). A node's
    /// tokens, weight and credit are bounded by its workers, so this is the
    /// org's signed statement of the node's size (docs/security.md).
    pub max_workers: u32,
}

/// A node's notice that it is leaving the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    pub run_id: String,
    pub timestamp_ms: u64,
}

macro_rules! message {
    ($ty:ty, $kind:ident, $max:expr) => {
        impl Message for $ty {
            const KIND: MessageKind = MessageKind::$kind;
            const MAX_BYTES: usize = $max;
            const NAME: &'static str = stringify!($kind);
        }
    };
}

message!(Join, Join, MAX_JOIN_BYTES);
message!(Welcome, Welcome, MAX_WELCOME_BYTES);
message!(RoundPlan, RoundPlan, MAX_ROUND_PLAN_BYTES);
message!(Commit, Commit, MAX_COMMIT_BYTES);
message!(Manifest, Manifest, MAX_MANIFEST_BYTES);
message!(NodeCertificate, NodeCertificate, MAX_CERTIFICATE_BYTES);
message!(Leave, Leave, 1024);
message!(UpdateNotice, UpdateNotice, 1024);

/// Requests a node sends the coordinator over [`COORDINATOR_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorRequest {
    Join(Signed<Join>),
    Commit(Signed<Commit>),
    Leave(Signed<Leave>),
    /// The plan of the round now open, if any.
    CurrentPlan,
    /// The manifest of a closed round.
    Manifest {
        round: u64,
    },
}

/// The coordinator's answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorResponse {
    Welcome(Signed<Welcome>),
    CommitAccepted {
        round: u64,
    },
    Plan(Option<Signed<RoundPlan>>),
    Manifest(Option<Signed<Manifest>>),
    Ok,
    /// The request was refused; the text says why in operator's words.
    Refused {
        reason: String,
    },
}

impl CoordinatorRequest {
    pub fn encode(&self) -> Result<Vec<u8>, crate::wire::WireError> {
        crate::wire::encode("coordinator request", self, MAX_COORDINATOR_MESSAGE_BYTES)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
        crate::wire::decode("coordinator request", bytes, MAX_COORDINATOR_MESSAGE_BYTES)
    }
}

impl CoordinatorResponse {
    pub fn encode(&self) -> Result<Vec<u8>, crate::wire::WireError> {
        crate::wire::encode("coordinator response", self, MAX_COORDINATOR_MESSAGE_BYTES)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
        crate::wire::decode("coordinator response", bytes, MAX_COORDINATOR_MESSAGE_BYTES)
    }
}

/// Requests on the blob protocol: a byte range of a blob named by its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Does the peer have this blob, and how large is it?
    Have { hash: Hash },
    /// Bytes `[offset, offset + len)`; `len` at most [`BLOB_CHUNK_BYTES`].
    Chunk { hash: Hash, offset: u64, len: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    Have {
        size: Option<u64>,
    },
    Chunk {
        #[serde(with = "crate::wire::bytes")]
        data: Vec<u8>,
    },
    NotFound,
    Refused {
        reason: String,
    },
}

impl BlobRequest {
    pub fn encode(&self) -> Result<Vec<u8>, crate::wire::WireError> {
        crate::wire::encode("blob request", self, MAX_BLOB_REQUEST_BYTES)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
        crate::wire::decode("blob request", bytes, MAX_BLOB_REQUEST_BYTES)
    }
}

impl BlobResponse {
    pub fn encode(&self) -> Result<Vec<u8>, crate::wire::WireError> {
        crate::wire::encode("blob response", self, MAX_BLOB_RESPONSE_BYTES)
    }
    pub fn decode(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
        crate::wire::decode("blob response", bytes, MAX_BLOB_RESPONSE_BYTES)
    }
}

/// A message that travels length-prefixed on a request-response protocol:
/// its size cap and its wire encoding. Node and coordinator frame streams
/// with it (a `u32` little-endian length, then the bytes), each with its own
/// async I/O.
pub trait Framed: Sized + Send + Sync {
    /// Largest encoded size a reader accepts; checked before allocating.
    const MAX_BYTES: usize;
    fn to_wire(&self) -> Result<Vec<u8>, crate::wire::WireError>;
    fn from_wire(bytes: &[u8]) -> Result<Self, crate::wire::WireError>;
}

macro_rules! framed {
    ($ty:ty, $max:expr) => {
        impl Framed for $ty {
            const MAX_BYTES: usize = $max;
            fn to_wire(&self) -> Result<Vec<u8>, crate::wire::WireError> {
                self.encode()
            }
            fn from_wire(bytes: &[u8]) -> Result<Self, crate::wire::WireError> {
                <$ty>::decode(bytes)
            }
        }
    };
}

framed!(CoordinatorRequest, MAX_COORDINATOR_MESSAGE_BYTES);
framed!(CoordinatorResponse, MAX_COORDINATOR_MESSAGE_BYTES);
framed!(BlobRequest, MAX_BLOB_REQUEST_BYTES);
framed!(BlobResponse, MAX_BLOB_RESPONSE_BYTES);

/// Milliseconds since the Unix epoch, for timestamps in messages.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
