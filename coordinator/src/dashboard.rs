//! The dashboard's HTML pages, rendered on the server from ledger rows: the
//! run overview (charts of loss, participants and bytes against
//! data-parallel, leaderboards by node and by org, recent rounds), a page
//! per node (its history, rejections and late rounds), per org and per
//! round, and the 404 page. No JavaScript and no external assets.
//!
//! Everything that reaches the ledger from a node (agent strings, org names,
//! reject details) goes through [`escape`] before it is written into a page.

use crate::ledger::{ContributorRow, NodeDetail, OrgDetail, OrgRow, Tally, UpdateRow};
use crate::stats::human;
use crate::summary::{LiveStatus, RoundOverview, RunOverview};
use crate::svg::{Chart, Series, Style, escape};
use barnraise_trainer::bench::human_bytes;
use std::fmt::Write;

/// How many rows of a leaderboard the overview shows.
const LEADERBOARD_ROWS: usize = 50;
/// How many recent rounds the overview lists.
const RECENT_ROUNDS: usize = 20;
/// The link text of an org without a certificate.
pub const INDEPENDENT: &str = "independent";

const STYLE: &str = "
:root{--fg:#1b1f24;--muted:#5b6570;--line:#e3e6ea;--bg:#fff;--accent:#1f6feb;--ok:#2da44e;--bad:#cf222e;--warn:#bf8700}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--fg);background:#f6f8fa;margin:0}
header{background:#1b1f24;color:#fff;padding:.6em 1.5em;display:flex;gap:1.5em;align-items:baseline}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700;font-size:1.1em}
main{max-width:90em;margin:0 auto;padding:1em 1.5em 3em}
h1{font-size:1.5em;margin:.6em 0 .2em;overflow-wrap:anywhere}h2{font-size:1.15em;margin:1.6em 0 .5em}
.muted{color:var(--muted)}code,.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.92em}
.id{overflow-wrap:anywhere}a.id{white-space:nowrap}
a{color:var(--accent)}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(11em,1fr));gap:.8em;margin:1em 0}
.tile{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:.6em .9em}
.tile b{display:block;font-size:1.35em}.tile span{color:var(--muted);font-size:.9em}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(34em,1fr));gap:1em}
.chart{width:100%;height:auto;background:var(--bg);border:1px solid var(--line);border-radius:6px}
.chart .chart-title{font-weight:600;font-size:13px;fill:var(--fg)}.chart .legend,.chart .tick{font-size:11px;fill:var(--muted)}
.chart .axis-label{font-size:11px;fill:var(--muted)}.chart .chart-empty{font-size:13px;fill:var(--muted)}
.chart .grid{stroke:var(--line)}.chart .axis{stroke:#8c959f}
.scroll{overflow-x:auto;background:var(--bg);border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%}
th,td{padding:.35em .7em;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{background:#f0f3f6;font-weight:600}th:first-child,td:first-child{text-align:left}
td.text,th.text{text-align:left;white-space:normal;overflow-wrap:break-word;min-width:6em;max-width:24em}
tr:last-child td{border-bottom:0}
.badge{display:inline-block;padding:0 .5em;border-radius:1em;font-size:.85em;color:#fff}
.accepted,.on-time{background:var(--ok)}.rejected{background:var(--bad)}.missing{background:#8c959f}.late{background:var(--warn)}
.share{display:inline-block;width:5em;height:.6em;background:var(--line);border-radius:.3em;margin-right:.4em;vertical-align:middle}
.share i{display:block;height:100%;background:var(--accent);border-radius:.3em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1.2em;margin:.5em 0}dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
";

/// A whole page around `body`. `refresh` reloads it every few seconds
/// (a live run) without any script.
fn page(title: &str, body: &str, refresh: bool) -> String {
    let refresh = if refresh {
        r#"<meta http-equiv="refresh" content="10">"#
    } else {
        ""
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">{refresh}
<title>{}</title><style>{STYLE}</style></head>
<body><header><a class="brand" href="/">barnraise</a><a href="/#nodes">nodes</a><a href="/#orgs">orgs</a><a href="/#rounds">rounds</a><a href="/api/v1/run">API</a></header>
<main>
{body}
</main></body></html>
"#,
        escape(title)
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC` for milliseconds since the Unix epoch.
fn timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `767.6 MFLOP`: the count's unit letter joins FLOP after a space.
fn flops(credit: f64) -> String {
    let count = human(credit);
    match count.char_indices().last() {
        Some((i, unit)) if unit.is_ascii_alphabetic() => format!("{} {unit}FLOP", &count[..i]),
        _ => format!("{count} FLOP"),
    }
}

fn loss(value: Option<f64>) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.4}"))
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A link to a node's page, showing its short id.
fn node_link(node: &str) -> String {
    format!(
        r#"<a class="id" href="/nodes/{}" title="{}">{}</a>"#,
        escape(node),
        escape(node),
        escape(short(node))
    )
}

/// The org's display name: its certificate's name, else its short key.
fn org_label(org: Option<&str>, name: Option<&str>) -> String {
    match (org, name) {
        (None, _) => INDEPENDENT.to_string(),
        (Some(_), Some(name)) if !name.trim().is_empty() => name.to_string(),
        (Some(key), _) => short(key).to_string(),
    }
}

fn org_link(org: Option<&str>, name: Option<&str>) -> String {
    format!(
        r#"<a href="/orgs/{}">{}</a>"#,
        escape(org.unwrap_or(INDEPENDENT)),
        escape(&org_label(org, name))
    )
}

fn badge(class: &str) -> String {
    format!(r#"<span class="badge {0}">{0}</span>"#, escape(class))
}

fn tiles(items: &[(String, &str)]) -> String {
    let mut out = String::from(r#"<div class="tiles">"#);
    for (value, label) in items {
        let _ = write!(
            out,
            r#"<div class="tile"><b>{}</b><span>{}</span></div>"#,
            escape(value),
            escape(label)
        );
    }
    out.push_str("</div>");
    out
}

/// A table inside a horizontally scrolling box; cells are already HTML.
/// `text_columns` are left-aligned and may wrap; the others are numbers.
fn table(headers: &[&str], rows: &[Vec<String>], text_columns: &[usize]) -> String {
    let class = |i: usize| {
        if text_columns.contains(&i) {
            r#" class="text""#
        } else {
            ""
        }
    };
    let mut out = String::from(r#"<div class="scroll"><table><thead><tr>"#);
    for (i, h) in headers.iter().enumerate() {
        let _ = write!(out, "<th{}>{}</th>", class(i), escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let _ = write!(out, "<td{}>{cell}</td>", class(i));
        }
        out.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            out,
            r#"<tr><td colspan="{}" class="muted">nothing yet</td></tr>"#,
            headers.len()
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

fn share_cell(credit: f64, total: f64) -> String {
    let pct = if total > 0.0 {
        100.0 * credit / total
    } else {
        0.0
    };
    format!(r#"<span class="share"><i style="width:{pct:.1}%"></i></span>{pct:.1}%"#)
}

fn reasons_text(reasons: &std::collections::BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = reasons
        .iter()
        .map(|(reason, n)| format!("{} ×{n}", escape(reason)))
        .collect();
    parts.join(", ")
}

/// The columns every leaderboard ends with.
const TALLY_HEADERS: [&str; 10] = [
    "tokens",
    "accepted",
    "rejected",
    "missing",
    "late",
    "bytes",
    "compute",
    "credit",
    "share",
    "rejections",
];

fn tally_cells(t: Tally<'_>, total_credit: f64) -> [String; 10] {
    [
        human(t.tokens as f64),
        t.accepted.to_string(),
        t.rejected.to_string(),
        t.missing.to_string(),
        t.late.to_string(),
        human_bytes(t.bytes),
        format!("{:.1} s", t.compute_ms as f64 / 1000.0),
        flops(t.credit),
        share_cell(t.credit, total_credit),
        reasons_text(t.rejections),
    ]
}

/// A leaderboard: `#`, the `lead` columns, then the tallies.
fn leaderboard<'a>(lead: &[&str], rows: Vec<(Vec<String>, Tally<'a>)>) -> String {
    let total: f64 = rows.iter().map(|(_, t)| t.credit).sum();
    let mut headers = vec!["#"];
    headers.extend(lead);
    headers.extend(TALLY_HEADERS);
    let cells: Vec<Vec<String>> = rows
        .into_iter()
        .enumerate()
        .map(|(i, (lead, tally))| {
            let mut cells = vec![(i + 1).to_string()];
            cells.extend(lead);
            cells.extend(tally_cells(tally, total));
            cells
        })
        .collect();
    // The lead columns (names) and the last (rejection reasons) are text.
    let mut text: Vec<usize> = (1..=lead.len()).collect();
    text.push(headers.len() - 1);
    table(&headers, &cells, &text)
}

fn node_table(rows: &[ContributorRow], with_org: bool) -> String {
    let lead: &[&str] = if with_org {
        &["node", "org"]
    } else {
        &["node"]
    };
    let rows = rows
        .iter()
        .map(|r| {
            let mut lead = vec![node_link(&r.node)];
            if with_org {
                lead.push(org_link(r.org.as_deref(), r.org_name.as_deref()));
            }
            (lead, r.tally())
        })
        .collect();
    leaderboard(lead, rows)
}

fn org_table(rows: &[OrgRow]) -> String {
    let rows = rows
        .iter()
        .map(|r| {
            let lead = vec![
                org_link(r.org.as_deref(), r.org_name.as_deref()),
                r.nodes.to_string(),
            ];
            (lead, r.tally())
        })
        .collect();
    leaderboard(&["org", "nodes"], rows)
}

/// The tiles of a node's or an org's totals.
fn tally_tiles(lead: Vec<(String, &'static str)>, t: Tally<'_>) -> String {
    let mut items = lead;
    items.extend([
        (human(t.tokens as f64), "tokens accepted"),
        (flops(t.credit), "credit"),
        (t.accepted.to_string(), "accepted"),
        (t.rejected.to_string(), "rejected"),
        (t.missing.to_string(), "missing"),
        (t.late.to_string(), "late"),
        (human_bytes(t.bytes), "bytes of updates"),
        (
            format!("{:.1} s", t.compute_ms as f64 / 1000.0),
            "compute (accepted)",
        ),
    ]);
    let mut out = tiles(&items);
    if !t.rejections.is_empty() {
        let _ = write!(
            out,
            "<p>Rejections by reason: {}</p>",
            reasons_text(t.rejections)
        );
    }
    out
}

fn round_label(r: &RoundOverview) -> String {
    r.round.to_string()
}

fn format_loss(v: f64) -> String {
    format!("{v:.2}")
}

fn format_count(v: f64) -> String {
    format!("{v:.0}")
}

fn format_bytes(v: f64) -> String {
    human_bytes(v.max(0.0) as u64)
}

fn overview_charts(run: &RunOverview) -> String {
    let categories: Vec<String> = run.rounds.iter().map(round_label).collect();
    let loss = Chart {
        title: "Loss per round".into(),
        x_label: "round".into(),
        categories: categories.clone(),
        series: vec![
            Series {
                name: "train (accepted updates)".into(),
                color: "#1f6feb",
                values: run.rounds.iter().map(|r| r.mean_loss).collect(),
            },
            Series {
                name: "held-out".into(),
                color: "#bf3989",
                values: run.rounds.iter().map(|r| r.eval_loss).collect(),
            },
        ],
        style: Style::Lines,
        log_y: false,
        format: format_loss,
    };
    let count = |f: fn(&RoundOverview) -> u64| -> Vec<Option<f64>> {
        run.rounds.iter().map(|r| Some(f(r) as f64)).collect()
    };
    let participants = Chart {
        title: "Participants per round".into(),
        x_label: "round".into(),
        categories: categories.clone(),
        series: vec![
            Series {
                name: "accepted".into(),
                color: "#2da44e",
                values: count(|r| r.accepted),
            },
            Series {
                name: "rejected".into(),
                color: "#cf222e",
                values: count(|r| r.rejected),
            },
            Series {
                name: "missing".into(),
                color: "#8c959f",
                values: count(|r| r.missing),
            },
        ],
        style: Style::StackedBars,
        log_y: false,
        format: format_count,
    };
    let bytes = Chart {
        title: "Bytes moved per round (log scale)".into(),
        x_label: "round".into(),
        categories,
        series: vec![
            Series {
                name: "updates".into(),
                color: "#1f6feb",
                values: run
                    .rounds
                    .iter()
                    .map(|r| Some(r.update_bytes as f64))
                    .collect(),
            },
            Series {
                name: "data-parallel".into(),
                color: "#d4a72c",
                values: run
                    .rounds
                    .iter()
                    .map(|r| r.data_parallel_bytes.map(|b| b as f64))
                    .collect(),
            },
        ],
        style: Style::GroupedBars,
        log_y: true,
        format: format_bytes,
    };
    format!(
        r#"<div class="charts">{}{}{}</div>"#,
        loss.render(),
        participants.render(),
        bytes.render()
    )
}

/// The run overview at `/`.
pub fn overview(
    live: &LiveStatus,
    run: &RunOverview,
    nodes: &[ContributorRow],
    orgs: &[OrgRow],
) -> String {
    let mut body = String::new();
    let run_id = run.run_id.clone().unwrap_or_else(|| live.run_id.clone());
    let _ = write!(
        body,
        r#"<h1>run <span class="id">{}</span></h1><p class="muted">{} · round {} of {} · {} active nodes · {:.2}M params · codec {} · aggregation {} · H = {}</p>"#,
        escape(&run_id),
        escape(&live.phase),
        live.current_round,
        live.total_rounds,
        live.active_nodes,
        live.model_params as f64 / 1e6,
        escape(&live.codec),
        escape(&live.aggregation),
        live.inner_steps
    );
    let tokens: u64 = run.rounds.iter().map(|r| r.tokens).sum();
    let credit: f64 = nodes.iter().map(|n| n.credit).sum();
    let rejected: u64 = run.rounds.iter().map(|r| r.rejected).sum();
    let reduction = match run.communication_reduction {
        Some(x) => format!("{x:.0}× less"),
        None => "–".into(),
    };
    // Which codec and H the ratio is for: it is bought with loss at high
    // compression (docs/training.md, "What the codec costs in `up`").
    let reduction_label = format!(
        "than data-parallel would move (codec {}, H = {}, aggregation {})",
        live.codec, live.inner_steps, live.aggregation
    );
    body.push_str(&tiles(&[
        (run.rounds.len().to_string(), "rounds closed"),
        (human(tokens as f64), "tokens in accepted updates"),
        (flops(credit), "credit (training FLOPs)"),
        (nodes.len().to_string(), "nodes with a round"),
        (rejected.to_string(), "updates rejected"),
        (human_bytes(run.update_bytes), "bytes of updates"),
        (reduction, reduction_label.as_str()),
    ]));
    body.push_str(&overview_charts(run));
    body.push_str(r#"<h2 id="nodes">Leaderboard by node</h2>"#);
    body.push_str(&node_table(
        &nodes[..nodes.len().min(LEADERBOARD_ROWS)],
        true,
    ));
    if nodes.len() > LEADERBOARD_ROWS {
        let _ = write!(
            body,
            r#"<p class="muted">{} more nodes in <a href="/api/v1/contributors">/api/v1/contributors</a>.</p>"#,
            nodes.len() - LEADERBOARD_ROWS
        );
    }
    body.push_str(&standing_section(&live.reputation));
    body.push_str(r#"<h2 id="orgs">Leaderboard by org</h2>"#);
    body.push_str(&org_table(orgs));
    body.push_str(r#"<h2 id="rounds">Recent rounds</h2>"#);
    let rows: Vec<Vec<String>> = run
        .rounds
        .iter()
        .rev()
        .take(RECENT_ROUNDS)
        .map(|r| {
            vec![
                format!(r#"<a href="/rounds/{0}">{0}</a>"#, r.round),
                r.accepted.to_string(),
                r.rejected.to_string(),
                r.missing.to_string(),
                r.late.to_string(),
                loss(r.mean_loss),
                loss(r.eval_loss),
                human(r.tokens as f64),
                human_bytes(r.update_bytes),
                r.data_parallel_bytes
                    .map_or_else(|| "–".into(), human_bytes),
                timestamp(r.closed_ms),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "round",
            "accepted",
            "rejected",
            "missing",
            "late",
            "train loss",
            "held-out loss",
            "tokens",
            "update bytes",
            "data-parallel bytes",
            "closed",
        ],
        &rows,
        &[],
    ));
    let _ = write!(
        body,
        r#"<p class="muted">Data-parallel bytes: a ring all-reduce of fp32 gradients every inner step among the nodes that delivered, 2(k−1)/k · 4P bytes per node per step. JSON: <a href="/api/v1/overview">overview</a>, <a href="/api/v1/contributors">nodes</a>, <a href="/api/v1/orgs">orgs</a>; <a href="/metrics">metrics</a>.</p>"#
    );
    page(
        "barnraise coordinator",
        &body,
        live.phase != "finished" && !live.phase.is_empty(),
    )
}

/// Nodes the next plan gives less work or none (docs/security.md,
/// "Reputation"): on probation or benched, lowest score first.
fn standing_section(reputation: &[crate::reputation::ReputationView]) -> String {
    use crate::reputation::Standing;
    let mut flagged: Vec<_> = reputation
        .iter()
        .filter(|r| r.standing != Standing::Good)
        .collect();
    let good = reputation.len() - flagged.len();
    flagged.sort_by(|a, b| a.score.total_cmp(&b.score));
    let mut out = format!(
        r#"<h2 id="standing">Standing</h2><p class="muted">{good} of {} nodes with work in good standing; the rest get one worker's share (probation) or none (benched). Scores: <a href="/api/v1/reputation">/api/v1/reputation</a>.</p>"#,
        reputation.len()
    );
    if flagged.is_empty() {
        return out;
    }
    let rows: Vec<Vec<String>> = flagged
        .iter()
        .take(LEADERBOARD_ROWS)
        .map(|r| {
            vec![
                node_link(&r.node),
                match r.standing {
                    Standing::Good => "good",
                    Standing::Probation => "probation",
                    Standing::Benched => "benched",
                }
                .to_string(),
                format!("{:.2}", r.score),
                r.benched_until
                    .map_or_else(|| "–".into(), |round| format!("round {round}")),
                r.accepted.to_string(),
                r.rejected.to_string(),
                r.missing.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "node",
            "standing",
            "score",
            "benched until",
            "accepted",
            "rejected",
            "missing",
        ],
        &rows,
        &[0, 1],
    ));
    out
}

/// A node's page at `/nodes/{id}`.
pub fn node_page(node: &str, detail: &NodeDetail) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        r#"<h1>node <span class="id">{}</span></h1><p class="id muted">{}</p>"#,
        escape(short(node)),
        escape(node)
    );
    body.push_str("<dl>");
    if let Some(info) = &detail.info {
        let _ = write!(
            body,
            "<dt>org</dt><dd>{}</dd><dt>agent</dt><dd>{}</dd><dt>workers</dt><dd>{}</dd><dt>first seen</dt><dd>{}</dd><dt>last seen</dt><dd>{}</dd><dt>addresses</dt><dd class=\"id\">{}</dd>",
            org_link(info.org.as_deref(), info.org_name.as_deref()),
            escape(&info.agent),
            info.workers,
            timestamp(info.first_seen_ms),
            timestamp(info.last_seen_ms),
            escape(&info.listen_addrs.join(" "))
        );
    } else {
        body.push_str("<dt>joined</dt><dd>no join record in the ledger</dd>");
    }
    body.push_str("</dl>");
    if let Some(t) = &detail.totals {
        body.push_str(&tally_tiles(Vec::new(), t.tally()));
    }
    let categories: Vec<String> = detail.history.iter().map(|h| h.round.to_string()).collect();
    let tokens_by = |verdict: &str| -> Vec<Option<f64>> {
        detail
            .history
            .iter()
            .map(|h| (h.verdict == verdict).then_some(h.tokens as f64))
            .collect()
    };
    let chart = Chart {
        title: "Tokens per round by verdict".into(),
        x_label: "round".into(),
        categories,
        series: vec![
            Series {
                name: "accepted".into(),
                color: "#2da44e",
                values: tokens_by("accepted"),
            },
            Series {
                name: "rejected".into(),
                color: "#cf222e",
                values: tokens_by("rejected"),
            },
        ],
        style: Style::StackedBars,
        log_y: false,
        format: |v| human(v),
    };
    let _ = write!(body, r#"<div class="charts">{}</div>"#, chart.render());
    body.push_str("<h2>History</h2>");
    let rows: Vec<Vec<String>> = detail
        .history
        .iter()
        .rev()
        .map(|h| {
            vec![
                format!(r#"<a href="/rounds/{0}">{0}</a>"#, h.round),
                badge(&h.verdict),
                badge(&h.timeliness),
                escape(h.reason.as_deref().unwrap_or("")),
                human(h.tokens as f64),
                human_bytes(h.bytes),
                format!("{:.1} s", h.compute_ms as f64 / 1000.0),
                loss(h.mean_loss),
                flops(h.credit),
                escape(h.detail.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "round",
            "verdict",
            "arrival",
            "reason",
            "tokens",
            "bytes",
            "compute",
            "train loss",
            "credit",
            "detail",
        ],
        &rows,
        &[1, 2, 3, 9],
    ));
    if !detail.refusals.is_empty() {
        body.push_str("<h2>Refused messages</h2>");
        let rows: Vec<Vec<String>> = detail
            .refusals
            .iter()
            .map(|r| {
                vec![
                    timestamp(r.at_ms),
                    r.round.map_or_else(String::new, |r| r.to_string()),
                    escape(&r.reason),
                    escape(&r.detail),
                ]
            })
            .collect();
        body.push_str(&table(
            &["at", "round", "reason", "detail"],
            &rows,
            &[0, 2, 3],
        ));
    }
    page(&format!("node {}", short(node)), &body, false)
}

/// An org's page at `/orgs/{key}` (or `/orgs/independent`).
pub fn org_page(detail: &OrgDetail) -> String {
    let t = &detail.totals;
    let label = org_label(t.org.as_deref(), t.org_name.as_deref());
    let mut body = String::new();
    let _ = write!(body, "<h1>org {}</h1>", escape(&label));
    match &t.org {
        Some(key) => {
            let _ = write!(body, r#"<p class="id muted">key {}</p>"#, escape(key));
        }
        None => {
            body.push_str(r#"<p class="muted">nodes that joined without an org certificate</p>"#)
        }
    }
    body.push_str(&tally_tiles(
        vec![(t.nodes.to_string(), "nodes")],
        t.tally(),
    ));
    body.push_str("<h2>Nodes</h2>");
    body.push_str(&node_table(&detail.nodes, false));
    page(&format!("org {label}"), &body, false)
}

/// A round's page at `/rounds/{round}`.
pub fn round_page(round: &RoundOverview, updates: &[UpdateRow]) -> String {
    let mut body = String::new();
    let _ = write!(body, "<h1>round {}</h1>", round.round);
    let _ = write!(
        body,
        r#"<p class="muted">opened {} · closed {} · params after: <span class="id">{}</span></p>"#,
        timestamp(round.opened_ms),
        timestamp(round.closed_ms),
        escape(&round.next_params_hash)
    );
    body.push_str(&tiles(&[
        (round.accepted.to_string(), "accepted"),
        (round.rejected.to_string(), "rejected"),
        (round.missing.to_string(), "missing"),
        (round.late.to_string(), "late"),
        (loss(round.mean_loss), "train loss"),
        (loss(round.eval_loss), "held-out loss"),
        (human_bytes(round.update_bytes), "bytes of updates"),
        (
            round
                .data_parallel_bytes
                .map_or_else(|| "–".into(), human_bytes),
            "data-parallel would move",
        ),
    ]));
    let rows: Vec<Vec<String>> = updates
        .iter()
        .map(|u| {
            vec![
                node_link(&u.node),
                badge(&u.verdict),
                escape(u.reason.as_deref().unwrap_or("")),
                human(u.tokens as f64),
                human_bytes(u.bytes),
                format!("{:.3}", u.weight),
                loss(u.mean_loss),
                flops(u.credit),
                escape(u.detail.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    body.push_str("<h2>Updates</h2>");
    body.push_str(&table(
        &[
            "node",
            "verdict",
            "reason",
            "tokens",
            "bytes",
            "weight",
            "train loss",
            "credit",
            "detail",
        ],
        &rows,
        &[0, 1, 2, 8],
    ));
    page(&format!("round {}", round.round), &body, false)
}

/// The 404 page: what was asked for, and a way back.
pub fn not_found(what: &str) -> String {
    let body = format!(
        r#"<h1>Not found</h1><p>{}</p><p><a href="/">Back to the run overview</a></p>"#,
        escape(what)
    );
    page("not found", &body, false)
}

/// The page for a ledger that could not be read.
pub fn unavailable(message: &str) -> String {
    let body = format!(
        r#"<h1>The ledger could not be read</h1><p class="id">{}</p>"#,
        escape(message)
    );
    page("ledger unavailable", &body, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standing_lists_nodes_on_probation_or_benched_lowest_first() {
        use crate::reputation::{ReputationView, Standing};
        let view = |node: &str, score, standing, benched_until| ReputationView {
            node: node.into(),
            score,
            standing,
            benched_until,
            accepted: 1,
            rejected: 2,
            missing: 0,
        };
        let html = standing_section(&[
            view("aa11", 0.9, Standing::Good, None),
            view("bb22", 0.4, Standing::Probation, None),
            view("cc33", 0.1, Standing::Benched, Some(12)),
        ]);
        assert!(
            html.contains("1 of 3 nodes with work in good standing"),
            "{html}"
        );
        let benched = html.find("benched</td>").unwrap_or(usize::MAX);
        let probation = html.find("probation</td>").unwrap_or(0);
        assert!(benched < probation, "lowest score first: {html}");
        assert!(
            html.contains("round 12") && !html.contains("aa11"),
            "{html}"
        );
        let all_good = standing_section(&[view("aa11", 0.9, Standing::Good, None)]);
        assert!(
            all_good.contains("1 of 1") && !all_good.contains("<table"),
            "{all_good}"
        );
    }

    #[test]
    fn escape_leaves_no_markup() {
        assert_eq!(
            escape(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn credit_reads_as_flops() {
        assert_eq!(flops(0.0), "0 FLOP");
        assert_eq!(flops(767.6e6), "767.6 MFLOP");
    }

    #[test]
    fn timestamps_are_civil_utc() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(timestamp(1_790_000_000_123), "2026-09-21 14:13:20 UTC");
    }
}
