//! The sending side of the codec: an [`Encoder`] per worker, which owns the
//! error-feedback residual (for top-k) and reusable scratch buffers.

use super::config::check_params;
use super::header::write_header;
use super::{CodecConfig, CodecError, first_non_finite, fp32, int8, topk};

/// Encodes one worker's pseudo-gradient each round. For top-k it keeps what
/// was not sent as a residual that is added (times `decay`) to the next
/// round's input; fp32 and int8 keep no residual.
pub struct Encoder {
    config: CodecConfig,
    params: usize,
    decay: f32,
    residual: Vec<f32>,
    scratch: topk::Scratch,
}

impl Encoder {
    /// An encoder for updates of exactly `params` values, with a zero residual.
    pub fn new(config: CodecConfig, params: usize) -> Result<Self, CodecError> {
        config.validate()?;
        check_params(params as u64, super::MAX_UPDATE_PARAMS as u64)?;
        let residual = if config.has_error_feedback() {
            vec![0.0; params]
        } else {
            Vec::new()
        };
        Ok(Encoder {
            config,
            params,
            decay: 1.0,
            residual,
            scratch: topk::Scratch::default(),
        })
    }

    /// An encoder that resumes with a residual saved by [`Encoder::residual`]
    /// (empty for codecs without error feedback).
    pub fn from_residual(
        config: CodecConfig,
        params: usize,
        residual: &[f32],
    ) -> Result<Self, CodecError> {
        let mut encoder = Encoder::new(config, params)?;
        encoder.set_residual(residual)?;
        Ok(encoder)
    }

    /// Multiplies the residual by `decay` (in [0, 1]; 1 is plain error
    /// feedback, 0 none) before adding it to the next input. Checked on encode.
    pub fn with_decay(mut self, decay: f32) -> Self {
        self.decay = decay;
        self
    }

    pub fn config(&self) -> CodecConfig {
        self.config
    }

    pub fn params(&self) -> usize {
        self.params
    }

    /// What has not been sent yet; empty for codecs without error feedback.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Replaces the residual, e.g. with one persisted across a restart.
    pub fn set_residual(&mut self, residual: &[f32]) -> Result<(), CodecError> {
        if residual.len() != self.residual.len() {
            return Err(CodecError::ResidualLength {
                expected: self.residual.len(),
                got: residual.len(),
            });
        }
        if let Some(index) = first_non_finite(residual, f32::to_bits) {
            return Err(CodecError::NonFiniteResidual { index });
        }
        self.residual.copy_from_slice(residual);
        Ok(())
    }

    /// Encodes one round's pseudo-gradient into a new payload of exactly
    /// `config.encoded_len(params)` bytes.
    pub fn encode(&mut self, delta: &[f32]) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(self.config.encoded_len(self.params));
        self.encode_into(delta, &mut out)?;
        Ok(out)
    }

    /// Like [`Encoder::encode`] but reuses `out`'s allocation. On error the
    /// residual is unchanged and `out`'s contents are unspecified.
    pub fn encode_into(&mut self, delta: &[f32], out: &mut Vec<u8>) -> Result<(), CodecError> {
        if delta.len() != self.params {
            return Err(CodecError::BufferLength {
                expected: self.params,
                got: delta.len(),
            });
        }
        out.clear();
        write_header(out, self.config, self.params as u64);
        match self.config {
            CodecConfig::Fp32 => fp32::encode(delta, out),
            CodecConfig::Int8 { block } => int8::encode(delta, block, out),
            CodecConfig::TopK { chunk, k, bits } => {
                if !(0.0..=1.0).contains(&self.decay) {
                    return Err(CodecError::BadDecay(self.decay));
                }
                let settings = topk::Settings {
                    chunk,
                    k,
                    bits,
                    decay: self.decay,
                };
                topk::encode(delta, &mut self.residual, &settings, &mut self.scratch, out)
            }
        }
    }
}
