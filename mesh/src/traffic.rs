//! What a peer's network moved, counted where the bytes are framed: the
//! numbers behind `barnraise up --json`'s `"network"` object and the
//! `*_bytes_total` series of both sides' `/metrics` (docs/protocol.md,
//! "Traffic counters").

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes one request-response protocol moved, counted at the framing
/// (length prefix included; noise, yamux and TCP overhead not).
#[derive(Debug, Default)]
pub struct Counter {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Counter {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// A peer's traffic, by protocol. Cheap to clone: the counters are shared.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    /// `/barnraise/coordinator/1`: joins, commits, plans and manifests asked for.
    pub coordinator: Arc<Counter>,
    /// `/barnraise/blob/1`: shards, updates, checkpoints.
    pub blob: Arc<Counter>,
    /// Gossip this peer published itself (bytes × 1; what gossipsub sends to
    /// each mesh peer and forwards for others is not counted).
    pub gossip_published: Arc<AtomicU64>,
}

impl Traffic {
    /// Everything this peer sent that is counted.
    pub fn sent(&self) -> u64 {
        self.coordinator.sent() + self.blob.sent() + self.gossip_published.load(Ordering::Relaxed)
    }

    /// Everything this peer received that is counted (gossip excluded).
    pub fn received(&self) -> u64 {
        self.coordinator.received() + self.blob.received()
    }

    pub fn published(&self, bytes: usize) {
        self.gossip_published
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
