//! Counters and gauges for `/metrics`, in the Prometheus text format. Written
//! by hand: a handful of values does not need a metrics library.

use crate::network::CoordinatorTraffic;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

#[derive(Debug, Default)]
pub struct Metrics {
    pub joins: AtomicU64,
    pub join_refusals: AtomicU64,
    /// Refusals counted but not written to the ledger: unauthenticated,
    /// repeated in a round, or over the per-round cap (`crate::refusals`).
    pub refusals_unrecorded: AtomicU64,
    /// Joins and commits refused by the per-peer rate limit.
    pub rate_limited: AtomicU64,
    pub commits: AtomicU64,
    pub rounds_closed: AtomicU64,
    pub updates_accepted: AtomicU64,
    pub tokens_accepted: AtomicU64,
    pub update_bytes_received: AtomicU64,
    pub current_round: AtomicU64,
    pub active_nodes: AtomicU64,
    /// f64 bits of the last round's mean training loss.
    pub last_train_loss: AtomicU64,
    /// f64 bits of the last held-out eval loss.
    pub last_eval_loss: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// The network's byte counters, once the network is up.
    pub traffic: OnceLock<CoordinatorTraffic>,
    /// Time spent in each stage of the coordinator's work.
    pub stages: StageTimes,
    /// Pairs of update sketches the copy and replay checks compared.
    pub copy_comparisons: AtomicU64,
    /// Drawn shares whose state was not in at their round's close, and of
    /// those, the ones whose verdict is in (docs/security.md, "Deferred spot checks").
    pub spot_checks_deferred: AtomicU64,
    pub spot_checks_settled: AtomicU64,
    /// Rounds that held for their drawn states because deferring them
    /// would take the θ copies past `verify.deferred_memory_mb`.
    pub rounds_held_for_memory: AtomicU64,
    /// Updates announced on the run's updates topic as they passed stage 2.
    pub update_notices: AtomicU64,
}

/// The stages of the coordinator's work whose time `/metrics` reports
/// (`barnraise_stage_seconds_total{stage=...}`) and `barnraise bench
/// coordinator` breaks a round's cost down by (docs/scaling.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Handling joins, commits, plan and manifest requests on the service
    /// thread, ledger writes excluded.
    Admission,
    /// Checking fetched payloads (hash, decode, length, finite) and storing them.
    Fetch,
    /// At close: stage 2 again on the stored payloads, then stage 3 (norms,
    /// direction, copies and replays).
    Verify,
    /// At close: the usefulness probe's jobs, summed over the threads they
    /// ran on; and the held-out evaluation of the new θ (after the manifest
    /// is out, but for the run's last round).
    Probe,
    /// At close: spot-check replays, summed over their threads.
    Spot,
    /// At close: the aggregate and the outer step.
    Aggregate,
    /// Every ledger write: joins, commits, refusals and the round's close.
    Ledger,
    /// Writing θ and its momentum, signing the manifest and publishing it.
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::Admission,
        Stage::Fetch,
        Stage::Verify,
        Stage::Probe,
        Stage::Spot,
        Stage::Aggregate,
        Stage::Ledger,
        Stage::Publish,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Admission => "admission",
            Stage::Fetch => "fetch",
            Stage::Verify => "verify",
            Stage::Probe => "probe",
            Stage::Spot => "spot",
            Stage::Aggregate => "aggregate",
            Stage::Ledger => "ledger",
            Stage::Publish => "publish",
        }
    }
}

/// Nanoseconds spent per [`Stage`], summed over the run. The stages are
/// synchronous compute and disk work, so their time is the thread's busy
/// time; waiting on the network is in no stage.
#[derive(Debug, Default)]
pub struct StageTimes {
    nanos: [AtomicU64; 8],
}

impl StageTimes {
    pub fn add(&self, stage: Stage, elapsed: std::time::Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos[stage as usize].fetch_add(nanos, Ordering::Relaxed);
    }

    /// Runs `f` and adds its time to `stage`.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let out = f();
        self.add(stage, start.elapsed());
        out
    }

    pub fn seconds(&self, stage: Stage) -> f64 {
        self.nanos[stage as usize].load(Ordering::Relaxed) as f64 / 1e9
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics::default();
        m.last_train_loss
            .store(f64::NAN.to_bits(), Ordering::Relaxed);
        m.last_eval_loss
            .store(f64::NAN.to_bits(), Ordering::Relaxed);
        m
    }

    /// Counts one rejected update or refused message by its reason code.
    pub fn rejected(&self, code: &'static str) {
        if let Ok(mut map) = self.rejected.lock() {
            *map.entry(code).or_default() += 1;
        }
    }

    pub fn set_f64(cell: &AtomicU64, value: Option<f64>) {
        cell.store(value.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP barnraise_{name} {help}\n# TYPE barnraise_{name} counter\nbarnraise_{name} {value}"
            );
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter("joins_total", "Joins admitted.", get(&self.joins));
        counter(
            "join_refusals_total",
            "Joins refused.",
            get(&self.join_refusals),
        );
        counter(
            "refusals_unrecorded_total",
            "Refusals counted but not written to the ledger (unauthenticated, repeated, or over the per-round cap).",
            get(&self.refusals_unrecorded),
        );
        counter("commits_total", "Commits received.", get(&self.commits));
        counter(
            "rate_limited_total",
            "Joins and commits refused by the per-peer rate limit.",
            get(&self.rate_limited),
        );
        counter(
            "rounds_closed_total",
            "Rounds closed with a manifest.",
            get(&self.rounds_closed),
        );
        counter(
            "updates_accepted_total",
            "Updates accepted into an aggregate.",
            get(&self.updates_accepted),
        );
        counter(
            "tokens_accepted_total",
            "Training tokens of accepted updates.",
            get(&self.tokens_accepted),
        );
        counter(
            "copy_comparisons_total",
            "Pairs of update sketches the copy and replay checks compared.",
            get(&self.copy_comparisons),
        );
        counter(
            "spot_checks_deferred_total",
            "Drawn shares whose state was not in at their round's close, checked after it.",
            get(&self.spot_checks_deferred),
        );
        counter(
            "spot_checks_settled_total",
            "Deferred spot checks whose verdict is in; it counts in the next close.",
            get(&self.spot_checks_settled),
        );
        counter(
            "rounds_held_for_memory_total",
            "Rounds that held for their drawn states: deferring them would take the kept copies of theta past verify.deferred_memory_mb.",
            get(&self.rounds_held_for_memory),
        );
        counter(
            "update_notices_total",
            "Updates of the open round announced to nodes as they passed stage 2, for fetching before the manifest.",
            get(&self.update_notices),
        );
        counter(
            "update_bytes_received_total",
            "Bytes of update payloads fetched from nodes.",
            get(&self.update_bytes_received),
        );
        if let Some(traffic) = self.traffic.get() {
            let t = traffic.totals();
            counter(
                "egress_bytes_total",
                "Bytes the coordinator sent: answers, blobs and gossip it published.",
                t.coordinator_egress_bytes,
            );
            counter(
                "ingress_bytes_total",
                "Bytes the coordinator received: requests and the updates it pulled.",
                t.coordinator_ingress_bytes,
            );
            let _ = writeln!(
                out,
                "# HELP barnraise_blob_egress_bytes_total Blob bytes the coordinator served, by kind.\n\
                 # TYPE barnraise_blob_egress_bytes_total counter"
            );
            for (kind, bytes) in [
                ("shard", t.coordinator_shard_bytes),
                ("state", t.coordinator_state_bytes),
                ("update", t.coordinator_update_bytes),
            ] {
                let _ = writeln!(
                    out,
                    "barnraise_blob_egress_bytes_total{{kind=\"{kind}\"}} {bytes}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP barnraise_updates_rejected_total Updates and messages rejected, by reason."
        );
        let _ = writeln!(out, "# TYPE barnraise_updates_rejected_total counter");
        if let Ok(map) = self.rejected.lock() {
            for (reason, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "barnraise_updates_rejected_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP barnraise_stage_seconds_total Time the coordinator spent in each stage of its work.\n\
             # TYPE barnraise_stage_seconds_total counter"
        );
        for stage in Stage::ALL {
            let _ = writeln!(
                out,
                "barnraise_stage_seconds_total{{stage=\"{}\"}} {}",
                stage.name(),
                self.stages.seconds(stage)
            );
        }
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP barnraise_{name} {help}\n# TYPE barnraise_{name} gauge\nbarnraise_{name} {value}"
            );
        };
        gauge(
            "current_round",
            "The round now open or about to open.",
            get(&self.current_round).to_string(),
        );
        gauge(
            "active_nodes",
            "Nodes that would get work in the next round.",
            get(&self.active_nodes).to_string(),
        );
        gauge(
            "train_loss",
            "Mean training loss of the last round's accepted updates.",
            fmt_f64(get(&self.last_train_loss)),
        );
        gauge(
            "eval_loss",
            "Held-out loss of the latest params.",
            fmt_f64(get(&self.last_eval_loss)),
        );
        out
    }
}

fn fmt_f64(bits: u64) -> String {
    let v = f64::from_bits(bits);
    if v.is_nan() {
        "NaN".into()
    } else {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.joins.fetch_add(2, Ordering::Relaxed);
        m.rejected("sign-flipped");
        m.rejected("sign-flipped");
        Metrics::set_f64(&m.last_eval_loss, Some(2.5));
        let text = m.render();
        assert!(text.contains("barnraise_joins_total 2"));
        assert!(text.contains("barnraise_updates_rejected_total{reason=\"sign-flipped\"} 2"));
        assert!(text.contains("barnraise_eval_loss 2.5"));
        assert!(text.contains("barnraise_train_loss NaN"));
        m.stages
            .add(Stage::Probe, std::time::Duration::from_millis(1500));
        let text = m.render();
        assert!(
            text.contains("barnraise_stage_seconds_total{stage=\"probe\"} 1.5"),
            "{text}"
        );
        assert!(text.contains("barnraise_stage_seconds_total{stage=\"ledger\"} 0"));
        assert!(
            !text.contains("egress"),
            "no traffic series before the network is up"
        );
        let traffic = CoordinatorTraffic::new([]);
        traffic
            .wire
            .coordinator
            .sent
            .fetch_add(300, Ordering::Relaxed);
        traffic.wire.published(20);
        m.traffic
            .set(traffic)
            .unwrap_or_else(|_| panic!("set once"));
        let text = m.render();
        assert!(text.contains("barnraise_egress_bytes_total 320"), "{text}");
        assert!(text.contains("barnraise_blob_egress_bytes_total{kind=\"update\"} 0"));
    }
}
