//! `nodes`: list, show, delete, expire and rename enrolled nodes; their
//! routes and posture attributes.

use clap::Subcommand;
use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{Output, OutputArg};

#[derive(Subcommand, Debug)]
pub enum NodesCmd {
    /// List nodes: name, user, addresses, online, the paths to its peers
    /// (as the node reports them), key expiry.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one node (by name, id or address).
    Show {
        node: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete a node: it leaves every map and must enroll again.
    Delete { node: String },
    /// Expire the node's key now: it is refused and vanishes from every map.
    Expire { node: String },
    /// Rename a node (its MagicDNS name follows).
    Rename { node: String, new_name: String },
    /// End a quarantine: the node is back in the maps (audited).
    Release { node: String },
    /// Quarantine a node now: it leaves every map until released (audited
    /// with the reason).
    Quarantine {
        node: String,
        /// Why, one line (kept with the quarantine and audited).
        #[arg(long)]
        reason: String,
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
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show a node's posture attributes and results, and set or remove its
    /// custom:* attributes (e.g. from an MDM; the ones to gate on: node:*
    /// attributes are reported by the node itself and only advisory).
    Attrs {
        node: String,
        /// Set an attribute: custom:NAME=VALUE, where VALUE is true, false,
        /// a whole number or text (repeatable).
        #[arg(long, value_name = "custom:NAME=VALUE", value_parser = parse_attr)]
        set: Vec<apb::Attribute>,
        /// Remove an attribute (repeatable).
        #[arg(long, value_name = "custom:NAME")]
        unset: Vec<String>,
        #[command(flatten)]
        output: OutputArg,
    },
}

/// `custom:NAME=VALUE`, typed as [`ztmesh_policy::parse_custom_attribute`]
/// types it: `true`/`false` are flags, a whole number is a number, anything
/// else is text.
fn parse_attr(s: &str) -> Result<apb::Attribute, String> {
    use apb::attribute::Value;
    use ztmesh_policy::AttrValue;
    let (key, value) = s
        .split_once('=')
        .ok_or("expected custom:NAME=VALUE, e.g. custom:compliant=true")?;
    let value = match ztmesh_policy::parse_custom_attribute(key, value)? {
        AttrValue::Bool(b) => Value::Flag(b),
        AttrValue::Int(n) => Value::Number(n),
        AttrValue::Str(t) => Value::Text(t),
    };
    Ok(apb::Attribute {
        key: key.to_string(),
        value: Some(value),
    })
}

/// An attribute's value as a posture condition writes it.
fn attr_text(a: &apb::Attribute) -> String {
    use apb::attribute::Value;
    match &a.value {
        Some(Value::Text(t)) => format!("'{t}'"),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Flag(b)) => b.to_string(),
        None => String::new(),
    }
}

fn attr_json(a: &apb::Attribute) -> serde_json::Value {
    use apb::attribute::Value;
    match &a.value {
        Some(Value::Text(t)) => json!(t),
        Some(Value::Number(n)) => json!(n),
        Some(Value::Flag(b)) => json!(b),
        None => serde_json::Value::Null,
    }
}

/// Where an attribute comes from.
fn provenance(key: &str) -> &'static str {
    if key.starts_with("custom:") {
        "set by an admin"
    } else {
        "reported by the node, advisory"
    }
}

/// The posture lines of `nodes show` and `nodes attrs`.
fn print_posture(n: &apb::Node) {
    let reported = if n.posture_reported_ms == 0 {
        "never".to_string()
    } else {
        ms_to_text(n.posture_reported_ms)
    };
    println!("posture reported: {reported}");
    for a in &n.attributes {
        println!(
            "  {:<24} {:<24} ({})",
            a.key,
            attr_text(a),
            provenance(&a.key)
        );
    }
    for p in &n.posture {
        if p.passed {
            println!("  {:<24} ok", p.name);
        } else {
            println!("  {:<24} FAILED: {}", p.name, p.detail);
        }
    }
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
                    "{:<5} {:<20} {:<34} {:<24} {:<7} {:<22} EXPIRES",
                    "ID", "NAME", "ADDRESSES", "OWNER", "ONLINE", "PATH"
                );
                for n in nodes {
                    let owner = if n.user.is_empty() {
                        n.tags.join(",")
                    } else {
                        n.user.clone()
                    };
                    println!(
                        "{:<5} {:<20} {:<34} {:<24} {:<7} {:<22} {}",
                        n.id,
                        n.name,
                        n.addresses.join(" "),
                        owner,
                        if n.quarantined_since_ms > 0 {
                            "QUARANTINED".to_string()
                        } else {
                            n.online.to_string()
                        },
                        path_text(&n),
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
                println!("paths:       {} (reported by the node)", path_text(&n));
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
                if n.quarantined_since_ms > 0 {
                    println!(
                        "QUARANTINED: since {}: {} (release: ztmesh-controller nodes release {})",
                        ms_to_text(n.quarantined_since_ms),
                        n.quarantine_reason,
                        n.name
                    );
                }
                print_posture(&n);
            }
        }
        NodesCmd::Attrs {
            node,
            set,
            unset,
            output,
        } => {
            let n = if set.is_empty() && unset.is_empty() {
                c.get_node(apb::NodeRef { node }).await
            } else {
                c.set_node_attributes(apb::SetNodeAttributesRequest { node, set, unset })
                    .await
            }
            .map_err(status_err)?
            .into_inner();
            if output == Output::Json {
                print_json(&posture_json(&n));
            } else {
                print_posture(&n);
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
        NodesCmd::Release { node } => {
            let n = c
                .release_node(apb::NodeRef { node })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("released node {}", n.name);
        }
        NodesCmd::Quarantine { node, reason } => {
            let n = c
                .quarantine_node(apb::QuarantineNodeRequest { node, reason })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("quarantined node {}", n.name);
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
        "routes": routes_json(n), "posture": posture_json(n),
        "paths": (n.paths_reported_ms > 0).then(|| json!({
            "direct": n.peers_direct, "relayed": n.peers_relayed, "none": n.peers_no_path,
            "reported_ms": n.paths_reported_ms,
        })),
        "quarantine": (n.quarantined_since_ms > 0).then(|| json!({
            "since_ms": n.quarantined_since_ms, "reason": n.quarantine_reason,
        })),
    })
}

/// A node's peers by path as the PATH column shows them: "2 direct,
/// 1 relayed" (and ", 1 no path" when some have neither); "-" when the node
/// never reported.
fn path_text(n: &apb::Node) -> String {
    if n.paths_reported_ms == 0 {
        return "-".into();
    }
    let mut text = format!("{} direct, {} relayed", n.peers_direct, n.peers_relayed);
    if n.peers_no_path > 0 {
        text.push_str(&format!(", {} no path", n.peers_no_path));
    }
    text
}

/// A node's posture as `-o json` prints it.
fn posture_json(n: &apb::Node) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = n
        .attributes
        .iter()
        .map(|a| (a.key.clone(), attr_json(a)))
        .collect();
    json!({
        "reported_ms": n.posture_reported_ms,
        "attributes": attributes,
        "checks": n.posture.iter().map(|p| json!({
            "name": p.name, "passed": p.passed, "detail": p.detail,
        })).collect::<Vec<_>>(),
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
