//! What the node keeps in its data dir between runs, besides blobs:
//!
//! ```text
//! <data_dir>/state/state.json    run, round, params hash, codec, last commit
//! <data_dir>/state/params.f32    θ_round, raw little-endian f32
//! <data_dir>/state/momentum.f32  the outer optimizer's momentum
//! <data_dir>/state/residual.f32  the codec's error-feedback residual
//! <data_dir>/receipts/           signed manifests that name this node
//! ```
//!
//! Every file is written atomically (temp file, fsync, rename), and the
//! params are checked against the recorded hash on load, so a crash leaves
//! either the old state or the new one, and a damaged file means a resync,
//! never wrong params.

use barnraise_protocol::Hash;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("node state {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("node state {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    /// The blocking thread that saved the state did not come back.
    #[error("saving the node state: {0}")]
    Background(String),
}

/// The small part of the state, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub run_id: String,
    /// The round whose start `params.f32` holds (θ_round).
    pub round: u64,
    /// Hex SHA-256 of `params.f32`'s values.
    pub params_hash: String,
    pub codec: String,
    /// The round we committed an update for, and its hash, so a restart in
    /// the same round waits for the manifest instead of training again.
    pub committed: Option<(u64, String)>,
}

impl StateRecord {
    /// Parses `state.json`.
    pub fn from_json(bytes: &[u8]) -> Result<StateRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The node's saved state.
#[derive(Clone, Debug)]
pub struct SavedState {
    pub record: StateRecord,
    pub params: Vec<f32>,
    pub momentum: Vec<f32>,
}

/// Reads and writes the state files of one data dir.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(data_dir: &Path) -> StateDir {
        StateDir {
            dir: data_dir.join("state"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The saved state, if there is a complete and consistent one.
    pub fn load(&self) -> Result<Option<SavedState>, StateError> {
        let record_path = self.path("state.json");
        let text = match fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    path: record_path,
                    source,
                });
            }
        };
        let damaged = |path: &Path, reason: String| StateError::Damaged {
            path: path.to_owned(),
            reason,
        };
        let record =
            StateRecord::from_json(text.as_bytes()).map_err(|e| damaged(&record_path, e))?;
        let params = read_f32s(&self.path("params.f32"))?;
        let momentum = read_f32s(&self.path("momentum.f32"))?;
        let actual = Hash::of_f32s(&params);
        if actual.to_hex() != record.params_hash {
            return Err(damaged(
                &self.path("params.f32"),
                format!("params hash to {actual}, state says {}", record.params_hash),
            ));
        }
        if momentum.len() != params.len() {
            return Err(damaged(
                &self.path("momentum.f32"),
                "momentum and params lengths differ".into(),
            ));
        }
        Ok(Some(SavedState {
            record,
            params,
            momentum,
        }))
    }

    /// Saves params and momentum first, the record last: the record names
    /// the params hash, so a crash between them is caught on load.
    pub fn save(
        &self,
        record: &StateRecord,
        params: &[f32],
        momentum: &[f32],
    ) -> Result<(), StateError> {
        write_f32s_atomic(&self.path("params.f32"), params)?;
        write_f32s_atomic(&self.path("momentum.f32"), momentum)?;
        self.save_record(record)
    }

    /// [`StateDir::save`] on tokio's blocking pool: the vectors travel to
    /// the blocking thread and come back. θ and momentum are hundreds of
    /// megabytes on the larger presets and written with fsync; done on an
    /// async thread, that would stall the node's swarm for seconds.
    pub async fn save_in_background(
        &self,
        record: StateRecord,
        params: Vec<f32>,
        momentum: Vec<f32>,
    ) -> Result<(Vec<f32>, Vec<f32>), StateError> {
        let dir = self.clone();
        tokio::task::spawn_blocking(move || {
            dir.save(&record, &params, &momentum)
                .map(|()| (params, momentum))
        })
        .await
        .map_err(|e| StateError::Background(e.to_string()))?
    }

    pub fn save_record(&self, record: &StateRecord) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(record).map_err(|e| StateError::Damaged {
            path: self.path("state.json"),
            reason: e.to_string(),
        })?;
        write_atomic(&self.path("state.json"), &json)
    }

    /// The codec residual saved for `params` values, if any.
    pub fn load_residual(&self, params: usize) -> Option<Vec<f32>> {
        read_f32s(&self.path("residual.f32"))
            .ok()
            .filter(|r| r.len() == params)
    }

    pub fn save_residual(&self, residual: &[f32]) -> Result<(), StateError> {
        write_f32s_atomic(&self.path("residual.f32"), residual)
    }

    pub fn clear_residual(&self) {
        let _ = fs::remove_file(self.path("residual.f32"));
    }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Parses raw little-endian f32 bytes (e.g. an optimizer-state blob).
pub fn f32s_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

fn read_f32s(path: &Path) -> Result<Vec<f32>, StateError> {
    let bytes = fs::read(path).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })?;
    f32s_from_bytes(&bytes).ok_or_else(|| StateError::Damaged {
        path: path.to_owned(),
        reason: "length is not a multiple of 4".into(),
    })
}

/// Temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// `values` as little-endian f32s, written atomically a megabyte at a time
/// (no second copy of a θ-sized vector in memory).
fn write_f32s_atomic(path: &Path, values: &[f32]) -> Result<(), StateError> {
    write_atomic_with(path, |file| {
        let mut buffer = Vec::with_capacity(1 << 20);
        for chunk in values.chunks(1 << 18) {
            buffer.clear();
            for v in chunk {
                buffer.extend_from_slice(&v.to_le_bytes());
            }
            file.write_all(&buffer)?;
        }
        Ok(())
    })
}

/// Temp file written by `write`, fsync, rename, fsync of the directory.
fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        write(&mut file)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert!(state.load().unwrap().is_none());
        let params = vec![1.0f32, -2.5, 3.25];
        let record = StateRecord {
            run_id: "r".into(),
            round: 4,
            params_hash: Hash::of_f32s(&params).to_hex(),
            codec: "fp32".into(),
            committed: Some((4, Hash::ZERO.to_hex())),
        };
        state.save(&record, &params, &[0.0; 3]).unwrap();
        let loaded = state.load().unwrap().unwrap();
        assert_eq!(loaded.record, record);
        assert_eq!(loaded.params, params);
        fs::write(
            dir.path().join("state/params.f32"),
            f32_bytes(&[1.0, 2.0, 3.0]),
        )
        .unwrap();
        assert!(matches!(state.load(), Err(StateError::Damaged { .. })));
        assert!(state.load_residual(3).is_none());
        state.save_residual(&[0.5; 3]).unwrap();
        assert_eq!(state.load_residual(3), Some(vec![0.5; 3]));
        assert_eq!(state.load_residual(4), None);
    }
}
