//! Tests of the round close: verification over a round, aggregation, weights.

use super::*;
use crate::rounds::Candidate;
use barnraise_protocol::codec::Encoder;
use barnraise_protocol::messages::{Assignment, Commit, RoundPlan};
use barnraise_protocol::outer::OuterConfig;

const P: usize = 400;

fn node(i: u8) -> NodeId {
    NodeId::from_bytes([i; 32])
}

fn honest(seed: u32) -> Vec<f32> {
    crate::verify::tests::honest(seed, P)
}

fn fp32(values: &[f32]) -> Vec<u8> {
    Encoder::new(CodecConfig::Fp32, values.len())
        .unwrap()
        .encode(values)
        .unwrap()
}

struct Round {
    close: CloseRound,
    payloads: HashMap<Hash, Arc<Vec<u8>>>,
}

/// A round whose candidates carry these payloads (node i+1 commits payload i),
/// with `tokens[i]` claimed tokens.
fn round_of(payloads: Vec<Vec<u8>>, tokens: &[u64]) -> Round {
    let plan = RoundPlan {
        run_id: "r".into(),
        round: 3,
        params_hash: Hash::of(b"theta"),
        previous_manifest: Hash::of(b"m2"),
        assignments: (0..payloads.len())
            .map(|i| Assignment {
                node: node(i as u8 + 1),
                shards: vec![],
                seed: 0,
                inner_steps: 1,
                workers: 1,
            })
            .collect(),
        opened_at_ms: 0,
        deadline_ms: 10,
        bootstrap: vec![],
    };
    let candidates = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Candidate {
            node: node(i as u8 + 1),
            commit: Commit {
                run_id: "r".into(),
                round: 3,
                base_params_hash: plan.params_hash,
                update_hash: Hash::of(p),
                update_bytes: p.len() as u64,
                tokens: tokens[i],
                losses: vec![3.0, 2.0],
                compute_ms: 7,
                workers: 1,
                shares: vec![],
            },
            order: i as u64,
        })
        .collect();
    let map = payloads
        .into_iter()
        .map(|p| (Hash::of(&p), Arc::new(p)))
        .collect();
    Round {
        close: CloseRound {
            plan,
            candidates,
            rejected: vec![],
            missing: vec![node(99)],
            closed_at_ms: 9,
        },
        payloads: map,
    }
}

fn run(round: &Round, rule: &str) -> (Closed, Vec<f32>) {
    let verify = VerifyConfig {
        probe: false,
        ..VerifyConfig::default()
    };
    close_with(round, rule, &verify, None)
}

/// Closes `round` with the tiny model, fp32 and no shards, θ_r all 0.5.
fn close_with(
    round: &Round,
    rule: &str,
    verify: &VerifyConfig,
    spot: Option<SpotContext<'_>>,
) -> (Closed, Vec<f32>) {
    let model = barnraise_trainer::ModelConfig::preset("tiny").unwrap();
    let rule: AggregationRule = rule.parse().unwrap();
    let shards = HashMap::new();
    let ctx = CloseContext {
        model: &model,
        codec: CodecConfig::Fp32,
        rule: &rule,
        verify,
        seq_len: 8,
        dataset: &[],
        shard_tokens: &shards,
        heldout: None,
        flops_per_token: 6.0,
        sketch_seed: 7,
        recent: &[],
        spot,
    };
    let mut theta = vec![0.5f32; P];
    let mut optimizer = OuterOptimizer::new(OuterConfig::default(), P);
    let closed = close_round(
        &ctx,
        &round.close,
        "r",
        &round.payloads,
        &mut theta,
        &mut optimizer,
    )
    .unwrap();
    assert_eq!(closed.manifest.next_params_hash, Hash::of_f32s(&theta));
    (closed, theta)
}

fn reason_of(closed: &Closed, i: u8) -> Option<&str> {
    closed
        .manifest
        .rejected
        .iter()
        .find(|r| r.node == node(i))
        .map(|r| r.reason.code())
}

#[test]
fn bad_updates_are_rejected_and_honest_ones_lose_nothing() {
    let honest_payloads: Vec<Vec<u8>> = (1..=3).map(|s| fp32(&honest(s))).collect();
    let huge = fp32(&honest(4).iter().map(|v| v * 500.0).collect::<Vec<_>>());
    let flipped = fp32(&honest(5).iter().map(|v| -v).collect::<Vec<_>>());
    let copy = honest_payloads[0].clone();
    let mut nan = fp32(&honest(6));
    let at = barnraise_protocol::codec::HEADER_LEN + 8;
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut payloads = honest_payloads.clone();
    payloads.extend([huge, flipped, copy, nan]);
    let mut round = round_of(payloads, &[100; 7]);
    // Node 8 commits, but the bytes its commit names are not what it serves.
    let mut lie = round.close.candidates[0].clone();
    lie.node = node(8);
    lie.commit.update_hash = Hash::of(b"something else");
    lie.order = 7;
    round
        .payloads
        .insert(lie.commit.update_hash, Arc::new(fp32(&honest(8))));
    round.close.candidates.push(lie);

    let (closed, theta) = run(&round, "mean");
    let accepted: Vec<NodeId> = closed.manifest.accepted.iter().map(|a| a.node).collect();
    assert_eq!(accepted, vec![node(1), node(2), node(3)]);
    assert_eq!(reason_of(&closed, 4), Some("norm-too-large"));
    assert_eq!(reason_of(&closed, 5), Some("sign-flipped"));
    assert_eq!(reason_of(&closed, 6), Some("copycat"));
    assert_eq!(reason_of(&closed, 7), Some("non-finite"));
    assert_eq!(reason_of(&closed, 8), Some("hash-mismatch"));
    assert_eq!(closed.manifest.missing, vec![node(99)]);

    // θ_{r+1} is what the honest updates alone give.
    let mut expect = vec![0.5f32; P];
    let mut optimizer = OuterOptimizer::new(OuterConfig::default(), P);
    let inputs: Vec<(&[u8], f32)> = closed
        .manifest
        .accepted
        .iter()
        .map(|a| (round.payloads[&a.update_hash].as_slice(), a.weight))
        .collect();
    apply_round(&mut expect, &mut optimizer, &AggregationRule::Mean, &inputs).unwrap();
    assert_eq!(Hash::of_f32s(&expect), Hash::of_f32s(&theta));

    // Ledger rows: three accepted with credit, five rejected, one missing, nothing else.
    let count = |v: &str| closed.updates.iter().filter(|u| u.verdict == v).count();
    assert_eq!(
        (count("accepted"), count("rejected"), count("missing")),
        (3, 5, 1)
    );
    assert!(
        closed
            .updates
            .iter()
            .all(|u| (u.verdict == "accepted") == (u.credit > 0.0))
    );
    assert_eq!(closed.manifest.previous_manifest, Hash::of(b"m2"));
}

#[test]
fn weights_are_token_shares_in_commit_order() {
    let payloads: Vec<Vec<u8>> = (1..=3).map(|s| fp32(&honest(s))).collect();
    let round = round_of(payloads, &[100, 300, 600]);
    for rule in ["mean", "trimmed-mean:0.2", "centered-clip:1.0"] {
        let (closed, _) = run(&round, rule);
        let weights: Vec<f32> = closed.manifest.accepted.iter().map(|a| a.weight).collect();
        for (w, e) in weights.iter().zip([0.1f32, 0.3, 0.6]) {
            assert!((w - e).abs() < 1e-7, "{rule}: {weights:?}");
        }
        assert_eq!(
            closed.manifest.aggregation,
            rule.parse::<AggregationRule>().unwrap().to_string()
        );
    }
}

#[test]
fn a_round_with_nothing_accepted_keeps_theta() {
    let round = round_of(vec![], &[]);
    let (closed, theta) = run(&round, "mean");
    assert!(closed.manifest.accepted.is_empty());
    assert_eq!(theta, vec![0.5f32; P]);
}

/// Spot checks over budget (issue #13): with every share drawn and room for
/// one replay, the share replayed is the one with the lowest draw, whatever
/// the commit order; here no state was fetched, so it fails and only that
/// update is rejected, with the reason in the ledger detail.
#[test]
fn over_budget_spot_checks_replay_the_lowest_draws() {
    let key = barnraise_protocol::SigningKey::from_seed([9; 32]).unwrap();
    let payloads: Vec<Vec<u8>> = (1..=3).map(|s| fp32(&honest(s))).collect();
    let mut round = round_of(payloads, &[100, 100, 100]);
    for c in &mut round.close.candidates {
        c.commit.shares = vec![barnraise_protocol::workers::WorkerShare {
            index: 0,
            tokens: 100,
            delta_hash: Hash::of(b"delta"),
            delta_sketch: vec![0.0; barnraise_protocol::workers::SHARE_SKETCH_DIM],
            state_hash: Hash::of(&[c.node.0.0[0]]),
        }];
    }
    let rank = |c: &Candidate| {
        crate::spot::drawn_shares(&key, "r", &c.node, &c.commit, 1.0)
            .first()
            .map(|(r, _)| *r)
            .unwrap()
    };
    let lowest = round
        .close
        .candidates
        .iter()
        .min_by_key(|c| rank(c))
        .map(|c| c.node)
        .unwrap();

    let verify = VerifyConfig {
        probe: false,
        spot_check_fraction: 1.0,
        spot_check_max: 1,
        ..VerifyConfig::default()
    };
    let run_config = barnraise_protocol::messages::RunConfig {
        run_id: "r".into(),
        model_config_json: String::new(),
        codec: "fp32".into(),
        inner_steps: 1,
        batch_size: 1,
        seq_len: 8,
        inner_lr: 1e-3,
        outer_lr: 1.0,
        outer_momentum: 0.0,
        aggregation: "mean".into(),
        total_rounds: 10,
        dataset: vec![],
        held_out: vec![],
    };
    // Rounds 0–2 accepted all three nodes' 100 tokens, with no check passed.
    let earlier: Vec<Manifest> = (0..3u64)
        .map(|r| {
            let mut m = closed_manifest(r, &round.close.plan);
            m.accepted = round
                .close
                .candidates
                .iter()
                .map(|c| AcceptedUpdate {
                    node: c.node,
                    update_hash: Hash::of(&[r as u8, c.node.0.0[0]]),
                    update_bytes: 1,
                    tokens: 100,
                    weight: 1.0 / 3.0,
                    compute_ms: 1,
                })
                .collect();
            m
        })
        .collect();
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let no_state = |_: &Hash| None;
    let spot = SpotContext {
        key: &key,
        run: &run_config,
        state: &no_state,
        unverified: &unverified,
    };
    let (closed, _) = close_with(&round, "mean", &verify, Some(spot));
    assert_eq!(closed.spot_checks.len(), 1, "one replay fits the budget");
    assert_eq!(closed.spot_checks[0].node, lowest);
    // Clawback: the failed node loses rounds 0–2's credit; the others,
    // unchecked, keep theirs, and nobody is verified.
    assert_eq!(
        closed.manifest.voided,
        vec![barnraise_protocol::messages::VoidedCredit {
            node: lowest,
            from_round: 0,
            tokens: 300,
        }]
    );
    assert!(closed.manifest.verified.is_empty());
    let mut after = unverified.clone();
    after.apply(&closed.manifest).unwrap();
    assert_eq!(after.void_for(&lowest), None);
    let codes: Vec<(NodeId, &str)> = closed
        .manifest
        .rejected
        .iter()
        .map(|r| (r.node, r.reason.code()))
        .collect();
    assert_eq!(codes, vec![(lowest, "spot-check")]);
    assert_eq!(closed.manifest.accepted.len(), 2);
    let row = closed
        .updates
        .iter()
        .find(|u| u.node == lowest.to_string())
        .unwrap();
    assert!(
        row.detail
            .as_deref()
            .is_some_and(|d| d.contains("state was not served")),
        "{row:?}"
    );
}

/// An empty manifest of round `r` for the run of `plan`.
fn closed_manifest(r: u64, plan: &RoundPlan) -> Manifest {
    Manifest {
        run_id: plan.run_id.clone(),
        round: r,
        previous_manifest: Hash::ZERO,
        base_params_hash: Hash::ZERO,
        accepted: vec![],
        rejected: vec![],
        missing: vec![],
        verified: vec![],
        voided: vec![],
        aggregation: "mean".into(),
        next_params_hash: Hash::ZERO,
        closed_at_ms: 0,
    }
}

#[test]
fn the_probe_measures_new_nodes_first_then_a_seeded_draw_up_to_its_budget() {
    let payloads: Vec<Vec<u8>> = (1..=6).map(|i| fp32(&honest(i))).collect();
    let round = round_of(payloads, &[10; 6]);
    let model = barnraise_trainer::ModelConfig::preset("tiny").unwrap();
    let rule: AggregationRule = "mean".parse().unwrap();
    let shards = HashMap::new();
    let verify = VerifyConfig {
        probe_max: 3,
        ..VerifyConfig::default()
    };
    // Nodes 1 to 4 had an update accepted lately; 5 and 6 did not.
    let recent: Vec<crate::verify::RecentUpdate> = (1..=4)
        .map(|i| crate::verify::RecentUpdate {
            node: node(i),
            round: 2,
            sketch: crate::verify::Sketch::of(&honest(u32::from(i)), 7),
        })
        .collect();
    let ctx = CloseContext {
        model: &model,
        codec: CodecConfig::Fp32,
        rule: &rule,
        verify: &verify,
        seq_len: 8,
        dataset: &[],
        shard_tokens: &shards,
        heldout: None,
        flops_per_token: 6.0,
        sketch_seed: 7,
        recent: &recent,
        spot: None,
    };
    let survivors: Vec<usize> = (0..6).collect();
    let mut drawn = std::collections::HashSet::new();
    for seed in 0..40 {
        let (probed, passed) = probe_sample(&ctx, &round.close, &survivors, seed);
        assert_eq!(probed.len(), 3);
        assert_eq!(passed.len(), 3);
        assert!(
            probed.contains(&4) && probed.contains(&5),
            "new nodes first"
        );
        assert!(probed.windows(2).all(|w| w[0] < w[1]), "commit order");
        let mut all: Vec<usize> = probed.iter().chain(&passed).copied().collect();
        all.sort_unstable();
        assert_eq!(all, survivors, "every survivor is probed or passed once");
        assert_eq!(
            probe_sample(&ctx, &round.close, &survivors, seed),
            (probed.clone(), passed),
            "the same seed draws the same sample"
        );
        drawn.insert(probed[0]);
    }
    assert_eq!(drawn.len(), 4, "every established node is drawn some time");
    // Within budget, everyone is probed.
    let (probed, passed) = probe_sample(&ctx, &round.close, &survivors[..3], 1);
    assert_eq!((probed, passed), (vec![0, 1, 2], vec![]));
}
