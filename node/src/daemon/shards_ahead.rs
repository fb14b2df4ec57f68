//! Fetching our shards of a round as soon as its plan arrives. The
//! coordinator gossips round r+1's plan right after round r's manifest,
//! while the node is still fetching round r's last updates and applying
//! them; the event router hands the plan here, and the shards the plan
//! gives us start downloading then, instead of after the apply, when
//! training is about to start (docs/architecture.md, "Slow links": 0.5 s a
//! round over a 100 ms link, on the round's critical path).
//!
//! Nothing is trusted for it: the plan was verified by the network layer,
//! the shard indices are looked up in the run's dataset (an index it does
//! not have starts nothing; the round loop reports it), and the blobs are
//! checked against their hash on arrival like any other. The round loop
//! still decides what it trains on: it takes the fetch started for a shard
//! ([`ShardsAhead::take`]) and waits for it, then fetches whatever is still
//! missing itself. A shard it took is not started again for a round, so
//! that a plan whose gossip arrives after the round loop polled for it does
//! not start a second download of a blob the loop is fetching.

use super::prefetch::Fetched;
use super::*;
use barnraise_protocol::messages::ShardInfo;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::task::JoinHandle;

/// Starts a fetch of shard `hash` of `bytes` bytes.
pub(super) type FetchShard =
    Arc<dyn Fn(Hash, u64) -> futures::future::BoxFuture<'static, Fetched> + Send + Sync>;

/// Shard fetches started ahead and not yet taken, at most: a plan gives a
/// node a few shards a worker, and the round loop takes each one it uses.
const STARTED_AT_MOST: usize = 256;

/// The shard fetches started from plans, by shard hash.
#[derive(Clone)]
pub(super) struct ShardsAhead {
    enabled: bool,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    armed: Option<Armed>,
    /// Shards started or taken, with the round of the plan that started
    /// them or of the round loop that took them.
    tasks: HashMap<Hash, (u64, Entry)>,
    /// The latest round a plan was offered for: older plans (replayed
    /// gossip) start nothing.
    newest: u64,
}

enum Entry {
    Started(JoinHandle<Fetched>),
    /// The round loop is fetching it: no plan starts it until the loop
    /// releases it.
    Taken,
}

impl Entry {
    fn stop(self) {
        if let Entry::Started(task) = self {
            task.abort();
        }
    }
}

struct Armed {
    me: NodeId,
    run_id: String,
    /// The coordinator `fetch` falls back on.
    coordinator: Option<PeerId>,
    dataset: Arc<Vec<ShardInfo>>,
    fetch: FetchShard,
}

impl ShardsAhead {
    pub(super) fn new(enabled: bool) -> ShardsAhead {
        ShardsAhead {
            enabled,
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether plans of run `run_id` are taken, with fetches that fall back
    /// on `coordinator` (the round loop arms again when either changes).
    pub(super) fn armed_for(&self, run_id: &str, coordinator: Option<PeerId>) -> bool {
        self.lock()
            .armed
            .as_ref()
            .is_some_and(|a| a.run_id == run_id && a.coordinator == coordinator)
    }

    /// Takes plans of run `run_id` from now on, fetching the shards they
    /// give node `me` from `dataset` with `fetch` (whose last resort is
    /// `coordinator`).
    pub(super) fn arm(
        &self,
        me: NodeId,
        run_id: &str,
        coordinator: Option<PeerId>,
        dataset: Vec<ShardInfo>,
        fetch: FetchShard,
    ) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        for (_, (_, entry)) in inner.tasks.drain() {
            entry.stop();
        }
        inner.armed = Some(Armed {
            me,
            run_id: run_id.to_string(),
            coordinator,
            dataset: Arc::new(dataset),
            fetch,
        });
    }

    /// A plan from the coordinator, already verified by the network layer:
    /// starts fetching the shards it gives us that are neither being
    /// fetched ahead nor by the round loop. Plans older than the round
    /// before the newest one seen start nothing (a replay), and fetches
    /// started by plans two or more rounds older than this one and never
    /// taken are stopped (the node moved on without them). Returns how many
    /// fetches it started.
    pub(super) fn offer(&self, plan: &RoundPlan) -> usize {
        let mut inner = self.lock();
        let Some(armed) = inner.armed.as_ref() else {
            return 0;
        };
        if plan.run_id != armed.run_id || plan.round.saturating_add(1) < inner.newest {
            return 0;
        }
        let wanted: Vec<ShardInfo> = plan
            .assignments
            .iter()
            .filter(|a| a.node == armed.me)
            .flat_map(|a| &a.shards)
            .filter_map(|&i| armed.dataset.get(i as usize).cloned())
            .collect();
        let fetch = armed.fetch.clone();
        inner.newest = inner.newest.max(plan.round);
        let stale: Vec<Hash> = inner
            .tasks
            .iter()
            .filter(|(_, (round, entry))| {
                matches!(entry, Entry::Started(_)) && round.saturating_add(1) < plan.round
            })
            .map(|(hash, _)| *hash)
            .collect();
        for hash in stale {
            if let Some((_, entry)) = inner.tasks.remove(&hash) {
                entry.stop();
            }
        }
        let mut started = 0;
        for shard in wanted {
            if inner.tasks.len() >= STARTED_AT_MOST || inner.tasks.contains_key(&shard.hash) {
                continue;
            }
            let task = tokio::spawn(fetch(shard.hash, shard.bytes));
            inner
                .tasks
                .insert(shard.hash, (plan.round, Entry::Started(task)));
            started += 1;
        }
        if started > 0 {
            tracing::debug!(
                round = plan.round,
                started,
                "fetching the plan's shards ahead"
            );
        }
        started
    }

    /// The fetch started ahead for shard `hash`, if any, for the round
    /// loop of `round` to await; from now on the loop fetches the shard
    /// itself, and plans do not start it until [`ShardsAhead::release`].
    pub(super) fn take(&self, hash: &Hash, round: u64) -> Option<JoinHandle<Fetched>> {
        let mut inner = self.lock();
        // Not armed (or switched off): nothing to keep track of.
        inner.armed.as_ref()?;
        match inner.tasks.insert(*hash, (round, Entry::Taken)) {
            Some((_, Entry::Started(task))) => Some(task),
            _ => None,
        }
    }

    /// The round loop is done fetching shard `hash` (it is in the store, or
    /// the fetch failed): a later plan may start it again.
    pub(super) fn release(&self, hash: &Hash) {
        let mut inner = self.lock();
        if matches!(inner.tasks.get(hash), Some((_, Entry::Taken))) {
            inner.tasks.remove(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::messages::Assignment;

    fn node(seed: u8) -> NodeId {
        SigningKey::from_seed([seed; 32]).unwrap().node_id()
    }

    fn dataset() -> Vec<ShardInfo> {
        (0..4u8)
            .map(|i| ShardInfo {
                hash: Hash::of(&[i]),
                tokens: 100,
                bytes: 1_000 + u64::from(i),
            })
            .collect()
    }

    fn plan(run_id: &str, round: u64, assignments: Vec<(NodeId, Vec<u32>)>) -> RoundPlan {
        RoundPlan {
            run_id: run_id.into(),
            round,
            params_hash: Hash::ZERO,
            previous_manifest: Hash::ZERO,
            assignments: assignments
                .into_iter()
                .map(|(node, shards)| Assignment {
                    node,
                    shards,
                    seed: 0,
                    inner_steps: 1,
                    workers: 1,
                })
                .collect(),
            opened_at_ms: 0,
            deadline_ms: 0,
            bootstrap: Vec::new(),
        }
    }

    /// A fetcher that records what it was asked for and finishes at once.
    fn recording() -> (FetchShard, Arc<Mutex<Vec<(Hash, u64)>>>) {
        let asked: Arc<Mutex<Vec<(Hash, u64)>>> = Arc::default();
        let log = asked.clone();
        let fetch: FetchShard = Arc::new(move |hash, bytes| {
            log.lock().unwrap().push((hash, bytes));
            Box::pin(async { Ok(None) })
        });
        (fetch, asked)
    }

    #[tokio::test]
    async fn a_plan_starts_our_shards_once_and_nothing_else() {
        let (me, other) = (node(1), node(2));
        let (fetch, asked) = recording();
        let ahead = ShardsAhead::new(true);
        // Not armed: nothing.
        assert_eq!(ahead.offer(&plan("run", 1, vec![(me, vec![0])])), 0);
        let coordinator = Some(PeerId::random());
        ahead.arm(me, "run", coordinator, dataset(), fetch);
        assert!(ahead.armed_for("run", coordinator));
        assert!(!ahead.armed_for("other", coordinator));
        assert!(!ahead.armed_for("run", Some(PeerId::random())));
        let p = plan("run", 1, vec![(other, vec![0]), (me, vec![2, 3, 9])]);
        // Ours only, of the dataset's sizes; index 9 is not in the dataset.
        assert_eq!(ahead.offer(&p), 2);
        let data = dataset();
        assert_eq!(
            *asked.lock().unwrap(),
            vec![(data[2].hash, 1_002), (data[3].hash, 1_003)]
        );
        // The same plan again (gossip and a poll): nothing twice.
        assert_eq!(ahead.offer(&p), 0);
        // Another run's plan, or one without us: nothing.
        assert_eq!(ahead.offer(&plan("other", 1, vec![(me, vec![1])])), 0);
        assert_eq!(ahead.offer(&plan("run", 2, vec![(other, vec![1])])), 0);
        // Taken once; what was not started is not there.
        let task = ahead.take(&data[2].hash, 1).expect("started");
        assert!(matches!(task.await, Ok(Ok(None))));
        assert!(ahead.take(&data[2].hash, 1).is_none());
        // The round loop fetches shard 0 itself (its plan came by a poll):
        // the plan's gossip arriving later does not start it a second time,
        // nor does any plan until the loop is done with it.
        assert!(ahead.take(&data[0].hash, 1).is_none());
        assert_eq!(ahead.offer(&plan("run", 1, vec![(me, vec![0])])), 0);
        assert_eq!(ahead.offer(&plan("run", 2, vec![(me, vec![0])])), 0);
        ahead.release(&data[0].hash);
        // Shard 2 was taken and released with nothing left to do for it.
        ahead.release(&data[2].hash);
        assert_eq!(ahead.offer(&plan("run", 3, vec![(me, vec![2])])), 1);
        // Plans two rounds on stop what older plans started and nobody
        // took, even plans that give us nothing.
        assert_eq!(ahead.offer(&plan("run", 5, vec![(other, vec![1])])), 0);
        assert!(
            ahead.take(&data[3].hash, 5).is_none(),
            "round 1's fetch was dropped"
        );
        assert!(
            ahead.take(&data[2].hash, 5).is_none(),
            "round 3's fetch was dropped"
        );
        // A replayed plan of an old round starts nothing.
        assert_eq!(ahead.offer(&plan("run", 3, vec![(me, vec![1])])), 0);
        assert_eq!(ahead.offer(&plan("run", 5, vec![(me, vec![0])])), 1);
        assert!(ahead.take(&data[0].hash, 5).is_some());
        assert_eq!(asked.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn switched_off_it_starts_nothing() {
        let me = node(1);
        let (fetch, asked) = recording();
        let ahead = ShardsAhead::new(false);
        ahead.arm(me, "run", None, dataset(), fetch);
        assert_eq!(ahead.offer(&plan("run", 1, vec![(me, vec![0, 1])])), 0);
        assert!(asked.lock().unwrap().is_empty());
        // Nothing is kept for the round loop's shards either.
        assert!(ahead.take(&Hash::of(&[0]), 1).is_none());
        assert!(ahead.lock().tasks.is_empty());
    }
}
