//! Wire and envelope properties: every message type round-trips, every
//! tampered byte is caught, and hostile input is refused without large
//! allocations (a counting allocator records the largest single request).

#![allow(unsafe_code)] // the counting allocator below; nothing else
#![allow(clippy::unwrap_used, clippy::expect_used)]

use barnraise_protocol::messages::*;
use barnraise_protocol::signed::SignedError;
use barnraise_protocol::{Hash, NodeId, OrgId, Signed, SigningKey, wire};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TRACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());

// SAFETY: forwards every call to the system allocator unchanged and only
// records the size requested.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The largest single allocation made while `f` runs. Tests that measure
/// hold a lock so other test threads' allocations are not counted... as far
/// as they also take it; the bounds checked are loose enough for the rest.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let _guard = TRACKING.lock().unwrap_or_else(|p| p.into_inner());
    LARGEST.store(0, Ordering::SeqCst);
    let r = f();
    (r, LARGEST.load(Ordering::SeqCst))
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_seed([n; 32]).unwrap()
}

fn hash() -> impl Strategy<Value = Hash> {
    any::<[u8; 32]>().prop_map(Hash)
}
fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 32]>().prop_map(NodeId::from_bytes)
}
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ./:_-]{0,40}"
}
fn finite() -> impl Strategy<Value = f32> {
    -1e6f32..1e6f32
}

fn shard() -> impl Strategy<Value = ShardInfo> {
    (hash(), any::<u64>(), any::<u64>()).prop_map(|(hash, tokens, bytes)| ShardInfo {
        hash,
        tokens,
        bytes,
    })
}

fn certificate() -> impl Strategy<Value = NodeCertificate> {
    (
        any::<[u8; 32]>(),
        text(),
        node_id(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(
            |(org, org_name, node, issued_ms, expires_ms, max_workers)| NodeCertificate {
                org: OrgId::from_bytes(org),
                org_name,
                node,
                issued_ms,
                expires_ms,
                max_workers,
            },
        )
}

fn join() -> impl Strategy<Value = Join> {
    (
        any::<u32>(),
        text(),
        text(),
        prop::collection::vec((text(), text(), any::<u64>()), 0..4),
        prop::collection::vec(text(), 0..3),
        prop::option::of(certificate()),
        any::<u64>(),
    )
        .prop_map(
            |(protocol_version, agent, run_id, workers, listen_addrs, cert, timestamp_ms)| Join {
                protocol_version,
                agent,
                run_id,
                workers: workers
                    .into_iter()
                    .map(|(device, name, memory_bytes)| WorkerInfo {
                        device,
                        name,
                        memory_bytes,
                    })
                    .collect(),
                listen_addrs,
                certificate: cert.map(|c| Signed::sign(&key(9), &c).unwrap()),
                timestamp_ms,
            },
        )
}

fn run_config() -> impl Strategy<Value = RunConfig> {
    (
        (
            text(),
            text(),
            text(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        (finite(), finite(), finite(), text(), any::<u64>()),
        prop::collection::vec(shard(), 0..5),
        prop::collection::vec(shard(), 0..2),
    )
        .prop_map(
            |(
                (run_id, model_config_json, codec, inner_steps, batch_size, seq_len),
                (inner_lr, outer_lr, outer_momentum, aggregation, total_rounds),
                dataset,
                held_out,
            )| RunConfig {
                run_id,
                model_config_json,
                codec,
                inner_steps,
                batch_size,
                seq_len,
                inner_lr,
                outer_lr,
                outer_momentum,
                aggregation,
                total_rounds,
                overlap_steps: 0,
                dataset,
                held_out,
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        node_id(),
        run_config(),
        any::<u64>(),
        hash(),
        prop::option::of((
            any::<u64>(),
            hash(),
            any::<u64>(),
            hash(),
            hash(),
            any::<u64>(),
        )),
        hash(),
        bootstrap(),
    )
        .prop_map(
            |(node, config, current_round, params_hash, checkpoint, head_manifest, bootstrap)| {
                Welcome {
                    node,
                    config,
                    current_round,
                    params_hash,
                    checkpoint: checkpoint.map(
                        |(round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes)| {
                            CheckpointRef {
                                round,
                                blob,
                                bytes,
                                params_hash,
                                optimizer_blob,
                                optimizer_bytes,
                            }
                        },
                    ),
                    head_manifest,
                    bootstrap,
                }
            },
        )
}

fn bootstrap() -> impl Strategy<Value = Vec<BootstrapPeer>> {
    prop::collection::vec(
        (text(), prop::collection::vec(text(), 0..3))
            .prop_map(|(peer, addrs)| BootstrapPeer { peer, addrs }),
        0..3,
    )
}

fn round_plan() -> impl Strategy<Value = RoundPlan> {
    (
        text(),
        any::<u64>(),
        hash(),
        hash(),
        prop::collection::vec(
            (
                node_id(),
                prop::collection::vec(any::<u32>(), 0..3),
                any::<u64>(),
                any::<u32>(),
            ),
            0..5,
        ),
        any::<u64>(),
        any::<u64>(),
        bootstrap(),
    )
        .prop_map(
            |(
                run_id,
                round,
                params_hash,
                previous_manifest,
                assignments,
                opened_at_ms,
                deadline_ms,
                bootstrap,
            )| RoundPlan {
                run_id,
                round,
                params_hash,
                previous_manifest,
                assignments: assignments
                    .into_iter()
                    .map(|(node, shards, seed, inner_steps)| Assignment {
                        node,
                        workers: (seed % 64) as u32 + 1,
                        shards,
                        seed,
                        inner_steps,
                    })
                    .collect(),
                opened_at_ms,
                deadline_ms,
                bootstrap,
            },
        )
}

fn commit() -> impl Strategy<Value = Commit> {
    (
        text(),
        any::<u64>(),
        hash(),
        hash(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(finite(), 0..50),
        any::<u64>(),
        any::<u32>(),
        prop::collection::vec(
            (
                any::<u32>(),
                any::<u64>(),
                hash(),
                prop::collection::vec(finite(), 0..40),
                hash(),
            ),
            0..4,
        ),
    )
        .prop_map(
            |(
                run_id,
                round,
                base_params_hash,
                update_hash,
                update_bytes,
                tokens,
                losses,
                compute_ms,
                workers,
                shares,
            )| Commit {
                shares: shares
                    .into_iter()
                    .map(|(index, tokens, delta_hash, delta_sketch, state_hash)| {
                        barnraise_protocol::workers::WorkerShare {
                            index,
                            tokens,
                            delta_hash,
                            delta_sketch,
                            state_hash,
                            carried: 0,
                            held_back: 0,
                        }
                    })
                    .collect(),
                run_id,
                round,
                base_params_hash,
                update_hash,
                update_bytes,
                tokens,
                losses,
                compute_ms,
                workers,
            },
        )
}

fn reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::BadSignature),
        Just(RejectReason::WrongRound),
        Just(RejectReason::NormTooLarge),
        Just(RejectReason::SignFlipped),
        Just(RejectReason::NotServed),
        text().prop_map(RejectReason::Undecodable),
        node_id().prop_map(|of| RejectReason::Copycat { of }),
    ]
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        (text(), any::<u64>(), hash(), hash()),
        prop::collection::vec(
            (
                node_id(),
                hash(),
                any::<u64>(),
                any::<u64>(),
                finite(),
                any::<u64>(),
            ),
            0..4,
        ),
        prop::collection::vec((node_id(), prop::option::of(hash()), reason()), 0..4),
        prop::collection::vec(node_id(), 0..3),
        (
            prop::collection::vec(node_id(), 0..3),
            prop::collection::vec((node_id(), any::<u64>(), any::<u64>()), 0..3),
        ),
        (text(), hash(), any::<u64>()),
    )
        .prop_map(
            |(
                (run_id, round, previous_manifest, base_params_hash),
                accepted,
                rejected,
                missing,
                (verified, voided),
                (aggregation, next_params_hash, closed_at_ms),
            )| Manifest {
                run_id,
                round,
                previous_manifest,
                base_params_hash,
                accepted: accepted
                    .into_iter()
                    .map(
                        |(node, update_hash, update_bytes, tokens, weight, compute_ms)| {
                            AcceptedUpdate {
                                node,
                                update_hash,
                                update_bytes,
                                tokens,
                                weight,
                                compute_ms,
                            }
                        },
                    )
                    .collect(),
                rejected: rejected
                    .into_iter()
                    .map(|(node, update_hash, reason)| RejectedUpdate {
                        node,
                        update_hash,
                        reason,
                    })
                    .collect(),
                missing,
                verified,
                voided: voided
                    .into_iter()
                    .map(|(node, from_round, tokens)| VoidedCredit {
                        node,
                        from_round,
                        tokens,
                    })
                    .collect(),
                aggregation,
                next_params_hash,
                closed_at_ms,
            },
        )
}

/// Signs, serializes the envelope, parses it back and verifies it.
fn round_trip<T: barnraise_protocol::Message + PartialEq + std::fmt::Debug>(message: &T) {
    let signer = key(1);
    let signed = Signed::sign(&signer, message).unwrap();
    let bytes = signed.to_bytes().unwrap();
    let parsed = Signed::<T>::from_bytes(&bytes).unwrap();
    assert_eq!(parsed, signed);
    assert_eq!(&parsed.verify(Some(&signer.public())).unwrap(), message);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn join_round_trips(m in join()) { round_trip(&m) }
    #[test]
    fn welcome_round_trips(m in welcome()) { round_trip(&m) }
    #[test]
    fn round_plan_round_trips(m in round_plan()) { round_trip(&m) }
    #[test]
    fn commit_round_trips(m in commit()) { round_trip(&m) }
    #[test]
    fn manifest_round_trips(m in manifest()) { round_trip(&m) }
    #[test]
    fn certificate_round_trips(m in certificate()) { round_trip(&m) }

    #[test]
    fn coordinator_requests_round_trip(c in commit(), round in any::<u64>()) {
        for request in [
            CoordinatorRequest::Commit(Signed::sign(&key(2), &c).unwrap()),
            CoordinatorRequest::Manifest { round },
            CoordinatorRequest::CurrentPlan,
        ] {
            let bytes = request.encode().unwrap();
            prop_assert_eq!(CoordinatorRequest::decode(&bytes).unwrap(), request);
        }
    }

    #[test]
    fn blob_messages_round_trip(h in hash(), offset in any::<u64>(), len in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..2000)) {
        let request = BlobRequest::Chunk { hash: h, offset, len };
        prop_assert_eq!(BlobRequest::decode(&request.encode().unwrap()).unwrap(), request);
        let response = BlobResponse::Chunk { data };
        prop_assert_eq!(BlobResponse::decode(&response.encode().unwrap()).unwrap(), response);
    }

    /// Random bytes never panic any decoder.
    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = CoordinatorRequest::decode(&bytes);
        let _ = CoordinatorResponse::decode(&bytes);
        let _ = BlobRequest::decode(&bytes);
        let _ = BlobResponse::decode(&bytes);
        let _ = Signed::<Manifest>::from_bytes(&bytes);
        let _ = wire::decode::<Manifest>("manifest", &bytes, 1 << 20);
    }
}

fn sample_commit() -> Commit {
    Commit {
        run_id: "run".into(),
        round: 7,
        base_params_hash: Hash::of(b"theta"),
        update_hash: Hash::of(b"update"),
        update_bytes: 1234,
        tokens: 4096,
        losses: vec![3.0, 2.5, 2.0],
        compute_ms: 900,
        workers: 1,
        shares: vec![barnraise_protocol::workers::WorkerShare {
            index: 0,
            tokens: 4096,
            delta_hash: Hash::of(b"delta"),
            delta_sketch: vec![0.25; barnraise_protocol::workers::SHARE_SKETCH_DIM],
            state_hash: Hash::of(b"state"),
            carried: 0,
            held_back: 0,
        }],
    }
}

#[test]
fn every_tampered_byte_is_caught() {
    let signer = key(1);
    let signed = Signed::sign(&signer, &sample_commit()).unwrap();
    let bytes = signed.to_bytes().unwrap();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80] {
            let mut tampered = bytes.clone();
            tampered[i] ^= flip;
            let accepted = Signed::<Commit>::from_bytes(&tampered)
                .ok()
                .and_then(|s| s.verify(Some(&signer.public())).ok());
            assert!(
                accepted.is_none(),
                "flipping bit {flip:#x} of byte {i} was not caught"
            );
        }
    }
}

#[test]
fn tampered_body_fails_even_without_pinned_signer() {
    let signed = Signed::sign(&key(1), &sample_commit()).unwrap();
    for i in 0..signed.body.len() {
        let mut tampered = signed.clone();
        tampered.body[i] ^= 0x40;
        assert!(matches!(
            tampered.verify(None),
            Err(SignedError::BadSignature) | Err(SignedError::Wire(_))
        ));
    }
}

#[test]
fn signer_swap_and_kind_swap_fail() {
    let honest = key(1);
    let other = key(2);
    let signed = Signed::sign(&honest, &sample_commit()).unwrap();

    // Claiming another signer: the signature does not verify under that key.
    let mut swapped = signed.clone();
    swapped.signer = other.public();
    assert!(matches!(
        swapped.verify(None),
        Err(SignedError::BadSignature)
    ));
    // Pinning the wrong signer is refused before any crypto.
    assert!(matches!(
        signed.verify(Some(&other.public())),
        Err(SignedError::WrongSigner { .. })
    ));

    // The same bytes relabelled as another kind: refused by kind, and even
    // with the kind field forged the domain tag makes the signature fail.
    let relabelled: Signed<Leave> =
        Signed::<Leave>::from_bytes(&signed.to_bytes().unwrap()).unwrap();
    assert!(matches!(
        relabelled.verify(None),
        Err(SignedError::WrongKind { .. })
    ));
    let mut forged = relabelled.clone();
    forged.kind = barnraise_protocol::MessageKind::Leave;
    assert!(forged.verify(None).is_err());
}

#[test]
fn oversized_and_truncated_and_trailing() {
    let signed = Signed::sign(&key(1), &sample_commit()).unwrap();
    let bytes = signed.to_bytes().unwrap();
    for cut in 0..bytes.len() {
        assert!(
            Signed::<Commit>::from_bytes(&bytes[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"garbage");
    assert!(Signed::<Commit>::from_bytes(&trailing).is_err());

    // A commit body one byte over its limit is refused before verification.
    let mut big = signed.clone();
    big.body = vec![0u8; barnraise_protocol::limits::MAX_COMMIT_BYTES + 1];
    assert!(matches!(
        big.verify(None),
        Err(SignedError::Wire(wire::WireError::TooLarge { .. }))
    ));
    // And an encoder will not produce an oversized message.
    let mut huge = sample_commit();
    huge.run_id = "x".repeat(barnraise_protocol::limits::MAX_COMMIT_BYTES);
    assert!(Signed::sign(&key(1), &huge).is_err());
    // A payload exactly at the limit decodes; one byte over does not.
    // (1000 bytes plus a 3-byte length prefix.)
    let at_limit = vec![7u8; 1000];
    let encoded = wire::encode("bytes", &at_limit, 1003).unwrap();
    assert_eq!(encoded.len(), 1003);
    assert!(wire::encode("bytes", &at_limit, 1002).is_err());
    assert!(wire::decode::<Vec<u8>>("bytes", &encoded, 1003).is_ok());
    assert!(wire::decode::<Vec<u8>>("bytes", &encoded, 1002).is_err());
}

#[test]
fn hostile_inputs_do_not_allocate_beyond_the_limit() {
    // A length prefix claiming 2^60 elements, for each collection-bearing type.
    let mut claim = vec![253u8];
    claim.extend_from_slice(&(1u64 << 60).to_le_bytes());
    // A 12-byte hostile input: enum tag then a huge length.
    let twelve: Vec<u8> = vec![0, 253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2];
    let inputs: Vec<Vec<u8>> = vec![
        claim.clone(),
        twelve,
        [vec![5u8], claim.clone()].concat(),
        [vec![0u8; 32], claim].concat(),
    ];
    let (accepted, largest) = largest_allocation(|| {
        let mut accepted = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            let results = [
                CoordinatorRequest::decode(input).is_ok(),
                CoordinatorResponse::decode(input).is_ok(),
                BlobResponse::decode(input).is_ok(),
                Signed::<Manifest>::from_bytes(input).is_ok(),
                wire::decode::<Vec<u64>>("numbers", input, 4096).is_ok(),
                wire::decode::<String>("text", input, 4096).is_ok(),
            ];
            for (j, ok) in results.into_iter().enumerate() {
                if ok {
                    accepted.push((i, j));
                }
            }
        }
        accepted
    });
    assert!(
        accepted.is_empty(),
        "hostile inputs decoded (input, decoder): {accepted:?}"
    );
    // Byte strings are borrowed from the input, strings are charged against
    // the limit, and list fields reserve at most `wire::PREALLOC_BYTES`
    // before their elements run out (`wire::seq`). Bare sequences like the
    // `Vec<u64>` above are not wire messages and still get serde's cautious
    // 1 MiB. Nothing near 2^60.
    let bound = 1 << 20;
    assert!(
        largest <= bound,
        "largest allocation {largest} bytes exceeds {bound}"
    );
}

#[test]
fn small_limit_caps_allocations_tightly() {
    // A Vec<u8> claim of 1 MiB against a 4 KiB limit: refused, and nothing
    // close to 1 MiB is allocated.
    let mut input = vec![252u8]; // varint tag: u32 follows
    input.extend_from_slice(&(1u32 << 20).to_le_bytes());
    input.extend_from_slice(&[0u8; 16]);
    #[derive(serde::Deserialize)]
    struct Blob(
        #[serde(with = "barnraise_protocol::wire::bytes")]
        #[allow(dead_code)]
        Vec<u8>,
    );
    let (result, largest) =
        largest_allocation(|| wire::decode::<Blob>("bytes", &input, 4096).is_err());
    assert!(result);
    assert!(largest < 64 * 1024, "largest allocation {largest}");
}

/// Every position of `bytes` turned into a length prefix that claims 2^40
/// elements, and one that claims `just_under` (a length the message kind's
/// cap allows), the rest of the message kept after it: the claims a hostile
/// peer can make of every list, string and byte field.
fn with_claims(bytes: &[u8], just_under: u32) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for i in 0..bytes.len() {
        let mut huge = bytes[..i].to_vec();
        huge.push(253); // varint tag: a u64 follows
        huge.extend_from_slice(&(1u64 << 40).to_le_bytes());
        huge.extend_from_slice(&bytes[i + 1..]);
        out.push(huge);
        let mut allowed = bytes[..i].to_vec();
        allowed.push(252); // varint tag: a u32 follows
        allowed.extend_from_slice(&just_under.to_le_bytes());
        allowed.extend_from_slice(&bytes[i + 1..]);
        out.push(allowed);
    }
    out
}

fn claims_reserve_little<T: barnraise_protocol::Message>(message: &T) {
    let body = wire::encode(T::NAME, message, T::MAX_BYTES).unwrap();
    let just_under = u32::try_from(T::MAX_BYTES - 64).unwrap();
    for input in with_claims(&body, just_under) {
        let (_, largest) = largest_allocation(|| wire::decode::<T>(T::NAME, &input, T::MAX_BYTES));
        // Before the fixes, serde reserved up to 1 MiB on a list claim and
        // bincode allocated a claimed string up to the kind's cap.
        let bound = 64 * input.len() + 4 * wire::PREALLOC_BYTES;
        assert!(
            largest <= bound,
            "{}: a {}-byte input made a {largest}-byte allocation (bound {bound})",
            T::NAME,
            input.len()
        );
    }
}

/// Found by fuzzing (the `wire` target; docs/security.md), both from
/// any peer:
/// - fuzz/regressions/wire/join-claims-huge-list: a 100-byte Join whose
///   address list claims 2^59 entries made serde reserve 1 MiB before the
///   first entry failed to decode. List fields now reserve at most
///   `wire::PREALLOC_BYTES` and grow as elements arrive (`wire::seq`).
/// - fuzz/regressions/wire/plan-claims-long-string: a 12-byte RoundPlan
///   whose run id claims 983,039 bytes made bincode allocate them (the
///   plan's 1 MiB cap allowed it) before finding them missing. The limit
///   bincode charges claims against now scales with the input.
///
/// This checks both found inputs, then a claim in every position of every
/// message kind.
#[test]
fn a_length_claim_reserves_little_memory() {
    use barnraise_protocol::limits::{MAX_JOIN_BYTES, MAX_ROUND_PLAN_BYTES};
    let found_join = include_bytes!("../../fuzz/regressions/wire/join-claims-huge-list");
    let found_plan = include_bytes!("../../fuzz/regressions/wire/plan-claims-long-string");
    // The fuzz target's first byte picks the message kind.
    let (found_join, found_plan) = (&found_join[1..], &found_plan[1..]);
    let (result, largest) =
        largest_allocation(|| wire::decode::<Join>("Join", found_join, MAX_JOIN_BYTES));
    assert!(result.is_err());
    assert!(
        largest <= 2 * wire::PREALLOC_BYTES,
        "a {}-byte join: {largest}",
        found_join.len()
    );
    let (result, largest) = largest_allocation(|| {
        wire::decode::<RoundPlan>("RoundPlan", found_plan, MAX_ROUND_PLAN_BYTES)
    });
    assert!(result.is_err());
    assert!(
        largest <= 2 * wire::PREALLOC_BYTES,
        "a {}-byte plan: {largest}",
        found_plan.len()
    );

    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..3 {
        claims_reserve_little(&join().new_tree(&mut runner).unwrap().current());
        claims_reserve_little(&welcome().new_tree(&mut runner).unwrap().current());
        claims_reserve_little(&round_plan().new_tree(&mut runner).unwrap().current());
        claims_reserve_little(&commit().new_tree(&mut runner).unwrap().current());
        claims_reserve_little(&manifest().new_tree(&mut runner).unwrap().current());
    }
}

/// The largest plan and manifest one round can produce — every field at its
/// widest, [`MAX_ASSIGNMENTS_PER_ROUND`] nodes, every shard of the largest
/// dataset handed out, the largest rejection for every node and the most
/// refusals a manifest lists — are signed, sent and verified within their
/// limits (docs/protocol.md, "Plan and manifest size").
#[test]
fn the_largest_round_fits_its_limits() {
    use barnraise_protocol::limits::{
        MAX_ASSIGNMENTS_PER_ROUND, MAX_BOOTSTRAP_ADDRS, MAX_BOOTSTRAP_PEERS, MAX_DATASET_SHARDS,
        MAX_MANIFEST_BYTES, MAX_REFUSALS_PER_MANIFEST, MAX_ROUND_PLAN_BYTES, MAX_TEXT_BYTES,
        MAX_WORKERS_PER_NODE,
    };
    let widest_text = "x".repeat(MAX_TEXT_BYTES);
    let node = |i: usize| {
        let mut bytes = [0xffu8; 32];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        NodeId::from_bytes(bytes)
    };
    let widest_shard = (MAX_DATASET_SHARDS - 1) as u32;
    let per_node = MAX_DATASET_SHARDS / MAX_ASSIGNMENTS_PER_ROUND;
    let extra = MAX_DATASET_SHARDS % MAX_ASSIGNMENTS_PER_ROUND;
    let plan = RoundPlan {
        run_id: widest_text.clone(),
        round: u64::MAX,
        params_hash: Hash([0xff; 32]),
        previous_manifest: Hash([0xff; 32]),
        assignments: (0..MAX_ASSIGNMENTS_PER_ROUND)
            .map(|i| Assignment {
                node: node(i),
                shards: vec![widest_shard; per_node + usize::from(i < extra)],
                seed: u64::MAX,
                inner_steps: u32::MAX,
                workers: MAX_WORKERS_PER_NODE as u32,
            })
            .collect(),
        opened_at_ms: u64::MAX,
        deadline_ms: u64::MAX,
        bootstrap: (0..MAX_BOOTSTRAP_PEERS)
            .map(|_| BootstrapPeer {
                peer: widest_text.clone(),
                addrs: vec![widest_text.clone(); MAX_BOOTSTRAP_ADDRS],
            })
            .collect(),
    };
    let shards: usize = plan.assignments.iter().map(|a| a.shards.len()).sum();
    assert_eq!(shards, MAX_DATASET_SHARDS);
    let signed = Signed::sign(&key(1), &plan).expect("the largest plan encodes");
    let bytes = signed.to_bytes().unwrap();
    eprintln!(
        "largest plan: {} bytes of {MAX_ROUND_PLAN_BYTES}",
        signed.body.len()
    );
    assert!(signed.body.len() <= MAX_ROUND_PLAN_BYTES);
    let back = Signed::<RoundPlan>::from_bytes(&bytes).unwrap();
    assert_eq!(back.verify(Some(&key(1).public())).unwrap(), plan);

    let verdict = RejectReason::undecodable("é".repeat(MAX_TEXT_BYTES));
    assert!(
        matches!(&verdict, RejectReason::Undecodable(t) if t.len() <= MAX_TEXT_BYTES),
        "a decoder's long error is cut to the text limit"
    );
    let manifest = Manifest {
        run_id: widest_text.clone(),
        round: u64::MAX,
        previous_manifest: Hash([0xff; 32]),
        base_params_hash: Hash([0xff; 32]),
        accepted: vec![],
        rejected: (0..MAX_ASSIGNMENTS_PER_ROUND)
            .map(|i| RejectedUpdate {
                node: node(i),
                update_hash: Some(Hash([0xff; 32])),
                reason: RejectReason::Undecodable(widest_text.clone()),
            })
            .chain((0..MAX_REFUSALS_PER_MANIFEST).map(|i| RejectedUpdate {
                node: node(i),
                update_hash: Some(Hash([0xff; 32])),
                reason: RejectReason::Replay {
                    of: node(i),
                    round: u64::MAX,
                },
            }))
            .collect(),
        missing: vec![],
        verified: vec![],
        voided: vec![],
        aggregation: widest_text.clone(),
        next_params_hash: Hash([0xff; 32]),
        closed_at_ms: u64::MAX,
    };
    let signed = Signed::sign(&key(1), &manifest).expect("the largest manifest encodes");
    eprintln!(
        "largest manifest: {} bytes of {MAX_MANIFEST_BYTES}",
        signed.body.len()
    );
    assert!(signed.body.len() <= MAX_MANIFEST_BYTES);
    let back = Signed::<Manifest>::from_bytes(&signed.to_bytes().unwrap()).unwrap();
    assert_eq!(back.verify(None).unwrap(), manifest);
}
