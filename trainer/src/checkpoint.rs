//! Checkpoints: the global params of a run (and optionally the outer
//! optimizer's momentum) in the safetensors format, so the Hugging Face
//! ecosystem can read the weights, with barnraise metadata in the header:
//! the run, the round, the params hash and the model config as JSON.
//!
//! Loading checks everything before handing params out: the config must
//! equal the caller's (a checkpoint of another model is refused by name), every
//! tensor must be present with its expected shape and f32 type, and the
//! params must hash to the recorded value.

use crate::model::ModelConfig;
use barnraise_protocol::Hash;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const KEY_FORMAT: &str = "format";
const KEY_RUN: &str = "barnraise.run";
const KEY_ROUND: &str = "barnraise.round";
const KEY_PARAMS_HASH: &str = "barnraise.params_hash";
pub const KEY_CONFIG: &str = "barnraise.model_config";
/// Tensor name of the outer optimizer's momentum buffer, when saved.
pub const OUTER_MOMENTUM_TENSOR: &str = "barnraise.outer_momentum";

/// What a checkpoint records besides the weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMeta {
    pub run: String,
    pub round: u64,
    pub params_hash: Hash,
}

/// A loaded checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub config: ModelConfig,
    pub params: Vec<f32>,
    pub outer_momentum: Option<Vec<f32>>,
    pub meta: CheckpointMeta,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: not a valid safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("checkpoint {path}: metadata entry '{key}' is missing or invalid")]
    Metadata { path: PathBuf, key: &'static str },
    #[error("checkpoint {path}: made for a different model ({found}); this run expects {expected}")]
    ConfigMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("checkpoint {path}: tensor {name}: {detail}")]
    Tensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
    #[error(
        "checkpoint {path}: params hash to {actual}, but the checkpoint records {recorded} (corrupt)"
    )]
    HashMismatch {
        path: PathBuf,
        recorded: Hash,
        actual: Hash,
    },
    #[error("checkpoint {path}: {found} param values given, the model has {expected}")]
    ParamLength {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The safetensors bytes of a checkpoint; `path` only names it in errors.
/// `meta.params_hash` must be the hash of `params` (checked, so a caller
/// bug cannot write a checkpoint that will never load).
pub fn to_bytes(
    path: &Path,
    config: &ModelConfig,
    params: &[f32],
    outer_momentum: Option<&[f32]>,
    meta: &CheckpointMeta,
) -> Result<Vec<u8>, CheckpointError> {
    let expected = config.params_count();
    if params.len() != expected {
        return Err(CheckpointError::ParamLength {
            path: path.to_owned(),
            expected,
            found: params.len(),
        });
    }
    if let Some(momentum) = outer_momentum
        && momentum.len() != expected
    {
        return Err(CheckpointError::ParamLength {
            path: path.to_owned(),
            expected,
            found: momentum.len(),
        });
    }
    let actual = Hash::of_f32s(params);
    if actual != meta.params_hash {
        return Err(CheckpointError::HashMismatch {
            path: path.to_owned(),
            recorded: meta.params_hash,
            actual,
        });
    }
    let format_err = |e: &dyn std::fmt::Display| CheckpointError::Format {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let config_json = serde_json::to_string(config).map_err(|e| format_err(&e))?;
    let metadata = HashMap::from([
        (KEY_FORMAT.to_string(), "pt".to_string()),
        (KEY_RUN.to_string(), meta.run.clone()),
        (KEY_ROUND.to_string(), meta.round.to_string()),
        (KEY_PARAMS_HASH.to_string(), meta.params_hash.to_hex()),
        (KEY_CONFIG.to_string(), config_json),
    ]);
    let mut buffers = Vec::new();
    let mut offset = 0;
    for (name, shape) in config.param_shapes() {
        let len: usize = shape.iter().product();
        buffers.push((name, shape, f32_bytes(&params[offset..offset + len])));
        offset += len;
    }
    if let Some(momentum) = outer_momentum {
        buffers.push((
            OUTER_MOMENTUM_TENSOR.to_string(),
            vec![momentum.len()],
            f32_bytes(momentum),
        ));
    }
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| format_err(&e))?;
        views.push((name.as_str(), view));
    }
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| format_err(&e))
}

/// Writes a checkpoint file.
pub fn save(
    path: &Path,
    config: &ModelConfig,
    params: &[f32],
    outer_momentum: Option<&[f32]>,
    meta: &CheckpointMeta,
) -> Result<(), CheckpointError> {
    let bytes = to_bytes(path, config, params, outer_momentum, meta)?;
    std::fs::write(path, bytes).map_err(|source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Reads a checkpoint file made for `expected`.
pub fn load(path: &Path, expected: &ModelConfig) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_bytes(&bytes, path, expected)
}

/// Reads a checkpoint file of whatever model it was saved for: the model
/// config comes from its metadata (for tools such as `barnraise generate`
/// and `export`, which serve any run's checkpoint).
pub fn load_any(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_bytes_any(&bytes, path)
}

/// [`from_bytes`] with the config the checkpoint names, checked first: a
/// valid architecture, and no more parameters than the file has bytes for
/// (so a small hostile file cannot ask for a large allocation).
pub fn from_bytes_any(bytes: &[u8], path: &Path) -> Result<Checkpoint, CheckpointError> {
    let (config, _) = read_header(bytes, path)?;
    let bad = |detail: String| CheckpointError::Format {
        path: path.to_owned(),
        detail,
    };
    config
        .validate()
        .map_err(|e| bad(format!("its model config is not usable: {e}")))?;
    if config.params_count().saturating_mul(4) > bytes.len() {
        return Err(bad(format!(
            "{} bytes cannot hold the {} parameters its config names",
            bytes.len(),
            config.params_count()
        )));
    }
    from_bytes(bytes, path, &config)
}

/// The model config and metadata of checkpoint bytes.
fn read_header(
    bytes: &[u8],
    path: &Path,
) -> Result<(ModelConfig, HashMap<String, String>), CheckpointError> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let config = metadata
        .get(KEY_CONFIG)
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or(CheckpointError::Metadata {
            path: path.to_owned(),
            key: KEY_CONFIG,
        })?;
    Ok((config, metadata))
}

/// Parses checkpoint bytes (e.g. a blob fetched from a peer); `path` names
/// the source in errors.
pub fn from_bytes(
    bytes: &[u8],
    path: &Path,
    expected: &ModelConfig,
) -> Result<Checkpoint, CheckpointError> {
    let format_err = |e: &dyn std::fmt::Display| CheckpointError::Format {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let (config, metadata) = read_header(bytes, path)?;
    let get = |key: &'static str| -> Result<&String, CheckpointError> {
        metadata.get(key).ok_or(CheckpointError::Metadata {
            path: path.to_owned(),
            key,
        })
    };
    let bad = |key: &'static str| CheckpointError::Metadata {
        path: path.to_owned(),
        key,
    };
    if &config != expected {
        return Err(CheckpointError::ConfigMismatch {
            path: path.to_owned(),
            expected: describe(expected),
            found: describe(&config),
        });
    }
    let meta = CheckpointMeta {
        run: get(KEY_RUN)?.clone(),
        round: get(KEY_ROUND)?.parse().map_err(|_| bad(KEY_ROUND))?,
        params_hash: get(KEY_PARAMS_HASH)?
            .parse()
            .map_err(|_| bad(KEY_PARAMS_HASH))?,
    };
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| format_err(&e))?;
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, CheckpointError> {
        let tensor_err = |detail: String| CheckpointError::Tensor {
            path: path.to_owned(),
            name: name.to_string(),
            detail,
        };
        let view = tensors
            .tensor(name)
            .map_err(|_| tensor_err("missing".to_string()))?;
        if view.dtype() != Dtype::F32 {
            return Err(tensor_err(format!(
                "has type {:?}, expected F32",
                view.dtype()
            )));
        }
        if view.shape() != shape {
            return Err(tensor_err(format!(
                "has shape {:?}, expected {:?}",
                view.shape(),
                shape
            )));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut params = Vec::with_capacity(config.params_count());
    for (name, shape) in config.param_shapes() {
        params.extend(read(&name, &shape)?);
    }
    let actual = Hash::of_f32s(&params);
    if actual != meta.params_hash {
        return Err(CheckpointError::HashMismatch {
            path: path.to_owned(),
            recorded: meta.params_hash,
            actual,
        });
    }
    let outer_momentum = if tensors.names().contains(&OUTER_MOMENTUM_TENSOR) {
        Some(read(OUTER_MOMENTUM_TENSOR, &[params.len()])?)
    } else {
        None
    };
    Ok(Checkpoint {
        config,
        params,
        outer_momentum,
        meta,
    })
}

/// A one-line description of a config for error messages.
fn describe(cfg: &ModelConfig) -> String {
    format!(
        "vocab {}, d_model {}, {} layers, {} heads, d_ff {}, context {}, rope theta {}, norm eps {}",
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.d_ff,
        cfg.max_seq_len,
        cfg.rope_theta,
        cfg.norm_eps
    )
}
