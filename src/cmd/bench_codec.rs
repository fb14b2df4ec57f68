//! `barnraise bench codec`: encode/decode throughput of every update codec
//! against a plain read pass over the same buffer.

use barnraise_protocol::codec::CodecConfig;
use barnraise_protocol::codec::bench::{self, BenchConfig};
use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Number of parameters in the benchmark pseudo-gradient.
    #[arg(long, default_value_t = 50_000_000)]
    pub params: usize,
    /// Timed repeats per measurement (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Codecs to measure, e.g. `--codec int8:256 --codec topk:4096:64:4`
    /// (default: fp32, int8, topk).
    #[arg(long = "codec")]
    pub codecs: Vec<CodecConfig>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut config = BenchConfig {
        params: args.params,
        repeats: args.repeats,
        ..BenchConfig::default()
    };
    if !args.codecs.is_empty() {
        config.codecs = args.codecs;
    }
    let report = bench::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
