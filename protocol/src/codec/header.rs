//! The fixed 24-byte header every update payload starts with: magic, codec
//! version, format and its parameters, and the param count. Parsing it checks
//! everything a decoder relies on, including that the payload is exactly as
//! long as the header implies, before any buffer is sized from it.

use super::config::check_params;
use super::{CodecConfig, CodecError};

/// Size of the header in bytes.
pub const HEADER_LEN: usize = 24;
/// First four bytes of every payload ("barnraise update payload").
pub const MAGIC: [u8; 4] = *b"BRUP";
/// The codec version this build writes and reads. Version 2 sends dense
/// top-k selections as a mask (see `topk`); version 1 always sent indices.
pub const CODEC_VERSION: u8 = 2;

const TAG_FP32: u8 = 0;
const TAG_INT8: u8 = 1;
const TAG_TOPK: u8 = 2;

/// What a payload says about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub config: CodecConfig,
    pub params: u64,
}

/// Writes the header; `out` is expected to be empty.
pub(crate) fn write_header(out: &mut Vec<u8>, config: CodecConfig, params: u64) {
    let (tag, bits, first, second) = match config {
        CodecConfig::Fp32 => (TAG_FP32, 0, 0, 0),
        CodecConfig::Int8 { block } => (TAG_INT8, 0, block, 0),
        CodecConfig::TopK { chunk, k, bits } => (TAG_TOPK, bits, chunk, k),
    };
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[CODEC_VERSION, tag, bits, 0]);
    out.extend_from_slice(&params.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&second.to_le_bytes());
}

/// Parses and checks the header, the param limit and the exact payload length.
pub(crate) fn read_header(payload: &[u8], max_params: u64) -> Result<Header, CodecError> {
    let Some(bytes) = payload.first_chunk::<HEADER_LEN>() else {
        return Err(CodecError::TruncatedHeader {
            needed: HEADER_LEN,
            got: payload.len(),
        });
    };
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(CodecError::BadMagic { found: magic });
    }
    let [version, tag, bits, reserved] = [bytes[4], bytes[5], bytes[6], bytes[7]];
    if version != CODEC_VERSION {
        return Err(CodecError::UnsupportedVersion {
            found: version,
            supported: CODEC_VERSION,
        });
    }
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut params = [0u8; 8];
    params.copy_from_slice(&bytes[8..16]);
    let params = u64::from_le_bytes(params);
    let (first, second) = (u32_at(16), u32_at(20));

    // Unused fields must be zero so that each update has exactly one encoding.
    let zero = |field: &'static str, value: u64| {
        if value == 0 {
            Ok(())
        } else {
            Err(CodecError::NonZeroField { field, value })
        }
    };
    zero("reserved", u64::from(reserved))?;
    let config = match tag {
        TAG_FP32 => {
            zero("bits", u64::from(bits))?;
            zero("block/chunk", u64::from(first))?;
            zero("k", u64::from(second))?;
            CodecConfig::Fp32
        }
        TAG_INT8 => {
            zero("bits", u64::from(bits))?;
            zero("k", u64::from(second))?;
            CodecConfig::Int8 { block: first }
        }
        TAG_TOPK => CodecConfig::TopK {
            chunk: first,
            k: second,
            bits,
        },
        other => return Err(CodecError::UnknownFormat(other)),
    };
    config.validate()?;
    check_params(params, max_params)?;
    let expected = config
        .encoded_len_u64(params)
        .ok_or(CodecError::TooManyParams {
            params,
            limit: max_params,
        })?;
    if payload.len() as u64 != expected {
        return Err(CodecError::LengthMismatch {
            expected,
            got: payload.len(),
        });
    }
    Ok(Header {
        version,
        config,
        params,
    })
}
