//! Admin CLI: clap definitions and the commands that talk to a running
//! controller (local unix socket, or `--server URL --api-key K --fingerprint FP`),
//! plus the offline `policy check` and `policy explain --policy`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use ztmesh_proto::admin::{self as apb, admin_client::AdminClient};

use crate::server::DataDir;

#[derive(Parser, Debug)]
#[command(
    name = "ztmesh-controller",
    version,
    about = "ztmesh controller and admin CLI"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(subcommand)]
    pub cmd: Cmd,
}

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

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the controller.
    Serve {
        /// Address for gRPC over TLS (nodes and remote admin).
        #[arg(long, default_value = "[::]:8443")]
        listen: std::net::SocketAddr,
        /// Delete ephemeral nodes after they have been offline this long.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        ephemeral_timeout: Duration,
        /// Node key lifetime ("0s" = never expire).
        #[arg(long, default_value = "180d", value_parser = parse_duration)]
        node_key_expiry: Duration,
        /// Lifetime of a signed netmap; connected nodes get a fresh one at half-life.
        #[arg(long, default_value = "12h", value_parser = parse_duration)]
        netmap_ttl: Duration,
        /// Prune audit records older than this ("0s" = keep forever).
        #[arg(long, default_value = "90d", value_parser = parse_duration)]
        audit_max_age: Duration,
        /// Keep at most this many node-reported flow records (newest first; 0 = no cap).
        #[arg(long, default_value_t = 1_000_000)]
        audit_max_flow_rows: u64,
        #[command(flatten)]
        limits: ListenerArgs,
    },
    /// Print the controller's TLS fingerprint and netmap key (offline).
    Fingerprint,
    #[command(subcommand)]
    Users(UsersCmd),
    #[command(subcommand)]
    Keys(KeysCmd),
    #[command(subcommand)]
    Nodes(NodesCmd),
    #[command(subcommand)]
    Policy(PolicyCmd),
    #[command(subcommand)]
    Apikeys(ApiKeysCmd),
    /// Show the audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum UsersCmd {
    Create {
        login: String,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a user and every node it owns.
    Delete {
        login: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Create an auth key; prints the key alone on stdout (shown once).
    Create {
        /// Owner of nodes enrolled with this key.
        #[arg(long)]
        user: Option<String>,
        /// Tags for nodes enrolled with this key, comma-separated (tag:a,tag:b).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
        #[arg(long)]
        reusable: bool,
        /// Nodes are deleted after being offline for the ephemeral timeout.
        #[arg(long)]
        ephemeral: bool,
        /// Key lifetime, e.g. 30m, 1h, 7d (default 1h).
        #[arg(long, value_parser = parse_duration)]
        expiry: Option<Duration>,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Revoke {
        key_id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodesCmd {
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Show {
        node: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Delete {
        node: String,
    },
    /// Expire the node's key now: it is refused and vanishes from every map.
    Expire {
        node: String,
    },
    Rename {
        node: String,
        new_name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Validate FILE and run its tests (offline).
    Check { file: PathBuf },
    /// Replace the policy (refused, keeping the old one, if invalid or its tests fail).
    Set { file: PathBuf },
    /// Print the policy in force.
    Get,
    /// Show which node pairs would gain or lose flows if FILE replaced the policy.
    Plan { file: PathBuf },
    /// Explain whether SRC may reach DST:PORT and which rule decides.
    Explain {
        /// Evaluate offline against this file instead of the running controller.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        src: String,
        /// IDENTITY:PORT
        #[arg(long)]
        dst: String,
        /// A protocol name or number, exactly as a policy's "proto" accepts it.
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ApiKeysCmd {
    /// Create an API key; prints it alone on stdout (shown once).
    Create {
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, value_parser = parse_duration)]
        expiry: Option<Duration>,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    Revoke {
        key_id: String,
    },
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

/// Splits `IDENTITY:PORT` at the last colon (IPv6 in brackets).
pub fn split_dst(dst: &str) -> anyhow::Result<(String, u16)> {
    let (id, port) = dst
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("--dst must be IDENTITY:PORT, e.g. tag:web:443"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| anyhow!("invalid port {port:?} in --dst"))?;
    Ok((id.trim_matches(['[', ']']).to_string(), port))
}

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = AdminClient<InterceptedService<Channel, Auth>>;

/// Connects to the controller's admin API.
pub async fn connect(conn: &ConnArgs) -> anyhow::Result<Client> {
    let timeout = Duration::from_secs(10);
    if let Some(url) = &conn.server {
        let key = conn
            .api_key
            .as_deref()
            .ok_or_else(|| anyhow!("--server needs --api-key"))?;
        let fp = conn
            .fingerprint
            .as_deref()
            .and_then(ztmesh_proto::auth::parse_fingerprint)
            .ok_or_else(|| anyhow!("--server needs --fingerprint (64 hex characters)"))?;
        let ch = ztmesh_proto::tls::connect(url, fp, timeout).await?;
        let v: MetadataValue<Ascii> = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow!("API key contains invalid characters"))?;
        return Ok(AdminClient::with_interceptor(ch, Auth(Some(v))));
    }
    let sock = DataDir::new(&conn.data_dir).admin_socket();
    let ch = connect_unix(&sock, timeout).await?;
    Ok(AdminClient::with_interceptor(ch, Auth(None)))
}

async fn connect_unix(sock: &Path, timeout: Duration) -> anyhow::Result<Channel> {
    let path = sock.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            let s = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        }
    });
    Endpoint::from_static("http://localhost")
        .connect_timeout(timeout)
        .connect_with_connector(connector)
        .await
        .with_context(|| {
            format!(
                "cannot reach the controller's admin socket {} (is `ztmesh-controller serve` running with this --data-dir?)",
                sock.display()
            )
        })
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow!("{}", s.message())
}

fn ms_to_text(ms: i64) -> String {
    if ms <= 0 {
        return "never".into();
    }
    let secs = ms / 1000;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn node_json(n: &apb::Node) -> serde_json::Value {
    json!({
        "id": n.id, "name": n.name, "hostname": n.hostname, "addresses": n.addresses,
        "user": n.user, "tags": n.tags, "machine_key": n.machine_key, "wg_key": n.wg_key,
        "created_ms": n.created_ms, "last_seen_ms": n.last_seen_ms, "expiry_ms": n.expiry_ms,
        "online": n.online, "ephemeral": n.ephemeral, "endpoints": n.endpoints,
    })
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs an admin command (everything except `serve`, `fingerprint` and the
/// offline policy commands).
pub async fn run(conn: &ConnArgs, cmd: Cmd) -> anyhow::Result<()> {
    // Offline commands first: they need no controller.
    match &cmd {
        Cmd::Policy(PolicyCmd::Check { file }) => return policy_check(file),
        Cmd::Policy(PolicyCmd::Explain {
            policy: Some(file),
            src,
            dst,
            proto,
        }) => return policy_explain_offline(file, src, dst, proto),
        Cmd::Fingerprint => {
            let dir = DataDir::new(&conn.data_dir);
            let fp = crate::server::fingerprint(&dir)?;
            println!("{}", ztmesh_proto::auth::hex(&fp));
            return Ok(());
        }
        _ => {}
    }
    let mut c = connect(conn).await?;
    match cmd {
        Cmd::Serve { .. } | Cmd::Fingerprint => unreachable!("handled by the caller"),
        Cmd::Users(u) => match u {
            UsersCmd::Create { login } => {
                let u = c
                    .create_user(apb::CreateUserRequest { login })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("created user {} (id {})", u.login, u.id);
            }
            UsersCmd::List { output } => {
                let users = c
                    .list_users(apb::ListUsersRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .users;
                if output == Output::Json {
                    let v: Vec<_> = users
                        .iter()
                        .map(|u| json!({"id": u.id, "login": u.login, "created_ms": u.created_ms}))
                        .collect();
                    print_json(&json!(v));
                } else {
                    println!("{:<6} {:<40} CREATED", "ID", "LOGIN");
                    for u in users {
                        println!("{:<6} {:<40} {}", u.id, u.login, ms_to_text(u.created_ms));
                    }
                }
            }
            UsersCmd::Delete { login } => {
                c.delete_user(apb::DeleteUserRequest {
                    login: login.clone(),
                })
                .await
                .map_err(status_err)?;
                println!("deleted user {login} and its nodes");
            }
        },
        Cmd::Keys(k) => match k {
            KeysCmd::Create {
                user,
                tags,
                reusable,
                ephemeral,
                expiry,
            } => {
                let r = c
                    .create_auth_key(apb::CreateAuthKeyRequest {
                        user: user.unwrap_or_default(),
                        tags,
                        reusable,
                        ephemeral,
                        expiry_secs: expiry.map(|d| d.as_secs()).unwrap_or(0),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("{}", r.secret);
            }
            KeysCmd::List { output } => {
                let keys = c
                    .list_auth_keys(apb::ListAuthKeysRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .keys;
                if output == Output::Json {
                    let v: Vec<_> = keys
                        .iter()
                        .map(|k| {
                            json!({"key_id": k.key_id, "user": k.user, "tags": k.tags,
                                "reusable": k.reusable, "ephemeral": k.ephemeral,
                                "created_ms": k.created_ms, "expires_ms": k.expires_ms,
                                "used": k.used, "revoked": k.revoked, "created_by": k.created_by})
                        })
                        .collect();
                    print_json(&json!(v));
                } else {
                    println!(
                        "{:<14} {:<26} {:<24} {:<9} {:<6} {:<8} EXPIRES",
                        "KEY ID", "USER", "TAGS", "REUSABLE", "USED", "REVOKED"
                    );
                    for k in keys {
                        println!(
                            "{:<14} {:<26} {:<24} {:<9} {:<6} {:<8} {}",
                            k.key_id,
                            if k.user.is_empty() { "-" } else { &k.user },
                            k.tags.join(","),
                            k.reusable,
                            k.used,
                            k.revoked,
                            ms_to_text(k.expires_ms)
                        );
                    }
                }
            }
            KeysCmd::Revoke { key_id } => {
                c.revoke_auth_key(apb::RevokeAuthKeyRequest {
                    key_id: key_id.clone(),
                })
                .await
                .map_err(status_err)?;
                println!("revoked auth key {key_id}");
            }
        },
        Cmd::Nodes(n) => match n {
            NodesCmd::List { output } => {
                let nodes = c
                    .list_nodes(apb::ListNodesRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .nodes;
                if output == Output::Json {
                    print_json(&json!(nodes.iter().map(node_json).collect::<Vec<_>>()));
                } else {
                    println!(
                        "{:<5} {:<20} {:<34} {:<24} {:<7} EXPIRES",
                        "ID", "NAME", "ADDRESSES", "OWNER", "ONLINE"
                    );
                    for n in nodes {
                        let owner = if n.user.is_empty() {
                            n.tags.join(",")
                        } else {
                            n.user.clone()
                        };
                        println!(
                            "{:<5} {:<20} {:<34} {:<24} {:<7} {}",
                            n.id,
                            n.name,
                            n.addresses.join(" "),
                            owner,
                            n.online,
                            ms_to_text(n.expiry_ms)
                        );
                    }
                }
            }
            NodesCmd::Show { node, output } => {
                let n = c
                    .get_node(apb::NodeRef { node })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if output == Output::Json {
                    print_json(&node_json(&n));
                } else {
                    println!("id:          {}", n.id);
                    println!("name:        {}", n.name);
                    println!("hostname:    {}", n.hostname);
                    println!("addresses:   {}", n.addresses.join(" "));
                    println!("user:        {}", n.user);
                    println!("tags:        {}", n.tags.join(","));
                    println!("machine key: {}", n.machine_key);
                    println!("wg key:      {}", n.wg_key);
                    println!("online:      {}", n.online);
                    println!("endpoints:   {}", n.endpoints.join(" "));
                    println!("created:     {}", ms_to_text(n.created_ms));
                    println!("last seen:   {}", ms_to_text(n.last_seen_ms));
                    println!("expires:     {}", ms_to_text(n.expiry_ms));
                }
            }
            NodesCmd::Delete { node } => {
                c.delete_node(apb::NodeRef { node: node.clone() })
                    .await
                    .map_err(status_err)?;
                println!("deleted node {node}");
            }
            NodesCmd::Expire { node } => {
                c.expire_node(apb::NodeRef { node: node.clone() })
                    .await
                    .map_err(status_err)?;
                println!("expired node {node}");
            }
            NodesCmd::Rename { node, new_name } => {
                let n = c
                    .rename_node(apb::RenameNodeRequest { node, new_name })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("renamed node {} to {}", n.id, n.name);
            }
        },
        Cmd::Policy(p) => match p {
            PolicyCmd::Check { .. } => unreachable!("handled offline"),
            PolicyCmd::Set { file } => {
                let (name, text) = read_policy(&file)?;
                let r = c
                    .set_policy(apb::SetPolicyRequest {
                        file_name: name,
                        text,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("policy version {} in force", r.version);
            }
            PolicyCmd::Get => {
                let r = c
                    .get_policy(apb::GetPolicyRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner();
                if r.version == 0 {
                    eprintln!("no policy set: everything is denied");
                } else {
                    print!("{}", r.text);
                }
            }
            PolicyCmd::Plan { file } => {
                let (name, text) = read_policy(&file)?;
                let changes = c
                    .plan_policy(apb::PlanPolicyRequest {
                        file_name: name,
                        text,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .changes;
                if changes.is_empty() {
                    println!("no changes: every node pair keeps exactly its current flows");
                }
                for ch in changes {
                    for g in &ch.gained {
                        println!("+ {} -> {} {}", ch.src, ch.dst, g);
                    }
                    for l in &ch.lost {
                        println!("- {} -> {} {}", ch.src, ch.dst, l);
                    }
                }
            }
            PolicyCmd::Explain {
                policy: _,
                src,
                dst,
                proto,
            } => {
                let (dst_id, port) = split_dst(&dst)?;
                let r = c
                    .explain_policy(apb::ExplainPolicyRequest {
                        src,
                        dst: dst_id,
                        port: port.into(),
                        proto,
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                print_explain(r.allowed, &r.rule_id, &r.detail);
            }
        },
        Cmd::Apikeys(a) => match a {
            ApiKeysCmd::Create {
                description,
                expiry,
            } => {
                let r = c
                    .create_api_key(apb::CreateApiKeyRequest {
                        description,
                        expiry_secs: expiry.map(|d| d.as_secs()).unwrap_or(0),
                    })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                println!("{}", r.secret);
            }
            ApiKeysCmd::List { output } => {
                let keys = c
                    .list_api_keys(apb::ListApiKeysRequest {})
                    .await
                    .map_err(status_err)?
                    .into_inner()
                    .keys;
                if output == Output::Json {
                    let v: Vec<_> = keys
                        .iter()
                        .map(|k| {
                            json!({"key_id": k.key_id, "description": k.description,
                                "created_ms": k.created_ms, "expires_ms": k.expires_ms,
                                "revoked": k.revoked})
                        })
                        .collect();
                    print_json(&json!(v));
                } else {
                    println!(
                        "{:<14} {:<30} {:<8} EXPIRES",
                        "KEY ID", "DESCRIPTION", "REVOKED"
                    );
                    for k in keys {
                        println!(
                            "{:<14} {:<30} {:<8} {}",
                            k.key_id,
                            k.description,
                            k.revoked,
                            ms_to_text(k.expires_ms)
                        );
                    }
                }
            }
            ApiKeysCmd::Revoke { key_id } => {
                c.revoke_api_key(apb::RevokeApiKeyRequest {
                    key_id: key_id.clone(),
                })
                .await
                .map_err(status_err)?;
                println!("revoked API key {key_id}");
            }
        },
        Cmd::Audit { limit, output } => {
            let events = c
                .list_audit(apb::ListAuditRequest { limit })
                .await
                .map_err(status_err)?
                .into_inner()
                .events;
            if output == Output::Json {
                let v: Vec<_> = events
                    .iter()
                    .map(|e| {
                        json!({"id": e.id, "time_ms": e.time_ms, "actor": e.actor,
                            "action": e.action, "target": e.target, "detail": e.detail})
                    })
                    .collect();
                print_json(&json!(v));
            } else {
                for e in events {
                    println!(
                        "{} {:<20} {:<22} {:<24} {}",
                        ms_to_text(e.time_ms),
                        e.actor,
                        e.action,
                        e.target,
                        e.detail
                    );
                }
            }
        }
    }
    Ok(())
}

fn read_policy(file: &Path) -> anyhow::Result<(String, String)> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    Ok((file.display().to_string(), text))
}

fn policy_check(file: &Path) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    match ztmesh_policy::Policy::check(&name, &text) {
        Ok(_) => {
            println!("{name}: ok");
            Ok(())
        }
        Err(e) => bail!("{e}"),
    }
}

fn policy_explain_offline(file: &Path, src: &str, dst: &str, proto: &str) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    let policy = ztmesh_policy::Policy::parse(&name, &text).map_err(|e| anyhow!("{e}"))?;
    let (dst_id, port) = split_dst(dst)?;
    let proto = ztmesh_policy::parse_proto(proto)?;
    let e = policy.explain(&[], src, &dst_id, port, proto);
    print_explain(e.allowed, e.rule_id.as_deref().unwrap_or(""), &e.detail);
    Ok(())
}

fn print_explain(allowed: bool, rule_id: &str, detail: &str) {
    let verdict = if allowed { "ALLOW" } else { "DENY" };
    if rule_id.is_empty() {
        println!("{verdict}: {detail}");
    } else {
        println!("{verdict} by {rule_id}: {detail}");
    }
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

    #[test]
    fn splits_destinations() {
        assert_eq!(split_dst("tag:web:443").unwrap(), ("tag:web".into(), 443));
        assert_eq!(split_dst("[fd00::1]:22").unwrap(), ("fd00::1".into(), 22));
        assert!(split_dst("tag:web").is_err());
    }

    #[test]
    fn formats_times_as_utc() {
        assert_eq!(ms_to_text(0), "never");
        assert_eq!(ms_to_text(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
