//! Fetching committed updates: from the store or the node that committed
//! them, each on its own task, checked (stage 2) on a blocking thread and
//! kept for the close; and the starting states of workers drawn for a spot
//! check, whose replays then start at once (`super::early`).

use super::*;

impl Service {
    /// Returns until when the round should be held past its deadline for
    /// the drawn workers' states (`Rounds::hold_for_fetch`), if any are
    /// drawn.
    pub(super) fn spawn_fetch(&mut self, round: u64, node: NodeId, commit: Commit) -> Option<u64> {
        let defers = self.defers_states_of(round);
        let client = self.net.clone();
        let store = self.store.clone();
        let tx = self.internal_tx.clone();
        let metrics = self.metrics.clone();
        let codec = self.resolved.codec.codec_at(round);
        let params = self.resolved.model.params_count();
        let deadline_ms = self
            .rounds
            .open_deadline_ms()
            .unwrap_or(0)
            .max(now_ms() + 1000);
        // The workers drawn for a spot check: their starting states are
        // fetched with the update, and replayed as soon as they are in
        // (`super::early`), or else when the round closes.
        let verify = &self.config.verify;
        let drawn: Vec<barnraise_protocol::workers::WorkerShare> = crate::spot::drawn_shares(
            &self.key,
            &self.config.run_id,
            &node,
            &commit,
            verify.spot_check_fraction,
        )
        .into_iter()
        .take(verify.spot_check_max)
        .map(|(_, share)| share.clone())
        .collect();
        let state_bytes = barnraise_trainer::Trainer::optimizer_state_len(params) as u64;
        // A drawn state is far larger than the update (8 bytes a parameter):
        // a node that committed in time gets until the round's deadline or
        // the time the states take at `state_link_mbps`, whichever is later.
        // Never past the longest the round may be held for it
        // (`Rounds::fetch_limit_ms`); with no hold, the round's deadline.
        let limit_ms = self.rounds.fetch_limit_ms().unwrap_or(0);
        let state_deadline_ms = (!drawn.is_empty()).then(|| {
            now_ms()
                .saturating_add(state_upload_ms(
                    state_bytes.saturating_mul(drawn.len() as u64),
                    verify.state_link_mbps,
                ))
                .min(limit_ms)
                .max(deadline_ms)
        });
        // Probed as soon as the update is in and checked, and the drawn
        // shares replayed as soon as their states are (`super::early`),
        // when this round is the open one.
        let early = match (&self.early, self.rounds.open_plan()) {
            (Some(early), Some(plan)) if early.round() == round => plan
                .assignments
                .iter()
                .find(|a| a.node == node)
                .map(|assignment| (early.clone(), assignment.clone())),
            _ => None,
        };
        // Deferred checks (`super::deferred`): the update's verdict goes as
        // soon as it is checked, and the states follow on their own, as
        // long as the node must serve them.
        let defer = defers && !drawn.is_empty() && early.is_some();
        let grace_ms = (verify.state_grace_secs * 1000.0) as u64;
        let serve_ms = barnraise_protocol::limits::state_serve_ms(
            state_bytes.saturating_mul(drawn.len() as u64),
        );
        let states_until_ms = if defer {
            now_ms().saturating_add(serve_ms.saturating_sub(STATE_SERVE_MARGIN_MS))
        } else {
            state_deadline_ms.unwrap_or(deadline_ms)
        };
        let fetch_states = {
            let client = client.clone();
            let store = store.clone();
            move |share: barnraise_protocol::workers::WorkerShare| {
                let (client, store) = (client.clone(), store.clone());
                async move {
                    let worker = share.index;
                    let started = tokio::time::Instant::now();
                    let fetched = fetch_state(
                        &client,
                        &store,
                        node,
                        share.state_hash,
                        state_bytes,
                        states_until_ms,
                    )
                    .await;
                    match &fetched {
                        Ok(()) => tracing::info!(
                            node = %node.short(),
                            round,
                            worker,
                            bytes = state_bytes,
                            fetch_ms = started.elapsed().as_millis() as u64,
                            past_deadline_ms = now_ms().saturating_sub(deadline_ms),
                            "spot check: the worker's state is in"
                        ),
                        Err(reason) => tracing::info!(
                            node = %node.short(),
                            round,
                            worker,
                            "spot check: the worker's state was not served ({})",
                            reason.code()
                        ),
                    }
                    (share, fetched)
                }
            }
        };
        // What the probe measures before the update: while it travels.
        if let Some((early, assignment)) = &early
            && commit.update_bytes == codec.encoded_len(params) as u64
        {
            early.base(commit.clone(), assignment.clone());
        }
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let fetched = fetch_and_check(
                &client,
                &store,
                &metrics,
                node,
                &commit,
                codec,
                params,
                deadline_ms,
            )
            .await;
            tracing::debug!(
                node = %node.short(),
                round,
                took_ms = started.elapsed().as_millis() as u64,
                from_node_ms = fetched.as_ref().ok().copied().flatten().map(|d| d.as_millis() as u64),
                ok = fetched.is_ok(),
                "update fetched and checked"
            );
            let mut result = fetched.as_ref().map(|_| ()).map_err(Clone::clone);
            if let (true, Ok(took)) = (defer, fetched) {
                // The grace only for states that can arrive within it, at
                // the rate the update itself came in: over a slow link it
                // would hold every drawn round for nothing.
                let states = state_bytes.saturating_mul(drawn.len() as u64);
                let hold = states_may_arrive_within(states, commit.update_bytes, took, grace_ms);
                let _ = tx
                    .send(Internal::Checked {
                        round,
                        node,
                        update: (commit.update_hash, commit.update_bytes),
                        result: Ok(()),
                        states_until_ms: hold.then(|| now_ms().saturating_add(grace_ms)),
                    })
                    .await;
                // Probed now; the states, far larger, follow.
                if let Some((early, assignment)) = &early {
                    early.probe(commit.clone(), assignment.clone());
                }
                let mut results = Vec::new();
                for share in drawn {
                    let (share, fetched) = fetch_states(share).await;
                    // Replayed at once while the round is open; the close
                    // replays or defers what this does not reach.
                    if let (Ok(()), Some((early, assignment))) = (&fetched, &early) {
                        early.replay(commit.update_hash, share.clone(), assignment.clone());
                    }
                    results.push((share, fetched));
                }
                let _ = tx
                    .send(Internal::StatesIn {
                        round,
                        node,
                        results,
                    })
                    .await;
                return;
            }
            for share in &drawn {
                if result.is_err() {
                    break;
                }
                let worker = share.index;
                result = fetch_states(share.clone())
                    .await
                    .1
                    .map_err(|_| RejectReason::SpotCheck { worker });
            }
            if let (Ok(()), Some((early, assignment))) = (&result, early) {
                // Replays first: they take longest, and the early checks
                // start in the order they are asked for.
                for share in drawn {
                    early.replay(commit.update_hash, share, assignment.clone());
                }
                early.probe(commit.clone(), assignment);
            }
            if let Err(reason) = &result {
                tracing::info!(node = %node.short(), round, reason = reason.code(), "update rejected");
            }
            let _ = tx
                .send(Internal::Checked {
                    round,
                    node,
                    update: (commit.update_hash, commit.update_bytes),
                    result,
                    states_until_ms: None,
                })
                .await;
        });
        // Deferred, nothing holds the round.
        state_deadline_ms.filter(|_| !defer)
    }
}

/// Whether `states` bytes may arrive within `grace_ms`, judged by an
/// update of `update_bytes` that took `took` to fetch (None: it was in the
/// store already, so nothing is known of the link and the grace applies).
/// The update's time includes its requests' round trips, so the estimate
/// errs towards a slower link.
pub(super) fn states_may_arrive_within(
    states: u64,
    update_bytes: u64,
    took: Option<Duration>,
    grace_ms: u64,
) -> bool {
    let Some(took) = took else {
        return true;
    };
    if update_bytes == 0 {
        return true;
    }
    let expected_ms = took.as_secs_f64() * 1e3 * states as f64 / update_bytes as f64;
    expected_ms <= grace_ms as f64
}

/// How much sooner than the node's obligation to serve a state
/// (`limits::state_serve_ms`) a deferred fetch gives up: the node's clock
/// starts when it stores the state, a little before its commit arrives.
const STATE_SERVE_MARGIN_MS: u64 = 10_000;

/// The time a state of `bytes` may take to arrive over a link of `mbps`:
/// its bytes at that rate, plus 5 s for the requests' round trips.
pub(super) fn state_upload_ms(bytes: u64, mbps: f64) -> u64 {
    let transfer = bytes as f64 * 8.0 / (mbps.max(1e-3) * 1e3);
    5_000u64.saturating_add(transfer.min(u64::MAX as f64 / 2.0) as u64)
}

/// How many times a node may answer "not found" for its own committed update
/// before it counts as not serving it (connection failures are retried until
/// the deadline).
const DEFINITE_REFUSALS: u32 = 3;

/// A blob the node `node` committed to, from the store or else from the
/// node itself, until `deadline_ms`. A node that offers other bytes than it
/// committed to is `HashMismatch`; one that keeps refusing, or runs out the
/// clock, `NotServed`. True with the bytes when they came from the node.
async fn fetch_from_author(
    client: &Client,
    store: &BlobStore,
    node: NodeId,
    hash: Hash,
    bytes: u64,
    deadline_ms: u64,
) -> Result<(Arc<Vec<u8>>, bool), RejectReason> {
    let held = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.get(&hash)).await
    };
    if let Ok(Ok(Some(held))) = held {
        return Ok((held, false));
    }
    let peer = node.0.to_peer_id().map_err(|_| RejectReason::UnknownNode)?;
    let mut attempt = 0u32;
    // What arrived before a failed attempt is kept: the next one asks only
    // for the rest.
    let mut partial = Vec::new();
    loop {
        let left = deadline_ms.saturating_sub(now_ms());
        if left == 0 {
            return Err(RejectReason::NotServed);
        }
        let fetched = tokio::time::timeout(
            Duration::from_millis(left),
            network::fetch_blob_into(client, peer, hash, bytes, &mut partial),
        )
        .await;
        match fetched {
            Ok(Ok(())) => return Ok((Arc::new(partial), true)),
            // It offers other bytes than it committed to.
            Ok(Err(network::FetchError::WrongSize { .. })) => {
                return Err(RejectReason::HashMismatch);
            }
            // A node stores its blobs before committing; one that keeps
            // saying it has none will not serve them.
            Ok(Err(network::FetchError::NotFound | network::FetchError::Refused(_)))
                if attempt + 1 >= DEFINITE_REFUSALS =>
            {
                return Err(RejectReason::NotServed);
            }
            Ok(Err(e)) => {
                attempt += 1;
                tracing::debug!(node = %node.short(), attempt, "fetching {}: {e}", hash.short());
                tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8)))).await;
            }
            Err(_) => return Err(RejectReason::NotServed),
        }
    }
}

/// Fetches a drawn worker's starting optimizer state and keeps it for the
/// replay when the round closes.
async fn fetch_state(
    client: &Client,
    store: &BlobStore,
    node: NodeId,
    hash: Hash,
    bytes: u64,
    deadline_ms: u64,
) -> Result<(), RejectReason> {
    let (state, _) = fetch_from_author(client, store, node, hash, bytes, deadline_ms).await?;
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        if Hash::of(&state) != hash {
            return Err(RejectReason::HashMismatch);
        }
        store.put(state).map(|_| ()).map_err(|e| {
            tracing::error!("storing a worker state: {e}");
            RejectReason::NotServed
        })
    })
    .await
    .unwrap_or(Err(RejectReason::NotServed))
}

/// Fetches a committed update (unless the store already has it), then runs
/// stage 2 on a blocking thread and keeps the payload if it passes.
#[allow(clippy::too_many_arguments)]
async fn fetch_and_check(
    client: &Client,
    store: &BlobStore,
    metrics: &Arc<Metrics>,
    node: NodeId,
    commit: &Commit,
    codec: barnraise_protocol::codec::CodecConfig,
    params: usize,
    deadline_ms: u64,
) -> Result<Option<Duration>, RejectReason> {
    // The exact size is known from the codec: refuse anything else before fetching a byte.
    if commit.update_bytes != codec.encoded_len(params) as u64 {
        return Err(RejectReason::WrongLength);
    }
    let started = tokio::time::Instant::now();
    let (payload, from_node) = fetch_from_author(
        client,
        store,
        node,
        commit.update_hash,
        commit.update_bytes,
        deadline_ms,
    )
    .await?;
    let took = started.elapsed();
    // Stage 2, then the payload is kept: both on a blocking thread.
    let commit = commit.clone();
    let metrics = metrics.clone();
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        metrics.stages.time(Stage::Fetch, || {
            verify::check_payload(&payload, &commit, codec, params)
        })?;
        let stored = metrics.stages.time(Stage::Fetch, || store.put(payload));
        if let Err(e) = stored {
            tracing::error!("storing an update: {e}");
            return Err(RejectReason::NotServed);
        }
        Ok(from_node.then_some(took))
    })
    .await
    .unwrap_or(Err(RejectReason::undecodable("the check crashed")))
}

#[cfg(test)]
mod tests {
    use super::{state_upload_ms, states_may_arrive_within};
    use std::time::Duration;

    #[test]
    fn the_grace_waits_only_for_states_the_link_can_bring_in_time() {
        let state = 26_368_376; // `small`'s.
        let update = 1_242_720;
        // Loopback: the update in 30 ms, so the state in about 0.64 s.
        assert!(states_may_arrive_within(
            state,
            update,
            Some(Duration::from_millis(30)),
            2_000
        ));
        // 20 Mbit/s: the update in 0.6 s, the state in about 12.7 s.
        assert!(!states_may_arrive_within(
            state,
            update,
            Some(Duration::from_millis(600)),
            2_000
        ));
        // Two drawn states take twice as long.
        assert!(states_may_arrive_within(
            state,
            update,
            Some(Duration::from_millis(80)),
            2_000
        ));
        assert!(!states_may_arrive_within(
            2 * state,
            update,
            Some(Duration::from_millis(80)),
            2_000
        ));
        // Nothing measured (the update was in the store): the grace applies.
        assert!(states_may_arrive_within(state, update, None, 2_000));
        assert!(states_may_arrive_within(
            state,
            0,
            Some(Duration::from_secs(1)),
            2_000
        ));
        // No grace: nothing may arrive within it but an instant transfer.
        assert!(!states_may_arrive_within(
            state,
            update,
            Some(Duration::from_millis(1)),
            0
        ));
    }

    #[test]
    fn a_state_is_given_its_bytes_at_the_link_rate_plus_round_trips() {
        // A state of `small`'s size (about 3.3 M parameters × 8 bytes).
        assert_eq!(state_upload_ms(26_368_376, 10.0), 5_000 + 21_094);
        assert_eq!(state_upload_ms(26_368_376, 20.0), 5_000 + 10_547);
        assert_eq!(state_upload_ms(0, 10.0), 5_000);
        // No rate is infinitely slow.
        assert!(state_upload_ms(u64::MAX, 0.0) > 5_000);
    }
}
