//! Every size limit of the protocol, as named constants. Decoders enforce
//! them before allocating; encoders refuse to produce larger messages.

/// The protocol version a node states in its `Join`. 2: plans name shards
/// by index, manifests carry `verified` and `voided` (clawback). 3: the
/// trimmed mean sums what it keeps in position order (θ's bits changed).
/// 4: overlapped rounds (`RunConfig::overlap_steps`, a share's `carried`
/// and `held_back` steps).
pub const PROTOCOL_VERSION: u32 = 4;

/// libp2p protocol name of the node ⇄ coordinator request-response protocol.
pub const COORDINATOR_PROTOCOL: &str = "/barnraise/coordinator/1";
/// libp2p protocol name of the blob transfer protocol.
pub const BLOB_PROTOCOL: &str = "/barnraise/blob/1";

pub const MAX_JOIN_BYTES: usize = 16 * 1024;
pub const MAX_CERTIFICATE_BYTES: usize = 2 * 1024;
/// A welcome carries the run config and the dataset's shard list.
pub const MAX_WELCOME_BYTES: usize = 4 * 1024 * 1024;
pub const MAX_ROUND_PLAN_BYTES: usize = 1024 * 1024;
pub const MAX_COMMIT_BYTES: usize = 64 * 1024;
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Envelope overhead on top of the body: signer, kind, signature, length prefixes.
pub const ENVELOPE_OVERHEAD: usize = 128;
/// Largest request or response on the coordinator protocol.
pub const MAX_COORDINATOR_MESSAGE_BYTES: usize = MAX_WELCOME_BYTES + ENVELOPE_OVERHEAD + 1024;

/// Losses a commit may report (one per inner step).
pub const MAX_REPORTED_LOSSES: usize = 4096;
/// Shards in one dataset.
pub const MAX_DATASET_SHARDS: usize = 65_536;
/// Nodes with work in one round. A seeded subset trains when more are
/// active; with at most [`MAX_DATASET_SHARDS`] shard indices in a round this
/// keeps the largest plan under [`MAX_ROUND_PLAN_BYTES`] (a test builds it).
pub const MAX_ASSIGNMENTS_PER_ROUND: usize = 10_000;
/// Refusals at commit time (late, wrong round, duplicate, …) one manifest
/// lists, at most one per node and reason; the rest are only counted. With
/// at most [`MAX_ASSIGNMENTS_PER_ROUND`] verdicts this keeps the largest
/// manifest under [`MAX_MANIFEST_BYTES`] (a test builds it).
pub const MAX_REFUSALS_PER_MANIFEST: usize = 4096;
/// Workers one node may declare.
pub const MAX_WORKERS_PER_NODE: usize = 64;
/// Longest free-text field (names, agent strings, reasons).
pub const MAX_TEXT_BYTES: usize = 256;
/// Bootstrap peers in a welcome or a plan, and addresses per peer.
pub const MAX_BOOTSTRAP_PEERS: usize = 16;
pub const MAX_BOOTSTRAP_ADDRS: usize = 4;

/// One chunk of a blob transfer.
pub const BLOB_CHUNK_BYTES: usize = 1024 * 1024;
pub const MAX_BLOB_REQUEST_BYTES: usize = 256;
pub const MAX_BLOB_RESPONSE_BYTES: usize = BLOB_CHUNK_BYTES + 256;
/// Largest blob of any kind (a checkpoint of a large model).
pub const MAX_BLOB_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// Largest compressed update.
pub const MAX_UPDATE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// A plan may give a node between `inner_steps / MAX_STEP_SPREAD` (at least
/// one) and `inner_steps × MAX_STEP_SPREAD` inner steps: the coordinator
/// sizes each node's work to its measured pace within this spread
/// (docs/architecture.md, "Work sized to each node"), and an audit refuses
/// a plan outside it.
pub const MAX_STEP_SPREAD: u32 = 2;

/// The inner steps a plan may give a node of a run with `inner_steps` H.
pub fn planned_steps_range(inner_steps: u32) -> std::ops::RangeInclusive<u32> {
    (inner_steps / MAX_STEP_SPREAD).max(1)..=inner_steps.saturating_mul(MAX_STEP_SPREAD)
}

/// How long a node keeps serving its workers' starting states after it
/// commits, at the least (it also keeps them until it commits two rounds
/// later): 60 s, plus 1 s per MB, which is the state's bytes at 8 Mbit/s.
/// A coordinator fetching a drawn state for a deferred spot check gives up
/// before this runs out (docs/protocol.md, "Spot-check states").
pub fn state_serve_ms(bytes: u64) -> u64 {
    60_000u64.saturating_add(bytes / 1_000)
}

#[cfg(test)]
mod step_tests {
    use super::*;

    #[test]
    fn planned_steps_stay_within_the_spread_and_at_least_one() {
        assert_eq!(planned_steps_range(30), 15..=60);
        assert_eq!(planned_steps_range(1), 1..=2);
        assert_eq!(planned_steps_range(3), 1..=6);
        assert!(!planned_steps_range(8).contains(&17));
        assert!(!planned_steps_range(8).contains(&3));
        assert_eq!(planned_steps_range(u32::MAX).end(), &u32::MAX);
    }

    #[test]
    fn a_state_is_served_a_minute_plus_its_bytes_at_8_mbit() {
        assert_eq!(state_serve_ms(0), 60_000);
        // `small`'s state: 26.4 MB.
        assert_eq!(state_serve_ms(26_368_376), 86_368);
        assert_eq!(state_serve_ms(u64::MAX), u64::MAX / 1_000 + 60_000);
    }
}
