//! Fetching a blob by hash from whoever has it.
//!
//! ```text
//! fetcher                                   providers (any peers)
//!  | -- Have{hash} to every candidate ------------->|   only when the size is not known
//!  |<-- Have{size} / Have{None} --------------------|   size must match what we expect
//!  | -- Chunk{hash, offset, len} (bounded, spread) >|   chunks go to the least busy provider
//!  |<-- Chunk{data} / NotFound ---------------------|   exact length checked, written, journaled
//!  |   ... all chunks in: hash the whole blob ...
//! ```
//!
//! When the caller knows the size (a manifest, a commit notice or the
//! dataset names it) and there is one candidate (an update's author, the
//! coordinator), there is nothing for `Have` to settle: the chunks are
//! asked for at once, which saves a round trip per blob (200 ms on a 100 ms
//! link, paid on every update and shard of a round). A candidate without the
//! blob answers its first chunk `NotFound` and is dropped from the transfer.
//! `Have` is still asked, beside the first chunks rather than before them: a
//! frozen candidate (a stopped process, a laptop asleep) that neither
//! answers it within 10 s nor serves a chunk is dropped, and its chunks go
//! to whoever else there is, where they would otherwise wait out the 60 s
//! chunk timeout. With several candidates `Have` goes first as before: it
//! keeps a frozen peer out of the transfer after a 0.5 s grace, where chunks
//! handed to it would wait for a hedge (2 s at least). Providers found later
//! (a DHT lookup still running when the fetch starts) are asked `Have` and
//! join the transfer under way when they confirm the size.
//!
//! Blobs are named by the SHA-256 of the whole, so a single chunk cannot be
//! checked on arrival; only its length can. When the assembled bytes do not
//! hash to the name, the fetcher finds the liar by elimination: for each
//! provider that contributed chunks (most chunks first) it re-fetches that
//! provider's chunks from the *other* providers and hashes again. The
//! provider whose chunks, once replaced, make the blob verify is the one that
//! lied: it is dropped and penalized. Wrong-length chunks, oversized claims
//! and protocol violations are caught at once and also drop the provider.
//! Timeouts and refusals are retried with backoff, and a provider that keeps
//! failing is dropped (without a penalty: it may just be slow).
//!
//! A provider that stalls does not hold the blob hostage: once every chunk
//! has been handed out, a chunk outstanding for longer than four times the
//! median chunk time (at least [`HEDGE_AFTER_MIN`]) is also asked of another
//! provider. The first answer is written and the other discarded; a provider
//! that lost a chunk this way is reported as stalled, penalized and dropped
//! from the transfer.
//!
//! Downloads write into the store's partial file and journal, so a restarted
//! node re-fetches only the chunks it did not finish. Nothing reaches the
//! blob's final name unless it hashed to that name.

use crate::limiter::RateLimiter;
use crate::network::{Client, NetworkError};
use crate::store::{BlobStore, Partial, StoreError, chunk_range};
use barnraise_protocol::Hash;
use barnraise_protocol::limits::MAX_BLOB_BYTES;
use barnraise_protocol::messages::{BlobRequest, BlobResponse};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Chunk requests in flight at once, over all providers.
pub const MAX_IN_FLIGHT: usize = 8;
/// Chunk requests in flight at once to one provider.
pub const MAX_IN_FLIGHT_PER_PROVIDER: usize = 4;
/// Consecutive failures after which a provider is dropped.
pub const MAX_PROVIDER_FAILURES: u32 = 4;
/// How long to wait for a `Have` answer.
pub const HAVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Once a provider has confirmed a blob of the expected size, how much
/// longer the others' answers are waited for: a frozen peer (a laptop gone
/// to sleep, a stopped process) must not hold every download for
/// [`HAVE_TIMEOUT`].
pub const HAVE_GRACE: Duration = Duration::from_millis(500);
/// How long to wait for one chunk.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);
/// The least time a chunk is outstanding before it is also asked of
/// another provider (once nothing else is left to hand out).
pub const HEDGE_AFTER_MIN: Duration = Duration::from_secs(2);
/// Chunk times remembered for the median that sets the hedge threshold.
const LATENCY_SAMPLES: usize = 32;

/// Why a blob could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no peer has blob {hash} (asked {asked})")]
    NoProviders { hash: Hash, asked: usize },
    #[error("blob {hash}: every provider failed or was dropped; {remaining} chunks still missing")]
    ProvidersExhausted { hash: Hash, remaining: usize },
    #[error("blob {hash}: providers claim {claimed} bytes, but {expected} bytes were expected")]
    WrongSize {
        hash: Hash,
        claimed: u64,
        expected: u64,
    },
    #[error("blob {hash}: providers' bytes never hashed to its name; download discarded")]
    Unverifiable { hash: Hash },
    #[error("blob {hash}: {source}")]
    Store { hash: Hash, source: StoreError },
    #[error("download cancelled")]
    Cancelled,
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    pub hash: Hash,
    pub size: u64,
    /// The blob was already in the store; nothing was fetched.
    pub already_had: bool,
    /// Chunks finished in an earlier run and kept.
    pub chunks_resumed: u64,
    /// Chunk downloads in this run (including re-fetches while hunting a liar).
    pub chunks_fetched: u64,
    pub bytes_fetched: u64,
    /// Providers that served at least one chunk.
    pub providers_used: Vec<PeerId>,
    /// Bytes each provider served in this run (chunks later replaced while
    /// hunting a liar included).
    pub bytes_by_provider: BTreeMap<PeerId, u64>,
    /// Providers dropped for misbehaving, with the reason.
    pub bad_providers: Vec<(PeerId, String)>,
    /// Providers that sat on a chunk until another provider delivered it,
    /// with what happened (penalized and dropped from this transfer).
    pub stalled_providers: Vec<(PeerId, String)>,
}

impl FetchReport {
    /// The report of a fetch of `hash` that has done nothing yet.
    pub fn nothing_yet(hash: Hash) -> FetchReport {
        FetchReport {
            hash,
            size: 0,
            already_had: false,
            chunks_resumed: 0,
            chunks_fetched: 0,
            bytes_fetched: 0,
            providers_used: Vec::new(),
            bytes_by_provider: BTreeMap::new(),
            bad_providers: Vec::new(),
            stalled_providers: Vec::new(),
        }
    }

    /// Bytes `peer` served in this fetch.
    pub fn bytes_from(&self, peer: &PeerId) -> u64 {
        self.bytes_by_provider.get(peer).copied().unwrap_or(0)
    }
}

/// Progress callbacks (download bars).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Fetches blobs into a store.
#[derive(Clone)]
pub struct Fetcher {
    client: Client,
    store: Arc<BlobStore>,
    download: RateLimiter,
    max_in_flight: usize,
    per_provider: usize,
    progress: Option<ProgressFn>,
    hedge_after_min: Duration,
    have_timeout: Duration,
}

#[derive(Debug)]
struct Provider {
    peer: PeerId,
    in_flight: usize,
    failures: u32,
    /// When the last failure that counted came in: requests already in
    /// flight then fail with it (one dropped connection fails all of
    /// them) and are not counted again.
    failed_at: Option<Instant>,
    not_before: Instant,
    active: bool,
    /// It answered `NotFound`: it does not have the blob.
    missing: bool,
    /// It confirmed the blob's size or served a chunk of it. One that
    /// joined without `Have` is asked it beside its first chunks, and
    /// dropped if the answer is no or never comes.
    confirmed: bool,
}

impl Provider {
    fn new(peer: PeerId) -> Provider {
        Provider {
            peer,
            in_flight: 0,
            failures: 0,
            failed_at: None,
            not_before: Instant::now(),
            active: true,
            missing: false,
            confirmed: false,
        }
    }
}

/// A provider's answer to `Have`, as far as a transfer cares.
enum HaveAnswer {
    Size(u64),
    Missing,
    /// An error, or no answer within [`HAVE_TIMEOUT`].
    Silent,
}

/// What woke a transfer's loop.
enum Next {
    /// A chunk request finished: the provider's index, the chunk, what
    /// became of it and when it was sent.
    Done((usize, u64, Outcome, Instant)),
    /// Providers found after the transfer started.
    Joined(Vec<PeerId>),
    /// A provider's answer to `Have`.
    Confirmed(PeerId, HaveAnswer),
    /// Time to hedge, or to ask a provider that was backing off.
    Wake,
}

/// What became of one chunk request.
enum Outcome {
    Written(u64),
    WrongLength {
        got: usize,
        expected: u64,
    },
    NotFound,
    Refused(String),
    Unexpected,
    Failed(String),
    Store(StoreError),
    /// Another request for the same chunk was answered first.
    Lost,
}

impl Fetcher {
    pub fn new(client: Client, store: Arc<BlobStore>, download: RateLimiter) -> Fetcher {
        Fetcher {
            client,
            store,
            download,
            max_in_flight: MAX_IN_FLIGHT,
            per_provider: MAX_IN_FLIGHT_PER_PROVIDER,
            progress: None,
            hedge_after_min: HEDGE_AFTER_MIN,
            have_timeout: HAVE_TIMEOUT,
        }
    }

    /// Overrides [`HAVE_TIMEOUT`], how long a provider may take to answer
    /// `Have` (or, asked beside its first chunks, to answer either).
    pub fn with_have_timeout(mut self, timeout: Duration) -> Fetcher {
        self.have_timeout = timeout;
        self
    }

    /// Overrides [`HEDGE_AFTER_MIN`], the least time before a chunk is also
    /// asked of a second provider.
    pub fn with_hedge_after(mut self, min: Duration) -> Fetcher {
        self.hedge_after_min = min;
        self
    }

    /// Overrides the concurrency bounds (at least 1 each).
    pub fn with_concurrency(mut self, total: usize, per_provider: usize) -> Fetcher {
        self.max_in_flight = total.max(1);
        self.per_provider = per_provider.max(1);
        self
    }

    /// Calls `progress(done_bytes, total_bytes)` as chunks land.
    pub fn with_progress(mut self, progress: ProgressFn) -> Fetcher {
        self.progress = Some(progress);
        self
    }

    pub fn store(&self) -> &Arc<BlobStore> {
        &self.store
    }

    /// Fetches blob `hash` from `candidates` (any that have it) unless the
    /// store already has it. `expected_size`, when the caller knows it (a
    /// manifest, a dataset entry), pins the size: providers claiming or
    /// serving another size are dropped, and a lone candidate is asked for
    /// chunks at once (see the module docs).
    pub async fn fetch(
        &self,
        hash: Hash,
        expected_size: Option<u64>,
        candidates: &[PeerId],
        cancel: &CancellationToken,
    ) -> Result<FetchReport, FetchError> {
        self.fetch_joined(hash, expected_size, candidates, None, cancel)
            .await
    }

    /// [`Fetcher::fetch`], with the providers `late` names joining when
    /// they come (a DHT lookup started with the fetch). With the size known
    /// the transfer starts with `candidates` and takes the late ones in as
    /// they confirm the size; without it, `late` is awaited first, since
    /// `Have` must settle the size among everyone.
    pub async fn fetch_joined(
        &self,
        hash: Hash,
        expected_size: Option<u64>,
        candidates: &[PeerId],
        late: Option<tokio::sync::oneshot::Receiver<Vec<PeerId>>>,
        cancel: &CancellationToken,
    ) -> Result<FetchReport, FetchError> {
        let mut report = FetchReport::nothing_yet(hash);
        if let Some(size) = self.store.size(&hash) {
            report.size = size;
            report.already_had = true;
            return Ok(report);
        }
        let me = self.client.local_peer_id();
        let distinct = |mut peers: Vec<PeerId>| {
            peers.sort();
            peers.dedup();
            peers.retain(|p| *p != me);
            peers
        };
        let unique = distinct(candidates.to_vec());
        // Whether the providers have confirmed the size (with `Have`, first).
        let (size, peers, late, confirmed) = match expected_size {
            Some(size) if size <= MAX_BLOB_BYTES && unique.len() <= 1 => {
                (size, unique, late, false)
            }
            _ => {
                let mut everyone = unique;
                if let Some(late) = late {
                    let found = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                        found = late => found.unwrap_or_default(),
                    };
                    everyone = distinct([everyone, found].concat());
                }
                let (size, peers) = self
                    .find_size(hash, expected_size, &everyone, &mut report, cancel)
                    .await?;
                (size, peers, None, true)
            }
        };
        if peers.is_empty() && late.is_none() {
            return Err(FetchError::NoProviders { hash, asked: 0 });
        }
        report.size = size;
        if size == 0 {
            // Nothing to fetch: the empty blob either is the one named, or a lie.
            if hash != Hash::of(&[]) {
                return Err(FetchError::Unverifiable { hash });
            }
            self.store
                .put(&[])
                .map_err(|source| FetchError::Store { hash, source })?;
            return Ok(report);
        }
        let store = Arc::clone(&self.store);
        let partial = tokio::task::spawn_blocking(move || store.partial(hash, size))
            .await
            .map_err(|e| FetchError::Store {
                hash,
                source: join_error(e),
            })?
            .map_err(|source| FetchError::Store { hash, source })?;
        let partial = Arc::new(partial);
        report.chunks_resumed = partial.done_count();
        if report.chunks_resumed > 0 {
            tracing::info!(blob = %hash.short(), "resuming download: {} of {} chunks already here", report.chunks_resumed, partial.chunk_count());
        }
        let mut providers: Vec<Provider> = peers
            .into_iter()
            .map(|peer| Provider {
                confirmed,
                ..Provider::new(peer)
            })
            .collect();
        // Who served each chunk; `None` for chunks resumed from disk.
        let mut served_by: BTreeMap<u64, Option<usize>> = BTreeMap::new();
        let missing = partial.missing();
        let fetched = self
            .fetch_chunks(
                &partial,
                missing,
                &mut providers,
                &mut served_by,
                None,
                late,
                &mut report,
                cancel,
            )
            .await;
        if let Err(e) = fetched {
            // Nobody had it: no partial download is left behind for a
            // blob none of its bytes arrived for.
            let nobody_has_it = !providers.is_empty() && providers.iter().all(|p| p.missing);
            if partial.done_count() == 0 && !matches!(e, FetchError::Cancelled) {
                self.store.discard_partial(&hash);
            }
            return Err(match e {
                FetchError::ProvidersExhausted { .. } if nobody_has_it => FetchError::NoProviders {
                    hash,
                    asked: providers.len(),
                },
                e => e,
            });
        }
        match self.finish(&partial).await {
            Ok(()) => {
                self.note_used(&providers, &served_by, &mut report);
                return Ok(report);
            }
            Err(FetchError::Store {
                source: StoreError::Mismatch { actual, .. },
                ..
            }) => {
                tracing::warn!(blob = %hash.short(), "assembled bytes hash to {}; looking for the provider that lied", actual.short());
            }
            Err(e) => return Err(e),
        }
        // Suspects: every contributor, the one with the most chunks first.
        let mut counts: BTreeMap<Option<usize>, usize> = BTreeMap::new();
        for index in 0..partial.chunk_count() {
            *counts
                .entry(served_by.get(&index).copied().flatten())
                .or_default() += 1;
        }
        let mut suspects: Vec<(Option<usize>, usize)> = counts.into_iter().collect();
        suspects.sort_by_key(|s| std::cmp::Reverse(s.1));
        for (suspect, _) in suspects {
            let others = providers
                .iter()
                .enumerate()
                .any(|(i, p)| p.active && Some(i) != suspect);
            if !others {
                continue;
            }
            let chunks: Vec<u64> = (0..partial.chunk_count())
                .filter(|i| served_by.get(i).copied().flatten() == suspect)
                .collect();
            self.fetch_chunks(
                &partial,
                chunks,
                &mut providers,
                &mut served_by,
                suspect,
                None,
                &mut report,
                cancel,
            )
            .await?;
            match self.finish(&partial).await {
                Ok(()) => {
                    if let Some(index) = suspect {
                        self.drop_bad(
                            &mut providers,
                            index,
                            "served bytes that do not hash to the blob",
                            &mut report,
                        )
                        .await;
                    }
                    self.note_used(&providers, &served_by, &mut report);
                    return Ok(report);
                }
                Err(FetchError::Store {
                    source: StoreError::Mismatch { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        self.store.discard_partial(&hash);
        Err(FetchError::Unverifiable { hash })
    }

    fn note_used(
        &self,
        providers: &[Provider],
        served_by: &BTreeMap<u64, Option<usize>>,
        report: &mut FetchReport,
    ) {
        let mut used: Vec<PeerId> = served_by
            .values()
            .flatten()
            .filter_map(|i| providers.get(*i))
            .map(|p| p.peer)
            .collect();
        used.sort();
        used.dedup();
        report.providers_used = used;
    }

    async fn finish(&self, partial: &Arc<Partial>) -> Result<(), FetchError> {
        let hash = partial.hash();
        let store = Arc::clone(&self.store);
        let partial = Arc::clone(partial);
        tokio::task::spawn_blocking(move || partial.finish(&store))
            .await
            .map_err(|e| FetchError::Store {
                hash,
                source: join_error(e),
            })?
            .map_err(|source| FetchError::Store { hash, source })
    }

    /// Asks every candidate whether it has the blob and settles its size.
    async fn find_size(
        &self,
        hash: Hash,
        expected: Option<u64>,
        candidates: &[PeerId],
        report: &mut FetchReport,
        cancel: &CancellationToken,
    ) -> Result<(u64, Vec<PeerId>), FetchError> {
        let mut asks: FuturesUnordered<_> = candidates
            .iter()
            .map(|&peer| {
                let client = self.client.clone();
                let have_timeout = self.have_timeout;
                async move {
                    let answer = tokio::time::timeout(
                        have_timeout,
                        client.blob_request(peer, BlobRequest::Have { hash }),
                    )
                    .await;
                    (peer, answer)
                }
            })
            .collect();
        let mut claims: Vec<(PeerId, u64)> = Vec::new();
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let graced = async {
                match grace.as_mut() {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                next = asks.next() => next,
                _ = graced => break,
            };
            let Some((peer, answer)) = next else { break };
            match answer {
                Ok(Ok(BlobResponse::Have { size: Some(size) })) => claims.push((peer, size)),
                Ok(Ok(BlobResponse::Have { size: None })) | Ok(Ok(BlobResponse::NotFound)) => {}
                Ok(Ok(other)) => tracing::debug!(%peer, "odd answer to Have: {other:?}"),
                Ok(Err(e)) => tracing::debug!(%peer, "asking for blob {}: {e}", hash.short()),
                Err(_) => tracing::debug!(%peer, "no answer about blob {} in time", hash.short()),
            }
            // With the size known, one confirmation is enough to start; the
            // slower answers get a short grace, not the full timeout.
            if grace.is_none()
                && let Some(size) = expected
                && claims.iter().any(|(_, claimed)| *claimed == size)
            {
                grace = Some(Box::pin(tokio::time::sleep(HAVE_GRACE)));
            }
        }
        if claims.is_empty() {
            return Err(FetchError::NoProviders {
                hash,
                asked: candidates.len(),
            });
        }
        // With a known size, anyone claiming another is wrong; without one,
        // go with the size most providers claim, and never one over the cap.
        let size = match expected {
            Some(size) => size,
            None => {
                let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
                for (_, size) in &claims {
                    *votes.entry(*size).or_default() += 1;
                }
                votes
                    .into_iter()
                    .max_by_key(|(size, n)| (*n, std::cmp::Reverse(*size)))
                    .map(|(s, _)| s)
                    .unwrap_or(0)
            }
        };
        let mut peers = Vec::new();
        for (peer, claimed) in &claims {
            if *claimed == size && size <= MAX_BLOB_BYTES {
                peers.push(*peer);
            } else {
                let reason = format!(
                    "claims blob {} is {claimed} bytes, expected {size}",
                    hash.short()
                );
                tracing::warn!(%peer, "dropping provider: {reason}");
                if expected.is_some() || *claimed > MAX_BLOB_BYTES {
                    let _ = self.client.penalize(*peer, reason.clone()).await;
                    report.bad_providers.push((*peer, reason));
                }
            }
        }
        if peers.is_empty() {
            let claimed = claims.first().map(|c| c.1).unwrap_or(0);
            return Err(FetchError::WrongSize {
                hash,
                claimed,
                expected: size,
            });
        }
        Ok((size, peers))
    }

    async fn drop_bad(
        &self,
        providers: &mut [Provider],
        index: usize,
        reason: &str,
        report: &mut FetchReport,
    ) {
        if let Some(provider) = providers.get_mut(index) {
            if !provider.active
                && report
                    .bad_providers
                    .iter()
                    .any(|(p, _)| *p == provider.peer)
            {
                return;
            }
            provider.active = false;
            tracing::warn!(peer = %provider.peer, "dropping provider: {reason}");
            let _ = self
                .client
                .penalize(provider.peer, reason.to_string())
                .await;
            report
                .bad_providers
                .push((provider.peer, reason.to_string()));
        }
    }

    /// Fetches `chunks` into `partial`, spreading them over the active
    /// providers except `exclude`, with bounded concurrency; once all are
    /// handed out, hedges chunks a provider sits on (see the module docs).
    /// The peers `late` names join the providers when they arrive.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_chunks(
        &self,
        partial: &Arc<Partial>,
        chunks: Vec<u64>,
        providers: &mut Vec<Provider>,
        served_by: &mut BTreeMap<u64, Option<usize>>,
        exclude: Option<usize>,
        mut late: Option<tokio::sync::oneshot::Receiver<Vec<PeerId>>>,
        report: &mut FetchReport,
        cancel: &CancellationToken,
    ) -> Result<(), FetchError> {
        let hash = partial.hash();
        let size = partial.size();
        let total_chunks = partial.chunk_count();
        let mut remaining: BTreeSet<u64> = chunks.iter().copied().collect();
        let mut queue: VecDeque<u64> = chunks.into();
        let mut in_flight = FuturesUnordered::new();
        // Requests of an earlier call were dropped with it (hedges' losers,
        // requests to a dropped provider): none are in flight any more.
        for provider in providers.iter_mut() {
            provider.in_flight = 0;
        }
        // The first request in flight for each chunk: who and since when.
        let mut asked: BTreeMap<u64, (usize, Instant)> = BTreeMap::new();
        // Requests in flight per chunk (2 while hedged), and hedged chunks.
        let mut requests: BTreeMap<u64, u32> = BTreeMap::new();
        let mut hedged: BTreeSet<u64> = BTreeSet::new();
        // Chunks already written in this call: a hedge's loser is discarded.
        let claimed: Arc<std::sync::Mutex<BTreeSet<u64>>> = Arc::default();
        let mut latencies: VecDeque<Duration> = VecDeque::new();
        // Providers asked `Have` beside the transfer, not yet answered:
        // those that joined without it, and those found late.
        let have_timeout = self.have_timeout;
        let have = |peer: PeerId| {
            let client = self.client.clone();
            async move {
                let answer = tokio::time::timeout(
                    have_timeout,
                    client.blob_request(peer, BlobRequest::Have { hash }),
                )
                .await;
                let answer = match answer {
                    Ok(Ok(BlobResponse::Have { size: Some(size) })) => HaveAnswer::Size(size),
                    Ok(Ok(BlobResponse::Have { size: None } | BlobResponse::NotFound)) => {
                        HaveAnswer::Missing
                    }
                    _ => HaveAnswer::Silent,
                };
                (peer, answer)
            }
        };
        let mut confirming = FuturesUnordered::new();
        for (i, provider) in providers.iter().enumerate() {
            if provider.active && !provider.confirmed && Some(i) != exclude {
                confirming.push(have(provider.peer));
            }
        }
        let request = |index: usize, peer: PeerId, chunk: u64| {
            let (offset, len) = chunk_range(size, chunk);
            let client = self.client.clone();
            let download = self.download.clone();
            let partial = Arc::clone(partial);
            let claimed = Arc::clone(&claimed);
            let sent = Instant::now();
            async move {
                let request = BlobRequest::Chunk {
                    hash,
                    offset,
                    len: len as u32,
                };
                let outcome =
                    match tokio::time::timeout(CHUNK_TIMEOUT, client.blob_request(peer, request))
                        .await
                    {
                        Err(_) => Outcome::Failed("timed out".into()),
                        Ok(Err(NetworkError::Closed)) => Outcome::Failed("network stopped".into()),
                        Ok(Err(e)) => Outcome::Failed(e.to_string()),
                        Ok(Ok(BlobResponse::Chunk { data })) if data.len() as u64 == len => {
                            let first =
                                claimed.lock().map(|mut c| c.insert(chunk)).unwrap_or(false);
                            if !first {
                                return (index, chunk, Outcome::Lost, sent);
                            }
                            download.acquire(len).await;
                            match tokio::task::spawn_blocking(move || {
                                partial.write_chunk(chunk, &data)
                            })
                            .await
                            {
                                Ok(Ok(())) => Outcome::Written(len),
                                Ok(Err(e)) => Outcome::Store(e),
                                Err(e) => Outcome::Store(join_error(e)),
                            }
                        }
                        Ok(Ok(BlobResponse::Chunk { data })) => Outcome::WrongLength {
                            got: data.len(),
                            expected: len,
                        },
                        Ok(Ok(BlobResponse::NotFound)) => Outcome::NotFound,
                        Ok(Ok(BlobResponse::Refused { reason })) => Outcome::Refused(reason),
                        Ok(Ok(BlobResponse::Have { .. })) => Outcome::Unexpected,
                    };
                (index, chunk, outcome, sent)
            }
        };
        loop {
            if remaining.is_empty() {
                // Requests still out are hedges' losers: dropped with the set.
                return Ok(());
            }
            // Nobody left to ask, and nobody on the way: requests still out
            // went to dropped providers, which are not waited for.
            let anyone = providers
                .iter()
                .enumerate()
                .any(|(i, p)| p.active && Some(i) != exclude);
            if !anyone && late.is_none() && confirming.is_empty() {
                return Err(FetchError::ProvidersExhausted {
                    hash,
                    remaining: remaining.len(),
                });
            }
            let now = Instant::now();
            let usable = |providers: &[Provider], i: usize, now: Instant| {
                let p = &providers[i];
                p.active
                    && Some(i) != exclude
                    && p.in_flight < self.per_provider
                    && p.not_before <= now
            };
            // Hand out chunks while there is room.
            // Requests to dropped providers run out on their own and do not
            // hold up the live ones.
            let live = |providers: &[Provider]| -> usize {
                providers
                    .iter()
                    .filter(|p| p.active)
                    .map(|p| p.in_flight)
                    .sum()
            };
            while live(providers) < self.max_in_flight && !queue.is_empty() {
                let pick = (0..providers.len())
                    .filter(|&i| usable(providers, i, now))
                    .min_by_key(|&i| (providers[i].in_flight, providers[i].failures));
                // Only take a chunk off the queue once someone can fetch it.
                let Some(index) = pick else { break };
                let Some(chunk) = queue.pop_front() else {
                    break;
                };
                if !remaining.contains(&chunk) {
                    continue;
                }
                providers[index].in_flight += 1;
                asked.insert(chunk, (index, now));
                *requests.entry(chunk).or_default() += 1;
                in_flight.push(request(index, providers[index].peer, chunk));
            }
            // Endgame: nothing left to hand out, so ask a second provider for
            // any chunk outstanding for too long.
            let hedge_after = self.hedge_after(&latencies);
            let mut next_hedge: Option<Instant> = None;
            if queue.is_empty() {
                for (&chunk, &(owner, since)) in &asked {
                    if hedged.contains(&chunk) || !remaining.contains(&chunk) {
                        continue;
                    }
                    let due = since + hedge_after;
                    if due > now {
                        next_hedge = Some(next_hedge.map_or(due, |n: Instant| n.min(due)));
                        continue;
                    }
                    if live(providers) >= self.max_in_flight {
                        break;
                    }
                    let pick = (0..providers.len())
                        .filter(|&i| i != owner && usable(providers, i, now))
                        .min_by_key(|&i| (providers[i].in_flight, providers[i].failures));
                    let Some(index) = pick else { continue };
                    tracing::debug!(peer = %providers[owner].peer, chunk, "chunk outstanding for {:?}; asking {} too", now - since, providers[index].peer);
                    hedged.insert(chunk);
                    providers[index].in_flight += 1;
                    *requests.entry(chunk).or_default() += 1;
                    in_flight.push(request(index, providers[index].peer, chunk));
                }
            }
            let wake = next_hedge.unwrap_or_else(|| now + CHUNK_TIMEOUT);
            // Backing-off providers wake the loop when they may be asked again.
            let retry_at = providers
                .iter()
                .enumerate()
                .filter(|(i, p)| p.active && Some(*i) != exclude && p.not_before > now)
                .map(|(_, p)| p.not_before)
                .min();
            if in_flight.is_empty()
                && confirming.is_empty()
                && late.is_none()
                && next_hedge.is_none()
                && retry_at.is_none()
            {
                // Nothing can come: no request out, nobody being confirmed
                // or looked up, nobody to retry.
                return Err(FetchError::ProvidersExhausted {
                    hash,
                    remaining: remaining.len(),
                });
            }
            let next = {
                let joining = async {
                    match late.as_mut() {
                        Some(found) => found.await.unwrap_or_default(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                    Some(done) = in_flight.next() => Next::Done(done),
                    found = joining => Next::Joined(found),
                    Some((peer, size)) = confirming.next() => Next::Confirmed(peer, size),
                    _ = tokio::time::sleep_until(wake), if next_hedge.is_some() => Next::Wake,
                    _ = tokio::time::sleep_until(retry_at.unwrap_or(now)), if retry_at.is_some() => Next::Wake,
                }
            };
            let (index, chunk, outcome, sent) = match next {
                Next::Wake => continue,
                Next::Done(done) => done,
                Next::Joined(found) => {
                    late = None;
                    let me = self.client.local_peer_id();
                    for peer in found {
                        if peer != me && providers.iter().all(|p| p.peer != peer) {
                            confirming.push(have(peer));
                        }
                    }
                    continue;
                }
                Next::Confirmed(peer, answer) => {
                    let known = providers.iter().position(|p| p.peer == peer);
                    match (answer, known) {
                        (HaveAnswer::Size(claimed), None) if claimed == size => {
                            tracing::debug!(%peer, blob = %hash.short(), "a provider joins the transfer");
                            providers.push(Provider {
                                confirmed: true,
                                ..Provider::new(peer)
                            });
                        }
                        (HaveAnswer::Size(claimed), Some(index)) if claimed == size => {
                            providers[index].confirmed = true;
                        }
                        (HaveAnswer::Size(claimed), known) => {
                            let reason = format!(
                                "claims blob {} is {claimed} bytes, expected {size}",
                                hash.short()
                            );
                            match known {
                                Some(index) => {
                                    self.drop_bad(providers, index, &reason, report).await;
                                    requeue_from(index, &asked, &remaining, &mut queue);
                                }
                                None => {
                                    tracing::warn!(%peer, "dropping provider: {reason}");
                                    let _ = self.client.penalize(peer, reason.clone()).await;
                                    report.bad_providers.push((peer, reason));
                                }
                            }
                        }
                        // Neither a yes nor a chunk: it will not serve this
                        // blob, and what it was asked for goes to the others.
                        (answer, Some(index)) if !providers[index].confirmed => {
                            let provider = &mut providers[index];
                            if provider.active {
                                tracing::debug!(%peer, blob = %hash.short(), "provider did not confirm the blob; dropped");
                            }
                            provider.active = false;
                            provider.missing |= matches!(answer, HaveAnswer::Missing);
                            requeue_from(index, &asked, &remaining, &mut queue);
                        }
                        _ => {}
                    }
                    continue;
                }
            };
            providers[index].in_flight = providers[index].in_flight.saturating_sub(1);
            let outstanding = requests.get_mut(&chunk).map_or(0, |n| {
                *n = n.saturating_sub(1);
                *n
            });
            let peer = providers[index].peer;
            // A failed request for a chunk that is done, or that another
            // request is still fetching, is not queued again.
            let requeue = |queue: &mut VecDeque<u64>, remaining: &BTreeSet<u64>| {
                if outstanding == 0 && remaining.contains(&chunk) {
                    queue.push_back(chunk);
                }
            };
            match outcome {
                Outcome::Written(len) => {
                    providers[index].failures = 0;
                    providers[index].confirmed = true;
                    remaining.remove(&chunk);
                    served_by.insert(chunk, Some(index));
                    report.chunks_fetched += 1;
                    report.bytes_fetched += len;
                    *report.bytes_by_provider.entry(peer).or_default() += len;
                    if let Some((owner, since)) = asked.remove(&chunk) {
                        if owner == index {
                            latencies.push_back(since.elapsed());
                            if latencies.len() > LATENCY_SAMPLES {
                                latencies.pop_front();
                            }
                        } else if since <= sent {
                            // The owner was asked first and a hedge beat it.
                            // (A request that was out before the owner's, to
                            // a provider dropped meanwhile, blames nobody.)
                            let reason = format!(
                                "sat on chunk {chunk} for {:.1} s while {peer} delivered it",
                                since.elapsed().as_secs_f64()
                            );
                            self.drop_stalled(providers, owner, &reason, report).await;
                        }
                    }
                    if let Some(progress) = &self.progress {
                        let done =
                            (total_chunks - partial.missing().len() as u64).min(total_chunks);
                        progress(
                            (done * crate::store::chunk_range(size, 0).1).min(size),
                            size,
                        );
                    }
                }
                Outcome::Lost => {}
                Outcome::Store(source) => return Err(FetchError::Store { hash, source }),
                Outcome::WrongLength { got, expected } => {
                    let reason = format!(
                        "sent {got} bytes for a {expected}-byte chunk (truncated or oversized)"
                    );
                    self.drop_bad(providers, index, &reason, report).await;
                    requeue(&mut queue, &remaining);
                }
                Outcome::Unexpected => {
                    self.drop_bad(
                        providers,
                        index,
                        "answered a chunk request with the wrong message",
                        report,
                    )
                    .await;
                    requeue(&mut queue, &remaining);
                }
                Outcome::NotFound => {
                    // It does not have the blob (a stale DHT record, a blob
                    // it pruned): not malice, so it is only dropped.
                    tracing::debug!(%peer, blob = %hash.short(), "provider does not have the blob");
                    providers[index].active = false;
                    providers[index].missing = true;
                    requeue(&mut queue, &remaining);
                }
                Outcome::Refused(reason) | Outcome::Failed(reason) => {
                    let provider = &mut providers[index];
                    // Requests sent before the last counted failure fail
                    // with it: a dial that failed, or a connection that
                    // dropped, is one failure however many chunks were
                    // riding on it.
                    let counted = provider.failed_at.is_none_or(|at| sent >= at);
                    if counted {
                        provider.failures += 1;
                        provider.failed_at = Some(Instant::now());
                        // Exponential backoff: 0.5 s, 1 s, 2 s, ... per provider.
                        let backoff = Duration::from_millis(250u64 << provider.failures.min(6));
                        provider.not_before = Instant::now() + backoff;
                    }
                    tracing::debug!(%peer, chunk, failures = provider.failures, counted, "chunk request failed: {reason}");
                    if counted && provider.failures >= MAX_PROVIDER_FAILURES {
                        tracing::warn!(%peer, blob = %hash.short(), "dropping provider after {} failures: {reason}", provider.failures);
                        provider.active = false;
                    }
                    if outstanding == 0 {
                        asked.remove(&chunk);
                        hedged.remove(&chunk);
                    }
                    requeue(&mut queue, &remaining);
                }
            }
        }
    }

    /// How long a chunk may be outstanding before it is hedged: four times
    /// the median of recent chunk times, at least `hedge_after_min`.
    fn hedge_after(&self, latencies: &VecDeque<Duration>) -> Duration {
        let mut sorted: Vec<Duration> = latencies.iter().copied().collect();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
        (median * 4).max(self.hedge_after_min)
    }

    /// A provider sat on a chunk another delivered: reported, penalized
    /// (it cost the transfer time) and not asked again in this transfer.
    async fn drop_stalled(
        &self,
        providers: &mut [Provider],
        index: usize,
        reason: &str,
        report: &mut FetchReport,
    ) {
        let Some(provider) = providers.get_mut(index) else {
            return;
        };
        if report
            .stalled_providers
            .iter()
            .any(|(p, _)| *p == provider.peer)
        {
            return;
        }
        provider.active = false;
        tracing::warn!(peer = %provider.peer, "dropping a stalled provider: {reason}");
        let _ = self
            .client
            .penalize(provider.peer, format!("stalled: {reason}"))
            .await;
        report
            .stalled_providers
            .push((provider.peer, reason.to_string()));
    }
}

/// Queues again the chunks still missing that were handed to the
/// provider `index` (dropped with requests in flight): another provider
/// fetches them while those requests are left to run out.
fn requeue_from(
    index: usize,
    asked: &BTreeMap<u64, (usize, Instant)>,
    remaining: &BTreeSet<u64>,
    queue: &mut VecDeque<u64>,
) {
    for (&chunk, &(owner, _)) in asked {
        if owner == index && remaining.contains(&chunk) && !queue.contains(&chunk) {
            queue.push_front(chunk);
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        path: Default::default(),
        action: "run blocking task",
        source: std::io::Error::other(e.to_string()),
    }
}
