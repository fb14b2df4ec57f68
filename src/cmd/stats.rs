//! `barnraise stats`: the contribution table of a run, from a running
//! coordinator (`--coordinator http://HOST:PORT`) or a stopped one's data
//! dir (`--data-dir DIR`, read from its ledger).

use barnraise_coordinator::stats;
use clap::Args as ClapArgs;
use std::path::PathBuf;

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
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", stats::render_contributors(&rows));
    }
    Ok(())
}
