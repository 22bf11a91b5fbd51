//! The relay end to end on 127.0.0.1: a real relay (quinn, TLS over TCP,
//! STUN sockets), real clients, maps signed by a test controller key.
//!
//! ```text
//!   node 1 ──QUIC or TLS/TCP──┐
//!   node 2 ──QUIC or TLS/TCP──┼── relay (127.0.0.1: QUIC, TCP, 2 × STUN; DATA_DIR/stats.json)
//!   node 3, impostors, raw ───┘
//! ```
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ztmesh_proto::auth::NodeProof;
use ztmesh_proto::relay::{hello_method, kind, Frame, MAX_FRAME_LEN, MAX_MAP_FRAME_LEN};
use ztmesh_proto::stun::{binding_request, parse_binding_response};
use ztmesh_proto::time::now_ms;
use ztmesh_relay::client::{ClientError, Transport};
use ztmesh_relay::core::SESSION_BASE_BYTES;
use ztmesh_relay::limiter::LimiterConfig;
use ztmesh_relay::server::Running;
use ztmesh_relay::wire::{client_tls, transport, SERVER_NAME};

/// Node 1 and node 2 exchange full-size datagrams, both directions, on
/// the given transports; every byte arrives intact and is counted.
async fn exchange(w: &World, relay: &Running, t1: Transport, t2: Transport, serial: u64) {
    let mut a = w
        .connect(relay, t1, 1, &w.map(1, &[2], serial))
        .await
        .unwrap();
    let mut b = w
        .connect(relay, t2, 2, &w.map(2, &[1], serial))
        .await
        .unwrap();
    assert_eq!((a.node_id(), b.node_id()), (1, 2));
    if t1 == Transport::Quic {
        let max = a.max_datagram_size().expect("datagrams enabled");
        assert!(
            max >= 8 + 1_312,
            "a full tunnel packet fits a QUIC datagram: {max}"
        );
    }
    for (n, len) in [(1u8, 1_312), (2, 1_400), (3, 1_312), (4, 1_400)] {
        a.send(2, &datagram(1, n, len)).await.unwrap();
        assert_eq!(recv(&mut b).await, (1, datagram(1, n, len)), "1 → 2 #{n}");
        b.send(1, &datagram(2, n, len)).await.unwrap();
        assert_eq!(recv(&mut a).await, (2, datagram(2, n, len)), "2 → 1 #{n}");
    }
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn paired_nodes_exchange_full_size_datagrams_over_quic_and_tcp() {
    let w = World::new(1);
    let relay = w.relay().await;
    exchange(&w, &relay, Transport::Quic, Transport::Quic, 10).await;
    exchange(&w, &relay, Transport::Tcp, Transport::Tcp, 11).await;
    exchange(&w, &relay, Transport::Quic, Transport::Tcp, 12).await;
    let v = w
        .stats_until("the pairs' traffic", |v| pair(v, 1, 2).1 == 12)
        .await;
    assert_eq!(pair(&v, 1, 2), (3 * 2 * (1_312 + 1_400), 12));
    assert_eq!(pair(&v, 2, 1), (3 * 2 * (1_312 + 1_400), 12));
    assert_eq!(count(&v, "transport", "quic_connections"), 3);
    assert_eq!(count(&v, "transport", "tcp_connections"), 3);
    relay.stop().await.unwrap();
}

/// The data plane's way in: `connect_into` delivers received datagrams to
/// the caller's channel, `RelaySender::try_send` sends without waiting
/// (QUIC datagram or DATA frame), and `recv` reports the session's end,
/// here the relay stopping.
#[tokio::test]
async fn connect_into_delivers_to_the_callers_channel_and_try_send_never_waits() {
    let w = World::new(1);
    let relay = w.relay().await;
    let mut last = None;
    for (t, serial) in [(Transport::Tcp, 20), (Transport::Quic, 21)] {
        let (tx, mut inbound) = tokio::sync::mpsc::channel(16);
        let a = ztmesh_relay::client::RelayClient::connect_into(
            &target(&relay, t),
            &w.machines[1],
            &w.map(1, &[2], serial),
            PATIENCE,
            tx,
        )
        .await
        .unwrap();
        let mut b = w.joined(&relay, t, 2, &[1], serial).await;
        let (to_b, to_a) = (a.sender(), b.sender());
        for (n, len) in [(1u8, 1_312), (2, 1_400)] {
            to_a.try_send(1, &datagram(2, n, len)).unwrap();
            let got = tokio::time::timeout(PATIENCE, inbound.recv()).await;
            assert_eq!(got.unwrap(), Some((2, datagram(2, n, len))), "{t:?} #{n}");
            to_b.try_send(2, &datagram(1, n, len)).unwrap();
            assert_eq!(recv(&mut b).await, (1, datagram(1, n, len)), "{t:?} #{n}");
        }
        b.close().await;
        last = Some(a);
    }
    let mut a = last.expect("the QUIC session");
    relay.stop().await.unwrap();
    let ended = tokio::time::timeout(PATIENCE, a.recv()).await;
    assert!(
        matches!(ended, Ok(Err(ClientError::Closed(_)))),
        "recv reports the end: {ended:?}"
    );
}

#[tokio::test]
async fn nodes_the_policy_does_not_pair_are_never_bridged() {
    let w = World::new(2);
    let relay = w.relay().await;
    // 1 lists 2, but 2 lists only 3: one-sided listing is not enough.
    let a = w.joined(&relay, Transport::Quic, 1, &[2], 1).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[3], 1).await;
    let c = w.joined(&relay, Transport::Quic, 3, &[2], 1).await;
    for n in 0..5 {
        a.send(2, &datagram(1, n, 1_312)).await.unwrap();
    }
    let v = w
        .stats_until("five unpaired drops", |v| {
            count(v, "drops", "not_listed_by_peer") == 5
        })
        .await;
    assert_eq!(pair(&v, 1, 2), (0, 0), "nothing forwarded for the pair");
    // The paired neighbour gets through, and it is the first thing 2 receives.
    c.send(2, &datagram(3, 9, 100)).await.unwrap();
    assert_eq!(recv(&mut b).await, (3, datagram(3, 9, 100)));
    // 2 cannot reach 1 either: 2's map does not list 1.
    b.send(1, &datagram(2, 1, 100)).await.unwrap();
    w.stats_until("the reverse drop", |v| {
        count(v, "drops", "not_listed_by_source") == 1
    })
    .await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_impostor_with_a_copied_map_but_without_the_machine_key_is_refused() {
    let w = World::new(3);
    let relay = w.relay().await;
    let copied = w.map(1, &[2], 1);
    // Machine 5 proves its own key, with node 1's genuine map.
    let err = connect_as(&w, &relay, 5, &copied, Transport::Quic)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(r) if r.contains("another machine key")),
        "{err}"
    );
    // The genuine node 1 is unaffected.
    let _a = w
        .connect(&relay, Transport::Quic, 1, &copied)
        .await
        .unwrap();
    let v = w
        .stats_until("the refusal and node 1's session", |v| {
            count(v, "refusals", "key_mismatch") == 1
                && v["sessions"].as_array().map(Vec::len) == Some(1)
        })
        .await;
    assert_eq!(v["sessions"][0]["node"], 1);
    relay.stop().await.unwrap();
}

/// Connects with machine key `key_id`, presenting `map`.
async fn connect_as(
    w: &World,
    relay: &Running,
    key_id: usize,
    map: &ztmesh_proto::control::SignedNetMap,
    transport: Transport,
) -> Result<ztmesh_relay::client::RelayClient, ClientError> {
    ztmesh_relay::client::RelayClient::connect(
        &target(relay, transport),
        &w.machines[key_id],
        map,
        PATIENCE,
    )
    .await
}

#[tokio::test]
async fn a_deleted_node_is_cut_off_when_its_peer_presents_its_next_map() {
    let w = World::new(4);
    let relay = w.relay().await;
    let a = w.joined(&relay, Transport::Quic, 1, &[2], 5).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[1], 5).await;
    a.send(2, &datagram(1, 1, 1_312)).await.unwrap();
    assert_eq!(recv(&mut b).await.0, 1);
    // Node 1 is deleted: the controller's next map for 2 no longer lists it.
    b.push_map(&w.map(2, &[], 6)).await.unwrap();
    w.stats_until("the new map", |v| v["maps_accepted"] == 1)
        .await;
    a.send(2, &datagram(1, 2, 1_312)).await.unwrap();
    b.send(1, &datagram(2, 2, 1_312)).await.unwrap();
    let v = w
        .stats_until("both directions dropped", |v| {
            count(v, "drops", "not_listed_by_peer") == 1
                && count(v, "drops", "not_listed_by_source") == 1
        })
        .await;
    assert_eq!(
        pair(&v, 1, 2),
        (1_312, 1),
        "only the datagram before the deletion"
    );
    assert_eq!(pair(&v, 2, 1), (0, 0));
    // Both sessions stay up: the relay keeps serving them.
    a.send(2, &datagram(1, 3, 10)).await.unwrap();
    w.stats_until("the next drop", |v| {
        count(v, "drops", "not_listed_by_peer") == 2
    })
    .await;
    drop(a);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_expired_map_and_a_stale_serial_are_refused() {
    let w = World::new(5);
    let relay = w.relay().await;
    let expired = w.map_until(1, &[2], 10, now_ms() - 1);
    let err = w
        .connect(&relay, Transport::Tcp, 1, &expired)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(r) if r.contains("expired")),
        "{err}"
    );
    // Serial 10, then a rollback to 9.
    let a = w.joined(&relay, Transport::Quic, 1, &[2], 10).await;
    a.close().await;
    w.stats_until("the session to end", |v| {
        v["sessions"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let err = w
        .connect(&relay, Transport::Quic, 1, &w.map(1, &[2], 9))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(r) if r.contains("older")),
        "{err}"
    );
    // A MAP that is not newer ends the session, with the reason.
    let mut a = w.joined(&relay, Transport::Tcp, 1, &[2], 10).await;
    a.push_map(&w.map(1, &[2], 10)).await.unwrap();
    let end = tokio::time::timeout(PATIENCE, a.recv())
        .await
        .expect("ends");
    assert!(
        matches!(&end, Err(ClientError::Closed(r)) if r.contains("older")),
        "{end:?}"
    );
    let v = w
        .stats_until("the refusals", |v| {
            count(v, "refusals", "stale_serial") == 2
        })
        .await;
    assert_eq!(count(&v, "refusals", "expired_map"), 1);
    relay.stop().await.unwrap();
}

fn hello_bytes(w: &World, id: u64, serial: u64) -> Vec<u8> {
    Frame::Hello {
        proof: NodeProof::create(
            &w.machines[id as usize],
            &hello_method(NAME),
            now_ms(),
            &mut OsRng,
        ),
        map: w.map(id, &[1, 2], serial),
    }
    .to_vec()
    .unwrap()
}

async fn raw_tls(relay: &Running) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(&relay.identity.tcp_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME)
        .unwrap()
        .to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(client_tls(relay.fingerprint)))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads until the relay closes the stream; returns what it sent.
async fn until_closed<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, r.read_to_end(&mut all))
        .await
        .expect("the relay closes the connection");
    all
}

#[tokio::test]
async fn malformed_frames_are_counted_and_close_only_that_connection() {
    let w = World::new(6);
    let relay = w.relay().await;
    let mut a = w.joined(&relay, Transport::Quic, 1, &[2], 1).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[1], 1).await;

    // 1. A length beyond the maximum instead of a HELLO.
    let mut s = raw_tls(&relay).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let got = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("malformed HELLO: frame length"), "{text}");

    // 2. A valid HELLO, then a frame of an unknown type.
    let mut s = raw_tls(&relay).await;
    s.write_all(&hello_bytes(&w, 3, 1)).await.unwrap();
    s.write_all(&[0, 0, 0, 2, 77, 0]).await.unwrap();
    let got = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("unknown frame type 77"), "{text}");

    // 3. A valid HELLO, then a DATA frame without a datagram.
    let mut s = raw_tls(&relay).await;
    s.write_all(&hello_bytes(&w, 4, 1)).await.unwrap();
    s.write_all(&[0, 0, 0, 9, 5, 0, 0, 0, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    until_closed(&mut s).await;

    // 4. QUIC: datagrams too short for a peer id are counted and dropped;
    // the connection stays.
    let (_endpoint, conn) = raw_quic(&relay).await;
    let (mut send, mut stream) = conn.open_bi().await.unwrap();
    send.write_all(&hello_bytes(&w, 5, 1)).await.unwrap();
    let mut welcome = [0u8; 13];
    stream.read_exact(&mut welcome).await.unwrap();
    assert_eq!(welcome[4], 3, "WELCOME");
    for _ in 0..3 {
        conn.send_datagram(vec![1, 2, 3].into()).unwrap();
    }
    // ...then an oversized DATA frame on its stream closes it (refused on
    // its type byte, before the body).
    send.write_all(&(70_000u32).to_be_bytes()).await.unwrap();
    send.write_all(&[kind::DATA]).await.unwrap();
    until_closed(&mut stream).await;

    let v = w
        .stats_until("the malformed input", |v| {
            count(v, "drops", "malformed_frame") == 4
                && count(v, "drops", "malformed_datagram") == 3
        })
        .await;
    assert_eq!(v["hellos_accepted"], 5);

    // The relay keeps serving the others.
    a.send(2, &datagram(1, 1, 1_312)).await.unwrap();
    assert_eq!(recv(&mut b).await, (1, datagram(1, 1, 1_312)));
    b.send(1, &datagram(2, 1, 1_400)).await.unwrap();
    assert_eq!(recv(&mut a).await, (2, datagram(2, 1, 1_400)));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn the_memory_budget_refuses_a_new_node_while_the_connected_ones_keep_working() {
    let w = World::new(7);
    let mut cfg = w.config();
    // Room for two sessions (and their pair counters), not three.
    cfg.memory_budget = 2 * (SESSION_BASE_BYTES + 100) + 1_000;
    let relay = ztmesh_relay::server::start(cfg).await.unwrap();
    let mut a = w.joined(&relay, Transport::Quic, 1, &[2, 3], 1).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[1, 3], 1).await;
    let err = w
        .connect(&relay, Transport::Quic, 3, &w.map(3, &[1, 2], 1))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(r) if r.contains("memory budget")),
        "{err}"
    );
    for n in 0..3 {
        a.send(2, &datagram(1, n, 1_312)).await.unwrap();
        assert_eq!(recv(&mut b).await, (1, datagram(1, n, 1_312)));
        b.send(1, &datagram(2, n, 1_312)).await.unwrap();
        assert_eq!(recv(&mut a).await, (2, datagram(2, n, 1_312)));
    }
    let v = w
        .stats_until("the refusal", |v| {
            count(v, "refusals", "over_memory_budget") == 1
        })
        .await;
    assert!(v["memory_estimate"].as_u64().unwrap() <= v["memory_budget"].as_u64().unwrap());
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_restarted_relay_keeps_its_certificate_and_clients_reconnect() {
    let w = World::new(8);
    let relay = w.relay().await;
    let first = relay.identity.clone();
    let mut a = w.joined(&relay, Transport::Quic, 1, &[2], 3).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[1], 3).await;
    a.send(2, &datagram(1, 1, 1_312)).await.unwrap();
    assert_eq!(recv(&mut b).await.0, 1);
    relay.stop().await.unwrap();
    // Both clients learn that the session ended.
    for c in [&mut a, &mut b] {
        let end = tokio::time::timeout(PATIENCE, c.recv())
            .await
            .expect("ends");
        assert!(matches!(end, Err(ClientError::Closed(_))), "{end:?}");
    }
    // Same data dir, same ports.
    let mut cfg = w.config();
    cfg.quic_listen = first.quic_addr.parse().unwrap();
    cfg.tcp_listen = first.tcp_addr.parse().unwrap();
    cfg.stun_listen = first
        .stun_addrs
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let relay = ztmesh_relay::server::start(cfg).await.unwrap();
    assert_eq!(relay.identity, first, "same certificate, same addresses");
    // The nodes reconnect with the maps they hold (pinned to the same cert).
    let mut a = w.joined(&relay, Transport::Quic, 1, &[2], 3).await;
    let mut b = w.joined(&relay, Transport::Tcp, 2, &[1], 3).await;
    a.send(2, &datagram(1, 2, 1_400)).await.unwrap();
    assert_eq!(recv(&mut b).await, (1, datagram(1, 2, 1_400)));
    b.send(1, &datagram(2, 2, 1_400)).await.unwrap();
    assert_eq!(recv(&mut a).await, (2, datagram(2, 2, 1_400)));
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_session_of_a_node_replaces_the_first() {
    let w = World::new(9);
    let relay = w.relay().await;
    let map = w.map(1, &[2], 1);
    let mut old = w.connect(&relay, Transport::Tcp, 1, &map).await.unwrap();
    let mut new = w.connect(&relay, Transport::Quic, 1, &map).await.unwrap();
    let end = tokio::time::timeout(PATIENCE, old.recv())
        .await
        .expect("ends");
    assert!(
        matches!(&end, Err(ClientError::Closed(r)) if r.contains("replaced")),
        "{end:?}"
    );
    let b = w.joined(&relay, Transport::Tcp, 2, &[1], 1).await;
    b.send(1, &datagram(2, 1, 1_312)).await.unwrap();
    assert_eq!(recv(&mut new).await.0, 2);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn stun_sockets_answer_binding_requests_and_count_the_rest() {
    let w = World::new(10);
    let relay = w.relay().await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    for (i, stun) in relay.identity.stun_addrs.iter().enumerate() {
        let txid = [i as u8 + 1; 12];
        sock.send_to(&binding_request(txid), stun).await.unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = tokio::time::timeout(PATIENCE, sock.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert_eq!(from.to_string(), *stun);
        assert_eq!(parse_binding_response(&buf[..n]), Ok((txid, me)));
        // Not STUN at all, and a WireGuard-looking datagram: no answer.
        sock.send_to(&[1, 0, 0, 0, 9, 9], stun).await.unwrap();
        sock.send_to(b"hello", stun).await.unwrap();
    }
    let v = w
        .stats_until("the STUN counters", |v| {
            count(v, "transport", "stun_answered") == 2
                && count(v, "transport", "stun_dropped") == 4
        })
        .await;
    assert_eq!(v["name"], NAME);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn slow_handshakes_time_out_and_sources_are_capped() {
    let w = World::new(11);
    let mut cfg = w.config();
    cfg.handshake_timeout = Duration::from_secs(1);
    cfg.max_conns_per_source = 2;
    let relay = ztmesh_relay::server::start(cfg).await.unwrap();
    let addr = relay.identity.tcp_addr.clone();
    // Two silent connections take the source's slots...
    let mut s1 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut s2 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // ...so a third is closed at once...
    let mut s3 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(until_closed(&mut s3).await.is_empty());
    // ...and the silent ones are closed at the deadline.
    until_closed(&mut s1).await;
    until_closed(&mut s2).await;
    let v = w
        .stats_until("the counters", |v| {
            count(v, "transport", "handshake_timeouts") == 2
                && count(v, "transport", "over_source_cap") >= 1
        })
        .await;
    assert_eq!(count(&v, "transport", "tcp_connections"), 0);
    // The slots are free again: a real node gets in.
    let _a = w.joined(&relay, Transport::Tcp, 1, &[], 1).await;
    relay.stop().await.unwrap();
}

/// A raw QUIC connection to the relay (no HELLO yet).
async fn raw_quic(relay: &Running) -> (quinn::Endpoint, quinn::Connection) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(relay.fingerprint)).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport(0, None)));
    let conn = endpoint
        .connect_with(cfg, relay.identity.quic_addr.parse().unwrap(), SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

#[tokio::test]
async fn a_hello_with_a_map_of_two_thousand_peers_is_accepted_and_the_pair_exchanges_datagrams() {
    let w = World::new(12);
    let relay = w.relay().await;
    let many: Vec<u64> = std::iter::once(2).chain(100..2_099).collect();
    assert_eq!(many.len(), 2_000);
    let big = w.map(1, &many, 1);
    let hello = Frame::Hello {
        proof: NodeProof::create(&w.machines[1], &hello_method(NAME), now_ms(), &mut OsRng),
        map: big.clone(),
    }
    .to_vec()
    .unwrap();
    assert!(
        hello.len() > MAX_FRAME_LEN,
        "the HELLO ({} bytes) is larger than a data frame",
        hello.len()
    );
    for (t1, t2) in [
        (Transport::Quic, Transport::Tcp),
        (Transport::Tcp, Transport::Quic),
    ] {
        let mut a = w.connect(&relay, t1, 1, &big).await.unwrap();
        let mut b = w.joined(&relay, t2, 2, &[1], 1).await;
        a.send(2, &datagram(1, 1, 1_312)).await.unwrap();
        assert_eq!(recv(&mut b).await, (1, datagram(1, 1, 1_312)));
        b.send(1, &datagram(2, 1, 1_400)).await.unwrap();
        assert_eq!(recv(&mut a).await, (2, datagram(2, 1, 1_400)));
        a.close().await;
        b.close().await;
        w.stats_until("both sessions to end", |v| {
            v["sessions"].as_array().is_some_and(Vec::is_empty)
        })
        .await;
    }
    // A MAP that large goes through too, and the session keeps forwarding.
    let mut a = w.joined(&relay, Transport::Tcp, 1, &[2], 1).await;
    let mut b = w.joined(&relay, Transport::Quic, 2, &[1], 1).await;
    b.push_map(
        &w.map(
            2,
            &many
                .iter()
                .map(|&p| if p == 2 { 1 } else { p })
                .collect::<Vec<_>>(),
            2,
        ),
    )
    .await
    .unwrap();
    let v = w
        .stats_until("the large MAP", |v| v["maps_accepted"] == 1)
        .await;
    assert_eq!(
        v["sessions"][1]["peers"], 2_000,
        "node 2's session holds the large map"
    );
    a.send(2, &datagram(1, 2, 1_312)).await.unwrap();
    assert_eq!(recv(&mut b).await, (1, datagram(1, 2, 1_312)));
    b.send(1, &datagram(2, 2, 1_312)).await.unwrap();
    assert_eq!(recv(&mut a).await, (2, datagram(2, 2, 1_312)));
    let v = w
        .stats_until("the buffers to be freed", |v| {
            count(v, "", "session_buffers") == 0 && v["hellos_accepted"] == 6
        })
        .await;
    assert_eq!(count(&v, "", "unauthenticated_buffers"), 0);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn length_prefixes_beyond_the_bound_of_their_type_are_refused_with_a_reason() {
    let w = World::new(13);
    let relay = w.relay().await;
    // One past the map bound: refused on the prefix alone.
    let mut s = raw_tls(&relay).await;
    s.write_all(&(MAX_MAP_FRAME_LEN as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(
        text.contains(&format!("exceeds the maximum {MAX_MAP_FRAME_LEN}")),
        "{text}"
    );
    // One past the data bound, typed DATA: refused on the type byte.
    let mut s = raw_tls(&relay).await;
    let mut head = (MAX_FRAME_LEN as u32 + 1).to_be_bytes().to_vec();
    head.push(kind::DATA);
    s.write_all(&head).await.unwrap();
    let text = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
    assert!(
        text.contains(&format!("exceeds the maximum {MAX_FRAME_LEN}")),
        "{text}"
    );
    w.stats_until("two malformed HELLOs", |v| {
        count(v, "drops", "malformed_frame") == 2
    })
    .await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_large_hello_that_trickles_is_cut_off_by_the_deadline_or_the_budget() {
    let w = World::new(14);
    let mut cfg = w.config();
    // Generous enough that a loaded machine still reaches the budget
    // refusal below before the deadline.
    cfg.handshake_timeout = Duration::from_secs(3);
    // A quarter of it (512 KiB) for the HELLOs of clients not yet welcomed.
    cfg.memory_budget = 2 << 20;
    let relay = ztmesh_relay::server::start(cfg).await.unwrap();
    let eight_mib = (8u32 << 20).to_be_bytes();

    // Announces 8 MiB, sends a little, then nothing: the deadline ends it.
    let mut s = raw_tls(&relay).await;
    s.write_all(&eight_mib).await.unwrap();
    s.write_all(&[kind::HELLO]).await.unwrap();
    s.write_all(&[0; 1_000]).await.unwrap();
    assert!(
        until_closed(&mut s).await.is_empty(),
        "no REFUSED, just closed"
    );
    w.stats_until("the timeout", |v| {
        count(v, "transport", "handshake_timeouts") == 1
    })
    .await;

    // Announces 8 MiB and sends fast: refused at the unauthenticated share.
    let (_endpoint, conn) = raw_quic(&relay).await;
    let (mut send, mut stream) = conn.open_bi().await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = send.write_all(&eight_mib).await;
        let _ = send.write_all(&[kind::HELLO]).await;
        for _ in 0..16 {
            if send.write_all(&[0; 64 * 1024]).await.is_err() {
                break;
            }
        }
    });
    let text = String::from_utf8_lossy(&until_closed(&mut stream).await).into_owned();
    assert!(text.contains("memory budget"), "{text}");
    writer.abort();
    let v = w
        .stats_until("the budget refusal", |v| {
            count(v, "refusals", "over_memory_budget") == 1
        })
        .await;
    assert_eq!(count(&v, "", "unauthenticated_buffers"), 0, "all returned");
    // A real node still gets in.
    let _a = w.joined(&relay, Transport::Tcp, 1, &[], 1).await;
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn a_source_that_sends_invalid_hellos_is_blocked_before_the_handshake() {
    let w = World::new(15);
    let mut cfg = w.config();
    cfg.hello_limiter = LimiterConfig {
        max_failures: 3,
        window_ms: 60_000,
        block_ms: 60_000,
        max_sources: 16,
    };
    let relay = ztmesh_relay::server::start(cfg).await.unwrap();
    // A valid session from the same source is not touched by the block.
    let a = w.joined(&relay, Transport::Tcp, 1, &[2], 1).await;
    let expired = w.map_until(2, &[1], 1, now_ms() - 1);
    let forged = w.map(1, &[2], 2);
    for (t, map) in [
        (Transport::Quic, &expired),
        (Transport::Tcp, &expired),
        (Transport::Quic, &forged),
    ] {
        let err = connect_as(&w, &relay, 2, map, t).await.unwrap_err();
        assert!(matches!(err, ClientError::Refused(_)), "{err}");
    }
    // The source is blocked: QUIC and TCP connections end before TLS, even
    // with a valid HELLO.
    for t in [Transport::Quic, Transport::Tcp] {
        let err = w
            .connect(&relay, t, 2, &w.map(2, &[1], 1))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{t:?}: {err}");
    }
    let v = w
        .stats_until("the block", |v| {
            count(v, "limiter", "blocks") == 1 && count(v, "limiter", "refused") == 2
        })
        .await;
    assert_eq!(count(&v, "limiter", "failures"), 3);
    assert_eq!(count(&v, "limiter", "blocked_sources"), 1);
    assert_eq!(count(&v, "refusals", "expired_map"), 2);
    assert_eq!(count(&v, "refusals", "key_mismatch"), 1);
    assert_eq!(
        v["hellos_accepted"], 1,
        "no HELLO was verified after the block"
    );
    // The session that was already up keeps working.
    let err = a.send(1, &datagram(1, 1, 10)).await;
    assert!(err.is_ok());
    w.stats_until("the to-self drop", |v| count(v, "drops", "to_self") == 1)
        .await;
    drop(a);
    relay.stop().await.unwrap();
}
