//! The node's Prometheus metrics (`barnraise node --metrics-addr HOST:PORT`
//! serves them at `/metrics`): what an operator graphs to see that a node is
//! training, committing and keeping up, per worker in cluster mode.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

/// Counters and gauges the daemon updates as it works. Cheap to update from
/// any thread.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    pub rounds_applied: AtomicU64,
    pub rounds_trained: AtomicU64,
    pub updates_committed: AtomicU64,
    pub commits_refused: AtomicU64,
    pub tokens_trained: AtomicU64,
    pub update_bytes: AtomicU64,
    pub compute_ms: AtomicU64,
    pub resyncs: AtomicU64,
    pub worker_failures: AtomicU64,
    pub current_round: AtomicU64,
    pub workers: AtomicU64,
    /// Blob bytes served, to anyone, and to other nodes (not the coordinator).
    pub blob_bytes_served: AtomicU64,
    pub blob_bytes_served_to_peers: AtomicU64,
    /// Blob bytes fetched, from anyone, and from the coordinator.
    pub blob_bytes_fetched: AtomicU64,
    pub blob_bytes_fetched_from_coordinator: AtomicU64,
    /// Accepted updates whose fetch started before their manifest.
    pub updates_prefetched: AtomicU64,
    /// f32 bits of the last inner step's training loss (NaN before any).
    pub last_loss: AtomicU64,
    /// Tokens each worker trained, by worker index.
    worker_tokens: Mutex<Vec<u64>>,
    /// Milliseconds of the rounds' phases, in [`ROUND_PHASES`] order.
    pub round_phase_ms: [AtomicU64; 4],
}

/// The phases of a round a node's wall clock goes to, as the metrics
/// label them (`crate::daemon::RoundPhases` holds the same sums).
pub const ROUND_PHASES: [&str; 4] = [
    "plan_to_commit",
    "commit_to_manifest",
    "applying",
    "waiting_for_plan",
];

impl NodeMetrics {
    pub fn new() -> NodeMetrics {
        let metrics = NodeMetrics::default();
        metrics
            .last_loss
            .store(f64::NAN.to_bits(), Ordering::Relaxed);
        metrics
    }

    pub fn add(cell: &AtomicU64, value: u64) {
        cell.fetch_add(value, Ordering::Relaxed);
    }

    pub fn set(cell: &AtomicU64, value: u64) {
        cell.store(value, Ordering::Relaxed);
    }

    pub fn set_loss(&self, loss: f32) {
        self.last_loss
            .store(f64::from(loss).to_bits(), Ordering::Relaxed);
    }

    pub fn add_worker_tokens(&self, worker: usize, tokens: u64) {
        if let Ok(mut per_worker) = self.worker_tokens.lock() {
            if per_worker.len() <= worker {
                per_worker.resize(worker + 1, 0);
            }
            per_worker[worker] += tokens;
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let get = |cell: &AtomicU64| cell.load(Ordering::Relaxed).to_string();
        let loss = f64::from_bits(self.last_loss.load(Ordering::Relaxed));
        let series: [(&str, &str, &str, String); 17] = [
            (
                "blob_served_bytes_total",
                "counter",
                "Blob bytes this node served (shards, updates, checkpoints).",
                get(&self.blob_bytes_served),
            ),
            (
                "blob_served_to_peers_bytes_total",
                "counter",
                "Blob bytes this node served to other nodes (the coordinator excluded).",
                get(&self.blob_bytes_served_to_peers),
            ),
            (
                "blob_fetched_bytes_total",
                "counter",
                "Blob bytes this node fetched.",
                get(&self.blob_bytes_fetched),
            ),
            (
                "blob_fetched_from_coordinator_bytes_total",
                "counter",
                "Blob bytes this node fetched from the coordinator.",
                get(&self.blob_bytes_fetched_from_coordinator),
            ),
            (
                "updates_prefetched_total",
                "counter",
                "Accepted updates whose fetch started on the coordinator's notice, before their manifest.",
                get(&self.updates_prefetched),
            ),
            (
                "rounds_applied_total",
                "counter",
                "Rounds whose manifest this node applied and verified.",
                get(&self.rounds_applied),
            ),
            (
                "rounds_trained_total",
                "counter",
                "Rounds this node trained in.",
                get(&self.rounds_trained),
            ),
            (
                "updates_committed_total",
                "counter",
                "Updates committed to the coordinator.",
                get(&self.updates_committed),
            ),
            (
                "commits_refused_total",
                "counter",
                "Commits the coordinator refused on arrival.",
                get(&self.commits_refused),
            ),
            (
                "tokens_trained_total",
                "counter",
                "Tokens trained, all workers.",
                get(&self.tokens_trained),
            ),
            (
                "update_bytes_total",
                "counter",
                "Bytes of compressed updates produced.",
                get(&self.update_bytes),
            ),
            (
                "compute_seconds_total",
                "counter",
                "Wall time spent training.",
                format!(
                    "{:.3}",
                    self.compute_ms.load(Ordering::Relaxed) as f64 / 1000.0
                ),
            ),
            (
                "resyncs_total",
                "counter",
                "Times the node fell behind and resynced.",
                get(&self.resyncs),
            ),
            (
                "worker_failures_total",
                "counter",
                "Workers that failed or crashed mid-round (left out of the update).",
                get(&self.worker_failures),
            ),
            (
                "current_round",
                "gauge",
                "The round the node is working on.",
                get(&self.current_round),
            ),
            (
                "workers",
                "gauge",
                "Workers this node drives.",
                get(&self.workers),
            ),
            (
                "train_loss",
                "gauge",
                "Training loss of the last inner step.",
                if loss.is_nan() {
                    "NaN".into()
                } else {
                    loss.to_string()
                },
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in series {
            let _ = writeln!(
                out,
                "# HELP barnraise_node_{name} {help}\n# TYPE barnraise_node_{name} {kind}\nbarnraise_node_{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP barnraise_node_worker_tokens_total Tokens trained, by worker.\n# TYPE barnraise_node_worker_tokens_total counter"
        );
        let _ = writeln!(
            out,
            "# HELP barnraise_node_round_phase_seconds_total Wall time of the rounds by phase: plan_to_commit (shards, training, encoding, committing), commit_to_manifest (the others and the close), applying (fetching the accepted updates, the outer step), waiting_for_plan.\n# TYPE barnraise_node_round_phase_seconds_total counter"
        );
        for (phase, ms) in ROUND_PHASES.iter().zip(&self.round_phase_ms) {
            let _ = writeln!(
                out,
                "barnraise_node_round_phase_seconds_total{{phase=\"{phase}\"}} {:.3}",
                ms.load(Ordering::Relaxed) as f64 / 1000.0
            );
        }
        if let Ok(per_worker) = self.worker_tokens.lock() {
            for (worker, tokens) in per_worker.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "barnraise_node_worker_tokens_total{{worker=\"{worker}\"}} {tokens}"
                );
            }
        }
        out
    }
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr` and serves `/metrics` until `shutdown`; returns the bound
/// address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: std::sync::Arc<NodeMetrics>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, MetricsError> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| MetricsError { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let stopped = shutdown.cancelled_owned();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_help_and_type() {
        let metrics = NodeMetrics::new();
        NodeMetrics::add(&metrics.tokens_trained, 1234);
        NodeMetrics::add(&metrics.compute_ms, 1500);
        metrics.add_worker_tokens(1, 77);
        NodeMetrics::add(&metrics.round_phase_ms[2], 2250);
        let text = metrics.render();
        assert!(
            text.contains("barnraise_node_round_phase_seconds_total{phase=\"applying\"} 2.250\n"),
            "{text}"
        );
        assert!(text.contains(
            "barnraise_node_round_phase_seconds_total{phase=\"waiting_for_plan\"} 0.000\n"
        ));
        assert!(
            text.contains("barnraise_node_tokens_trained_total 1234\n"),
            "{text}"
        );
        assert!(text.contains("barnraise_node_compute_seconds_total 1.500\n"));
        assert!(text.contains("barnraise_node_train_loss NaN\n"));
        assert!(text.contains("barnraise_node_worker_tokens_total{worker=\"0\"} 0\n"));
        assert!(text.contains("barnraise_node_worker_tokens_total{worker=\"1\"} 77\n"));
        metrics.set_loss(2.5);
        assert!(metrics.render().contains("barnraise_node_train_loss 2.5\n"));
        // Every sample line belongs to a series declared with HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "undeclared {name}"
            );
        }
    }

    #[tokio::test]
    async fn serves_metrics_over_http_until_shutdown() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let metrics = std::sync::Arc::new(NodeMetrics::new());
        NodeMetrics::add(&metrics.rounds_applied, 3);
        let shutdown = CancellationToken::new();
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = get("/metrics").await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("text/plain; version=0.0.4"));
        assert!(response.contains("barnraise_node_rounds_applied_total 3\n"));
        assert!(get("/other").await.unwrap().starts_with("HTTP/1.1 404"));
        // The port is taken while serving: a second endpoint there is a clear error.
        let taken = serve(addr, metrics, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(taken.to_string().contains(&addr.to_string()), "{taken}");
        shutdown.cancel();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(get("/metrics").await.is_err(), "stopped with the node");
    }
}
