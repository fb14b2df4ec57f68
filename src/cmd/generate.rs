//! `barnraise generate`: samples text from a checkpoint, to see what a run
//! has learned (byte-level models read and write bytes; others use the
//! run's tokenizer).

use anyhow::Context;
use barnraise_trainer::checkpoint;
use barnraise_trainer::data::manifest::TextTokenizer;
use barnraise_trainer::generate::{SampleConfig, cpu_model, generate};
use barnraise_trainer::model::BYTE_VOCAB;
use clap::Args as ClapArgs;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A checkpoint file (a coordinator's `blobs/` holds them; `barnraise
    /// export` writes `model.safetensors`, which is one too).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The text to continue.
    #[arg(long)]
    prompt: String,
    /// How many tokens (bytes) to add.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 always picks the most likely byte.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling: draw from the most likely bytes that make up this
    /// much probability (1 = all of them).
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Same seed, same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The run's tokenizer (`tokenizer.json`), for models that are not
    /// byte-level [default: tokenizer.json beside the checkpoint, as in an
    /// export].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Instead of sampling, write the logits of every position of the prompt
    /// to this file as JSON (`[[f32; vocab]; prompt bytes]`), for comparing
    /// with another implementation (scripts/check-hf-export.sh).
    #[arg(long)]
    logits_out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ckpt = checkpoint::load_any(&args.checkpoint).context("reading the checkpoint")?;
    let beside = args
        .checkpoint
        .parent()
        .map(|d| d.join("tokenizer.json"))
        .filter(|p| p.exists());
    let tokenizer = match args.tokenizer.clone().or(beside) {
        Some(path) => {
            let t = TextTokenizer::load(&path)?;
            if t.vocab_size != ckpt.config.vocab_size {
                anyhow::bail!(
                    "{} has {} tokens, the model {}",
                    path.display(),
                    t.vocab_size,
                    ckpt.config.vocab_size
                );
            }
            Some(t)
        }
        None if ckpt.config.vocab_size == BYTE_VOCAB => None,
        None => anyhow::bail!(
            "the model's vocabulary is {} tokens, not bytes: give the run's tokenizer with --tokenizer",
            ckpt.config.vocab_size
        ),
    };
    let cfg = SampleConfig {
        max_new_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let trainer = cpu_model(&ckpt.config, &ckpt.params)?;
    let prompt: Vec<u32> = match &tokenizer {
        Some(t) => t
            .encode(&args.prompt, std::path::Path::new("--prompt"))?
            .into_iter()
            .map(u32::from)
            .collect(),
        None => args.prompt.bytes().map(u32::from).collect(),
    };
    if prompt.is_empty() {
        anyhow::bail!("--prompt is empty; give some text to continue");
    }
    if let Some(path) = &args.logits_out {
        let window = ckpt.config.max_seq_len;
        if prompt.len() > window {
            anyhow::bail!(
                "--logits-out reads the prompt in one pass: at most {window} bytes for this model"
            );
        }
        let logits = trainer.logits(&prompt)?;
        let rows: Vec<&[f32]> = logits.chunks(ckpt.config.vocab_size).collect();
        std::fs::write(path, serde_json::to_vec(&rows)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{} positions × {} logits -> {}",
            rows.len(),
            ckpt.config.vocab_size,
            path.display()
        );
        return Ok(());
    }
    if let Some(t) = &tokenizer {
        // Subword tokens: decoded as a whole at the end.
        let out = generate(&trainer, &prompt, &cfg, &mut |_| true)?;
        let text = t
            .tokenizer
            .decode(&out, false)
            .map_err(|e| anyhow::anyhow!("decoding the sample: {e}"))?;
        println!("{}{text}", args.prompt);
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    // Bytes are printed as soon as they form text; a multi-byte character
    // waits for its last byte.
    let mut pending: Vec<u8> = Vec::new();
    generate(&trainer, &prompt, &cfg, &mut |token| {
        pending.push(token as u8);
        match std::str::from_utf8(&pending) {
            Ok(text) => {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
                pending.clear();
            }
            Err(e) if e.error_len().is_some() => {
                let _ = write!(stdout, "{}", String::from_utf8_lossy(&pending));
                pending.clear();
            }
            Err(_) => {}
        }
        true
    })?;
    if !pending.is_empty() {
        write!(stdout, "{}", String::from_utf8_lossy(&pending))?;
    }
    writeln!(stdout)?;
    Ok(())
}
