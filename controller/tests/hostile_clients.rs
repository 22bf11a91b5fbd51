//! Hostile *unauthenticated* clients against a real in-process controller
//! (TLS listener on 127.0.0.1, admin unix socket, SQLite in a temp dir):
//! idle and stalled connections, stream and connection caps, stalled
//! requests, failure floods from a shared source, garbage proofs, extreme
//! timestamps, and the refusal reasons a node receives.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::sync::Arc;
use std::time::Duration;

use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use ztmesh_controller::mesh::{Mesh, MeshConfig};
use ztmesh_controller::now_ms;
use ztmesh_controller::secrets::KeyDetail;
use ztmesh_controller::server::ListenerLimits;
use ztmesh_proto::admin as apb;
use ztmesh_proto::auth::{self, methods, signed_request, NodeProof};
use ztmesh_proto::control::{self as pb, control_client::ControlClient};
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};
use ztmesh_proto::netmap;
use ztmesh_proto::refusal::{self, AuthReason};

mod common;
use common::{Ctl, LIVENESS};

const POLICY: &str = r#"{
  "tagOwners": {"tag:web": [], "tag:db": []},
  "acls": [{"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]}],
}"#;

struct TestNode {
    machine: SigningKey,
    id: u64,
    name: String,
}

fn enroll_request(key: &str, machine: &SigningKey, host: &str, ts: i64) -> pb::EnrollRequest {
    let wg = WgPrivateKey::generate(&mut OsRng);
    let mk = machine.public().as_bytes().to_vec();
    let wk = wg.public().as_bytes().to_vec();
    let proof = machine
        .sign(&auth::enroll_message(key, &mk, &wk, host, ts))
        .to_vec();
    pb::EnrollRequest {
        auth_key: key.into(),
        machine_key: mk,
        wg_key: wk,
        hostname: host.into(),
        timestamp_ms: ts,
        proof,
    }
}

async fn enroll(ctl: &Ctl, key: &str, host: &str) -> TestNode {
    let machine = SigningKey::generate(&mut OsRng);
    let r = ctl
        .control()
        .await
        .enroll(enroll_request(key, &machine, host, now_ms()))
        .await
        .unwrap()
        .into_inner();
    TestNode {
        machine,
        id: r.node_id,
        name: r.name,
    }
}

fn stream_request(machine: &SigningKey, ts: i64) -> tonic::Request<pb::StreamNetMapRequest> {
    signed_request(
        machine,
        methods::STREAM_NETMAP,
        pb::StreamNetMapRequest {
            have_serial: 0,
            accept_deltas: false,
        },
        ts,
        &mut OsRng,
    )
}

async fn open_stream(
    ctl: &Ctl,
    node: &TestNode,
) -> Result<tonic::Streaming<pb::SignedNetMap>, tonic::Status> {
    Ok(ctl
        .control()
        .await
        .stream_net_map(stream_request(&node.machine, now_ms()))
        .await?
        .into_inner())
}

async fn next_map(ctl: &Ctl, s: &mut tonic::Streaming<pb::SignedNetMap>, have: u64) -> pb::NetMap {
    let signed = tokio::time::timeout(LIVENESS, s.message())
        .await
        .expect("a netmap within the liveness bound")
        .unwrap()
        .expect("stream open");
    netmap::verify(&ctl.mesh.controller_key(), &signed, have, now_ms())
        .expect("valid signed netmap")
}

fn reason(s: &tonic::Status) -> Option<AuthReason> {
    refusal::refusal(s).reason.and_then(|r| r.ok())
}

/// Waits until the server closes `sock` (EOF or reset), within [`LIVENESS`].
async fn closed_by_server(sock: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // Handshake bytes (a ServerHello) may arrive first; keep reading.
            Ok(Ok(_)) => continue,
        }
    }
}

/// A TLS + HTTP/2 client that speaks raw frames, for what tonic's client
/// would never do (stall a request body, inspect SETTINGS).
async fn raw_h2(ctl: &Ctl) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(ctl.addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(ztmesh_proto::tls::pinned_client_config(ctl.fp)));
    let name = rustls::pki_types::ServerName::try_from("ztmesh-controller").unwrap();
    let io = tls.connect(name, tcp).await.unwrap();
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A TLS connection that completes the handshake and sends nothing more.
async fn tls_only(ctl: &Ctl) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(ctl.addr).await.unwrap();
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(ztmesh_proto::tls::pinned_client_config(ctl.fp)));
    let name = rustls::pki_types::ServerName::try_from("ztmesh-controller").unwrap();
    tls.connect(name, tcp).await.unwrap()
}

fn grpc_request(path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("https://ztmesh-controller{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

// ---- listener hardening ---------------------------------------------------

#[tokio::test]
async fn idle_and_stalled_handshakes_are_dropped_while_a_real_node_enrolls_and_streams() {
    let ctl = Ctl::start_with_limits(
        MeshConfig::default(),
        ListenerLimits {
            handshake_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ..ListenerLimits::default()
        },
    )
    .await;
    // 20 connections that never send a byte, and 5 that stall after the
    // first bytes of a TLS record header.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(ctl.addr).await.unwrap());
    }
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(ctl.addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        idle.push(s);
    }

    // 5 that complete TLS and then never send the HTTP/2 preface.
    let mut after_tls = Vec::new();
    for _ in 0..5 {
        after_tls.push(tls_only(&ctl).await);
    }

    // Meanwhile a real node enrolls and follows its stream.
    ctl.admin()
        .await
        .set_policy(apb::SetPolicyRequest {
            file_name: "policy.hujson".into(),
            text: POLICY.into(),
            if_version: None,
        })
        .await
        .unwrap();
    let kd = ctl.key("", &["tag:db"], true).await;
    let kw = ctl.key("", &["tag:web"], true).await;
    let d = enroll(&ctl, &kd, "db").await;
    let mut sd = open_stream(&ctl, &d).await.unwrap();
    let m = next_map(&ctl, &mut sd, 0).await;
    assert!(m.peers.is_empty());

    for (i, s) in idle.iter_mut().enumerate() {
        assert!(closed_by_server(s).await, "idle connection {i} was dropped");
    }
    for (i, s) in after_tls.iter_mut().enumerate() {
        let mut buf = [0u8; 512];
        let deadline = tokio::time::Instant::now() + LIVENESS;
        let closed = loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Err(_) => break false,
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
            }
        };
        assert!(closed, "connection {i} that stopped after TLS was dropped");
    }

    // The stream outlives the unary request timeout: a change made after it
    // still arrives on the same stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _w = enroll(&ctl, &kw, "web").await;
    let m2 = next_map(&ctl, &mut sd, m.serial).await;
    assert_eq!(m2.peers.len(), 1, "the long-lived stream is not timed out");
    drop((sd, idle, after_tls));
    ctl.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_per_source_cap_are_closed_and_freed_slots_are_reused() {
    let ctl = Ctl::start_with_limits(
        MeshConfig::default(),
        ListenerLimits {
            max_connections_per_source: 4,
            ..ListenerLimits::default()
        },
    )
    .await;
    // Four idle connections hold every slot of 127.0.0.1.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(ctl.addr).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(ctl.addr).await.unwrap();
    assert!(
        closed_by_server(&mut over).await,
        "the fifth connection from one source is closed"
    );
    drop(held);
    // Slots are released when connections close (polled, bounded).
    let mut ok = false;
    for _ in 0..100 {
        let ch = ztmesh_proto::tls::connect(&ctl.url, ctl.fp, LIVENESS).await;
        if let Ok(ch) = ch {
            let r = ControlClient::new(ch)
                .stream_net_map(pb::StreamNetMapRequest::default())
                .await;
            if r.err().is_some_and(|e| e.code() == Code::Unauthenticated) {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a new connection is served once the idle ones are gone");
    ctl.stop().await;
}

#[tokio::test]
async fn the_server_caps_concurrent_streams_per_connection() {
    let ctl = Ctl::start_with_limits(
        MeshConfig::default(),
        ListenerLimits {
            max_streams_per_connection: 4,
            ..ListenerLimits::default()
        },
    )
    .await;
    // A well-behaved client learns the cap from SETTINGS.
    let mut h2c = raw_h2(&ctl).await;
    h2c = h2c.ready().await.unwrap();
    let (resp, _) = h2c
        .send_request(grpc_request(methods::STREAM_NETMAP), true)
        .unwrap();
    let _ = tokio::time::timeout(LIVENESS, resp).await.unwrap();
    assert_eq!(h2c.current_max_send_streams(), 4);

    // A client that ignores it: hand-written frames open 5 streams whose
    // request bodies never come; the fifth is refused.
    let mut io = tls_only(&ctl).await;
    io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    io.write_all(&frame(4, 0, 0, &[])).await.unwrap();
    // Wait for the server's SETTINGS and acknowledge them.
    let mut cap = None;
    for _ in 0..16 {
        let (ty, flags, _, payload) = read_frame(&mut io).await;
        if ty == 4 && flags & 1 == 0 {
            for s in payload.chunks_exact(6) {
                if u16::from_be_bytes([s[0], s[1]]) == 3 {
                    cap = Some(u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
                }
            }
            break;
        }
    }
    assert_eq!(cap, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");
    io.write_all(&frame(4, 1, 0, &[])).await.unwrap();
    let block = hpack_literal(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/ztmesh.control.v1.Control/Enroll"),
        (":authority", "ztmesh-controller"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    for id in [1u32, 3, 5, 7, 9] {
        // HEADERS with END_HEADERS, without END_STREAM: the call stays open.
        io.write_all(&frame(1, 4, id, &block)).await.unwrap();
    }
    let mut refused = Vec::new();
    for _ in 0..64 {
        let (ty, _, id, payload) = read_frame(&mut io).await;
        if ty == 3 {
            let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
            refused.push((id, code));
            if id == 9 {
                break;
            }
        }
    }
    // REFUSED_STREAM (7) for the fifth stream only.
    assert_eq!(refused, vec![(9, 7)]);
    drop((io, h2c));
    ctl.stop().await;
}

/// One HTTP/2 frame: type, flags, stream id, payload.
fn frame(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], ty, flags];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads one frame (type, flags, stream id, payload) within [`LIVENESS`].
async fn read_frame(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    tokio::time::timeout(LIVENESS, io.read_exact(&mut head))
        .await
        .expect("a frame within the liveness bound")
        .unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.unwrap();
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    (head[3], head[4], id, payload)
}

/// An HPACK header block of literals without indexing (short strings only).
fn hpack_literal(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in headers {
        b.push(0);
        for s in [name, value] {
            b.push(u8::try_from(s.len()).ok().filter(|l| *l < 127).unwrap());
            b.extend_from_slice(s.as_bytes());
        }
    }
    b
}

#[tokio::test]
async fn a_unary_request_whose_body_never_arrives_is_timed_out() {
    let ctl = Ctl::start_with_limits(
        MeshConfig::default(),
        ListenerLimits {
            request_timeout: Duration::from_secs(1),
            ..ListenerLimits::default()
        },
    )
    .await;
    let h2c = raw_h2(&ctl).await;
    let mut h2c = h2c.ready().await.unwrap();
    // Headers of an Enroll call, then nothing: the body never comes.
    let (resp, _body_tx) = h2c
        .send_request(grpc_request("/ztmesh.control.v1.Control/Enroll"), false)
        .unwrap();
    let resp = tokio::time::timeout(LIVENESS, resp)
        .await
        .expect("the server answers a stalled request")
        .unwrap();
    let mut status = resp.headers().get("grpc-status").cloned();
    if status.is_none() {
        let mut body = resp.into_body();
        let trailers = tokio::time::timeout(LIVENESS, body.trailers())
            .await
            .unwrap()
            .unwrap();
        status = trailers.and_then(|t| t.get("grpc-status").cloned());
    }
    let status = status.expect("a grpc-status");
    assert_ne!(status.to_str().unwrap(), "0", "the stalled call failed");
    ctl.stop().await;
}

// ---- failure limiter and proofs ----------------------------------------

#[tokio::test]
async fn a_source_over_its_failure_limit_still_serves_nodes_whose_proof_verifies() {
    let ctl = Ctl::start().await;
    let kd = ctl.key("", &["tag:db"], true).await;
    let good = enroll(&ctl, &kd, "db").await;
    let mut c = ctl.control().await;
    // A bad client behind the same address (127.0.0.1) exhausts its failures.
    for _ in 0..12 {
        let stranger = SigningKey::generate(&mut OsRng);
        let _ = c.stream_net_map(stream_request(&stranger, now_ms())).await;
    }
    let stranger = SigningKey::generate(&mut OsRng);
    let e = c
        .stream_net_map(stream_request(&stranger, now_ms()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let machine = SigningKey::generate(&mut OsRng);
    let e = c
        .enroll(enroll_request(&kd, &machine, "late", now_ms()))
        .await
        .err()
        .unwrap();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "unauthenticated paths stay limited"
    );
    // The good node behind the same address is still served.
    let mut s = open_stream(&ctl, &good).await.unwrap();
    let m = next_map(&ctl, &mut s, 0).await;
    assert_eq!(m.self_node.unwrap().name, good.name);
    drop((s, c));
    ctl.stop().await;
}

#[test]
fn the_replay_cache_records_only_verified_proofs_of_enrolled_nodes() {
    let store: Arc<dyn ztmesh_controller::store::Store> =
        Arc::new(ztmesh_controller::store::SqliteStore::in_memory().unwrap());
    let t0 = 1_800_000_000_000;
    let m = Mesh::load(
        store,
        SigningKey::generate(&mut OsRng),
        [7; 32],
        Mesh::random_ula(),
        MeshConfig::default(),
        t0,
    )
    .unwrap();
    let md = |p: &NodeProof| {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(auth::PROOF_HEADER, p.to_string().parse().unwrap());
        md
    };
    // 1000 well-signed proofs by keys that are not enrolled.
    for _ in 0..1000 {
        let k = SigningKey::generate(&mut OsRng);
        let p = NodeProof::create(&k, methods::STREAM_NETMAP, t0, &mut OsRng);
        assert!(m.authenticate(&md(&p), methods::STREAM_NETMAP, t0).is_err());
    }
    assert_eq!(
        m.replay_cache_len(),
        0,
        "strangers' proofs are not recorded"
    );

    let (_, key) = m
        .create_key(
            "admin",
            KeyDetail::auth(None, &["tag:db".into()], false, false),
            None,
            t0,
        )
        .unwrap();
    let machine = SigningKey::generate(&mut OsRng);
    m.enroll(&enroll_request(&key, &machine, "db", t0), t0)
        .unwrap();
    // A proof of the enrolled key for another method (bad signature here).
    let wrong = NodeProof::create(&machine, methods::LOGOUT, t0, &mut OsRng);
    assert!(m
        .authenticate(&md(&wrong), methods::STREAM_NETMAP, t0)
        .is_err());
    assert_eq!(
        m.replay_cache_len(),
        0,
        "unverified proofs are not recorded"
    );
    // A valid one is recorded once.
    let p = NodeProof::create(&machine, methods::STREAM_NETMAP, t0, &mut OsRng);
    m.authenticate(&md(&p), methods::STREAM_NETMAP, t0).unwrap();
    assert_eq!(m.replay_cache_len(), 1);
    assert!(m.authenticate(&md(&p), methods::STREAM_NETMAP, t0).is_err());
}

#[tokio::test]
async fn extreme_timestamps_are_refused_cleanly_and_the_controller_keeps_serving() {
    let ctl = Ctl::start().await;
    let kd = ctl.key("", &["tag:db"], true).await;
    let d = enroll(&ctl, &kd, "db").await;
    let mut c = ctl.control().await;
    for ts in [i64::MIN, i64::MAX, i64::MIN + 1, -1] {
        let e = c
            .stream_net_map(stream_request(&d.machine, ts))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::Unauthenticated, "{ts}: {e:?}");
        assert_eq!(reason(&e), Some(AuthReason::ClockSkew), "{ts}");
        let machine = SigningKey::generate(&mut OsRng);
        let e = c
            .enroll(enroll_request(&kd, &machine, "x", ts))
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), Code::Unauthenticated, "{ts}: {e:?}");
    }
    let mut s = open_stream(&ctl, &d).await.unwrap();
    next_map(&ctl, &mut s, 0).await;
    drop((s, c));
    ctl.stop().await;
}

// ---- refusal reasons --------------------------------------------------------

#[tokio::test]
async fn a_proof_stamped_five_minutes_ahead_is_refused_as_clock_skew() {
    let ctl = Ctl::start().await;
    let kd = ctl.key("", &["tag:db"], true).await;
    let d = enroll(&ctl, &kd, "db").await;
    let before = now_ms();
    let e = ctl
        .control()
        .await
        .stream_net_map(stream_request(&d.machine, before + 5 * 60_000))
        .await
        .err()
        .unwrap();
    let after = now_ms();
    assert_eq!(e.code(), Code::Unauthenticated);
    let r = refusal::refusal(&e);
    assert_eq!(r.reason, Some(Ok(AuthReason::ClockSkew)), "{e:?}");
    let server = r.server_time_ms.expect("the controller's clock is sent");
    assert!((before..=after).contains(&server), "{server}");
    assert!(e.message().contains("clock"), "{}", e.message());
    ctl.stop().await;
}

#[tokio::test]
async fn each_refusal_carries_its_reason() {
    let ctl = Ctl::start().await;
    let kd = ctl.key("", &["tag:db"], true).await;
    let d = enroll(&ctl, &kd, "db").await;
    let mut c = ctl.control().await;

    // No proof, and a proof for another method: bad-proof.
    let e = c
        .stream_net_map(pb::StreamNetMapRequest::default())
        .await
        .err()
        .unwrap();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unauthenticated, Some(AuthReason::BadProof))
    );
    let req = signed_request(
        &d.machine,
        methods::LOGOUT,
        pb::StreamNetMapRequest::default(),
        now_ms(),
        &mut OsRng,
    );
    let e = c.stream_net_map(req).await.err().unwrap();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unauthenticated, Some(AuthReason::BadProof))
    );

    // The same proof twice: replayed.
    let req = stream_request(&d.machine, now_ms());
    let proof = req.metadata().get(auth::PROOF_HEADER).unwrap().clone();
    let mut first = c.stream_net_map(req).await.unwrap().into_inner();
    next_map(&ctl, &mut first, 0).await;
    let mut replay = tonic::Request::new(pb::StreamNetMapRequest::default());
    replay.metadata_mut().insert(auth::PROOF_HEADER, proof);
    let e = c.stream_net_map(replay).await.err().unwrap();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unauthenticated, Some(AuthReason::Replayed))
    );

    // A second live session of the same identity (a cloned machine) is
    // refused, and the first one keeps its stream (hostile_nodes.rs covers
    // the audit row and the honest reconnect).
    let e = open_stream(&ctl, &d).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let mut second = first;

    // Deleted: the live stream ends with `revoked`, and so does a new call.
    ctl.admin()
        .await
        .delete_node(apb::NodeRef {
            node: d.id.to_string(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(LIVENESS, second.message())
        .await
        .unwrap()
        .expect_err("the deleted node's stream ends with a status");
    assert_eq!(
        (end.code(), reason(&end)),
        (Code::Unauthenticated, Some(AuthReason::Revoked))
    );
    let e = open_stream(&ctl, &d).await.err().unwrap();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unauthenticated, Some(AuthReason::Revoked))
    );

    // An expired node: expired (it keeps its identity; a person signs in
    // again), not revoked.
    let x = enroll(&ctl, &kd, "x").await;
    ctl.admin()
        .await
        .expire_node(apb::NodeRef {
            node: x.name.clone(),
        })
        .await
        .unwrap();
    let e = open_stream(&ctl, &x).await.err().unwrap();
    assert_eq!(
        (e.code(), reason(&e)),
        (Code::Unauthenticated, Some(AuthReason::Expired))
    );
    ctl.stop().await;
}
