//! Signed envelopes. A `Signed<T>` carries the encoded bytes of a message, the
//! signer's key, the message kind and an Ed25519 signature over
//! `domain tag || kind || bytes`. The domain tag makes a signature valid for
//! one kind of message only, so a signed `Commit` can never be replayed as a
//! `Manifest`. Verification happens before decoding: unverified bytes are
//! never parsed into a message.

use crate::identity::{IdentityError, PublicKey, Signature, SigningKey};
use crate::wire::{self, WireError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// Every kind of signed message. The number is part of what is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum MessageKind {
    Join = 1,
    Welcome = 2,
    RoundPlan = 3,
    Commit = 4,
    Manifest = 5,
    NodeCertificate = 6,
    Leave = 7,
    UpdateNotice = 8,
}

impl MessageKind {
    /// The domain separation tag signed ahead of the bytes.
    pub fn domain(self) -> &'static [u8] {
        match self {
            MessageKind::Join => b"barnraise/v1/join\0",
            MessageKind::Welcome => b"barnraise/v1/welcome\0",
            MessageKind::RoundPlan => b"barnraise/v1/round-plan\0",
            MessageKind::Commit => b"barnraise/v1/commit\0",
            MessageKind::Manifest => b"barnraise/v1/manifest\0",
            MessageKind::NodeCertificate => b"barnraise/v1/node-certificate\0",
            MessageKind::Leave => b"barnraise/v1/leave\0",
            MessageKind::UpdateNotice => b"barnraise/v1/update-notice\0",
        }
    }
}

/// A message type that travels signed: its kind and its size limit.
pub trait Message: Serialize + DeserializeOwned {
    const KIND: MessageKind;
    /// Largest encoded body.
    const MAX_BYTES: usize;
    /// A name for errors and logs.
    const NAME: &'static str;
}

/// Why a signed envelope was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    #[error("expected a signed {expected:?}, got a {found:?}")]
    WrongKind {
        expected: MessageKind,
        found: MessageKind,
    },
    #[error("signed by {found}, expected {expected}")]
    WrongSigner {
        expected: PublicKey,
        found: PublicKey,
    },
    #[error("signature does not verify (tampered or forged)")]
    BadSignature,
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// An encoded message, its signer and signature. Cheap to clone and to
/// forward; [`Signed::verify`] checks it and yields the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    pub signer: PublicKey,
    pub kind: MessageKind,
    #[serde(with = "crate::wire::bytes")]
    pub body: Vec<u8>,
    pub signature: Signature,
    #[serde(skip)]
    marker: PhantomData<fn() -> T>,
}

fn signing_input(kind: MessageKind, body: &[u8]) -> Vec<u8> {
    let domain = kind.domain();
    let mut input = Vec::with_capacity(domain.len() + 2 + body.len());
    input.extend_from_slice(domain);
    input.extend_from_slice(&(kind as u16).to_le_bytes());
    input.extend_from_slice(body);
    input
}

impl<T: Message> Signed<T> {
    /// Encodes and signs `message`.
    pub fn sign(key: &SigningKey, message: &T) -> Result<Signed<T>, WireError> {
        let body = wire::encode(T::NAME, message, T::MAX_BYTES)?;
        let signature = key.sign(&signing_input(T::KIND, &body));
        Ok(Signed {
            signer: key.public(),
            kind: T::KIND,
            body,
            signature,
            marker: PhantomData,
        })
    }

    /// Checks kind, size and signature — in that order, all before decoding —
    /// then decodes the message. `expected_signer` pins who must have signed.
    pub fn verify(&self, expected_signer: Option<&PublicKey>) -> Result<T, SignedError> {
        if self.kind != T::KIND {
            return Err(SignedError::WrongKind {
                expected: T::KIND,
                found: self.kind,
            });
        }
        if let Some(expected) = expected_signer.filter(|e| **e != self.signer) {
            return Err(SignedError::WrongSigner {
                expected: *expected,
                found: self.signer,
            });
        }
        if self.body.len() > T::MAX_BYTES {
            return Err(WireError::TooLarge {
                what: T::NAME,
                size: self.body.len(),
                limit: T::MAX_BYTES,
            }
            .into());
        }
        self.signer
            .verify(&signing_input(self.kind, &self.body), &self.signature)
            .map_err(|_: IdentityError| SignedError::BadSignature)?;
        Ok(wire::decode(T::NAME, &self.body, T::MAX_BYTES)?)
    }

    /// The hash of the signed body: a stable name for this exact message.
    pub fn body_hash(&self) -> crate::Hash {
        crate::Hash::of(&self.body)
    }

    /// Encodes the whole envelope for storage or transport.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        wire::encode(
            T::NAME,
            self,
            T::MAX_BYTES + crate::limits::ENVELOPE_OVERHEAD,
        )
    }

    /// Decodes an envelope (not yet verified).
    pub fn from_bytes(bytes: &[u8]) -> Result<Signed<T>, WireError> {
        wire::decode(
            T::NAME,
            bytes,
            T::MAX_BYTES + crate::limits::ENVELOPE_OVERHEAD,
        )
    }
}
