//! Measures inner-loop training throughput of a preset on the CPU (or
//! `--device`), in tokens/s and achieved GFLOP/s: the baseline figure later
//! performance work is compared against.
//!
//! `cargo run --release -p barnraise-trainer --example throughput -- small [steps] [batch] [seq]`

use barnraise_trainer::data::{corpus, tokenize_bytes};
use barnraise_trainer::device::{DeviceSpec, select};
use barnraise_trainer::{InnerConfig, ModelConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let preset = args.first().map(String::as_str).unwrap_or("small");
    let model = ModelConfig::preset(preset).ok_or_else(|| format!("unknown preset {preset}"))?;
    let number = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let steps = number(1, 20)?;
    let batch_size = number(2, 8)?;
    let seq_len = number(3, model.max_seq_len)?;
    let device_spec: DeviceSpec = std::env::var("BARNRAISE_DEVICE")
        .unwrap_or_else(|_| "auto".into())
        .parse()?;
    let device = select(device_spec)?;
    let tokens = tokenize_bytes(corpus::generate(1, 1 << 20).as_bytes());
    let mut trainer = Trainer::new(&model, device, 1)?;
    let cfg = InnerConfig {
        steps: 3,
        batch_size,
        seq_len,
        ..InnerConfig::default()
    };
    // Warm-up steps: first-touch allocation and thread-pool start.
    trainer.train_inner(&tokens, &cfg)?;
    let report = trainer.train_inner(
        &tokens,
        &InnerConfig {
            steps,
            start_step: 3,
            ..cfg
        },
    )?;
    let secs = report.wall.as_secs_f64();
    let tokens_per_s = report.tokens as f64 / secs;
    let gflops = tokens_per_s * model.flops_per_token_at(seq_len) / 1e9;
    println!(
        "{preset}: {} params, batch {batch_size}x{seq_len}, {steps} steps, {} threads: {:.0} tokens/s, {:.2} GFLOP/s, {:.1} ms/step, loss {:.3} -> {:.3}",
        model.params_count(),
        candle_core::utils::get_num_threads(),
        tokens_per_s,
        gflops,
        secs * 1e3 / steps as f64,
        report.losses.first().copied().unwrap_or(f32::NAN),
        report.losses.last().copied().unwrap_or(f32::NAN),
    );
    Ok(())
}
