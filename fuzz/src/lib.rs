//! The fuzz harness: one function per decoder that takes bytes from outside
//! the process, each asserting what that decoder promises (no panic, memory
//! within a bound for the input's size, a stable re-encoding, an untouched
//! output buffer on error). `fuzz_targets/*.rs` hand libFuzzer's input to
//! these; docs/security.md lists the targets and their invariants.

pub mod alloc;
pub mod targets;

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;
