//! Work sized to each node (docs/architecture.md, "Work sized to each
//! node"): the coordinator learns how fast every node delivers and gives it
//! as many inner steps as it can finish in the time the round's median node
//! needs for the run's `inner_steps`, so fast nodes do not sit idle and slow
//! ones still count. The round's deadline follows the slowest planned node's
//! expected finish instead of a fixed number of seconds.
//!
//! Pace is measured, never claimed: a commit's tokens (at most what the plan
//! gave the node) over the time from the plan's opening to the commit's
//! arrival, which covers everything the node had to do: find the plan, fetch
//! its shards, train, encode and store. A node that misses a round is
//! assumed to be at most half as fast as the round asked of it, so a node
//! that keeps missing gets less work, never more. Pure logic with no clock:
//! the round machine passes times in.

use barnraise_protocol::NodeId;
use std::collections::BTreeMap;

/// Weight of the newest measurement in a node's pace.
const SMOOTHING: f64 = 0.5;

/// Headroom on the slowest planned node's expected finish.
const DEADLINE_SLACK: f64 = 1.5;

/// Added to every adaptive deadline: plan gossip, commits and fetches.
const DEADLINE_MARGIN_MS: u64 = 10_000;

/// Adaptive deadlines never exceed this many times the configured one.
pub const DEADLINE_CEILING: u64 = 4;

/// What one node's planned work looks like to the pacer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sized {
    pub steps: u32,
    /// When the node is expected to commit, from the plan's opening; `None`
    /// for a node whose pace is not known yet.
    pub expected_ms: Option<u64>,
}

/// Every node's measured pace, in tokens per second per worker.
#[derive(Clone, Debug, Default)]
pub struct PaceBook {
    nodes: BTreeMap<NodeId, f64>,
}

impl PaceBook {
    /// The node's pace, if it has delivered or missed before.
    pub fn pace(&self, node: &NodeId) -> Option<f64> {
        self.nodes.get(node).copied()
    }

    /// A node committed `tokens` trained by `workers` workers, `elapsed_ms`
    /// after the plan opened.
    pub fn delivered(&mut self, node: NodeId, tokens: u64, workers: u32, elapsed_ms: u64) {
        if tokens == 0 {
            return;
        }
        let seconds = (elapsed_ms.max(1) as f64) / 1e3;
        let measured = tokens as f64 / seconds / f64::from(workers.max(1));
        let pace = match self.nodes.get(&node) {
            Some(old) => (1.0 - SMOOTHING) * old + SMOOTHING * measured,
            None => measured,
        };
        self.nodes.insert(node, pace);
    }

    /// A node did not deliver the `tokens` it was planned for (with
    /// `workers` workers) within `elapsed_ms`: at most half that pace.
    pub fn missed(&mut self, node: NodeId, tokens: u64, workers: u32, elapsed_ms: u64) {
        let seconds = (elapsed_ms.max(1) as f64) / 1e3;
        let bound = tokens as f64 / seconds / f64::from(workers.max(1));
        let pace = match self.nodes.get(&node) {
            Some(old) => old.min(bound) / 2.0,
            None => bound / 2.0,
        };
        self.nodes.insert(node, pace);
    }

    /// Forgets a node (expelled).
    pub fn forget(&mut self, node: &NodeId) {
        self.nodes.remove(node);
    }

    /// Inner steps for each node of a round, in the order given, where a step
    /// of one worker trains `step_tokens` tokens and `base_steps` is the run's
    /// `inner_steps`. The round's target time is what its median known node
    /// needs for `base_steps`; each known node gets the steps it can do in
    /// that time, within `limits::planned_steps_range` (the outer step
    /// weights updates by tokens, so unequal steps need no other
    /// correction; the spread is bounded so that stage 3's norm check, which
    /// scales norms by √steps, sees updates of one kind); an unknown node
    /// gets `base_steps`.
    pub fn size(&self, nodes: &[NodeId], base_steps: u32, step_tokens: u64) -> Vec<Sized> {
        let base = base_steps.max(1);
        let step_tokens = step_tokens.max(1) as f64;
        let mut known: Vec<f64> = nodes
            .iter()
            .filter_map(|n| self.pace(n))
            .filter(|p| p.is_finite() && *p > 0.0)
            .collect();
        if known.is_empty() {
            return nodes
                .iter()
                .map(|_| Sized {
                    steps: base,
                    expected_ms: None,
                })
                .collect();
        }
        known.sort_by(f64::total_cmp);
        let median = known[(known.len() - 1) / 2];
        let target_secs = f64::from(base) * step_tokens / median;
        let range = barnraise_protocol::limits::planned_steps_range(base);
        let (low, high) = (*range.start(), *range.end());
        nodes
            .iter()
            .map(
                |node| match self.pace(node).filter(|p| p.is_finite() && *p > 0.0) {
                    Some(pace) => {
                        let fits = (target_secs * pace / step_tokens).round();
                        let steps = (fits.clamp(f64::from(low), f64::from(high)) as u32).max(1);
                        let expected = (f64::from(steps) * step_tokens / pace * 1e3).round();
                        Sized {
                            steps,
                            expected_ms: Some(expected.min(u64::MAX as f64 / 2.0) as u64),
                        }
                    }
                    None => Sized {
                        steps: base,
                        expected_ms: None,
                    },
                },
            )
            .collect()
    }
}

/// The round's deadline, from its opening: the configured one while any
/// planned node's pace is unknown (a first round includes loading and
/// fetching), else the slowest expected finish with headroom, at most
/// [`DEADLINE_CEILING`] times the configured deadline.
pub fn deadline_ms(sized: &[Sized], configured_ms: u64) -> u64 {
    let mut slowest = 0u64;
    for s in sized {
        match s.expected_ms {
            Some(ms) => slowest = slowest.max(ms),
            None => return configured_ms,
        }
    }
    let adaptive = (slowest as f64 * DEADLINE_SLACK) as u64 + DEADLINE_MARGIN_MS;
    adaptive.min(configured_ms.saturating_mul(DEADLINE_CEILING))
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::SigningKey;

    fn node(seed: u8) -> NodeId {
        SigningKey::from_seed([seed; 32]).unwrap().node_id()
    }

    #[test]
    fn nodes_one_two_and_four_times_slower_finish_together() {
        let mut book = PaceBook::default();
        let (fast, mid, slow) = (node(1), node(2), node(3));
        // 30 steps of 1,024 tokens each: in 10, 20 and 40 seconds.
        book.delivered(fast, 30_720, 1, 10_000);
        book.delivered(mid, 30_720, 1, 20_000);
        book.delivered(slow, 30_720, 1, 40_000);
        let sized = book.size(&[fast, mid, slow], 30, 1024);
        let steps: Vec<u32> = sized.iter().map(|s| s.steps).collect();
        assert_eq!(steps, [60, 30, 15], "work proportional to speed");
        let expected: Vec<u64> = sized.iter().map(|s| s.expected_ms.unwrap()).collect();
        assert_eq!(
            expected,
            [20_000, 20_000, 20_000],
            "everyone finishes at once"
        );
        assert_eq!(deadline_ms(&sized, 120_000), 40_000);
    }

    #[test]
    fn steps_stay_within_the_spread_and_unknown_nodes_get_the_base() {
        let mut book = PaceBook::default();
        let (fast, mid, slow, new) = (node(1), node(2), node(3), node(4));
        book.delivered(fast, 1_000_000, 1, 1_000);
        book.delivered(mid, 30_720, 1, 20_000);
        book.delivered(slow, 1_000, 1, 100_000);
        let sized = book.size(&[fast, mid, slow, new], 30, 1024);
        let steps: Vec<u32> = sized.iter().map(|s| s.steps).collect();
        assert_eq!(steps, [60, 30, 15, 30]);
        assert_eq!(sized[3].expected_ms, None);
        // An unknown node keeps the configured deadline.
        assert_eq!(deadline_ms(&sized, 120_000), 120_000);
        // Without it the slow node sets the deadline, up to the ceiling.
        assert_eq!(deadline_ms(&sized[..3], 120_000), 480_000);
        assert_eq!(deadline_ms(&sized[..2], 120_000), 40_000);
    }

    #[test]
    fn a_node_that_misses_gets_less_work_and_a_claim_cannot_raise_its_pace() {
        let mut book = PaceBook::default();
        let (a, b, c) = (node(1), node(2), node(3));
        for n in [a, b, c] {
            book.delivered(n, 30_720, 1, 20_000);
        }
        let before = book.size(&[a, b, c], 30, 1024)[0].steps;
        book.missed(a, 30_720, 1, 60_000);
        let after = book.size(&[a, b, c], 30, 1024)[0].steps;
        assert!(
            after < before,
            "{after} steps after a miss, {before} before"
        );
        book.missed(a, 15_360, 1, 60_000);
        assert!(book.size(&[a, b, c], 30, 1024)[0].steps <= after);
        // Pace comes from arrival times: tokens delivered late are slow
        // tokens however many there were.
        let pace = book.pace(&b).unwrap();
        book.delivered(b, 30_720, 1, 200_000);
        assert!(book.pace(&b).unwrap() < pace);
    }

    #[test]
    fn workers_share_a_nodes_pace() {
        let mut book = PaceBook::default();
        let (cluster, single) = (node(1), node(2));
        // Four workers, each as fast as the single node.
        book.delivered(cluster, 4 * 30_720, 4, 20_000);
        book.delivered(single, 30_720, 1, 20_000);
        let sized = book.size(&[cluster, single], 30, 1024);
        assert_eq!(sized[0].steps, sized[1].steps);
    }
}
