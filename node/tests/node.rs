//! The node's integration tests: real swarms on 127.0.0.1 exchanging blobs
//! and gossip, hostile peers included, and the round loop against a small
//! fake coordinator.
//!
//! One test binary on purpose: each binary links libp2p and candle again.

// The counting allocator below needs `unsafe impl GlobalAlloc`; it only
// forwards to the system allocator and records sizes.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use barnraise_node::limiter::RateLimiter;
use barnraise_node::network::codec::read_framed;
use barnraise_node::network::{BlobSource, Event, ReadError, Topic};
use barnraise_node::store::BlobStore;
use barnraise_node::transfer::{FetchError, Fetcher};
use barnraise_node::{NodeConfig, NodeEvent, SyncSource, run_node};
use barnraise_protocol::NodeId;
use barnraise_protocol::aggregate::{AggregationRule, apply_round};
use barnraise_protocol::limits::BLOB_CHUNK_BYTES;
use barnraise_protocol::messages::{
    AcceptedUpdate, Assignment, CoordinatorResponse, Manifest, RunConfig, ShardInfo, Welcome,
};
use barnraise_protocol::messages::{
    BlobRequest, BlobResponse, CoordinatorRequest, RoundPlan, UpdateNotice,
};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::{Hash, Signed, SigningKey};
use barnraise_trainer::ModelConfig;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use support::*;
use tokio_util::sync::CancellationToken;

/// Records the largest single allocation made on the current thread while
/// tracking is on, so a test can prove a hostile length prefix allocated nothing big.
struct CountingAllocator;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = TRACKING.try_with(|tracking| {
            if tracking.get() {
                let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(layout.size())));
            }
        });
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Largest allocation made by `f` on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(|l| l.get()))
}

/// A provider that flips one byte in every chunk it serves (but keeps
/// lengths right, so only the whole-blob hash can catch it).
struct Corrupting(Arc<BlobStore>);

impl BlobSource for Corrupting {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.0.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        let mut data = self
            .0
            .read_range(hash, offset, len)
            .map_err(ReadError::from)?;
        if let Some(byte) = data.get_mut(len as usize / 2) {
            *byte ^= 0x5A;
        }
        Ok(data)
    }
}

/// A provider that counts which chunk offsets it served.
#[derive(Clone)]
struct Counting {
    store: Arc<BlobStore>,
    served: Arc<Mutex<BTreeMap<u64, u32>>>,
}

impl BlobSource for Counting {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        *self.served.lock().unwrap().entry(offset).or_default() += 1;
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
}

/// A remote peer on its own thread and runtime: it pings `addr` every
/// 10 ms and reports each round trip with the instant it completed, until
/// `stop` is set.
fn spawn_pinger(
    addr: libp2p::Multiaddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::sync::mpsc::Receiver<(std::time::Instant, std::time::Duration)>,
    std::thread::JoinHandle<()>,
) {
    use futures::StreamExt;
    use std::time::Duration;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let ping = libp2p::ping::Config::new()
                .with_interval(Duration::from_millis(10))
                .with_timeout(Duration::from_secs(60));
            let mut swarm = libp2p::SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(
                    libp2p::tcp::Config::default(),
                    libp2p::noise::Config::new,
                    libp2p::yamux::Config::default,
                )
                .unwrap()
                .with_behaviour(|_| libp2p::ping::Behaviour::new(ping))
                .unwrap()
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
                .build();
            swarm.dial(addr).unwrap();
            while !stop.load(Ordering::Relaxed) {
                tokio::select! {
                    event = swarm.select_next_some() => {
                        if let libp2p::swarm::SwarmEvent::Behaviour(libp2p::ping::Event {
                            result: Ok(rtt),
                            ..
                        }) = event
                        {
                            let _ = tx.send((std::time::Instant::now(), rtt));
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
    });
    (rx, thread)
}

/// The round trips that completed between `from` and `to`.
fn pings_between(
    rtts: &std::sync::mpsc::Receiver<(std::time::Instant, std::time::Duration)>,
    from: std::time::Instant,
    to: std::time::Instant,
) -> Vec<std::time::Duration> {
    rtts.try_iter()
        .filter(|(at, _)| *at >= from && *at <= to)
        .map(|(_, rtt)| rtt)
        .collect()
}

/// docs/architecture.md, "Nothing blocks the runtime": while the node saves
/// a `medium`-sized θ and its momentum (2 × 509 MB, with fsync), its swarm
/// keeps answering pings within 100 ms. The runtime has one thread, so any
/// blocking work on it would stop the swarm outright; the same save done
/// inline, as the node used to, is the control that shows the bar bites.
#[tokio::test(flavor = "current_thread")]
async fn the_swarm_answers_pings_while_the_node_saves_a_medium_state() {
    use barnraise_node::state::{StateDir, StateRecord};
    use std::time::{Duration, Instant};
    let params = ModelConfig::preset("medium").unwrap().params_count();
    // Filling a gigabyte takes a while: done before the pings start.
    let theta = vec![0.5f32; params];
    let momentum = vec![0.25f32; params];
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(&dir.path().join("blobs")).unwrap());
    let node = spawn_peer(41, store, false).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (rtts, pinger) = spawn_pinger(node.addr.clone(), stop.clone());
    let patience = Instant::now();
    while rtts.try_recv().is_err() {
        assert!(
            patience.elapsed() < Duration::from_secs(30),
            "no ping came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let state = StateDir::new(dir.path());
    let record = StateRecord {
        run_id: "responsive".into(),
        round: 3,
        params_hash: String::new(),
        codec: "fp32".into(),
        committed: None,
    };

    let started = Instant::now();
    let (theta, momentum) = state
        .save_in_background(record.clone(), theta, momentum)
        .await
        .unwrap();
    let background = started.elapsed();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let during = pings_between(&rtts, started, Instant::now());

    let started = Instant::now();
    state.save(&record, &theta, &momentum).unwrap();
    let inline = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = pings_between(&rtts, started, Instant::now());
    stop.store(true, Ordering::Relaxed);
    pinger.join().unwrap();
    node.stop().await;

    let worst = |rtts: &[Duration]| rtts.iter().max().copied().unwrap_or_default();
    eprintln!(
        "saving {params} params twice: in the background {:.0} ms, {} pings, worst {:.1} ms; \
         inline {:.0} ms, {} pings, worst {:.1} ms",
        background.as_secs_f64() * 1e3,
        during.len(),
        worst(&during).as_secs_f64() * 1e3,
        inline.as_secs_f64() * 1e3,
        stalled.len(),
        worst(&stalled).as_secs_f64() * 1e3,
    );
    // Pings kept coming while the save ran (one every 10 ms plus the round
    // trip when nothing is in the way), and none waited 100 ms.
    let expected = (background.as_millis() / 50).max(3) as usize;
    assert!(
        during.len() >= expected,
        "{} pings answered during a {background:?} save, expected at least {expected}",
        during.len()
    );
    assert!(
        worst(&during) < Duration::from_millis(100),
        "a ping waited {:?} while the state was saved in the background",
        worst(&during)
    );
    // The control: inline, the save holds the runtime's only thread, and a
    // ping in flight waits for it.
    if inline >= Duration::from_millis(200) {
        assert!(
            worst(&stalled) >= Duration::from_millis(100),
            "an inline save of {inline:?} left pings at {:?}: the test cannot tell blocking from not",
            worst(&stalled)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_from_two_providers_survives_a_corrupting_one() {
    let size = 50 * 1024 * 1024 + 12_345;
    let data = pseudo_random_bytes(size, 1);
    let hash = Hash::of(&data);
    let honest_dir = tempfile::tempdir().unwrap();
    let honest_store = Arc::new(BlobStore::open(honest_dir.path()).unwrap());
    assert_eq!(honest_store.put(&data).unwrap(), hash);
    let liar_dir = tempfile::tempdir().unwrap();
    let liar_store = Arc::new(BlobStore::open(liar_dir.path()).unwrap());
    liar_store.put(&data).unwrap();
    drop(data);

    let honest = spawn_peer(1, honest_store.clone(), false).await;
    let liar = spawn_peer(2, Arc::new(Corrupting(liar_store)), false).await;
    let fetch_dir = tempfile::tempdir().unwrap();
    let fetch_store = Arc::new(BlobStore::open(fetch_dir.path()).unwrap());
    let fetcher_peer = spawn_peer(3, fetch_store.clone(), false).await;
    let honest_id = fetcher_peer.client.dial(honest.addr.clone()).await.unwrap();
    let liar_id = fetcher_peer.client.dial(liar.addr.clone()).await.unwrap();

    let fetcher = Fetcher::new(
        fetcher_peer.client.clone(),
        fetch_store.clone(),
        RateLimiter::unlimited(),
    );
    let started = std::time::Instant::now();
    let report = fetcher
        .fetch(
            hash,
            Some(size as u64),
            &[liar_id, honest_id],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let elapsed = started.elapsed();
    eprintln!(
        "50 MB from two providers (one lying): {:.1} MB/s incl. re-fetches; {} chunks fetched for {} in the blob",
        report.bytes_fetched as f64 / 1e6 / elapsed.as_secs_f64(),
        report.chunks_fetched,
        size.div_ceil(BLOB_CHUNK_BYTES)
    );
    assert!(fetch_store.verify(&hash).is_ok(), "the blob arrived intact");
    assert_eq!(fetch_store.size(&hash), Some(size as u64));
    let bad: Vec<_> = report.bad_providers.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        bad,
        vec![liar_id],
        "the liar, and only the liar, was dropped: {:?}",
        report.bad_providers
    );
    let score = fetcher_peer.client.peer_score(liar_id).await.unwrap();
    assert!(
        score.is_some_and(|s| s < 0.0),
        "the liar was penalized: {score:?}"
    );
    let honest_score = fetcher_peer.client.peer_score(honest_id).await.unwrap();
    assert!(
        honest_score.is_none_or(|s| s >= 0.0),
        "the honest provider was not: {honest_score:?}"
    );
    // A second fetch finds it in the store and moves nothing.
    let again = fetcher
        .fetch(
            hash,
            Some(size as u64),
            &[honest_id],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert!(again.already_had && again.bytes_fetched == 0);
    for peer in [honest, liar, fetcher_peer] {
        peer.stop().await;
    }
}

/// A provider that answers `Have` but sits on every chunk request until
/// released (a peer that stalls mid-transfer).
struct Stalling {
    store: Arc<BlobStore>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl BlobSource for Stalling {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        while !self.release.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
}

/// Sets its flag when dropped, so that a provider blocked on it is released
/// however a test ends: the runtime waits for blocked reads.
struct Release(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A store in a fresh directory holding `data` (kept while the directory is).
fn store_holding(data: &[u8]) -> (tempfile::TempDir, Arc<BlobStore>) {
    let (dir, store) = empty_store();
    store.put(data).unwrap();
    (dir, store)
}

/// An empty store in a fresh directory.
fn empty_store() -> (tempfile::TempDir, Arc<BlobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    (dir, store)
}

/// A provider whose background blob's reads block until released, and
/// which counts them.
struct GatedBackground {
    store: Arc<BlobStore>,
    background: Hash,
    release: Arc<std::sync::atomic::AtomicBool>,
    background_reads: Arc<AtomicU64>,
}

impl BlobSource for GatedBackground {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        if *hash == self.background {
            self.background_reads.fetch_add(1, Ordering::SeqCst);
            while !self.release.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
    fn background(&self, hash: &Hash) -> bool {
        *hash == self.background
    }
}

/// A background blob (a spot-check state) is served one chunk at a time,
/// and a foreground blob (an update) is not held behind it: while the
/// first background chunk is still being served, the second is not read,
/// and a foreground chunk asked for after both is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_blobs_are_served_one_chunk_at_a_time_behind_the_others() {
    let state = pseudo_random_bytes(3 * BLOB_CHUNK_BYTES, 41);
    let update = pseudo_random_bytes(BLOB_CHUNK_BYTES / 2, 42);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let state_hash = store.put(&state).unwrap();
    let update_hash = store.put(&update).unwrap();
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _release_on_exit = Release(release.clone());
    let background_reads = Arc::new(AtomicU64::new(0));
    let provider = spawn_peer(
        43,
        Arc::new(GatedBackground {
            store,
            background: state_hash,
            release: release.clone(),
            background_reads: background_reads.clone(),
        }),
        false,
    )
    .await;
    let asker_dir = tempfile::tempdir().unwrap();
    let asker_store = Arc::new(BlobStore::open(asker_dir.path()).unwrap());
    let asker = spawn_peer(44, asker_store, false).await;
    let provider_id = asker.client.dial(provider.addr.clone()).await.unwrap();
    let chunk = |hash: Hash, index: u64| BlobRequest::Chunk {
        hash,
        offset: index * BLOB_CHUNK_BYTES as u64,
        len: BLOB_CHUNK_BYTES as u32,
    };
    let mut background = Vec::new();
    for index in 0..3 {
        let client = asker.client.clone();
        background.push(tokio::spawn(async move {
            client
                .blob_request(provider_id, chunk(state_hash, index))
                .await
        }));
    }
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while background_reads.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < patience,
            "no background chunk was read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Time for the other two requests to arrive and, ungated, be read.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let foreground = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        asker.client.blob_request(
            provider_id,
            BlobRequest::Chunk {
                hash: update_hash,
                offset: 0,
                len: update.len() as u32,
            },
        ),
    )
    .await
    .expect("the foreground chunk is not held behind the background blob")
    .unwrap();
    assert!(
        matches!(&foreground, BlobResponse::Chunk { data } if *data == update),
        "the update's bytes: {foreground:?}"
    );
    assert_eq!(
        background_reads.load(Ordering::SeqCst),
        1,
        "no second background chunk is read while the first is out"
    );
    release.store(true, Ordering::SeqCst);
    let mut served = Vec::new();
    for task in background {
        match task.await.unwrap().unwrap() {
            BlobResponse::Chunk { data } => served.push(data),
            other => panic!("a background chunk: {other:?}"),
        }
    }
    assert!(
        served.concat() == state,
        "every background chunk arrived, in order"
    );
    assert_eq!(background_reads.load(Ordering::SeqCst), 3);
    for peer in [provider, asker] {
        peer.stop().await;
    }
}

/// The chunks a stalling provider sits on are hedged to the honest one
/// once nothing else is left to hand out: the blob arrives whole, nothing of
/// it came from the staller, and the staller is reported and penalized.
/// Without hedging the staller would be reported for nothing (its requests
/// would only time out, which drops a provider without naming it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_provider_is_routed_around_and_penalized() {
    let size = 8 * BLOB_CHUNK_BYTES + 777;
    let data = pseudo_random_bytes(size, 9);
    let hash = Hash::of(&data);
    let honest_dir = tempfile::tempdir().unwrap();
    let honest_store = Arc::new(BlobStore::open(honest_dir.path()).unwrap());
    honest_store.put(&data).unwrap();
    let stall_dir = tempfile::tempdir().unwrap();
    let stall_store = Arc::new(BlobStore::open(stall_dir.path()).unwrap());
    stall_store.put(&data).unwrap();
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let honest = spawn_peer(11, honest_store, false).await;
    let staller = spawn_peer(
        12,
        Arc::new(Stalling {
            store: stall_store,
            release: release.clone(),
        }),
        false,
    )
    .await;
    let fetch_dir = tempfile::tempdir().unwrap();
    let fetch_store = Arc::new(BlobStore::open(fetch_dir.path()).unwrap());
    let fetcher_peer = spawn_peer(13, fetch_store.clone(), false).await;
    let staller_id = fetcher_peer
        .client
        .dial(staller.addr.clone())
        .await
        .unwrap();
    let honest_id = fetcher_peer.client.dial(honest.addr.clone()).await.unwrap();
    let fetcher = Fetcher::new(
        fetcher_peer.client.clone(),
        fetch_store.clone(),
        RateLimiter::unlimited(),
    )
    .with_hedge_after(std::time::Duration::from_millis(500));
    let report = fetcher
        .fetch(
            hash,
            Some(size as u64),
            &[staller_id, honest_id],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    release.store(true, Ordering::Relaxed);
    assert!(fetch_store.verify(&hash).is_ok(), "the blob arrived intact");
    assert_eq!(report.bytes_from(&staller_id), 0);
    assert_eq!(report.bytes_from(&honest_id), size as u64);
    let stalled: Vec<_> = report.stalled_providers.iter().map(|(p, _)| *p).collect();
    assert_eq!(stalled, vec![staller_id], "{:?}", report.stalled_providers);
    assert!(
        report.bad_providers.is_empty(),
        "{:?}",
        report.bad_providers
    );
    let score = fetcher_peer.client.peer_score(staller_id).await.unwrap();
    assert!(
        score.is_some_and(|s| s < 0.0),
        "the staller was penalized: {score:?}"
    );
    let honest_score = fetcher_peer.client.peer_score(honest_id).await.unwrap();
    assert!(honest_score.is_none_or(|s| s >= 0.0), "{honest_score:?}");
    for peer in [honest, staller, fetcher_peer] {
        peer.stop().await;
    }
}

/// A provider whose first reads fail (an I/O error answered with a
/// refusal), then serves.
struct FailingFirst {
    store: Arc<BlobStore>,
    failures_left: std::sync::atomic::AtomicUsize,
}

impl BlobSource for FailingFirst {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        let failing = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(ReadError::Failed("disk hiccup".into()));
        }
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
}

/// The requests a provider had in flight when it failed fail together (a
/// dropped connection, a failed dial, a burst of refusals): that is one
/// failure, not one per request. Counted per request, the four chunks in
/// flight to the only provider would have dropped it at once
/// (`MAX_PROVIDER_FAILURES` is 4) and the transfer would have failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_fail_together_count_as_one_failure_of_their_provider() {
    let size = 6 * BLOB_CHUNK_BYTES + 99;
    let data = pseudo_random_bytes(size, 5);
    let hash = Hash::of(&data);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    store.put(&data).unwrap();
    let provider = spawn_peer(
        31,
        Arc::new(FailingFirst {
            store,
            failures_left: std::sync::atomic::AtomicUsize::new(
                barnraise_node::transfer::MAX_PROVIDER_FAILURES as usize,
            ),
        }),
        false,
    )
    .await;
    let fetch_dir = tempfile::tempdir().unwrap();
    let fetch_store = Arc::new(BlobStore::open(fetch_dir.path()).unwrap());
    let fetcher_peer = spawn_peer(32, fetch_store.clone(), false).await;
    let provider_id = fetcher_peer
        .client
        .dial(provider.addr.clone())
        .await
        .unwrap();
    let fetcher = Fetcher::new(
        fetcher_peer.client.clone(),
        fetch_store.clone(),
        RateLimiter::unlimited(),
    );
    let report = fetcher
        .fetch(
            hash,
            Some(size as u64),
            &[provider_id],
            &CancellationToken::new(),
        )
        .await
        .expect("one failure, then the provider serves");
    assert!(fetch_store.verify(&hash).is_ok(), "the blob arrived intact");
    assert_eq!(report.bytes_from(&provider_id), size as u64);
    for peer in [provider, fetcher_peer] {
        peer.stop().await;
    }
}

/// A store that counts the `Have` questions it answers (the blob protocol
/// asks a source for a blob's size only to answer `Have`) and, while
/// `hold_have` is set, holds each answer until a chunk has been read (at
/// most 5 s), counting the answers it had to give before any chunk.
struct CountingHave {
    store: Arc<BlobStore>,
    haves: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    hold_have: Arc<std::sync::atomic::AtomicBool>,
    answered_before_a_chunk: Arc<AtomicU64>,
}

impl BlobSource for CountingHave {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.haves.fetch_add(1, Ordering::SeqCst);
        if self.hold_have.load(Ordering::SeqCst) {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while self.reads.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if self.reads.load(Ordering::SeqCst) == 0 {
                self.answered_before_a_chunk.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
}

/// With the size known and one candidate, a fetch asks for chunks at once:
/// its `Have` goes beside them, not a round trip ahead (the provider here
/// holds its `Have` answer until a chunk was asked for, which a fetch that
/// waited for `Have` would never do). Providers found after the fetch started
/// are asked `Have` and join it: here the first candidate does not have the
/// blob, answers `NotFound`, is dropped without blame, and the one found
/// later serves it all. When nobody has the blob the fetch says so and
/// leaves no partial download behind. Without a size, `Have` settles it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_of_known_size_asks_for_chunks_at_once() {
    let size = 3 * BLOB_CHUNK_BYTES + 5;
    let data = pseudo_random_bytes(size, 71);
    let hash = Hash::of(&data);
    let (_having_dir, having_store) = store_holding(&data);
    let haves = Arc::new(AtomicU64::new(0));
    let hold_have = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered_before_a_chunk = Arc::new(AtomicU64::new(0));
    let having = spawn_peer(
        71,
        Arc::new(CountingHave {
            store: having_store,
            haves: haves.clone(),
            reads: Arc::new(AtomicU64::new(0)),
            hold_have: hold_have.clone(),
            answered_before_a_chunk: answered_before_a_chunk.clone(),
        }),
        false,
    )
    .await;
    let (_empty_dir, empty_store_) = empty_store();
    let empty = spawn_peer(72, empty_store_, false).await;
    let (_fetch_dir, fetch_store) = empty_store();
    let fetcher_peer = spawn_peer(73, fetch_store.clone(), false).await;
    let having_id = fetcher_peer.client.dial(having.addr.clone()).await.unwrap();
    let empty_id = fetcher_peer.client.dial(empty.addr.clone()).await.unwrap();
    let fetcher = |store: &Arc<BlobStore>| {
        Fetcher::new(
            fetcher_peer.client.clone(),
            store.clone(),
            RateLimiter::unlimited(),
        )
    };
    let cancel = CancellationToken::new();
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(30), f)
            .await
            .expect("the fetch ends")
    }

    let report =
        within(fetcher(&fetch_store).fetch(hash, Some(size as u64), &[having_id], &cancel))
            .await
            .expect("the provider serves it");
    assert!(fetch_store.verify(&hash).is_ok(), "the blob arrived intact");
    assert_eq!(
        answered_before_a_chunk.load(Ordering::SeqCst),
        0,
        "the chunks waited for Have"
    );
    assert_eq!(report.bytes_from(&having_id), size as u64);
    hold_have.store(false, Ordering::SeqCst);
    // Its Have may still be on the way: the counts below are of later ones.
    let haves_so_far = || haves.load(Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let first = haves_so_far();
    assert!(first <= 1, "{first} Haves for one fetch");

    // A provider found after the start (here the only one) joins the transfer.
    let (_late_dir, late_store) = empty_store();
    let (found_tx, found) = tokio::sync::oneshot::channel();
    let joined = {
        let fetcher = fetcher(&late_store);
        let cancel = cancel.clone();
        tokio::spawn(async move {
            fetcher
                .fetch_joined(hash, Some(size as u64), &[empty_id], Some(found), &cancel)
                .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    found_tx.send(vec![having_id]).unwrap();
    let report = within(joined)
        .await
        .unwrap()
        .expect("the provider that joined serves it");
    assert!(late_store.verify(&hash).is_ok());
    assert_eq!(report.bytes_from(&having_id), size as u64);
    assert_eq!(
        haves_so_far(),
        first + 1,
        "the found provider was asked Have"
    );
    assert!(
        report.bad_providers.is_empty(),
        "{:?}",
        report.bad_providers
    );
    let score = fetcher_peer.client.peer_score(empty_id).await.unwrap();
    assert!(
        score.is_none_or(|s| s >= 0.0),
        "not having a blob is no offence: {score:?}"
    );

    // Nobody has it: said so, and no partial download stays behind.
    let (nobody_dir, nobody_store) = empty_store();
    let other = Hash::of(b"a blob nobody has");
    let missing =
        within(fetcher(&nobody_store).fetch(other, Some(size as u64), &[empty_id], &cancel)).await;
    assert!(
        matches!(missing, Err(FetchError::NoProviders { asked: 1, .. })),
        "{missing:?}"
    );
    let partials = std::fs::read_dir(nobody_dir.path().join("partial"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        partials, 0,
        "a partial download of a blob nobody has was left"
    );
    // The lookup finds nobody either: the fetch does not hang on it.
    let (found_tx, found) = tokio::sync::oneshot::channel::<Vec<_>>();
    drop(found_tx);
    let none = within(fetcher(&nobody_store).fetch_joined(
        other,
        Some(size as u64),
        &[],
        Some(found),
        &cancel,
    ))
    .await;
    assert!(none.is_err(), "{none:?}");

    // Without a size, Have settles it.
    let (_sized_dir, sized_store) = empty_store();
    within(fetcher(&sized_store).fetch(hash, None, &[having_id], &cancel))
        .await
        .expect("served");
    assert_eq!(haves_so_far(), first + 2, "Have was asked");
    for peer in [having, empty, fetcher_peer] {
        peer.stop().await;
    }
}

/// A provider that answers nothing until released (a stopped process, a
/// laptop asleep): every question waits.
struct Frozen {
    store: Arc<BlobStore>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl Frozen {
    fn wait(&self) {
        while !self.release.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl BlobSource for Frozen {
    fn size(&self, hash: &Hash) -> Option<u64> {
        self.wait();
        self.store.size(hash)
    }
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        self.wait();
        self.store
            .read_range(hash, offset, len)
            .map_err(ReadError::from)
    }
}

/// A fetch that starts on one candidate without asking `Have` first still
/// asks it beside the chunks: a frozen candidate that answers neither is
/// dropped once the `Have` timeout passes (not the 60 s a chunk may take),
/// its chunks go to a provider found meanwhile, and with nobody else the
/// fetch fails, so that the caller can turn to the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_candidate_is_dropped_when_it_answers_nothing() {
    let size = 2 * BLOB_CHUNK_BYTES + 11;
    let data = pseudo_random_bytes(size, 81);
    let hash = Hash::of(&data);
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _release_on_exit = Release(release.clone());
    let (_frozen_dir, frozen_store) = store_holding(&data);
    let frozen = spawn_peer(
        81,
        Arc::new(Frozen {
            store: frozen_store,
            release: release.clone(),
        }),
        false,
    )
    .await;
    let (_having_dir, having_store) = store_holding(&data);
    let having = spawn_peer(82, having_store, false).await;
    let (_fetch_dir, fetch_store) = empty_store();
    let fetcher_peer = spawn_peer(83, fetch_store.clone(), false).await;
    let frozen_id = fetcher_peer.client.dial(frozen.addr.clone()).await.unwrap();
    let having_id = fetcher_peer.client.dial(having.addr.clone()).await.unwrap();
    let fetcher = Fetcher::new(
        fetcher_peer.client.clone(),
        fetch_store.clone(),
        RateLimiter::unlimited(),
    )
    .with_have_timeout(std::time::Duration::from_millis(500));
    let cancel = CancellationToken::new();
    let patience = std::time::Duration::from_secs(30);

    // Alone, it fails well within a chunk's 60 s timeout.
    let alone = tokio::time::timeout(
        patience,
        fetcher.fetch(hash, Some(size as u64), &[frozen_id], &cancel),
    )
    .await
    .expect("a frozen candidate does not hold the fetch for a chunk timeout");
    assert!(
        matches!(alone, Err(FetchError::ProvidersExhausted { .. })),
        "{alone:?}"
    );

    // With a provider found meanwhile, that one serves everything.
    let (found_tx, found) = tokio::sync::oneshot::channel();
    found_tx.send(vec![having_id]).unwrap();
    let report = tokio::time::timeout(
        patience,
        fetcher.fetch_joined(hash, Some(size as u64), &[frozen_id], Some(found), &cancel),
    )
    .await
    .expect("the fetch ends")
    .expect("the found provider serves it");
    assert!(fetch_store.verify(&hash).is_ok(), "the blob arrived intact");
    assert_eq!(report.bytes_from(&having_id), size as u64);
    assert_eq!(report.bytes_from(&frozen_id), 0);
    release.store(true, Ordering::SeqCst);
    for peer in [frozen, having, fetcher_peer] {
        peer.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_transfer_resumes_after_restart_without_refetching() {
    let size = 12 * BLOB_CHUNK_BYTES + 777;
    let total_chunks = size.div_ceil(BLOB_CHUNK_BYTES) as u64;
    let data = pseudo_random_bytes(size, 2);
    let hash = Hash::of(&data);
    let provider_dir = tempfile::tempdir().unwrap();
    let provider_store = Arc::new(BlobStore::open(provider_dir.path()).unwrap());
    provider_store.put(&data).unwrap();
    let fetch_dir = tempfile::tempdir().unwrap();

    // First run: one chunk at a time, stopped once 5 chunks are in.
    let first_source = Counting {
        store: provider_store.clone(),
        served: Default::default(),
    };
    let first_provider = spawn_peer(10, Arc::new(first_source), false).await;
    let first_resumed_or_fetched;
    {
        let store = Arc::new(BlobStore::open(fetch_dir.path()).unwrap());
        let node = spawn_peer(11, store.clone(), false).await;
        let provider = node.client.dial(first_provider.addr.clone()).await.unwrap();
        let cancel = CancellationToken::new();
        let written = Arc::new(AtomicU64::new(0));
        let progress = {
            let cancel = cancel.clone();
            let written = written.clone();
            Arc::new(move |_done: u64, _total: u64| {
                if written.fetch_add(1, Ordering::SeqCst) + 1 >= 5 {
                    cancel.cancel();
                }
            })
        };
        let fetcher = Fetcher::new(node.client.clone(), store.clone(), RateLimiter::unlimited())
            .with_concurrency(1, 1)
            .with_progress(progress);
        let result = fetcher
            .fetch(hash, Some(size as u64), &[provider], &cancel)
            .await;
        assert!(matches!(result, Err(FetchError::Cancelled)), "{result:?}");
        assert!(
            !store.contains(&hash),
            "an unfinished blob never appears under its name"
        );
        first_resumed_or_fetched = written.load(Ordering::SeqCst);
        node.stop().await;
    }
    first_provider.stop().await;
    assert!(first_resumed_or_fetched >= 5 && first_resumed_or_fetched < total_chunks);

    // Restart on the same data dir, fetching from a fresh provider that
    // records exactly which chunks are asked of it.
    let second_source = Counting {
        store: provider_store.clone(),
        served: Default::default(),
    };
    let served = second_source.served.clone();
    let second_provider = spawn_peer(12, Arc::new(second_source), false).await;
    let store = Arc::new(BlobStore::open(fetch_dir.path()).unwrap());
    let node = spawn_peer(13, store.clone(), false).await;
    let provider = node
        .client
        .dial(second_provider.addr.clone())
        .await
        .unwrap();
    let fetcher = Fetcher::new(node.client.clone(), store.clone(), RateLimiter::unlimited());
    let report = fetcher
        .fetch(
            hash,
            Some(size as u64),
            &[provider],
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    assert_eq!(store.read(&hash).unwrap(), data);
    assert!(report.chunks_resumed >= 5, "{report:?}");
    assert_eq!(
        report.chunks_resumed + report.chunks_fetched,
        total_chunks,
        "{report:?}"
    );
    let served = served.lock().unwrap().clone();
    assert_eq!(
        served.len() as u64,
        report.chunks_fetched,
        "served: {served:?}"
    );
    assert!(
        served.values().all(|n| *n == 1),
        "no chunk was asked twice: {served:?}"
    );
    node.stop().await;
    second_provider.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_without_large_allocations() {
    // On the wire: a length prefix claiming 4 GiB is refused from its four
    // bytes, for requests and responses alike, allocating nothing large.
    for claimed in [u32::MAX, (BLOB_CHUNK_BYTES * 2) as u32] {
        let mut hostile = claimed.to_le_bytes().to_vec();
        hostile.extend_from_slice(&[7u8; 64]);
        let (result, largest) = largest_allocation(|| {
            futures::executor::block_on(read_framed::<BlobRequest, _>(
                &mut futures::io::Cursor::new(&hostile),
            ))
        });
        assert!(result.is_err());
        assert!(
            largest <= 64 * 1024,
            "refusing a {claimed}-byte request allocated {largest} bytes"
        );
        let (result, largest) = largest_allocation(|| {
            futures::executor::block_on(read_framed::<BlobResponse, _>(
                &mut futures::io::Cursor::new(&hostile),
            ))
        });
        assert!(result.is_err());
        assert!(
            largest <= 64 * 1024,
            "refusing a {claimed}-byte response allocated {largest} bytes"
        );
        let (result, largest) = largest_allocation(|| {
            futures::executor::block_on(read_framed::<CoordinatorRequest, _>(
                &mut futures::io::Cursor::new(&hostile),
            ))
        });
        assert!(result.is_err());
        assert!(
            largest <= 64 * 1024,
            "refusing a {claimed}-byte coordinator request allocated {largest} bytes"
        );
    }

    // Over the network: a chunk request over the chunk cap is refused, and
    // the provider keeps serving.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(BlobStore::open(dir.path()).unwrap());
    let hash = store.put(&pseudo_random_bytes(1000, 3)).unwrap();
    let provider = spawn_peer(20, store, false).await;
    let asker_dir = tempfile::tempdir().unwrap();
    let asker = spawn_peer(
        21,
        Arc::new(BlobStore::open(asker_dir.path()).unwrap()),
        false,
    )
    .await;
    let peer = asker.client.dial(provider.addr.clone()).await.unwrap();
    let too_long = BlobRequest::Chunk {
        hash,
        offset: 0,
        len: u32::MAX,
    };
    let answer = asker.client.blob_request(peer, too_long).await.unwrap();
    assert!(matches!(answer, BlobResponse::Refused { .. }), "{answer:?}");
    let answer = asker
        .client
        .blob_request(
            peer,
            BlobRequest::Chunk {
                hash,
                offset: 990,
                len: 10,
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(answer, BlobResponse::Chunk { ref data } if data.len() == 10),
        "{answer:?}"
    );
    let past_end = asker
        .client
        .blob_request(
            peer,
            BlobRequest::Chunk {
                hash,
                offset: 995,
                len: 10,
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(past_end, BlobResponse::Refused { .. }),
        "{past_end:?}"
    );
    // A node does not answer the coordinator protocol at all.
    assert!(
        asker
            .client
            .coordinator_request(peer, CoordinatorRequest::CurrentPlan)
            .await
            .is_err()
    );
    asker.stop().await;
    provider.stop().await;
}

/// A node that knows the coordinator's key, the coordinator and an
/// impostor (keys from seeds `seed`, `seed + 1` and `seed + 2`: node,
/// coordinator, impostor), all on `topic`, the node connected to both.
struct GossipTrio {
    node: Peer,
    coordinator: Peer,
    impostor: Peer,
    coordinator_id: libp2p::PeerId,
    impostor_id: libp2p::PeerId,
    _dirs: Vec<tempfile::TempDir>,
}

async fn gossip_trio(seed: u8, topic: &Topic) -> GossipTrio {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let stores: Vec<_> = dirs
        .iter()
        .map(|d| Arc::new(BlobStore::open(d.path()).unwrap()))
        .collect();
    let node = spawn_peer(seed, stores[0].clone(), false).await;
    let coordinator = spawn_peer(seed + 1, stores[1].clone(), false).await;
    let impostor = spawn_peer(seed + 2, stores[2].clone(), false).await;
    node.client
        .set_coordinator_key(coordinator.key.public())
        .await
        .unwrap();
    for peer in [&node, &coordinator, &impostor] {
        peer.client.subscribe(topic.clone()).await.unwrap();
    }
    let coordinator_id = node.client.dial(coordinator.addr.clone()).await.unwrap();
    let impostor_id = node.client.dial(impostor.addr.clone()).await.unwrap();
    GossipTrio {
        node,
        coordinator,
        impostor,
        coordinator_id,
        impostor_id,
        _dirs: dirs,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_from_a_non_coordinator_signer_is_rejected() {
    let topic = Topic::Plans {
        run_id: "gossip-test".into(),
    };
    let GossipTrio {
        node,
        coordinator,
        impostor,
        coordinator_id,
        impostor_id,
        _dirs,
    } = gossip_trio(30, &topic).await;
    let (coordinator_key, impostor_key) = (coordinator.key.clone(), impostor.key.clone());
    let mut events = node.events.lock().await;

    let plan = |round: u64| RoundPlan {
        run_id: "gossip-test".into(),
        round,
        params_hash: Hash::ZERO,
        previous_manifest: Hash::ZERO,
        assignments: vec![],
        opened_at_ms: 0,
        deadline_ms: 0,
        bootstrap: vec![],
    };
    // The impostor signs a plan with its own key and gossips it.
    let forged = Signed::sign(&impostor_key, &plan(1))
        .unwrap()
        .to_bytes()
        .unwrap();
    publish_when_possible(&impostor.client, &topic, forged).await;
    let rejected = wait_for(
        &mut events,
        |e| matches!(e, Event::GossipRejected { .. }),
        "a rejection",
    )
    .await;
    match rejected {
        Event::GossipRejected { source, reason, .. } => {
            assert_eq!(source, impostor_id);
            assert!(reason.contains("signed by"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The real coordinator's plan gets through, and it is the only plan that does.
    let genuine = Signed::sign(&coordinator_key, &plan(2))
        .unwrap()
        .to_bytes()
        .unwrap();
    publish_when_possible(&coordinator.client, &topic, genuine).await;
    let accepted = wait_for(
        &mut events,
        |e| matches!(e, Event::Plan { .. }),
        "the genuine plan",
    )
    .await;
    match accepted {
        Event::Plan {
            plan,
            signed,
            source,
        } => {
            assert_eq!(plan.round, 2);
            assert_eq!(signed.signer, coordinator_key.public());
            assert_eq!(source, coordinator_id);
        }
        other => panic!("unexpected {other:?}"),
    }
    let score = node.client.peer_score(impostor_id).await.unwrap();
    assert!(
        score.is_some_and(|s| s < 0.0),
        "the impostor lost score: {score:?}"
    );
    // The coordinator is never graylisted: penalties do not touch it.
    for _ in 0..5 {
        node.client
            .penalize(coordinator_id, "served a bad chunk")
            .await
            .unwrap();
    }
    let score = node.client.peer_score(coordinator_id).await.unwrap();
    assert!(
        score.is_some_and(|s| s > 0.0),
        "the coordinator keeps a positive score: {score:?}"
    );
    // A flood: 200 more forgeries. The impostor is graylisted, so gossipsub
    // drops its messages before they cost a signature check, and the
    // coordinator's next plan still gets through.
    const FLOOD: u64 = 200;
    let mut sent = 0;
    for round in 100..100 + FLOOD {
        let forged = Signed::sign(&impostor_key, &plan(round))
            .unwrap()
            .to_bytes()
            .unwrap();
        if impostor.client.publish(topic.clone(), forged).await.is_ok() {
            sent += 1;
        }
    }
    // The impostor's side sent them (so what stopped them is the node).
    assert_eq!(sent, FLOOD);
    let genuine = Signed::sign(&coordinator_key, &plan(3))
        .unwrap()
        .to_bytes()
        .unwrap();
    publish_when_possible(&coordinator.client, &topic, genuine).await;
    let mut checked = 0;
    let drain_until = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut got_plan = false;
    while let Ok(Some(event)) = tokio::time::timeout_at(drain_until, events.recv()).await {
        match event {
            Event::GossipRejected { source, .. } if source == impostor_id => checked += 1,
            Event::Plan { plan, source, .. } => {
                assert_eq!(source, coordinator_id, "only the coordinator's plan passes");
                assert_eq!(plan.round, 3);
                got_plan = true;
            }
            _ => {}
        }
    }
    assert!(got_plan, "the coordinator's plan got through the flood");
    assert!(
        checked < FLOOD / 2,
        "{checked} of {FLOOD} flooded forgeries reached validation"
    );
    eprintln!("{checked} of {FLOOD} flooded forgeries reached validation");
    drop(events);
    for peer in [node, coordinator, impostor] {
        peer.stop().await;
    }
}

/// Publishes `bytes` from `from` and returns who the node then rejected
/// gossip from, and why.
async fn rejection(
    from: &Peer,
    topic: &Topic,
    bytes: Vec<u8>,
    events: &mut tokio::sync::mpsc::Receiver<Event>,
) -> (libp2p::PeerId, String) {
    publish_when_possible(&from.client, topic, bytes).await;
    match wait_for(
        events,
        |e| matches!(e, Event::GossipRejected { .. }),
        "a rejection",
    )
    .await
    {
        Event::GossipRejected { source, reason, .. } => (source, reason),
        other => panic!("unexpected {other:?}"),
    }
}

/// Update notices (docs/protocol.md, "Update notices") are taken from the
/// coordinator only, and only for the run of their topic: a forged or
/// misdirected notice is rejected before any fetch could start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_notices_are_taken_only_from_the_coordinator_for_its_run() {
    let topic = Topic::Updates {
        run_id: "notice-test".into(),
    };
    let trio = gossip_trio(40, &topic).await;
    let (coordinator, impostor) = (&trio.coordinator, &trio.impostor);
    let (coordinator_key, impostor_key) = (coordinator.key.clone(), impostor.key.clone());
    let mut events = trio.node.events.lock().await;
    let notice = |run_id: &str, round: u64| UpdateNotice {
        run_id: run_id.into(),
        round,
        node: impostor_key.node_id(),
        update_hash: Hash::of(b"update"),
        update_bytes: 6,
    };
    let signed =
        |key: &SigningKey, n: UpdateNotice| Signed::sign(key, &n).unwrap().to_bytes().unwrap();

    // Signed by a peer that is not the coordinator.
    let (source, reason) = rejection(
        impostor,
        &topic,
        signed(&impostor_key, notice("notice-test", 1)),
        &mut events,
    )
    .await;
    assert_eq!(source, trio.impostor_id);
    assert!(reason.contains("signed by"), "{reason}");
    // The coordinator's key, another run's notice.
    let (source, reason) = rejection(
        coordinator,
        &topic,
        signed(&coordinator_key, notice("other-run", 2)),
        &mut events,
    )
    .await;
    assert_eq!(source, trio.coordinator_id);
    assert!(reason.contains("other-run"), "{reason}");
    // Not a notice at all: a plan's bytes on the notices' topic.
    let plan = RoundPlan {
        run_id: "notice-test".into(),
        round: 3,
        params_hash: Hash::ZERO,
        previous_manifest: Hash::ZERO,
        assignments: vec![],
        opened_at_ms: 0,
        deadline_ms: 0,
        bootstrap: vec![],
    };
    let wrong = Signed::sign(&coordinator_key, &plan)
        .unwrap()
        .to_bytes()
        .unwrap();
    let (_, reason) = rejection(coordinator, &topic, wrong, &mut events).await;
    assert!(reason.contains("update notice"), "{reason}");
    // The genuine one gets through, as it was signed.
    publish_when_possible(
        &coordinator.client,
        &topic,
        signed(&coordinator_key, notice("notice-test", 4)),
    )
    .await;
    match wait_for(
        &mut events,
        |e| matches!(e, Event::UpdateNotice { .. }),
        "the genuine notice",
    )
    .await
    {
        Event::UpdateNotice {
            source,
            notice: got,
        } => {
            assert_eq!(source, trio.coordinator_id);
            assert_eq!(got, notice("notice-test", 4));
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(events);
    for peer in [trio.node, trio.coordinator, trio.impostor] {
        peer.stop().await;
    }
}

/// A fake coordinator: enough of the contract to drive a node through
/// rounds (join, plans, commits, manifests), fetching and applying each
/// update exactly as the real one must.
struct FakeCoordinator {
    key: SigningKey,
    run: RunConfig,
    round: u64,
    theta: Vec<f32>,
    optimizer: OuterOptimizer,
    manifests: BTreeMap<u64, Signed<Manifest>>,
    /// Answer the first manifest poll of round 0 with one signed by an impostor.
    forge_first_manifest: bool,
    commits: u64,
    /// Body hash of the last manifest: the chain's head.
    head: Hash,
    /// Sign, for this round, a manifest that does not extend the one before.
    break_chain_at: Option<u64>,
    /// Answer no manifest requests for this round or later (the node waits).
    stall_from: Option<u64>,
}

impl FakeCoordinator {
    fn plan(&self, node: NodeId) -> Signed<RoundPlan> {
        let plan = RoundPlan {
            run_id: self.run.run_id.clone(),
            round: self.round,
            params_hash: Hash::of_f32s(&self.theta),
            previous_manifest: self.head,
            assignments: vec![Assignment {
                node,
                // The run's dataset is this one shard.
                shards: vec![0],
                seed: self.round + 7,
                inner_steps: 2,
                workers: 1,
            }],
            opened_at_ms: 0,
            deadline_ms: u64::MAX,
            bootstrap: vec![],
        };
        Signed::sign(&self.key, &plan).unwrap()
    }

    async fn serve(
        mut self,
        peer: Peer,
        fetcher: Fetcher,
        done: CancellationToken,
    ) -> (Self, Peer) {
        let mut node = None;
        let mut events = peer.events.lock().await;
        loop {
            let event = tokio::select! {
                _ = done.cancelled() => break,
                event = events.recv() => match event { Some(e) => e, None => break },
            };
            let Event::CoordinatorRequest {
                peer: from,
                request,
                channel,
            } = event
            else {
                continue;
            };
            let response = match request {
                CoordinatorRequest::Join(signed) => {
                    let join = signed.verify(None).unwrap();
                    assert_eq!(
                        join.protocol_version,
                        barnraise_protocol::limits::PROTOCOL_VERSION
                    );
                    node = Some(signed.signer);
                    let welcome = Welcome {
                        node: NodeId(signed.signer),
                        config: self.run.clone(),
                        current_round: self.round,
                        params_hash: Hash::of_f32s(&self.theta),
                        checkpoint: None,
                        head_manifest: self.head,
                        bootstrap: vec![],
                    };
                    CoordinatorResponse::Welcome(Signed::sign(&self.key, &welcome).unwrap())
                }
                CoordinatorRequest::CurrentPlan => match node {
                    Some(key) if !self.manifests.contains_key(&self.round) => {
                        CoordinatorResponse::Plan(Some(self.plan(NodeId(key))))
                    }
                    _ => CoordinatorResponse::Plan(None),
                },
                CoordinatorRequest::Commit(signed) => {
                    let commit = signed.verify(node.as_ref()).unwrap();
                    assert_eq!(commit.round, self.round);
                    assert_eq!(commit.base_params_hash, Hash::of_f32s(&self.theta));
                    self.commits += 1;
                    let report = fetcher
                        .fetch(
                            commit.update_hash,
                            Some(commit.update_bytes),
                            &[from],
                            &CancellationToken::new(),
                        )
                        .await
                        .unwrap();
                    assert_eq!(report.size, commit.update_bytes);
                    let payload = fetcher.store().read(&commit.update_hash).unwrap();
                    let schedule: barnraise_protocol::codec::CodecSchedule =
                        self.run.codec.parse().unwrap();
                    let header = barnraise_protocol::codec::peek_header(&payload).unwrap();
                    assert_eq!(
                        header.config,
                        schedule.codec_at(commit.round),
                        "the codec of round {}",
                        commit.round
                    );
                    let base = Hash::of_f32s(&self.theta);
                    apply_round(
                        &mut self.theta,
                        &mut self.optimizer,
                        &AggregationRule::Mean,
                        &[(&payload, 1.0)],
                    )
                    .unwrap();
                    let previous_manifest = match self.break_chain_at {
                        Some(round) if round == self.round => Hash::of(b"a rewritten history"),
                        _ => self.head,
                    };
                    let manifest = Manifest {
                        run_id: self.run.run_id.clone(),
                        round: self.round,
                        previous_manifest,
                        base_params_hash: base,
                        accepted: vec![AcceptedUpdate {
                            node: NodeId(signed.signer),
                            update_hash: commit.update_hash,
                            update_bytes: commit.update_bytes,
                            tokens: commit.tokens,
                            weight: 1.0,
                            compute_ms: commit.compute_ms,
                        }],
                        rejected: vec![],
                        missing: vec![],
                        verified: vec![],
                        voided: vec![],
                        aggregation: "mean".into(),
                        next_params_hash: Hash::of_f32s(&self.theta),
                        closed_at_ms: 0,
                    };
                    let signed_manifest = Signed::sign(&self.key, &manifest).unwrap();
                    self.head = signed_manifest.body_hash();
                    self.manifests.insert(self.round, signed_manifest);
                    self.round += 1;
                    CoordinatorResponse::CommitAccepted {
                        round: commit.round,
                    }
                }
                CoordinatorRequest::Manifest { round }
                    if self.stall_from.is_some_and(|stall| round >= stall) =>
                {
                    CoordinatorResponse::Manifest(None)
                }
                CoordinatorRequest::Manifest { round } => {
                    let genuine = self.manifests.get(&round).cloned();
                    match genuine {
                        Some(signed) if self.forge_first_manifest => {
                            // Same body, an impostor's signature and a wrong hash: must be ignored.
                            self.forge_first_manifest = false;
                            let mut manifest: Manifest = signed.verify(None).unwrap();
                            manifest.next_params_hash = Hash::of(b"forged");
                            let impostor = SigningKey::from_seed([99; 32]).unwrap();
                            CoordinatorResponse::Manifest(Some(
                                Signed::sign(&impostor, &manifest).unwrap(),
                            ))
                        }
                        other => CoordinatorResponse::Manifest(other),
                    }
                }
                CoordinatorRequest::Leave(_) => CoordinatorResponse::Ok,
            };
            peer.client
                .respond_coordinator(channel, response)
                .await
                .unwrap();
        }
        drop(events);
        (self, peer)
    }
}

/// A fake coordinator serving on loopback, and what a test needs of it.
struct RunningFake {
    addr: libp2p::Multiaddr,
    /// The fake's own network handle (to gossip as the coordinator).
    client: barnraise_node::network::Client,
    key: SigningKey,
    shard_bytes: u64,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<(FakeCoordinator, Peer)>,
    _dir: tempfile::TempDir,
}

async fn start_fake(forge_first_manifest: bool, break_chain_at: Option<u64>) -> RunningFake {
    start_fake_stalling(forge_first_manifest, break_chain_at, None).await
}

async fn start_fake_stalling(
    forge_first_manifest: bool,
    break_chain_at: Option<u64>,
    stall_from: Option<u64>,
) -> RunningFake {
    let coordinator_dir = tempfile::tempdir().unwrap();
    let coordinator_store = Arc::new(BlobStore::open(coordinator_dir.path()).unwrap());
    let text = barnraise_trainer::data::corpus::generate(5, 20_000);
    let tokens = barnraise_trainer::data::tokenize_bytes(text.as_bytes());
    let shard_bytes =
        barnraise_trainer::data::encode_shard(&tokens, std::path::Path::new("shard")).unwrap();
    let shard = coordinator_store.put(&shard_bytes).unwrap();
    let model = ModelConfig::preset("tiny").unwrap();
    let theta = model.init_flat(barnraise_node::daemon::INIT_SEED);
    let run = RunConfig {
        run_id: "fake-run".into(),
        model_config_json: serde_json::to_string(&model).unwrap(),
        // A density warm-up (512 of each 1024 in round 0, 181 in round 1,
        // then 64) with a fading residual: the node must switch codecs
        // round by round, across its restart too.
        codec: "topk:1024:64:8,decay=0.95,warm=512:2".into(),
        inner_steps: 2,
        batch_size: 2,
        seq_len: 16,
        inner_lr: 1e-3,
        outer_lr: 0.7,
        outer_momentum: 0.9,
        aggregation: "mean".into(),
        total_rounds: 10,
        overlap_steps: 0,
        dataset: vec![ShardInfo {
            hash: shard,
            tokens: tokens.len() as u64,
            bytes: shard_bytes.len() as u64,
        }],
        held_out: vec![],
    };
    let outer = OuterConfig {
        lr: 0.7,
        momentum: 0.9,
        ..OuterConfig::default()
    };
    let fake = FakeCoordinator {
        key: SigningKey::from_seed([40; 32]).unwrap(),
        optimizer: OuterOptimizer::new(outer, theta.len()),
        theta,
        run,
        round: 0,
        manifests: BTreeMap::new(),
        forge_first_manifest,
        commits: 0,
        head: Hash::ZERO,
        break_chain_at,
        stall_from,
    };
    let coordinator = spawn_peer(40, coordinator_store.clone(), true).await;
    let addr = coordinator
        .addr
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(
            coordinator.key.public().to_peer_id().unwrap(),
        ));
    let fetcher = Fetcher::new(
        coordinator.client.clone(),
        coordinator_store.clone(),
        RateLimiter::unlimited(),
    );
    let stop = CancellationToken::new();
    let client = coordinator.client.clone();
    let key = SigningKey::from_seed([40; 32]).unwrap();
    let task = tokio::spawn(fake.serve(coordinator, fetcher, stop.clone()));
    RunningFake {
        addr,
        client,
        key,
        shard_bytes: shard_bytes.len() as u64,
        stop,
        task,
        _dir: coordinator_dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_runs_rounds_against_a_fake_coordinator_and_resumes_after_restart() {
    let fake = start_fake(true, None).await;
    let coordinator_addr = fake.addr.clone();
    let node_dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        coordinator: coordinator_addr,
        data_dir: node_dir.path().to_path_buf(),
        device: "cpu".into(),
        max_rounds: Some(2),
        // A fake coordinator: no deferred checks to serve for.
        serve_states_before_exit: false,
        poll_interval_ms: 100,
        ..NodeConfig::default()
    };
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(1024);
    let summary = run_node(config.clone(), CancellationToken::new(), Some(events_tx))
        .await
        .unwrap();
    let mut first_events = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        first_events.push(event);
    }
    assert_eq!(summary.rounds_completed, 2, "{summary:?}");
    assert_eq!(summary.rounds_trained, 2);
    assert_eq!(
        summary.resyncs, 0,
        "the forged manifest was ignored, not applied: {first_events:?}"
    );
    assert!(
        summary.bytes_downloaded >= fake.shard_bytes,
        "the shard came over the network"
    );
    assert!(
        summary.bytes_uploaded > 0,
        "the coordinator fetched our updates from us"
    );
    let applied: Vec<_> = first_events
        .iter()
        .filter_map(|e| match e {
            NodeEvent::RoundApplied { round, matched, .. } => Some((*round, *matched)),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![(0, true), (1, true)]);
    assert!(
        first_events.iter().any(
            |e| matches!(e, NodeEvent::Warning { message } if message.contains("does not verify"))
        ),
        "the forged manifest was noticed: {first_events:?}"
    );
    assert!(first_events.iter().any(|e| matches!(
        e,
        NodeEvent::Synced {
            from: SyncSource::SeededInit,
            ..
        }
    )));
    assert!(
        node_dir
            .path()
            .join("receipts/round-000000.manifest")
            .exists()
    );

    // Restart on the same data dir: it resumes from its saved state and
    // cached shard, downloading nothing, and does one more round.
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(1024);
    let config = NodeConfig {
        max_rounds: Some(1),
        // A fake coordinator: no deferred checks to serve for.
        serve_states_before_exit: false,
        ..config
    };
    let summary2 = run_node(config, CancellationToken::new(), Some(events_tx))
        .await
        .unwrap();
    let mut second_events = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        second_events.push(event);
    }
    assert!(
        second_events.iter().any(|e| matches!(
            e,
            NodeEvent::Synced {
                round: 2,
                from: SyncSource::SavedState,
                ..
            }
        )),
        "{second_events:?}"
    );
    assert_eq!(summary2.rounds_completed, 1);
    assert_eq!(
        summary2.bytes_downloaded, 0,
        "nothing fetched again after the restart"
    );

    fake.stop.cancel();
    let (fake, coordinator) = fake.task.await.unwrap();
    assert_eq!(fake.commits, 3);
    assert_eq!(
        summary2.final_params_hash,
        Some(Hash::of_f32s(&fake.theta)),
        "node and coordinator hold the same params"
    );
    coordinator.stop().await;
}

/// The manifest chain (docs/security.md, "The chain is checked"): a
/// coordinator that signs a manifest which does not extend the one the node
/// applied last has rewritten its history; the node refuses to follow it
/// and stops with an error that names both hashes, rather than applying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_breaks_the_chain_stops_the_node() {
    let fake = start_fake(false, Some(1)).await;
    let node_dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        coordinator: fake.addr.clone(),
        data_dir: node_dir.path().to_path_buf(),
        device: "cpu".into(),
        max_rounds: Some(3),
        // A fake coordinator: no deferred checks to serve for.
        serve_states_before_exit: false,
        poll_interval_ms: 100,
        ..NodeConfig::default()
    };
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(1024);
    let result = run_node(config, CancellationToken::new(), Some(events_tx)).await;
    let message = match result {
        Err(e @ barnraise_node::NodeError::Chain(_)) => e.to_string(),
        other => panic!("expected a chain error, got {other:?}"),
    };
    assert!(
        message.contains("round 1") && message.contains("rewritten"),
        "{message}"
    );
    let mut applied = Vec::new();
    while let Ok(event) = events_rx.try_recv() {
        if let NodeEvent::RoundApplied { round, matched, .. } = event {
            applied.push((round, matched));
        }
    }
    assert_eq!(applied, vec![(0, true)], "round 1 was not applied");
    // The saved state stays at round 1: θ_1, which the genuine chain reached.
    let saved = barnraise_node::state::StateDir::new(node_dir.path())
        .load()
        .unwrap()
        .unwrap();
    assert_eq!(saved.record.round, 1);
    fake.stop.cancel();
    let (_, coordinator) = fake.task.await.unwrap();
    coordinator.stop().await;
}

/// Fork detection (issue #13): a coordinator that signs a second, different
/// manifest for a round the node already applied has forked the run's
/// history. The node saves both signed manifests as evidence and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_manifests_for_one_round_are_a_fork_the_node_refuses() {
    let fake = start_fake_stalling(false, None, Some(2)).await;
    let node_dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        coordinator: fake.addr.clone(),
        data_dir: node_dir.path().to_path_buf(),
        device: "cpu".into(),
        max_rounds: Some(5),
        // A fake coordinator: no deferred checks to serve for.
        serve_states_before_exit: false,
        poll_interval_ms: 100,
        ..NodeConfig::default()
    };
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(1024);
    let node = tokio::spawn(run_node(config, CancellationToken::new(), Some(events_tx)));
    // Rounds 0 and 1 are applied; the node then waits for round 2's manifest.
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(120), events_rx.recv()).await {
            Ok(Some(NodeEvent::RoundApplied { round: 1, .. })) => break,
            Ok(Some(_)) => {}
            other => panic!("round 1 was not applied: {other:?}"),
        }
    }
    // The coordinator gossips another manifest for round 0, signed all the same.
    let other = Manifest {
        run_id: "fake-run".into(),
        round: 0,
        previous_manifest: Hash::ZERO,
        base_params_hash: Hash::of(b"another history"),
        accepted: vec![],
        rejected: vec![],
        missing: vec![],
        verified: vec![],
        voided: vec![],
        aggregation: "mean".into(),
        next_params_hash: Hash::of(b"another theta"),
        closed_at_ms: 1,
    };
    let forged = Signed::sign(&fake.key, &other).unwrap();
    let topic = Topic::Manifests {
        run_id: "fake-run".into(),
    };
    fake.client.subscribe(topic.clone()).await.unwrap();
    publish_when_possible(&fake.client, &topic, forged.to_bytes().unwrap()).await;
    let result = tokio::time::timeout(std::time::Duration::from_secs(60), node)
        .await
        .expect("the node stops")
        .unwrap();
    let message = match result {
        Err(e @ barnraise_node::NodeError::Chain(_)) => e.to_string(),
        other => panic!("expected a fork error, got {other:?}"),
    };
    assert!(
        message.contains("two different manifests for round 0"),
        "{message}"
    );
    let evidence: Vec<_> = std::fs::read_dir(node_dir.path().join("forks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(evidence.len(), 2, "both manifests kept: {evidence:?}");
    for path in evidence {
        let bytes = std::fs::read(&path).unwrap();
        let signed: Signed<Manifest> = Signed::from_bytes(&bytes).unwrap();
        let manifest = signed.verify(Some(&fake.key.public())).unwrap();
        assert_eq!(manifest.round, 0, "{}", path.display());
    }
    fake.stop.cancel();
    let (_, coordinator) = fake.task.await.unwrap();
    coordinator.stop().await;
}

/// Cluster mode's promise (issue #7): a node of N workers lands on the same
/// global params as N separate nodes fed the same shards and seeds, while
/// uploading one update instead of N. Both sides run the daemon's own
/// training path (`cluster::train_workers`, `cluster::reduce`), encode with
/// the fp32 codec and aggregate with `apply_round` exactly as the
/// coordinator does (manifest weights = tokens over the round's total).
#[test]
fn a_cluster_node_matches_separate_nodes_and_uploads_one_update() {
    use barnraise_node::cluster::{reduce, split_assignment, train_workers};
    use barnraise_protocol::codec::{CodecConfig, Encoder};
    use barnraise_trainer::{InnerConfig, Trainer};

    const WORKERS: usize = 3;
    const ROUNDS: u64 = 2;
    let model = ModelConfig::preset("tiny").unwrap();
    let shards: Vec<Vec<u16>> = (0..WORKERS as u64)
        .map(|i| {
            let text = barnraise_trainer::data::corpus::generate(100 + i, 8_000);
            barnraise_trainer::data::tokenize_bytes(text.as_bytes())
        })
        .collect();
    let hashes: Vec<Hash> = shards
        .iter()
        .map(|t| {
            Hash::of(&barnraise_trainer::data::encode_shard(t, std::path::Path::new("s")).unwrap())
        })
        .collect();
    let tokens_of = |h: &Hash| -> Vec<u16> {
        let i = hashes.iter().position(|x| x == h).unwrap();
        shards[i].clone()
    };
    let trainer = || Some(Trainer::new(&model, candle_core::Device::Cpu, 0).unwrap());
    let outer = OuterConfig {
        lr: 0.7,
        momentum: 0.9,
        ..OuterConfig::default()
    };
    let theta0 = model.init_flat(0);
    let params = theta0.len();

    let mut cluster_theta = theta0.clone();
    let mut cluster_outer = OuterOptimizer::new(outer, params);
    let mut cluster_slots: Vec<Option<Trainer>> = (0..WORKERS).map(|_| trainer()).collect();
    let mut cluster_encoder = Encoder::new(CodecConfig::Fp32, params).unwrap();
    let mut cluster_bytes = 0usize;

    let mut separate_theta = theta0.clone();
    let mut separate_outer = OuterOptimizer::new(outer, params);
    let mut separate_slots: Vec<Vec<Option<Trainer>>> =
        (0..WORKERS).map(|_| vec![trainer()]).collect();
    let mut separate_encoders: Vec<Encoder> = (0..WORKERS)
        .map(|_| Encoder::new(CodecConfig::Fp32, params).unwrap())
        .collect();
    let mut separate_bytes = 0usize;

    for round in 0..ROUNDS {
        let inner = InnerConfig {
            steps: 3,
            batch_size: 2,
            seq_len: 16,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup: 1,
            schedule_steps: (ROUNDS * 3) as usize,
            start_step: (round * 3) as usize,
            ..InnerConfig::default()
        };
        let plans = split_assignment(&hashes, 1000 + round, WORKERS);
        let tokens: Vec<Vec<u16>> = plans
            .iter()
            .map(|p| p.shards.iter().flat_map(tokens_of).collect())
            .collect();
        let seeds: Vec<u64> = plans.iter().map(|p| p.seed).collect();

        // One node, three workers, one upload; every worker reports each step.
        let reported = Mutex::new(Vec::new());
        let results = train_workers(
            &mut cluster_slots,
            &cluster_theta,
            &tokens,
            &seeds,
            &inner,
            &Default::default(),
            None,
            &|worker, step, _| {
                reported.lock().unwrap().push((worker, step));
                true
            },
        );
        let mut reported = reported.into_inner().unwrap();
        reported.sort();
        let expected: Vec<(usize, usize)> = (0..WORKERS)
            .flat_map(|w| (1..=inner.steps).map(move |s| (w, s)))
            .collect();
        assert_eq!(
            reported, expected,
            "progress from every worker at every step"
        );
        let update = reduce(results, params).unwrap();
        assert_eq!(update.workers as usize, WORKERS);
        let payload = cluster_encoder.encode(&update.delta).unwrap();
        cluster_bytes += payload.len();
        apply_round(
            &mut cluster_theta,
            &mut cluster_outer,
            &AggregationRule::Mean,
            &[(&payload, 1.0)],
        )
        .unwrap();

        // Three nodes, one worker each, given worker i's shards and seed.
        let mut payloads = Vec::new();
        let mut node_tokens = Vec::new();
        for i in 0..WORKERS {
            let results = train_workers(
                &mut separate_slots[i],
                &separate_theta,
                &tokens[i..=i],
                &seeds[i..=i],
                &inner,
                &Default::default(),
                None,
                &|_, _, _| true,
            );
            let update = reduce(results, params).unwrap();
            node_tokens.push(update.tokens);
            payloads.push(separate_encoders[i].encode(&update.delta).unwrap());
        }
        separate_bytes += payloads.iter().map(Vec::len).sum::<usize>();
        let total: f64 = node_tokens.iter().map(|&t| t as f64).sum();
        let weighted: Vec<(&[u8], f32)> = payloads
            .iter()
            .zip(&node_tokens)
            .map(|(p, &t)| (p.as_slice(), (t as f64 / total) as f32))
            .collect();
        apply_round(
            &mut separate_theta,
            &mut separate_outer,
            &AggregationRule::Mean,
            &weighted,
        )
        .unwrap();
    }

    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    let moved = max_diff(&cluster_theta, &theta0);
    let apart = max_diff(&cluster_theta, &separate_theta);
    eprintln!(
        "cluster vs separate: max |Δθ| {apart:e}; params moved up to {moved:e}; bytes {cluster_bytes} vs {separate_bytes}"
    );
    assert!(moved > 1e-3, "training moved the params ({moved})");
    assert!(
        apart <= 1e-5 * moved.max(1.0),
        "a cluster of {WORKERS} ended {apart} away from {WORKERS} separate nodes"
    );
    assert_eq!(
        cluster_bytes * WORKERS,
        separate_bytes,
        "the cluster uploads 1/{WORKERS} of the bytes"
    );
}

/// A worker that crashes mid-round is left out: the node's update is the
/// token-weighted mean of the others, claims only their tokens, and the
/// crashed worker's trainer is rebuilt, not reused.
#[test]
fn a_crashing_worker_is_left_out_of_the_cluster_update() {
    use barnraise_node::cluster::{reduce, train_workers};
    use barnraise_trainer::{InnerConfig, Trainer};

    let model = ModelConfig::preset("tiny").unwrap();
    let text = barnraise_trainer::data::corpus::generate(7, 8_000);
    let tokens = barnraise_trainer::data::tokenize_bytes(text.as_bytes());
    let theta = model.init_flat(0);
    let inner = InnerConfig {
        steps: 2,
        batch_size: 2,
        seq_len: 16,
        warmup: 1,
        ..InnerConfig::default()
    };
    let slots = || -> Vec<Option<Trainer>> {
        (0..3)
            .map(|_| Some(Trainer::new(&model, candle_core::Device::Cpu, 0).unwrap()))
            .collect()
    };
    let shares = vec![tokens.clone(), tokens.clone(), tokens];
    let seeds = [1, 2, 3];

    let mut crashed = slots();
    let results = train_workers(
        &mut crashed,
        &theta,
        &shares,
        &seeds,
        &inner,
        &Default::default(),
        Some(1),
        &|_, _, _| true,
    );
    assert!(matches!(&results[1], Err(f) if f.error.contains("crashes mid-round")));
    assert!(
        crashed[1].is_none(),
        "the crashed worker's trainer is dropped"
    );
    assert!(crashed[0].is_some() && crashed[2].is_some());
    let update = reduce(results, theta.len()).unwrap();
    assert_eq!(update.workers, 2);
    assert_eq!(update.tokens, 2 * inner.tokens());
    assert_eq!(update.failures.len(), 1);

    // The same two workers without the crash give the same update.
    let mut healthy = slots();
    let results = train_workers(
        &mut healthy,
        &theta,
        &shares,
        &seeds,
        &inner,
        &Default::default(),
        None,
        &|_, _, _| true,
    );
    let survivors: Vec<_> = results
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, r)| r)
        .collect();
    let expected = reduce(survivors, theta.len()).unwrap();
    let apart = update
        .delta
        .iter()
        .zip(&expected.delta)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        apart < 1e-6,
        "the survivors' mean, nothing of the crashed worker ({apart})"
    );

    // Every worker crashing means no update at all, not an empty one.
    let mut alone = vec![Some(
        Trainer::new(&model, candle_core::Device::Cpu, 0).unwrap(),
    )];
    let results = train_workers(
        &mut alone,
        &theta,
        &shares[..1],
        &seeds[..1],
        &inner,
        &Default::default(),
        Some(0),
        &|_, _, _| true,
    );
    assert!(reduce(results, theta.len()).is_err());
}

/// A coordinator's welcome names the model the node will build. Found while
/// writing the `wire` fuzz target's welcome check (docs/security.md): a
/// config with 10^12 layers passed `validate`, and the node then listed
/// every layer to count params (hours, then out of memory); widths whose
/// product overflows panicked the count. Each is now refused by
/// `parse_run_config` before anything is sized.
#[test]
fn a_welcome_naming_an_impossible_model_is_refused() {
    use barnraise_protocol::messages::RunConfig;
    let tiny = ModelConfig::preset("tiny").unwrap();
    let run = |model: &ModelConfig| RunConfig {
        run_id: "r".into(),
        model_config_json: serde_json::to_string(model).unwrap(),
        codec: "topk".into(),
        inner_steps: 4,
        batch_size: 2,
        seq_len: 64,
        inner_lr: 1e-3,
        outer_lr: 0.7,
        outer_momentum: 0.9,
        aggregation: "mean".into(),
        total_rounds: 3,
        overlap_steps: 0,
        dataset: Vec::new(),
        held_out: Vec::new(),
    };
    assert!(barnraise_node::daemon::parse_run_config(&run(&tiny)).is_ok());
    for hostile in [
        ModelConfig {
            n_layers: 1_000_000_000_000,
            ..tiny.clone()
        },
        ModelConfig {
            d_model: 1 << 62,
            n_heads: 2,
            ..tiny.clone()
        },
        ModelConfig {
            vocab_size: 65_536,
            d_ff: 1 << 40,
            ..tiny.clone()
        },
    ] {
        let result = barnraise_node::daemon::parse_run_config(&run(&hostile));
        assert!(result.is_err(), "{hostile:?} was accepted");
    }
}
