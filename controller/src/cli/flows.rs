//! `flows`: the flow log — allowed flows with the rule that admitted them,
//! denied ones with the reason — newest first, from the running controller;
//! and `detections`: what the detectors made of them.

use std::time::Duration;

use serde_json::json;
use ztmesh_proto::admin as apb;

use super::client::{status_err, Client};
use super::output::{ms_to_text, print_json};
use super::{parse_duration, Output, OutputArg};
use clap::Args;

/// What `flows` asks for.
#[derive(Args, Debug, Clone)]
pub struct FlowsArgs {
    /// Only flows this node (name or id) received.
    #[arg(long)]
    pub node: Option<String>,
    /// Only flows reported in the last DURATION (e.g. 15m, 1h, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Only denied flows.
    #[arg(long, conflicts_with = "allowed")]
    pub denied: bool,
    /// Only allowed flows.
    #[arg(long)]
    pub allowed: bool,
    /// At most this many records (at most 10000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Only records older than this id (to page back: the last id shown).
    #[arg(long)]
    pub before_id: Option<u64>,
    #[command(flatten)]
    pub output: OutputArg,
}

pub(super) async fn run(c: &mut Client, a: FlowsArgs) -> anyhow::Result<()> {
    let since_ms = a.since.map_or(0, |d| {
        crate::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    });
    let flows = c
        .list_flows(apb::ListFlowsRequest {
            node: a.node.unwrap_or_default(),
            since_ms,
            denied_only: a.denied,
            allowed_only: a.allowed,
            limit: a.limit,
            before_id: a.before_id.unwrap_or(0),
        })
        .await
        .map_err(status_err)?
        .into_inner()
        .flows;
    if a.output == Output::Json {
        print_json(&json!(flows.iter().map(record_json).collect::<Vec<_>>()));
        return Ok(());
    }
    println!(
        "{:>8} {:<20} {:<14} {:<40} {:<6} {:<24} {:>8} {:>10} {:>10}",
        "ID", "TIME", "NODE", "FLOW", "", "RULE/REASON", "PACKETS", "BYTES", "REPLY"
    );
    for f in &flows {
        println!(
            "{:>8} {:<20} {:<14} {:<40} {:<6} {:<24} {:>8} {:>10} {:>10}",
            f.id,
            ms_to_text(f.time_ms),
            f.node,
            flow_text(f),
            if f.allowed { "allow" } else { "deny" },
            if f.allowed { &f.rule_id } else { &f.reason },
            f.packets,
            f.bytes,
            f.reply_bytes,
        );
    }
    Ok(())
}

pub(super) async fn detections(
    c: &mut Client,
    limit: u32,
    before_id: Option<u64>,
    output: Output,
) -> anyhow::Result<()> {
    let found = c
        .list_detections(apb::ListDetectionsRequest {
            limit,
            before_id: before_id.unwrap_or(0),
        })
        .await
        .map_err(status_err)?
        .into_inner()
        .detections;
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    if output == Output::Json {
        let all: Vec<serde_json::Value> = found
            .iter()
            .map(|d| {
                json!({
                    "id": d.id, "time_ms": d.time_ms, "time": ms_to_text(d.time_ms),
                    "node": d.node, "node_id": d.node_id,
                    "detectors": parse(&d.detectors_json), "action": d.action,
                    "evidence": parse(&d.evidence_json), "alert": d.alert,
                })
            })
            .collect();
        print_json(&json!(all));
        return Ok(());
    }
    println!(
        "{:>6} {:<20} {:<16} {:<28} {:<32} ALERT",
        "ID", "TIME", "NODE", "DETECTORS", "ACTION"
    );
    for d in &found {
        let fired: Vec<String> = parse(&d.detectors_json)
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| format!("{}={}", f["detector"].as_str().unwrap_or("?"), f["value"]))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:>6} {:<20} {:<16} {:<28} {:<32} {}",
            d.id,
            ms_to_text(d.time_ms),
            d.node,
            fired.join(","),
            d.action,
            d.alert
        );
        let evidence = parse(&d.evidence_json);
        let list = evidence
            .get("testimonies")
            .unwrap_or(&evidence)
            .as_array()
            .cloned()
            .unwrap_or_default();
        for t in list {
            let names: Vec<&str> = t["reporter_names"]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
                .unwrap_or_default();
            println!(
                "{:>6}   seen by {} ({}): {} ports, {} denied flows ({} packets), {} handshakes",
                "",
                names.join(","),
                t["principal"].as_str().unwrap_or("?"),
                t["ports"],
                t["denied_flows"],
                t["denied_packets"],
                t["handshakes"]
            );
        }
    }
    Ok(())
}

/// "100.64.0.2 -> 100.64.0.1:22/tcp".
fn flow_text(f: &apb::FlowRecord) -> String {
    let proto = ztmesh_policy::proto_name(u8::try_from(f.protocol).unwrap_or(0));
    let dst = if f.dst.contains(':') {
        format!("[{}]", f.dst)
    } else {
        f.dst.clone()
    };
    if ztmesh_policy::proto_has_ports(u8::try_from(f.protocol).unwrap_or(0)) {
        format!("{} -> {dst}:{}/{proto}", f.src, f.dst_port)
    } else {
        format!("{} -> {dst} {proto}", f.src)
    }
}

fn record_json(f: &apb::FlowRecord) -> serde_json::Value {
    json!({
        "id": f.id,
        "time_ms": f.time_ms,
        "time": ms_to_text(f.time_ms),
        "node": f.node,
        "node_id": f.node_id,
        "src": f.src,
        "dst": f.dst,
        "protocol": f.protocol,
        "proto": ztmesh_policy::proto_name(u8::try_from(f.protocol).unwrap_or(0)),
        "dst_port": f.dst_port,
        "action": if f.allowed { "allow" } else { "deny" },
        "rule": if f.allowed { Some(&f.rule_id) } else { None },
        "reason": if f.allowed { None } else { Some(&f.reason) },
        "packets": f.packets,
        "bytes": f.bytes,
        "reply_packets": f.reply_packets,
        "reply_bytes": f.reply_bytes,
        "first_seen_ms": f.first_seen_ms,
        "last_seen_ms": f.last_seen_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_read_as_source_destination_port_and_protocol() {
        let mut f = apb::FlowRecord {
            src: "100.64.0.2".into(),
            dst: "100.64.0.1".into(),
            protocol: 6,
            dst_port: 22,
            allowed: true,
            rule_id: "policy.hujson:12".into(),
            ..Default::default()
        };
        assert_eq!(flow_text(&f), "100.64.0.2 -> 100.64.0.1:22/tcp");
        let v = record_json(&f);
        assert_eq!(
            (v["action"].as_str(), v["rule"].as_str()),
            (Some("allow"), Some("policy.hujson:12"))
        );
        assert!(v["reason"].is_null());
        f.dst = "fd7a:115c:a1e0::1".into();
        f.protocol = 58;
        assert_eq!(flow_text(&f), "100.64.0.2 -> [fd7a:115c:a1e0::1] ipv6-icmp");
    }
}
