//! Sampling text from a model: `barnraise generate`, and the before/after
//! sample `barnraise up` ends with.
//!
//! The model has no key/value cache, so each new token runs the forward pass
//! over the whole window (the last `max_seq_len` tokens): fine for the small
//! presets on a CPU, quadratic for long outputs of large ones.

use crate::rng::Rng;
use crate::train::{TrainError, Trainer};
use candle_core::Tensor;

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token every time.
    pub temperature: f32,
    /// Nucleus sampling: draw from the smallest set of tokens whose
    /// probabilities add up to at least this (1 = the whole vocabulary).
    pub top_p: f32,
    /// Same seed, same text.
    pub seed: u64,
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            max_new_tokens: 200,
            temperature: 0.8,
            top_p: 0.95,
            seed: 0,
        }
    }
}

impl SampleConfig {
    /// Refuses settings that cannot sample.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be 0 or more, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], not {}", self.top_p));
        }
        Ok(())
    }
}

impl Trainer {
    /// The logits of every position of `ids` (one sequence), row-major
    /// `[ids.len() × vocab_size]`.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<f32>, TrainError> {
        let vocab = self.config().vocab_size;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(TrainError::Config(format!(
                "token {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        if ids.is_empty() || ids.len() > self.config().max_seq_len {
            return Err(TrainError::Config(format!(
                "{} tokens; the model reads 1 to {} at a time",
                ids.len(),
                self.config().max_seq_len
            )));
        }
        let input = Tensor::from_slice(ids, (1, ids.len()), self.device())?;
        let logits = self.model().forward(&input)?;
        Ok(logits.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// A model on the CPU holding `params` (a checkpoint's), for sampling.
pub fn cpu_model(
    config: &crate::model::ModelConfig,
    params: &[f32],
) -> Result<Trainer, TrainError> {
    let mut trainer = Trainer::new(config, candle_core::Device::Cpu, 0)?;
    trainer.set_flat_params(params)?;
    Ok(trainer)
}

/// Continues `prompt` by up to `cfg.max_new_tokens` tokens and returns only
/// the new ones. `stop` is called with each new token; returning false ends
/// early (a caller streaming text, or one that was interrupted).
pub fn generate(
    trainer: &Trainer,
    prompt: &[u32],
    cfg: &SampleConfig,
    stop: &mut dyn FnMut(u32) -> bool,
) -> Result<Vec<u32>, TrainError> {
    cfg.validate().map_err(TrainError::Config)?;
    if prompt.is_empty() {
        return Err(TrainError::Config(
            "the prompt is empty; give at least one token".into(),
        ));
    }
    let vocab = trainer.config().vocab_size;
    let window = trainer.config().max_seq_len;
    let mut rng = Rng::new(crate::rng::derive_seed(cfg.seed, "generate"));
    let mut context = prompt.to_vec();
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    for _ in 0..cfg.max_new_tokens {
        let start = context.len().saturating_sub(window);
        let logits = trainer.logits(&context[start..])?;
        let last = &logits[logits.len() - vocab..];
        let token = pick(last, cfg.temperature, cfg.top_p, &mut rng);
        out.push(token);
        context.push(token);
        if !stop(token) {
            break;
        }
    }
    Ok(out)
}

/// One token from `logits` by temperature and nucleus sampling (ties and
/// order resolved by token id, so the result depends only on the inputs).
pub fn pick(logits: &[f32], temperature: f32, top_p: f32, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0 as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    let t = f64::from(temperature);
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(f64, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| {
            let p = if l.is_finite() {
                ((f64::from(l) - f64::from(max)) / t).exp()
            } else {
                0.0
            };
            (p, i as u32)
        })
        .collect();
    let total: f64 = probs.iter().map(|(p, _)| p).sum();
    probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // The nucleus: the most likely tokens until their mass reaches top_p.
    let mut kept = 0;
    let mut mass = 0.0;
    for (p, _) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= f64::from(top_p) {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let nucleus_mass: f64 = nucleus.iter().map(|(p, _)| p).sum();
    let mut draw = rng.unit_f64() * nucleus_mass;
    for (p, token) in nucleus {
        if draw < *p {
            return *token;
        }
        draw -= p;
    }
    nucleus.last().map_or(0, |(_, t)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use candle_core::Device;

    #[test]
    fn zero_temperature_is_the_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        let mut rng = Rng::new(1);
        assert_eq!(pick(&logits, 0.0, 1.0, &mut rng), 1);
        // A tiny nucleus is the single most likely token, whatever the draw.
        for _ in 0..50 {
            assert_eq!(pick(&logits, 1.0, 0.01, &mut rng), 1);
        }
        // Tokens 1 and 3 carry ~90% of the mass; with top_p 0.8 only they come up.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            seen.insert(pick(&logits, 1.0, 0.8, &mut rng));
        }
        assert_eq!(seen, [1, 3].into());
        // With the whole vocabulary every token comes up.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            seen.insert(pick(&logits, 1.0, 1.0, &mut rng));
        }
        assert_eq!(seen, [0, 1, 2, 3].into());
    }

    #[test]
    fn generation_is_seeded_and_refuses_bad_input() {
        let config = ModelConfig::preset("tiny").unwrap();
        let trainer = Trainer::new(&config, Device::Cpu, 7).unwrap();
        let cfg = SampleConfig {
            max_new_tokens: 80,
            seed: 3,
            ..SampleConfig::default()
        };
        let prompt: Vec<u32> = b"The barn".iter().map(|&b| u32::from(b)).collect();
        let a = generate(&trainer, &prompt, &cfg, &mut |_| true).unwrap();
        let b = generate(&trainer, &prompt, &cfg, &mut |_| true).unwrap();
        // Longer than the 64-token window: the context slides.
        assert_eq!(a.len(), 80);
        assert_eq!(a, b, "same seed, same text");
        let other = SampleConfig {
            seed: 4,
            ..cfg.clone()
        };
        assert_ne!(
            a,
            generate(&trainer, &prompt, &other, &mut |_| true).unwrap()
        );
        let mut n = 0;
        let early = generate(&trainer, &prompt, &cfg, &mut |_| {
            n += 1;
            n < 5
        })
        .unwrap();
        assert_eq!(early, a[..5]);
        assert!(generate(&trainer, &[], &cfg, &mut |_| true).is_err());
        assert!(generate(&trainer, &[300], &cfg, &mut |_| true).is_err());
        let hot = SampleConfig {
            temperature: -1.0,
            ..cfg
        };
        assert!(generate(&trainer, &prompt, &hot, &mut |_| true).is_err());
    }

    #[test]
    fn logits_of_a_prefix_do_not_see_later_tokens() {
        let config = ModelConfig::preset("tiny").unwrap();
        let trainer = Trainer::new(&config, Device::Cpu, 7).unwrap();
        let ids: Vec<u32> = (10..30).collect();
        let full = trainer.logits(&ids).unwrap();
        let prefix = trainer.logits(&ids[..5]).unwrap();
        let vocab = config.vocab_size;
        for (a, b) in prefix.iter().zip(&full[..5 * vocab]) {
            assert!((a - b).abs() < 1e-5, "causal: {a} vs {b}");
        }
    }
}
