//! The I/O half of the node's control protocol: the tonic client over the
//! pinned-TLS channel, the protocol version on every call, the machine-key
//! proofs on every call (reading the clock and drawing nonces), the netmap size limit, reading a refusal from a gRPC
//! status, and the reconnect jitter drawn from an RNG. Decisions are made by
//! the pure [`super::apply`].
#![expect(
    clippy::disallowed_types,
    reason = "the client shell draws proof nonces from OS entropy"
)]

use std::time::Duration;

use rand::Rng;
use rand_core::OsRng;
use ztmesh_proto::auth::{self, methods, signed_request};
use ztmesh_proto::control::{self as pb, control_client::ControlClient};
use ztmesh_proto::keys::{SigningKey, WgPrivateKey};
use ztmesh_proto::protocol::{self, Version};
use ztmesh_proto::refusal;
use ztmesh_proto::time::now_ms;
use ztmesh_proto::UnixMs;

use super::apply::{decide, Backoff, Ending, SessionEnd};
use super::login::{Enrolled, LoginError, LoginFlow, LoginStep, Prompt};

/// Largest netmap message accepted from the controller (see
/// [`ztmesh_proto::netmap::MAX_SIGNED_MAP_BYTES`]). The map comes only from
/// the pinned controller over TLS, so this bounds a controller's mistake,
/// not a stranger's input.
pub const MAX_NETMAP_BYTES: usize = ztmesh_proto::netmap::MAX_SIGNED_MAP_BYTES;

/// Decides what a refusal `status` means for this node (see
/// [`super::apply::decide`]); `now_ms` is the local clock reading.
pub fn session_end(status: &tonic::Status, now_ms: UnixMs) -> SessionEnd {
    decide(ending(status), now_ms)
}

/// Reads what [`decide`] needs from a gRPC status.
pub fn ending(status: &tonic::Status) -> Ending {
    let code = status.code();
    Ending {
        refusal: refusal::refusal(status),
        auth_refused: matches!(
            code,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        code: code.to_string(),
        message: status.message().to_string(),
    }
}

/// The delay before reconnect attempt `attempt`, jittered from the thread
/// RNG; the slow pace of [`Backoff::expired`] when only someone else can
/// fix the refusal (the node's key expired, or its protocol version is not
/// served).
#[expect(
    clippy::disallowed_methods,
    reason = "the client shell draws the reconnect jitter; the backoff itself is pure"
)]
pub fn reconnect_delay(backoff: &Backoff, attempt: u32, slow: bool) -> Duration {
    let r = rand::thread_rng().gen();
    if slow {
        Backoff::expired(r)
    } else {
        backoff.delay(attempt, r)
    }
}

/// Why an interactive login ([`Controller::sign_in`]) failed; nothing was
/// enrolled.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// The controller refused to start the login (a bad proof, a clock far
    /// off, too many logins): its message.
    #[error("login refused: {}", .0.message())]
    Refused(tonic::Status),
    /// The controller ended the login with an error (the sign-in was
    /// declined or failed), or the connection broke: its message.
    #[error("login failed: {}", .0.message())]
    Stream(tonic::Status),
    /// The controller broke the protocol (see [`LoginError`]).
    #[error(transparent)]
    Protocol(#[from] LoginError),
}

/// The channel with this node's protocol version on every call.
type Versioned = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

/// Adds [`protocol::HEADER`] with [`Version::CURRENT`] to a call.
fn with_version(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut()
        .insert(protocol::HEADER, Version::CURRENT.metadata());
    Ok(req)
}

/// A connected, authenticated client of the controller (a clone shares
/// the connection).
#[derive(Clone)]
pub struct Controller {
    client: ControlClient<Versioned>,
}

impl Controller {
    /// Connects over TLS pinned to `fingerprint`.
    ///
    /// # Errors
    /// Unreachable controller, bad URL or pin mismatch.
    pub async fn connect(
        url: &str,
        fingerprint: [u8; 32],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let ch = ztmesh_proto::tls::connect(url, fingerprint, timeout).await?;
        Ok(Self::from_channel(ch))
    }

    /// Connects over TLS accepting any of `pins` and asking for the first.
    ///
    /// # Errors
    /// Unreachable controller, bad URL or no pin matches.
    pub async fn connect_any(
        url: &str,
        pins: &[[u8; 32]],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let ch = ztmesh_proto::tls::connect_any(url, pins, timeout).await?;
        Ok(Self::from_channel(ch))
    }

    /// Wraps an established channel (TLS, or in-memory in tests).
    pub fn from_channel(ch: tonic::transport::Channel) -> Self {
        Self {
            client: ControlClient::with_interceptor(ch, with_version as fn(_) -> _)
                .max_decoding_message_size(MAX_NETMAP_BYTES),
        }
    }

    /// Enrolls with an auth key, proving possession of the machine key.
    ///
    /// # Errors
    /// The controller's refusal (e.g. a used or expired key), verbatim.
    pub async fn enroll(
        &mut self,
        auth_key: &str,
        machine: &SigningKey,
        wg: &WgPrivateKey,
        hostname: &str,
    ) -> Result<pb::EnrollResponse, tonic::Status> {
        let ts = now_ms();
        let mk = machine.public().as_bytes().to_vec();
        let wk = wg.public().as_bytes().to_vec();
        let proof = machine
            .sign(&auth::enroll_message(auth_key, &mk, &wk, hostname, ts))
            .to_vec();
        let req = pb::EnrollRequest {
            auth_key: auth_key.to_string(),
            machine_key: mk,
            wg_key: wk,
            hostname: hostname.to_string(),
            timestamp_ms: ts,
            proof,
        };
        Ok(self.client.enroll(req).await?.into_inner())
    }

    /// Starts an interactive login: proves possession of the machine key
    /// over [`auth::login_message`] and returns the event stream (a prompt,
    /// then the enrollment; see [`super::login::LoginFlow`]). The pending
    /// login lives as long as the stream: dropping it cancels the login.
    ///
    /// # Errors
    /// The controller's refusal, verbatim.
    pub async fn login(
        &mut self,
        machine: &SigningKey,
        wg: &WgPrivateKey,
        hostname: &str,
        os: &str,
    ) -> Result<tonic::Streaming<pb::LoginEvent>, tonic::Status> {
        let ts = now_ms();
        let mk = machine.public().as_bytes().to_vec();
        let wk = wg.public().as_bytes().to_vec();
        let proof = machine
            .sign(&auth::login_message(&mk, &wk, hostname, os, ts))
            .to_vec();
        let req = pb::LoginRequest {
            machine_key: mk,
            wg_key: wk,
            hostname: hostname.to_string(),
            os: os.to_string(),
            timestamp_ms: ts,
            proof,
        };
        Ok(self.client.login(req).await?.into_inner())
    }

    /// Runs an interactive login to its end: [`Self::login`], then the
    /// events in order ([`LoginFlow`]); `on_prompt` gets the prompt before
    /// the wait for the enrollment starts. The caller bounds the time (and
    /// cancels by dropping the future, which drops the stream).
    ///
    /// # Errors
    /// [`SignInError`]; nothing is enrolled.
    pub async fn sign_in(
        &mut self,
        machine: &SigningKey,
        wg: &WgPrivateKey,
        hostname: &str,
        os: &str,
        mut on_prompt: impl FnMut(&Prompt),
    ) -> Result<Enrolled, SignInError> {
        let mut stream = self
            .login(machine, wg, hostname, os)
            .await
            .map_err(SignInError::Refused)?;
        let mut flow = LoginFlow::default();
        // Bounded: the flow passes at most a prompt and an enrollment.
        loop {
            let Some(ev) = stream.message().await.map_err(SignInError::Stream)? else {
                return Err(flow.ended().unwrap_or(LoginError::Ended).into());
            };
            match flow.handle(ev)? {
                LoginStep::Prompt(p) => on_prompt(&p),
                LoginStep::Enrolled(e) => return Ok(e),
            }
        }
    }

    /// Opens the netmap stream (taking deltas after its first map, or not).
    ///
    /// # Errors
    /// Authentication or transport failures.
    pub async fn stream(
        &mut self,
        machine: &SigningKey,
        have_serial: u64,
        accept_deltas: bool,
    ) -> Result<tonic::Streaming<pb::SignedNetMap>, tonic::Status> {
        let req = signed_request(
            machine,
            methods::STREAM_NETMAP,
            pb::StreamNetMapRequest {
                have_serial,
                accept_deltas,
            },
            now_ms(),
            &mut OsRng,
        );
        Ok(self.client.stream_net_map(req).await?.into_inner())
    }

    /// Reports where this node can be reached.
    ///
    /// # Errors
    /// Authentication or transport failures.
    pub async fn report_endpoints(
        &mut self,
        machine: &SigningKey,
        endpoints: Vec<String>,
    ) -> Result<(), tonic::Status> {
        let req = signed_request(
            machine,
            methods::REPORT_ENDPOINTS,
            pb::ReportEndpointsRequest { endpoints },
            now_ms(),
            &mut OsRng,
        );
        self.client.report_endpoints(req).await?;
        Ok(())
    }

    /// Reports flow summaries and verified handshakes from unknown keys
    /// (the controller records them and its detectors weigh them), and the
    /// peers by path (the controller shows them to admins).
    ///
    /// # Errors
    /// Authentication or transport failures.
    pub async fn report_flows(
        &mut self,
        machine: &SigningKey,
        flows: Vec<pb::FlowSummary>,
        unknown_handshakes: Vec<pb::UnknownHandshakes>,
        paths: pb::PeerPaths,
    ) -> Result<(), tonic::Status> {
        let req = signed_request(
            machine,
            methods::REPORT_FLOWS,
            pb::ReportFlowsRequest {
                flows,
                unknown_handshakes,
                paths: Some(paths),
            },
            now_ms(),
            &mut OsRng,
        );
        self.client.report_flows(req).await?;
        Ok(())
    }

    /// Reports this node's posture attributes (replacing its last report);
    /// returns what the controller clipped or dropped, one line each.
    ///
    /// # Errors
    /// Authentication or transport failures; `UNIMPLEMENTED` from a
    /// controller without posture.
    pub async fn report_posture(
        &mut self,
        machine: &SigningKey,
        attributes: Vec<pb::PostureAttribute>,
    ) -> Result<Vec<String>, tonic::Status> {
        let req = signed_request(
            machine,
            methods::REPORT_POSTURE,
            pb::ReportPostureRequest { attributes },
            now_ms(),
            &mut OsRng,
        );
        Ok(self.client.report_posture(req).await?.into_inner().clipped)
    }

    /// Tells the controller the map with `serial` is applied (it times
    /// the change that produced it).
    ///
    /// # Errors
    /// Authentication, throttling or transport failures; `UNIMPLEMENTED`
    /// from a controller without the call.
    pub async fn netmap_applied(
        &mut self,
        machine: &SigningKey,
        serial: u64,
    ) -> Result<(), tonic::Status> {
        let req = signed_request(
            machine,
            methods::NETMAP_APPLIED,
            pb::NetMapAppliedRequest { serial },
            now_ms(),
            &mut OsRng,
        );
        self.client.net_map_applied(req).await?;
        Ok(())
    }

    /// Advertises this node's subnet routes and exit-node role; returns
    /// what is approved now.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming a bad route; authentication or transport
    /// failures.
    pub async fn set_routes(
        &mut self,
        machine: &SigningKey,
        routes: Vec<String>,
        exit_node: bool,
    ) -> Result<pb::SetRoutesResponse, tonic::Status> {
        let req = signed_request(
            machine,
            methods::SET_ROUTES,
            pb::SetRoutesRequest { routes, exit_node },
            now_ms(),
            &mut OsRng,
        );
        Ok(self.client.set_routes(req).await?.into_inner())
    }

    /// Deregisters this node.
    ///
    /// # Errors
    /// Authentication or transport failures.
    pub async fn logout(&mut self, machine: &SigningKey) -> Result<(), tonic::Status> {
        let req = signed_request(
            machine,
            methods::LOGOUT,
            pb::LogoutRequest {},
            now_ms(),
            &mut OsRng,
        );
        self.client.logout(req).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_revocations_expiry_and_reasonless_auth_refusals_drop_the_peers() {
        use tonic::{Code, Status};
        use ztmesh_proto::refusal::{self, AuthReason};

        let now = 1_800_000_300_000;
        let with = |reason: &'static str, code: Code| {
            let mut s = Status::new(code, "m");
            s.metadata_mut()
                .insert(refusal::REASON_HEADER, reason.parse().unwrap());
            s
        };
        let revoked = |m: &str| SessionEnd::Revoked(m.to_string());
        let table: Vec<(Status, SessionEnd)> = vec![
            // Reasons from this controller.
            (
                refusal::status(AuthReason::Revoked, "node was deleted", None),
                revoked("node was deleted"),
            ),
            (
                refusal::status(AuthReason::Expired, "key expired", None),
                SessionEnd::Expired("key expired".into()),
            ),
            (
                refusal::status(AuthReason::ClockSkew, "skew", Some(now - 300_000)),
                SessionEnd::ClockSkew {
                    skew_ms: Some(300_000),
                    message: "skew".into(),
                },
            ),
            (
                refusal::status(AuthReason::ClockSkew, "skew", None),
                SessionEnd::ClockSkew {
                    skew_ms: None,
                    message: "skew".into(),
                },
            ),
            (
                refusal::status(AuthReason::Replaced, "newer session", None),
                SessionEnd::Refused {
                    reason: "replaced",
                    message: "newer session".into(),
                },
            ),
            (
                refusal::status(AuthReason::Replayed, "r", None),
                SessionEnd::Refused {
                    reason: "replayed",
                    message: "r".into(),
                },
            ),
            (
                refusal::status(AuthReason::BadProof, "b", None),
                SessionEnd::Refused {
                    reason: "bad-proof",
                    message: "b".into(),
                },
            ),
            // A controller that does not speak this node's protocol version:
            // no revocation, the message says what to upgrade.
            (
                protocol::negotiate(Some(b"1.0"), Version::new(1, 2))
                    .unwrap_err()
                    .status(Version::new(1, 2)),
                SessionEnd::Incompatible(
                    "node speaks control protocol 1.0; this controller (1.2) accepts 1.1 to 1.3: upgrade the node"
                        .into(),
                ),
            ),
            (
                protocol::negotiate(Some(b"x"), Version::CURRENT)
                    .unwrap_err()
                    .status(Version::CURRENT),
                SessionEnd::Retry(
                    "Client specified an invalid argument: malformed x-ztmesh-protocol header \"x\": expected MAJOR.MINOR (e.g. 1.1)"
                        .into(),
                ),
            ),
            // An older controller: no reason; unauthenticated means revoked.
            (
                Status::unauthenticated("unknown machine key"),
                revoked("unknown machine key"),
            ),
            (Status::permission_denied("no"), revoked("no")),
            // A reason this node does not know: judged by the code, failing closed.
            (with("quarantined", Code::Unauthenticated), revoked("m")),
            (
                with("quarantined", Code::Aborted),
                SessionEnd::Retry("The operation was aborted: m".into()),
            ),
            // Not an auth refusal.
            (
                Status::unavailable("down"),
                SessionEnd::Retry("The service is currently unavailable: down".into()),
            ),
        ];
        for (status, want) in table {
            assert_eq!(session_end(&status, now), want, "{status:?}");
        }
        // A garbled clock reading is ignored, not trusted; extreme values saturate.
        let mut s = refusal::status(AuthReason::ClockSkew, "skew", None);
        s.metadata_mut()
            .insert(refusal::SERVER_TIME_HEADER, "yesterday".parse().unwrap());
        assert!(matches!(
            session_end(&s, now),
            SessionEnd::ClockSkew { skew_ms: None, .. }
        ));
        let s = refusal::status(AuthReason::ClockSkew, "skew", Some(i64::MIN));
        assert_eq!(
            session_end(&s, i64::MAX),
            SessionEnd::ClockSkew {
                skew_ms: Some(i64::MAX),
                message: "skew".into()
            }
        );
    }
}
