//! Measures how well the usefulness probe (verification stage 4) separates an
//! honest update — trained on the node's own shard — from one trained on a
//! shard the node was not given, at the scale of the built-in corpus.
//!
//! `cargo run --release -p barnraise-coordinator --example probe_separation -- [preset] [steps] [trials] [codec] [genres]`
//!
//! For each trial it trains two updates from the same θ: one on the assigned
//! shard A, one on another shard B; then it probes both the way the
//! coordinator does (own shard A against the held-out shard) and prints the
//! gains and the margin own_gain − other_gain for each, and how many of each
//! the default verdict accepts, and the AUC of the margin as a score. With
//! `genres`, shards are single genres of the corpus (counting, sums, prose)
//! and the off-shard update trains on another genre than the one assigned.

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
    // `genres`: each trial's own shard is one genre of the corpus (counting,
    // sums or prose) and the off-shard update trains on the next genre;
    // otherwise shards are cut from one corpus stream, as the built-in
    // dataset does.
    let genres = args.get(5).map(String::as_str) == Some("genres");
    let mixed = tokenize_bytes(corpus::generate(0, shard_tokens * (trials + 3)).as_bytes());
    let by_genre: Vec<Vec<u16>> = corpus::genres(shard_tokens * (trials + 1))
        .iter()
        .map(|g| tokenize_bytes(g.as_bytes()))
        .collect();
    let shards: Vec<&[u16]> = mixed.chunks(shard_tokens).collect();
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
    let (mut honest_results, mut off_results) = (Vec::new(), Vec::new());
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
        let (own, other) = if genres {
            let slice = |g: usize| {
                let text = &by_genre[g % by_genre.len()];
                let at = (t / by_genre.len()) * shard_tokens;
                &text[at.min(text.len())..(at + shard_tokens).min(text.len())]
            };
            (slice(t), slice(t + 1))
        } else {
            (shards[1 + t], shards[2 + t])
        };
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
        honest_results.push(h);
        off_results.push(o);
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
    // ROC: the chance an honest update scores above an off-shard one (ties
    // count half), by the margin and by the own-shard gain.
    let auc = |honest: &[f32], off: &[f32]| {
        let mut wins = 0.0f64;
        for h in honest {
            for o in off {
                wins += if h > o {
                    1.0
                } else if h == o {
                    0.5
                } else {
                    0.0
                };
            }
        }
        wins / (honest.len() * off.len()).max(1) as f64
    };
    let own = |r: &[barnraise_coordinator::probe::ProbeResult]| -> Vec<f32> {
        r.iter().map(|r| r.own_gain).collect()
    };
    println!(
        "AUC (honest vs off-shard): by margin {:.3}, by own-shard gain {:.3}",
        auc(&honest_margins, &off_margins),
        auc(&own(&honest_results), &own(&off_results))
    );
    // In a round of mostly honest nodes the bar is set by honest gains.
    let bar = barnraise_coordinator::probe::round_bar(&honest_results, cfg.probe_min_relative_gain);
    let kept = |r: &[barnraise_coordinator::probe::ProbeResult]| {
        r.iter()
            .filter(|r| r.verdict(cfg.probe_margin, bar).is_ok())
            .count()
    };
    println!(
        "with the round bar ({:.2} x the honest median gain = {bar:+.4}): honest accepted {}/{trials}, off-shard accepted {}/{trials}",
        cfg.probe_min_relative_gain,
        kept(&honest_results),
        kept(&off_results)
    );
    let threshold = |m: f32| {
        let tpr = honest_margins.iter().filter(|&&h| h >= m).count() as f32 / trials as f32;
        let fpr = off_margins.iter().filter(|&&o| o >= m).count() as f32 / trials as f32;
        (tpr, fpr)
    };
    for m in [-0.05f32, 0.0, 0.05, 0.1, 0.2] {
        let (tpr, fpr) = threshold(m);
        println!(
            "  reject below margin {m:+.2}: honest kept {:.0}%, off-shard kept {:.0}%",
            tpr * 100.0,
            fpr * 100.0
        );
    }
    Ok(())
}
