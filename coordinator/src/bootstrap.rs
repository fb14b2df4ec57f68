//! The run's bootstrap peers, carried in every welcome and plan: the
//! coordinator first, then the nodes most recently active (joined or had an
//! update accepted), each with those of the addresses it declared when it
//! joined that are on the IP its connection came from. A node behind a NAT
//! connects from its router's address, which it does not listen on, so it
//! is not handed out: its private addresses would send others to a machine
//! on their own LAN, or nowhere, and others reach it through the relay.
//! Nodes add them to their DHT routing table, so they find each other's
//! blobs without asking the coordinator who holds what (docs/protocol.md,
//! "Discovery").

use barnraise_protocol::identity::NodeId;
use barnraise_protocol::limits::{MAX_BOOTSTRAP_ADDRS, MAX_BOOTSTRAP_PEERS, MAX_TEXT_BYTES};
use barnraise_protocol::messages::BootstrapPeer;
use libp2p::{Multiaddr, PeerId};
use std::collections::VecDeque;

/// How many recently active nodes the book remembers (more than it hands
/// out, so that a node asking is left out without shortening the list).
const REMEMBERED: usize = 4 * MAX_BOOTSTRAP_PEERS;

/// Recently active peers and where they listen, most recent first.
#[derive(Debug, Clone)]
pub struct BootstrapBook {
    own: BootstrapPeer,
    recent: VecDeque<(NodeId, BootstrapPeer)>,
}

/// The addresses worth handing out: ones that parse, not too long, on
/// `ip` when given, at most [`MAX_BOOTSTRAP_ADDRS`].
fn usable(addrs: impl IntoIterator<Item = String>, ip: Option<std::net::IpAddr>) -> Vec<String> {
    use libp2p::multiaddr::Protocol;
    let on_ip = |addr: &Multiaddr| {
        ip.is_none_or(|ip| {
            addr.iter().any(|p| match p {
                Protocol::Ip4(a) => std::net::IpAddr::V4(a) == ip,
                Protocol::Ip6(a) => std::net::IpAddr::V6(a) == ip,
                _ => false,
            })
        })
    };
    addrs
        .into_iter()
        .filter(|a| a.len() <= MAX_TEXT_BYTES)
        .filter(|a| a.parse::<Multiaddr>().is_ok_and(|m| on_ip(&m)))
        .take(MAX_BOOTSTRAP_ADDRS)
        .collect()
}

impl BootstrapBook {
    /// A book that starts with the coordinator itself.
    pub fn new(coordinator: PeerId, addrs: &[Multiaddr]) -> Self {
        BootstrapBook {
            own: BootstrapPeer {
                peer: coordinator.to_string(),
                addrs: usable(addrs.iter().map(Multiaddr::to_string), None),
            },
            recent: VecDeque::new(),
        }
    }

    /// A node joined (or re-joined) with these listen addresses, over a
    /// connection from `observed` (None: relayed, or unknown). Only its
    /// addresses on that IP are handed out; a node with none is not.
    pub fn joined(
        &mut self,
        node: NodeId,
        listen_addrs: &[String],
        observed: Option<std::net::IpAddr>,
    ) {
        self.recent.retain(|(n, _)| *n != node);
        let Some(ip) = observed else {
            return;
        };
        let addrs = usable(listen_addrs.iter().cloned(), Some(ip));
        let Ok(peer) = node.0.to_peer_id() else {
            return;
        };
        if addrs.is_empty() {
            return;
        }
        self.recent.push_front((
            node,
            BootstrapPeer {
                peer: peer.to_string(),
                addrs,
            },
        ));
        self.recent.truncate(REMEMBERED);
    }

    /// A node's work was accepted: it is the most recently active.
    pub fn active(&mut self, node: &NodeId) {
        if let Some(i) = self.recent.iter().position(|(n, _)| n == node)
            && let Some(entry) = self.recent.remove(i)
        {
            self.recent.push_front(entry);
        }
    }

    /// The coordinator, then up to [`MAX_BOOTSTRAP_PEERS`] − 1 recent
    /// nodes other than `except` (a node need not be told about itself).
    pub fn peers(&self, except: Option<&NodeId>) -> Vec<BootstrapPeer> {
        std::iter::once(self.own.clone())
            .chain(
                self.recent
                    .iter()
                    .filter(|(n, _)| Some(n) != except)
                    .map(|(_, p)| p.clone()),
            )
            .take(MAX_BOOTSTRAP_PEERS)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::identity::SigningKey;

    fn node(seed: u8) -> NodeId {
        SigningKey::from_seed([seed; 32])
            .unwrap_or_else(|e| panic!("{e}"))
            .node_id()
    }

    fn book() -> BootstrapBook {
        let coordinator = node(200);
        let peer = coordinator.0.to_peer_id().unwrap_or_else(|e| panic!("{e}"));
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        BootstrapBook::new(peer, &[addr])
    }

    #[test]
    fn coordinator_first_then_most_recent_nodes_without_the_asker() {
        let mut book = book();
        for seed in 1..=3 {
            let ip = std::net::IpAddr::from([10, 0, 0, seed]);
            book.joined(node(seed), &[format!("/ip4/{ip}/tcp/4001")], Some(ip));
        }
        book.active(&node(1));
        let peers = book.peers(Some(&node(3)));
        let addrs: Vec<&str> = peers.iter().map(|p| p.addrs[0].as_str()).collect();
        assert_eq!(
            addrs,
            [
                "/ip4/127.0.0.1/tcp/4001",
                "/ip4/10.0.0.1/tcp/4001",
                "/ip4/10.0.0.2/tcp/4001"
            ]
        );
        let id = node(1).0.to_peer_id().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(peers[1].peer, id.to_string());
    }

    #[test]
    fn a_node_behind_a_nat_is_not_handed_out() {
        let mut book = book();
        // It listens on its LAN address, and its connection comes from the
        // router's public one.
        let router = std::net::IpAddr::from([203, 0, 113, 9]);
        book.joined(node(1), &["/ip4/192.168.1.2/tcp/4001".into()], Some(router));
        // A public node lists several addresses; only the one it connects
        // from is handed out.
        let public = std::net::IpAddr::from([198, 51, 100, 7]);
        book.joined(
            node(2),
            &[
                "/ip4/192.168.5.5/tcp/4001".into(),
                "/ip4/198.51.100.7/udp/4001/quic-v1".into(),
            ],
            Some(public),
        );
        // Seen only through a relay: nothing to vouch for.
        book.joined(node(3), &["/ip4/198.51.100.8/tcp/4001".into()], None);
        let peers = book.peers(None);
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert_eq!(peers[1].addrs, ["/ip4/198.51.100.7/udp/4001/quic-v1"]);
    }

    #[test]
    fn lists_stay_bounded_and_bad_addresses_are_dropped() {
        let mut book = book();
        for seed in 1..=100u8 {
            let ip = std::net::IpAddr::from([10, 0, 1, seed]);
            let good = format!("/ip4/{ip}/tcp/4001");
            let long = format!("/dns4/{}/tcp/1", "a".repeat(MAX_TEXT_BYTES));
            book.joined(
                node(seed),
                &[
                    "not an address".into(),
                    long,
                    good.clone(),
                    good.clone(),
                    good.clone(),
                    good.clone(),
                    good,
                ],
                Some(ip),
            );
        }
        // A node with no usable address is not handed out, and a re-join
        // replaces the old entry.
        let ip = std::net::IpAddr::from([10, 0, 2, 1]);
        book.joined(node(101), &["garbage".into()], Some(ip));
        book.joined(node(100), &["/ip4/10.0.2.1/tcp/4001".into()], Some(ip));
        let peers = book.peers(None);
        assert_eq!(peers.len(), MAX_BOOTSTRAP_PEERS);
        assert_eq!(peers[1].addrs, ["/ip4/10.0.2.1/tcp/4001"]);
        assert!(peers.iter().all(|p| p.addrs.len() <= MAX_BOOTSTRAP_ADDRS));
        assert!(
            peers
                .iter()
                .flat_map(|p| &p.addrs)
                .all(|a| a.starts_with("/ip4/"))
        );
        assert!(book.recent.len() <= REMEMBERED);
    }
}
