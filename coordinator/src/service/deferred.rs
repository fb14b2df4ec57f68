//! Deferred spot checks (`verify.defer_state_checks`; docs/security.md,
//! "Deferred spot checks"): a drawn worker's starting state is 8 bytes a
//! parameter, twenty times an update, and behind a slow uplink it arrives
//! after everything else. Rather than hold the round for it, the round
//! closes without it ([`crate::close::DeferredShare`]); when the state is
//! in, the share is replayed against the same θ_r on a blocking thread, and
//! the verdict settles in the next close ([`crate::close::Settled`]).
//!
//! A state fetch runs on the update's fetch task; its outcome comes here
//! ([`Service::on_states`]) whether it resolved before the round's close
//! (kept in `arrived` until the close says whether it used the state) or
//! after (a share the close deferred waits in `pending`). Nothing here
//! survives a restart: a coordinator that restarts loses its unsettled
//! checks, and those nodes' windows stay open until a later check.

use super::early::RoundInput;
use super::*;
use crate::close::{DeferredShare, Settled};
use crate::spot::SpotResult;
use barnraise_protocol::workers::WorkerShare;
use std::collections::HashSet;

/// The longest a deferred replay is waited for by the run's last close
/// (a replay takes seconds; this only bounds a stuck one).
const REPLAY_WAIT_MS: u64 = 600_000;

/// A drawn share, by round, node and worker.
type ShareKey = (u64, NodeId, u32);

/// A deferred share waiting for its state.
struct Waiting {
    share: DeferredShare,
    input: Arc<RoundInput>,
    /// Past this the share is let go unjudged: its fetch reports well
    /// before (it gives up when the node may stop serving), so only a fetch
    /// task that died gets here, and a node must not stay unverifiable for
    /// the coordinator's fault.
    expires_ms: u64,
}

/// How long past the node's serving time a deferred share waits for its
/// fetch to report.
const PENDING_SLACK_MS: u64 = 60_000;

/// The deferred checks of a coordinator.
#[derive(Default)]
pub(super) struct Deferred {
    /// State fetches that resolved before their round's close was done,
    /// with the state each names.
    arrived: HashMap<ShareKey, (Hash, Result<(), RejectReason>)>,
    /// Shares a close deferred whose state has not resolved yet.
    pending: HashMap<ShareKey, Waiting>,
    /// Deferred shares being replayed now: since when, and their state.
    replaying: HashMap<ShareKey, (u64, Hash)>,
    /// Verdicts for the next close.
    settled: Vec<Settled>,
    /// The last round whose close the service has taken in.
    closed_through: Option<u64>,
    /// The inputs of the round now closing (θ_r among them), for the
    /// shares its close defers.
    closing: Option<Arc<RoundInput>>,
    /// Whether the round of that number defers its drawn states: decided
    /// once, at its first fetch or its close, so that its fetches and its
    /// close agree.
    decided: Option<(u64, bool)>,
}

impl Deferred {
    /// What the next close needs: the verdicts settled since the last one
    /// (taken), and the nodes with a check still out.
    pub(super) fn for_close(
        &mut self,
        input: Option<Arc<RoundInput>>,
    ) -> (Vec<Settled>, Vec<NodeId>) {
        self.closing = input;
        let now = now_ms();
        self.pending.retain(|(round, node, worker), waiting| {
            let keep = waiting.expires_ms > now;
            if !keep {
                tracing::warn!(
                    node = %node.short(),
                    round,
                    worker,
                    "deferred spot check: its state fetch never reported; let go unjudged"
                );
            }
            keep
        });
        let mut pending: Vec<NodeId> = self
            .pending
            .keys()
            .chain(self.replaying.keys())
            .map(|(_, node, _)| *node)
            .collect();
        pending.sort();
        pending.dedup();
        (std::mem::take(&mut self.settled), pending)
    }

    /// Until when checks now out may still settle (`None`: none are out).
    /// The run's last close waits for them
    /// ([`crate::rounds::Rounds::checks_out_until`]).
    pub(super) fn checks_out_until(&self) -> Option<u64> {
        let pending = self.pending.values().map(|w| w.expires_ms);
        let replaying = self
            .replaying
            .values()
            .map(|(since, _)| since.saturating_add(REPLAY_WAIT_MS));
        pending.chain(replaying).max()
    }

    /// The states deferred checks still need: no close deletes them.
    pub(super) fn states_out(&self) -> HashSet<Hash> {
        self.pending
            .values()
            .map(|w| w.share.share.state_hash)
            .chain(self.replaying.values().map(|(_, hash)| *hash))
            .collect()
    }

    /// Rounds other than `round` whose θ_r a deferred check still holds
    /// (waiting for its state, or being replayed).
    fn rounds_held(&self, round: u64) -> usize {
        self.pending
            .keys()
            .chain(self.replaying.keys())
            .map(|(r, _, _)| *r)
            .filter(|r| *r != round)
            .collect::<HashSet<u64>>()
            .len()
    }

    /// Whether a close may defer shares: only with the round's inputs to
    /// replay them against.
    pub(super) fn can_defer(&self) -> bool {
        self.closing.is_some()
    }

    fn unserved(key: ShareKey, share: &WorkerShare, reason: &RejectReason) -> Settled {
        let (round, node, _) = key;
        tracing::info!(
            node = %node.short(),
            round,
            worker = share.index,
            "deferred spot check: the worker's state was not served ({})",
            reason.code()
        );
        Settled {
            round,
            node,
            result: SpotResult::unusable(
                share,
                format!("the worker's state was not served ({})", reason.code()),
            ),
        }
    }
}

impl Service {
    /// Whether round `round`'s drawn states may be checked after its close:
    /// only with a later close to settle in. The run's last round holds for
    /// its states as with `verify.defer_state_checks = false`, so that no
    /// check is left unsettled when the run ends.
    ///
    /// Each round with checks out keeps its θ_r (4 bytes a parameter) until
    /// they settle, up to a state's serving time after its commit: a round
    /// whose θ_r would take the rounds held past `verify.deferred_memory_mb`
    /// holds for its states instead. Decided once a round, so that its
    /// fetches and its close agree.
    pub(super) fn defers_states_of(&mut self, round: u64) -> bool {
        if let Some((decided, defers)) = self.deferred.decided
            && decided == round
        {
            return defers;
        }
        let wanted = self.config.verify.defer_state_checks
            && round.saturating_add(1) < self.config.total_rounds;
        let held = self.deferred.rounds_held(round);
        let theta_bytes = 4 * self.resolved.model.params_count() as u64;
        let budget = self
            .config
            .verify
            .deferred_memory_mb
            .saturating_mul(1 << 20);
        let defers = wanted && deferral_fits(held, theta_bytes, budget);
        if wanted && !defers {
            self.metrics
                .rounds_held_for_memory
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                round,
                rounds_held = held,
                theta_mb = theta_bytes >> 20,
                "deferred checks of {held} earlier rounds fill verify.deferred_memory_mb ({} MB): this round holds for its drawn states",
                self.config.verify.deferred_memory_mb
            );
        }
        self.deferred.decided = Some((round, defers));
        defers
    }

    /// A deferred check's verdict, for the next close.
    fn settle(&mut self, settled: Settled) {
        self.metrics
            .spot_checks_settled
            .fetch_add(1, Ordering::Relaxed);
        self.deferred.settled.push(settled);
    }

    /// The outcome of fetching the drawn states of `node`'s update of
    /// `round`, one per share.
    pub(super) fn on_states(
        &mut self,
        round: u64,
        node: NodeId,
        results: Vec<(WorkerShare, Result<(), RejectReason>)>,
    ) {
        self.rounds.states_resolved(round, &node);
        for (share, result) in results {
            let key = (round, node, share.index);
            if let Some(waiting) = self.deferred.pending.remove(&key) {
                self.resolve_deferred(key, waiting, result);
            } else if self
                .deferred
                .closed_through
                .is_none_or(|closed| closed < round)
            {
                // The close decides whether it used the state.
                self.deferred
                    .arrived
                    .insert(key, (share.state_hash, result));
            } else if result.is_ok() {
                // Its round closed without it (over the replay budget, or
                // its update rejected): not kept.
                self.forget_states(vec![share.state_hash]);
            }
        }
    }

    /// Takes in the shares round `round`'s close deferred.
    pub(super) fn defer_shares(&mut self, round: u64, shares: Vec<DeferredShare>) {
        let input = self.deferred.closing.take();
        for share in shares {
            let key = (round, share.node, share.share.index);
            self.metrics
                .spot_checks_deferred
                .fetch_add(1, Ordering::Relaxed);
            let Some(input) = input.clone() else {
                // Not reached: a close defers only with the round's inputs.
                self.settle(Deferred::unserved(
                    key,
                    &share.share,
                    &RejectReason::NotServed,
                ));
                continue;
            };
            tracing::info!(
                node = %share.node.short(),
                round,
                worker = share.share.index,
                "spot check deferred: the worker's state is still arriving"
            );
            let state_len = self.resolved.state_len();
            // A node's drawn states are fetched one after another, each
            // within what all of them may take.
            let drawn_most = self.config.verify.spot_check_max.max(1) as u64;
            let expires_ms = now_ms()
                .saturating_add(barnraise_protocol::limits::state_serve_ms(
                    state_len.saturating_mul(drawn_most),
                ))
                .saturating_add(PENDING_SLACK_MS);
            let waiting = Waiting {
                share,
                input,
                expires_ms,
            };
            match self.deferred.arrived.remove(&key) {
                Some((_, result)) => self.resolve_deferred(key, waiting, result),
                None => {
                    self.deferred.pending.insert(key, waiting);
                }
            }
        }
        // States of this round that arrived and were not deferred: the
        // close replayed and deleted them, or did not use them.
        let mut unused = Vec::new();
        self.deferred.arrived.retain(|(r, _, _), (hash, result)| {
            let keep = *r > round;
            if !keep && result.is_ok() {
                unused.push(*hash);
            }
            keep
        });
        self.forget_states(unused);
        self.deferred.closed_through = Some(round);
    }

    /// Deletes fetched states no check needs any more (only blobs of a
    /// state's exact size: a share may name any blob), off the async
    /// threads.
    fn forget_states(&self, hashes: Vec<Hash>) {
        let out = self.deferred.states_out();
        let hashes: Vec<Hash> = hashes.into_iter().filter(|h| !out.contains(h)).collect();
        if hashes.is_empty() {
            return;
        }
        let store = self.store.clone();
        let state_len = self.resolved.state_len();
        tokio::task::spawn_blocking(move || {
            for hash in hashes {
                if store.size(&hash) == Some(state_len)
                    && let Err(e) = store.remove(&hash)
                {
                    tracing::warn!("could not delete an unused worker state: {e}");
                }
            }
        });
    }

    /// A deferred share's state resolved: replay it if it came, or settle
    /// a failure if it did not.
    fn resolve_deferred(
        &mut self,
        key: ShareKey,
        waiting: Waiting,
        result: Result<(), RejectReason>,
    ) {
        if let Err(reason) = result {
            self.settle(Deferred::unserved(key, &waiting.share.share, &reason));
            return;
        }
        let hash = waiting.share.share.state_hash;
        // Blobs are named by their bytes, and two shares may name the same
        // state (every fresh worker's is all zeros): it is deleted after the
        // last check that needs it.
        let shared = self.deferred.states_out().contains(&hash);
        self.deferred.replaying.insert(key, (now_ms(), hash));
        let tx = self.internal_tx.clone();
        let state_len = self.resolved.state_len();
        tokio::spawn(async move {
            let (round, node, _) = key;
            let Waiting { share, input, .. } = waiting;
            let replayed = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let result =
                    super::early::replay_now(&input, round, &share.assignment, &share.share);
                input.metrics.stages.add(Stage::Spot, started.elapsed());
                // Replayed: the state (8 bytes a parameter) is not kept.
                // Only a blob of a state's exact size is deleted (a share
                // may name any blob).
                if !shared
                    && input.store.size(&share.share.state_hash) == Some(state_len)
                    && let Err(e) = input.store.remove(&share.share.state_hash)
                {
                    tracing::warn!("could not delete a spot-checked state: {e}");
                }
                result
            })
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(round, "deferred spot check: {e}");
                None
            });
            let _ = tx
                .send(Internal::DeferredReplayed {
                    key,
                    settled: replayed.map(|result| Settled {
                        round,
                        node,
                        result,
                    }),
                })
                .await;
        });
    }

    /// A deferred replay finished; `None` when it could not run (the state
    /// went from the store after it arrived). That is the coordinator's
    /// doing, not the node's: the check is let go unjudged.
    pub(super) fn on_deferred_replayed(&mut self, key: ShareKey, settled: Option<Settled>) {
        self.deferred.replaying.remove(&key);
        let (round, node, worker) = key;
        let Some(settled) = settled else {
            tracing::warn!(
                node = %node.short(),
                round,
                worker,
                "deferred spot check: the worker's state went from the store before its replay; let go unjudged"
            );
            return;
        };
        tracing::info!(
            node = %node.short(),
            round,
            passed = settled.result.passes(self.config.verify.spot_check_tolerance),
            "deferred spot check: {}",
            settled.result.describe()
        );
        self.settle(settled);
    }
}

/// Whether one more round's θ_r (`theta_bytes`) fits beside the `held`
/// rounds deferred checks keep, within `budget` bytes.
fn deferral_fits(held: usize, theta_bytes: u64, budget: u64) -> bool {
    (held as u64).saturating_add(1).saturating_mul(theta_bytes) <= budget
}

#[cfg(test)]
mod tests {
    use super::deferral_fits;

    #[test]
    fn rounds_defer_while_their_thetas_fit_the_budget() {
        let mb = 1u64 << 20;
        // `small` (3.3 M parameters, 13 MB a θ) under the default 4 GB: hundreds of rounds.
        assert!(deferral_fits(300, 13 * mb, 4096 * mb));
        assert!(!deferral_fits(315, 13 * mb, 4096 * mb));
        // A θ of 1.5 GB: the round itself and one more.
        assert!(deferral_fits(0, 1536 * mb, 4096 * mb));
        assert!(deferral_fits(1, 1536 * mb, 4096 * mb));
        assert!(!deferral_fits(2, 1536 * mb, 4096 * mb));
        // A θ larger than the budget never defers; a budget of 0 turns deferral off.
        assert!(!deferral_fits(0, 5000 * mb, 4096 * mb));
        assert!(!deferral_fits(0, 13 * mb, 0));
        // No overflow, however many rounds are held.
        assert!(!deferral_fits(usize::MAX, 1 << 30, 4096 * mb));
    }
}
