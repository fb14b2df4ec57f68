//! Closing a round: the close job (verification, aggregation, the outer
//! step, signing, the ledger transaction) runs on a blocking thread; its
//! result is folded back into the actor's state, published, and what the
//! retention policy lets go is deleted.

use super::startup::{checkpoint_row, parse_hash};
use super::*;

impl Service {
    pub(super) async fn on_internal(&mut self, message: Internal) -> Result<(), CoordinatorError> {
        match message {
            Internal::Checked {
                round,
                node,
                update,
                result,
                states_until_ms,
            } => {
                if result.is_ok() {
                    self.announce_update(round, node, update).await;
                }
                self.rounds.update_checked(round, &node, result);
                if let Some(until_ms) = states_until_ms {
                    self.rounds.states_pending(round, &node, until_ms);
                }
                Ok(())
            }
            Internal::StatesIn {
                round,
                node,
                results,
            } => {
                self.on_states(round, node, results);
                Ok(())
            }
            Internal::DeferredReplayed { key, settled } => {
                self.on_deferred_replayed(key, settled);
                Ok(())
            }
            Internal::Closed(done) => {
                let done = (*done)?;
                self.finish_close(done).await
            }
            Internal::Evaluated {
                round,
                eval_loss,
                took,
            } => {
                self.metrics.stages.add(Stage::Probe, took);
                // Evaluations finish in round order (each close waits for
                // the one before), so this is the newest figure.
                Metrics::set_f64(&self.metrics.last_eval_loss, Some(eval_loss));
                tracing::info!(
                    round,
                    eval_loss,
                    eval_ms = took.as_millis() as u64,
                    "held-out loss of the round's θ"
                );
                let _ = self
                    .events
                    .send(CoordinatorEvent::RoundEvaluated { round, eval_loss });
                Ok(())
            }
        }
    }

    /// Evaluates the θ that round `round` closed on (the current state) on
    /// the held-out shard, on a blocking thread while nodes train the next
    /// round, and records it in `round`'s ledger row: the evaluation only
    /// reports, so it stays off the path between the deadline and the
    /// manifest (docs/architecture.md, "Closing a round").
    pub(super) fn spawn_eval(&mut self, round: u64) {
        let (Some(heldout), Some(state)) = (self.heldout.clone(), self.state.as_ref()) else {
            return;
        };
        let theta = state.theta.clone();
        let model = self.resolved.model.clone();
        let verify = self.config.verify.clone();
        let seq_len = self.config.seq_len as usize;
        let ledger = self.ledger.clone();
        let tx = self.internal_tx.clone();
        let previous = self.eval_task.take();
        self.eval_task = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let evaluated = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let loss = crate::probe::heldout_eval(&model, &verify, seq_len, &theta, &heldout)
                    .map_err(|e| e.to_string())?;
                let eval_loss = f64::from(loss);
                ledger
                    .lock()
                    .map_err(|_| "ledger lock poisoned".to_string())?
                    .set_eval_loss(round, eval_loss)
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((eval_loss, started.elapsed()))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            match evaluated {
                Ok((eval_loss, took)) => {
                    let _ = tx
                        .send(Internal::Evaluated {
                            round,
                            eval_loss,
                            took,
                        })
                        .await;
                }
                // The run goes on; the round's chart point stays empty.
                Err(e) => tracing::warn!(round, "held-out evaluation: {e}"),
            }
        }));
    }

    pub(super) fn begin_close(&mut self, close: CloseRound) -> Result<(), CoordinatorError> {
        let Some(state) = self.state.take() else {
            return Err(CoordinatorError::Internal(
                "a round closed while another was closing".into(),
            ));
        };
        self.open_plan = None;
        // Drawn states not in when the round closes are checked after it,
        // against θ_r as the early checks hold it (`super::deferred`).
        let input = self
            .early
            .as_ref()
            .filter(|early| early.round() == close.plan.round)
            .and_then(|early| early.input())
            .filter(|_| self.defers_states_of(close.plan.round));
        let (settled, pending) = self.deferred.for_close(input);
        let defer = self.deferred.can_defer();
        let states_out = self.deferred.states_out();
        let job = CloseJob {
            config: self.config.clone(),
            resolved: self.resolved.clone(),
            key: self.key.clone(),
            store: self.store.clone(),
            ledger: self.ledger.clone(),
            dataset: self.dataset.clone(),
            heldout: self.heldout.clone(),
            state,
            close,
            recent: self.recent.clone(),
            unverified: self.unverified.clone(),
            run_config: self.run_config.clone(),
            early: close::Early::default(),
            settled,
            pending,
            defer,
            states_out,
            prev: self.prev_round.clone(),
        };
        let tx = self.internal_tx.clone();
        // The last round's evaluation has had the whole round to finish;
        // the close waits for it so the two never share the CPU. Early
        // replays not yet started are dropped, running ones waited for.
        let evaluating = self.eval_task.take();
        let early = self
            .early
            .take()
            .filter(|early| early.round() == job.close.plan.round);
        tracing::debug!(round = job.close.plan.round, "round closing");
        self.close_task = Some(tokio::spawn(async move {
            let mut job = job;
            if let Some(evaluating) = evaluating {
                let _ = evaluating.await;
            }
            tracing::debug!(round = job.close.plan.round, "close job starts");
            if let Some(early) = early {
                job.early = early.finish().await;
            }
            let result = tokio::task::spawn_blocking(move || job.run())
                .await
                .unwrap_or_else(|e| {
                    Err(CoordinatorError::Internal(format!("round close task: {e}")))
                });
            let _ = tx.send(Internal::Closed(Box::new(result))).await;
        }));
        Ok(())
    }

    /// Deletes what the retention policy no longer keeps now that round
    /// `closed` has closed (`crate::retention`): the superseded state
    /// `old`, checkpoints past the newest `keep_checkpoints` (never θ_0),
    /// and with `keep_update_rounds` an old round's updates. Shards, the
    /// current state `keep` and kept checkpoints are never touched.
    pub(super) async fn apply_retention(
        &self,
        closed: u64,
        old: Vec<Hash>,
        keep: Vec<Hash>,
    ) -> Result<(), CoordinatorError> {
        let policy = self.config.retention.clone();
        let ledger = self.ledger.clone();
        let store = self.store.clone();
        let dataset = self.dataset.clone();
        // Ledger reads and deleting files of θ's size: off the async threads.
        tokio::task::spawn_blocking(move || {
            let ledger = ledger
                .lock()
                .map_err(|_| CoordinatorError::Internal("ledger lock poisoned".into()))?;
            let checkpoints = ledger.checkpoints()?;
            let rounds: Vec<u64> = checkpoints.iter().map(|c| c.round).collect();
            let dropped = crate::retention::checkpoints_to_drop(&rounds, policy.keep_checkpoints);
            let mut protected: std::collections::HashSet<Hash> = keep.iter().copied().collect();
            protected.extend(dataset.train.iter().map(|s| s.hash));
            let mut doomed: Vec<Hash> = Vec::new();
            for c in &checkpoints {
                let blobs = [
                    parse_hash(&c.blob, "checkpoint blob")?,
                    parse_hash(&c.optimizer_blob, "optimizer blob")?,
                ];
                if dropped.contains(&c.round) {
                    doomed.extend(blobs);
                } else {
                    protected.extend(blobs);
                }
            }
            doomed.extend_from_slice(&old);
            if let Some(round) = crate::retention::update_round_to_drop(&policy, closed, &rounds) {
                for row in ledger.updates(round)? {
                    if let Some(hash) = row.update_hash.as_deref().and_then(|h| h.parse().ok()) {
                        doomed.push(hash);
                    }
                }
            }
            drop(ledger);
            let (mut files, mut bytes) = (0u64, 0u64);
            for hash in doomed.iter().filter(|h| !protected.contains(h)) {
                let freed = store.remove(hash)?;
                if freed > 0 {
                    files += 1;
                    bytes += freed;
                }
            }
            if files > 0 {
                tracing::info!(
                    round = closed,
                    files,
                    bytes,
                    "retention: deleted blobs the policy no longer keeps"
                );
            }
            Ok(())
        })
        .await
        .map_err(|e| CoordinatorError::Internal(format!("retention task: {e}")))?
    }

    pub(super) async fn finish_close(&mut self, done: CloseDone) -> Result<(), CoordinatorError> {
        let stages = &self.metrics.stages;
        let t = &done.closed.timings;
        stages.add(Stage::Verify, t.verify);
        stages.add(Stage::Probe, t.probe + t.eval);
        stages.add(Stage::Spot, t.spot);
        stages.add(Stage::Aggregate, t.aggregate);
        stages.add(Stage::Ledger, done.ledger_time);
        stages.add(Stage::Publish, done.publish_time);
        self.metrics
            .copy_comparisons
            .fetch_add(t.comparisons, Ordering::Relaxed);
        let published = std::time::Instant::now();
        let manifest_hash = done.manifest.body_hash();
        let actions = self
            .rounds
            .round_closed(done.round, done.state.params_hash(), manifest_hash)
            .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
        self.defer_shares(done.round, done.closed.deferred.clone());
        // Updates and superseded state stay on disk (nodes may resync from
        // them) but leave memory, so memory does not grow with the run.
        let m = &done.closed.manifest;
        for accepted in &m.accepted {
            self.bootstrap.active(&accepted.node);
        }
        use crate::reputation::Outcome;
        let outcomes = crate::reputation::round_outcomes(
            m.accepted
                .iter()
                .map(|a| (a.node, Outcome::Accepted))
                .chain(
                    m.rejected
                        .iter()
                        .map(|r| (r.node, Outcome::of_rejection(&r.reason))),
                )
                .chain(m.missing.iter().map(|n| (*n, Outcome::Missing))),
        );
        for (node, outcome) in outcomes {
            self.rounds.record_outcome(done.round, node, outcome);
        }
        self.publish_reputation();
        for hash in m
            .accepted
            .iter()
            .map(|a| a.update_hash)
            .chain(m.rejected.iter().filter_map(|r| r.update_hash))
        {
            self.store.forget(&hash);
        }
        let old = [
            self.state_ref.blob,
            self.state_ref.optimizer_blob,
            self.checkpoint.blob,
            self.checkpoint.optimizer_blob,
        ];
        // θ_r, the plan's assignments and the accepted updates: what the
        // next round's replays of carried steps start from.
        let previous_theta = self.shared_theta.replace(done.shared_theta);
        self.prev_round = match previous_theta {
            Some(theta) if self.run_config.overlap_steps > 0 => {
                Some(Arc::new(crate::spot::PrevRound {
                    round: done.round,
                    theta,
                    assignments: done.assignments,
                    accepted: m.accepted.iter().map(|a| (a.node, a.update_hash)).collect(),
                }))
            }
            _ => None,
        };
        self.state = Some(done.state);
        self.state_ref = done.state_ref;
        if let Some(c) = done.checkpoint {
            self.checkpoint = c;
        }
        let keep = [
            self.state_ref.blob,
            self.state_ref.optimizer_blob,
            self.checkpoint.blob,
            self.checkpoint.optimizer_blob,
        ];
        for hash in old.iter().filter(|h| !keep.contains(h)) {
            self.store.forget(hash);
        }
        self.traffic.set_state_blobs(&keep);
        if let Err(e) = self
            .apply_retention(done.round, old.to_vec(), keep.to_vec())
            .await
        {
            // Disk use grows until the next close retries; nothing is lost.
            tracing::warn!("retention: {e}");
        }
        let oldest = done.round.saturating_sub(REPLAY_WINDOW - 1);
        let recent: Vec<verify::RecentUpdate> = self
            .recent
            .iter()
            .filter(|r| r.round >= oldest)
            .cloned()
            .chain(done.closed.sketches.iter().cloned())
            .collect();
        self.recent = Arc::new(recent);
        let m = &done.closed.manifest;
        if let Err(e) = Arc::make_mut(&mut self.unverified).apply(m) {
            // The close computed the voids from this very fold; a mismatch
            // is a bug, and the ledger's credit stands as the manifest says.
            tracing::error!("clawback windows: {e}");
        }
        self.metrics.rounds_closed.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .updates_accepted
            .fetch_add(m.accepted.len() as u64, Ordering::Relaxed);
        self.metrics
            .tokens_accepted
            .fetch_add(m.accepted.iter().map(|a| a.tokens).sum(), Ordering::Relaxed);
        self.metrics
            .update_bytes_received
            .fetch_add(done.closed.bytes_received, Ordering::Relaxed);
        for r in &m.rejected {
            self.metrics.rejected(r.reason.code());
        }
        Metrics::set_f64(&self.metrics.last_train_loss, done.closed.mean_loss);
        if done.closed.eval_loss.is_some() {
            Metrics::set_f64(&self.metrics.last_eval_loss, done.closed.eval_loss);
        }
        if let Ok(bytes) = done.manifest.to_bytes() {
            let _ = self
                .net
                .publish(network::topic(&self.config.run_id, "manifests"), bytes)
                .await;
        }
        self.metrics.stages.add(Stage::Publish, published.elapsed());
        if done.closed.eval_loss.is_none() && !m.accepted.is_empty() {
            self.spawn_eval(done.round);
        }
        tracing::info!(
            round = done.round,
            accepted = m.accepted.len(),
            rejected = m.rejected.len(),
            missing = m.missing.len(),
            train_loss = ?done.closed.mean_loss,
            eval_loss = ?done.closed.eval_loss,
            verify_ms = t.verify.as_millis() as u64,
            checks_ms = t.checks.as_millis() as u64,
            probe_ms = t.probe.as_millis() as u64,
            spot_ms = t.spot.as_millis() as u64,
            eval_ms = t.eval.as_millis() as u64,
            aggregate_ms = t.aggregate.as_millis() as u64,
            ledger_ms = done.ledger_time.as_millis() as u64,
            "round closed"
        );
        let _ = self.events.send(CoordinatorEvent::RoundClosed {
            round: done.round,
            accepted: m.accepted.len(),
            rejected: m.rejected.clone(),
            missing: m.missing.len(),
            mean_loss: done.closed.mean_loss,
            eval_loss: done.closed.eval_loss,
            params_hash: m.next_params_hash,
        });
        if actions.contains(&Action::RunFinished) {
            tracing::info!("run finished");
            let _ = self.events.send(CoordinatorEvent::RunFinished);
            self.finished_at = Some(tokio::time::Instant::now());
        }
        self.update_live();
        Ok(())
    }
}

/// The run's sketch seed: every round's sketches compare with each other.
fn sketch_seed(run_id: &str) -> u64 {
    let hash = Hash::of(format!("barnraise sketch {run_id}").as_bytes());
    u64::from_le_bytes(hash.0[..8].try_into().unwrap_or([0; 8]))
}

/// A round close, owned, for a blocking thread.
struct CloseJob {
    config: CoordinatorConfig,
    resolved: Resolved,
    key: SigningKey,
    store: BlobStore,
    ledger: Arc<Mutex<Ledger>>,
    dataset: Arc<Dataset>,
    heldout: Option<Arc<Vec<u16>>>,
    state: GlobalState,
    close: CloseRound,
    recent: Arc<Vec<verify::RecentUpdate>>,
    unverified: Arc<Unverified>,
    run_config: RunConfig,
    /// Checks run while the round was open (`super::early`).
    early: close::Early,
    /// Deferred checks settled since the last close, the nodes with one
    /// still out, and whether this close may defer (`super::deferred`).
    settled: Vec<close::Settled>,
    pending: Vec<NodeId>,
    defer: bool,
    /// States earlier rounds' deferred checks still need: not deleted here.
    states_out: std::collections::HashSet<Hash>,
    /// Round r − 1, for replays of carried steps.
    prev: Option<Arc<crate::spot::PrevRound>>,
}

impl CloseJob {
    fn run(self) -> Result<CloseDone, CoordinatorError> {
        let round = self.close.plan.round;
        let mut payloads = HashMap::new();
        for c in &self.close.candidates {
            if let Some(bytes) = self.store.get(&c.commit.update_hash)? {
                payloads.insert(c.commit.update_hash, bytes);
            }
        }
        // States fetched for spot checks are read from the store only for
        // the shares the round replays (a missing one fails its check).
        let state_of = |hash: &Hash| self.store.get(hash).ok().flatten();
        let ctx = CloseContext {
            spot: Some(crate::close::SpotContext {
                key: &self.key,
                run: &self.run_config,
                state: &state_of,
                prev: self.prev.as_deref(),
                unverified: &self.unverified,
                deferred: close::DeferredInput {
                    defer: self.defer,
                    settled: &self.settled,
                    pending: &self.pending,
                },
            }),
            model: &self.resolved.model,
            codec: self.resolved.codec.codec_at(round),
            rule: &self.resolved.aggregation,
            verify: &self.config.verify,
            seq_len: self.config.seq_len as usize,
            dataset: &self.dataset.train,
            shard_tokens: &self.dataset.tokens,
            heldout: self.heldout.as_deref().map(|v| v.as_slice()),
            flops_per_token: self
                .resolved
                .model
                .flops_per_token_at(self.config.seq_len as usize),
            sketch_seed: sketch_seed(&self.config.run_id),
            recent: &self.recent,
            // The last round's θ is evaluated here, so the run's final
            // figure is in the ledger before the run reports finished;
            // the others after their manifest (Service::spawn_eval).
            evaluate: round + 1 >= self.config.total_rounds,
            key: &self.key,
            early: &self.early,
        };
        let mut state = self.state;
        let closed = close::close_round(
            &ctx,
            &self.close,
            &self.config.run_id,
            &payloads,
            &mut state.theta,
            &mut state.optimizer,
        )?;
        // The replays are done and their numbers are in the ledger rows;
        // the fetched states (8 bytes per parameter each) are not kept. A
        // share names its state by hash, so only a blob of a state's exact
        // size is deleted: a share naming a shard or a checkpoint must not
        // make the coordinator delete it.
        let state_len = self.resolved.state_len();
        // A deferred share's state is still to be replayed (it is deleted then).
        let deferred: std::collections::HashSet<Hash> =
            closed.deferred.iter().map(|d| d.share.state_hash).collect();
        for c in &self.close.candidates {
            for share in &c.commit.shares {
                if self.store.size(&share.state_hash) != Some(state_len)
                    || deferred.contains(&share.state_hash)
                    || self.states_out.contains(&share.state_hash)
                {
                    continue;
                }
                if let Err(e) = self.store.remove(&share.state_hash) {
                    tracing::warn!(
                        "could not delete a spot-checked state {}: {e}",
                        share.state_hash.short()
                    );
                }
            }
        }
        state.round = round + 1;
        let started = std::time::Instant::now();
        let reference = state.save(&self.resolved.model, &self.config.run_id, &self.store)?;
        let manifest = Signed::sign(&self.key, &closed.manifest)?;
        let manifest_bytes = manifest.to_bytes()?;
        let publish_time = started.elapsed();
        let published = state.round.is_multiple_of(self.config.checkpoint_every)
            || state.round >= self.config.total_rounds;
        let checkpoint = published.then(|| reference.clone());
        let m = &closed.manifest;
        let record = RoundRecord {
            row: RoundRow {
                round,
                opened_ms: self.close.plan.opened_at_ms,
                closed_ms: self.close.closed_at_ms,
                base_params_hash: m.base_params_hash.to_hex(),
                next_params_hash: m.next_params_hash.to_hex(),
                manifest_hash: manifest.body_hash().to_hex(),
                params_blob: reference.blob.to_hex(),
                optimizer_blob: reference.optimizer_blob.to_hex(),
                accepted: m.accepted.len() as u64,
                rejected: m.rejected.len() as u64,
                missing: m.missing.len() as u64,
                mean_loss: closed.mean_loss,
                eval_loss: closed.eval_loss,
                bytes_received: closed.bytes_received,
            },
            manifest: manifest_bytes,
            updates: closed.updates.clone(),
            checkpoint: checkpoint.as_ref().map(checkpoint_row),
            voided: m
                .voided
                .iter()
                .map(|v| (v.node.to_string(), v.from_round))
                .collect(),
        };
        let started = std::time::Instant::now();
        {
            let mut ledger = self
                .ledger
                .lock()
                .map_err(|_| CoordinatorError::Internal("ledger lock poisoned".into()))?;
            ledger.close_round(&record)?;
        }
        let ledger_time = started.elapsed();
        Ok(CloseDone {
            ledger_time,
            publish_time,
            round,
            shared_theta: Arc::new(state.theta.clone()),
            assignments: self.close.plan.assignments.clone(),
            state,
            manifest,
            closed,
            checkpoint,
            state_ref: reference,
        })
    }
}
