//! Seeded batch sampling from a token stream: each sequence starts at a
//! uniformly random offset, the targets are the inputs shifted by one. The
//! seed fixes the batches, so a worker's inner steps can be replayed exactly
//! (the coordinator's audit relies on that).

use crate::rng::Rng;

/// Why a token stream cannot feed a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SampleError {
    #[error(
        "token stream has {tokens} tokens, fewer than the {needed} one sequence of length {seq_len} needs"
    )]
    TooFewTokens {
        tokens: usize,
        needed: usize,
        seq_len: usize,
    },
    #[error(
        "token {token} at position {position} is outside the model's vocabulary of {vocab_size}"
    )]
    OutOfVocabulary {
        token: u16,
        position: usize,
        vocab_size: usize,
    },
    #[error("batch size and sequence length must be positive (got {batch_size} x {seq_len})")]
    EmptyBatch { batch_size: usize, seq_len: usize },
}

/// Checks every token is below `vocab_size`, once per shard rather than per
/// batch.
pub fn check_vocab(tokens: &[u16], vocab_size: usize) -> Result<(), SampleError> {
    match tokens.iter().position(|&t| usize::from(t) >= vocab_size) {
        Some(position) => Err(SampleError::OutOfVocabulary {
            token: tokens[position],
            position,
            vocab_size,
        }),
        None => Ok(()),
    }
}

/// Draws (inputs, targets) batches of `batch_size` × `seq_len` token ids.
#[derive(Debug, Clone)]
pub struct BatchSampler<'a> {
    tokens: &'a [u16],
    batch_size: usize,
    seq_len: usize,
    rng: Rng,
}

impl<'a> BatchSampler<'a> {
    pub fn new(
        tokens: &'a [u16],
        batch_size: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Self, SampleError> {
        if batch_size == 0 || seq_len == 0 {
            return Err(SampleError::EmptyBatch {
                batch_size,
                seq_len,
            });
        }
        if tokens.len() < seq_len + 1 {
            return Err(SampleError::TooFewTokens {
                tokens: tokens.len(),
                needed: seq_len + 1,
                seq_len,
            });
        }
        Ok(BatchSampler {
            tokens,
            batch_size,
            seq_len,
            rng: Rng::new(seed),
        })
    }

    /// The next batch as row-major u32 ids: (inputs, targets), each
    /// `batch_size * seq_len` long.
    pub fn next_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let n = self.batch_size * self.seq_len;
        let mut inputs = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        // Offsets 0 ..= len - seq_len - 1 keep the shifted target in bounds.
        let starts = (self.tokens.len() - self.seq_len) as u64;
        for _ in 0..self.batch_size {
            let start = self.rng.below(starts) as usize;
            let window = &self.tokens[start..start + self.seq_len + 1];
            inputs.extend(window[..self.seq_len].iter().map(|&t| u32::from(t)));
            targets.extend(window[1..].iter().map(|&t| u32::from(t)));
        }
        (inputs, targets)
    }

    /// Passes over the next `batches` batches: the same draws
    /// [`BatchSampler::next_batch`] would make, without building them.
    pub fn skip(&mut self, batches: usize) {
        let starts = (self.tokens.len() - self.seq_len) as u64;
        for _ in 0..batches * self.batch_size {
            self.rng.below(starts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_shifted_windows_and_seeded() {
        let tokens: Vec<u16> = (0..100).collect();
        let mut s = BatchSampler::new(&tokens, 3, 5, 42).expect("valid sampler");
        let (x, y) = s.next_batch();
        assert_eq!(x.len(), 15);
        for row in 0..3 {
            for i in 0..5 {
                assert_eq!(y[row * 5 + i], x[row * 5 + i] + 1);
            }
        }
        let mut again = BatchSampler::new(&tokens, 3, 5, 42).expect("valid sampler");
        assert_eq!(again.next_batch(), (x, y));
    }

    #[test]
    fn skipping_batches_draws_what_taking_them_would() {
        let tokens: Vec<u16> = (0..1000).collect();
        let mut taken = BatchSampler::new(&tokens, 4, 8, 9).expect("valid sampler");
        for _ in 0..3 {
            taken.next_batch();
        }
        let mut skipped = BatchSampler::new(&tokens, 4, 8, 9).expect("valid sampler");
        skipped.skip(3);
        assert_eq!(skipped.next_batch(), taken.next_batch());
        let mut fresh = BatchSampler::new(&tokens, 4, 8, 9).expect("valid sampler");
        assert_ne!(fresh.next_batch(), taken.next_batch());
    }

    #[test]
    fn rejects_short_streams_and_foreign_tokens() {
        let tokens = [1u16, 2, 3];
        assert!(matches!(
            BatchSampler::new(&tokens, 1, 3, 0),
            Err(SampleError::TooFewTokens { .. })
        ));
        assert!(BatchSampler::new(&tokens, 1, 2, 0).is_ok());
        assert_eq!(
            check_vocab(&[1, 300, 2], 256),
            Err(SampleError::OutOfVocabulary {
                token: 300,
                position: 1,
                vocab_size: 256
            })
        );
    }
}
