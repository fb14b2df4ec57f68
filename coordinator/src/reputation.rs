//! Reputation: each node's standing across rounds, and how much work it gets.
//!
//! A node's score is an exponential moving average of its outcomes in the
//! rounds it was assigned work: accepted 1, missing or late 0.5 (churn and
//! slow links happen to honest volunteers), rejected by verification 0 (a
//! bad norm, a sign flip, a copy, a replay, an update the probe found
//! useless). The score decides the node's standing, and the standing how
//! many of its declared workers the next plan gives shards to:
//!
//! | standing | score | workers planned |
//! | --- | --- | --- |
//! | good | ≥ 0.6 | all it declared |
//! | probation | 0.2 to 0.6 | one |
//! | benched | fell below 0.2 | none, for 8 rounds; then probation at 0.3 |
//!
//! A new node starts at 0.75, so an honest node works at full size from its
//! first round, one rejection puts it on probation (0.56), and four rejections
//! in a row bench it. The score is a pure function of the node's own
//! `(round, verdict)` history, which the ledger and the signed manifests
//! publish, so anyone auditing a run can recompute every node's standing and
//! check that the plans followed it (docs/security.md, "Reputation").

use barnraise_protocol::messages::RejectReason;
use serde::Serialize;

/// Weight of the newest outcome in the moving average.
pub const ALPHA: f64 = 0.35;
/// A node's score before its first outcome.
pub const INITIAL: f64 = 0.75;
/// At or above this a node gets all its declared workers' work.
pub const GOOD: f64 = 0.6;
/// Below this a node is benched.
pub const BENCH_BELOW: f64 = 0.2;
/// Rounds a benched node is left out of the plans.
pub const BENCH_ROUNDS: u64 = 8;
/// Where a node's score restarts when its bench ends.
pub const AFTER_BENCH: f64 = 0.3;

/// What became of a node's assigned work in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Assigned and never committed, committed late, or its update could not
    /// be fetched: not evidence of bad faith, but not work either.
    Missing,
    /// Its update failed verification.
    Rejected,
}

impl Outcome {
    fn value(self) -> f64 {
        match self {
            Outcome::Accepted => 1.0,
            Outcome::Missing => 0.5,
            Outcome::Rejected => 0.0,
        }
    }

    /// The outcome a manifest's rejection stands for.
    pub fn of_rejection(reason: &RejectReason) -> Outcome {
        Outcome::of_reason_code(reason.code())
    }

    /// The outcome of a ledger row (`verdict`, `reason` code).
    pub fn of_row(verdict: &str, reason: Option<&str>) -> Outcome {
        match verdict {
            "accepted" => Outcome::Accepted,
            "rejected" => Outcome::of_reason_code(reason.unwrap_or_default()),
            _ => Outcome::Missing,
        }
    }

    fn of_reason_code(code: &str) -> Outcome {
        match code {
            "not-served" | "late" => Outcome::Missing,
            _ => Outcome::Rejected,
        }
    }
}

/// One outcome per node and round: a round in which a node had an update
/// accepted counts as accepted, else one with a rejection as rejected.
pub fn merge(a: Outcome, b: Outcome) -> Outcome {
    use Outcome::*;
    match (a, b) {
        (Accepted, _) | (_, Accepted) => Accepted,
        (Rejected, _) | (_, Rejected) => Rejected,
        _ => Missing,
    }
}

/// One round's outcome per node from its manifest's accepted, rejected and
/// missing entries (merged as [`merge`] says).
pub fn round_outcomes<N: Ord>(
    rows: impl IntoIterator<Item = (N, Outcome)>,
) -> std::collections::BTreeMap<N, Outcome> {
    let mut out = std::collections::BTreeMap::new();
    for (node, outcome) in rows {
        out.entry(node)
            .and_modify(|o| *o = merge(*o, outcome))
            .or_insert(outcome);
    }
    out
}

/// Every node's reputation from `(round, node, outcome)` rows in round
/// order (several rows of one node in one round are merged).
pub fn replay_rows<N: Ord + Clone>(
    rows: impl IntoIterator<Item = (u64, N, Outcome)>,
) -> std::collections::BTreeMap<N, NodeReputation> {
    use std::collections::BTreeMap;
    let mut by_round: BTreeMap<(u64, N), Outcome> = BTreeMap::new();
    for (round, node, outcome) in rows {
        by_round
            .entry((round, node))
            .and_modify(|o| *o = merge(*o, outcome))
            .or_insert(outcome);
    }
    let mut out: BTreeMap<N, NodeReputation> = BTreeMap::new();
    for ((round, node), outcome) in by_round {
        out.entry(node).or_default().record(round, outcome);
    }
    out
}

/// A node's standing, as the plans apply it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    Good,
    Probation,
    Benched,
}

/// One node's reputation.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct NodeReputation {
    pub score: f64,
    /// The first round the node may be planned again, while benched.
    pub benched_until: Option<u64>,
    pub accepted: u64,
    pub missing: u64,
    pub rejected: u64,
}

impl Default for NodeReputation {
    fn default() -> Self {
        NodeReputation {
            score: INITIAL,
            benched_until: None,
            accepted: 0,
            missing: 0,
            rejected: 0,
        }
    }
}

impl NodeReputation {
    /// Folds in the node's outcome in `round`. Outcomes come in round order.
    pub fn record(&mut self, round: u64, outcome: Outcome) {
        self.return_from_bench(round);
        match outcome {
            Outcome::Accepted => self.accepted += 1,
            Outcome::Missing => self.missing += 1,
            Outcome::Rejected => self.rejected += 1,
        }
        self.score = (1.0 - ALPHA) * self.score + ALPHA * outcome.value();
        if self.score < BENCH_BELOW {
            self.benched_until = Some(round.saturating_add(1 + BENCH_ROUNDS));
        }
    }

    fn return_from_bench(&mut self, round: u64) {
        if self.benched_until.is_some_and(|until| round >= until) {
            self.benched_until = None;
            self.score = self.score.max(AFTER_BENCH);
        }
    }

    /// The node's standing when round `round` is planned.
    pub fn standing(&self, round: u64) -> Standing {
        match self.benched_until {
            Some(until) if round < until => Standing::Benched,
            Some(_) => Standing::Probation,
            None if self.score >= GOOD => Standing::Good,
            None => Standing::Probation,
        }
    }

    /// How many of `declared` workers round `round` plans work for.
    pub fn planned_workers(&self, round: u64, declared: u32) -> u32 {
        match self.standing(round) {
            Standing::Good => declared,
            Standing::Probation => declared.min(1),
            Standing::Benched => 0,
        }
    }

    /// Replays a node's `(round, outcome)` history, in round order.
    pub fn replay(history: impl IntoIterator<Item = (u64, Outcome)>) -> NodeReputation {
        let mut reputation = NodeReputation::default();
        for (round, outcome) in history {
            reputation.record(round, outcome);
        }
        reputation
    }
}

/// A node's reputation as the API shows it: the score, the standing it has
/// for the round now open or next, and the counts behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReputationView {
    pub node: String,
    pub score: f64,
    pub standing: Standing,
    pub benched_until: Option<u64>,
    pub accepted: u64,
    pub missing: u64,
    pub rejected: u64,
}

impl ReputationView {
    pub fn new(node: String, reputation: &NodeReputation, round: u64) -> ReputationView {
        ReputationView {
            node,
            score: reputation.score,
            standing: reputation.standing(round),
            benched_until: reputation.benched_until.filter(|&u| round < u),
            accepted: reputation.accepted,
            missing: reputation.missing,
            rejected: reputation.rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honest_nodes_keep_full_work_and_churn_costs_less_than_bad_faith() {
        let mut honest = NodeReputation::default();
        assert_eq!(
            honest.planned_workers(0, 4),
            4,
            "new nodes start in good standing"
        );
        for round in 0..20 {
            honest.record(round, Outcome::Accepted);
            assert_eq!(honest.standing(round + 1), Standing::Good);
        }
        assert!(honest.score > 0.99, "{}", honest.score);
        // One missed round does not cost an honest node its size.
        honest.record(20, Outcome::Missing);
        assert_eq!(honest.planned_workers(21, 4), 4);

        // A node that is always missing settles at 0.5: probation, one worker.
        let flaky = NodeReputation::replay((0..20).map(|r| (r, Outcome::Missing)));
        assert_eq!(flaky.standing(20), Standing::Probation);
        assert_eq!(flaky.planned_workers(20, 4), 1);
        assert!((flaky.score - 0.5).abs() < 1e-3, "{}", flaky.score);
    }

    #[test]
    fn rejections_put_a_node_on_probation_then_bench_it_then_it_may_return() {
        let mut bad = NodeReputation::default();
        bad.record(0, Outcome::Rejected);
        assert_eq!(bad.standing(1), Standing::Probation, "{}", bad.score);
        assert_eq!(bad.planned_workers(1, 8), 1);
        bad.record(1, Outcome::Rejected);
        bad.record(2, Outcome::Rejected);
        assert_eq!(bad.standing(3), Standing::Probation, "{}", bad.score);
        bad.record(3, Outcome::Rejected);
        assert!(bad.score < BENCH_BELOW, "{}", bad.score);
        // Benched for rounds 4..12: no work at all.
        for round in 4..4 + BENCH_ROUNDS {
            assert_eq!(bad.standing(round), Standing::Benched, "round {round}");
            assert_eq!(bad.planned_workers(round, 8), 0);
        }
        let back = 4 + BENCH_ROUNDS;
        assert_eq!(bad.standing(back), Standing::Probation);
        assert_eq!(bad.planned_workers(back, 8), 1);
        // Good work from probation earns the node its size back.
        let mut round = back;
        while bad.standing(round) != Standing::Good {
            bad.record(round, Outcome::Accepted);
            round += 1;
            assert!(round < back + 10, "never recovered: {bad:?}");
        }
        assert_eq!(bad.planned_workers(round, 8), 8);
        assert_eq!((bad.accepted, bad.rejected), (round - back, 4));
    }

    #[test]
    fn replay_matches_recording_and_rows_map_to_outcomes() {
        let history = [
            (0, Outcome::of_row("accepted", None)),
            (1, Outcome::of_row("rejected", Some("sign-flipped"))),
            (2, Outcome::of_row("rejected", Some("not-served"))),
            (3, Outcome::of_row("missing", None)),
            (5, Outcome::of_row("rejected", Some("copycat"))),
        ];
        assert_eq!(history[1].1, Outcome::Rejected);
        assert_eq!(history[2].1, Outcome::Missing);
        assert_eq!(history[3].1, Outcome::Missing);
        assert_eq!(Outcome::of_rejection(&RejectReason::Late), Outcome::Missing);
        assert_eq!(
            Outcome::of_rejection(&RejectReason::NotUseful),
            Outcome::Rejected
        );
        let mut live = NodeReputation::default();
        for (round, outcome) in history {
            live.record(round, outcome);
        }
        assert_eq!(NodeReputation::replay(history), live);
        assert_eq!((live.accepted, live.missing, live.rejected), (1, 2, 2));
    }
}
