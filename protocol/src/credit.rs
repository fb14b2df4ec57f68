//! Clawback: credit that a spot check has not yet backed can be taken back
//! (docs/security.md, "Clawback").
//!
//! A spot check replays a few of the round's workers, so a node that claims
//! more workers than it trains is caught only in some rounds; without more,
//! the rounds in between pay. So every node carries a window of *unverified*
//! credit: the tokens of its accepted updates since the last round in which a
//! spot check replayed one of its workers and got the Δ it committed to.
//! - A round in which a check of the node passes closes the window: what it
//!   holds stands.
//! - A round in which a check of the node fails voids the window: the
//!   manifest lists the node, the first round of the window and its tokens,
//!   and the ledger takes that credit back. The round's own update is
//!   rejected, as before.
//!
//! The windows are a fold over the manifests alone (`verified` and `voided`
//! are in them, signed), so the coordinator rebuilds them on restart and an
//! auditor recomputes every void and every node's final total from the run
//! record.

use crate::NodeId;
use crate::messages::{Manifest, VoidedCredit};
use std::collections::HashMap;

/// A node's credit not yet backed by a passed spot check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// The first round with credit in the window (meaningless while `tokens` is 0).
    pub from_round: u64,
    pub tokens: u64,
}

/// Every node's unverified credit after the manifests folded in so far.
#[derive(Clone, Debug, Default)]
pub struct Unverified {
    windows: HashMap<NodeId, Window>,
    /// The next round [`Unverified::apply`] expects.
    next_round: u64,
}

/// A manifest the fold cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoidMismatch {
    /// Its `voided` list is not what the earlier manifests give.
    #[error(
        "round {round}: the manifest voids {claimed} for {node}; the earlier manifests give {expected}"
    )]
    Void {
        round: u64,
        node: NodeId,
        /// The void as the manifest states it, and as the fold gives it.
        claimed: String,
        expected: String,
    },
    /// It is not the next round.
    #[error(
        "manifest of round {round} where round {expected} was due: manifests fold one round after another from round 0"
    )]
    OutOfOrder { round: u64, expected: u64 },
}

impl VoidMismatch {
    /// The round of the manifest that did not fold.
    pub fn round(&self) -> u64 {
        match self {
            VoidMismatch::Void { round, .. } | VoidMismatch::OutOfOrder { round, .. } => *round,
        }
    }
}

fn describe(void: Option<&VoidedCredit>) -> String {
    match void {
        Some(v) => format!("{} tokens from round {}", v.tokens, v.from_round),
        None => "nothing".into(),
    }
}

impl Unverified {
    /// The node's window now.
    pub fn window(&self, node: &NodeId) -> Window {
        self.windows.get(node).copied().unwrap_or_default()
    }

    /// What failing a spot check in this round voids for `node`: nothing
    /// when its window is empty.
    pub fn void_for(&self, node: &NodeId) -> Option<VoidedCredit> {
        let w = self.window(node);
        (w.tokens > 0).then_some(VoidedCredit {
            node: *node,
            from_round: w.from_round,
            tokens: w.tokens,
        })
    }

    /// Folds in the next manifest (rounds start at 0 and go one by one),
    /// after checking that each void it lists is exactly the node's window:
    /// no more, no less, no node twice.
    pub fn apply(&mut self, manifest: &Manifest) -> Result<(), VoidMismatch> {
        let round = manifest.round;
        if round != self.next_round {
            return Err(VoidMismatch::OutOfOrder {
                round,
                expected: self.next_round,
            });
        }
        let mut seen = std::collections::HashSet::new();
        for v in &manifest.voided {
            let expected = self.void_for(&v.node);
            if !seen.insert(v.node) || expected.as_ref() != Some(v) {
                return Err(VoidMismatch::Void {
                    round,
                    node: v.node,
                    claimed: describe(Some(v)),
                    expected: describe(expected.as_ref()),
                });
            }
        }
        for v in &manifest.voided {
            self.windows.remove(&v.node);
        }
        let verified: std::collections::HashSet<&NodeId> = manifest.verified.iter().collect();
        for node in &verified {
            self.windows.remove(*node);
        }
        for a in &manifest.accepted {
            if verified.contains(&a.node) {
                continue;
            }
            let w = self.windows.entry(a.node).or_default();
            if w.tokens == 0 {
                w.from_round = round;
            }
            w.tokens = w.tokens.saturating_add(a.tokens);
        }
        self.next_round = round.saturating_add(1);
        Ok(())
    }

    /// Folds in every manifest of a run, in order.
    pub fn replay<'a>(
        manifests: impl IntoIterator<Item = &'a Manifest>,
    ) -> Result<Unverified, VoidMismatch> {
        let mut u = Unverified::default();
        for m in manifests {
            u.apply(m)?;
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Hash;
    use crate::messages::AcceptedUpdate;

    fn node(i: u8) -> NodeId {
        NodeId::from_bytes([i; 32])
    }

    fn manifest(round: u64, accepted: &[(u8, u64)]) -> Manifest {
        Manifest {
            run_id: "r".into(),
            round,
            previous_manifest: Hash::ZERO,
            base_params_hash: Hash::ZERO,
            accepted: accepted
                .iter()
                .map(|&(n, tokens)| AcceptedUpdate {
                    node: node(n),
                    update_hash: Hash::of(&[n, round as u8]),
                    update_bytes: 1,
                    tokens,
                    weight: 0.5,
                    compute_ms: 1,
                })
                .collect(),
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
    fn a_failed_check_voids_everything_since_the_last_passed_one() {
        let mut u = Unverified::default();
        u.apply(&manifest(0, &[(1, 100), (2, 100)])).unwrap();
        // Round 1: node 1's check passes; rounds 0 and 1 stand for it.
        let mut m1 = manifest(1, &[(1, 100), (2, 100)]);
        m1.verified = vec![node(1)];
        u.apply(&m1).unwrap();
        assert_eq!(u.window(&node(1)).tokens, 0);
        assert_eq!(
            u.window(&node(2)),
            Window {
                from_round: 0,
                tokens: 200
            }
        );
        u.apply(&manifest(2, &[(1, 100), (2, 100)])).unwrap();
        // Round 3: both fail a check (so neither is accepted).
        let expected = [
            VoidedCredit {
                node: node(1),
                from_round: 2,
                tokens: 100,
            },
            VoidedCredit {
                node: node(2),
                from_round: 0,
                tokens: 300,
            },
        ];
        assert_eq!(u.void_for(&node(1)), Some(expected[0].clone()));
        assert_eq!(u.void_for(&node(2)), Some(expected[1].clone()));
        let mut m3 = manifest(3, &[]);
        m3.voided = expected.to_vec();
        u.apply(&m3).unwrap();
        assert_eq!(u.void_for(&node(1)), None, "the window starts afresh");
        assert_eq!(u.void_for(&node(2)), None);
        u.apply(&manifest(4, &[(2, 50)])).unwrap();
        assert_eq!(
            u.window(&node(2)),
            Window {
                from_round: 4,
                tokens: 50
            }
        );
    }

    #[test]
    fn a_void_that_is_not_the_window_is_refused() {
        let mut u = Unverified::default();
        u.apply(&manifest(0, &[(1, 100)])).unwrap();
        let before = u.clone();
        for claimed in [
            // Too much, too little, the wrong start, a node with nothing.
            (1, 0, 200),
            (1, 0, 99),
            (1, 1, 100),
            (2, 0, 100),
        ] {
            let mut m = manifest(1, &[]);
            m.voided = vec![VoidedCredit {
                node: node(claimed.0),
                from_round: claimed.1,
                tokens: claimed.2,
            }];
            let mut u = before.clone();
            assert!(u.apply(&m).is_err(), "{claimed:?}");
        }
        // The same node twice.
        let mut m = manifest(1, &[]);
        let v = before.void_for(&node(1)).unwrap();
        m.voided = vec![v.clone(), v];
        assert!(u.clone().apply(&m).is_err());
        // Out of order.
        assert!(u.apply(&manifest(5, &[])).is_err());
    }
}
