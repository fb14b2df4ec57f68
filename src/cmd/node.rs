//! `barnraise node`.

use clap::Args as ClapArgs;

#[derive(Debug, ClapArgs)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`barnraise node` is not implemented yet: it arrives with the node and coordinator work")
}
