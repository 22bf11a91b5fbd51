//! Arguments shared by several subcommands: the connection to the controller,
//! the output format, the listener limits of `serve`, and duration parsing.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

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

pub use ztmesh_proto::ops::{Output, OutputArg};

/// Single sign-on at an OpenID provider (`serve`).
#[derive(Args, Debug, Clone)]
pub struct OidcArgs {
    /// The provider's issuer URL (https); enables "Sign in with SSO". Needs
    /// --public-url (the callback is PUBLIC_URL/oidc/callback).
    #[arg(long, requires_all = ["oidc_client_id", "public_url"])]
    pub oidc_issuer: Option<String>,
    /// This controller's client ID at the provider.
    #[arg(long)]
    pub oidc_client_id: Option<String>,
    /// A file holding the client secret (a confidential client); without
    /// it, a public client with PKCE.
    #[arg(long)]
    pub oidc_client_secret_file: Option<PathBuf>,
    /// Email domains that may sign in (comma-separated; default any). A
    /// first sign-in from one of them creates the user as a member; without
    /// this list an admin creates users first.
    #[arg(long, value_delimiter = ',')]
    pub oidc_allowed_domains: Vec<String>,
    /// Groups (the token's `groups` claim) that may sign in (default any).
    #[arg(long, value_delimiter = ',')]
    pub oidc_allowed_groups: Vec<String>,
    /// Require a second factor: the token's `amr` must contain one of
    /// these methods (e.g. mfa,otp,hwk).
    #[arg(long, value_delimiter = ',')]
    pub oidc_required_amr: Vec<String>,
    /// Require this `acr` (also requested with acr_values).
    #[arg(long)]
    pub oidc_required_acr: Option<String>,
    /// An extra CA (PEM) trusted for the provider, besides the system's.
    #[arg(long)]
    pub oidc_ca_file: Option<PathBuf>,
}

impl OidcArgs {
    /// The provider configuration, if SSO is enabled.
    ///
    /// # Errors
    /// An unreadable or empty secret file.
    pub fn config(
        &self,
        public_url: Option<&str>,
    ) -> anyhow::Result<Option<crate::oidc::OidcConfig>> {
        let (Some(issuer), Some(client_id), Some(base)) =
            (&self.oidc_issuer, &self.oidc_client_id, public_url)
        else {
            return Ok(None);
        };
        let mut cfg =
            crate::oidc::OidcConfig::new(issuer, client_id, &format!("{base}/oidc/callback"));
        if let Some(path) = &self.oidc_client_secret_file {
            let secret = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("--oidc-client-secret-file {}: {e}", path.display())
            })?;
            let secret = secret.trim();
            if secret.is_empty() {
                anyhow::bail!("--oidc-client-secret-file {} is empty", path.display());
            }
            cfg.client_secret = Some(secret.to_string());
        }
        cfg.allowed_domains = self.oidc_allowed_domains.clone();
        cfg.allowed_groups = self.oidc_allowed_groups.clone();
        cfg.required_amr = self.oidc_required_amr.clone();
        cfg.required_acr = self.oidc_required_acr.clone();
        cfg.ca_file = self.oidc_ca_file.clone();
        Ok(Some(cfg))
    }
}

/// The detectors and the response to what they find (`serve`); see
/// `crate::detect`. Evidence is what receivers report; every detector needs
/// `--detect-min-reporters` distinct receivers, each counted up to
/// threshold / min-reporters.
#[derive(Args, Debug, Clone)]
pub struct DetectArgs {
    /// off, dry-run (record what would be done, change nothing) or enforce.
    #[arg(long = "detect", default_value = "enforce", value_name = "MODE")]
    pub detect_mode: crate::detect::Mode,
    /// What a finding does: quarantine (and alert), or alert only.
    #[arg(long, default_value = "quarantine")]
    pub detect_response: crate::detect::Response,
    /// The sliding window of the burst and handshake detectors.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    pub detect_window: Duration,
    /// The sliding window of the scan detectors (long: a scan paced one
    /// receiver at a time still shows on several).
    #[arg(long, default_value = "10m", value_parser = parse_positive_duration)]
    pub detect_scan_window: Duration,
    /// Distinct reporting principals every detector needs (at least 2): a
    /// user's nodes are one principal, a tagged node is its own.
    #[arg(long, default_value_t = 2)]
    pub detect_min_reporters: usize,
    /// Scanning: distinct (principal, protocol, port) a node was refused on.
    #[arg(long, default_value_t = 40)]
    pub detect_scan_ports: u64,
    /// Scanning: distinct principals that refused a node.
    #[arg(long, default_value_t = 8)]
    pub detect_scan_peers: u64,
    /// A burst: denied flows from a node (one per flow and report, about a
    /// second), summed over principals.
    #[arg(long, default_value_t = 1_000)]
    pub detect_burst_flows: u64,
    /// Handshake failures: distinct principals that got verified handshakes
    /// from a node they do not list as a peer…
    #[arg(long, default_value_t = 4)]
    pub detect_handshake_peers: u64,
    /// …at least this many each.
    #[arg(long, default_value_t = 3)]
    pub detect_handshake_min: u64,
    /// Never act on nodes with this tag, e.g. tag:scanner for a sanctioned
    /// vulnerability scanner (repeatable; findings are still recorded).
    #[arg(long = "detect-exempt-tag", value_name = "TAG")]
    pub detect_exempt_tags: Vec<String>,
    /// At most this many nodes quarantined at once; beyond it findings
    /// only alert.
    #[arg(long, default_value_t = 3)]
    pub max_quarantined: usize,
    /// POST each alert (JSON, HMAC-signed) to this URL.
    #[arg(long, requires = "alert_webhook_secret_file")]
    pub alert_webhook: Option<String>,
    /// The webhook's HMAC key: a file readable by its owner only (0600).
    #[arg(long, requires = "alert_webhook")]
    pub alert_webhook_secret_file: Option<PathBuf>,
    /// An extra CA (PEM) trusted for an https webhook, besides the system's.
    #[arg(long, requires = "alert_webhook")]
    pub alert_webhook_ca_file: Option<PathBuf>,
}

impl DetectArgs {
    /// The detector configuration.
    ///
    /// # Errors
    /// Thresholds one reporter could reach alone; a bad tag.
    pub fn config(&self) -> anyhow::Result<crate::detect::DetectConfig> {
        for t in &self.detect_exempt_tags {
            crate::mesh::validate_tag(t)
                .map_err(|e| anyhow::anyhow!("--detect-exempt-tag {t}: {e}"))?;
        }
        let cfg = crate::detect::DetectConfig {
            mode: self.detect_mode,
            response: self.detect_response,
            window_ms: i64::try_from(self.detect_window.as_millis()).unwrap_or(i64::MAX),
            scan_window_ms: i64::try_from(self.detect_scan_window.as_millis()).unwrap_or(i64::MAX),
            min_reporters: self.detect_min_reporters,
            scan_ports: self.detect_scan_ports,
            scan_peers: self.detect_scan_peers,
            burst_flows: self.detect_burst_flows,
            handshake_peers: self.detect_handshake_peers,
            handshake_min: self.detect_handshake_min,
            exempt_tags: self.detect_exempt_tags.clone(),
            max_quarantined: self.max_quarantined,
        };
        cfg.validate().map_err(anyhow::Error::msg)?;
        Ok(cfg)
    }

    /// The webhook, if one is configured.
    ///
    /// # Errors
    /// A URL that is not http(s); a secret file that is unreadable, empty,
    /// or readable by others than its owner.
    pub fn webhook(&self) -> anyhow::Result<Option<crate::alert::Webhook>> {
        use std::os::unix::fs::PermissionsExt;
        let (Some(url), Some(path)) = (&self.alert_webhook, &self.alert_webhook_secret_file) else {
            return Ok(None);
        };
        let url: reqwest::Url = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--alert-webhook {url}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--alert-webhook {url}: expected an http or https URL");
        }
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("--alert-webhook-secret-file {shown}: {e}"))?;
        if meta.permissions().mode() & 0o077 != 0 {
            anyhow::bail!(
                "--alert-webhook-secret-file {shown}: readable by others (mode {:o}); chmod 600 it",
                meta.permissions().mode() & 0o777
            );
        }
        let secret = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--alert-webhook-secret-file {shown}: {e}"))?;
        let secret = secret.trim();
        if secret.len() < 16 {
            anyhow::bail!("--alert-webhook-secret-file {shown}: at least 16 characters");
        }
        Ok(Some(crate::alert::Webhook {
            url,
            secret: secret.as_bytes().to_vec(),
            ca_file: self.alert_webhook_ca_file.clone(),
        }))
    }
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
