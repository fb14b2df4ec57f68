//! Codec tests: round trips within each format's stated bound, the
//! error-feedback identity, hostile payloads, and a fuzz-style property test.

use super::bench::synthetic_update;
use super::bitpack::BitWriter;
use super::*;
use proptest::prelude::*;

fn encode_once(config: CodecConfig, delta: &[f32]) -> Vec<u8> {
    match Encoder::new(config, delta.len()).and_then(|mut e| e.encode(delta)) {
        Ok(payload) => payload,
        Err(error) => panic!("encoding {config} failed: {error}"),
    }
}

fn decoded(payload: &[u8]) -> Vec<f32> {
    match decode(payload, MAX_UPDATE_PARAMS) {
        Ok(values) => values,
        Err(error) => panic!("decoding failed: {error}"),
    }
}

// ---- configuration ----

#[test]
fn config_text_round_trips() {
    for text in [
        "fp32",
        "int8:256",
        "int8:1",
        "topk:4096:64:2",
        "topk:16:16:8",
        "topk:1:1:4",
    ] {
        let config: CodecConfig = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(config.to_string(), text);
    }
    assert_eq!(
        "int8".parse::<CodecConfig>(),
        Ok(CodecConfig::int8_default())
    );
    assert_eq!(
        "topk".parse::<CodecConfig>(),
        Ok(CodecConfig::topk_default())
    );
}

#[test]
fn bad_config_text_is_refused() {
    for text in [
        "",
        "fp16",
        "int8:0",
        "int8:x",
        "topk:4096:64",
        "topk:64:65:2",
        "topk:64:0:2",
        "topk:64:8:3",
        "topk:0:0:2",
        "topk:4096:64:2:1",
        "int8:2097152",
    ] {
        assert!(text.parse::<CodecConfig>().is_err(), "{text} was accepted");
    }
}

// ---- round trips ----

#[test]
fn fp32_is_lossless() {
    let delta = synthetic_update(1, 1000);
    let payload = encode_once(CodecConfig::Fp32, &delta);
    assert_eq!(payload.len(), CodecConfig::Fp32.encoded_len(delta.len()));
    let back = decoded(&payload);
    assert!(
        back.iter()
            .zip(&delta)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

/// Stated bound: |x - decoded| <= scale/2 (plus float rounding), scale = max|x in block| / 127.
fn assert_int8_within_bound(delta: &[f32], block: usize) {
    let config = CodecConfig::Int8 {
        block: block as u32,
    };
    let payload = encode_once(config, delta);
    assert_eq!(payload.len(), config.encoded_len(delta.len()));
    let back = decoded(&payload);
    for (inputs, outputs) in delta.chunks(block).zip(back.chunks(block)) {
        let scale = inputs.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
        for (x, y) in inputs.iter().zip(outputs) {
            let bound = scale * 0.5 * (1.0 + 1e-5) + f32::MIN_POSITIVE;
            assert!((x - y).abs() <= bound, "{x} decoded as {y}, bound {bound}");
        }
    }
}

#[test]
fn int8_round_trips_within_half_a_step() {
    assert_int8_within_bound(&synthetic_update(2, 10_000), 256);
    assert_int8_within_bound(&synthetic_update(3, 1001), 7);
    assert_int8_within_bound(&[0.0; 300], 256);
    let mut wide = synthetic_update(4, 512);
    wide[3] = 1e30;
    wide[300] = -1e-30;
    assert_int8_within_bound(&wide, 256);
}

/// The int8 body as docs/codec.md states it, one value at a time.
fn reference_int8_body(delta: &[f32], block: usize) -> Vec<u8> {
    let mut scales = Vec::new();
    let mut values = Vec::new();
    for inputs in delta.chunks(block) {
        let worst = inputs.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = (worst / 127.0).min(f32::MAX / 128.0);
        scales.extend_from_slice(&scale.to_le_bytes());
        for &x in inputs {
            let y = if scale == 0.0 {
                0.0
            } else if (1.0 / scale).is_finite() {
                x * (1.0 / scale)
            } else {
                x / scale
            };
            values.push(y.clamp(-127.0, 127.0).round_ties_even() as i8 as u8);
        }
    }
    scales.extend_from_slice(&values);
    scales
}

#[test]
fn int8_bytes_match_the_spec_at_every_magnitude() {
    // Blocks whose largest value runs from subnormal to near f32::MAX, so
    // the scale is subnormal, normal, or held at its cap.
    let base = synthetic_update(21, 64 * 300);
    let mut delta = Vec::new();
    for (block, values) in base.chunks(64).enumerate() {
        let exponent = (block as i32 % 276) - 150;
        let factor = 2f32.powi(exponent.clamp(-126, 127))
            * if exponent < -126 {
                2f32.powi(exponent + 126)
            } else {
                1.0
            };
        delta.extend(values.iter().map(|x| x * factor));
    }
    delta[5] = f32::MAX;
    delta[70] = -f32::MAX;
    for block in [64, 100, 7] {
        let config = CodecConfig::Int8 {
            block: block as u32,
        };
        let payload = encode_once(config, &delta);
        assert!(
            payload[HEADER_LEN..] == reference_int8_body(&delta, block)[..],
            "int8:{block} differs from the reference"
        );
    }
}

/// The indices a plain full sort picks: k largest |x|, lower index on ties.
fn reference_top(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
    let mut top: Vec<usize> = order.into_iter().take(k).collect();
    top.sort_unstable();
    top
}

/// A fresh encoder (zero residual) sends exactly the reference top-k per
/// chunk, with the right sign and within half a level step of the value.
fn assert_topk_round_trip(delta: &[f32], chunk: usize, k: usize, bits: u8) {
    let config = CodecConfig::TopK {
        chunk: chunk as u32,
        k: k as u32,
        bits,
    };
    let payload = encode_once(config, delta);
    assert_eq!(payload.len(), config.encoded_len(delta.len()));
    let back = decoded(&payload);
    let top_level = ((1u32 << (bits - 1)) - 1) as f32;
    for (inputs, outputs) in delta.chunks(chunk).zip(back.chunks(chunk)) {
        let top = reference_top(inputs, k);
        let kept: Vec<f32> = top.iter().map(|&i| inputs[i].abs()).collect();
        let lo = kept.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = kept.iter().copied().fold(0f32, f32::max);
        let bound = (hi - lo) / top_level * 0.5 * (1.0 + 1e-5) + hi * 1e-6;
        for (index, (x, y)) in inputs.iter().zip(outputs).enumerate() {
            if top.binary_search(&index).is_ok() {
                assert!(
                    (x - y).abs() <= bound,
                    "kept {x} decoded as {y}, bound {bound}"
                );
                assert!(
                    *x == 0.0 || x.signum() == y.signum(),
                    "sign of {x} lost: {y}"
                );
            } else {
                assert_eq!(
                    *y, 0.0,
                    "index {index} was not among the top {k} but decoded to {y}"
                );
            }
        }
    }
}

#[test]
fn topk_sends_the_exact_top_k_within_half_a_level() {
    for bits in [2, 4, 8] {
        assert_topk_round_trip(&synthetic_update(5, 3 * 4096 + 100), 4096, 64, bits);
    }
    assert_topk_round_trip(&synthetic_update(6, 1000), 64, 64, 8);
    assert_topk_round_trip(&synthetic_update(7, 1000), 100, 1, 2);
    assert_topk_round_trip(&synthetic_update(8, 5), 1, 1, 4);
}

#[test]
fn topk_breaks_ties_towards_the_lower_index() {
    let mut delta = vec![0.5f32; 64];
    delta[40] = -0.5;
    let back = decoded(&encode_once(
        CodecConfig::TopK {
            chunk: 64,
            k: 4,
            bits: 2,
        },
        &delta,
    ));
    let sent: Vec<usize> = (0..64).filter(|&i| back[i] != 0.0).collect();
    assert_eq!(sent, [0, 1, 2, 3]);
    // Values spread over many octaves, including ties and zeros, still pick the reference set.
    let spread: Vec<f32> = (0..4096)
        .map(|i| ((i * 7919) % 97) as f32 * 2f32.powi((i % 40) - 20))
        .collect();
    assert_topk_round_trip(&spread, 4096, 64, 4);
    assert_topk_round_trip(&vec![0.0; 300], 128, 5, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn encoded_len_is_exact(
        params in 0usize..3000,
        seed in any::<u64>(),
        chunk in 1u32..600,
        k_fraction in 0.0f64..1.0,
        bits in prop::sample::select(vec![2u8, 4, 8]),
    ) {
        let k = 1 + ((chunk - 1) as f64 * k_fraction) as u32;
        let delta = synthetic_update(seed, params);
        for config in [CodecConfig::Fp32, CodecConfig::Int8 { block: chunk }, CodecConfig::TopK { chunk, k, bits }] {
            let payload = encode_once(config, &delta);
            prop_assert_eq!(payload.len(), config.encoded_len(params));
            prop_assert_eq!(peek_header(&payload).map(|h| (h.config, h.params)), Ok((config, params as u64)));
        }
    }
}

#[test]
fn encoding_is_deterministic() {
    let delta = synthetic_update(9, 20_000);
    for config in [
        CodecConfig::Fp32,
        CodecConfig::int8_default(),
        CodecConfig::topk_default(),
    ] {
        let mut first = Encoder::new(config, delta.len())
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut second = Encoder::new(config, delta.len())
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..3 {
            assert_eq!(first.encode(&delta), second.encode(&delta));
        }
    }
}

#[test]
fn header_layout_matches_the_spec() {
    let payload = encode_once(
        CodecConfig::TopK {
            chunk: 4096,
            k: 64,
            bits: 2,
        },
        &[1.0; 5000],
    );
    assert_eq!(&payload[0..4], b"BRUP");
    assert_eq!(&payload[4..8], &[CODEC_VERSION, 2, 2, 0]);
    assert_eq!(&payload[8..16], &5000u64.to_le_bytes());
    assert_eq!(&payload[16..20], &4096u32.to_le_bytes());
    assert_eq!(&payload[20..24], &64u32.to_le_bytes());
}

/// A hand-built top-k payload with chunk 8, k 4 (4 · 3 index bits > 8, so a
/// mask), 2 bits: one mask bit per value.
fn masked_topk_payload(params: u64, ranges: &[(f32, f32)], mask: &[u32], codes: &[u32]) -> Vec<u8> {
    hand_built_topk(params, (8, 4), ranges, (mask, 1), codes)
}

#[test]
fn dense_topk_sends_a_mask_and_decodes_it() {
    // 10 values: a full chunk of 8 (keeps 4) and a last chunk of 2 (keeps both).
    let mask = [0, 1, 1, 0, 0, 1, 0, 1, 1, 1];
    let codes = [0b01, 0b10, 0b00, 0b11, 0b01, 0b00];
    let payload = masked_topk_payload(10, &[(1.0, 3.0), (0.5, 0.5)], &mask, &codes);
    assert_eq!(
        payload.len(),
        CodecConfig::TopK {
            chunk: 8,
            k: 4,
            bits: 2
        }
        .encoded_len(10)
    );
    let mut expected = vec![0.0; 10];
    expected[1] = 3.0;
    expected[2] = -1.0;
    expected[5] = 1.0;
    expected[7] = -3.0;
    expected[8] = 0.5;
    expected[9] = 0.5;
    assert_eq!(decoded(&payload), expected);

    // A mask with a bit too many or too few is refused, naming the chunk.
    for (bad, chunk, got) in [
        ([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], 0, 5),
        ([0, 1, 1, 0, 0, 1, 0, 1, 1, 0], 1, 1),
    ] {
        let payload = masked_topk_payload(10, &[(1.0, 3.0), (0.5, 0.5)], &bad, &codes);
        let error = assert_rejected(&payload);
        assert!(
            matches!(error, CodecError::MaskCount { chunk: c, got: g, .. } if c == chunk && g == got),
            "{error:?}"
        );
    }

    // Where a mask is used it is the smaller encoding: a quarter of each
    // chunk at 4 bits is ~2 bits per param instead of ~4 with 12-bit indices,
    // and the sparse default keeps its index list.
    let quarter = CodecConfig::TopK {
        chunk: 4096,
        k: 1024,
        bits: 4,
    }
    .bits_per_param(1 << 20);
    assert!((2.0..2.02).contains(&quarter), "{quarter}");
    let sparse = CodecConfig::topk_default().bits_per_param(1 << 20);
    assert!((0.23..0.24).contains(&sparse), "{sparse}");
}

#[test]
fn default_topk_fits_the_size_target() {
    let bits = CodecConfig::topk_default().bits_per_param(50_000_000);
    assert!(bits <= 0.25, "{bits} bits per param");
}

// ---- error feedback ----

#[test]
fn error_feedback_loses_nothing_over_many_rounds() {
    // With decay d the residual after round r is D_r − S_r, where
    // D_r = d·D_{r−1} + Δ_r are the decayed inputs and S_r = d·S_{r−1} + sent_r
    // what was sent, decayed alike: nothing is lost but what d forgets.
    let params = 5000;
    let config = CodecConfig::TopK {
        chunk: 512,
        k: 8,
        bits: 2,
    };
    for decay in [1.0f32, 0.95, 0.5] {
        let mut encoder = Encoder::new(config, params)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_decay(decay);
        let d = f64::from(decay);
        let mut sent = vec![0f64; params];
        let mut inputs = vec![0f64; params];
        let mut scale = 0f64;
        for round in 0..40 {
            let delta = synthetic_update(100 + round, params);
            for (total, x) in inputs.iter_mut().zip(&delta) {
                *total = d * *total + f64::from(*x);
                scale = scale.max(total.abs());
            }
            let payload = encoder.encode(&delta).unwrap_or_else(|e| panic!("{e}"));
            for (total, y) in sent.iter_mut().zip(decoded(&payload)) {
                *total = d * *total + f64::from(y);
            }
        }
        for ((sent, residual), input) in sent.iter().zip(encoder.residual()).zip(&inputs) {
            let drift = (sent + f64::from(*residual) - input).abs();
            assert!(
                drift <= 1e-4 * scale,
                "decay {decay}: sent {sent} + residual {residual} != decayed inputs {input}"
            );
        }
    }
}

#[test]
fn decay_zero_forgets_and_restored_residual_continues_identically() {
    let params = 3000;
    let config = CodecConfig::TopK {
        chunk: 256,
        k: 4,
        bits: 4,
    };
    let delta = synthetic_update(11, params);
    let mut forgetful = Encoder::new(config, params)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_decay(0.0);
    let first = forgetful.encode(&delta);
    assert_eq!(
        forgetful.encode(&delta),
        first,
        "decay 0 must ignore the residual"
    );

    let mut running = Encoder::new(config, params)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_decay(0.9);
    let _ = running.encode(&delta);
    let saved = running.residual().to_vec();
    let mut restored = Encoder::from_residual(config, params, &saved)
        .unwrap_or_else(|e| panic!("{e}"))
        .with_decay(0.9);
    assert_eq!(running.encode(&delta), restored.encode(&delta));
    assert!(matches!(
        Encoder::from_residual(config, params, &saved[1..]),
        Err(CodecError::ResidualLength { .. })
    ));
    assert!(
        Encoder::new(config, params)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_decay(1.5)
            .encode(&delta)
            .is_err()
    );
}

#[test]
fn non_finite_input_is_refused_and_leaves_the_residual_alone() {
    let params = 1000;
    for config in [
        CodecConfig::Fp32,
        CodecConfig::int8_default(),
        CodecConfig::TopK {
            chunk: 128,
            k: 4,
            bits: 2,
        },
    ] {
        let mut encoder = Encoder::new(config, params).unwrap_or_else(|e| panic!("{e}"));
        let _ = encoder.encode(&synthetic_update(12, params));
        let before = encoder.residual().to_vec();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut delta = synthetic_update(13, params);
            delta[777] = bad;
            let error = encoder.encode(&delta);
            assert!(
                matches!(error, Err(CodecError::NonFiniteInput { index: 777, .. })),
                "{config}: {error:?}"
            );
            assert_eq!(encoder.residual(), &before[..]);
        }
        assert!(matches!(
            encoder.encode(&[0.0; 10]),
            Err(CodecError::BufferLength { .. })
        ));
    }
}

// ---- decode_add ----

#[test]
fn decode_add_adds_the_weighted_decoded_update() {
    let delta = synthetic_update(14, 9000);
    for config in [
        CodecConfig::Fp32,
        CodecConfig::int8_default(),
        CodecConfig::TopK {
            chunk: 1024,
            k: 32,
            bits: 4,
        },
    ] {
        let payload = encode_once(config, &delta);
        let values = decoded(&payload);
        let start = synthetic_update(15, delta.len());
        let mut acc = start.clone();
        assert!(decode_add(&payload, 0.3, &mut acc).is_ok());
        for ((a, s), v) in acc.iter().zip(&start).zip(&values) {
            assert_eq!(a.to_bits(), (s + 0.3 * v).to_bits());
        }
        let mut out = vec![7.0; delta.len()];
        assert!(decode_into(&payload, &mut out).is_ok());
        assert_eq!(out, values);
        assert!(matches!(
            decode_add(&payload, f32::NAN, &mut acc),
            Err(CodecError::BadWeight(_))
        ));
        assert!(matches!(
            decode_add(&payload, 1.0, &mut acc[1..]),
            Err(CodecError::BufferLength { .. })
        ));
    }
}

// ---- hostile payloads ----

/// Decoding must fail, and leave an accumulator exactly as it was.
fn assert_rejected(payload: &[u8]) -> CodecError {
    let params = peek_header(payload)
        .map(|h| h.params as usize)
        .unwrap_or(16)
        .min(1 << 16);
    let start = synthetic_update(16, params);
    let mut acc = start.clone();
    let error = match decode_add(payload, 1.0, &mut acc) {
        Ok(_) => panic!("hostile payload was accepted"),
        Err(error) => error,
    };
    assert!(
        acc.iter()
            .zip(&start)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "acc changed on {error}"
    );
    assert!(decode(payload, MAX_UPDATE_PARAMS).is_err());
    error
}

fn header(tag: u8, bits: u8, params: u64, first: u32, second: u32) -> Vec<u8> {
    let mut out = b"BRUP".to_vec();
    out.extend_from_slice(&[CODEC_VERSION, tag, bits, 0]);
    out.extend_from_slice(&params.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&second.to_le_bytes());
    out
}

/// A hand-built top-k payload (chunk 16, k 2, 2 bits) over `params` values.
fn topk_payload(params: u64, ranges: &[(f32, f32)], indices: &[u32], codes: &[u32]) -> Vec<u8> {
    hand_built_topk(params, (16, 2), ranges, (indices, 4), codes)
}

/// Header, ranges, a selection stream of fields of the given width (indices,
/// or single mask bits), and 2-bit value codes.
fn hand_built_topk(
    params: u64,
    (chunk, k): (u32, u32),
    ranges: &[(f32, f32)],
    (selection, width): (&[u32], u32),
    codes: &[u32],
) -> Vec<u8> {
    let mut out = header(2, 2, params, chunk, k);
    for (lo, hi) in ranges {
        out.extend_from_slice(&lo.to_le_bytes());
        out.extend_from_slice(&hi.to_le_bytes());
    }
    for (fields, width) in [(selection, width), (codes, 2)] {
        let mut stream = Vec::new();
        let mut writer = BitWriter::new(&mut stream);
        fields.iter().for_each(|&f| writer.push(f, width));
        writer.finish();
        out.extend_from_slice(&stream);
    }
    out
}

#[test]
fn hand_built_topk_payload_decodes() {
    let payload = topk_payload(
        20,
        &[(1.0, 2.0), (0.5, 0.5)],
        &[3, 9, 0, 2],
        &[0b01, 0b10, 0, 0],
    );
    let values = decoded(&payload);
    let mut expected = vec![0.0; 20];
    expected[3] = 2.0;
    expected[9] = -1.0;
    expected[16] = 0.5;
    expected[18] = 0.5;
    assert_eq!(values, expected);
}

#[test]
fn hostile_topk_payloads_are_rejected() {
    let ok = [(1.0, 2.0), (0.5, 0.5)];
    let cases = [
        (
            topk_payload(20, &ok, &[3, 9, 0, 4], &[0; 4]),
            "index 4 beyond the last chunk of 4",
        ),
        (topk_payload(20, &ok, &[9, 3, 0, 2], &[0; 4]), "unsorted"),
        (topk_payload(20, &ok, &[3, 3, 0, 2], &[0; 4]), "duplicate"),
        (
            topk_payload(20, &[(f32::NAN, 2.0), (0.5, 0.5)], &[3, 9, 0, 2], &[0; 4]),
            "NaN lo",
        ),
        (
            topk_payload(
                20,
                &[(1.0, f32::INFINITY), (0.5, 0.5)],
                &[3, 9, 0, 2],
                &[0; 4],
            ),
            "infinite hi",
        ),
        (
            topk_payload(20, &[(2.0, 1.0), (0.5, 0.5)], &[3, 9, 0, 2], &[0; 4]),
            "lo above hi",
        ),
        (
            topk_payload(20, &[(-1.0, 2.0), (0.5, 0.5)], &[3, 9, 0, 2], &[0; 4]),
            "negative lo",
        ),
    ];
    for (payload, what) in cases {
        let error = assert_rejected(&payload);
        assert!(!error.to_string().is_empty(), "{what}");
    }
    // Non-zero padding: 17 params keep 3 values, so both streams end in
    // padding bits (12 index bits in 2 bytes, 6 value bits in 1 byte).
    let mut padded = topk_payload(17, &ok, &[3, 9, 0], &[0; 3]);
    assert!(decode(&padded, MAX_UPDATE_PARAMS).is_ok());
    if let Some(last) = padded.last_mut() {
        *last |= 0x80;
    }
    assert!(matches!(
        assert_rejected(&padded),
        CodecError::NonZeroPadding { .. }
    ));
    let mut padded = topk_payload(17, &ok, &[3, 9, 0], &[0; 3]);
    padded[HEADER_LEN + 16 + 1] |= 0x80;
    assert!(matches!(
        assert_rejected(&padded),
        CodecError::NonZeroPadding { stream: "index" }
    ));
    // k larger than the chunk, and value bits that do not exist.
    let mut too_many = topk_payload(20, &ok, &[3, 9, 0, 2], &[0; 4]);
    too_many[20..24].copy_from_slice(&17u32.to_le_bytes());
    assert!(matches!(
        assert_rejected(&too_many),
        CodecError::InvalidConfig(_)
    ));
    let mut three_bits = topk_payload(20, &ok, &[3, 9, 0, 2], &[0; 4]);
    three_bits[6] = 3;
    assert!(matches!(
        assert_rejected(&three_bits),
        CodecError::InvalidConfig(_)
    ));
}

#[test]
fn hostile_headers_are_rejected() {
    let valid = encode_once(CodecConfig::int8_default(), &synthetic_update(17, 600));
    for cut in 0..valid.len() {
        assert_rejected(&valid[..cut]);
    }
    let mut longer = valid.clone();
    longer.push(0);
    assert!(matches!(
        assert_rejected(&longer),
        CodecError::LengthMismatch { .. }
    ));
    let edits: [(usize, u8, &str); 5] = [
        (0, b'X', "magic"),
        (4, CODEC_VERSION + 1, "version"),
        (5, 9, "format"),
        (6, 1, "bits on int8"),
        (7, 1, "reserved"),
    ];
    for (at, byte, what) in edits {
        let mut edited = valid.clone();
        edited[at] = byte;
        let error = assert_rejected(&edited);
        assert!(!error.to_string().is_empty(), "{what}");
    }
    // NaN, negative and oversized int8 scales.
    for scale in [f32::NAN, -1.0, -0.0, f32::MAX] {
        let mut edited = valid.clone();
        edited[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&scale.to_le_bytes());
        assert!(matches!(
            assert_rejected(&edited),
            CodecError::BadScale { .. }
        ));
    }
    // A NaN inside an fp32 payload.
    let mut fp32 = encode_once(CodecConfig::Fp32, &[1.0, 2.0, 3.0]);
    fp32[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(
        assert_rejected(&fp32),
        CodecError::NonFiniteValue { index: 1 }
    ));
}

#[test]
fn huge_param_claims_fail_before_allocating() {
    // Over the limit: refused from the header alone.
    for params in [MAX_UPDATE_PARAMS as u64 + 1, 1 << 40, u64::MAX] {
        let payload = header(0, 0, params, 0, 0);
        assert!(matches!(
            assert_rejected(&payload),
            CodecError::TooManyParams { .. }
        ));
    }
    // Within the limit but not backed by bytes: the length check, which runs
    // before `decode` sizes its output, refuses it. A 4 GB allocation would
    // not be reached, since the error variant proves the check came first.
    for (tag, bits, first, second) in [(0, 0, 0, 0), (1, 0, 256, 0), (2, 2, 4096, 64)] {
        let mut payload = header(tag, bits, 1_000_000_000, first, second);
        payload.extend_from_slice(&[0; 20]);
        assert!(matches!(
            decode(&payload, MAX_UPDATE_PARAMS),
            Err(CodecError::LengthMismatch { .. })
        ));
    }
    // The caller's own limit is applied too.
    let payload = encode_once(CodecConfig::Fp32, &[1.0; 100]);
    assert!(matches!(
        decode(&payload, 99),
        Err(CodecError::TooManyParams { .. })
    ));
    assert!(decode(&payload, 100).is_ok());
    assert!(matches!(
        Encoder::new(CodecConfig::Fp32, MAX_UPDATE_PARAMS + 1),
        Err(CodecError::TooManyParams { .. })
    ));
}

// ---- fuzzing ----

fn valid_payloads() -> Vec<Vec<u8>> {
    let delta = synthetic_update(18, 700);
    [
        CodecConfig::Fp32,
        CodecConfig::Int8 { block: 64 },
        CodecConfig::TopK {
            chunk: 128,
            k: 6,
            bits: 2,
        },
        CodecConfig::TopK {
            chunk: 100,
            k: 9,
            bits: 8,
        },
        CodecConfig::TopK {
            chunk: 64,
            k: 30,
            bits: 4,
        },
    ]
    .into_iter()
    .map(|config| encode_once(config, &delta))
    .collect()
}

/// Any byte string decodes to finite values or to an error that leaves the
/// accumulator unchanged; it never panics.
fn check_total(payload: &[u8]) -> Result<(), TestCaseError> {
    let params = peek_header(payload)
        .map(|h| h.params as usize)
        .unwrap_or(700)
        .min(1 << 16);
    let start = synthetic_update(19, params);
    let mut acc = start.clone();
    match decode_add(payload, 0.5, &mut acc) {
        Ok(_) => {
            let values = decode(payload, MAX_UPDATE_PARAMS)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(values.iter().all(|v| v.is_finite()));
        }
        Err(_) => prop_assert!(
            acc.iter()
                .zip(&start)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), tag in 0u8..4) {
        let mut payload = bytes;
        if payload.len() >= 8 && tag < 3 {
            // Give most cases a plausible header so the body checks are reached.
            payload[..8].copy_from_slice(&[b'B', b'R', b'U', b'P', CODEC_VERSION, tag, 0, 0]);
        }
        check_total(&payload)?;
    }

    #[test]
    fn mutated_payloads_never_panic(
        which in 0usize..5,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut payload = valid_payloads().swap_remove(which);
        for (at, byte) in flips {
            let at = at.index(payload.len());
            payload[at] ^= byte.max(1);
        }
        if let Some(cut) = cut {
            payload.truncate(cut.index(payload.len()));
        }
        check_total(&payload)?;
    }
}

// ---- top-k bytes pinned to a plain reference ----

/// A straightforward top-k encoder: a full sort per chunk picks the kept set,
/// then the same quantization as the format spec. Returns the body and leaves
/// the new residual in `residual`.
fn reference_topk_body(
    delta: &[f32],
    residual: &mut [f32],
    decay: f32,
    chunk: usize,
    k: usize,
    bits: u8,
) -> Vec<u8> {
    let value_bits = u32::from(bits);
    let index_bits = 64 - ((chunk.max(1) - 1) as u64).leading_zeros();
    // The spec's rule: a one-bit-per-value mask when an index list of a full
    // chunk would be longer.
    let mask = k.min(chunk) * index_bits as usize > chunk;
    let top = (1i32 << (value_bits - 1)) - 1;
    let mut ranges = Vec::new();
    let mut index_stream = Vec::new();
    let mut value_stream = Vec::new();
    let mut indices = BitWriter::new(&mut index_stream);
    let mut values = BitWriter::new(&mut value_stream);
    for (delta, residual) in delta.chunks(chunk).zip(residual.chunks_mut(chunk)) {
        for (carried, &input) in residual.iter_mut().zip(delta) {
            *carried = (input + decay * *carried).clamp(-f32::MAX, f32::MAX);
        }
        let kept = reference_top(residual, k.min(delta.len()));
        let hi = residual.iter().fold(0f32, |m, x| m.max(x.abs()));
        let lo = kept.iter().map(|&i| residual[i].abs()).fold(hi, f32::min);
        let step = (hi - lo) / top as f32;
        let inverse = top as f32 / (hi - lo);
        for &index in &kept {
            let value = residual[index];
            let level = if step == 0.0 {
                0
            } else {
                let y = if inverse.is_finite() {
                    (value.abs() - lo) * inverse
                } else {
                    (value.abs() - lo) / step
                };
                round_small(y).clamp(0, top) as u32
            };
            let magnitude = (lo + level as f32 * step).min(hi);
            let sent = if value.is_sign_negative() {
                -magnitude
            } else {
                magnitude
            };
            residual[index] = value - sent;
            if !mask {
                indices.push(index as u32, index_bits);
            }
            values.push(
                (u32::from(value.is_sign_negative()) << (value_bits - 1)) | level,
                value_bits,
            );
        }
        if mask {
            for i in 0..delta.len() {
                indices.push(u32::from(kept.binary_search(&i).is_ok()), 1);
            }
        }
        ranges.extend_from_slice(&lo.to_le_bytes());
        ranges.extend_from_slice(&hi.to_le_bytes());
    }
    indices.finish();
    values.finish();
    ranges.extend_from_slice(&index_stream);
    ranges.extend_from_slice(&value_stream);
    ranges
}

/// Inputs that stress the selection: ties, zeros, a chunk of equal values,
/// many octaves, subnormals, huge values that overflow when summed.
fn awkward_update(seed: u64, params: usize, chunk: usize) -> Vec<f32> {
    let mut delta = synthetic_update(seed, params);
    for (i, x) in delta.iter_mut().enumerate() {
        match (i / chunk + seed as usize) % 7 {
            // Few distinct values: many ties.
            0 => *x = (*x * 2.0).round() * 0.25,
            // Mostly zeros with a few values.
            1 => *x = if i % 37 == 0 { *x } else { 0.0 },
            // A chunk of one value, signs mixed.
            2 => *x = if i % 3 == 0 { -0.75 } else { 0.75 },
            // Many octaves, down to subnormals.
            3 => *x *= 2f32.powi((i % 60) as i32 - 140 + (i % 7) as i32 * 20),
            // Near the top of the range: sums with the residual overflow.
            4 => *x *= f32::MAX / 4.0,
            // Large only where the sampled threshold estimate looks, so it
            // overestimates and selection must fall back.
            5 => *x *= if i % 8 == 0 { 1e3 } else { 1e-3 },
            _ => {}
        }
    }
    delta
}

#[test]
fn topk_bytes_and_residual_match_a_full_sort_reference_over_rounds() {
    let cases: [(usize, usize, usize, u8, f32); 15] = [
        (3 * 4096 + 1000, 4096, 64, 2, 1.0),
        (2 * 4096 + 900, 4096, 256, 4, 1.0),
        (3000, 1024, 16, 2, 1.0),
        (2 * 4096 + 70, 4096, 600, 2, 1.0),
        (4096 + 3 * 64 + 5, 4096, 1, 8, 0.9),
        (2 * 4096 + 17, 4096, 64, 8, 0.9),
        (5000, 512, 8, 4, 1.0),
        (1000, 100, 7, 2, 0.5),
        (777, 64, 64, 2, 1.0),
        (300, 128, 128, 4, 1.0),
        (50, 1, 1, 4, 1.0),
        (1001, 300, 1, 2, 0.0),
        // Masks: a half and a quarter of each chunk, and k = chunk.
        (2 * 4096 + 333, 4096, 2048, 4, 1.0),
        (3 * 1024 + 31, 1024, 256, 2, 0.9),
        (100, 33, 33, 8, 1.0),
    ];
    for (case, &(params, chunk, k, bits, decay)) in cases.iter().enumerate() {
        let config = CodecConfig::TopK {
            chunk: chunk as u32,
            k: k as u32,
            bits,
        };
        let mut encoder = Encoder::new(config, params)
            .unwrap_or_else(|e| panic!("{e}"))
            .with_decay(decay);
        let mut residual = vec![0f32; params];
        for round in 0..6u64 {
            let seed = case as u64 * 100 + round;
            let delta = if round % 2 == 0 {
                awkward_update(seed, params, chunk)
            } else {
                synthetic_update(seed, params)
            };
            let payload = encoder.encode(&delta).unwrap_or_else(|e| panic!("{e}"));
            let body = reference_topk_body(&delta, &mut residual, decay, chunk, k, bits);
            assert!(
                payload[HEADER_LEN..] == body[..],
                "case {case} round {round}: body differs from the reference"
            );
            let same = encoder
                .residual()
                .iter()
                .zip(&residual)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "case {case} round {round}: residual differs");
        }
    }
}

#[test]
fn payload_readers_refuse_what_decode_refuses() {
    let delta: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin()).collect();
    let topk_config = CodecConfig::TopK {
        chunk: 64,
        k: 8,
        bits: 2,
    };
    let int8_config = CodecConfig::Int8 { block: 64 };
    // fp32 with a NaN written in.
    let mut fp32 = encode_once(CodecConfig::Fp32, &delta);
    let at = HEADER_LEN + 4 * 7;
    fp32[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    // int8 whose first scale is negative.
    let mut int8 = encode_once(int8_config, &delta);
    int8[HEADER_LEN + 3] |= 0x80;
    // top-k whose first chunk's range is upside down (ranges come first).
    let mut topk = encode_once(topk_config, &delta);
    topk[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    for bad in [&fp32, &int8, &topk] {
        assert!(decode(bad, 300).is_err());
        assert!(visit_kept(bad, 300, |_, _| {}).is_err());
        assert!(values(bad, 300).is_err());
    }
    // Good payloads read as decode reads them.
    for config in [CodecConfig::Fp32, int8_config, topk_config] {
        let payload = encode_once(config, &delta);
        let expected = decoded(&payload);
        let mut kept = vec![0.0f32; 300];
        let sparse = visit_kept(&payload, 300, |i, v| kept[i] = v).unwrap();
        assert_eq!(sparse, config == topk_config);
        match values(&payload, 300).unwrap() {
            Some(view) => {
                assert!(!sparse);
                for (i, v) in expected.iter().enumerate() {
                    assert_eq!(view.get(i).to_bits(), v.to_bits());
                }
            }
            None => assert_eq!(
                kept.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            ),
        }
        // A wrong length is refused by both, as by decode_into.
        assert!(visit_kept(&payload, 299, |_, _| {}).is_err());
        assert!(values(&payload, 301).is_err());
    }
}
