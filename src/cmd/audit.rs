//! `barnraise audit`: checks a run record from scratch (the checks are in
//! `barnraise_node::audit`; the record format in docs/protocol.md, "The run
//! record") and stops at the first fault, with a non-zero exit code.

use barnraise_protocol::PublicKey;
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The record directory (`barnraise coordinator export-record` writes one).
    #[arg(long)]
    record: PathBuf,
    /// A directory of blobs named by their SHA-256 in hex (a coordinator's
    /// `blobs/`, or updates gathered from peers): recompute θ for every round
    /// and check each params hash bit for bit.
    #[arg(long)]
    blobs: Option<PathBuf>,
    /// The coordinator key you expect (hex); the record's must match.
    #[arg(long)]
    coordinator_key: Option<String>,
    /// Print the verdict as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let pinned = match &args.coordinator_key {
        Some(hex) => Some(
            hex.parse::<PublicKey>()
                .map_err(|e| anyhow::anyhow!("--coordinator-key: {e}"))?,
        ),
        None => None,
    };
    let verdict =
        barnraise_node::audit::audit(&args.record, args.blobs.as_deref(), pinned.as_ref());
    if args.json {
        let value = match &verdict {
            Ok(report) => serde_json::json!({"ok": true, "report": report}),
            Err(fault) => serde_json::json!({"ok": false, "fault": fault}),
        };
        println!("{value:#}");
    }
    match verdict {
        Ok(report) => {
            if !args.json {
                println!(
                    "record of run '{}' checks out: {} rounds, {} signatures by {}, ledger totals of {} nodes{}",
                    report.run_id,
                    report.rounds,
                    report.signatures_checked,
                    &report.coordinator[..12],
                    report.nodes_checked,
                    if report.params_replayed {
                        format!(
                            ", params recomputed bit for bit to {}",
                            report
                                .final_params_hash
                                .as_deref()
                                .map(|h| &h[..12])
                                .unwrap_or("-")
                        )
                    } else {
                        " (params not recomputed: pass --blobs to do that)".to_string()
                    }
                );
            }
            Ok(())
        }
        Err(fault) => anyhow::bail!("the record does not check out: {fault}"),
    }
}
