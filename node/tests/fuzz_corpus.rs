//! Fuzz corpus replay for the node targets (`fuzz/`: packet_parse,
//! filter_inbound, device_udp, wgconf_parse, uapi_set, dns_query).
//! Every committed input goes through the target's own check
//! (`fuzz/replay.rs`).
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

#[path = "../../fuzz/replay.rs"]
mod replay;
use replay::replay;

#[path = "../../fuzz/checks/device_udp.rs"]
mod device_udp;
#[path = "../../fuzz/checks/dns_query.rs"]
mod dns_query;
#[path = "../../fuzz/checks/filter_inbound.rs"]
mod filter_inbound;
#[path = "../../fuzz/checks/packet_parse.rs"]
mod packet_parse;
#[path = "../../fuzz/checks/uapi_set.rs"]
mod uapi_set;
#[path = "../../fuzz/checks/wgconf_parse.rs"]
mod wgconf_parse;

#[test]
fn packet_parse_corpus_replays_cleanly() {
    replay("packet_parse", packet_parse::run);
}

#[test]
fn filter_inbound_corpus_replays_cleanly() {
    replay("filter_inbound", filter_inbound::run);
}

#[test]
fn device_udp_corpus_replays_cleanly() {
    replay("device_udp", device_udp::run);
}

#[test]
fn wgconf_parse_corpus_replays_cleanly() {
    replay("wgconf_parse", wgconf_parse::run);
}

#[test]
fn uapi_set_corpus_replays_cleanly() {
    replay("uapi_set", uapi_set::run);
}

#[test]
fn dns_query_corpus_replays_cleanly() {
    replay("dns_query", dns_query::run);
}
