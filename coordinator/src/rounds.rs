//! The round logic as a deterministic state machine with no I/O.
//!
//! The service feeds it events (a node joined, a commit arrived, an update
//! was fetched and checked, a round's manifest was committed) and calls
//! [`Rounds::tick`] with the current time; it answers with [`Action`]s for the
//! service to carry out (publish a plan, fetch an update, close a round). It
//! never reads a clock, so tests step it with a fake one.
//!
//! A round moves `Waiting → Open → Closing → (next round) Waiting`. `Closing`
//! is left only through [`Rounds::round_closed`], which accepts exactly one
//! manifest per round: the machine can never ask for a second one.

use crate::config::Quorum;
use crate::pace::{self, PaceBook};
use crate::plan;
use crate::reputation::{NodeReputation, Outcome, ReputationView};
use barnraise_protocol::messages::{Assignment, Commit, RejectReason, RejectedUpdate, RoundPlan};
use barnraise_protocol::{Hash, NodeId};
use std::collections::{BTreeMap, HashSet};

/// The fixed parameters of the round logic.
#[derive(Clone, Debug)]
pub struct RoundsConfig {
    pub run_id: String,
    /// Seeds shard order and per-node seeds.
    pub seed: u64,
    pub inner_steps: u32,
    pub batch_size: u32,
    pub seq_len: u32,
    /// Shards per worker per round: a node of N workers gets N times this many.
    pub shards_per_node: usize,
    pub quorum: Quorum,
    /// The deadline of a round whose nodes' pace is not known yet (and of
    /// every round without `pace`).
    pub deadline_ms: u64,
    /// Size each node's inner steps to its measured pace and the deadline
    /// to the slowest expected finish (`crate::pace`).
    pub pace: bool,
    /// How long past its deadline a round may be held for a committed
    /// update whose drawn workers' states are still arriving
    /// ([`Rounds::hold_for_fetch`]).
    pub fetch_hold_max_ms: u64,
    pub min_nodes: usize,
    pub total_rounds: u64,
    /// The training shards, in dataset order.
    pub shards: Vec<Hash>,
    /// The most steps a worker may hold back past its commit
    /// (`RunConfig::overlap_steps`; 0: synchronous rounds).
    pub overlap_steps: u32,
}

/// How much longer than a fetch's own limit a round is held for it, so
/// that the fetch's verdict (a state served or not) decides, not the clock.
pub const FETCH_HOLD_GRACE_MS: u64 = 1_000;

/// Where the run stands when the machine starts (fresh or after a restart).
#[derive(Clone, Debug)]
pub struct Start {
    /// The next round to open (0 for a fresh run).
    pub round: u64,
    /// Hash of θ_round.
    pub params_hash: Hash,
    /// Body hash of the last manifest, [`Hash::ZERO`] before the first.
    pub head_manifest: Hash,
    /// How often each training shard has been assigned so far.
    pub shard_uses: Vec<u32>,
}

/// What the service must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Sign, store and publish this plan: round `plan.round` is open.
    PublishPlan(RoundPlan),
    /// Verify the candidates over the round, aggregate, sign the manifest and
    /// commit it, then report with [`Rounds::round_closed`].
    CloseRound(CloseRound),
    /// The last round has closed.
    RunFinished,
}

/// Everything the service needs to close a round.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseRound {
    pub plan: RoundPlan,
    /// Updates that passed stages 1 and 2, in commit order (first committer first).
    pub candidates: Vec<Candidate>,
    pub rejected: Vec<RejectedUpdate>,
    /// Assigned nodes that never committed.
    pub missing: Vec<NodeId>,
    pub closed_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub node: NodeId,
    pub commit: Commit,
    /// Arrival order within the round.
    pub order: u64,
}

/// The machine's answer to a commit. On `Accepted` the service fetches the
/// update and reports the payload check with [`Rounds::update_checked`].
#[derive(Clone, Debug, PartialEq)]
pub enum CommitOutcome {
    /// Taken: the update will be fetched and checked.
    Accepted { round: u64 },
    /// The same signed commit again (a retry): nothing changes.
    AlreadyHave { round: u64 },
    /// Refused; `in_round` is the open round whose manifest records it, if any.
    Rejected {
        reason: RejectReason,
        in_round: Option<u64>,
    },
}

/// A call that does not fit the machine's state (a bug in the caller, never network input).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RoundsError {
    #[error(
        "round {round} is not closing (the machine is {state}); a manifest cannot be recorded for it"
    )]
    NotClosing { round: u64, state: String },
}

#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Assigned,
    /// Commit taken, fetch in progress.
    Committed {
        commit: Commit,
        body: Hash,
        order: u64,
        /// When the commit arrived (the machine's last tick).
        arrived_ms: u64,
        /// The round's deadline does not close it before this while the
        /// fetch is still running (0: not held).
        hold_until_ms: u64,
    },
    /// Fetched and payload-checked.
    Ready {
        commit: Commit,
        body: Hash,
        order: u64,
        arrived_ms: u64,
    },
    Rejected {
        body: Hash,
    },
}

#[derive(Clone, Debug)]
struct OpenRound {
    plan: RoundPlan,
    /// When the round closes at the latest: the plan's deadline, or later
    /// for a round restored after a restart (so its nodes can still deliver).
    close_at_ms: u64,
    slots: BTreeMap<NodeId, Slot>,
    next_order: u64,
    rejected: Vec<RejectedUpdate>,
    /// Which (node, reason) refusals `rejected` already records: a node
    /// that repeats a refused commit is recorded once per reason, so commit
    /// spam cannot grow the manifest past its size limit.
    refused: HashSet<(NodeId, &'static str)>,
    /// Checked updates whose drawn workers' states are still arriving, and
    /// until when a round that could close waits for them
    /// ([`Rounds::states_pending`]).
    states_wait: BTreeMap<NodeId, u64>,
}

#[derive(Clone, Debug)]
enum Phase {
    Waiting,
    Open(OpenRound),
    Closing(RoundPlan),
    Finished,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    active: bool,
    /// Said it was leaving: only a new join brings it back.
    left: bool,
    workers: u32,
}

/// The round state machine.
#[derive(Debug)]
pub struct Rounds {
    config: RoundsConfig,
    members: BTreeMap<NodeId, Member>,
    phase: Phase,
    round: u64,
    params_hash: Hash,
    head_manifest: Hash,
    shard_uses: Vec<u32>,
    /// Every node that was ever assigned work, by its outcomes so far.
    reputation: BTreeMap<NodeId, NodeReputation>,
    /// How fast each node delivers (kept in memory: after a restart every
    /// node is unknown again for one round).
    pace: PaceBook,
    /// The time of the last [`Rounds::tick`]: when commits arrive.
    clock_ms: u64,
    /// Until when earlier rounds' deferred spot checks may still settle
    /// ([`Rounds::checks_out_until`]).
    checks_out_until_ms: Option<u64>,
    /// Each node's last commit's held-back steps, per worker: what its
    /// next round's shares must say they carried, if that commit was
    /// accepted (in memory: after a restart nothing is carried).
    held_back: BTreeMap<NodeId, HeldBack>,
}

/// What a node's commit of `round` held back past the commit, per worker.
#[derive(Clone, Debug)]
struct HeldBack {
    round: u64,
    /// (worker index, steps held back).
    shares: Vec<(u32, u32)>,
    accepted: bool,
}

impl HeldBack {
    fn of(round: u64, commit: &Commit, accepted: bool) -> HeldBack {
        HeldBack {
            round,
            shares: commit
                .shares
                .iter()
                .map(|s| (s.index, s.held_back))
                .collect(),
            accepted,
        }
    }
}

impl Rounds {
    pub fn new(config: RoundsConfig, start: Start) -> Rounds {
        let mut shard_uses = start.shard_uses;
        shard_uses.resize(config.shards.len(), 0);
        let phase = if start.round >= config.total_rounds {
            Phase::Finished
        } else {
            Phase::Waiting
        };
        Rounds {
            config,
            members: BTreeMap::new(),
            phase,
            round: start.round,
            params_hash: start.params_hash,
            head_manifest: start.head_manifest,
            shard_uses,
            reputation: BTreeMap::new(),
            pace: PaceBook::default(),
            clock_ms: 0,
            checks_out_until_ms: None,
            held_back: BTreeMap::new(),
        }
    }

    /// The measured pace of a node, in tokens per second per worker.
    pub fn pace(&self, node: &NodeId) -> Option<f64> {
        self.pace.pace(node)
    }

    /// Replaces every node's reputation (on a restart, from the ledger).
    pub fn restore_reputation(&mut self, reputation: BTreeMap<NodeId, NodeReputation>) {
        self.reputation = reputation;
    }

    /// Folds in what became of `node`'s work in `round` (one call per node
    /// and round, in round order).
    pub fn record_outcome(&mut self, round: u64, node: NodeId, outcome: Outcome) {
        if let Some(held) = self.held_back.get_mut(&node)
            && held.round == round
        {
            held.accepted = matches!(outcome, Outcome::Accepted);
        }
        self.reputation
            .entry(node)
            .or_default()
            .record(round, outcome);
    }

    /// After a restart: `node`'s accepted `commit` of round `round` (the
    /// last closed one), so that its next commit may carry what it held back.
    pub fn restore_held_back(&mut self, round: u64, node: NodeId, commit: &Commit) {
        self.held_back
            .insert(node, HeldBack::of(round, commit, true));
    }

    /// A node's reputation (the starting one if it never had work).
    pub fn reputation(&self, node: &NodeId) -> NodeReputation {
        self.reputation.get(node).copied().unwrap_or_default()
    }

    /// Every node's reputation as the API shows it, for the next round planned.
    pub fn reputations(&self) -> Vec<ReputationView> {
        self.reputation
            .iter()
            .map(|(node, r)| ReputationView::new(node.to_string(), r, self.round))
            .collect()
    }

    /// Re-opens a round whose plan was published before a restart. The plan's
    /// shards must already be counted in `Start::shard_uses`.
    pub fn restore_open(&mut self, plan: RoundPlan, not_before_ms: u64) {
        if plan.round != self.round || !matches!(self.phase, Phase::Waiting) {
            return;
        }
        for a in &plan.assignments {
            self.members.entry(a.node).or_insert(Member {
                active: true,
                left: false,
                workers: 1,
            });
        }
        let slots = plan
            .assignments
            .iter()
            .map(|a| (a.node, Slot::Assigned))
            .collect();
        let close_at_ms = plan.deadline_ms.max(not_before_ms);
        self.phase = Phase::Open(OpenRound {
            plan,
            close_at_ms,
            slots,
            next_order: 0,
            rejected: Vec::new(),
            refused: HashSet::new(),
            states_wait: BTreeMap::new(),
        });
    }

    /// A node was admitted (or re-joined). `workers` bounds the tokens it may claim.
    pub fn join(&mut self, node: NodeId, workers: u32) {
        self.members.insert(
            node,
            Member {
                active: true,
                left: false,
                workers: workers.max(1),
            },
        );
        // A node that left the open round before committing and joins again
        // (resumed, or its active hours opened) gets its place back: the
        // signed plan still lists it, and it will train what the plan says.
        if let Phase::Open(open) = &mut self.phase
            && open.plan.assignments.iter().any(|a| a.node == node)
            && !open.slots.contains_key(&node)
        {
            open.slots.insert(node, Slot::Assigned);
        }
    }

    /// A node the run no longer admits (revoked after a restart): it gets
    /// no more work, and its commits are refused as from an unknown node.
    /// A round it was assigned closes without it.
    pub fn expel(&mut self, node: &NodeId) {
        self.members.remove(node);
        self.pace.forget(node);
    }

    /// A node said it is leaving: it gets no more work. If the open round
    /// planned it and it has not committed, the round stops waiting for it
    /// and does not count it missing: a volunteer's node that pauses or
    /// reaches the end of its active hours says so first
    /// (docs/running-a-node.md, "When the node works").
    pub fn leave(&mut self, node: &NodeId) {
        if let Some(m) = self.members.get_mut(node) {
            m.active = false;
            m.left = true;
        }
        if let Phase::Open(open) = &mut self.phase
            && matches!(open.slots.get(node), Some(Slot::Assigned))
        {
            open.slots.remove(node);
        }
    }

    /// A known node showed it is alive (any request): it gets work again
    /// after having missed a round (but not after leaving).
    pub fn seen(&mut self, node: &NodeId) {
        if let Some(m) = self.members.get_mut(node) {
            m.active = !m.left;
        }
    }

    pub fn is_member(&self, node: &NodeId) -> bool {
        self.members.contains_key(node)
    }

    /// Nodes that would get work if a round opened now.
    pub fn active_nodes(&self) -> Vec<NodeId> {
        self.active_workers().into_iter().map(|(n, _)| n).collect()
    }

    /// Active nodes with the number of workers each declared.
    pub fn active_workers(&self) -> Vec<(NodeId, u32)> {
        self.members
            .iter()
            .filter(|(_, m)| m.active)
            .map(|(n, m)| (*n, m.workers))
            .collect()
    }

    /// The round now open or about to open.
    pub fn current_round(&self) -> u64 {
        self.round
    }

    pub fn params_hash(&self) -> Hash {
        self.params_hash
    }

    pub fn head_manifest(&self) -> Hash {
        self.head_manifest
    }

    pub fn shard_uses(&self) -> &[u32] {
        &self.shard_uses
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// The plan of the open round, if one is open.
    pub fn open_plan(&self) -> Option<&RoundPlan> {
        match &self.phase {
            Phase::Open(open) => Some(&open.plan),
            _ => None,
        }
    }

    /// When the open round closes at the latest (after a restart this can be
    /// later than its plan's deadline).
    pub fn open_deadline_ms(&self) -> Option<u64> {
        match &self.phase {
            Phase::Open(open) => Some(open.close_at_ms),
            _ => None,
        }
    }

    fn state_name(&self) -> String {
        match &self.phase {
            Phase::Waiting => format!("waiting to open round {}", self.round),
            Phase::Open(o) => format!("running round {}", o.plan.round),
            Phase::Closing(p) => format!("closing round {}", p.round),
            Phase::Finished => "finished".into(),
        }
    }

    /// Stage 1 of verification for what the machine knows: the commit's
    /// node, round, base and claimed size of work. The signature was checked
    /// by the caller; `body` is the signed body's hash, so a retry of the same
    /// message is recognised.
    pub fn commit(&mut self, node: NodeId, commit: &Commit, body: Hash) -> CommitOutcome {
        let Some(member) = self.members.get(&node).copied() else {
            return CommitOutcome::Rejected {
                reason: RejectReason::UnknownNode,
                in_round: None,
            };
        };
        let same_run = commit.run_id == self.config.run_id;
        let current = self.round;
        let arrived_ms = self.clock_ms;
        let step_tokens = self.step_tokens();
        let open = match &mut self.phase {
            Phase::Open(open) => open,
            Phase::Closing(plan) if commit.round == plan.round => {
                return CommitOutcome::Rejected {
                    reason: RejectReason::Late,
                    in_round: None,
                };
            }
            _ => {
                let reason = if commit.round.checked_add(1) == Some(current) {
                    RejectReason::Late
                } else {
                    RejectReason::WrongRound
                };
                return CommitOutcome::Rejected {
                    reason,
                    in_round: None,
                };
            }
        };
        let round = open.plan.round;
        let reject = |open: &mut OpenRound, reason: RejectReason| {
            // `refused` holds exactly the refusals listed so far.
            if open.refused.len() < barnraise_protocol::limits::MAX_REFUSALS_PER_MANIFEST
                && open.refused.insert((node, reason.code()))
            {
                open.rejected.push(RejectedUpdate {
                    node,
                    update_hash: Some(commit.update_hash),
                    reason: reason.clone(),
                });
            }
            CommitOutcome::Rejected {
                reason,
                in_round: Some(round),
            }
        };
        if !same_run || commit.round != round {
            let reason = if commit.round.checked_add(1) == Some(round) {
                RejectReason::Late
            } else {
                RejectReason::WrongRound
            };
            return reject(open, reason);
        }
        let Some(slot) = open.slots.get(&node).cloned() else {
            // Known, but given no work this round.
            return reject(open, RejectReason::WrongRound);
        };
        match slot {
            Slot::Assigned => {}
            Slot::Committed { body: first, .. }
            | Slot::Ready { body: first, .. }
            | Slot::Rejected { body: first }
                if first == body =>
            {
                return CommitOutcome::AlreadyHave { round };
            }
            _ => return reject(open, RejectReason::DuplicateCommit),
        }
        // Past the deadline: a round held for a drawn state
        // (`hold_for_fetch`) takes no new commits.
        // It is missing, as it would be had the round closed on time.
        if arrived_ms >= open.close_at_ms {
            return CommitOutcome::Rejected {
                reason: RejectReason::Late,
                in_round: None,
            };
        }
        // From here the node has used its one commit for the round.
        // Its workers are what the plan gave shards for, whatever it declared
        // since: joining again mid-round with more workers buys nothing.
        let (planned_workers, planned_steps) = open
            .plan
            .assignments
            .iter()
            .find(|a| a.node == node)
            .map(|a| (a.workers.max(1), a.inner_steps))
            .unwrap_or((1, 0));
        let workers = member.workers.min(planned_workers);
        // Steps carried from the last round (overlapped rounds) are claimed
        // on top of this round's plan.
        let carried: u64 = commit.shares.iter().map(|s| u64::from(s.carried)).sum();
        let max_tokens = step_tokens.saturating_mul(
            u64::from(planned_steps)
                .saturating_mul(u64::from(workers))
                .saturating_add(carried),
        );
        let expected_carry = |index: u32| {
            self.held_back
                .get(&node)
                .filter(|h| h.accepted && h.round.checked_add(1) == Some(round))
                .and_then(|h| h.shares.iter().find(|(i, _)| *i == index))
                .map_or(0, |(_, steps)| *steps)
        };
        let overlap_ok = commit.shares.iter().all(|s| {
            s.held_back <= self.config.overlap_steps
                && s.held_back < planned_steps.max(1)
                // Carrying nothing is always honest (a node that restarted
                // lost its tail); carrying anything else, exactly the steps
                // its accepted last commit held back.
                && (s.carried == 0 || s.carried == expected_carry(s.index))
        });
        let verdict = if commit.base_params_hash != open.plan.params_hash {
            Some(RejectReason::WrongBase)
        } else if commit.losses.len() > barnraise_protocol::limits::MAX_REPORTED_LOSSES
            || commit.update_bytes > barnraise_protocol::limits::MAX_UPDATE_BYTES
            || commit.workers > workers
            || commit.tokens > max_tokens
            || commit.tokens == 0
        {
            Some(RejectReason::Oversized)
        } else if !shares_add_up(commit, workers) || !overlap_ok {
            Some(RejectReason::BadShares)
        } else {
            None
        };
        if let Some(reason) = verdict {
            open.slots.insert(node, Slot::Rejected { body });
            return reject(open, reason);
        }
        self.held_back
            .insert(node, HeldBack::of(round, commit, false));
        let order = open.next_order;
        open.next_order += 1;
        open.slots.insert(
            node,
            Slot::Committed {
                commit: commit.clone(),
                body,
                order,
                arrived_ms,
                hold_until_ms: 0,
            },
        );
        CommitOutcome::Accepted { round }
    }

    /// Tokens one worker trains in one inner step. A node's claimed tokens
    /// weigh its update, so they are capped at its planned steps times this
    /// times its workers.
    fn step_tokens(&self) -> u64 {
        u64::from(self.config.batch_size).saturating_mul(u64::from(self.config.seq_len))
    }

    /// The result of fetching and checking a committed update (stage 2).
    pub fn update_checked(&mut self, round: u64, node: &NodeId, result: Result<(), RejectReason>) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        if open.plan.round != round {
            return;
        }
        let Some(Slot::Committed {
            commit,
            body,
            order,
            arrived_ms,
            ..
        }) = open.slots.get(node).cloned()
        else {
            return;
        };
        match result {
            Ok(()) => {
                open.slots.insert(
                    *node,
                    Slot::Ready {
                        commit,
                        body,
                        order,
                        arrived_ms,
                    },
                );
            }
            Err(reason) => {
                open.slots.insert(*node, Slot::Rejected { body });
                open.rejected.push(RejectedUpdate {
                    node: *node,
                    update_hash: Some(commit.update_hash),
                    reason,
                });
            }
        }
    }

    /// Holds the open round past its deadline, until `until_ms` plus
    /// [`FETCH_HOLD_GRACE_MS`] at the latest (and never more than
    /// `fetch_hold_max_ms` plus the grace past the deadline), while
    /// `node`'s committed update is still being fetched: a drawn worker's
    /// starting state is 8 bytes a parameter, and a node behind a slow
    /// uplink that committed in time must not fail its spot check because
    /// the upload outlasts the round (docs/architecture.md, "Slow links").
    /// The hold ends as soon as the fetch resolves; `fetch_hold_max_ms = 0`
    /// never holds.
    pub fn hold_for_fetch(&mut self, round: u64, node: &NodeId, until_ms: u64) {
        let Phase::Open(open) = &mut self.phase else {
            return;
        };
        if open.plan.round != round {
            return;
        }
        if self.config.fetch_hold_max_ms == 0 {
            return;
        }
        // The fetch's own limit is `fetch_limit_ms`; the grace lets its
        // verdict arrive before the hold runs out.
        let limit = open
            .close_at_ms
            .saturating_add(self.config.fetch_hold_max_ms)
            .saturating_add(FETCH_HOLD_GRACE_MS);
        if let Some(Slot::Committed { hold_until_ms, .. }) = open.slots.get_mut(node) {
            *hold_until_ms = until_ms.saturating_add(FETCH_HOLD_GRACE_MS).min(limit);
        }
    }

    /// `node`'s update is checked, but the states of its drawn workers
    /// are still arriving: a round that could close (every update in, or
    /// quorum) waits for them until `until_ms`, never past its deadline.
    /// What has not arrived by then is checked after the close
    /// (`verify.defer_state_checks`; docs/security.md, "Deferred spot
    /// checks").
    pub fn states_pending(&mut self, round: u64, node: &NodeId, until_ms: u64) {
        if let Phase::Open(open) = &mut self.phase
            && open.plan.round == round
            && open.slots.contains_key(node)
        {
            open.states_wait.insert(*node, until_ms);
        }
    }

    /// The states [`Rounds::states_pending`] waited for have arrived (or
    /// failed to).
    pub fn states_resolved(&mut self, round: u64, node: &NodeId) {
        if let Phase::Open(open) = &mut self.phase
            && open.plan.round == round
        {
            open.states_wait.remove(node);
        }
    }

    /// Earlier rounds' deferred spot checks are still out, and may settle
    /// until `until_ms` (`None`: none are out). The run's last round does
    /// not close before then, even past its deadline: its close is the last
    /// one a verdict can settle in (docs/security.md, "Deferred spot
    /// checks"). Other rounds are not held: their checks settle later.
    pub fn checks_out_until(&mut self, until_ms: Option<u64>) {
        self.checks_out_until_ms = until_ms;
    }

    /// The latest a drawn worker's state of the open round may still be
    /// fetched: its deadline plus `fetch_hold_max_ms`.
    pub fn fetch_limit_ms(&self) -> Option<u64> {
        match &self.phase {
            Phase::Open(open) => Some(
                open.close_at_ms
                    .saturating_add(self.config.fetch_hold_max_ms),
            ),
            _ => None,
        }
    }

    /// Advances time: opens a round when enough nodes are there, closes the
    /// open one at quorum or deadline.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        self.clock_ms = self.clock_ms.max(now_ms);
        let mut actions = Vec::new();
        if let Phase::Waiting = self.phase
            && let Some(plan) = self.try_open(now_ms)
        {
            actions.push(Action::PublishPlan(plan));
        }
        let should_close = match &self.phase {
            Phase::Open(open) => {
                // A fetch still bringing in a drawn worker's state holds
                // the deadline (`hold_for_fetch`).
                let held = open.slots.values().any(|s| {
                    matches!(s, Slot::Committed { hold_until_ms, .. } if *hold_until_ms > now_ms)
                });
                let deadline = now_ms >= open.close_at_ms && !held;
                let ready = open
                    .slots
                    .values()
                    .filter(|s| matches!(s, Slot::Ready { .. }))
                    .count();
                let in_flight = open
                    .slots
                    .values()
                    .any(|s| matches!(s, Slot::Committed { .. }));
                let unresolved = open
                    .slots
                    .values()
                    .any(|s| matches!(s, Slot::Assigned | Slot::Committed { .. }));
                // At quorum, updates already being fetched are still waited for.
                let quorum = ready >= self.config.quorum.target(open.slots.len()) && !in_flight;
                // Drawn states still arriving delay the close a little
                // (`states_pending`), never past the deadline.
                let states = open.states_wait.values().any(|&until| until > now_ms);
                let last = open.plan.round.saturating_add(1) >= self.config.total_rounds;
                let checks_out = last && self.checks_out_until_ms.is_some_and(|u| u > now_ms);
                (deadline || ((quorum || !unresolved) && !states)) && !checks_out
            }
            _ => false,
        };
        if should_close
            && let Phase::Open(open) = std::mem::replace(&mut self.phase, Phase::Waiting)
        {
            actions.push(Action::CloseRound(self.begin_close(open, now_ms)));
        }
        actions
    }

    fn try_open(&mut self, now_ms: u64) -> Option<RoundPlan> {
        // Reputation decides how many of its workers a node gets work for:
        // all in good standing, one on probation, none while benched.
        let round = self.round;
        let nodes: Vec<(NodeId, u32)> = self
            .active_workers()
            .into_iter()
            .filter_map(|(node, declared)| {
                let planned = self.reputation(&node).planned_workers(round, declared);
                (planned > 0).then_some((node, planned))
            })
            .collect();
        // `min_nodes` gates the start of the run; later rounds run with whoever is active.
        let needed = if self.round == 0 {
            self.config.min_nodes.max(1)
        } else {
            1
        };
        if nodes.len() < needed {
            return None;
        }
        let shares = plan::assign(
            self.config.seed,
            self.round,
            &nodes,
            &mut self.shard_uses,
            self.config.shards_per_node,
        );
        if shares.is_empty() {
            return None;
        }
        let sized = if self.config.pace {
            let planned: Vec<NodeId> = shares.iter().map(|s| s.node).collect();
            self.pace
                .size(&planned, self.config.inner_steps, self.step_tokens())
        } else {
            shares
                .iter()
                .map(|_| pace::Sized {
                    steps: self.config.inner_steps,
                    expected_ms: None,
                })
                .collect()
        };
        let deadline_ms = pace::deadline_ms(&sized, self.config.deadline_ms);
        let assignments: Vec<Assignment> = shares
            .into_iter()
            .zip(&sized)
            .map(|(s, sized)| Assignment {
                node: s.node,
                shards: s.shards.iter().map(|&i| i as u32).collect(),
                seed: s.seed,
                inner_steps: sized.steps,
                workers: s.workers,
            })
            .collect();
        let plan = RoundPlan {
            run_id: self.config.run_id.clone(),
            round: self.round,
            params_hash: self.params_hash,
            previous_manifest: self.head_manifest,
            assignments,
            opened_at_ms: now_ms,
            deadline_ms: now_ms.saturating_add(deadline_ms),
            // The service knows the peers; it fills these in before signing.
            bootstrap: Vec::new(),
        };
        let slots = plan
            .assignments
            .iter()
            .map(|a| (a.node, Slot::Assigned))
            .collect();
        let close_at_ms = plan.deadline_ms;
        self.phase = Phase::Open(OpenRound {
            plan: plan.clone(),
            close_at_ms,
            slots,
            next_order: 0,
            rejected: Vec::new(),
            refused: HashSet::new(),
            states_wait: BTreeMap::new(),
        });
        Some(plan)
    }

    fn begin_close(&mut self, open: OpenRound, now_ms: u64) -> CloseRound {
        let OpenRound {
            plan,
            slots,
            mut rejected,
            ..
        } = open;
        let mut candidates = Vec::new();
        let mut missing = Vec::new();
        let step_tokens = self.step_tokens();
        for (node, slot) in slots {
            // What the plan asked of the node, to learn its pace from.
            let (workers, planned_tokens) = plan
                .assignments
                .iter()
                .find(|a| a.node == node)
                .map(|a| {
                    let workers = a.workers.max(1);
                    let tokens = step_tokens
                        .saturating_mul(u64::from(a.inner_steps))
                        .saturating_mul(u64::from(workers));
                    (workers, tokens)
                })
                .unwrap_or((1, 0));
            let open_for = now_ms.saturating_sub(plan.opened_at_ms);
            match &slot {
                // A commit restored after a restart arrived at an unknown
                // time (before the machine's first tick): it teaches nothing.
                Slot::Ready {
                    commit, arrived_ms, ..
                } if *arrived_ms > plan.opened_at_ms => self.pace.delivered(
                    node,
                    commit.tokens.min(planned_tokens),
                    commit.workers.clamp(1, workers),
                    arrived_ms - plan.opened_at_ms,
                ),
                Slot::Ready { .. } => {}
                Slot::Assigned | Slot::Committed { .. } => {
                    self.pace.missed(node, planned_tokens, workers, open_for)
                }
                Slot::Rejected { .. } => {}
            }
            match slot {
                Slot::Assigned => missing.push(node),
                Slot::Committed { commit, .. } => {
                    // Committed but its update never arrived in time.
                    rejected.push(RejectedUpdate {
                        node,
                        update_hash: Some(commit.update_hash),
                        reason: RejectReason::NotServed,
                    });
                }
                Slot::Ready { commit, order, .. } => candidates.push(Candidate {
                    node,
                    commit,
                    order,
                }),
                Slot::Rejected { .. } => {}
            }
        }
        candidates.sort_by_key(|c| c.order);
        // A node that missed the round gets no more work until it shows up again.
        for node in &missing {
            if let Some(m) = self.members.get_mut(node) {
                m.active = false;
            }
        }
        self.phase = Phase::Closing(plan.clone());
        CloseRound {
            plan,
            candidates,
            rejected,
            missing,
            closed_at_ms: now_ms,
        }
    }

    /// The round's manifest is committed: θ_{round+1} is current and the
    /// next round may open. Refuses anything but the round now closing, so a
    /// round can never get two manifests.
    pub fn round_closed(
        &mut self,
        round: u64,
        next_params_hash: Hash,
        manifest_hash: Hash,
    ) -> Result<Vec<Action>, RoundsError> {
        match &self.phase {
            Phase::Closing(plan) if plan.round == round => {}
            _ => {
                return Err(RoundsError::NotClosing {
                    round,
                    state: self.state_name(),
                });
            }
        }
        self.params_hash = next_params_hash;
        self.head_manifest = manifest_hash;
        self.round = round + 1;
        if self.round >= self.config.total_rounds {
            self.phase = Phase::Finished;
            return Ok(vec![Action::RunFinished]);
        }
        self.phase = Phase::Waiting;
        Ok(Vec::new())
    }
}

/// Whether a commit's worker shares are one per worker it claims, for
/// distinct workers of its assignment in order, with the right sketch size,
/// and tokens that sum to the commit's.
fn shares_add_up(commit: &Commit, planned_workers: u32) -> bool {
    use barnraise_protocol::workers::SHARE_SKETCH_DIM;
    let shares = &commit.shares;
    shares.len() == commit.workers as usize
        && shares
            .iter()
            .all(|s| s.index < planned_workers && s.delta_sketch.len() == SHARE_SKETCH_DIM)
        && shares.windows(2).all(|w| w[0].index < w[1].index)
        && shares
            .iter()
            .try_fold(0u64, |sum, s| sum.checked_add(s.tokens))
            == Some(commit.tokens)
        && barnraise_protocol::workers::copied_shares(shares).is_none()
}

/// Counts how often each of `shards` training shards appears in `plans`
/// (to rebuild `Start::shard_uses`).
pub fn count_shard_uses(shards: usize, plans: &[RoundPlan]) -> Vec<u32> {
    let mut uses = vec![0u32; shards];
    for plan in plans {
        for a in &plan.assignments {
            for &i in &a.shards {
                if let Some(u) = uses.get_mut(i as usize) {
                    *u = u.saturating_add(1);
                }
            }
        }
    }
    uses
}

#[cfg(test)]
#[path = "rounds_tests.rs"]
mod tests;
