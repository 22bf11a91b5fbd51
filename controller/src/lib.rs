//! ztmesh controller: enrollment, authenticated node sessions, the policy in
//! force, and signed per-node network maps, over gRPC (tonic) with TLS.
//!
//! Layers, each using only those below it (tests/tests/boundaries.rs checks):
//! - [`model`]: plain data (node rows, device claims); [`roles`]: who may do
//!   what; [`auditchain`]: the audit log's hash chain and its verification
//!   (all pure);
//! - [`secrets`]: the one lifecycle of auth keys and API keys (issue,
//!   verify); [`accounts`]: passwords, TOTP, recovery codes, back-off;
//!   [`device`]: pending interactive logins (all pure); [`oidc`]: the OpenID
//!   Connect relying party (discovery, code flow with PKCE, ID-token
//!   verification, the admission policy);
//! - [`netcore`]: the pure netmap core — nodes, compiled policy and clock in,
//!   per-node views and the set of changed views out;
//! - [`store`]: durable state (SQLite by default); [`auth`]: who is calling
//!   (proofs, enrollment checks, per-node limits, replay cache);
//! - [`mesh`]: the coordinator — store, then core, then publish the changed
//!   views; time and randomness come in as arguments;
//! - [`web`]: the sign-in pages (sessions, CSRF, SSO, device confirmation);
//! - [`api`] (tonic services) ← [`server`] (listeners, TLS, ticker;
//!   [`listener`] caps hostile clients). [`cli`] is the admin client.
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "unit tests build inputs from the real clock and entropy"
    )
)]

pub mod accounts;
pub mod alert;
pub mod api;
pub mod auditchain;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod console;
pub mod detect;
pub mod device;
pub mod error;
pub mod httpclient;
pub mod listener;
pub mod lockfile;
pub mod mesh;
pub mod metrics;
pub mod model;
pub mod netcore;
pub mod nodeinput;
pub mod nodelimit;
pub mod oidc;
pub mod ratelimit;
pub mod recovery;
pub mod relays;
pub mod roles;
pub mod routes;
pub mod secrets;
pub mod server;
pub mod signing;
pub mod store;
pub mod timedstore;
pub mod tlscerts;
pub mod web;

pub use ztmesh_proto::time::now_ms;
pub use ztmesh_proto::UnixMs;
