//! The HTTP side: a JSON API under `/api/v1` (`run`, `rounds`,
//! `rounds/{round}`, `nodes`, `contributors`), Prometheus metrics at
//! `/metrics`, and a one-page dashboard at `/`. Read-only: nothing a client
//! sends here changes the run. Ledger reads run on blocking threads.
//!
//! The server takes an already-bound listener and a cancellation token, so
//! tests bind port 0 and stop it cleanly.

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::summary::LiveStatus;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::{Arc, Mutex, RwLock};
use tokio_util::sync::CancellationToken;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub ledger: Arc<Mutex<Ledger>>,
    pub live: Arc<RwLock<LiveStatus>>,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/v1/run", get(run))
        .route("/api/v1/rounds", get(rounds))
        .route("/api/v1/rounds/{round}", get(round_updates))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/contributors", get(contributors))
        .route("/metrics", get(metrics))
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

/// Runs a ledger query on a blocking thread and answers it as JSON.
async fn query<T, F>(state: &HttpState, f: F) -> Response
where
    T: serde::Serialize + Send + 'static,
    F: FnOnce(&Ledger) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
{
    let ledger = state.ledger.clone();
    let result = tokio::task::spawn_blocking(move || match ledger.lock() {
        Ok(ledger) => f(&ledger).map_err(|e| e.to_string()),
        Err(_) => Err("the ledger is unavailable".to_string()),
    })
    .await;
    match result {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run(State(state): State<HttpState>) -> Response {
    match state.live.read() {
        Ok(live) => Json(live.clone()).into_response(),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "status unavailable".into(),
        ),
    }
}

async fn rounds(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.rounds()).await
}

async fn round_updates(State(state): State<HttpState>, Path(round): Path<u64>) -> Response {
    query(&state, move |l| l.updates(round)).await
}

async fn nodes(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.nodes()).await
}

async fn contributors(State(state): State<HttpState>) -> Response {
    query(&state, |l| l.contributors()).await
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// A page that polls the API; no build step, no external assets.
const DASHBOARD: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>barnraise coordinator</title>
<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse}
td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:right}th{text-align:left}code{font-size:90%}</style></head>
<body><h1>barnraise</h1><p id="run">loading…</p>
<h2>Rounds</h2><table id="rounds"></table><h2>Contributors</h2><table id="contributors"></table>
<script>
const row=(cells,tag='td')=>'<tr>'+cells.map(c=>`<${tag}>${c??''}</${tag}>`).join('')+'</tr>';
const f=x=>x==null?'':Number(x).toFixed(3);
async function refresh(){
 const run=await (await fetch('/api/v1/run')).json();
 document.getElementById('run').innerHTML=`run <code>${run.run_id}</code>: round ${run.current_round} of ${run.total_rounds} (${run.phase}), ${run.active_nodes} active nodes, ${run.model_params} params, codec ${run.codec}, aggregation ${run.aggregation}`;
 const rounds=await (await fetch('/api/v1/rounds')).json();
 document.getElementById('rounds').innerHTML=row(['round','accepted','rejected','missing','train loss','eval loss','bytes'],'th')+rounds.slice(-20).reverse().map(r=>row([r.round,r.accepted,r.rejected,r.missing,f(r.mean_loss),f(r.eval_loss),r.bytes_received])).join('');
 const cs=await (await fetch('/api/v1/contributors')).json();
 document.getElementById('contributors').innerHTML=row(['node','org','tokens','accepted','rejected','missing','credit (FLOP)'],'th')+cs.map(c=>row([`<code>${c.node.slice(0,12)}</code>`,c.org_name,c.tokens,c.accepted,c.rejected,c.missing,c.credit.toExponential(2)])).join('');
}
refresh();setInterval(refresh,2000);
</script></body></html>"#;
