//! Why the controller refused or ended a node's session, in a form both sides
//! read the same way. Pure: no I/O.
//!
//! A node-authentication failure is a gRPC status whose metadata carries
//! [`REASON_HEADER`] = one of the [`AuthReason`] strings, plus the message for
//! humans. For [`AuthReason::ClockSkew`] the controller also sends its own
//! clock in [`SERVER_TIME_HEADER`] (Unix ms), so the node can say how far off
//! its clock is. Only [`AuthReason::Revoked`] and [`AuthReason::Expired`] mean "this node is
//! not a member now": the others are fixable, and a node keeps its last verified map.
//! [`AuthReason::Incompatible`] refuses the node's control protocol version
//! (see [`crate::protocol`]), before any credential is looked at.

use std::fmt;
use std::str::FromStr;

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::UnixMs;

/// Status metadata key naming the [`AuthReason`].
pub const REASON_HEADER: &str = "ztmesh-auth-reason";
/// Status metadata key with the controller's clock (Unix ms), sent with
/// [`AuthReason::ClockSkew`].
pub const SERVER_TIME_HEADER: &str = "ztmesh-server-time-ms";

/// Why a node's credentials or session were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthReason {
    /// The node was deleted or its machine key is unknown: it is no longer
    /// a member; it must drop its peers and re-enroll.
    Revoked,
    /// The node's key expired (its owner's session ended, or an admin
    /// expired it): it drops its peers until a person re-authenticates it
    /// (`ztmesh up`), keeping its identity and addresses.
    Expired,
    /// The proof's timestamp is outside the accepted window of the
    /// controller's clock: fix the node's clock.
    ClockSkew,
    /// A newer session of the same node took over this stream.
    Replaced,
    /// This exact proof was already used.
    Replayed,
    /// The proof is missing, malformed, or its signature does not verify.
    BadProof,
    /// The node speaks a control protocol version this controller does not
    /// serve (see [`crate::protocol::check`]): upgrade the side the message
    /// names.
    Incompatible,
}

impl AuthReason {
    /// Every reason, for tests and documentation.
    pub const ALL: [AuthReason; 7] = [
        AuthReason::Revoked,
        AuthReason::Expired,
        AuthReason::ClockSkew,
        AuthReason::Replaced,
        AuthReason::Replayed,
        AuthReason::BadProof,
        AuthReason::Incompatible,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthReason::Revoked => "revoked",
            AuthReason::Expired => "expired",
            AuthReason::ClockSkew => "clock-skew",
            AuthReason::Replaced => "replaced",
            AuthReason::Replayed => "replayed",
            AuthReason::BadProof => "bad-proof",
            AuthReason::Incompatible => "incompatible-protocol",
        }
    }

    /// The gRPC code a refusal with this reason carries: `ABORTED` for a
    /// replaced session (nothing is wrong with the credentials),
    /// `FAILED_PRECONDITION` for an incompatible protocol version, otherwise
    /// `UNAUTHENTICATED`.
    pub fn code(self) -> Code {
        match self {
            AuthReason::Replaced => Code::Aborted,
            AuthReason::Incompatible => Code::FailedPrecondition,
            _ => Code::Unauthenticated,
        }
    }
}

impl fmt::Display for AuthReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown reason string (e.g. from a newer controller).
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown auth reason")]
pub struct UnknownReason;

impl FromStr for AuthReason {
    type Err = UnknownReason;
    fn from_str(s: &str) -> Result<Self, UnknownReason> {
        AuthReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or(UnknownReason)
    }
}

/// The status the controller sends for a refusal: code from
/// [`AuthReason::code`], the reason (and the controller's clock, if given)
/// in the metadata.
pub fn status(reason: AuthReason, message: &str, server_time_ms: Option<UnixMs>) -> Status {
    let mut s = Status::new(reason.code(), message);
    s.metadata_mut()
        .insert(REASON_HEADER, MetadataValue::from_static(reason.as_str()));
    if let Some(t) = server_time_ms {
        if let Ok(v) = t.to_string().parse() {
            s.metadata_mut().insert(SERVER_TIME_HEADER, v);
        }
    }
    s
}

/// What a status says about the refusal: the reason string as sent (if
/// any) and the controller's clock (if sent and well-formed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `None`: no reason entry (an older controller, or not a node-auth error).
    pub reason: Option<Result<AuthReason, UnknownReason>>,
    pub server_time_ms: Option<UnixMs>,
}

/// Reads the refusal metadata of `status`; never fails (bad values read as
/// unknown / absent).
pub fn refusal(status: &Status) -> Refusal {
    let md = status.metadata();
    let reason = md
        .get(REASON_HEADER)
        .map(|v| v.to_str().map_err(|_| UnknownReason)?.parse());
    let server_time_ms = md
        .get(SERVER_TIME_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Refusal {
        reason,
        server_time_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_a_status() {
        for r in AuthReason::ALL {
            assert_eq!(r.as_str().parse::<AuthReason>(), Ok(r));
            let s = status(r, "why", Some(-5));
            assert_eq!(s.code(), r.code());
            assert_eq!(s.message(), "why");
            let got = refusal(&s);
            assert_eq!(got.reason, Some(Ok(r)));
            assert_eq!(got.server_time_ms, Some(-5));
        }
        assert_eq!(AuthReason::Replaced.code(), Code::Aborted);
        assert_eq!(AuthReason::ClockSkew.code(), Code::Unauthenticated);
        assert_eq!(AuthReason::Incompatible.code(), Code::FailedPrecondition);
    }

    #[test]
    fn missing_or_garbled_metadata_reads_as_absent_or_unknown() {
        let plain = Status::unauthenticated("old controller");
        assert_eq!(
            refusal(&plain),
            Refusal {
                reason: None,
                server_time_ms: None
            }
        );
        let mut s = Status::unauthenticated("x");
        s.metadata_mut()
            .insert(REASON_HEADER, MetadataValue::from_static("quarantined"));
        s.metadata_mut()
            .insert(SERVER_TIME_HEADER, MetadataValue::from_static("soon"));
        let got = refusal(&s);
        assert_eq!(got.reason, Some(Err(UnknownReason)));
        assert_eq!(got.server_time_ms, None);
    }
}
