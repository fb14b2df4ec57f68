//! Measures how well the usefulness probe (verification stage 4) separates an
//! honest update — trained on the node's own shard — from one trained on a
//! shard the node was not given, at the scale of the built-in corpus.
//!
//! `cargo run --release -p barnraise-coordinator --example probe_separation -- [preset] [steps] [trials] [codec]`
//!
//! For each trial it trains two updates from the same θ: one on the assigned
//! shard A, one on another shard B; then it probes both the way the
//! coordinator does (own shard A against the held-out shard) and prints the
//! gains and the margin own_gain − other_gain for each, and how many of each
//! the default verdict accepts.

use barnraise_coordinator::VerifyConfig;
use barnraise_coordinator::probe::Probe;
use barnraise_protocol::codec::{CodecConfig, Encoder};
use barnraise_trainer::data::{corpus, tokenize_bytes};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{InnerConfig, ModelConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let preset = args.get(1).map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let trials: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(6);
    let model = ModelConfig::preset(preset).ok_or("unknown preset")?;
    let seq_len = 64.min(model.max_seq_len);
    let shard_tokens = 32 * 1024;
    // Shards cut from one corpus stream, as the built-in dataset does.
    let text = tokenize_bytes(corpus::generate(0, shard_tokens * (trials + 3)).as_bytes());
    let shards: Vec<&[u16]> = text.chunks(shard_tokens).collect();
    let heldout = shards[shards.len() - 1];
    let cfg = VerifyConfig::default();
    let codec: CodecConfig = match args.get(4) {
        Some(text) => text.parse()?,
        None => CodecConfig::int8_default(),
    };

    // θ after one warm-up round, so the probe sees a model that has started learning.
    let device = select(DeviceSpec::Cpu)?;
    let mut warm = Trainer::new(&model, device.clone(), 0)?;
    let inner = |seed: u64| InnerConfig {
        steps,
        batch_size: 8,
        seq_len,
        seed,
        ..InnerConfig::default()
    };
    warm.train_inner(shards[0], &inner(99))?;
    let theta = warm.flat_params()?;

    let mut probe = Probe::new(&model, &theta, &cfg, seq_len, 7)?;
    let heldout_base = probe.base_loss(heldout)?;
    let mut honest_margins = Vec::new();
    let mut off_margins = Vec::new();
    let (mut honest_ok, mut off_ok) = (0, 0);
    println!(
        "preset {preset}, {} params, H = {steps}, codec {codec}, {trials} trials",
        model.params_count()
    );
    println!(
        "{:>5}  {:>22}  {:>22}",
        "trial", "honest own/other/margin", "off-shard own/other/margin"
    );
    for t in 0..trials {
        let own = shards[1 + t];
        let other = shards[2 + t];
        let update_of =
            |tokens: &[u16], seed: u64| -> Result<Vec<f32>, Box<dyn std::error::Error>> {
                let mut trainer = Trainer::new(&model, device.clone(), 0)?;
                trainer.set_flat_params(&theta)?;
                trainer.train_inner(tokens, &inner(seed))?;
                let local = trainer.flat_params()?;
                let delta: Vec<f32> = theta.iter().zip(&local).map(|(a, b)| a - b).collect();
                // Through the codec, as a node would send it.
                let payload = Encoder::new(codec, delta.len())?.encode(&delta)?;
                Ok(barnraise_protocol::codec::decode(&payload, delta.len())?)
            };
        let honest = update_of(own, t as u64)?;
        let off = update_of(other, t as u64)?;
        let own_base = probe.base_loss(own)?;
        let h = probe.measure(&honest, own, own_base, heldout, heldout_base)?;
        let o = probe.measure(&off, own, own_base, heldout, heldout_base)?;
        honest_ok += usize::from(h.verdict(cfg.probe_margin, 0.0).is_ok());
        off_ok += usize::from(o.verdict(cfg.probe_margin, 0.0).is_ok());
        honest_margins.push(h.own_gain - h.other_gain);
        off_margins.push(o.own_gain - o.other_gain);
        println!(
            "{t:>5}  {:>7.4} {:>7.4} {:>+7.4}  {:>7.4} {:>7.4} {:>+7.4}",
            h.own_gain,
            h.other_gain,
            h.own_gain - h.other_gain,
            o.own_gain,
            o.other_gain,
            o.own_gain - o.other_gain
        );
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let min = |v: &[f32]| v.iter().copied().fold(f32::INFINITY, f32::min);
    let max = |v: &[f32]| v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    println!(
        "margin own−other: honest mean {:+.4} [{:+.4}, {:+.4}], off-shard mean {:+.4} [{:+.4}, {:+.4}]",
        mean(&honest_margins),
        min(&honest_margins),
        max(&honest_margins),
        mean(&off_margins),
        min(&off_margins),
        max(&off_margins)
    );
    println!(
        "default verdict (margin {}): honest accepted {honest_ok}/{trials}, off-shard accepted {off_ok}/{trials}",
        cfg.probe_margin
    );
    Ok(())
}
