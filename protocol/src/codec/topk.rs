//! The `topk:CHUNK:K:BITS` format (SparseLoCo style). Per chunk of CHUNK
//! values the K largest magnitudes are kept (ties: lower index first), sent as
//! a sign bit plus a (BITS-1)-bit level spread evenly over the chunk's kept
//! magnitude range [lo, hi]. Body: every chunk's (lo, hi) as f32 LE pairs,
//! then all kept indices (ascending within a chunk, ceil(log2 CHUNK) bits
//! each), then all value codes (BITS bits each), both bit-packed.
//!
//! Selection is exact and fast: a histogram of a fixed sample, in
//! eighth-octave bins below the chunk's largest magnitude, estimates a
//! threshold that a few times K values pass; only those are ranked exactly. All of it works on the integer bits of |x|, which
//! order like the magnitudes, so it is identical on every machine.

use super::bitpack::{BitReader, BitWriter};
use super::{ABS_MASK, CodecError, Target, first_non_finite, round_small};

/// Where the parts of a top-k body lie and how many values it carries.
pub(crate) struct Layout {
    chunks: u64,
    kept: u64,
    index_bits: u32,
    value_bits: u32,
}

impl Layout {
    pub(crate) fn new(params: u64, chunk: u32, k: u32, bits: u8) -> Option<Layout> {
        let chunk = u64::from(chunk.max(1));
        let k = u64::from(k);
        let chunks = params.div_ceil(chunk);
        let kept = match chunks.checked_sub(1) {
            None => 0,
            Some(full) => full.checked_mul(k.min(chunk))? + k.min(params - full * chunk),
        };
        Some(Layout {
            chunks,
            kept,
            index_bits: index_bits(chunk),
            value_bits: u32::from(bits),
        })
    }

    fn ranges_len(&self) -> Option<u64> {
        self.chunks.checked_mul(8)
    }

    fn index_stream_len(&self) -> Option<u64> {
        Some(
            self.kept
                .checked_mul(u64::from(self.index_bits))?
                .div_ceil(8),
        )
    }

    fn value_stream_len(&self) -> Option<u64> {
        Some(
            self.kept
                .checked_mul(u64::from(self.value_bits))?
                .div_ceil(8),
        )
    }

    pub(crate) fn body_len(&self) -> Option<u64> {
        self.ranges_len()?
            .checked_add(self.index_stream_len()?)?
            .checked_add(self.value_stream_len()?)
    }
}

/// Bits per index: ceil(log2 chunk), 0 for a chunk of one.
fn index_bits(chunk: u64) -> u32 {
    64 - (chunk.max(1) - 1).leading_zeros()
}

/// The value grid of one chunk: `levels` magnitudes evenly from lo to hi.
/// Encoder and decoder build it from the same two f32s, so both compute the
/// same decoded values.
struct Levels {
    lo: f32,
    hi: f32,
    step: f32,
    inverse: f32,
    top: i32,
}

impl Levels {
    fn new(lo: f32, hi: f32, value_bits: u32) -> Levels {
        let top = (1i32 << (value_bits - 1)) - 1;
        let step = (hi - lo) / top as f32;
        Levels {
            lo,
            hi,
            step,
            inverse: top as f32 / (hi - lo),
            top,
        }
    }

    /// The nearest level to magnitude `m` (in [lo, hi]).
    fn level(&self, m: f32) -> u32 {
        if self.step == 0.0 {
            return 0;
        }
        // A subnormal range makes the reciprocal overflow; divide instead.
        let y = if self.inverse.is_finite() {
            (m - self.lo) * self.inverse
        } else {
            (m - self.lo) / self.step
        };
        round_small(y).clamp(0, self.top) as u32
    }

    /// The decoded magnitude of a level; never above hi, so always finite.
    fn magnitude(&self, level: u32) -> f32 {
        (self.lo + level as f32 * self.step).min(self.hi)
    }

    fn value(&self, code: u32, value_bits: u32) -> f32 {
        let magnitude = self.magnitude(code & self.top as u32);
        if code >> (value_bits - 1) != 0 {
            -magnitude
        } else {
            magnitude
        }
    }
}

/// Buffers reused across rounds so encoding allocates nothing per chunk.
#[derive(Default)]
pub(crate) struct Scratch {
    magnitudes: Vec<u32>,
    candidates: Vec<u64>,
    keys: Vec<u64>,
    kept: Vec<u32>,
    index_stream: Vec<u8>,
    value_stream: Vec<u8>,
}

/// What the encoder needs besides the input: its residual and its settings.
pub(crate) struct Settings {
    pub(crate) chunk: u32,
    pub(crate) k: u32,
    pub(crate) bits: u8,
    pub(crate) decay: f32,
}

/// Appends the body for `delta + decay * residual` and leaves in `residual`
/// what was not sent. Non-finite input is refused before the residual changes.
pub(crate) fn encode(
    delta: &[f32],
    residual: &mut [f32],
    settings: &Settings,
    scratch: &mut Scratch,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    if let Some(index) = first_non_finite(delta, f32::to_bits) {
        return Err(CodecError::NonFiniteInput {
            index,
            value: delta[index],
        });
    }
    let chunk = settings.chunk as usize;
    let value_bits = u32::from(settings.bits);
    let index_bits = index_bits(chunk as u64);
    let Scratch {
        magnitudes,
        candidates,
        keys,
        kept,
        index_stream,
        value_stream,
    } = scratch;
    magnitudes.resize(chunk.min(delta.len()), 0);
    index_stream.clear();
    value_stream.clear();
    let mut indices = BitWriter::new(index_stream);
    let mut values = BitWriter::new(value_stream);
    let ranges_at = out.len();
    out.resize(ranges_at + delta.len().div_ceil(chunk) * 8, 0);

    for (chunk_index, (delta, residual)) in delta
        .chunks(chunk)
        .zip(residual.chunks_mut(chunk))
        .enumerate()
    {
        let magnitudes = &mut magnitudes[..delta.len()];
        let max = fold_in(delta, residual, settings.decay, magnitudes);
        let keep = (settings.k as usize).min(delta.len());
        select_largest(magnitudes, max, keep, candidates, keys, kept);

        let lo = kept
            .iter()
            .map(|&i| magnitudes[i as usize])
            .min()
            .unwrap_or(max);
        let (lo, hi) = (f32::from_bits(lo), f32::from_bits(max));
        let levels = Levels::new(lo, hi, value_bits);
        for &index in kept.iter() {
            let value = residual[index as usize];
            let level = levels.level(f32::from_bits(magnitudes[index as usize]));
            let code = (u32::from(value.is_sign_negative()) << (value_bits - 1)) | level;
            residual[index as usize] = value - levels.value(code, value_bits);
            indices.push(index, index_bits);
            values.push(code, value_bits);
        }
        let at = ranges_at + chunk_index * 8;
        out[at..at + 4].copy_from_slice(&lo.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&hi.to_le_bytes());
    }
    indices.finish();
    values.finish();
    out.extend_from_slice(index_stream);
    out.extend_from_slice(value_stream);
    Ok(())
}

/// Adds the decayed residual to this round's input, keeps the sum in
/// `residual` (it becomes the residual once the sent part is subtracted), and
/// records each |value| as bits. Returns the largest. Sums that overflow are
/// held at ±f32::MAX so the residual stays finite.
fn fold_in(delta: &[f32], residual: &mut [f32], decay: f32, magnitudes: &mut [u32]) -> u32 {
    // Finite inputs make the sum finite or ±inf, never NaN, so clamping |sum|
    // to f32::MAX is an integer min on its bits and the sign can be put back
    // with an OR: exactly `clamp(-f32::MAX, f32::MAX)`. Integer min and max
    // (below 2^31, so as i32) vectorize, where a float max reduction would
    // stay scalar to keep its order.
    const MAX_BITS: i32 = 0x7F7F_FFFF;
    let mut max = 0i32;
    for ((carried, &input), magnitude) in residual.iter_mut().zip(delta).zip(magnitudes.iter_mut())
    {
        let bits = (input + decay * *carried).to_bits();
        let absolute = ((bits & ABS_MASK) as i32).min(MAX_BITS);
        *carried = f32::from_bits(absolute as u32 | (bits & !ABS_MASK));
        *magnitude = absolute as u32;
        max = max.max(absolute);
    }
    max as u32
}

/// Eighth-octave bins below the chunk's largest magnitude: the exponent and
/// the top three mantissa bits.
const BIN_SHIFT: u32 = 20;
/// Every how many values the threshold estimate samples.
const SAMPLE_STRIDE: usize = 8;

/// Fills `kept` with the indices of the `keep` largest magnitudes, ascending.
///
/// A histogram of a fixed sample estimates a magnitude threshold that a few
/// times `keep` values pass; only those are gathered and ranked exactly. If
/// the sample misjudged and fewer than `keep` pass, a histogram of every value
/// gives a threshold that is sure to. Either way the result is the exact top
/// `keep`, so the sampling affects speed only.
fn select_largest(
    magnitudes: &[u32],
    max: u32,
    keep: usize,
    candidates: &mut Vec<u64>,
    keys: &mut Vec<u64>,
    kept: &mut Vec<u32>,
) {
    kept.clear();
    let len = magnitudes.len();
    if keep >= len || max == 0 {
        // All kept, or all zero: ties go to the lowest indices.
        kept.extend(0..keep as u32);
        return;
    }
    let sample_target = keep.div_ceil(SAMPLE_STRIDE) * 3 / 2 + 4;
    let estimate = threshold(magnitudes.iter().step_by(SAMPLE_STRIDE), max, sample_target);
    let mut found = gather(magnitudes, estimate, candidates);
    if found < keep {
        found = gather(
            magnitudes,
            threshold(magnitudes.iter(), max, keep),
            candidates,
        );
    }
    let candidates = &candidates[..found];
    // Larger magnitude first, then lower index: every key is distinct, so
    // exactly `keep` candidates are at or above the cut.
    let mut cut = 0;
    if found > keep {
        keys.clear();
        keys.extend_from_slice(candidates);
        cut = *keys.select_nth_unstable(found - keep).1;
    }
    kept.extend(
        candidates
            .iter()
            .filter(|&&key| key >= cut)
            .map(|&key| !(key as u32)),
    );
}

/// A magnitude (as bits) that at least `count` of `values` reach, from a
/// histogram of bins below `max`; 0 when they are too few.
fn threshold<'a>(values: impl Iterator<Item = &'a u32>, max: u32, count: usize) -> u32 {
    let mut histogram = [0u32; 256];
    for &magnitude in values {
        histogram[((max - magnitude) >> BIN_SHIFT).min(255) as usize] += 1;
    }
    let mut total = 0;
    for (bin, &in_bin) in histogram.iter().enumerate().take(255) {
        total += in_bin as usize;
        if total >= count {
            // Bins 0..=bin hold exactly the magnitudes at or above this value.
            return max.saturating_sub(((bin as u32 + 1) << BIN_SHIFT) - 1);
        }
    }
    0
}

/// Writes to the front of `candidates`, in index order, the sort key of every
/// magnitude at or above `threshold`; returns how many. Blocks of 8 with none are skipped by a
/// vectorized test, which most blocks are.
fn gather(magnitudes: &[u32], threshold: u32, candidates: &mut Vec<u64>) -> usize {
    const BLOCK: usize = 8;
    // Sized once and never shrunk: clearing it per chunk would cost a memset.
    if candidates.len() < magnitudes.len() {
        candidates.resize(magnitudes.len(), 0);
    }
    let mut found = 0;
    // Magnitudes are below 2^31, so comparing them as i32 is exact and SIMD-friendly.
    let threshold = threshold as i32;
    let passes = |magnitude: u32| magnitude as i32 >= threshold;
    let (blocks, rest) = magnitudes.as_chunks::<BLOCK>();
    let mut push_block = |start: usize, block: &[u32]| {
        for (offset, &magnitude) in block.iter().enumerate() {
            // Branch-free: always write, advance only past the ones that pass.
            if let Some(slot) = candidates.get_mut(found) {
                *slot = (u64::from(magnitude) << 32) | u64::from(!((start + offset) as u32));
            }
            found += usize::from(passes(magnitude));
        }
    };
    // A vectorized test skips the blocks with no passing value, most of them.
    // threshold - 1 - m is negative exactly when m passes; OR-ing the
    // differences tests the whole block with integer vector ops. The tests of
    // 64 blocks go into one mask, built without branches, whose set bits are
    // then visited in order: a branch per passing block would mispredict.
    let below = threshold.wrapping_sub(1);
    let block_passes = |block: &[u32; BLOCK]| {
        let any = block
            .iter()
            .fold(0i32, |any, &m| any | below.wrapping_sub(m as i32));
        u64::from(any as u32 >> 31)
    };
    for (group_index, group) in blocks.chunks(64).enumerate() {
        let mut mask = group
            .iter()
            .enumerate()
            .fold(0u64, |mask, (j, block)| mask | (block_passes(block) << j));
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if let Some(block) = group.get(j) {
                push_block((group_index * 64 + j) * BLOCK, block);
            }
        }
    }
    push_block(blocks.len() * BLOCK, rest);
    found
}

/// Validates the whole body, then writes or adds the decoded values.
pub(crate) fn decode(
    body: &[u8],
    chunk: u32,
    k: u32,
    bits: u8,
    target: Target<'_>,
) -> Result<(), CodecError> {
    let format = Format {
        chunk: chunk as usize,
        k: k as usize,
        bits,
    };
    match target {
        Target::Overwrite(out) => {
            format.walk(body, out.len(), |_, _| {})?;
            out.fill(0.0);
            format.walk(body, out.len(), |index, value| {
                if let Some(slot) = out.get_mut(index) {
                    *slot = value;
                }
            })
        }
        Target::Add { acc, weight } => {
            format.walk(body, acc.len(), |_, _| {})?;
            format.walk(body, acc.len(), |index, value| {
                if let Some(slot) = acc.get_mut(index) {
                    *slot += weight * value;
                }
            })
        }
    }
}

struct Format {
    chunk: usize,
    k: usize,
    bits: u8,
}

impl Format {
    /// Decodes every kept value in order, checking ranges, index order and
    /// range, and padding; calls `visit(global index, value)` for each.
    fn walk(
        &self,
        body: &[u8],
        params: usize,
        mut visit: impl FnMut(usize, f32),
    ) -> Result<(), CodecError> {
        let layout = Layout::new(params as u64, self.chunk as u32, self.k as u32, self.bits);
        let lengths = layout
            .as_ref()
            .and_then(|l| Some((l.ranges_len()?, l.index_stream_len()?)));
        let truncated = CodecError::LengthMismatch {
            expected: 0,
            got: body.len(),
        };
        let (ranges_len, index_len) = lengths.ok_or(truncated.clone())?;
        let (ranges, rest) = body
            .split_at_checked(ranges_len as usize)
            .ok_or(truncated.clone())?;
        let (index_stream, value_stream) =
            rest.split_at_checked(index_len as usize).ok_or(truncated)?;
        let (ranges, _) = ranges.as_chunks::<8>();
        let value_bits = u32::from(self.bits);
        let index_bits = index_bits(self.chunk as u64);
        let mut indices = BitReader::new(index_stream);
        let mut values = BitReader::new(value_stream);

        for (chunk_index, range) in ranges.iter().enumerate() {
            let [a, b, c, d, e, f, g, h] = *range;
            let (lo, hi) = (
                f32::from_le_bytes([a, b, c, d]),
                f32::from_le_bytes([e, f, g, h]),
            );
            let signs_clear = (lo.to_bits() | hi.to_bits()) >> 31 == 0;
            if !(signs_clear && hi.is_finite() && lo <= hi) {
                return Err(CodecError::BadRange {
                    chunk: chunk_index,
                    lo,
                    hi,
                });
            }
            let levels = Levels::new(lo, hi, value_bits);
            let start = chunk_index * self.chunk;
            let len = self.chunk.min(params - start);
            let mut previous: Option<u32> = None;
            for _ in 0..self.k.min(len) {
                let index = indices.read(index_bits);
                if index as usize >= len {
                    return Err(CodecError::IndexOutOfRange {
                        chunk: chunk_index,
                        index,
                        len,
                    });
                }
                if let Some(previous) = previous
                    && index <= previous
                {
                    return Err(CodecError::IndicesNotIncreasing {
                        chunk: chunk_index,
                        previous,
                        index,
                    });
                }
                previous = Some(index);
                visit(
                    start + index as usize,
                    levels.value(values.read(value_bits), value_bits),
                );
            }
        }
        indices.finish("index")?;
        values.finish("value")
    }
}
