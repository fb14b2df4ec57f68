//! What the coordinator tells its embedder: live [`CoordinatorEvent`]s, the
//! [`LiveStatus`] behind `/api/v1/run`, the [`RunSummary`] read back from
//! the ledger when the run ends (or from a stopped coordinator's data dir),
//! and the per-round [`RunOverview`] behind the dashboard, with the bytes
//! plain data-parallel training would have moved ([`data_parallel_bytes`]).

use crate::ledger::{ContributorRow, Ledger, LedgerError};
use barnraise_protocol::messages::RejectedUpdate;
use barnraise_protocol::{Hash, NodeId};
use barnraise_trainer::ModelConfig;
use serde::Serialize;

/// A change the embedder may want to show (e.g. `barnraise up`'s progress).
#[derive(Clone, Debug, PartialEq)]
pub enum CoordinatorEvent {
    NodeJoined {
        node: NodeId,
    },
    RoundOpened {
        round: u64,
        nodes: usize,
    },
    RoundClosed {
        round: u64,
        accepted: usize,
        rejected: Vec<RejectedUpdate>,
        missing: usize,
        mean_loss: Option<f64>,
        eval_loss: Option<f64>,
        params_hash: Hash,
    },
    /// The held-out loss of the θ round `round` closed on, when it was
    /// evaluated after the round's manifest went out (every round but the
    /// last; the last one's is in its `RoundClosed`).
    RoundEvaluated {
        round: u64,
        eval_loss: f64,
    },
    RunFinished,
}

/// The run as it stands, for the HTTP API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LiveStatus {
    pub run_id: String,
    pub model_params: usize,
    pub codec: String,
    pub aggregation: String,
    pub inner_steps: u32,
    pub total_rounds: u64,
    /// The round now open or about to open.
    pub current_round: u64,
    /// `waiting`, `open`, `closing` or `finished`.
    pub phase: String,
    pub active_nodes: usize,
    pub params_hash: String,
    pub head_manifest: String,
    pub train_shards: usize,
    pub multiaddrs: Vec<String>,
    /// Every node that had work, by reputation (served at
    /// `/api/v1/reputation`, not with the run's status).
    #[serde(skip)]
    pub reputation: Vec<crate::reputation::ReputationView>,
}

/// One closed round in a summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundSummary {
    pub round: u64,
    pub accepted: u64,
    /// `(node, reason code)` of every rejected update.
    pub rejected: Vec<(String, String)>,
    pub missing: u64,
    pub mean_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub bytes_received: u64,
    pub next_params_hash: String,
}

/// The run's outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub run_id: Option<String>,
    pub rounds: Vec<RoundSummary>,
    pub contributors: Vec<ContributorRow>,
    /// What the network moved while this coordinator ran (zero when read
    /// back from a ledger alone).
    pub network: NetworkTotals,
}

/// Bytes moved, from the coordinator's counters and its ledger
/// (docs/protocol.md, "Traffic counters"). `barnraise up` adds what the
/// nodes served each other.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetworkTotals {
    /// Everything the coordinator sent: its answers, blobs and gossip.
    pub coordinator_egress_bytes: u64,
    /// Everything it received: requests and the updates it pulled.
    pub coordinator_ingress_bytes: u64,
    /// Of the egress: training shards,
    pub coordinator_shard_bytes: u64,
    /// checkpoints and outer-optimizer state,
    pub coordinator_state_bytes: u64,
    /// updates (as the provider of last resort),
    pub coordinator_update_bytes: u64,
    /// and everything that is not blob data: plans, manifests, welcomes and
    /// other answers, gossip it published, framing.
    pub coordinator_message_bytes: u64,
    /// Blob bytes nodes served to other nodes (not to the coordinator).
    pub peer_served_bytes: u64,
    /// The sum of accepted updates' sizes over the run.
    pub update_bytes: u64,
}

impl RunSummary {
    /// Reads the summary from a ledger.
    pub fn from_ledger(ledger: &Ledger) -> Result<RunSummary, LedgerError> {
        let mut rounds = Vec::new();
        let mut update_bytes = 0;
        for row in ledger.rounds()? {
            let updates = ledger.updates(row.round)?;
            update_bytes += updates
                .iter()
                .filter(|u| u.verdict == "accepted")
                .map(|u| u.bytes)
                .sum::<u64>();
            let rejected = updates
                .into_iter()
                .filter(|u| u.verdict == "rejected")
                .map(|u| (u.node, u.reason.unwrap_or_default()))
                .collect();
            rounds.push(RoundSummary {
                round: row.round,
                accepted: row.accepted,
                rejected,
                missing: row.missing,
                mean_loss: row.mean_loss,
                eval_loss: row.eval_loss,
                bytes_received: row.bytes_received,
                next_params_hash: row.next_params_hash,
            });
        }
        Ok(RunSummary {
            run_id: ledger.run_id()?,
            rounds,
            contributors: ledger.contributors()?,
            network: NetworkTotals {
                update_bytes,
                ..NetworkTotals::default()
            },
        })
    }
}

/// Bytes plain data-parallel training would move for `inner_steps` optimizer
/// steps on `replicas` replicas of a `params`-parameter model: a ring
/// all-reduce of fp32 gradients every step, 2(k−1)/k · 4P bytes sent per
/// replica per step. Zero for one replica (nothing to exchange).
pub fn data_parallel_bytes(params: u64, replicas: u64, inner_steps: u64) -> u64 {
    if replicas < 2 {
        return 0;
    }
    let per_step = 2 * (replicas - 1) * 4 * params / replicas;
    per_step
        .saturating_mul(inner_steps)
        .saturating_mul(replicas)
}

/// One closed round as the dashboard shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RoundOverview {
    pub round: u64,
    pub opened_ms: u64,
    pub closed_ms: u64,
    /// Nodes that had work in the round.
    pub assigned: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    pub late: u64,
    /// Tokens of the accepted updates.
    pub tokens: u64,
    pub credit: f64,
    /// Mean training loss of the accepted updates.
    pub mean_loss: Option<f64>,
    /// Held-out loss of the params after the round.
    pub eval_loss: Option<f64>,
    /// Bytes of the updates the coordinator fetched.
    pub update_bytes: u64,
    /// What data-parallel training would have moved for the same steps on
    /// the nodes that delivered; `None` when the run's model is unknown.
    pub data_parallel_bytes: Option<u64>,
    pub next_params_hash: String,
}

/// The whole run, round by round.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunOverview {
    pub run_id: Option<String>,
    /// Model size and H, from the run config stored in the ledger.
    pub params: Option<u64>,
    pub inner_steps: Option<u64>,
    pub rounds: Vec<RoundOverview>,
    pub update_bytes: u64,
    pub data_parallel_bytes: Option<u64>,
    /// `data_parallel_bytes / update_bytes`.
    pub communication_reduction: Option<f64>,
}

/// Model size and inner steps from a stored `CoordinatorConfig` JSON. Read
/// field by field, so a ledger written by another barnraise version still
/// yields what it can.
fn run_shape(config_json: &str) -> (Option<u64>, Option<u64>) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(config_json) else {
        return (None, None);
    };
    let model = match value.get("model_config") {
        Some(c) if !c.is_null() => serde_json::from_value::<ModelConfig>(c.clone()).ok(),
        _ => value
            .get("model")
            .and_then(|m| m.as_str())
            .and_then(ModelConfig::preset),
    };
    let params = model.map(|m| m.params_count() as u64);
    let inner_steps = value.get("inner_steps").and_then(|h| h.as_u64());
    (params, inner_steps)
}

impl RunOverview {
    pub fn from_ledger(ledger: &Ledger) -> Result<RunOverview, LedgerError> {
        let (params, inner_steps) = ledger
            .run_config_json()?
            .map(|json| run_shape(&json))
            .unwrap_or((None, None));
        let activity = ledger.round_activity()?;
        let rounds: Vec<RoundOverview> = ledger
            .rounds()?
            .into_iter()
            .map(|row| {
                let a = activity.iter().find(|a| a.round == row.round);
                let delivered = row.accepted + row.rejected;
                RoundOverview {
                    round: row.round,
                    opened_ms: row.opened_ms,
                    closed_ms: row.closed_ms,
                    assigned: a.map_or(delivered + row.missing, |a| a.assigned),
                    accepted: row.accepted,
                    rejected: row.rejected,
                    missing: row.missing,
                    late: a.map_or(0, |a| a.late),
                    tokens: a.map_or(0, |a| a.tokens),
                    credit: a.map_or(0.0, |a| a.credit),
                    mean_loss: row.mean_loss,
                    eval_loss: row.eval_loss,
                    update_bytes: row.bytes_received,
                    data_parallel_bytes: params
                        .zip(inner_steps)
                        .map(|(p, h)| data_parallel_bytes(p, delivered, h)),
                    next_params_hash: row.next_params_hash,
                }
            })
            .collect();
        let update_bytes = rounds.iter().map(|r| r.update_bytes).sum();
        let data_parallel: Option<u64> = rounds.iter().map(|r| r.data_parallel_bytes).sum();
        Ok(RunOverview {
            run_id: ledger.run_id()?,
            params,
            inner_steps,
            communication_reduction: data_parallel
                .filter(|_| update_bytes > 0)
                .map(|dp| dp as f64 / update_bytes as f64),
            data_parallel_bytes: data_parallel,
            update_bytes,
            rounds,
        })
    }
}
