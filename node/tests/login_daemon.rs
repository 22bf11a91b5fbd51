//! `ztmesh up` without an auth key, the node side end to end: the real
//! daemon and CLI binaries against a scripted controller (a real tonic
//! server behind TLS pinned by fingerprint), in a network namespace this
//! test creates. The real controller's login is the lead's end-to-end test;
//! here the controller's script can break the protocol and expire the key
//! at will.
//!
//! ```text
//!   [netns ztm-login-PID-N]
//!     lo 198.18.13.1/32
//!     scripted controller  https://198.18.13.1:PORT   (a thread of this test, setns'd in)
//!     ztmesh daemon, TUN ztmlogin0
//!        ▲ unix socket (scratch dir)
//!     ztmesh up / status (CLI, run by this test)
//! ```
//!
//! Phases, one daemon: refusals without a pin; a login whose stream ends
//! early and one against the wrong pin (nothing stored); a good login (the
//! prompt printed before the enrollment is sent; the proof verifies); the
//! key expires (peers dropped, status says so, no hammering); `up` signs in
//! again with the same keys; a CLI killed during a login cancels it; after
//! another expiry, `up --auth-key` re-authenticates through `Enroll` (same
//! keys), and refuses a key for another controller. Posture, once logged
//! in: reports signed for `ReportPosture` as the stream opens and every
//! `posture_interval_ms`, the map's checks and the controller's clipped
//! lines in `status`, and `up --report-posture=false` stops the reports
//! (and `up --report-posture` resumes them) without a reconnect.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ztmesh_proto::auth::{self, login_message};
use ztmesh_proto::control::control_server::{Control, ControlServer};
use ztmesh_proto::control::{self as pb, login_event::Event};
use ztmesh_proto::keys::{PublicKey, SigningKey};
use ztmesh_proto::refusal::{self, AuthReason};
use ztmesh_proto::time::now_ms;

mod common;
use common::{Daemon, Scratch};

const CONTROLLER_IP: &str = "198.18.13.1";
const NODE_ID: u64 = 12;
const DAY_MS: i64 = 86_400_000;
/// Liveness bound for each step.
const BOUND: Duration = Duration::from_secs(30);

fn require_root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return true;
    }
    if matches!(
        std::env::var("ZTMESH_SKIP_NETNS").ok().as_deref(),
        Some("1" | "true" | "yes")
    ) {
        eprintln!("skipped: needs root (ZTMESH_SKIP_NETNS=1 is set)");
        return false;
    }
    panic!("this test needs root (euid is {euid}); run as root or set ZTMESH_SKIP_NETNS=1");
}

/// A network namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ztm-login-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ns = Netns(name);
        ns.ip(&["netns", "add", &ns.0]);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", "198.18.13.1/32", "dev", "lo"],
        ] {
            let mut full = vec!["-n", ns.0.as_str()];
            full.extend(args);
            ns.ip(&full);
        }
        ns
    }

    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// How the scripted controller answers the next `Login`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoginScript {
    /// Prompt; once the test saw the CLI print it, the enrollment.
    Good,
    /// Prompt, then the stream ends.
    EndsAfterPrompt,
    /// Prompt, then nothing until the node drops the stream.
    HoldOpen,
}

/// The scripted controller's state, shared with the test.
struct Script {
    key: SigningKey,
    login: Mutex<LoginScript>,
    /// Every login request, in order.
    logins: Mutex<Vec<pb::LoginRequest>>,
    /// Every login request's proof verified against login_message.
    proofs_ok: Mutex<Vec<bool>>,
    /// The auth key `Enroll` accepts, and every enroll request whose proof
    /// verified.
    auth_key: String,
    enrolls: Mutex<Vec<pb::EnrollRequest>>,
    /// The test saw the prompt on the CLI's stdout.
    shown: Notify,
    /// A held-open login stream was dropped by the node.
    dropped: AtomicU32,
    /// The key expiry the maps and enrollments carry.
    key_expiry_ms: AtomicU64,
    /// While true, the netmap stream is refused as expired (open streams end).
    expired: watch::Sender<bool>,
    stream_calls: AtomicU32,
    serial: AtomicU64,
    /// Every posture report, and whether its proof verified for the method.
    postures: Mutex<Vec<(bool, pb::ReportPostureRequest)>>,
    /// `SetRoutes` calls (advertisements).
    routes_calls: AtomicU32,
}

/// The posture interval the scripted maps ask for (the node's floor).
const POSTURE_INTERVAL_MS: i64 = 2_000;
/// What the scripted controller says it clipped of every posture report.
const CLIPPED: &str = "node:colour: unknown attribute";

impl Script {
    fn new(fingerprint: [u8; 32]) -> Self {
        let token = auth::KeyToken::generate(Some(fingerprint), &mut StdRng::seed_from_u64(1301));
        Script {
            auth_key: token.encode(auth::AUTH_KEY_PREFIX),
            enrolls: Mutex::new(Vec::new()),
            key: SigningKey::generate(&mut StdRng::seed_from_u64(1300)),
            login: Mutex::new(LoginScript::Good),
            logins: Mutex::new(Vec::new()),
            proofs_ok: Mutex::new(Vec::new()),
            shown: Notify::new(),
            dropped: AtomicU32::new(0),
            key_expiry_ms: AtomicU64::new(0),
            expired: watch::channel(false).0,
            stream_calls: AtomicU32::new(0),
            serial: AtomicU64::new(1),
            postures: Mutex::new(Vec::new()),
            routes_calls: AtomicU32::new(0),
        }
    }

    fn expiry(&self) -> i64 {
        self.key_expiry_ms.load(Ordering::SeqCst) as i64
    }

    fn enrollment(&self) -> pb::EnrollResponse {
        pb::EnrollResponse {
            node_id: NODE_ID,
            name: "laptop-alice".into(),
            addresses: vec!["100.64.0.12".into(), "fd7a:115c:a1e0::c".into()],
            controller_key: self.key.public().as_bytes().to_vec(),
            key_expiry_ms: self.expiry(),
        }
    }

    /// A map for the node that logged in first, with one peer.
    fn map(&self) -> Option<pb::SignedNetMap> {
        let req = self.logins.lock().unwrap().last().cloned()?;
        let first = self.logins.lock().unwrap().first().cloned()?;
        assert_eq!(req.machine_key, first.machine_key, "one node throughout");
        let now = now_ms();
        let map = pb::NetMap {
            serial: self.serial.fetch_add(1, Ordering::SeqCst),
            issued_at_ms: now,
            not_after_ms: now + 3_600_000,
            self_node: Some(pb::NodeInfo {
                id: NODE_ID,
                name: "laptop-alice".into(),
                addresses: vec!["100.64.0.12/32".into(), "fd7a:115c:a1e0::c/128".into()],
                key_expiry_ms: self.expiry(),
                machine_key: req.machine_key,
                wg_key: req.wg_key,
                ..Default::default()
            }),
            peers: vec![pb::Peer {
                id: 20,
                name: "server-1".into(),
                wg_key: vec![9; 32],
                allowed_ips: vec!["100.64.0.20/32".into()],
                endpoints: vec!["198.18.13.20:41641".into()],
                persistent_keepalive: 0,
            }],
            posture_interval_ms: POSTURE_INTERVAL_MS,
            posture_checks: vec![
                pb::PostureCheck {
                    name: "posture:compliant".into(),
                    passed: false,
                    detail: "custom:compliant == true: seen false (set by an admin)".into(),
                },
                pb::PostureCheck {
                    name: "posture:base".into(),
                    passed: true,
                    detail: String::new(),
                },
            ],
            ..Default::default()
        };
        Some(ztmesh_proto::netmap::sign(&self.key, &map))
    }
}

struct Scripted(Arc<Script>);

#[tonic::async_trait]
impl Control for Scripted {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let req = req.into_inner();
        let ok = req.auth_key == self.0.auth_key
            && PublicKey::from_slice(&req.machine_key).is_ok_and(|k| {
                k.verify(
                    &auth::enroll_message(
                        &req.auth_key,
                        &req.machine_key,
                        &req.wg_key,
                        &req.hostname,
                        req.timestamp_ms,
                    ),
                    &req.proof,
                )
            });
        if !ok {
            return Err(Status::unauthenticated("invalid auth key or proof"));
        }
        self.0.enrolls.lock().unwrap().push(req);
        // Re-authenticates the node, as a login does.
        self.0.expired.send_replace(false);
        Ok(Response::new(self.0.enrollment()))
    }

    type LoginStream = ReceiverStream<Result<pb::LoginEvent, Status>>;

    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<Self::LoginStream>, Status> {
        let req = req.into_inner();
        let ok = PublicKey::from_slice(&req.machine_key).is_ok_and(|k| {
            k.verify(
                &login_message(
                    &req.machine_key,
                    &req.wg_key,
                    &req.hostname,
                    &req.os,
                    req.timestamp_ms,
                ),
                &req.proof,
            )
        });
        self.0.proofs_ok.lock().unwrap().push(ok);
        self.0.logins.lock().unwrap().push(req);
        let script = *self.0.login.lock().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let s = self.0.clone();
        tokio::spawn(async move {
            let prompt = pb::LoginEvent {
                event: Some(Event::Prompt(pb::LoginPrompt {
                    url: format!("https://{CONTROLLER_IP}/device?code=KXQP-7RTM"),
                    code: "KXQP-7RTM".into(),
                    expires_ms: now_ms() + 600_000,
                })),
            };
            if tx.send(Ok(prompt)).await.is_err() {
                return;
            }
            match script {
                LoginScript::Good => {
                    if tokio::time::timeout(BOUND, s.shown.notified())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    // Signing in un-expires the node.
                    s.expired.send_replace(false);
                    let ev = pb::LoginEvent {
                        event: Some(Event::Enrolled(s.enrollment())),
                    };
                    let _ = tx.send(Ok(ev)).await;
                }
                LoginScript::EndsAfterPrompt => {}
                LoginScript::HoldOpen => {
                    if tokio::time::timeout(BOUND, tx.closed()).await.is_ok() {
                        s.dropped.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type StreamNetMapStream = ReceiverStream<Result<pb::SignedNetMap, Status>>;

    async fn stream_net_map(
        &self,
        _: Request<pb::StreamNetMapRequest>,
    ) -> Result<Response<Self::StreamNetMapStream>, Status> {
        self.0.stream_calls.fetch_add(1, Ordering::SeqCst);
        if *self.0.expired.borrow() {
            return Err(refusal::status(
                AuthReason::Expired,
                "node key expired",
                None,
            ));
        }
        let map = self
            .0
            .map()
            .ok_or_else(|| Status::unauthenticated("unknown machine key"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let _ = tx.send(Ok(map)).await;
        let mut expired = self.0.expired.subscribe();
        tokio::spawn(async move {
            // The stream stays open until the key expires.
            if expired.wait_for(|e| *e).await.is_ok() {
                let _ = tx
                    .send(Err(refusal::status(
                        AuthReason::Expired,
                        "node key expired",
                        None,
                    )))
                    .await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_endpoints(
        &self,
        _: Request<pb::ReportEndpointsRequest>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        Ok(Response::new(pb::ReportEndpointsResponse {}))
    }

    async fn set_routes(
        &self,
        _: Request<pb::SetRoutesRequest>,
    ) -> Result<Response<pb::SetRoutesResponse>, Status> {
        self.0.routes_calls.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::SetRoutesResponse::default()))
    }

    async fn report_flows(
        &self,
        _: Request<pb::ReportFlowsRequest>,
    ) -> Result<Response<pb::ReportFlowsResponse>, Status> {
        Ok(Response::new(pb::ReportFlowsResponse {}))
    }

    async fn report_posture(
        &self,
        req: Request<pb::ReportPostureRequest>,
    ) -> Result<Response<pb::ReportPostureResponse>, Status> {
        let proof_ok = req
            .metadata()
            .get(auth::PROOF_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<auth::NodeProof>().ok())
            .is_some_and(|p| p.verify(auth::methods::REPORT_POSTURE, now_ms()).is_ok());
        self.0
            .postures
            .lock()
            .unwrap()
            .push((proof_ok, req.into_inner()));
        Ok(Response::new(pb::ReportPostureResponse {
            clipped: vec![CLIPPED.into()],
        }))
    }

    async fn net_map_applied(
        &self,
        _: Request<pb::NetMapAppliedRequest>,
    ) -> Result<Response<pb::NetMapAppliedResponse>, Status> {
        Ok(Response::new(pb::NetMapAppliedResponse {}))
    }

    async fn logout(
        &self,
        _: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        Ok(Response::new(pb::LogoutResponse {}))
    }
}

/// The scripted controller, serving TLS on 198.18.13.1 inside `netns` from
/// a thread of this process; stops on drop.
struct Controller {
    port: u16,
    fingerprint: [u8; 32],
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Controller {
    /// A fresh TLS identity and its fingerprint.
    fn identity() -> (rcgen::CertifiedKey<rcgen::KeyPair>, [u8; 32]) {
        let ck = rcgen::generate_simple_self_signed(vec!["ztmesh-controller".to_string()])
            .expect("certificate");
        let fingerprint = auth::sha256(ck.cert.der());
        (ck, fingerprint)
    }

    fn start(
        netns: &Netns,
        (ck, fingerprint): (rcgen::CertifiedKey<rcgen::KeyPair>, [u8; 32]),
        script: Arc<Script>,
    ) -> Self {
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("TLS identity");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let ns_path = PathBuf::from("/run/netns").join(&netns.0);
        let (port_tx, port_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&ns_path).expect("open the netns");
            // SAFETY: a valid namespace fd; setns moves only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind((CONTROLLER_IP, 0))
                    .await
                    .expect("bind in the netns");
                port_tx
                    .send(listener.local_addr().expect("addr").port())
                    .expect("port");
                let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(16);
                tokio::spawn(async move {
                    // Ends with the runtime.
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let acceptor = acceptor.clone();
                        let conn_tx = conn_tx.clone();
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                            }
                        });
                    }
                });
                let _ = tonic::transport::Server::builder()
                    .add_service(ControlServer::new(Scripted(script)))
                    .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let port = port_rx.recv_timeout(BOUND).expect("the controller listens");
        Controller {
            port,
            fingerprint,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("https://{CONTROLLER_IP}:{}", self.port)
    }

    fn pin(&self) -> String {
        format!("SHA256:{}", auth::hex(&self.fingerprint))
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Node {
    dir: PathBuf,
    socket: PathBuf,
}

impl Node {
    fn start(netns: &Netns, dir: &Path) -> (Daemon, Node) {
        let socket = dir.join("ztmesh.sock");
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &netns.0])
            .arg(env!("CARGO_BIN_EXE_ztmesh"))
            .arg("daemon")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(&socket)
            .arg("--uapi-dir")
            .arg(dir.join("uapi"))
            .arg("--resolv-conf")
            .arg(dir.join("resolv.conf"))
            .args(["--interface", "ztmlogin0", "--port", "0"])
            .env("ZTMESH_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        let mut d = Daemon(child);
        let node = Node {
            dir: dir.to_path_buf(),
            socket,
        };
        let deadline = Instant::now() + BOUND;
        loop {
            if let Ok(Some(status)) = d.0.try_wait() {
                panic!("the daemon exited early: {status}\n{}", node.log());
            }
            if node.socket.exists() && node.cli(&["status"]).status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "the daemon never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        (d, node)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ztmesh"));
        c.args(args).arg("--socket").arg(&self.socket);
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run the CLI")
    }

    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "-o", "json"]);
        assert!(out.status.success(), "status: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    fn enrollment(&self) -> Option<serde_json::Value> {
        let b = std::fs::read(self.dir.join("state/enrollment.json")).ok()?;
        Some(serde_json::from_slice(&b).expect("enrollment.json"))
    }

    /// The peers the data plane holds, read over its UAPI socket (one
    /// `get`; the answer ends with `errno=0` and an empty line).
    fn uapi_peers(&self) -> usize {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(self.dir.join("uapi/ztmlogin0.sock"))
            .expect("the UAPI socket");
        s.set_read_timeout(Some(BOUND)).expect("timeout");
        s.write_all(b"get=1\n\n").expect("UAPI get");
        let mut peers = 0;
        for line in std::io::BufReader::new(s).lines().take(10_000) {
            let line = line.expect("UAPI answer");
            if line.starts_with("public_key=") {
                peers += 1;
            }
            if line.starts_with("errno=") {
                assert_eq!(line, "errno=0");
                return peers;
            }
        }
        panic!("the UAPI answer did not end");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// Waits (bounded) until `cond` holds for the status.
    fn until(&self, what: &str, mut cond: impl FnMut(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + BOUND;
        loop {
            let s = self.status();
            if cond(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never; last status {s:#}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A CLI run whose stdout is read line by line as it comes.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the CLI");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next stdout line that starts with `prefix` (bounded wait).
    fn line_starting(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no line starting with {prefix:?}; saw {:?}", self.seen),
            }
        }
    }

    /// Waits (bounded) for the exit; returns success, all stdout, stderr.
    fn finish(mut self) -> (bool, Vec<String>, String) {
        let deadline = Instant::now() + BOUND;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the CLI did not finish; saw {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status.success(), std::mem::take(&mut self.seen), err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn interactive_login_expiry_and_reauthentication_through_the_daemon() {
    if !require_root_or_skip() {
        return;
    }
    let netns = Netns::new();
    let identity = Controller::identity();
    let script = Arc::new(Script::new(identity.1));
    script
        .key_expiry_ms
        .store((now_ms() + 2 * DAY_MS - 60_000) as u64, Ordering::SeqCst);
    let ctl = Controller::start(&netns, identity, script.clone());
    let scratch = Scratch::new("login");
    let (_daemon, node) = Node::start(&netns, &scratch.0);
    let url = ctl.url();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>7.2}s {what}", t0.elapsed().as_secs_f64());
    let up = |extra: &[&str]| {
        let mut args = vec!["up", "--accept-dns=false", "--timeout", "25"];
        args.extend_from_slice(extra);
        node.command(&args)
    };

    phase("No auth key and no pin");
    // No auth key and no pin: refused, naming where the fingerprint is.
    let out = node.cli(&["up", "--controller", &url]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("--fingerprint") && err.contains("ztmesh-controller serve"),
        "{err}"
    );
    let out = node.cli(&["up", "--controller", &url, "--fingerprint", "SHA256:zz"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("invalid controller fingerprint"));
    phase("The wrong pin");
    // The wrong pin: the TLS handshake fails before any login (no TOFU).
    let wrong = format!("sha256:{}", "00".repeat(32));
    let out = up(&["--controller", &url, "--fingerprint", &wrong])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cannot reach the controller"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        script.logins.lock().unwrap().is_empty(),
        "no login without the pin"
    );
    assert!(node.enrollment().is_none());

    phase("A login the controller ends");
    // A login the controller ends after the prompt: a clear error, nothing stored.
    *script.login.lock().unwrap() = LoginScript::EndsAfterPrompt;
    let (ok, lines, err) =
        Running::spawn(up(&["--controller", &url, "--fingerprint", &ctl.pin()])).finish();
    assert!(!ok);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("To sign in, open: https://")),
        "{lines:?}"
    );
    assert!(
        err.contains("ended the login without enrolling this node"),
        "{err}"
    );
    assert!(node.enrollment().is_none(), "nothing stored");
    assert_eq!(node.status()["enrolled"], false);

    phase("The good login");
    // The good login: the prompt is printed while the controller waits.
    *script.login.lock().unwrap() = LoginScript::Good;
    let mut run = Running::spawn(up(&["--controller", &url, "--fingerprint", &ctl.pin()]));
    let first = run.line_starting("To sign in, open: ");
    assert_eq!(
        first,
        format!("To sign in, open: https://{CONTROLLER_IP}/device?code=KXQP-7RTM")
    );
    let fp_line = run.line_starting("The controller's certificate fingerprint is ");
    assert!(fp_line.contains(&ctl.pin()), "{fp_line}");
    assert_eq!(node.status()["login"], "pending");
    assert!(node.enrollment().is_none(), "not before the enrollment");
    script.shown.notify_one();
    let (ok, lines, err) = run.finish();
    assert!(ok, "up failed: {err}\n{}", node.log());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("up: laptop-alice 100.64.0.12")),
        "{lines:?}"
    );
    let first_login = script.logins.lock().unwrap()[1].clone();
    assert_eq!(*script.proofs_ok.lock().unwrap(), [true, true]);
    assert!(first_login.os.starts_with("linux "), "{}", first_login.os);
    let e = node.enrollment().expect("stored");
    assert_eq!(e["node_id"], NODE_ID);
    assert_eq!(e["fingerprint"], auth::hex(&ctl.fingerprint));
    let s = node.status();
    assert_eq!(s["login"], "ok");
    assert_eq!(s["key_expiry_ms"], script.expiry());
    let left = s["key_expires_in_secs"].as_i64().expect("seconds");
    assert!((2 * 86_400 - 120..2 * 86_400).contains(&left), "{left}");
    assert_eq!(s["peers"].as_array().map(Vec::len), Some(1), "{s:#}");
    assert_eq!(node.uapi_peers(), 1, "the data plane has the peer");
    let out = node.cli(&["status"]);
    assert!(
        text(&out.stdout)
            .contains("WARNING: key expires in 1d 23h: run `ztmesh up --force-reauth` to extend"),
        "{}",
        text(&out.stdout)
    );

    phase("Posture");
    posture_reports_follow_the_map_and_the_pref(&node, &script, &up);

    phase("The key expires");
    // The key expires: peers gone, enrollment kept, status says so, and
    // the node does not hammer the controller.
    script.expired.send_replace(true);
    node.until("expired", |s| s["login"] == "expired");
    let s = node.status();
    assert_eq!(
        s["login_message"],
        "node key expired: run `ztmesh up` to sign in again"
    );
    assert_eq!(s["peers"].as_array().map(Vec::len), Some(0), "{s:#}");
    assert_eq!(node.uapi_peers(), 0, "the data plane dropped every peer");
    assert_eq!(s["netmap"], serde_json::Value::Null);
    assert_eq!(s["enrolled"], true);
    assert!(node.enrollment().is_some(), "the enrollment stays");
    let out = node.cli(&["status"]);
    assert!(
        text(&out.stdout).contains("WARNING: node key expired: run `ztmesh up` to sign in again"),
        "{}",
        text(&out.stdout)
    );
    let calls = script.stream_calls.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        script.stream_calls.load(Ordering::SeqCst) <= calls + 1,
        "an expired node retries about once a minute"
    );

    phase("up signs in again");
    // `up` signs in again: same keys, same node, peers back.
    script
        .key_expiry_ms
        .store((now_ms() + 30 * DAY_MS) as u64, Ordering::SeqCst);
    let mut run = Running::spawn(up(&[]));
    run.line_starting("To sign in, open: ");
    script.shown.notify_one();
    let (ok, _, err) = run.finish();
    assert!(ok, "re-authentication failed: {err}\n{}", node.log());
    let again = script.logins.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        again.machine_key, first_login.machine_key,
        "same machine key"
    );
    assert_eq!(again.wg_key, first_login.wg_key, "same WireGuard key");
    let s = node.status();
    assert_eq!(s["login"], "ok");
    assert_eq!(s["self"]["id"], NODE_ID);
    assert_eq!(s["peers"].as_array().map(Vec::len), Some(1), "{s:#}");
    assert_eq!(node.uapi_peers(), 1, "the peer is back in the data plane");
    assert!(!text(&node.cli(&["status"]).stdout).contains("WARNING"));

    phase("A CLI killed");
    // A CLI killed while its login waits: the daemon drops the login.
    *script.login.lock().unwrap() = LoginScript::HoldOpen;
    let mut run = Running::spawn(up(&["--force-reauth"]));
    run.line_starting("To sign in, open: ");
    let _ = run.child.kill();
    let _ = run.child.wait();
    let deadline = Instant::now() + BOUND;
    while script.dropped.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the login was never dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.until("no login pending", |s| s["login"] == "ok");
    assert_eq!(node.status()["self"]["id"], NODE_ID, "still enrolled");

    // Expired again: an auth key re-authenticates through Enroll, with the
    // same keys; a key for another controller is refused first.
    phase("auth key");
    script.expired.send_replace(true);
    node.until("expired again", |s| s["login"] == "expired");
    let other = auth::KeyToken::generate(Some([7; 32]), &mut StdRng::seed_from_u64(1302))
        .encode(auth::AUTH_KEY_PREFIX);
    let out = up(&["--auth-key", &other]).output().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("the auth key is for the controller with certificate fingerprint SHA256:0707"),
        "{err}"
    );
    assert!(script.enrolls.lock().unwrap().is_empty());
    assert_eq!(node.status()["login"], "expired");
    let out = up(&["--auth-key", &script.auth_key]).output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        node.log()
    );
    let enrolled = script
        .enrolls
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("an Enroll");
    assert_eq!(
        enrolled.machine_key, first_login.machine_key,
        "same machine key"
    );
    assert_eq!(enrolled.wg_key, first_login.wg_key, "same WireGuard key");
    let s = node.status();
    assert_eq!(s["login"], "ok");
    assert_eq!(s["peers"].as_array().map(Vec::len), Some(1), "{s:#}");
    assert_eq!(node.uapi_peers(), 1);
}

/// The posture phase (see the module doc): a logged-in node with a map
/// asking for reports every second.
fn posture_reports_follow_the_map_and_the_pref(
    node: &Node,
    script: &Script,
    up: &dyn Fn(&[&str]) -> Command,
) {
    let reports = || script.postures.lock().unwrap().len();
    let wait_for = |what: &str, n: usize| {
        let deadline = Instant::now() + BOUND;
        while reports() < n {
            assert!(Instant::now() < deadline, "{what}\n{}", node.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("a posture report", 1);
    let (proof_ok, first) = script.postures.lock().unwrap()[0].clone();
    assert!(proof_ok, "signed for ReportPosture");
    let attr = |key: &str| {
        first
            .attributes
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.clone())
    };
    use pb::posture_attribute::Value;
    assert_eq!(attr("node:os"), Some(Value::Text("linux".into())));
    assert_eq!(
        attr("node:tsVersion"),
        Some(Value::Text(env!("CARGO_PKG_VERSION").into()))
    );
    assert!(matches!(attr("node:kernel"), Some(Value::Text(k)) if !k.is_empty()));
    let keys: Vec<&str> = first.attributes.iter().map(|a| a.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(keys, sorted, "in key order");
    // Every posture_interval_ms (2 s) while nothing changes.
    let at = Instant::now();
    wait_for("reports on the interval", 3);
    assert!(
        at.elapsed() >= Duration::from_millis(1_900),
        "not faster than asked"
    );

    node.until("status shows the report", |s| {
        s["posture"]["last_report_ms"].is_i64()
    });
    let s = node.status();
    let p = &s["posture"];
    assert_eq!(p["reporting"], true);
    assert_eq!(p["interval_ms"], POSTURE_INTERVAL_MS);
    assert_eq!(p["attributes"]["node:os"], "linux");
    assert_eq!(p["clipped"], serde_json::json!([CLIPPED]));
    assert_eq!(
        p["checks"],
        serde_json::json!([
            {"name": "posture:compliant", "passed": false, "detail": "custom:compliant == true: seen false (set by an admin)"},
            {"name": "posture:base", "passed": true, "detail": ""},
        ])
    );
    assert_eq!(s["prefs"]["report_posture"], true);
    let out = text(&node.cli(&["status"]).stdout);
    for want in [
        "posture:compliant  FAILED: custom:compliant == true: seen false (set by an admin)\n",
        "posture:base       ok\n",
        "posture: reporting every 2s, last report ",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    assert!(
        node.log()
            .contains("the controller clipped the posture report"),
        "logged"
    );

    // Off: no more reports (the controller lets the last one go stale).
    let advertised = script.routes_calls.load(Ordering::SeqCst);
    let out = up(&["--report-posture=false"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = node.status();
    assert_eq!(s["posture"]["reporting"], false);
    assert_eq!(s["prefs"]["report_posture"], false);
    assert!(text(&node.cli(&["status"]).stdout)
        .contains("posture: reporting off (up --report-posture=false)\n"));
    // A report already on its way may still land.
    std::thread::sleep(Duration::from_millis(1_200));
    let quiet = reports();
    std::thread::sleep(Duration::from_millis(4_500));
    assert_eq!(reports(), quiet, "no reports while off");

    // On again: a report at once, without a reconnect.
    let calls = script.stream_calls.load(Ordering::SeqCst);
    let out = up(&["--report-posture"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for("reporting resumed", quiet + 1);
    assert_eq!(
        script.stream_calls.load(Ordering::SeqCst),
        calls,
        "same session"
    );
    assert_eq!(node.status()["posture"]["reporting"], true);
    assert_eq!(
        script.routes_calls.load(Ordering::SeqCst),
        advertised,
        "toggling posture reports advertises nothing"
    );
}
