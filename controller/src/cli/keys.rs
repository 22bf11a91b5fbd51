//! `keys` (auth keys, to enroll nodes) and `apikeys` (API keys, for the
//! remote admin CLI): create, list, revoke; and `keys rotate-signing`, which
//! replaces the controller's netmap signing key. One lifecycle on the controller
//! (`secrets`), so the two groups share everything but their fields: a new
//! key is printed alone on stdout, shown once; a revocation names the kind.

use std::time::Duration;

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output, OutputArg};
use crate::secrets::SecretKind;

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
        #[command(flatten)]
        output: OutputArg,
    },
    /// Revoke a key by its id: it can no longer be used.
    Revoke { key_id: String },
    /// Replace the controller's netmap signing key with a new one, with the
    /// mesh running. The old key signs a hand-over that every map carries
    /// for the grace period: each node moves to the new key with its next
    /// map (connected nodes at once) and then refuses the old one. A node
    /// offline for the whole grace period must re-enroll. The old private
    /// key is deleted. Relays accept the hand-over during the grace period:
    /// give them the new key (`controller-key`) before it ends.
    RotateSigning {
        /// How long maps carry the hand-over, e.g. 1h, 7d (default 7d).
        #[arg(long, value_parser = parse_duration, default_value = "7d")]
        grace: Duration,
        #[command(flatten)]
        output: OutputArg,
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
        /// admin, network-admin or auditor (default: your own role).
        #[arg(long, default_value = "")]
        role: String,
    },
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Revoke a key by its id: it can no longer be used.
    Revoke { key_id: String },
}

/// Runs a `keys` command.
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
                    expiry_secs: expiry_secs(expiry),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", r.secret);
        }
        KeysCmd::List { output } => {
            let keys = c
                .list_auth_keys(apb::ListKeysRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .keys;
            print_auth_keys(&keys, output.get());
        }
        KeysCmd::Revoke { key_id } => revoke(c, SecretKind::AuthKey, key_id).await?,
        KeysCmd::RotateSigning { grace, output } => {
            let r = c
                .rotate_signing_key(apb::RotateSigningKeyRequest {
                    grace_ms: i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match output.get() {
                Output::Json => print_json(&json!({
                    "old_key": r.old_key,
                    "new_key": r.new_key,
                    "valid_from_ms": r.valid_from_ms,
                    "not_after_ms": r.not_after_ms,
                })),
                Output::Text => {
                    println!("netmap signing key replaced");
                    println!("  old key:     {}", r.old_key);
                    println!("  new key:     {}", r.new_key);
                    println!("  hand-over until {}", ms_to_text(r.not_after_ms));
                    println!(
                        "nodes move to the new key with their next map; a node offline until \
                         then must re-enroll. Give every relay the new key \
                         (--controller-key) before the hand-over ends."
                    );
                }
            }
        }
    }
    Ok(())
}

/// Runs an `apikeys` command.
pub(super) async fn run_api(c: &mut Client, cmd: ApiKeysCmd) -> anyhow::Result<()> {
    match cmd {
        ApiKeysCmd::Create {
            description,
            expiry,
            role,
        } => {
            let r = c
                .create_api_key(apb::CreateApiKeyRequest {
                    description,
                    expiry_secs: expiry_secs(expiry),
                    role,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", r.secret);
        }
        ApiKeysCmd::List { output } => {
            let keys = c
                .list_api_keys(apb::ListKeysRequest {})
                .await
                .map_err(status_err)?
                .into_inner()
                .keys;
            print_api_keys(&keys, output.get());
        }
        ApiKeysCmd::Revoke { key_id } => revoke(c, SecretKind::ApiKey, key_id).await?,
    }
    Ok(())
}

/// The requested lifetime in seconds; 0 asks for the kind's default.
fn expiry_secs(expiry: Option<Duration>) -> u64 {
    expiry.map(|d| d.as_secs()).unwrap_or(0)
}

/// Revokes a key of `kind` and says so: `revoked auth key KEYID`.
async fn revoke(c: &mut Client, kind: SecretKind, key_id: String) -> anyhow::Result<()> {
    let req = apb::KeyRef {
        key_id: key_id.clone(),
    };
    match kind {
        SecretKind::AuthKey => c.revoke_auth_key(req).await,
        SecretKind::ApiKey => c.revoke_api_key(req).await,
    }
    .map_err(status_err)?;
    println!("revoked {} {key_id}", kind.noun());
    Ok(())
}

fn print_auth_keys(keys: &[apb::AuthKey], output: Output) {
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
        return;
    }
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

fn print_api_keys(keys: &[apb::ApiKey], output: Output) {
    if output == Output::Json {
        let v: Vec<_> = keys
            .iter()
            .map(|k| {
                json!({"key_id": k.key_id, "description": k.description,
                    "created_ms": k.created_ms, "expires_ms": k.expires_ms,
                    "revoked": k.revoked, "role": k.role})
            })
            .collect();
        print_json(&json!(v));
        return;
    }
    println!(
        "{:<14} {:<30} {:<14} {:<8} EXPIRES",
        "KEY ID", "DESCRIPTION", "ROLE", "REVOKED"
    );
    for k in keys {
        println!(
            "{:<14} {:<30} {:<14} {:<8} {}",
            k.key_id,
            k.description,
            k.role,
            k.revoked,
            ms_to_text(k.expires_ms)
        );
    }
}
