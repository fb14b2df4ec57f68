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

/// The coordinator key of the tests' closes.
fn coordinator_key() -> barnraise_protocol::SigningKey {
    barnraise_protocol::SigningKey::from_seed([5; 32]).unwrap()
}

/// Closes `round` with the tiny model, fp32 and no shards, θ_r all 0.5.
fn close_with(
    round: &Round,
    rule: &str,
    verify: &VerifyConfig,
    spot: Option<SpotContext<'_>>,
) -> (Closed, Vec<f32>) {
    close_with_early(round, rule, verify, spot, &Early::default())
}

/// [`close_with`], given checks run while the round was open.
fn close_with_early(
    round: &Round,
    rule: &str,
    verify: &VerifyConfig,
    spot: Option<SpotContext<'_>>,
    early: &Early,
) -> (Closed, Vec<f32>) {
    let key = coordinator_key();
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
        evaluate: true,
        key: &key,
        early,
    };
    close_from(&ctx, round, vec![0.5f32; P])
}

/// Closes `round` from θ_r = `theta` with a fresh outer optimizer.
fn close_from(ctx: &CloseContext<'_>, round: &Round, mut theta: Vec<f32>) -> (Closed, Vec<f32>) {
    let mut optimizer = OuterOptimizer::new(OuterConfig::default(), theta.len());
    let closed = close_round(
        ctx,
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
/// The run config of the tests' rounds.
fn run_config(
    seq_len: u32,
    dataset: Vec<barnraise_protocol::messages::ShardInfo>,
) -> barnraise_protocol::messages::RunConfig {
    barnraise_protocol::messages::RunConfig {
        run_id: "r".into(),
        model_config_json: String::new(),
        codec: "fp32".into(),
        inner_steps: 1,
        batch_size: 1,
        seq_len,
        inner_lr: 1e-3,
        outer_lr: 1.0,
        outer_momentum: 0.0,
        aggregation: "mean".into(),
        total_rounds: 10,
        overlap_steps: 0,
        dataset,
        held_out: vec![],
    }
}

/// One worker share per commit, its state named after the node.
fn give_one_share_each(round: &mut Round) {
    for c in &mut round.close.candidates {
        c.commit.shares = vec![barnraise_protocol::workers::WorkerShare {
            index: 0,
            tokens: 100,
            delta_hash: Hash::of(b"delta"),
            delta_sketch: vec![0.0; barnraise_protocol::workers::SHARE_SKETCH_DIM],
            state_hash: Hash::of(&[c.node.0.0[0]]),
            carried: 0,
            held_back: 0,
        }];
    }
}

/// Three honest fp32 updates, one worker share each, and the spot-check
/// key; which node's share draws lowest; the run config replays use.
fn spot_round() -> (
    barnraise_protocol::SigningKey,
    Round,
    NodeId,
    barnraise_protocol::messages::RunConfig,
) {
    let key = barnraise_protocol::SigningKey::from_seed([9; 32]).unwrap();
    let payloads: Vec<Vec<u8>> = (1..=3).map(|s| fp32(&honest(s))).collect();
    let mut round = round_of(payloads, &[100, 100, 100]);
    give_one_share_each(&mut round);
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

    let run_config = run_config(8, vec![]);
    (key, round, lowest, run_config)
}

/// Spot checks only, every share drawn, one replayed a round.
fn one_replay() -> VerifyConfig {
    VerifyConfig {
        probe: false,
        spot_check_fraction: 1.0,
        spot_check_max: 1,
        ..VerifyConfig::default()
    }
}

#[test]
fn over_budget_spot_checks_replay_the_lowest_draws() {
    let (key, round, lowest, run_config) = spot_round();
    let verify = one_replay();
    // Rounds 0–2 accepted all three nodes' 100 tokens, with no check passed.
    let earlier = unchecked_rounds(&round, 3);
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let no_state = |_: &Hash| None;
    let spot = SpotContext {
        key: &key,
        run: &run_config,
        state: &no_state,
        prev: None,
        unverified: &unverified,
        deferred: DeferredInput::default(),
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

#[test]
fn a_drawn_state_withheld_while_the_round_was_open_voids_the_window() {
    // Rounds 0–2 credited every node 100 tokens, unchecked. In round 3 one
    // node's drawn state was not served, so its update was rejected
    // `spot-check` before the close: that is a failed check, and its window
    // is voided, or a node faking workers would withhold the state whenever
    // it is drawn and keep the rest of its credit.
    let (key, mut round, _, run_config) = spot_round();
    let earlier = unchecked_rounds(&round, 3);
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let withheld = round.close.candidates.remove(1);
    round.close.rejected.push(RejectedUpdate {
        node: withheld.node,
        update_hash: Some(withheld.commit.update_hash),
        reason: RejectReason::SpotCheck { worker: 0 },
    });
    // A rejection for another reason voids nothing.
    let refused = round.close.candidates.remove(1);
    round.close.rejected.push(RejectedUpdate {
        node: refused.node,
        update_hash: Some(refused.commit.update_hash),
        reason: RejectReason::NotServed,
    });
    let no_state = |_: &Hash| None;
    let spot = SpotContext {
        key: &key,
        run: &run_config,
        state: &no_state,
        prev: None,
        unverified: &unverified,
        deferred: DeferredInput::default(),
    };
    // No share is drawn in the close itself.
    let verify = VerifyConfig {
        probe: false,
        spot_check_fraction: 0.0,
        ..VerifyConfig::default()
    };
    let (closed, _) = close_with(&round, "mean", &verify, Some(spot));
    assert!(closed.spot_checks.is_empty());
    assert_eq!(
        closed.manifest.voided,
        vec![barnraise_protocol::messages::VoidedCredit {
            node: withheld.node,
            from_round: 0,
            tokens: 300,
        }]
    );
    // The fold (and so the audit) takes the void.
    let mut after = unverified.clone();
    after.apply(&closed.manifest).unwrap();
    assert_eq!(after.void_for(&withheld.node), None);
    assert_eq!(after.window(&refused.node).tokens, 300);
}

/// Manifests of rounds 0..n that accepted every candidate of `round` with
/// 100 tokens and checked none.
fn unchecked_rounds(round: &Round, n: u64) -> Vec<Manifest> {
    (0..n)
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
        .collect()
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
        evaluate: true,
        key: &coordinator_key(),
        early: &Early::default(),
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

#[test]
fn checks_on_several_threads_reach_the_verdicts_of_one() {
    // A real probe and drawn replays on the tiny model: three nodes
    // trained on their own genre and one sent noise of an honest norm.
    // Every share is drawn and no state is served, so each replay fails
    // its check; the budget takes the two lowest draws. The key is chosen
    // so the noise's share is among the two lowest before the probe rules:
    // replayed early, then dropped, and the next share replayed late. (The
    // draws hang on the update hashes, so on the trained bits: the key is
    // searched for, not fixed.)
    use barnraise_protocol::messages::ShardInfo;
    use barnraise_trainer::data::{corpus, tokenize_bytes};
    use barnraise_trainer::device::{DeviceSpec, select};
    use barnraise_trainer::{InnerConfig, Trainer};
    let model = barnraise_trainer::ModelConfig::preset("tiny").unwrap();
    let cpu = || select(DeviceSpec::Cpu).unwrap();
    let genres: Vec<Arc<Vec<u16>>> = corpus::genres(12_000)
        .iter()
        .map(|g| Arc::new(tokenize_bytes(g.as_bytes())))
        .collect();
    let heldout = tokenize_bytes(corpus::generate(9, 12_000).as_bytes());
    let theta = Trainer::new(&model, cpu(), 0)
        .unwrap()
        .flat_params()
        .unwrap();
    let update_on = |tokens: &[u16]| {
        let mut t = Trainer::new(&model, cpu(), 0).unwrap();
        t.set_flat_params(&theta).unwrap();
        let inner = InnerConfig {
            steps: 10,
            batch_size: 8,
            seq_len: 64,
            warmup: 1,
            seed: 2,
            ..InnerConfig::default()
        };
        t.train_inner(tokens, &inner).unwrap();
        let local = t.flat_params().unwrap();
        theta
            .iter()
            .zip(&local)
            .map(|(a, b)| a - b)
            .collect::<Vec<f32>>()
    };
    let mut deltas: Vec<Vec<f32>> = genres.iter().map(|g| update_on(g)).collect();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let raw: Vec<f32> = (0..theta.len() as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) % 65_536) as f32 / 65_536.0) - 0.5)
        .collect();
    let scale = norm(&deltas[2]) / norm(&raw);
    deltas.push(raw.iter().map(|x| x * scale).collect());
    let payloads: Vec<Vec<u8>> = deltas
        .iter()
        .map(|d| {
            Encoder::new(CodecConfig::Fp32, d.len())
                .unwrap()
                .encode(d)
                .unwrap()
        })
        .collect();
    let mut round = round_of(payloads, &[100; 4]);
    let dataset: Vec<ShardInfo> = genres
        .iter()
        .map(|g| ShardInfo {
            hash: Hash::of(&g.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>()),
            tokens: g.len() as u64,
            bytes: 2 * g.len() as u64,
        })
        .collect();
    let shard_tokens: HashMap<Hash, Arc<Vec<u16>>> = dataset
        .iter()
        .zip(&genres)
        .map(|(info, g)| (info.hash, g.clone()))
        .collect();
    for (i, a) in round.close.plan.assignments.iter_mut().enumerate() {
        // The noise node (4) claims the prose shard.
        a.shards = vec![i.min(2) as u32];
    }
    // Node 2 was paced to 4 steps (the rest have 1): its bar is √4 = 2 times theirs.
    round.close.plan.assignments[1].inner_steps = 4;
    give_one_share_each(&mut round);
    let noise = node(4);
    let rank_of = |key: &barnraise_protocol::SigningKey, c: &Candidate| {
        crate::spot::drawn_shares(key, "r", &c.node, &c.commit, 1.0)[0].0
    };
    let key = (0u8..=255)
        .map(|s| barnraise_protocol::SigningKey::from_seed([s; 32]).unwrap())
        .find(|key| {
            let mut ranks: Vec<(u64, NodeId)> = round
                .close
                .candidates
                .iter()
                .map(|c| (rank_of(key, c), c.node))
                .collect();
            ranks.sort();
            // And node 1's share is among the two lowest of the honest
            // three, so the second look below, which lets it past the
            // probe, hands it to the replay budget.
            let honest: Vec<NodeId> = ranks
                .iter()
                .map(|(_, n)| *n)
                .filter(|n| *n != noise)
                .collect();
            ranks[..2].iter().any(|(_, n)| *n == noise) && honest[..2].contains(&node(1))
        })
        .unwrap();
    let run_config = run_config(64, dataset.clone());
    let unverified = barnraise_protocol::credit::Unverified::default();
    let no_state = |_: &Hash| None;
    let rule: AggregationRule = "mean".parse().unwrap();
    let close_looking = |threads: usize, early: &Early, second_look_batches: usize| {
        let verify = VerifyConfig {
            spot_check_fraction: 1.0,
            spot_check_max: 2,
            threads,
            probe_second_look_batches: second_look_batches,
            ..VerifyConfig::default()
        };
        let ctx = CloseContext {
            model: &model,
            codec: CodecConfig::Fp32,
            rule: &rule,
            verify: &verify,
            seq_len: 64,
            dataset: &dataset,
            shard_tokens: &shard_tokens,
            heldout: Some(&heldout),
            flops_per_token: 6.0,
            sketch_seed: 7,
            recent: &[],
            spot: Some(SpotContext {
                key: &key,
                run: &run_config,
                state: &no_state,
                prev: None,
                unverified: &unverified,
                deferred: DeferredInput::default(),
            }),
            evaluate: true,
            key: &key,
            early,
        };
        close_from(&ctx, &round, theta.clone())
    };
    let close_on = |threads: usize, early: &Early| close_looking(threads, early, 8);
    let (one, theta_one) = close_on(1, &Early::default());
    assert_eq!(reason_of(&one, 4), Some("not-useful"), "{:?}", one.probes);
    assert_eq!(one.probes.len(), 4, "every update is probed");
    let bar_of = |n: u8| one.probes.iter().find(|p| p.node == node(n)).unwrap().bar;
    assert!(bar_of(1) > 0.0);
    assert_eq!(bar_of(2), 2.0 * bar_of(1));
    assert_eq!(bar_of(3), bar_of(1));
    // Only the noise failed the first look, and the second confirmed it.
    for p in &one.probes {
        assert_eq!(p.second.is_some(), p.node == noise, "{p:?}");
    }
    let second = one.probes.iter().find_map(|p| p.second).unwrap();
    assert!(second.own_gain < one.probes[0].bar, "{second:?}");
    assert!(
        one.updates.iter().any(|u| u
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("second look on 8 batches"))),
        "the ledger shows the second look"
    );
    assert_eq!(
        one.spot_checks.len(),
        2,
        "the budget is filled after the noise drops out"
    );
    assert!(one.spot_checks.iter().all(|s| s.node != noise && !s.passed));
    assert_eq!(one.manifest.accepted.len(), 1);
    assert!(one.eval_loss.is_some_and(f64::is_finite));
    for threads in [2, 3] {
        let (many, theta_many) = close_on(threads, &Early::default());
        assert_eq!(many.manifest, one.manifest, "{threads} threads");
        assert_eq!(many.probes, one.probes);
        assert_eq!(many.spot_checks, one.spot_checks);
        assert_eq!(many.updates, one.updates);
        assert_eq!(many.eval_loss, one.eval_loss);
        assert_eq!(theta_many, theta_one);
    }

    // Probes run while the round was open (of node 1 and of the noise),
    // with the same seeds and functions, give the close's verdicts.
    let mut early = Early::default();
    let mut probe = Probe::new(&model, &theta, &VerifyConfig::default(), 64, 0).unwrap();
    let heldout_seed = crate::probe::heldout_seed(&key, "r", 3);
    early.heldout_base = Some(probe.base_loss_seeded(&heldout, heldout_seed).unwrap());
    // The seed a candidate is probed with and its shard's tokens.
    let probed_on = |c: &Candidate| {
        let seed = crate::probe::commit_seed(&key, "r", 3, &c.node, &c.commit.update_hash);
        let assignment = round
            .close
            .plan
            .assignments
            .iter()
            .find(|a| a.node == c.node)
            .unwrap();
        let own = crate::probe::own_shard(assignment, &dataset, seed)
            .and_then(|h| shard_tokens.get(&h).cloned())
            .unwrap();
        (seed, own)
    };
    for (c, delta) in round.close.candidates.iter().zip(&deltas) {
        if c.node != node(1) && c.node != noise {
            continue;
        }
        let (seed, own) = probed_on(c);
        let measured = probe
            .measure_update(delta, &own, seed, &heldout, heldout_seed, None)
            .unwrap();
        early
            .probes
            .insert((c.node, c.commit.update_hash), measured);
    }
    let (with_early, theta_early) = close_on(2, &early);
    assert_eq!(with_early.manifest, one.manifest);
    assert_eq!(with_early.probes, one.probes);
    assert_eq!(with_early.spot_checks, one.spot_checks);
    assert_eq!(with_early.updates, one.updates);
    assert_eq!(theta_early, theta_one);
    // Base losses measured while the updates travelled (of every other
    // update) leave the close only the losses after the update, with the
    // same verdicts.
    let mut with_bases = early.clone();
    for c in &round.close.candidates {
        if early.probes.contains_key(&(c.node, c.commit.update_hash)) {
            continue;
        }
        let (seed, own) = probed_on(c);
        with_bases.bases.insert(
            (c.node, c.commit.update_hash),
            probe.base_loss_seeded(&own, seed).unwrap(),
        );
    }
    assert!(!with_bases.bases.is_empty());
    let (based, theta_based) = close_on(2, &with_bases);
    assert_eq!(based.manifest, one.manifest);
    assert_eq!(based.probes, one.probes);
    assert_eq!(based.updates, one.updates);
    assert_eq!(theta_based, theta_one);
    // They are taken as they are: a base far below where the update left
    // the shard makes the update look harmful.
    let mut low_base = Early::default();
    let (first, _) = with_bases
        .bases
        .iter()
        .next()
        .map(|(k, v)| (*k, *v))
        .unwrap();
    low_base.bases.insert(first, 0.01);
    let (with_low, _) = close_looking(1, &low_base, 0);
    let reason = with_low
        .manifest
        .rejected
        .iter()
        .find(|r| r.node == first.0)
        .map(|r| r.reason.code());
    assert_eq!(reason, Some("not-useful"), "rejected on a base of 0.01");
    // And the close takes them as they are: a measurement that says node 1's
    // update made its shard worse rejects it.
    let mut forged = early.clone();
    let hash_1 = round.close.candidates[0].commit.update_hash;
    forged.probes.insert(
        (node(1), hash_1),
        crate::probe::Measured {
            own_base: 3.0,
            own_after: 3.5,
            other_after: 3.0,
        },
    );
    let (with_forged, _) = close_looking(1, &forged, 0);
    assert_eq!(reason_of(&with_forged, 1), Some("not-useful"));
    // Unless a second look, on fresh batches, finds it useful after all:
    // what an unlucky first look at an honest update needs.
    let (second_look, _) = close_on(2, &forged);
    // Past the probe, to the spot check that no node here can pass (no
    // state is served).
    assert_eq!(
        reason_of(&second_look, 1),
        Some("spot-check"),
        "{:?}",
        second_look.probes
    );
    assert_eq!(reason_of(&second_look, 4), Some("not-useful"));
    let record = second_look
        .probes
        .iter()
        .find(|p| p.node == node(1))
        .unwrap();
    assert!(record.result.own_gain < 0.0 && record.second.is_some_and(|s| s.own_gain > record.bar));
}

#[test]
fn replays_run_while_the_round_was_open_are_used_and_others_ignored() {
    let (key, round, lowest, run_config) = spot_round();
    let verify = one_replay();
    let unverified = barnraise_protocol::credit::Unverified::default();
    // No state is served at close, so a replay there fails its check.
    let no_state = |_: &Hash| None;
    let share_of = |node: NodeId| {
        let c = round
            .close
            .candidates
            .iter()
            .find(|c| c.node == node)
            .unwrap();
        (c.commit.update_hash, c.commit.shares[0].clone())
    };
    let (lowest_hash, lowest_share) = share_of(lowest);
    let other = round
        .close
        .candidates
        .iter()
        .map(|c| c.node)
        .find(|n| *n != lowest)
        .unwrap();
    let (other_hash, other_share) = share_of(other);
    let exact = crate::spot::SpotResult {
        worker: 0,
        exact: true,
        distance: 0.0,
        replayed_tokens: 100,
        claimed_tokens: 100,
        unusable: None,
    };
    let mut early = Early::default();
    // The share the close draws was replayed early and passed...
    early
        .replays
        .insert((lowest, lowest_hash, lowest_share.index), exact.clone());
    // ...a share over the budget failed early: it is not the close's to
    // count...
    let failed = crate::spot::SpotResult::unusable(&other_share, "not served".into());
    early
        .replays
        .insert((other, other_hash, other_share.index), failed.clone());
    // ...and another node's replay under the same update hash (it sent the
    // same bytes) says nothing about this node's worker.
    early
        .replays
        .insert((other, lowest_hash, lowest_share.index), failed);
    let spot = SpotContext {
        key: &key,
        run: &run_config,
        state: &no_state,
        prev: None,
        unverified: &unverified,
        deferred: DeferredInput::default(),
    };
    let (closed, _) = close_with_early(&round, "mean", &verify, Some(spot), &early);
    assert_eq!(closed.spot_checks.len(), 1);
    assert_eq!(closed.spot_checks[0].node, lowest);
    assert_eq!(closed.spot_checks[0].result, exact);
    assert!(closed.spot_checks[0].passed);
    assert!(
        closed.manifest.rejected.is_empty(),
        "{:?}",
        closed.manifest.rejected
    );
    assert_eq!(closed.manifest.verified, vec![lowest]);
    assert_eq!(closed.manifest.accepted.len(), 3);
    assert_eq!(
        closed.timings.spot,
        std::time::Duration::ZERO,
        "nothing replayed at close"
    );
}

/// An exact replay of worker 0's 100 tokens.
fn exact_replay() -> crate::spot::SpotResult {
    crate::spot::SpotResult {
        worker: 0,
        exact: true,
        distance: 0.0,
        replayed_tokens: 100,
        claimed_tokens: 100,
        unusable: None,
    }
}

/// Spot checks over `round` with no state ever fetched and deferral on,
/// with these earlier verdicts and checks still out.
fn deferring<'a>(
    key: &'a barnraise_protocol::SigningKey,
    run: &'a barnraise_protocol::messages::RunConfig,
    unverified: &'a barnraise_protocol::credit::Unverified,
    settled: &'a [Settled],
    pending: &'a [NodeId],
) -> SpotContext<'a> {
    fn no_state(_: &Hash) -> Option<Arc<Vec<u8>>> {
        None
    }
    SpotContext {
        key,
        run,
        state: &no_state,
        prev: None,
        unverified,
        deferred: DeferredInput {
            defer: true,
            settled,
            pending,
        },
    }
}

#[test]
fn a_drawn_state_not_in_at_the_close_is_deferred_not_failed() {
    let (key, round, lowest, run_config) = spot_round();
    let verify = one_replay();
    let earlier = unchecked_rounds(&round, 3);
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let spot = deferring(&key, &run_config, &unverified, &[], &[]);
    let (closed, _) = close_with(&round, "mean", &verify, Some(spot));
    // Without deferral this share fails and voids the window
    // (`over_budget_spot_checks_replay_the_lowest_draws`); deferred, the
    // update counts, nothing is voided, and the share waits for its state.
    assert_eq!(closed.manifest.accepted.len(), 3);
    assert!(closed.manifest.rejected.is_empty());
    assert!(closed.manifest.voided.is_empty());
    assert!(closed.manifest.verified.is_empty());
    assert!(closed.spot_checks.is_empty());
    assert_eq!(closed.deferred.len(), 1);
    let deferred = &closed.deferred[0];
    let c = round
        .close
        .candidates
        .iter()
        .find(|c| c.node == lowest)
        .unwrap();
    assert_eq!(deferred.node, lowest);
    assert_eq!(deferred.update_hash, c.commit.update_hash);
    assert_eq!(deferred.share, c.commit.shares[0]);
    assert_eq!(deferred.assignment.node, lowest);
    // The window keeps the deferred round's credit for the verdict.
    let mut after = unverified.clone();
    after.apply(&closed.manifest).unwrap();
    assert_eq!(after.window(&lowest).tokens, 400);
}

#[test]
fn a_deferred_check_settles_in_a_later_close_failure_voids_and_pass_lists_nothing() {
    let (key, round, _, run_config) = spot_round();
    let earlier = unchecked_rounds(&round, 3);
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let nodes: Vec<NodeId> = round.close.candidates.iter().map(|c| c.node).collect();
    let (cheat, honest, quiet) = (nodes[0], nodes[1], nodes[2]);
    // Round 2's deferred checks came in since the last close: one faked
    // worker, one exact replay.
    let settled = vec![
        Settled {
            round: 2,
            node: cheat,
            result: crate::spot::SpotResult {
                exact: false,
                distance: 0.9,
                ..exact_replay()
            },
        },
        Settled {
            round: 2,
            node: honest,
            result: exact_replay(),
        },
    ];
    let spot = deferring(&key, &run_config, &unverified, &settled, &[]);
    // No share of this round is drawn.
    let verify = VerifyConfig {
        probe: false,
        spot_check_fraction: 0.0,
        ..VerifyConfig::default()
    };
    let (closed, _) = close_with(&round, "mean", &verify, Some(spot));
    // The failure rejects the cheat's update of this round and voids its
    // window, rounds 0–2, the deferred round among them.
    let codes: Vec<(NodeId, &str)> = closed
        .manifest
        .rejected
        .iter()
        .map(|r| (r.node, r.reason.code()))
        .collect();
    assert_eq!(codes, vec![(cheat, "spot-check")]);
    assert_eq!(
        closed.manifest.voided,
        vec![barnraise_protocol::messages::VoidedCredit {
            node: cheat,
            from_round: 0,
            tokens: 300,
        }]
    );
    // The pass lists nothing: `verified` would also close the window over
    // this round's update, which no check saw.
    assert!(closed.manifest.verified.is_empty());
    let accepted: Vec<NodeId> = closed.manifest.accepted.iter().map(|a| a.node).collect();
    assert_eq!(accepted, vec![honest, quiet]);
    assert_eq!(closed.spot_checks.len(), 2);
    assert!(closed.spot_checks.iter().all(|s| s.round == 2));
    // The audit's fold takes the manifest.
    let mut after = unverified.clone();
    after.apply(&closed.manifest).unwrap();
    assert_eq!(after.void_for(&cheat), None);
    assert_eq!(after.window(&honest).tokens, 400);
    // The ledger says which round the verdicts were for.
    let detail = |n: NodeId| {
        closed
            .updates
            .iter()
            .find(|u| u.node == n.to_string())
            .and_then(|u| u.detail.clone())
            .unwrap_or_default()
    };
    assert!(
        detail(honest).contains("round 2's deferred spot check of worker 0: exact replay"),
        "{}",
        detail(honest)
    );
    assert!(
        detail(cheat).contains("round 2's deferred spot check of worker 0: replay differs"),
        "{}",
        detail(cheat)
    );
}

#[test]
fn a_node_with_a_deferred_check_out_is_not_listed_verified() {
    let (key, round, lowest, run_config) = spot_round();
    let verify = one_replay();
    let unverified = barnraise_protocol::credit::Unverified::default();
    let c = round
        .close
        .candidates
        .iter()
        .find(|c| c.node == lowest)
        .unwrap();
    // This round's drawn share replayed exactly while the round was open...
    let mut early = Early::default();
    early.replays.insert(
        (lowest, c.commit.update_hash, c.commit.shares[0].index),
        exact_replay(),
    );
    for pending in [vec![], vec![lowest]] {
        let spot = deferring(&key, &run_config, &unverified, &[], &pending);
        let (closed, _) = close_with_early(&round, "mean", &verify, Some(spot), &early);
        assert_eq!(closed.spot_checks.len(), 1);
        assert!(closed.spot_checks[0].passed);
        assert_eq!(closed.manifest.accepted.len(), 3);
        // ...which lists the node verified, unless an earlier round's
        // check of it is still out: `verified` would close the window over
        // that round before its verdict.
        let expected = if pending.is_empty() {
            vec![lowest]
        } else {
            vec![]
        };
        assert_eq!(closed.manifest.verified, expected, "pending {pending:?}");
    }
}

#[test]
fn a_node_that_fails_a_check_in_the_close_loses_its_deferred_checks_of_that_round() {
    let (key, mut round, lowest, run_config) = spot_round();
    // `lowest` ran two workers: worker 0's replay (run while the round was
    // open) shows a faked worker, worker 1's state has not arrived.
    let c = round
        .close
        .candidates
        .iter_mut()
        .find(|c| c.node == lowest)
        .unwrap();
    let mut second = c.commit.shares[0].clone();
    second.index = 1;
    second.state_hash = Hash::of(b"worker 1's state, still arriving");
    c.commit.shares.push(second);
    c.commit.workers = 2;
    let hash = c.commit.update_hash;
    let mut faked = exact_replay();
    faked.exact = false;
    faked.distance = 0.9;
    let mut early = Early::default();
    early.replays.insert((lowest, hash, 0), faked);
    let verify = VerifyConfig {
        probe: false,
        spot_check_fraction: 1.0,
        spot_check_max: 8,
        ..VerifyConfig::default()
    };
    let earlier = unchecked_rounds(&round, 3);
    let unverified = barnraise_protocol::credit::Unverified::replay(&earlier).unwrap();
    let spot = deferring(&key, &run_config, &unverified, &[], &[]);
    let (closed, _) = close_with_early(&round, "mean", &verify, Some(spot), &early);
    assert_eq!(reason_of(&closed, lowest.0.0[0]), Some("spot-check"));
    assert!(closed.manifest.voided.iter().any(|v| v.node == lowest));
    // Voided now: worker 1's check could only void it again, later, over
    // credit it never saw. The other nodes' shares (no state either) wait.
    let deferred: Vec<(NodeId, u32)> = closed
        .deferred
        .iter()
        .map(|d| (d.node, d.share.index))
        .collect();
    assert!(deferred.iter().all(|(n, _)| *n != lowest), "{deferred:?}");
    assert_eq!(deferred.len(), 2, "{deferred:?}");
}
