//! The dataset manifest and turning text into shards (`barnraise shard`).
//!
//! A dataset is a list of content-addressed training shards plus held-out
//! shards for evaluation. The manifest (`dataset.json`) names each shard by
//! hash with its token count, so a node can fetch any shard from any peer and
//! check it.

use super::{Shard, ShardError, tokenize_bytes, write_shard_named};
use barnraise_protocol::Hash;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the manifest inside a dataset directory.
pub const MANIFEST_FILE: &str = "dataset.json";
/// File name of a dataset's tokenizer (the Hugging Face `tokenizers`
/// format), when it is not byte-level.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest vocabulary a shard can hold (tokens are u16).
pub const MAX_SHARD_VOCAB: usize = 1 << 16;
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 1;
/// Default shard size in tokens (2 MiB of u16 tokens): small enough to move
/// between peers in one request, large enough to keep the file count low.
pub const DEFAULT_SHARD_TOKENS: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    #[serde(with = "hex_hash")]
    pub hash: Hash,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub version: u32,
    /// How text became tokens; "bytes" = one token per byte.
    pub tokenizer: String,
    pub vocab_size: usize,
    pub train: Vec<ShardEntry>,
    pub heldout: Vec<ShardEntry>,
}

/// How to cut a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardingConfig {
    pub shard_tokens: usize,
    /// Fraction of the token stream (taken from its end) kept out of
    /// training for evaluation.
    pub heldout_fraction: f64,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        ShardingConfig {
            shard_tokens: DEFAULT_SHARD_TOKENS,
            heldout_fraction: 0.05,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("input {path}: cannot read: {source}")]
    ReadInput {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("input {path}: no text to shard (the file is empty or the directory holds no files)")]
    EmptyInput { path: PathBuf },
    #[error("no input files given")]
    NoInputs,
    #[error("dataset has {tokens} tokens, too few to split off a held-out part")]
    TooSmall { tokens: usize },
    #[error(
        "sharding: shard size must be positive and the held-out fraction in (0, 1), got {shard_tokens} and {heldout_fraction}"
    )]
    BadConfig {
        shard_tokens: usize,
        heldout_fraction: f64,
    },
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("manifest {path}: cannot write: {source}")]
    WriteManifest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: cannot read: {source}")]
    ReadManifest {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: not a valid dataset manifest: {source}")]
    ParseManifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

/// A Hugging Face tokenizer (`tokenizer.json`) read for sharding, with the
/// SHA-256 of its file, which the dataset manifest records.
pub struct TextTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    pub hash: Hash,
    pub bytes: Vec<u8>,
    pub vocab_size: usize,
}

impl TextTokenizer {
    /// Reads and parses `path`; refuses a file that does not parse, and a
    /// vocabulary that does not fit u16 shard tokens.
    pub fn load(path: &Path) -> Result<TextTokenizer, DatasetError> {
        let fail = |reason: String| DatasetError::Tokenizer {
            path: path.to_owned(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| fail(format!("not UTF-8: {e}")))?;
        let tokenizer: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| fail(format!("not a tokenizers JSON file: {e}")))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        if vocab_size == 0 || vocab_size > MAX_SHARD_VOCAB {
            return Err(fail(format!(
                "a vocabulary of {vocab_size} tokens; shards hold 1 to {MAX_SHARD_VOCAB}"
            )));
        }
        Ok(TextTokenizer {
            tokenizer,
            hash: Hash::of(&bytes),
            bytes,
            vocab_size,
        })
    }

    /// How the manifest names it: `tokenizers:<sha256 of tokenizer.json>`.
    pub fn name(&self) -> String {
        format!("tokenizers:{}", self.hash.to_hex())
    }

    /// The token ids of `text`, each below the vocabulary size.
    pub fn encode(&self, text: &str, path: &Path) -> Result<Vec<u16>, DatasetError> {
        let fail = |reason: String| DatasetError::Tokenizer {
            path: path.to_owned(),
            reason,
        };
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| fail(format!("cannot encode: {e}")))?;
        encoding
            .get_ids()
            .iter()
            .map(|&id| {
                u16::try_from(id)
                    .ok()
                    .filter(|&t| usize::from(t) < self.vocab_size)
                    .ok_or_else(|| {
                        fail(format!(
                            "token {id} is outside the vocabulary of {}",
                            self.vocab_size
                        ))
                    })
            })
            .collect()
    }
}

/// Every file under the given paths (directories recursively), in a stable
/// sorted order so the same inputs always give the same shards.
pub fn collect_input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, DatasetError> {
    if inputs.is_empty() {
        return Err(DatasetError::NoInputs);
    }
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|source| DatasetError::ReadInput {
            path: input.clone(),
            source,
        })?;
        if meta.is_dir() {
            let before = files.len();
            walk_dir(input, &mut files)?;
            if files.len() == before {
                return Err(DatasetError::EmptyInput {
                    path: input.clone(),
                });
            }
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn walk_dir(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), DatasetError> {
    let read_err = |source| DatasetError::ReadInput {
        path: dir.to_owned(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        entries.push(entry.map_err(read_err)?.path());
    }
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk_dir(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// Reads the input files and tokenises them byte-level, documents separated
/// by a blank line. An empty file is an error naming it: it is almost always
/// a mistake in the input list.
pub fn tokenize_files(files: &[PathBuf]) -> Result<Vec<u16>, DatasetError> {
    tokenize_files_with(files, None)
}

/// [`tokenize_files`] with a tokenizer instead of bytes (`None`: bytes).
/// With a tokenizer the files must be UTF-8 text.
pub fn tokenize_files_with(
    files: &[PathBuf],
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<u16>, DatasetError> {
    let mut tokens = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::ReadInput {
            path: path.clone(),
            source,
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(DatasetError::EmptyInput { path: path.clone() });
        }
        let separator: &[u8] = if i > 0 { b"\n\n" } else { b"" };
        match tokenizer {
            None => {
                tokens.extend(tokenize_bytes(separator));
                tokens.extend(tokenize_bytes(&bytes));
            }
            Some(t) => {
                let text = std::str::from_utf8(&bytes).map_err(|e| DatasetError::Tokenizer {
                    path: path.clone(),
                    reason: format!("the input is not UTF-8 text ({e})"),
                })?;
                let text = format!("{}{text}", String::from_utf8_lossy(separator));
                tokens.extend(t.encode(&text, path)?);
            }
        }
    }
    if tokens.is_empty() {
        return Err(DatasetError::NoInputs);
    }
    Ok(tokens)
}

/// Imports pre-tokenized llm.c / nanoGPT `.bin` files as they are (GPT-2's
/// FineWeb shards, say): every file's header and length are checked, every
/// token must be below `vocab_size`, and the tokens are cut into
/// `shard_tokens`-token shards in `out_dir` — files whose name contains
/// `val` (llm.c's naming) become the held-out split, the others training.
/// `tokenizer` (e.g. GPT-2's `tokenizer.json`) is recorded and copied when
/// given, and must then have `vocab_size` tokens; without it the manifest
/// names the tokenizer `unknown`. Files are read one at a time.
pub fn import_llmc(
    files: &[PathBuf],
    out_dir: &Path,
    shard_tokens: usize,
    vocab_size: usize,
    tokenizer: Option<&TextTokenizer>,
) -> Result<DatasetManifest, DatasetError> {
    if shard_tokens == 0 || vocab_size == 0 || vocab_size > MAX_SHARD_VOCAB {
        return Err(DatasetError::Tokenizer {
            path: out_dir.to_owned(),
            reason: format!(
                "--shard-tokens must be positive and the vocabulary 1 to {MAX_SHARD_VOCAB} (got {shard_tokens} and {vocab_size})"
            ),
        });
    }
    if let Some(t) = tokenizer
        && t.vocab_size != vocab_size
    {
        return Err(DatasetError::Tokenizer {
            path: out_dir.to_owned(),
            reason: format!(
                "the tokenizer has {} tokens, the vocabulary given is {vocab_size}",
                t.vocab_size
            ),
        });
    }
    let is_val = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains("val"))
    };
    if !files.iter().any(is_val) || files.iter().all(is_val) {
        return Err(DatasetError::Tokenizer {
            path: out_dir.to_owned(),
            reason: "give training files and at least one validation file (a name with \
                     `val` in it, as llm.c names them)"
                .into(),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(|source| ShardError::Write {
        path: out_dir.to_owned(),
        source,
    })?;
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    for path in files {
        let shard = Shard::read(path)?;
        if let Some(&bad) = shard.tokens.iter().find(|&&t| usize::from(t) >= vocab_size) {
            return Err(DatasetError::Tokenizer {
                path: path.clone(),
                reason: format!("token {bad} is outside the vocabulary of {vocab_size}"),
            });
        }
        let entries = if is_val(path) {
            &mut heldout
        } else {
            &mut train
        };
        for chunk in shard.tokens.chunks(shard_tokens) {
            let (hash, _) = write_shard_named(out_dir, chunk)?;
            entries.push(ShardEntry {
                hash,
                tokens: chunk.len() as u64,
            });
        }
    }
    if let Some(t) = tokenizer {
        let path = out_dir.join(TOKENIZER_FILE);
        std::fs::write(&path, &t.bytes).map_err(|source| ShardError::Write { path, source })?;
    }
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        tokenizer: tokenizer.map_or_else(|| "unknown".to_string(), TextTokenizer::name),
        vocab_size,
        train,
        heldout,
    };
    manifest.save(&out_dir.join(MANIFEST_FILE))?;
    Ok(manifest)
}

/// Cuts `tokens` into content-addressed shards in `out_dir` and writes the
/// manifest there. The held-out part is the tail of the stream, so it shares
/// no text with training.
pub fn build_dataset(
    tokens: &[u16],
    out_dir: &Path,
    config: ShardingConfig,
) -> Result<DatasetManifest, DatasetError> {
    build_dataset_with(tokens, out_dir, config, None)
}

/// [`build_dataset`] for tokens of `tokenizer` (`None`: bytes): the manifest
/// records its name, hash and vocabulary, and its file is copied into the
/// dataset as [`TOKENIZER_FILE`].
pub fn build_dataset_with(
    tokens: &[u16],
    out_dir: &Path,
    config: ShardingConfig,
    tokenizer: Option<&TextTokenizer>,
) -> Result<DatasetManifest, DatasetError> {
    let ShardingConfig {
        shard_tokens,
        heldout_fraction,
    } = config;
    if shard_tokens == 0 || !(heldout_fraction > 0.0 && heldout_fraction < 1.0) {
        return Err(DatasetError::BadConfig {
            shard_tokens,
            heldout_fraction,
        });
    }
    let heldout_len = ((tokens.len() as f64 * heldout_fraction).ceil() as usize).max(2);
    if tokens.len() < heldout_len + 2 {
        return Err(DatasetError::TooSmall {
            tokens: tokens.len(),
        });
    }
    let split = tokens.len() - heldout_len;
    std::fs::create_dir_all(out_dir).map_err(|source| ShardError::Write {
        path: out_dir.to_owned(),
        source,
    })?;
    let write = |part: &[u16]| -> Result<Vec<ShardEntry>, DatasetError> {
        let mut entries = Vec::new();
        for chunk in part.chunks(shard_tokens) {
            let (hash, _) = write_shard_named(out_dir, chunk)?;
            entries.push(ShardEntry {
                hash,
                tokens: chunk.len() as u64,
            });
        }
        Ok(entries)
    };
    if let Some(t) = tokenizer {
        let path = out_dir.join(TOKENIZER_FILE);
        std::fs::write(&path, &t.bytes).map_err(|source| ShardError::Write { path, source })?;
    }
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        tokenizer: tokenizer.map_or_else(|| "bytes".to_string(), TextTokenizer::name),
        vocab_size: tokenizer.map_or(crate::model::BYTE_VOCAB, |t| t.vocab_size),
        train: write(&tokens[..split])?,
        heldout: write(&tokens[split..])?,
    };
    manifest.save(&out_dir.join(MANIFEST_FILE))?;
    Ok(manifest)
}

impl DatasetManifest {
    pub fn save(&self, path: &Path) -> Result<(), DatasetError> {
        let write_err = |source| DatasetError::WriteManifest {
            path: path.to_owned(),
            source,
        };
        let json =
            serde_json::to_string_pretty(self).map_err(|e| write_err(std::io::Error::other(e)))?;
        std::fs::write(path, json + "\n").map_err(write_err)
    }

    pub fn load(path: &Path) -> Result<DatasetManifest, DatasetError> {
        let bytes = std::fs::read(path).map_err(|source| DatasetError::ReadManifest {
            path: path.to_owned(),
            source,
        })?;
        DatasetManifest::from_json(&bytes, path)
    }

    /// Parses manifest JSON (e.g. read from disk or fetched); `path` only
    /// names the source in errors.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<DatasetManifest, DatasetError> {
        serde_json::from_slice(bytes).map_err(|source| DatasetError::ParseManifest {
            path: path.to_owned(),
            source,
        })
    }

    pub fn train_tokens(&self) -> u64 {
        self.train.iter().map(|s| s.tokens).sum()
    }

    pub fn heldout_tokens(&self) -> u64 {
        self.heldout.iter().map(|s| s.tokens).sum()
    }
}

/// Hashes in the manifest are hex strings, as everywhere a person reads them.
mod hex_hash {
    use barnraise_protocol::Hash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hash.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
