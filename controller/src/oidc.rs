//! Placeholder until the OIDC module lands (issue 13 branch oidc13).

/// What to remember between the start of an SSO sign-in and its callback.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    pub created_ms: crate::UnixMs,
}
