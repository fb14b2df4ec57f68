//! barnraise-node: the daemon a volunteer runs.
//!
//! - [`network`]: the libp2p swarm (Client / Event / EventLoop).
//! - [`store`] and [`transfer`]: the content-addressed blob store on disk and
//!   fetching blobs in verified, resumable chunks from several peers.
//! - [`limiter`]: upload and download caps.
//! - [`daemon`]: the round loop ([`run_node`]); [`state`]: what it keeps on
//!   disk between runs; [`config`]: [`NodeConfig`].
//! - [`cluster`]: several workers in one node, reduced to one update.
//! - [`metrics`]: Prometheus metrics (`--metrics-addr`); [`receipts`]: the
//!   node's own signed account of what it contributed.
//! - [`doctor`]: `barnraise node doctor`'s checks; [`progress`]: terminal display.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod activity;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod limiter;
pub mod metrics;
pub mod network;
pub mod progress;
pub mod receipts;
pub mod redteam;
pub mod retention;
pub mod state;
pub mod store;
pub mod transfer;

pub use config::{Misbehaviour, NodeConfig};
pub use daemon::{NodeError, NodeEvent, NodeSummary, SyncSource, run_node};
pub use libp2p::{Multiaddr, PeerId};
pub use tokio_util::sync::CancellationToken;
