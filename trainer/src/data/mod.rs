//! Training data: token shards in the llm.c / nanoGPT `.bin` layout, the
//! dataset manifest, a seeded batch sampler and the built-in corpus.
//!
//! A shard file is a 1024-byte header of 256 little-endian i32 — `[0]` the
//! magic 20240520, `[1]` the version 1, `[2]` the token count, the rest zero —
//! followed by that many little-endian u16 tokens. That is exactly the format
//! llm.c's and nanoGPT's preprocessing scripts write, so existing
//! pre-tokenized datasets work unchanged. A shard is named by the SHA-256 of
//! its whole file; when a file's name is a hash (`<64 hex>.bin`), reading it
//! checks the bytes against that name.

pub mod corpus;
pub mod manifest;
pub mod sampler;

use barnraise_protocol::Hash;
use std::path::{Path, PathBuf};

pub use manifest::{DatasetManifest, ShardEntry};
pub use sampler::BatchSampler;

/// The llm.c token-file magic number.
pub const SHARD_MAGIC: i32 = 20240520;
/// The llm.c token-file version for u16 tokens.
pub const SHARD_VERSION: i32 = 1;
/// Header size in bytes (256 × i32).
pub const SHARD_HEADER_BYTES: usize = 256 * 4;
/// The largest shard we will read: 2^31 tokens (4 GiB of tokens), the most an
/// i32 header count can honestly describe.
pub const MAX_SHARD_TOKENS: usize = i32::MAX as usize;

/// Why a shard could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shard {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("shard {path}: file is {len} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header")]
    TooShort { path: PathBuf, len: usize },
    #[error("shard {path}: wrong magic {found} (expected {SHARD_MAGIC}); not an llm.c token file")]
    Magic { path: PathBuf, found: i32 },
    #[error("shard {path}: unsupported version {found} (expected {SHARD_VERSION}, u16 tokens)")]
    Version { path: PathBuf, found: i32 },
    #[error(
        "shard {path}: header says {declared} tokens but the file holds {actual} bytes of tokens (truncated or corrupt)"
    )]
    Length {
        path: PathBuf,
        declared: i64,
        actual: usize,
    },
    #[error(
        "shard {path}: contents hash to {actual}, not the {expected} its name promises (corrupt or tampered)"
    )]
    HashMismatch {
        path: PathBuf,
        expected: Hash,
        actual: Hash,
    },
    #[error("shard {path}: {count} tokens is more than a shard can hold ({MAX_SHARD_TOKENS})")]
    TooManyTokens { path: PathBuf, count: usize },
}

/// A shard's tokens, with the hash of its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub hash: Hash,
    pub tokens: Vec<u16>,
}

impl Shard {
    /// Reads and checks a shard file. If the file's stem is a 64-character
    /// hex hash, the contents must hash to it.
    pub fn read(path: &Path) -> Result<Shard, ShardError> {
        let bytes = std::fs::read(path).map_err(|source| ShardError::Read {
            path: path.to_owned(),
            source,
        })?;
        let shard = Shard::decode(&bytes, path)?;
        if let Some(expected) = hash_in_name(path)
            && expected != shard.hash
        {
            return Err(ShardError::HashMismatch {
                path: path.to_owned(),
                expected,
                actual: shard.hash,
            });
        }
        Ok(shard)
    }

    /// Reads a shard and requires it to hash to `expected`, whatever its name.
    pub fn read_expecting(path: &Path, expected: Hash) -> Result<Shard, ShardError> {
        let shard = Shard::read(path)?;
        if shard.hash != expected {
            return Err(ShardError::HashMismatch {
                path: path.to_owned(),
                expected,
                actual: shard.hash,
            });
        }
        Ok(shard)
    }

    /// Parses shard bytes (e.g. a blob fetched from a peer); `path` only
    /// names the source in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Shard, ShardError> {
        let err_path = || path.to_owned();
        if bytes.len() < SHARD_HEADER_BYTES {
            return Err(ShardError::TooShort {
                path: err_path(),
                len: bytes.len(),
            });
        }
        let header = |i: usize| {
            i32::from_le_bytes([
                bytes[i * 4],
                bytes[i * 4 + 1],
                bytes[i * 4 + 2],
                bytes[i * 4 + 3],
            ])
        };
        let magic = header(0);
        if magic != SHARD_MAGIC {
            return Err(ShardError::Magic {
                path: err_path(),
                found: magic,
            });
        }
        let version = header(1);
        if version != SHARD_VERSION {
            return Err(ShardError::Version {
                path: err_path(),
                found: version,
            });
        }
        let declared = header(2);
        let body = &bytes[SHARD_HEADER_BYTES..];
        // Compare in i64 so a negative count is just another mismatch.
        if i64::from(declared) * 2 != body.len() as i64 {
            return Err(ShardError::Length {
                path: err_path(),
                declared: i64::from(declared),
                actual: body.len(),
            });
        }
        let tokens = body
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(Shard {
            hash: Hash::of(bytes),
            tokens,
        })
    }
}

/// The file bytes of a shard holding `tokens`.
pub fn encode_shard(tokens: &[u16], path: &Path) -> Result<Vec<u8>, ShardError> {
    if tokens.len() > MAX_SHARD_TOKENS {
        return Err(ShardError::TooManyTokens {
            path: path.to_owned(),
            count: tokens.len(),
        });
    }
    let mut bytes = vec![0u8; SHARD_HEADER_BYTES];
    bytes[0..4].copy_from_slice(&SHARD_MAGIC.to_le_bytes());
    bytes[4..8].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    // Fits: checked against MAX_SHARD_TOKENS above.
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    bytes.reserve(tokens.len() * 2);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    Ok(bytes)
}

/// Writes `tokens` as a shard file at `path` and returns its hash.
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<Hash, ShardError> {
    let bytes = encode_shard(tokens, path)?;
    std::fs::write(path, &bytes).map_err(|source| ShardError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(Hash::of(&bytes))
}

/// Writes `tokens` as `<dir>/<hash>.bin`, the content-addressed name, and
/// returns the hash and the path.
pub fn write_shard_named(dir: &Path, tokens: &[u16]) -> Result<(Hash, PathBuf), ShardError> {
    let bytes = encode_shard(tokens, dir)?;
    let hash = Hash::of(&bytes);
    let path = shard_path(dir, &hash);
    std::fs::write(&path, &bytes).map_err(|source| ShardError::Write {
        path: path.clone(),
        source,
    })?;
    Ok((hash, path))
}

/// Where the shard named `hash` lives in `dir`.
pub fn shard_path(dir: &Path, hash: &Hash) -> PathBuf {
    dir.join(format!("{}.bin", hash.to_hex()))
}

/// Byte-level tokenisation: every byte is its own token.
pub fn tokenize_bytes(text: &[u8]) -> Vec<u16> {
    text.iter().map(|&b| u16::from(b)).collect()
}

/// The hash a file's name promises, if its stem is 64 hex characters.
fn hash_in_name(path: &Path) -> Option<Hash> {
    let stem = path.file_stem()?.to_str()?;
    if stem.len() != 64 {
        return None;
    }
    stem.parse().ok()
}
