//! Daemon logs on stderr (the journal under systemd): `--log-format text`
//! for people, `json` (one object per line) for a log collector;
//! `--log-level` (or `$ZTMESH_LOG`) is a tracing filter, `info` by default:
//! a level (`debug`), or per module (`info,ztmesh_node::tunnel=trace`).

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, target, fields.
    Json,
}

/// Installs the global subscriber.
///
/// # Errors
/// A filter that does not parse, with the reason.
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::builder()
        .parse(filter)
        .map_err(|e| format!("--log-level {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    result.map_err(|e| format!("installing the logger: {e}"))
}
