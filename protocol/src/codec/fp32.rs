//! The `fp32` format: every value as 4 little-endian bytes. Lossless; the
//! baseline for tests and for measuring what compression buys.

use super::{CodecError, Target, first_non_finite};

/// Appends the body for `delta`; non-finite input is refused.
pub(crate) fn encode(delta: &[f32], out: &mut Vec<u8>) -> Result<(), CodecError> {
    if let Some(index) = first_non_finite(delta, f32::to_bits) {
        return Err(CodecError::NonFiniteInput {
            index,
            value: delta[index],
        });
    }
    out.reserve(delta.len() * 4);
    // Through a small stack buffer: a loop the compiler turns into wide copies,
    // where one 4-byte extend per value would not be.
    let mut buffer = [[0u8; 4]; 1024];
    for values in delta.chunks(buffer.len()) {
        for (bytes, value) in buffer.iter_mut().zip(values) {
            *bytes = value.to_le_bytes();
        }
        out.extend_from_slice(buffer[..values.len()].as_flattened());
    }
    Ok(())
}

/// Checks every value is finite, then writes them into the target.
/// A checked fp32 body's values, as stored.
pub(crate) fn checked(body: &[u8]) -> Result<&[[u8; 4]], CodecError> {
    let (values, _) = body.as_chunks::<4>();
    if let Some(index) = first_non_finite(values, u32::from_le_bytes) {
        return Err(CodecError::NonFiniteValue { index });
    }
    Ok(values)
}

pub(crate) fn decode(body: &[u8], target: Target<'_>) -> Result<(), CodecError> {
    let values = checked(body)?;
    match target {
        Target::Overwrite(out) => {
            for (slot, bytes) in out.iter_mut().zip(values) {
                *slot = f32::from_le_bytes(*bytes);
            }
        }
        Target::Add { acc, weight } => {
            for (slot, bytes) in acc.iter_mut().zip(values) {
                *slot += weight * f32::from_le_bytes(*bytes);
            }
        }
    }
    Ok(())
}
