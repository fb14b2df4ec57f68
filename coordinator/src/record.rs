//! The run record: a directory of plain files anyone can host and anyone
//! can check with `barnraise audit` (docs/protocol.md, "The run record").
//!
//! ```text
//! index.json                  format, run id, coordinator key, rounds, head manifest,
//!                             and the SHA-256 of every other file
//! run.json                    the run config nodes were given (model, codec, data, …)
//! plans/round-NNNNNN.plan     each round's signed plan, as stored
//! manifests/round-NNNNNN.manifest   each round's signed manifest, as stored
//! ledger.json                 the ledger's totals per node (what the dashboard shows)
//! rounds.json                 each closed round's ledger row: counts, losses, params hashes
//! tokenizer.json              the dataset's tokenizer, for runs that are not byte-level
//! dataset.json                the dataset manifest (tokenizer, vocabulary, every shard)
//! checkpoints.json            every published checkpoint: round, blob and params hashes
//! ```
//!
//! Nothing in it needs trusting: plans and manifests carry the coordinator's
//! signature, the chain of manifests ties the rounds together, and the
//! ledger's totals are recomputed from the manifests by the audit.

use crate::ledger::{Ledger, LedgerError};
use barnraise_protocol::Hash;
use barnraise_protocol::messages::{Manifest, RunConfig};
pub use barnraise_protocol::record::{RECORD_FORMAT, round_file};
use barnraise_protocol::{PublicKey, Signed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the coordinator keeps the run config it gives nodes.
pub const RUN_CONFIG_FILE: &str = "run-config.json";
/// The dataset's tokenizer, kept in the data dir and in the record when the
/// run is not byte-level.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The dataset manifest (`barnraise shard`'s `dataset.json`), kept in the
/// data dir and in the record.
pub const DATASET_FILE: &str = "dataset.json";

/// The record's table of contents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordIndex {
    pub format: String,
    pub run_id: String,
    /// The key every plan and manifest must be signed with (hex).
    pub coordinator: String,
    /// Closed rounds: manifests 0..rounds.
    pub rounds: u64,
    /// Body hash of the last manifest (hex), the head of the chain.
    pub head_manifest: String,
    /// Every other file, by path relative to the record, with its SHA-256 (hex).
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A record in memory: its index, the index as written (`index.json`), and
/// every other file by path.
#[derive(Clone, Debug)]
pub struct Built {
    pub index: RecordIndex,
    pub index_json: Vec<u8>,
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Writes the record of the run in `data_dir` (a coordinator's, stopped or
/// running: the ledger is read in one pass) to `out`, which must not exist
/// or be empty.
pub fn export(data_dir: &Path, out: &Path) -> Result<RecordIndex, RecordError> {
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(RecordError::Invalid(format!(
            "{} exists and is not empty; choose a new directory",
            out.display()
        )));
    }
    let ledger = Ledger::open_existing(&crate::ledger::ledger_path(data_dir))?;
    let built = build(&ledger, data_dir)?;
    for dir in ["plans", "manifests"] {
        std::fs::create_dir_all(out.join(dir)).map_err(io(out))?;
    }
    for (path, bytes) in &built.files {
        let path = out.join(path);
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let index_path = out.join("index.json");
    std::fs::write(&index_path, &built.index_json).map_err(io(&index_path))?;
    Ok(built.index)
}

/// The record of the run whose ledger is `ledger` and data dir `data_dir`,
/// in memory (what `export` writes and the HTTP API serves).
pub fn build(ledger: &Ledger, data_dir: &Path) -> Result<Built, RecordError> {
    let run_id = ledger
        .run_id()?
        .ok_or_else(|| RecordError::Invalid("the ledger names no run".into()))?;
    let run_path = data_dir.join(RUN_CONFIG_FILE);
    let run_json = std::fs::read(&run_path).map_err(io(&run_path))?;
    let run: RunConfig = serde_json::from_slice(&run_json)
        .map_err(|e| RecordError::Invalid(format!("{} does not parse: {e}", run_path.display())))?;
    if run.run_id != run_id {
        return Err(RecordError::Invalid(format!(
            "{} is for run '{}', the ledger for '{run_id}'",
            run_path.display(),
            run.run_id
        )));
    }
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    files.insert("run.json".into(), run_json);
    for name in [TOKENIZER_FILE, DATASET_FILE] {
        let path = data_dir.join(name);
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            files.insert(name.into(), bytes);
        }
    }
    // Every published checkpoint (`CheckpointRow`: round, blob hashes,
    // params hash); audit checks each params hash against the manifests.
    files.insert(
        "checkpoints.json".into(),
        serde_json::to_vec_pretty(&ledger.checkpoints()?)
            .map_err(|e| RecordError::Invalid(e.to_string()))?,
    );
    let mut coordinator: Option<PublicKey> = None;
    let mut head = Hash::ZERO;
    let rounds = ledger.rounds()?;
    for row in &rounds {
        let bytes = ledger.manifest(row.round)?.ok_or_else(|| {
            RecordError::Invalid(format!(
                "the ledger has no manifest for round {}",
                row.round
            ))
        })?;
        let signed: Signed<Manifest> = Signed::from_bytes(&bytes)
            .map_err(|e| RecordError::Invalid(format!("manifest {}: {e}", row.round)))?;
        coordinator.get_or_insert(signed.signer);
        head = signed.body_hash();
        files.insert(round_file("manifests", row.round), bytes);
    }
    for (round, bytes) in ledger.plans()? {
        // Only closed rounds: an open round's plan belongs to the next record.
        if round < rounds.len() as u64 {
            files.insert(round_file("plans", round), bytes);
        }
    }
    // Each closed round as the ledger has it (`RoundRow`): the held-out loss
    // curve a model card shows; audit checks its counts and hashes against
    // the manifests.
    files.insert(
        "rounds.json".into(),
        serde_json::to_vec_pretty(&rounds).map_err(|e| RecordError::Invalid(e.to_string()))?,
    );
    // The ledger's rows as the HTTP API serves them (`ContributorRow`).
    files.insert(
        "ledger.json".into(),
        serde_json::to_vec_pretty(&ledger.contributors()?)
            .map_err(|e| RecordError::Invalid(e.to_string()))?,
    );
    let coordinator = match coordinator {
        Some(key) => key,
        None => barnraise_protocol::SigningKey::load(&data_dir.join("coordinator.key"))
            .map_err(|e| RecordError::Invalid(format!("the coordinator key: {e}")))?
            .public(),
    };
    let index = RecordIndex {
        format: RECORD_FORMAT.into(),
        run_id,
        coordinator: coordinator.to_hex(),
        rounds: rounds.len() as u64,
        head_manifest: head.to_hex(),
        files: files
            .iter()
            .map(|(path, bytes)| (path.clone(), Hash::of(bytes).to_hex()))
            .collect(),
    };
    let index_json =
        serde_json::to_vec_pretty(&index).map_err(|e| RecordError::Invalid(e.to_string()))?;
    Ok(Built {
        index,
        index_json,
        files,
    })
}

/// Whether `name` is a file a record may hold: what an auditor fetching a
/// record from a server writes to disk, so nothing else (no `..`, no
/// absolute path) is taken.
pub fn is_record_file(name: &str) -> bool {
    let round_file_of = |dir: &str, ext: &str| {
        name.strip_prefix(dir)
            .and_then(|rest| rest.strip_prefix("/round-"))
            .and_then(|rest| rest.strip_suffix(ext))
            .is_some_and(|n| n.len() >= 6 && n.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(
        name,
        "run.json"
            | "ledger.json"
            | "rounds.json"
            | "checkpoints.json"
            | TOKENIZER_FILE
            | DATASET_FILE
    ) || round_file_of("plans", ".plan")
        || round_file_of("manifests", ".manifest")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_records_own_file_names_are_taken() {
        for good in [
            "run.json",
            "ledger.json",
            "rounds.json",
            "tokenizer.json",
            "dataset.json",
            "checkpoints.json",
            "plans/round-000000.plan",
            "manifests/round-000123.manifest",
            "manifests/round-1234567.manifest",
        ] {
            assert!(is_record_file(good), "{good}");
        }
        for bad in [
            "../run.json",
            "/etc/passwd",
            "plans/../../x.plan",
            "plans/round-00001.plan",
            "plans/round-0000a0.plan",
            "manifests/round-000001.plan",
            "index.json",
            "blobs/abc",
            "",
        ] {
            assert!(!is_record_file(bad), "{bad}");
        }
    }
}
