//! The controller's data types shared by the layers: plain values, no I/O.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::UnixMs;

/// An enrolled node, as persisted and as the netmap core holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRow {
    pub id: u64,
    pub name: String,
    pub hostname: String,
    pub machine_key: [u8; 32],
    pub wg_key: [u8; 32],
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub ephemeral: bool,
    pub created_ms: UnixMs,
    pub last_seen_ms: UnixMs,
    /// 0 = never expires.
    pub expiry_ms: UnixMs,
    /// An admin expired the key: final, whatever the clock later reads
    /// (`expiry_ms` records when).
    pub key_revoked: bool,
    pub endpoints: Vec<String>,
}
