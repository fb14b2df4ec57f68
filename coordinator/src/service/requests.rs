//! Answering nodes: joins (admission, the signed Welcome), commits (checked
//! against the open round, recorded durably before they are acknowledged),
//! and the plan, manifest and state queries.

use super::*;

impl Service {
    /// Answers one request; its time, less its ledger writes, is the
    /// admission stage's.
    pub(super) async fn on_request(
        &mut self,
        peer: PeerId,
        observed_ip: Option<std::net::IpAddr>,
        request: CoordinatorRequest,
    ) -> CoordinatorResponse {
        let started = std::time::Instant::now();
        let ledger_before = self.metrics.stages.seconds(Stage::Ledger);
        let response = self.answer(peer, observed_ip, request).await;
        let ledger = self.metrics.stages.seconds(Stage::Ledger) - ledger_before;
        let elapsed = started
            .elapsed()
            .saturating_sub(Duration::from_secs_f64(ledger.max(0.0)));
        self.metrics.stages.add(Stage::Admission, elapsed);
        response
    }

    pub(super) async fn answer(
        &mut self,
        peer: PeerId,
        observed_ip: Option<std::net::IpAddr>,
        request: CoordinatorRequest,
    ) -> CoordinatorResponse {
        let peer_key = PublicKey::from_peer_id(&peer).ok();
        let limiter = match &request {
            CoordinatorRequest::Join(_) => Some(&mut self.join_limiter),
            CoordinatorRequest::Commit(_) => Some(&mut self.commit_limiter),
            _ => None,
        };
        if let Some(limiter) = limiter
            && !limiter.allow(peer, std::time::Instant::now())
        {
            self.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return CoordinatorResponse::Refused {
                reason: format!(
                    "{}too many joins or commits from this peer; wait a minute",
                    crate::ratelimit::RETRY_LATER
                ),
            };
        }
        match request {
            CoordinatorRequest::Join(signed) => self.on_join(signed, peer_key, observed_ip).await,
            CoordinatorRequest::Commit(signed) => self.on_commit(signed, peer_key).await,
            CoordinatorRequest::Leave(signed) => match signed.verify(None) {
                Ok(leave)
                    if leave.run_id == self.config.run_id
                        && now_ms().abs_diff(leave.timestamp_ms)
                            <= admission::MAX_CLOCK_SKEW_MS =>
                {
                    self.rounds.leave(&NodeId(signed.signer));
                    tracing::info!(node = %NodeId(signed.signer).short(), "node left");
                    CoordinatorResponse::Ok
                }
                _ => CoordinatorResponse::Refused {
                    reason: "the leave notice is not valid for this run".into(),
                },
            },
            CoordinatorRequest::CurrentPlan => {
                if let Some(key) = peer_key {
                    // Polling for the plan shows the node is alive: it gets work again.
                    self.rounds.seen(&NodeId(key));
                }
                CoordinatorResponse::Plan(
                    self.open_plan
                        .clone()
                        .filter(|_| self.rounds.open_plan().is_some()),
                )
            }
            CoordinatorRequest::Manifest { round } => {
                let stored = self.ledger(move |l| l.manifest(round)).await;
                match stored {
                    Ok(Some(bytes)) => {
                        CoordinatorResponse::Manifest(Signed::from_bytes(&bytes).ok())
                    }
                    Ok(None) => CoordinatorResponse::Manifest(None),
                    Err(e) => {
                        tracing::warn!("reading manifest {round}: {e}");
                        CoordinatorResponse::Refused {
                            reason: "the coordinator could not read its ledger".into(),
                        }
                    }
                }
            }
        }
    }

    pub(super) async fn on_join(
        &mut self,
        signed: Signed<barnraise_protocol::messages::Join>,
        peer_key: Option<PublicKey>,
        observed_ip: Option<std::net::IpAddr>,
    ) -> CoordinatorResponse {
        let now = now_ms();
        let admitted = match admission::admit(
            &signed,
            peer_key.as_ref(),
            &self.config.run_id,
            &self.resolved.admission,
            now,
        ) {
            Ok(a) => a,
            Err(refusal) => {
                self.metrics.join_refusals.fetch_add(1, Ordering::Relaxed);
                // Only a join its sender really signed can be held against it.
                let authenticated = !matches!(
                    refusal,
                    admission::JoinRefusal::BadSignature | admission::JoinRefusal::NotTheSender
                );
                self.refuse(
                    None,
                    authenticated.then_some(&signed.signer),
                    "join-refused",
                    refusal.to_string(),
                )
                .await;
                tracing::info!(signer = %signed.signer.to_hex().get(..12).unwrap_or(""), "join refused: {refusal}");
                return CoordinatorResponse::Refused {
                    reason: refusal.to_string(),
                };
            }
        };
        let node = admitted.node;
        let workers = admitted.join.workers.len() as u32;
        let row = NodeRow {
            node: node.to_string(),
            org: admitted.certificate.as_ref().map(|c| c.org.to_string()),
            org_name: admitted.certificate.as_ref().map(|c| c.org_name.clone()),
            agent: admitted.join.agent.clone(),
            workers,
            listen_addrs: admitted.join.listen_addrs.clone(),
            first_seen_ms: now,
            last_seen_ms: now,
            certificate: admitted
                .join
                .certificate
                .as_ref()
                .map(|c| barnraise_protocol::certificate::certificate_id(c).to_hex()),
        };
        let stored = row.clone();
        if let Err(e) = self.ledger(move |l| l.upsert_node(&stored)).await {
            tracing::error!("recording a node: {e}");
            return CoordinatorResponse::Refused {
                reason: "the coordinator could not record the join; retry".into(),
            };
        }
        add_node_addresses(&self.net, &row.node, &row.listen_addrs).await;
        self.bootstrap.joined(node, &row.listen_addrs, observed_ip);
        let was_member = self.rounds.is_member(&node);
        self.rounds.join(node, workers);
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        if !was_member {
            tracing::info!(node = %node.short(), agent = %row.agent, "node joined");
            let _ = self.events.send(CoordinatorEvent::NodeJoined { node });
        }
        let welcome = Welcome {
            node,
            config: self.run_config.clone(),
            current_round: self.rounds.current_round(),
            params_hash: self.rounds.params_hash(),
            checkpoint: Some(self.checkpoint.clone()),
            head_manifest: self.rounds.head_manifest(),
            bootstrap: self.bootstrap.peers(Some(&node)),
        };
        self.update_live();
        match Signed::sign(&self.key, &welcome) {
            Ok(signed) => CoordinatorResponse::Welcome(signed),
            Err(e) => CoordinatorResponse::Refused {
                reason: format!("the coordinator could not sign its welcome: {e}"),
            },
        }
    }

    /// Stage 1 of verification, then the fetch. `peer_key` is `None` for
    /// commits replayed from the ledger on a restart.
    pub(super) async fn on_commit(
        &mut self,
        signed: Signed<Commit>,
        peer_key: Option<PublicKey>,
    ) -> CoordinatorResponse {
        tracing::debug!(signer = ?signed.signer, "commit received");
        let from_network = peer_key.is_some();
        if from_network {
            self.metrics.commits.fetch_add(1, Ordering::Relaxed);
        }
        let (node, commit, body) = match verify::open_commit(&signed) {
            Ok(opened) => opened,
            Err(reason) => {
                self.metrics.rejected(reason.code());
                // Its signature did not verify: nobody to hold it against.
                self.refuse(
                    Some(self.rounds.current_round()),
                    None,
                    reason.code(),
                    "commit envelope refused".into(),
                )
                .await;
                return CoordinatorResponse::Refused {
                    reason: format!(
                        "{}: the commit's signature or encoding is invalid",
                        reason.code()
                    ),
                };
            }
        };
        self.rounds.seen(&node);
        match self.rounds.commit(node, &commit, body) {
            CommitOutcome::Accepted { round } => {
                if from_network {
                    let stored = match signed.to_bytes() {
                        Ok(bytes) => {
                            let author = node.to_string();
                            self.ledger(move |l| l.record_commit(round, &author, &bytes, now_ms()))
                                .await
                        }
                        Err(e) => Err(CoordinatorError::from(e)),
                    };
                    if let Err(e) = stored {
                        // The node is told it was accepted only once the commit is durable.
                        tracing::error!("storing a commit: {e}");
                        self.rounds
                            .update_checked(round, &node, Err(RejectReason::NotServed));
                        return CoordinatorResponse::Refused {
                            reason: "the coordinator could not store the commit".into(),
                        };
                    }
                }
                if let Some(until_ms) = self.spawn_fetch(round, node, commit) {
                    self.rounds.hold_for_fetch(round, &node, until_ms);
                }
                CoordinatorResponse::CommitAccepted { round }
            }
            CommitOutcome::AlreadyHave { round } => CoordinatorResponse::CommitAccepted { round },
            CommitOutcome::Rejected { reason, in_round } => {
                self.metrics.rejected(reason.code());
                if in_round.is_none() {
                    // A commit from a node that never joined is signed by a
                    // key anyone can make: counted, not recorded.
                    let member = reason != RejectReason::UnknownNode;
                    self.refuse(
                        Some(commit.round),
                        member.then_some(&node.0),
                        reason.code(),
                        format!("commit for round {}", commit.round),
                    )
                    .await;
                }
                tracing::info!(node = %node.short(), round = commit.round, reason = reason.code(), "commit refused");
                CoordinatorResponse::Refused {
                    reason: format!(
                        "{}: commit for round {} refused",
                        reason.code(),
                        commit.round
                    ),
                }
            }
        }
    }
}

pub(super) async fn add_node_addresses(client: &Client, node: &str, addrs: &[String]) {
    let Ok(id) = node.parse::<NodeId>() else {
        return;
    };
    let Ok(peer) = id.0.to_peer_id() else { return };
    let addrs: Vec<Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    if !addrs.is_empty() {
        let _ = client.add_addresses(peer, addrs).await;
    }
}
