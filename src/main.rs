//! The `barnraise` command line: parses arguments and calls into the crates.
//! Nothing here decides protocol or training behaviour.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "barnraise",
    version,
    about = "Train fully open models on community compute",
    long_about = "barnraise is a decentralized compute network for training fully open \
language models. Nodes train locally and exchange compressed pseudo-gradients with \
DiLoCo-style synchronization; a coordinator verifies every update and publishes a \
signed, auditable record of the run.\n\nNew here? Run `barnraise up` to watch a whole \
network train on this machine."
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = cmd::LogFormat::Text, env = "BARNRAISE_LOG_FORMAT")]
    log_format: cmd::LogFormat,
    /// Log filter, e.g. `info` or `barnraise_node=debug` (RUST_LOG syntax)
    /// [default: info; warn for `up` and `bench attacks`, whose progress display says the rest].
    #[arg(long, global = true, env = "BARNRAISE_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole network in this process on loopback: a coordinator, a few
    /// nodes, a real ledger, a small model on the built-in corpus.
    Up(cmd::up::Args),
    /// Run a node daemon that joins a coordinator's run.
    Node(Box<cmd::node::Args>),
    /// Run a coordinator for a training run.
    Coordinator(cmd::coordinator::Args),
    /// Create or show a node identity key.
    #[command(subcommand)]
    Id(cmd::id::IdCommand),
    /// Vouch for nodes as an institution: create an org key, sign node
    /// certificates, inspect and revoke them.
    #[command(subcommand)]
    Org(cmd::org::OrgCommand),
    /// Turn text files into content-addressed token shards.
    Shard(cmd::shard::Args),
    /// Show the contribution table of a run.
    Stats(cmd::stats::Args),
    /// Check a run's public record from scratch: signatures, the manifest
    /// chain, plans, ledger totals, and (with --blobs) every params hash.
    Audit(cmd::audit::Args),
    /// Export a trained model for the Hugging Face ecosystem, with a model
    /// card that ties it to the run's record.
    Export(cmd::export::Args),
    /// Sample text from a checkpoint.
    Generate(cmd::generate::Args),
    /// Benchmarks that print ratios measured side by side in one run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Update codecs: encode and decode-add throughput against a plain read pass.
    Codec(cmd::bench_codec::Args),
    /// DiLoCo vs data-parallel training at equal tokens.
    Diloco(cmd::bench_diloco::Args),
    /// Node utilization with synchronous and with overlapped rounds: the
    /// same `up` run twice, side by side.
    Overlap(cmd::bench_overlap::Args),
    /// The attack suite: 12 attacks by 3 of 10 nodes, each against a clean run.
    Attacks(cmd::bench_attacks::Args),
    /// One coordinator against N simulated nodes: CPU per round by stage,
    /// memory, ledger time, message sizes and HTTP latency while rounds close.
    Coordinator(cmd::bench_coordinator::Args),
    /// Inner-loop throughput on one device: tokens/s, FLOP/s, MFU, peak memory.
    Train(cmd::bench_train::Args),
}

/// `barnraise up` runs every node's training in one process on a few cores.
/// candle's matmuls size their thread pool from RAYON_NUM_THREADS; left at the
/// core count, three nodes' pools oversubscribe the CPU and each round takes
/// about twice as long, so `up` runs each node's matmuls on one thread unless
/// the user chose otherwise.
#[allow(unsafe_code)]
fn one_matmul_thread_per_node() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: called first thing in main, before any thread exists, so no
        // other thread can be reading the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}

/// candle runs its element-wise CPU ops on a pool of its own beside rayon's
/// (which runs its matmuls and our kernels, trainer/src/cpu_ops.rs), both
/// sized to the core count, and the element-wise pool's threads spin about
/// a millisecond after each op waiting for the next: on two cores that spin
/// took a fifth of the CPU time of a `bench train --model small` step away
/// from the matmuls. With one thread (the caller's) for candle's element-wise
/// ops, `RAYON_NUM_THREADS=2 barnraise bench train --model small --steps
/// 40` gave 4,232-4,454 tokens/s against 3,508-3,702 (this 2-core machine,
/// alternating, two runs each). `CANDLE_NUM_THREADS` in the environment still
/// wins.
#[allow(unsafe_code)]
fn one_elementwise_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first thing in main, before any thread exists, so no
        // other thread can be reading the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
}

/// glibc gives every thread that allocates its own malloc arena (up to 8 per
/// core) and keeps each arena's freed memory. Training runs on blocking and
/// worker threads that come and go, so a node's resident memory settled at
/// 2-3x what it uses: `barnraise up` (3 nodes, `small`, 6 rounds) peaked at
/// 3.40 GB with the default and 1.49 GB with two arenas, and ran no slower
/// (32.8 s vs 36.8 s, same machine, one run each). `MALLOC_ARENA_MAX` in the
/// environment still wins.
///
/// Every tensor op allocates its result, and glibc serves blocks over its
/// mmap threshold (128 KiB at first, raised as blocks are freed) with fresh
/// pages and trims the heap's free top at twice that: each step paid for
/// page faults and zeroed pages again (15% of a `small` step's samples in
/// `perf` were in the kernel's fault and page-clearing paths). A 32 MiB
/// threshold (glibc's largest) and a 1 GiB trim threshold keep freed
/// tensors' memory for the next step: `RAYON_NUM_THREADS=N barnraise bench
/// train --model small`, builds without and with this, alternating, two
/// runs each, went from 2,195-2,232 to 2,966-3,042 tokens/s on one thread
/// and from 1,766-1,920 to 2,280-2,320 on two, peak memory 412-415 →
/// 416-417 MiB (this 2-core machine). `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_` in the environment still win.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    // SAFETY: mallopt only sets an allocator parameter; called first thing
    // in main, before any other thread exists.
    unsafe {
        if unset("MALLOC_ARENA_MAX") {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        if unset("MALLOC_MMAP_THRESHOLD_") && unset("MALLOC_TRIM_THRESHOLD_") {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> std::process::ExitCode {
    tune_malloc();
    one_elementwise_thread();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Up(_) | Command::Bench(BenchCommand::Attacks(_) | BenchCommand::Overlap(_))
    ) {
        one_matmul_thread_per_node();
    }
    let default_log = if matches!(
        cli.command,
        Command::Up(_)
            | Command::Bench(
                BenchCommand::Attacks(_) | BenchCommand::Coordinator(_) | BenchCommand::Overlap(_)
            )
    ) {
        "warn"
    } else {
        "info"
    };
    let log = cli.log.as_deref().unwrap_or(default_log);
    if let Err(e) = cmd::init_logging(cli.log_format, log) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(args),
        Command::Node(args) => cmd::node::run(*args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Id(command) => cmd::id::run(command),
        Command::Org(command) => cmd::org::run(command),
        Command::Shard(args) => cmd::shard::run(args),
        Command::Stats(args) => cmd::stats::run(args),
        Command::Audit(args) => cmd::audit::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(BenchCommand::Codec(args)) => cmd::bench_codec::run(args),
        Command::Bench(BenchCommand::Diloco(args)) => cmd::bench_diloco::run(args),
        Command::Bench(BenchCommand::Overlap(args)) => cmd::bench_overlap::run(args),
        Command::Bench(BenchCommand::Attacks(args)) => cmd::bench_attacks::run(args),
        Command::Bench(BenchCommand::Coordinator(args)) => cmd::bench_coordinator::run(args),
        Command::Bench(BenchCommand::Train(args)) => cmd::bench_train::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
