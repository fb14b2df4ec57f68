//! Which codec a run uses and with what parameters: parsing from the CLI and
//! run config, validation, and the exact payload size it produces.

use super::{CodecError, HEADER_LEN, MAX_UPDATE_PARAMS, int8, topk};
use std::fmt;
use std::str::FromStr;

/// The largest int8 block or top-k chunk. Keeps per-chunk scratch small and
/// top-k indices within 20 bits.
pub const MAX_CHUNK: u32 = 1 << 20;

/// A codec and its parameters. Carried in every payload header, so a payload
/// describes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CodecConfig {
    /// Raw little-endian f32: lossless, 32 bits per param.
    Fp32,
    /// One f32 scale per `block` values, each value an int8 in [-127, 127].
    Int8 { block: u32 },
    /// Per chunk of `chunk` values keep the `k` largest magnitudes, quantized
    /// to `bits` bits (sign + magnitude level), with error feedback.
    TopK { chunk: u32, k: u32, bits: u8 },
}

impl CodecConfig {
    /// Dense int8 with 256-value blocks: 8.125 bits per param.
    pub fn int8_default() -> Self {
        CodecConfig::Int8 { block: 256 }
    }

    /// Top-64 of every 4096 values at 2 bits: about 0.234 bits per param.
    pub fn topk_default() -> Self {
        CodecConfig::TopK {
            chunk: 4096,
            k: 64,
            bits: 2,
        }
    }

    /// Whether the encoder keeps an error-feedback residual for this codec.
    pub fn has_error_feedback(&self) -> bool {
        matches!(self, CodecConfig::TopK { .. })
    }

    /// Checks the parameters are ones every decoder accepts.
    pub fn validate(&self) -> Result<(), CodecError> {
        let bad = |reason: String| Err(CodecError::InvalidConfig(reason));
        match *self {
            CodecConfig::Fp32 => Ok(()),
            CodecConfig::Int8 { block } if block == 0 || block > MAX_CHUNK => {
                bad(format!("int8 block {block} must be in 1..={MAX_CHUNK}"))
            }
            CodecConfig::Int8 { .. } => Ok(()),
            CodecConfig::TopK { chunk, .. } if chunk == 0 || chunk > MAX_CHUNK => {
                bad(format!("top-k chunk {chunk} must be in 1..={MAX_CHUNK}"))
            }
            CodecConfig::TopK { chunk, k, .. } if k == 0 || k > chunk => {
                bad(format!("top-k k {k} must be in 1..=chunk ({chunk})"))
            }
            CodecConfig::TopK { bits, .. } if !matches!(bits, 2 | 4 | 8) => {
                bad(format!("top-k value bits {bits} must be 2, 4 or 8"))
            }
            CodecConfig::TopK { .. } => Ok(()),
        }
    }

    /// The exact payload size in bytes for `params` values, header included.
    /// Saturates at `usize::MAX` for sizes no machine could hold.
    pub fn encoded_len(&self, params: usize) -> usize {
        u64::try_from(params)
            .ok()
            .and_then(|p| self.encoded_len_u64(p))
            .and_then(|len| usize::try_from(len).ok())
            .unwrap_or(usize::MAX)
    }

    /// The exact payload size in u64 arithmetic, or None on overflow. Decoders
    /// compare this with the real length before allocating anything.
    pub(crate) fn encoded_len_u64(&self, params: u64) -> Option<u64> {
        let body = match *self {
            CodecConfig::Fp32 => params.checked_mul(4)?,
            CodecConfig::Int8 { block } => int8::Layout::new(params, block)?.body_len()?,
            CodecConfig::TopK { chunk, k, bits } => {
                topk::Layout::new(params, chunk, k, bits)?.body_len()?
            }
        };
        body.checked_add(HEADER_LEN as u64)
    }

    /// Bits per parameter including all metadata and the header, at `params`.
    pub fn bits_per_param(&self, params: usize) -> f64 {
        if params == 0 {
            return 0.0;
        }
        self.encoded_len(params) as f64 * 8.0 / params as f64
    }
}

/// The largest update an [`super::Encoder`] accepts, so every payload it
/// produces also decodes.
pub(crate) fn check_params(params: u64, limit: u64) -> Result<(), CodecError> {
    let limit = limit.min(MAX_UPDATE_PARAMS as u64);
    if params > limit {
        return Err(CodecError::TooManyParams { params, limit });
    }
    Ok(())
}

impl fmt::Display for CodecConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecConfig::Fp32 => write!(f, "fp32"),
            CodecConfig::Int8 { block } => write!(f, "int8:{block}"),
            CodecConfig::TopK { chunk, k, bits } => write!(f, "topk:{chunk}:{k}:{bits}"),
        }
    }
}

impl FromStr for CodecConfig {
    type Err = CodecError;

    /// Accepts `fp32`, `int8`, `int8:BLOCK`, `topk`, `topk:CHUNK:K:BITS`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let parse_error = |reason: &str| CodecError::Parse {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let number = |text: &str| {
            text.parse::<u32>()
                .map_err(|_| parse_error(&format!("`{text}` is not a whole number")))
        };
        let parts: Vec<&str> = input.trim().split(':').collect();
        let config = match parts.as_slice() {
            ["fp32"] => CodecConfig::Fp32,
            ["int8"] => CodecConfig::int8_default(),
            ["int8", block] => CodecConfig::Int8 {
                block: number(block)?,
            },
            ["topk"] => CodecConfig::topk_default(),
            ["topk", chunk, k, bits] => CodecConfig::TopK {
                chunk: number(chunk)?,
                k: number(k)?,
                bits: u8::try_from(number(bits)?)
                    .map_err(|_| parse_error("value bits must be 2, 4 or 8"))?,
            },
            _ => return Err(parse_error("unknown codec or wrong number of fields")),
        };
        config.validate()?;
        Ok(config)
    }
}
