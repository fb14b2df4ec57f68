//! The ledger: who contributed what, in SQLite (WAL mode, schema migrations
//! by `PRAGMA user_version`).
//!
//! Tables: `run` (the run's identity), `nodes`, `plans` (every signed plan,
//! so a restart resumes the open round), `commits` (accepted commits of the
//! open round, so a restart loses no contribution), `rounds` (one row per
//! closed round with its signed manifest), `updates` (one row per update or
//! missing node with its verdict and reason), `checkpoints`, and `refusals`
//! (messages refused before they belonged to any round).
//!
//! Closing a round is one transaction: the round row, its manifest, its
//! update rows and its checkpoint go in together and the round's pending
//! commits go out, so a crash at any point leaves either the whole round or
//! none of it. `rounds.round` is the primary key, so the same round can
//! never be written twice.

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What went wrong with the ledger database.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("ledger {path} does not exist (is this a coordinator data dir?)")]
    Missing { path: PathBuf },
    #[error(
        "ledger {path} has schema version {found}, newer than this barnraise understands ({supported}); upgrade barnraise"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("ledger {path} belongs to run `{found}`, not `{expected}`; use another data dir")]
    OtherRun {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("ledger {path}: round {round} is already closed; refusing to record it twice")]
    RoundExists { path: PathBuf, round: u64 },
}

/// Schema steps; `user_version` counts how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE run (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        run_id TEXT NOT NULL,
        config_json TEXT NOT NULL,
        created_ms INTEGER NOT NULL
     );
     CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        org TEXT,
        org_name TEXT,
        agent TEXT NOT NULL,
        workers INTEGER NOT NULL,
        listen_addrs TEXT NOT NULL,
        first_seen_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL
     );
     CREATE TABLE plans (
        round INTEGER PRIMARY KEY,
        signed BLOB NOT NULL,
        opened_ms INTEGER NOT NULL
     );
     CREATE TABLE commits (
        round INTEGER NOT NULL,
        node TEXT NOT NULL,
        signed BLOB NOT NULL,
        received_ms INTEGER NOT NULL,
        PRIMARY KEY (round, node)
     );
     CREATE TABLE rounds (
        round INTEGER PRIMARY KEY,
        opened_ms INTEGER NOT NULL,
        closed_ms INTEGER NOT NULL,
        base_params_hash TEXT NOT NULL,
        next_params_hash TEXT NOT NULL,
        manifest_hash TEXT NOT NULL UNIQUE,
        manifest BLOB NOT NULL,
        params_blob TEXT NOT NULL,
        optimizer_blob TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        rejected INTEGER NOT NULL,
        missing INTEGER NOT NULL,
        mean_loss REAL,
        eval_loss REAL,
        bytes_received INTEGER NOT NULL
     );
     CREATE TABLE updates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        round INTEGER NOT NULL REFERENCES rounds(round),
        node TEXT NOT NULL,
        update_hash TEXT,
        verdict TEXT NOT NULL CHECK (verdict IN ('accepted', 'rejected', 'missing')),
        reason TEXT,
        detail TEXT,
        tokens INTEGER NOT NULL,
        compute_ms INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        weight REAL NOT NULL,
        mean_loss REAL,
        credit REAL NOT NULL
     );
     CREATE INDEX updates_by_node ON updates(node);
     CREATE TABLE checkpoints (
        round INTEGER PRIMARY KEY,
        blob TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        params_hash TEXT NOT NULL,
        optimizer_blob TEXT NOT NULL,
        optimizer_bytes INTEGER NOT NULL
     );
     CREATE TABLE refusals (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        round INTEGER,
        claimed_node TEXT,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL
     );",
    // 2: the accounting queries (per-round overview, a node's history and
    // its late commits) look updates up by round and refusals by node.
    "CREATE INDEX IF NOT EXISTS updates_by_round ON updates(round);
     CREATE INDEX IF NOT EXISTS refusals_by_node ON refusals(claimed_node, round);",
    // 3: which certificate admitted a node, so a certificate revoked while
    // the coordinator was down is enforced when it restarts.
    "ALTER TABLE nodes ADD COLUMN certificate TEXT;",
    // 4: clawback — the round in which an accepted update's credit was
    // voided by a failed spot check (docs/security.md, "Clawback").
    "ALTER TABLE updates ADD COLUMN voided_in INTEGER;",
];

/// `(round, node, verdict, reason code)` of one ledger update row.
pub type VerdictRow = (u64, String, String, Option<String>);

/// A node as the ledger knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    pub org: Option<String>,
    pub org_name: Option<String>,
    pub agent: String,
    pub workers: u32,
    pub listen_addrs: Vec<String>,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    /// Id (hex) of the org certificate the node joined with, if any.
    #[serde(default)]
    pub certificate: Option<String>,
}

/// One update (or one missing node) in a closed round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateRow {
    pub node: String,
    pub update_hash: Option<String>,
    /// `accepted`, `rejected` or `missing`.
    pub verdict: String,
    /// The reject reason's code (`RejectReason::code`).
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub tokens: u64,
    pub compute_ms: u64,
    pub bytes: u64,
    pub weight: f64,
    pub mean_loss: Option<f64>,
    /// FLOP-normalized credit (training FLOPs of the accepted tokens); 0 when rejected.
    pub credit: f64,
}

/// A published checkpoint of θ_round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRow {
    pub round: u64,
    pub blob: String,
    pub bytes: u64,
    pub params_hash: String,
    pub optimizer_blob: String,
    pub optimizer_bytes: u64,
}

/// A closed round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    pub opened_ms: u64,
    pub closed_ms: u64,
    pub base_params_hash: String,
    pub next_params_hash: String,
    pub manifest_hash: String,
    /// Blobs holding θ_{round+1} (safetensors) and the outer momentum after it.
    pub params_blob: String,
    pub optimizer_blob: String,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    pub mean_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub bytes_received: u64,
}

/// Everything one round close writes, in one transaction.
#[derive(Clone, Debug)]
pub struct RoundRecord {
    pub row: RoundRow,
    /// `Signed<Manifest>::to_bytes()`.
    pub manifest: Vec<u8>,
    pub updates: Vec<UpdateRow>,
    pub checkpoint: Option<CheckpointRow>,
    /// The manifest's voids: `(node, from_round)`; the node's accepted
    /// updates from that round up to this one lose their credit.
    pub voided: Vec<(String, u64)>,
}

/// A node's totals over the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContributorRow {
    pub node: String,
    pub org: Option<String>,
    pub org_name: Option<String>,
    /// Tokens credited: those of accepted updates (capped by the plan and,
    /// where drawn, replayed by a spot check), less those voided.
    pub tokens: u64,
    /// Tokens of accepted updates whose credit a failed spot check took
    /// back (docs/security.md, "Clawback").
    #[serde(default)]
    pub voided_tokens: u64,
    /// Tokens claimed: those of every committed update, accepted or not;
    /// `claimed_tokens − tokens` is work claimed and not credited.
    #[serde(default)]
    pub claimed_tokens: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    /// Bytes of every update the node delivered (accepted or rejected).
    pub bytes: u64,
    /// Compute time of accepted updates.
    pub compute_ms: u64,
    pub credit: f64,
    /// Rounds whose update came after the round had closed (counted among
    /// `missing`) or was rejected as `late`.
    #[serde(default)]
    pub late: u64,
    /// Rejected updates by reason code.
    #[serde(default)]
    pub rejections: BTreeMap<String, u64>,
}

/// An org's totals: the sum of its nodes' [`ContributorRow`]s. Nodes that
/// joined without a certificate roll up into one row with `org: None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrgRow {
    /// The org's key (hex), or `None` for independent nodes.
    pub org: Option<String>,
    pub org_name: Option<String>,
    pub nodes: u64,
    pub tokens: u64,
    #[serde(default)]
    pub voided_tokens: u64,
    #[serde(default)]
    pub claimed_tokens: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    pub late: u64,
    pub bytes: u64,
    pub compute_ms: u64,
    pub credit: f64,
    pub rejections: BTreeMap<String, u64>,
}

/// The counts a node's row and an org's row share, for tables and pages.
#[derive(Clone, Copy, Debug)]
pub struct Tally<'a> {
    pub tokens: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub missing: u64,
    pub late: u64,
    pub bytes: u64,
    pub compute_ms: u64,
    pub credit: f64,
    pub rejections: &'a BTreeMap<String, u64>,
}

macro_rules! tally_of {
    ($row:ty) => {
        impl $row {
            pub fn tally(&self) -> Tally<'_> {
                Tally {
                    tokens: self.tokens,
                    accepted: self.accepted,
                    rejected: self.rejected,
                    missing: self.missing,
                    late: self.late,
                    bytes: self.bytes,
                    compute_ms: self.compute_ms,
                    credit: self.credit,
                    rejections: &self.rejections,
                }
            }
        }
    };
}
tally_of!(ContributorRow);
tally_of!(OrgRow);

/// How a node's update for a round arrived.
pub mod timeliness {
    /// The update was in the round (accepted or rejected on its merits).
    pub const ON_TIME: &str = "on-time";
    /// It came after the round closed, or was rejected as late.
    pub const LATE: &str = "late";
    /// The node was assigned work and delivered nothing.
    pub const MISSING: &str = "missing";
}

/// One round of one node's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeRoundRow {
    pub round: u64,
    /// `accepted`, `rejected` or `missing`.
    pub verdict: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub update_hash: Option<String>,
    pub tokens: u64,
    pub compute_ms: u64,
    pub bytes: u64,
    pub weight: f64,
    pub mean_loss: Option<f64>,
    pub credit: f64,
    /// One of [`timeliness`]'s values.
    pub timeliness: String,
}

/// Everything the ledger knows about one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeDetail {
    /// The node's join record; `None` when only its updates are known.
    pub info: Option<NodeRow>,
    /// Its totals; `None` before it has been in a closed round.
    pub totals: Option<ContributorRow>,
    pub history: Vec<NodeRoundRow>,
    /// Messages from this node refused outside any manifest (late commits among them).
    pub refusals: Vec<RefusalRow>,
}

/// An org's totals and its nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrgDetail {
    pub totals: OrgRow,
    pub nodes: Vec<ContributorRow>,
}

/// What happened in one closed round, counted from its update rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundActivity {
    pub round: u64,
    /// Nodes that had work in the round (accepted, rejected or missing).
    pub assigned: u64,
    /// Nodes that delivered an update (accepted or rejected).
    pub delivered: u64,
    pub late: u64,
    /// Tokens of the accepted updates.
    pub tokens: u64,
    pub credit: f64,
}

/// Rolls node totals up to org totals, most credit first; nodes without an
/// org form one row with `org: None`.
pub fn roll_up_orgs(rows: &[ContributorRow]) -> Vec<OrgRow> {
    let mut orgs: Vec<OrgRow> = Vec::new();
    for r in rows {
        let index = match orgs.iter().position(|o| o.org == r.org) {
            Some(i) => i,
            None => {
                orgs.push(OrgRow {
                    org: r.org.clone(),
                    org_name: None,
                    nodes: 0,
                    tokens: 0,
                    voided_tokens: 0,
                    claimed_tokens: 0,
                    accepted: 0,
                    rejected: 0,
                    missing: 0,
                    late: 0,
                    bytes: 0,
                    compute_ms: 0,
                    credit: 0.0,
                    rejections: BTreeMap::new(),
                });
                orgs.len() - 1
            }
        };
        let o = &mut orgs[index];
        if o.org_name.is_none() && r.org.is_some() {
            o.org_name = r.org_name.clone();
        }
        o.nodes += 1;
        o.tokens += r.tokens;
        o.voided_tokens += r.voided_tokens;
        o.claimed_tokens += r.claimed_tokens;
        o.accepted += r.accepted;
        o.rejected += r.rejected;
        o.missing += r.missing;
        o.late += r.late;
        o.bytes += r.bytes;
        o.compute_ms += r.compute_ms;
        o.credit += r.credit;
        for (reason, n) in &r.rejections {
            *o.rejections.entry(reason.clone()).or_insert(0) += n;
        }
    }
    orgs.sort_by(|a, b| {
        b.credit
            .total_cmp(&a.credit)
            .then_with(|| a.org_name.cmp(&b.org_name))
            .then_with(|| a.org.cmp(&b.org))
    });
    orgs
}

/// A refusal outside any round's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusalRow {
    pub at_ms: u64,
    pub round: Option<u64>,
    pub claimed_node: Option<String>,
    pub reason: String,
    pub detail: String,
}

/// The ledger file inside a coordinator's data dir.
pub fn ledger_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("ledger.sqlite")
}

/// An open ledger database.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ledger({})", self.path.display())
    }
}

/// A `checkpoints` row, selected as round, blob, bytes, params_hash,
/// optimizer_blob, optimizer_bytes.
fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        round: to_u64(r.get(0)?),
        blob: r.get(1)?,
        bytes: to_u64(r.get(2)?),
        params_hash: r.get(3)?,
        optimizer_blob: r.get(4)?,
        optimizer_bytes: to_u64(r.get(5)?),
    })
}

/// Opens (creating if needed) the ledger at `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
    Ledger::open(path)
}

/// Ledger connections for the HTTP API. Opened read-only on the ledger's
/// file, they read while the service writes (a commit's fsync, a round's
/// close) instead of queueing behind its lock (docs/scaling.md).
#[derive(Clone)]
pub struct Readers {
    pool: Arc<Vec<Arc<Mutex<Ledger>>>>,
    next: Arc<AtomicUsize>,
}

impl Readers {
    /// `connections` read-only connections to the ledger at `path`.
    pub fn open(path: &Path, connections: usize) -> Result<Readers, LedgerError> {
        let pool = (0..connections.max(1))
            .map(|_| Ledger::open_reader(path).map(|l| Arc::new(Mutex::new(l))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Readers {
            pool: Arc::new(pool),
            next: Arc::default(),
        })
    }

    /// Reads through the writer's own connection (tests, and ledgers in memory).
    pub fn shared(ledger: Arc<Mutex<Ledger>>) -> Readers {
        Readers {
            pool: Arc::new(vec![ledger]),
            next: Arc::default(),
        }
    }

    /// Runs `f` on a free connection, or waits for one. Blocks: call it
    /// off the async runtime's threads.
    pub fn read<T>(&self, f: impl FnOnce(&Ledger) -> T) -> Result<T, String> {
        for conn in self.pool.iter() {
            if let Ok(ledger) = conn.try_lock() {
                return Ok(f(&ledger));
            }
        }
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        match self.pool[at].lock() {
            Ok(ledger) => Ok(f(&ledger)),
            Err(_) => Err("the ledger is unavailable".to_string()),
        }
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LedgerError::Sqlite {
                path: path.into(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        }
        let conn = Connection::open(path).map_err(|source| LedgerError::Sqlite {
            path: path.into(),
            source,
        })?;
        let mut ledger = Ledger {
            conn,
            path: path.into(),
        };
        ledger.setup()?;
        Ok(ledger)
    }

    /// Opens an existing ledger without creating one (for `barnraise stats`).
    pub fn open_existing(path: &Path) -> Result<Ledger, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Missing { path: path.into() });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LedgerError::Sqlite {
            path: path.into(),
            source,
        })?;
        let mut ledger = Ledger {
            conn,
            path: path.into(),
        };
        ledger.setup()?;
        Ok(ledger)
    }

    /// Opens a connection that only reads an existing ledger (WAL: it reads
    /// the last committed state while the writer goes on). No migration:
    /// the writer has already brought the schema up to date.
    pub fn open_reader(path: &Path) -> Result<Ledger, LedgerError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LedgerError::Sqlite {
            path: path.into(),
            source,
        })?;
        let ledger = Ledger {
            conn,
            path: path.into(),
        };
        ledger
            .conn
            .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = ON;")
            .map_err(|e| ledger.err(e))?;
        Ok(ledger)
    }

    /// Runs `f` inside one read transaction: every query in it sees the
    /// same snapshot, whatever the writer commits meanwhile.
    pub fn snapshot<T, E: From<LedgerError>>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<T, E>,
    ) -> Result<T, E> {
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .map_err(|e| self.err(e))?;
        let out = f(self);
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        self.conn.execute_batch(end).map_err(|e| self.err(e))?;
        out
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, source: rusqlite::Error) -> LedgerError {
        LedgerError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs a query and maps every row.
    fn query_all<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, LedgerError> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params, map)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
        rows.map_err(|e| self.err(e))
    }

    fn setup(&mut self) -> Result<(), LedgerError> {
        // WAL: readers (the HTTP API, `barnraise stats`) never block the writer;
        // synchronous=FULL so a committed round survives power loss.
        self.conn
            .execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;")
            .map_err(|e| self.err(e))?;
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(LedgerError::TooNew {
                path: self.path.clone(),
                found: version,
                supported,
            });
        }
        for (i, step) in MIGRATIONS
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            let tx = self
                .conn
                .transaction()
                .map_err(|source| LedgerError::Sqlite {
                    path: self.path.clone(),
                    source,
                })?;
            tx.execute_batch(step)
                .map_err(|source| LedgerError::Sqlite {
                    path: self.path.clone(),
                    source,
                })?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(|source| LedgerError::Sqlite {
                    path: self.path.clone(),
                    source,
                })?;
            tx.commit().map_err(|source| LedgerError::Sqlite {
                path: self.path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Records which run this ledger belongs to, or checks it on a restart.
    pub fn bind_run(
        &self,
        run_id: &str,
        config_json: &str,
        now_ms: u64,
    ) -> Result<(), LedgerError> {
        let found: Option<String> = self
            .conn
            .query_row("SELECT run_id FROM run WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        match found {
            Some(found) if found != run_id => Err(LedgerError::OtherRun {
                path: self.path.clone(),
                found,
                expected: run_id.into(),
            }),
            Some(_) => Ok(()),
            None => {
                self.conn
                    .execute(
                        "INSERT INTO run (id, run_id, config_json, created_ms) VALUES (1, ?1, ?2, ?3)",
                        params![run_id, config_json, to_i64(now_ms)],
                    )
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
        }
    }

    /// The run id, if the ledger has been bound to one.
    pub fn run_id(&self) -> Result<Option<String>, LedgerError> {
        self.conn
            .query_row("SELECT run_id FROM run WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    pub fn upsert_node(&self, row: &NodeRow) -> Result<(), LedgerError> {
        let addrs = serde_json::to_string(&row.listen_addrs).unwrap_or_else(|_| "[]".into());
        self.conn
            .execute(
                "INSERT INTO nodes (node, org, org_name, agent, workers, listen_addrs, first_seen_ms, last_seen_ms, certificate)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT(node) DO UPDATE SET org = ?2, org_name = ?3, agent = ?4, workers = ?5,
                    listen_addrs = ?6, last_seen_ms = ?8, certificate = ?9",
                params![
                    row.node,
                    row.org,
                    row.org_name,
                    row.agent,
                    row.workers,
                    addrs,
                    to_i64(row.first_seen_ms),
                    to_i64(row.last_seen_ms),
                    row.certificate
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn nodes(&self) -> Result<Vec<NodeRow>, LedgerError> {
        self.query_all("SELECT node, org, org_name, agent, workers, listen_addrs, first_seen_ms, last_seen_ms, certificate FROM nodes ORDER BY first_seen_ms, node", [], |r| {
                let addrs: String = r.get(5)?;
                Ok(NodeRow {
                    node: r.get(0)?,
                    org: r.get(1)?,
                    org_name: r.get(2)?,
                    agent: r.get(3)?,
                    workers: r.get(4)?,
                    listen_addrs: serde_json::from_str(&addrs).unwrap_or_default(),
                    first_seen_ms: to_u64(r.get(6)?),
                    last_seen_ms: to_u64(r.get(7)?),
                    certificate: r.get(8)?,
                })
            })
    }

    /// Stores a round's signed plan when it opens. A plan is written once:
    /// a second plan for the same round is an error.
    pub fn record_plan(
        &self,
        round: u64,
        signed: &[u8],
        opened_ms: u64,
    ) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO plans (round, signed, opened_ms) VALUES (?1, ?2, ?3)",
                params![to_i64(round), signed, to_i64(opened_ms)],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every stored plan, oldest first: `(round, Signed<RoundPlan> bytes)`.
    pub fn plans(&self) -> Result<Vec<(u64, Vec<u8>)>, LedgerError> {
        self.query_all("SELECT round, signed FROM plans ORDER BY round", [], |r| {
            Ok((to_u64(r.get(0)?), r.get(1)?))
        })
    }

    /// Stores an accepted commit of the open round before the node is told
    /// it was accepted, so a restart resumes with it.
    pub fn record_commit(
        &self,
        round: u64,
        node: &str,
        signed: &[u8],
        received_ms: u64,
    ) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO commits (round, node, signed, received_ms) VALUES (?1, ?2, ?3, ?4)",
                params![to_i64(round), node, signed, to_i64(received_ms)],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The stored commits of `round`, in arrival order.
    pub fn pending_commits(&self, round: u64) -> Result<Vec<Vec<u8>>, LedgerError> {
        self.query_all(
            "SELECT signed FROM commits WHERE round = ?1 ORDER BY received_ms, rowid",
            [to_i64(round)],
            |r| r.get(0),
        )
    }

    pub fn record_refusal(&self, row: &RefusalRow) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO refusals (at_ms, round, claimed_node, reason, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![to_i64(row.at_ms), row.round.map(to_i64), row.claimed_node, row.reason, row.detail],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn refusals(&self) -> Result<Vec<RefusalRow>, LedgerError> {
        self.query_all(
            "SELECT at_ms, round, claimed_node, reason, detail FROM refusals ORDER BY id",
            [],
            Self::refusal_from,
        )
    }

    fn refusal_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<RefusalRow> {
        Ok(RefusalRow {
            at_ms: to_u64(r.get(0)?),
            round: r.get::<_, Option<i64>>(1)?.map(to_u64),
            claimed_node: r.get(2)?,
            reason: r.get(3)?,
            detail: r.get(4)?,
        })
    }

    /// Writes a closed round — manifest, update rows, checkpoint — in one
    /// transaction, and drops the round's pending commits in the same one.
    pub fn close_round(&mut self, record: &RoundRecord) -> Result<(), LedgerError> {
        let path = self.path.clone();
        let sql = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let round = record.row.round;
        let tx = self.conn.transaction().map_err(sql)?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM rounds WHERE round = ?1)",
                [to_i64(round)],
                |r| r.get(0),
            )
            .map_err(sql)?;
        if exists {
            return Err(LedgerError::RoundExists {
                path: path.clone(),
                round,
            });
        }
        let r = &record.row;
        tx.execute(
            "INSERT INTO rounds (round, opened_ms, closed_ms, base_params_hash, next_params_hash, manifest_hash, manifest,
                params_blob, optimizer_blob, accepted, rejected, missing, mean_loss, eval_loss, bytes_received)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            params![
                to_i64(round),
                to_i64(r.opened_ms),
                to_i64(r.closed_ms),
                r.base_params_hash,
                r.next_params_hash,
                r.manifest_hash,
                record.manifest,
                r.params_blob,
                r.optimizer_blob,
                to_i64(r.accepted),
                to_i64(r.rejected),
                to_i64(r.missing),
                r.mean_loss,
                r.eval_loss,
                to_i64(r.bytes_received)
            ],
        )
        .map_err(sql)?;
        for u in &record.updates {
            tx.execute(
                "INSERT INTO updates (round, node, update_hash, verdict, reason, detail, tokens, compute_ms, bytes, weight, mean_loss, credit)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    to_i64(round),
                    u.node,
                    u.update_hash,
                    u.verdict,
                    u.reason,
                    u.detail,
                    to_i64(u.tokens),
                    to_i64(u.compute_ms),
                    to_i64(u.bytes),
                    u.weight,
                    u.mean_loss,
                    u.credit
                ],
            )
            .map_err(sql)?;
        }
        if let Some(c) = &record.checkpoint {
            tx.execute(
                "INSERT OR REPLACE INTO checkpoints (round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![to_i64(c.round), c.blob, to_i64(c.bytes), c.params_hash, c.optimizer_blob, to_i64(c.optimizer_bytes)],
            )
            .map_err(sql)?;
        }
        for (node, from_round) in &record.voided {
            tx.execute(
                "UPDATE updates SET voided_in = ?1, credit = 0
                 WHERE node = ?2 AND verdict = 'accepted' AND round >= ?3 AND round < ?1
                   AND voided_in IS NULL",
                params![to_i64(round), node, to_i64(*from_round)],
            )
            .map_err(sql)?;
        }
        // The closed round's commits stay until the next close: a restart
        // reads what they held back (overlapped rounds,
        // docs/architecture.md); older ones go.
        tx.execute("DELETE FROM commits WHERE round < ?1", [to_i64(round)])
            .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    fn round_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<RoundRow> {
        Ok(RoundRow {
            round: to_u64(r.get(0)?),
            opened_ms: to_u64(r.get(1)?),
            closed_ms: to_u64(r.get(2)?),
            base_params_hash: r.get(3)?,
            next_params_hash: r.get(4)?,
            manifest_hash: r.get(5)?,
            params_blob: r.get(6)?,
            optimizer_blob: r.get(7)?,
            accepted: to_u64(r.get(8)?),
            rejected: to_u64(r.get(9)?),
            missing: to_u64(r.get(10)?),
            mean_loss: r.get(11)?,
            eval_loss: r.get(12)?,
            bytes_received: to_u64(r.get(13)?),
        })
    }

    const ROUND_COLUMNS: &'static str = "round, opened_ms, closed_ms, base_params_hash, next_params_hash, manifest_hash,
        params_blob, optimizer_blob, accepted, rejected, missing, mean_loss, eval_loss, bytes_received";

    /// Every closed round, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRow>, LedgerError> {
        let sql = format!("SELECT {} FROM rounds ORDER BY round", Self::ROUND_COLUMNS);
        self.query_all(&sql, [], Self::round_from)
    }

    /// Records θ_{round+1}'s held-out loss on a closed round, evaluated
    /// after its manifest went out. Only a round closed without one gets
    /// it: the figure is written once, like the rest of the row.
    pub fn set_eval_loss(&self, round: u64, eval_loss: f64) -> Result<bool, LedgerError> {
        let changed = self
            .conn
            .execute(
                "UPDATE rounds SET eval_loss = ?1 WHERE round = ?2 AND eval_loss IS NULL",
                params![eval_loss, to_i64(round)],
            )
            .map_err(|e| self.err(e))?;
        Ok(changed == 1)
    }

    /// The last closed round, if any.
    pub fn last_round(&self) -> Result<Option<RoundRow>, LedgerError> {
        let sql = format!(
            "SELECT {} FROM rounds ORDER BY round DESC LIMIT 1",
            Self::ROUND_COLUMNS
        );
        self.conn
            .query_row(&sql, [], Self::round_from)
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The signed manifest of a closed round.
    pub fn manifest(&self, round: u64) -> Result<Option<Vec<u8>>, LedgerError> {
        self.conn
            .query_row(
                "SELECT manifest FROM rounds WHERE round = ?1",
                [to_i64(round)],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The update rows of one round.
    pub fn updates(&self, round: u64) -> Result<Vec<UpdateRow>, LedgerError> {
        self.query_all(
                "SELECT node, update_hash, verdict, reason, detail, tokens, compute_ms, bytes, weight, mean_loss, credit
                 FROM updates WHERE round = ?1 ORDER BY id",
            [to_i64(round)], |r| {
                Ok(UpdateRow {
                    node: r.get(0)?,
                    update_hash: r.get(1)?,
                    verdict: r.get(2)?,
                    reason: r.get(3)?,
                    detail: r.get(4)?,
                    tokens: to_u64(r.get(5)?),
                    compute_ms: to_u64(r.get(6)?),
                    bytes: to_u64(r.get(7)?),
                    weight: r.get(8)?,
                    mean_loss: r.get(9)?,
                    credit: r.get(10)?,
                })
            })
    }

    /// Every verdict of the run, `(round, node, verdict, reason code)` in
    /// round order: what reputation is replayed from.
    pub fn verdicts(&self) -> Result<Vec<VerdictRow>, LedgerError> {
        self.query_all(
            "SELECT round, node, verdict, reason FROM updates ORDER BY round, id",
            [],
            |r| Ok((to_u64(r.get(0)?), r.get(1)?, r.get(2)?, r.get(3)?)),
        )
    }

    /// Records a checkpoint outside a round's close: θ_0 when a run starts.
    /// Recording the same round again replaces it.
    pub fn record_checkpoint(&self, row: &CheckpointRow) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO checkpoints (round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    to_i64(row.round),
                    row.blob,
                    to_i64(row.bytes),
                    row.params_hash,
                    row.optimizer_blob,
                    to_i64(row.optimizer_bytes)
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every published checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointRow>, LedgerError> {
        self.query_all(
            "SELECT round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes FROM checkpoints ORDER BY round",
            [],
            checkpoint_row,
        )
    }

    /// The published checkpoint of θ_`round`, if there is one.
    pub fn checkpoint(&self, round: u64) -> Result<Option<CheckpointRow>, LedgerError> {
        self.conn
            .query_row(
                "SELECT round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes FROM checkpoints WHERE round = ?1",
                [to_i64(round)],
                checkpoint_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The latest published checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<CheckpointRow>, LedgerError> {
        self.conn
            .query_row(
                "SELECT round, blob, bytes, params_hash, optimizer_blob, optimizer_bytes FROM checkpoints ORDER BY round DESC LIMIT 1",
                [],
                checkpoint_row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Per-node totals over every closed round, most credit first.
    pub fn contributors(&self) -> Result<Vec<ContributorRow>, LedgerError> {
        let sql = format!(
            "SELECT u.node, n.org, n.org_name,
                SUM(CASE WHEN u.verdict = 'accepted' AND u.voided_in IS NULL THEN u.tokens ELSE 0 END),
                SUM(u.verdict = 'accepted'), SUM(u.verdict = 'rejected'), SUM(u.verdict = 'missing'),
                SUM(u.bytes), SUM(CASE WHEN u.verdict = 'accepted' THEN u.compute_ms ELSE 0 END), SUM(u.credit),
                SUM({LATE}), SUM(u.tokens),
                SUM(CASE WHEN u.voided_in IS NOT NULL THEN u.tokens ELSE 0 END)
             FROM updates u LEFT JOIN nodes n ON n.node = u.node
             GROUP BY u.node ORDER BY SUM(u.credit) DESC, u.node"
        );
        let mut rows = self.query_all(&sql, [], |r| {
            Ok(ContributorRow {
                node: r.get(0)?,
                org: r.get(1)?,
                org_name: r.get(2)?,
                tokens: to_u64(r.get(3)?),
                accepted: to_u64(r.get(4)?),
                rejected: to_u64(r.get(5)?),
                missing: to_u64(r.get(6)?),
                bytes: to_u64(r.get(7)?),
                compute_ms: to_u64(r.get(8)?),
                credit: r.get(9)?,
                late: to_u64(r.get(10)?),
                claimed_tokens: to_u64(r.get(11)?),
                voided_tokens: to_u64(r.get(12)?),
                rejections: BTreeMap::new(),
            })
        })?;
        let reasons: Vec<(String, String, u64)> = self.query_all(
            "SELECT node, COALESCE(reason, ''), COUNT(*) FROM updates WHERE verdict = 'rejected'
             GROUP BY node, reason",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, to_u64(r.get(2)?))),
        )?;
        let at: std::collections::HashMap<String, usize> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| (row.node.clone(), i))
            .collect();
        for (node, reason, count) in reasons {
            if let Some(&i) = at.get(&node) {
                rows[i].rejections.insert(reason, count);
            }
        }
        Ok(rows)
    }

    /// Per-org totals (see [`roll_up_orgs`]), most credit first.
    pub fn orgs(&self) -> Result<Vec<OrgRow>, LedgerError> {
        Ok(roll_up_orgs(&self.contributors()?))
    }

    /// One org's totals and nodes; `org: None` is the independent nodes.
    /// `None` when no node of that org has been in a closed round.
    pub fn org_detail(&self, org: Option<&str>) -> Result<Option<OrgDetail>, LedgerError> {
        let nodes: Vec<ContributorRow> = self
            .contributors()?
            .into_iter()
            .filter(|c| c.org.as_deref() == org)
            .collect();
        Ok(roll_up_orgs(&nodes)
            .into_iter()
            .next()
            .map(|totals| OrgDetail { totals, nodes }))
    }

    /// The node's join record.
    pub fn node(&self, node: &str) -> Result<Option<NodeRow>, LedgerError> {
        Ok(self.nodes()?.into_iter().find(|n| n.node == node))
    }

    /// A node's rounds, oldest first, each with its verdict and timeliness.
    pub fn node_history(&self, node: &str) -> Result<Vec<NodeRoundRow>, LedgerError> {
        let sql = format!(
            "SELECT u.round, u.verdict, u.reason, u.detail, u.update_hash, u.tokens, u.compute_ms,
                u.bytes, u.weight, u.mean_loss, u.credit, {LATE}
             FROM updates u WHERE u.node = ?1 ORDER BY u.round, u.id"
        );
        self.query_all(&sql, [node], |r| {
            let verdict: String = r.get(1)?;
            let late: bool = r.get(11)?;
            let timeliness = match (late, verdict.as_str()) {
                (true, _) => timeliness::LATE,
                (false, "missing") => timeliness::MISSING,
                _ => timeliness::ON_TIME,
            };
            Ok(NodeRoundRow {
                round: to_u64(r.get(0)?),
                verdict,
                reason: r.get(2)?,
                detail: r.get(3)?,
                update_hash: r.get(4)?,
                tokens: to_u64(r.get(5)?),
                compute_ms: to_u64(r.get(6)?),
                bytes: to_u64(r.get(7)?),
                weight: r.get(8)?,
                mean_loss: r.get(9)?,
                credit: r.get(10)?,
                timeliness: timeliness.to_string(),
            })
        })
    }

    /// Everything about one node; `None` when the ledger has never heard of it.
    pub fn node_detail(&self, node: &str) -> Result<Option<NodeDetail>, LedgerError> {
        let info = self.node(node)?;
        let totals = self.contributors()?.into_iter().find(|c| c.node == node);
        let history = self.node_history(node)?;
        let refusals = self.query_all(
            "SELECT at_ms, round, claimed_node, reason, detail FROM refusals
             WHERE claimed_node = ?1 ORDER BY id",
            [node],
            Self::refusal_from,
        )?;
        if info.is_none() && totals.is_none() && history.is_empty() && refusals.is_empty() {
            return Ok(None);
        }
        Ok(Some(NodeDetail {
            info,
            totals,
            history,
            refusals,
        }))
    }

    /// Per closed round: who had work, who delivered, who was late, tokens and credit.
    pub fn round_activity(&self) -> Result<Vec<RoundActivity>, LedgerError> {
        let sql = format!(
            "SELECT r.round, COUNT(u.id), COALESCE(SUM(u.verdict IN ('accepted', 'rejected')), 0),
                COALESCE(SUM({LATE}), 0),
                COALESCE(SUM(CASE WHEN u.verdict = 'accepted' THEN u.tokens ELSE 0 END), 0),
                COALESCE(SUM(u.credit), 0.0)
             FROM rounds r LEFT JOIN updates u ON u.round = r.round
             GROUP BY r.round ORDER BY r.round"
        );
        self.query_all(&sql, [], |r| {
            Ok(RoundActivity {
                round: to_u64(r.get(0)?),
                assigned: to_u64(r.get(1)?),
                delivered: to_u64(r.get(2)?),
                late: to_u64(r.get(3)?),
                tokens: to_u64(r.get(4)?),
                credit: r.get(5)?,
            })
        })
    }

    /// The run config stored when the ledger was bound (JSON), if any.
    pub fn run_config_json(&self) -> Result<Option<String>, LedgerError> {
        self.conn
            .query_row("SELECT config_json FROM run WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }
}

/// SQL over an `updates u` row: 1 when the node's update for that round was
/// late — rejected as `late` inside the round, or refused as `late` after the
/// round had closed (the node then stands as missing in the manifest).
const LATE: &str = "(CASE WHEN (u.verdict = 'rejected' AND u.reason = 'late')
    OR (u.verdict = 'missing' AND EXISTS (SELECT 1 FROM refusals f
        WHERE f.claimed_node = u.node AND f.round = u.round AND f.reason = 'late'))
    THEN 1 ELSE 0 END)";

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: u64, nodes: &[(&str, &str)]) -> RoundRecord {
        let updates = nodes
            .iter()
            .map(|(node, verdict)| UpdateRow {
                node: node.to_string(),
                update_hash: Some(format!("{node}-{round}")),
                verdict: verdict.to_string(),
                reason: (*verdict != "accepted").then(|| "norm-too-large".to_string()),
                detail: None,
                tokens: 100,
                compute_ms: 10,
                bytes: 1000,
                weight: 0.5,
                mean_loss: Some(2.0),
                credit: if *verdict == "accepted" { 600.0 } else { 0.0 },
            })
            .collect();
        RoundRecord {
            row: RoundRow {
                round,
                opened_ms: 1,
                closed_ms: 2,
                base_params_hash: format!("base{round}"),
                next_params_hash: format!("next{round}"),
                manifest_hash: format!("manifest{round}"),
                params_blob: "p".into(),
                optimizer_blob: "o".into(),
                accepted: 1,
                rejected: 1,
                missing: 0,
                mean_loss: Some(2.0),
                eval_loss: None,
                bytes_received: 2000,
            },
            manifest: vec![round as u8; 8],
            updates,
            voided: vec![],
            checkpoint: Some(CheckpointRow {
                round: round + 1,
                blob: format!("ck{round}"),
                bytes: 10,
                params_hash: format!("next{round}"),
                optimizer_blob: "o".into(),
                optimizer_bytes: 4,
            }),
        }
    }

    #[test]
    fn ledger_round_close_is_all_or_nothing_and_never_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let mut ledger = open(&path).unwrap();
        ledger.bind_run("run", "{}", 0).unwrap();
        ledger.record_commit(0, "a", b"commit-a", 5).unwrap();
        ledger
            .close_round(&record(0, &[("a", "accepted"), ("b", "rejected")]))
            .unwrap();
        assert_eq!(
            ledger.pending_commits(0).unwrap(),
            vec![b"commit-a".to_vec()],
            "a closed round's commits stay until the next close"
        );
        // The held-out loss is filled in once, after the close.
        assert_eq!(ledger.rounds().unwrap()[0].eval_loss, None);
        assert!(ledger.set_eval_loss(0, 2.5).unwrap());
        assert!(!ledger.set_eval_loss(0, 9.0).unwrap(), "written once");
        assert!(!ledger.set_eval_loss(7, 1.0).unwrap(), "no such round");
        assert_eq!(ledger.rounds().unwrap()[0].eval_loss, Some(2.5));
        // A second close of round 0 changes nothing.
        let again = ledger.close_round(&record(0, &[("a", "accepted")]));
        assert!(
            matches!(again, Err(LedgerError::RoundExists { round: 0, .. })),
            "{again:?}"
        );
        // A close that fails half-way (a bad verdict trips the CHECK) writes nothing.
        let broken = record(1, &[("a", "accepted"), ("b", "bogus")]);
        assert!(ledger.close_round(&broken).is_err());
        assert_eq!(ledger.rounds().unwrap().len(), 1);
        assert_eq!(ledger.updates(1).unwrap().len(), 0);
        assert_eq!(
            ledger.latest_checkpoint().unwrap().map(|c| c.round),
            Some(1)
        );
        let a = ledger
            .contributors()
            .unwrap()
            .into_iter()
            .find(|c| c.node == "a")
            .unwrap();
        assert_eq!((a.accepted, a.tokens, a.credit), (1, 100, 600.0));
    }

    /// Clawback: a void takes back the credit of the node's accepted
    /// updates from its first round up to the voiding round, and only those;
    /// the counts of accepted updates stay (they are in θ), org totals follow.
    #[test]
    fn commits_stay_one_close_past_their_round() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open(&dir.path().join("ledger.sqlite")).unwrap();
        ledger.bind_run("run", "{}", 0).unwrap();
        for round in 0..3 {
            ledger.record_commit(round, "a", &[round as u8], 1).unwrap();
            ledger
                .close_round(&record(round, &[("a", "accepted")]))
                .unwrap();
        }
        assert!(ledger.pending_commits(0).unwrap().is_empty());
        assert!(ledger.pending_commits(1).unwrap().is_empty());
        assert_eq!(ledger.pending_commits(2).unwrap(), vec![vec![2u8]]);
    }

    #[test]
    fn a_void_takes_back_the_window_credit_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open(&dir.path().join("ledger.sqlite")).unwrap();
        ledger.bind_run("run", "{}", 0).unwrap();
        for round in 0..3 {
            ledger
                .close_round(&record(round, &[("a", "accepted"), ("b", "accepted")]))
                .unwrap();
        }
        // Round 3: `a` fails a check; its window began in round 1.
        let mut voiding = record(3, &[("a", "rejected"), ("b", "accepted")]);
        voiding.voided = vec![("a".into(), 1)];
        ledger.close_round(&voiding).unwrap();
        let rows = ledger.contributors().unwrap();
        let a = rows.iter().find(|c| c.node == "a").unwrap();
        let b = rows.iter().find(|c| c.node == "b").unwrap();
        assert_eq!((a.accepted, a.tokens, a.voided_tokens), (3, 100, 200));
        assert_eq!(a.credit, 600.0, "round 0 stands");
        assert_eq!((b.accepted, b.tokens, b.voided_tokens), (4, 400, 0));
        assert_eq!(b.credit, 2400.0);
        let orgs = roll_up_orgs(&rows);
        assert_eq!((orgs[0].tokens, orgs[0].voided_tokens), (500, 200));
    }

    #[test]
    fn ledger_reopen_after_crash_counts_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        {
            let mut ledger = open(&path).unwrap();
            ledger.bind_run("run", "{}", 0).unwrap();
            ledger.record_plan(0, b"plan0", 1).unwrap();
            ledger
                .close_round(&record(0, &[("a", "accepted")]))
                .unwrap();
            ledger.record_plan(1, b"plan1", 3).unwrap();
            ledger.record_commit(1, "a", b"commit-a1", 4).unwrap();
            ledger.record_commit(1, "a", b"commit-a1-again", 5).unwrap();
            // Dropped without closing round 1: the "crash".
        }
        let mut ledger = open(&path).unwrap();
        assert!(ledger.bind_run("run", "{}", 9).is_ok());
        assert!(matches!(
            ledger.bind_run("other", "{}", 9),
            Err(LedgerError::OtherRun { .. })
        ));
        assert_eq!(ledger.last_round().unwrap().map(|r| r.round), Some(0));
        assert_eq!(ledger.plans().unwrap().len(), 2);
        assert_eq!(
            ledger.pending_commits(1).unwrap(),
            vec![b"commit-a1".to_vec()],
            "one commit per node per round"
        );
        assert!(
            ledger.record_plan(1, b"plan1-again", 6).is_err(),
            "never two plans for one round"
        );
        ledger
            .close_round(&record(1, &[("a", "accepted")]))
            .unwrap();
        let a = ledger
            .contributors()
            .unwrap()
            .into_iter()
            .find(|c| c.node == "a")
            .unwrap();
        assert_eq!((a.accepted, a.tokens), (2, 200));
        assert_eq!(ledger.manifest(1).unwrap(), Some(vec![1u8; 8]));
    }

    #[test]
    fn ledger_written_by_the_first_schema_opens_and_gains_the_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        {
            // A ledger as the first release left it: schema 1 only.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO run (id, run_id, config_json, created_ms) VALUES (1, 'run', '{}', 0)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO nodes (node, org, org_name, agent, workers, listen_addrs, first_seen_ms, last_seen_ms)
                 VALUES ('old', NULL, NULL, 'barnraise/0.1.0', 1, '[]', 0, 0)",
                [],
            )
            .unwrap();
        }
        let mut ledger = open(&path).unwrap();
        // A node recorded before certificates were kept reads back without one,
        // and a re-join records the certificate it showed.
        let mut old = ledger.nodes().unwrap().remove(0);
        assert_eq!(old.certificate, None);
        old.certificate = Some("c7b4".into());
        ledger.upsert_node(&old).unwrap();
        assert_eq!(
            ledger.nodes().unwrap()[0].certificate.as_deref(),
            Some("c7b4")
        );
        let version: i64 = ledger
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        ledger.bind_run("run", "{}", 1).unwrap();
        ledger
            .close_round(&record(0, &[("a", "accepted"), ("b", "rejected")]))
            .unwrap();
        let orgs = ledger.orgs().unwrap();
        assert_eq!(
            (orgs.len(), orgs[0].org.as_ref(), orgs[0].nodes),
            (1, None, 2)
        );
        assert_eq!(orgs[0].rejections.get("norm-too-large"), Some(&1));
        let history = ledger.node_history("b").unwrap();
        assert_eq!(history[0].timeliness, timeliness::ON_TIME);
        assert!(ledger.node_detail("nobody").unwrap().is_none());
        assert!(ledger.org_detail(Some("nobody")).unwrap().is_none());
    }

    #[test]
    fn ledger_migrates_and_refuses_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        drop(open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            open(&path),
            Err(LedgerError::TooNew { found: 99, .. })
        ));
        assert!(matches!(
            Ledger::open_existing(&dir.path().join("none")),
            Err(LedgerError::Missing { .. })
        ));
    }
}
