//! Seeded work assignment: which nodes train in a round and on which shards.
//!
//! Shards are chosen least-used first, so the whole dataset is covered before
//! any shard repeats, and within one round no shard is given twice. Ties are
//! broken by a key derived from the run seed and the round, so the order
//! rotates from round to round yet every party can recompute it.

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
}

/// Picks the round's nodes and shards. `uses[i]` is how often shard `i` has
/// been assigned so far; it is updated for the shards handed out.
pub fn assign(
    seed: u64,
    round: u64,
    nodes: &[NodeId],
    uses: &mut [u32],
    shards_per_node: usize,
) -> Vec<Share> {
    if nodes.is_empty() || uses.is_empty() || shards_per_node == 0 {
        return Vec::new();
    }
    let per_node = shards_per_node.min(uses.len());
    let capacity = uses.len() / per_node;
    // More nodes than shards: a seeded, round-dependent subset trains.
    let mut order: Vec<(u64, NodeId)> = nodes
        .iter()
        .map(|n| (derive(seed, "node-order", round, &n.0.0), *n))
        .collect();
    order.sort();
    order.truncate(capacity);
    // The selected nodes in id order, so the plan reads the same for everyone.
    let mut selected: Vec<NodeId> = order.into_iter().map(|(_, n)| n).collect();
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
    for node in selected {
        let shards: Vec<usize> = picked.by_ref().take(per_node).collect();
        for &i in &shards {
            uses[i] = uses[i].saturating_add(1);
        }
        shares.push(Share {
            node,
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

    fn nodes(n: u8) -> Vec<NodeId> {
        (1..=n).map(|i| NodeId::from_bytes([i; 32])).collect()
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
}
