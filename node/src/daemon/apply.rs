//! Applying a manifest: fetch its accepted updates, aggregate them on a
//! blocking thread, check θ against the manifest's hash; keep the receipt,
//! watch for forks, prune what the retention window lets go.

use super::*;
use futures::StreamExt;

/// Accepted updates a node downloads at once when it applies a manifest.
pub(super) const UPDATES_FETCHED_AT_ONCE: usize = 4;

impl Node {
    /// Fetches the updates `manifest` accepted (each checked against its
    /// hash and size), applies them with `apply_round` on a blocking thread,
    /// and checks the result against the manifest's `next_params_hash`.
    /// The optimizer changes only when the hash matches; `theta` is left
    /// unusable by anything but a match (the caller resyncs), so that θ is
    /// never copied. `None` means we were stopped.
    pub(super) async fn apply_manifest(
        &mut self,
        rule: AggregationRule,
        theta: &mut Vec<f32>,
        optimizer: &mut OuterOptimizer,
        manifest: &Manifest,
    ) -> Result<Option<Applied>, NodeError> {
        let round = manifest.round;
        // The updates are fetched a few at a time: one after another, each
        // paid its provider lookup and round trips in turn (under a 100 ms
        // link, 3.8-4.0 s from the manifest to the round applied against
        // 2.2-2.3 s; docs/architecture.md, "Slow links"). This once made a
        // node drop a good provider, when a failed dial failed every chunk
        // request riding on it and each counted; the fetcher now counts
        // them as one. The first failure stops the rest.
        type Fetching<'a> = std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<Option<crate::transfer::FetchReport>, NodeError>,
                    > + Send
                    + 'a,
            >,
        >;
        let mut reports = Vec::new();
        let mut failed = None;
        // Updates fetched since the coordinator announced them
        // (`super::prefetch`) are awaited rather than fetched again; a
        // prefetch that failed is retried here like any fetch.
        let mut started = self.prefetch.take(round);
        let mut prefetched = 0u64;
        {
            let blobs = self.blobs();
            let fetches: Vec<Fetching<'_>> = manifest
                .accepted
                .iter()
                .map(|accepted| {
                    let author = accepted.node.0.to_peer_id().ok();
                    let ahead = started.remove(&accepted.update_hash);
                    prefetched += u64::from(ahead.is_some());
                    let blobs = blobs.clone();
                    Box::pin(async move {
                        if let Some(ahead) = ahead {
                            match ahead.await {
                                Ok(Ok(report)) => return Ok(report),
                                Ok(Err(e)) => tracing::debug!(
                                    update = %accepted.update_hash.short(),
                                    "fetching ahead failed ({e}); fetching again"
                                ),
                                Err(e) => tracing::debug!(
                                    update = %accepted.update_hash.short(),
                                    "fetching ahead stopped ({e}); fetching again"
                                ),
                            }
                        }
                        blobs
                            .fetch(
                                &accepted.update_hash,
                                Some(accepted.update_bytes),
                                author,
                                "update",
                            )
                            .await
                    }) as Fetching<'_>
                })
                .collect();
            // What the manifest did not accept was fetched for nothing.
            let source: Arc<dyn prefetch::Source> = Arc::new(blobs.clone());
            prefetch::cancel(started, &source);
            let mut fetching = futures::stream::iter(fetches).buffered(UPDATES_FETCHED_AT_ONCE);
            while let Some(result) = fetching.next().await {
                match result {
                    Ok(Some(report)) => reports.push(report),
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        self.summary.updates_prefetched += prefetched;
        NodeMetrics::add(&self.metrics.updates_prefetched, prefetched);
        for report in &reports {
            self.record_fetch(report, "update");
        }
        if let Some(e) = failed {
            if self.shutdown.is_cancelled() {
                return Ok(None);
            }
            return match e {
                NodeError::Fetch(FetchError::Cancelled) => Ok(None),
                NodeError::Fetch(e) => Ok(Some(Applied::Unavailable(format!(
                    "could not fetch an accepted update of round {round}: {e}"
                )))),
                other => Err(other),
            };
        }
        let mut payloads: Vec<(Vec<u8>, f32)> = Vec::with_capacity(manifest.accepted.len());
        for accepted in &manifest.accepted {
            let store = self.store.clone();
            let hash = accepted.update_hash;
            let bytes = tokio::task::spawn_blocking(move || store.read(&hash))
                .await
                .map_err(|e| NodeError::Training(e.to_string()))??;
            payloads.push((bytes, accepted.weight));
        }
        let mut next = std::mem::take(theta);
        let mut next_optimizer = optimizer.clone();
        let (next, next_optimizer, result) = tokio::task::spawn_blocking(move || {
            let updates: Vec<(&[u8], f32)> =
                payloads.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
            let result = apply_round(&mut next, &mut next_optimizer, &rule, &updates)
                .map(|_| Hash::of_f32s(&next));
            (next, next_optimizer, result)
        })
        .await
        .map_err(|e| NodeError::Training(e.to_string()))?;
        *theta = next;
        let next_hash = match result {
            Ok(hash) => hash,
            Err(e) => {
                return Ok(Some(Applied::Unavailable(format!(
                    "the accepted updates of round {round} do not aggregate: {e}"
                ))));
            }
        };
        if next_hash != manifest.next_params_hash {
            return Ok(Some(Applied::Mismatch {
                hash: next_hash,
                reason: format!(
                    "after round {round} our params hash to {}, the manifest says {}",
                    next_hash.short(),
                    manifest.next_params_hash.short()
                ),
            }));
        }
        *optimizer = next_optimizer;
        Ok(Some(Applied::Matched(next_hash)))
    }

    /// Keeps the manifest we applied for a round (the last
    /// [`APPLIED_MANIFESTS_KEPT`] rounds) to compare any other against.
    pub(super) fn remember_applied(&mut self, signed: &Signed<Manifest>, manifest: &Manifest) {
        self.applied.insert(manifest.round, signed.clone());
        while self.applied.len() > APPLIED_MANIFESTS_KEPT {
            self.applied.pop_first();
        }
    }

    /// Two different manifests, both signed by the coordinator, for one
    /// round are proof that it forked the run's history. The node saves both
    /// under `forks/` and stops: it will not follow a coordinator that
    /// equivocates (docs/protocol.md, "The chain").
    pub(super) fn check_fork(
        &self,
        signed: &Signed<Manifest>,
        manifest: &Manifest,
    ) -> Result<(), NodeError> {
        let Some(ours) = self.applied.get(&manifest.round) else {
            return Ok(());
        };
        if ours.body_hash() == signed.body_hash() {
            return Ok(());
        }
        let dir = self.config.data_dir.join("forks");
        let mut saved = Vec::new();
        for evidence in [ours, signed] {
            let path = dir.join(format!(
                "round-{:06}-{}.manifest",
                manifest.round,
                evidence.body_hash().short()
            ));
            let written = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| evidence.to_bytes().map_err(|e| e.to_string()))
                .and_then(|bytes| write_atomic(&path, &bytes).map_err(|e| e.to_string()));
            match written {
                Ok(()) => saved.push(path.display().to_string()),
                Err(e) => tracing::error!("could not save fork evidence {}: {e}", path.display()),
            }
        }
        Err(NodeError::Chain(format!(
            "the coordinator signed two different manifests for round {}: {} (which this node \
             applied) and {}. That is a fork of the run's history; the node will not follow it. \
             Evidence: {}",
            manifest.round,
            ours.body_hash().short(),
            signed.body_hash().short(),
            saved.join(", ")
        )))
    }

    /// Records the updates `manifest` accepted under its round and deletes
    /// (and stops announcing) those of rounds older than the retention
    /// window (`crate::retention`). Failures only cost disk, so they are logged.
    pub(super) async fn prune(&mut self, manifest: &Manifest, current_round: u64) {
        // Rejected updates too: ours, if it was, would otherwise stay forever.
        let hashes = manifest
            .accepted
            .iter()
            .map(|a| a.update_hash)
            .chain(manifest.rejected.iter().filter_map(|r| r.update_hash));
        self.retention.record(manifest.round, hashes);
        let expired = self.retention.expire(current_round);
        for hash in &expired {
            let store = self.store.clone();
            let hash = *hash;
            let removed = tokio::task::spawn_blocking(move || store.remove(&hash)).await;
            if let Ok(Err(e)) = removed {
                tracing::debug!("pruning update {}: {e}", hash.short());
            }
            let _ = self.client.stop_providing(hash).await;
        }
        if !expired.is_empty() {
            tracing::debug!(
                round = current_round,
                "pruned {} old updates",
                expired.len()
            );
        }
        let retention = self.retention.clone();
        match off_runtime(move || retention.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not save the retention index: {e}"),
            Err(e) => tracing::warn!("could not save the retention index: {e}"),
        }
    }

    /// Keeps a signed manifest that names us: proof of our contribution.
    pub(super) async fn keep_receipt(&self, signed: &Signed<Manifest>, manifest: &Manifest) {
        let me = self.key.node_id();
        let names_us = manifest.accepted.iter().any(|a| a.node == me)
            || manifest.rejected.iter().any(|r| r.node == me)
            || manifest.missing.contains(&me);
        if !names_us {
            return;
        }
        let path = self
            .receipts
            .join(format!("round-{:06}.manifest", manifest.round));
        let written = match signed.to_bytes() {
            Ok(bytes) => {
                off_runtime(move || write_atomic(&path, &bytes).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            }
            Err(e) => Err(format!("could not encode it: {e}")),
        };
        if let Err(e) = written {
            self.warn(format!(
                "could not keep the receipt of round {}: {e}",
                manifest.round
            ));
        }
    }
}
