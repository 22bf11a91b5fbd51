//! `audit`: the audit log, newest first (from the running controller);
//! `audit verify` and `audit export` (offline, from the data dir's database,
//! opened read-only, or from the PostgreSQL `--database`: they work whether
//! or not the controller runs).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::hex;
use ztmesh_proto::keys::{PublicKey, SigningKey};

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output};
use crate::server::DataDir;
use crate::store::{PgOptions, PgStore, SqliteStore, Store};

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Verify the audit log's hash chain and signed checkpoints: names the
    /// first row altered, deleted, inserted or reordered, or rows cut from
    /// the end (up to the newest signed head). Exit 1 if broken.
    Verify {
        /// The controller key to verify with (`controller-key` prints it);
        /// default: the one in the data dir.
        #[arg(long)]
        controller_key: Option<PublicKey>,
        /// Read the controller's PostgreSQL database (as `serve
        /// --database`) instead of the data dir's SQLite file.
        #[arg(long, env = "ZTMESH_DATABASE", hide_env_values = true)]
        database: Option<String>,
    },
    /// Print the audit log oldest first, one JSON object per row with its
    /// hash and prev_hash (for a SIEM).
    Export {
        #[arg(long, value_enum, default_value_t)]
        format: ExportFormat,
        /// Only the rows of the last DURATION (e.g. 1h, 7d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Read the controller's PostgreSQL database (as `serve
        /// --database`) instead of the data dir's SQLite file.
        #[arg(long, env = "ZTMESH_DATABASE", hide_env_values = true)]
        database: Option<String>,
    },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum ExportFormat {
    /// One JSON object per line.
    #[default]
    Jsonl,
}

/// Runs `audit verify` or `audit export` on the data dir, offline.
///
/// # Errors
/// The database or key unreadable; for `verify`, a broken chain (naming
/// the row).
pub(super) fn run_offline(data_dir: &Path, cmd: &AuditCmd) -> anyhow::Result<()> {
    let dir = DataDir::new(data_dir);
    let (AuditCmd::Verify { database, .. } | AuditCmd::Export { database, .. }) = cmd;
    let store: Box<dyn Store> = match database.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => {
            let options = PgOptions::parse(url)?;
            Box::new(
                PgStore::open_read_only(options.clone())
                    .with_context(|| format!("reading {}", options.display()))?,
            )
        }
        None => {
            let db = dir.db();
            if !db.exists() {
                anyhow::bail!(
                    "no database at {} (is --data-dir the controller's?)",
                    db.display()
                );
            }
            Box::new(
                SqliteStore::open_read_only(&db)
                    .with_context(|| format!("opening {} read-only", db.display()))?,
            )
        }
    };
    match cmd {
        AuditCmd::Verify { controller_key, .. } => {
            let key = match controller_key {
                Some(k) => *k,
                None => data_dir_key(&dir)?,
            };
            let v = store
                .verify_audit(&key)?
                .map_err(|e| anyhow::anyhow!("audit chain broken at {e}"))?;
            let head = match v.signed_head {
                Some((id, at)) => format!("head #{id} signed at {}", ms_to_text(at)),
                None => "no signed head yet".into(),
            };
            let unsigned = match v.unsigned_rows {
                0 => String::new(),
                n => format!(" ({n} newer rows not signed yet)"),
            };
            println!("audit chain ok: {} rows, {head}{unsigned}", v.rows);
            Ok(())
        }
        AuditCmd::Export { format, since, .. } => {
            let ExportFormat::Jsonl = format;
            let since_ms = match since {
                Some(d) => {
                    crate::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                }
                None => i64::MIN,
            };
            use std::io::Write as _;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut failed = None;
            store.audit_rows(since_ms, &mut |r| {
                let line = json!({
                    "id": r.id, "time_ms": r.time_ms, "time": ms_to_text(r.time_ms),
                    "actor": r.actor, "action": r.action, "target": r.target,
                    "detail": r.detail, "prev_hash": hex(&r.prev_hash), "hash": hex(&r.hash),
                });
                match writeln!(out, "{line}") {
                    Ok(()) => true,
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e).context("writing the export");
            }
            out.flush().context("writing the export")
        }
    }
}

/// The public half of the data dir's controller key.
fn data_dir_key(dir: &DataDir) -> anyhow::Result<PublicKey> {
    let path = dir.signing_key();
    let key = SigningKey::load(&path).with_context(|| {
        format!(
            "reading the controller key {} (or pass --controller-key)",
            path.display()
        )
    })?;
    Ok(key.public())
}

/// `audit`'s filters (all must hold; the admin API's `ListAudit` filters,
/// which search the newest 10,000 events).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuditFilterArgs {
    /// Only events by this actor (`user:alice@example.com`, `api-key:ID`,
    /// `local-admin`); a trailing `*` matches a prefix (`user:*`).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only events with this action (`node.delete`); a trailing `*`
    /// matches a prefix (`node.*`).
    #[arg(long = "action", value_name = "ACTION")]
    pub event: Option<String>,
    /// Only events whose target or detail contains TEXT (any case).
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,
    /// Only events of the last DURATION (e.g. 15m, 1h, 7d).
    #[arg(long, value_parser = super::args::parse_duration)]
    pub since: Option<std::time::Duration>,
}

pub(super) async fn run(
    c: &mut Client,
    limit: u32,
    f: AuditFilterArgs,
    output: Output,
) -> anyhow::Result<()> {
    let since_ms = f.since.map_or(0, |d| {
        crate::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    });
    let events = c
        .list_audit(apb::ListAuditRequest {
            limit,
            actor: f.actor.unwrap_or_default(),
            action: f.event.unwrap_or_default(),
            text: f.grep.unwrap_or_default(),
            since_ms,
            before_id: 0,
        })
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
    Ok(())
}
