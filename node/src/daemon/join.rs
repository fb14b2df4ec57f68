//! Joining the run: dialling the coordinator, the signed Join and its
//! Welcome, and syncing θ to the round now open (from saved state, a
//! checkpoint or the seeded init; see `catchup`).

use super::*;

impl Node {
    /// Dials the coordinator until it answers (or we are stopped).
    pub(super) async fn connect(&mut self) -> Result<Option<PeerId>, NodeError> {
        if let Some(peer) = self.coordinator {
            return Ok(Some(peer));
        }
        let addr = self.config.coordinator.clone();
        if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
            // Known before the first connection, so the network treats the
            // coordinator as our relay from its first identify on (it then
            // also connects over QUIC, for hole punching).
            self.client.add_relay(addr.clone()).await?;
        }
        if addr.is_empty() {
            return Err(NodeError::Coordinator(
                addr,
                "no coordinator address configured".into(),
            ));
        }
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.client.dial(addr.clone()).await {
                Ok(peer) => {
                    let key = match self.coordinator_key {
                        Some(key) => key,
                        None => PublicKey::from_peer_id(&peer)
                            .map_err(|e| NodeError::Coordinator(addr.clone(), e.to_string()))?,
                    };
                    self.coordinator_key = Some(key);
                    self.client.set_coordinator_key(key).await?;
                    let relay = if addr.iter().any(|p| matches!(p, Protocol::P2p(_))) {
                        addr.clone()
                    } else {
                        addr.clone().with(Protocol::P2p(peer))
                    };
                    self.client.add_address(peer, strip_p2p(&addr)).await?;
                    self.client.add_relay(relay).await?;
                    self.coordinator = Some(peer);
                    let _ = self.coordinator_peer.set(peer);
                    tracing::info!(%peer, "connected to the coordinator at {addr}");
                    return Ok(Some(peer));
                }
                Err(NetworkError::Closed) => return Err(NetworkError::Closed.into()),
                Err(e) => {
                    self.warn(format!(
                        "coordinator unreachable ({e}); retrying in {:.1} s",
                        backoff.as_secs_f32()
                    ));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One request to the coordinator, retried with backoff until it gets an
    /// answer or we are stopped. A lost connection is re-dialled.
    pub(super) async fn ask(
        &mut self,
        request: CoordinatorRequest,
    ) -> Result<Option<CoordinatorResponse>, NodeError> {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(peer) = self.connect().await? else {
                return Ok(None);
            };
            match self.client.coordinator_request(peer, request.clone()).await {
                Ok(response) => return Ok(Some(response)),
                Err(NetworkError::Closed) => return Err(NetworkError::Closed.into()),
                Err(e) => {
                    self.warn(format!(
                        "coordinator request failed ({e}); retrying in {:.1} s",
                        backoff.as_secs_f32()
                    ));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// The hardware inventory a join declares: one entry per worker.
    pub(super) fn worker_info(&self) -> Vec<WorkerInfo> {
        let gpus = barnraise_trainer::device::discover_gpus();
        let cuda = barnraise_trainer::device::cuda_build();
        let cpu = WorkerInfo {
            device: "cpu".into(),
            name: "cpu".into(),
            memory_bytes: 0,
        };
        self.devices
            .iter()
            .map(|spec| {
                let ordinal = match spec {
                    DeviceSpec::Cuda(n) => Some(*n),
                    DeviceSpec::Auto if cuda => Some(0),
                    _ => None,
                };
                match ordinal.and_then(|n| gpus.iter().find(|g| g.ordinal == n)) {
                    Some(gpu) if cuda => WorkerInfo {
                        device: format!("cuda:{}", gpu.ordinal),
                        name: gpu.name.clone(),
                        memory_bytes: gpu.memory_bytes,
                    },
                    _ => cpu.clone(),
                }
            })
            .collect()
    }

    /// Joins the run and brings θ to the coordinator's current round.
    pub(super) async fn join_and_sync(&mut self) -> Result<Option<Synced>, NodeError> {
        let mut backoff = Duration::from_millis(500);
        loop {
            if let Ok(status) = self.client.status().await {
                let mut addrs = status.listen_addrs;
                addrs.extend(status.external_addrs);
                addrs.dedup();
                // A join is capped in size; a few addresses are plenty.
                addrs.truncate(16);
                self.listen_addrs = addrs;
            }
            let join = Join {
                protocol_version: PROTOCOL_VERSION,
                agent: format!("barnraise/{}", env!("CARGO_PKG_VERSION")),
                run_id: self.config.run_id.clone(),
                workers: self.worker_info(),
                listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
                certificate: self.certificate.clone(),
                timestamp_ms: now_ms(),
            };
            let signed =
                Signed::sign(&self.key, &join).map_err(|e| NodeError::RunConfig(e.to_string()))?;
            let Some(response) = self.ask(CoordinatorRequest::Join(signed)).await? else {
                return Ok(None);
            };
            let welcome = match response {
                CoordinatorResponse::Welcome(signed) => {
                    match signed.verify(self.coordinator_key.as_ref()) {
                        Ok(welcome) => welcome,
                        Err(e) => {
                            self.warn(format!("ignoring a welcome that does not verify: {e}"));
                            if !self.sleep(backoff).await {
                                return Ok(None);
                            }
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                            continue;
                        }
                    }
                }
                CoordinatorResponse::Refused { reason }
                    if barnraise_protocol::messages::is_retry_later(&reason) =>
                {
                    self.warn(format!("the coordinator asks us to wait: {reason}"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                CoordinatorResponse::Refused { reason } => return Err(NodeError::Refused(reason)),
                other => {
                    self.warn(format!("unexpected answer to join: {other:?}"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    continue;
                }
            };
            self.summary.node = Some(welcome.node);
            self.run_id = Some(welcome.config.run_id.clone());
            self.emit(NodeEvent::Joined {
                node: welcome.node,
                run_id: welcome.config.run_id.clone(),
                round: welcome.current_round,
            });
            tracing::info!(run = %welcome.config.run_id, round = welcome.current_round, "joined as {}", welcome.node.short());
            self.meet(&welcome.bootstrap).await?;
            for topic in [
                Topic::Plans {
                    run_id: welcome.config.run_id.clone(),
                },
                Topic::Manifests {
                    run_id: welcome.config.run_id.clone(),
                },
                Topic::Updates {
                    run_id: welcome.config.run_id.clone(),
                },
            ] {
                self.client.subscribe(topic).await?;
            }
            match self.sync(&welcome).await {
                Ok(Some(state)) => return Ok(Some(state)),
                Ok(None) => return Ok(None),
                Err(e @ (NodeError::Fetch(_) | NodeError::CatchUp(_))) => {
                    self.warn(format!("{e}; joining again"));
                    if !self.sleep(backoff).await {
                        return Ok(None);
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) async fn sync(&mut self, welcome: &Welcome) -> Result<Option<Synced>, NodeError> {
        let run = welcome.config.clone();
        let (model, codec, rule) = parse_run_config(&run)?;
        let params = model.params_count();
        // What `node receipts` needs to price this run's tokens as the
        // coordinator's ledger does.
        if let Some(coordinator) = self.coordinator_key {
            let facts = crate::receipts::RunFacts {
                run_id: run.run_id.clone(),
                coordinator: coordinator.to_hex(),
                flops_per_token: model.flops_per_token_at(run.seq_len as usize),
            };
            if let Err(e) = crate::receipts::write_run_facts(&self.receipts, &facts) {
                self.warn(format!(
                    "could not record the run's facts for receipts: {e}"
                ));
            }
        }
        let outer = OuterConfig {
            lr: run.outer_lr,
            momentum: run.outer_momentum,
            ..OuterConfig::default()
        };

        let Some(caught_up) = self.catch_up(welcome, &model, rule, outer).await? else {
            return Ok(None);
        };
        let catchup::CaughtUp {
            theta,
            optimizer,
            source,
            committed,
            replayed,
        } = caught_up;
        let hash = welcome.params_hash;
        self.summary.rounds_replayed += replayed;
        let mut encoder = Encoder::new(codec.codec_at(welcome.current_round), params)
            .map_err(|e| NodeError::RunConfig(e.to_string()))?
            .with_decay(codec.decay());
        if source == SyncSource::SavedState {
            // Keep the error feedback across a restart.
            let dir = self.state.clone();
            let residual = off_runtime(move || dir.load_residual(params)).await?;
            if let Some(residual) = residual.filter(|r| !r.is_empty())
                && let Err(e) = encoder.set_residual(&residual)
            {
                self.warn(format!("discarding saved codec residual: {e}"));
            }
        }
        let record = StateRecord {
            run_id: run.run_id.clone(),
            round: welcome.current_round,
            params_hash: hash.to_hex(),
            codec: run.codec.clone(),
            committed: committed.map(|(r, h): (u64, Hash)| (r, h.to_hex())),
        };
        let config = *optimizer.config();
        let (theta, momentum) = self
            .state
            .save_in_background(record, theta, optimizer.into_momentum())
            .await?;
        let optimizer = OuterOptimizer::from_state(config, momentum);
        self.summary.final_params_hash = Some(hash);
        self.emit(NodeEvent::Synced {
            round: welcome.current_round,
            params_hash: hash,
            from: source,
        });
        tracing::info!(round = welcome.current_round, params = %hash.short(), replayed, "synced params ({source:?})");
        Ok(Some(Synced {
            run,
            model,
            rule,
            round: welcome.current_round,
            theta,
            params_hash: hash,
            optimizer,
            codec,
            encoder: Some(encoder),
            trainers: Vec::new(),
            committed,
            tails: None,
            head_manifest: welcome.head_manifest,
        }))
    }

    pub(super) async fn load_checkpoint(
        &mut self,
        checkpoint: &CheckpointRef,
        model: &ModelConfig,
        run_id: &str,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>, NodeError> {
        self.fetch(&checkpoint.blob, Some(checkpoint.bytes), None, "checkpoint")
            .await?;
        self.fetch(
            &checkpoint.optimizer_blob,
            Some(checkpoint.optimizer_bytes),
            None,
            "optimizer state",
        )
        .await?;
        let store = self.store.clone();
        let (blob, optimizer_blob, model) =
            (checkpoint.blob, checkpoint.optimizer_blob, model.clone());
        let expected_hash = checkpoint.params_hash;
        let run_id = run_id.to_string();
        let loaded =
            tokio::task::spawn_blocking(move || -> Result<(Vec<f32>, Vec<f32>), String> {
                let bytes = store.read(&blob).map_err(|e| e.to_string())?;
                let path = Path::new("checkpoint blob").join(blob.to_hex());
                let checkpoint = barnraise_trainer::checkpoint::from_bytes(&bytes, &path, &model)
                    .map_err(|e| e.to_string())?;
                if Hash::of_f32s(&checkpoint.params) != expected_hash {
                    return Err("checkpoint params do not hash to the announced value".into());
                }
                if !checkpoint.meta.run.is_empty() && checkpoint.meta.run != run_id {
                    tracing::warn!(
                        "checkpoint names run '{}', expected '{run_id}'",
                        checkpoint.meta.run
                    );
                }
                let momentum =
                    f32s_from_bytes(&store.read(&optimizer_blob).map_err(|e| e.to_string())?)
                        .filter(|m| m.len() == checkpoint.params.len())
                        .ok_or("optimizer state blob is not one f32 per parameter")?;
                Ok((checkpoint.params, momentum))
            })
            .await
            .map_err(|e| NodeError::Training(e.to_string()))?
            .map_err(|e| {
                NodeError::RunConfig(format!("checkpoint of round {}: {e}", checkpoint.round))
            })?;
        Ok(Some(loaded))
    }
}
