//! Gossipsub as every peer of a run configures it. Plans and manifests are
//! the only gossip; both are signed by the coordinator, and a peer forwards
//! one only after checking that signature itself (`validate_messages`).

use barnraise_protocol::Hash;
use barnraise_protocol::limits::{ENVELOPE_OVERHEAD, MAX_MANIFEST_BYTES};
use libp2p::gossipsub;
use std::time::Duration;

/// Largest gossip message: a signed manifest plus room for gossipsub's own
/// framing.
pub const MAX_GOSSIP_BYTES: usize = MAX_MANIFEST_BYTES + ENVELOPE_OVERHEAD + 64 * 1024;

/// A message's id: the hash of its bytes. Content-addressed, so the same
/// plan republished (or forwarded by any peer) is one message everywhere,
/// and node and coordinator agree on every id.
pub fn message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(Hash::of(&message.data).to_hex())
}

/// The gossipsub config of every peer of a run.
pub fn config() -> Result<gossipsub::Config, String> {
    gossipsub::ConfigBuilder::default()
        // Every message signed by its publisher's libp2p key; the payload's
        // own signature (the coordinator's) is checked by the receiver
        // before it reports the message valid and gossipsub forwards it.
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .message_id_fn(message_id)
        // Small meshes (a coordinator and a few nodes) form quickly.
        .heartbeat_interval(Duration::from_millis(500))
        .mesh_n_low(1)
        .mesh_outbound_min(0)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(data: &[u8], seqno: u64) -> gossipsub::Message {
        gossipsub::Message {
            source: None,
            data: data.to_vec(),
            sequence_number: Some(seqno),
            topic: gossipsub::IdentTopic::new("t").hash(),
        }
    }

    #[test]
    fn ids_depend_on_the_bytes_only() {
        let a = message(b"plan 7", 1);
        let b = message(b"plan 7", 99);
        let c = message(b"plan 8", 1);
        assert_eq!(message_id(&a), message_id(&b), "same bytes, another seqno");
        assert_ne!(message_id(&a), message_id(&c));
        assert_eq!(
            message_id(&a),
            gossipsub::MessageId::from(Hash::of(b"plan 7").to_hex()),
            "the id is the SHA-256 of the bytes, in hex"
        );
    }

    #[test]
    fn the_config_builds_and_caps_messages() {
        let config = config().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.max_transmit_size(), MAX_GOSSIP_BYTES);
        assert!(config.validate_messages());
    }
}
