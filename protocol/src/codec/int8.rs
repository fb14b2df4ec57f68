//! The `int8:BLOCK` format (INTELLECT-1 style): per block of BLOCK values one
//! f32 scale = max|x| / 127, and each value stored as round(x / scale) in
//! [-127, 127]. Body: all scales (f32 LE), then all values (one byte each);
//! the last block may be shorter. No error feedback: the rounding error is at
//! most half a scale step and unbiased.

use super::{ABS_MASK, CodecError, EXPONENT_BITS, Target, round_small};

/// Largest scale a decoder accepts: 128 * scale stays finite for every byte,
/// so decoded values are always finite.
const MAX_SCALE: f32 = f32::MAX / 128.0;

/// Where the parts of an int8 body lie.
pub(crate) struct Layout {
    params: u64,
    blocks: u64,
}

impl Layout {
    pub(crate) fn new(params: u64, block: u32) -> Option<Layout> {
        let blocks = params.div_ceil(u64::from(block.max(1)));
        Some(Layout { params, blocks })
    }

    pub(crate) fn body_len(&self) -> Option<u64> {
        self.blocks.checked_mul(4)?.checked_add(self.params)
    }
}

/// Appends the body for `delta`: scales first, then the quantized values.
pub(crate) fn encode(delta: &[f32], block: u32, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let block = block as usize;
    let scales_at = out.len();
    let blocks = delta.len().div_ceil(block);
    out.resize(scales_at + blocks * 4, 0);
    out.reserve(delta.len());
    for (index, values) in delta.chunks(block).enumerate() {
        // The max of the sign-less bits is the max magnitude, and flags
        // NaN/Inf in the same integer pass.
        let worst = values
            .iter()
            .fold(0u32, |m, x| m.max(x.to_bits() & ABS_MASK));
        if worst >= EXPONENT_BITS {
            let at = values.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(CodecError::NonFiniteInput {
                index: index * block + at,
                value: values[at],
            });
        }
        let scale = (f32::from_bits(worst) / 127.0).min(MAX_SCALE);
        let inverse = 1.0 / scale;
        if scale == 0.0 {
            out.extend(values.iter().map(|_| 0u8));
        } else if inverse.is_finite() {
            out.extend(values.iter().map(|&x| quantize(x * inverse)));
        } else {
            // Subnormal scale: 1/scale overflows, so divide instead.
            out.extend(values.iter().map(|&x| quantize(x / scale)));
        }
        let at = scales_at + index * 4;
        out[at..at + 4].copy_from_slice(&scale.to_le_bytes());
    }
    Ok(())
}

/// round_half_even(clamp(y, -127, 127)) as a two's-complement byte. Clamping
/// first is the same as clamping the rounded value (the bounds are integers),
/// and lets the byte be read straight from the shifted float's low bits
/// (see [`round_small`]), which vectorizes to a few SIMD instructions.
#[inline(always)]
fn quantize(y: f32) -> u8 {
    round_small(y.clamp(-127.0, 127.0)) as u8
}

/// Checks every scale, then writes `value * scale` (or adds `weight * that`).
pub(crate) fn decode(body: &[u8], block: u32, target: Target<'_>) -> Result<(), CodecError> {
    let block = block as usize;
    let params = match &target {
        Target::Overwrite(out) => out.len(),
        Target::Add { acc, .. } => acc.len(),
    };
    let blocks = params.div_ceil(block);
    let (scale_bytes, values) =
        body.split_at_checked(blocks * 4)
            .ok_or(CodecError::LengthMismatch {
                expected: (blocks * 4 + params) as u64,
                got: body.len(),
            })?;
    let (scales, _) = scale_bytes.as_chunks::<4>();
    for (index, bytes) in scales.iter().enumerate() {
        let value = f32::from_le_bytes(*bytes);
        // Sign bit set (even -0.0), NaN, or too large for 128 * scale.
        if !(value.to_bits() >> 31 == 0 && value <= MAX_SCALE) {
            return Err(CodecError::BadScale {
                block: index,
                value,
            });
        }
    }
    let scales = scales.iter().map(|b| f32::from_le_bytes(*b));
    match target {
        Target::Overwrite(out) => {
            for ((out, values), scale) in
                out.chunks_mut(block).zip(values.chunks(block)).zip(scales)
            {
                for (slot, &q) in out.iter_mut().zip(values) {
                    *slot = f32::from(q as i8) * scale;
                }
            }
        }
        Target::Add { acc, weight } => {
            for ((acc, values), scale) in
                acc.chunks_mut(block).zip(values.chunks(block)).zip(scales)
            {
                for (slot, &q) in acc.iter_mut().zip(values) {
                    *slot += weight * (f32::from(q as i8) * scale);
                }
            }
        }
    }
    Ok(())
}
