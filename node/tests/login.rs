//! The node's side of an interactive login (`Control.Login`) against a
//! scripted controller: a real tonic server and the node's real gRPC client
//! over an in-memory HTTP/2 pipe (no sockets).
//!
//! The script plays the controller: the prompt, then (once the node has
//! shown the prompt to its caller, or after a delay) the enrollment. The
//! hostile scripts break the protocol; the node must refuse each with a
//! clear error and store nothing in its state dir.
#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "integration tests build inputs from the real clock and entropy"
)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ztmesh_node::agent::{sign_in, Applicant, Enrollment};
use ztmesh_node::control::client::SignInError;
use ztmesh_node::control::login::{EnrollError, LoginError, Prompt};
use ztmesh_node::control::Controller;
use ztmesh_proto::auth::login_message;
use ztmesh_proto::control::control_server::{Control, ControlServer};
use ztmesh_proto::control::{self as pb, login_event::Event};
use ztmesh_proto::keys::{PublicKey, SigningKey, WgPrivateKey};

/// Liveness bound for each login in these tests.
const BOUND: Duration = Duration::from_secs(20);

/// One step of the controller's script.
#[derive(Clone)]
enum Act {
    Send(pb::LoginEvent),
    /// Wait until the node's caller has seen the prompt (bounded).
    AwaitShown,
    Sleep(Duration),
    /// End the stream with this error.
    Fail(Status),
    /// Keep the stream open until the node drops it; record that.
    HoldOpen,
}

/// What the scripted controller saw.
#[derive(Default)]
struct Seen {
    requests: Vec<pb::LoginRequest>,
    /// The node dropped a held-open login stream.
    dropped: bool,
}

struct Scripted {
    script: Vec<Act>,
    /// Refuse the call itself with this status.
    refuse: Option<Status>,
    shown: Arc<Notify>,
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl Control for Scripted {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    type LoginStream = ReceiverStream<Result<pb::LoginEvent, Status>>;

    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<Self::LoginStream>, Status> {
        self.seen.lock().unwrap().requests.push(req.into_inner());
        if let Some(s) = &self.refuse {
            return Err(s.clone());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let script = self.script.clone();
        let shown = self.shown.clone();
        let seen = self.seen.clone();
        tokio::spawn(async move {
            for act in script {
                match act {
                    Act::Send(ev) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Act::AwaitShown => {
                        if tokio::time::timeout(BOUND, shown.notified()).await.is_err() {
                            return;
                        }
                    }
                    Act::Sleep(d) => tokio::time::sleep(d).await,
                    Act::Fail(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Act::HoldOpen => {
                        if tokio::time::timeout(BOUND, tx.closed()).await.is_ok() {
                            seen.lock().unwrap().dropped = true;
                        }
                        return;
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
        Err(Status::unimplemented("not in this test"))
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

/// A node's client connected to `server` over an in-memory pipe.
async fn connect(server: Scripted) -> (Controller, tokio::task::JoinHandle<()>) {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ControlServer::new(server))
            .serve_with_incoming(tokio_stream::once(Ok::<_, std::io::Error>(server_io)))
            .await;
    });
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
    (Controller::from_channel(channel), task)
}

fn prompt_event(url: &str, code: &str) -> pb::LoginEvent {
    pb::LoginEvent {
        event: Some(Event::Prompt(pb::LoginPrompt {
            url: url.into(),
            code: code.into(),
            expires_ms: ztmesh_proto::time::now_ms() + 600_000,
        })),
    }
}

fn prompt() -> pb::LoginEvent {
    prompt_event("https://198.18.0.1:8443/device?code=KXQP-7RTM", "KXQP-7RTM")
}

fn controller_key() -> PublicKey {
    SigningKey::generate(&mut StdRng::seed_from_u64(40)).public()
}

fn enrollment(controller_key: Vec<u8>, addresses: &[&str]) -> pb::LoginEvent {
    pb::LoginEvent {
        event: Some(Event::Enrolled(pb::EnrollResponse {
            node_id: 12,
            name: "laptop-alice".into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            controller_key,
            key_expiry_ms: 1_900_000_000_000,
        })),
    }
}

fn good_enrollment() -> pb::LoginEvent {
    enrollment(
        controller_key().as_bytes().to_vec(),
        &["100.64.0.12", "fd7a:115c:a1e0::c"],
    )
}

const URL: &str = "https://198.18.0.1:8443";
const PIN: [u8; 32] = [0x5a; 32];

/// A state directory of its own, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "ztmesh-login-test-{}-{n}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("state dir");
        StateDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Every file in it.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("state dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Outcome {
    result: anyhow::Result<(Enrollment, i64)>,
    /// What the state dir holds afterwards.
    stored: Vec<String>,
    /// `enrollment.json` as stored, if it is.
    enrollment_file: Option<Enrollment>,
    prompts: Vec<Prompt>,
    seen: Arc<Mutex<Seen>>,
    machine: SigningKey,
    wg: WgPrivateKey,
}

impl Outcome {
    /// The login's error, which must be a [`SignInError`].
    fn sign_in_error(&self) -> &SignInError {
        match &self.result {
            Ok(_) => panic!("expected a failed login"),
            Err(e) => e
                .downcast_ref::<SignInError>()
                .unwrap_or_else(|| panic!("not a sign-in error: {e:#}")),
        }
    }
}

/// Runs one login against a controller playing `script` (or refusing the
/// call with `refuse`), as the daemon does: stored in a fresh state dir.
async fn run(script: Vec<Act>, refuse: Option<Status>) -> Outcome {
    let machine = SigningKey::generate(&mut StdRng::seed_from_u64(41));
    let wg = WgPrivateKey::generate(&mut StdRng::seed_from_u64(42));
    let shown = Arc::new(Notify::new());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (mut ctl, server) = connect(Scripted {
        script,
        refuse,
        shown: shown.clone(),
        seen: seen.clone(),
    })
    .await;
    let dir = StateDir::new("run");
    let who = Applicant {
        machine: &machine,
        wg: &wg,
        hostname: "laptop-alice",
        os: "linux 6.1.0-test",
    };
    let mut prompts = Vec::new();
    let result = tokio::time::timeout(
        BOUND,
        sign_in(&mut ctl, dir.path(), URL, PIN, &who, |p| {
            prompts.push(p.clone());
            shown.notify_one();
        }),
    )
    .await
    .expect("liveness bound");
    server.abort();
    let enrollment_file = std::fs::read(dir.path().join("enrollment.json"))
        .ok()
        .map(|b| serde_json::from_slice(&b).expect("enrollment.json parses"));
    Outcome {
        result,
        stored: dir.files(),
        enrollment_file,
        prompts,
        seen,
        machine,
        wg,
    }
}

#[tokio::test]
async fn the_prompt_reaches_the_caller_before_the_enrollment_and_the_proof_verifies() {
    // The controller sends the enrollment only after the node's caller was
    // shown the prompt: a node that waited for the whole stream would hang.
    let out = run(
        vec![
            Act::Send(prompt()),
            Act::AwaitShown,
            Act::Sleep(Duration::from_millis(200)),
            Act::Send(good_enrollment()),
        ],
        None,
    )
    .await;
    let (enrolled, key_expiry_ms) = out.result.expect("enrolled");
    assert_eq!(enrolled.node_id, 12);
    assert_eq!(enrolled.name, "laptop-alice");
    assert_eq!(enrolled.controller_key, controller_key());
    assert_eq!(enrolled.controller_url, URL);
    assert_eq!(enrolled.fingerprint, PIN, "the pin the login used");
    assert_eq!(key_expiry_ms, 1_900_000_000_000);
    assert_eq!(out.stored, ["enrollment.json"]);
    assert_eq!(
        out.enrollment_file.as_ref(),
        Some(&enrolled),
        "stored as returned"
    );
    assert_eq!(
        enrolled.addresses,
        [
            "100.64.0.12/32".parse::<ipnet::IpNet>().unwrap(),
            "fd7a:115c:a1e0::c/128".parse().unwrap()
        ]
    );
    assert_eq!(out.prompts.len(), 1);
    assert_eq!(
        out.prompts[0].url,
        "https://198.18.0.1:8443/device?code=KXQP-7RTM"
    );
    assert_eq!(out.prompts[0].code, "KXQP-7RTM");

    // The request names this node and carries a proof over login_message.
    let seen = out.seen.lock().unwrap();
    let [req] = seen.requests.as_slice() else {
        panic!("one login request, got {}", seen.requests.len());
    };
    assert_eq!(req.machine_key, out.machine.public().as_bytes());
    assert_eq!(req.wg_key, out.wg.public().as_bytes());
    assert_eq!(req.hostname, "laptop-alice");
    assert_eq!(req.os, "linux 6.1.0-test");
    assert!((ztmesh_proto::time::now_ms() - req.timestamp_ms).abs() < 60_000);
    let signer = PublicKey::from_slice(&req.machine_key).unwrap();
    let msg = login_message(
        &req.machine_key,
        &req.wg_key,
        &req.hostname,
        &req.os,
        req.timestamp_ms,
    );
    assert!(signer.verify(&msg, &req.proof), "the proof verifies");
    // It binds every field: a replay with another hostname, OS, time or
    // WireGuard key does not verify.
    let other_wg = WgPrivateKey::generate(&mut StdRng::seed_from_u64(43));
    for forged in [
        login_message(
            &req.machine_key,
            &req.wg_key,
            "evil",
            &req.os,
            req.timestamp_ms,
        ),
        login_message(
            &req.machine_key,
            &req.wg_key,
            &req.hostname,
            "windows",
            req.timestamp_ms,
        ),
        login_message(
            &req.machine_key,
            &req.wg_key,
            &req.hostname,
            &req.os,
            req.timestamp_ms + 1,
        ),
        login_message(
            &req.machine_key,
            other_wg.public().as_bytes(),
            &req.hostname,
            &req.os,
            req.timestamp_ms,
        ),
    ] {
        assert!(!signer.verify(&forged, &req.proof));
    }
}

#[tokio::test]
async fn broken_login_streams_are_refused_with_a_clear_error_and_no_enrollment() {
    let bad_key = enrollment(vec![7; 31], &["100.64.0.12"]);
    let bad_addr = enrollment(
        controller_key().as_bytes().to_vec(),
        &["100.64.0.12", "100.64.0.256"],
    );
    let cases: Vec<(&str, Vec<Act>, LoginError, &str)> = vec![
        (
            "ends after the prompt",
            vec![Act::Send(prompt())],
            LoginError::Ended,
            "without enrolling this node",
        ),
        (
            "ends at once",
            vec![],
            LoginError::Ended,
            "run `ztmesh up` again",
        ),
        (
            "enrollment before the prompt",
            vec![Act::Send(good_enrollment())],
            LoginError::EnrolledBeforePrompt,
            "before the sign-in prompt",
        ),
        (
            "two prompts",
            vec![
                Act::Send(prompt()),
                Act::Send(prompt()),
                Act::Send(good_enrollment()),
            ],
            LoginError::SecondPrompt,
            "second sign-in prompt",
        ),
        (
            "empty event",
            vec![
                Act::Send(prompt()),
                Act::Send(pb::LoginEvent { event: None }),
            ],
            LoginError::Empty,
            "empty login event",
        ),
        (
            "bad controller key",
            vec![Act::Send(prompt()), Act::Send(bad_key)],
            LoginError::Enroll(EnrollError::ControllerKey),
            "invalid netmap key",
        ),
        (
            "bad address",
            vec![Act::Send(prompt()), Act::Send(bad_addr)],
            LoginError::Enroll(EnrollError::Address("100.64.0.256".into())),
            "invalid address \"100.64.0.256\"",
        ),
        (
            "terminal escape in the URL",
            vec![
                Act::Send(prompt_event(
                    "https://example.com/\x1b[2J\x1b]0;owned\x07",
                    "C",
                )),
                Act::Send(good_enrollment()),
            ],
            LoginError::BadUrl("not printable ASCII"),
            "unusable sign-in URL",
        ),
        (
            "oversized URL",
            vec![Act::Send(prompt_event(
                &format!("https://example.com/{}", "x".repeat(1 << 14)),
                "C",
            ))],
            LoginError::BadUrl("too long"),
            "too long",
        ),
        (
            "plain http URL",
            vec![Act::Send(prompt_event("http://example.com/device", "C"))],
            LoginError::BadUrl("not an https:// URL"),
            "https",
        ),
    ];
    for (what, script, want, says) in cases {
        let out = run(script, None).await;
        match out.sign_in_error() {
            SignInError::Protocol(got) => assert_eq!(got, &want, "{what}"),
            other => panic!("{what}: expected {want:?}, got {other:?}"),
        }
        let msg = format!("{:#}", out.result.as_ref().expect_err("failed"));
        assert!(msg.contains(says), "{what}: {msg}");
        assert!(out.stored.is_empty(), "{what}: stored {:?}", out.stored);
        // A broken prompt is never shown to the person.
        let shown_ok = out.prompts.iter().all(|p| p.url.starts_with("https://"));
        assert!(shown_ok, "{what}: {:?}", out.prompts);
    }
}

#[tokio::test]
async fn refusals_by_the_controller_are_reported_verbatim() {
    let out = run(
        vec![],
        Some(Status::unauthenticated("proof is 3 minutes old")),
    )
    .await;
    match out.sign_in_error() {
        e @ SignInError::Refused(_) => {
            assert_eq!(e.to_string(), "login refused: proof is 3 minutes old");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(out.prompts.is_empty());
    assert!(out.stored.is_empty());

    let out = run(
        vec![
            Act::Send(prompt()),
            Act::Fail(Status::permission_denied("the sign-in was declined")),
        ],
        None,
    )
    .await;
    match out.sign_in_error() {
        e @ SignInError::Stream(_) => {
            assert_eq!(e.to_string(), "login failed: the sign-in was declined");
        }
        other => panic!("expected a failed stream, got {other:?}"),
    }
    assert_eq!(
        out.prompts.len(),
        1,
        "the prompt was shown before the refusal"
    );
    assert!(out.stored.is_empty());
}

#[tokio::test]
async fn a_caller_that_gives_up_drops_the_stream_and_the_controller_sees_it() {
    let machine = SigningKey::generate(&mut StdRng::seed_from_u64(44));
    let wg = WgPrivateKey::generate(&mut StdRng::seed_from_u64(45));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (mut ctl, server) = connect(Scripted {
        script: vec![Act::Send(prompt()), Act::HoldOpen],
        refuse: None,
        shown: Arc::new(Notify::new()),
        seen: seen.clone(),
    })
    .await;
    let dir = StateDir::new("give-up");
    let who = Applicant {
        machine: &machine,
        wg: &wg,
        hostname: "laptop",
        os: "linux",
    };
    let mut shown = 0;
    // As the daemon does at its deadline (or when its CLI hangs up).
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        sign_in(&mut ctl, dir.path(), URL, PIN, &who, |_| shown += 1),
    )
    .await;
    assert!(gave_up.is_err(), "no enrollment came: the wait timed out");
    assert_eq!(shown, 1);
    assert!(dir.files().is_empty(), "nothing stored");
    let dropped = tokio::time::timeout(BOUND, async {
        loop {
            if seen.lock().unwrap().dropped {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(dropped.is_ok(), "the controller saw the pending login end");
    server.abort();
}
