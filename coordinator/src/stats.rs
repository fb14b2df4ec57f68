//! The contribution table for `barnraise stats`: read from a running
//! coordinator's HTTP API or from a stopped one's ledger, printed as text.
//! The HTTP read is a plain HTTP/1.0 GET over a TCP socket: one request to
//! a local API does not need an HTTP client library.

use crate::ledger::{ContributorRow, Ledger, LedgerError};
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
    let request = format!(
        "GET /api/v1/contributors HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
    );
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
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| StatsError::Body {
            url: url.into(),
            reason: "no HTTP header".into(),
        })?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(StatsError::Status {
            url: url.into(),
            status: status.to_string(),
        });
    }
    serde_json::from_str(body).map_err(|e| StatsError::Body {
        url: url.into(),
        reason: e.to_string(),
    })
}

/// Reads the contributors from a stopped coordinator's data dir.
pub fn read_contributors(data_dir: &Path) -> Result<Vec<ContributorRow>, StatsError> {
    let ledger = Ledger::open_existing(&crate::service::ledger_path(data_dir))?;
    Ok(ledger.contributors()?)
}

fn human(n: f64) -> String {
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

/// The table as text, one node per line, most credit first.
pub fn render_contributors(rows: &[ContributorRow]) -> String {
    let total_credit: f64 = rows.iter().map(|r| r.credit).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12}  {:<16}  {:>9}  {:>8}  {:>8}  {:>7}  {:>9}  {:>9}  {:>10}  {:>6}",
        "node",
        "org",
        "tokens",
        "accepted",
        "rejected",
        "missing",
        "bytes",
        "compute",
        "credit",
        "share"
    );
    for r in rows {
        let share = if total_credit > 0.0 {
            100.0 * r.credit / total_credit
        } else {
            0.0
        };
        let org: String = r
            .org_name
            .clone()
            .unwrap_or_else(|| "-".into())
            .chars()
            .take(16)
            .collect();
        let _ = writeln!(
            out,
            "{:<12}  {:<16}  {:>9}  {:>8}  {:>8}  {:>7}  {:>9}  {:>8.1}s  {:>9}F  {:>5.1}%",
            r.node.get(..12).unwrap_or(&r.node),
            org,
            human(r.tokens as f64),
            r.accepted,
            r.rejected,
            r.missing,
            human(r.bytes as f64) + "B",
            r.compute_ms as f64 / 1000.0,
            human(r.credit),
            share
        );
    }
    if rows.is_empty() {
        out.push_str("(no closed rounds yet)\n");
    }
    out
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
            accepted: 3,
            rejected: 1,
            missing: 0,
            bytes: 2_000_000,
            compute_ms: 1500,
            credit,
        };
        let text = render_contributors(&[row("a", 3e12), row("b", 1e12)]);
        assert!(text.contains("aaaaaaaaaaaa"), "{text}");
        assert!(text.contains("75.0%") && text.contains("25.0%"), "{text}");
        assert!(
            text.contains("12.3k") && text.contains("2.0MB") && text.contains("3.0TF"),
            "{text}"
        );
        assert!(render_contributors(&[]).contains("no closed rounds"));
    }
}
