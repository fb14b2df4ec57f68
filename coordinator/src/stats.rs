//! The contribution table for `barnraise stats`: read from a running
//! coordinator's HTTP API or from a stopped one's ledger, by node or rolled
//! up by org, printed as a text table, JSON or CSV (RFC 4180).
//! The HTTP read is a plain HTTP/1.0 GET over a TCP socket: one request to
//! a local API does not need an HTTP client library.

use crate::ledger::{ContributorRow, Ledger, LedgerError, OrgRow, Tally, roll_up_orgs};
use std::borrow::Cow;
use std::fmt::Write;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("coordinator URL `{0}` is not of the form http://HOST:PORT")]
    Url(String),
    #[error("cannot reach the coordinator at {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("the coordinator at {url} answered {status}")]
    Status { url: String, status: String },
    #[error("the coordinator at {url} sent an unreadable answer: {reason}")]
    Body { url: String, reason: String },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The largest API answer read (a table of a very large run still fits).
const MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// Reads the contributors from a running coordinator's `/api/v1/contributors`.
pub async fn fetch_contributors(url: &str) -> Result<Vec<ContributorRow>, StatsError> {
    fetch_json(url, "/api/v1/contributors").await
}

/// GETs `path` from the coordinator at `url` and parses the JSON answer.
pub async fn fetch_json<T: serde::de::DeserializeOwned>(
    url: &str,
    path: &str,
) -> Result<T, StatsError> {
    let body = fetch_bytes(url, path).await?;
    serde_json::from_slice(&body).map_err(|e| StatsError::Body {
        url: url.into(),
        reason: e.to_string(),
    })
}

/// GETs `path` from the coordinator at `url`: the body of a 200 answer (at
/// most 64 MiB).
pub async fn fetch_bytes(url: &str, path: &str) -> Result<Vec<u8>, StatsError> {
    let rest = url
        .trim()
        .strip_prefix("http://")
        .ok_or_else(|| StatsError::Url(url.into()))?;
    let host = rest
        .split('/')
        .next()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| StatsError::Url(url.into()))?;
    let connect = |source| StatsError::Connect {
        url: url.into(),
        source,
    };
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(connect)?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(connect)?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut response)
        .await
        .map_err(connect)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| StatsError::Body {
            url: url.into(),
            reason: "no HTTP header".into(),
        })?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(StatsError::Status {
            url: url.into(),
            status: status.to_string(),
        });
    }
    Ok(response[split + 4..].to_vec())
}

/// Reads the contributors from a stopped coordinator's data dir.
pub fn read_contributors(data_dir: &Path) -> Result<Vec<ContributorRow>, StatsError> {
    let ledger = Ledger::open_existing(&crate::ledger::ledger_path(data_dir))?;
    Ok(ledger.contributors()?)
}

/// A count with a k/M/G/... suffix (3 significant digits or so).
pub fn human(n: f64) -> String {
    const UNITS: [&str; 7] = ["", "k", "M", "G", "T", "P", "E"];
    let mut v = n;
    let mut unit = 0;
    while v.abs() >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

/// The header of the columns both tables end with.
fn tally_header() -> String {
    format!(
        "{:>9}  {:>8}  {:>8}  {:>7}  {:>4}  {:>9}  {:>9}  {:>10}  {:>6}",
        "tokens", "accepted", "rejected", "missing", "late", "bytes", "compute", "credit", "share"
    )
}

/// A row's shared columns, under [`tally_header`].
fn tally_columns(t: Tally<'_>, total_credit: f64) -> String {
    let share = if total_credit > 0.0 {
        100.0 * t.credit / total_credit
    } else {
        0.0
    };
    format!(
        "{:>9}  {:>8}  {:>8}  {:>7}  {:>4}  {:>9}  {:>8.1}s  {:>9}F  {:>5.1}%",
        human(t.tokens as f64),
        t.accepted,
        t.rejected,
        t.missing,
        t.late,
        human(t.bytes as f64) + "B",
        t.compute_ms as f64 / 1000.0,
        human(t.credit),
        share
    )
}

/// `(leading columns, tally)` lines under `header` and [`tally_header`].
fn render_table<'a>(header: &str, lines: impl Iterator<Item = (String, Tally<'a>)>) -> String {
    let lines: Vec<(String, Tally<'a>)> = lines.collect();
    let total_credit: f64 = lines.iter().map(|(_, t)| t.credit).sum();
    let mut out = format!("{header}  {}\n", tally_header());
    for (lead, tally) in &lines {
        let _ = writeln!(out, "{lead}  {}", tally_columns(*tally, total_credit));
    }
    if lines.is_empty() {
        out.push_str("(no closed rounds yet)\n");
    }
    out
}

fn clip(text: &str, width: usize) -> String {
    text.chars().take(width).collect()
}

/// The table as text, one node per line, most credit first.
pub fn render_contributors(rows: &[ContributorRow]) -> String {
    render_table(
        &format!("{:<12}  {:<16}", "node", "org"),
        rows.iter().map(|r| {
            let lead = format!(
                "{:<12}  {:<16}",
                clip(&r.node, 12),
                clip(r.org_name.as_deref().unwrap_or("-"), 16)
            );
            (lead, r.tally())
        }),
    )
}

/// The org table as text, one org per line, most credit first.
pub fn render_orgs(rows: &[OrgRow]) -> String {
    render_table(
        &format!("{:<24}  {:<12}  {:>5}", "org", "key", "nodes"),
        rows.iter().map(|r| {
            let name = match (&r.org, &r.org_name) {
                (None, _) => "(independent)",
                (Some(_), Some(name)) => name.as_str(),
                (Some(_), None) => "-",
            };
            let key = r.org.as_deref().map_or("-".into(), |k| clip(k, 12));
            let lead = format!("{:<24}  {:<12}  {:>5}", clip(name, 24), key, r.nodes);
            (lead, r.tally())
        }),
    )
}

/// How `barnraise stats` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

/// What one line of the output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum By {
    Node,
    Org,
}

/// The contributors as `format`, one line per node or per org.
pub fn render(
    rows: &[ContributorRow],
    by: By,
    format: Format,
) -> Result<String, serde_json::Error> {
    Ok(match (by, format) {
        (By::Node, Format::Table) => render_contributors(rows),
        (By::Org, Format::Table) => render_orgs(&roll_up_orgs(rows)),
        (By::Node, Format::Json) => serde_json::to_string_pretty(rows)? + "\n",
        (By::Org, Format::Json) => serde_json::to_string_pretty(&roll_up_orgs(rows))? + "\n",
        (By::Node, Format::Csv) => to_csv(rows, &node_columns())?,
        (By::Org, Format::Csv) => to_csv(&roll_up_orgs(rows), &org_columns())?,
    })
}

/// The CSV columns both outputs end with: the [`Tally`] fields.
const TALLY_COLUMNS: [&str; 11] = [
    "tokens",
    "voided_tokens",
    "claimed_tokens",
    "accepted",
    "rejected",
    "missing",
    "late",
    "bytes",
    "compute_ms",
    "credit",
    "rejections",
];

/// The CSV columns of `--by node`: [`ContributorRow`]'s fields.
pub fn node_columns() -> Vec<&'static str> {
    [["node", "org", "org_name"].as_slice(), &TALLY_COLUMNS].concat()
}

/// The CSV columns of `--by org`: [`OrgRow`]'s fields.
pub fn org_columns() -> Vec<&'static str> {
    [["org", "org_name", "nodes"].as_slice(), &TALLY_COLUMNS].concat()
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote, a line
/// break or edge spaces, with quotes doubled.
pub fn csv_field(text: &str) -> Cow<'_, str> {
    let needs_quotes =
        text.contains([',', '"', '\r', '\n']) || text.starts_with(' ') || text.ends_with(' ');
    if needs_quotes {
        Cow::Owned(format!("\"{}\"", text.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(text)
    }
}

/// A JSON value as CSV text: null is empty, numbers as JSON writes them (the
/// shortest text that reads back to the same value), a map of counts (the
/// rejections) as `reason=count;reason=count`.
fn csv_text(value: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(map)) => {
            let parts: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}={}", csv_text(Some(v))))
                .collect();
            parts.join(";")
        }
        Some(other) => other.to_string(),
    }
}

/// Rows as CSV with a header line, taking `columns` by field name; lines end
/// in CRLF as RFC 4180 says.
pub fn to_csv<T: serde::Serialize>(
    rows: &[T],
    columns: &[&str],
) -> Result<String, serde_json::Error> {
    let mut out = String::new();
    let mut line = |fields: Vec<String>| {
        let quoted: Vec<Cow<'_, str>> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&quoted.join(","));
        out.push_str("\r\n");
    };
    line(columns.iter().map(|c| c.to_string()).collect());
    for row in rows {
        let value = serde_json::to_value(row)?;
        line(columns.iter().map(|c| csv_text(value.get(*c))).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_every_node_with_shares() {
        let row = |node: &str, credit| ContributorRow {
            node: node.repeat(64),
            org: None,
            org_name: Some("Lab".into()),
            tokens: 12_345,
            voided_tokens: 0,
            claimed_tokens: 13_000,
            accepted: 3,
            rejected: 1,
            missing: 0,
            bytes: 2_000_000,
            compute_ms: 1500,
            credit,
            late: 0,
            rejections: [("norm-too-large".to_string(), 1)].into(),
        };
        let text = render_contributors(&[row("a", 3e12), row("b", 1e12)]);
        assert!(text.contains("aaaaaaaaaaaa"), "{text}");
        assert!(text.contains("75.0%") && text.contains("25.0%"), "{text}");
        assert!(
            text.contains("12.3k") && text.contains("2.0MB") && text.contains("3.0TF"),
            "{text}"
        );
        assert!(render_contributors(&[]).contains("no closed rounds"));
        let orgs = render_orgs(&roll_up_orgs(&[row("a", 3e12), row("b", 1e12)]));
        assert!(
            orgs.contains("(independent)") && orgs.contains("100.0%"),
            "{orgs}"
        );
    }

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" edge"), "\" edge\"");
        assert_eq!(csv_field(""), "");
    }
}
