//! `ztmesh-controller`: the controller daemon and its admin CLI.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use ztmesh_controller::cli::{self, Cli, Cmd, ServeArgs, DEFAULT_CONFIG};
use ztmesh_controller::mesh::MeshConfig;
use ztmesh_controller::server::{self, DataDir, ListenerLimits, WebOptions};
use ztmesh_controller::store::PgOptions;
use ztmesh_proto::ops::{self, config};

fn main() -> ExitCode {
    let (args, config_file) = match command_line(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let args = match Cli::command()
        .try_get_matches_from(args)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if let Cmd::Ops(cmd) = &args.cmd {
        let bin = ops::Binary {
            command: Cli::command(),
            name: "ztmesh-controller",
            version: ztmesh_proto::version_line!(),
            layout: LAYOUT,
            header: cli::CONFIG_HEADER,
            packaged: cli::PACKAGED_CONFIG,
        };
        return ops::run(cmd, bin, config_file.as_ref(), check_serve);
    }
    if matches!(args.cmd, Cmd::Serve(_)) {
        if let Err(e) = args.ops.log.init() {
            return fail(&anyhow::anyhow!(e));
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match args.cmd {
            Cmd::Serve(serve) => {
                let plan = Plan::new(serve, &args.conn.data_dir)?;
                server::serve(
                    &plan.dir,
                    (plan.listen, plan.metrics_listen),
                    plan.mesh,
                    plan.limits,
                    plan.tls.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
                    plan.web,
                    plan.database.as_ref(),
                )
                .await
            }
            cmd => cli::run(&args.conn, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", format!("{e:#}").replace('\n', "\n  "));
    ExitCode::FAILURE
}

/// Where the controller's config file is; see [`config::command_line`].
const LAYOUT: config::Layout<'static> = config::Layout {
    daemon: "serve",
    env_var: "ZTMESH_CONTROLLER_CONFIG",
    default: DEFAULT_CONFIG,
    skip: &[],
};

/// The command line with the config file's keys added, and the file; its
/// warnings printed.
fn command_line(
    args: Vec<OsString>,
) -> anyhow::Result<(Vec<OsString>, Option<config::ConfigFile>)> {
    let applied = config::command_line(Cli::command(), &LAYOUT, args)?;
    if let Some(file) = &applied.file {
        refuse_passwords(file)?;
    }
    for w in &applied.warnings {
        eprintln!("{w}");
    }
    Ok((applied.args, applied.file))
}

/// A database URL with a password stays out of the config file, which the
/// service's user (and so everyone) can read: it goes in ZTMESH_DATABASE
/// from the unit's root-only EnvironmentFile.
fn refuse_passwords(file: &config::ConfigFile) -> Result<(), config::ConfigError> {
    let Some(e) = file.entry("database") else {
        return Ok(());
    };
    let url = e.values.first().cloned().flatten().unwrap_or_default();
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
    let in_userinfo = authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'));
    let in_query = url
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("password=")));
    if in_userinfo || in_query {
        return Err(config::ConfigError {
            file: file.path.clone(),
            pos: Some(e.at),
            message: "`database` holds a password: a config file is readable by the service's \
                      user; set ZTMESH_DATABASE in /etc/ztmesh/controller.env (mode 0600) instead"
                .to_owned(),
        });
    }
    Ok(())
}

/// `config check`'s part here: the settings `serve` would run with, and
/// the files they name, without binding or writing anything.
fn check_serve(matches: clap::ArgMatches) -> Result<String, String> {
    let parsed = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    let Cmd::Serve(args) = parsed.cmd else {
        unreachable!("parsed as serve")
    };
    let plan = Plan::new(args, &parsed.conn.data_dir).map_err(|e| format!("{e:#}"))?;
    Ok(format!(
        "listen {}, data dir {}, store {}",
        plan.listen,
        plan.dir.root.display(),
        if plan.database.is_some() {
            "postgresql"
        } else {
            "sqlite"
        }
    ))
}

/// Everything `serve` runs with, checked: the flags turned into the
/// server's settings and the files they name read.
struct Plan {
    dir: DataDir,
    listen: std::net::SocketAddr,
    metrics_listen: Option<std::net::SocketAddr>,
    mesh: MeshConfig,
    limits: ListenerLimits,
    tls: Option<(PathBuf, PathBuf)>,
    web: WebOptions,
    database: Option<PgOptions>,
}

impl Plan {
    fn new(a: ServeArgs, data_dir: &Path) -> anyhow::Result<Self> {
        let web = WebOptions {
            oidc: a.oidc.config(a.public_url.as_deref())?,
        };
        let mesh = MeshConfig {
            ephemeral_timeout_ms: a.ephemeral_timeout.as_millis() as i64,
            node_key_ttl_ms: a.node_key_expiry.as_millis() as i64,
            tagged_key_ttl_ms: a.tagged_node_key_expiry.as_millis() as i64,
            tag_key_ttl_ms: a
                .tag_key_expiry
                .into_iter()
                .map(|(t, d)| (t, i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
                .collect(),
            public_url: a.public_url,
            netmap_ttl_ms: a.netmap_ttl.as_millis().max(10_000) as i64,
            posture_ttl_ms: i64::try_from(a.posture_ttl.as_millis())
                .unwrap_or(i64::MAX)
                .max(6_000),
            audit_max_age_ms: i64::try_from(a.audit_max_age.as_millis()).unwrap_or(i64::MAX),
            audit_max_flow_rows: a.audit_max_flow_rows,
            flow_max_age_ms: i64::try_from(a.flow_max_age.as_millis()).unwrap_or(i64::MAX),
            flow_max_rows: a.flow_max_rows,
            flow_max_rows_per_node: a.flow_max_rows_per_node,
            relays: read_relays(a.relay_file.as_deref())?,
            controllers: a.controller_urls,
            dns_domain: a.dns_domain,
            detect: a.detect.config()?,
            webhook: a.detect.webhook()?,
            web_session_idle_ms: i64::try_from(a.web_session_idle.as_millis())
                .unwrap_or(i64::MAX)
                .max(1000),
            ..MeshConfig::default()
        };
        // Parsed here, not by clap: its errors quote the value, and a URL
        // may hold a password. An empty ZTMESH_DATABASE counts as unset.
        let database = a
            .database
            .as_deref()
            .filter(|url| !url.is_empty())
            .map(PgOptions::parse)
            .transpose()?;
        let tls = match (a.tls_cert, a.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        Ok(Self {
            dir: DataDir::new(data_dir),
            listen: a.listen,
            metrics_listen: a.metrics_listen,
            mesh,
            limits: a.limits.limits(),
            tls,
            web,
            database,
        })
    }
}

/// The relays of `--relay-file` (none without it).
fn read_relays(
    path: Option<&std::path::Path>,
) -> anyhow::Result<Vec<ztmesh_proto::control::Relay>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--relay-file {}: {e}", path.display()))?;
    ztmesh_controller::relays::parse(&path.display().to_string(), &text).map_err(anyhow::Error::msg)
}
