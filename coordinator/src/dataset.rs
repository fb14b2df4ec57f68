//! The run's dataset: a directory written by `barnraise shard`, or shards
//! generated from the trainer's built-in corpus into the data dir. Either
//! way every shard is read once, checked against its hash and put in the
//! blob store (the coordinator serves shards to nodes); the probe and spot
//! checks read a shard's tokens back from the store when they need them, so
//! memory does not grow with the dataset (docs/scaling.md).

use crate::config::DatasetSource;
use crate::store::{BlobStore, ShardTokens, StoreError};
use barnraise_protocol::Hash;
use barnraise_protocol::messages::ShardInfo;
use barnraise_trainer::data::manifest::{MANIFEST_FILE, MANIFEST_VERSION};
use barnraise_trainer::data::{
    DatasetManifest, Shard, ShardEntry, corpus, shard_path, tokenize_bytes, write_shard_named,
};
use std::path::Path;
use std::sync::Arc;

/// Why the dataset could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset: {0}")]
    Manifest(#[from] barnraise_trainer::data::manifest::DatasetError),
    #[error("dataset: {0}")]
    Shard(#[from] barnraise_trainer::data::ShardError),
    #[error("dataset: {0}")]
    Store(#[from] StoreError),
    #[error("dataset {path}: no training shards")]
    Empty { path: String },
    #[error("dataset {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("dataset: {count} shards is more than a run may have ({limit})")]
    TooMany { count: usize, limit: usize },
}

/// The loaded dataset.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<ShardInfo>,
    pub held_out: Vec<ShardInfo>,
    /// Tokens of every shard by hash (training and held-out), read from
    /// the blob store when asked for.
    pub tokens: ShardReader,
    /// The dataset's `tokenizer.json`, when it was cut with one (checked
    /// against the hash the manifest names); `None` for bytes.
    pub tokenizer_json: Option<Vec<u8>>,
    /// The manifest (`dataset.json`) as read, for the run record.
    pub manifest_json: Vec<u8>,
}

/// Shards' tokens, read and decoded from the blob store on demand (the
/// shard was checked against its hash and vocabulary when the dataset was
/// loaded; the store checks the hash again on every read from disk).
#[derive(Clone, Debug)]
pub struct ShardReader {
    store: BlobStore,
    shards: std::collections::HashSet<Hash>,
}

impl ShardTokens for ShardReader {
    fn tokens(&self, hash: &Hash) -> Option<Arc<Vec<u16>>> {
        if !self.shards.contains(hash) {
            return None;
        }
        let bytes = match self.store.get(hash) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!("reading shard {}: {e}", hash.short());
                return None;
            }
        };
        match Shard::decode(&bytes, &self.store.path_of(hash)) {
            Ok(shard) => Some(Arc::new(shard.tokens)),
            Err(e) => {
                tracing::warn!("decoding shard {}: {e}", hash.short());
                None
            }
        }
    }
}

impl Dataset {
    /// The held-out tokens, all held-out shards concatenated.
    pub fn held_out_tokens(&self) -> Option<Vec<u16>> {
        let mut out = Vec::new();
        for s in &self.held_out {
            out.extend_from_slice(&self.tokens.tokens(&s.hash)?);
        }
        (!out.is_empty()).then_some(out)
    }
}

/// Writes `shards` training shards of `shard_tokens` tokens each, plus one
/// held-out shard of the same size from the end of the text, and their manifest.
fn generate_builtin(
    dir: &Path,
    shards: usize,
    shard_tokens: usize,
    seed: u64,
) -> Result<DatasetManifest, DatasetError> {
    std::fs::create_dir_all(dir).map_err(|source| barnraise_trainer::data::ShardError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let tokens = tokenize_bytes(corpus::generate(seed, (shards + 1) * shard_tokens).as_bytes());
    let mut entries = Vec::with_capacity(shards + 1);
    for chunk in tokens.chunks(shard_tokens) {
        let (hash, _) = write_shard_named(dir, chunk)?;
        entries.push(ShardEntry {
            hash,
            tokens: chunk.len() as u64,
        });
    }
    let heldout = entries.split_off(shards.min(entries.len()));
    let manifest = DatasetManifest {
        version: MANIFEST_VERSION,
        tokenizer: "bytes".into(),
        vocab_size: barnraise_trainer::model::BYTE_VOCAB,
        train: entries,
        heldout,
    };
    manifest.save(&dir.join(MANIFEST_FILE))?;
    Ok(manifest)
}

/// Loads (or, for the built-in corpus, first generates) the dataset.
pub fn load(
    source: &DatasetSource,
    data_dir: &Path,
    store: &BlobStore,
) -> Result<Dataset, DatasetError> {
    let dir = match source {
        DatasetSource::Dir { path } => path.clone(),
        DatasetSource::Builtin {
            shards,
            shard_tokens,
            seed,
        } => {
            let dir = data_dir.join("dataset");
            if !dir.join(MANIFEST_FILE).exists() {
                generate_builtin(&dir, *shards, *shard_tokens, *seed)?;
            }
            dir
        }
    };
    // Read once: parsed here, and kept as read for the run record.
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_json = std::fs::read(&manifest_path).map_err(|source| {
        barnraise_trainer::data::manifest::DatasetError::ReadManifest {
            path: manifest_path.clone(),
            source,
        }
    })?;
    let manifest = DatasetManifest::from_json(&manifest_json, &manifest_path)?;
    if manifest.train.is_empty() {
        return Err(DatasetError::Empty {
            path: dir.display().to_string(),
        });
    }
    let limit = barnraise_protocol::limits::MAX_DATASET_SHARDS;
    if manifest.train.len() + manifest.heldout.len() > limit {
        return Err(DatasetError::TooMany {
            count: manifest.train.len() + manifest.heldout.len(),
            limit,
        });
    }
    let tokenizer_json = match manifest.tokenizer.strip_prefix("tokenizers:") {
        None => None,
        Some(hex) => {
            let fail = |reason: String| DatasetError::Tokenizer {
                path: dir.display().to_string(),
                reason,
            };
            let path = dir.join(barnraise_trainer::data::manifest::TOKENIZER_FILE);
            let bytes = std::fs::read(&path).map_err(|e| {
                fail(format!(
                    "the manifest names a tokenizer; {}: {e}",
                    path.display()
                ))
            })?;
            if Hash::of(&bytes).to_hex() != hex {
                return Err(fail(format!(
                    "{} is not the tokenizer the manifest names ({hex})",
                    path.display()
                )));
            }
            Some(bytes)
        }
    };
    let vocab = manifest.vocab_size;
    let mut shards = std::collections::HashSet::new();
    let mut read = |entries: &[ShardEntry]| -> Result<Vec<ShardInfo>, DatasetError> {
        let mut infos = Vec::with_capacity(entries.len());
        for entry in entries {
            let path = shard_path(&dir, &entry.hash);
            let bytes = std::fs::read(&path).map_err(|source| {
                barnraise_trainer::data::ShardError::Read {
                    path: path.clone(),
                    source,
                }
            })?;
            let shard = Shard::decode(&bytes, &path)?;
            if shard.hash != entry.hash {
                return Err(barnraise_trainer::data::ShardError::HashMismatch {
                    path,
                    expected: entry.hash,
                    actual: shard.hash,
                }
                .into());
            }
            if let Some(&bad) = shard.tokens.iter().find(|&&t| usize::from(t) >= vocab) {
                return Err(DatasetError::Tokenizer {
                    path: path.display().to_string(),
                    reason: format!("token {bad} is outside the manifest's vocabulary of {vocab}"),
                });
            }
            let size = bytes.len() as u64;
            store.put(Arc::new(bytes))?;
            infos.push(ShardInfo {
                hash: entry.hash,
                tokens: shard.tokens.len() as u64,
                bytes: size,
            });
            shards.insert(entry.hash);
        }
        Ok(infos)
    };
    let train = read(&manifest.train)?;
    let held_out = read(&manifest.heldout)?;
    Ok(Dataset {
        train,
        held_out,
        tokens: ShardReader {
            store: store.clone(),
            shards,
        },
        tokenizer_json,
        manifest_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_dataset_has_the_asked_shards_and_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let source = DatasetSource::Builtin {
            shards: 4,
            shard_tokens: 2048,
            seed: 3,
        };
        let a = load(&source, dir.path(), &store).unwrap();
        assert_eq!(a.train.len(), 4);
        assert_eq!(a.held_out.len(), 1);
        assert!(
            a.train
                .iter()
                .all(|s| s.tokens == 2048 && store.size(&s.hash) == Some(s.bytes))
        );
        let b = load(&source, dir.path(), &store).unwrap();
        assert_eq!(a.train, b.train);
        assert!(a.held_out_tokens().is_some_and(|t| t.len() == 2048));
        let first = a.tokens.tokens(&a.train[0].hash).unwrap();
        assert_eq!(first.len(), 2048);
        assert!(a.tokens.tokens(&Hash::ZERO).is_none(), "not a shard");
        // A blob of the store that is not a shard is not read as one.
        let other = store.put(Arc::new(vec![1, 2, 3])).unwrap();
        assert!(a.tokens.tokens(&other).is_none());
    }
}
