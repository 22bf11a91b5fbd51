//! A netmap for a large mesh (20,000 peers) travels from a real tonic server
//! through the node's real gRPC client and passes the node's gate.
//!
//! The transport is an in-memory duplex pipe: real HTTP/2 and gRPC framing,
//! no sockets.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::time::Duration;

use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ztmesh_node::control::{Controller, Identity, NetMapGate};
use ztmesh_proto::control::control_server::{Control, ControlServer};
use ztmesh_proto::control::{self as pb};
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};

const PEERS: u32 = 20_000;

/// Serves one prepared signed netmap on `StreamNetMap`; nothing else.
struct OneMap(pb::SignedNetMap);

#[tonic::async_trait]
impl Control for OneMap {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type LoginStream = ReceiverStream<Result<pb::LoginEvent, Status>>;

    async fn login(
        &self,
        _: Request<pb::LoginRequest>,
    ) -> Result<Response<Self::LoginStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type StreamNetMapStream = ReceiverStream<Result<pb::SignedNetMap, Status>>;

    async fn stream_net_map(
        &self,
        _: Request<pb::StreamNetMapRequest>,
    ) -> Result<Response<Self::StreamNetMapStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Ok(self.0.clone()))
            .await
            .map_err(|_| Status::internal("receiver gone"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_endpoints(
        &self,
        _: Request<pb::ReportEndpointsRequest>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn set_routes(
        &self,
        _: Request<pb::SetRoutesRequest>,
    ) -> Result<Response<pb::SetRoutesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn report_flows(
        &self,
        _: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportFlowsResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn report_posture(
        &self,
        _: Request<pb::ReportPostureRequest>,
    ) -> Result<Response<pb::ReportPostureResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn net_map_applied(
        &self,
        _: Request<pb::NetMapAppliedRequest>,
    ) -> Result<Response<pb::NetMapAppliedResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn logout(
        &self,
        _: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

/// A peer as the controller describes one: name, key, an IPv4 and an IPv6
/// overlay address, a local, a reflexive and an IPv6 endpoint.
fn peer(i: u32) -> pb::Peer {
    let (hi, lo) = (i >> 8, i & 0xff);
    let mut wg_key = [0u8; 32];
    wg_key[..4].copy_from_slice(&i.to_be_bytes());
    wg_key[31] = 1;
    pb::Peer {
        id: u64::from(i) + 2,
        name: format!("build-runner-{i:05}.ci-fleet"),
        wg_key: wg_key.to_vec(),
        allowed_ips: vec![
            format!("100.{}.{hi}.{lo}/32", 64 + (i >> 16)),
            format!("fd7a:115c:a1e0:ab12:4843:cd96:{hi:x}:{lo:x}/128"),
        ],
        endpoints: vec![
            format!("198.18.{hi}.{lo}:51820"),
            format!("198.19.{hi}.{lo}:41641"),
            format!("[fd00:1:2:3:4:5:{hi:x}:{lo:x}]:51820"),
        ],
        persistent_keepalive: 25,
    }
}

#[tokio::test]
async fn a_signed_map_with_20000_peers_travels_through_grpc_and_verifies() {
    let controller = SigningKey::generate(&mut StdRng::seed_from_u64(1));
    let machine = SigningKey::generate(&mut StdRng::seed_from_u64(2));
    let wg = WgPrivateKey::generate(&mut StdRng::seed_from_u64(3));
    let map = pb::NetMap {
        serial: 7,
        issued_at_ms: 1_000,
        not_after_ms: 100_000,
        self_node: Some(pb::NodeInfo {
            id: 1,
            name: "me".into(),
            addresses: vec!["100.64.0.1/32".into()],
            machine_key: machine.public().as_bytes().to_vec(),
            wg_key: wg.public().as_bytes().to_vec(),
            ..Default::default()
        }),
        peers: (0..PEERS).map(peer).collect(),
        // One group rule admitting every peer to SSH, as `group:ci -> me:22` compiles.
        inbound_rules: vec![pb::InboundRule {
            src_prefixes: (0..PEERS).map(|i| peer(i).allowed_ips[0].clone()).collect(),
            protocols: vec![6],
            ports: vec![pb::PortRange {
                first: 22,
                last: 22,
            }],
            rule_id: "policy.hujson:12".into(),
            dst_prefixes: Vec::new(),
        }],
        ..Default::default()
    };
    let signed = ztmesh_proto::netmap::sign(&controller, &map);
    let size = signed.netmap.len();
    assert!(
        size > 4 << 20,
        "the map ({size} bytes) must exceed tonic's default 4 MiB limit to test anything"
    );

    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(OneMap(signed)))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io))),
    );
    let mut client_io = Some(client_io);
    let channel = tonic::transport::Endpoint::from_static("http://in-memory.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let io = client_io.take();
            async move {
                io.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("one connection only"))
            }
        }))
        .await
        .expect("in-memory channel");

    let mut ctl = Controller::from_channel(channel);
    let received = tokio::time::timeout(Duration::from_secs(120), async {
        let mut stream = ctl.stream(&machine, 0, false).await?;
        stream.message().await
    })
    .await
    .expect("liveness bound")
    .expect("the large map is received, not refused by a decode limit")
    .expect("one message");

    let me = Identity {
        node_id: Some(1),
        machine: machine.public(),
        wg: wg.public(),
    };
    let mut gate = NetMapGate::new(controller.public(), me, 0);
    let (got, translated, _) = gate.accept(&received, 2_000, None).expect("verifies");
    assert_eq!(got.serial, 7);
    assert_eq!(translated.peers.len(), PEERS as usize);
    assert_eq!(translated.peers[PEERS as usize - 1].allowed_ips.len(), 2);
    assert_eq!(translated.rules.rules[0].src.len(), PEERS as usize);
    server.abort();
}
