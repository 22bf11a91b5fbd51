//! `ztmesh-controller`: the controller daemon and its admin CLI.

use std::process::ExitCode;

use clap::Parser;
use ztmesh_controller::cli::{self, Cli, Cmd};
use ztmesh_controller::mesh::MeshConfig;
use ztmesh_controller::server::{self, DataDir};

fn main() -> ExitCode {
    let args = Cli::parse();
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
            Cmd::Serve {
                listen,
                ephemeral_timeout,
                node_key_expiry,
                tagged_node_key_expiry,
                tag_key_expiry,
                public_url,
                controller_urls,
                netmap_ttl,
                posture_ttl,
                audit_max_age,
                audit_max_flow_rows,
                flow_max_age,
                flow_max_rows,
                flow_max_rows_per_node,
                relay_file,
                dns_domain,
                tls_cert,
                tls_key,
                oidc,
                limits,
                detect,
                metrics_listen,
                database,
            } => {
                tracing_subscriber::fmt()
                    .with_max_level(log_level())
                    .with_target(false)
                    .init();
                let web = server::WebOptions {
                    oidc: oidc.config(public_url.as_deref())?,
                };
                let cfg = MeshConfig {
                    ephemeral_timeout_ms: ephemeral_timeout.as_millis() as i64,
                    node_key_ttl_ms: node_key_expiry.as_millis() as i64,
                    tagged_key_ttl_ms: tagged_node_key_expiry.as_millis() as i64,
                    tag_key_ttl_ms: tag_key_expiry
                        .into_iter()
                        .map(|(t, d)| (t, i64::try_from(d.as_millis()).unwrap_or(i64::MAX)))
                        .collect(),
                    public_url,
                    netmap_ttl_ms: netmap_ttl.as_millis().max(10_000) as i64,
                    posture_ttl_ms: i64::try_from(posture_ttl.as_millis())
                        .unwrap_or(i64::MAX)
                        .max(6_000),
                    audit_max_age_ms: i64::try_from(audit_max_age.as_millis()).unwrap_or(i64::MAX),
                    audit_max_flow_rows,
                    flow_max_age_ms: i64::try_from(flow_max_age.as_millis()).unwrap_or(i64::MAX),
                    flow_max_rows,
                    flow_max_rows_per_node,
                    relays: read_relays(relay_file.as_deref())?,
                    controllers: controller_urls,
                    dns_domain,
                    detect: detect.config()?,
                    webhook: detect.webhook()?,
                    ..MeshConfig::default()
                };
                let dir = DataDir::new(&args.conn.data_dir);
                // Parsed here, not by clap: its errors quote the value, and a
                // URL may hold a password.
                // An empty ZTMESH_DATABASE counts as unset.
                let database = database
                    .as_deref()
                    .filter(|url| !url.is_empty())
                    .map(ztmesh_controller::store::PgOptions::parse)
                    .transpose()?;
                let tls = match (&tls_cert, &tls_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    (None, None) => None,
                    _ => anyhow::bail!("--tls-cert and --tls-key go together"),
                };
                server::serve(
                    &dir,
                    (listen, metrics_listen),
                    cfg,
                    limits.limits(),
                    tls,
                    web,
                    database.as_ref(),
                )
                .await
            }
            cmd => cli::run(&args.conn, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', "\n  "));
            ExitCode::FAILURE
        }
    }
}

fn log_level() -> tracing::Level {
    match std::env::var("ZTMESH_LOG").as_deref() {
        Ok("trace") => tracing::Level::TRACE,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("warn") => tracing::Level::WARN,
        Ok("error") => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
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
