//! The model's forward and backward pass written out by hand, for f32 on
//! the CPU (docs/training.md, "Against PyTorch on the CPU").
//!
//! candle's autograd adds every gradient into a freshly zeroed tensor, once
//! per use of every intermediate, and walks each transpose, reshape and copy
//! as an op of its own; on `small` that bookkeeping ran on one thread and was
//! most of what the second thread waited for. Here the forward keeps the
//! activations the backward needs, and the backward writes each gradient
//! once: two matmuls per projection, the one-pass kernels of crate::cpu_ops
//! for the rest, and attention split over rayon's threads by heads.
//!
//! Every value is computed in an order that does not follow the thread
//! count (per-head matmuls are whole gemm calls, the kernels work by rows),
//! so a spot check replays a step bit for bit on any CPU. The result agrees
//! with candle's autograd to float rounding (`backprop` tests below and in
//! trainer/tests).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use super::{Block, Model};
use crate::cpu_ops::{
    HeadShape, add, causal_softmax_grad, causal_softmax_value, cross_entropy_with_grad,
    merge_heads, rms_norm_grads, split_heads, swiglu_grads, swiglu_value,
};

/// What one block's backward needs from its forward.
struct BlockTape {
    /// The block's input, and the attention's normalized input.
    x: Tensor,
    h_attn: Tensor,
    /// Per-head blocks [batch·heads, seq, head_dim], q and k rotated.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The softmax's output per chunk of heads ([`Tape::chunks`]).
    probs: Vec<Tensor>,
    /// The heads' outputs merged back into rows, before the out projection.
    mixed: Tensor,
    /// The residual after attention, the MLP's normalized input, and the
    /// MLP's two projections and their SwiGLU.
    x_mid: Tensor,
    h_mlp: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
}

/// A forward pass kept for its backward: [`Model::cpu_forward`].
pub(crate) struct Tape {
    /// The per-head layout, the attention's score scale, and the chunks
    /// of heads (start, count) the attention was split into.
    shape: HeadShape,
    scale: f32,
    chunks: Vec<(usize, usize)>,
    /// RMSNorm's epsilon.
    eps: f32,
    ids: Tensor,
    blocks: Vec<BlockTape>,
    /// The last block's output, the final norm's output, and the logits'
    /// gradient (known once the loss is).
    x_last: Tensor,
    h_final: Tensor,
    grad_logits: Tensor,
    /// The mean next-token cross-entropy.
    pub(crate) loss: f32,
}

/// x · wᵀ for x [rows, in] and a weight w [out, in].
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

/// The gradients of [`linear`]: (∂x = g · w, ∂w = gᵀ · x), the two
/// side by side ([`both`]).
fn linear_grads(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    both(|| g.matmul(w), || g.t()?.matmul(x))
}

/// Runs two independent computations side by side on rayon's threads
/// (one after the other with one thread). Two whole matmuls at once keep
/// both cores busier than each matmul split over both: gemm's own split
/// pays a synchronization and a share of the packing per call. Each result
/// is the same computation either way.
fn both<A: Send, B: Send>(
    a: impl FnOnce() -> Result<A> + Send,
    b: impl FnOnce() -> Result<B> + Send,
) -> Result<(A, B)> {
    if rayon::current_num_threads() > 1 {
        let (a, b) = rayon::join(a, b);
        Ok((a?, b?))
    } else {
        Ok((a()?, b()?))
    }
}

/// `n` heads split into contiguous chunks (start, count), one per rayon
/// thread (one chunk with one thread). Each head is one whole gemm call
/// whichever chunk holds it, so the split does not change the bits.
fn head_chunks(n: usize) -> Vec<(usize, usize)> {
    let parts = rayon::current_num_threads().min(n).max(1);
    (0..parts)
        .map(|i| {
            let start = n * i / parts;
            (start, n * (i + 1) / parts - start)
        })
        .collect()
}

/// `f` over `items` in order, on rayon's threads when there are several
/// (on the caller with one).
fn map_chunks<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    if items.len() > 1 && rayon::current_num_threads() > 1 {
        items.par_iter().map(&f).collect()
    } else {
        items.iter().map(f).collect()
    }
}

/// One tensor from chunks along dimension 0 (no copy for one chunk).
fn joined(parts: Vec<Tensor>) -> Result<Tensor> {
    match <[Tensor; 1]>::try_from(parts) {
        Ok([one]) => Ok(one),
        Err(parts) => Tensor::cat(&parts, 0),
    }
}

impl Model {
    /// Whether this model computes f32 on the CPU with crate::cpu_ops'
    /// kernels: [`Model::cpu_forward`] applies, and the trainer's
    /// optimizer follows.
    pub(crate) fn cpu_kernels_apply(&self) -> bool {
        self.cpu_rope.is_some() && self.cpu_kernels && self.compute == DType::F32
    }

    /// The forward pass for token ids [batch, seq] against `targets`
    /// [batch, seq], keeping what [`Tape::backward`] needs.
    pub(crate) fn cpu_forward(&self, ids: &Tensor, targets: &Tensor) -> Result<Tape> {
        let Some(tables) = self
            .cpu_rope
            .as_ref()
            .filter(|_| self.cpu_kernels_apply() && ids.device().is_cpu())
        else {
            candle_core::bail!("the hand-written backward runs f32 on the CPU only");
        };
        let (batch, seq) = ids.dims2()?;
        let cfg = &self.config;
        if seq > cfg.max_seq_len {
            candle_core::bail!(
                "sequence length {seq} exceeds the model's max_seq_len {}",
                cfg.max_seq_len
            );
        }
        let shape = HeadShape {
            batch,
            seq,
            heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
        };
        let scale = (1.0 / (shape.head_dim as f64).sqrt()) as f32;
        let eps = cfg.norm_eps;
        let ids = ids.flatten_all()?;
        let targets: Vec<u32> = targets.flatten_all()?.to_vec1()?;
        let mut x = self.embed.detach().index_select(&ids, 0)?;
        let bounds = head_chunks(batch * shape.heads);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let w = |t: &Tensor| t.detach();
            let h_attn = candle_nn::ops::rms_norm(&x, &w(&block.attn_norm), eps)?;
            let project =
                |weight: &Tensor, rope| split_heads(&linear(&h_attn, &w(weight))?, shape, rope);
            let (q, (k, v)) = both(
                || project(&block.q, Some(tables)),
                || {
                    both(
                        || project(&block.k, Some(tables)),
                        || project(&block.v, None),
                    )
                },
            )?;
            let chunks = map_chunks(&bounds, |&(start, len)| {
                let (qc, kc, vc) = (
                    q.narrow(0, start, len)?,
                    k.narrow(0, start, len)?,
                    v.narrow(0, start, len)?,
                );
                let p = causal_softmax_value(&qc.matmul(&kc.t()?)?, scale)?;
                let out = p.matmul(&vc)?;
                Ok((p, out))
            })?;
            let (probs, outs): (Vec<Tensor>, Vec<Tensor>) = chunks.into_iter().unzip();
            let mixed = merge_heads(&joined(outs)?, shape, None)?;
            let x_mid = add(&x, &linear(&mixed, &w(&block.o))?)?;
            let h_mlp = candle_nn::ops::rms_norm(&x_mid, &w(&block.mlp_norm), eps)?;
            let (gate, up) = both(
                || linear(&h_mlp, &w(&block.gate)),
                || linear(&h_mlp, &w(&block.up)),
            )?;
            let act = swiglu_value(&gate, &up)?;
            let next = add(&x_mid, &linear(&act, &w(&block.down))?)?;
            blocks.push(BlockTape {
                x,
                h_attn,
                q,
                k,
                v,
                probs,
                mixed,
                x_mid,
                h_mlp,
                gate,
                up,
                act,
            });
            x = next;
        }
        let h_final = candle_nn::ops::rms_norm(&x, &self.final_norm.detach(), eps)?;
        let logits = linear(&h_final, &self.lm_head.detach())?;
        let (loss, grad_logits) = cross_entropy_with_grad(&logits, &targets)?;
        Ok(Tape {
            shape,
            scale,
            chunks: bounds,
            eps,
            ids,
            blocks,
            x_last: x,
            h_final,
            grad_logits,
            loss,
        })
    }
}

impl Tape {
    /// The loss's gradient for every parameter of `model`, the model that
    /// made this tape, keyed by its variables as candle's `backward` would
    /// give it.
    pub(crate) fn backward(self, model: &Model) -> Result<GradStore> {
        let eps = self.eps;
        let Some(tables) = model.cpu_rope.as_ref() else {
            candle_core::bail!("the hand-written backward runs on the CPU only");
        };
        let mut grads = GradStore::default();
        let (g_h, g_lm) = linear_grads(&self.h_final, &model.lm_head.detach(), &self.grad_logits)?;
        grads.insert(&model.lm_head, g_lm);
        let (mut g_x, g_norm) =
            rms_norm_grads(&self.x_last, &model.final_norm.detach(), &g_h, eps)?;
        grads.insert(&model.final_norm, g_norm);
        for (block, tape) in model.blocks.iter().zip(&self.blocks).rev() {
            g_x = block_backward(block, tape, &self, tables, g_x, &mut grads)?;
        }
        let g_embed = model
            .embed
            .detach()
            .zeros_like()?
            .index_add(&self.ids, &g_x, 0)?;
        grads.insert(&model.embed, g_embed);
        Ok(grads)
    }
}

/// One block's backward from the gradient of its output; the gradient of
/// its input.
fn block_backward(
    block: &Block,
    tape: &BlockTape,
    run: &Tape,
    tables: &crate::cpu_ops::RopeTables,
    g_out: Tensor,
    grads: &mut GradStore,
) -> Result<Tensor> {
    let w = |t: &Tensor| t.detach();
    let eps = run.eps;
    let (shape, scale) = (run.shape, run.scale);
    // MLP: out = x_mid + down(swiglu(gate(h), up(h))), h = norm(x_mid).
    let (g_act, g_down) = linear_grads(&tape.act, &w(&block.down), &g_out)?;
    grads.insert(&block.down, g_down);
    let (g_gate, g_up) = swiglu_grads(&tape.gate, &tape.up, &g_act)?;
    let ((g_h_gate, g_w_gate), (g_h_up, g_w_up)) = both(
        || linear_grads(&tape.h_mlp, &w(&block.gate), &g_gate),
        || linear_grads(&tape.h_mlp, &w(&block.up), &g_up),
    )?;
    grads.insert(&block.gate, g_w_gate);
    grads.insert(&block.up, g_w_up);
    let g_h = add(&g_h_gate, &g_h_up)?;
    let (g_x_norm, g_mlp_norm) = rms_norm_grads(&tape.x_mid, &w(&block.mlp_norm), &g_h, eps)?;
    grads.insert(&block.mlp_norm, g_mlp_norm);
    let g_mid = add(&g_out, &g_x_norm)?;
    // Attention: x_mid = x + o(merge(softmax(q kᵀ) v)), q k v from norm(x).
    let (g_mixed, g_o) = linear_grads(&tape.mixed, &w(&block.o), &g_mid)?;
    grads.insert(&block.o, g_o);
    let g_heads = split_heads(&g_mixed, shape, None)?;
    let work: Vec<((usize, usize), &Tensor)> =
        run.chunks.iter().copied().zip(&tape.probs).collect();
    let parts = map_chunks(&work, |&((start, len), p)| {
        let g = g_heads.narrow(0, start, len)?;
        let (q, k, v) = (
            tape.q.narrow(0, start, len)?,
            tape.k.narrow(0, start, len)?,
            tape.v.narrow(0, start, len)?,
        );
        let g_v = p.t()?.matmul(&g)?;
        let g_s = causal_softmax_grad(p, &g.matmul(&v.t()?)?, scale)?;
        let g_q = g_s.matmul(&k)?;
        let g_k = g_s.t()?.matmul(&q)?;
        Ok((g_q, g_k, g_v))
    })?;
    let (mut g_q, mut g_k, mut g_v) = (Vec::new(), Vec::new(), Vec::new());
    for (q, k, v) in parts {
        g_q.push(q);
        g_k.push(k);
        g_v.push(v);
    }
    let project = |g: Vec<Tensor>, weight: &Tensor, rope| {
        let g = merge_heads(&joined(g)?, shape, rope)?;
        linear_grads(&tape.h_attn, &w(weight), &g)
    };
    let ((g_h_q, g_wq), ((g_h_k, g_wk), (g_h_v, g_wv))) = both(
        || project(g_q, &block.q, Some(tables)),
        || {
            both(
                || project(g_k, &block.k, Some(tables)),
                || project(g_v, &block.v, None),
            )
        },
    )?;
    grads.insert(&block.q, g_wq);
    grads.insert(&block.k, g_wk);
    grads.insert(&block.v, g_wv);
    let g_h = add(&add(&g_h_q, &g_h_k)?, &g_h_v)?;
    let (g_x_norm, g_attn_norm) = rms_norm_grads(&tape.x, &w(&block.attn_norm), &g_h, eps)?;
    grads.insert(&block.attn_norm, g_attn_norm);
    add(&g_mid, &g_x_norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    /// A model a little larger than `tiny` (so the matmuls are big enough
    /// for gemm to split them over threads), with norm gains away from 1 so
    /// their gradients matter.
    fn model(seed: u64) -> (ModelConfig, Vec<(String, Var)>, Model) {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let cfg = ModelConfig {
            d_model: 128,
            n_heads: 4,
            d_ff: 344,
            max_seq_len: 64,
            ..tiny
        };
        let mut rng = Rng::new(seed);
        let vars: Vec<(String, Var)> = cfg
            .param_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let len: usize = shape.iter().product();
                let values: Vec<f32> = if shape.len() == 1 {
                    (0..len)
                        .map(|_| (1.0 + 0.2 * rng.normal()) as f32)
                        .collect()
                } else {
                    (0..len).map(|_| (0.08 * rng.normal()) as f32).collect()
                };
                let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu).unwrap();
                (name, Var::from_tensor(&t).unwrap())
            })
            .collect();
        let model = Model::new(&cfg, &vars, &Device::Cpu).unwrap();
        (cfg, vars, model)
    }

    fn batch(cfg: &ModelConfig, batch: usize, seq: usize, seed: u64) -> (Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let mut ids = || -> Vec<u32> {
            (0..batch * seq)
                .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                .collect()
        };
        let inputs = Tensor::from_vec(ids(), (batch, seq), &Device::Cpu).unwrap();
        let targets = Tensor::from_vec(ids(), (batch, seq), &Device::Cpu).unwrap();
        (inputs, targets)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// ‖a − b‖ / ‖b‖.
    fn relative(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (diff / norm.max(1e-30)).sqrt()
    }

    #[test]
    fn backprop_matches_candles_autograd() {
        let (cfg, vars, model) = model(7);
        let (inputs, targets) = batch(&cfg, 3, 40, 8);
        assert!(model.cpu_kernels_apply());
        let tape = model.cpu_forward(&inputs, &targets).unwrap();
        let loss = tape.loss;
        let ours = tape.backward(&model).unwrap();
        // Autograd over the same forward (the kernels' own backward ops).
        let reference = model.loss(&inputs, &targets).unwrap();
        let theirs = reference.backward().unwrap();
        let want = reference.to_scalar::<f32>().unwrap();
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "loss {loss} against {want}"
        );
        for (name, var) in &vars {
            let a = values(ours.get(var.as_tensor()).unwrap());
            let b = values(theirs.get(var.as_tensor()).unwrap());
            assert_eq!(a.len(), b.len(), "{name}");
            let gap = relative(&a, &b);
            assert!(gap < 2e-5, "{name}: relative gap {gap}");
            assert!(
                b.iter().any(|v| *v != 0.0),
                "{name} has no gradient to compare"
            );
        }
    }

    #[test]
    fn backprop_gives_the_same_bits_on_any_number_of_threads() {
        let (cfg, vars, model) = model(3);
        let (inputs, targets) = batch(&cfg, 5, 64, 4);
        let run = || -> Vec<Vec<f32>> {
            let tape = model.cpu_forward(&inputs, &targets).unwrap();
            let mut out = vec![vec![tape.loss]];
            let grads = tape.backward(&model).unwrap();
            out.extend(
                vars.iter()
                    .map(|(_, v)| values(grads.get(v.as_tensor()).unwrap())),
            );
            out
        };
        crate::cpu_ops::assert_same_bits_on_any_thread_count(run);
    }

    #[test]
    fn backprop_refuses_what_it_cannot_run() {
        let (cfg, _, mut model) = model(1);
        let (inputs, targets) = batch(&cfg, 2, 8, 2);
        // Longer than the model's context.
        let (long, long_targets) = batch(&cfg, 1, cfg.max_seq_len + 1, 2);
        assert!(model.cpu_forward(&long, &long_targets).is_err());
        // Targets that do not match the inputs.
        let (_, short) = batch(&cfg, 2, 7, 2);
        assert!(model.cpu_forward(&inputs, &short).is_err());
        // A target outside the vocabulary.
        let bad = Tensor::from_vec(vec![cfg.vocab_size as u32; 16], (2, 8), &Device::Cpu).unwrap();
        assert!(model.cpu_forward(&inputs, &bad).is_err());
        // The primitives' path: autograd, not this one.
        model.set_cpu_kernels(false);
        assert!(!model.cpu_kernels_apply());
        assert!(model.cpu_forward(&inputs, &targets).is_err());
    }

    #[test]
    fn heads_split_and_merge_are_inverses() {
        let (cfg, _, model) = model(5);
        let tables = model.cpu_rope.as_ref().unwrap();
        let shape = HeadShape {
            batch: 3,
            seq: 10,
            heads: cfg.n_heads,
            head_dim: cfg.head_dim(),
        };
        let x = Tensor::randn(0f32, 1.0, (30, cfg.d_model), &Device::Cpu).unwrap();
        let plain = split_heads(&x, shape, None).unwrap();
        // The same layout as candle's reshape and transpose.
        let want = x
            .reshape((3, 10, cfg.n_heads, cfg.head_dim()))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((3 * cfg.n_heads, 10, cfg.head_dim()))
            .unwrap();
        assert_eq!(values(&plain), values(&want));
        assert_eq!(
            values(&merge_heads(&plain, shape, None).unwrap()),
            values(&x)
        );
        // Rotated: the rotation is orthogonal, so merging rotates back.
        let rotated = split_heads(&x, shape, Some(tables)).unwrap();
        assert!(relative(&values(&rotated), &values(&plain)) > 0.1);
        let back = merge_heads(&rotated, shape, Some(tables)).unwrap();
        assert!(relative(&values(&back), &values(&x)) < 1e-6);
        // A shape that does not fit the input is an error, not a panic.
        let wrong = HeadShape { batch: 4, ..shape };
        assert!(split_heads(&x, wrong, None).is_err());
    }
}
