//! The precision policy: which dtype the forward and backward passes compute
//! in, while weights, gradients and optimizer state stay f32.
//!
//! Under `bf16`, every matmul takes bf16 operands (weights are cast on the
//! way in, each step, from their f32 master copy) and produces bf16, and the
//! activations between matmuls (SwiGLU, rotary, the attention mix) are bf16.
//! What is sensitive to rounding stays f32: the residual stream, RMSNorm,
//! the attention softmax, and the logits' cross-entropy. The casts are
//! ordinary differentiable ops, so gradients arrive at the f32 weights in
//! f32 and AdamW runs in f32. This is the policy of mixed-precision training
//! as PyTorch's autocast practises it; docs/training.md, "GPUs", has the
//! measured effect.
//!
//! `auto` is bf16 on a CUDA GPU of compute capability 8.0 or newer (Ampere,
//! Ada, Hopper), and f32 everywhere else: on the CPU, f32 is what the
//! protocol's determinism tests pin, and candle's CPU bf16 matmul is slower
//! than its f32 one.

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// What the operator asked for (`--precision`, node.toml `precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on a GPU that has it, f32 elsewhere.
    #[default]
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrecisionError {
    #[error("unknown precision '{0}': expected auto, f32 or bf16")]
    Parse(String),
    #[error(
        "bf16 needs a GPU of compute capability 8.0 or newer; this one is {0}.{1} (use --precision f32)"
    )]
    Unsupported(i32, i32),
}

impl FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Precision::Auto),
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(PrecisionError::Parse(s.to_string())),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Precision {
    /// The dtype the passes compute in on `device`. An explicit `bf16` on
    /// the CPU is allowed (it is how the policy is tested without a GPU);
    /// on a GPU without bf16 it is refused.
    pub fn compute_dtype(self, device: &Device) -> Result<DType, PrecisionError> {
        let capability = gpu_capability(device);
        match (self, capability) {
            (Precision::F32, _) => Ok(DType::F32),
            (Precision::Auto, Some((major, _))) if major >= 8 => Ok(DType::BF16),
            (Precision::Auto, _) => Ok(DType::F32),
            (Precision::Bf16, Some((major, minor))) if major < 8 => {
                Err(PrecisionError::Unsupported(major, minor))
            }
            (Precision::Bf16, _) => Ok(DType::BF16),
        }
    }
}

/// The compute capability of a CUDA device; `None` for the CPU.
fn gpu_capability(device: &Device) -> Option<(i32, i32)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda.cuda_stream().context().compute_capability().ok(),
        _ => None,
    }
}

/// The name the JSON reports and logs use for a compute dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_policy() {
        for p in [Precision::Auto, Precision::F32, Precision::Bf16] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert_eq!("FP32".parse::<Precision>(), Ok(Precision::F32));
        assert!(matches!(
            "fp8".parse::<Precision>(),
            Err(PrecisionError::Parse(_))
        ));
    }

    #[test]
    fn the_cpu_computes_in_f32_unless_bf16_is_asked_for() {
        let cpu = Device::Cpu;
        assert_eq!(Precision::Auto.compute_dtype(&cpu), Ok(DType::F32));
        assert_eq!(Precision::F32.compute_dtype(&cpu), Ok(DType::F32));
        assert_eq!(Precision::Bf16.compute_dtype(&cpu), Ok(DType::BF16));
    }
}
