//! `barnraise shard`: turn text files into content-addressed token shards
//! (llm.c `.bin` layout; byte-level, or with a Hugging Face tokenizer) plus
//! a dataset manifest with a held-out split.

use barnraise_trainer::data::manifest::{
    DEFAULT_SHARD_TOKENS, MANIFEST_FILE, ShardingConfig, TextTokenizer, build_dataset_with,
    collect_input_files, import_llmc, tokenize_files_with,
};
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Text files or directories to read.
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Directory to write shards and the dataset manifest into.
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per shard.
    #[arg(long, default_value_t = DEFAULT_SHARD_TOKENS)]
    pub shard_tokens: usize,
    /// Fraction of the tokens (from the end) held out for evaluation.
    #[arg(long, default_value_t = 0.05)]
    pub heldout_fraction: f64,
    /// A Hugging Face tokenizer (`tokenizer.json`, e.g. a BPE) instead of
    /// bytes. It is copied into the dataset and its hash and vocabulary go in
    /// the manifest; a run on this dataset sizes its model's vocabulary to it.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The inputs are pre-tokenized llm.c / nanoGPT `.bin` files (e.g.
    /// GPT-2-tokenized FineWeb), imported as they are: files named `*val*`
    /// are held out. Needs --vocab-size (or --tokenizer).
    #[arg(long)]
    pub llmc: bool,
    /// With --llmc: the vocabulary the tokens come from (50257 for GPT-2)
    /// [default: the tokenizer's].
    #[arg(long, requires = "llmc")]
    pub vocab_size: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokenizer = args
        .tokenizer
        .as_deref()
        .map(TextTokenizer::load)
        .transpose()?;
    let files = collect_input_files(&args.input)?;
    if args.llmc {
        let vocab = match (args.vocab_size, &tokenizer) {
            (Some(v), _) => v,
            (None, Some(t)) => t.vocab_size,
            (None, None) => {
                anyhow::bail!("--llmc needs --vocab-size (50257 for GPT-2 tokens) or --tokenizer")
            }
        };
        let manifest = import_llmc(
            &files,
            &args.out,
            args.shard_tokens,
            vocab,
            tokenizer.as_ref(),
        )?;
        println!(
            "{} llm.c files -> {} training shards ({} tokens) and {} held-out shards ({} tokens); tokenizer {}, vocabulary {}",
            files.len(),
            manifest.train.len(),
            manifest.train_tokens(),
            manifest.heldout.len(),
            manifest.heldout_tokens(),
            manifest.tokenizer,
            manifest.vocab_size
        );
        println!("manifest: {}", args.out.join(MANIFEST_FILE).display());
        return Ok(());
    }
    let tokens = tokenize_files_with(&files, tokenizer.as_ref())?;
    let config = ShardingConfig {
        shard_tokens: args.shard_tokens,
        heldout_fraction: args.heldout_fraction,
    };
    let manifest = build_dataset_with(&tokens, &args.out, config, tokenizer.as_ref())?;
    println!(
        "tokenizer: {} (vocabulary {})",
        manifest.tokenizer, manifest.vocab_size
    );
    println!(
        "{} files, {} tokens -> {} training shards ({} tokens) and {} held-out shards ({} tokens)",
        files.len(),
        tokens.len(),
        manifest.train.len(),
        manifest.train_tokens(),
        manifest.heldout.len(),
        manifest.heldout_tokens()
    );
    for entry in manifest.train.iter().chain(&manifest.heldout) {
        println!("  {}.bin  {} tokens", entry.hash, entry.tokens);
    }
    println!("manifest: {}", args.out.join(MANIFEST_FILE).display());
    Ok(())
}
