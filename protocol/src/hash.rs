//! Content hashes: every blob (shard, update, checkpoint) and every set of
//! global params is named by the SHA-256 of its bytes, printed as lowercase hex.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A SHA-256 digest naming a blob or a parameter vector.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The all-zero hash, used where a chain starts (the first manifest has no parent).
    pub const ZERO: Hash = Hash([0u8; 32]);

    /// Hashes a byte string.
    pub fn of(bytes: &[u8]) -> Hash {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Hash(out)
    }

    /// Hashes an f32 vector by its little-endian bytes, so every machine names
    /// the same parameters with the same hash regardless of its endianness.
    pub fn of_f32s(values: &[f32]) -> Hash {
        let mut hasher = Hasher::new();
        hasher.update_f32s(values);
        hasher.finish()
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    /// The first 12 hex characters, for logs and tables.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }
}

/// Incremental SHA-256, for hashing data that arrives in pieces.
pub struct Hasher(ring::digest::Context);

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    pub fn new() -> Self {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Feeds f32 values as little-endian bytes, in bounded batches so no large
    /// temporary buffer is needed.
    pub fn update_f32s(&mut self, values: &[f32]) {
        let mut buf = [0u8; 4096];
        for chunk in values.chunks(buf.len() / 4) {
            for (i, v) in chunk.iter().enumerate() {
                buf[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            self.0.update(&buf[..chunk.len() * 4]);
        }
    }

    pub fn finish(self) -> Hash {
        let digest = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Hash(out)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// Why a hex string is not a hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HexError {
    #[error("expected {expected} hex characters, found {found}")]
    Length { expected: usize, found: usize },
    #[error("'{0}' is not a hex digit")]
    Digit(char),
}

impl FromStr for Hash {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        from_hex_into(s.trim(), &mut out)?;
        Ok(Hash(out))
    }
}

/// Lowercase hex of any byte string.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

/// Parses exactly `out.len() * 2` hex characters into `out`.
pub fn from_hex_into(s: &str, out: &mut [u8]) -> Result<(), HexError> {
    let bytes = s.as_bytes();
    if bytes.len() != out.len() * 2 {
        return Err(HexError::Length {
            expected: out.len() * 2,
            found: s.chars().count(),
        });
    }
    fn nibble(c: u8) -> Result<u8, HexError> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::Digit(c as char)),
        }
    }
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // SHA-256("abc") from FIPS 180-2.
        assert_eq!(
            Hash::of(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let h = Hash::of(b"barnraise");
        assert_eq!(h.to_hex().parse::<Hash>(), Ok(h));
        assert!(matches!(
            "abc".parse::<Hash>(),
            Err(HexError::Length { .. })
        ));
        let bad = "z".repeat(64);
        assert_eq!(bad.parse::<Hash>(), Err(HexError::Digit('z')));
    }

    #[test]
    fn f32_hash_is_le_bytes_hash() {
        let values: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(Hash::of_f32s(&values), Hash::of(&bytes));
    }
}
