//! Admin CLI: clap definitions and a short dispatch to one module per
//! subcommand group; the commands talk to a running controller (local unix
//! socket, or `--server URL --api-key K --fingerprint FP`), except the offline
//! `fingerprint`, `controller-key`, `policy check`, `policy explain
//! --policy`, `audit verify`, `audit export`, `backup keygen` and `restore`.
//!
//! Output contract shared by every group: tables on stdout by default, `-o
//! json` for scripts, errors as one line on stderr (printed by `main`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::server::DataDir;

mod args;
mod audit;
mod backup;
mod client;
mod flows;
mod keys;
mod nodes;
mod output;
mod policy;
mod tls;
mod users;

pub use args::{
    parse_duration, parse_positive_duration, ConnArgs, DetectArgs, ListenerArgs, OidcArgs, Output,
    OutputArg,
};
pub use audit::{AuditCmd, ExportFormat};
pub use backup::{BackupArgs, BackupCmd, RestoreArgs};
pub use client::{connect, Auth, Client};
pub use flows::FlowsArgs;
pub use keys::{ApiKeysCmd, KeysCmd};
pub use nodes::NodesCmd;
pub use policy::{split_dst, PolicyCmd};
pub use tls::TlsCmd;
pub use users::UsersCmd;

#[derive(Parser, Debug)]
#[command(
    name = "ztmesh-controller",
    version = ztmesh_proto::version_line!(),
    about = "ztmesh controller and admin CLI"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Where `serve` reads its config file when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/ztmesh/controller.toml";

/// The config file and the logs (every subcommand).
#[derive(clap::Args, Debug, Clone)]
pub struct OpsArgs {
    /// Config file: `serve`'s long flags as TOML keys (`listen =
    /// "[::]:8443"`). Flags given here win over the file, the file over
    /// environment variables. Default: $ZTMESH_CONTROLLER_CONFIG, else
    /// /etc/ztmesh/controller.toml if it exists; "" for none.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub log: ztmesh_proto::ops::logging::LogArgs,
}

#[derive(Subcommand, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; `serve` simply has many flags"
)]
pub enum Cmd {
    /// Run the controller.
    Serve(ServeArgs),
    #[command(flatten)]
    Ops(ztmesh_proto::ops::OpsCmd),
    /// Print the controller's TLS fingerprint, which nodes pin (offline).
    Fingerprint,
    /// Print the controller's netmap signing key (public half), which
    /// relays verify netmaps with: `ztmesh-relay --controller-key-file`
    /// (offline).
    ControllerKey,
    /// Manage users: built-in accounts, roles, MFA, key expiry.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Manage auth keys, which enroll nodes.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// List, rename, expire, delete, quarantine and approve nodes.
    #[command(subcommand)]
    Nodes(NodesCmd),
    /// Check, show, plan, apply and explain the ACL policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Manage API keys for remote admin (`--server`).
    #[command(subcommand)]
    Apikeys(ApiKeysCmd),
    /// Rotate the controller's TLS certificate: rotate (stage), switch, status.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// Show the audit log, newest first; `audit verify` checks its hash
    /// chain and `audit export` prints it for a SIEM (both offline).
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        filter: audit::AuditFilterArgs,
        #[command(flatten)]
        output: OutputArg,
        #[command(subcommand)]
        action: Option<AuditCmd>,
    },
    /// Show the flow log, newest first: flows nodes reported, allowed ones
    /// with the policy rule that admitted them (FILE:LINE), denied ones with
    /// the reason. Each record is one report window (about 5 s) of one flow
    /// at its receiver, summed over source ports.
    Flows(FlowsArgs),
    /// Show what the detectors found, newest first: the node, the detectors
    /// that fired, the evidence (which receivers saw what) and what was
    /// done (quarantine, alert, dry-run, exempt) with the alert's state.
    Detections {
        /// At most this many (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only detections older than this id (to page back).
        #[arg(long)]
        before_id: Option<u64>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Back up the running controller into an encrypted FILE: its signing
    /// key, TLS identity and (SQLite) database, copied consistently while
    /// it serves and encrypted by the controller (admin role only);
    /// `backup keygen` makes a recipient key pair (offline).
    Backup(BackupArgs),
    /// Restore an encrypted backup into --data-dir with the controller
    /// stopped (offline): everything is verified before any file is
    /// replaced; an existing controller's files need --force and are
    /// moved aside, not deleted.
    Restore(RestoreArgs),
}

/// `serve`'s flags (every one is also a key of the config file).
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address for gRPC over TLS (nodes and remote admin).
    #[arg(long, default_value = "[::]:8443")]
    pub listen: std::net::SocketAddr,
    /// Delete ephemeral nodes after they have been offline this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub ephemeral_timeout: Duration,
    /// Key lifetime of a user's node, from enrollment or its owner's
    /// last sign-in ("0s" = never expire); `users update --key-expiry`
    /// overrides it per user.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub node_key_expiry: Duration,
    /// Key lifetime of a node owned by tags (a server); "0s" exempts
    /// tagged nodes from expiry.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub tagged_node_key_expiry: Duration,
    /// A key lifetime for nodes with one tag, e.g. `tag:server=0s`
    /// (never) or `tag:ci=1d` (repeatable; a node with several such tags
    /// takes the shortest).
    #[arg(long = "tag-key-expiry", value_name = "TAG=DURATION", value_parser = parse_tag_expiry)]
    pub tag_key_expiry: Vec<(String, Duration)>,
    /// The base URL of the sign-in pages that interactive logins print
    /// (e.g. https://ztmesh.example.com:8443); default: the address
    /// the node reached the controller by.
    #[arg(long, value_parser = parse_public_url)]
    pub public_url: Option<String>,
    /// The URL of every controller serving this mesh's database, as nodes
    /// reach them (repeatable, or comma-separated), e.g.
    /// `https://[fd00::1]:8443,https://[fd00::2]:8443`: each netmap lists
    /// them, and a node whose controller stops answering moves to
    /// another. Default: none (nodes stay with the URL they enrolled at).
    #[arg(long = "controller-url", value_name = "URL", value_delimiter = ',',
          value_parser = parse_public_url)]
    pub controller_urls: Vec<String>,
    /// A web console session unused this long is signed out (sessions
    /// end after 12 h regardless).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub web_session_idle: Duration,
    /// Lifetime of a signed netmap; connected nodes get a fresh one at half-life.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    pub netmap_ttl: Duration,
    /// How long a node's device-posture report is believed (at least
    /// 6s); nodes report every third of it. A node silent for longer
    /// fails every posture check until it reports again.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub posture_ttl: Duration,
    /// Prune audit records older than this ("0s" = keep forever).
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    pub audit_max_age: Duration,
    /// Keep at most this many node-reported flow records (newest first; 0 = no cap).
    #[arg(long, default_value_t = 1_000_000)]
    pub audit_max_flow_rows: u64,
    /// Prune flow-log records (`flows`) older than this ("0s" = keep forever).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub flow_max_age: Duration,
    /// Keep at most this many flow-log records (newest first; 0 = no cap).
    #[arg(long, default_value_t = 1_000_000)]
    pub flow_max_rows: u64,
    /// Keep at most this many flow-log records of one node (0 = no cap).
    #[arg(long, default_value_t = 100_000)]
    pub flow_max_rows_per_node: u64,
    /// Relays every netmap lists: one `ztmesh-relay identity` JSON line per
    /// relay (read at start).
    #[arg(long)]
    pub relay_file: Option<std::path::PathBuf>,
    /// The mesh DNS domain: every node is NAME.DOMAIN in MagicDNS. Must
    /// not be a domain the company already uses (names under it never
    /// leave the mesh).
    #[arg(long, default_value = "ztmesh.internal", value_parser = parse_dns_domain)]
    pub dns_domain: String,
    /// A certificate (PEM, leaf first) for the listener instead of the
    /// self-signed one, e.g. one browsers trust for the sign-in pages;
    /// installed into the data dir. Nodes pin its fingerprint.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub oidc: OidcArgs,
    #[command(flatten)]
    pub limits: ListenerArgs,
    #[command(flatten)]
    pub detect: DetectArgs,
    /// Serve OpenMetrics on plain HTTP at `GET /metrics` on this
    /// address (off without the flag; the flag alone listens on
    /// 127.0.0.1:9464). No authentication: keep it on loopback or a
    /// monitoring network.
    #[arg(long, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = crate::server::DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Keep the state in PostgreSQL instead of SQLite in the data dir:
    /// `postgres://USER@HOST/DB?sslmode=verify-full&sslrootcert=CA.pem`
    /// (`&sslcert=…&sslkey=…` for a client certificate), or a unix
    /// socket: `postgres://USER@/DB?host=/run/postgresql`. The signing
    /// key and TLS identity stay files in the data dir. Prefer the
    /// environment variable when the URL holds a password.
    #[arg(long, env = "ZTMESH_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
}

/// The keys the packaged config file sets (the systemd unit's state
/// directory); every other key is documented there, commented out.
pub const PACKAGED_CONFIG: &[(&str, &str)] = &[("data-dir", "\"/var/lib/ztmesh-controller\"")];

/// The head of the packaged config file.
pub const CONFIG_HEADER: &str = "\
ztmesh controller: the settings of `ztmesh-controller serve`.

Every key is a long flag of `ztmesh-controller serve --help`, without the
dashes. A flag on the command line wins over this file, and this file over
environment variables. Check it with `ztmesh-controller config check`, then
`systemctl restart ztmesh-controller`. The admin commands (`nodes list`...)
read `data-dir` from here too.";

/// `tag:NAME=DURATION`.
fn parse_tag_expiry(s: &str) -> Result<(String, Duration), String> {
    let (tag, d) = s
        .split_once('=')
        .ok_or("expected tag:NAME=DURATION, e.g. tag:server=0s")?;
    crate::mesh::validate_tag(tag).map_err(|e| e.to_string())?;
    Ok((tag.to_string(), parse_duration(d)?))
}

/// An https URL without path, query or credentials (the pages' base).
fn parse_public_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("https://")
        .ok_or("must start with https://")?
        .trim_end_matches('/');
    if rest.is_empty()
        || rest.len() > 253
        || !rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
    {
        return Err("expected https://HOST[:PORT] (no path, query or credentials)".into());
    }
    Ok(format!("https://{rest}"))
}

/// Runs an admin command (everything except `serve`).
///
/// Offline commands run first and never contact the controller; the others
/// connect once and hand the client to their group's module.
///
/// # Errors
///
/// The first failure: the controller unreachable, a refused call (its status
/// message), or a local file that cannot be read or parsed.
pub async fn run(conn: &ConnArgs, cmd: Cmd) -> anyhow::Result<()> {
    match &cmd {
        Cmd::Policy(p) if p.is_offline() => return policy::run_offline(p),
        Cmd::Fingerprint => return fingerprint(&conn.data_dir),
        Cmd::ControllerKey => return controller_key(&conn.data_dir),
        Cmd::Audit {
            action: Some(a), ..
        } => return audit::run_offline(&conn.data_dir, a),
        Cmd::Backup(BackupArgs {
            action: Some(BackupCmd::Keygen { out }),
            ..
        }) => return backup::keygen(out),
        Cmd::Restore(r) => return backup::restore(&conn.data_dir, r),
        _ => {}
    }
    let mut c = connect(conn).await?;
    match cmd {
        Cmd::Serve(_) => unreachable!("handled by the caller"),
        Cmd::Fingerprint | Cmd::ControllerKey | Cmd::Restore(_) => {
            unreachable!("handled offline")
        }
        Cmd::Backup(b) => backup::run(&mut c, b).await,
        Cmd::Ops(_) => unreachable!("handled by main"),
        Cmd::Users(u) => users::run(&mut c, u).await,
        Cmd::Keys(k) => keys::run(&mut c, k).await,
        Cmd::Nodes(n) => nodes::run(&mut c, n).await,
        Cmd::Policy(p) => policy::run(&mut c, p).await,
        Cmd::Apikeys(a) => keys::run_api(&mut c, a).await,
        Cmd::Tls(t) => tls::run(&mut c, t).await,
        Cmd::Audit {
            limit,
            filter,
            output,
            ..
        } => audit::run(&mut c, limit, filter, output.get()).await,
        Cmd::Flows(args) => flows::run(&mut c, args).await,
        Cmd::Detections {
            limit,
            before_id,
            output,
        } => flows::detections(&mut c, limit, before_id, output.get()).await,
    }
}

/// Prints the public half of the controller's netmap signing key from the
/// data dir (offline; the same value `serve` prints as `controller key:`).
fn controller_key(data_dir: &Path) -> anyhow::Result<()> {
    let dir = DataDir::new(data_dir);
    let path = dir.signing_key();
    let key = ztmesh_proto::keys::SigningKey::load(&path).with_context(|| {
        format!(
            "reading the netmap signing key {} (has `serve` run on this data dir?)",
            path.display()
        )
    })?;
    println!("{}", key.public());
    Ok(())
}

/// Prints the controller's TLS fingerprint from the data dir (offline).
fn fingerprint(data_dir: &Path) -> anyhow::Result<()> {
    let dir = DataDir::new(data_dir);
    let fp = crate::server::fingerprint(&dir)?;
    println!("{}", ztmesh_proto::auth::hex(&fp));
    Ok(())
}

/// A DNS domain for `--dns-domain`: labels of letters, digits and `-`
/// (not at either end), at least two labels, at most 253 characters;
/// lowercased, without a trailing dot.
fn parse_dns_domain(text: &str) -> Result<String, String> {
    let d = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = d.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if d.len() > 253 || labels.len() < 2 || !labels.iter().all(label_ok) {
        return Err(format!(
            "{text:?} is not a DNS domain such as ztmesh.internal (two or more labels of letters, digits and '-')"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod dns_domain_tests {
    use super::parse_dns_domain;

    #[test]
    fn the_mesh_domain_is_a_lowercase_multi_label_name() {
        assert_eq!(parse_dns_domain("Mesh.Example.").unwrap(), "mesh.example");
        assert_eq!(
            parse_dns_domain("ztmesh.internal").unwrap(),
            "ztmesh.internal"
        );
        for bad in [
            "internal",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "",
            &"a.".repeat(130),
        ] {
            assert!(parse_dns_domain(bad).is_err(), "{bad:?}");
        }
    }
}
