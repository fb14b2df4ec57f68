//! The model card of an exported model (docs/running-a-coordinator.md,
//! "Exporting the model"): where the weights came from, read from a run
//! record, so anyone holding the export can check its provenance with
//! `barnraise audit`.
//!
//! The card names the round the weights are θ of, the run and its record
//! (the SHA-256 of the record's `index.json`, which pins every other file),
//! the dataset (the shard list in the record's `run.json`), the tokens that
//! went into the weights, the held-out loss of every round, and every
//! contributor — node and org — with its share of the credit.

use crate::ledger::{ContributorRow, RoundRow, roll_up_orgs};
use crate::record::RecordIndex;
use barnraise_protocol::messages::{Manifest, RunConfig};
use barnraise_protocol::record::round_file;
use barnraise_protocol::{Hash, PublicKey, Signed};
use std::fmt::Write;
use std::path::Path;

/// What a card says, read from a run record.
#[derive(Clone, Debug)]
pub struct RecordFacts {
    pub index: RecordIndex,
    /// SHA-256 of `index.json`: the record's identity.
    pub index_hash: Hash,
    pub run: RunConfig,
    /// SHA-256 of `run.json` (model, hyperparameters, every shard's hash).
    pub run_hash: Hash,
    pub contributors: Vec<ContributorRow>,
    pub rounds: Vec<RoundRow>,
    /// θ_r's params hash for r = 0..=rounds, from the signed manifests.
    pub params: Vec<Hash>,
    /// Tokens accepted in each round, from the manifests.
    pub round_tokens: Vec<u64>,
    /// The run's `tokenizer.json`, when it is not byte-level.
    pub tokenizer_json: Option<Vec<u8>>,
    /// SHA-256 of the dataset manifest (`dataset.json`), when the record has it.
    pub dataset_hash: Option<Hash>,
}

#[derive(Debug, thiserror::Error)]
#[error("run record {path}: {reason}")]
pub struct CardError {
    pub path: String,
    pub reason: String,
}

impl RecordFacts {
    /// Reads the record in `dir`. Every file must be the one the index
    /// names, and every manifest signed by the index's coordinator; the
    /// rest of what `barnraise audit` checks (the chain, plans, totals, θ)
    /// is left to it.
    pub fn read(dir: &Path) -> Result<RecordFacts, CardError> {
        let fail = |reason: String| CardError {
            path: dir.display().to_string(),
            reason,
        };
        let read = |name: &str| -> Result<Vec<u8>, CardError> {
            barnraise_protocol::record::read_capped(&dir.join(name))
                .map_err(|e| fail(format!("{name}: {e}")))
        };
        let index_bytes = read("index.json")?;
        let index: RecordIndex = serde_json::from_slice(&index_bytes)
            .map_err(|e| fail(format!("index.json does not parse: {e}")))?;
        let checked = |name: &str| -> Result<Vec<u8>, CardError> {
            let bytes = read(name)?;
            let listed = index
                .files
                .get(name)
                .ok_or_else(|| fail(format!("the index does not list {name}")))?;
            if Hash::of(&bytes).to_hex() != *listed {
                return Err(fail(format!("{name} is not the file the index names")));
            }
            Ok(bytes)
        };
        let run_bytes = checked("run.json")?;
        let run: RunConfig = serde_json::from_slice(&run_bytes)
            .map_err(|e| fail(format!("run.json does not parse: {e}")))?;
        let contributors: Vec<ContributorRow> = serde_json::from_slice(&checked("ledger.json")?)
            .map_err(|e| fail(format!("ledger.json does not parse: {e}")))?;
        let rounds: Vec<RoundRow> = if index.files.contains_key("rounds.json") {
            serde_json::from_slice(&checked("rounds.json")?)
                .map_err(|e| fail(format!("rounds.json does not parse: {e}")))?
        } else {
            Vec::new()
        };
        let tokenizer_json = if index.files.contains_key(crate::record::TOKENIZER_FILE) {
            Some(checked(crate::record::TOKENIZER_FILE)?)
        } else {
            None
        };
        let dataset_hash = if index.files.contains_key(crate::record::DATASET_FILE) {
            Some(Hash::of(&checked(crate::record::DATASET_FILE)?))
        } else {
            None
        };
        let coordinator: PublicKey = index
            .coordinator
            .parse()
            .map_err(|e| fail(format!("the index's coordinator key: {e}")))?;
        let mut params = Vec::new();
        let mut round_tokens = Vec::new();
        for round in 0..index.rounds {
            let name = round_file("manifests", round);
            let manifest = Signed::<Manifest>::from_bytes(&checked(&name)?)
                .map_err(|e| e.to_string())
                .and_then(|s| s.verify(Some(&coordinator)).map_err(|e| e.to_string()))
                .map_err(|e| fail(format!("{name}: {e}")))?;
            if params.is_empty() {
                params.push(manifest.base_params_hash);
            }
            params.push(manifest.next_params_hash);
            round_tokens.push(manifest.accepted.iter().map(|a| a.tokens).sum());
        }
        Ok(RecordFacts {
            index_hash: Hash::of(&index_bytes),
            index,
            run_hash: Hash::of(&run_bytes),
            run,
            contributors,
            rounds,
            params,
            round_tokens,
            tokenizer_json,
            dataset_hash,
        })
    }

    /// The round `r` whose starting params θ_r hash to `params_hash`, if the
    /// record has them.
    pub fn round_of(&self, params_hash: &Hash) -> Option<u64> {
        self.params
            .iter()
            .position(|h| h == params_hash)
            .map(|r| r as u64)
    }
}

/// The card for θ_`round` of the record's run, as `README.md` with the
/// front matter the Hugging Face hub reads.
pub fn render(
    facts: &RecordFacts,
    round: u64,
    params_hash: &Hash,
    model: &barnraise_trainer::ModelConfig,
) -> String {
    let params = model.params_count();
    let mut s = String::new();
    let run = &facts.run;
    let tokens: u64 = facts.round_tokens.iter().take(round as usize).sum();
    let short = |h: &str| h.get(..16).unwrap_or(h).to_string();
    let _ = writeln!(
        s,
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- barnraise\n- llama\n- decentralized-training\n---\n"
    );
    let _ = writeln!(s, "# {} — the weights after round {round}\n", run.run_id);
    let _ = writeln!(
        s,
        "Trained with barnraise on community compute: {} nodes \
         trained locally and exchanged compressed pseudo-gradients (DiLoCo), and a \
         coordinator checked every update before it counted. Everything that went \
         into these weights is in the run record named below, signed, and checkable \
         with `barnraise audit`.\n",
        facts.contributors.len()
    );
    let _ = writeln!(s, "| | |\n| --- | --- |");
    let _ = writeln!(s, "| run | `{}` |", run.run_id);
    let _ = writeln!(
        s,
        "| weights | θ at the start of round {round} ({round} of {} rounds closed), params hash `{}` |",
        facts.index.rounds,
        params_hash.to_hex()
    );
    let tokenizer = match &facts.tokenizer_json {
        Some(json) => format!(
            "the run's `tokenizer.json` (SHA-256 `{}`)",
            Hash::of(json).to_hex()
        ),
        None => "bytes".into(),
    };
    let _ = writeln!(
        s,
        "| model | Llama architecture, {params} parameters, {} layers of width {}, context {}, vocabulary of {} ({tokenizer}) |",
        model.n_layers, model.d_model, model.max_seq_len, model.vocab_size
    );
    let train_tokens: u64 = run.dataset.iter().map(|d| d.tokens).sum();
    let manifest = facts
        .dataset_hash
        .map(|h| format!("; dataset manifest `dataset.json` SHA-256 `{}`", h.to_hex()))
        .unwrap_or_default();
    let _ = writeln!(
        s,
        "| dataset | {} training shards ({train_tokens} tokens) and {} held out; every shard's SHA-256 is in the record's `run.json` (SHA-256 `{}`){manifest} |",
        run.dataset.len(),
        run.held_out.len(),
        facts.run_hash.to_hex()
    );
    let _ = writeln!(s, "| tokens in these weights | {tokens} |");
    let _ = writeln!(
        s,
        "| training | {} inner steps of batch {} × {} tokens per round, outer lr {} and momentum {}, codec `{}`, aggregation `{}` |",
        run.inner_steps,
        run.batch_size,
        run.seq_len,
        run.outer_lr,
        run.outer_momentum,
        run.codec,
        run.aggregation
    );
    let _ = writeln!(
        s,
        "| run record | `index.json` SHA-256 `{}`, {} rounds, coordinator key `{}` |\n",
        facts.index_hash.to_hex(),
        facts.index.rounds,
        short(&facts.index.coordinator)
    );

    let curve: Vec<&RoundRow> = facts
        .rounds
        .iter()
        .filter(|r| r.round < round && r.eval_loss.is_some())
        .collect();
    if !curve.is_empty() {
        let _ = writeln!(
            s,
            "## Held-out loss\n\nMean next-token cross-entropy (nats) on the held-out shards after each round.\n\n| after round | held-out loss | updates accepted |\n| --- | --- | --- |"
        );
        for r in curve {
            let _ = writeln!(
                s,
                "| {} | {:.4} | {} |",
                r.round,
                r.eval_loss.unwrap_or(f64::NAN),
                r.accepted
            );
        }
        let _ = writeln!(s);
    }

    let total_credit: f64 = facts.contributors.iter().map(|c| c.credit).sum();
    let share = |credit: f64| {
        if total_credit > 0.0 {
            format!("{:.1}%", 100.0 * credit / total_credit)
        } else {
            "-".into()
        }
    };
    let _ = writeln!(
        s,
        "## Contributors\n\nEvery node that took part, with the tokens credited to it over the whole run and its share of the FLOP credit (the ledger's totals, in the record's `ledger.json`).\n\n| node | org | tokens credited | share of credit |\n| --- | --- | --- | --- |"
    );
    for c in &facts.contributors {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} |",
            short(&c.node),
            cell(c.org_name.as_deref().unwrap_or("independent")),
            c.tokens,
            share(c.credit)
        );
    }
    let orgs = roll_up_orgs(&facts.contributors);
    let _ = writeln!(
        s,
        "\n| org | nodes | tokens credited | share of credit |\n| --- | --- | --- | --- |"
    );
    for o in &orgs {
        let name = match (&o.org, &o.org_name) {
            (None, _) => "independent volunteers".to_string(),
            (Some(key), name) => name.as_deref().map_or_else(|| short(key), cell),
        };
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} |",
            o.nodes,
            o.tokens,
            share(o.credit)
        );
    }
    let _ = writeln!(
        s,
        "\n## Check it yourself\n\nWith the run record (and, to recompute θ bit for bit, the accepted updates):\n\n```sh\nbarnraise audit --record RECORD_DIR [--blobs BLOBS_DIR]\n```\n\nThe audit checks every signature, the manifest chain, each plan against the run config and the ledger totals against the manifests; with the blobs it replays every round's outer step and checks each params hash, including `{}`.",
        params_hash.to_hex()
    );
    s
}

/// `text` as one Markdown table cell: org names are free text an org chose,
/// so a `|`, a line break or HTML in one must not reshape the card.
fn cell(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::svg::escape(&flat).replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_org_name_stays_in_its_cell() {
        let name = "Evil | Lab\n<script>alert(1)</script> & co";
        let text = cell(name);
        assert!(!text.contains('\n') && !text.contains('<'), "{text}");
        assert_eq!(text.matches('|').count(), text.matches("\\|").count());
        assert_eq!(
            text,
            "Evil \\| Lab &lt;script&gt;alert(1)&lt;/script&gt; &amp; co"
        );
    }
}
