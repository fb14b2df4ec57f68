//! One round, as the loop sees it: wait for the plan, train and commit if
//! it gives us work, wait for the manifest, apply it, save the new state.

use super::*;

impl Node {
    /// Polling is the fallback for gossip: the first poll after
    /// `poll_interval_ms`, each next one twice as late, up to
    /// [`MAX_POLL_INTERVAL`]. Gossip that arrives meanwhile ends the wait at once.
    pub(super) fn poll_backoff(&self) -> PollBackoff {
        PollBackoff::new(Duration::from_millis(self.config.poll_interval_ms.max(50)))
    }

    /// Waits for the plan of `round` (gossip first, polling as a fallback).
    pub(super) async fn wait_for_plan(
        &mut self,
        round: u64,
    ) -> Result<Option<RoundPlan>, NodeError> {
        let mut poll = self.poll_backoff();
        loop {
            while let Ok((_, plan)) = self.plans.try_recv() {
                if plan.round >= round {
                    return Ok(Some(plan));
                }
            }
            let Some(response) = self.ask(CoordinatorRequest::CurrentPlan).await? else {
                return Ok(None);
            };
            match response {
                CoordinatorResponse::Plan(Some(signed)) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(plan) if plan.round >= round => return Ok(Some(plan)),
                        Ok(_) => {}
                        Err(e) => {
                            self.warn(format!("coordinator sent a plan that does not verify: {e}"))
                        }
                    }
                }
                CoordinatorResponse::Plan(None) => {}
                other => tracing::debug!("unexpected answer to CurrentPlan: {other:?}"),
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                Some((_, plan)) = self.plans.recv() => if plan.round >= round { return Ok(Some(plan)) },
                _ = tokio::time::sleep(poll.next()) => {}
            }
        }
    }

    /// Waits for the manifest of `round`.
    pub(super) async fn wait_for_manifest(
        &mut self,
        round: u64,
    ) -> Result<Option<Result<(Signed<Manifest>, Manifest), String>>, NodeError> {
        let mut poll = self.poll_backoff();
        let started = Instant::now();
        loop {
            while let Ok((_, signed, manifest)) = self.manifests.try_recv() {
                self.check_fork(&signed, &manifest)?;
                if manifest.round == round {
                    return Ok(Some(Ok((signed, manifest))));
                }
            }
            let Some(response) = self.ask(CoordinatorRequest::Manifest { round }).await? else {
                return Ok(None);
            };
            match response {
                CoordinatorResponse::Manifest(Some(signed)) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(manifest) if manifest.round == round => {
                            return Ok(Some(Ok((signed, manifest))));
                        }
                        Ok(manifest) => self.warn(format!(
                            "asked for manifest {round}, got {}",
                            manifest.round
                        )),
                        Err(e) => self.warn(format!(
                            "coordinator sent a manifest that does not verify: {e}"
                        )),
                    }
                }
                CoordinatorResponse::Manifest(None) => {}
                other => tracing::debug!("unexpected answer to Manifest: {other:?}"),
            }
            if started.elapsed() > MANIFEST_PATIENCE {
                return Ok(Some(Err(format!(
                    "no manifest for round {round} after {} s",
                    MANIFEST_PATIENCE.as_secs()
                ))));
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(None),
                Some((_, signed, manifest)) = self.manifests.recv() => {
                    self.check_fork(&signed, &manifest)?;
                    if manifest.round == round { return Ok(Some(Ok((signed, manifest)))) }
                }
                _ = tokio::time::sleep(poll.next()) => {}
            }
        }
    }

    /// Counts `ms` of phase `index` (in `metrics::ROUND_PHASES` order) in
    /// the summary and the metrics.
    fn add_phase(&mut self, index: usize, ms: u64) {
        let phases = &mut self.summary.phases;
        let sum = match index {
            0 => &mut phases.plan_to_commit_ms,
            1 => &mut phases.commit_to_manifest_ms,
            2 => &mut phases.applying_ms,
            _ => &mut phases.waiting_for_plan_ms,
        };
        *sum += ms;
        if let Some(cell) = self.metrics.round_phase_ms.get(index) {
            NodeMetrics::add(cell, ms);
        }
    }

    /// One round. `None` means we were stopped.
    pub(super) async fn round(
        &mut self,
        state: &mut Synced,
    ) -> Result<Option<RoundOutcome>, NodeError> {
        let round = state.round;
        if !self
            .shards_ahead
            .armed_for(&state.run.run_id, self.coordinator)
        {
            let blobs = self.blobs();
            self.shards_ahead.arm(
                self.key.node_id(),
                &state.run.run_id,
                self.coordinator,
                state.run.dataset.clone(),
                Arc::new(move |hash, bytes| {
                    let blobs = blobs.clone();
                    Box::pin(async move { blobs.fetch(&hash, Some(bytes), None, "shard").await })
                }),
            );
        }
        let Some(plan) = self.wait_for_plan(round).await? else {
            return Ok(None);
        };
        self.summary.first_plan_ms.get_or_insert_with(now_ms);
        if let Some(mark) = self.phase_mark_ms {
            self.add_phase(3, now_ms().saturating_sub(mark));
        }
        let planned_at = Instant::now();
        self.phase_mark_ms = Some(now_ms());
        self.meet(&plan.bootstrap).await?;
        if plan.round > round {
            return Ok(Some(RoundOutcome::Resync(format!(
                "round {} is open but we hold round {round}",
                plan.round
            ))));
        }
        let our_hash = state.params_hash;
        if plan.params_hash != our_hash {
            return Ok(Some(RoundOutcome::Resync(format!(
                "plan of round {round} starts from {}, we hold {}",
                plan.params_hash.short(),
                our_hash.short()
            ))));
        }
        let me = self.key.node_id();
        // The others' updates are fetched as they are announced, while we
        // train and wait (`super::prefetch`).
        let authors = plan
            .assignments
            .iter()
            .map(|a| a.node)
            .filter(|node| *node != me)
            .collect();
        self.prefetch.arm(round, authors, Arc::new(self.blobs()));
        let assignment = plan.assignments.iter().find(|a| a.node == me).cloned();
        let mut tail = None;
        match (&assignment, state.committed) {
            (Some(_), Some((r, hash))) if r == round && self.store.contains(&hash) => {
                tracing::info!(
                    round,
                    "already committed {} for this round before a restart",
                    hash.short()
                );
            }
            (Some(assignment), _) => {
                let Some(planned) = self.train_and_commit(state, &plan, assignment).await? else {
                    return Ok(None);
                };
                tail = planned;
            }
            (None, _) => {
                tracing::info!(round, "not assigned work this round");
                self.emit(NodeEvent::Idle { round });
            }
        }
        self.add_phase(0, planned_at.elapsed().as_millis() as u64);
        let committed_at = Instant::now();
        self.phase_mark_ms = Some(now_ms());
        // Overlapped rounds: the held-back steps train while the update
        // travels and the round closes.
        let tail = tail.and_then(|plan| self.start_tail(state, plan));
        let Some(manifest) = self.wait_for_manifest(round).await? else {
            return Ok(None);
        };
        self.add_phase(1, committed_at.elapsed().as_millis() as u64);
        let manifest_at = Instant::now();
        self.phase_mark_ms = Some(now_ms());
        let (signed, manifest) = match manifest {
            Ok(found) => found,
            Err(reason) => return Ok(Some(RoundOutcome::Resync(reason))),
        };
        if manifest.base_params_hash != our_hash {
            return Ok(Some(RoundOutcome::Resync(format!(
                "manifest of round {round} is based on other params"
            ))));
        }
        if manifest.previous_manifest != state.head_manifest {
            return Err(NodeError::Chain(format!(
                "the manifest of round {round} ({}) extends manifest {}, but the last manifest \
                 we applied is {}: the coordinator has rewritten its history",
                signed.body_hash().short(),
                manifest.previous_manifest.short(),
                state.head_manifest.short()
            )));
        }
        let next_hash = match self
            .apply_manifest(
                state.rule,
                &mut state.theta,
                &mut state.optimizer,
                &manifest,
            )
            .await?
        {
            None => return Ok(None),
            Some(Applied::Unavailable(reason)) => return Ok(Some(RoundOutcome::Resync(reason))),
            Some(Applied::Mismatch { hash, reason }) => {
                self.emit(NodeEvent::RoundApplied {
                    round,
                    params_hash: hash,
                    matched: false,
                });
                return Ok(Some(RoundOutcome::Resync(reason)));
            }
            Some(Applied::Matched(hash)) => hash,
        };
        self.emit(NodeEvent::RoundApplied {
            round,
            params_hash: next_hash,
            matched: true,
        });
        state.round = round + 1;
        state.params_hash = next_hash;
        state.committed = None;
        state.head_manifest = signed.body_hash();
        let record = StateRecord {
            run_id: state.run.run_id.clone(),
            round: state.round,
            params_hash: next_hash.to_hex(),
            codec: state.run.codec.clone(),
            committed: None,
        };
        state.save(&self.state, record).await?;
        self.keep_receipt(&signed, &manifest).await;
        self.remember_applied(&signed, &manifest);
        self.prune(&manifest, state.round).await;
        if let Some(tail) = tail {
            let accepted = manifest.accepted.iter().any(|a| a.node == me);
            if self
                .finish_tail(state, round, tail, accepted)
                .await?
                .is_none()
            {
                return Ok(None);
            }
        }
        self.summary.rounds_completed += 1;
        self.summary.last_applied_ms = Some(now_ms());
        self.summary.compute_ms_applied = self.summary.compute_ms;
        self.add_phase(2, manifest_at.elapsed().as_millis() as u64);
        self.phase_mark_ms = self.summary.last_applied_ms;
        self.last_round = Some(planned_at.elapsed());
        NodeMetrics::add(&self.metrics.rounds_applied, 1);
        NodeMetrics::set(&self.metrics.current_round, manifest.round + 1);
        self.summary.final_params_hash = Some(next_hash);
        tracing::info!(round, params = %next_hash.short(), accepted = manifest.accepted.len(), "round applied");
        Ok(Some(RoundOutcome::Applied))
    }
}
