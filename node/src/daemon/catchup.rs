//! Catching up: how a node that joins late, restarts, or fell behind reaches
//! θ of the round now open, trusting nothing it cannot check.
//!
//! ```text
//! start: our saved θ_s (if s ≥ the checkpoint's round and s ≤ r)
//!        else the coordinator's checkpoint θ_c (from peers or the coordinator)
//!        else the seeded init θ_0
//!   └─► for each round s..r: fetch its signed manifest
//!         ─► signature, run, round, base hash == hash(θ), previous_manifest == last one
//!         ─► fetch its accepted updates ─► apply_round ─► hash == next_params_hash
//!   └─► hash(θ) == the Welcome's params hash, last manifest == the Welcome's head
//! ```
//!
//! A checkpoint is published every `checkpoint_every` rounds, so a node that
//! joins in between replays at most `checkpoint_every − 1` manifests: the same
//! deterministic `apply_round` every node runs each round (docs/protocol.md,
//! "Catching up"). A saved state that does not replay (another run under the
//! same id, a damaged file) is set aside for the checkpoint; a checkpoint that
//! does not replay means the coordinator's record contradicts itself, and the
//! node refuses to follow it.

use super::{Applied, Node, NodeError, SyncSource};
use barnraise_protocol::Hash;
use barnraise_protocol::Signed;
use barnraise_protocol::aggregate::AggregationRule;
use barnraise_protocol::messages::{CoordinatorRequest, CoordinatorResponse, Manifest, Welcome};
use barnraise_protocol::outer::{OuterConfig, OuterOptimizer};
use barnraise_trainer::ModelConfig;

/// θ of the current round, and how we got there.
pub(super) struct CaughtUp {
    pub theta: Vec<f32>,
    pub optimizer: OuterOptimizer,
    pub source: SyncSource,
    /// The update we committed this round before a restart, if any.
    pub committed: Option<(u64, Hash)>,
    /// Manifests replayed on top of the source.
    pub replayed: u64,
}

/// How a replay ended.
enum Replay {
    Done {
        replayed: u64,
    },
    Stopped,
    /// The coordinator's record and our params part ways; says where.
    Diverged(String),
    /// Something we need is not to be had right now; join again later.
    Unavailable(String),
}

impl Node {
    /// Brings θ to the Welcome's round: from our saved state, else the
    /// checkpoint, else the seeded init, replaying every manifest since.
    pub(super) async fn catch_up(
        &mut self,
        welcome: &Welcome,
        model: &ModelConfig,
        rule: AggregationRule,
        outer: OuterConfig,
    ) -> Result<Option<CaughtUp>, NodeError> {
        let run_id = &welcome.config.run_id;
        let target = welcome.current_round;
        let checkpoint_round = welcome.checkpoint.as_ref().map(|c| c.round);
        let params = model.params_count();

        // 1. Our own saved state, when it is no older than the checkpoint.
        let saved = match self.state.load() {
            Ok(saved) => saved,
            Err(e) => {
                self.warn(format!("ignoring saved state: {e}"));
                None
            }
        };
        // Its params hash was checked against its record when it loaded.
        if let Some((saved, start)) = saved
            .filter(|s| {
                s.record.run_id == *run_id
                    && s.params.len() == params
                    && s.record.round <= target
                    && checkpoint_round.is_none_or(|c| s.record.round >= c)
            })
            .and_then(|s| {
                let start = s.record.params_hash.parse::<Hash>().ok()?;
                Some((s, start))
            })
        {
            let from = saved.record.round;
            let committed = if from == target {
                saved
                    .record
                    .committed
                    .as_ref()
                    .and_then(|(r, h)| Some((*r, h.parse::<Hash>().ok()?)))
            } else {
                None
            };
            let mut theta = saved.params;
            let mut optimizer = OuterOptimizer::from_state(outer, saved.momentum);
            match self
                .replay(rule, &mut theta, &mut optimizer, from, start, welcome)
                .await?
            {
                Replay::Done { replayed } => {
                    return Ok(Some(CaughtUp {
                        theta,
                        optimizer,
                        source: SyncSource::SavedState,
                        committed,
                        replayed,
                    }));
                }
                Replay::Stopped => return Ok(None),
                Replay::Unavailable(reason) => return Err(NodeError::CatchUp(reason)),
                Replay::Diverged(reason) => self.warn(format!(
                    "our saved state of round {from} does not lead to the coordinator's round \
                     {target} ({reason}); starting from its checkpoint instead"
                )),
            }
        }

        // 2. The seeded init, when the checkpoint is θ_0 and the init
        //    reproduces it: nothing to download (outer momentum starts at
        //    zero). 3. The coordinator's checkpoint.
        let init = match &welcome.checkpoint {
            Some(c) if c.round > 0 => None,
            checkpoint => {
                let init = model.clone();
                let (theta, hash) = tokio::task::spawn_blocking(move || {
                    let theta = init.init_flat(super::INIT_SEED);
                    let hash = Hash::of_f32s(&theta);
                    (theta, hash)
                })
                .await
                .map_err(|e| NodeError::Training(e.to_string()))?;
                match checkpoint {
                    Some(c) if c.params_hash != hash => None,
                    _ => Some((theta, hash)),
                }
            }
        };
        let (mut theta, momentum, from, start, source) = match (init, &welcome.checkpoint) {
            (Some((theta, hash)), _) => (theta, vec![0.0; params], 0, hash, SyncSource::SeededInit),
            // `load_checkpoint` checked the params against `params_hash`.
            (None, Some(checkpoint)) => {
                let Some((theta, momentum)) =
                    self.load_checkpoint(checkpoint, model, run_id).await?
                else {
                    return Ok(None);
                };
                (
                    theta,
                    momentum,
                    checkpoint.round,
                    checkpoint.params_hash,
                    SyncSource::Checkpoint,
                )
            }
            // Without a checkpoint the init is always taken above.
            (None, None) => {
                return Err(NodeError::RunConfig(
                    "the run has neither a checkpoint nor a usable init".into(),
                ));
            }
        };
        if from > target {
            return Err(NodeError::Chain(format!(
                "the welcome names a checkpoint of round {from}, after its current round {target}"
            )));
        }
        let mut optimizer = OuterOptimizer::from_state(outer, momentum);
        match self
            .replay(rule, &mut theta, &mut optimizer, from, start, welcome)
            .await?
        {
            Replay::Done { replayed } => Ok(Some(CaughtUp {
                theta,
                optimizer,
                source,
                committed: None,
                replayed,
            })),
            Replay::Stopped => Ok(None),
            Replay::Unavailable(reason) => Err(NodeError::CatchUp(reason)),
            Replay::Diverged(reason) => Err(NodeError::Chain(format!(
                "from the {source:?} of round {from}: {reason} (is the coordinator using the \
                 same model code and init seed?)"
            ))),
        }
    }

    /// Applies the manifests of rounds `from..welcome.current_round` to
    /// `theta`, whose params hash `start` the caller has already checked,
    /// checking every link, and ends on the Welcome's hashes.
    #[allow(clippy::too_many_arguments)]
    async fn replay(
        &mut self,
        rule: AggregationRule,
        theta: &mut Vec<f32>,
        optimizer: &mut OuterOptimizer,
        from: u64,
        start: Hash,
        welcome: &Welcome,
    ) -> Result<Replay, NodeError> {
        let target = welcome.current_round;
        if from == target {
            return Ok(if start == welcome.params_hash {
                Replay::Done { replayed: 0 }
            } else {
                Replay::Diverged(format!(
                    "params hash to {}, but the coordinator's round {target} params hash to {}",
                    start.short(),
                    welcome.params_hash.short()
                ))
            });
        }
        tracing::info!(
            from,
            to = target,
            "catching up: replaying {} manifests",
            target - from
        );
        let mut head: Option<Hash> = None;
        let mut hash = start;
        for round in from..target {
            let (signed, manifest) = match self.past_manifest(round, &welcome.config.run_id).await?
            {
                None => return Ok(Replay::Stopped),
                Some(Err(reason)) => return Ok(Replay::Unavailable(reason)),
                Some(Ok(found)) => found,
            };
            if let Some(previous) = head
                && manifest.previous_manifest != previous
            {
                return Ok(Replay::Diverged(format!(
                    "the manifest of round {round} extends {}, not the manifest of round {} ({})",
                    manifest.previous_manifest.short(),
                    round - 1,
                    previous.short()
                )));
            }
            if manifest.base_params_hash != hash {
                return Ok(Replay::Diverged(format!(
                    "the manifest of round {round} starts from {}, our params are {}",
                    manifest.base_params_hash.short(),
                    hash.short()
                )));
            }
            match self
                .apply_manifest(rule, theta, optimizer, &manifest)
                .await?
            {
                None => return Ok(Replay::Stopped),
                Some(Applied::Unavailable(reason)) => return Ok(Replay::Unavailable(reason)),
                Some(Applied::Mismatch { reason, .. }) => return Ok(Replay::Diverged(reason)),
                Some(Applied::Matched(next)) => hash = next,
            }
            head = Some(signed.body_hash());
            self.keep_receipt(&signed, &manifest).await;
            self.remember_applied(&signed, &manifest);
            self.prune(&manifest, round + 1).await;
            tracing::info!(round, params = %manifest.next_params_hash.short(), "replayed");
        }
        if hash != welcome.params_hash {
            return Ok(Replay::Diverged(format!(
                "replaying to round {target} gives params {}, the welcome says {}",
                hash.short(),
                welcome.params_hash.short()
            )));
        }
        if head != Some(welcome.head_manifest) {
            return Ok(Replay::Diverged(format!(
                "the last replayed manifest is {}, the welcome's head is {}",
                head.map(|h| h.short()).unwrap_or_default(),
                welcome.head_manifest.short()
            )));
        }
        Ok(Replay::Done {
            replayed: target - from,
        })
    }

    /// The signed manifest of a closed round, asked of the coordinator and
    /// checked: its signature, its run and its round. `Some(Err)` says why
    /// it could not be had.
    async fn past_manifest(
        &mut self,
        round: u64,
        run_id: &str,
    ) -> Result<Option<Result<(Signed<Manifest>, Manifest), String>>, NodeError> {
        let Some(response) = self.ask(CoordinatorRequest::Manifest { round }).await? else {
            return Ok(None);
        };
        let signed = match response {
            CoordinatorResponse::Manifest(Some(signed)) => signed,
            CoordinatorResponse::Manifest(None) => {
                return Ok(Some(Err(format!(
                    "the coordinator has no manifest for round {round}"
                ))));
            }
            CoordinatorResponse::Refused { reason } => {
                return Ok(Some(Err(format!(
                    "the coordinator refused the manifest of round {round}: {reason}"
                ))));
            }
            other => {
                return Ok(Some(Err(format!(
                    "unexpected answer to a request for manifest {round}: {other:?}"
                ))));
            }
        };
        let manifest = match signed.verify(self.coordinator_key.as_ref()) {
            Ok(manifest) => manifest,
            Err(e) => {
                return Ok(Some(Err(format!(
                    "the manifest of round {round} does not verify: {e}"
                ))));
            }
        };
        if manifest.round != round || manifest.run_id != run_id {
            return Err(NodeError::Chain(format!(
                "asked for the manifest of round {round} of run '{run_id}', got round {} of '{}'",
                manifest.round, manifest.run_id
            )));
        }
        Ok(Some(Ok((signed, manifest))))
    }
}
