//! `barnraise audit`: checks a run record from scratch (the checks are in
//! `barnraise_node::audit`; the record format in docs/protocol.md, "The run
//! record") and stops at the first fault, with a non-zero exit code.

use barnraise_protocol::PublicKey;
use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["record", "coordinator"])))]
pub struct Args {
    /// The record directory (`barnraise coordinator export-record` writes one).
    #[arg(long)]
    record: Option<PathBuf>,
    /// A running coordinator's HTTP address (e.g. http://127.0.0.1:8080):
    /// fetch its record (`/api/v1/record`) and check that.
    #[arg(long)]
    coordinator: Option<String>,
    /// With --coordinator: also keep the fetched record in this directory.
    #[arg(long, requires = "coordinator")]
    save: Option<PathBuf>,
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
    let fetched;
    let record = match (&args.record, &args.coordinator) {
        (Some(dir), _) => dir.clone(),
        (None, Some(url)) => {
            fetched = match &args.save {
                Some(dir) => Fetched::Kept(dir.clone()),
                None => Fetched::Temporary(tempfile::tempdir()?),
            };
            fetch_record(url, fetched.path())?;
            fetched.path().to_owned()
        }
        (None, None) => anyhow::bail!("give --record or --coordinator"),
    };
    let verdict = barnraise_node::audit::audit(&record, args.blobs.as_deref(), pinned.as_ref());
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

/// Where a fetched record lives.
enum Fetched {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl Fetched {
    fn path(&self) -> &std::path::Path {
        match self {
            Fetched::Kept(p) => p,
            Fetched::Temporary(t) => t.path(),
        }
    }
}

/// Downloads the record a coordinator serves into `dir`: the index, then
/// every file it lists (only names a record may hold). A file that does not
/// hash to its index entry means a round closed between the two requests;
/// the whole record is fetched again, up to three times.
fn fetch_record(url: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    use barnraise_coordinator::record::{RecordIndex, is_record_file};
    use barnraise_coordinator::stats::fetch_bytes;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut last_error = None;
    for _ in 0..3 {
        let index_json = runtime.block_on(fetch_bytes(url, "/api/v1/record"))?;
        let index: RecordIndex = serde_json::from_slice(&index_json)
            .map_err(|e| anyhow::anyhow!("{url}/api/v1/record is not a record index: {e}"))?;
        if let Some(bad) = index.files.keys().find(|n| !is_record_file(n)) {
            anyhow::bail!("{url} lists a file a record does not hold: {bad:?}");
        }
        let mut stale = None;
        for (name, hash) in &index.files {
            let bytes = runtime.block_on(fetch_bytes(url, &format!("/api/v1/record/{name}")))?;
            if barnraise_protocol::Hash::of(&bytes).to_hex() != *hash {
                stale = Some(name.clone());
                break;
            }
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes)?;
        }
        match stale {
            None => {
                std::fs::write(dir.join("index.json"), &index_json)?;
                return Ok(());
            }
            Some(name) => last_error = Some(name),
        }
    }
    anyhow::bail!(
        "{url} kept changing while it was fetched ({} did not match its index three times)",
        last_error.unwrap_or_default()
    )
}
