//! The HTTP side: a JSON API under `/api/v1` (`run`, `overview`, `rounds`,
//! `rounds/{round}`, `nodes`, `nodes/{node}`, `contributors`, `orgs`,
//! `orgs/{org}`, and the run record: `record` is its index, `record/{file}`
//! each file), Prometheus metrics at `/metrics`, and the dashboard's
//! server-rendered pages (`/`, `/nodes/{node}`, `/orgs/{org}`,
//! `/rounds/{round}`; see [`crate::dashboard`]). Read-only: nothing a client
//! sends here changes the run. Ledger reads run on blocking threads. An id
//! that is malformed or unknown is a 404 (an HTML page, or JSON under
//! `/api/`), never a server error.
//!
//! The server takes an already-bound listener and a cancellation token, so
//! tests bind port 0 and stop it cleanly.

use crate::dashboard;
use crate::ledger::{Ledger, LedgerError, roll_up_orgs};
use crate::metrics::Metrics;
use crate::summary::{LiveStatus, RunOverview};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use barnraise_protocol::{NodeId, OrgId};
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    /// Read-only connections: pages never wait for the service's writes.
    pub ledger: crate::ledger::Readers,
    pub live: Arc<RwLock<LiveStatus>>,
    pub metrics: Arc<Metrics>,
    /// The coordinator's data dir, for the run record (`None`: not served).
    pub data_dir: Option<std::path::PathBuf>,
    /// The record as last built, with the closed rounds it covers: rebuilt
    /// when a round closes, so a client fetching file after file reads one
    /// consistent snapshot between closes.
    pub record: RecordCache,
    /// The run's overview and contributor totals, as of the last close.
    pub closed: Arc<ClosedCache>,
}

/// Ledger reads that scan every update row of the run (so grow with its
/// length) and change only when a round closes: kept until the next close,
/// told by `Metrics::rounds_closed` (docs/scaling.md).
#[derive(Default)]
pub struct ClosedCache {
    overview: Slot<RunOverview>,
    contributors: Slot<Vec<crate::ledger::ContributorRow>>,
}

/// The value in `slot` if no round closed since it was read, else `read`
/// afresh (and kept). The count is taken before the read, so a value read
/// after a close is never kept under an older count for long: the next
/// close's count misses and reads again.
/// One slot of [`ClosedCache`]: the closed-round count it was read at, and the value.
type Slot<T> = Mutex<Option<(u64, Arc<T>)>>;

async fn cached<T, F>(
    state: &HttpState,
    slot: fn(&ClosedCache) -> &Slot<T>,
    read: F,
) -> Result<Arc<T>, String>
where
    T: Send + Sync + 'static,
    F: FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    let closed = state
        .metrics
        .rounds_closed
        .load(std::sync::atomic::Ordering::Acquire);
    if let Ok(held) = slot(&state.closed).lock()
        && let Some((at, value)) = held.as_ref()
        && *at == closed
    {
        return Ok(value.clone());
    }
    let value = Arc::new(read_ledger(state, read).await?);
    if let Ok(mut held) = slot(&state.closed).lock() {
        *held = Some((closed, value.clone()));
    }
    Ok(value)
}

async fn cached_overview(state: &HttpState) -> Result<Arc<RunOverview>, String> {
    cached(state, |c| &c.overview, RunOverview::from_ledger).await
}

async fn cached_contributors(
    state: &HttpState,
) -> Result<Arc<Vec<crate::ledger::ContributorRow>>, String> {
    cached(state, |c| &c.contributors, |l| l.contributors()).await
}

/// A cached read as JSON.
fn json_of<T: serde::Serialize>(read: Result<Arc<T>, String>) -> Response {
    match read {
        Ok(value) => Json(&*value).into_response(),
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// The last built run record and the number of closed rounds it covers.
pub type RecordCache = Arc<Mutex<Option<(usize, Arc<crate::record::Built>)>>>;

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(overview_page))
        .route("/nodes/{node}", get(node_page))
        .route("/orgs/{org}", get(org_page))
        .route("/rounds/{round}", get(round_page))
        .route("/api/v1/run", get(run))
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/rounds", get(rounds))
        .route("/api/v1/rounds/{round}", get(round_updates))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/nodes/{node}", get(node))
        .route("/api/v1/contributors", get(contributors))
        .route("/api/v1/reputation", get(reputation))
        .route("/api/v1/orgs", get(orgs))
        .route("/api/v1/orgs/{org}", get(org))
        .route("/api/v1/record", get(record_index))
        .route("/api/v1/record/{*file}", get(record_file))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn page(status: StatusCode, html: String) -> Response {
    (status, Html(html)).into_response()
}

fn page_not_found(what: &str) -> Response {
    page(StatusCode::NOT_FOUND, dashboard::not_found(what))
}

/// The run record, built afresh when a round has closed since the last build.
async fn built_record(state: &HttpState) -> Result<Arc<crate::record::Built>, Response> {
    let Some(data_dir) = state.data_dir.clone() else {
        return Err(error(
            StatusCode::NOT_FOUND,
            "this server does not serve the run record".into(),
        ));
    };
    let (ledger, cache) = (state.ledger.clone(), state.record.clone());
    tokio::task::spawn_blocking(move || {
        ledger.read(|ledger| {
            // One read transaction: the record is one snapshot of the ledger.
            let closed = ledger.rounds().map_err(|e| e.to_string())?.len();
            let mut cache = cache
                .lock()
                .map_err(|_| "the record cache is unavailable".to_string())?;
            if let Some((rounds, built)) = cache.as_ref()
                && *rounds == closed
            {
                return Ok(built.clone());
            }
            let built = ledger
                .snapshot(|l| crate::record::build(l, &data_dir))
                .map_err(|e| e.to_string())?;
            let built = Arc::new(built);
            *cache = Some((closed, built.clone()));
            Ok(built)
        })?
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
    .map_err(|message| error(StatusCode::INTERNAL_SERVER_ERROR, message))
}

/// `GET /api/v1/record`: the record's `index.json`.
async fn record_index(State(state): State<HttpState>) -> Response {
    match built_record(&state).await {
        Ok(built) => (
            [(header::CONTENT_TYPE, "application/json")],
            built.index_json.clone(),
        )
            .into_response(),
        Err(response) => response,
    }
}

/// `GET /api/v1/record/{file}`: one file the index lists, as stored.
async fn record_file(State(state): State<HttpState>, Path(file): Path<String>) -> Response {
    match built_record(&state).await {
        Ok(built) => match built.files.get(&file) {
            Some(bytes) => (
                [(header::CONTENT_TYPE, "application/octet-stream")],
                bytes.clone(),
            )
                .into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                format!("the record has no file {file}"),
            ),
        },
        Err(response) => response,
    }
}

/// Runs a ledger read on a blocking thread.
async fn read_ledger<T, F>(state: &HttpState, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    let ledger = state.ledger.clone();
    let result = tokio::task::spawn_blocking(move || {
        ledger.read(|ledger| f(ledger).map_err(|e| e.to_string()))?
    })
    .await;
    result.unwrap_or_else(|e| Err(e.to_string()))
}

/// Runs a ledger query and answers it as JSON.
async fn query<T, F>(state: &HttpState, f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
{
    match read_ledger(state, f).await {
        Ok(value) => Json(value).into_response(),
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// Like [`query`], with `None` answered as a JSON 404 saying `missing`.
async fn query_one<T, F>(state: &HttpState, missing: String, f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&Ledger) -> Result<Option<T>, LedgerError> + Send + 'static,
{
    match read_ledger(state, f).await {
        Ok(Some(value)) => Json(value).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, missing),
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

/// A node id from a URL: 64 hex digits, in the ledger's lowercase form.
fn parse_node(text: &str) -> Option<String> {
    text.parse::<NodeId>().ok().map(|id| id.to_string())
}

/// An org from a URL: its 64-hex key, or `independent` (`Some(None)`).
fn parse_org(text: &str) -> Option<Option<String>> {
    if text == dashboard::INDEPENDENT {
        return Some(None);
    }
    text.parse::<OrgId>().ok().map(|id| Some(id.to_string()))
}

fn parse_round(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn live(state: &HttpState) -> Option<LiveStatus> {
    state.live.read().ok().map(|live| live.clone())
}

async fn run(State(state): State<HttpState>) -> Response {
    match live(&state) {
        Some(live) => Json(live).into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "status unavailable".into(),
        ),
    }
}

async fn overview(State(state): State<HttpState>) -> Response {
    json_of(cached_overview(&state).await)
}

async fn rounds(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.rounds()).await
}

async fn round_updates(State(state): State<HttpState>, Path(round): Path<String>) -> Response {
    let missing = format!("no closed round `{round}`");
    let Some(round) = parse_round(&round) else {
        return error(StatusCode::NOT_FOUND, missing);
    };
    query_one(&state, missing, move |l| {
        if l.manifest(round)?.is_none() {
            return Ok(None);
        }
        l.updates(round).map(Some)
    })
    .await
}

async fn nodes(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.nodes()).await
}

async fn node(State(state): State<HttpState>, Path(node): Path<String>) -> Response {
    let missing = format!("no node `{node}`");
    let Some(node) = parse_node(&node) else {
        return error(StatusCode::NOT_FOUND, missing);
    };
    query_one(&state, missing, move |l| l.node_detail(&node)).await
}

/// Every node that had work: its reputation score, its standing for the
/// next plan (good, probation, benched) and the outcomes behind it.
async fn reputation(State(state): State<HttpState>) -> Response {
    match state.live.read() {
        Ok(live) => Json(&live.reputation).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "status unavailable".into(),
        ),
    }
}

async fn contributors(State(state): State<HttpState>) -> Response {
    json_of(cached_contributors(&state).await)
}

async fn orgs(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.orgs()).await
}

async fn org(State(state): State<HttpState>, Path(org): Path<String>) -> Response {
    let missing = format!("no org `{org}` with a node in a closed round");
    let Some(org) = parse_org(&org) else {
        return error(StatusCode::NOT_FOUND, missing);
    };
    query_one(&state, missing, move |l| l.org_detail(org.as_deref())).await
}

async fn overview_page(State(state): State<HttpState>) -> Response {
    let live = live(&state).unwrap_or_default();
    let read = match cached_overview(&state).await {
        Ok(run) => cached_contributors(&state).await.map(|nodes| (run, nodes)),
        Err(e) => Err(e),
    };
    match read {
        Ok((run, nodes)) => {
            let orgs = roll_up_orgs(&nodes);
            page(
                StatusCode::OK,
                dashboard::overview(&live, &run, &nodes, &orgs),
            )
        }
        Err(message) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            dashboard::unavailable(&message),
        ),
    }
}

/// Renders a page from a ledger read that may find nothing (then a 404 page).
async fn page_of<T, F>(
    state: &HttpState,
    missing: String,
    read: F,
    render: impl FnOnce(T) -> String,
) -> Response
where
    T: Send + 'static,
    F: FnOnce(&Ledger) -> Result<Option<T>, LedgerError> + Send + 'static,
{
    match read_ledger(state, read).await {
        Ok(Some(value)) => page(StatusCode::OK, render(value)),
        Ok(None) => page_not_found(&missing),
        Err(message) => page(
            StatusCode::INTERNAL_SERVER_ERROR,
            dashboard::unavailable(&message),
        ),
    }
}

async fn node_page(State(state): State<HttpState>, Path(node): Path<String>) -> Response {
    let missing = format!("No node `{node}` in this run's ledger.");
    let Some(node) = parse_node(&node) else {
        return page_not_found(&format!("`{node}` is not a node id (64 hex digits)."));
    };
    let id = node.clone();
    page_of(
        &state,
        missing,
        move |l| l.node_detail(&id),
        |detail| dashboard::node_page(&node, &detail),
    )
    .await
}

async fn org_page(State(state): State<HttpState>, Path(org): Path<String>) -> Response {
    let missing = format!("No org `{org}` with a node in a closed round.");
    let Some(org) = parse_org(&org) else {
        return page_not_found(&format!(
            "`{org}` is not an org key (64 hex digits) or `independent`."
        ));
    };
    page_of(
        &state,
        missing,
        move |l| l.org_detail(org.as_deref()),
        |detail| dashboard::org_page(&detail),
    )
    .await
}

async fn round_page(State(state): State<HttpState>, Path(round): Path<String>) -> Response {
    let missing = format!("No closed round `{round}` in this run.");
    let Some(round) = parse_round(&round) else {
        return page_not_found(&format!("`{round}` is not a round number."));
    };
    page_of(
        &state,
        missing,
        move |l| {
            let overview = RunOverview::from_ledger(l)?;
            let Some(row) = overview.rounds.into_iter().find(|r| r.round == round) else {
                return Ok(None);
            };
            Ok(Some((row, l.updates(round)?)))
        },
        |(row, updates)| dashboard::round_page(&row, &updates),
    )
    .await
}

async fn not_found(uri: Uri) -> Response {
    if uri.path().starts_with("/api/") {
        error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint `{}`", uri.path()),
        )
    } else {
        page_not_found(&format!("No page at `{}`.", uri.path()))
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
