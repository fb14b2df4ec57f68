//! Getting blobs (shards, updates, checkpoints): peers first, the
//! coordinator as the provider of last resort, every blob checked by its
//! hash; and meeting the peers a welcome or plan names.

use super::*;

/// What fetching a blob needs, apart from the node: cheap to clone, so
/// that fetches can run on tasks of their own (a manifest's updates at
/// once, and updates fetched before their manifest: `super::prefetch`).
#[derive(Clone)]
pub(super) struct Blobs {
    client: Client,
    fetcher: Fetcher,
    store: Arc<BlobStore>,
    coordinator: Option<PeerId>,
    shutdown: CancellationToken,
    events: Option<mpsc::Sender<NodeEvent>>,
}

impl Node {
    /// The node's fetching, as a handle tasks can own.
    pub(super) fn blobs(&self) -> Blobs {
        Blobs {
            client: self.client.clone(),
            fetcher: self.fetcher.clone(),
            store: self.store.clone(),
            coordinator: self.coordinator,
            shutdown: self.shutdown.clone(),
            events: self.events.clone(),
        }
    }

    /// Fetches blob `hash` into the store unless it is there, then announces
    /// it on the DHT: every node provides every blob it holds. Peers are
    /// asked first (`author`, then the DHT's providers); the coordinator is
    /// the provider of last resort, asked only when no peer has the blob or
    /// the peers failed, and only for the chunks still missing.
    pub(super) async fn fetch(
        &mut self,
        hash: &Hash,
        size: Option<u64>,
        author: Option<PeerId>,
        what: &str,
    ) -> Result<(), NodeError> {
        if let Some(report) = self.blobs().fetch(hash, size, author, what).await? {
            self.record_fetch(&report, what);
        }
        Ok(())
    }

    /// Counts a finished fetch in the node's summary and metrics, and warns
    /// about the peers that served bad data.
    pub(super) fn record_fetch(&mut self, report: &crate::transfer::FetchReport, what: &str) {
        self.summary.bytes_downloaded += report.bytes_fetched;
        NodeMetrics::add(&self.metrics.blob_bytes_fetched, report.bytes_fetched);
        if let Some(coordinator) = self.coordinator {
            let from_coordinator = report.bytes_from(&coordinator);
            self.summary.bytes_from_coordinator += from_coordinator;
            NodeMetrics::add(
                &self.metrics.blob_bytes_fetched_from_coordinator,
                from_coordinator,
            );
        }
        for (peer, reason) in &report.bad_providers {
            self.warn(format!(
                "peer {peer} served bad data for {what} {}: {reason}",
                report.hash.short()
            ));
        }
    }

    /// Puts a welcome's or plan's bootstrap peers in the swarm and the DHT,
    /// so blobs are found on other nodes, not only on the coordinator.
    pub(super) async fn meet(
        &mut self,
        peers: &[barnraise_protocol::messages::BootstrapPeer],
    ) -> Result<(), NodeError> {
        // The coordinator is reached the way we dialled it; its other
        // listen addresses may be on networks we cannot route to.
        let coordinator = self.coordinator_peer.get().map(|p| p.to_string());
        let others: Vec<_> = peers
            .iter()
            .filter(|p| Some(&p.peer) != coordinator.as_ref())
            .cloned()
            .collect();
        let added = self.client.add_bootstrap(&others).await?;
        self.summary.bootstrap_addrs = self.summary.bootstrap_addrs.max(added);
        tracing::debug!(peers = peers.len(), addrs = added, "bootstrap peers added");
        Ok(())
    }
}

impl Blobs {
    pub(super) fn store(&self) -> Arc<BlobStore> {
        self.store.clone()
    }

    /// Providers of a blob other than the coordinator: the peer that made it
    /// (for updates) and whoever announced it on the DHT within
    /// [`lookup_patience`].
    pub(super) async fn peer_providers(
        &self,
        hash: &Hash,
        size: Option<u64>,
        author: Option<PeerId>,
    ) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = author.into_iter().collect();
        let patience = lookup_patience(!peers.is_empty(), size);
        peers.extend(self.dht_providers(hash, patience).await);
        self.others(peers)
    }

    /// Whoever announced `hash` on the DHT within `patience`.
    async fn dht_providers(&self, hash: &Hash, patience: Duration) -> Vec<PeerId> {
        match tokio::time::timeout(patience, self.client.get_providers(*hash)).await {
            Ok(Ok(found)) => found.into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// `peers` less the coordinator and this node, each once.
    fn others(&self, mut peers: Vec<PeerId>) -> Vec<PeerId> {
        peers.retain(|p| self.is_other(p));
        peers.sort();
        peers.dedup();
        peers
    }

    /// Whether `peer` is neither the coordinator nor this node.
    fn is_other(&self, peer: &PeerId) -> bool {
        Some(*peer) != self.coordinator && *peer != self.client.local_peer_id()
    }

    /// Fetches from the peers: an update from its author at once, with the
    /// DHT's providers joining when the lookup finds them (it takes 0.4-0.6 s
    /// over 100 ms hops, which the last update of a round used to wait out
    /// before its first byte); anything else from the providers a lookup
    /// finds within [`lookup_patience`]. `None` when there is no peer to ask.
    async fn fetch_from_peers(
        &self,
        fetcher: &Fetcher,
        hash: &Hash,
        size: Option<u64>,
        author: Option<PeerId>,
    ) -> Option<Result<crate::transfer::FetchReport, FetchError>> {
        let author = author.filter(|a| self.is_other(a));
        if let (Some(author), Some(_)) = (author, size) {
            let (found_tx, found) = tokio::sync::oneshot::channel();
            let blobs = self.clone();
            let hash = *hash;
            // As long as before (1 s): a fetch whose author failed waits
            // for the lookup before it turns to the coordinator.
            let patience = lookup_patience(true, size);
            // Stopped however the fetch ends (finished, failed, or dropped).
            let _lookup = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                let found = blobs.dht_providers(&hash, patience).await;
                let _ = found_tx.send(blobs.others(found));
            }));
            return Some(
                fetcher
                    .fetch_joined(hash, size, &[author], Some(found), &self.shutdown)
                    .await,
            );
        }
        let peers = self.peer_providers(hash, size, author).await;
        if peers.is_empty() {
            return None;
        }
        Some(fetcher.fetch(*hash, size, &peers, &self.shutdown).await)
    }

    /// [`Node::fetch`] without its bookkeeping; `None` when the store
    /// already had the blob. The caller passes the report to
    /// [`Node::record_fetch`].
    pub(super) async fn fetch(
        &self,
        hash: &Hash,
        size: Option<u64>,
        author: Option<PeerId>,
        what: &str,
    ) -> Result<Option<crate::transfer::FetchReport>, NodeError> {
        if self.store.contains(hash) {
            return Ok(None);
        }
        if let Some(events) = &self.events {
            let _ = events.try_send(NodeEvent::Downloading {
                what: what.to_string(),
                done: 0,
                total: size.unwrap_or(0),
            });
        }
        let fetcher = match &self.events {
            Some(events) => {
                let events = events.clone();
                let what = what.to_string();
                self.fetcher
                    .clone()
                    .with_progress(Arc::new(move |done, total| {
                        let _ = events.try_send(NodeEvent::Downloading {
                            what: what.clone(),
                            done,
                            total,
                        });
                    }))
            }
            None => self.fetcher.clone(),
        };
        let coordinator: Vec<PeerId> = self.coordinator.into_iter().collect();
        let report = match self.fetch_from_peers(&fetcher, hash, size, author).await {
            None => {
                fetcher
                    .fetch(*hash, size, &coordinator, &self.shutdown)
                    .await?
            }
            Some(Ok(report)) => report,
            Some(Err(e @ (FetchError::Cancelled | FetchError::Store { .. }))) => {
                return Err(e.into());
            }
            Some(Err(e)) if coordinator.is_empty() => return Err(e.into()),
            Some(Err(e)) => {
                tracing::info!(blob = %hash.short(), "peers could not serve {what} ({e}); asking the coordinator");
                fetcher
                    .fetch(*hash, size, &coordinator, &self.shutdown)
                    .await?
            }
        };
        let _ = self.client.start_providing(*hash).await;
        Ok(Some(report))
    }
}

/// How long a fetch looks to the DHT for providers. With an author to ask,
/// the DHT only adds alternatives (an update's fetch starts on its author
/// and takes in what the lookup finds meanwhile): a lookup held up by an
/// unresponsive peer must not hold up a download whose author failed (1 s).
/// A blob of one chunk or less (a shard of `up`'s data, 130 KB) moves
/// faster from the coordinator than a lookup takes over a slow link (about
/// 0.4-0.6 s at 100 ms a hop, docs/architecture.md "Slow links"), so it
/// waits 250 ms before it asks the coordinator. Anything larger waits up to
/// 5 s for peers that spare the coordinator its bytes.
pub(super) fn lookup_patience(has_author: bool, size: Option<u64>) -> Duration {
    if has_author {
        Duration::from_secs(1)
    } else if size.is_some_and(|bytes| bytes <= barnraise_protocol::limits::BLOB_CHUNK_BYTES as u64)
    {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(5)
    }
}

#[cfg(test)]
mod tests {
    use super::lookup_patience;
    use barnraise_protocol::limits::BLOB_CHUNK_BYTES;
    use std::time::Duration;

    #[test]
    fn small_blobs_wait_little_for_the_dht_and_large_ones_wait_for_peers() {
        let chunk = BLOB_CHUNK_BYTES as u64;
        assert_eq!(
            lookup_patience(false, Some(130_000)),
            Duration::from_millis(250)
        );
        assert_eq!(
            lookup_patience(false, Some(chunk)),
            Duration::from_millis(250)
        );
        assert_eq!(
            lookup_patience(false, Some(chunk + 1)),
            Duration::from_secs(5)
        );
        // Size unknown: it may be large.
        assert_eq!(lookup_patience(false, None), Duration::from_secs(5));
        assert_eq!(lookup_patience(true, Some(130_000)), Duration::from_secs(1));
    }
}
