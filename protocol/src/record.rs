//! Names of the run record's files (docs/protocol.md, "The run record"),
//! shared by the coordinator that writes a record and the audit that reads it.

/// The record format written and read by this code.
pub const RECORD_FORMAT: &str = "barnraise-record/2";

/// Largest record file a reader takes (a manifest's cap, with room for the
/// ledger totals of a large run).
pub const MAX_RECORD_FILE: u64 = 64 << 20;

/// Reads a record file of at most [`MAX_RECORD_FILE`] bytes: a record comes
/// from anywhere, so a huge file is refused without being read whole.
pub fn read_capped(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_RECORD_FILE {
        return Err(format!("larger than {MAX_RECORD_FILE} bytes"));
    }
    Ok(bytes)
}

/// The path, inside a record, of round `round`'s plan (`kind = "plans"`) or
/// manifest (`kind = "manifests"`).
pub fn round_file(kind: &str, round: u64) -> String {
    let ext = if kind == "plans" { "plan" } else { "manifest" };
    format!("{kind}/round-{round:06}.{ext}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_files_sort_by_round() {
        assert_eq!(super::round_file("plans", 7), "plans/round-000007.plan");
        assert_eq!(
            super::round_file("manifests", 123_456),
            "manifests/round-123456.manifest"
        );
        assert!(super::round_file("manifests", 9) < super::round_file("manifests", 10));
    }
}
