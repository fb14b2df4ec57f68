//! Fused softmax and RMSNorm that can be trained through.
//!
//! candle-nn has one-kernel forward passes for both (CPU and CUDA) but no
//! backward pass, so the model used to build them from primitives: five
//! passes over the attention scores forward and about a dozen backward,
//! seven and fifteen for each norm. Here the forward is candle-nn's fused
//! kernel, run on a detached input, and the gradient is attached by a custom
//! op whose forward hands that result on and whose backward is the closed
//! form:
//!
//! - softmax y = softmax(x): ∂x = y ⊙ (g − Σ g ⊙ y), four passes;
//! - RMSNorm y = x ⊙ r ⊙ w with r = (mean x² + ε)^−½ per row:
//!   ∂x = r ⊙ (g ⊙ w) − x ⊙ r³ ⊙ mean(g ⊙ w ⊙ x), ∂w = Σ_rows g ⊙ x ⊙ r.
//!
//! Handing the result on costs one copy. Tested against the primitive
//! versions' autograd (`fused_ops_match_the_primitives_and_their_gradients`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor};

/// Softmax over the last dimension, differentiable.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let y = candle_nn::ops::softmax_last_dim(&x.detach())?;
    x.apply_op2(&y, SoftmaxGrad)
}

/// RMSNorm over the last dimension with gain `weight`, differentiable in
/// both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    rms_norm_with(x, weight, eps, false)
}

/// [`rms_norm`], whose backward runs crate::cpu_ops' one-pass kernel when
/// `cpu_kernel` is set and the inputs are f32 on the CPU.
pub(crate) fn rms_norm_with(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    cpu_kernel: bool,
) -> Result<Tensor> {
    let y = candle_nn::ops::rms_norm(&x.detach(), &weight.detach(), eps)?;
    let cpu_kernel = cpu_kernel
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && weight.dtype() == candle_core::DType::F32;
    x.apply_op3(weight, &y, RmsNormGrad { eps, cpu_kernel })
}

/// Forward: the last argument (the fused kernel's result), copied. Every
/// op here hands on its last argument.
fn hand_on_cpu(s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    Ok((s.try_clone(l)?, l.shape().clone()))
}

#[cfg(feature = "cuda")]
fn hand_on_cuda(
    s: &candle_core::CudaStorage,
    l: &Layout,
) -> Result<(candle_core::CudaStorage, Shape)> {
    Ok((s.try_clone(l)?, l.shape().clone()))
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "barnraise-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        hand_on_cpu(y, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        hand_on_cuda(y, l)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Detached: the gradient must not hold on to the forward graph.
        let (res, grad) = (res.detach(), grad.detach());
        let dot = (&grad * &res)?.sum_keepdim(D::Minus1)?;
        Ok((Some(res.mul(&grad.broadcast_sub(&dot)?)?), None))
    }
}

struct RmsNormGrad {
    eps: f32,
    cpu_kernel: bool,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "barnraise-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        hand_on_cpu(y, l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        hand_on_cuda(y, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: the gradients must not hold on to the forward graph.
        let (x, weight, grad) = (&x.detach(), &weight.detach(), &grad.detach());
        if self.cpu_kernel {
            let (x, weight, grad) = (&x.contiguous()?, &weight.contiguous()?, &grad.contiguous()?);
            let kernel = |wrt_x| crate::cpu_ops::RmsNormGradCpu {
                eps: self.eps,
                wrt_x,
            };
            let gx = x.apply_op3_no_bwd(weight, grad, &kernel(true))?;
            let gweight = x.apply_op3_no_bwd(weight, grad, &kernel(false))?;
            return Ok((Some(gx), Some(gweight), None));
        }
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(self.eps))?
            .sqrt()?
            .recip()?;
        let gw = grad.broadcast_mul(weight)?;
        let mean = (&gw * x)?.mean_keepdim(D::Minus1)?;
        let r3 = r.powf(3.0)?;
        let gx = (gw.broadcast_mul(&r)? - x.broadcast_mul(&(r3 * mean)?)?)?;
        let rows = x.elem_count() / weight.elem_count();
        let gweight = (grad * x.broadcast_mul(&r)?)?
            .reshape((rows, weight.elem_count()))?
            .sum(0)?;
        Ok((Some(gx), Some(gweight), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn primitive_softmax(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(D::Minus1)?;
        let exp = x.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        exp.broadcast_div(&sum)
    }

    fn primitive_rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + f64::from(eps))?.sqrt()?.recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_ops_match_the_primitives_and_their_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (3, 5, 16), &dev).unwrap())).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 16, &dev).unwrap()).unwrap();
        // A loss that weighs every output differently, so the gradients
        // are not degenerate.
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();

        let fused = softmax_last(x.as_tensor()).unwrap();
        let plain = primitive_softmax(x.as_tensor()).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-6);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            gf.get(x.as_tensor()).unwrap(),
            gp.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_abs_diff(a, b) < 1e-5,
            "softmax grad {}",
            max_abs_diff(a, b)
        );

        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let plain = primitive_rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(max_abs_diff(&fused, &plain) < 1e-5);
        let gf = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gp = (&plain * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &w] {
            let (a, b) = (
                gf.get(var.as_tensor()).unwrap(),
                gp.get(var.as_tensor()).unwrap(),
            );
            assert!(
                max_abs_diff(a, b) < 1e-4,
                "rms-norm grad {}",
                max_abs_diff(a, b)
            );
        }
    }
}
