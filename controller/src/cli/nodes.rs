//! `nodes`: list, show, delete, expire and rename enrolled nodes.

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::Output;

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
    /// Show a node's subnet routes and exit-node role, and approve or
    /// withdraw approval (only advertised routes can be approved).
    Routes {
        node: String,
        /// Approve these advertised prefixes (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        approve: Vec<String>,
        /// Withdraw approval of these prefixes.
        #[arg(long, value_delimiter = ',')]
        unapprove: Vec<String>,
        /// Approve the node as an exit node (it must advertise it).
        #[arg(long, conflicts_with = "unapprove_exit_node")]
        approve_exit_node: bool,
        /// Withdraw the exit-node approval.
        #[arg(long)]
        unapprove_exit_node: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

pub(super) async fn run(c: &mut Client, cmd: NodesCmd) -> anyhow::Result<()> {
    match cmd {
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
                println!(
                    "routes:      {} (approved: {})",
                    n.advertised_routes.join(" "),
                    n.approved_routes.join(" ")
                );
                println!(
                    "exit node:   advertised {}, approved {}",
                    n.exit_node_advertised, n.exit_node_approved
                );
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
        NodesCmd::Routes {
            node,
            approve,
            unapprove,
            approve_exit_node,
            unapprove_exit_node,
            output,
        } => {
            let change = !approve.is_empty()
                || !unapprove.is_empty()
                || approve_exit_node
                || unapprove_exit_node;
            let n = if change {
                c.set_node_routes(apb::SetNodeRoutesRequest {
                    node,
                    approve,
                    unapprove,
                    approve_exit_node,
                    unapprove_exit_node,
                })
                .await
            } else {
                c.get_node(apb::NodeRef { node }).await
            }
            .map_err(status_err)?
            .into_inner();
            if output == Output::Json {
                print_json(&routes_json(&n));
            } else {
                println!("{:<20} {:<10} {:<8} PRIMARY", "ROUTE", "APPROVED", "SERVED");
                let mut all: Vec<&String> = n
                    .advertised_routes
                    .iter()
                    .chain(&n.approved_routes)
                    .collect();
                all.sort();
                all.dedup();
                for r in all {
                    let approved = n.approved_routes.contains(r);
                    let served = approved && n.advertised_routes.contains(r);
                    let note = if n.advertised_routes.contains(r) {
                        ""
                    } else {
                        " (not advertised)"
                    };
                    let primary = n.primary_routes.contains(r);
                    println!("{r:<20} {approved:<10} {served:<8} {primary}{note}");
                }
                println!(
                    "exit node: advertised {}, approved {}",
                    n.exit_node_advertised, n.exit_node_approved
                );
            }
        }
    }
    Ok(())
}

/// One node as `-o json` prints it (in `list` and `show` alike).
fn node_json(n: &apb::Node) -> serde_json::Value {
    json!({
        "id": n.id, "name": n.name, "hostname": n.hostname, "addresses": n.addresses,
        "user": n.user, "tags": n.tags, "machine_key": n.machine_key, "wg_key": n.wg_key,
        "created_ms": n.created_ms, "last_seen_ms": n.last_seen_ms, "expiry_ms": n.expiry_ms,
        "online": n.online, "ephemeral": n.ephemeral, "endpoints": n.endpoints,
        "routes": routes_json(n),
    })
}

/// A node's routes as `-o json` prints them.
fn routes_json(n: &apb::Node) -> serde_json::Value {
    json!({
        "advertised": n.advertised_routes, "approved": n.approved_routes,
        "exit_node_advertised": n.exit_node_advertised, "exit_node_approved": n.exit_node_approved,
        "primary": n.primary_routes,
    })
}
