//! `barnraise stats`: the contribution table of a run, from a running
//! coordinator (`--coordinator http://HOST:PORT`) or a stopped one's data
//! dir (`--data-dir DIR`, read from its ledger), per node or rolled up per
//! org, as a table, JSON or CSV.

use barnraise_coordinator::stats::{self, By, Format};
use clap::{Args as ClapArgs, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Table,
    Json,
    Csv,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ByArg {
    Node,
    Org,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A running coordinator's HTTP address, e.g. http://127.0.0.1:8080.
    #[arg(
        long,
        conflicts_with = "data_dir",
        required_unless_present = "data_dir"
    )]
    coordinator: Option<String>,
    /// A coordinator's data dir (its ledger is read; the coordinator may be stopped).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Output format; CSV is RFC 4180 (quoted fields, CRLF line ends).
    #[arg(long, value_enum, default_value = "table")]
    format: FormatArg,
    /// Same as `--format json`.
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// One line per node, or per org (nodes without a certificate together as independent).
    #[arg(long, value_enum, default_value = "node")]
    by: ByArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rows = match (&args.coordinator, &args.data_dir) {
        (Some(url), _) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(stats::fetch_contributors(url))?
        }
        (None, Some(dir)) => stats::read_contributors(dir)?,
        (None, None) => anyhow::bail!("give --coordinator URL or --data-dir DIR"),
    };
    let format = match (args.json, args.format) {
        (true, _) | (false, FormatArg::Json) => Format::Json,
        (false, FormatArg::Table) => Format::Table,
        (false, FormatArg::Csv) => Format::Csv,
    };
    let by = match args.by {
        ByArg::Node => By::Node,
        ByArg::Org => By::Org,
    };
    print!("{}", stats::render(&rows, by, format)?);
    Ok(())
}
