//! What the coordinator deletes from its blob store as the run goes on
//! (docs/running-a-coordinator.md, "Disk and retention"):
//!
//! - the state of round r (θ_r and the outer momentum), written at every
//!   close so a restart resumes, once round r+1's state is on disk — unless
//!   it is a checkpoint still kept;
//! - published checkpoints beyond the newest `keep_checkpoints`, except the
//!   first (θ_0), which anchors an audit of the whole run;
//! - with `keep_update_rounds = n`, the updates (accepted and rejected) of
//!   round r − n when round r closes, but never those of a round at or
//!   after the oldest kept checkpoint: late joiners replay them.
//!
//! Training shards are never deleted. The decisions are pure functions of
//! round numbers, so they are tested here; the service applies them.

use crate::config::RetentionConfig;

/// The checkpoint rounds to delete, given every published checkpoint round
/// (any order): all but the first and the newest `keep`.
pub fn checkpoints_to_drop(published: &[u64], keep: usize) -> Vec<u64> {
    let mut rounds = published.to_vec();
    rounds.sort_unstable();
    rounds.dedup();
    let Some(&first) = rounds.first() else {
        return Vec::new();
    };
    let newest_from = rounds.len().saturating_sub(keep.max(1));
    rounds
        .into_iter()
        .enumerate()
        .filter(|&(i, r)| r != first && i < newest_from)
        .map(|(_, r)| r)
        .collect()
}

/// The oldest checkpoint round still kept besides θ_0's: late joiners may
/// start from it, so no update at or after it may go.
pub fn oldest_kept_checkpoint(published: &[u64], keep: usize) -> Option<u64> {
    let mut rounds = published.to_vec();
    rounds.sort_unstable();
    rounds.dedup();
    let newest_from = rounds.len().saturating_sub(keep.max(1));
    rounds.get(newest_from).copied()
}

/// The round whose updates to delete now that round `closed` has closed,
/// if any.
pub fn update_round_to_drop(
    policy: &RetentionConfig,
    closed: u64,
    published: &[u64],
) -> Option<u64> {
    let keep = policy.keep_update_rounds?;
    let round = closed.checked_sub(keep.max(1))?;
    let floor = oldest_kept_checkpoint(published, policy.keep_checkpoints)?;
    (round < floor).then_some(round)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_the_newest_checkpoints_stay() {
        assert_eq!(checkpoints_to_drop(&[0, 3, 6, 9], 2), vec![3]);
        assert_eq!(checkpoints_to_drop(&[9, 0, 6, 3], 1), vec![3, 6]);
        assert_eq!(checkpoints_to_drop(&[0, 3], 2), Vec::<u64>::new());
        assert_eq!(checkpoints_to_drop(&[0], 1), Vec::<u64>::new());
        assert_eq!(checkpoints_to_drop(&[], 1), Vec::<u64>::new());
        // keep = 0 is refused by config validation; here it acts as 1.
        assert_eq!(checkpoints_to_drop(&[0, 1, 2], 0), vec![1]);
        assert_eq!(oldest_kept_checkpoint(&[0, 3, 6, 9], 2), Some(6));
        assert_eq!(oldest_kept_checkpoint(&[0], 2), Some(0));
    }

    #[test]
    fn updates_go_only_behind_the_oldest_kept_checkpoint() {
        let policy = |n: Option<u64>| RetentionConfig {
            keep_checkpoints: 1,
            keep_update_rounds: n,
        };
        // Keep everything: nothing goes.
        assert_eq!(update_round_to_drop(&policy(None), 20, &[0, 18]), None);
        // Round 10 closed, keep 4: round 6 goes, it is behind checkpoint 9.
        assert_eq!(update_round_to_drop(&policy(Some(4)), 10, &[0, 9]), Some(6));
        // Not if a late joiner could still replay it from checkpoint 6.
        assert_eq!(update_round_to_drop(&policy(Some(4)), 10, &[0, 6]), None);
        // Too early in the run.
        assert_eq!(update_round_to_drop(&policy(Some(4)), 3, &[0, 3]), None);
    }
}
