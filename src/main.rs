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
    /// Log filter, e.g. `info` or `barnraise_node=debug` (RUST_LOG syntax).
    #[arg(long, global = true, default_value = "info", env = "BARNRAISE_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole network in this process on loopback: a coordinator, a few
    /// nodes, a real ledger, a small model on the built-in corpus.
    Up(cmd::up::Args),
    /// Run a node daemon that joins a coordinator's run.
    Node(cmd::node::Args),
    /// Run a coordinator for a training run.
    Coordinator(cmd::coordinator::Args),
    /// Create or show a node identity key.
    #[command(subcommand)]
    Id(cmd::id::IdCommand),
    /// Turn text files into content-addressed token shards.
    Shard(cmd::shard::Args),
    /// Show the contribution table of a run.
    Stats(cmd::stats::Args),
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cmd::init_logging(cli.log_format, &cli.log) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Up(args) => cmd::up::run(args),
        Command::Node(args) => cmd::node::run(args),
        Command::Coordinator(args) => cmd::coordinator::run(args),
        Command::Id(command) => cmd::id::run(command),
        Command::Shard(args) => cmd::shard::run(args),
        Command::Stats(args) => cmd::stats::run(args),
        Command::Bench(BenchCommand::Codec(args)) => cmd::bench_codec::run(args),
        Command::Bench(BenchCommand::Diloco(args)) => cmd::bench_diloco::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
