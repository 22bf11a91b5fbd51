//! `users`: create, list and delete users.

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::Output;

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

pub(super) async fn run(c: &mut Client, cmd: UsersCmd) -> anyhow::Result<()> {
    match cmd {
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
    }
    Ok(())
}
