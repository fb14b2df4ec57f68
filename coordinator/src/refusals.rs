//! Which refusals the ledger records. A refused join or commit is evidence
//! an operator and the refused volunteer want to see, but every ledger row
//! is an fsync, so a stranger must not be able to write them at will:
//! - a refusal whose sender cannot be authenticated (a bad signature, a
//!   join signed by another key than the connection's, a commit from a node
//!   that never joined) is only counted in `/metrics`;
//! - an authenticated sender's refusal is recorded once per (sender,
//!   reason) in each round, and at most [`MAX_ROWS_PER_ROUND`] rows a
//!   round in all; what is left out is counted in `/metrics`.

use barnraise_protocol::PublicKey;
use std::collections::HashSet;

/// Most refusal rows the ledger takes in one round.
pub const MAX_ROWS_PER_ROUND: usize = 1000;

/// The refusals recorded in the current round.
#[derive(Debug, Default)]
pub struct RefusalLog {
    round: u64,
    seen: HashSet<(PublicKey, &'static str)>,
}

impl RefusalLog {
    /// Whether a refusal of `sender` for `reason`, while the coordinator is
    /// at `round`, goes to the ledger. Seeing a new round starts afresh.
    pub fn should_record(&mut self, round: u64, sender: &PublicKey, reason: &'static str) -> bool {
        if round != self.round {
            self.round = round;
            self.seen.clear();
        }
        if self.seen.len() >= MAX_ROWS_PER_ROUND {
            return false;
        }
        self.seen.insert((*sender, reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes[..4].copy_from_slice(&i.to_le_bytes());
        PublicKey(bytes)
    }

    #[test]
    fn once_per_sender_and_reason_and_capped_per_round() {
        let mut log = RefusalLog::default();
        assert!(log.should_record(3, &key(1), "late"));
        assert!(!log.should_record(3, &key(1), "late"), "a repeat");
        assert!(
            log.should_record(3, &key(1), "wrong-round"),
            "another reason"
        );
        assert!(log.should_record(3, &key(2), "late"), "another sender");
        // A new round starts afresh.
        assert!(log.should_record(4, &key(1), "late"));
        // Many senders: the ledger takes the first MAX_ROWS_PER_ROUND.
        let recorded = (0..5 * MAX_ROWS_PER_ROUND as u32)
            .filter(|&i| log.should_record(5, &key(i), "join-refused"))
            .count();
        assert_eq!(recorded, MAX_ROWS_PER_ROUND);
    }
}
