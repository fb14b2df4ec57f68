//! `barnraise bench diloco`: data-parallel vs DiLoCo (fp32, int8, top-k) at
//! equal total tokens on the built-in corpus.

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`barnraise bench diloco` is not implemented yet")
}
