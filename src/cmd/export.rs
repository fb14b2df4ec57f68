//! `barnraise export`: a trained model in a format the ecosystem loads
//! (docs/running-a-coordinator.md, "Exporting the model"), with a model card
//! that ties the weights to the run's public record.

use anyhow::Context;
use barnraise_coordinator::card::{self, RecordFacts};
use barnraise_coordinator::ledger::Ledger;
use barnraise_coordinator::store::BlobStore;
use barnraise_protocol::Hash;
use barnraise_trainer::checkpoint::{self, Checkpoint};
use clap::Args as ClapArgs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Hugging Face `transformers` (LlamaForCausalLM, safetensors, tokenizer.json).
    Hf,
}

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["data_dir", "checkpoint"])))]
pub struct Args {
    /// A coordinator's data directory: export its latest checkpoint (or
    /// --round's), and write the run record beside it into OUT/record.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// With --data-dir: the round whose starting weights to export (θ_R,
    /// after R rounds) [default: the latest checkpoint].
    #[arg(long, requires = "data_dir")]
    round: Option<u64>,
    /// A checkpoint file (safetensors, as nodes and coordinators save them).
    #[arg(long, requires = "record")]
    checkpoint: Option<PathBuf>,
    /// The run record the checkpoint belongs to (`barnraise coordinator
    /// export-record` writes one); the weights must be θ of one of its rounds.
    #[arg(long, requires = "checkpoint")]
    record: Option<PathBuf>,
    /// Where to write the export (created; an earlier export is not overwritten).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Hf)]
    format: Format,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let Format::Hf = args.format;
    let (checkpoint, record_dir) = match (&args.data_dir, &args.checkpoint, &args.record) {
        (Some(data_dir), _, _) => {
            let checkpoint = checkpoint_in(data_dir, args.round)?;
            let record_dir = args.out.join("record");
            barnraise_coordinator::record::export(data_dir, &record_dir)
                .context("writing the run record")?;
            (checkpoint, record_dir)
        }
        (None, Some(path), Some(record)) => (
            checkpoint::load_any(path).context("reading the checkpoint")?,
            record.clone(),
        ),
        _ => anyhow::bail!("give --data-dir, or --checkpoint with --record"),
    };
    let facts = RecordFacts::read(&record_dir)?;
    let params_hash = checkpoint.meta.params_hash;
    let Some(round) = facts.round_of(&params_hash) else {
        anyhow::bail!(
            "the checkpoint's params hash {} is not θ of any round in the record of run '{}' \
             ({} rounds); export the record of the run it came from",
            params_hash.short(),
            facts.index.run_id,
            facts.index.rounds
        );
    };
    let card = card::render(&facts, round, &params_hash, &checkpoint.config);
    let written = barnraise_trainer::hf::export(
        &args.out,
        &checkpoint.config,
        &checkpoint.params,
        &checkpoint.meta,
        facts.tokenizer_json.as_deref(),
        &card,
    )?;
    println!(
        "exported θ of round {round} of run '{}' ({} parameters) to {}:",
        facts.index.run_id,
        checkpoint.params.len(),
        args.out.display()
    );
    for path in &written {
        println!("  {}", path.display());
    }
    if args.data_dir.is_some() {
        println!(
            "  {} (the run record; check it with `barnraise audit --record {}`)",
            record_dir.display(),
            record_dir.display()
        );
    }
    Ok(())
}

/// The checkpoint of θ_`round` (or the latest) from a coordinator's data dir.
pub fn checkpoint_in(data_dir: &Path, round: Option<u64>) -> anyhow::Result<Checkpoint> {
    let ledger = Ledger::open_existing(&barnraise_coordinator::ledger::ledger_path(data_dir))
        .with_context(|| format!("{} is not a coordinator's data dir", data_dir.display()))?;
    let blob = match round {
        None => {
            let latest = ledger
                .latest_checkpoint()?
                .context("the run has no checkpoint yet")?;
            latest.blob
        }
        // θ_R is what round R−1 closed on (θ_0: the first checkpoint).
        Some(0) => {
            ledger
                .checkpoint(0)?
                .context("the ledger has no checkpoint of round 0")?
                .blob
        }
        Some(r) => {
            ledger
                .rounds()?
                .into_iter()
                .find(|row| row.round + 1 == r)
                .with_context(|| {
                    format!("round {r} has not started: the run has closed fewer rounds")
                })?
                .params_blob
        }
    };
    let hash: Hash = blob.parse().context("the ledger's checkpoint blob name")?;
    let store = BlobStore::open(&data_dir.join("blobs"))?;
    let bytes = store.get(&hash)?.with_context(|| {
        format!(
            "the weights of that round ({}) are no longer in {}: the retention policy deleted them; \
             export a round whose checkpoint is kept",
            hash.short(),
            data_dir.join("blobs").display()
        )
    })?;
    Ok(checkpoint::from_bytes_any(&bytes, &store.path_of(&hash))?)
}
