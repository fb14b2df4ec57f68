//! Per-peer rate limits on the requests that cost the coordinator work and
//! ledger writes: joins and commits (docs/running-a-coordinator.md,
//! "Admission"). A token bucket per peer, in a map of bounded size: when it
//! is full, peers whose bucket has refilled are forgotten (they lose
//! nothing), and if that is not enough the map starts over, so a flood of
//! fresh peer ids costs memory in proportion to the cap, never more.

use libp2p::PeerId;
use std::collections::HashMap;
use std::time::Instant;

/// The refusal text of a rate-limited or busy request. Nodes retry a
/// refusal that starts with it instead of giving up
/// (`barnraise_protocol::messages::RETRY_LATER`).
pub use barnraise_protocol::messages::RETRY_LATER;

/// Token buckets per peer.
#[derive(Debug)]
pub struct PeerLimiter {
    burst: f64,
    per_second: f64,
    max_peers: usize,
    buckets: HashMap<PeerId, (f64, Instant)>,
}

impl PeerLimiter {
    /// `burst` requests at once, refilled at `per_minute`, for at most
    /// `max_peers` peers remembered at a time.
    pub fn new(burst: u32, per_minute: u32, max_peers: usize) -> PeerLimiter {
        PeerLimiter {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute.max(1)) / 60.0,
            max_peers: max_peers.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether `peer` may make one more request at `now` (and counts it).
    pub fn allow(&mut self, peer: PeerId, now: Instant) -> bool {
        if !self.buckets.contains_key(&peer) && self.buckets.len() >= self.max_peers {
            let (burst, per_second) = (self.burst, self.per_second);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * per_second < burst
            });
            if self.buckets.len() >= self.max_peers {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(peer).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second)
            .min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Peers remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn peer(seed: u8) -> PeerId {
        barnraise_protocol::SigningKey::from_seed([seed; 32])
            .and_then(|k| k.public().to_peer_id())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_burst_then_the_refill_rate() {
        let mut limiter = PeerLimiter::new(3, 60, 100);
        let t0 = Instant::now();
        let a = peer(1);
        let allowed = (0..10).filter(|_| limiter.allow(a, t0)).count();
        assert_eq!(allowed, 3, "the burst");
        assert!(!limiter.allow(a, t0 + Duration::from_millis(500)));
        assert!(
            limiter.allow(a, t0 + Duration::from_millis(1100)),
            "one a second"
        );
        assert!(limiter.allow(peer(2), t0), "peers are limited apart");
    }

    #[test]
    fn memory_is_bounded_by_the_peer_cap() {
        let mut limiter = PeerLimiter::new(2, 60, 50);
        let t0 = Instant::now();
        for i in 0..200u32 {
            let p = peer((i % 250) as u8);
            limiter.allow(p, t0);
            assert!(limiter.len() <= 50, "{}", limiter.len());
        }
        // A flood of new ids does not lock out a peer that is within its budget.
        let mut limiter = PeerLimiter::new(2, 60, 4);
        let honest = peer(9);
        assert!(limiter.allow(honest, t0));
        for i in 10..20 {
            limiter.allow(peer(i), t0);
        }
        assert!(limiter.allow(honest, t0 + Duration::from_secs(2)));
    }
}
