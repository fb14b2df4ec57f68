//! `barnraise audit`: checks a run record (docs/protocol.md, "The run
//! record") from scratch, trusting nothing in it but the coordinator key it
//! names (or the one the auditor pins), and stops at the first fault with
//! the round and the field where it is.
//!
//! 1. Every file is the one the index names (SHA-256), and no round is missing.
//! 2. Every plan and manifest is signed by the coordinator, for this run
//!    and for its round.
//! 3. The chain holds: each manifest names the previous one's body hash and
//!    starts from the params the previous one ended on; each plan starts
//!    from its manifest's base and names the same previous manifest; the
//!    last manifest is the index's head.
//! 4. Each plan matches the run config (inner steps, shards of the dataset),
//!    and only nodes with work are accepted.
//! 5. Every credit a manifest voids is the node's credit since its last
//!    verified round (docs/security.md, "Clawback"), and the ledger's
//!    totals per node (tokens, accepted updates) are what the
//!    manifests add up to, less their voids.
//! 6. With the blobs (the accepted updates), θ is recomputed from the seeded
//!    θ_0 with the same `apply_round` every node runs, and each round's params
//!    hash is checked bit for bit.

use crate::daemon::{INIT_SEED, parse_run_config};
use barnraise_protocol::aggregate::apply_round;
use barnraise_protocol::messages::{Manifest, RoundPlan, RunConfig};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_protocol::record::{RECORD_FORMAT, read_capped, round_file};
use barnraise_protocol::{Hash, NodeId, PublicKey, Signed};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The first thing wrong with a record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    /// The round it is in, when it is in one.
    pub round: Option<u64>,
    /// What is wrong: a file, a field, a total.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.round {
            Some(round) => write!(f, "round {round}, {}: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// What a clean audit checked.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditReport {
    pub run_id: String,
    pub coordinator: String,
    pub rounds: u64,
    pub signatures_checked: u64,
    pub nodes_checked: usize,
    /// θ was recomputed for every round (blobs were given).
    pub params_replayed: bool,
    pub final_params_hash: Option<String>,
}

fn fault(round: Option<u64>, field: impl Into<String>, message: impl Into<String>) -> Fault {
    Fault {
        round,
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
struct Index {
    format: String,
    run_id: String,
    coordinator: String,
    rounds: u64,
    head_manifest: String,
    files: BTreeMap<String, String>,
}

/// What audit checks of a `rounds.json` row (the ledger's `RoundRow`).
#[derive(Debug, PartialEq, Deserialize)]
struct RoundRowFacts {
    round: u64,
    base_params_hash: String,
    next_params_hash: String,
    accepted: u64,
    rejected: u64,
    missing: u64,
}

/// What audit checks of a `checkpoints.json` row (the ledger's `CheckpointRow`).
#[derive(Deserialize)]
struct CheckpointFacts {
    round: u64,
    params_hash: String,
}

/// What audit checks of `dataset.json` (the dataset manifest).
#[derive(Deserialize)]
struct DatasetFacts {
    train: Vec<ShardFacts>,
    heldout: Vec<ShardFacts>,
}

#[derive(Deserialize)]
struct ShardFacts {
    hash: String,
    tokens: u64,
}

#[derive(Deserialize)]
struct Totals {
    node: String,
    tokens: u64,
    accepted: u64,
}

/// Audits the record in `record`; with `blobs` (a directory of blobs named
/// by their hex SHA-256, such as a coordinator's `blobs/`), also recomputes θ.
/// `pinned` is the coordinator key the auditor expects, if any.
pub fn audit(
    record: &Path,
    blobs: Option<&Path>,
    pinned: Option<&PublicKey>,
) -> Result<AuditReport, Fault> {
    let index_bytes =
        read_capped(&record.join("index.json")).map_err(|e| fault(None, "index.json", e))?;
    let index: Index = serde_json::from_slice(&index_bytes)
        .map_err(|e| fault(None, "index.json", format!("does not parse: {e}")))?;
    if index.format != RECORD_FORMAT {
        return Err(fault(
            None,
            "index.json",
            format!(
                "format '{}', this audit reads '{RECORD_FORMAT}'",
                index.format
            ),
        ));
    }
    let coordinator: PublicKey = index
        .coordinator
        .parse()
        .map_err(|e| fault(None, "index.json coordinator", format!("{e}")))?;
    if let Some(pinned) = pinned
        && *pinned != coordinator
    {
        return Err(fault(
            None,
            "index.json coordinator",
            format!("the record names {coordinator}, the auditor expects {pinned}"),
        ));
    }
    // 1. Files: each is read when its check needs it (one round at a time,
    // so memory does not grow with the run) and must hash to its index entry.
    if let Some(name) = index
        .files
        .keys()
        .find(|name| name.contains("..") || name.starts_with('/'))
    {
        return Err(fault(None, name.clone(), "a path outside the record"));
    }
    let load = |name: &str, round: Option<u64>| -> Result<Vec<u8>, Fault> {
        let expected = index
            .files
            .get(name)
            .ok_or_else(|| fault(round, name.to_string(), "missing from the record"))?;
        let bytes = read_capped(&record.join(name)).map_err(|e| fault(None, name, e))?;
        let actual = Hash::of(&bytes).to_hex();
        if actual != *expected {
            return Err(fault(
                None,
                name,
                format!(
                    "hashes to {}, the index says {}",
                    &actual[..12],
                    short(expected)
                ),
            ));
        }
        Ok(bytes)
    };
    let run: RunConfig = serde_json::from_slice(&load("run.json", None)?)
        .map_err(|e| fault(None, "run.json", format!("does not parse: {e}")))?;
    if run.run_id != index.run_id {
        return Err(fault(
            None,
            "run.json run_id",
            format!("'{}', the index says '{}'", run.run_id, index.run_id),
        ));
    }

    // 2–4. Signatures, the chain, plans against the config.
    let mut signatures = 0u64;
    let mut manifests: Vec<Manifest> = Vec::new();
    let mut previous = Hash::ZERO;
    let mut previous_next: Option<Hash> = None;
    for round in 0..index.rounds {
        let r = Some(round);
        let name = round_file("manifests", round);
        let signed: Signed<Manifest> = Signed::from_bytes(&load(&name, r)?)
            .map_err(|e| fault(r, name.clone(), format!("does not decode: {e}")))?;
        let manifest = signed
            .verify(Some(&coordinator))
            .map_err(|e| fault(r, name.clone(), format!("signature: {e}")))?;
        signatures += 1;
        if manifest.round != round || manifest.run_id != run.run_id {
            return Err(fault(
                r,
                format!("{name} round"),
                format!("is round {} of run '{}'", manifest.round, manifest.run_id),
            ));
        }
        if manifest.previous_manifest != previous {
            return Err(fault(
                r,
                "manifest previous_manifest",
                format!(
                    "{}, but the manifest of the round before is {}",
                    manifest.previous_manifest.short(),
                    previous.short()
                ),
            ));
        }
        if let Some(next) = previous_next
            && manifest.base_params_hash != next
        {
            return Err(fault(
                r,
                "manifest base_params_hash",
                format!(
                    "{}, but the round before ended on {}",
                    manifest.base_params_hash.short(),
                    next.short()
                ),
            ));
        }
        let plan_name = round_file("plans", round);
        let signed_plan: Signed<RoundPlan> = Signed::from_bytes(&load(&plan_name, r)?)
            .map_err(|e| fault(r, plan_name.clone(), format!("does not decode: {e}")))?;
        let plan = signed_plan
            .verify(Some(&coordinator))
            .map_err(|e| fault(r, plan_name.clone(), format!("signature: {e}")))?;
        signatures += 1;
        if plan.round != round || plan.run_id != run.run_id {
            return Err(fault(
                r,
                format!("{plan_name} round"),
                format!("is round {}", plan.round),
            ));
        }
        if plan.params_hash != manifest.base_params_hash {
            return Err(fault(
                r,
                "plan params_hash",
                "differs from the manifest's base",
            ));
        }
        if plan.previous_manifest != manifest.previous_manifest {
            return Err(fault(
                r,
                "plan previous_manifest",
                "differs from the manifest's",
            ));
        }
        for a in &plan.assignments {
            // The coordinator sizes work to each node's pace, within a
            // bounded spread of the run's H; the pace itself is its own
            // measurement (arrival times), which the record does not hold.
            let allowed = barnraise_protocol::limits::planned_steps_range(run.inner_steps);
            if !allowed.contains(&a.inner_steps) {
                return Err(fault(
                    r,
                    "plan inner_steps",
                    format!(
                        "{} for {}, outside {}..={} for the run's {}",
                        a.inner_steps,
                        a.node.short(),
                        allowed.start(),
                        allowed.end(),
                        run.inner_steps
                    ),
                ));
            }
            if let Err(index) = a.shard_hashes(&run.dataset) {
                return Err(fault(
                    r,
                    "plan shards",
                    format!(
                        "shard {index} for {} is past the run's dataset of {} shards",
                        a.node.short(),
                        run.dataset.len()
                    ),
                ));
            }
        }
        let planned: BTreeSet<NodeId> = plan.assignments.iter().map(|a| a.node).collect();
        if let Some(a) = manifest
            .accepted
            .iter()
            .find(|a| !planned.contains(&a.node))
        {
            return Err(fault(
                r,
                "manifest accepted",
                format!("{} had no work in the plan", a.node.short()),
            ));
        }
        previous = signed.body_hash();
        previous_next = Some(manifest.next_params_hash);
        manifests.push(manifest);
    }
    let head = previous.to_hex();
    if index.rounds > 0 && head != index.head_manifest {
        return Err(fault(
            None,
            "index.json head_manifest",
            format!(
                "{}, the last manifest is {}",
                short(&index.head_manifest),
                &head[..12]
            ),
        ));
    }
    // Any other listed file: inside the record's rounds, and what the index says.
    for name in index.files.keys() {
        let round = name
            .rsplit_once("round-")
            .and_then(|(_, rest)| rest.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        let checked = name == "run.json"
            || name == "ledger.json"
            || name == "rounds.json"
            || name == "checkpoints.json"
            || name == "dataset.json"
            || round.is_some_and(|r| {
                r < index.rounds
                    && (*name == round_file("plans", r) || *name == round_file("manifests", r))
            });
        if checked {
            continue;
        }
        if let Some(round) = round
            && round >= index.rounds
        {
            return Err(fault(
                Some(round),
                name.clone(),
                format!("beyond the record's {} rounds", index.rounds),
            ));
        }
        load(name, None)?;
    }

    // The ledger's round rows, when the record has them (a model card's
    // loss curve comes from them): the counts and hashes the manifests give.
    if index.files.contains_key("rounds.json") {
        let rows: Vec<RoundRowFacts> = serde_json::from_slice(&load("rounds.json", None)?)
            .map_err(|e| fault(None, "rounds.json", format!("does not parse: {e}")))?;
        if rows.len() != manifests.len() {
            return Err(fault(
                None,
                "rounds.json",
                format!("{} rounds, the manifests {}", rows.len(), manifests.len()),
            ));
        }
        for (row, m) in rows.iter().zip(&manifests) {
            let expected = RoundRowFacts {
                round: m.round,
                base_params_hash: m.base_params_hash.to_hex(),
                next_params_hash: m.next_params_hash.to_hex(),
                accepted: m.accepted.len() as u64,
                rejected: m.rejected.len() as u64,
                missing: m.missing.len() as u64,
            };
            if *row != expected {
                return Err(fault(
                    Some(m.round),
                    "rounds.json",
                    format!("{row:?}; the manifest gives {expected:?}"),
                ));
            }
        }
    }

    // The published checkpoints: each is θ of a round the manifests reach.
    if index.files.contains_key("checkpoints.json") {
        let rows: Vec<CheckpointFacts> =
            serde_json::from_slice(&load("checkpoints.json", None)?)
                .map_err(|e| fault(None, "checkpoints.json", format!("does not parse: {e}")))?;
        for row in &rows {
            let expected = match row.round.checked_sub(1) {
                None => manifests.first().map(|m| m.base_params_hash),
                Some(r) => manifests.get(r as usize).map(|m| m.next_params_hash),
            };
            if expected.map(|h| h.to_hex()) != Some(row.params_hash.clone()) {
                return Err(fault(
                    Some(row.round),
                    "checkpoints.json",
                    format!(
                        "the checkpoint of round {} has params {}, the manifests give {}",
                        row.round,
                        short(&row.params_hash),
                        expected.map_or("no such round".into(), |h| h.short())
                    ),
                ));
            }
        }
    }
    // The dataset manifest, when present: the shards the run config names.
    if index.files.contains_key("dataset.json") {
        let dataset: DatasetFacts = serde_json::from_slice(&load("dataset.json", None)?)
            .map_err(|e| fault(None, "dataset.json", format!("does not parse: {e}")))?;
        let listed = |entries: &[ShardFacts]| -> Vec<(String, u64)> {
            entries.iter().map(|e| (e.hash.clone(), e.tokens)).collect()
        };
        let named = |infos: &[barnraise_protocol::messages::ShardInfo]| -> Vec<(String, u64)> {
            infos.iter().map(|i| (i.hash.to_hex(), i.tokens)).collect()
        };
        if listed(&dataset.train) != named(&run.dataset)
            || listed(&dataset.heldout) != named(&run.held_out)
        {
            return Err(fault(
                None,
                "dataset.json",
                "its shards are not the ones run.json names",
            ));
        }
    }

    // 5. Clawback: every void is the node's credit since its last verified
    // round, recomputed; then the ledger's totals against the manifests,
    // less what they voided.
    if let Err(e) = barnraise_protocol::credit::Unverified::replay(&manifests) {
        return Err(fault(Some(e.round()), "manifest voided", e.to_string()));
    }
    let mut from_manifests: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for m in &manifests {
        for a in &m.accepted {
            let entry = from_manifests.entry(a.node.to_string()).or_default();
            entry.0 += a.tokens;
            entry.1 += 1;
        }
        for v in &m.voided {
            let entry = from_manifests.entry(v.node.to_string()).or_default();
            entry.0 = entry.0.saturating_sub(v.tokens);
        }
    }
    let totals: Vec<Totals> = serde_json::from_slice(&load("ledger.json", None)?)
        .map_err(|e| fault(None, "ledger.json", format!("does not parse: {e}")))?;
    for t in &totals {
        let (tokens, accepted) = from_manifests.get(&t.node).copied().unwrap_or((0, 0));
        if (t.tokens, t.accepted) != (tokens, accepted) {
            return Err(fault(
                None,
                format!("ledger.json {}", short(&t.node)),
                format!(
                    "{} tokens in {} accepted updates; the manifests give {tokens} in {accepted}",
                    t.tokens, t.accepted
                ),
            ));
        }
    }
    if let Some((node, _)) = from_manifests
        .iter()
        .find(|(node, _)| !totals.iter().any(|t| &t.node == *node))
    {
        return Err(fault(
            None,
            "ledger.json",
            format!(
                "the manifests credit {}, the ledger does not list it",
                short(node)
            ),
        ));
    }

    // 6. θ, bit for bit.
    let mut final_params_hash = manifests.last().map(|m| m.next_params_hash.to_hex());
    if let Some(blobs) = blobs {
        final_params_hash = Some(replay(&run, &manifests, blobs)?.to_hex());
    }
    Ok(AuditReport {
        run_id: run.run_id,
        coordinator: coordinator.to_hex(),
        rounds: index.rounds,
        signatures_checked: signatures,
        nodes_checked: totals.len(),
        params_replayed: blobs.is_some(),
        final_params_hash,
    })
}

/// Recomputes θ over every round from the seeded init.
fn replay(run: &RunConfig, manifests: &[Manifest], blobs: &Path) -> Result<Hash, Fault> {
    let (model, _codec, rule) =
        parse_run_config(run).map_err(|e| fault(None, "run.json", e.to_string()))?;
    let mut theta = model.init_flat(INIT_SEED);
    let mut optimizer = OuterOptimizer::new(
        OuterConfig {
            lr: run.outer_lr,
            momentum: run.outer_momentum,
            ..OuterConfig::default()
        },
        theta.len(),
    );
    let mut hash = Hash::of_f32s(&theta);
    for m in manifests {
        let r = Some(m.round);
        if m.base_params_hash != hash {
            return Err(fault(
                r,
                "manifest base_params_hash",
                format!(
                    "{}, the replayed params are {}",
                    m.base_params_hash.short(),
                    hash.short()
                ),
            ));
        }
        let mut payloads = Vec::with_capacity(m.accepted.len());
        for a in &m.accepted {
            let path = blobs.join(a.update_hash.to_hex());
            let bytes = read_capped(&path).map_err(|e| {
                fault(
                    r,
                    format!("update {}", a.update_hash.short()),
                    format!("{}: {e}", path.display()),
                )
            })?;
            if Hash::of(&bytes) != a.update_hash {
                return Err(fault(
                    r,
                    format!("update {}", a.update_hash.short()),
                    "the blob does not hash to its name",
                ));
            }
            payloads.push((bytes, a.weight));
        }
        let updates: Vec<(&[u8], f32)> = payloads.iter().map(|(b, w)| (b.as_slice(), *w)).collect();
        apply_round(&mut theta, &mut optimizer, &rule, &updates)
            .map_err(|e| fault(r, "accepted updates", e.to_string()))?;
        hash = Hash::of_f32s(&theta);
        if hash != m.next_params_hash {
            return Err(fault(
                r,
                "manifest next_params_hash",
                format!(
                    "{}, but applying its accepted updates gives {}",
                    m.next_params_hash.short(),
                    hash.short()
                ),
            ));
        }
    }
    Ok(hash)
}

fn short(hex: &str) -> &str {
    hex.get(..12).unwrap_or(hex)
}
