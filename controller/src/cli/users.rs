//! `users`: create, list, update and delete users (roles, key lifetime,
//! built-in password, second factor).

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::args::parse_duration;
use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{Output, OutputArg};

#[derive(Subcommand, Debug)]
pub enum UsersCmd {
    /// Create a user (a built-in account, or one that signs in with SSO).
    Create {
        login: String,
        /// admin, network-admin, auditor or member.
        #[arg(long, default_value = "member")]
        role: String,
        /// Read a built-in password (first line of stdin) for signing in
        /// without SSO; a TOTP factor is enrolled at the first sign-in.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's role, node-key lifetime, password or second factor.
    Update {
        login: String,
        #[arg(long)]
        role: Option<String>,
        /// Lifetime of this user's node keys: a duration, "never", or
        /// "default" (the controller's `--node-key-expiry`).
        #[arg(long)]
        key_expiry: Option<String>,
        /// Read a new built-in password from the first line of stdin.
        #[arg(long, conflicts_with = "clear_password")]
        password_stdin: bool,
        /// Remove the built-in password (SSO only).
        #[arg(long)]
        clear_password: bool,
        /// Remove the TOTP factor and recovery codes (lost phone): a new
        /// one is enrolled at the next sign-in.
        #[arg(long)]
        reset_mfa: bool,
        /// Forget the SSO identities linked to this user (ends their
        /// browser sessions; the next SSO sign-in links by email again).
        #[arg(long)]
        unlink_sso: bool,
    },
    /// List users with their role and second factor.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete a user and every node it owns.
    Delete { login: String },
}

pub(super) async fn run(c: &mut Client, cmd: UsersCmd) -> anyhow::Result<()> {
    match cmd {
        UsersCmd::Create {
            login,
            role,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(read_password()?)
            } else {
                None
            };
            let u = c
                .create_user(apb::CreateUserRequest {
                    login: login.clone(),
                    role,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("created user {} (id {}, role {})", u.login, u.id, u.role);
            if let Some(password) = password {
                c.update_user(apb::UpdateUserRequest {
                    login,
                    password,
                    ..Default::default()
                })
                .await
                .map_err(status_err)?;
                println!("password set; a second factor is enrolled at the first sign-in");
            }
        }
        UsersCmd::Update {
            login,
            role,
            key_expiry,
            password_stdin,
            clear_password,
            reset_mfa,
            unlink_sso,
        } => {
            let (key_expiry_ms, clear_key_expiry) = match key_expiry.as_deref() {
                None => (None, false),
                Some("default") => (None, true),
                Some("never") => (Some(0), false),
                Some(d) => {
                    let d = parse_duration(d).map_err(|e| anyhow::anyhow!("--key-expiry: {e}"))?;
                    if d.is_zero() {
                        anyhow::bail!("--key-expiry: use \"never\" for keys that do not expire");
                    }
                    (
                        Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                        false,
                    )
                }
            };
            let password = if password_stdin {
                read_password()?
            } else {
                String::new()
            };
            let u = c
                .update_user(apb::UpdateUserRequest {
                    login,
                    role: role.unwrap_or_default(),
                    key_expiry_ms,
                    clear_key_expiry,
                    password,
                    clear_password,
                    reset_mfa,
                    unlink_sso,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("updated user {} (role {})", u.login, u.role);
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
                    .map(|u| {
                        json!({"id": u.id, "login": u.login, "created_ms": u.created_ms,
                               "role": u.role, "key_expiry_ms": u.key_expiry_ms,
                               "password": u.has_password, "totp": u.has_totp,
                               "sso_identities": u.sso_identities})
                    })
                    .collect();
                print_json(&json!(v));
            } else {
                println!(
                    "{:<6} {:<32} {:<14} {:<9} {:<12} CREATED",
                    "ID", "LOGIN", "ROLE", "SIGN-IN", "KEY-EXPIRY"
                );
                for u in users {
                    let sign_in = match (u.has_password, u.has_totp) {
                        (true, true) => "pw+totp",
                        (true, false) => "password",
                        _ => "sso",
                    };
                    let expiry = match u.key_expiry_ms {
                        None => "default".to_string(),
                        Some(0) => "never".to_string(),
                        Some(ms) => format!("{}h", ms / 3_600_000),
                    };
                    println!(
                        "{:<6} {:<32} {:<14} {:<9} {:<12} {}",
                        u.id,
                        u.login,
                        u.role,
                        sign_in,
                        expiry,
                        ms_to_text(u.created_ms)
                    );
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
    }
    Ok(())
}

/// The first line of stdin (a password piped in: it never appears in the
/// process list or the shell history).
fn read_password() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let pw = line.trim_end_matches(['\r', '\n']).to_string();
    if pw.is_empty() {
        anyhow::bail!("no password on stdin");
    }
    Ok(pw)
}
