//! `barnraise bench codec`: each codec's encode and decode-add timed side by
//! side with a plain read pass over the same buffer, which is the memory
//! bandwidth floor these loops are measured against. Single-threaded, best of
//! several repeats after a warm-up; the report is a table or JSON.

use super::{CodecConfig, CodecError, Encoder, decode_add};
use std::fmt;
use std::hint::black_box;
use std::time::Instant;

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub params: usize,
    /// Timed repeats per measurement, after one untimed warm-up.
    pub repeats: usize,
    pub codecs: Vec<CodecConfig>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            params: 50_000_000,
            repeats: 5,
            codecs: vec![
                CodecConfig::Fp32,
                CodecConfig::int8_default(),
                CodecConfig::topk_default(),
            ],
        }
    }
}

/// One timed operation over all params.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Measurement {
    pub best_seconds: f64,
    pub median_seconds: f64,
    /// Params per second at the best time, in billions.
    pub gparams_per_second: f64,
    /// Best time divided by the read pass's best time.
    pub vs_read_pass: f64,
}

/// One codec's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CodecReport {
    pub codec: String,
    pub payload_bytes: usize,
    /// Payload bits per param, header and all metadata included.
    pub bits_per_param: f64,
    /// fp32 bytes divided by payload bytes.
    pub compression_ratio: f64,
    pub encode: Measurement,
    pub decode_add: Measurement,
}

/// Everything one run measured.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    pub params: usize,
    pub repeats: usize,
    pub read_pass: Measurement,
    pub codecs: Vec<CodecReport>,
}

/// Runs the benchmark; errors only if a codec or the size is invalid.
pub fn run(config: &BenchConfig) -> Result<BenchReport, CodecError> {
    let params = config.params;
    let repeats = config.repeats.max(1);
    let delta = synthetic_update(42, params);
    let read_times = time(repeats, || {
        black_box(read_pass(black_box(&delta)));
    });
    let read_best = best(&read_times);
    let measurement = |times: &[f64]| summarize(times, params, read_best);

    let mut codecs = Vec::new();
    for &codec in &config.codecs {
        let mut encoder = Encoder::new(codec, params)?;
        let mut payload = Vec::with_capacity(codec.encoded_len(params));
        let mut failure = None;
        // The encoder is reused across repeats, as across rounds: its residual
        // is non-zero after the warm-up, the steady state of a real run.
        let encode_times = time(repeats, || {
            if let Err(error) = encoder.encode_into(black_box(&delta), &mut payload) {
                failure = Some(error);
            }
        });
        let mut acc = vec![0.0f32; params];
        let decode_times = time(repeats, || {
            if let Err(error) = decode_add(black_box(&payload), 0.5, &mut acc) {
                failure = Some(error);
            }
        });
        if let Some(error) = failure {
            return Err(error);
        }
        black_box(&acc);
        codecs.push(CodecReport {
            codec: codec.to_string(),
            payload_bytes: payload.len(),
            bits_per_param: codec.bits_per_param(params),
            compression_ratio: (params * 4) as f64 / payload.len() as f64,
            encode: measurement(&encode_times),
            decode_add: measurement(&decode_times),
        });
    }
    Ok(BenchReport {
        params,
        repeats,
        read_pass: measurement(&read_times),
        codecs,
    })
}

/// Sums the buffer in 16 independent lanes so the loop vectorizes and runs at
/// memory speed, as the codec loops should.
fn read_pass(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (blocks, rest) = values.as_chunks::<16>();
    for block in blocks {
        for (lane, value) in lanes.iter_mut().zip(block) {
            *lane += value;
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

fn time(repeats: usize, mut operation: impl FnMut()) -> Vec<f64> {
    operation();
    (0..repeats)
        .map(|_| {
            let start = Instant::now();
            operation();
            start.elapsed().as_secs_f64()
        })
        .collect()
}

fn best(times: &[f64]) -> f64 {
    times.iter().copied().fold(f64::INFINITY, f64::min)
}

fn summarize(times: &[f64], params: usize, read_best: f64) -> Measurement {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let best_seconds = best(times);
    Measurement {
        best_seconds,
        median_seconds: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        gparams_per_second: params as f64 / best_seconds / 1e9,
        vs_read_pass: best_seconds / read_best,
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "codec benchmark: {} params, single thread, best of {} after a warm-up",
            self.params, self.repeats
        )?;
        let read = &self.read_pass;
        writeln!(
            f,
            "read pass (memory-bandwidth baseline): {:.2} ms, {:.2} Gparam/s",
            read.best_seconds * 1e3,
            read.gparams_per_second
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<16} {:>10} {:>8} {:>12} {:>8} {:>12} {:>8}",
            "codec", "bits/param", "ratio", "encode Gp/s", "x read", "dec-add Gp/s", "x read"
        )?;
        for codec in &self.codecs {
            writeln!(
                f,
                "{:<16} {:>10.4} {:>7.1}x {:>12.3} {:>7.2}x {:>12.3} {:>7.2}x",
                codec.codec,
                codec.bits_per_param,
                codec.compression_ratio,
                codec.encode.gparams_per_second,
                codec.encode.vs_read_pass,
                codec.decode_add.gparams_per_second,
                codec.decode_add.vs_read_pass
            )?;
        }
        Ok(())
    }
}

/// A deterministic pseudo-gradient: roughly Gaussian values with unit spread.
pub(crate) fn synthetic_update(seed: u64, params: usize) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // splitmix64: cheap, and the same sequence on every machine.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (0..params)
        .map(|_| {
            let bits = next();
            // Sum of four 16-bit uniforms: bell-shaped, mean 0, variance 1.
            let sum: u64 = (0..4).map(|i| (bits >> (16 * i)) & 0xFFFF).sum();
            ((sum as f32 / 65536.0) - 2.0) * 1.732
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_reports_every_codec() -> Result<(), CodecError> {
        let config = BenchConfig {
            params: 10_000,
            repeats: 1,
            ..BenchConfig::default()
        };
        let report = run(&config)?;
        assert_eq!(report.codecs.len(), 3);
        let topk = &report.codecs[2];
        assert_eq!(
            topk.payload_bytes,
            CodecConfig::topk_default().encoded_len(10_000)
        );
        assert!(report.to_string().contains("topk:4096:64:2"));
        let json =
            serde_json::to_value(&report).map_err(|e| CodecError::InvalidConfig(e.to_string()))?;
        assert_eq!(json["codecs"][2]["codec"], "topk:4096:64:2");
        assert!(
            json["read_pass"]["gparams_per_second"]
                .as_f64()
                .is_some_and(|g| g > 0.0)
        );
        Ok(())
    }
}
