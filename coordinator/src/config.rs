//! The run config: everything an operator decides about a run, read from a
//! TOML file (`barnraise coordinator --config run.toml`) or built in code by
//! `barnraise up` and the tests. `docs/running-a-coordinator.md` documents
//! every field; the defaults here are the ones it lists.

use barnraise_protocol::aggregate::AggregationRule;
use barnraise_protocol::codec::CodecSchedule;
use barnraise_protocol::{Hash, NodeId, OrgId};
use barnraise_trainer::ModelConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a run config is unusable. Each message names the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("run config {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("run config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("run config: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// How many of a round's assigned nodes must deliver before it may close
/// early: `quorum = 3` (a count) or `quorum = 0.75` (a fraction).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quorum {
    Count(u64),
    Fraction(f64),
}

impl Quorum {
    /// The number of valid updates that lets a round of `assigned` nodes close
    /// before its deadline; never more than `assigned`, never less than 1.
    pub fn target(&self, assigned: usize) -> usize {
        let want = match *self {
            Quorum::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Quorum::Fraction(f) => (f * assigned as f64).ceil() as usize,
        };
        want.clamp(1, assigned.max(1))
    }
}

/// Where the training data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DatasetSource {
    /// A directory written by `barnraise shard`: `dataset.json` plus `<hash>.bin` shards.
    Dir { path: PathBuf },
    /// Shards generated from the trainer's built-in corpus, written into the data dir.
    Builtin {
        #[serde(default = "default_builtin_shards")]
        shards: usize,
        #[serde(default = "default_builtin_shard_tokens")]
        shard_tokens: usize,
        #[serde(default)]
        seed: u64,
    },
}

fn default_builtin_shards() -> usize {
    16
}
fn default_builtin_shard_tokens() -> usize {
    32 * 1024
}

/// Who may join: the `[admission]` table.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admission {
    pub policy: AdmissionPolicy,
    /// With `policy = "orgs"`: the org ids (64 hex characters each) whose certificates admit a node.
    pub orgs: Vec<String>,
    /// Certificate ids (`barnraise org revoke FILE` prints one) the run no longer accepts.
    pub revoked_certificates: Vec<String>,
    /// Node ids the run no longer admits, whatever certificate they show.
    pub revoked_nodes: Vec<String>,
    /// The most workers a node without a certificate may declare (default
    /// 4): workers set how many shards a node gets and cap the tokens it
    /// may claim, so an unvouched node cannot claim a cluster.
    pub max_uncertified_workers: Option<u32>,
}

/// Whether a run is open to anyone or limited to certified nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionPolicy {
    /// Anyone with a key.
    #[default]
    Open,
    /// Only nodes with a valid certificate from one of the listed orgs.
    Orgs,
}

impl Admission {
    /// Limited to nodes certified by these org ids.
    pub fn orgs(orgs: impl IntoIterator<Item = impl Into<String>>) -> Admission {
        Admission {
            policy: AdmissionPolicy::Orgs,
            orgs: orgs.into_iter().map(Into::into).collect(),
            ..Admission::default()
        }
    }

    /// Parses the lists into the policy admission applies.
    pub fn resolve(&self) -> Result<crate::admission::Policy, ConfigError> {
        fn parse_all<T: std::str::FromStr<Err = barnraise_protocol::hash::HexError>>(
            field: &'static str,
            entries: &[String],
        ) -> Result<Vec<T>, ConfigError> {
            entries
                .iter()
                .map(|entry| {
                    entry
                        .parse::<T>()
                        .map_err(|e| invalid(field, format!("`{entry}`: {e}")))
                })
                .collect()
        }
        let orgs = parse_all::<OrgId>("admission.orgs", &self.orgs)?;
        let orgs = match self.policy {
            AdmissionPolicy::Open if !orgs.is_empty() => {
                return Err(invalid(
                    "admission.orgs",
                    "orgs are listed but policy is \"open\", which admits anyone; \
                     set policy = \"orgs\" to admit only them, or remove the list",
                ));
            }
            AdmissionPolicy::Open => None,
            AdmissionPolicy::Orgs if orgs.is_empty() => {
                return Err(invalid(
                    "admission.orgs",
                    "list at least one org id, or use policy = \"open\"",
                ));
            }
            AdmissionPolicy::Orgs => Some(orgs),
        };
        Ok(crate::admission::Policy {
            orgs,
            revoked_certificates: parse_all::<Hash>(
                "admission.revoked_certificates",
                &self.revoked_certificates,
            )?
            .into_iter()
            .collect(),
            revoked_nodes: parse_all::<NodeId>("admission.revoked_nodes", &self.revoked_nodes)?
                .into_iter()
                .collect(),
            max_uncertified_workers: self.max_uncertified_workers,
        })
    }
}

/// How many joins and commits one peer may send: a burst, then a rate
/// (docs/running-a-coordinator.md, "Admission"). Over it, the request is
/// refused with "retry later", which nodes honour by backing off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub join_burst: u32,
    pub joins_per_minute: u32,
    pub commit_burst: u32,
    pub commits_per_minute: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            join_burst: 10,
            joins_per_minute: 20,
            // A node commits once a round; the rest are retries.
            commit_burst: 10,
            commits_per_minute: 60,
        }
    }
}

/// What the coordinator keeps on disk (docs/running-a-coordinator.md, "Disk
/// and retention"). The first checkpoint (θ_0), the current state and every
/// training shard are always kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Published checkpoints kept besides θ_0: the newest this many.
    pub keep_checkpoints: usize,
    /// Rounds of updates kept; absent keeps every update, so anyone can
    /// re-verify the whole run from θ_0 (`barnraise audit --blobs`). Updates
    /// since the oldest kept checkpoint are kept whatever this says: late
    /// joiners replay them.
    pub keep_update_rounds: Option<u64>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_checkpoints: 2,
            keep_update_rounds: None,
        }
    }
}

/// Thresholds of the verification pipeline (docs/protocol.md, "Verification and reject reasons").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifyConfig {
    /// An update whose L2 norm exceeds this multiple of the round's median norm is rejected.
    pub max_norm_ratio: f64,
    /// An update whose L2 norm is below this fraction of the round's median norm is rejected (free riders).
    pub min_norm_ratio: f64,
    /// An update whose cosine to the round's coordinate-wise median is below this is rejected as sign-flipped.
    pub min_cosine: f64,
    /// Two updates closer than this cosine (and within 1% in norm) are copies; the later one is rejected.
    pub duplicate_cosine: f64,
    /// Run the usefulness probe (stage 4): costs a few forward passes per update.
    pub probe: bool,
    /// Probe batches per shard.
    pub probe_batches: usize,
    /// Sequences per probe batch.
    pub probe_batch_size: usize,
    /// How much more (in nats) an update may lower the held-out loss than its own
    /// shard's before it counts as trained on other data.
    pub probe_margin: f32,
    /// An update must lower its own shard's loss by at least this fraction
    /// of the round's median gain (docs/security.md); 0 accepts any gain.
    pub probe_min_relative_gain: f32,
    /// Most updates probed in one round. Past it, updates from nodes with
    /// no accepted update in the replay window (new, or lately rejected)
    /// are probed first, then a draw the nodes could not predict; the rest
    /// pass on stages 1–3 and spot checks (docs/scaling.md).
    pub probe_max: usize,
    /// Batches a text of the second look at an update the probe found not
    /// useful: measured again on fresh batches before it is refused, so
    /// that the first look's noise does not refuse honest work
    /// (docs/security.md, "The usefulness probe"); 0: no second look.
    pub probe_second_look_batches: usize,
    /// Most second looks in one round, the updates nearest the bar first.
    pub probe_second_look_max: usize,
    /// Fraction of worker shares the coordinator replays each round to check
    /// the work was done (docs/security.md, "Spot checks"); 0 turns them off.
    pub spot_check_fraction: f64,
    /// Most spot checks in one round (each replays one worker's round on
    /// the coordinator's CPU).
    pub spot_check_max: usize,
    /// How far (relative, on the share's sketch) a replay may land from the
    /// committed Δ and still pass: 0 demands what the CPU gives, an exact
    /// replay; GPU nodes do not replay bit for bit.
    pub spot_check_tolerance: f64,
    /// Check a drawn worker whose starting state (8 bytes a parameter) has
    /// not arrived when the round could close after the close, settling
    /// the verdict in a later round, instead of holding the round for it
    /// (docs/security.md, "Deferred spot checks"). Off, the hold below
    /// applies.
    pub defer_state_checks: bool,
    /// With deferred checks: how long after a drawn node's update is
    /// checked a round that could close waits for its states, so that a
    /// fast link's verdict still lands in the round itself; only when the
    /// states can arrive within it at the rate the update came in.
    pub state_grace_secs: f64,
    /// With deferred checks: the most memory (MB) the copies of θ_r kept
    /// for checks still out may take. A round whose copy would not fit
    /// holds for its drawn states instead, as without deferred checks.
    pub deferred_memory_mb: u64,
    /// Without deferred checks: the slowest uplink (Mbit/s) a node may
    /// have and still deliver a drawn worker's state; after its commit,
    /// the coordinator allows the state's bytes at this rate, plus 5 s,
    /// holding the round past its deadline if need be.
    pub state_link_mbps: f64,
    /// Without deferred checks: the longest a round is held past its
    /// deadline for drawn states still arriving; 0 never holds it
    /// (docs/running-a-coordinator.md).
    pub state_wait_max_secs: f64,
    /// Threads the close runs its probes and spot-check replays on, each
    /// with its own copy of the model; 0: one per core. The verdicts do
    /// not depend on it (docs/running-a-coordinator.md).
    pub threads: usize,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            max_norm_ratio: 4.0,
            min_norm_ratio: 0.1,
            min_cosine: -0.2,
            duplicate_cosine: 0.9999,
            probe: true,
            probe_batches: 2,
            probe_batch_size: 8,
            // Measured: honest and off-shard updates overlap in (own − held-out)
            // gain at these scales, so a tight margin rejects honest work (an
            // end-to-end run lost an honest update at 0.05). Until the probe can
            // separate them, only a gross gap counts against an update.
            probe_margin: 1.0,
            // Measured by `bench attacks`: honest updates gain 0.7–1.4× the
            // round's median, noise and stale updates under 0.1×.
            probe_min_relative_gain: 0.25,
            probe_max: 64,
            probe_second_look_batches: 8,
            probe_second_look_max: 8,
            spot_check_fraction: 0.1,
            spot_check_max: 8,
            spot_check_tolerance: 0.05,
            defer_state_checks: true,
            deferred_memory_mb: 4096,
            // `small`'s 26 MB state takes 2.1 s at 100 Mbit/s.
            state_grace_secs: 2.0,
            // A home uplink; `small`'s 26 MB state takes 21 s at this rate.
            state_link_mbps: 10.0,
            state_wait_max_secs: 60.0,
            threads: 0,
        }
    }
}

/// A run and how the coordinator serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The run's name; part of every signed message and gossip topic.
    pub run_id: String,
    /// A model preset (`tiny`, `small`, `medium`, `large`, `xl`); ignored when `model_config` is set.
    pub model: String,
    /// A full model config, for models that are not a preset.
    pub model_config: Option<ModelConfig>,
    pub dataset: DatasetSource,
    /// Inner steps per round (DiLoCo's H).
    pub inner_steps: u32,
    pub batch_size: u32,
    pub seq_len: u32,
    pub inner_lr: f32,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    /// Update codec: `fp32`, `int8[:BLOCK]`, `topk[:CHUNK:K:BITS]`.
    pub codec: String,
    /// `mean`, `trimmed-mean:F`, `centered-clip:TAU[:ITERS]`.
    pub aggregation: String,
    pub quorum: Quorum,
    /// Seconds from a round's plan to its deadline. With `pace`, this is
    /// the deadline of a round that plans a node whose pace is not known
    /// yet; other rounds end 1.5 × the slowest expected finish + 10 s after
    /// their plan, at most 4 × this.
    pub round_deadline_secs: f64,
    /// Size each node's inner steps to its measured pace, within 2× of
    /// `inner_steps` either way, so that nodes of different speeds finish
    /// together, and adapt the deadline (docs/architecture.md, "Work sized
    /// to each node"). `false`: every node gets `inner_steps`, and the
    /// deadline is `round_deadline_secs`.
    pub pace: bool,
    /// Overlapped rounds (docs/architecture.md, "Overlapped rounds"): the
    /// most inner steps of a round a node trains after its commit, while
    /// its update travels and the round closes, carrying what they add into
    /// its next round. 0 (the default): synchronous rounds.
    pub overlap_steps: u32,
    /// Nodes that must have joined before the first round opens.
    pub min_nodes: usize,
    /// Shards each node trains on per round.
    pub shards_per_node: usize,
    pub total_rounds: u64,
    /// Publish a checkpoint of θ every this many rounds (1: every round).
    pub checkpoint_every: u64,
    pub admission: Admission,
    pub verify: VerifyConfig,
    /// Per-peer limits on joins and commits (`[rate_limits]`).
    pub rate_limits: RateLimits,
    /// What stays on disk (`[retention]`).
    pub retention: RetentionConfig,
    /// libp2p listen multiaddrs.
    pub listen: Vec<String>,
    /// Address of the HTTP API and metrics.
    pub http: SocketAddr,
    /// Where the ledger, blobs and the key live.
    pub data_dir: PathBuf,
    /// The coordinator's key file; default `<data_dir>/coordinator.key` (created if missing).
    pub key: Option<PathBuf>,
    /// Seconds to keep serving after the last round (nodes fetch the final manifest and checkpoint).
    pub linger_secs: f64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            run_id: "barnraise-run".into(),
            model: "tiny".into(),
            model_config: None,
            dataset: DatasetSource::Builtin {
                shards: default_builtin_shards(),
                shard_tokens: default_builtin_shard_tokens(),
                seed: 0,
            },
            inner_steps: 20,
            batch_size: 8,
            seq_len: 64,
            inner_lr: 3e-3,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            codec: "int8".into(),
            // Measured with `bench diloco` (10 workers, tiny, 2 seeds): no
            // cost to a clean run (−0.54% against the mean; trimming 0.2
            // cost +0.48%), and it trims what passes verification (docs/security.md).
            aggregation: "trimmed-mean:0.1".into(),
            quorum: Quorum::Fraction(1.0),
            round_deadline_secs: 120.0,
            pace: true,
            overlap_steps: 0,
            min_nodes: 1,
            shards_per_node: 1,
            total_rounds: 10,
            checkpoint_every: 1,
            admission: Admission::default(),
            verify: VerifyConfig::default(),
            rate_limits: RateLimits::default(),
            retention: RetentionConfig::default(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".into()],
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: PathBuf::from("coordinator-data"),
            key: None,
            linger_secs: 5.0,
        }
    }
}

/// The config after validation: parsed codec, rule and model.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub model: ModelConfig,
    /// The codec over rounds: its decay and density warm-up.
    pub codec: CodecSchedule,
    pub aggregation: AggregationRule,
    pub deadline_ms: u64,
    /// Who may join: listed orgs (or anyone) less revoked certificates and nodes.
    pub admission: crate::admission::Policy,
}

impl Resolved {
    /// The bytes of one worker's starting state (8 a parameter): the size
    /// every spot-checked state blob must have.
    pub fn state_len(&self) -> u64 {
        barnraise_trainer::Trainer::optimizer_state_len(self.model.params_count()) as u64
    }
}

impl CoordinatorConfig {
    /// Reads a TOML run config; relative paths in it are taken from the file's directory.
    pub fn load(path: &Path) -> Result<CoordinatorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        CoordinatorConfig::from_toml_str(&text, path, base)
    }

    /// Parses a TOML run config; relative paths in it are taken from
    /// `base`, and `path` only names the source in errors.
    pub fn from_toml_str(
        text: &str,
        path: &Path,
        base: &Path,
    ) -> Result<CoordinatorConfig, ConfigError> {
        let mut config: CoordinatorConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let rebase = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rebase(&mut config.data_dir);
        if let Some(key) = config.key.as_mut() {
            rebase(key);
        }
        if let DatasetSource::Dir { path } = &mut config.dataset {
            rebase(path);
        }
        Ok(config)
    }

    /// Checks every field and parses the ones that are strings.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let model = match &self.model_config {
            Some(m) => m.clone(),
            None => ModelConfig::preset(&self.model).ok_or_else(|| {
                invalid(
                    "model",
                    format!(
                        "unknown preset `{}` (try tiny, small, medium, large, xl)",
                        self.model
                    ),
                )
            })?,
        };
        let mut model = model;
        // A dataset cut with a tokenizer sets the vocabulary: a preset takes
        // it, an explicit model_config must agree. (A manifest that cannot be
        // read is reported by the dataset loader.)
        if let DatasetSource::Dir { path } = &self.dataset
            && let Ok(manifest) = barnraise_trainer::data::manifest::DatasetManifest::load(
                &path.join(barnraise_trainer::data::manifest::MANIFEST_FILE),
            )
            && manifest.vocab_size != model.vocab_size
        {
            if self.model_config.is_some() {
                return Err(invalid(
                    "model_config.vocab_size",
                    format!(
                        "{}, but the dataset's tokenizer ({}) has {} tokens",
                        model.vocab_size, manifest.tokenizer, manifest.vocab_size
                    ),
                ));
            }
            model.vocab_size = manifest.vocab_size;
        }
        model.validate().map_err(|e| invalid("model_config", e))?;
        let codec: CodecSchedule = self.codec.parse().map_err(|e| invalid("codec", e))?;
        let aggregation: AggregationRule = self
            .aggregation
            .parse()
            .map_err(|e| invalid("aggregation", format!("{e}")))?;
        if self.run_id.is_empty() || self.run_id.len() > barnraise_protocol::limits::MAX_TEXT_BYTES
        {
            return Err(invalid("run_id", "must be 1 to 256 bytes"));
        }
        if !self
            .run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "run_id",
                "use letters, digits, '-', '_' and '.' only (it names gossip topics)",
            ));
        }
        if self.inner_steps == 0 || self.batch_size == 0 || self.seq_len == 0 {
            return Err(invalid(
                "inner_steps/batch_size/seq_len",
                "must be positive",
            ));
        }
        if self.overlap_steps >= self.inner_steps {
            return Err(invalid(
                "overlap_steps",
                format!(
                    "{} must be fewer than inner_steps ({}): a node commits after the rest",
                    self.overlap_steps, self.inner_steps
                ),
            ));
        }
        if self.overlap_steps > 0 && self.retention.keep_update_rounds == Some(1) {
            return Err(invalid(
                "retention.keep_update_rounds",
                "must be at least 2 with overlap_steps: the next round's spot checks read the \
                 last round's updates",
            ));
        }
        if self.seq_len as usize > model.max_seq_len {
            return Err(invalid(
                "seq_len",
                format!(
                    "{} exceeds the model's context {}",
                    self.seq_len, model.max_seq_len
                ),
            ));
        }
        for (field, value) in [("inner_lr", self.inner_lr), ("outer_lr", self.outer_lr)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(invalid(field, "must be a positive number"));
            }
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(invalid("outer_momentum", "must be in [0, 1)"));
        }
        match self.quorum {
            Quorum::Count(0) => return Err(invalid("quorum", "a count must be at least 1")),
            Quorum::Fraction(f) if !(f > 0.0 && f <= 1.0) => {
                return Err(invalid("quorum", "a fraction must be in (0, 1]"));
            }
            _ => {}
        }
        if !(self.round_deadline_secs.is_finite() && self.round_deadline_secs > 0.0) {
            return Err(invalid(
                "round_deadline_secs",
                "must be a positive number of seconds",
            ));
        }
        if self.min_nodes == 0
            || self.shards_per_node == 0
            || self.total_rounds == 0
            || self.checkpoint_every == 0
        {
            return Err(invalid(
                "min_nodes/shards_per_node/total_rounds/checkpoint_every",
                "must be at least 1",
            ));
        }
        if self.listen.is_empty() {
            return Err(invalid("listen", "give at least one multiaddr"));
        }
        if self.retention.keep_checkpoints == 0 {
            return Err(invalid(
                "retention.keep_checkpoints",
                "must be at least 1: joining nodes load the newest checkpoint",
            ));
        }
        if !(0.0..1.0).contains(&self.verify.probe_min_relative_gain) {
            return Err(invalid(
                "verify.probe_min_relative_gain",
                "must be in [0, 1): a fraction of the round's median gain",
            ));
        }
        if self.verify.probe && self.verify.probe_max == 0 {
            return Err(invalid(
                "verify.probe_max",
                "must be at least 1 while the probe is on (set probe = false to turn it off)",
            ));
        }
        if !(0.0..=1.0).contains(&self.verify.spot_check_fraction) {
            return Err(invalid("verify.spot_check_fraction", "must be in [0, 1]"));
        }
        if self.verify.spot_check_tolerance.is_nan() || self.verify.spot_check_tolerance < 0.0 {
            return Err(invalid(
                "verify.spot_check_tolerance",
                "must be a number of at least 0",
            ));
        }
        if !(self.verify.state_link_mbps.is_finite() && self.verify.state_link_mbps > 0.0) {
            return Err(invalid(
                "verify.state_link_mbps",
                "must be a rate above 0 (Mbit/s)",
            ));
        }
        if !(self.verify.state_grace_secs.is_finite() && self.verify.state_grace_secs >= 0.0) {
            return Err(invalid(
                "verify.state_grace_secs",
                "must be a number of seconds, at least 0",
            ));
        }
        if !(self.linger_secs.is_finite() && self.linger_secs >= 0.0) {
            return Err(invalid(
                "linger_secs",
                "must be a number of seconds, at least 0",
            ));
        }
        if !(self.verify.state_wait_max_secs.is_finite() && self.verify.state_wait_max_secs >= 0.0)
        {
            return Err(invalid(
                "verify.state_wait_max_secs",
                "must be a number of seconds, at least 0",
            ));
        }
        if self.retention.keep_update_rounds == Some(0) {
            return Err(invalid(
                "retention.keep_update_rounds",
                "must be at least 1 (leave it out to keep every update)",
            ));
        }
        if let DatasetSource::Builtin {
            shards,
            shard_tokens,
            ..
        } = self.dataset
            && (shards == 0 || shard_tokens < 2 * self.seq_len as usize)
        {
            return Err(invalid(
                "dataset",
                "builtin needs shards >= 1 and shard_tokens >= 2 * seq_len",
            ));
        }
        let admission = self.admission.resolve()?;
        Ok(Resolved {
            admission,
            model,
            codec,
            aggregation,
            deadline_ms: (self.round_deadline_secs * 1000.0).round() as u64,
        })
    }

    /// The key file path.
    pub fn key_path(&self) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("coordinator.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_reads_with_defaults_and_quorum_forms() {
        let text = r#"
            run_id = "demo"
            model = "tiny"
            quorum = 3
            aggregation = "trimmed-mean:0.2"
            [dataset]
            source = "builtin"
            shards = 4
            [admission]
            policy = "open"
        "#;
        let config: CoordinatorConfig = toml::from_str(text).unwrap();
        assert_eq!(config.quorum, Quorum::Count(3));
        assert_eq!(config.inner_steps, CoordinatorConfig::default().inner_steps);
        assert!(config.resolve().is_ok());
        let config: CoordinatorConfig = toml::from_str("quorum = 0.5").unwrap();
        assert_eq!(config.quorum, Quorum::Fraction(0.5));
        assert_eq!(Quorum::Fraction(0.5).target(5), 3);
        assert_eq!(Quorum::Count(9).target(2), 2);
    }

    #[test]
    fn bad_fields_are_named() {
        for (text, field) in [
            ("codec = \"zip\"", "codec"),
            ("aggregation = \"median\"", "aggregation"),
            ("model = \"huge\"", "model"),
            ("quorum = 1.5", "quorum"),
            ("seq_len = 4096", "seq_len"),
            ("run_id = \"a b\"", "run_id"),
            (
                "[verify]\nprobe_min_relative_gain = 1.5",
                "probe_min_relative_gain",
            ),
            ("[verify]\nstate_link_mbps = 0", "verify.state_link_mbps"),
            (
                "[verify]\nstate_grace_secs = nan",
                "verify.state_grace_secs",
            ),
            (
                "[verify]\nstate_wait_max_secs = -1",
                "verify.state_wait_max_secs",
            ),
            ("linger_secs = inf", "linger_secs"),
        ] {
            let config: CoordinatorConfig = toml::from_str(text).unwrap();
            let err = config
                .resolve()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(field), "{text}: {err}");
        }
        assert!(toml::from_str::<CoordinatorConfig>("nonsense = 1").is_err());
    }

    #[test]
    fn admission_reads_orgs_and_revocations() {
        let org = "ab".repeat(32);
        let node = "cd".repeat(32);
        let certificate = "ef".repeat(32);
        let text = format!(
            "[admission]\npolicy = \"orgs\"\norgs = [\"{org}\"]\n\
             revoked_certificates = [\"{certificate}\"]\nrevoked_nodes = [\"{node}\"]\n"
        );
        let config: CoordinatorConfig = toml::from_str(&text).unwrap();
        let policy = config.resolve().unwrap().admission;
        assert_eq!(policy.orgs, Some(vec![org.parse().unwrap()]));
        assert!(
            policy
                .revoked_certificates
                .contains(&certificate.parse().unwrap())
        );
        assert!(policy.revoked_nodes.contains(&node.parse().unwrap()));
        // An open run may revoke too.
        let text = format!("[admission]\npolicy = \"open\"\nrevoked_nodes = [\"{node}\"]\n");
        let config: CoordinatorConfig = toml::from_str(&text).unwrap();
        let policy = config.resolve().unwrap().admission;
        assert_eq!(policy.orgs, None);
        assert_eq!(policy.revoked_nodes.len(), 1);

        for (text, needle) in [
            ("policy = \"orgs\"", "at least one org"),
            ("orgs = [\"ab\"]\npolicy = \"orgs\"", "`ab`"),
            (&format!("orgs = [\"{org}\"]") as &str, "policy is \"open\""),
            (
                "revoked_certificates = [\"xyz\"]",
                "admission.revoked_certificates",
            ),
            ("revoked_nodes = [\"xyz\"]", "admission.revoked_nodes"),
        ] {
            let config: CoordinatorConfig =
                toml::from_str(&format!("[admission]\n{text}\n")).unwrap();
            let err = config
                .resolve()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(toml::from_str::<CoordinatorConfig>("[admission]\npolicy = \"closed\"").is_err());
        assert!(toml::from_str::<CoordinatorConfig>("[admission]\nrevoked = []").is_err());
    }
}
