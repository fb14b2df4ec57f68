//! One DiLoCo arm of `bench diloco`: a codec schedule (the same string a run
//! config's `codec` takes: `CODEC[,decay=X][,warm=K0:N]`, see
//! `barnraise_protocol::codec::CodecSchedule`) and what the arm changes from
//! the bench's base settings:
//!
//! - `h=N` — inner steps per round; the arm runs `R·H / N` rounds, so every
//!   arm still trains on the same tokens (N must divide R·H);
//! - `olr=X`, `om=X` — outer learning rate and (Nesterov) momentum;
//! - `rule=R` — the aggregation rule, as a run config's `aggregation`
//!   (`mean`, `trimmed-mean:F`, `centered-clip:TAU[:ITERS]`);
//! - `delay=N` — overlapped rounds: the workers of round r train from θ of
//!   N rounds earlier, and the outer step applies their updates to the
//!   current θ (the one-round-delayed outer step docs/architecture.md,
//!   "Overlapped rounds", designs; N ≤ 4);
//! - `overlap=S` — overlap within a round: each worker commits its update
//!   after H − S steps, trains the round's last S steps while the update
//!   travels (from θ_r minus its decoded update, a point anyone can
//!   recompute), and starts the next round from θ_{r+1} plus what those S
//!   steps added, so every update after the first still spans H steps
//!   (docs/architecture.md, "Overlapped rounds"; S < H, not with a delay);
//!   `from=K` holds nothing back before round K;
//!   `carry=X` scales what those S steps added before it moves onto
//!   θ_{r+1} (default 1; 0 drops it and restarts from θ_{r+1}); `fold=1`
//!   instead starts the next round from θ_{r+1} itself and adds what the S
//!   steps added to the next update, so no worker restarts away from the
//!   average and the steps still count, one outer step late;
//! - `eager=1` — with `delay=1`: each worker starts round r from θ_{r−1}
//!   minus its own decoded update of round r−1 (its proxy for the round's
//!   average, which is still travelling) and its update is measured from
//!   there; a start anyone can recompute from the manifests and the
//!   node's own committed update (arXiv 2502.12996's eager idea); with
//!   `overlap=S` instead, the S steps start from where the outer step would
//!   take θ_r if the worker's own decoded update were the round's average
//!   (the same stand-in, for the tail), not from θ_r minus that update;
//! - `count=1` — short for `rule=support-mean`: for sparse codecs, each
//!   coordinate of the average is divided by the weight of the workers that
//!   sent it, not of all workers (an aggregation rule a run can name too).
//!
//! For example `topk:4096:128:4,h=60,decay=0.95,warm=1024:4`.

use barnraise_protocol::aggregate::AggregationRule;
use barnraise_protocol::codec::{CodecConfig, CodecSchedule, split_spec};
use std::fmt;
use std::str::FromStr;

/// A compressed arm: unset fields take the bench's base settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArmSpec {
    /// The codec, its error-feedback decay and density warm-up.
    pub schedule: CodecSchedule,
    /// H for this arm; its rounds are base R·H divided by this.
    pub inner_steps: Option<usize>,
    pub outer_lr: Option<f32>,
    pub outer_momentum: Option<f32>,
    /// How the workers' updates are combined (default: the token-weighted mean).
    pub rule: Option<AggregationRule>,
    /// Rounds between the θ the workers train from and the θ their updates
    /// are applied to (0: synchronous).
    pub delay: u32,
    /// Steps of each round trained after the commit, carried into the next
    /// round (0: none).
    pub overlap: u32,
    /// The share of the overlapped steps' progress carried onto θ_{r+1}
    /// (`None`: all of it).
    pub carry: Option<f32>,
    /// With `overlap=S`: the first round that holds steps back (0: every one).
    pub overlap_from: u32,
    /// With `overlap=S`: the next round starts from θ_{r+1} and the S steps'
    /// progress joins the next update instead of moving the start.
    pub fold: bool,
    /// With `delay=1`: start each round from θ_{r−1} minus the worker's own
    /// last decoded update; with `overlap=S`: start the S steps from the
    /// outer step taken with it.
    pub eager: bool,
}

/// The largest `delay=N` an arm takes.
pub const MAX_DELAY: u32 = 4;

impl ArmSpec {
    /// The codec alone, with the bench's base settings.
    pub fn codec(codec: CodecConfig) -> Self {
        ArmSpec {
            schedule: CodecSchedule::from(codec),
            inner_steps: None,
            outer_lr: None,
            outer_momentum: None,
            rule: None,
            delay: 0,
            overlap: 0,
            carry: None,
            overlap_from: 0,
            fold: false,
            eager: false,
        }
    }

    /// Checks what parsing cannot: values in range and keys that fit the codec.
    pub fn validate(&self) -> Result<(), String> {
        self.schedule.validate()?;
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
        if let Some(carry) = self.carry {
            if self.overlap == 0 {
                return Err("carry applies to overlap=S".to_string());
            }
            if !(0.0..=1.0).contains(&carry) {
                return Err(format!("carry {carry} must be in [0, 1]"));
            }
        }
        if self.overlap_from > 0 && self.overlap == 0 {
            return Err("from applies to overlap=S".to_string());
        }
        if self.fold {
            if self.overlap == 0 {
                return Err("fold applies to overlap=S".to_string());
            }
            if self.carry.is_some() {
                return Err("fold and carry are two ways of moving the steps; give one".to_string());
            }
        }
        if self.eager && self.delay != 1 && self.overlap == 0 {
            return Err("eager=1 goes with delay=1 or overlap=S".to_string());
        }
        if self.overlap > 0 && self.delay > 0 {
            return Err("overlap and delay are two ways of overlapping; give one".to_string());
        }
        if self.delay > MAX_DELAY {
            return Err(format!(
                "delay {} is more than {MAX_DELAY} rounds",
                self.delay
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ArmSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.schedule)?;
        if let Some(h) = self.inner_steps {
            write!(f, ",h={h}")?;
        }
        if let Some(lr) = self.outer_lr {
            write!(f, ",olr={lr}")?;
        }
        if let Some(m) = self.outer_momentum {
            write!(f, ",om={m}")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ",rule={rule}")?;
        }
        if self.delay > 0 {
            write!(f, ",delay={}", self.delay)?;
        }
        if self.overlap > 0 {
            write!(f, ",overlap={}", self.overlap)?;
        }
        if let Some(carry) = self.carry {
            write!(f, ",carry={carry}")?;
        }
        if self.overlap_from > 0 {
            write!(f, ",from={}", self.overlap_from)?;
        }
        if self.fold {
            write!(f, ",fold=1")?;
        }
        if self.eager {
            write!(f, ",eager=1")?;
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
        let (codec, pairs) = split_spec(input).map_err(wrap)?;
        let (schedule, rest) = CodecSchedule::parse_with(codec, pairs).map_err(wrap)?;
        let mut spec = ArmSpec {
            schedule,
            inner_steps: None,
            outer_lr: None,
            outer_momentum: None,
            rule: None,
            delay: 0,
            overlap: 0,
            carry: None,
            overlap_from: 0,
            fold: false,
            eager: false,
        };
        for (key, value) in rest {
            let number = |what: &str| {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| wrap(format!("{what} `{value}` is not a number")))
            };
            match key {
                "h" => {
                    spec.inner_steps = Some(
                        value
                            .parse::<usize>()
                            .map_err(|_| wrap(format!("h `{value}` is not a whole number")))?,
                    )
                }
                "olr" => spec.outer_lr = Some(number("olr")?),
                "count" => {
                    let rule = match value {
                        "1" => AggregationRule::SupportMean,
                        "0" => AggregationRule::Mean,
                        _ => return Err(wrap(format!("count `{value}` is not 0 or 1"))),
                    };
                    if spec.rule.replace(rule).is_some() {
                        return Err(wrap(
                            "count=1 is its own rule; give one of count or rule".into(),
                        ));
                    }
                }
                "delay" => {
                    spec.delay = value
                        .parse::<u32>()
                        .map_err(|_| wrap(format!("delay `{value}` is not a whole number")))?
                }
                "overlap" => {
                    spec.overlap = value
                        .parse::<u32>()
                        .map_err(|_| wrap(format!("overlap `{value}` is not a whole number")))?
                }
                "carry" => spec.carry = Some(number("carry")?),
                "from" => {
                    spec.overlap_from = value
                        .parse::<u32>()
                        .map_err(|_| wrap(format!("from `{value}` is not a whole number")))?
                }
                "eager" | "fold" => {
                    let on = match value {
                        "1" => true,
                        "0" => false,
                        _ => return Err(wrap(format!("{key} `{value}` is not 0 or 1"))),
                    };
                    if key == "eager" {
                        spec.eager = on;
                    } else {
                        spec.fold = on;
                    }
                }
                "om" => spec.outer_momentum = Some(number("om")?),
                "rule" => {
                    let rule = value
                        .parse::<AggregationRule>()
                        .map_err(|e| wrap(e.to_string()))?;
                    if spec.rule.replace(rule).is_some() {
                        return Err(wrap(
                            "count=1 is its own rule; give one of count or rule".into(),
                        ));
                    }
                }
                _ => {
                    return Err(wrap(format!(
                        "unknown key `{key}` (expected h, olr, om, rule, delay, eager, overlap, carry, from, fold, count, decay or warm)"
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
    use barnraise_protocol::codec::DensityWarmup;

    fn parse(text: &str) -> Result<ArmSpec, String> {
        text.parse()
    }

    #[test]
    fn specs_parse_and_print_back() {
        let spec = parse("topk:4096:128:4,h=60,olr=0.8,om=0.5,decay=0.95,warm=1024:4")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            spec.schedule.codec,
            CodecConfig::TopK {
                chunk: 4096,
                k: 128,
                bits: 4
            }
        );
        assert_eq!(spec.inner_steps, Some(60));
        assert_eq!(spec.outer_lr, Some(0.8));
        assert_eq!(spec.outer_momentum, Some(0.5));
        assert_eq!(spec.schedule.decay(), 0.95);
        assert_eq!(
            spec.schedule.warmup,
            Some(DensityWarmup {
                k0: 1024,
                rounds: 4
            })
        );
        assert_eq!(
            spec.to_string(),
            "topk:4096:128:4,decay=0.95,warm=1024:4,h=60,olr=0.8,om=0.5"
        );
        assert_eq!(parse(&spec.to_string()), Ok(spec));
        let counted = parse("topk:4096:64:2,count=1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(counted.rule, Some(AggregationRule::SupportMean));
        assert_eq!(counted.to_string(), "topk:4096:64:2,rule=support-mean");
        let overlapped = parse("fp32,overlap=5").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(overlapped.overlap, 5);
        assert_eq!(overlapped.to_string(), "fp32,overlap=5");
        let carried = parse("fp32,overlap=5,carry=0.5").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(carried.carry, Some(0.5));
        assert_eq!(carried.to_string(), "fp32,overlap=5,carry=0.5");
        let eager_tail = parse("fp32,overlap=5,eager=1").unwrap_or_else(|e| panic!("{e}"));
        assert!(eager_tail.eager && eager_tail.overlap == 5);
        assert_eq!(eager_tail.to_string(), "fp32,overlap=5,eager=1");
        let late = parse("fp32,overlap=5,from=2").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((late.overlap, late.overlap_from), (5, 2));
        assert_eq!(late.to_string(), "fp32,overlap=5,from=2");
        let folded = parse("fp32,overlap=5,fold=1").unwrap_or_else(|e| panic!("{e}"));
        assert!(folded.fold && folded.carry.is_none());
        assert_eq!(folded.to_string(), "fp32,overlap=5,fold=1");
        let eager = parse("fp32,delay=1,eager=1").unwrap_or_else(|e| panic!("{e}"));
        assert!(eager.eager);
        assert_eq!(eager.to_string(), "fp32,delay=1,eager=1");
        let delayed = parse("int8:256,delay=1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(delayed.delay, 1);
        assert_eq!(delayed.to_string(), "int8:256,delay=1");
        let plain = parse("int8:256").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain, ArmSpec::codec(CodecConfig::Int8 { block: 256 }));
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
            ("fp32,delay=5", "more than 4 rounds"),
            ("topk:4096:64:2,count=2", "not 0 or 1"),
            (
                "topk:4096:64:2,count=1,rule=mean",
                "give one of count or rule",
            ),
            ("topk:4096:64:2,rule=median", "invalid aggregation rule"),
            ("fp32,delay=-1", "not a whole number"),
            ("fp32,overlap=x", "not a whole number"),
            ("fp32,overlap=2,delay=1", "give one"),
            ("fp32,carry=0.5", "applies to overlap"),
            ("fp32,eager=1", "goes with delay=1"),
            ("fp32,delay=2,eager=1", "goes with delay=1"),
            ("fp32,overlap=2,carry=2", "must be in [0, 1]"),
            ("fp32,fold=1", "applies to overlap"),
            ("fp32,from=2", "applies to overlap"),
            ("fp32,overlap=2,fold=1,carry=0.5", "give one"),
            ("fp32,overlap=2,fold=2", "not 0 or 1"),
            ("fp32,h", "not key=value"),
        ] {
            let error = parse(text).expect_err(text);
            assert!(error.contains(expect), "{text}: {error}");
            assert!(error.contains(text), "{text}: {error}");
        }
    }
}
