//! NAT traversal, pure parts: endpoint discovery for the data plane
//! ([`discovery`]) and the probe behind `ztmesh netcheck` ([`netcheck`]).
//! The STUN codec itself is `ztmesh_proto::stun`.

pub mod discovery;
pub mod netcheck;
