//! Fake-clock tests of the round state machine.

use super::*;
use barnraise_protocol::messages::Commit;

const DEADLINE: u64 = 10_000;
const HOLD_MAX: u64 = 30_000;

fn node(i: u8) -> NodeId {
    NodeId::from_bytes([i; 32])
}

fn machine(shards: usize, quorum: Quorum, min_nodes: usize, total_rounds: u64) -> Rounds {
    let config = RoundsConfig {
        run_id: "run".into(),
        seed: 42,
        inner_steps: 4,
        batch_size: 2,
        seq_len: 8,
        shards_per_node: 1,
        quorum,
        deadline_ms: DEADLINE,
        pace: true,
        fetch_hold_max_ms: HOLD_MAX,
        min_nodes,
        total_rounds,
        shards: (0..shards).map(|i| Hash::of(&[i as u8])).collect(),
        overlap_steps: 2,
    };
    let start = Start {
        round: 0,
        params_hash: Hash::of(b"theta0"),
        head_manifest: Hash::ZERO,
        shard_uses: vec![],
    };
    Rounds::new(config, start)
}

fn commit_for(plan: &RoundPlan, tag: u8) -> Commit {
    Commit {
        run_id: plan.run_id.clone(),
        round: plan.round,
        base_params_hash: plan.params_hash,
        update_hash: Hash::of(&[tag, 0xAA]),
        update_bytes: 100,
        tokens: 64,
        losses: vec![2.0, 1.9],
        compute_ms: 5,
        workers: 1,
        shares: shares_for(64, 1),
    }
}

/// Shares for `workers` workers that sum to `tokens`.
fn shares_for(tokens: u64, workers: u32) -> Vec<barnraise_protocol::workers::WorkerShare> {
    (0..workers)
        .map(|index| barnraise_protocol::workers::WorkerShare {
            index,
            tokens: tokens / u64::from(workers)
                + u64::from(index == 0) * (tokens % u64::from(workers)),
            delta_hash: Hash::of(&[index as u8]),
            delta_sketch: vec![0.0; barnraise_protocol::workers::SHARE_SKETCH_DIM],
            state_hash: Hash::ZERO,
            carried: 0,
            held_back: 0,
        })
        .collect()
}

fn open_round(m: &mut Rounds, now: u64) -> RoundPlan {
    let actions = m.tick(now);
    match actions.as_slice() {
        [Action::PublishPlan(plan)] => plan.clone(),
        other => panic!("expected a plan, got {other:?}"),
    }
}

fn close_of(actions: Vec<Action>) -> CloseRound {
    match actions.as_slice() {
        [Action::CloseRound(close)] => close.clone(),
        other => panic!("expected a close, got {other:?}"),
    }
}

/// Node `n` commits; its update is not fetched yet.
fn commit_only(m: &mut Rounds, plan: &RoundPlan, n: NodeId) {
    let c = commit_for(plan, n.0.0[0]);
    assert_eq!(
        m.commit(n, &c, Hash::of(&[n.0.0[0]])),
        CommitOutcome::Accepted { round: plan.round }
    );
}

/// Node `n` commits and its update passes the payload check.
fn deliver(m: &mut Rounds, plan: &RoundPlan, n: NodeId) {
    commit_only(m, plan, n);
    m.update_checked(plan.round, &n, Ok(()));
}

/// A machine with nodes 1..=count joined and round 0 open.
fn started(quorum: Quorum, count: u8) -> (Rounds, RoundPlan) {
    let mut m = machine(8, quorum, 1, 5);
    for i in 1..=count {
        m.join(node(i), 1);
    }
    let plan = open_round(&mut m, 0);
    (m, plan)
}

#[test]
fn waits_for_min_nodes_then_opens() {
    let mut m = machine(8, Quorum::Fraction(1.0), 2, 3);
    m.join(node(1), 1);
    assert!(m.tick(0).is_empty());
    m.join(node(2), 1);
    let plan = open_round(&mut m, 5);
    assert_eq!(plan.round, 0);
    assert_eq!(plan.assignments.len(), 2);
    assert_eq!(plan.deadline_ms, 5 + DEADLINE);
    assert!(m.tick(6).is_empty(), "one plan per round");
}

#[test]
fn quorum_closes_before_deadline() {
    let (mut m, plan) = started(Quorum::Count(2), 3);
    deliver(&mut m, &plan, node(1));
    assert!(m.tick(10).is_empty());
    deliver(&mut m, &plan, node(2));
    let close = close_of(m.tick(20));
    assert_eq!(
        close.candidates.iter().map(|c| c.node).collect::<Vec<_>>(),
        vec![node(1), node(2)]
    );
    assert_eq!(close.missing, vec![node(3)]);
}

#[test]
fn quorum_waits_for_fetches_in_flight() {
    let (mut m, plan) = started(Quorum::Count(1), 2);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    assert!(
        m.tick(1).is_empty(),
        "node 2's update is still being fetched"
    );
    m.update_checked(0, &node(2), Ok(()));
    assert_eq!(close_of(m.tick(2)).candidates.len(), 2);
}

#[test]
fn deadline_closes_with_a_missing_node_and_unserved_commit() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 3);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    assert!(m.tick(DEADLINE - 1).is_empty());
    let close = close_of(m.tick(DEADLINE));
    assert_eq!(close.candidates.len(), 1);
    assert_eq!(close.missing, vec![node(3)]);
    assert_eq!(close.rejected.len(), 1);
    assert_eq!(close.rejected[0].reason, RejectReason::NotServed);
    assert_eq!(close.rejected[0].node, node(2));
    // The missing node gets no work until it is seen again.
    assert!(m.round_closed(0, Hash::of(b"t1"), Hash::of(b"m0")).is_ok());
    let next = open_round(&mut m, DEADLINE + 1);
    assert!(next.assignments.iter().all(|a| a.node != node(3)));
    // Seen again (it polled for the plan): work from the next round on; a node that left stays out.
    m.seen(&node(3));
    m.leave(&node(2));
    m.seen(&node(2));
    assert_eq!(m.active_nodes(), vec![node(1), node(3)]);
    m.join(node(2), 1);
    assert_eq!(m.active_nodes(), vec![node(1), node(2), node(3)]);
    assert_eq!(next.previous_manifest, Hash::of(b"m0"));
    assert_eq!(next.params_hash, Hash::of(b"t1"));
}

#[test]
fn a_drawn_state_still_arriving_holds_the_deadline_within_its_bound() {
    // Node 2 commits in time; its drawn worker's state is still arriving
    // at the deadline: the round waits for it, then closes with it.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 3);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    m.hold_for_fetch(0, &node(2), DEADLINE + 8_000);
    // A hold for a node that has not committed, or for another round, is ignored.
    m.hold_for_fetch(0, &node(3), DEADLINE + 8_000);
    m.hold_for_fetch(1, &node(1), DEADLINE + 8_000);
    assert!(m.tick(DEADLINE).is_empty(), "held for node 2's state");
    // Held, the round takes no new commits: node 3 is late.
    let late = commit_for(&plan, 3);
    assert!(matches!(
        m.commit(node(3), &late, Hash::of(&[3])),
        CommitOutcome::Rejected {
            reason: RejectReason::Late,
            ..
        }
    ));
    // The hold runs a grace past the fetch's own limit, so the fetch's
    // verdict lands first.
    assert!(
        m.tick(DEADLINE + 8_000 + FETCH_HOLD_GRACE_MS - 1)
            .is_empty()
    );
    m.update_checked(0, &node(2), Ok(()));
    let close = close_of(m.tick(DEADLINE + 8_000 + FETCH_HOLD_GRACE_MS - 1));
    assert_eq!(close.candidates.len(), 2);
    assert_eq!(close.missing, vec![node(3)], "late, so missing");
    assert!(close.rejected.is_empty());

    // A hold that runs out closes the round with the update not served,
    // and no hold reaches past the bound (plus the grace).
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    assert_eq!(m.fetch_limit_ms(), Some(DEADLINE + HOLD_MAX));
    m.hold_for_fetch(0, &node(2), u64::MAX);
    assert!(
        m.tick(DEADLINE + HOLD_MAX + FETCH_HOLD_GRACE_MS - 1)
            .is_empty()
    );
    let close = close_of(m.tick(DEADLINE + HOLD_MAX + FETCH_HOLD_GRACE_MS));
    assert_eq!(close.candidates.len(), 1);
    assert_eq!(close.rejected[0].reason, RejectReason::NotServed);

    // With no hold allowed, the deadline closes the round as before.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    m.config.fetch_hold_max_ms = 0;
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    m.hold_for_fetch(0, &node(2), DEADLINE + 8_000);
    let close = close_of(m.tick(DEADLINE));
    assert_eq!(close.rejected[0].reason, RejectReason::NotServed);

    // A fetch that resolved is no longer held for.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    m.hold_for_fetch(0, &node(2), DEADLINE + 8_000);
    m.update_checked(0, &node(2), Err(RejectReason::SpotCheck { worker: 0 }));
    let close = close_of(m.tick(DEADLINE));
    assert_eq!(
        close.rejected[0].reason,
        RejectReason::SpotCheck { worker: 0 }
    );
}

#[test]
fn drawn_states_still_arriving_delay_a_ready_close_by_their_grace_never_past_the_deadline() {
    // Every update is in and checked at t = 1 s; node 2's drawn state is
    // still arriving, so the round waits up to its grace (2 s) for it.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    deliver(&mut m, &plan, node(2));
    m.states_pending(0, &node(2), 3_000);
    // Another round's, or an unassigned node's, is ignored.
    m.states_pending(1, &node(1), 9_000);
    m.states_pending(0, &node(7), 9_000);
    assert!(m.tick(1_000).is_empty(), "waits for node 2's state");
    assert!(m.tick(2_999).is_empty());
    let close = close_of(m.tick(3_000));
    assert_eq!(
        close.candidates.len(),
        2,
        "the update counts; its check is deferred"
    );

    // The state arrives: the round closes at once.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    deliver(&mut m, &plan, node(2));
    m.states_pending(0, &node(2), 3_000);
    assert!(m.tick(1_000).is_empty());
    m.states_resolved(0, &node(2));
    assert_eq!(close_of(m.tick(1_100)).candidates.len(), 2);

    // A grace past the deadline does not hold the round.
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    m.update_checked(0, &node(2), Ok(()));
    m.states_pending(0, &node(2), DEADLINE + 5_000);
    assert!(m.tick(DEADLINE - 1).is_empty());
    assert_eq!(close_of(m.tick(DEADLINE)).candidates.len(), 2);
}

#[test]
fn the_last_round_waits_for_earlier_deferred_checks_and_no_other_round_does() {
    // Round 0 of 2: checks out do not hold it.
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 2);
    m.join(node(1), 1);
    let plan = open_round(&mut m, 0);
    m.checks_out_until(Some(DEADLINE * 10));
    deliver(&mut m, &plan, node(1));
    assert_eq!(close_of(m.tick(1_000)).candidates.len(), 1);
    assert!(
        m.round_closed(0, Hash::of(b"theta1"), Hash::of(b"m0"))
            .is_ok()
    );

    // Round 1, the last: held past its deadline until the checks are in
    // or their bound passes.
    let plan = open_round(&mut m, DEADLINE);
    assert_eq!(plan.round, 1);
    deliver(&mut m, &plan, node(1));
    let bound = plan.deadline_ms + 30_000;
    m.checks_out_until(Some(bound));
    assert!(m.tick(DEADLINE + 1).is_empty(), "ready, but checks out");
    assert!(m.tick(plan.deadline_ms + 1).is_empty(), "past its deadline");
    assert_eq!(close_of(m.tick(bound)).candidates.len(), 1);

    // The checks settle early: it closes at once.
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 1);
    m.join(node(1), 1);
    let plan = open_round(&mut m, 0);
    deliver(&mut m, &plan, node(1));
    m.checks_out_until(Some(DEADLINE * 10));
    assert!(m.tick(1_000).is_empty());
    m.checks_out_until(None);
    assert_eq!(close_of(m.tick(1_100)).candidates.len(), 1);
}

#[test]
fn never_two_manifests_for_one_round() {
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 5);
    m.join(node(1), 1);
    let plan = open_round(&mut m, 0);
    deliver(&mut m, &plan, node(1));
    let close = close_of(m.tick(1));
    assert!(
        m.tick(2).is_empty(),
        "closing: no second close, no new plan"
    );
    assert!(
        m.round_closed(close.plan.round, Hash::of(b"a"), Hash::of(b"m"))
            .is_ok()
    );
    let err = m.round_closed(close.plan.round, Hash::of(b"b"), Hash::of(b"m2"));
    assert!(
        matches!(err, Err(RoundsError::NotClosing { round: 0, .. })),
        "{err:?}"
    );
    assert!(m.round_closed(7, Hash::of(b"b"), Hash::of(b"m2")).is_err());
    assert_eq!(m.head_manifest(), Hash::of(b"m"));
}

#[test]
fn commit_envelope_rejections_have_reasons() {
    let mut m = machine(8, Quorum::Fraction(1.0), 2, 5);
    m.join(node(1), 1);
    m.join(node(2), 1);
    let plan = open_round(&mut m, 0);
    let good = commit_for(&plan, 1);

    let unknown = m.commit(node(9), &good, Hash::of(b"x"));
    assert_eq!(
        unknown,
        CommitOutcome::Rejected {
            reason: RejectReason::UnknownNode,
            in_round: None
        }
    );

    let mut wrong_round = good.clone();
    wrong_round.round = 5;
    assert_eq!(
        m.commit(node(1), &wrong_round, Hash::of(b"w")),
        CommitOutcome::Rejected {
            reason: RejectReason::WrongRound,
            in_round: Some(0)
        }
    );

    assert_eq!(
        m.commit(node(1), &good, Hash::of(b"g")),
        CommitOutcome::Accepted { round: 0 }
    );
    assert_eq!(
        m.commit(node(1), &good, Hash::of(b"g")),
        CommitOutcome::AlreadyHave { round: 0 },
        "a retry is harmless"
    );
    let mut second = good.clone();
    second.update_hash = Hash::of(b"other");
    assert_eq!(
        m.commit(node(1), &second, Hash::of(b"g2")),
        CommitOutcome::Rejected {
            reason: RejectReason::DuplicateCommit,
            in_round: Some(0)
        }
    );

    let mut greedy = commit_for(&plan, 2);
    greedy.tokens = 1_000_000;
    assert_eq!(
        m.commit(node(2), &greedy, Hash::of(b"greedy")),
        CommitOutcome::Rejected {
            reason: RejectReason::Oversized,
            in_round: Some(0)
        }
    );
    m.update_checked(0, &node(1), Ok(()));
    let close = close_of(m.tick(1));
    let reasons: Vec<&str> = close.rejected.iter().map(|r| r.reason.code()).collect();
    assert_eq!(
        reasons,
        vec!["wrong-round", "duplicate-commit", "oversized"]
    );
    assert_eq!(
        close.candidates.len(),
        1,
        "the first commit keeps its place"
    );
}

#[test]
fn wrong_base_and_replayed_old_commit() {
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 5);
    m.join(node(1), 1);
    let plan0 = open_round(&mut m, 0);
    deliver(&mut m, &plan0, node(1));
    close_of(m.tick(1));
    // While closing, a commit for the closing round is late.
    let late = commit_for(&plan0, 1);
    assert!(matches!(
        m.commit(node(1), &late, Hash::of(b"l")),
        CommitOutcome::Rejected {
            reason: RejectReason::Late,
            ..
        }
    ));
    assert!(m.round_closed(0, Hash::of(b"t1"), Hash::of(b"m0")).is_ok());
    let plan1 = open_round(&mut m, 2);
    // The old round-0 commit replayed in round 1.
    let replay = m.commit(node(1), &late, Hash::of(b"old"));
    assert!(
        matches!(
            replay,
            CommitOutcome::Rejected {
                reason: RejectReason::Late,
                in_round: Some(1)
            }
        ),
        "{replay:?}"
    );
    let mut stale = commit_for(&plan1, 1);
    stale.base_params_hash = Hash::of(b"someone else's theta");
    assert!(matches!(
        m.commit(node(1), &stale, Hash::of(b"s")),
        CommitOutcome::Rejected {
            reason: RejectReason::WrongBase,
            ..
        }
    ));
}

#[test]
fn failed_fetch_is_recorded_and_round_still_closes() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    deliver(&mut m, &plan, node(1));
    commit_only(&mut m, &plan, node(2));
    m.update_checked(0, &node(2), Err(RejectReason::HashMismatch));
    let close = close_of(m.tick(3));
    assert_eq!(close.candidates.len(), 1);
    assert_eq!(close.rejected[0].reason, RejectReason::HashMismatch);
}

#[test]
fn shards_rotate_over_rounds_and_never_repeat_within_one() {
    let shards = 6;
    let mut m = machine(shards, Quorum::Fraction(1.0), 1, 10);
    for i in 1..=2 {
        m.join(node(i), 1);
    }
    let mut seen = std::collections::HashSet::new();
    for round in 0..3u64 {
        let plan = open_round(&mut m, round * 100);
        let mut in_round = std::collections::HashSet::new();
        for a in &plan.assignments {
            for s in &a.shards {
                assert!(in_round.insert(*s), "shard given twice in round {round}");
            }
        }
        seen.extend(in_round);
        for a in &plan.assignments {
            deliver(&mut m, &plan, a.node);
        }
        close_of(m.tick(round * 100 + 1));
        assert!(
            m.round_closed(round, Hash::of(&[round as u8]), Hash::of(&[round as u8, 1]))
                .is_ok()
        );
    }
    assert_eq!(
        seen.len(),
        shards,
        "three rounds of two nodes cover all six shards"
    );
}

#[test]
fn run_finishes_after_total_rounds() {
    let mut m = machine(4, Quorum::Fraction(1.0), 1, 1);
    m.join(node(1), 1);
    let plan = open_round(&mut m, 0);
    deliver(&mut m, &plan, node(1));
    close_of(m.tick(1));
    let actions = m.round_closed(0, Hash::of(b"t"), Hash::of(b"m"));
    assert_eq!(actions, Ok(vec![Action::RunFinished]));
    assert!(m.is_finished());
    assert!(m.tick(2).is_empty());
}

#[test]
fn restored_round_keeps_its_plan() {
    let mut m = machine(4, Quorum::Fraction(1.0), 1, 3);
    m.join(node(1), 1);
    let plan = open_round(&mut m, 0);
    let uses = count_shard_uses(4, std::slice::from_ref(&plan));
    assert_eq!(uses.iter().sum::<u32>(), 1);
    let mut restarted = machine(4, Quorum::Fraction(1.0), 1, 3);
    // Restarted after the plan's deadline: the round gets a grace period, not an instant close.
    let restart_at = plan.deadline_ms + 50;
    restarted.restore_open(plan.clone(), restart_at + 1_000);
    assert_eq!(restarted.open_plan(), Some(&plan));
    assert_eq!(restarted.open_deadline_ms(), Some(restart_at + 1_000));
    assert!(
        restarted.tick(restart_at).is_empty(),
        "no second plan and no early close for the restored round"
    );
    deliver(&mut restarted, &plan, node(1));
    assert_eq!(close_of(restarted.tick(restart_at + 1)).candidates.len(), 1);
}

#[test]
fn an_expelled_node_gets_no_work_and_its_commit_is_refused() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    m.expel(&node(2));
    let c = commit_for(&plan, 2);
    assert!(matches!(
        m.commit(node(2), &c, Hash::of(&[2])),
        CommitOutcome::Rejected {
            reason: RejectReason::UnknownNode,
            ..
        }
    ));
    deliver(&mut m, &plan, node(1));
    // The round closes at its deadline with node 2 missing, and the next
    // plan has no work for it.
    let close = close_of(m.tick(DEADLINE + 1));
    assert_eq!(close.missing, vec![node(2)]);
    assert!(!m.active_nodes().contains(&node(2)));
}

#[test]
fn a_cluster_node_may_claim_tokens_for_each_worker() {
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 5);
    m.join(node(1), 2);
    let plan = open_round(&mut m, 0);
    assert_eq!(plan.assignments[0].shards.len(), 2, "two workers' shards");
    assert_eq!(plan.assignments[0].workers, 2);
    let mut c = commit_for(&plan, 1);
    c.tokens = 2 * 4 * 2 * 8;
    c.workers = 2;
    c.shares = shares_for(c.tokens, 2);
    assert_eq!(
        m.commit(node(1), &c, Hash::of(&[1])),
        CommitOutcome::Accepted { round: 0 }
    );
}

/// A cluster node that claims a worker by copying another's Δ — the same
/// hash, or the same direction at another scale — is refused at commit,
/// before any spot check.
#[test]
fn a_worker_claimed_twice_is_refused_at_commit() {
    let sketch = |phase: f32, scale: f32| -> Vec<f32> {
        (0..barnraise_protocol::workers::SHARE_SKETCH_DIM)
            .map(|i| scale * (i as f32 * 0.7 + phase).sin())
            .collect()
    };
    // (same hash, worker 1's sketch phase, expected outcome)
    for (same_hash, phase, refused) in [(true, 1.0, true), (false, 0.0, true), (false, 1.0, false)]
    {
        let mut m = machine(8, Quorum::Fraction(1.0), 1, 5);
        m.join(node(1), 2);
        let plan = open_round(&mut m, 0);
        let mut c = commit_for(&plan, 1);
        c.tokens = 2 * 4 * 2 * 8;
        c.workers = 2;
        c.shares = shares_for(c.tokens, 2);
        c.shares[0].delta_sketch = sketch(0.0, 1.0);
        c.shares[1].delta_sketch = sketch(phase, 1.02);
        if same_hash {
            c.shares[1].delta_hash = c.shares[0].delta_hash;
        }
        let outcome = m.commit(node(1), &c, Hash::of(&[1]));
        let was_refused = matches!(
            outcome,
            CommitOutcome::Rejected {
                reason: RejectReason::BadShares,
                ..
            }
        );
        assert_eq!(was_refused, refused, "{same_hash} {phase}: {outcome:?}");
        if !refused {
            assert_eq!(outcome, CommitOutcome::Accepted { round: 0 });
        }
    }
}

/// Commit spam (issue #13): a joined node that sends a thousand refused
/// commits — each a new signed body — is recorded once per reason, so the
/// manifest stays small and signable, and its first real commit still
/// counts. Before, every refusal was appended and enough of them pushed the
/// manifest past its 4 MiB limit, which stopped the coordinator.
#[test]
fn commit_spam_is_recorded_once_per_reason() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    let good = commit_for(&plan, 1);
    for i in 0..1000u32 {
        let mut spam = good.clone();
        spam.round = plan.round + 2 + u64::from(i % 3);
        let body = Hash::of(&i.to_le_bytes());
        assert!(matches!(
            m.commit(node(1), &spam, body),
            CommitOutcome::Rejected {
                reason: RejectReason::WrongRound,
                ..
            }
        ));
    }
    deliver(&mut m, &plan, node(1));
    for i in 0..1000u32 {
        let mut again = good.clone();
        again.update_hash = Hash::of(&[i as u8, (i >> 8) as u8, 7]);
        let body = Hash::of(&(i + 5000).to_le_bytes());
        assert!(matches!(
            m.commit(node(1), &again, body),
            CommitOutcome::Rejected {
                reason: RejectReason::DuplicateCommit,
                ..
            }
        ));
    }
    deliver(&mut m, &plan, node(2));
    let close = close_of(m.tick(1));
    let reasons: Vec<(NodeId, &str)> = close
        .rejected
        .iter()
        .map(|r| (r.node, r.reason.code()))
        .collect();
    assert_eq!(
        reasons,
        vec![(node(1), "wrong-round"), (node(1), "duplicate-commit")]
    );
    assert_eq!(close.candidates.len(), 2, "both real updates count");
}

/// Refusals from many nodes: a manifest lists at most
/// `MAX_REFUSALS_PER_MANIFEST` of them, so thousands of joined nodes sending
/// refused commits cannot push it past its size limit, and the round's real
/// updates still count.
#[test]
fn a_manifest_lists_a_bounded_number_of_refusals() {
    use barnraise_protocol::limits::MAX_REFUSALS_PER_MANIFEST;
    let many = |i: usize| {
        let mut bytes = [0xeeu8; 32];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        NodeId::from_bytes(bytes)
    };
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    let extra = MAX_REFUSALS_PER_MANIFEST + 100;
    for i in 0..extra {
        m.join(many(i), 1);
    }
    for i in 0..extra {
        // Joined after the plan: given no work this round.
        let outcome = m.commit(many(i), &commit_for(&plan, 9), Hash::of(&i.to_le_bytes()));
        assert!(
            matches!(
                outcome,
                CommitOutcome::Rejected {
                    reason: RejectReason::WrongRound,
                    ..
                }
            ),
            "{outcome:?}"
        );
    }
    deliver(&mut m, &plan, node(1));
    deliver(&mut m, &plan, node(2));
    let close = close_of(m.tick(1));
    assert_eq!(close.rejected.len(), MAX_REFUSALS_PER_MANIFEST);
    assert_eq!(close.candidates.len(), 2, "both real updates count");
}

/// Token inflation by re-joining (issue #13): a node planned with one
/// worker's shards that joins again mid-round declaring 64 workers may still
/// claim only one worker's tokens.
#[test]
fn joining_again_mid_round_does_not_raise_the_token_cap() {
    let mut m = machine(8, Quorum::Fraction(1.0), 2, 3);
    m.join(node(1), 1);
    m.join(node(2), 1);
    let plan = open_round(&mut m, 0);
    m.join(node(2), 64);
    let per_worker = 4 * 2 * 8;
    let mut inflated = commit_for(&plan, 2);
    inflated.workers = 64;
    inflated.tokens = 64 * per_worker;
    assert_eq!(
        m.commit(node(2), &inflated, Hash::of(b"inflated")),
        CommitOutcome::Rejected {
            reason: RejectReason::Oversized,
            in_round: Some(0)
        }
    );
    let mut honest = commit_for(&plan, 1);
    honest.tokens = per_worker;
    honest.shares = shares_for(per_worker, 1);
    assert_eq!(
        m.commit(node(1), &honest, Hash::of(b"honest")),
        CommitOutcome::Accepted { round: 0 }
    );
}

/// Reputation (issue #13): a node whose updates are rejected is planned one
/// worker's share, then none while it is benched, and comes back on
/// probation; an honest cluster node keeps all its workers throughout.
#[test]
fn rejected_nodes_get_less_work_then_none_then_probation() {
    use crate::reputation::{BENCH_ROUNDS, Outcome, Standing};
    let rounds = 6 + BENCH_ROUNDS;
    let mut m = machine(64, Quorum::Fraction(1.0), 2, rounds + 1);
    m.join(node(1), 4); // honest
    m.join(node(2), 4); // its updates fail verification
    let shards_of = |plan: &RoundPlan, n: NodeId| {
        plan.assignments.iter().find(|a| a.node == n).map(|a| {
            assert_eq!(a.shards.len(), a.workers as usize, "one shard per worker");
            a.shards.len()
        })
    };
    let mut now = 0;
    let mut standings = Vec::new();
    for round in 0..rounds {
        let plan = open_round(&mut m, now);
        assert_eq!(plan.round, round);
        assert_eq!(shards_of(&plan, node(1)), Some(4), "round {round}");
        let bad = shards_of(&plan, node(2));
        let standing = m.reputation(&node(2)).standing(round);
        match standing {
            Standing::Good => assert_eq!(bad, Some(4), "round {round}"),
            Standing::Probation => assert_eq!(bad, Some(1), "round {round}"),
            Standing::Benched => assert_eq!(bad, None, "round {round}"),
        }
        standings.push(standing);
        // Both commit; the close rejects node 2's update whenever it had work.
        deliver(&mut m, &plan, node(1));
        if bad.is_some() {
            deliver(&mut m, &plan, node(2));
        }
        close_of(m.tick(now + 1));
        m.record_outcome(round, node(1), Outcome::Accepted);
        if bad.is_some() {
            m.record_outcome(round, node(2), Outcome::Rejected);
        }
        m.round_closed(round, Hash::of(&[round as u8]), Hash::of(&[round as u8, 1]))
            .unwrap();
        now += 2;
    }
    // Round 0 in good standing, 1..3 on probation, benched for 8 rounds,
    // back on probation, and benched again after one more rejection.
    let mut expected = vec![Standing::Good];
    expected.extend([Standing::Probation; 3]);
    expected.extend(vec![Standing::Benched; BENCH_ROUNDS as usize]);
    expected.push(Standing::Probation);
    expected.push(Standing::Benched);
    assert_eq!(standings, expected);
    assert_eq!(m.reputation(&node(2)).rejected, 5);
    let views = m.reputations();
    assert_eq!(views.len(), 2);
    assert!(
        views
            .iter()
            .any(|v| v.standing == Standing::Good && v.accepted == rounds)
    );
}

/// Node `n` delivers `steps` steps of work (one worker) at time `at`.
fn deliver_at(m: &mut Rounds, plan: &RoundPlan, n: NodeId, at: u64) {
    m.tick(at);
    let steps = plan
        .assignments
        .iter()
        .find(|a| a.node == n)
        .unwrap()
        .inner_steps;
    let tokens = u64::from(steps) * 2 * 8;
    let c = Commit {
        tokens,
        shares: shares_for(tokens, 1),
        ..commit_for(plan, n.0.0[0])
    };
    assert_eq!(
        m.commit(n, &c, Hash::of(&[n.0.0[0], plan.round as u8])),
        CommitOutcome::Accepted { round: plan.round }
    );
    m.update_checked(plan.round, &n, Ok(()));
}

#[test]
fn nodes_of_different_speeds_get_work_in_proportion_and_all_count() {
    // Nodes 1, 2 and 3 take 0.1, 0.2 and 0.4 seconds per step.
    let mut m = machine(8, Quorum::Fraction(1.0), 3, 5);
    for i in 1..=3 {
        m.join(node(i), 1);
    }
    let ms_per_step = |n: u8| 100 * (1u64 << (n - 1));
    let mut now = 0;
    let mut counted = 0;
    for round in 0..4u64 {
        let plan = open_round(&mut m, now);
        let steps: Vec<u32> = plan.assignments.iter().map(|a| a.inner_steps).collect();
        if round == 0 {
            // Nobody's pace is known yet: everyone gets H, and the configured deadline.
            assert_eq!(steps, [4, 4, 4]);
            assert_eq!(plan.deadline_ms, now + DEADLINE);
        } else {
            // Work proportional to speed, within 2× of H either way.
            assert_eq!(steps, [8, 4, 2], "round {round}");
            // Everyone is expected at 0.8 s; the deadline is 1.5 × that + 10 s.
            assert_eq!(plan.deadline_ms, now + 11_200, "round {round}");
        }
        // Each node takes its steps at its own speed; the round closes
        // when the last commit is in.
        let mut finish = 0;
        for a in &plan.assignments {
            let at = now + u64::from(a.inner_steps) * ms_per_step(a.node.0.0[0]);
            finish = finish.max(at);
        }
        let mut arrivals: Vec<(u64, NodeId)> = plan
            .assignments
            .iter()
            .map(|a| {
                (
                    now + u64::from(a.inner_steps) * ms_per_step(a.node.0.0[0]),
                    a.node,
                )
            })
            .collect();
        arrivals.sort();
        for (at, n) in arrivals {
            deliver_at(&mut m, &plan, n, at);
        }
        let close = close_of(m.tick(finish));
        assert!(close.missing.is_empty() && close.rejected.is_empty());
        counted += close.candidates.len();
        if round > 0 {
            assert_eq!(finish - now, 800, "everyone finished together");
        }
        m.round_closed(round, Hash::of(&[round as u8]), Hash::of(&[round as u8, 1]))
            .unwrap();
        now = finish + 1;
    }
    assert_eq!(counted, 12, "every node counted in every round");
}

#[test]
fn a_node_that_misses_gets_less_work_and_cannot_claim_more_than_planned() {
    let mut m = machine(8, Quorum::Fraction(1.0), 3, 5);
    for i in 1..=3 {
        m.join(node(i), 1);
    }
    let plan = open_round(&mut m, 0);
    for i in 1..=3 {
        deliver_at(&mut m, &plan, node(i), 4_000);
    }
    close_of(m.tick(4_000));
    m.round_closed(0, Hash::of(b"1"), Hash::of(b"m1")).unwrap();
    let plan = open_round(&mut m, 4_001);
    assert!(plan.assignments.iter().all(|a| a.inner_steps == 4));
    // Node 3 misses round 1.
    deliver_at(&mut m, &plan, node(1), 8_000);
    deliver_at(&mut m, &plan, node(2), 8_000);
    let close = close_of(m.tick(plan.deadline_ms));
    assert_eq!(close.missing, vec![node(3)]);
    m.round_closed(1, Hash::of(b"2"), Hash::of(b"m2")).unwrap();
    m.seen(&node(3));
    let plan = open_round(&mut m, plan.deadline_ms + 1);
    let steps = |n: u8| {
        plan.assignments
            .iter()
            .find(|a| a.node == node(n))
            .unwrap()
            .inner_steps
    };
    assert!(steps(3) < steps(1), "{} vs {}", steps(3), steps(1));
    // Claiming the tokens of a full H is more than its plan allows.
    let greedy = Commit {
        tokens: 4 * 2 * 8,
        shares: shares_for(4 * 2 * 8, 1),
        ..commit_for(&plan, 3)
    };
    assert!(matches!(
        m.commit(node(3), &greedy, Hash::of(b"greedy")),
        CommitOutcome::Rejected {
            reason: RejectReason::Oversized,
            ..
        }
    ));
}

#[test]
fn a_node_that_leaves_before_committing_is_not_missing_and_is_not_waited_for() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 3);
    deliver(&mut m, &plan, node(1));
    deliver(&mut m, &plan, node(2));
    // Node 2 committed, then leaves: its update still counts.
    m.leave(&node(2));
    assert!(m.tick(10).is_empty(), "node 3 is still expected");
    // Node 3 leaves before committing: the round closes without it.
    m.leave(&node(3));
    let close = close_of(m.tick(20));
    assert_eq!(
        close.candidates.iter().map(|c| c.node).collect::<Vec<_>>(),
        vec![node(1), node(2)]
    );
    assert!(close.missing.is_empty(), "{:?}", close.missing);
    // A commit after leaving is from a node with no work in the round.
    let late = commit_for(&plan, 3);
    assert!(matches!(
        m.commit(node(3), &late, Hash::of(b"after")),
        CommitOutcome::Rejected { .. }
    ));
}

#[test]
fn a_node_that_left_and_joins_again_in_the_same_round_gets_its_place_back() {
    let (mut m, plan) = started(Quorum::Fraction(1.0), 2);
    m.leave(&node(2));
    deliver(&mut m, &plan, node(1));
    // Resumed before the round closed: the plan still lists it.
    m.join(node(2), 1);
    assert!(m.tick(10).is_empty(), "node 2 is expected again");
    deliver(&mut m, &plan, node(2));
    let close = close_of(m.tick(20));
    assert_eq!(close.candidates.len(), 2);
    assert!(close.missing.is_empty());
}

/// A commit of `steps` of `plan`'s steps for node `n`, with one worker that
/// carried `carried` steps in and holds `held_back` back.
fn overlapped(plan: &RoundPlan, n: NodeId, steps: u64, carried: u32, held_back: u32) -> Commit {
    let mut c = commit_for(plan, n.0.0[0]);
    c.tokens = steps * 2 * 8;
    c.shares = shares_for(c.tokens, 1);
    c.shares[0].carried = carried;
    c.shares[0].held_back = held_back;
    c
}

/// Overlapped rounds (docs/architecture.md, "Overlapped rounds"): a share
/// may hold back at most `overlap_steps` and fewer than its plan, and may
/// carry in exactly what its node's accepted last commit held back, or
/// nothing; carried steps are claimed on top of the plan's.
#[test]
fn carried_steps_must_be_what_the_accepted_last_commit_held_back() {
    let mut m = machine(8, Quorum::Fraction(1.0), 1, 5);
    for i in 1..=4 {
        m.join(node(i), 1);
    }
    let plan = open_round(&mut m, 0);
    let steps = |plan: &RoundPlan, n: NodeId| {
        u64::from(
            plan.assignments
                .iter()
                .find(|a| a.node == n)
                .unwrap()
                .inner_steps,
        )
    };
    for i in 1..=3 {
        let c = overlapped(&plan, node(i), steps(&plan, node(i)) - 2, 0, 2);
        assert_eq!(
            m.commit(node(i), &c, Hash::of(&[i])),
            CommitOutcome::Accepted { round: 0 }
        );
        m.update_checked(0, &node(i), Ok(()));
    }
    // More than the run allows.
    let c = overlapped(&plan, node(4), steps(&plan, node(4)) - 3, 0, 3);
    assert!(matches!(
        m.commit(node(4), &c, Hash::of(&[4])),
        CommitOutcome::Rejected {
            reason: RejectReason::BadShares,
            ..
        }
    ));
    let close = close_of(m.tick(DEADLINE + 1));
    m.round_closed(close.plan.round, Hash::of(b"t1"), Hash::of(b"m0"))
        .unwrap();
    // The manifest accepted nodes 1 and 3, not node 2 (no outcome is
    // recorded for it, so that its reputation still gets it work).
    m.record_outcome(0, node(1), Outcome::Accepted);
    m.record_outcome(0, node(3), Outcome::Accepted);
    let plan = open_round(&mut m, DEADLINE + 2);
    let body = |i: u8| Hash::of(&[i, 1]);
    // Node 1 carries its 2 steps, claimed on top of the whole plan.
    let c = overlapped(&plan, node(1), steps(&plan, node(1)) + 2, 2, 0);
    assert_eq!(
        m.commit(node(1), &c, body(1)),
        CommitOutcome::Accepted { round: 1 }
    );
    // Node 2's update was not accepted: it has nothing to carry.
    let c = overlapped(&plan, node(2), steps(&plan, node(2)) + 2, 2, 0);
    assert!(matches!(
        m.commit(node(2), &c, body(2)),
        CommitOutcome::Rejected {
            reason: RejectReason::BadShares,
            ..
        }
    ));
    // Node 3 lost its tail (a restart, say): carrying nothing is honest,
    // but then it cannot claim more than the plan.
    let c = overlapped(&plan, node(3), steps(&plan, node(3)), 0, 0);
    assert_eq!(
        m.commit(node(3), &c, body(3)),
        CommitOutcome::Accepted { round: 1 }
    );
    // Carrying other than what was held back is refused.
    let mut m2 = machine(8, Quorum::Fraction(1.0), 1, 5);
    m2.join(node(1), 1);
    let plan = open_round(&mut m2, 0);
    let c = overlapped(&plan, node(1), steps(&plan, node(1)) - 2, 0, 2);
    assert_eq!(
        m2.commit(node(1), &c, Hash::of(&[1])),
        CommitOutcome::Accepted { round: 0 }
    );
    m2.update_checked(0, &node(1), Ok(()));
    let close = close_of(m2.tick(1));
    m2.round_closed(close.plan.round, Hash::of(b"t1"), Hash::of(b"m0"))
        .unwrap();
    m2.record_outcome(0, node(1), Outcome::Accepted);
    let plan = open_round(&mut m2, 2);
    let c = overlapped(&plan, node(1), steps(&plan, node(1)) + 1, 1, 0);
    assert!(matches!(
        m2.commit(node(1), &c, Hash::of(&[1, 1])),
        CommitOutcome::Rejected {
            reason: RejectReason::BadShares,
            ..
        }
    ));
}
