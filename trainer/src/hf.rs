//! Hugging Face export: a directory that `transformers` loads as a
//! `LlamaForCausalLM` (docs/running-a-coordinator.md, "Exporting the model").
//!
//! The trainer's architecture is Llama's — RMSNorm, rotary embeddings on the
//! two halves of each head, SwiGLU, untied input and output embeddings — and
//! its checkpoints already use Llama's tensor names, so the weights go over
//! unchanged. The export adds what the ecosystem expects beside them:
//! `config.json`, `generation_config.json`, the tokenizer files and a model
//! card the caller writes.

use crate::checkpoint::{self, CheckpointMeta};
use crate::model::{BYTE_VOCAB, ModelConfig};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Files an export writes, besides the card.
pub const FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

#[derive(Debug, thiserror::Error)]
pub enum HfError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{0}")]
    Invalid(String),
}

/// `config.json` for `transformers`' `LlamaForCausalLM`.
pub fn config_json(config: &ModelConfig) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        // Full multi-head attention: as many key/value heads as query heads.
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": "float32",
        // Byte-level runs have no special tokens.
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
    })
}

/// `generation_config.json`: sampling as `barnraise generate` does by default.
pub fn generation_config_json(config: &ModelConfig) -> Value {
    json!({
        "do_sample": true,
        "temperature": 0.8,
        "top_p": 0.95,
        "max_length": config.max_seq_len,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
    })
}

/// The printable character GPT-2's byte-level scheme gives byte `b`: printable
/// Latin-1 bytes stand for themselves, the other 68 take the code points from
/// 256 up, in byte order. A byte-level BPE with these 256 characters as its
/// vocabulary and no merges maps every byte to its own id.
pub fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// `tokenizer.json` (the `tokenizers` format) for byte-level runs: token id
/// = byte value, every byte string round-trips.
pub fn byte_tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), json!(b)))
        .collect();
    let byte_level = json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": false,
    });
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": [],
        },
    })
}

/// `tokenizer_config.json` for `AutoTokenizer`.
pub fn tokenizer_config_json(config: &ModelConfig) -> Value {
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
        "add_eos_token": false,
    })
}

/// Writes the export into `out` (created if needed; an earlier export there
/// is never overwritten): the files of [`FILES`] and `README.md` holding
/// `card`. `tokenizer_json` is the run's own tokenizer (`None`: a byte-level
/// run, which gets [`byte_tokenizer_json`]). The weights are
/// checked against `meta.params_hash` before anything is written.
pub fn export(
    out: &Path,
    config: &ModelConfig,
    params: &[f32],
    meta: &CheckpointMeta,
    tokenizer_json: Option<&[u8]>,
    card: &str,
) -> Result<Vec<PathBuf>, HfError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HfError::Io { path, source }
    };
    // The run's own tokenizer, or bytes; either must cover the model's vocabulary.
    let tokenizer_bytes = match tokenizer_json {
        Some(bytes) => {
            let tokenizer: tokenizers::Tokenizer = std::str::from_utf8(bytes)
                .map_err(|e| e.to_string())
                .and_then(|t| t.parse().map_err(|e: tokenizers::Error| e.to_string()))
                .map_err(|e| HfError::Invalid(format!("the run's tokenizer.json: {e}")))?;
            let vocab = tokenizer.get_vocab_size(true);
            if vocab != config.vocab_size {
                return Err(HfError::Invalid(format!(
                    "the tokenizer has {vocab} tokens, the model {}",
                    config.vocab_size
                )));
            }
            bytes.to_vec()
        }
        None if config.vocab_size == BYTE_VOCAB => {
            serde_json::to_vec_pretty(&byte_tokenizer_json()).unwrap_or_default()
        }
        None => {
            return Err(HfError::Invalid(format!(
                "the model's vocabulary is {} tokens, not bytes, and no tokenizer was given",
                config.vocab_size
            )));
        }
    };
    if let Some(existing) = FILES
        .iter()
        .chain(&["README.md"])
        .map(|name| out.join(name))
        .find(|path| path.exists())
    {
        return Err(HfError::Invalid(format!(
            "{} exists: {} already holds an export; choose a new directory",
            existing.display(),
            out.display()
        )));
    }
    let weights = checkpoint::to_bytes(&out.join("model.safetensors"), config, params, None, meta)?;
    let pretty = |v: Value| serde_json::to_vec_pretty(&v).unwrap_or_default();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", pretty(config_json(config))),
        (
            "generation_config.json",
            pretty(generation_config_json(config)),
        ),
        ("model.safetensors", weights),
        ("tokenizer.json", tokenizer_bytes),
        (
            "tokenizer_config.json",
            pretty(tokenizer_config_json(config)),
        ),
        ("README.md", card.as_bytes().to_vec()),
    ];
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = out.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use barnraise_protocol::Hash;

    #[test]
    fn the_byte_tokenizer_maps_every_byte_to_its_id_and_back() {
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_char).collect();
        assert_eq!(chars.len(), 256, "one character per byte");
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(
            byte_char(b' '),
            '\u{120}',
            "space is the 33rd unprintable byte"
        );
        let json = serde_json::to_string(&byte_tokenizer_json()).unwrap();
        let tokenizer: tokenizers::Tokenizer = json.parse().unwrap();
        let text = "Héllo, barn\nraisers!\t~ 100%";
        let encoding = tokenizer.encode(text, false).unwrap();
        let expected: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(encoding.get_ids(), expected.as_slice());
        assert_eq!(tokenizer.decode(&expected, false).unwrap(), text);
        assert_eq!(tokenizer.get_vocab_size(false), 256);
    }

    #[test]
    fn export_writes_llama_files_that_load_back() {
        let config = ModelConfig::preset("tiny").unwrap();
        let params = config.init_flat(5);
        let meta = CheckpointMeta {
            run: "r".into(),
            round: 3,
            params_hash: Hash::of_f32s(&params),
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("hf");
        let written = export(&out, &config, &params, &meta, None, "# card").unwrap();
        assert_eq!(written.len(), FILES.len() + 1);
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["hidden_size"], config.d_model);
        assert_eq!(cfg["intermediate_size"], config.d_ff);
        assert_eq!(cfg["num_hidden_layers"], config.n_layers);
        assert_eq!(cfg["num_key_value_heads"], config.n_heads);
        assert_eq!(cfg["vocab_size"], 256);
        assert_eq!(cfg["tie_word_embeddings"], false);
        // The weights: Llama's names and shapes, f32, and nothing else.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names = tensors.names();
        names.sort();
        let shapes = config.param_shapes();
        assert_eq!(names.len(), shapes.len());
        for (name, shape) in &shapes {
            let t = tensors.tensor(name).unwrap();
            assert_eq!(t.shape(), shape.as_slice(), "{name}");
            assert_eq!(t.dtype(), safetensors::tensor::Dtype::F32);
        }
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight"));
        let loaded = checkpoint::from_bytes(&bytes, &out, &config).unwrap();
        assert_eq!(loaded.params, params);
        assert_eq!(
            std::fs::read_to_string(out.join("README.md")).unwrap(),
            "# card"
        );
        // Not over an earlier export, and not with weights that are not the checkpoint's.
        assert!(export(&out, &config, &params, &meta, None, "").is_err());
        let mut other = params.clone();
        other[0] += 1.0;
        assert!(export(&dir.path().join("b"), &config, &other, &meta, None, "").is_err());
        // A tokenizer whose vocabulary is not the model's is refused.
        let json = serde_json::to_vec(&byte_tokenizer_json()).unwrap();
        let mut wide = config.clone();
        wide.vocab_size = 300;
        let wide_params = wide.init_flat(1);
        let wide_meta = CheckpointMeta {
            params_hash: Hash::of_f32s(&wide_params),
            ..meta.clone()
        };
        let refused = export(
            &dir.path().join("c"),
            &wide,
            &wide_params,
            &wide_meta,
            Some(&json),
            "",
        );
        assert!(refused.is_err());
    }
}
