//! Starting the coordinator: the data dir is read (or a run begun), the
//! dataset and θ are loaded, the ledger's record is folded back into the
//! round machine, and the libp2p peer, the HTTP server and the actor loop
//! are started.

use super::requests::add_node_addresses;
use super::*;
use crate::ledger::ledger_path;

/// Starts a coordinator for `config`, resuming the run if its data dir has one.
pub async fn start(
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<CoordinatorHandle, CoordinatorError> {
    let resolved = config.resolve()?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| CoordinatorError::Io {
        path: data_dir.clone(),
        source,
    })?;
    let (key, _) = SigningKey::load_or_create(&config.key_path())?;
    let listen: Vec<Multiaddr> = config
        .listen
        .iter()
        .map(|a| {
            a.parse().map_err(
                |e: libp2p::multiaddr::Error| CoordinatorError::BadMultiaddr {
                    addr: a.clone(),
                    reason: e.to_string(),
                },
            )
        })
        .collect::<Result<_, _>>()?;

    // Loading the dataset, the ledger and θ is disk and CPU work.
    let prepared = {
        let config = config.clone();
        let resolved = resolved.clone();
        let key = key.clone();
        tokio::task::spawn_blocking(move || prepare(&config, &resolved, &key))
            .await
            .map_err(|e| CoordinatorError::Internal(e.to_string()))??
    };

    let topics = [
        network::topic(&config.run_id, "plans"),
        network::topic(&config.run_id, "manifests"),
        network::topic(&config.run_id, "updates"),
    ];
    let keypair = key.to_libp2p()?;
    let local_peer = keypair.public().to_peer_id();
    let traffic = CoordinatorTraffic::new(prepared.dataset.train.iter().map(|s| s.hash));
    traffic.set_state_blobs(&[
        prepared.state_ref.blob,
        prepared.state_ref.optimizer_blob,
        prepared.checkpoint.blob,
        prepared.checkpoint.optimizer_blob,
    ]);
    let (client, net_events, event_loop, multiaddrs) = network::new(
        keypair,
        &listen,
        prepared.store.clone(),
        &topics,
        traffic.clone(),
    )
    .await?;
    let http_listener = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|source| CoordinatorError::Io {
            path: PathBuf::from(config.http.to_string()),
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| CoordinatorError::Io {
            path: PathBuf::from(config.http.to_string()),
            source,
        })?;

    let children = shutdown.child_token();
    tokio::spawn(event_loop.run(children.clone()));
    let metrics = Arc::new(Metrics::new());
    let _ = metrics.traffic.set(traffic.clone());
    let live = Arc::new(RwLock::new(LiveStatus {
        run_id: config.run_id.clone(),
        model_params: resolved.model.params_count(),
        codec: resolved.codec.to_string(),
        aggregation: resolved.aggregation.to_string(),
        inner_steps: config.inner_steps,
        total_rounds: config.total_rounds,
        train_shards: prepared.dataset.train.len(),
        multiaddrs: multiaddrs.iter().map(|a| a.to_string()).collect(),
        ..LiveStatus::default()
    }));
    let readers = crate::ledger::Readers::open(&ledger_path(&config.data_dir), HTTP_READERS)
        .map_err(CoordinatorError::from)?;
    let http_state = HttpState {
        ledger: readers,
        live: live.clone(),
        metrics: metrics.clone(),
        data_dir: Some(data_dir.clone()),
        record: Arc::default(),
        closed: Arc::default(),
    };
    {
        let children = children.clone();
        tokio::spawn(async move {
            if let Err(e) = http::serve(http_listener, http_state, children).await {
                tracing::error!("HTTP server stopped: {e}");
            }
        });
    }
    let bootstrap = crate::bootstrap::BootstrapBook::new(local_peer, &multiaddrs);
    for node in prepared.ledger_nodes.iter() {
        add_node_addresses(&client, &node.node, &node.listen_addrs).await;
    }

    let (events, _) = broadcast::channel(1024);
    let (internal_tx, internal_rx) = mpsc::channel(256);
    let ledger_file = ledger_path(&data_dir);
    tracing::info!(run = %config.run_id, round = prepared.rounds.current_round(), addr = ?multiaddrs.first(), http = %http_addr, "coordinator started");
    let public_key = key.public();
    let rate_limits = config.rate_limits.clone();
    // θ for the first round's early checks; later rounds get theirs from
    // the close job. Copied once here, at start.
    let shared_theta = Some(Arc::new(prepared.state.theta.clone()));
    let service = Service {
        config,
        resolved,
        key,
        run_config: prepared.run_config,
        rounds: prepared.rounds,
        ledger: prepared.ledger,
        store: prepared.store,
        dataset: Arc::new(prepared.dataset),
        heldout: prepared.heldout,
        state: Some(prepared.state),
        checkpoint: prepared.checkpoint,
        state_ref: prepared.state_ref,
        open_plan: prepared.open_plan,
        net: client,
        events: events.clone(),
        metrics,
        traffic,
        recent: Arc::new(Vec::new()),
        unverified: Arc::new(prepared.unverified),
        join_limiter: crate::ratelimit::PeerLimiter::new(
            rate_limits.join_burst,
            rate_limits.joins_per_minute,
            RATE_LIMITED_PEERS,
        ),
        commit_limiter: crate::ratelimit::PeerLimiter::new(
            rate_limits.commit_burst,
            rate_limits.commits_per_minute,
            RATE_LIMITED_PEERS,
        ),
        live,
        internal_tx,
        finished_at: None,
        refusals: Default::default(),
        bootstrap,
        eval_task: None,
        close_task: None,
        early: None,
        deferred: Default::default(),
        shared_theta,
        prev_round: prepared.prev_round.clone(),
    };
    let task = tokio::spawn(service.run(
        net_events,
        internal_rx,
        prepared.pending,
        shutdown,
        children,
    ));
    Ok(CoordinatorHandle {
        multiaddrs,
        http_addr,
        events,
        task,
        ledger_path: ledger_file,
        public_key,
    })
}

/// Everything loaded from disk before the service starts.
struct Prepared {
    store: BlobStore,
    dataset: Dataset,
    heldout: Option<Arc<Vec<u16>>>,
    ledger: Arc<Mutex<Ledger>>,
    ledger_nodes: Vec<NodeRow>,
    state: GlobalState,
    checkpoint: CheckpointRef,
    state_ref: CheckpointRef,
    rounds: Rounds,
    open_plan: Option<Signed<RoundPlan>>,
    /// Stored commits of the restored open round, to replay.
    pending: Vec<Signed<Commit>>,
    run_config: RunConfig,
    unverified: Unverified,
    /// The last closed round, for replays of carried steps (overlapped rounds).
    prev_round: Option<Arc<crate::spot::PrevRound>>,
}

fn outer_config(config: &CoordinatorConfig) -> OuterConfig {
    OuterConfig {
        lr: config.outer_lr,
        momentum: config.outer_momentum,
        nesterov: true,
    }
}

pub(super) fn parse_hash(text: &str, what: &str) -> Result<Hash, CoordinatorError> {
    text.parse()
        .map_err(|e| CoordinatorError::Inconsistent(format!("{what} `{text}` is not a hash: {e}")))
}

fn prepare(
    config: &CoordinatorConfig,
    resolved: &Resolved,
    key: &SigningKey,
) -> Result<Prepared, CoordinatorError> {
    let store = BlobStore::open(&config.data_dir.join("blobs"))?;
    let dataset = dataset::load(&config.dataset, &config.data_dir, &store)?;
    // The run record carries the dataset manifest and the tokenizer (so an
    // export can ship it).
    let keep = |name: &str, bytes: &[u8]| {
        let path = config.data_dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| CoordinatorError::Io { path, source })
    };
    keep(crate::record::DATASET_FILE, &dataset.manifest_json)?;
    if let Some(json) = &dataset.tokenizer_json {
        keep(crate::record::TOKENIZER_FILE, json)?;
    }
    let heldout = dataset.held_out_tokens().map(Arc::new);
    let ledger = Ledger::open(&ledger_path(&config.data_dir))?;
    let config_json = serde_json::to_string(config).unwrap_or_default();
    ledger.bind_run(&config.run_id, &config_json, now_ms())?;
    let outer = outer_config(config);

    // θ: after the last closed round, or θ_0.
    let last = ledger.last_round()?;
    let (state, head_manifest) = match &last {
        None => (GlobalState::initial(&resolved.model, outer), Hash::ZERO),
        Some(row) => {
            let reference = resume_reference(row)?;
            let state = GlobalState::load(&resolved.model, outer, &store, &reference)?;
            if state.params_hash().to_hex() != row.next_params_hash {
                return Err(CoordinatorError::Inconsistent(format!(
                    "round {}'s params blob does not hash to the manifest's next params",
                    row.round
                )));
            }
            (state, parse_hash(&row.manifest_hash, "manifest hash")?)
        }
    };
    let state_ref = state.save(&resolved.model, &config.run_id, &store)?;
    let checkpoint = match ledger.latest_checkpoint()? {
        Some(row) => checkpoint_ref(&row)?,
        None => {
            if last.is_none() {
                // θ_0 is the first checkpoint: retention never deletes it,
                // and an audit of the whole run starts from it.
                ledger.record_checkpoint(&checkpoint_row(&state_ref))?;
            }
            state_ref.clone()
        }
    };

    // Plans so far: shard use counts, and the open round if there is one.
    let next_round = state.round;
    let shards: Vec<Hash> = dataset.train.iter().map(|s| s.hash).collect();
    let mut plans = Vec::new();
    let mut open_plan = None;
    for (round, bytes) in ledger.plans()? {
        let signed = Signed::<RoundPlan>::from_bytes(&bytes).map_err(|e| {
            CoordinatorError::Inconsistent(format!("stored plan of round {round}: {e}"))
        })?;
        let plan = signed.verify(Some(&key.public())).map_err(|e| {
            CoordinatorError::Inconsistent(format!(
                "stored plan of round {round} (another coordinator key?): {e}"
            ))
        })?;
        if plan.round > next_round {
            continue;
        }
        if plan.round == next_round {
            open_plan = Some((signed, plan.clone()));
        }
        plans.push(plan);
    }
    let rounds_config = RoundsConfig {
        run_id: config.run_id.clone(),
        seed: crate::plan::derive(0, &config.run_id, 0, &[]),
        inner_steps: config.inner_steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        shards_per_node: config.shards_per_node,
        quorum: config.quorum,
        deadline_ms: resolved.deadline_ms,
        pace: config.pace,
        overlap_steps: config.overlap_steps,
        fetch_hold_max_ms: (config.verify.state_wait_max_secs * 1000.0) as u64,
        min_nodes: config.min_nodes,
        total_rounds: config.total_rounds,
        shards: shards.clone(),
    };
    let start = Start {
        round: next_round,
        params_hash: state.params_hash(),
        head_manifest,
        shard_uses: rounds::count_shard_uses(shards.len(), &plans),
    };
    let mut rounds = Rounds::new(rounds_config, start);
    rounds.restore_reputation(crate::reputation::replay_rows(
        ledger
            .verdicts()?
            .into_iter()
            .filter_map(|(round, node, verdict, reason)| {
                let node = node.parse::<NodeId>().ok()?;
                let outcome = crate::reputation::Outcome::of_row(&verdict, reason.as_deref());
                Some((round, node, outcome))
            }),
    ));
    // Clawback windows: a fold over every closed round's manifest.
    let mut unverified = Unverified::default();
    for round in 0..next_round {
        let Some(bytes) = ledger.manifest(round)? else {
            return Err(CoordinatorError::Inconsistent(format!(
                "the ledger has no manifest for closed round {round}"
            )));
        };
        let manifest = Signed::<Manifest>::from_bytes(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|s| s.verify(Some(&key.public())).map_err(|e| e.to_string()))
            .map_err(|e| {
                CoordinatorError::Inconsistent(format!("stored manifest of round {round}: {e}"))
            })?;
        unverified
            .apply(&manifest)
            .map_err(|e| CoordinatorError::Inconsistent(e.to_string()))?;
    }
    let ledger_nodes = ledger.nodes()?;
    for node in &ledger_nodes {
        if let Ok(id) = node.node.parse::<NodeId>() {
            rounds.join(id, node.workers);
        }
    }
    let mut pending = Vec::new();
    let open_signed = match open_plan {
        Some((signed, plan)) => {
            // Nodes get a full deadline from the restart to deliver.
            rounds.restore_open(plan, now_ms().saturating_add(resolved.deadline_ms));
            for bytes in ledger.pending_commits(next_round)? {
                if let Ok(commit) = Signed::<Commit>::from_bytes(&bytes) {
                    pending.push(commit);
                }
            }
            tracing::info!(
                round = next_round,
                commits = pending.len(),
                "resuming the open round"
            );
            Some(signed)
        }
        None => None,
    };
    // Nodes admitted under an earlier config are held to this one: a node
    // revoked (or an org dropped) while the coordinator was down gets no
    // more work, not even in the round restored above.
    for node in &ledger_nodes {
        let Ok(id) = node.node.parse::<NodeId>() else {
            continue;
        };
        let org = node.org.as_deref().and_then(|o| o.parse::<OrgId>().ok());
        let certificate = node
            .certificate
            .as_deref()
            .and_then(|c| c.parse::<Hash>().ok());
        if let Some(reason) =
            resolved
                .admission
                .refuses_known(&id, org.as_ref(), certificate.as_ref())
        {
            tracing::warn!(node = %id, "no longer admitted: {reason}");
            rounds.expel(&id);
        }
    }
    let run_config = RunConfig {
        run_id: config.run_id.clone(),
        model_config_json: serde_json::to_string(&resolved.model).unwrap_or_default(),
        codec: resolved.codec.to_string(),
        inner_steps: config.inner_steps,
        batch_size: config.batch_size,
        seq_len: config.seq_len,
        inner_lr: config.inner_lr,
        outer_lr: config.outer_lr,
        outer_momentum: config.outer_momentum,
        aggregation: resolved.aggregation.to_string(),
        total_rounds: config.total_rounds,
        overlap_steps: config.overlap_steps,
        dataset: dataset.train.clone(),
        held_out: dataset.held_out.clone(),
    };
    // The run config nodes are given, kept for the run record
    // (`crate::record`): the same every start, since the ledger binds the run.
    let run_config_path = config.data_dir.join(crate::record::RUN_CONFIG_FILE);
    match serde_json::to_vec_pretty(&run_config) {
        // Temp file then rename: a crash leaves the old file or the new one.
        Ok(text) => {
            let tmp = run_config_path.with_extension("json.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &run_config_path))
                .map_err(|source| CoordinatorError::Io {
                    path: run_config_path.clone(),
                    source,
                })?
        }
        Err(e) => tracing::warn!("could not write the run config for the record: {e}"),
    }
    let prev_round = if config.overlap_steps > 0 {
        restore_overlap(
            &ledger,
            &store,
            &resolved.model,
            outer,
            &plans,
            next_round,
            &mut rounds,
        )?
    } else {
        None
    };
    Ok(Prepared {
        prev_round,
        store,
        dataset,
        heldout,
        ledger: Arc::new(Mutex::new(ledger)),
        ledger_nodes,
        state,
        checkpoint,
        state_ref,
        rounds,
        open_plan: open_signed,
        pending,
        run_config,
        unverified,
    })
}

/// The state blobs a closed round left, as a reference.
/// Overlapped rounds after a restart: what the last closed round's
/// accepted commits held back (so their nodes' next commits may carry it)
/// and that round as [`crate::spot::PrevRound`] (so carried steps can be
/// replayed), both from the ledger and the store. None for the round when
/// its θ is no longer stored (a drawn share with carried steps then fails
/// its check, as an unserved state does).
fn restore_overlap(
    ledger: &Ledger,
    store: &BlobStore,
    model: &barnraise_trainer::ModelConfig,
    outer: OuterConfig,
    plans: &[RoundPlan],
    next_round: u64,
    rounds: &mut Rounds,
) -> Result<Option<Arc<crate::spot::PrevRound>>, CoordinatorError> {
    let Some(last) = next_round.checked_sub(1) else {
        return Ok(None);
    };
    let accepted: Vec<(NodeId, Hash)> = ledger
        .updates(last)?
        .into_iter()
        .filter(|row| row.verdict == "accepted")
        .filter_map(|row| {
            let node = row.node.parse::<NodeId>().ok()?;
            let update = row.update_hash.as_deref()?.parse::<Hash>().ok()?;
            Some((node, update))
        })
        .collect();
    for bytes in ledger.pending_commits(last)? {
        let Some(commit) = Signed::<Commit>::from_bytes(&bytes)
            .ok()
            .and_then(|s| s.verify(None).ok())
        else {
            continue;
        };
        if let Some((node, _)) = accepted.iter().find(|(_, u)| *u == commit.update_hash) {
            rounds.restore_held_back(last, *node, &commit);
        }
    }
    // θ_last: θ_0, or what round last − 1 closed on.
    let theta = if last == 0 {
        Some(GlobalState::initial(model, outer).theta)
    } else {
        ledger
            .rounds()?
            .into_iter()
            .find(|row| row.round + 1 == last)
            .and_then(|row| resume_reference(&row).ok())
            .and_then(|reference| GlobalState::load(model, outer, store, &reference).ok())
            .map(|state| state.theta)
    };
    let Some(theta) = theta else {
        tracing::warn!(
            round = last,
            "θ of the last closed round is no longer stored: its carried steps cannot be replayed"
        );
        return Ok(None);
    };
    let assignments = plans
        .iter()
        .find(|p| p.round == last)
        .map(|p| p.assignments.clone())
        .unwrap_or_default();
    Ok(Some(Arc::new(crate::spot::PrevRound {
        round: last,
        theta: Arc::new(theta),
        assignments,
        accepted,
    })))
}

fn resume_reference(row: &RoundRow) -> Result<CheckpointRef, CoordinatorError> {
    Ok(CheckpointRef {
        round: row.round + 1,
        blob: parse_hash(&row.params_blob, "params blob")?,
        bytes: 0,
        params_hash: parse_hash(&row.next_params_hash, "params hash")?,
        optimizer_blob: parse_hash(&row.optimizer_blob, "optimizer blob")?,
        optimizer_bytes: 0,
    })
}

pub(super) fn checkpoint_row(c: &CheckpointRef) -> CheckpointRow {
    CheckpointRow {
        round: c.round,
        blob: c.blob.to_hex(),
        bytes: c.bytes,
        params_hash: c.params_hash.to_hex(),
        optimizer_blob: c.optimizer_blob.to_hex(),
        optimizer_bytes: c.optimizer_bytes,
    }
}

fn checkpoint_ref(row: &CheckpointRow) -> Result<CheckpointRef, CoordinatorError> {
    Ok(CheckpointRef {
        round: row.round,
        blob: parse_hash(&row.blob, "checkpoint blob")?,
        bytes: row.bytes,
        params_hash: parse_hash(&row.params_hash, "checkpoint params hash")?,
        optimizer_blob: parse_hash(&row.optimizer_blob, "optimizer blob")?,
        optimizer_bytes: row.optimizer_bytes,
    })
}
