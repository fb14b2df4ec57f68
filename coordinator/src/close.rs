//! Closing a round, as one pure function: stages 2–4 of verification over
//! the round's candidates, the robust aggregation and the outer step (the
//! shared `barnraise_protocol::aggregate::apply_round`, so every node computes
//! the same θ_{r+1}), the manifest body and the ledger rows. The service runs
//! it on a blocking thread and then signs and commits the result.

use crate::config::VerifyConfig;
use crate::ledger::UpdateRow;
use crate::probe::{Probe, ProbeError, ProbeResult};
use crate::rounds::{Candidate, CloseRound};
use crate::verify::{self, RoundUpdate};
use barnraise_protocol::aggregate::{AggregateError, AggregationRule, apply_round};
use barnraise_protocol::codec::CodecConfig;
use barnraise_protocol::messages::{AcceptedUpdate, Manifest, RejectReason, RejectedUpdate};
use barnraise_protocol::outer::OuterOptimizer;
use barnraise_protocol::workers::WorkerShare;
use barnraise_protocol::{Hash, NodeId};
use barnraise_trainer::ModelConfig;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a round could not be closed (the coordinator's fault, never a node's:
/// bad updates are rejected, not errors).
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("aggregating round {round}: {source}")]
    Aggregate { round: u64, source: AggregateError },
    #[error("round {round}: {source}")]
    Probe { round: u64, source: ProbeError },
}

/// What the close needs besides the round itself.
pub struct CloseContext<'a> {
    pub model: &'a ModelConfig,
    pub codec: CodecConfig,
    pub rule: &'a AggregationRule,
    pub verify: &'a VerifyConfig,
    pub seq_len: usize,
    /// The training shards in dataset order: what a plan's shard indices name.
    pub dataset: &'a [barnraise_protocol::messages::ShardInfo],
    /// Tokens of the training shards (by hash), for the probe.
    pub shard_tokens: &'a dyn crate::store::ShardTokens,
    /// The held-out shard's tokens: the probe's "data the node was not given"
    /// and the eval set of θ_{r+1}.
    pub heldout: Option<&'a [u16]>,
    /// Training FLOPs per token, for credit.
    pub flops_per_token: f64,
    /// The seed of the update sketches (the run's, so they compare across rounds).
    pub sketch_seed: u64,
    /// Updates accepted in recent rounds, to catch replays of them.
    pub recent: &'a [verify::RecentUpdate],
    /// Spot checks (stage 5); `None` runs none.
    pub spot: Option<SpotContext<'a>>,
    /// Compute θ_{r+1}'s held-out loss in the close ([`Closed::eval_loss`]);
    /// otherwise it is None and the caller evaluates later.
    pub evaluate: bool,
    /// The coordinator's key: the probe's seeds are its signatures.
    pub key: &'a barnraise_protocol::SigningKey,
    /// Checks already run while the round was open.
    pub early: &'a Early,
}

/// What spot checks need besides the round: the key that draws them, the
/// run config workers trained under, and the drawn workers' states.
pub struct SpotContext<'a> {
    pub key: &'a barnraise_protocol::SigningKey,
    pub run: &'a barnraise_protocol::messages::RunConfig,
    /// A blob from the store by hash: a fetched starting state (read only
    /// for the shares the round replays, so states drawn over the budget
    /// are never read), or round r − 1's update for carried steps.
    pub state: &'a (dyn Fn(&Hash) -> Option<Arc<Vec<u8>>> + Sync),
    /// Round r − 1, for shares with carried steps (docs/architecture.md,
    /// "Overlapped rounds"); `None` after a restart.
    pub prev: Option<&'a crate::spot::PrevRound>,
    /// Every node's credit not yet backed by a passed check (the manifests
    /// so far, folded): what a failed check voids.
    pub unverified: &'a barnraise_protocol::credit::Unverified,
    /// Checks settled after their round's close, and checks still pending.
    pub deferred: DeferredInput<'a>,
}

/// Spot checks whose state arrives after the round's close
/// (`verify.defer_state_checks`; docs/security.md, "Deferred spot checks").
/// A drawn share whose state is not in when the round closes is replayed
/// later against the same θ_r, and its verdict settles in the next close:
/// a failure there voids the node's window, which still holds the deferred
/// round's credit, because a node is never listed `verified` while one of
/// its checks is pending. A pass lists nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct DeferredInput<'a> {
    /// Defer a drawn share whose state has not arrived instead of failing it.
    pub defer: bool,
    /// Verdicts of earlier rounds' deferred checks, settled since the last close.
    pub settled: &'a [Settled],
    /// Nodes with a deferred check still unsettled.
    pub pending: &'a [NodeId],
}

/// A deferred spot check's verdict, for the next close.
#[derive(Clone, Debug, PartialEq)]
pub struct Settled {
    /// The round whose update the replayed share belongs to.
    pub round: u64,
    pub node: NodeId,
    pub result: crate::spot::SpotResult,
}

/// A drawn share the close deferred: its state had not arrived.
#[derive(Clone, Debug, PartialEq)]
pub struct DeferredShare {
    pub node: NodeId,
    pub update_hash: Hash,
    pub share: WorkerShare,
    /// The node's assignment in the round, which the replay follows.
    pub assignment: barnraise_protocol::messages::Assignment,
}

/// One spot check, kept for the ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct SpotRecord {
    pub node: NodeId,
    /// The round of the replayed share: the closing round's, or an earlier
    /// one's for a deferred check settled in this close.
    pub round: u64,
    pub result: crate::spot::SpotResult,
    pub passed: bool,
}

/// One probe measurement, kept for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeRecord {
    pub node: NodeId,
    /// The candidate's index in the round.
    pub index: usize,
    pub result: ProbeResult,
    /// The least own-shard gain this update had to show: the round's bar
    /// times √ of its assigned steps ([`crate::probe::unit_bar`]).
    pub bar: f32,
    /// The second look, on `verify.probe_second_look_batches` fresh
    /// batches, at an update the first look found not useful: its verdict
    /// stands in for the first's.
    pub second: Option<ProbeResult>,
}

/// The result of closing a round; the manifest still needs signing.
#[derive(Clone, Debug)]
pub struct Closed {
    pub manifest: Manifest,
    pub updates: Vec<UpdateRow>,
    pub mean_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub bytes_received: u64,
    pub probes: Vec<ProbeRecord>,
    pub spot_checks: Vec<SpotRecord>,
    /// This round's accepted updates, by sketch, for later rounds' replay check.
    pub sketches: Vec<verify::RecentUpdate>,
    /// Drawn shares whose state had not arrived: replayed when it does,
    /// their verdicts settled in a later close.
    pub deferred: Vec<DeferredShare>,
    pub timings: CloseTimings,
}

/// Which of the round's surviving candidates the probe measures (at most
/// `probe_max`), and which pass without it. Nodes with no update accepted
/// in the replay window come first: new nodes, and nodes whose recent work
/// was refused. The rest are ranked by a draw from the probe's seed, which
/// depends on every committed update, so no node knew its rank when it
/// committed. Both lists are in commit order.
fn probe_sample(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    survivors: &[usize],
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let budget = ctx.verify.probe_max.max(1);
    if survivors.len() <= budget {
        return (survivors.to_vec(), Vec::new());
    }
    let round = close.plan.round;
    let established: std::collections::HashSet<NodeId> =
        ctx.recent.iter().map(|r| r.node).collect();
    let mut ranked: Vec<(bool, u64, usize)> = survivors
        .iter()
        .map(|&i| {
            let node = &close.candidates[i].node;
            let draw = crate::plan::derive(seed, "probe-pick", round, &node.0.0);
            (established.contains(node), draw, i)
        })
        .collect();
    ranked.sort_unstable();
    let mut probed: Vec<usize> = ranked[..budget].iter().map(|r| r.2).collect();
    let mut passed: Vec<usize> = ranked[budget..].iter().map(|r| r.2).collect();
    probed.sort_unstable();
    passed.sort_unstable();
    (probed, passed)
}

/// The shares stage 5 replays among `candidates`' updates: each
/// candidate's drawn shares (at most the budget each, what the service
/// fetched states for), the lowest draws over the round up to the budget,
/// in commit order.
fn spot_draws<'c>(
    ctx: &CloseContext<'_>,
    spot: &SpotContext<'_>,
    close: &'c CloseRound,
    run_id: &str,
    candidates: &[usize],
) -> Vec<(usize, &'c WorkerShare)> {
    let mut drawn: Vec<(u64, usize, &WorkerShare)> = candidates
        .iter()
        .flat_map(|&i| {
            let c = &close.candidates[i];
            crate::spot::drawn_shares(
                spot.key,
                run_id,
                &c.node,
                &c.commit,
                ctx.verify.spot_check_fraction,
            )
            .into_iter()
            .take(ctx.verify.spot_check_max)
            .map(move |(rank, share)| (rank, i, share))
        })
        .collect();
    drawn.sort_by_key(|(rank, i, share)| (*rank, *i, share.index));
    drawn.truncate(ctx.verify.spot_check_max);
    drawn.sort_by_key(|(_, i, share)| (*i, share.index));
    drawn.into_iter().map(|(_, i, share)| (i, share)).collect()
}

/// Takes the replay of candidate `i`'s `share` that ran while the round
/// was open into `replayed`, if there is one.
fn take_early_replay(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    i: usize,
    share: &WorkerShare,
    replayed: &mut HashMap<(usize, u32), crate::spot::SpotResult>,
) -> bool {
    let c = &close.candidates[i];
    let key = (c.node, c.commit.update_hash, share.index);
    match ctx.early.replays.get(&key) {
        Some(result) => {
            replayed.insert((i, share.index), result.clone());
            true
        }
        None => false,
    }
}

/// Replays one drawn share of candidate `i`'s update from θ_r; None when
/// its state has not arrived and such checks are deferred.
fn spot_replay(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    theta: &[f32],
    i: usize,
    share: &WorkerShare,
) -> Option<crate::spot::SpotResult> {
    let c = &close.candidates[i];
    let Some(spot) = &ctx.spot else {
        return Some(crate::spot::SpotResult::unusable(
            share,
            "spot checks are off".into(),
        ));
    };
    let assignment = close.plan.assignments.iter().find(|a| a.node == c.node);
    let state = (spot.state)(&share.state_hash);
    if state.is_none() && spot.deferred.defer && assignment.is_some() {
        return None;
    }
    Some(match (assignment, state) {
        (Some(assignment), Some(state)) => crate::spot::replay(
            &crate::spot::ReplayInput {
                model: ctx.model,
                run: spot.run,
                shard_tokens: ctx.shard_tokens,
                prev: spot.prev,
                payload: spot.state,
            },
            close.plan.round,
            theta,
            assignment,
            share,
            &state,
        ),
        (None, _) => {
            crate::spot::SpotResult::unusable(share, "the node has no assignment this round".into())
        }
        (Some(_), None) => {
            crate::spot::SpotResult::unusable(share, "the worker's state was not served".into())
        }
    })
}

/// A thread's probe model at θ_r, made on its first job.
fn probe_for<'p>(
    slot: &'p mut Option<Probe>,
    ctx: &CloseContext<'_>,
    theta: &[f32],
) -> Result<&'p mut Probe, ProbeError> {
    if slot.is_none() {
        *slot = Some(Probe::new(ctx.model, theta, ctx.verify, ctx.seq_len, 0)?);
    }
    slot.as_mut()
        .ok_or_else(|| ProbeError::Device("the probe model was not made".into()))
}

/// One job of the close's checks.
enum Check<'c> {
    /// A spot-check replay of candidate `.0`'s share.
    Spot(usize, &'c WorkerShare),
    /// The probe of its `.0`-th measured candidate.
    Measure(usize),
    /// θ_r's probe loss on the round's held-out batches.
    HeldoutBase,
}

/// What a [`Check`] found.
enum CheckOutcome {
    /// None: deferred, the state is not in.
    Spot(Option<crate::spot::SpotResult>),
    /// None: the payload was gone.
    Measured(Option<Result<crate::probe::Measured, ProbeError>>),
    Loss(Result<f32, ProbeError>),
}

/// Checks the service ran while the round was open, for the close to use
/// instead of running them again (`crate::service`, "early checks"). Each is
/// the same function of the same inputs as in the close.
#[derive(Clone, Debug, Default)]
pub struct Early {
    /// θ_r's probe loss on the round's held-out batches.
    pub heldout_base: Option<f32>,
    /// Probe measurements, by node and update hash: a measurement depends
    /// on the node (its seed and assignment), and two nodes may commit the
    /// same bytes.
    pub probes: HashMap<(NodeId, Hash), crate::probe::Measured>,
    /// θ_r's loss on what an update is probed on (its shard and batches),
    /// by node and update hash: measured while the update was fetched.
    pub bases: HashMap<(NodeId, Hash), f32>,
    /// Spot-check replays, by node, update hash and worker (the state
    /// replayed is the one that node's commit names).
    pub replays: HashMap<(NodeId, Hash, u32), crate::spot::SpotResult>,
}

/// Where the close spent its time (`crate::metrics::Stage`).
#[derive(Clone, Debug, Default)]
pub struct CloseTimings {
    /// Stage 2 again and stage 3.
    pub verify: Duration,
    /// The usefulness probe's jobs, summed over the threads they ran on.
    pub probe: Duration,
    /// The spot-check replays, summed over their threads.
    pub spot: Duration,
    /// Wall clock of the probe and the replays together (they share the
    /// close's threads).
    pub checks: Duration,
    /// The held-out evaluation of θ_{r+1}, when the close ran it.
    pub eval: Duration,
    /// The aggregate and the outer step.
    pub aggregate: Duration,
    /// Pairs of sketches the copy and replay checks compared.
    pub comparisons: u64,
}

/// Verifies, aggregates and steps. `theta` and `optimizer` hold θ_r and its
/// momentum on entry and θ_{r+1} and the new momentum on success; on error
/// they are unchanged.
pub fn close_round(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    run_id: &str,
    payloads: &HashMap<Hash, Arc<Vec<u8>>>,
    theta: &mut [f32],
    optimizer: &mut OuterOptimizer,
) -> Result<Closed, CloseError> {
    let round = close.plan.round;
    let params = theta.len();
    let mut rejected: Vec<RejectedUpdate> = close.rejected.clone();
    let mut bytes_received = 0u64;

    // Stage 2 once more on what the store holds (cheap, and the store is
    // disk), one update at a time: stage 3 keeps each one's norm and
    // sketch, not its dense values, so the close never holds the round's
    // updates decoded at once.
    let started = Instant::now();
    let assignment_of: AssignmentOf<'_> =
        close.plan.assignments.iter().map(|a| (a.node, a)).collect();
    let mut summaries: Vec<(usize, verify::UpdateSummary)> = Vec::new();
    for (i, c) in close.candidates.iter().enumerate() {
        let reject = |reason| RejectedUpdate {
            node: c.node,
            update_hash: Some(c.commit.update_hash),
            reason,
        };
        let Some(payload) = payloads.get(&c.commit.update_hash) else {
            rejected.push(reject(RejectReason::NotServed));
            continue;
        };
        bytes_received += payload.len() as u64;
        match verify::check_payload(payload, &c.commit, ctx.codec, params) {
            Ok(values) => {
                let update = RoundUpdate {
                    node: c.node,
                    hash: c.commit.update_hash,
                    values: &values,
                };
                let steps = assigned_steps(&assignment_of, &c.node);
                let summary = verify::UpdateSummary::of(&update, ctx.sketch_seed);
                summaries.push((i, summary.with_steps(steps)));
            }
            Err(reason) => rejected.push(reject(reason)),
        }
    }

    // Stage 3 over the round.
    let (order, list): (Vec<usize>, Vec<verify::UpdateSummary>) = summaries.into_iter().unzip();
    let stats = verify::judge_round(list, ctx.verify, ctx.recent);
    let mut survivors = Vec::new();
    let mut sketch_of: HashMap<usize, verify::Sketch> = HashMap::new();
    for (&i, (verdict, update_stats)) in order.iter().zip(stats.verdicts) {
        let c = &close.candidates[i];
        match verdict {
            Ok(()) => {
                sketch_of.insert(i, update_stats.sketch);
                survivors.push(i);
            }
            Err(reason) => rejected.push(RejectedUpdate {
                node: c.node,
                update_hash: Some(c.commit.update_hash),
                reason,
            }),
        }
    }
    let verify_time = started.elapsed();

    // Stages 4 and 5 together: every probe loss and every spot-check replay
    // is an independent job, run on the close's threads (`crate::pool`),
    // results in job order, so the verdicts are those of running them one
    // by one. Replays are drawn from every update still standing before
    // the probe has ruled; if the probe then rejects one whose share was
    // drawn, the shares that move up into the budget are replayed after.
    let started = Instant::now();
    let theta_r: &[f32] = theta;
    let threads = crate::pool::threads(ctx.verify.threads).max(1);
    let mut probes = Vec::new();
    let mut accepted_idx = Vec::new();
    // The probe's plan: the candidates it measures, each with its seed
    // and the tokens of the shard it is measured on.
    let mut measured: Vec<(usize, u64, Arc<Vec<u16>>)> = Vec::new();
    let heldout_seed = crate::probe::heldout_seed(ctx.key, run_id, round);
    match ctx.heldout {
        Some(_) if ctx.verify.probe && !survivors.is_empty() => {
            // Which updates are probed when there are more than the budget:
            // a draw seeded by every update of the round, known to no node
            // when it committed and recomputable by anyone auditing it.
            let committed: Vec<u8> = close
                .candidates
                .iter()
                .flat_map(|c| c.commit.update_hash.0)
                .collect();
            let seed = crate::plan::derive(0, "probe", round, &committed);
            let (probed, passed) = probe_sample(ctx, close, &survivors, seed);
            accepted_idx.extend(passed);
            for &i in &probed {
                let c = &close.candidates[i];
                let seed = crate::probe::commit_seed(
                    ctx.key,
                    run_id,
                    round,
                    &c.node,
                    &c.commit.update_hash,
                );
                let own = assignment_of
                    .get(&c.node)
                    .and_then(|a| crate::probe::own_shard(a, ctx.dataset, seed))
                    .and_then(|h| ctx.shard_tokens.tokens(&h));
                match own {
                    Some(tokens) => measured.push((i, seed, tokens)),
                    // Nothing to probe against: the probe cannot judge, so it does not reject.
                    None => accepted_idx.push(i),
                }
            }
        }
        // Off, nothing left to probe, or no held-out shard to probe against.
        _ => accepted_idx.extend(survivors.iter().copied()),
    }
    // Replays and probes the service already ran while the round was open
    // count as they are (the same functions of the same inputs).
    let mut replayed: HashMap<(usize, u32), crate::spot::SpotResult> = HashMap::new();
    let mut speculative = Vec::new();
    if let Some(spot) = &ctx.spot {
        for (i, share) in spot_draws(ctx, spot, close, run_id, &survivors) {
            if !take_early_replay(ctx, close, i, share, &mut replayed) {
                speculative.push((i, share));
            }
        }
    }
    let heldout: &[u16] = ctx.heldout.unwrap_or(&[]);
    let mut jobs: Vec<Check<'_>> = Vec::new();
    // Longest first: a replay trains a worker's round, a probe job is a
    // few forward passes.
    jobs.extend(speculative.iter().map(|&(i, share)| Check::Spot(i, share)));
    let mut found: HashMap<usize, Option<crate::probe::Measured>> = HashMap::new();
    for (m, (i, _, _)) in measured.iter().enumerate() {
        let c = &close.candidates[*i];
        match ctx.early.probes.get(&(c.node, c.commit.update_hash)) {
            Some(early) => {
                found.insert(m, Some(*early));
            }
            None => jobs.push(Check::Measure(m)),
        }
    }
    let mut heldout_base = ctx.early.heldout_base;
    if heldout_base.is_none() && !measured.is_empty() {
        jobs.push(Check::HeldoutBase);
    }
    let mut states: Vec<Option<Probe>> = (0..threads).map(|_| None).collect();
    let run_check = |probe: &mut Option<Probe>, _: usize, check: &Check<'_>| {
        let started = Instant::now();
        let outcome = match *check {
            Check::Spot(i, share) => CheckOutcome::Spot(spot_replay(ctx, close, theta_r, i, share)),
            Check::HeldoutBase => CheckOutcome::Loss(
                probe_for(probe, ctx, theta_r)
                    .and_then(|p| p.base_loss_seeded(heldout, heldout_seed)),
            ),
            Check::Measure(m) => {
                let (i, seed, own) = &measured[m];
                let c = &close.candidates[*i];
                let base = ctx
                    .early
                    .bases
                    .get(&(c.node, c.commit.update_hash))
                    .copied();
                match decoded(ctx, c, payloads, params) {
                    Some(values) => {
                        CheckOutcome::Measured(Some(probe_for(probe, ctx, theta_r).and_then(|p| {
                            p.measure_update(&values, own, *seed, heldout, heldout_seed, base)
                        })))
                    }
                    None => CheckOutcome::Measured(None),
                }
            }
        };
        (outcome, started.elapsed())
    };
    let done = crate::pool::run(&mut states, &jobs, run_check);
    let mut timings = CloseTimings {
        verify: verify_time,
        comparisons: stats.comparisons,
        ..CloseTimings::default()
    };
    for (check, (outcome, took)) in jobs.iter().zip(done) {
        match (check, outcome) {
            (Check::Spot(i, share), CheckOutcome::Spot(result)) => {
                timings.spot += took;
                if let Some(result) = result {
                    replayed.insert((*i, share.index), result);
                }
            }
            (Check::HeldoutBase, CheckOutcome::Loss(loss)) => {
                timings.probe += took;
                heldout_base = Some(loss.map_err(|source| CloseError::Probe { round, source })?);
            }
            (Check::Measure(m), CheckOutcome::Measured(losses)) => {
                timings.probe += took;
                let losses = losses
                    .transpose()
                    .map_err(|source| CloseError::Probe { round, source })?;
                found.insert(*m, losses);
            }
            _ => unreachable!("pool::run returns one outcome per job, in job order"),
        }
    }
    for (m, (i, _, _)) in measured.iter().enumerate() {
        let c = &close.candidates[*i];
        let (Some(Some(losses)), Some(heldout_base)) = (found.get(&m), heldout_base) else {
            rejected.push(RejectedUpdate {
                node: c.node,
                update_hash: Some(c.commit.update_hash),
                reason: RejectReason::NotServed,
            });
            continue;
        };
        probes.push(ProbeRecord {
            node: c.node,
            index: *i,
            result: losses.result(heldout_base),
            bar: 0.0,
            second: None,
        });
    }
    // Judged against the round: the bar is a fraction of the median gain
    // per √(assigned inner steps), times the update's own √steps.
    let results: Vec<_> = probes
        .iter()
        .map(|r| (r.result, assigned_steps(&assignment_of, &r.node)))
        .collect();
    let unit = crate::probe::unit_bar(&results, ctx.verify.probe_min_relative_gain);
    for (record, (_, steps)) in probes.iter_mut().zip(&results) {
        record.bar = unit * crate::probe::work_scale(*steps);
    }
    timings.probe += second_looks(
        ctx,
        close,
        run_id,
        theta_r,
        payloads,
        &measured,
        &mut probes,
    );
    for record in &probes {
        let c = &close.candidates[record.index];
        let result = record.second.as_ref().unwrap_or(&record.result);
        match result.verdict(ctx.verify.probe_margin, record.bar) {
            Ok(()) => accepted_idx.push(record.index),
            Err(reason) => rejected.push(RejectedUpdate {
                node: c.node,
                update_hash: Some(c.commit.update_hash),
                reason,
            }),
        }
    }
    accepted_idx.sort();

    // Stage 5's verdicts: the drawn shares of the updates that passed
    // everything else, in commit order, up to the round's budget.
    let mut spot_checks = Vec::new();
    let mut verified_idx = std::collections::HashSet::new();
    let mut voided: Vec<barnraise_protocol::messages::VoidedCredit> = Vec::new();
    let mut deferred = Vec::new();
    // Nodes that may not be listed `verified` in this manifest.
    let mut unsettled: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
    if let Some(spot) = &ctx.spot {
        let void = |node: &NodeId, voided: &mut Vec<barnraise_protocol::messages::VoidedCredit>| {
            if !voided.iter().any(|v| &v.node == node) {
                voided.extend(spot.unverified.void_for(node));
            }
        };
        // A drawn worker's state that was not served (rejected while the
        // round was open) is a failed check: without the void, a node
        // faking workers could withhold the state whenever it is drawn and
        // keep the rest of its unverified credit.
        for r in &close.rejected {
            if matches!(r.reason, RejectReason::SpotCheck { .. }) {
                void(&r.node, &mut voided);
            }
        }
        // Checks deferred by earlier closes and settled since: a failure
        // rejects the node's update of this round, if it has one, and voids
        // its window, which still holds the deferred round's credit (no
        // manifest listed the node `verified` while the check was pending).
        // A pass lists nothing: `verified` would also close the window over
        // this round's update, which no check saw.
        unsettled.extend(spot.deferred.pending.iter().copied());
        let mut settled_failed = std::collections::HashSet::new();
        for s in spot.deferred.settled {
            let passed = s.result.passes(ctx.verify.spot_check_tolerance);
            spot_checks.push(SpotRecord {
                node: s.node,
                round: s.round,
                result: s.result.clone(),
                passed,
            });
            if passed || !settled_failed.insert(s.node) {
                continue;
            }
            unsettled.insert(s.node);
            if let Some(pos) = accepted_idx
                .iter()
                .position(|&i| close.candidates[i].node == s.node)
            {
                let c = &close.candidates[accepted_idx.remove(pos)];
                rejected.push(RejectedUpdate {
                    node: c.node,
                    update_hash: Some(c.commit.update_hash),
                    reason: RejectReason::SpotCheck {
                        worker: s.result.worker,
                    },
                });
            }
            void(&s.node, &mut voided);
        }
        let drawn = spot_draws(ctx, spot, close, run_id, &accepted_idx);
        let mut late: Vec<(usize, &WorkerShare)> = Vec::new();
        for &(i, share) in &drawn {
            if !replayed.contains_key(&(i, share.index))
                && !take_early_replay(ctx, close, i, share, &mut replayed)
            {
                late.push((i, share));
            }
        }
        let mut none: Vec<()> = vec![(); threads];
        let late_results = crate::pool::run(&mut none, &late, |_, _, &(i, share)| {
            let started = Instant::now();
            (
                spot_replay(ctx, close, theta_r, i, share),
                started.elapsed(),
            )
        });
        for (&(i, share), (result, took)) in late.iter().zip(late_results) {
            timings.spot += took;
            match result {
                Some(result) => {
                    replayed.insert((i, share.index), result);
                }
                None => {
                    let c = &close.candidates[i];
                    // spot_replay defers only a share with an assignment.
                    if let Some(assignment) = assignment_of.get(&c.node) {
                        unsettled.insert(c.node);
                        deferred.push(DeferredShare {
                            node: c.node,
                            update_hash: c.commit.update_hash,
                            share: share.clone(),
                            assignment: (*assignment).clone(),
                        });
                    }
                }
            }
        }
        let mut failed = std::collections::HashSet::new();
        for (i, share) in drawn {
            let c = &close.candidates[i];
            if failed.contains(&i) {
                continue;
            }
            let Some(result) = replayed.remove(&(i, share.index)) else {
                continue;
            };
            let passed = result.passes(ctx.verify.spot_check_tolerance);
            let worker = result.worker;
            spot_checks.push(SpotRecord {
                node: c.node,
                round,
                result,
                passed,
            });
            if passed {
                verified_idx.insert(i);
            } else {
                failed.insert(i);
                rejected.push(RejectedUpdate {
                    node: c.node,
                    update_hash: Some(c.commit.update_hash),
                    reason: RejectReason::SpotCheck { worker },
                });
                // Clawback: what the node was credited since its last passed check.
                void(&c.node, &mut voided);
            }
        }
        accepted_idx.retain(|i| !failed.contains(i));
        verified_idx
            .retain(|i| !failed.contains(i) && !unsettled.contains(&close.candidates[*i].node));
        // A node that failed a check here is voided now: its other shares'
        // deferred checks could only void it a second time, in a round
        // whose credit they did not see.
        let failed_nodes: std::collections::HashSet<NodeId> =
            failed.iter().map(|&i| close.candidates[i].node).collect();
        deferred.retain(|d| !failed_nodes.contains(&d.node));
    }
    timings.checks = started.elapsed();
    let started = Instant::now();

    // Weights: tokens over the accepted total, computed in f64 in manifest order.
    let total_tokens: f64 = accepted_idx
        .iter()
        .map(|&i| close.candidates[i].commit.tokens as f64)
        .sum();
    let accepted: Vec<AcceptedUpdate> = accepted_idx
        .iter()
        .map(|&i| {
            let c = &close.candidates[i];
            AcceptedUpdate {
                node: c.node,
                update_hash: c.commit.update_hash,
                update_bytes: c.commit.update_bytes,
                tokens: c.commit.tokens,
                weight: if total_tokens > 0.0 {
                    (c.commit.tokens as f64 / total_tokens) as f32
                } else {
                    0.0
                },
                compute_ms: c.commit.compute_ms,
            }
        })
        .collect();

    // The outer step, exactly as every node will run it: manifest order, manifest weights.
    let mut next_theta = theta.to_vec();
    let mut next_optimizer = optimizer.clone();
    {
        let inputs: Vec<(&[u8], f32)> = accepted
            .iter()
            .filter_map(|a| {
                payloads
                    .get(&a.update_hash)
                    .map(|p| (p.as_slice(), a.weight))
            })
            .collect();
        apply_round(&mut next_theta, &mut next_optimizer, ctx.rule, &inputs)
            .map_err(|source| CloseError::Aggregate { round, source })?;
    }
    timings.aggregate = started.elapsed();
    let started = Instant::now();
    // The held-out loss of θ_{r+1}: here only when asked (the service
    // evaluates the other rounds after their manifest is out).
    let eval_loss = match ctx.heldout {
        Some(h) if ctx.evaluate && !accepted.is_empty() => {
            crate::probe::heldout_eval(ctx.model, ctx.verify, ctx.seq_len, &next_theta, h)
                .ok()
                .map(f64::from)
        }
        _ => None,
    };
    timings.eval = started.elapsed();
    theta.copy_from_slice(&next_theta);
    *optimizer = next_optimizer;

    let mean_losses: Vec<f64> = accepted_idx
        .iter()
        .filter_map(|&i| {
            let l = &close.candidates[i].commit.losses;
            (!l.is_empty()).then(|| l.iter().map(|&x| f64::from(x)).sum::<f64>() / l.len() as f64)
        })
        .filter(|x| x.is_finite())
        .collect();
    let mean_loss = (!mean_losses.is_empty())
        .then(|| mean_losses.iter().sum::<f64>() / mean_losses.len() as f64);

    let updates = ledger_rows(
        ctx,
        close,
        &assignment_of,
        &accepted,
        &rejected,
        &probes,
        &spot_checks,
    );
    let manifest = Manifest {
        run_id: run_id.to_string(),
        round,
        previous_manifest: close.plan.previous_manifest,
        base_params_hash: close.plan.params_hash,
        accepted,
        rejected,
        missing: close.missing.clone(),
        verified: accepted_idx
            .iter()
            .filter(|i| verified_idx.contains(*i))
            .map(|&i| close.candidates[i].node)
            .collect(),
        voided,
        aggregation: ctx.rule.to_string(),
        next_params_hash: Hash::of_f32s(theta),
        closed_at_ms: close.closed_at_ms,
    };
    let sketches = accepted_idx
        .iter()
        .filter_map(|i| {
            sketch_of.remove(i).map(|sketch| verify::RecentUpdate {
                node: close.candidates[*i].node,
                round,
                sketch,
            })
        })
        .collect();
    Ok(Closed {
        manifest,
        updates,
        mean_loss,
        eval_loss,
        bytes_received,
        probes,
        spot_checks,
        sketches,
        deferred,
        timings,
    })
}

/// Looks a second time, on `verify.probe_second_look_batches` fresh
/// batches, at the updates the first look found not useful (at most
/// `verify.probe_second_look_max`, those nearest the bar first), filling
/// their records' `second`. Two batches of eight sequences are a noisy
/// measure once gains are small: an honest update of the tiny model's
/// fourth round came out under a quarter of the round's median in CI and
/// was refused. Whatever the first look saw, the second, on four times the
/// text, decides. Returns the time it took.
fn second_looks(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    run_id: &str,
    theta_r: &[f32],
    payloads: &HashMap<Hash, Arc<Vec<u8>>>,
    measured: &[(usize, u64, Arc<Vec<u16>>)],
    probes: &mut [ProbeRecord],
) -> Duration {
    let batches = ctx.verify.probe_second_look_batches;
    let Some(heldout) = ctx.heldout else {
        return Duration::ZERO;
    };
    if batches == 0 || ctx.verify.probe_second_look_max == 0 {
        return Duration::ZERO;
    }
    let round = close.plan.round;
    let mut failed: Vec<usize> = (0..probes.len())
        .filter(|&p| {
            probes[p]
                .result
                .verdict(ctx.verify.probe_margin, probes[p].bar)
                .is_err()
        })
        .collect();
    // Nearest the bar first; non-finite gains (NaN) last. Ties in commit order.
    failed.sort_by(|&a, &b| {
        let gain = |p: usize| {
            let g = probes[p].result.own_gain;
            if g.is_finite() { g } else { f32::NEG_INFINITY }
        };
        gain(b)
            .total_cmp(&gain(a))
            .then(probes[a].index.cmp(&probes[b].index))
    });
    failed.truncate(ctx.verify.probe_second_look_max);
    if failed.is_empty() {
        return Duration::ZERO;
    }
    let heldout_seed =
        crate::probe::second_look_seed(crate::probe::heldout_seed(ctx.key, run_id, round), round);
    let jobs: Vec<(usize, u64, &[u16])> = failed
        .iter()
        .filter_map(|&p| {
            let index = probes[p].index;
            let (_, seed, own) = measured.iter().find(|(i, _, _)| *i == index)?;
            Some((
                p,
                crate::probe::second_look_seed(*seed, round),
                own.as_slice(),
            ))
        })
        .collect();
    let threads = crate::pool::threads(ctx.verify.threads).max(1);
    let mut states: Vec<Option<Probe>> = (0..threads.min(jobs.len())).map(|_| None).collect();
    let params = theta_r.len();
    let started = Instant::now();
    let results = crate::pool::run(&mut states, &jobs, |probe, _, &(p, seed, own)| {
        let c = &close.candidates[probes[p].index];
        let values = decoded(ctx, c, payloads, params)?;
        probe_for(probe, ctx, theta_r)
            .and_then(|probe| probe.second_look(&values, own, seed, heldout, heldout_seed, batches))
            .map_err(|e| tracing::warn!(round, node = %c.node, "second probe look: {e}"))
            .ok()
    });
    for (&(p, ..), result) in jobs.iter().zip(results) {
        probes[p].second = result;
    }
    started.elapsed()
}

/// A candidate's update decoded again for a probe (it passed stage 2, so
/// it decodes; `None` if its payload is gone).
fn decoded(
    ctx: &CloseContext<'_>,
    c: &Candidate,
    payloads: &HashMap<Hash, Arc<Vec<u8>>>,
    params: usize,
) -> Option<Vec<f32>> {
    let payload = payloads.get(&c.commit.update_hash)?;
    verify::check_payload(payload, &c.commit, ctx.codec, params).ok()
}

/// The inner steps the round's plan gave `node` (1 if it has none).
fn assigned_steps(assignment_of: &AssignmentOf<'_>, node: &NodeId) -> u32 {
    assignment_of.get(node).map_or(1, |a| a.inner_steps)
}

/// The round's assignments by node, built once per close: looked up per
/// update, not searched for (a thousand nodes a round).
type AssignmentOf<'a> = HashMap<NodeId, &'a barnraise_protocol::messages::Assignment>;

fn ledger_rows(
    ctx: &CloseContext<'_>,
    close: &CloseRound,
    assignment_of: &AssignmentOf<'_>,
    accepted: &[AcceptedUpdate],
    rejected: &[RejectedUpdate],
    probes: &[ProbeRecord],
    spot_checks: &[SpotRecord],
) -> Vec<UpdateRow> {
    let round = close.plan.round;
    // Each looked up per row: maps, not searches, at a thousand nodes.
    let mut spots_of: HashMap<NodeId, Vec<&SpotRecord>> = HashMap::new();
    for spot in spot_checks {
        spots_of.entry(spot.node).or_default().push(spot);
    }
    let mut probe_by: HashMap<NodeId, &ProbeRecord> = HashMap::new();
    for probe in probes {
        probe_by.entry(probe.node).or_insert(probe);
    }
    let commits: HashMap<(NodeId, Hash), &barnraise_protocol::messages::Commit> = close
        .candidates
        .iter()
        .map(|c| ((c.node, c.commit.update_hash), &c.commit))
        .collect();
    let spot_of = |node: &NodeId| {
        let text: Vec<String> = spots_of
            .get(node)
            .into_iter()
            .flatten()
            .map(|s| match s.round {
                r if r == round => s.result.describe(),
                r => format!("round {r}'s deferred {}", s.result.describe()),
            })
            .collect();
        (!text.is_empty()).then(|| text.join("; "))
    };
    let probe_of = |node: &NodeId| {
        let probe = probe_by.get(node).map(|p| {
            let steps = assigned_steps(assignment_of, &p.node);
            let first = format!(
                "{}, bar {:+.4} (the round's {:+.5} × √{steps} steps)",
                p.result.describe(),
                p.bar,
                p.bar / crate::probe::work_scale(steps)
            );
            match &p.second {
                Some(second) => format!(
                    "{first}; second look on {} batches: {}",
                    ctx.verify.probe_second_look_batches,
                    second.describe()
                ),
                None => first,
            }
        });
        match (probe, spot_of(node)) {
            (Some(p), Some(s)) => Some(format!("{p}; {s}")),
            (p, s) => p.or(s),
        }
    };
    let commit_of =
        |node: &NodeId, hash: &Option<Hash>| hash.and_then(|h| commits.get(&(*node, h)).copied());
    let mean = |l: &[f32]| {
        (!l.is_empty()).then(|| l.iter().map(|&x| f64::from(x)).sum::<f64>() / l.len() as f64)
    };
    let mut rows = Vec::new();
    for a in accepted {
        let losses = commit_of(&a.node, &Some(a.update_hash))
            .map(|c| c.losses.as_slice())
            .unwrap_or(&[]);
        rows.push(UpdateRow {
            node: a.node.to_string(),
            update_hash: Some(a.update_hash.to_hex()),
            verdict: "accepted".into(),
            reason: None,
            detail: probe_of(&a.node),
            tokens: a.tokens,
            compute_ms: a.compute_ms,
            bytes: a.update_bytes,
            weight: f64::from(a.weight),
            mean_loss: mean(losses),
            credit: a.tokens as f64 * ctx.flops_per_token,
        });
    }
    for r in rejected {
        let commit = commit_of(&r.node, &r.update_hash);
        let detail = match &r.reason {
            RejectReason::Undecodable(text) => Some(text.clone()),
            RejectReason::Copycat { of } => Some(format!("copy of {of}")),
            RejectReason::Replay { of, round } => Some(format!(
                "replays the update {of} had accepted in round {round}"
            )),
            RejectReason::NotUseful => probe_of(&r.node),
            RejectReason::SpotCheck { .. } => spot_of(&r.node),
            _ => None,
        };
        rows.push(UpdateRow {
            node: r.node.to_string(),
            update_hash: r.update_hash.map(|h| h.to_hex()),
            verdict: "rejected".into(),
            reason: Some(r.reason.code().to_string()),
            detail,
            tokens: commit.map(|c| c.tokens).unwrap_or(0),
            compute_ms: commit.map(|c| c.compute_ms).unwrap_or(0),
            bytes: commit.map(|c| c.update_bytes).unwrap_or(0),
            weight: 0.0,
            mean_loss: commit.and_then(|c| mean(&c.losses)),
            credit: 0.0,
        });
    }
    for node in &close.missing {
        rows.push(UpdateRow {
            node: node.to_string(),
            update_hash: None,
            verdict: "missing".into(),
            reason: None,
            detail: None,
            tokens: 0,
            compute_ms: 0,
            bytes: 0,
            weight: 0.0,
            mean_loss: None,
            credit: 0.0,
        });
    }
    rows
}

#[cfg(test)]
#[path = "close_tests.rs"]
mod tests;
