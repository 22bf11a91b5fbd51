//! The controller's error type and its one mapping to gRPC statuses.
//!
//! Messages sent to peers are precise but never carry internal details
//! (SQL, paths); those go to the log.

use ztmesh_proto::refusal::{self, AuthReason};

use crate::store::StoreError;
use crate::UnixMs;

/// Errors from controller operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message says which field and why.
    #[error("{0}")]
    Invalid(String),
    /// Missing, wrong, stale or replayed credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// A node's proof or session was refused. The node reads `reason` (sent as
    /// the `ztmesh-auth-reason` status metadata) to tell a revocation from a
    /// problem it can fix (clock, replaced session); `server_time_ms` is the
    /// controller's clock, sent with `clock-skew`.
    #[error("{message}")]
    NodeAuth {
        reason: AuthReason,
        message: String,
        server_time_ms: Option<UnixMs>,
    },
    /// Authenticated, but not allowed (e.g. a tag the user may not own).
    #[error("{0}")]
    Forbidden(String),
    /// The named object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The name/key is taken.
    #[error("{0} already exists")]
    Conflict(String),
    /// Too many failures from this source; retry later.
    #[error("too many failed attempts from this source; retry in a minute")]
    RateLimited,
    /// An enrolled node called too often; the message names the call, the
    /// limit and when to retry.
    #[error("{0}")]
    Throttled(String),
    /// Another session of this node is live (a second machine with the same
    /// identity, or a reconnect before the old connection was seen to close).
    #[error("{0}")]
    SessionConflict(String),
    /// The object is not in the state the request needs (e.g. releasing a
    /// node that is not quarantined).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Policy rejected; the message holds `FILE:LINE:COL: message` lines.
    #[error("{0}")]
    Policy(String),
    /// Storage failure (details logged).
    #[error("internal storage error")]
    Store(#[source] StoreError),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Error::Conflict(what),
            StoreError::NotFound(what) => Error::NotFound(what),
            StoreError::KeyRefused(why) => Error::Unauthenticated(why),
            other => Error::Store(other),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::Invalid(m) => Status::invalid_argument(m.clone()),
            Error::Unauthenticated(m) => Status::unauthenticated(m.clone()),
            Error::NodeAuth {
                reason,
                message,
                server_time_ms,
            } => refusal::status(*reason, message, *server_time_ms),
            Error::Forbidden(m) => Status::permission_denied(m.clone()),
            Error::NotFound(_) => Status::not_found(e.to_string()),
            Error::Conflict(_) => Status::already_exists(e.to_string()),
            Error::RateLimited => Status::resource_exhausted(e.to_string()),
            Error::Throttled(m) => Status::resource_exhausted(m.clone()),
            Error::SessionConflict(m) | Error::FailedPrecondition(m) => {
                Status::failed_precondition(m.clone())
            }
            Error::Policy(m) => Status::invalid_argument(m.clone()),
            Error::Store(inner) => {
                tracing::error!(error = %inner, "store failure");
                Status::internal(e.to_string())
            }
        }
    }
}

impl Error {
    /// A node-auth refusal without a clock reading.
    pub fn node_auth(reason: AuthReason, message: impl Into<String>) -> Self {
        Error::NodeAuth {
            reason,
            message: message.into(),
            server_time_ms: None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
