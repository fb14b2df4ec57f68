//! `barnraise shard`: turn text files into content-addressed token shards.

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
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`barnraise shard` is not implemented yet")
}
