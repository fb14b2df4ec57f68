//! The node's configuration: what `barnraise node` reads from its TOML file,
//! `BARNRAISE_*` environment variables and flags (the CLI merges them, flags
//! winning), and what `barnraise up` and tests build directly.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a node needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The coordinator's multiaddr, ideally with its `/p2p/<peer id>`.
    pub coordinator: Multiaddr,
    /// Where the node keeps its key, blobs, params and receipts.
    pub data_dir: PathBuf,
    /// Addresses to listen on (TCP and/or QUIC).
    pub listen: Vec<Multiaddr>,
    /// "auto", "cpu" or "cuda:N".
    pub device: String,
    /// Key file; default `<data_dir>/node.key` (created on first run).
    pub key: Option<PathBuf>,
    /// Upload cap in bytes per second (None: no cap).
    pub upload_limit: Option<u64>,
    /// Download cap in bytes per second (None: no cap).
    pub download_limit: Option<u64>,
    /// Stop after this many applied rounds (None: run until stopped).
    pub max_rounds: Option<u64>,
    /// The coordinator's public key (hex). Default: the key inside the
    /// coordinator's peer id, which is the same key.
    pub coordinator_key: Option<String>,
    /// The run to join; empty means whatever run the coordinator hosts.
    pub run_id: String,
    /// How often to ask the coordinator for plans and manifests when gossip
    /// is quiet, in milliseconds.
    pub poll_interval_ms: u64,
    /// Blobs fetched in parallel chunks at most (all providers together).
    pub max_parallel_chunks: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            coordinator: Multiaddr::empty(),
            data_dir: PathBuf::from(".barnraise"),
            listen: vec![default_listen()],
            device: "auto".into(),
            key: None,
            upload_limit: None,
            download_limit: None,
            max_rounds: None,
            coordinator_key: None,
            run_id: String::new(),
            poll_interval_ms: 500,
            max_parallel_chunks: crate::transfer::MAX_IN_FLIGHT,
        }
    }
}

fn default_listen() -> Multiaddr {
    // Loopback and an OS-chosen port: safe for tests and `barnraise up`.
    // The CLI listens on all interfaces by default.
    Multiaddr::empty()
        .with(libp2p::multiaddr::Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
        .with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

impl NodeConfig {
    /// Reads a TOML config file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        NodeConfig::from_toml_str(&text).map_err(|reason| ConfigError::Parse { path: path.into(), reason })
    }

    pub fn from_toml_str(text: &str) -> Result<NodeConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The key file this config uses.
    pub fn key_path(&self) -> PathBuf {
        self.key.clone().unwrap_or_else(|| self.data_dir.join("node.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_unknown_fields() {
        let config = NodeConfig::from_toml_str(
            r#"
            coordinator = "/ip4/10.0.0.1/tcp/4001"
            data_dir = "/var/lib/barnraise"
            upload_limit = 1000000
            listen = ["/ip4/0.0.0.0/tcp/4002", "/ip4/0.0.0.0/udp/4002/quic-v1"]
            "#,
        )
        .unwrap();
        assert_eq!(config.coordinator.to_string(), "/ip4/10.0.0.1/tcp/4001");
        assert_eq!(config.upload_limit, Some(1_000_000));
        assert_eq!(config.download_limit, None);
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.device, "auto");
        assert_eq!(config.key_path(), PathBuf::from("/var/lib/barnraise/node.key"));
        let err = NodeConfig::from_toml_str("uplaod_limit = 5").unwrap_err();
        assert!(err.contains("uplaod_limit"), "{err}");
    }
}
