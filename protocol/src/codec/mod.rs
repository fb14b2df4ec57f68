//! The update codec: turns a flat f32 pseudo-gradient into a compact,
//! versioned, self-describing payload and back.
//!
//! A payload is a 24-byte [`Header`] (magic, version, format, parameters,
//! param count) followed by a body whose length the header fixes exactly:
//! - `fp32`: raw little-endian values, lossless;
//! - `int8:BLOCK`: one f32 scale per block, then one int8 per value;
//! - `topk:CHUNK:K:BITS`: per chunk the K largest magnitudes, quantized to
//!   BITS bits, their indices bit-packed; the [`Encoder`] keeps what it did
//!   not send as an error-feedback residual for the next round.
//!
//! The byte layout, error bounds and size figures are specified in
//! `docs/codec.md`. Everything here is deterministic: the same input gives the
//! same bytes on every machine (fixed arithmetic order, little-endian).
//!
//! Decoding is total. [`decode_into`] and [`decode_add`] validate the whole
//! payload — header, exact length, scales, index order and range, finite
//! values — before writing to the caller's buffer, so an error leaves the
//! buffer untouched and no half-applied update ever reaches an aggregate.
//! [`decode`] allocates only after the payload length has matched what the
//! header claims, and never more than the caller's limit.

pub mod bench;
mod bitpack;
mod config;
mod encoder;
mod error;
mod fp32;
mod header;
mod int8;
mod schedule;
mod topk;

#[cfg(test)]
mod tests;

pub use config::{CodecConfig, MAX_CHUNK};
pub use encoder::Encoder;
pub use error::CodecError;
pub use header::{CODEC_VERSION, HEADER_LEN, Header, MAGIC};
pub use schedule::{CodecSchedule, DensityWarmup, split_spec};

/// The most params one update payload may carry: 2 billion (8 GB as f32).
/// Decoders refuse larger headers before allocating; a larger model sends its
/// pseudo-gradient as several updates.
pub const MAX_UPDATE_PARAMS: usize = 2_000_000_000;

/// Reads and checks a payload's header, including that the payload is exactly
/// as long as the header implies and within [`MAX_UPDATE_PARAMS`].
pub fn peek_header(payload: &[u8]) -> Result<Header, CodecError> {
    header::read_header(payload, MAX_UPDATE_PARAMS as u64)
}

/// Decodes a payload into `out`, whose length must equal the header's param
/// count. On error `out` is left unchanged.
pub fn decode_into(payload: &[u8], out: &mut [f32]) -> Result<Header, CodecError> {
    let header = peek_header(payload)?;
    check_buffer(&header, out.len())?;
    decode_body(&header, &payload[HEADER_LEN..], Target::Overwrite(out))?;
    Ok(header)
}

/// Adds `weight * decoded[i]` to `acc[i]` for every param, computed as
/// `acc[i] + weight * decoded[i]` in f32. The whole payload is validated
/// before `acc` is touched, so on error `acc` is left unchanged.
pub fn decode_add(payload: &[u8], weight: f32, acc: &mut [f32]) -> Result<Header, CodecError> {
    if !weight.is_finite() {
        return Err(CodecError::BadWeight(weight));
    }
    let header = peek_header(payload)?;
    check_buffer(&header, acc.len())?;
    decode_body(&header, &payload[HEADER_LEN..], Target::Add { acc, weight })?;
    Ok(header)
}

/// Decodes a payload into a new vector, refusing headers that claim more than
/// `max_params` (or [`MAX_UPDATE_PARAMS`]) before allocating anything.
pub fn decode(payload: &[u8], max_params: usize) -> Result<Vec<f32>, CodecError> {
    let header = header::read_header(payload, max_params as u64)?;
    let params = usize::try_from(header.params).map_err(|_| CodecError::TooManyParams {
        params: header.params,
        limit: max_params as u64,
    })?;
    let mut out = vec![0.0f32; params];
    decode_body(&header, &payload[HEADER_LEN..], Target::Overwrite(&mut out))?;
    Ok(out)
}

/// Checks a payload as [`decode_into`] does and, for a sparse format
/// (top-k), calls `visit(index, value)` for every value it keeps, in index
/// order; every other index decodes to 0. Returns `Ok(false)`, visiting
/// nothing, for a dense format (fp32, int8), which the caller decodes whole.
pub fn visit_kept(
    payload: &[u8],
    params: usize,
    visit: impl FnMut(usize, f32),
) -> Result<bool, CodecError> {
    let header = peek_header(payload)?;
    check_buffer(&header, params)?;
    match header.config {
        CodecConfig::TopK { chunk, k, bits } => {
            topk::visit(&payload[HEADER_LEN..], chunk, k, bits, params, visit)?;
            Ok(true)
        }
        CodecConfig::Fp32 => fp32::checked(&payload[HEADER_LEN..]).map(|_| false),
        CodecConfig::Int8 { block } => {
            int8::View::new(&payload[HEADER_LEN..], block, params).map(|_| false)
        }
    }
}

/// A checked dense payload (fp32 or int8) read one value at a time, with
/// the same arithmetic as [`decode_into`]: a robust rule looks at one
/// coordinate of every update at once without holding decoded copies.
pub struct Values<'a>(Stored<'a>);

enum Stored<'a> {
    Fp32(&'a [[u8; 4]]),
    Int8(int8::View<'a>),
}

impl Values<'_> {
    /// Value `i` (below the payload's param count).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match &self.0 {
            Stored::Fp32(values) => f32::from_le_bytes(values[i]),
            Stored::Int8(view) => view.get(i),
        }
    }
}

/// Checks a payload as [`decode_into`] does and returns its values for
/// random access; `Ok(None)` for top-k, whose values are bit-packed streams
/// (see [`visit_kept`]).
pub fn values(payload: &[u8], params: usize) -> Result<Option<Values<'_>>, CodecError> {
    let header = peek_header(payload)?;
    check_buffer(&header, params)?;
    let body = &payload[HEADER_LEN..];
    Ok(match header.config {
        CodecConfig::Fp32 => Some(Values(Stored::Fp32(fp32::checked(body)?))),
        CodecConfig::Int8 { block } => {
            Some(Values(Stored::Int8(int8::View::new(body, block, params)?)))
        }
        CodecConfig::TopK { chunk, k, bits } => {
            topk::check(body, chunk, k, bits, params)?;
            None
        }
    })
}

/// Where decoded values go.
pub(crate) enum Target<'a> {
    Overwrite(&'a mut [f32]),
    Add { acc: &'a mut [f32], weight: f32 },
}

fn check_buffer(header: &Header, len: usize) -> Result<(), CodecError> {
    if header.params != len as u64 {
        return Err(CodecError::BufferLength {
            expected: usize::try_from(header.params).unwrap_or(usize::MAX),
            got: len,
        });
    }
    Ok(())
}

/// Dispatches on the format; the header has already fixed the body length.
fn decode_body(header: &Header, body: &[u8], target: Target<'_>) -> Result<(), CodecError> {
    match header.config {
        CodecConfig::Fp32 => fp32::decode(body, target),
        CodecConfig::Int8 { block } => int8::decode(body, block, target),
        CodecConfig::TopK { chunk, k, bits } => topk::decode(body, chunk, k, bits, target),
    }
}

/// Bits of an f32 without its sign: ordered like the magnitude, and at least
/// `EXPONENT_BITS` exactly when the value is infinite or NaN.
pub(crate) const ABS_MASK: u32 = 0x7FFF_FFFF;
pub(crate) const EXPONENT_BITS: u32 = 0x7F80_0000;

/// Index of the first non-finite value, scanning in blocks with a branch-free
/// "exponent all ones" test (which vectorizes) and only locating the culprit
/// when a block has one.
pub(crate) fn first_non_finite<T: Copy>(items: &[T], bits_of: impl Fn(T) -> u32) -> Option<usize> {
    const STRIDE: usize = 1024;
    let non_finite = |x: T| bits_of(x) & EXPONENT_BITS == EXPONENT_BITS;
    // |x| as bits plus one exponent step carries into the top bit exactly when
    // the exponent is all ones; OR-ing those sums is add/and/or only, which
    // vectorizes where a short-circuiting test would not.
    let carry = |x: T| (bits_of(x) & ABS_MASK).wrapping_add(0x0080_0000);
    for (block, values) in items.chunks(STRIDE).enumerate() {
        if values.iter().fold(0u32, |any, &x| any | carry(x)) >> 31 != 0 {
            let position = values.iter().position(|&x| non_finite(x))?;
            return Some(block * STRIDE + position);
        }
    }
    None
}

/// Rounds to the nearest integer, ties to even, for |y| < 2^22: adding
/// 1.5 * 2^23 pushes the fraction out of the mantissa, so the integer can be
/// read from the low bits. Pure IEEE adds and integer ops: identical on every
/// machine, and it vectorizes where `f32::round` would call libm.
#[inline(always)]
pub(crate) fn round_small(y: f32) -> i32 {
    const SHIFTER: f32 = 12_582_912.0;
    ((y + SHIFTER).to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32)
}
