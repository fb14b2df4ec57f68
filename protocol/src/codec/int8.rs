//! The `int8:BLOCK` format (INTELLECT-1 style): per block of BLOCK values one
//! f32 scale = max|x| / 127, and each value stored as round(x / scale) in
//! [-127, 127]. Body: all scales (f32 LE), then all values (one byte each);
//! the last block may be shorter. No error feedback: the rounding error is at
//! most half a scale step and unbiased.

use super::{CodecError, Target, round_small};

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
    // Through a small stack buffer: a loop the compiler packs 16 values at a
    // time, where extending the vector value by value would not be. It is
    // flushed when full rather than per block, which for small blocks costs
    // as much as the block.
    let mut buffer = [0u8; 1024];
    let mut filled = 0;
    for (index, values) in delta.chunks(block).enumerate() {
        let Some(worst) = largest_magnitude(values) else {
            let at = values.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(CodecError::NonFiniteInput {
                index: index * block + at,
                value: values[at],
            });
        };
        let unclamped = worst / 127.0;
        let scale = unclamped.min(MAX_SCALE);
        let inverse = 1.0 / scale;
        // With a normal, unclamped scale every |x * inverse| is at most
        // 127 (1 + 3 * 2^-24) (three roundings from |x| <= worst), which
        // rounds into [-127, 127]: the clamp would change nothing.
        let unclamped_fits = scale == unclamped && scale >= f32::MIN_POSITIVE;
        for part in values.chunks(buffer.len()) {
            if filled + part.len() > buffer.len() {
                out.extend_from_slice(&buffer[..filled]);
                filled = 0;
            }
            let bytes = &mut buffer[filled..filled + part.len()];
            filled += part.len();
            if scale == 0.0 {
                bytes.fill(0);
            } else if unclamped_fits {
                for (byte, &x) in bytes.iter_mut().zip(part) {
                    *byte = round_small(x * inverse) as i16 as u8;
                }
            } else if inverse.is_finite() {
                for (byte, &x) in bytes.iter_mut().zip(part) {
                    *byte = quantize(x * inverse);
                }
            } else {
                // Subnormal scale: 1/scale overflows, so divide instead.
                for (byte, &x) in bytes.iter_mut().zip(part) {
                    *byte = quantize(x / scale);
                }
            }
        }
        let at = scales_at + index * 4;
        out[at..at + 4].copy_from_slice(&scale.to_le_bytes());
    }
    out.extend_from_slice(&buffer[..filled]);
    Ok(())
}

/// Lanes of the running maximum: enough vector registers to hide latency.
const LANES: usize = 16;

/// The largest |x| of a block, or None if any value is NaN or infinite.
fn largest_magnitude(values: &[f32]) -> Option<f32> {
    // `if a > m` is one max instruction per vector and ignores NaN, so NaN
    // and infinity are flagged apart: |x| as bits plus one exponent step
    // carries into the top bit exactly when the exponent is all ones. A
    // maximum is exact, so the lanes' order cannot change it.
    let larger = |a: f32, m: f32| if a > m { a } else { m };
    let carry = |a: f32| a.to_bits().wrapping_add(0x0080_0000);
    let mut max = [0f32; LANES];
    let mut flags = [0u32; LANES];
    let (rows, rest) = values.as_chunks::<LANES>();
    for row in rows {
        for ((max, flag), &x) in max.iter_mut().zip(flags.iter_mut()).zip(row) {
            *max = larger(x.abs(), *max);
            *flag |= carry(x.abs());
        }
    }
    let mut worst = max.into_iter().fold(0f32, |m, lane| larger(lane, m));
    let mut flag = flags.into_iter().fold(0, |any, lane| any | lane);
    for &x in rest {
        worst = larger(x.abs(), worst);
        flag |= carry(x.abs());
    }
    (flag >> 31 == 0).then_some(worst)
}

/// round_half_even(clamp(y, -127, 127)) as a two's-complement byte. Clamping
/// first is the same as clamping the rounded value (the bounds are integers),
/// and lets the byte be read straight from the shifted float's low bits
/// (see [`round_small`]), which vectorizes to a few SIMD instructions. The
/// detour through i16 changes no bit (both casts keep the low byte) but lets
/// the compiler pack 16 results with two pack instructions instead of
/// masking each quarter.
#[inline(always)]
fn quantize(y: f32) -> u8 {
    round_small(y.clamp(-127.0, 127.0)) as i16 as u8
}

/// Splits a body into its scales and values and checks every scale: what
/// [`decode`] and [`View`] both rely on.
fn checked(body: &[u8], block: usize, params: usize) -> Result<(&[[u8; 4]], &[u8]), CodecError> {
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
    Ok((scales, values))
}

/// A checked int8 body read one value at a time, with [`decode`]'s arithmetic.
pub(crate) struct View<'a> {
    block: usize,
    scales: &'a [[u8; 4]],
    values: &'a [u8],
}

impl<'a> View<'a> {
    pub(crate) fn new(body: &'a [u8], block: u32, params: usize) -> Result<View<'a>, CodecError> {
        let block = block as usize;
        let (scales, values) = checked(body, block, params)?;
        Ok(View {
            block,
            scales,
            values,
        })
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> f32 {
        f32::from(self.values[i] as i8) * f32::from_le_bytes(self.scales[i / self.block])
    }
}

/// Checks every scale, then writes `value * scale` (or adds `weight * that`).
pub(crate) fn decode(body: &[u8], block: u32, target: Target<'_>) -> Result<(), CodecError> {
    let block = block as usize;
    let params = match &target {
        Target::Overwrite(out) => out.len(),
        Target::Add { acc, .. } => acc.len(),
    };
    let (scales, values) = checked(body, block, params)?;
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
