//! The model: a decoder-only transformer in the Llama style (RMSNorm,
//! rotary positions, SwiGLU MLP, causal self-attention), its configuration
//! with named presets, and deterministic seeded initialisation.
//!
//! Parameter names follow the Hugging Face Llama layout
//! (`model.layers.N.self_attn.q_proj.weight`, ...), so a checkpoint can be
//! loaded there with a matching `LlamaConfig`. The flat parameter vector that
//! the codec and the outer optimizer see is every parameter concatenated in
//! name order ([`ModelConfig::param_shapes`] is the single source of truth).
//!
//! RMSNorm and softmax run as candle-nn's fused kernels with a backward pass
//! of our own (crate::ops). On the CPU in f32, rotary embedding, SwiGLU, the
//! causal softmax and RMSNorm's backward run as one-pass kernels
//! (crate::cpu_ops); on a GPU and in bf16 rotary and SwiGLU are built from
//! primitives.

mod backprop;

use crate::cpu_ops::{RopeTables, causal_softmax, swiglu};
use crate::ops::{rms_norm_with, softmax_last};
use crate::rng::{Rng, derive_seed};
use candle_core::{D, DType, Device, Result as CandleResult, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Architecture hyperparameters. Two configs are compatible (a checkpoint of
/// one loads into the other) only when they are equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Token ids are `0..vocab_size`; 256 means raw bytes.
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Hidden width of the SwiGLU MLP.
    pub d_ff: usize,
    /// Longest sequence the model is trained on (rotary tables cover it).
    pub max_seq_len: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

/// The preset names, smallest first.
pub const PRESETS: &[&str] = &["tiny", "small", "medium", "large", "xl"];

/// Largest model a run may use: what one update payload can carry
/// (`barnraise_protocol::codec::MAX_UPDATE_PARAMS`).
pub const MAX_MODEL_PARAMS: usize = barnraise_protocol::codec::MAX_UPDATE_PARAMS;
/// Largest `d_model` and `d_ff`.
pub const MAX_WIDTH: usize = 1 << 16;
/// Largest `n_layers`.
pub const MAX_LAYERS: usize = 1024;
/// Largest `max_seq_len` (the rotary tables cover it).
pub const MAX_CONTEXT: usize = 1 << 20;
/// Largest `max_seq_len × d_model`, the size of each rotary table.
pub const MAX_ROPE_TABLE: usize = 1 << 28;

/// The byte-level vocabulary every preset uses.
pub const BYTE_VOCAB: usize = 256;

impl ModelConfig {
    /// A named preset: `tiny` (~0.13M params, for tests), `small` (~3.3M, the
    /// `barnraise up` default), `medium` (~128M), `large` (~310M), `xl`
    /// (~1.2B); the last three are meant for GPUs.
    pub fn preset(name: &str) -> Option<Self> {
        let (d_model, n_layers, n_heads, d_ff, max_seq_len) = match name {
            "tiny" => (64, 2, 4, 176, 64),
            "small" => (256, 4, 8, 688, 128),
            "medium" => (768, 18, 12, 2048, 1024),
            "large" => (1024, 24, 16, 2816, 1024),
            "xl" => (2048, 24, 16, 5632, 2048),
            _ => return None,
        };
        Some(ModelConfig {
            vocab_size: BYTE_VOCAB,
            d_model,
            n_layers,
            n_heads,
            d_ff,
            max_seq_len,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Checks the shape rules the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("d_ff", self.d_ff),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("model config: {name} must be positive"));
            }
        }
        if self.vocab_size > usize::from(u16::MAX) + 1 {
            return Err(format!(
                "model config: vocab_size {} does not fit 16-bit shard tokens",
                self.vocab_size
            ));
        }
        if !self.d_model.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "model config: d_model {} must split into {} heads of even width",
                self.d_model, self.n_heads
            ));
        }
        // A config can come from a peer (the coordinator's welcome): bound
        // every size before anything loops over layers or allocates params.
        let most = [
            ("d_model", self.d_model, MAX_WIDTH),
            ("d_ff", self.d_ff, MAX_WIDTH),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("max_seq_len", self.max_seq_len, MAX_CONTEXT),
        ];
        for (name, value, limit) in most {
            if value > limit {
                return Err(format!(
                    "model config: {name} {value} is over the limit of {limit}"
                ));
            }
        }
        // The rotary tables hold max_seq_len × head_dim values, twice.
        if self.max_seq_len.saturating_mul(self.d_model) > MAX_ROPE_TABLE {
            return Err(format!(
                "model config: max_seq_len {} × d_model {} is over the limit of {MAX_ROPE_TABLE}",
                self.max_seq_len, self.d_model
            ));
        }
        // Within those sizes the count cannot overflow and lists at most
        // MAX_LAYERS layers.
        if self.params_count() > MAX_MODEL_PARAMS {
            return Err(format!(
                "model config: more than {MAX_MODEL_PARAMS} params (the most one update can carry)"
            ));
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !positive(self.rope_theta) || !positive(self.norm_eps) {
            return Err(format!(
                "model config: rope_theta {} and norm_eps {} must be finite and positive",
                self.rope_theta, self.norm_eps
            ));
        }
        Ok(())
    }

    /// Every parameter's name and shape, sorted by name: the layout of the
    /// flat parameter vector and of checkpoints.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.d_model, self.d_ff, self.vocab_size);
        let mut shapes = vec![
            ("model.embed_tokens.weight".to_string(), vec![v, d]),
            ("model.norm.weight".to_string(), vec![d]),
            ("lm_head.weight".to_string(), vec![v, d]),
        ];
        for layer in 0..self.n_layers {
            let p = format!("model.layers.{layer}");
            for (name, shape) in [
                ("input_layernorm.weight", vec![d]),
                ("post_attention_layernorm.weight", vec![d]),
                ("self_attn.q_proj.weight", vec![d, d]),
                ("self_attn.k_proj.weight", vec![d, d]),
                ("self_attn.v_proj.weight", vec![d, d]),
                ("self_attn.o_proj.weight", vec![d, d]),
                ("mlp.gate_proj.weight", vec![f, d]),
                ("mlp.up_proj.weight", vec![f, d]),
                ("mlp.down_proj.weight", vec![d, f]),
            ] {
                shapes.push((format!("{p}.{name}"), shape));
            }
        }
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        shapes
    }

    /// Total number of parameters (the flat vector's length).
    pub fn params_count(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Training FLOPs per token at the full context length.
    pub fn flops_per_token(&self) -> f64 {
        self.flops_per_token_at(self.max_seq_len)
    }

    /// Training FLOPs (forward + backward) per token at context `seq_len`:
    /// 6 per weight of every matmul (the embedding lookup is free, the norms
    /// are negligible) plus the attention score and mix matmuls,
    /// 12 · layers · seq_len · d_model (the usual PaLM-appendix estimate; the
    /// causal half is computed too, so it is counted).
    pub fn flops_per_token_at(&self, seq_len: usize) -> f64 {
        let (d, f, v) = (
            self.d_model as f64,
            self.d_ff as f64,
            self.vocab_size as f64,
        );
        let per_layer = 4.0 * d * d + 3.0 * d * f;
        let matmul_weights = self.n_layers as f64 * per_layer + v * d;
        6.0 * matmul_weights + 12.0 * self.n_layers as f64 * seq_len as f64 * d
    }

    /// The initial value of one parameter, drawn from our own seeded PRNG so
    /// it is the same on every machine: norms start at 1, matmul weights and
    /// embeddings are N(0, 0.02²), and the projections that write into the
    /// residual stream (o_proj, down_proj) are scaled by 1/√(2·layers) so the
    /// residual's variance does not grow with depth (GPT-2's rule).
    pub fn init_param(&self, name: &str, len: usize, seed: u64) -> Vec<f32> {
        if name.ends_with("norm.weight") {
            return vec![1.0; len];
        }
        let mut std = 0.02;
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            std /= (2.0 * self.n_layers as f64).sqrt();
        }
        let mut rng = Rng::new(derive_seed(seed, name));
        (0..len).map(|_| (rng.normal() * std) as f32).collect()
    }

    /// The whole initial flat parameter vector for `seed`.
    pub fn init_flat(&self, seed: u64) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.params_count());
        for (name, shape) in self.param_shapes() {
            flat.extend(self.init_param(&name, shape.iter().product(), seed));
        }
        flat
    }
}

/// One transformer block's weights (handles into the trainer's variables).
struct Block {
    attn_norm: Tensor,
    mlp_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The model's forward pass over a set of named variables. The tensors are
/// clones of the [`Var`]s' handles, so updating a variable in place updates
/// the model and gradients flow to the variables.
pub struct Model {
    config: ModelConfig,
    embed: Tensor,
    final_norm: Tensor,
    lm_head: Tensor,
    blocks: Vec<Block>,
    /// cos and sin tables, [max_seq_len, head_dim], already duplicated across
    /// the two rotated halves.
    rope_cos: Tensor,
    rope_sin: Tensor,
    /// The dtype matmuls and activations compute in (crate::precision);
    /// f32 makes every cast below a no-op.
    compute: DType,
    /// The rotary tables for crate::cpu_ops, on the CPU only.
    cpu_rope: Option<RopeTables>,
    /// Whether f32 on the CPU runs crate::cpu_ops' one-pass kernels (the
    /// default) or candle's primitives.
    cpu_kernels: bool,
}

impl Model {
    /// Builds the model over `vars`, given in [`ModelConfig::param_shapes`]
    /// order.
    pub fn new(
        config: &ModelConfig,
        vars: &[(String, Var)],
        device: &Device,
    ) -> CandleResult<Self> {
        let find = |name: &str| -> CandleResult<Tensor> {
            vars.binary_search_by(|(n, _)| n.as_str().cmp(name))
                .map(|i| vars[i].1.as_tensor().clone())
                .map_err(|_| candle_core::Error::Msg(format!("model is missing parameter {name}")))
        };
        let mut blocks = Vec::with_capacity(config.n_layers);
        for layer in 0..config.n_layers {
            let p = format!("model.layers.{layer}");
            blocks.push(Block {
                attn_norm: find(&format!("{p}.input_layernorm.weight"))?,
                mlp_norm: find(&format!("{p}.post_attention_layernorm.weight"))?,
                q: find(&format!("{p}.self_attn.q_proj.weight"))?,
                k: find(&format!("{p}.self_attn.k_proj.weight"))?,
                v: find(&format!("{p}.self_attn.v_proj.weight"))?,
                o: find(&format!("{p}.self_attn.o_proj.weight"))?,
                gate: find(&format!("{p}.mlp.gate_proj.weight"))?,
                up: find(&format!("{p}.mlp.up_proj.weight"))?,
                down: find(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let (rope_cos, rope_sin) = rope_tables(config, device)?;
        let cpu_rope = if device.is_cpu() {
            Some(RopeTables::new(&rope_cos, &rope_sin)?)
        } else {
            None
        };
        Ok(Model {
            config: config.clone(),
            embed: find("model.embed_tokens.weight")?,
            final_norm: find("model.norm.weight")?,
            lm_head: find("lm_head.weight")?,
            blocks,
            rope_cos,
            rope_sin,
            compute: DType::F32,
            cpu_rope,
            cpu_kernels: true,
        })
    }

    /// Computes in `dtype` from now on (crate::precision has the policy).
    pub(crate) fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    pub(crate) fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Runs f32 on the CPU through candle's primitives and autograd (and
    /// the trainer's tensor AdamW) instead of the one-pass kernels
    /// (crate::cpu_ops) and the hand-written backward (`backprop`) when
    /// `on` is false: for comparing
    /// the two (`bench train --no-cpu-kernels`) and testing one against
    /// the other. The two agree to float rounding, not bit for bit, so
    /// every node of a run must use the same.
    pub fn set_cpu_kernels(&mut self, on: bool) {
        self.cpu_kernels = on;
    }

    /// Logits [batch·seq, vocab], in f32, for token ids [batch, seq] (u32).
    pub fn forward(&self, ids: &Tensor) -> CandleResult<Tensor> {
        let (batch, seq) = ids.dims2()?;
        let cfg = &self.config;
        let (d, heads, head_dim) = (cfg.d_model, cfg.n_heads, cfg.head_dim());
        if seq > cfg.max_seq_len {
            candle_core::bail!(
                "sequence length {seq} exceeds the model's max_seq_len {}",
                cfg.max_seq_len
            );
        }
        let rows = batch * seq;
        // The residual stream is kept 2-D [rows, d] so every projection is
        // one plain matmul against a transposed weight (no copy for gemm).
        // The residual stream x, the norms, the softmax and the logits stay
        // f32; matmul operands and the activations between them are in
        // `c` (crate::precision).
        let c = self.compute;
        let f32 = DType::F32;
        let weight = |w: &Tensor| -> CandleResult<Tensor> { w.to_dtype(c)?.t() };
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?;
        let cos = self.rope_cos.narrow(0, 0, seq)?.to_dtype(c)?;
        let sin = self.rope_sin.narrow(0, 0, seq)?.to_dtype(c)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        // One-pass kernels for f32 on the CPU (crate::cpu_ops).
        let kernels = match &self.cpu_rope {
            Some(tables) if self.cpu_kernels && c == f32 && ids.device().is_cpu() => Some(tables),
            _ => None,
        };
        let mask = match kernels {
            Some(_) => None,
            None => Some(causal_mask(seq, ids.device())?),
        };
        let rms_norm =
            |x: &Tensor, w: &Tensor| rms_norm_with(x, w, cfg.norm_eps, kernels.is_some());
        for block in &self.blocks {
            let h = rms_norm(&x, &block.attn_norm)?.to_dtype(c)?;
            let split = |w: &Tensor| -> CandleResult<Tensor> {
                h.matmul(&weight(w)?)?
                    .reshape((batch, seq, heads, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let rotate = |x: Tensor| match kernels {
                Some(tables) => tables.apply(&x),
                None => rope(&x, &cos, &sin),
            };
            let q = rotate(split(&block.q)?)?;
            let k = rotate(split(&block.k)?)?;
            let v = split(&block.v)?;
            let attn = match &mask {
                None => causal_softmax(&q.matmul(&k.t()?)?, scale as f32)?,
                Some(mask) => {
                    let scores = (q.matmul(&k.t()?)? * scale)?
                        .to_dtype(f32)?
                        .broadcast_add(mask)?;
                    softmax_last(&scores)?.to_dtype(c)?
                }
            };
            let mixed = attn.matmul(&v)?.transpose(1, 2)?.reshape((rows, d))?;
            x = (x + mixed.matmul(&weight(&block.o)?)?.to_dtype(f32)?)?;
            let h = rms_norm(&x, &block.mlp_norm)?.to_dtype(c)?;
            let gate = h.matmul(&weight(&block.gate)?)?;
            let up = h.matmul(&weight(&block.up)?)?;
            let mixed = match kernels {
                Some(_) => swiglu(&gate, &up)?,
                None => (gate.silu()? * up)?,
            };
            x = (x + mixed.matmul(&weight(&block.down)?)?.to_dtype(f32)?)?;
        }
        let x = rms_norm(&x, &self.final_norm)?.to_dtype(c)?;
        x.matmul(&weight(&self.lm_head)?)?.to_dtype(f32)
    }

    /// Mean next-token cross-entropy of `targets` [batch, seq] given `ids`.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> CandleResult<Tensor> {
        let logits = self.forward(ids)?;
        candle_nn::loss::cross_entropy(&logits, &targets.flatten_all()?)
    }
}

/// Rotary embedding in the "rotate half" convention (Llama / Hugging Face):
/// x·cos + rotate_half(x)·sin, for x [batch, heads, seq, head_dim].
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CandleResult<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let first = x.narrow(D::Minus1, 0, half)?;
    let second = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn rope_tables(cfg: &ModelConfig, device: &Device) -> CandleResult<(Tensor, Tensor)> {
    let head_dim = cfg.head_dim();
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(cfg.max_seq_len * head_dim);
    let mut sin = Vec::with_capacity(cfg.max_seq_len * head_dim);
    for pos in 0..cfg.max_seq_len {
        // Angles in f64 so the tables do not depend on f32 pow rounding.
        let row: Vec<f64> = (0..half)
            .map(|i| pos as f64 / f64::from(cfg.rope_theta).powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() as f32));
            sin.extend(row.iter().map(|a| a.sin() as f32));
        }
    }
    let shape = (cfg.max_seq_len, head_dim);
    Ok((
        Tensor::from_vec(cos, shape, device)?,
        Tensor::from_vec(sin, shape, device)?,
    ))
}

/// Additive mask [seq, seq]: 0 where a position may attend, −∞ above the
/// diagonal. Every row keeps its diagonal, so softmax never sees an all −∞ row.
pub(crate) fn causal_mask(seq: usize, device: &Device) -> CandleResult<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq, seq), device)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_promised_sizes() {
        let tiny = ModelConfig::preset("tiny")
            .map(|c| c.params_count())
            .unwrap_or(0);
        let small = ModelConfig::preset("small")
            .map(|c| c.params_count())
            .unwrap_or(0);
        let medium = ModelConfig::preset("medium")
            .map(|c| c.params_count())
            .unwrap_or(0);
        assert!(tiny > 10_000 && tiny < 1_000_000, "tiny {tiny}");
        assert!(small > 2_000_000 && small < 10_000_000, "small {small}");
        assert!(medium > 100_000_000, "medium {medium}");
        for name in PRESETS {
            let cfg = ModelConfig::preset(name);
            assert!(cfg.as_ref().is_some_and(|c| c.validate().is_ok()), "{name}");
        }
        assert!(ModelConfig::preset("huge").is_none());
    }

    /// A config can come from a peer: sizes that overflow, loop for ever
    /// or allocate without bound are refused.
    #[test]
    fn validate_bounds_every_size() {
        let tiny = ModelConfig::preset("tiny").unwrap_or_else(|| unreachable!());
        let refused = [
            ModelConfig {
                n_layers: 1 << 40,
                ..tiny.clone()
            },
            ModelConfig {
                n_layers: MAX_LAYERS + 1,
                ..tiny.clone()
            },
            ModelConfig {
                d_model: 1 << 40,
                n_heads: 2,
                ..tiny.clone()
            },
            ModelConfig {
                d_ff: usize::MAX,
                ..tiny.clone()
            },
            ModelConfig {
                max_seq_len: usize::MAX,
                ..tiny.clone()
            },
            ModelConfig {
                max_seq_len: MAX_CONTEXT,
                d_model: 1 << 12,
                n_heads: 16,
                ..tiny.clone()
            },
            // 2 × 65536 × 65536 embedding params alone: over 2e9.
            ModelConfig {
                vocab_size: 65_536,
                d_model: 65_536,
                n_heads: 2,
                ..tiny.clone()
            },
            ModelConfig {
                rope_theta: f32::NAN,
                ..tiny.clone()
            },
            ModelConfig {
                norm_eps: 0.0,
                ..tiny.clone()
            },
        ];
        for cfg in refused {
            assert!(cfg.validate().is_err(), "{cfg:?} passed");
        }
    }

    #[test]
    fn param_shapes_are_sorted_and_unique() {
        let cfg = ModelConfig::preset("tiny").unwrap_or_else(|| unreachable!());
        let shapes = cfg.param_shapes();
        assert!(shapes.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(cfg.init_flat(1).len(), cfg.params_count());
        assert_eq!(cfg.init_flat(1), cfg.init_flat(1));
        assert_ne!(cfg.init_flat(1), cfg.init_flat(2));
    }
}
