//! The run's Kademlia DHT as every peer configures it. Its one job is
//! finding providers: who holds a blob (a shard, an update, a checkpoint).
//! Every peer runs it in server mode, the coordinator included, so the
//! coordinator is the rendezvous every node can bootstrap from, and nodes
//! on one network answer each other's lookups (docs/protocol.md, "Discovery
//! and providers").
//!
//! The record store is in memory and bounded: at most
//! [`MAX_PROVIDED_KEYS`] blob hashes, [`MAX_PROVIDERS_PER_KEY`] providers
//! each. Provider records expire after [`PROVIDER_TTL`], which is the
//! retention of the run's blobs on the DHT: a peer that still holds a blob
//! re-announces it every [`PROVIDER_REPUBLISH`].

use barnraise_protocol::Hash;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::{PeerId, StreamProtocol, kad};
use std::time::Duration;

/// Blob hashes one peer keeps provider records for (its own and others').
pub const MAX_PROVIDED_KEYS: usize = 8192;
/// Providers remembered per blob; further announcements are ignored, which
/// also bounds what a peer announcing blobs it does not hold can take up.
pub const MAX_PROVIDERS_PER_KEY: usize = 20;
/// How long a provider record lives without being re-announced.
pub const PROVIDER_TTL: Duration = Duration::from_secs(6 * 3600);
/// How often a peer re-announces the blobs it holds.
pub const PROVIDER_REPUBLISH: Duration = Duration::from_secs(3600);
/// How long one lookup may run.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

/// The DHT key of a blob: its SHA-256.
pub fn key(hash: &Hash) -> kad::RecordKey {
    kad::RecordKey::new(&hash.0)
}

/// A Kademlia behaviour in server mode with the run's protocol name and the
/// bounds above.
pub fn behaviour(peer_id: PeerId) -> kad::Behaviour<MemoryStore> {
    let mut config = kad::Config::new(StreamProtocol::new(crate::KAD_PROTOCOL));
    config.set_query_timeout(QUERY_TIMEOUT);
    config.set_provider_record_ttl(Some(PROVIDER_TTL));
    config.set_provider_publication_interval(Some(PROVIDER_REPUBLISH));
    let store = MemoryStore::with_config(
        peer_id,
        MemoryStoreConfig {
            max_provided_keys: MAX_PROVIDED_KEYS,
            max_providers_per_key: MAX_PROVIDERS_PER_KEY,
            ..MemoryStoreConfig::default()
        },
    );
    let mut kad = kad::Behaviour::with_config(peer_id, store, config);
    // Small private meshes have no confirmed public addresses, so automatic
    // mode would leave every peer a DHT client and no one to ask.
    kad.set_mode(Some(kad::Mode::Server));
    kad
}

/// The (peer, address) pairs of a welcome's or plan's bootstrap list that
/// parse, leaving out `local` and anything past the protocol's bounds.
/// Addresses that end in another peer's `/p2p/` are dropped: a hostile list
/// cannot point one peer id at another's address.
pub fn bootstrap_addrs(
    peers: &[barnraise_protocol::messages::BootstrapPeer],
    local: &libp2p::PeerId,
) -> Vec<(libp2p::PeerId, libp2p::Multiaddr)> {
    use barnraise_protocol::limits::{MAX_BOOTSTRAP_ADDRS, MAX_BOOTSTRAP_PEERS};
    use libp2p::multiaddr::Protocol;
    let mut out = Vec::new();
    for entry in peers.iter().take(MAX_BOOTSTRAP_PEERS) {
        let Ok(peer) = entry.peer.parse::<libp2p::PeerId>() else {
            continue;
        };
        if &peer == local {
            continue;
        }
        for text in entry.addrs.iter().take(MAX_BOOTSTRAP_ADDRS) {
            let Ok(mut addr) = text.parse::<libp2p::Multiaddr>() else {
                continue;
            };
            match addr.iter().last() {
                Some(Protocol::P2p(named)) if named != peer => continue,
                Some(Protocol::P2p(_)) => {
                    addr.pop();
                }
                _ => {}
            }
            out.push((peer, addr));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_blob_hash() {
        let hash = Hash::of(b"shard");
        assert_eq!(key(&hash).as_ref(), &hash.0[..]);
        assert_ne!(key(&hash), key(&Hash::of(b"other")));
    }

    #[test]
    fn the_behaviour_serves_the_run_protocol() {
        let key =
            barnraise_protocol::SigningKey::from_seed([7; 32]).unwrap_or_else(|e| panic!("{e}"));
        let peer = key.public().to_peer_id().unwrap_or_else(|e| panic!("{e}"));
        let kad = behaviour(peer);
        assert_eq!(kad.mode(), kad::Mode::Server);
        assert_eq!(
            kad.protocol_names(),
            &[StreamProtocol::new(crate::KAD_PROTOCOL)]
        );
    }

    #[test]
    fn bootstrap_lists_parse_what_they_can_and_nothing_else() {
        use barnraise_protocol::messages::BootstrapPeer;
        let local = libp2p::PeerId::random();
        let (a, b) = (libp2p::PeerId::random(), libp2p::PeerId::random());
        let peers = vec![
            BootstrapPeer {
                peer: a.to_string(),
                addrs: vec![
                    "/ip4/10.0.0.1/tcp/4001".into(),
                    format!("/ip4/10.0.0.1/udp/4001/quic-v1/p2p/{a}"),
                    format!("/ip4/10.0.0.9/tcp/4001/p2p/{b}"),
                    "not an address".into(),
                ],
            },
            BootstrapPeer {
                peer: "not a peer".into(),
                addrs: vec!["/ip4/10.0.0.2/tcp/4001".into()],
            },
            BootstrapPeer {
                peer: local.to_string(),
                addrs: vec!["/ip4/10.0.0.3/tcp/4001".into()],
            },
        ];
        let got: Vec<(libp2p::PeerId, String)> = super::bootstrap_addrs(&peers, &local)
            .into_iter()
            .map(|(p, addr)| (p, addr.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (a, "/ip4/10.0.0.1/tcp/4001".to_string()),
                (a, "/ip4/10.0.0.1/udp/4001/quic-v1".to_string()),
            ]
        );
        let flood: Vec<BootstrapPeer> = (0..100)
            .map(|_| BootstrapPeer {
                peer: libp2p::PeerId::random().to_string(),
                addrs: vec!["/ip4/10.0.0.1/tcp/1".into(); 50],
            })
            .collect();
        let bound = barnraise_protocol::limits::MAX_BOOTSTRAP_PEERS
            * barnraise_protocol::limits::MAX_BOOTSTRAP_ADDRS;
        assert_eq!(super::bootstrap_addrs(&flood, &local).len(), bound);
    }
}
