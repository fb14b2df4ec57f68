//! `barnraise bench codec`: encode/decode throughput of every update codec
//! against a plain read pass over the same buffer.

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Number of parameters in the benchmark pseudo-gradient.
    #[arg(long, default_value_t = 50_000_000)]
    pub params: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`barnraise bench codec` is not implemented yet")
}
