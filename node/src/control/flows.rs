//! Flow reports: what the data plane's filter summarized, as the
//! `ReportFlows` messages the controller stores. Pure.

use std::time::{SystemTime, UNIX_EPOCH};

use ztmesh_proto::control as pb;

use crate::io::{FlowLog, Stats};

/// The summaries of one report: allowed flows first, then denied ones, each
/// already bounded by the filter ([`crate::filter::MAX_ALLOWED_FLOWS`],
/// [`crate::filter::MAX_DENIED_FLOWS`]).
pub fn summaries(log: &FlowLog) -> Vec<pb::FlowSummary> {
    let allowed = log.allowed.iter().map(|f| pb::FlowSummary {
        src: f.key.src.to_string(),
        dst: f.key.dst.to_string(),
        protocol: u32::from(f.key.proto),
        dst_port: u32::from(f.key.dst_port),
        allowed: true,
        rule_id: f.key.rule_id.to_string(),
        packets: f.packets,
        bytes: f.bytes,
        reply_packets: f.reply_packets,
        reply_bytes: f.reply_bytes,
        first_seen_ms: unix_ms(f.first_seen),
        last_seen_ms: unix_ms(f.last_seen),
        ..Default::default()
    });
    let denied = log.denied.iter().map(|(f, n)| pb::FlowSummary {
        src: f.src.to_string(),
        dst: f.dst.to_string(),
        protocol: u32::from(f.proto),
        dst_port: u32::from(f.dst_port),
        allowed: false,
        reason: f.reason.as_str().to_string(),
        packets: *n,
        ..Default::default()
    });
    allowed.chain(denied).collect()
}

/// The verified initiations from keys that are not peers, per key.
pub fn unknown_handshakes(log: &FlowLog) -> Vec<pb::UnknownHandshakes> {
    log.unknown_handshakes
        .iter()
        .map(|(key, count)| pb::UnknownHandshakes {
            wg_key: key.to_vec(),
            count: *count,
        })
        .collect()
}

/// The peers by path that every report carries, counted as `/metrics`
/// counts them ([`crate::metrics::path_counts`]).
pub fn peer_paths(stats: &Stats) -> pb::PeerPaths {
    let [direct, relayed, none] = crate::metrics::path_counts(stats).map(saturating_u32);
    pb::PeerPaths {
        direct,
        relayed,
        none,
    }
}

fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::filter::{AllowedKey, DeniedFlow, Reason};
    use crate::io::AllowedFlow;

    #[test]
    fn allowed_flows_carry_rule_bytes_and_times_denied_their_reason() {
        let src = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
        let dst = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1));
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        let log = FlowLog {
            allowed: vec![AllowedFlow {
                key: AllowedKey {
                    src,
                    dst,
                    proto: 6,
                    dst_port: 22,
                    rule_id: Arc::from("policy.hujson:12"),
                },
                packets: 3,
                bytes: 180,
                reply_packets: 2,
                reply_bytes: 120,
                first_seen: at(1_000),
                last_seen: at(4_000),
            }],
            allowed_overflow: 0,
            denied: vec![(
                DeniedFlow {
                    src,
                    dst,
                    proto: 17,
                    dst_port: 53,
                    reason: Reason::NoRule,
                },
                7,
            )],
            unknown_handshakes: vec![([9; 32], 4)],
        };
        assert_eq!(
            unknown_handshakes(&log),
            vec![pb::UnknownHandshakes {
                wg_key: vec![9; 32],
                count: 4
            }]
        );
        let got = summaries(&log);
        assert_eq!(
            got,
            vec![
                pb::FlowSummary {
                    src: "100.64.0.2".into(),
                    dst: "100.64.0.1".into(),
                    protocol: 6,
                    dst_port: 22,
                    allowed: true,
                    reason: String::new(),
                    packets: 3,
                    rule_id: "policy.hujson:12".into(),
                    bytes: 180,
                    reply_packets: 2,
                    reply_bytes: 120,
                    first_seen_ms: 1_000,
                    last_seen_ms: 4_000,
                },
                pb::FlowSummary {
                    src: "100.64.0.2".into(),
                    dst: "100.64.0.1".into(),
                    protocol: 17,
                    dst_port: 53,
                    allowed: false,
                    reason: "no_rule".into(),
                    packets: 7,
                    ..Default::default()
                },
            ]
        );
    }
}
