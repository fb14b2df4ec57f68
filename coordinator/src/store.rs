//! The coordinator's blob store: content-addressed files under
//! `<data_dir>/blobs/<hash>`, written atomically (temp file, fsync, rename),
//! so a crash never leaves a blob whose bytes do not match its name.
//!
//! It holds what the coordinator serves on the blob protocol — dataset
//! shards, checkpoints of θ, outer-optimizer state, accepted updates — and
//! the updates it fetched from nodes. Small recent blobs are kept in memory
//! so serving chunks does not touch the disk.

use barnraise_protocol::Hash;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why the store could not read or write a blob.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("blob {path} does not hash to its name (corrupt on disk)")]
    Corrupt { path: PathBuf },
}

/// Blobs larger than this are served from disk rather than memory.
const MEMORY_BLOB_BYTES: usize = 64 * 1024 * 1024;
/// The most bytes of blobs kept in memory at once; past it the oldest kept
/// go first (they are still on disk). So the coordinator's memory does not
/// grow with the dataset: a 10 GB dataset is served from disk.
pub const MEMORY_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// Recently stored or read blobs, oldest first out.
#[derive(Debug, Default)]
struct Cache {
    blobs: HashMap<Hash, Arc<Vec<u8>>>,
    order: std::collections::VecDeque<Hash>,
    bytes: usize,
    limit: usize,
}

impl Cache {
    fn get(&self, hash: &Hash) -> Option<Arc<Vec<u8>>> {
        self.blobs.get(hash).cloned()
    }

    fn insert(&mut self, hash: Hash, bytes: Arc<Vec<u8>>) {
        if bytes.len() > self.limit.min(MEMORY_BLOB_BYTES) || self.blobs.contains_key(&hash) {
            return;
        }
        self.bytes += bytes.len();
        self.blobs.insert(hash, bytes);
        self.order.push_back(hash);
        while self.bytes > self.limit {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // An entry removed earlier is skipped here (see `remove`).
            if let Some(gone) = self.blobs.remove(&oldest) {
                self.bytes -= gone.len();
            }
        }
    }

    /// O(1): the hash stays in `order` until eviction reaches it, or until
    /// stale entries are half of it (a close forgets every update of the
    /// round, one by one).
    fn remove(&mut self, hash: &Hash) {
        if let Some(gone) = self.blobs.remove(hash) {
            self.bytes -= gone.len();
        }
        if self.order.len() > 2 * self.blobs.len() + 64 {
            let blobs = &self.blobs;
            self.order.retain(|h| blobs.contains_key(h));
        }
    }
}

/// A content-addressed blob store; cheap to clone and share.
#[derive(Clone, Debug)]
pub struct BlobStore {
    dir: PathBuf,
    cache: Arc<Mutex<Cache>>,
}

impl BlobStore {
    pub fn open(dir: &Path) -> Result<BlobStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            source,
        })?;
        BlobStore::with_cache(dir, MEMORY_CACHE_BYTES)
    }

    /// A store that keeps at most `cache_bytes` of blobs in memory.
    pub fn with_cache(dir: &Path, cache_bytes: usize) -> Result<BlobStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.into(),
            source,
        })?;
        Ok(BlobStore {
            dir: dir.into(),
            cache: Arc::new(Mutex::new(Cache {
                limit: cache_bytes,
                ..Cache::default()
            })),
        })
    }

    /// Bytes of blobs held in memory now.
    pub fn cached_bytes(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.bytes)
    }

    pub fn path_of(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    fn remember(&self, hash: Hash, bytes: Arc<Vec<u8>>) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(hash, bytes);
        }
    }

    /// Stores `bytes` and returns their hash; storing the same bytes twice is a no-op.
    pub fn put(&self, bytes: Arc<Vec<u8>>) -> Result<Hash, StoreError> {
        let hash = Hash::of(&bytes);
        let path = self.path_of(&hash);
        if !path.exists() {
            // A temp name of its own: two tasks storing the same bytes at once
            // (two nodes' identical worker states, a copycat's update) must
            // not write into one file and rename it from under each other.
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = self.dir.join(format!(".{}.{n}.tmp", hash.to_hex()));
            let io = |source| StoreError::Io {
                path: tmp.clone(),
                source,
            };
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        self.remember(hash, bytes);
        Ok(hash)
    }

    /// The whole blob, checked against its name when read from disk.
    pub fn get(&self, hash: &Hash) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        if let Some(bytes) = self.cache.lock().ok().and_then(|c| c.get(hash)) {
            return Ok(Some(bytes));
        }
        let path = self.path_of(hash);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        if Hash::of(&bytes) != *hash {
            return Err(StoreError::Corrupt { path });
        }
        let bytes = Arc::new(bytes);
        self.remember(*hash, bytes.clone());
        Ok(Some(bytes))
    }

    /// The blob's size, if the store has it.
    pub fn size(&self, hash: &Hash) -> Option<u64> {
        if let Some(bytes) = self.cache.lock().ok().and_then(|c| c.get(hash)) {
            return Some(bytes.len() as u64);
        }
        std::fs::metadata(self.path_of(hash)).ok().map(|m| m.len())
    }

    /// Bytes `[offset, offset + len)` of a blob, clamped to its end.
    pub fn chunk(
        &self,
        hash: &Hash,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(bytes) = self.cache.lock().ok().and_then(|c| c.get(hash)) {
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            let end = start.saturating_add(len).min(bytes.len());
            return Ok(Some(bytes[start..end].to_vec()));
        }
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path_of(hash);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        let mut out = Vec::with_capacity(len.min(barnraise_protocol::limits::BLOB_CHUNK_BYTES));
        file.take(len as u64).read_to_end(&mut out).map_err(io)?;
        Ok(Some(out))
    }

    /// Deletes a blob from memory and disk; returns the bytes freed (0 if
    /// it was not there).
    pub fn remove(&self, hash: &Hash) -> Result<u64, StoreError> {
        self.forget(hash);
        let path = self.path_of(hash);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// Drops a blob from memory (it stays on disk).
    pub fn forget(&self, hash: &Hash) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(hash);
        }
    }
}

/// Where the tokens of a training shard come from, by the shard's hash:
/// the dataset read from disk on demand, or a map in tests.
pub trait ShardTokens: Send + Sync {
    fn tokens(&self, hash: &Hash) -> Option<Arc<Vec<u16>>>;
}

impl ShardTokens for HashMap<Hash, Arc<Vec<u16>>> {
    fn tokens(&self, hash: &Hash) -> Option<Arc<Vec<u16>>> {
        self.get(hash).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_round_trip_chunks_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let hash = store.put(Arc::new(bytes.clone())).unwrap();
        assert_eq!(store.size(&hash), Some(1000));
        assert_eq!(
            store.chunk(&hash, 990, 100).unwrap().unwrap(),
            bytes[990..].to_vec()
        );
        store.forget(&hash);
        assert_eq!(
            store.chunk(&hash, 10, 5).unwrap().unwrap(),
            bytes[10..15].to_vec()
        );
        assert_eq!(
            store.get(&hash).unwrap().unwrap().as_slice(),
            bytes.as_slice()
        );
        assert!(store.get(&Hash::of(b"none")).unwrap().is_none());
        store.forget(&hash);
        std::fs::write(store.path_of(&hash), b"tampered").unwrap();
        assert!(matches!(store.get(&hash), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn memory_holds_at_most_its_limit_and_the_rest_is_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::with_cache(dir.path(), 10_000).unwrap();
        let blobs: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 1000]).collect();
        let hashes: Vec<Hash> = blobs
            .iter()
            .map(|b| store.put(Arc::new(b.clone())).unwrap())
            .collect();
        assert!(store.cached_bytes() <= 10_000, "{}", store.cached_bytes());
        assert_eq!(store.cached_bytes(), 10_000, "the newest ten stay");
        for (hash, blob) in hashes.iter().zip(&blobs) {
            assert_eq!(
                store.get(hash).unwrap().unwrap().as_slice(),
                blob.as_slice()
            );
            assert!(store.cached_bytes() <= 10_000);
        }
        // A blob over the limit is never held.
        let big = store.put(Arc::new(vec![7u8; 20_000])).unwrap();
        assert!(store.cached_bytes() <= 10_000);
        assert_eq!(store.size(&big), Some(20_000));
        store.forget(&hashes[49]);
        assert_eq!(store.cached_bytes(), 9_000);
    }
}
