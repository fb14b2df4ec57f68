//! What the coordinator tells its embedder: live [`CoordinatorEvent`]s, the
//! [`LiveStatus`] behind `/api/v1/run`, and the [`RunSummary`] read back from
//! the ledger when the run ends (or from a stopped coordinator's data dir).

use crate::ledger::{ContributorRow, Ledger, LedgerError};
use barnraise_protocol::messages::RejectedUpdate;
use barnraise_protocol::{Hash, NodeId};
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
}

impl RunSummary {
    /// Reads the summary from a ledger.
    pub fn from_ledger(ledger: &Ledger) -> Result<RunSummary, LedgerError> {
        let mut rounds = Vec::new();
        for row in ledger.rounds()? {
            let rejected = ledger
                .updates(row.round)?
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
        })
    }
}
