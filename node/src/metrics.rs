//! The node's metrics: a [`Sample`] taken from the data plane's stats
//! snapshot (refreshed every second by the data-plane thread, so a scrape
//! adds nothing to the packet path) and the agent's state, and its
//! OpenMetrics text. Pure: no I/O, no clock.
//!
//! Label sets are bounded: peers are labelled by their netmap name (never a
//! key), at most [`MAX_LABELLED_PEERS`] of them in name order, the rest
//! summed under `peer="_other"`; drop reasons and paths are fixed sets.

use std::collections::BTreeMap;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use ztmesh_proto::control::NetMap;
use ztmesh_proto::scrape::Format;

use crate::io::Stats;
use crate::path::Destination;

/// Peers labelled by name; beyond these, bytes are summed under [`OTHER_PEER`].
pub const MAX_LABELLED_PEERS: usize = 256;
/// The peer label of the peers beyond [`MAX_LABELLED_PEERS`] (and of a
/// peer the netmap does not name).
pub const OTHER_PEER: &str = "_other";

/// Which path a peer's data takes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// A fresh direct UDP path.
    Direct,
    /// Through the relay.
    Relay,
    /// Neither yet (no endpoint, or a direct path not confirmed).
    None,
}

impl PathKind {
    pub const ALL: [PathKind; 3] = [PathKind::Direct, PathKind::Relay, PathKind::None];

    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Relay => "relay",
            PathKind::None => "none",
        }
    }
}

/// Bytes exchanged with one peer (or with all peers under [`OTHER_PEER`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerBytes {
    pub name: String,
    pub rx: u64,
    pub tx: u64,
}

/// What one scrape shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Peers configured in the data plane.
    pub peers: u64,
    /// Peers by the path their data takes, in [`PathKind::ALL`] order.
    pub paths: [u64; 3],
    /// Bytes per peer, by name, at most [`MAX_LABELLED_PEERS`] + 1 rows.
    pub bytes: Vec<PeerBytes>,
    pub handshakes: u64,
    /// Drop counters by reason, as the data plane names them.
    pub drops: Vec<(&'static str, u64)>,
    pub filter_allowed: u64,
    pub filter_denied: u64,
    /// Serial of the netmap in force (0: none).
    pub serial: u64,
    /// A live session with the controller.
    pub connected: bool,
    /// Netmaps refused (bad signature, old serial, not for this node).
    pub refused_maps: u64,
}

/// The path of a peer, from its stats.
fn path_of(destination: Option<Destination>, direct: bool) -> PathKind {
    match destination {
        Some(Destination::Relay(_)) => PathKind::Relay,
        Some(Destination::Udp(_)) if direct => PathKind::Direct,
        _ => PathKind::None,
    }
}

/// The data plane's peers by the path their data takes now, in
/// [`PathKind::ALL`] order (what `/metrics` shows and flow reports carry).
pub fn path_counts(stats: &Stats) -> [u64; 3] {
    let mut counts = [0u64; 3];
    for p in &stats.peers {
        let i = PathKind::ALL
            .iter()
            .position(|k| *k == path_of(p.destination, p.direct))
            .unwrap_or(2);
        counts[i] += 1;
    }
    counts
}

/// Takes a sample from the data plane's snapshot (`None`: not running) and
/// the netmap in force (peer names).
pub fn sample(
    stats: Option<&Stats>,
    map: Option<&NetMap>,
    connected: bool,
    refused_maps: u64,
) -> Sample {
    let mut s = Sample {
        serial: map.map_or(0, |m| m.serial),
        connected,
        refused_maps,
        ..Sample::default()
    };
    let Some(stats) = stats else {
        return s;
    };
    let names: BTreeMap<&[u8], &str> = map
        .map(|m| {
            m.peers
                .iter()
                .map(|p| (p.wg_key.as_slice(), p.name.as_str()))
                .collect()
        })
        .unwrap_or_default();
    let mut by_name: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut other = (0u64, 0u64);
    for p in &stats.peers {
        s.peers += 1;
        match names.get(p.public_key.0.as_slice()) {
            Some(name) => {
                let e = by_name.entry(name).or_default();
                e.0 = e.0.saturating_add(p.rx_bytes);
                e.1 = e.1.saturating_add(p.tx_bytes);
            }
            None => {
                other.0 = other.0.saturating_add(p.rx_bytes);
                other.1 = other.1.saturating_add(p.tx_bytes);
            }
        }
    }
    for (i, (name, (rx, tx))) in by_name.into_iter().enumerate() {
        if i < MAX_LABELLED_PEERS && name != OTHER_PEER {
            s.bytes.push(PeerBytes {
                name: name.to_string(),
                rx,
                tx,
            });
        } else {
            other.0 = other.0.saturating_add(rx);
            other.1 = other.1.saturating_add(tx);
        }
    }
    if other != (0, 0) || stats.peers.len() > s.bytes.len() {
        s.bytes.push(PeerBytes {
            name: OTHER_PEER.to_string(),
            rx: other.0,
            tx: other.1,
        });
    }
    s.paths = path_counts(stats);
    s.handshakes = stats.handshakes;
    s.drops = stats.drops.clone();
    s.filter_allowed = stats.filter_allowed;
    s.filter_denied = stats.filter_denied;
    s
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

/// The exposition of `s` in `format`.
pub fn render(s: &Sample, format: Format) -> String {
    let mut r = Registry::with_prefix("ztmesh_node");
    r.register(
        "peers",
        "Peers configured in the data plane",
        gauge(s.peers),
    );
    let paths = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for (k, n) in PathKind::ALL.iter().zip(s.paths) {
        paths
            .get_or_create(&[("path", k.as_str())])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    r.register(
        "peers_by_path",
        "Peers by the path their data takes now (direct, relay, none)",
        paths,
    );
    r.register(
        "handshakes",
        "WireGuard handshakes completed",
        counter(s.handshakes),
    );
    let rx = Family::<[(&'static str, String); 1], Counter>::default();
    let tx = Family::<[(&'static str, String); 1], Counter>::default();
    for p in &s.bytes {
        rx.get_or_create(&[("peer", p.name.clone())]).inc_by(p.rx);
        tx.get_or_create(&[("peer", p.name.clone())]).inc_by(p.tx);
    }
    r.register_with_unit(
        "peer_receive",
        "WireGuard bytes received, by peer name",
        Unit::Bytes,
        rx,
    );
    r.register_with_unit(
        "peer_transmit",
        "WireGuard bytes sent, by peer name",
        Unit::Bytes,
        tx,
    );
    let drops = Family::<[(&'static str, &'static str); 1], Counter>::default();
    for (reason, n) in &s.drops {
        drops.get_or_create(&[("reason", reason)]).inc_by(*n);
    }
    r.register("drops", "Packets dropped, by reason", drops);
    let decisions = Family::<[(&'static str, &'static str); 1], Counter>::default();
    decisions
        .get_or_create(&[("decision", "allow")])
        .inc_by(s.filter_allowed);
    decisions
        .get_or_create(&[("decision", "deny")])
        .inc_by(s.filter_denied);
    r.register(
        "filter_decisions",
        "Inbound packets the filter decided on",
        decisions,
    );
    r.register(
        "netmap_serial",
        "Serial of the netmap in force (0: none)",
        gauge(s.serial),
    );
    r.register(
        "netmaps_refused",
        "Netmaps refused (signature, serial, not for this node)",
        counter(s.refused_maps),
    );
    r.register(
        "controller_connected",
        "1 while a session with the controller is live",
        gauge(u64::from(s.connected)),
    );
    let mut out = String::new();
    let written = match format {
        Format::OpenMetrics => text::encode(&mut out, &r),
        Format::Text => prometheus_text::encode(&mut out, &r),
    };
    if written.is_err() {
        // Writing to a String cannot fail; keep the exposition well formed.
        out.clear();
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ztmesh_proto::control::Peer;
    use ztmesh_proto::keys::WgPublicKey;

    use super::*;
    use crate::io::PeerStats;

    fn peer(key: u8, destination: Option<Destination>, direct: bool, rx: u64) -> PeerStats {
        PeerStats {
            public_key: WgPublicKey([key; 32]),
            endpoint: None,
            destination,
            direct,
            last_rx: None,
            last_handshake: None,
            rx_bytes: rx,
            tx_bytes: rx * 2,
            allowed_ips: Vec::new(),
            persistent_keepalive: None,
        }
    }

    fn map(names: &[(u8, &str)]) -> NetMap {
        NetMap {
            serial: 42,
            peers: names
                .iter()
                .map(|(k, n)| Peer {
                    wg_key: vec![*k; 32],
                    name: n.to_string(),
                    ..Peer::default()
                })
                .collect(),
            ..NetMap::default()
        }
    }

    fn udp() -> Option<Destination> {
        Some(Destination::Udp(SocketAddr::from(([198, 18, 0, 2], 41641))))
    }

    #[test]
    fn peers_are_named_from_the_netmap_and_counted_by_path() {
        let stats = Stats {
            peers: vec![
                peer(1, udp(), true, 10),
                peer(2, Some(Destination::Relay(7)), false, 20),
                peer(3, udp(), false, 30),
                peer(4, None, false, 5),
            ],
            drops: vec![("no_rule", 3)],
            handshakes: 2,
            filter_allowed: 9,
            filter_denied: 3,
            ..Stats::default()
        };
        let s = sample(
            Some(&stats),
            Some(&map(&[(1, "alpha"), (2, "beta"), (3, "gamma")])),
            true,
            1,
        );
        assert_eq!(s.peers, 4);
        assert_eq!(s.paths, [1, 1, 2]);
        assert_eq!(s.serial, 42);
        let names: Vec<(&str, u64, u64)> = s
            .bytes
            .iter()
            .map(|b| (b.name.as_str(), b.rx, b.tx))
            .collect();
        assert_eq!(
            names,
            [
                ("alpha", 10, 20),
                ("beta", 20, 40),
                ("gamma", 30, 60),
                ("_other", 5, 10)
            ]
        );
        let text = render(&s, Format::OpenMetrics);
        for line in [
            "ztmesh_node_peers 4",
            r#"ztmesh_node_peers_by_path{path="relay"} 1"#,
            r#"ztmesh_node_peer_receive_bytes_total{peer="beta"} 20"#,
            r#"ztmesh_node_peer_transmit_bytes_total{peer="_other"} 10"#,
            r#"ztmesh_node_drops_total{reason="no_rule"} 3"#,
            r#"ztmesh_node_filter_decisions_total{decision="allow"} 9"#,
            "ztmesh_node_handshakes_total 2",
            "ztmesh_node_netmap_serial 42",
            "ztmesh_node_netmaps_refused_total 1",
            "ztmesh_node_controller_connected 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // No key in any form.
        assert!(!text.contains(&WgPublicKey([1; 32]).to_string()), "{text}");
    }

    #[test]
    fn labelled_peers_are_bounded_and_the_rest_summed() {
        let n = MAX_LABELLED_PEERS + 10;
        let stats = Stats {
            peers: (0..n)
                .map(|_| peer(0, None, false, 1))
                .enumerate()
                .map(|(i, mut p)| {
                    p.public_key.0[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    p
                })
                .collect(),
            ..Stats::default()
        };
        let m = NetMap {
            peers: (0..n)
                .map(|i| {
                    let mut key = vec![0u8; 32];
                    key[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    Peer {
                        wg_key: key,
                        name: format!("n{i:04}"),
                        ..Peer::default()
                    }
                })
                .collect(),
            ..NetMap::default()
        };
        let s = sample(Some(&stats), Some(&m), false, 0);
        assert_eq!(s.bytes.len(), MAX_LABELLED_PEERS + 1);
        let other = s.bytes.last().unwrap();
        assert_eq!((other.name.as_str(), other.rx), (OTHER_PEER, 10));
        let total: u64 = s.bytes.iter().map(|b| b.rx).sum();
        assert_eq!(total, n as u64);
    }

    #[test]
    fn peers_are_counted_by_the_path_their_data_takes() {
        let relay = Some(Destination::Relay(7));
        for (peers, want) in [
            (vec![], [0, 0, 0]),
            (vec![peer(1, udp(), true, 0)], [1, 0, 0]),
            // The relay wins even while a direct path is fresh: data goes there.
            (vec![peer(1, relay, true, 0)], [0, 1, 0]),
            (vec![peer(1, relay, false, 0)], [0, 1, 0]),
            // An endpoint not confirmed yet, or none at all.
            (vec![peer(1, udp(), false, 0)], [0, 0, 1]),
            (vec![peer(1, None, true, 0)], [0, 0, 1]),
            (
                vec![
                    peer(1, udp(), true, 0),
                    peer(2, udp(), true, 0),
                    peer(3, relay, false, 0),
                    peer(4, None, false, 0),
                ],
                [2, 1, 1],
            ),
        ] {
            let stats = Stats {
                peers,
                ..Stats::default()
            };
            assert_eq!(path_counts(&stats), want, "{:?}", stats.peers);
        }
    }

    #[test]
    fn without_a_data_plane_only_agent_facts_show() {
        let s = sample(None, None, false, 0);
        let text = render(&s, Format::Text);
        assert!(text.contains("ztmesh_node_peers 0"), "{text}");
        assert!(
            text.contains("ztmesh_node_controller_connected 0"),
            "{text}"
        );
    }
}
