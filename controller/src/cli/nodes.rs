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
    })
}
