//! Test support for end-to-end runs: start a real coordinator and real nodes
//! in this process on loopback port 0, and hand back handles.

#![allow(dead_code)]

pub mod netns;

use barnraise_coordinator::{CoordinatorConfig, CoordinatorHandle, DatasetSource, Quorum};
use barnraise_node::{NodeConfig, NodeError, NodeSummary};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A small, fast run: the `tiny` model on the built-in corpus.
pub fn tiny_run(data_dir: &Path, nodes: usize, rounds: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        run_id: "e2e".into(),
        model: "tiny".into(),
        dataset: DatasetSource::Builtin {
            shards: 12,
            shard_tokens: 16 * 1024,
            seed: 7,
        },
        inner_steps: 10,
        batch_size: 8,
        seq_len: 64,
        inner_lr: 3e-3,
        codec: "int8".into(),
        quorum: Quorum::Fraction(1.0),
        min_nodes: nodes,
        total_rounds: rounds,
        round_deadline_secs: 60.0,
        linger_secs: 5.0,
        data_dir: data_dir.join("coordinator"),
        ..CoordinatorConfig::default()
    }
}

pub async fn start_coordinator(
    config: CoordinatorConfig,
) -> (CoordinatorHandle, CancellationToken) {
    let shutdown = CancellationToken::new();
    let handle = barnraise_coordinator::start(config, shutdown.clone())
        .await
        .expect("coordinator starts");
    (handle, shutdown)
}

pub struct RunningNode {
    pub index: usize,
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<NodeSummary, NodeError>>,
}

pub fn node_config(
    coordinator: &CoordinatorHandle,
    data_dir: &Path,
    index: usize,
    rounds: u64,
) -> NodeConfig {
    NodeConfig {
        coordinator: coordinator.multiaddr(),
        data_dir: data_dir.join(format!("node-{index}")),
        device: "cpu".into(),
        run_id: "e2e".into(),
        max_rounds: Some(rounds),
        // Several tests stop nodes by `max_rounds` while the run goes on;
        // serving their states a minute more each would add minutes to the
        // suite (the wait itself is unit-tested in the node).
        serve_states_before_exit: false,
        ..NodeConfig::default()
    }
}

pub fn spawn_node(config: NodeConfig, index: usize) -> RunningNode {
    let shutdown = CancellationToken::new();
    let data_dir = config.data_dir.clone();
    let task = tokio::spawn(barnraise_node::run_node(config, shutdown.clone(), None));
    RunningNode {
        index,
        data_dir,
        shutdown,
        task,
    }
}

pub fn spawn_nodes(
    coordinator: &CoordinatorHandle,
    data_dir: &Path,
    n: usize,
    rounds: u64,
) -> Vec<RunningNode> {
    (0..n)
        .map(|i| spawn_node(node_config(coordinator, data_dir, i, rounds), i))
        .collect()
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most five minutes) for the coordinator's run to finish.
pub async fn finish_run(coordinator: CoordinatorHandle) -> barnraise_coordinator::RunSummary {
    match tokio::time::timeout(Duration::from_secs(300), coordinator.wait()).await {
        Ok(Ok(summary)) => summary,
        Ok(Err(e)) => panic!("the coordinator failed: {e}"),
        Err(_) => panic!("the run did not finish within 5 minutes"),
    }
}

pub async fn join_node(node: RunningNode, timeout: Duration) -> NodeSummary {
    match tokio::time::timeout(timeout, node.task).await {
        Ok(Ok(Ok(summary))) => summary,
        Ok(Ok(Err(e))) => panic!("node {} failed: {e}", node.index),
        Ok(Err(e)) => panic!("node {} task panicked: {e}", node.index),
        Err(_) => panic!("node {} did not finish within {timeout:?}", node.index),
    }
}
