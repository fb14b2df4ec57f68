//! How long a node keeps the updates it applied (docs/running-a-node.md,
//! "What the node stores").
//!
//! Every accepted update a node fetched stays in its blob store, and on the
//! DHT as provided by it, for [`KEEP_ROUNDS`] rounds after its own: long
//! enough for a node that joins between two checkpoints to replay from peers
//! (the coordinator keeps every update and serves as the last resort), short
//! enough that disk use does not grow with the run. Shards are kept: the
//! dataset is bounded and a node is often given a shard again. The index of
//! which update belongs to which round is a small JSON file, so the policy
//! holds across restarts.

use crate::state::write_atomic;
use barnraise_protocol::Hash;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Rounds an applied update is kept after the round it belongs to.
pub const KEEP_ROUNDS: u64 = 8;
/// Rounds the index remembers at most (a damaged or hostile file cannot make it grow).
const MAX_INDEXED_ROUNDS: usize = 4 * KEEP_ROUNDS as usize;
/// Hashes one round may list (a manifest's accepted list is bounded too).
const MAX_HASHES_PER_ROUND: usize = 100_000;

/// Which blobs belong to which round.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    path: PathBuf,
    rounds: BTreeMap<u64, BTreeSet<Hash>>,
}

impl Retention {
    /// Loads the index from `data_dir/retention.json`; a missing or
    /// unreadable file starts an empty index (the worst outcome is that old
    /// blobs stay, never that a needed one goes).
    pub fn load(data_dir: &Path) -> Retention {
        let path = data_dir.join("retention.json");
        let rounds = std::fs::read(&path)
            .ok()
            .and_then(|bytes| parse(&bytes))
            .unwrap_or_default();
        Retention { path, rounds }
    }

    /// Notes that `hashes` (the updates applied for `round`) belong to it.
    pub fn record(&mut self, round: u64, hashes: impl IntoIterator<Item = Hash>) {
        let entry = self.rounds.entry(round).or_default();
        for hash in hashes {
            if entry.len() >= MAX_HASHES_PER_ROUND {
                break;
            }
            entry.insert(hash);
        }
        while self.rounds.len() > MAX_INDEXED_ROUNDS {
            self.rounds.pop_first();
        }
    }

    /// Takes out of the index what is due for deletion now that `round` is
    /// the current round: every round older than `round − KEEP_ROUNDS`. A
    /// hash that a kept round also lists stays.
    pub fn expire(&mut self, round: u64) -> Vec<Hash> {
        let cutoff = round.saturating_sub(KEEP_ROUNDS);
        let kept = self.rounds.split_off(&cutoff);
        let expired = std::mem::replace(&mut self.rounds, kept);
        let expired: BTreeSet<Hash> = expired.into_values().flatten().collect();
        expired
            .into_iter()
            .filter(|h| !self.rounds.values().any(|kept| kept.contains(h)))
            .collect()
    }

    /// Writes the index (atomically).
    pub fn save(&self) -> std::io::Result<()> {
        let map: BTreeMap<String, Vec<String>> = self
            .rounds
            .iter()
            .map(|(r, hs)| (r.to_string(), hs.iter().map(|h| h.to_hex()).collect()))
            .collect();
        let text = serde_json::to_vec_pretty(&map).map_err(std::io::Error::other)?;
        write_atomic(&self.path, &text).map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Reads an index file; anything malformed gives `None`.
pub fn parse(bytes: &[u8]) -> Option<BTreeMap<u64, BTreeSet<Hash>>> {
    let map: BTreeMap<String, Vec<String>> = serde_json::from_slice(bytes).ok()?;
    if map.len() > MAX_INDEXED_ROUNDS {
        return None;
    }
    let mut out = BTreeMap::new();
    for (round, hashes) in map {
        if hashes.len() > MAX_HASHES_PER_ROUND {
            return None;
        }
        let hashes: Option<BTreeSet<Hash>> = hashes.iter().map(|h| h.parse().ok()).collect();
        out.insert(round.parse().ok()?, hashes?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_expire_after_keep_rounds_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let h = |i: u8| Hash::of(&[i]);
        let mut r = Retention::load(dir.path());
        for round in 0..10u8 {
            r.record(u64::from(round), [h(round), h(100)]);
        }
        r.save().unwrap_or_else(|e| panic!("{e}"));
        let mut r = Retention::load(dir.path());
        // Current round 10: rounds 0 and 1 are older than 10 - 8 = 2.
        let expired = r.expire(10);
        assert_eq!(expired, {
            let mut v = vec![h(0), h(1)];
            v.sort();
            v
        });
        assert!(
            !expired.contains(&h(100)),
            "a blob a kept round still lists stays"
        );
        assert!(r.expire(10).is_empty(), "nothing twice");
        assert_eq!(r.expire(12).len(), 2, "rounds 2 and 3 go next");
    }

    #[test]
    fn a_damaged_or_oversized_index_is_ignored() {
        assert_eq!(parse(b"not json"), None);
        assert_eq!(parse(br#"{"x": []}"#), None);
        assert_eq!(parse(br#"{"1": ["zz"]}"#), None);
        let huge: BTreeMap<String, Vec<String>> =
            (0..1000).map(|i| (i.to_string(), vec![])).collect();
        let bytes = serde_json::to_vec(&huge).unwrap_or_default();
        assert_eq!(parse(&bytes), None);
        assert!(parse(b"{}").is_some_and(|m| m.is_empty()));
    }
}
