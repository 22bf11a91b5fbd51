//! The ztmesh wire protocol, shared by controller and node.
//!
//! - [`control`] and [`admin`]: generated gRPC services and messages.
//! - [`keys`]: key newtypes (ed25519 machine/controller keys, x25519 WireGuard
//!   keys) with their text encodings and 0600 key files.
//! - [`netmap`]: signing and verification of network maps.
//! - [`handover`]: the hand-over from a replaced netmap signing key to its
//!   successor.
//! - [`auth`]: node session proofs, the auth-key format and its parser.
//! - [`tls`]: certificate-pinned TLS channels to the controller.
//! - [`relay`]: the relay protocol's frame codec (pure).
//! - [`refusal`]: machine-readable reasons a node's session was refused.
//! - [`scrape`]: the `/metrics` HTTP listener (shell; request routing pure).
//! - [`stun`]: STUN Binding requests and responses (pure codec).
//! - [`ops`]: config files, logging, systemd notifications, completions and
//!   man pages for the binaries.
//! - [`time`]: the one wall-clock read ([`time::now_ms`]) both sides use.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

pub mod auth;
pub mod delta;
pub mod handover;
pub mod keys;
pub mod netmap;
pub mod ops;
pub mod protocol;
pub mod refusal;
pub mod relay;
pub mod scrape;
pub mod stun;
pub mod time;
pub mod tls;

/// Generated control API (node ↔ controller).
#[allow(clippy::all, missing_docs)]
pub mod control {
    tonic::include_proto!("ztmesh.control.v1");
}

/// Generated admin API (CLI ↔ controller).
#[allow(clippy::all, missing_docs)]
pub mod admin {
    tonic::include_proto!("ztmesh.admin.v1");
}

/// Milliseconds since the Unix epoch, the unit every timestamp on the wire uses.
pub type UnixMs = i64;
