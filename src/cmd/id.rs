//! `barnraise id new|show`: a node's identity key.

use anyhow::Context;
use barnraise_protocol::SigningKey;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum IdCommand {
    /// Create a new node key (refuses to overwrite an existing one).
    New {
        /// Key file path [default: ~/.barnraise/node.key].
        #[arg(long, env = "BARNRAISE_KEY")]
        key: Option<PathBuf>,
    },
    /// Print the node id (public key) and libp2p peer id of a key.
    Show {
        /// Key file path [default: ~/.barnraise/node.key].
        #[arg(long, env = "BARNRAISE_KEY")]
        key: Option<PathBuf>,
    },
}

fn key_path(key: Option<PathBuf>) -> PathBuf {
    key.unwrap_or_else(|| super::default_home().join("node.key"))
}

pub fn run(command: IdCommand) -> anyhow::Result<()> {
    match command {
        IdCommand::New { key } => {
            let path = key_path(key);
            let signing = SigningKey::generate()?;
            signing.save_new(&path)?;
            println!("created {}", path.display());
            print_identity(&signing)
        }
        IdCommand::Show { key } => {
            let path = key_path(key);
            let signing = SigningKey::load(&path)?;
            print_identity(&signing)
        }
    }
}

fn print_identity(key: &SigningKey) -> anyhow::Result<()> {
    let peer = key
        .public()
        .to_peer_id()
        .context("deriving the libp2p peer id")?;
    println!("node id: {}", key.node_id());
    println!("peer id: {peer}");
    Ok(())
}
