//! Names of the run record's files (docs/protocol.md, "The run record"),
//! shared by the coordinator that writes a record and the audit that reads it.

/// The record format written and read by this code.
pub const RECORD_FORMAT: &str = "barnraise-record/2";

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
