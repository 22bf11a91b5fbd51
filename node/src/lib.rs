//! ztmesh node: the userspace WireGuard data plane (sans-IO tunnel device,
//! packet filter, TUN/UDP I/O), the wireguard userspace API, wg-quick configs
//! and standalone mode.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

pub mod agent;
pub mod cli;
pub mod control;
pub mod dns;
pub mod filter;
pub mod io;
pub mod localapi;
pub mod metrics;
pub mod nat;
pub mod path;
pub mod posture;
pub mod privs;
pub mod routing;
pub mod standalone;
pub mod statelock;
pub mod tunnel;
pub mod uapi;
pub mod wgconf;
