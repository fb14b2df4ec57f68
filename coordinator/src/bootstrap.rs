//! The run's bootstrap peers, carried in every welcome and plan: the
//! coordinator first, then the nodes most recently active (joined or had an
//! update accepted), each with the addresses it declared when it joined.
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

/// The addresses worth handing out: ones that parse, not too long, at most
/// [`MAX_BOOTSTRAP_ADDRS`].
fn usable(addrs: impl IntoIterator<Item = String>) -> Vec<String> {
    addrs
        .into_iter()
        .filter(|a| a.len() <= MAX_TEXT_BYTES && a.parse::<Multiaddr>().is_ok())
        .take(MAX_BOOTSTRAP_ADDRS)
        .collect()
}

impl BootstrapBook {
    /// A book that starts with the coordinator itself.
    pub fn new(coordinator: PeerId, addrs: &[Multiaddr]) -> Self {
        BootstrapBook {
            own: BootstrapPeer {
                peer: coordinator.to_string(),
                addrs: usable(addrs.iter().map(Multiaddr::to_string)),
            },
            recent: VecDeque::new(),
        }
    }

    /// A node joined (or re-joined) with these listen addresses. Nodes with
    /// no usable address are not handed out.
    pub fn joined(&mut self, node: NodeId, listen_addrs: &[String]) {
        self.recent.retain(|(n, _)| *n != node);
        let addrs = usable(listen_addrs.iter().cloned());
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
            book.joined(node(seed), &[format!("/ip4/10.0.0.{seed}/tcp/4001")]);
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
    fn lists_stay_bounded_and_bad_addresses_are_dropped() {
        let mut book = book();
        for seed in 1..=100u8 {
            let good = format!("/ip4/10.0.1.{seed}/tcp/4001");
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
            );
        }
        // A node with no usable address is not handed out, and a re-join
        // replaces the old entry.
        book.joined(node(101), &["garbage".into()]);
        book.joined(node(100), &["/ip4/10.0.2.1/tcp/4001".into()]);
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
