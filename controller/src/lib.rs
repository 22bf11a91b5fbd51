//! ztmesh controller: enrollment, authenticated node sessions, the policy in
//! force, and signed per-node network maps, over gRPC (tonic) with TLS.
//!
//! Layers: [`store`] (durable, SQLite by default) ← [`mesh`] (in-memory state,
//! change propagation; time is an argument) ← [`api`] (tonic services) ←
//! [`server`] (listeners, TLS, ticker; [`listener`] caps hostile clients).
//! [`cli`] is the admin client.

pub mod api;
pub mod cli;
pub mod error;
pub mod listener;
pub mod lockfile;
pub mod mesh;
pub mod nodeinput;
pub mod nodelimit;
pub mod ratelimit;
pub mod server;
pub mod store;

pub use ztmesh_proto::time::now_ms;
pub use ztmesh_proto::UnixMs;
