//! Fetching a round's updates before its manifest. As each update of the
//! open round passes the coordinator's checks of form (stage 2), the
//! coordinator gossips an [`UpdateNotice`]; the node starts fetching that
//! update at once, while it still trains or waits for the close, so that
//! applying the manifest finds the blob in its store instead of fetching it
//! over the link then (docs/architecture.md, "Slow links").
//!
//! The manifest alone decides what is applied: a notice only says where to
//! start. Blobs are checked against their hash on arrival as always, a
//! notice is taken only for a node the round's plan assigned (once each),
//! and a prefetched update the manifest does not accept is dropped with its
//! partial download (one it completed is pruned with the round's rejected
//! updates).

use super::fetch::Blobs;
use super::*;
use crate::transfer::FetchReport;
use barnraise_protocol::messages::UpdateNotice;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use tokio::task::JoinHandle;

/// What a fetch started ahead of the manifest came to.
pub(super) type Fetched = Result<Option<FetchReport>, NodeError>;

/// Where prefetched updates come from: the node's [`Blobs`] (a fake in
/// tests).
pub(super) trait Source: Send + Sync + 'static {
    /// Fetches update `hash` of `size` bytes, asking `author` first.
    fn fetch(
        &self,
        hash: Hash,
        size: u64,
        author: Option<PeerId>,
    ) -> futures::future::BoxFuture<'static, Fetched>;
    /// Forgets what a fetch of `hash` that will not be applied left: its
    /// partial download, and with `whole` the blob it brought in.
    fn discard(&self, hash: Hash, whole: bool);
}

impl Source for Blobs {
    fn fetch(
        &self,
        hash: Hash,
        size: u64,
        author: Option<PeerId>,
    ) -> futures::future::BoxFuture<'static, Fetched> {
        let blobs = self.clone();
        Box::pin(async move { blobs.fetch(&hash, Some(size), author, "update").await })
    }

    fn discard(&self, hash: Hash, whole: bool) {
        self.store().discard_partial(&hash);
        // A fetch that finished before it was cancelled (an update the
        // manifest rejected, or a round the node resynced past) would
        // otherwise stay in the store for good: nothing indexes it for
        // retention.
        if whole && let Err(e) = self.store().remove(&hash) {
            tracing::debug!("could not delete unapplied update {}: {e}", hash.short());
        }
    }
}

/// Updates fetched ahead at once: as many as a manifest's.
const PREFETCHED_AT_ONCE: usize = super::apply::UPDATES_FETCHED_AT_ONCE;

/// Notices kept for a round not armed yet (its plan still on its way).
const EARLY_NOTICES_KEPT: usize = 1024;

/// The fetches of one round's updates started before its manifest. The
/// round loop says which round and which authors to expect
/// ([`Prefetch::arm`]) and takes the fetches when the manifest comes
/// ([`Prefetch::take`]); the event router hands it the coordinator's
/// notices ([`Prefetch::offer`]), so fetching starts even while the node
/// trains.
#[derive(Clone)]
pub(super) struct Prefetch {
    enabled: bool,
    inner: Arc<Mutex<Inner>>,
    slots: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct Inner {
    armed: Option<Armed>,
    /// Notices of rounds later than the armed one, until they are armed.
    early: Vec<UpdateNotice>,
}

struct Armed {
    round: u64,
    /// The round's assigned nodes other than us whose update has not been
    /// noticed yet.
    authors: HashSet<NodeId>,
    source: Arc<dyn Source>,
    tasks: HashMap<Hash, JoinHandle<Fetched>>,
}

impl Prefetch {
    pub(super) fn new(enabled: bool) -> Prefetch {
        Prefetch {
            enabled,
            inner: Arc::new(Mutex::new(Inner::default())),
            slots: Arc::new(tokio::sync::Semaphore::new(PREFETCHED_AT_ONCE)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes notices of `round` from now on, for the updates of `authors`
    /// (the plan's assigned nodes other than us), including those that came
    /// before this call; cancels whatever an earlier round started.
    pub(super) fn arm(&self, round: u64, authors: HashSet<NodeId>, source: Arc<dyn Source>) {
        if !self.enabled {
            return;
        }
        let mut inner = self.lock();
        if let Some(previous) = inner.armed.take() {
            cancel(previous.tasks, &previous.source);
        }
        inner.armed = Some(Armed {
            round,
            authors,
            source,
            tasks: HashMap::new(),
        });
        let early = std::mem::take(&mut inner.early);
        for notice in early {
            if notice.round == round {
                self.start(&mut inner, &notice);
            } else if notice.round > round {
                inner.early.push(notice);
            }
        }
    }

    /// A notice from the coordinator, already verified by the network
    /// layer. Returns whether it started a fetch.
    pub(super) fn offer(&self, notice: UpdateNotice) -> bool {
        if !self.enabled {
            return false;
        }
        let mut inner = self.lock();
        match inner.armed.as_ref().map(|a| a.round) {
            Some(round) if notice.round == round => self.start(&mut inner, &notice),
            Some(round) if notice.round < round => false,
            _ => {
                if inner.early.len() < EARLY_NOTICES_KEPT {
                    inner.early.push(notice);
                }
                false
            }
        }
    }

    fn start(&self, inner: &mut Inner, notice: &UpdateNotice) -> bool {
        let Some(armed) = inner.armed.as_mut() else {
            return false;
        };
        if !armed.authors.remove(&notice.node) || armed.tasks.contains_key(&notice.update_hash) {
            return false;
        }
        let slots = self.slots.clone();
        let fetch = armed.source.fetch(
            notice.update_hash,
            notice.update_bytes,
            notice.node.0.to_peer_id().ok(),
        );
        let task = tokio::spawn(async move {
            // The semaphore is never closed; without a permit we fetch anyway.
            let _permit = slots.acquire_owned().await.ok();
            fetch.await
        });
        armed.tasks.insert(notice.update_hash, task);
        true
    }

    /// Stops taking notices and hands over the fetches started for
    /// `round`, by update hash; those of any other round are cancelled.
    pub(super) fn take(&self, round: u64) -> HashMap<Hash, JoinHandle<Fetched>> {
        let mut inner = self.lock();
        inner.early.retain(|n| n.round > round);
        match inner.armed.take() {
            Some(armed) if armed.round == round => armed.tasks,
            Some(armed) => {
                cancel(armed.tasks, &armed.source);
                HashMap::new()
            }
            None => HashMap::new(),
        }
    }
}

/// Cancels prefetches whose updates will not be applied, and forgets their
/// partial downloads once they have stopped.
pub(super) fn cancel(tasks: HashMap<Hash, JoinHandle<Fetched>>, source: &Arc<dyn Source>) {
    if tasks.is_empty() {
        return;
    }
    let source = source.clone();
    tokio::spawn(async move {
        for (hash, task) in tasks {
            task.abort();
            // Only what this fetch brought in goes: a blob the store had
            // before (our own update, if another node committed its bytes)
            // stays.
            let whole = matches!(task.await, Ok(Ok(Some(report))) if !report.already_had);
            let source = source.clone();
            let _ = tokio::task::spawn_blocking(move || source.discard(hash, whole)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// Records what was fetched and discarded; a fetch finishes when
    /// `release` is notified (or at once when `hold` is false).
    #[derive(Default)]
    struct Fake {
        fetched: StdMutex<Vec<(Hash, u64, Option<PeerId>)>>,
        discarded: StdMutex<Vec<(Hash, bool)>>,
        hold: bool,
        /// What a finished fetch reports: None, or whether the store
        /// already had the blob.
        finish: Option<bool>,
        release: Arc<tokio::sync::Notify>,
    }

    impl Source for Fake {
        fn fetch(
            &self,
            hash: Hash,
            size: u64,
            author: Option<PeerId>,
        ) -> futures::future::BoxFuture<'static, Fetched> {
            self.fetched.lock().unwrap().push((hash, size, author));
            let (hold, release, finish) = (self.hold, self.release.clone(), self.finish);
            Box::pin(async move {
                if hold {
                    release.notified().await;
                }
                Ok(finish.map(|already_had| FetchReport {
                    already_had,
                    ..FetchReport::nothing_yet(hash)
                }))
            })
        }

        fn discard(&self, hash: Hash, whole: bool) {
            self.discarded.lock().unwrap().push((hash, whole));
        }
    }

    /// Waits (up to 2 s) for `cancel`'s task to discard something.
    async fn discarded_soon(fake: &Fake) {
        for _ in 0..200 {
            if !fake.discarded.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn node(seed: u8) -> NodeId {
        SigningKey::from_seed([seed; 32]).unwrap().node_id()
    }

    fn notice(round: u64, author: u8, blob: &[u8]) -> UpdateNotice {
        UpdateNotice {
            run_id: "r".into(),
            round,
            node: node(author),
            update_hash: Hash::of(blob),
            update_bytes: blob.len() as u64,
        }
    }

    fn authors(seeds: &[u8]) -> HashSet<NodeId> {
        seeds.iter().map(|&s| node(s)).collect()
    }

    #[tokio::test]
    async fn only_the_armed_rounds_assigned_authors_are_fetched_once_each() {
        let fake = Arc::new(Fake::default());
        let prefetch = Prefetch::new(true);
        prefetch.arm(3, authors(&[1, 2]), fake.clone());
        assert!(prefetch.offer(notice(3, 1, b"one")));
        // Once per author, whatever the notice says next.
        assert!(!prefetch.offer(notice(3, 1, b"one again")));
        // Not assigned this round (ourselves, or a stranger).
        assert!(!prefetch.offer(notice(3, 9, b"stranger")));
        // An older round.
        assert!(!prefetch.offer(notice(2, 2, b"old")));
        assert!(prefetch.offer(notice(3, 2, b"two")));
        let started = prefetch.take(3);
        let mut hashes: Vec<Hash> = started.keys().copied().collect();
        hashes.sort();
        let mut want = vec![Hash::of(b"one"), Hash::of(b"two")];
        want.sort();
        assert_eq!(hashes, want);
        for (_, task) in started {
            assert!(task.await.unwrap().unwrap().is_none());
        }
        let fetched = fake.fetched.lock().unwrap().clone();
        assert_eq!(fetched.len(), 2, "{fetched:?}");
        assert!(
            fetched
                .iter()
                .any(|(h, size, author)| *h == Hash::of(b"one")
                    && *size == 3
                    && *author == node(1).0.to_peer_id().ok()),
            "the author is asked first: {fetched:?}"
        );
        // Taken: later notices of the round start nothing.
        assert!(!prefetch.offer(notice(3, 2, b"late")));
    }

    #[tokio::test]
    async fn notices_before_the_plan_wait_for_it_and_other_rounds_are_cancelled() {
        let fake = Arc::new(Fake {
            hold: true,
            ..Fake::default()
        });
        let prefetch = Prefetch::new(true);
        // The notice outran the plan of its round.
        assert!(!prefetch.offer(notice(5, 1, b"early")));
        prefetch.arm(5, authors(&[1]), fake.clone());
        assert_eq!(fake.fetched.lock().unwrap().len(), 1);
        // The node resynced and took round 6's manifest instead: round 5's
        // fetch, still running, is stopped and its partial forgotten.
        assert!(prefetch.take(6).is_empty());
        discarded_soon(&fake).await;
        assert_eq!(
            *fake.discarded.lock().unwrap(),
            vec![(Hash::of(b"early"), false)],
            "a fetch stopped half way leaves only a partial"
        );
    }

    /// Fetches that finished before the manifest rejected their updates
    /// are deleted whole, unless the store had the blob before (our own
    /// update's bytes, committed by another node too).
    #[tokio::test]
    async fn finished_fetches_of_unapplied_updates_are_deleted_unless_already_held() {
        for (already_had, deleted) in [(false, true), (true, false)] {
            let fake = Arc::new(Fake {
                finish: Some(already_had),
                ..Fake::default()
            });
            let prefetch = Prefetch::new(true);
            prefetch.arm(2, authors(&[1]), fake.clone());
            assert!(prefetch.offer(notice(2, 1, b"rejected")));
            let tasks = prefetch.take(2);
            assert_eq!(tasks.len(), 1);
            // Finished before the manifest came.
            for task in tasks.values() {
                while !task.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let source: Arc<dyn Source> = fake.clone();
            cancel(tasks, &source);
            discarded_soon(&fake).await;
            assert_eq!(
                *fake.discarded.lock().unwrap(),
                vec![(Hash::of(b"rejected"), deleted)],
                "already had: {already_had}"
            );
        }
    }

    #[tokio::test]
    async fn switched_off_it_fetches_nothing() {
        let fake = Arc::new(Fake::default());
        let prefetch = Prefetch::new(false);
        prefetch.arm(0, authors(&[1]), fake.clone());
        assert!(!prefetch.offer(notice(0, 1, b"x")));
        assert!(prefetch.take(0).is_empty());
        assert!(fake.fetched.lock().unwrap().is_empty());
    }
}
