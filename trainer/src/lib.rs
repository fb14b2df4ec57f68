//! barnraise-trainer: everything a worker needs to train — the model and its
//! presets ([`model`]), token shards, the dataset manifest and the built-in
//! corpus ([`data`]), the inner loop and the flat parameter view ([`train`]),
//! checkpoints ([`checkpoint`]) and their Hugging Face export ([`hf`]), sampling
//! ([`generate`]), device selection ([`device`]) and the DiLoCo benchmark
//! ([`bench`]).
//!
//! The outer optimizer and the update codec are not here: every party must
//! apply them bit-identically, so they live in `barnraise_protocol`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod bench;
pub mod checkpoint;
mod cpu_ops;
pub mod data;
pub mod device;
pub mod generate;
pub mod hf;
pub mod model;
pub mod ops;
pub mod precision;
pub mod rng;
pub mod train;

pub use model::ModelConfig;
pub use train::{InnerConfig, InnerReport, TrainError, Trainer};
