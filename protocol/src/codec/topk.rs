//! The `topk:CHUNK:K:BITS` format (SparseLoCo style). Per chunk of CHUNK
//! values the K largest magnitudes are kept (ties: lower index first), sent as
//! a sign bit plus a (BITS-1)-bit level spread evenly over the chunk's kept
//! magnitude range [lo, hi]. Body: every chunk's (lo, hi) as f32 LE pairs,
//! then which values were kept, then all value codes (BITS bits each, in
//! index order), both bit-packed.
//!
//! Which values were kept is sent whichever way is smaller, decided by the
//! config alone: as a list of indices (ascending within a chunk,
//! ceil(log2 CHUNK) bits each) when K · ceil(log2 CHUNK) ≤ CHUNK, else as a
//! mask of one bit per value (1 = kept, exactly min(K, chunk length) set per
//! chunk). A mask makes dense top-k cheap: a quarter of each chunk at 4 bits
//! is 2 bits per param with a mask against 4 with 12-bit indices.
//!
//! Selection is exact and fast: a histogram of a fixed sample, in
//! eighth-octave bins below the chunk's largest magnitude, estimates a
//! threshold that a few times K values pass; only those are ranked exactly. All of it works on the integer bits of |x|, which
//! order like the magnitudes, so it is identical on every machine.

use super::bitpack::{BitReader, BitWriter};
use super::{ABS_MASK, CodecError, Target, first_non_finite, round_small};

/// Where the parts of a top-k body lie and how many values it carries.
pub(crate) struct Layout {
    params: u64,
    chunks: u64,
    kept: u64,
    index_bits: u32,
    value_bits: u32,
    mask: bool,
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
            params,
            chunks,
            kept,
            index_bits: index_bits(chunk),
            value_bits: u32::from(bits),
            mask: uses_mask(chunk, k),
        })
    }

    fn ranges_len(&self) -> Option<u64> {
        self.chunks.checked_mul(8)
    }

    fn index_stream_len(&self) -> Option<u64> {
        if self.mask {
            return Some(self.params.div_ceil(8));
        }
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

/// Whether the kept values are sent as a one-bit-per-value mask rather than
/// an index list: when the list would be longer for a full chunk.
fn uses_mask(chunk: u64, k: u64) -> bool {
    let chunk = chunk.max(1);
    k.min(chunk).saturating_mul(u64::from(index_bits(chunk))) > chunk
}

/// Appends a chunk's mask: `len` bits, bit i set when i is in `kept`
/// (ascending, each below `len`), 32 at a time.
fn push_mask(writer: &mut BitWriter<'_>, kept: &[u32], len: usize) {
    let mut word = 0u32;
    let mut base = 0usize;
    for &index in kept {
        let index = index as usize;
        while index >= base + 32 {
            writer.push(word, 32);
            word = 0;
            base += 32;
        }
        word |= 1 << (index - base);
    }
    while base < len {
        writer.push(word, (len - base).min(32) as u32);
        word = 0;
        base += 32;
    }
}

/// Reads a chunk's `len`-bit mask and calls `visit(index)` for each set bit,
/// in ascending order.
fn read_mask(reader: &mut BitReader<'_>, len: usize, mut visit: impl FnMut(usize)) {
    let mut base = 0usize;
    while base < len {
        let word = reader.read((len - base).min(32) as u32);
        set_bits(u64::from(word)).for_each(|bit| visit(base + bit as usize));
        base += 32;
    }
}

/// The positions of a word's set bits, lowest first.
fn set_bits(mut word: u64) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        let bit = (word != 0).then(|| word.trailing_zeros())?;
        word &= word - 1;
        Some(bit)
    })
}

/// The value grid of one chunk: `levels` magnitudes evenly from lo to hi.
/// Encoder and decoder build it from the same two f32s, so both compute the
/// same decoded values.
#[derive(Clone, Copy)]
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
    maxima: Maxima,
    passing: Vec<u32>,
    candidates: Vec<u64>,
    keys: Vec<u64>,
    kept: Vec<u32>,
    sent: Vec<f32>,
    codes: Vec<u32>,
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
///
/// After the finiteness scan each chunk is finished before the next is read:
/// the fold writes the chunk's sums into its slice of the residual, where
/// they stay in L1 while the chunk's top k are selected and quantized and the
/// sent part is subtracted. Input and residual are streamed from memory once.
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
    let mask = uses_mask(chunk as u64, u64::from(settings.k));
    let Scratch {
        maxima,
        passing,
        candidates,
        keys,
        kept,
        sent,
        codes,
        index_stream,
        value_stream,
    } = scratch;
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
        let max = fold_in(delta, residual, settings.decay, maxima);
        let keep = (settings.k as usize).min(delta.len());
        let buffers = Buffers {
            passing,
            candidates,
            keys,
        };
        select_largest(residual, maxima, max, keep, buffers, kept);

        let lo = kept
            .iter()
            .map(|&i| magnitude(residual[i as usize]))
            .min()
            .unwrap_or(max);
        let (lo, hi) = (f32::from_bits(lo), f32::from_bits(max));
        let levels = Levels::new(lo, hi, value_bits);
        quantize(residual, kept, &levels, value_bits, sent, codes);
        if mask {
            push_mask(&mut indices, kept, delta.len());
        } else {
            for &index in kept.iter() {
                indices.push(index, index_bits);
            }
        }
        for &code in codes.iter() {
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

/// Writes to `codes` the code of each kept value and subtracts its decoded
/// value from `residual`. `sent` is scratch space.
///
/// The kept values are copied out, coded in a loop without branches (which
/// vectorizes), and the remainders copied back. The result is exactly
/// `Levels::level` and `Levels::value`, which the decoder uses.
fn quantize(
    residual: &mut [f32],
    kept: &[u32],
    levels: &Levels,
    value_bits: u32,
    sent: &mut Vec<f32>,
    codes: &mut Vec<u32>,
) {
    sent.clear();
    sent.extend(kept.iter().map(|&index| residual[index as usize]));
    codes.clear();
    codes.resize(kept.len(), 0);
    let sign_shift = value_bits - 1;
    let Levels {
        lo,
        hi,
        step,
        inverse,
        top,
    } = *levels;
    if step != 0.0 && inverse.is_finite() {
        for (value, code) in sent.iter_mut().zip(codes.iter_mut()) {
            let sign = value.to_bits() >> 31;
            let level = round_small((value.abs() - lo) * inverse).clamp(0, top);
            // The decoded magnitude is never negative, so setting its sign
            // bit negates it.
            let magnitude = (lo + level as f32 * step).min(hi);
            *code = (sign << sign_shift) | level as u32;
            *value -= f32::from_bits(magnitude.to_bits() | (sign << 31));
        }
    } else {
        for (value, code) in sent.iter_mut().zip(codes.iter_mut()) {
            let level = levels.level(value.abs());
            *code = (u32::from(value.is_sign_negative()) << sign_shift) | level;
            *value -= levels.value(*code, value_bits);
        }
    }
    for (&index, &remainder) in kept.iter().zip(sent.iter()) {
        residual[index as usize] = remainder;
    }
}

/// |x| as bits: ordered like the magnitude, below 2^31 for finite x.
#[inline(always)]
fn magnitude(x: f32) -> u32 {
    x.to_bits() & ABS_MASK
}

/// The fold works on blocks of `BLOCK` values seen as rows of `WAYS` lanes
/// (a row is one vector register), four rows to a quarter. For every block it
/// records per lane the largest |sum| of each quarter (4 values apart) and
/// of the whole block (16 values apart). Selection reads those maxima and
/// looks further only where one could make the cut, which few do.
const BLOCK: usize = 64;
const WAYS: usize = 4;
const QUARTER: usize = BLOCK / 4;

/// Per-lane maxima of a chunk's full blocks, as the fold records them.
#[derive(Default)]
pub(crate) struct Maxima {
    /// Block b, lane l at `WAYS * b + l`.
    blocks: Vec<f32>,
    /// Block b, quarter q, lane l at `4 * WAYS * b + WAYS * q + l`.
    quarters: Vec<f32>,
}

/// Adds the decayed residual to this round's input and keeps the sum in
/// `residual` (it becomes the residual once the sent part is subtracted).
/// Records the lane maxima of each full block and returns the chunk's
/// largest |sum| as bits. Sums that overflow are held at ±f32::MAX so the
/// residual stays finite.
fn fold_in(delta: &[f32], residual: &mut [f32], decay: f32, maxima: &mut Maxima) -> u32 {
    // Finite inputs make every sum finite or ±inf, never NaN, so `>` is a
    // total order here and the lane-wise `if a > m` is one max instruction
    // per vector. A maximum is exact, so how it is grouped cannot change it.
    let larger = |a: f32, m: f32| if a > m { a } else { m };
    let blocks = residual.len() / BLOCK;
    maxima.blocks.resize(blocks * WAYS, 0.0);
    maxima.quarters.resize(blocks * 4 * WAYS, 0.0);
    let mut max = [0f32; WAYS];
    let (residual_blocks, residual_rest) = residual.as_chunks_mut::<BLOCK>();
    let (delta_blocks, delta_rest) = delta.as_chunks::<BLOCK>();
    let recorded = maxima
        .blocks
        .as_chunks_mut::<WAYS>()
        .0
        .iter_mut()
        .zip(maxima.quarters.as_chunks_mut::<{ 4 * WAYS }>().0);
    for ((carried, input), (block_max, quarter_maxima)) in
        residual_blocks.iter_mut().zip(delta_blocks).zip(recorded)
    {
        let mut lanes = [0f32; WAYS];
        let quarters = carried
            .as_chunks_mut::<QUARTER>()
            .0
            .iter_mut()
            .zip(input.as_chunks::<QUARTER>().0)
            .zip(quarter_maxima.as_chunks_mut::<WAYS>().0);
        for ((carried, input), quarter_max) in quarters {
            let mut quarter = [0f32; WAYS];
            let rows = carried
                .as_chunks_mut::<WAYS>()
                .0
                .iter_mut()
                .zip(input.as_chunks::<WAYS>().0);
            for (carried, input) in rows {
                for ((carried, &input), lane) in
                    carried.iter_mut().zip(input).zip(quarter.iter_mut())
                {
                    let sum = input + decay * *carried;
                    *carried = sum;
                    *lane = larger(sum.abs(), *lane);
                }
            }
            for (lane, value) in lanes.iter_mut().zip(quarter) {
                *lane = larger(value, *lane);
            }
            *quarter_max = quarter;
        }
        *block_max = lanes;
        for (lane, &value) in max.iter_mut().zip(block_max.iter()) {
            *lane = larger(value, *lane);
        }
    }
    let mut max = max.into_iter().fold(0f32, |m, lane| larger(lane, m));
    for (carried, &input) in residual_rest.iter_mut().zip(delta_rest) {
        let sum = input + decay * *carried;
        *carried = sum;
        max = larger(sum.abs(), max);
    }
    if max > f32::MAX {
        // Only a chunk where a sum overflowed pays for the clamp.
        for carried in residual.iter_mut() {
            *carried = carried.clamp(-f32::MAX, f32::MAX);
        }
        for lane in maxima.blocks.iter_mut().chain(maxima.quarters.iter_mut()) {
            *lane = lane.min(f32::MAX);
        }
        max = f32::MAX;
    }
    max.to_bits()
}

/// Eighth-octave bins below the chunk's largest magnitude: the exponent and
/// the top three mantissa bits.
const BIN_SHIFT: u32 = 20;
/// Every how many values the threshold estimate samples when the lane
/// maxima are too few to give it.
const SAMPLE_STRIDE: usize = 8;

/// Scratch space for [`select_largest`].
struct Buffers<'a> {
    passing: &'a mut Vec<u32>,
    candidates: &'a mut Vec<u64>,
    keys: &'a mut Vec<u64>,
}

/// Fills `kept` with the indices of the `keep` largest magnitudes among
/// `values`, ascending.
///
/// A histogram estimates a magnitude threshold that a little more than
/// `keep` values pass; only those are gathered and ranked exactly. Where a
/// chunk has at least 4 * `keep` block (or else quarter) maxima, their
/// histogram gives it, and surely: the maxima are magnitudes of distinct
/// values, so if `keep` maxima pass, at least `keep` values do. Otherwise a fixed sample of the values
/// gives it, and if the sample misjudged and fewer than `keep` pass, a
/// histogram of every value gives a threshold that is sure to. Either way the
/// result is the exact top `keep`: the estimate affects speed only.
fn select_largest(
    values: &[f32],
    maxima: &Maxima,
    max: u32,
    keep: usize,
    buffers: Buffers<'_>,
    kept: &mut Vec<u32>,
) {
    kept.clear();
    let len = values.len();
    if keep >= len || max == 0 {
        // All kept, or all zero: ties go to the lowest indices.
        kept.extend(0..keep as u32);
        return;
    }
    let Buffers {
        passing,
        candidates,
        keys,
    } = buffers;
    let estimate = if 4 * keep <= maxima.blocks.len() {
        threshold(maxima.blocks.iter(), max, keep)
    } else if 4 * keep <= maxima.quarters.len() {
        threshold(maxima.quarters.iter(), max, keep)
    } else {
        let sample_target = keep.div_ceil(SAMPLE_STRIDE) * 3 / 2 + 4;
        threshold(values.iter().step_by(SAMPLE_STRIDE), max, sample_target)
    };
    let mut threshold_used = estimate;
    let mut found = gather(values, maxima, estimate, passing, candidates);
    if found < keep {
        threshold_used = threshold(values.iter(), max, keep);
        found = gather(values, maxima, threshold_used, passing, candidates);
    }
    let candidates = &candidates[..found];
    let mut cut = 0;
    if found > keep {
        cut = cut_key(candidates, max, threshold_used, keep, keys);
    }
    // Branch-free: whether a candidate makes the cut is as good as random.
    kept.resize(found + 1, 0);
    let mut count = 0;
    for &key in candidates {
        if let Some(slot) = kept.get_mut(count) {
            *slot = !(key as u32);
        }
        count += usize::from(key >= cut);
    }
    kept.truncate(count);
    if count > len / 64 {
        // Dense: many values of each block are out of order, so mark the
        // kept indices in a bitmap (one word per 64 values; `keys` is free
        // now) and read them back in order, in time linear in the chunk.
        keys.clear();
        keys.resize(len.div_ceil(64), 0);
        for &index in kept.iter() {
            keys[index as usize / 64] |= 1 << (index % 64);
        }
        kept.clear();
        for (word_index, &word) in keys.iter().enumerate() {
            kept.extend(set_bits(word).map(|bit| (word_index * 64) as u32 + bit));
        }
        return;
    }
    // Gathered block by block, so only values of one block can be out of
    // order: an insertion sort moves few and mispredicts little.
    for next in 1..kept.len() {
        let mut at = next;
        while at > 0 && kept[at - 1] > kept[at] {
            kept.swap(at - 1, at);
            at -= 1;
        }
    }
}

/// Bins of the second, finer histogram, over the candidates only.
const CUT_BINS: usize = 128;

/// The `keep`-th largest of `candidates`: keys with magnitudes (as bits) in
/// `[lowest, max]`, all distinct, more than `keep` of them.
///
/// Larger magnitude first, then lower index: the key is the magnitude above
/// the complemented index, so this is plain integer order. A histogram of the
/// magnitudes in `CUT_BINS` equal bins over the range finds the bin where the
/// cut falls; only the few keys in that bin are ranked.
fn cut_key(candidates: &[u64], max: u32, lowest: u32, keep: usize, keys: &mut Vec<u64>) -> u64 {
    let span = max.saturating_sub(lowest);
    let shift = (u32::BITS - span.leading_zeros()).saturating_sub(CUT_BINS.trailing_zeros());
    let bin =
        |key: u64| ((max.saturating_sub((key >> 32) as u32) >> shift) as usize).min(CUT_BINS - 1);
    // Counts up to a whole chunk (2^20 values), so u32.
    let mut histogram = [0u32; CUT_BINS];
    for &key in candidates {
        histogram[bin(key)] += 1;
    }
    // Keys in bins before the cut's are all kept.
    let mut above = 0;
    let mut cut_bin = CUT_BINS - 1;
    for (index, &count) in histogram.iter().enumerate() {
        if above + count as usize >= keep {
            cut_bin = index;
            break;
        }
        above += count as usize;
    }
    keys.clear();
    keys.extend(
        candidates
            .iter()
            .copied()
            .filter(|&key| bin(key) == cut_bin),
    );
    // above < keep <= above + keys.len(), as more than `keep` keys were
    // counted; the 0 (keep everything) is never reached.
    let wanted = keep - above;
    match keys.len().checked_sub(wanted) {
        Some(at) => *keys.select_nth_unstable(at).1,
        None => 0,
    }
}

/// A magnitude (as bits) that at least `count` of `values` reach, from a
/// histogram of bins below `max`; 0 when they are too few.
fn threshold<'a>(values: impl Iterator<Item = &'a f32>, max: u32, count: usize) -> u32 {
    let mut histogram = [0u32; 256];
    for &value in values {
        histogram[((max - magnitude(value)) >> BIN_SHIFT).min(255) as usize] += 1;
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

/// Writes to the front of `candidates` the sort key of every value whose
/// magnitude is at least `threshold`, block by block; returns how many. The
/// key is the magnitude above the complemented index, so larger keys rank
/// first.
///
/// It narrows down in three steps, block lanes, then their quarters, then
/// values, each keeping only what passes. Each step appends every item and
/// advances past the ones that pass, which costs no branch per item: whether
/// a lane passes is as good as random, and mispredicting it would cost more
/// than the test.
fn gather(
    values: &[f32],
    maxima: &Maxima,
    threshold: u32,
    passing: &mut Vec<u32>,
    candidates: &mut Vec<u64>,
) -> usize {
    // Sized once and never shrunk: clearing them per chunk would cost a memset.
    if candidates.len() < values.len() + 1 {
        candidates.resize(values.len() + 1, 0);
    }
    let lanes = maxima.blocks.len() + maxima.quarters.len() + 1;
    if passing.len() < lanes {
        passing.resize(lanes, 0);
    }
    // Magnitudes are non-negative and not NaN, so comparing them as floats
    // orders them like their bits.
    let threshold = f32::from_bits(threshold);
    let (block_lanes, quarter_lanes) = passing.split_at_mut(maxima.blocks.len());
    let mut blocks_passing = 0;
    for (lane, &lane_max) in maxima.blocks.iter().enumerate() {
        if let Some(slot) = block_lanes.get_mut(blocks_passing) {
            *slot = lane as u32;
        }
        blocks_passing += usize::from(lane_max >= threshold);
    }
    // Block lane WAYS * b + l covers quarter lanes WAYS * q + l of block b's
    // quarter maxima, and quarter lane WAYS * r + l covers values WAYS * r + l
    // of quarter QUARTER * (4 * b + q).
    let block_quarter_maxima = maxima.quarters.as_chunks::<{ 4 * WAYS }>().0;
    let mut quarters_passing = 0;
    for &lane in &block_lanes[..blocks_passing] {
        let (block, lane) = (lane as usize / WAYS, lane as usize % WAYS);
        let Some(quarter_maxima) = block_quarter_maxima.get(block) else {
            continue;
        };
        for quarter in 0..4 {
            let at = WAYS * quarter + lane;
            if let Some(slot) = quarter_lanes.get_mut(quarters_passing) {
                *slot = (WAYS * (4 * block + quarter) + lane) as u32;
            }
            quarters_passing += usize::from(quarter_maxima[at] >= threshold);
        }
    }
    let quarters = values.as_chunks::<QUARTER>().0;
    let mut found = 0;
    for &lane in &quarter_lanes[..quarters_passing] {
        let (quarter, lane) = (lane as usize / WAYS, lane as usize % WAYS);
        let Some(quarter_values) = quarters.get(quarter) else {
            continue;
        };
        for row in 0..QUARTER / WAYS {
            let offset = WAYS * row + lane;
            let value = quarter_values[offset];
            let index = QUARTER * quarter + offset;
            if let Some(slot) = candidates.get_mut(found) {
                *slot = (u64::from(magnitude(value)) << 32) | u64::from(!(index as u32));
            }
            found += usize::from(value.abs() >= threshold);
        }
    }
    let tail = values.len() / BLOCK * BLOCK;
    for (offset, &value) in values[tail..].iter().enumerate() {
        if let Some(slot) = candidates.get_mut(found) {
            let index = tail + offset;
            *slot = (u64::from(magnitude(value)) << 32) | u64::from(!(index as u32));
        }
        found += usize::from(value.abs() >= threshold);
    }
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
    let format = Format::new(chunk, k, bits);
    match target {
        Target::Overwrite(out) => {
            let parts = format.check(body, out.len())?;
            out.fill(0.0);
            format.apply(&parts, out.len(), |index, value| {
                if let Some(slot) = out.get_mut(index) {
                    *slot = value;
                }
            });
        }
        Target::Add { acc, weight } => {
            let parts = format.check(body, acc.len())?;
            format.apply(&parts, acc.len(), |index, value| {
                if let Some(slot) = acc.get_mut(index) {
                    *slot += weight * value;
                }
            });
        }
    }
    Ok(())
}

/// Checks a body as [`decode`] does, decoding nothing.
pub(crate) fn check(
    body: &[u8],
    chunk: u32,
    k: u32,
    bits: u8,
    params: usize,
) -> Result<(), CodecError> {
    Format::new(chunk, k, bits).check(body, params).map(|_| ())
}

/// Calls `visit(global index, value)` for every value a checked body keeps,
/// in index order (`super::visit_kept`).
pub(crate) fn visit(
    body: &[u8],
    chunk: u32,
    k: u32,
    bits: u8,
    params: usize,
    visit: impl FnMut(usize, f32),
) -> Result<(), CodecError> {
    let format = Format::new(chunk, k, bits);
    let parts = format.check(body, params)?;
    format.apply(&parts, params, visit);
    Ok(())
}

struct Format {
    chunk: usize,
    k: usize,
    bits: u8,
    /// Whether the selection is a mask ([`uses_mask`]) rather than indices.
    mask: bool,
}

/// A body split into its three parts.
struct Parts<'a> {
    ranges: &'a [[u8; 8]],
    index_stream: &'a [u8],
    value_stream: &'a [u8],
}

/// A chunk's (lo, hi) as stored.
fn range(bytes: [u8; 8]) -> (f32, f32) {
    let [a, b, c, d, e, f, g, h] = bytes;
    (
        f32::from_le_bytes([a, b, c, d]),
        f32::from_le_bytes([e, f, g, h]),
    )
}

impl Format {
    fn new(chunk: u32, k: u32, bits: u8) -> Format {
        Format {
            chunk: chunk as usize,
            k: k as usize,
            bits,
            mask: uses_mask(u64::from(chunk), u64::from(k)),
        }
    }

    /// Splits the body and checks all that can be wrong with it: ranges,
    /// index range and order, and zero padding in both streams. Value codes
    /// need no check (every code of the right width is a value), so they are
    /// not read here.
    fn check<'a>(&self, body: &'a [u8], params: usize) -> Result<Parts<'a>, CodecError> {
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
        let index_bits = index_bits(self.chunk as u64);
        let mut indices = BitReader::new(index_stream);
        let mut kept = 0u64;

        for (chunk_index, bytes) in ranges.iter().enumerate() {
            let (lo, hi) = range(*bytes);
            let signs_clear = (lo.to_bits() | hi.to_bits()) >> 31 == 0;
            if !(signs_clear && hi.is_finite() && lo <= hi) {
                return Err(CodecError::BadRange {
                    chunk: chunk_index,
                    lo,
                    hi,
                });
            }
            let len = self.chunk.min(params - chunk_index * self.chunk);
            if self.mask {
                let mut set = 0usize;
                read_mask(&mut indices, len, |_| set += 1);
                if set != self.k.min(len) {
                    return Err(CodecError::MaskCount {
                        chunk: chunk_index,
                        expected: self.k.min(len),
                        got: set,
                    });
                }
                kept += set as u64;
                continue;
            }
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
            }
            kept += self.k.min(len) as u64;
        }
        indices.finish("index")?;
        let mut values = BitReader::new(value_stream);
        values.skip(kept * u64::from(self.bits));
        values.finish("value")?;
        Ok(Parts {
            ranges,
            index_stream,
            value_stream,
        })
    }

    /// Decodes every kept value of a checked body in order and calls
    /// `visit(global index, value)` for each.
    fn apply(&self, parts: &Parts<'_>, params: usize, mut visit: impl FnMut(usize, f32)) {
        let value_bits = u32::from(self.bits);
        let index_bits = index_bits(self.chunk as u64);
        let mut indices = BitReader::new(parts.index_stream);
        let mut values = BitReader::new(parts.value_stream);
        // Few bits mean few codes: decode each once per chunk, by the same
        // `Levels::value` as for one value at a time.
        let mut table = [0f32; 1 << TABLE_BITS];
        let tabled = value_bits <= TABLE_BITS;
        for (chunk_index, bytes) in parts.ranges.iter().enumerate() {
            let (lo, hi) = range(*bytes);
            let levels = Levels::new(lo, hi, value_bits);
            if tabled {
                for (code, value) in table.iter_mut().enumerate().take(1 << value_bits) {
                    *value = levels.value(code as u32, value_bits);
                }
            }
            let start = chunk_index * self.chunk;
            let len = self.chunk.min(params - start);
            let mut value_at = |index: usize| {
                let code = values.read(value_bits);
                let value = match table.get(code as usize) {
                    Some(&value) if tabled => value,
                    _ => levels.value(code, value_bits),
                };
                visit(start + index, value);
            };
            if self.mask {
                read_mask(&mut indices, len, value_at);
            } else {
                for _ in 0..self.k.min(len) {
                    value_at(indices.read(index_bits) as usize);
                }
            }
        }
    }
}

/// Codes of at most this many bits are decoded through a per-chunk table.
const TABLE_BITS: u32 = 4;
