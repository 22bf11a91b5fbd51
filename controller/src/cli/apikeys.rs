//! `apikeys`: API keys for the remote admin CLI (create, list, revoke).

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output};

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

pub(super) async fn run(c: &mut Client, cmd: ApiKeysCmd) -> anyhow::Result<()> {
    match cmd {
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
    }
    Ok(())
}
