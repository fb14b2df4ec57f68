//! The run's global state — θ_round and the outer optimizer's momentum — and
//! its two blobs: θ as a safetensors checkpoint (the trainer's format, so
//! Hugging Face tools can load it) and the momentum as raw little-endian f32
//! (named by its SHA-256). Both are written for every closed round, because
//! they are what a restarted coordinator resumes from; every
//! `checkpoint_every` rounds they are also published to joining nodes.

use crate::store::{BlobStore, StoreError};
use barnraise_protocol::Hash;
use barnraise_protocol::messages::CheckpointRef;
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_trainer::ModelConfig;
use barnraise_trainer::checkpoint::{self, CheckpointError, CheckpointMeta};
use std::sync::Arc;

/// Why the global state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("state blob {0} is missing from the data dir's blob store")]
    Missing(Hash),
    #[error("optimizer state blob {hash} holds {found} bytes, expected {expected}")]
    OptimizerLength {
        hash: Hash,
        expected: usize,
        found: usize,
    },
}

/// θ_round and the momentum that goes with it.
#[derive(Clone, Debug)]
pub struct GlobalState {
    pub round: u64,
    pub theta: Vec<f32>,
    pub optimizer: OuterOptimizer,
}

impl GlobalState {
    /// θ_0: the trainer's deterministic initialisation with init seed 0 (the
    /// same values `Trainer::new(config, device, 0)` starts from), zero momentum.
    pub fn initial(model: &ModelConfig, outer: OuterConfig) -> GlobalState {
        let theta = model.init_flat(0);
        let optimizer = OuterOptimizer::new(outer, theta.len());
        GlobalState {
            round: 0,
            theta,
            optimizer,
        }
    }

    pub fn params_hash(&self) -> Hash {
        Hash::of_f32s(&self.theta)
    }

    /// Writes both blobs and returns their reference.
    pub fn save(
        &self,
        model: &ModelConfig,
        run_id: &str,
        store: &BlobStore,
    ) -> Result<CheckpointRef, StateError> {
        let params_hash = self.params_hash();
        let meta = CheckpointMeta {
            run: run_id.to_string(),
            round: self.round,
            params_hash,
        };
        let path = store.path_of(&Hash::ZERO);
        let bytes = checkpoint::to_bytes(&path, model, &self.theta, None, &meta)?;
        let size = bytes.len() as u64;
        let blob = store.put(Arc::new(bytes))?;
        let momentum: Vec<u8> = self
            .optimizer
            .momentum()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let optimizer_bytes = momentum.len() as u64;
        let optimizer_blob = store.put(Arc::new(momentum))?;
        Ok(CheckpointRef {
            round: self.round,
            blob,
            bytes: size,
            params_hash,
            optimizer_blob,
            optimizer_bytes,
        })
    }

    /// Reads the state a checkpoint reference names.
    pub fn load(
        model: &ModelConfig,
        outer: OuterConfig,
        store: &BlobStore,
        reference: &CheckpointRef,
    ) -> Result<GlobalState, StateError> {
        let bytes = store
            .get(&reference.blob)?
            .ok_or(StateError::Missing(reference.blob))?;
        let ckpt = checkpoint::from_bytes(&bytes, &store.path_of(&reference.blob), model)?;
        let raw = store
            .get(&reference.optimizer_blob)?
            .ok_or(StateError::Missing(reference.optimizer_blob))?;
        if raw.len() != ckpt.params.len() * 4 {
            return Err(StateError::OptimizerLength {
                hash: reference.optimizer_blob,
                expected: ckpt.params.len() * 4,
                found: raw.len(),
            });
        }
        let momentum = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(GlobalState {
            round: reference.round,
            theta: ckpt.params,
            optimizer: OuterOptimizer::from_state(outer, momentum),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_saves_and_loads_bit_identically() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let model = ModelConfig::preset("tiny").unwrap();
        let mut state = GlobalState::initial(&model, OuterConfig::default());
        let delta: Vec<f32> = (0..state.theta.len())
            .map(|i| (i % 7) as f32 * 1e-3)
            .collect();
        state.optimizer.step(&mut state.theta, &delta);
        state.round = 1;
        let reference = state.save(&model, "run", &store).unwrap();
        assert_eq!(reference.params_hash, state.params_hash());
        let back = GlobalState::load(&model, OuterConfig::default(), &store, &reference).unwrap();
        assert_eq!(back.params_hash(), state.params_hash());
        assert_eq!(back.optimizer.momentum(), state.optimizer.momentum());
        assert_eq!(Hash::of_f32s(state.optimizer.momentum()).to_hex().len(), 64);
    }
}
