//! barnraise-coordinator: the round state machine ([`rounds`]), seeded work
//! assignment ([`plan`]), the verification pipeline ([`verify`], [`probe`]),
//! the ledger ([`ledger`]), and the service that does the I/O around them —
//! libp2p ([`network`]), blobs ([`store`]), the HTTP API and metrics
//! ([`http`]) with the server-rendered dashboard ([`dashboard`], [`svg`]) —
//! started with [`start`].

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admission;
pub mod bootstrap;
pub mod card;
pub mod close;
pub mod config;
pub mod dashboard;
pub mod dataset;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod network;
pub mod pace;
pub mod params;
pub mod plan;
pub mod pool;
pub mod probe;
pub mod ratelimit;
pub mod record;
pub mod refusals;
pub mod reputation;
pub mod retention;
pub mod rounds;
pub mod service;
pub mod spot;
pub mod stats;
pub mod store;
pub mod summary;
pub mod svg;
pub mod verify;

pub use config::{Admission, CoordinatorConfig, DatasetSource, Quorum, VerifyConfig};
pub use ledger::{ContributorRow, Ledger};
pub use service::{CoordinatorError, CoordinatorHandle, start};
pub use summary::{CoordinatorEvent, RoundSummary, RunSummary};
/// Re-exported so embedders can stop the coordinator without naming tokio-util.
pub use tokio_util::sync::CancellationToken;
