//! Why encoding or decoding an update failed, in words a node operator can act on.

/// Everything that can go wrong turning a pseudo-gradient into an update payload
/// or back. Decoding never panics: every malformed byte string maps to one of these.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CodecError {
    #[error("update payload is truncated: the header needs {needed} bytes, got {got}")]
    TruncatedHeader { needed: usize, got: usize },
    #[error("not an update payload: bad magic bytes {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("update payload has codec version {found}, this build reads version {supported}")]
    UnsupportedVersion { found: u8, supported: u8 },
    #[error("update payload names unknown format tag {0}")]
    UnknownFormat(u8),
    #[error("update header field `{field}` must be zero for this format, found {value}")]
    NonZeroField { field: &'static str, value: u64 },
    #[error("invalid codec config: {0}")]
    InvalidConfig(String),
    #[error(
        "cannot parse codec `{input}`: {reason} (expected fp32, int8[:BLOCK] or topk[:CHUNK:K:BITS])"
    )]
    Parse { input: String, reason: String },
    #[error("update has {params} params, more than the limit of {limit}")]
    TooManyParams { params: u64, limit: u64 },
    #[error("update payload is {got} bytes, but its header implies exactly {expected}")]
    LengthMismatch { expected: u64, got: usize },
    #[error("buffer holds {got} params, but the update has {expected}")]
    BufferLength { expected: usize, got: usize },
    #[error("pseudo-gradient value at index {index} is not finite ({value})")]
    NonFiniteInput { index: usize, value: f32 },
    #[error("decoded value at index {index} is not finite")]
    NonFiniteValue { index: usize },
    #[error("scale of block {block} is not a finite non-negative number ({value})")]
    BadScale { block: usize, value: f32 },
    #[error("chunk {chunk}: magnitude range [{lo}, {hi}] is not finite, non-negative and ordered")]
    BadRange { chunk: usize, lo: f32, hi: f32 },
    #[error("chunk {chunk}: index {index} is outside the chunk of {len} values")]
    IndexOutOfRange {
        chunk: usize,
        index: u32,
        len: usize,
    },
    #[error("chunk {chunk}: indices are not strictly increasing ({previous} then {index})")]
    IndicesNotIncreasing {
        chunk: usize,
        previous: u32,
        index: u32,
    },
    #[error("chunk {chunk}: the kept-value mask has {got} bits set, the format keeps {expected}")]
    MaskCount {
        chunk: usize,
        expected: usize,
        got: usize,
    },
    #[error("update payload has non-zero padding bits at the end of its {stream} stream")]
    NonZeroPadding { stream: &'static str },
    #[error("aggregation weight {0} is not finite")]
    BadWeight(f32),
    #[error("error-feedback decay {0} is not in [0, 1]")]
    BadDecay(f32),
    #[error("error-feedback residual has {got} values, expected {expected}")]
    ResidualLength { expected: usize, got: usize },
    #[error("error-feedback residual value at index {index} is not finite")]
    NonFiniteResidual { index: usize },
}
