//! `keys`: auth keys for enrolling nodes (create, list, revoke).

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output};

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

pub(super) async fn run(c: &mut Client, cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
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
    }
    Ok(())
}
