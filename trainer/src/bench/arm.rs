//! One DiLoCo arm of `bench diloco`: a codec and what it changes from the
//! bench's base settings, written `CODEC[,key=value]...`:
//!
//! - `h=N` — inner steps per round; the arm runs `R·H / N` rounds, so every
//!   arm still trains on the same tokens (N must divide R·H);
//! - `olr=X`, `om=X` — outer learning rate and (Nesterov) momentum;
//! - `decay=X` — error-feedback decay in [0, 1] (top-k only; 1 is plain error
//!   feedback, SparseLoCo uses 0.95);
//! - `warm=K0:N` — density warm-up (top-k only): round 0 keeps `K0` of each
//!   chunk, falling geometrically to the codec's `k` by round N.
//!
//! For example `topk:4096:128:4,h=60,decay=0.95,warm=1024:4`.

use barnraise_protocol::codec::CodecConfig;
use std::fmt;
use std::str::FromStr;

/// Top-k density that starts at `k0` per chunk and falls geometrically to
/// the codec's `k` over the first `rounds` rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DensityWarmup {
    pub k0: u32,
    pub rounds: usize,
}

/// A compressed DiLoCo arm: unset fields take the bench's base settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArmSpec {
    pub codec: CodecConfig,
    /// H for this arm; its rounds are base R·H divided by this.
    pub inner_steps: Option<usize>,
    pub outer_lr: Option<f32>,
    pub outer_momentum: Option<f32>,
    /// Error-feedback decay (top-k); None is 1, plain error feedback.
    pub ef_decay: Option<f32>,
    pub warmup: Option<DensityWarmup>,
}

impl ArmSpec {
    /// The codec alone, with the bench's base settings.
    pub fn codec(codec: CodecConfig) -> Self {
        ArmSpec {
            codec,
            inner_steps: None,
            outer_lr: None,
            outer_momentum: None,
            ef_decay: None,
            warmup: None,
        }
    }

    /// The error-feedback decay the encoders use.
    pub fn decay(&self) -> f32 {
        self.ef_decay.unwrap_or(1.0)
    }

    /// The codec for round `round` (0-based): the warm-up's denser top-k
    /// early on, then the arm's codec.
    pub fn codec_at(&self, round: usize) -> CodecConfig {
        match (self.codec, self.warmup) {
            (CodecConfig::TopK { chunk, k, bits }, Some(w)) if round < w.rounds => {
                let t = round as f64 / w.rounds as f64;
                let k_round =
                    (f64::from(w.k0) * (f64::from(k) / f64::from(w.k0)).powf(t)).round() as u32;
                CodecConfig::TopK {
                    chunk,
                    k: k_round.clamp(k, w.k0),
                    bits,
                }
            }
            (codec, _) => codec,
        }
    }

    /// Checks what parsing cannot: values in range and keys that fit the codec.
    pub fn validate(&self) -> Result<(), String> {
        self.codec.validate().map_err(|e| e.to_string())?;
        let topk = matches!(self.codec, CodecConfig::TopK { .. });
        if self.inner_steps == Some(0) {
            return Err("h (inner steps) must be positive".to_string());
        }
        if let Some(lr) = self.outer_lr
            && !(lr.is_finite() && lr > 0.0)
        {
            return Err(format!("outer lr {lr} must be a positive number"));
        }
        if let Some(m) = self.outer_momentum
            && !(0.0..1.0).contains(&m)
        {
            return Err(format!("outer momentum {m} must be in [0, 1)"));
        }
        if let Some(decay) = self.ef_decay {
            if !topk {
                return Err(format!(
                    "decay applies to top-k (error feedback), not {}",
                    self.codec
                ));
            }
            if !(0.0..=1.0).contains(&decay) {
                return Err(format!("error-feedback decay {decay} must be in [0, 1]"));
            }
        }
        if let Some(w) = self.warmup {
            let CodecConfig::TopK { chunk, k, .. } = self.codec else {
                return Err(format!(
                    "warm (density warm-up) applies to top-k, not {}",
                    self.codec
                ));
            };
            if w.k0 > chunk {
                return Err(format!("warm-up density {}/{chunk} is above 1", w.k0));
            }
            if w.k0 < k {
                return Err(format!(
                    "warm-up k0 {} is below the codec's k {k}: a warm-up starts denser",
                    w.k0
                ));
            }
            if w.rounds == 0 {
                return Err("warm-up rounds must be positive".to_string());
            }
        }
        Ok(())
    }
}

impl fmt::Display for ArmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.codec)?;
        if let Some(h) = self.inner_steps {
            write!(f, ",h={h}")?;
        }
        if let Some(lr) = self.outer_lr {
            write!(f, ",olr={lr}")?;
        }
        if let Some(m) = self.outer_momentum {
            write!(f, ",om={m}")?;
        }
        if let Some(d) = self.ef_decay {
            write!(f, ",decay={d}")?;
        }
        if let Some(w) = self.warmup {
            write!(f, ",warm={}:{}", w.k0, w.rounds)?;
        }
        Ok(())
    }
}

impl serde::Serialize for ArmSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl FromStr for ArmSpec {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let wrap = |reason: String| format!("arm `{input}`: {reason}");
        let mut parts = input.trim().split(',');
        let codec_text = parts.next().unwrap_or_default().trim();
        // A density above 1 gets its own message before the codec's checks.
        if let ["topk", chunk, k, _] = codec_text.split(':').collect::<Vec<_>>().as_slice()
            && let (Ok(chunk), Ok(k)) = (chunk.parse::<u64>(), k.parse::<u64>())
            && k > chunk
        {
            return Err(wrap(format!("density {k}/{chunk} is above 1")));
        }
        let codec: CodecConfig = codec_text
            .parse()
            .map_err(|e| wrap(format!("unknown codec: {e}")))?;
        let mut spec = ArmSpec::codec(codec);
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| wrap(format!("`{part}` is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let number = |what: &str| {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| wrap(format!("{what} `{value}` is not a number")))
            };
            let whole = |what: &str, text: &str| {
                text.parse::<usize>()
                    .map_err(|_| wrap(format!("{what} `{text}` is not a whole number")))
            };
            match key {
                "h" => spec.inner_steps = Some(whole("h", value)?),
                "olr" => spec.outer_lr = Some(number("olr")?),
                "om" => spec.outer_momentum = Some(number("om")?),
                "decay" => spec.ef_decay = Some(number("decay")?),
                "warm" => {
                    let (k0, rounds) = value
                        .split_once(':')
                        .ok_or_else(|| wrap(format!("warm `{value}` is not K0:ROUNDS")))?;
                    let k0 = whole("warm k0", k0)?;
                    spec.warmup = Some(DensityWarmup {
                        k0: u32::try_from(k0)
                            .map_err(|_| wrap(format!("warm k0 {k0} too large")))?,
                        rounds: whole("warm rounds", rounds)?,
                    });
                }
                _ => {
                    return Err(wrap(format!(
                        "unknown key `{key}` (expected h, olr, om, decay or warm)"
                    )));
                }
            }
        }
        spec.validate().map_err(wrap)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ArmSpec, String> {
        text.parse()
    }

    #[test]
    fn specs_parse_and_print_back() {
        let spec = parse("topk:4096:128:4,h=60,olr=0.8,om=0.5,decay=0.95,warm=1024:4")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spec.codec,
            CodecConfig::TopK {
                chunk: 4096,
                k: 128,
                bits: 4
            }
        );
        assert_eq!(spec.inner_steps, Some(60));
        assert_eq!(spec.outer_lr, Some(0.8));
        assert_eq!(spec.outer_momentum, Some(0.5));
        assert_eq!(spec.decay(), 0.95);
        assert_eq!(
            spec.warmup,
            Some(DensityWarmup {
                k0: 1024,
                rounds: 4
            })
        );
        assert_eq!(
            spec.to_string(),
            "topk:4096:128:4,h=60,olr=0.8,om=0.5,decay=0.95,warm=1024:4"
        );
        assert_eq!(parse(&spec.to_string()), Ok(spec));
        let plain = parse("int8:256").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain, ArmSpec::codec(CodecConfig::Int8 { block: 256 }));
        assert_eq!(plain.decay(), 1.0);
        assert_eq!(plain.to_string(), "int8:256");
    }

    #[test]
    fn bad_specs_get_clear_errors() {
        for (text, expect) in [
            ("zstd:9", "unknown codec"),
            ("topk:4096:5000:2", "density 5000/4096 is above 1"),
            ("topk:4096:64:2,warm=8192:3", "above 1"),
            ("topk:4096:64:2,warm=32:3", "below the codec's k"),
            ("topk:4096:64:2,warm=1024:0", "rounds must be positive"),
            ("topk:4096:64:2,warm=1024", "K0:ROUNDS"),
            ("topk:4096:64:2,decay=-0.5", "decay -0.5 must be in [0, 1]"),
            ("topk:4096:64:2,decay=1.5", "must be in [0, 1]"),
            ("int8:256,decay=0.9", "applies to top-k"),
            ("fp32,warm=8:2", "applies to top-k"),
            ("fp32,h=0", "must be positive"),
            ("fp32,h=-3", "not a whole number"),
            ("fp32,olr=0", "positive"),
            ("fp32,om=1", "[0, 1)"),
            ("fp32,olr=nan", "not a number"),
            ("fp32,speed=9", "unknown key `speed`"),
            ("fp32,h", "not key=value"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(expect), "{text}: {error}");
            assert!(error.contains(text), "{text}: {error}");
        }
    }

    #[test]
    fn warmup_density_falls_from_k0_to_k() {
        let spec = parse("topk:4096:64:2,warm=1024:4").unwrap_or_else(|e| panic!("{e}"));
        let ks: Vec<u32> = (0..7)
            .map(|r| match spec.codec_at(r) {
                CodecConfig::TopK { k, .. } => k,
                other => panic!("{other}"),
            })
            .collect();
        // 1024 · (64/1024)^(r/4): halving each round.
        assert_eq!(ks, vec![1024, 512, 256, 128, 64, 64, 64]);
        let plain = parse("topk:4096:64:2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.codec_at(0), plain.codec);
    }
}
