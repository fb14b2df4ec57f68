//! Serving blobs: the one answer to the blob protocol (docs/protocol.md,
//! "Blob protocol") that nodes and the coordinator both give, from whatever
//! store they keep. Stores implement [`BlobSource`]; tests plug in sources
//! that lie or stall, to prove fetchers catch them.

use barnraise_protocol::Hash;
use barnraise_protocol::limits::BLOB_CHUNK_BYTES;
use barnraise_protocol::messages::{BlobRequest, BlobResponse};

/// Why a source could not read a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The source does not hold the blob.
    NotFound,
    /// The range is not inside the blob.
    OutOfRange,
    /// Anything else (I/O); logged, and answered with a refusal.
    Failed(String),
}

/// Where served blobs come from.
pub trait BlobSource: Send + Sync + 'static {
    fn size(&self, hash: &Hash) -> Option<u64>;
    fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError>;
    /// Blobs served behind the others: one chunk of them on the uplink at a
    /// time, so that a large blob nobody waits on (a spot-check state) does
    /// not queue megabytes ahead of one everybody waits on (an update).
    fn background(&self, _hash: &Hash) -> bool {
        false
    }
}

/// Answers one blob request from `source`. Chunk requests of 0 bytes or
/// over [`BLOB_CHUNK_BYTES`] are refused before anything is read or
/// allocated. Reads block: call it off the async runtime's threads.
pub fn serve_blob(source: &dyn BlobSource, request: &BlobRequest) -> BlobResponse {
    match request {
        BlobRequest::Have { hash } => BlobResponse::Have {
            size: source.size(hash),
        },
        BlobRequest::Chunk { len, .. } if *len as usize > BLOB_CHUNK_BYTES || *len == 0 => {
            BlobResponse::Refused {
                reason: format!("chunk length {len} is outside 1..={BLOB_CHUNK_BYTES} bytes"),
            }
        }
        BlobRequest::Chunk { hash, offset, len } => match source.read(hash, *offset, *len) {
            Ok(data) => BlobResponse::Chunk { data },
            Err(ReadError::NotFound) => BlobResponse::NotFound,
            Err(ReadError::OutOfRange) => BlobResponse::Refused {
                reason: "range is outside the blob".into(),
            },
            Err(ReadError::Failed(e)) => {
                tracing::warn!("serving blob {}: {e}", hash.short());
                BlobResponse::Refused {
                    reason: "could not read the blob".into(),
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One(Vec<u8>);

    impl BlobSource for One {
        fn size(&self, hash: &Hash) -> Option<u64> {
            (*hash == Hash::of(&self.0)).then_some(self.0.len() as u64)
        }
        fn read(&self, hash: &Hash, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
            if *hash != Hash::of(&self.0) {
                return Err(ReadError::NotFound);
            }
            let start = usize::try_from(offset).map_err(|_| ReadError::OutOfRange)?;
            let end = start
                .checked_add(len as usize)
                .ok_or(ReadError::OutOfRange)?;
            self.0
                .get(start..end)
                .map(<[u8]>::to_vec)
                .ok_or(ReadError::OutOfRange)
        }
    }

    #[test]
    fn answers_have_chunks_and_refuses_bad_ranges() {
        let blob = One((0..100u8).collect());
        let hash = Hash::of(&blob.0);
        let chunk = |offset, len| serve_blob(&blob, &BlobRequest::Chunk { hash, offset, len });
        assert_eq!(
            serve_blob(&blob, &BlobRequest::Have { hash }),
            BlobResponse::Have { size: Some(100) }
        );
        assert_eq!(
            serve_blob(&blob, &BlobRequest::Have { hash: Hash::ZERO }),
            BlobResponse::Have { size: None }
        );
        assert_eq!(chunk(98, 2), BlobResponse::Chunk { data: vec![98, 99] });
        assert!(matches!(chunk(99, 2), BlobResponse::Refused { .. }));
        assert!(matches!(chunk(0, 0), BlobResponse::Refused { .. }));
        let over = BLOB_CHUNK_BYTES as u32 + 1;
        assert!(
            matches!(chunk(0, over), BlobResponse::Refused { reason } if reason.contains("outside"))
        );
        let missing = BlobRequest::Chunk {
            hash: Hash::ZERO,
            offset: 0,
            len: 1,
        };
        assert_eq!(serve_blob(&blob, &missing), BlobResponse::NotFound);
    }
}
