//! Daemon logs on stderr (the journal under systemd): `--log-format text`
//! for people, `json` (one object per line) for a log collector;
//! `--log-level` (or `$ZTMESH_LOG`) is a tracing filter, `info` by default:
//! a level (`debug`), or per module (`info,ztmesh_node::tunnel=trace`).

use clap::{Args, ValueEnum};
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

/// `--log-level` and `--log-format` (every binary; only daemons log).
#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log filter of the daemons: a level (error, warn, info, debug, trace;
    /// the node's per-packet events are at trace) or per module
    /// (`info,ztmesh_node::nat=debug`).
    #[arg(long, global = true, env = "ZTMESH_LOG", default_value = "info")]
    pub log_level: String,
    /// Log lines as text, or as JSON objects for a log collector.
    #[arg(
        long,
        global = true,
        env = "ZTMESH_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber these flags describe.
    ///
    /// # Errors
    /// See [`init`].
    pub fn init(&self) -> Result<(), String> {
        init(self.log_format, &self.log_level)
    }
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
