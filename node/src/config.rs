//! The node's configuration: what `barnraise node` reads from its TOML file,
//! `BARNRAISE_*` environment variables and flags (the CLI merges them, flags
//! winning), and what `barnraise up` and tests build directly.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything a node needs to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The coordinator's multiaddr, ideally with its `/p2p/<peer id>`.
    pub coordinator: Multiaddr,
    /// Where the node keeps its key, blobs, params and receipts.
    pub data_dir: PathBuf,
    /// Addresses to listen on (TCP and/or QUIC).
    pub listen: Vec<Multiaddr>,
    /// "auto", "cpu" or "cuda:N".
    pub device: String,
    /// "auto" (bf16 matmuls on a GPU that has them, f32 elsewhere), "f32"
    /// or "bf16": docs/training.md, "GPUs".
    pub precision: barnraise_trainer::precision::Precision,
    /// Most sequences one forward pass holds: a run's batch larger than
    /// this is trained as micro-batches with their gradients summed (same
    /// sequences, same step), for GPUs with less memory than the run's
    /// batch needs. None: the whole batch at once.
    pub micro_batch: Option<u32>,
    /// Key file; default `<data_dir>/node.key` (created on first run).
    pub key: Option<PathBuf>,
    /// Upload cap in bytes per second (None: no cap).
    pub upload_limit: Option<u64>,
    /// Download cap in bytes per second (None: no cap).
    pub download_limit: Option<u64>,
    /// Stop after this many applied rounds (None: run until stopped).
    pub max_rounds: Option<u64>,
    /// After `max_rounds`, keep serving the starting states of the last
    /// rounds' workers for as long as a coordinator may still fetch them
    /// for a deferred spot check (60 s plus 1 s per MB after each commit)
    /// before exiting: leaving sooner fails a drawn check (docs/security.md,
    /// "Deferred spot checks").
    pub serve_states_before_exit: bool,
    /// The coordinator's public key (hex). Default: the key inside the
    /// coordinator's peer id, which is the same key.
    pub coordinator_key: Option<String>,
    /// The run to join; empty means whatever run the coordinator hosts.
    pub run_id: String,
    /// How often to ask the coordinator for plans and manifests when gossip
    /// is quiet, in milliseconds.
    pub poll_interval_ms: u64,
    /// Blobs fetched in parallel chunks at most (all providers together).
    pub max_parallel_chunks: usize,
    /// Fetch the other nodes' updates as the coordinator announces them,
    /// before the round's manifest, so that applying it finds them here,
    /// and our shards as soon as a plan names them (docs/running-a-node.md,
    /// "Configuration"). An update the manifest then rejects has cost its
    /// bytes; `false` fetches only what a manifest accepts, and shards when
    /// training starts.
    pub prefetch_updates: bool,
    /// Red-team mode, for testing a coordinator's verification: corrupt this
    /// node's updates on purpose. `sign-flip` (send −Δ), `zero` (a free
    /// rider's empty update) or `scale:F` (send F·Δ). Never set it on a node
    /// that should earn credit: the coordinator rejects what it sends.
    pub misbehave: Option<Misbehaviour>,
    /// Cluster mode: how many workers this node drives. Each trains its own
    /// share of the node's assignment; the node reduces their updates and
    /// uploads one. Default: one per device listed in `device`, else 1.
    pub workers: Option<u32>,
    /// An org certificate to present when joining (`barnraise org enroll`
    /// makes one); runs limited to listed orgs refuse nodes without one.
    pub certificate: Option<PathBuf>,
    /// Serve Prometheus metrics at `http://<addr>/metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Active hours, `"22:00-07:00"` in local time: outside them the node
    /// stands by (docs/running-a-node.md, "When the node works").
    pub schedule: Option<crate::activity::Schedule>,
    /// Most threads training may use (the CPU's matmuls); None: all cores.
    /// Read by the CLI before anything starts (`RAYON_NUM_THREADS`).
    pub threads: Option<u32>,
    /// Pause and resume a running node (the CLI flips it on SIGUSR1 and
    /// SIGUSR2). Not read from config files.
    #[serde(skip)]
    pub pause: Option<crate::activity::PauseSwitch>,
    /// Shape the node's TCP traffic through a userspace link (`barnraise up
    /// --link-mbps/--link-latency-ms`). Not read from config files.
    #[serde(skip)]
    pub link: Option<crate::network::shaper::Link>,
    /// Fault injection for tests of cluster mode: this worker panics in
    /// every round. Not read from config files.
    #[doc(hidden)]
    #[serde(skip)]
    pub fault_crash_worker: Option<usize>,
    /// Fault injection for tests: every inner step of every worker, held-back
    /// steps included, takes this many milliseconds longer (a slow machine,
    /// for pacing tests; `barnraise up --step-delay-ms`, a step that leaves
    /// the CPU free). Not read from config files.
    #[doc(hidden)]
    #[serde(skip)]
    pub fault_step_delay_ms: Option<u64>,
}

/// How a red-team node corrupts its pseudo-gradient before encoding it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Misbehaviour {
    SignFlip,
    Zero,
    Scale(f32),
    /// Token inflation: every worker but the first reports worker 0's Δ,
    /// with 10% noise added, as its own, so the node claims N workers'
    /// tokens for one worker's work (a plain copy is refused at commit).
    Inflate,
}

impl Misbehaviour {
    /// Applies the corruption to Δ in place.
    pub fn apply(&self, delta: &mut [f32]) {
        match *self {
            Misbehaviour::SignFlip => delta.iter_mut().for_each(|d| *d = -*d),
            Misbehaviour::Zero => delta.fill(0.0),
            Misbehaviour::Scale(f) => delta.iter_mut().for_each(|d| *d *= f),
            Misbehaviour::Inflate => {}
        }
    }
}

impl std::str::FromStr for Misbehaviour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "sign-flip" => Ok(Misbehaviour::SignFlip),
            "zero" => Ok(Misbehaviour::Zero),
            "inflate" => Ok(Misbehaviour::Inflate),
            other => match other.strip_prefix("scale:").map(str::parse::<f32>) {
                Some(Ok(f)) if f.is_finite() => Ok(Misbehaviour::Scale(f)),
                _ => Err(format!(
                    "misbehave `{other}`: expected sign-flip, zero, scale:F or inflate"
                )),
            },
        }
    }
}

impl std::fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misbehaviour::SignFlip => f.write_str("sign-flip"),
            Misbehaviour::Zero => f.write_str("zero"),
            Misbehaviour::Scale(x) => write!(f, "scale:{x}"),
            Misbehaviour::Inflate => f.write_str("inflate"),
        }
    }
}

impl Serialize for Misbehaviour {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Misbehaviour {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            coordinator: Multiaddr::empty(),
            data_dir: PathBuf::from(".barnraise"),
            listen: vec![default_listen()],
            device: "auto".into(),
            precision: barnraise_trainer::precision::Precision::Auto,
            micro_batch: None,
            key: None,
            upload_limit: None,
            download_limit: None,
            max_rounds: None,
            serve_states_before_exit: true,
            coordinator_key: None,
            run_id: String::new(),
            poll_interval_ms: 500,
            max_parallel_chunks: crate::transfer::MAX_IN_FLIGHT,
            prefetch_updates: true,
            misbehave: None,
            workers: None,
            certificate: None,
            metrics_addr: None,
            schedule: None,
            threads: None,
            pause: None,
            link: None,
            fault_crash_worker: None,
            fault_step_delay_ms: None,
        }
    }
}

fn default_listen() -> Multiaddr {
    // Loopback and an OS-chosen port: safe for tests and `barnraise up`.
    // The CLI listens on all interfaces by default.
    Multiaddr::empty()
        .with(libp2p::multiaddr::Protocol::Ip4(
            std::net::Ipv4Addr::LOCALHOST,
        ))
        .with(libp2p::multiaddr::Protocol::Tcp(0))
}

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

impl NodeConfig {
    /// What every inner step waits on top of training
    /// (`fault_step_delay_ms`), if anything.
    pub(crate) fn step_delay(&self) -> Option<std::time::Duration> {
        self.fault_step_delay_ms
            .map(std::time::Duration::from_millis)
    }

    /// Reads a TOML config file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        NodeConfig::from_toml_str(&text).map_err(|reason| ConfigError::Parse {
            path: path.into(),
            reason,
        })
    }

    pub fn from_toml_str(text: &str) -> Result<NodeConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The devices of this node's workers, one entry per worker. `device`
    /// may list several (`cuda:0,cuda:1`: one worker each); `workers = N`
    /// with a single device puts N workers on it (`auto` spreads them over
    /// the GPUs when this build can use them, else the CPU).
    pub fn worker_devices(&self) -> Result<Vec<barnraise_trainer::device::DeviceSpec>, String> {
        use barnraise_trainer::device::DeviceSpec;
        let listed: Vec<DeviceSpec> = self
            .device
            .split(',')
            .map(|d| d.trim().parse::<DeviceSpec>().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let max = crate::cluster::MAX_WORKERS;
        let devices = match (self.workers, listed.as_slice()) {
            (Some(0), _) => return Err("workers must be at least 1".into()),
            (Some(n), _) if n as usize > max => {
                return Err(format!("at most {max} workers per node (asked for {n})"));
            }
            (None, _) => listed,
            (Some(n), [single]) => match single {
                DeviceSpec::Auto => {
                    let gpus = barnraise_trainer::device::discover_gpus().len();
                    if barnraise_trainer::device::cuda_build() && gpus > 0 {
                        (0..n as usize)
                            .map(|i| DeviceSpec::Cuda(i % gpus))
                            .collect()
                    } else {
                        vec![DeviceSpec::Cpu; n as usize]
                    }
                }
                other => vec![*other; n as usize],
            },
            (Some(n), many) if many.len() == n as usize => listed,
            (Some(n), many) => {
                return Err(format!(
                    "workers = {n} but device lists {} devices; give one device, or one per worker",
                    many.len()
                ));
            }
        };
        if devices.len() > max {
            return Err(format!(
                "at most {max} workers per node ({} devices listed)",
                devices.len()
            ));
        }
        Ok(devices)
    }

    /// The key file this config uses.
    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("node.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_unknown_fields() {
        let config = NodeConfig::from_toml_str(
            r#"
            coordinator = "/ip4/10.0.0.1/tcp/4001"
            data_dir = "/var/lib/barnraise"
            upload_limit = 1000000
            listen = ["/ip4/0.0.0.0/tcp/4002", "/ip4/0.0.0.0/udp/4002/quic-v1"]
            "#,
        )
        .unwrap();
        assert_eq!(config.coordinator.to_string(), "/ip4/10.0.0.1/tcp/4001");
        assert_eq!(config.upload_limit, Some(1_000_000));
        assert_eq!(config.download_limit, None);
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.device, "auto");
        assert_eq!(
            config.key_path(),
            PathBuf::from("/var/lib/barnraise/node.key")
        );
        let err = NodeConfig::from_toml_str("uplaod_limit = 5").unwrap_err();
        assert!(err.contains("uplaod_limit"), "{err}");
    }
}

#[cfg(test)]
mod worker_tests {
    use super::*;
    use barnraise_trainer::device::DeviceSpec;

    fn devices(device: &str, workers: Option<u32>) -> Result<Vec<DeviceSpec>, String> {
        NodeConfig {
            device: device.into(),
            workers,
            ..NodeConfig::default()
        }
        .worker_devices()
    }

    #[test]
    fn workers_come_from_the_device_list_or_the_count() {
        assert_eq!(devices("cpu", None).unwrap(), vec![DeviceSpec::Cpu]);
        assert_eq!(devices("cpu", Some(3)).unwrap(), vec![DeviceSpec::Cpu; 3]);
        assert_eq!(
            devices("cuda:0, cuda:1", None).unwrap(),
            vec![DeviceSpec::Cuda(0), DeviceSpec::Cuda(1)]
        );
        assert_eq!(devices("cuda:0,cuda:1", Some(2)).unwrap().len(), 2);
        assert_eq!(devices("auto", Some(2)).unwrap().len(), 2);
        for (device, workers, needle) in [
            ("cpu", Some(0), "at least 1"),
            ("cpu", Some(10_000), "at most"),
            ("cuda:0,cuda:1", Some(3), "lists 2 devices"),
            ("tpu", None, "unknown device"),
            ("cpu,", None, "unknown device"),
        ] {
            let err = devices(device, workers).unwrap_err();
            assert!(err.contains(needle), "{device} {workers:?}: {err}");
        }
    }
}

#[cfg(test)]
mod misbehaviour_tests {
    use super::*;

    #[test]
    fn parses_applies_and_round_trips_through_toml() {
        let mut delta = [1.0f32, -2.0];
        "sign-flip"
            .parse::<Misbehaviour>()
            .unwrap()
            .apply(&mut delta);
        assert_eq!(delta, [-1.0, 2.0]);
        "scale:10"
            .parse::<Misbehaviour>()
            .unwrap()
            .apply(&mut delta);
        assert_eq!(delta, [-10.0, 20.0]);
        "zero".parse::<Misbehaviour>().unwrap().apply(&mut delta);
        assert_eq!(delta, [0.0, 0.0]);
        for bad in ["", "flip", "scale:", "scale:inf", "scale:x"] {
            assert!(bad.parse::<Misbehaviour>().is_err(), "{bad}");
        }
        let config = NodeConfig {
            misbehave: Some(Misbehaviour::Scale(2.5)),
            ..NodeConfig::default()
        };
        let text = toml::to_string(&config).unwrap();
        let back: NodeConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.misbehave, Some(Misbehaviour::Scale(2.5)));
    }
}
