//! Seeded work assignment: which nodes train in a round and on which shards.
//!
//! Shards are chosen least-used first, so the whole dataset is covered before
//! any shard repeats, and within one round no shard is given twice. Ties are
//! broken by a key derived from the run seed and the round, so the order
//! rotates from round to round yet every party can recompute it.

use barnraise_protocol::limits::MAX_ASSIGNMENTS_PER_ROUND;
use barnraise_protocol::{Hash, NodeId};

/// A 64-bit value derived from the run seed, a label and the inputs; the
/// same on every machine (SHA-256 of a fixed byte layout).
pub fn derive(seed: u64, label: &str, round: u64, extra: &[u8]) -> u64 {
    let mut bytes = Vec::with_capacity(16 + label.len() + extra.len());
    bytes.extend_from_slice(&seed.to_le_bytes());
    bytes.extend_from_slice(label.as_bytes());
    bytes.extend_from_slice(&round.to_le_bytes());
    bytes.extend_from_slice(extra);
    let hash = Hash::of(&bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_le_bytes(first)
}

/// One node's share of a round before it becomes an `Assignment`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub node: NodeId,
    /// Indices into the training shard list.
    pub shards: Vec<usize>,
    pub seed: u64,
    /// Workers' shares in `shards`.
    pub workers: u32,
}

/// Picks the round's nodes and shards. `nodes` pairs each active node with
/// the number of workers it declared: a cluster node of N workers gets N
/// times `shards_per_worker` shards (its workers split them), so an
/// institution's GPUs each get a volunteer's share of the data. `uses[i]` is
/// how often shard `i` has been assigned so far; it is updated for the shards
/// handed out.
pub fn assign(
    seed: u64,
    round: u64,
    nodes: &[(NodeId, u32)],
    uses: &mut [u32],
    shards_per_worker: usize,
) -> Vec<Share> {
    if nodes.is_empty() || uses.is_empty() || shards_per_worker == 0 {
        return Vec::new();
    }
    let per_worker = shards_per_worker.min(uses.len());
    // More workers than shards, or more nodes than a plan may hold
    // (`MAX_ASSIGNMENTS_PER_ROUND`): a seeded, round-dependent subset trains.
    // A node that does not fit whole gets as many workers' shares as are left.
    let mut order: Vec<(u64, NodeId, u32)> = nodes
        .iter()
        .map(|(n, workers)| (derive(seed, "node-order", round, &n.0.0), *n, *workers))
        .collect();
    order.sort();
    let mut left = uses.len();
    let mut selected: Vec<(NodeId, usize)> = Vec::new();
    for (_, node, workers) in order {
        if selected.len() == MAX_ASSIGNMENTS_PER_ROUND {
            break;
        }
        let wanted = per_worker.saturating_mul(workers.max(1) as usize);
        let granted = wanted.min(left - left % per_worker);
        if granted == 0 {
            break;
        }
        left -= granted;
        selected.push((node, granted));
    }
    // The selected nodes in id order, so the plan reads the same for everyone.
    selected.sort();

    let mut candidates: Vec<(u32, u64, usize)> = uses
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            (
                u,
                derive(seed, "shard-order", round, &(i as u64).to_le_bytes()),
                i,
            )
        })
        .collect();
    candidates.sort();
    let mut picked = candidates.into_iter().map(|(_, _, i)| i);
    let mut shares = Vec::with_capacity(selected.len());
    for (node, count) in selected {
        let shards: Vec<usize> = picked.by_ref().take(count).collect();
        for &i in &shards {
            uses[i] = uses[i].saturating_add(1);
        }
        shares.push(Share {
            node,
            workers: (count / per_worker).max(1) as u32,
            shards,
            seed: derive(seed, "node-seed", round, &node.0.0),
        });
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn nodes(n: u8) -> Vec<(NodeId, u32)> {
        (1..=n).map(|i| (NodeId::from_bytes([i; 32]), 1)).collect()
    }

    #[test]
    fn no_shard_twice_in_a_round_and_full_coverage() {
        let mut uses = vec![0u32; 10];
        let ids = nodes(3);
        let mut seen_per_epoch = HashSet::new();
        for round in 0..3 {
            let shares = assign(7, round, &ids, &mut uses, 1);
            assert_eq!(shares.len(), 3);
            let in_round: Vec<usize> = shares.iter().flat_map(|s| s.shards.clone()).collect();
            let distinct: HashSet<usize> = in_round.iter().copied().collect();
            assert_eq!(
                distinct.len(),
                in_round.len(),
                "a shard given twice in round {round}"
            );
            seen_per_epoch.extend(in_round);
        }
        // 9 of 10 shards after 3 rounds, all distinct: nothing repeated before coverage.
        assert_eq!(seen_per_epoch.len(), 9);
        let shares = assign(7, 3, &ids, &mut uses, 1);
        let next: Vec<usize> = shares.iter().flat_map(|s| s.shards.clone()).collect();
        let missing: Vec<usize> = (0..10).filter(|i| !seen_per_epoch.contains(i)).collect();
        assert!(
            next.contains(&missing[0]),
            "the unused shard comes first: {next:?}"
        );
        assert!(uses.iter().all(|&u| u == 1 || u == 2));
    }

    #[test]
    fn more_nodes_than_shards_selects_a_subset() {
        let mut uses = vec![0u32; 4];
        let shares = assign(1, 0, &nodes(6), &mut uses, 2);
        assert_eq!(shares.len(), 2);
        let all: HashSet<usize> = shares.iter().flat_map(|s| s.shards.clone()).collect();
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_round_has_at_most_the_plan_limit_of_nodes() {
        let n = MAX_ASSIGNMENTS_PER_ROUND + 50;
        let ids: Vec<(NodeId, u32)> = (0..n)
            .map(|i| {
                let mut bytes = [0u8; 32];
                bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
                (NodeId::from_bytes(bytes), 1)
            })
            .collect();
        let mut uses = vec![0u32; 2 * n];
        let first = assign(3, 0, &ids, &mut uses, 1);
        assert_eq!(first.len(), MAX_ASSIGNMENTS_PER_ROUND);
        // Which 50 sit out is seeded by the round, so it rotates.
        let second = assign(3, 1, &ids, &mut uses, 1);
        assert_eq!(second.len(), MAX_ASSIGNMENTS_PER_ROUND);
        let chosen = |s: &[Share]| s.iter().map(|x| x.node).collect::<HashSet<_>>();
        assert_ne!(chosen(&first), chosen(&second));
    }

    #[test]
    fn deterministic_and_rotating() {
        let ids = nodes(2);
        let a = assign(3, 5, &ids, &mut [0; 8], 1);
        let b = assign(3, 5, &ids, &mut [0; 8], 1);
        assert_eq!(a, b);
        let c = assign(3, 6, &ids, &mut [0; 8], 1);
        let shards = |s: &[Share]| s.iter().map(|x| x.shards.clone()).collect::<Vec<_>>();
        assert_ne!(
            shards(&a),
            shards(&c),
            "a different round orders shards differently"
        );
        assert_ne!(a[0].seed, a[1].seed);
    }

    #[test]
    fn a_cluster_node_gets_a_share_per_worker() {
        let mut ids = nodes(3);
        ids[1].1 = 4;
        let mut uses = vec![0u32; 12];
        let shares = assign(9, 0, &ids, &mut uses, 2);
        let count = |i: usize| {
            shares
                .iter()
                .find(|s| s.node == ids[i].0)
                .map(|s| s.shards.len())
        };
        assert_eq!((count(0), count(1), count(2)), (Some(2), Some(8), Some(2)));
        let all: HashSet<usize> = shares.iter().flat_map(|s| s.shards.clone()).collect();
        assert_eq!(all.len(), 12, "no shard twice in a round");

        // Too few shards for everyone: whoever is picked first gets what
        // fits, in whole workers' shares, and nobody gets a partial share.
        let mut uses = vec![0u32; 5];
        let shares = assign(9, 0, &ids, &mut uses, 2);
        let total: usize = shares.iter().map(|s| s.shards.len()).sum();
        assert!((4..=5).contains(&total), "{shares:?}");
        assert!(shares.iter().all(|s| s.shards.len() % 2 == 0));
    }
}
