//! Test support: real swarms on 127.0.0.1 port 0, handed back as handles.

#![allow(dead_code)]

use barnraise_node::limiter::RateLimiter;
use barnraise_node::network::{self, BlobSource, Client, Event, NetworkConfig, Topic};
use barnraise_protocol::SigningKey;
use libp2p::Multiaddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen in well under a
/// second on loopback before it gives up (a failure, not a timing check).
pub const PATIENCE: Duration = Duration::from_secs(30);

pub struct Peer {
    pub client: Client,
    pub events: Mutex<mpsc::Receiver<Event>>,
    pub addr: Multiaddr,
    pub key: SigningKey,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A swarm with the identity seeded by `seed`, serving `blobs`.
pub async fn spawn_peer(seed: u8, blobs: Arc<dyn BlobSource>, serve_coordinator: bool) -> Peer {
    let key = SigningKey::from_seed([seed; 32]).unwrap();
    let config = NetworkConfig {
        keypair: key.to_libp2p().unwrap(),
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        blobs,
        upload: RateLimiter::unlimited(),
        coordinator_key: None,
        serve_coordinator,
        link: None,
    };
    let (client, events, mut event_loop) = network::new(config).unwrap();
    let addrs = event_loop.wait_for_listen_addrs(PATIENCE).await;
    let addr = addrs.into_iter().next().expect("a listen address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(event_loop.run(shutdown.clone()));
    Peer {
        client,
        events: Mutex::new(events),
        addr,
        key,
        shutdown,
        task,
    }
}

/// Deterministic incompressible-looking bytes (xorshift64*).
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Publishes once gossipsub knows a subscriber (right after a dial it may not yet).
pub async fn publish_when_possible(client: &Client, topic: &Topic, data: Vec<u8>) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match client.publish(topic.clone(), data.clone()).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("could not publish: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The first event matching `want`, skipping others.
pub async fn wait_for(
    events: &mut mpsc::Receiver<Event>,
    want: impl Fn(&Event) -> bool,
    what: &str,
) -> Event {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if want(&event) => return event,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("gave up waiting for {what}"),
        }
    }
}
