//! barnraise-protocol: what crosses the wire and the rules every party applies
//! identically.
//!
//! Everything here is pure and deterministic — no async runtime, no sockets —
//! so the coordinator, every node and every auditor compute the same bits:
//! identities and signatures ([`identity`], [`signed`]), the wire encoding with
//! explicit size limits ([`wire`], [`limits`]), content hashes ([`hash`]), the
//! messages of a round ([`messages`]), the update codec ([`codec`]) and the
//! outer optimizer ([`outer`]).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod aggregate;
pub mod certificate;
pub mod codec;
pub mod credit;
pub mod framing;
pub mod hash;
pub mod identity;
pub mod limits;
pub mod messages;
pub mod outer;
pub mod record;
pub mod signed;
pub mod wire;
pub mod workers;

pub use hash::Hash;
pub use identity::{NodeId, OrgId, PublicKey, Signature, SigningKey};
pub use signed::{Message, MessageKind, Signed};
