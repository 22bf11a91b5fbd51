//! ztmesh-relay: forwards already-encrypted WireGuard datagrams between nodes
//! whose current netmaps pair them, over QUIC (datagrams, RFC 9221) or a
//! TLS-over-TCP fallback, and answers STUN binding requests.
//!
//! - [`core`]: the authorization core (pure: sessions, HELLO/MAP checks,
//!   the mutual-listing rule, counters, memory budget).
//! - [`limiter`]: the failure limiter for invalid `HELLO`s by source (pure).
//! - [`server`]: the shell around it (quinn endpoint, TLS/TCP acceptor,
//!   STUN sockets, the stats file).
//! - [`client`]: the client the node uses (QUIC or TCP, pinned certificate).
//! - [`datadir`]: certificate, identity, stats and lock files.
//! - [`wire`]: frame reading, QUIC transport and TLS settings shared by both sides.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

pub mod client;
pub mod core;
pub mod datadir;
pub mod limiter;
pub mod server;
pub mod wire;
