//! ztmesh-relay: forwards already-encrypted WireGuard datagrams between nodes
//! whose current netmaps pair them, over QUIC (datagrams, RFC 9221) or a
//! TLS-over-TCP fallback, and answers STUN binding requests.
//!
//! - [`core`]: the authorization core (pure: sessions, HELLO/MAP checks,
//!   the mutual-listing rule, counters, memory budget).
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

pub mod core;
