//! The node's side of the control protocol, in three parts: [`apply`] (pure:
//! gate, translate, what to install, what a refusal means, backoff schedule),
//! [`login`] (pure: the order of a login's events, what an enrollment must
//! hold, the key-expiry warning) and [`client`] (tonic, TLS, proofs, the
//! clock and the RNG).

pub mod apply;
pub mod client;
pub mod flows;
pub mod login;

pub use apply::{
    clock_hint, decide, next_controller, translate, Backoff, Ending, Identity, Install, NetMapGate,
    RefusedMap, SelfMismatch, SessionEnd, Step, TranslateError, Translated, FAILOVER_AFTER,
};
pub use client::{reconnect_delay, session_end, Controller, MAX_NETMAP_BYTES};
pub use login::{LoginError, LoginFlow, LoginStep};
