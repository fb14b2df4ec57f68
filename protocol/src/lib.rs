//! barnraise-protocol: what crosses the wire and the rules every party applies
//! identically.
//!
//! Everything here is pure and deterministic — no async runtime, no sockets —
//! so the coordinator, every node and every auditor compute the same bits:
//! identities and signatures ([`identity`], [`signed`]), the wire encoding with
//! explicit size limits ([`wire`], [`limits`]), content hashes ([`hash`]), the
//! messages of a round ([`messages`]), the update codec ([`codec`]) and the
//! outer optimizer ([`outer`]).

pub mod codec;
pub mod hash;
pub mod outer;

pub use hash::Hash;
