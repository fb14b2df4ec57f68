//! barnraise's command-line crate as a library: the parts of the CLI that
//! tests drive directly. The commands themselves live in the binary.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod attacks;
