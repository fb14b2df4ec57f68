//! One-pass CPU kernels for the model's element-wise work, with their
//! backward passes, for f32 on the CPU (docs/training.md, "Against PyTorch
//! on the CPU").
//!
//! Built from candle's primitives, each of these is several passes forward
//! and more backward, each pass a new tensor, run on one thread: rotary
//! embedding is six forward, SwiGLU three, the attention's scale, causal mask
//! and softmax four, and autograd adds a zeroed gradient and an add for every
//! intermediate. Here each is one custom op carrying its own backward: one
//! pass forward and one or two backward, split over rayon's threads by rows.
//!
//! Every row is computed by one thread in a fixed order, and the only
//! reduction across rows (RMSNorm's gain gradient) sums fixed blocks of rows
//! and then the blocks in order, so the results do not depend on the number
//! of threads: a spot check replays a round bit for bit on any CPU
//! (docs/security.md, "Spot checks"). Tested against the primitive versions'
//! autograd (`cpu_kernels_match_the_primitives_and_their_gradients`) and for
//! thread-count independence.
//!
//! The GPU and bf16 paths keep candle's primitives (crate::model picks).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows handed to one rayon task at least, so tiny rows do not pay a task
/// each.
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// The f32 slice a contiguous storage holds.
fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Rows of `width` per task, whole rows, at least [`MIN_TASK_ELEMS`].
fn rows_per_task(width: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(width.max(1)).max(1)
}

/// Whether to hand work to rayon's pool. With one thread (`barnraise up`
/// runs each node so, several nodes in one process) the caller computes
/// the rows itself: handing them over would queue every node's kernels on
/// that one pool thread while the callers wait.
fn parallel() -> bool {
    rayon::current_num_threads() > 1
}

/// A new buffer of `len` values, rows of `width`, each row written by
/// `f(row, out_row)`: in blocks of whole rows in parallel when
/// [`parallel`], the same blocks either way.
fn map_rows(len: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let width = width.max(1);
    let mut out = vec![0f32; len];
    let per = rows_per_task(width);
    let block = |(index, chunk): (usize, &mut [f32])| {
        for (k, row) in chunk.chunks_exact_mut(width).enumerate() {
            f(index * per + k, row);
        }
    };
    if parallel() {
        out.par_chunks_mut(per * width).enumerate().for_each(block);
    } else {
        out.chunks_mut(per * width).enumerate().for_each(block);
    }
    out
}

/// f(a[i], b[i]) for every i: a plain map the compiler vectorizes,
/// written once into a new buffer (no zeroed buffer first), in parallel
/// when [`parallel`]. Each element depends on its inputs only, so the bits
/// do not follow the split.
fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    if parallel() {
        let mut out = Vec::with_capacity(a.len());
        a.par_iter()
            .zip(b)
            .with_min_len(MIN_TASK_ELEMS)
            .map(|(&x, &y)| f(x, y))
            .collect_into_vec(&mut out);
        out
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}

/// A two-input element-wise op's forward: [`map2`] over the two
/// storages, which must hold as many values, shaped as the first.
fn elementwise2(
    op: &str,
    (sa, la): (&CpuStorage, &Layout),
    (sb, lb): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> Result<(CpuStorage, Shape)> {
    let (a, b) = (slice(sa, la, op)?, slice(sb, lb, op)?);
    same_len(op, a.len(), b.len())?;
    Ok((CpuStorage::F32(map2(a, b, f)), la.shape().clone()))
}

/// [`map2`] over three inputs.
fn map3(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync + Send,
) -> Vec<f32> {
    if parallel() {
        let mut out = Vec::with_capacity(a.len());
        a.par_iter()
            .zip(b)
            .zip(c)
            .with_min_len(MIN_TASK_ELEMS)
            .map(|((&x, &y), &z)| f(x, y, z))
            .collect_into_vec(&mut out);
        out
    } else {
        a.iter()
            .zip(b)
            .zip(c)
            .map(|((&x, &y), &z)| f(x, y, z))
            .collect()
    }
}

fn same_len(op: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        candle_core::bail!("{op}: inputs of {a} and {b} elements");
    }
    Ok(())
}

/// Rotary tables for the CPU kernels: cos and sin, [max_seq, head_dim],
/// duplicated across the two halves as in crate::model.
#[derive(Clone)]
pub(crate) struct RopeTables {
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    head_dim: usize,
}

impl RopeTables {
    pub(crate) fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let (_, head_dim) = cos.dims2()?;
        if head_dim == 0 || head_dim % 2 != 0 || sin.dims() != cos.dims() {
            candle_core::bail!(
                "rotary: tables {:?} and {:?} need the same shape and an even, non-zero head_dim",
                cos.dims(),
                sin.dims()
            );
        }
        let cos: Vec<f32> = cos.flatten_all()?.to_vec1()?;
        let sin: Vec<f32> = sin.flatten_all()?.to_vec1()?;
        // The backward rotates back with the same angles, which is the
        // transpose only when both halves of a row hold the same angle.
        let half = head_dim / 2;
        let doubled = |t: &[f32]| {
            t.chunks_exact(head_dim)
                .all(|row| row[..half] == row[half..])
        };
        if !doubled(&cos) || !doubled(&sin) {
            candle_core::bail!("rotary: each table row must repeat its first half");
        }
        Ok(RopeTables {
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            head_dim,
        })
    }

    /// Rotary embedding of x [batch, heads, seq, head_dim] (contiguous),
    /// differentiable: y = x·cos + rotate_half(x)·sin.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, seq, dim) = x.dims4()?;
        if dim != self.head_dim || seq * dim > self.cos.len() {
            candle_core::bail!(
                "rotary: input [.., {seq}, {dim}] does not fit tables of head_dim {} and {} positions",
                self.head_dim,
                self.cos.len() / self.head_dim
            );
        }
        x.contiguous()?.apply_op1(Rope {
            tables: self.clone(),
            seq,
            inverse: false,
        })
    }
}

/// Rotates each row of `dim` by its position's angles; `inverse` rotates
/// back (sin negated), which is the backward pass: the rotation is
/// orthogonal.
struct Rope {
    tables: RopeTables,
    seq: usize,
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "barnraise-rope-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "rotary")?;
        let dim = self.tables.head_dim;
        let half = dim / 2;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let (cos, sin) = (&self.tables.cos[..], &self.tables.sin[..]);
        let out = map_rows(x.len(), dim, |row, y| {
            let pos = row % self.seq;
            let xr = &x[row * dim..(row + 1) * dim];
            let (c, sn) = (&cos[pos * dim..][..dim], &sin[pos * dim..][..dim]);
            for j in 0..half {
                let (a, b) = (xr[j], xr[j + half]);
                y[j] = a * c[j] - sign * b * sn[j];
                y[j + half] = b * c[j + half] + sign * a * sn[j + half];
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = Rope {
            tables: self.tables.clone(),
            seq: self.seq,
            inverse: !self.inverse,
        };
        Ok(Some(grad.detach().contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// SiLU(a) ⊙ b, differentiable in both.
pub(crate) fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Swiglu)
}

/// eˣ in f32 from f32 arithmetic alone: x = k·ln 2 + r with |r| ≤ ln 2 / 2,
/// eʳ by its Taylor series to r⁷ (truncation under 1e-8 relative), and
/// 2ᵏ built from its exponent bits. Within 2 ulp of the true value over
/// the whole range (tested; 9.5e-8 relative at worst), vectorizable (no branches, no library call), and the same bits
/// on every CPU and libc, where a libm's `expf` may round differently from
/// another's. Inputs are clamped to [−87, 88], so the result is a normal
/// float; NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k · LN2_HI is exact for the k that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * two_k
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

struct Swiglu;

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "barnraise-swiglu-cpu"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2("swiglu", (sa, la), (sb, lb), |x, u| x * sigmoid(x) * u)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (a, b, g) = (a.detach(), b.detach(), grad.detach().contiguous()?);
        let ga = a.apply_op3_no_bwd(&b, &g, &SwigluGrad { wrt_a: true })?;
        let gb = a.apply_op3_no_bwd(&b, &g, &SwigluGrad { wrt_a: false })?;
        Ok((Some(ga), Some(gb)))
    }
}

/// The gradient of SiLU(a) ⊙ b for `wrt_a` (∂a = g ⊙ b ⊙ σ(a)(1 + a(1 − σ(a))))
/// or b (∂b = g ⊙ SiLU(a)), from (a, b, g).
struct SwigluGrad {
    wrt_a: bool,
}

impl CustomOp3 for SwigluGrad {
    fn name(&self) -> &'static str {
        "barnraise-swiglu-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "swiglu backward";
        let (a, b, g) = (slice(sa, la, op)?, slice(sb, lb, op)?, slice(sg, lg, op)?);
        same_len(op, a.len(), b.len())?;
        same_len(op, a.len(), g.len())?;
        let out = if self.wrt_a {
            map3(a, b, g, |a, b, g| {
                let s = sigmoid(a);
                g * b * s * (1.0 + a * (1.0 - s))
            })
        } else {
            map3(a, b, g, |a, _, g| g * a * sigmoid(a))
        };
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }
}

/// softmax(scale · s) over the last dimension of s [.., t, t] with the
/// causal mask (position i sees 0..=i), differentiable; masked entries are
/// exactly 0.
pub(crate) fn causal_softmax(s: &Tensor, scale: f32) -> Result<Tensor> {
    let dims = s.dims();
    if dims.len() < 2 || dims[dims.len() - 1] != dims[dims.len() - 2] {
        candle_core::bail!(
            "causal softmax: scores {dims:?} are not square in the last two dimensions"
        );
    }
    s.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "barnraise-causal-softmax-cpu"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = slice(st, l, "causal softmax")?;
        let t = l.dims().last().copied().unwrap_or(1).max(1);
        let out = map_rows(s.len(), t, |row, y| {
            let seen = row % t + 1;
            let x = &s[row * t..][..seen];
            let max = x
                .iter()
                .fold(f32::NEG_INFINITY, |m, &v| m.max(v * self.scale));
            for (yj, &xj) in y[..seen].iter_mut().zip(x) {
                *yj = exp(xj * self.scale - max);
            }
            let sum: f32 = y[..seen].iter().sum();
            let inv = 1.0 / sum;
            y[..seen].iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        let back = CausalSoftmaxGrad { scale: self.scale };
        Ok(Some(y.detach().apply_op2_no_bwd(&grad, &back)?))
    }
}

/// ∂s = scale · y ⊙ (g − Σ g ⊙ y) per row, from (y, g).
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "barnraise-causal-softmax-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "causal softmax backward";
        let (y, g) = (slice(sy, ly, op)?, slice(sg, lg, op)?);
        same_len(op, y.len(), g.len())?;
        let t = ly.dims().last().copied().unwrap_or(1).max(1);
        let out = map_rows(y.len(), t, |row, d| {
            let seen = row % t + 1;
            let (yr, gr) = (&y[row * t..][..seen], &g[row * t..][..seen]);
            let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((dj, &yj), &gj) in d[..seen].iter_mut().zip(yr).zip(gr) {
                *dj = self.scale * yj * (gj - dot);
            }
        });
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }
}

/// RMSNorm's backward from (x, w, g): ∂x = r ⊙ (g ⊙ w) − x ⊙ r³ ⊙ mean(g ⊙ w ⊙ x)
/// when `wrt_x`, else ∂w = Σ_rows g ⊙ x ⊙ r, summed over fixed blocks of
/// rows and then the blocks in order.
pub(crate) struct RmsNormGradCpu {
    pub(crate) eps: f32,
    pub(crate) wrt_x: bool,
}

/// Rows per block of RMSNorm's gain gradient: fixed, so the sum's order
/// does not follow the thread count.
const GAIN_BLOCK_ROWS: usize = 64;

impl CustomOp3 for RmsNormGradCpu {
    fn name(&self) -> &'static str {
        "barnraise-rms-norm-grad-cpu"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "rms-norm backward";
        let (x, w, g) = (slice(sx, lx, op)?, slice(sw, lw, op)?, slice(sg, lg, op)?);
        let d = w.len().max(1);
        same_len(op, x.len(), g.len())?;
        if x.len() % d != 0 {
            candle_core::bail!("{op}: {} elements are not rows of {d}", x.len());
        }
        let rms = |row: &[f32]| -> f32 {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            1.0 / (ms + self.eps).sqrt()
        };
        if self.wrt_x {
            let out = map_rows(x.len(), d, |row, dx| {
                let (xr, gr) = (&x[row * d..][..d], &g[row * d..][..d]);
                let r = rms(xr);
                let mean = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .map(|((a, b), c)| a * b * c)
                    .sum::<f32>()
                    / d as f32;
                let r3m = r * r * r * mean;
                for j in 0..d {
                    dx[j] = r * gr[j] * w[j] - xr[j] * r3m;
                }
            });
            return Ok((CpuStorage::F32(out), lx.shape().clone()));
        }
        let rows = x.len() / d;
        let block_sum = |block: usize| {
            let mut acc = vec![0f32; d];
            let end = ((block + 1) * GAIN_BLOCK_ROWS).min(rows);
            for row in block * GAIN_BLOCK_ROWS..end {
                let (xr, gr) = (&x[row * d..][..d], &g[row * d..][..d]);
                let r = rms(xr);
                for j in 0..d {
                    acc[j] += gr[j] * xr[j] * r;
                }
            }
            acc
        };
        let count = rows.div_ceil(GAIN_BLOCK_ROWS);
        let blocks: Vec<Vec<f32>> = if parallel() {
            (0..count).into_par_iter().map(block_sum).collect()
        } else {
            (0..count).map(block_sum).collect()
        };
        let mut out = vec![0f32; d];
        for block in &blocks {
            out.iter_mut().zip(block).for_each(|(o, b)| *o += b);
        }
        Ok((CpuStorage::F32(out), lw.shape().clone()))
    }
}

/// Moves heads between the rows a projection writes and the per-head
/// blocks attention multiplies, with the rotary embedding on the way.
///
/// Split: x [batch·seq, heads·head_dim] → [batch·heads, seq, head_dim],
/// rotated when `rope` is set. Merge, the reverse and the split's backward:
/// [batch·heads, seq, head_dim] → [batch·seq, heads·head_dim], rotated
/// back first when `rope` is set. Either is one parallel copy where
/// candle's reshape, transpose and contiguous make one on one thread.
struct Heads {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    rope: Option<RopeTables>,
    split: bool,
}

impl Heads {
    /// Row `src` (head_dim values) into `dst`, rotated by position `pos`
    /// forward (`sign` 1) or back (−1) when there are tables.
    fn copy_row(&self, src: &[f32], dst: &mut [f32], pos: usize, sign: f32) {
        match &self.rope {
            None => dst.copy_from_slice(src),
            Some(t) => {
                let dim = self.head_dim;
                let half = dim / 2;
                let (c, sn) = (&t.cos[pos * dim..][..dim], &t.sin[pos * dim..][..dim]);
                for j in 0..half {
                    let (a, b) = (src[j], src[j + half]);
                    dst[j] = a * c[j] - sign * b * sn[j];
                    dst[j + half] = b * c[j + half] + sign * a * sn[j + half];
                }
            }
        }
    }
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        "barnraise-heads-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, "heads")?;
        let (b, t, h, dim) = (self.batch, self.seq, self.heads, self.head_dim);
        same_len("heads", x.len(), b * t * h * dim)?;
        if let Some(tables) = &self.rope
            && (tables.head_dim != dim || t * dim > tables.cos.len())
        {
            candle_core::bail!("heads: rotary tables do not fit [.., {t}, {dim}]");
        }
        if self.split {
            // Output row (bi, hi, ti) comes from input row bi·t + ti, head hi.
            let out = map_rows(x.len(), dim, |row, y| {
                let (bh, ti) = (row / t, row % t);
                let (bi, hi) = (bh / h, bh % h);
                let src = &x[((bi * t + ti) * h + hi) * dim..][..dim];
                self.copy_row(src, y, ti, 1.0);
            });
            return Ok((CpuStorage::F32(out), Shape::from((b * h, t, dim))));
        }
        // Output row bi·t + ti gathers head hi from (bi, hi, ti).
        let out = map_rows(x.len(), h * dim, |row, y| {
            let (bi, ti) = (row / t, row % t);
            for (hi, dst) in y.chunks_exact_mut(dim).enumerate() {
                let src = &x[((bi * h + hi) * t + ti) * dim..][..dim];
                self.copy_row(src, dst, ti, -1.0);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b * t, h * dim))))
    }
}

/// The shape of the per-head blocks [`split_heads`] makes.
#[derive(Clone, Copy)]
pub(crate) struct HeadShape {
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
}

impl HeadShape {
    fn op(self, rope: Option<&RopeTables>, split: bool) -> Heads {
        Heads {
            batch: self.batch,
            seq: self.seq,
            heads: self.heads,
            head_dim: self.head_dim,
            rope: rope.cloned(),
            split,
        }
    }
}

/// [batch·seq, heads·head_dim] → [batch·heads, seq, head_dim], rotated
/// when `rope` is given. No backward: for crate::model's hand-written pass.
pub(crate) fn split_heads(
    x: &Tensor,
    shape: HeadShape,
    rope: Option<&RopeTables>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&shape.op(rope, true))
}

/// The reverse of [`split_heads`] (so its backward): rotated back first
/// when `rope` is given.
pub(crate) fn merge_heads(
    x: &Tensor,
    shape: HeadShape,
    rope: Option<&RopeTables>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&shape.op(rope, false))
}

/// [`causal_softmax`] without a backward, for the hand-written pass.
pub(crate) fn causal_softmax_value(s: &Tensor, scale: f32) -> Result<Tensor> {
    s.contiguous()?.apply_op1_no_bwd(&CausalSoftmax { scale })
}

/// The scores' gradient from the causal softmax's output `y` and the
/// output's gradient `g`.
pub(crate) fn causal_softmax_grad(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    y.contiguous()?
        .apply_op2_no_bwd(&g.contiguous()?, &CausalSoftmaxGrad { scale })
}

/// [`swiglu`] without a backward, for the hand-written pass.
pub(crate) fn swiglu_value(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Swiglu)
}

/// SwiGLU's gradients (∂a, ∂b) from its inputs and the output's gradient.
pub(crate) fn swiglu_grads(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let (a, b, g) = (a.contiguous()?, b.contiguous()?, g.contiguous()?);
    let ga = a.apply_op3_no_bwd(&b, &g, &SwigluGrad { wrt_a: true })?;
    let gb = a.apply_op3_no_bwd(&b, &g, &SwigluGrad { wrt_a: false })?;
    Ok((ga, gb))
}

/// RMSNorm's gradients (∂x, ∂gain) from its input, gain and the output's
/// gradient.
pub(crate) fn rms_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, g.contiguous()?);
    let gx = x.apply_op3_no_bwd(&w, &g, &RmsNormGradCpu { eps, wrt_x: true })?;
    let gw = x.apply_op3_no_bwd(&w, &g, &RmsNormGradCpu { eps, wrt_x: false })?;
    Ok((gx, gw))
}

/// a + b, element-wise, in parallel (candle's add runs on one thread).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Add)
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "barnraise-add-cpu"
    }

    fn cpu_fwd(
        &self,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        elementwise2("add", (sa, la), (sb, lb), |x, y| x + y)
    }
}

/// Mean next-token cross-entropy of `logits` [rows, vocab] against
/// `targets` (one per row), and its gradient with respect to the logits,
/// (softmax − one-hot) / rows, in one pass over each row. The per-row
/// losses are summed in row order, so the mean does not follow the thread
/// count.
pub(crate) fn cross_entropy_with_grad(logits: &Tensor, targets: &[u32]) -> Result<(f32, Tensor)> {
    let logits = logits.contiguous()?;
    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() || rows == 0 {
        candle_core::bail!(
            "cross-entropy: {rows} rows of logits for {} targets",
            targets.len()
        );
    }
    if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {vocab}");
    }
    let (storage, layout) = logits.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("cross-entropy: the logits must be on the CPU");
    };
    let x = slice(cpu, layout, "cross-entropy")?;
    let log_sum_exp = |row: &[f32]| -> f32 {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        max + row.iter().map(|&v| exp(v - max)).sum::<f32>().ln()
    };
    // Each row's log-sum-exp once; the loss and the gradient both use it.
    let lse = map_rows(rows, 1, |row, out| {
        out[0] = log_sum_exp(&x[row * vocab..][..vocab])
    });
    let inv_rows = 1.0 / rows as f32;
    let grad = map_rows(x.len(), vocab, |row, g| {
        let xr = &x[row * vocab..][..vocab];
        for (gj, &v) in g.iter_mut().zip(xr) {
            *gj = exp(v - lse[row]) * inv_rows;
        }
        g[targets[row] as usize] -= inv_rows;
    });
    let losses = lse
        .iter()
        .zip(targets)
        .enumerate()
        .map(|(row, (l, &t))| l - x[row * vocab + t as usize]);
    let loss = losses.sum::<f32>() * inv_rows;
    let grad = Tensor::from_vec(grad, (rows, vocab), logits.device())?;
    Ok((loss, grad))
}

/// The f32 values of a contiguous CPU storage (the guard
/// `Tensor::storage_and_layout` gives), for kernels that take tensors.
fn cpu_slice<'a>(storage: &'a candle_core::Storage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("{op}: the tensor must be on the CPU");
    };
    slice(cpu, l, op)
}

/// Σ x² over all the tensors, each summed in f64 in order and the tensors
/// in order, one tensor per rayon task: the total does not follow the
/// thread count.
pub(crate) fn sum_of_squares(tensors: &[Tensor]) -> Result<f64> {
    let one = |t: &Tensor| -> Result<f64> {
        let t = t.contiguous()?;
        let (guard, layout) = t.storage_and_layout();
        let x = cpu_slice(&guard, layout, "sum of squares")?;
        Ok(x.iter().map(|&v| f64::from(v * v)).sum())
    };
    let sums: Vec<f64> = if parallel() {
        tensors.par_iter().map(one).collect::<Result<_>>()?
    } else {
        tensors.iter().map(one).collect::<Result<_>>()?
    };
    Ok(sums.iter().sum())
}

/// One AdamW step's constants, each as candle's `affine` would cast it.
#[derive(Clone, Copy)]
pub(crate) struct AdamStep {
    /// Multiplies the gradient (averaging and clipping).
    pub(crate) grad_scale: f32,
    /// β1 and 1 − β1 (computed in f64, then cast), and the same for β2.
    pub(crate) beta1: f32,
    pub(crate) one_minus_beta1: f32,
    pub(crate) beta2: f32,
    pub(crate) one_minus_beta2: f32,
    /// 1 / (1 − β2ᵗ).
    pub(crate) inv_bias2: f32,
    /// lr / (1 − β1ᵗ).
    pub(crate) step: f32,
    pub(crate) eps: f32,
    /// 1 − lr · weight decay, or 1 for parameters without decay.
    pub(crate) decay: f32,
}

/// One parameter's AdamW inputs: θ, its gradient, its two moments, and
/// the step's constants.
pub(crate) struct AdamInput<'a> {
    pub(crate) theta: &'a Tensor,
    pub(crate) grad: &'a Tensor,
    pub(crate) m: &'a Tensor,
    pub(crate) v: &'a Tensor,
    pub(crate) step: AdamStep,
}

/// One AdamW update of every parameter, (θ′, m′, v′) each, in the order
/// given: one pass over each parameter, the parameters spread over rayon's
/// threads (candle's ops took a dozen passes each, on one thread). The
/// arithmetic is the same sequence of f32 operations crate::train's tensor
/// version performs, element by element.
pub(crate) fn adamw(params: &[AdamInput<'_>]) -> Result<Vec<(Tensor, Tensor, Tensor)>> {
    let one = |p: &AdamInput<'_>| -> Result<(Tensor, Tensor, Tensor)> {
        let op = "adamw";
        let n = p.theta.elem_count();
        for t in [p.grad, p.m, p.v] {
            same_len(op, n, t.elem_count())?;
        }
        let contiguous = |t: &Tensor| t.contiguous();
        let (theta, grad, m, v) = (
            contiguous(p.theta)?,
            contiguous(p.grad)?,
            contiguous(p.m)?,
            contiguous(p.v)?,
        );
        let (sg, lg) = grad.storage_and_layout();
        let (sm, lm) = m.storage_and_layout();
        let (sv, lv) = v.storage_and_layout();
        let (st, lt) = theta.storage_and_layout();
        let (g, m, v, th) = (
            cpu_slice(&sg, lg, op)?,
            cpu_slice(&sm, lm, op)?,
            cpu_slice(&sv, lv, op)?,
            cpu_slice(&st, lt, op)?,
        );
        let c = p.step;
        // Three passes, each a plain map the compiler vectorizes (one
        // loop pushing three outputs does not vectorize, and was slower).
        let m_new: Vec<f32> = m
            .iter()
            .zip(g)
            .map(|(&m, &g)| m * c.beta1 + (g * c.grad_scale) * c.one_minus_beta1)
            .collect();
        let v_new: Vec<f32> = v
            .iter()
            .zip(g)
            .map(|(&v, &g)| {
                let g = g * c.grad_scale;
                v * c.beta2 + (g * g) * c.one_minus_beta2
            })
            .collect();
        let th_new: Vec<f32> = th
            .iter()
            .zip(m_new.iter().zip(&v_new))
            .map(|(&t, (&m, &v))| t * c.decay - (m * c.step) / ((v * c.inv_bias2).sqrt() + c.eps))
            .collect();
        let (shape, dev) = (theta.shape(), theta.device());
        Ok((
            Tensor::from_vec(th_new, shape, dev)?,
            Tensor::from_vec(m_new, shape, dev)?,
            Tensor::from_vec(v_new, shape, dev)?,
        ))
    };
    if parallel() {
        params.par_iter().map(one).collect()
    } else {
        params.iter().map(one).collect()
    }
}

#[cfg(test)]
/// Runs `run` on rayon pools of 1, 2, 3 and 5 threads and asserts that
/// every output has the same bits as on one thread.
pub(crate) fn assert_same_bits_on_any_thread_count(run: impl Fn() -> Vec<Vec<f32>> + Sync) {
    let on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map(|pool| pool.install(&run))
            .unwrap_or_else(|e| panic!("a pool of {threads} threads: {e}"))
    };
    let one = on(1);
    for threads in [2, 3, 5] {
        let many = on(threads);
        assert_eq!(one.len(), many.len());
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            let same =
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "output {i} differs between 1 and {threads} threads");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Gradients of Σ probe ⊙ f(vars) with respect to each var.
    fn grads(out: &Tensor, probe: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
        let store = (out * probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter()
            .map(|v| store.get(v.as_tensor()).unwrap().clone())
            .collect()
    }

    fn close(what: &str, kernel: &Tensor, plain: &Tensor, tolerance: f32) {
        assert_eq!(kernel.dims(), plain.dims(), "{what}: shapes");
        let diff = max_abs_diff(kernel, plain);
        assert!(diff < tolerance, "{what}: off by {diff}");
    }

    fn tables(seq: usize, dim: usize, dev: &Device) -> (Tensor, Tensor) {
        let angles = Tensor::randn(0f32, 2.0, (seq, dim / 2), dev).unwrap();
        let doubled = Tensor::cat(&[&angles, &angles], 1).unwrap();
        (doubled.cos().unwrap(), doubled.sin().unwrap())
    }

    #[test]
    fn exp_is_within_a_few_ulp_everywhere() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.000_731;
        }
        println!("exp: worst relative error {worst:e}");
        assert!(
            worst < 2.0 * f64::from(f32::EPSILON),
            "relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        // Far outside the range: clamped, finite, ordered.
        assert!(exp(-1e9) > 0.0 && exp(-1e9) < 1e-37);
        assert!(exp(1e9).is_finite() && exp(1e9) > 1e38);
    }

    #[test]
    fn cpu_kernels_match_the_primitives_and_their_gradients() {
        let dev = Device::Cpu;
        // Rotary: [batch 2, heads 3, seq 5, head_dim 8], tables for 7
        // positions of which the first 5 are used.
        let (cos, sin) = tables(7, 8, &dev);
        let rope = RopeTables::new(&cos, &sin).unwrap();
        // Tables the inverse rotation would not undo, or of two shapes,
        // are refused rather than trained through.
        let skewed = Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap();
        assert!(RopeTables::new(&skewed, &sin).is_err());
        assert!(RopeTables::new(&cos, &sin.narrow(0, 0, 6).unwrap()).is_err());
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let kernel = rope.apply(x.as_tensor()).unwrap();
        let (c5, s5) = (cos.narrow(0, 0, 5).unwrap(), sin.narrow(0, 0, 5).unwrap());
        let plain = crate::model::rope(x.as_tensor(), &c5, &s5).unwrap();
        close("rotary", &kernel, &plain, 1e-6);
        let (gk, gp) = (grads(&kernel, &probe, &[&x]), grads(&plain, &probe, &[&x]));
        close("rotary grad", &gk[0], &gp[0], 1e-5);

        // SwiGLU, both inputs.
        let a = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 40), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 40), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (6, 40), &dev).unwrap();
        let kernel = swiglu(a.as_tensor(), b.as_tensor()).unwrap();
        let plain = (a.as_tensor().silu().unwrap() * b.as_tensor()).unwrap();
        close("swiglu", &kernel, &plain, 1e-6);
        let (gk, gp) = (
            grads(&kernel, &probe, &[&a, &b]),
            grads(&plain, &probe, &[&a, &b]),
        );
        close("swiglu grad a", &gk[0], &gp[0], 1e-5);
        close("swiglu grad b", &gk[1], &gp[1], 1e-5);

        // Scaled causal softmax against scale, mask and softmax.
        let (t, scale) = (9, 0.35f32);
        let s = Var::from_tensor(&Tensor::randn(0f32, 3.0, (2, 2, t, t), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 2, t, t), &dev).unwrap();
        let kernel = causal_softmax(s.as_tensor(), scale).unwrap();
        let mask = crate::model::causal_mask(t, &dev).unwrap();
        let scores = (s.as_tensor() * f64::from(scale))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let plain = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        close("causal softmax", &kernel, &plain, 1e-6);
        let masked_sum = kernel
            .broadcast_mul(&mask.exp().unwrap().affine(-1.0, 1.0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(masked_sum, 0.0, "masked positions must be exactly 0");
        let plain_graph = crate::ops::softmax_last(&scores).unwrap();
        let (gk, gp) = (
            grads(&kernel, &probe, &[&s]),
            grads(&plain_graph, &probe, &[&s]),
        );
        close("causal softmax grad", &gk[0], &gp[0], 1e-5);

        // RMSNorm's backward, kernel against primitives (crate::ops).
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (130, 16), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (130, 16), &dev).unwrap();
        let kernel = crate::ops::rms_norm_with(x.as_tensor(), w.as_tensor(), 1e-5, true).unwrap();
        let plain = crate::ops::rms_norm_with(x.as_tensor(), w.as_tensor(), 1e-5, false).unwrap();
        let (gk, gp) = (
            grads(&kernel, &probe, &[&x, &w]),
            grads(&plain, &probe, &[&x, &w]),
        );
        close("rms-norm grad x", &gk[0], &gp[0], 1e-4);
        close("rms-norm grad w", &gk[1], &gp[1], 1e-3);
    }

    #[test]
    fn cpu_kernels_give_the_same_bits_on_any_number_of_threads() {
        let dev = Device::Cpu;
        // Large enough that every kernel splits into several tasks.
        let (cos, sin) = tables(64, 32, &dev);
        let rope = RopeTables::new(&cos, &sin).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8, 64, 32), &dev).unwrap()).unwrap();
        let s = Var::from_tensor(&Tensor::randn(0f32, 2.0, (4, 8, 64, 64), &dev).unwrap()).unwrap();
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 300), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 300, &dev).unwrap()).unwrap();
        let run = || -> Vec<Vec<f32>> {
            let r = rope.apply(x.as_tensor()).unwrap();
            let p = causal_softmax(s.as_tensor(), 0.2).unwrap();
            let g = swiglu(
                a.as_tensor(),
                w.as_tensor()
                    .broadcast_as((256, 300))
                    .unwrap()
                    .contiguous()
                    .as_ref()
                    .unwrap(),
            )
            .unwrap();
            let n = crate::ops::rms_norm_with(a.as_tensor(), w.as_tensor(), 1e-5, true).unwrap();
            let loss = (r.sqr().unwrap().sum_all().unwrap()
                + p.sqr().unwrap().sum_all().unwrap()
                + g.sqr().unwrap().sum_all().unwrap()
                + n.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let store = loss.backward().unwrap();
            let mut out = vec![r, p, g, n]
                .into_iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>();
            for v in [&x, &s, &a, &w] {
                let grad = store.get(v.as_tensor()).unwrap();
                out.push(grad.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            out
        };
        assert_same_bits_on_any_thread_count(run);
    }
}
