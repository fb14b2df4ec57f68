//! The content-addressed blob store on disk: shards, updates, checkpoints and
//! optimizer states, each named by the SHA-256 of its bytes.
//!
//! ```text
//! <dir>/<64 hex>                  a complete, verified blob (never rewritten)
//! <dir>/partial/<64 hex>.part     a download in progress, written chunk by chunk
//! <dir>/partial/<64 hex>.journal  which chunks of the .part are done, and their hashes
//! <dir>/tmp/                      whole blobs being written before their rename
//! ```
//!
//! A blob only ever appears under its final name by `rename` after its bytes
//! were fsynced and hashed, so a crash never leaves a half-written blob that
//! looks complete. A download keeps a journal of finished chunks (appended
//! after the chunk's bytes were synced), so a restarted node resumes where it
//! stopped and re-checks each finished chunk against the hash it recorded.
//!
//! Everything here is blocking file I/O; async callers go through
//! `spawn_blocking`.

use barnraise_protocol::Hash;
use barnraise_protocol::hash::Hasher;
use barnraise_protocol::limits::{BLOB_CHUNK_BYTES, MAX_BLOB_BYTES};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob store {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("blob {hash} is not in the store")]
    NotFound { hash: Hash },
    #[error("blob {expected} on disk hashes to {actual}: the file is corrupt and was removed")]
    Corrupt { expected: Hash, actual: Hash },
    #[error("downloaded bytes of blob {expected} hash to {actual}; some provider sent wrong data")]
    Mismatch { expected: Hash, actual: Hash },
    #[error("blob {hash}: {size} bytes is over the {limit}-byte limit")]
    TooLarge { hash: Hash, size: u64, limit: u64 },
    #[error("blob {hash}: range {offset}+{len} is outside its {size} bytes")]
    Range {
        hash: Hash,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("blob {hash}: chunk {index} is not a chunk of a {size}-byte blob")]
    BadChunk { hash: Hash, index: u64, size: u64 },
}

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Number of chunks of a blob of `size` bytes (at least one, so an empty
/// blob is still one — empty — chunk).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(BLOB_CHUNK_BYTES as u64).max(1)
}

/// Byte range `(offset, len)` of chunk `index`.
pub fn chunk_range(size: u64, index: u64) -> (u64, u64) {
    let offset = index * BLOB_CHUNK_BYTES as u64;
    let len = size.saturating_sub(offset).min(BLOB_CHUNK_BYTES as u64);
    (offset, len)
}

/// The blob store rooted at one directory.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// Distinguishes temp files written concurrently by this process.
    temp_counter: AtomicU64,
    /// Blobs served behind the others (`BlobSource::background`): the
    /// workers' spot-check states. In memory: a restarted node serves them
    /// as any other.
    background: Mutex<std::collections::HashSet<Hash>>,
}

impl BlobStore {
    /// Opens (creating if needed) a store in `dir`, and removes temp files a
    /// crash left behind (partial downloads are kept: they resume).
    pub fn open(dir: &Path) -> Result<BlobStore, StoreError> {
        for sub in ["", "partial", "tmp"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).map_err(io_err(&path, "create directory"))?;
        }
        let tmp = dir.join("tmp");
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(BlobStore {
            dir: dir.to_owned(),
            temp_counter: AtomicU64::new(0),
            background: Mutex::new(Default::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the complete blob `hash` lives.
    pub fn path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    /// The size of blob `hash` if the store has it complete.
    pub fn size(&self, hash: &Hash) -> Option<u64> {
        fs::metadata(self.path(hash))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    pub fn contains(&self, hash: &Hash) -> bool {
        self.size(hash).is_some()
    }

    /// Stores `bytes` under their hash: temp file, fsync, rename, fsync of
    /// the directory. Storing a blob that is already there is a no-op.
    pub fn put(&self, bytes: &[u8]) -> Result<Hash, StoreError> {
        let hash = Hash::of(bytes);
        if self.contains(&hash) {
            return Ok(hash);
        }
        let temp = self.temp_path(&hash);
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        };
        if let Err(source) = write() {
            let _ = fs::remove_file(&temp);
            return Err(StoreError::Io {
                path: temp,
                action: "write",
                source,
            });
        }
        self.publish(&temp, &hash)?;
        Ok(hash)
    }

    fn temp_path(&self, hash: &Hash) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{}.{}.{n}", hash.to_hex(), std::process::id()))
    }

    /// Renames a synced file into place and syncs the directory so the
    /// rename itself survives a power cut.
    fn publish(&self, from: &Path, hash: &Hash) -> Result<(), StoreError> {
        let to = self.path(hash);
        fs::rename(from, &to).map_err(io_err(&to, "rename into place"))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Reads a whole blob and checks it against its name. A corrupt file is
    /// removed (so it is fetched again) and reported.
    pub fn read(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { hash: *hash });
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    action: "read",
                    source,
                });
            }
        };
        let actual = Hash::of(&bytes);
        if actual != *hash {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Corrupt {
                expected: *hash,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Checks a stored blob against its name without keeping it in memory.
    pub fn verify(&self, hash: &Hash) -> Result<(), StoreError> {
        let path = self.path(hash);
        let actual = hash_file(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => StoreError::NotFound { hash: *hash },
            _ => StoreError::Io {
                path: path.clone(),
                action: "read",
                source,
            },
        })?;
        if actual != *hash {
            let _ = fs::remove_file(&path);
            return Err(StoreError::Corrupt {
                expected: *hash,
                actual,
            });
        }
        Ok(())
    }

    /// Bytes `[offset, offset + len)` of a stored blob, for serving peers.
    /// The caller caps `len`; this only checks the range.
    pub fn read_range(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, StoreError> {
        let path = self.path(hash);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { hash: *hash });
            }
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    action: "open",
                    source,
                });
            }
        };
        let size = file.metadata().map_err(io_err(&path, "stat"))?.len();
        let end = offset.checked_add(u64::from(len));
        if end.is_none_or(|end| end > size) {
            return Err(StoreError::Range {
                hash: *hash,
                offset,
                len: u64::from(len),
                size,
            });
        }
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, offset)
            .map_err(io_err(&path, "read"))?;
        Ok(buf)
    }

    /// Serves `hash` behind the other blobs from now on.
    pub fn serve_in_background(&self, hash: Hash) {
        if let Ok(mut set) = self.background.lock() {
            set.insert(hash);
        }
    }

    /// Whether `hash` is served behind the other blobs.
    pub fn is_background(&self, hash: &Hash) -> bool {
        self.background.lock().is_ok_and(|set| set.contains(hash))
    }

    /// Removes a blob (e.g. an old update nobody needs any more).
    pub fn remove(&self, hash: &Hash) -> Result<(), StoreError> {
        if let Ok(mut set) = self.background.lock() {
            set.remove(hash);
        }
        let path = self.path(hash);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StoreError::Io {
                path,
                action: "remove",
                source,
            }),
        }
    }

    /// Every complete blob in the store with its size.
    pub fn list(&self) -> Result<Vec<(Hash, u64)>, StoreError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(io_err(&self.dir, "list"))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(hash) = name.to_str().and_then(|n| n.parse::<Hash>().ok()) else {
                continue;
            };
            if let Ok(meta) = entry.metadata()
                && meta.is_file()
            {
                out.push((hash, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Starts or resumes the download of blob `hash` of `size` bytes.
    pub fn partial(&self, hash: Hash, size: u64) -> Result<Partial, StoreError> {
        if size > MAX_BLOB_BYTES {
            return Err(StoreError::TooLarge {
                hash,
                size,
                limit: MAX_BLOB_BYTES,
            });
        }
        Partial::open(self, hash, size)
    }

    /// Forgets a partial download (after it proved unrecoverable).
    pub fn discard_partial(&self, hash: &Hash) {
        let (part, journal) = self.partial_paths(hash);
        let _ = fs::remove_file(part);
        let _ = fs::remove_file(journal);
    }

    fn partial_paths(&self, hash: &Hash) -> (PathBuf, PathBuf) {
        let base = self.dir.join("partial");
        (
            base.join(format!("{}.part", hash.to_hex())),
            base.join(format!("{}.journal", hash.to_hex())),
        )
    }
}

/// SHA-256 of a file, streamed.
fn hash_file(path: &Path) -> std::io::Result<Hash> {
    let mut file = File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

/// First bytes of a journal: what it is, and the size of the blob, so a
/// journal for a different size (a provider lied earlier) is not reused.
const JOURNAL_MAGIC: &[u8; 8] = b"BRJRNL01";
/// One journal record: chunk index (u64 LE) and the chunk's SHA-256.
const RECORD_BYTES: usize = 8 + 32;

/// A download in progress: a sparse `.part` file of the blob's final size and
/// a journal of finished chunks. Methods take `&self` so chunk writes can run
/// on several blocking threads at once.
#[derive(Debug)]
pub struct Partial {
    hash: Hash,
    size: u64,
    part_path: PathBuf,
    journal_path: PathBuf,
    part: File,
    journal: Mutex<File>,
    done: Mutex<Vec<bool>>,
}

impl Partial {
    fn open(store: &BlobStore, hash: Hash, size: u64) -> Result<Partial, StoreError> {
        let (part_path, journal_path) = store.partial_paths(&hash);
        let chunks = chunk_count(size) as usize;
        let mut done = vec![false; chunks];
        let existing = read_journal(&journal_path, size);
        let part_len = fs::metadata(&part_path).map(|m| m.len()).ok();
        let resumable = existing.is_some() && part_len == Some(size);
        if !resumable {
            let _ = fs::remove_file(&part_path);
            let _ = fs::remove_file(&journal_path);
        }
        let part = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io_err(&part_path, "open partial download"))?;
        part.set_len(size)
            .map_err(io_err(&part_path, "size partial download"))?;
        if resumable && let Some(records) = existing {
            // The journal says these chunks were written; re-check each
            // against the hash recorded with it (the disk may have lost or
            // mangled it since), keeping only the last record per chunk.
            let mut last = std::collections::BTreeMap::new();
            for (index, chunk_hash) in records {
                if index < chunks as u64 {
                    last.insert(index, chunk_hash);
                }
            }
            for (index, chunk_hash) in last {
                let (offset, len) = chunk_range(size, index);
                let mut buf = vec![0u8; len as usize];
                if part.read_exact_at(&mut buf, offset).is_ok() && Hash::of(&buf) == chunk_hash {
                    done[index as usize] = true;
                }
            }
        }
        let mut journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(io_err(&journal_path, "open journal"))?;
        if !resumable {
            let mut header = Vec::with_capacity(16);
            header.extend_from_slice(JOURNAL_MAGIC);
            header.extend_from_slice(&size.to_le_bytes());
            journal
                .write_all(&header)
                .and_then(|_| journal.sync_data())
                .map_err(io_err(&journal_path, "write journal"))?;
        }
        Ok(Partial {
            hash,
            size,
            part_path,
            journal_path,
            part,
            journal: Mutex::new(journal),
            done: Mutex::new(done),
        })
    }

    pub fn hash(&self) -> Hash {
        self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_count(&self) -> u64 {
        chunk_count(self.size)
    }

    /// Indices of the chunks still to fetch.
    pub fn missing(&self) -> Vec<u64> {
        let done = self
            .done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        done.iter()
            .enumerate()
            .filter(|(_, d)| !**d)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// Chunks already done (e.g. resumed from a previous run).
    pub fn done_count(&self) -> u64 {
        let done = self
            .done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        done.iter().filter(|d| **d).count() as u64
    }

    /// Writes chunk `index`, syncs it, then journals it. `data` must be the
    /// chunk's exact length (the caller has checked it against the range it
    /// asked for; this re-checks so no bytes land outside the blob).
    pub fn write_chunk(&self, index: u64, data: &[u8]) -> Result<(), StoreError> {
        let (offset, len) = chunk_range(self.size, index);
        if index >= self.chunk_count() || data.len() as u64 != len {
            return Err(StoreError::BadChunk {
                hash: self.hash,
                index,
                size: self.size,
            });
        }
        self.part
            .write_all_at(data, offset)
            .map_err(io_err(&self.part_path, "write chunk"))?;
        self.part
            .sync_data()
            .map_err(io_err(&self.part_path, "sync chunk"))?;
        let mut record = [0u8; RECORD_BYTES];
        record[..8].copy_from_slice(&index.to_le_bytes());
        record[8..].copy_from_slice(Hash::of(data).as_bytes());
        {
            let mut journal = self
                .journal
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            journal
                .write_all(&record)
                .and_then(|_| journal.sync_data())
                .map_err(io_err(&self.journal_path, "write journal"))?;
        }
        let mut done = self
            .done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = done.get_mut(index as usize) {
            *slot = true;
        }
        Ok(())
    }

    /// Reads back chunk `index` as written (to compare providers' versions).
    pub fn read_chunk(&self, index: u64) -> Result<Vec<u8>, StoreError> {
        let (offset, len) = chunk_range(self.size, index);
        let mut buf = vec![0u8; len as usize];
        self.part
            .read_exact_at(&mut buf, offset)
            .map_err(io_err(&self.part_path, "read chunk"))?;
        Ok(buf)
    }

    /// Hashes the assembled bytes; on a match the blob is moved into the
    /// store under its name, otherwise `Mismatch` (the partial stays, so the
    /// caller can replace suspect chunks and check again).
    pub fn finish(&self, store: &BlobStore) -> Result<(), StoreError> {
        if !self.missing().is_empty() {
            return Err(StoreError::BadChunk {
                hash: self.hash,
                index: self.missing()[0],
                size: self.size,
            });
        }
        self.part
            .sync_all()
            .map_err(io_err(&self.part_path, "sync"))?;
        let actual = hash_file(&self.part_path).map_err(io_err(&self.part_path, "hash"))?;
        if actual != self.hash {
            return Err(StoreError::Mismatch {
                expected: self.hash,
                actual,
            });
        }
        store.publish(&self.part_path, &self.hash)?;
        let _ = fs::remove_file(&self.journal_path);
        Ok(())
    }
}

/// The records of a journal for a blob of `size` bytes; `None` if there is no
/// journal or it belongs to another size. A torn last record is ignored.
fn read_journal(path: &Path, size: u64) -> Option<Vec<(u64, Hash)>> {
    parse_journal(&fs::read(path).ok()?, size)
}

/// The records of a journal file's bytes for a blob of `size` bytes; `None`
/// if it is not a journal or belongs to another size. A torn last record is
/// ignored. Records are not checked here: the caller keeps only indices
/// below the chunk count and re-hashes each chunk they name.
pub fn parse_journal(bytes: &[u8], size: u64) -> Option<Vec<(u64, Hash)>> {
    if bytes.len() < 16 || &bytes[..8] != JOURNAL_MAGIC {
        return None;
    }
    let mut declared = [0u8; 8];
    declared.copy_from_slice(&bytes[8..16]);
    if u64::from_le_bytes(declared) != size {
        return None;
    }
    let records = bytes[16..]
        .chunks_exact(RECORD_BYTES)
        .map(|r| {
            let mut index = [0u8; 8];
            index.copy_from_slice(&r[..8]);
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&r[8..]);
            (u64::from_le_bytes(index), Hash(hash))
        })
        .collect();
    Some(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, BlobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn put_read_and_corruption_is_detected() {
        let (_dir, store) = store();
        let hash = store.put(b"hello blob").unwrap();
        assert_eq!(hash, Hash::of(b"hello blob"));
        assert_eq!(store.read(&hash).unwrap(), b"hello blob");
        assert_eq!(store.read_range(&hash, 6, 4).unwrap(), b"blob");
        assert!(matches!(
            store.read_range(&hash, 6, 5),
            Err(StoreError::Range { .. })
        ));
        assert!(matches!(
            store.read_range(&hash, u64::MAX, 5),
            Err(StoreError::Range { .. })
        ));
        fs::write(store.path(&hash), b"hellO blob").unwrap();
        assert!(matches!(store.read(&hash), Err(StoreError::Corrupt { .. })));
        assert!(
            !store.contains(&hash),
            "a corrupt blob is removed so it is fetched again"
        );
    }

    #[test]
    fn partial_resumes_and_rechecks_chunks() {
        let (_dir, store) = store();
        let size = BLOB_CHUNK_BYTES as u64 * 2 + 10;
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let hash = Hash::of(&bytes);
        let chunk = |i: u64| {
            let (o, l) = chunk_range(size, i);
            &bytes[o as usize..(o + l) as usize]
        };
        {
            let partial = store.partial(hash, size).unwrap();
            assert_eq!(partial.missing(), vec![0, 1, 2]);
            partial.write_chunk(0, chunk(0)).unwrap();
            partial.write_chunk(2, chunk(2)).unwrap();
            assert!(matches!(
                partial.write_chunk(1, &[0u8; 3]),
                Err(StoreError::BadChunk { .. })
            ));
        }
        // Mangle chunk 2 on disk: the resume must notice and refetch it.
        let (part, _) = store.partial_paths(&hash);
        let file = OpenOptions::new().write(true).open(&part).unwrap();
        file.write_all_at(&[0xFF], BLOB_CHUNK_BYTES as u64 * 2)
            .unwrap();
        let partial = store.partial(hash, size).unwrap();
        assert_eq!(partial.missing(), vec![1, 2]);
        partial.write_chunk(1, chunk(1)).unwrap();
        partial.write_chunk(2, chunk(2)).unwrap();
        partial.finish(&store).unwrap();
        assert_eq!(store.read(&hash).unwrap(), bytes);
        // A journal for another size is not reused.
        let again = store.partial(Hash::of(b"x"), 5).unwrap();
        assert_eq!(again.missing(), vec![0]);
    }

    #[test]
    fn wrong_bytes_never_reach_the_final_name() {
        let (_dir, store) = store();
        let hash = Hash::of(b"right");
        let partial = store.partial(hash, 5).unwrap();
        partial.write_chunk(0, b"wrong").unwrap();
        assert!(matches!(
            partial.finish(&store),
            Err(StoreError::Mismatch { .. })
        ));
        assert!(!store.contains(&hash));
        partial.write_chunk(0, b"right").unwrap();
        partial.finish(&store).unwrap();
        assert!(store.contains(&hash));
        assert!(matches!(
            store.partial(hash, MAX_BLOB_BYTES + 1),
            Err(StoreError::TooLarge { .. })
        ));
    }
}
