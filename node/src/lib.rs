//! barnraise-node: the daemon a volunteer runs.
//!
//! - [`network`]: the libp2p swarm (Client / Event / EventLoop).
//! - [`store`] and [`transfer`]: the content-addressed blob store on disk and
//!   fetching blobs in verified, resumable chunks from several peers.
//! - [`limiter`]: upload and download caps.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod limiter;
pub mod network;
pub mod store;
pub mod transfer;
