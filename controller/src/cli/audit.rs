//! `audit`: the audit log, newest first.

use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::Output;

pub(super) async fn run(c: &mut Client, limit: u32, output: Output) -> anyhow::Result<()> {
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
    Ok(())
}
