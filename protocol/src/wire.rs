//! The wire encoding: bincode 2.0.1 over serde, always with an explicit size
//! limit. This is the only module that names bincode, so the encoding could be
//! swapped without touching any message type.
//!
//! Limits hold on both sides: an encoder refuses to produce a message larger
//! than its kind allows, and a decoder refuses input over the limit before it
//! reads a byte and rejects trailing bytes.
//!
//! Memory follows the input, not what a length prefix claims:
//! - bincode charges a claimed string against its limit before allocating
//!   it, so [`decode`] sets that limit from the input's length (16 bytes per
//!   byte), not only from the message kind's cap;
//! - bincode's serde path does not charge claimed lists at all, and serde's
//!   own `Vec` reserves up to 1 MiB on a length prefix alone, so every list
//!   field of a wire message decodes through [`seq`], which reserves at
//!   most [`PREALLOC_BYTES`] and grows only with elements that decoded;
//! - byte strings go through [`bytes`], borrowed from the input.
//!
//! A decode then holds at most a small multiple of its input
//! (docs/security.md gives the bound the fuzzer checks).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// What went wrong while encoding or decoding a wire message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {size} bytes exceeds the {limit}-byte limit for {what}")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("could not encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

fn config() -> bincode::config::Configuration {
    // Little endian and varint lengths: the same bytes on every machine.
    bincode::config::standard()
}

/// Encodes `value`, refusing to produce more than `limit` bytes.
pub fn encode<T: Serialize>(
    what: &'static str,
    value: &T,
    limit: usize,
) -> Result<Vec<u8>, WireError> {
    let bytes = bincode::serde::encode_to_vec(value, config()).map_err(|e| WireError::Encode {
        what,
        reason: e.to_string(),
    })?;
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            what,
            size: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Bytes of claims bincode may charge per input byte (see [`decode`]).
const CHARGE_PER_BYTE: usize = 16;

/// Decodes exactly one `T` from `bytes`, with every allocation charged
/// against `limit` and against a multiple of the input's own length.
pub fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    limit: usize,
) -> Result<T, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            what,
            size: bytes.len(),
            limit,
        });
    }
    // bincode charges what a message claims (a string's length, a fixed
    // width per integer) against its limit before allocating. A well-formed
    // message is charged at most 8 bytes per byte it carries (a one-byte
    // varint counts as a whole u64), so the limit charged scales with the
    // input: a hostile length prefix cannot make bincode reserve more than a
    // small multiple of what arrived. bincode takes the limit as a const
    // generic, so it is rounded up to the next power of two.
    let charged = limit.min(
        bytes
            .len()
            .saturating_mul(CHARGE_PER_BYTE)
            .saturating_add(1024),
    );
    macro_rules! with_bucket {
        ($($shift:literal),*) => {{
            let bucket = charged.max(1).next_power_of_two();
            $(
                if bucket <= (1usize << $shift) {
                    return finish(what, bytes, bincode::serde::decode_from_slice::<T, _>(
                        bytes, config().with_limit::<{ 1usize << $shift }>()));
                }
            )*
            Err(WireError::TooLarge { what, size: limit, limit: 1usize << 30 })
        }};
    }
    with_bucket!(8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
}

fn finish<T>(
    what: &'static str,
    bytes: &[u8],
    result: Result<(T, usize), bincode::error::DecodeError>,
) -> Result<T, WireError> {
    match result {
        Ok((value, read)) if read == bytes.len() => Ok(value),
        Ok((_, read)) => Err(WireError::TrailingBytes {
            what,
            extra: bytes.len().saturating_sub(read),
        }),
        Err(bincode::error::DecodeError::LimitExceeded) => Err(WireError::Malformed {
            what,
            reason: "a length prefix claims more than the size limit".into(),
        }),
        Err(e) => Err(WireError::Malformed {
            what,
            reason: e.to_string(),
        }),
    }
}

/// The most a list field reserves before its elements arrive.
pub const PREALLOC_BYTES: usize = 4096;

/// Serde helper for list fields of wire messages:
/// `#[serde(deserialize_with = "crate::wire::seq")]`.
///
/// Reserves room for at most [`PREALLOC_BYTES`] of elements whatever the
/// length prefix says, then grows as elements decode, so a 100-byte message
/// that claims a million elements costs 4 KiB, not serde's 1 MiB.
pub fn seq<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Visitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let most = PREALLOC_BYTES / std::mem::size_of::<T>().max(1);
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(most));
            while let Some(item) = seq.next_element()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(Visitor(std::marker::PhantomData))
}

/// Serde helpers for byte-string fields: `#[serde(with = "crate::wire::bytes")]`.
///
/// Without them serde decodes a `Vec<u8>` as a sequence and pre-allocates up
/// to 1 MiB on a length prefix's word; through these the bytes are borrowed
/// from the (already size-checked) input and copied once, so a hostile length
/// can never allocate more than the input holds.
pub mod bytes {
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Vec<u8>, A::Error> {
                // Self-describing formats (JSON) send bytes as a list of numbers.
                let mut out = Vec::new();
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let v: Vec<u32> = (0..100).collect();
        let bytes = encode("test", &v, 1024).unwrap();
        assert_eq!(decode::<Vec<u32>>("test", &bytes, 1024).unwrap(), v);
        assert!(matches!(
            encode("test", &v, 10),
            Err(WireError::TooLarge { .. })
        ));
        assert!(matches!(
            decode::<Vec<u32>>("test", &bytes, 10),
            Err(WireError::TooLarge { .. })
        ));
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode::<Vec<u32>>("test", &trailing, 1024),
            Err(WireError::TrailingBytes { .. })
        ));
        assert!(decode::<Vec<u32>>("test", &bytes[..bytes.len() - 1], 1024).is_err());
    }

    #[test]
    fn huge_length_prefix_is_refused() {
        // varint tag 253 = u64 follows: a claim of 2^60 elements.
        let mut hostile = vec![253u8];
        hostile.extend_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(decode::<Vec<u64>>("test", &hostile, 1 << 20).is_err());
        assert!(decode::<String>("test", &hostile, 1 << 20).is_err());
        assert!(decode::<Vec<u8>>("test", &hostile, 1 << 20).is_err());
    }
}
