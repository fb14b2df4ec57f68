//! Packing small unsigned integers (top-k indices and value codes) into a
//! little-endian bit stream: the first value sits in the lowest bits of the
//! first byte. The final byte is padded with zero bits, and the reader insists
//! on that, so a stream has exactly one valid encoding.

use super::CodecError;

/// Appends values of up to 32 bits to a byte vector.
pub(crate) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    pending: u64,
    pending_bits: u32,
}

impl<'a> BitWriter<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            pending: 0,
            pending_bits: 0,
        }
    }

    /// Appends the low `bits` bits of `value` (bits ≤ 32; higher bits must be zero).
    #[inline]
    pub(crate) fn push(&mut self, value: u32, bits: u32) {
        self.pending |= u64::from(value) << self.pending_bits;
        self.pending_bits += bits;
        // Flushing whole 32-bit words keeps at most 63 bits pending.
        if self.pending_bits >= 32 {
            self.out
                .extend_from_slice(&(self.pending as u32).to_le_bytes());
            self.pending >>= 32;
            self.pending_bits -= 32;
        }
    }

    /// Writes the remaining bits, zero-padded to a whole byte.
    pub(crate) fn finish(self) {
        let bytes = self.pending_bits.div_ceil(8) as usize;
        self.out
            .extend_from_slice(&self.pending.to_le_bytes()[..bytes]);
    }
}

/// Reads values back from a stream whose exact length the caller has checked.
pub(crate) struct BitReader<'a> {
    bytes: &'a [u8],
    pending: u64,
    pending_bits: u32,
}

impl<'a> BitReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        BitReader {
            bytes,
            pending: 0,
            pending_bits: 0,
        }
    }

    /// Reads the next `bits` bits (bits ≤ 32). Past the end it reads zeros;
    /// layouts are sized exactly, so that only happens for padding.
    #[inline]
    pub(crate) fn read(&mut self, bits: u32) -> u32 {
        if self.pending_bits < bits {
            self.refill();
        }
        let value = self.pending & ((1u64 << bits) - 1);
        self.pending >>= bits;
        self.pending_bits -= bits;
        value as u32
    }

    /// Tops up the pending bits to at least 32: four bytes at once where
    /// there are four, else byte by byte, then zeros past the end.
    #[inline]
    fn refill(&mut self) {
        // pending_bits < 32 here, so 32 more still fit in the u64.
        if let Some((word, rest)) = self.bytes.split_first_chunk::<4>() {
            self.pending |= u64::from(u32::from_le_bytes(*word)) << self.pending_bits;
            self.pending_bits += 32;
            self.bytes = rest;
            return;
        }
        while self.pending_bits < 32 {
            let (byte, rest) = self
                .bytes
                .split_first()
                .map_or((0, &[][..]), |(b, r)| (*b, r));
            self.bytes = rest;
            self.pending |= u64::from(byte) << self.pending_bits;
            self.pending_bits += 8;
        }
    }

    /// Passes over the next `bits` bits without returning them.
    pub(crate) fn skip(&mut self, bits: u64) {
        let pending = u64::from(self.pending_bits);
        if bits <= pending {
            self.read(bits as u32);
            return;
        }
        let bits = bits - pending;
        self.pending = 0;
        self.pending_bits = 0;
        let whole = usize::try_from(bits / 8).unwrap_or(usize::MAX);
        self.bytes = self.bytes.get(whole..).unwrap_or(&[]);
        self.read((bits % 8) as u32);
    }

    /// Checks that everything left unread is zero padding.
    pub(crate) fn finish(self, stream: &'static str) -> Result<(), CodecError> {
        if self.pending != 0 || self.bytes.iter().any(|&b| b != 0) {
            return Err(CodecError::NonZeroPadding { stream });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn values_round_trip(bits in 0u32..=20, raw in proptest::collection::vec(any::<u32>(), 0..200)) {
            let mask = if bits == 0 { 0 } else { (1u32 << bits) - 1 };
            let values: Vec<u32> = raw.iter().map(|v| v & mask).collect();
            let mut out = Vec::new();
            let mut writer = BitWriter::new(&mut out);
            for &v in &values {
                writer.push(v, bits);
            }
            writer.finish();
            prop_assert_eq!(out.len(), (values.len() * bits as usize).div_ceil(8));
            let mut reader = BitReader::new(&out);
            for &v in &values {
                prop_assert_eq!(reader.read(bits), v);
            }
            prop_assert!(reader.finish("test").is_ok());
        }
    }

    proptest! {
        #[test]
        fn skipping_lands_where_reading_would(
            bits in 1u32..=20,
            raw in proptest::collection::vec(any::<u32>(), 1..200),
            skipped in 0usize..200,
        ) {
            let values: Vec<u32> = raw.iter().map(|v| v & ((1u32 << bits) - 1)).collect();
            let skipped = skipped.min(values.len());
            let mut out = Vec::new();
            let mut writer = BitWriter::new(&mut out);
            for &v in &values {
                writer.push(v, bits);
            }
            writer.finish();
            let mut reader = BitReader::new(&out);
            // A read first, so that skip starts with bits pending.
            prop_assert_eq!(reader.read(bits), values[0]);
            reader.skip(skipped.saturating_sub(1) as u64 * u64::from(bits));
            for &v in &values[skipped.max(1)..] {
                prop_assert_eq!(reader.read(bits), v);
            }
            prop_assert!(reader.finish("test").is_ok());
        }
    }

    #[test]
    fn skipped_bits_are_not_padding() {
        // Six bits skipped: the two above them are padding.
        let mut reader = BitReader::new(&[0b0011_1111]);
        reader.skip(6);
        assert!(reader.finish("values").is_ok());
        let mut reader = BitReader::new(&[0b0111_1111]);
        reader.skip(6);
        assert!(reader.finish("values").is_err());
        let mut reader = BitReader::new(&[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0b0000_0011]);
        reader.skip(42);
        assert!(reader.finish("values").is_ok());
    }

    #[test]
    fn padding_must_be_zero() {
        // Three 2-bit values leave two padding bits in the only byte.
        let mut reader = BitReader::new(&[0b1100_0000]);
        for _ in 0..3 {
            assert_eq!(reader.read(2), 0);
        }
        assert!(reader.finish("values").is_err());
    }
}
