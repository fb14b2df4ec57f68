//! One module per subcommand, plus the logging setup they share.

pub mod audit;
pub mod bench_attacks;
pub mod bench_codec;
pub mod bench_coordinator;
pub mod bench_diloco;
pub mod bench_overlap;
pub mod bench_train;
pub mod coordinator;
pub mod export;
pub mod generate;
pub mod id;
pub mod node;
pub mod org;
pub mod progress;
pub mod shard;
pub mod stats;
pub mod up;

use anyhow::Context;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Logs go to stderr so stdout stays clean for `--json` output.
pub fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid log filter `{filter}`"))?;
    use std::io::IsTerminal;
    let colour = use_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("could not set up logging: {e}"))
}

/// Colour codes only on a terminal, and never with `NO_COLOR` set to
/// anything (no-color.org): a log redirected to a file or to journald
/// carries plain text.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// The default data directory: `$BARNRAISE_HOME`, else `~/.barnraise`.
pub fn default_home() -> std::path::PathBuf {
    if let Some(home) = std::env::var_os("BARNRAISE_HOME") {
        return home.into();
    }
    let base = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| ".".into());
    base.join(".barnraise")
}

#[cfg(test)]
mod tests {
    use super::use_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(
            !use_colour(false, None),
            "a file or journald gets plain text"
        );
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(
            use_colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
    }
}
