//! Arguments shared by several subcommands: the connection to the controller,
//! the output format, the listener limits of `serve`, and duration parsing.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Controller data dir (its admin socket is used unless --server is given).
    #[arg(
        long,
        global = true,
        default_value = "./ztmesh-data",
        env = "ZTMESH_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Remote controller, e.g. https://198.18.0.1:8443 (needs --api-key and --fingerprint).
    #[arg(long, global = true, env = "ZTMESH_SERVER")]
    pub server: Option<String>,
    /// API key for --server.
    #[arg(long, global = true, env = "ZTMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// SHA-256 fingerprint of the controller's TLS certificate, for --server.
    #[arg(long, global = true, env = "ZTMESH_FINGERPRINT")]
    pub fingerprint: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Limits of the TLS listener against hostile clients (`serve`).
#[derive(Args, Debug, Clone)]
pub struct ListenerArgs {
    /// Close connections that have not completed TLS and begun HTTP/2 by then.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,
    /// Open connections, all sources together (raise `ulimit -n` to match).
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// Open connections per source address (IPv4 address or IPv6 /64); a
    /// NAT with more nodes behind it needs a higher value.
    #[arg(long, default_value_t = 512)]
    pub max_connections_per_source: usize,
    /// Concurrent HTTP/2 streams per connection (a node uses at most 3).
    #[arg(long, default_value_t = 32)]
    pub max_streams_per_connection: u32,
    /// Deadline of a unary call (the netmap stream is not timed once open).
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub request_timeout: Duration,
}

impl ListenerArgs {
    /// The limits, each at least 1 (a cap of 0 would refuse everyone).
    pub fn limits(&self) -> crate::server::ListenerLimits {
        crate::server::ListenerLimits {
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections.max(1),
            max_connections_per_source: self.max_connections_per_source.max(1),
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            request_timeout: self.request_timeout,
        }
    }
}

/// Like [`parse_duration`], refusing zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {s:?} must be positive")),
        d => Ok(d),
    }
}

/// Parses `90s`, `10m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 90s, 10m, 1h, 7d"))?;
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
