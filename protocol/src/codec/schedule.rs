//! A run's codec over time: the codec, its error-feedback decay, and a
//! density warm-up, written `CODEC[,decay=X][,warm=K0:N]` — the run config's
//! `codec` string. `topk:4096:128:4,decay=0.95,warm=2048:8` sends 2048 of each
//! 4096-value chunk in round 0, halving geometrically to 128 by round 8, and
//! fades the unsent residual by 0.95 a round. docs/codec.md has the
//! measurements behind both.

use super::CodecConfig;
use std::fmt;
use std::str::FromStr;

/// Top-k density that starts at `k0` per chunk and falls geometrically to
/// the codec's `k` over the first `rounds` rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DensityWarmup {
    pub k0: u32,
    pub rounds: usize,
}

/// A codec, its error-feedback decay and its density warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodecSchedule {
    pub codec: CodecConfig,
    /// Error-feedback decay (top-k); None is 1, plain error feedback.
    pub decay: Option<f32>,
    pub warmup: Option<DensityWarmup>,
}

impl From<CodecConfig> for CodecSchedule {
    fn from(codec: CodecConfig) -> Self {
        CodecSchedule {
            codec,
            decay: None,
            warmup: None,
        }
    }
}

impl CodecSchedule {
    /// The error-feedback decay the encoder uses (1 when unset).
    pub fn decay(&self) -> f32 {
        self.decay.unwrap_or(1.0)
    }

    /// The codec of round `round` (0-based): the warm-up's denser top-k
    /// early on, then the codec itself.
    pub fn codec_at(&self, round: u64) -> CodecConfig {
        match (self.codec, self.warmup) {
            (CodecConfig::TopK { chunk, k, bits }, Some(w)) if round < w.rounds as u64 => {
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

    /// Whether `codec` is what round `round` must be encoded with.
    pub fn allows(&self, round: u64, codec: CodecConfig) -> bool {
        self.codec_at(round) == codec
    }

    /// Checks values are in range and fit the codec.
    pub fn validate(&self) -> Result<(), String> {
        self.codec.validate().map_err(|e| e.to_string())?;
        let topk = matches!(self.codec, CodecConfig::TopK { .. });
        if let Some(decay) = self.decay {
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

    /// Parses the codec and applies `decay=` and `warm=` from `keys`
    /// (`(key, value)` pairs); returns the keys it does not know, for a
    /// caller that has more (the bench's arms).
    pub fn parse_with<'a>(
        codec_text: &str,
        keys: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(CodecSchedule, SpecPairs<'a>), String> {
        let codec_text = codec_text.trim();
        // A density above 1 gets its own message before the codec's checks.
        if let ["topk", chunk, k, _] = codec_text.split(':').collect::<Vec<_>>().as_slice()
            && let (Ok(chunk), Ok(k)) = (chunk.parse::<u64>(), k.parse::<u64>())
            && k > chunk
        {
            return Err(format!("density {k}/{chunk} is above 1"));
        }
        let codec: CodecConfig = codec_text
            .parse()
            .map_err(|e| format!("unknown codec: {e}"))?;
        let mut schedule = CodecSchedule::from(codec);
        let mut rest = Vec::new();
        for (key, value) in keys {
            let whole = |what: &str, text: &str| {
                text.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{what} `{text}` is not a whole number"))
            };
            match key {
                "decay" => {
                    schedule.decay = Some(
                        value
                            .parse::<f32>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .ok_or_else(|| format!("decay `{value}` is not a number"))?,
                    )
                }
                "warm" => {
                    let (k0, rounds) = value
                        .split_once(':')
                        .ok_or_else(|| format!("warm `{value}` is not K0:ROUNDS"))?;
                    let k0 = whole("warm k0", k0)?;
                    schedule.warmup = Some(DensityWarmup {
                        k0: u32::try_from(k0).map_err(|_| format!("warm k0 {k0} too large"))?,
                        rounds: whole("warm rounds", rounds)?,
                    });
                }
                _ => rest.push((key, value)),
            }
        }
        Ok((schedule, rest))
    }
}

/// `key=value` pairs of a spec, in the order written.
pub type SpecPairs<'a> = Vec<(&'a str, &'a str)>;

/// Splits `CODEC,key=value,...` into the codec text and trimmed pairs.
pub fn split_spec(input: &str) -> Result<(&str, SpecPairs<'_>), String> {
    let mut parts = input.trim().split(',');
    let codec = parts.next().unwrap_or_default();
    let pairs = parts
        .map(|part| {
            part.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("`{part}` is not key=value"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((codec, pairs))
}

impl fmt::Display for CodecSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.codec)?;
        if let Some(d) = self.decay {
            write!(f, ",decay={d}")?;
        }
        if let Some(w) = self.warmup {
            write!(f, ",warm={}:{}", w.k0, w.rounds)?;
        }
        Ok(())
    }
}

impl FromStr for CodecSchedule {
    type Err = String;

    /// Accepts what [`CodecConfig`] does, plus `,decay=X` and `,warm=K0:N`.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let wrap = |reason: String| format!("codec `{input}`: {reason}");
        let (codec, pairs) = split_spec(input).map_err(wrap)?;
        let (schedule, rest) = CodecSchedule::parse_with(codec, pairs).map_err(wrap)?;
        if let Some((key, _)) = rest.first() {
            return Err(wrap(format!(
                "unknown key `{key}` (expected decay or warm)"
            )));
        }
        schedule.validate().map_err(wrap)?;
        Ok(schedule)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_print_back_and_refuse_nonsense() {
        let s: CodecSchedule = "topk:4096:128:4,decay=0.95,warm=2048:8"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.to_string(), "topk:4096:128:4,decay=0.95,warm=2048:8");
        assert_eq!(s.decay(), 0.95);
        let plain: CodecSchedule = "int8:256".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain, CodecSchedule::from(CodecConfig::Int8 { block: 256 }));
        assert_eq!(plain.decay(), 1.0);
        for (text, expect) in [
            ("zstd", "unknown codec"),
            ("topk:4096:5000:2", "density 5000/4096 is above 1"),
            ("topk:4096:64:2,decay=-0.5", "must be in [0, 1]"),
            ("int8:256,decay=0.9", "applies to top-k"),
            ("topk:4096:64:2,warm=8192:3", "above 1"),
            ("topk:4096:64:2,h=60", "unknown key `h`"),
            ("topk:4096:64:2,warm", "not key=value"),
        ] {
            let error = text.parse::<CodecSchedule>().expect_err(text);
            assert!(
                error.contains(expect) && error.contains(text),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn warmup_density_falls_from_k0_to_k() {
        let s: CodecSchedule = "topk:4096:64:2,warm=1024:4"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let ks: Vec<u32> = (0..7)
            .map(|r| match s.codec_at(r) {
                CodecConfig::TopK { k, .. } => k,
                other => panic!("{other}"),
            })
            .collect();
        // 1024 · (64/1024)^(r/4): halving each round.
        assert_eq!(ks, vec![1024, 512, 256, 128, 64, 64, 64]);
        assert!(s.allows(5, s.codec) && !s.allows(0, s.codec));
    }
}
