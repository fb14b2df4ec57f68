//! Committing our update: the workers' starting states are stored for spot
//! checks, Δ is encoded with error feedback (the run's codec for this
//! round), stored as a blob, and announced to the coordinator in a signed
//! Commit; the record of the commit is saved so that a restart in the same
//! round waits for the manifest instead of training again.

use super::train::Trained;
use super::{MAX_BACKOFF, Node, NodeError, NodeEvent, Synced, off_runtime};
use crate::metrics::NodeMetrics;
use crate::state::StateRecord;
use barnraise_protocol::Signed;
use barnraise_protocol::codec::Encoder;
use barnraise_protocol::messages::{Commit, CoordinatorRequest, CoordinatorResponse, RoundPlan};
use std::time::Duration;

impl Node {
    /// Encodes, stores and commits `trained`. `None` means we were stopped.
    pub(super) async fn commit_update(
        &mut self,
        state: &mut Synced,
        plan: &RoundPlan,
        trained: Trained,
    ) -> Result<Option<()>, NodeError> {
        let round = plan.round;
        let Trained {
            update, compute_ms, ..
        } = trained;
        let started = std::time::Instant::now();
        // The workers' starting states: served until the round closes, in
        // case the coordinator spot checks a worker (docs/security.md). Only
        // the coordinator asks, and it asks this node, so they are not
        // announced in the DHT. Written (and synced) while Δ is encoded:
        // the one waits on the disk, the other on a core.
        let store = self.store.clone();
        let states = update.states;
        let state_bytes: u64 = states.iter().map(|s| s.len() as u64).sum();
        // Served behind our updates: a drawn state is checked after the
        // round if need be, while peers wait on the update to apply it.
        let stored = off_runtime(move || {
            states
                .iter()
                .map(|bytes| {
                    let hash = store.put(bytes)?;
                    store.serve_in_background(hash);
                    Ok(hash)
                })
                .collect::<Result<Vec<_>, crate::store::StoreError>>()
        });
        let mut delta = update.delta;
        if let Some(misbehaviour) = self.config.misbehave
            && misbehaviour != crate::config::Misbehaviour::Inflate
        {
            tracing::warn!(
                round,
                "red-team mode: corrupting this update ({misbehaviour})"
            );
            misbehaviour.apply(&mut delta);
        }
        if let Some(adversary) = self.adversary.clone() {
            delta = off_runtime(move || {
                adversary.corrupt_delta(round, &mut delta);
                delta
            })
            .await?;
        }
        let (encoded, stored) = tokio::join!(self.encode(state, round, delta), stored);
        self.forget_old_states(round, stored??, state_bytes);
        let mut payload = encoded?;
        if let Some(adversary) = &self.adversary {
            adversary.corrupt_payload(round, &mut payload);
        }
        let store = self.store.clone();
        let update_bytes = payload.len() as u64;
        let update_hash = off_runtime(move || store.put(&payload)).await??;
        let last_loss = update.losses.last().copied();
        let commit = Commit {
            run_id: state.run.run_id.clone(),
            round,
            base_params_hash: plan.params_hash,
            update_hash,
            update_bytes,
            tokens: update.tokens,
            losses: update
                .losses
                .iter()
                .copied()
                .take(barnraise_protocol::limits::MAX_REPORTED_LOSSES)
                .collect(),
            compute_ms,
            workers: update.workers,
            shares: update.shares,
        };
        let prepare_ms = started.elapsed().as_millis() as u64;
        let Some(response) = self.send_commit(&commit).await? else {
            return Ok(None);
        };
        let commit_ms = started.elapsed().as_millis() as u64 - prepare_ms;
        let announced = std::time::Instant::now();
        // Announced only once the commit is in: a copier who fetched the
        // blob from the DHT before the coordinator saw our commit would be
        // the "first" committer, and ours the copy (docs/security.md).
        let _ = self.client.start_providing(update_hash).await;
        if let Some(adversary) = &self.adversary {
            adversary.committed(round);
        }
        if self.send_spam(round, &commit).await?.is_none() {
            return Ok(None);
        }
        match response {
            CoordinatorResponse::CommitAccepted { .. } | CoordinatorResponse::Ok => {
                NodeMetrics::add(&self.metrics.updates_committed, 1);
            }
            CoordinatorResponse::Refused { reason } => {
                NodeMetrics::add(&self.metrics.commits_refused, 1);
                self.warn(format!(
                    "coordinator refused our commit for round {round}: {reason}"
                ))
            }
            other => tracing::debug!("unexpected answer to commit: {other:?}"),
        }
        state.committed = Some((round, update_hash));
        let record = StateRecord {
            run_id: state.run.run_id.clone(),
            round,
            params_hash: plan.params_hash.to_hex(),
            codec: state.run.codec.clone(),
            committed: Some((round, update_hash.to_hex())),
        };
        let dir = self.state.clone();
        off_runtime(move || dir.save_record(&record)).await??;
        tracing::debug!(
            round,
            after_ms = announced.elapsed().as_millis() as u64,
            "commit announced and recorded"
        );
        self.summary.rounds_trained += 1;
        self.summary.tokens_trained += commit.tokens;
        NodeMetrics::add(&self.metrics.rounds_trained, 1);
        NodeMetrics::add(&self.metrics.tokens_trained, commit.tokens);
        NodeMetrics::add(&self.metrics.update_bytes, update_bytes);
        if let Some(loss) = last_loss {
            self.metrics.set_loss(loss);
        }
        tracing::info!(round, update = %update_hash.short(), bytes = update_bytes, loss = last_loss.unwrap_or(f32::NAN), prepare_ms, commit_ms, "committed update");
        self.emit(NodeEvent::Committed {
            round,
            update_hash,
            bytes: update_bytes,
            tokens: commit.tokens,
        });
        Ok(Some(()))
    }

    /// Δ encoded with the round's codec and the error-feedback residual,
    /// on a blocking thread; the new residual is saved there too, so a
    /// restart keeps it.
    async fn encode(
        &mut self,
        state: &mut Synced,
        round: u64,
        delta: Vec<f32>,
    ) -> Result<Vec<u8>, NodeError> {
        let mut encoder = state.encoder.take().ok_or_else(|| {
            NodeError::Background("the codec's state was lost by an earlier failure".into())
        })?;
        let round_codec = state.codec.codec_at(round);
        let decay = state.codec.decay();
        let dir = self.state.clone();
        let (encoder, encoded) = off_runtime(move || {
            if encoder.config() != round_codec {
                // The run's density warm-up moved on: same residual, new codec.
                match Encoder::from_residual(round_codec, encoder.params(), encoder.residual()) {
                    Ok(next) => encoder = next.with_decay(decay),
                    Err(e) => {
                        let error = NodeError::Training(format!("codec of round {round}: {e}"));
                        return (encoder, Err(error));
                    }
                }
            }
            let encoded = encoder
                .encode(&delta)
                .map_err(|e| NodeError::Training(format!("encoding the update: {e}")))
                .and_then(|payload| {
                    dir.save_residual(encoder.residual())?;
                    Ok(payload)
                });
            (encoder, encoded)
        })
        .await?;
        state.encoder = Some(encoder);
        encoded
    }

    /// Sends the signed commit. A busy or rate-limited coordinator asks us
    /// to retry: a few times, backing off, before the commit counts as
    /// refused. `None` means we were stopped.
    async fn send_commit(
        &mut self,
        commit: &Commit,
    ) -> Result<Option<CoordinatorResponse>, NodeError> {
        let signed =
            Signed::sign(&self.key, commit).map_err(|e| NodeError::Training(e.to_string()))?;
        let mut backoff = Duration::from_secs(1);
        let mut attempts = 0;
        loop {
            let Some(response) = self.ask(CoordinatorRequest::Commit(signed.clone())).await? else {
                return Ok(None);
            };
            attempts += 1;
            match &response {
                CoordinatorResponse::Refused { reason }
                    if barnraise_protocol::messages::is_retry_later(reason) && attempts < 5 =>
                {
                    tracing::info!(
                        round = commit.round,
                        "the coordinator asks us to wait: {reason}"
                    );
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                _ => return Ok(Some(response)),
            }
        }
    }

    /// Red-team hook: the extra commits an adversary sends after ours.
    async fn send_spam(&mut self, round: u64, commit: &Commit) -> Result<Option<()>, NodeError> {
        let spam = match &self.adversary {
            Some(adversary) => adversary.spam(round, commit),
            None => Vec::new(),
        };
        if spam.is_empty() {
            return Ok(Some(()));
        }
        tracing::warn!(round, "red-team mode: sending {} extra commits", spam.len());
        for extra in spam {
            let signed =
                Signed::sign(&self.key, &extra).map_err(|e| NodeError::Training(e.to_string()))?;
            if self
                .ask(CoordinatorRequest::Commit(signed))
                .await?
                .is_none()
            {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }
}
