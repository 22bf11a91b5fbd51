//! OpenID Connect relying party: signs a person in at the organisation's
//! identity provider (authorization code flow with PKCE) and turns the
//! provider's verified ID token into an [`Identity`] the controller may admit.
//!
//! The flow and what is checked where:
//! 1. [`Oidc::discover`] (startup, network): fetches
//!    `{issuer}/.well-known/openid-configuration`; its `issuer` must equal the
//!    configured one byte for byte, every endpoint must be `https` (see
//!    [`Oidc::discover`] for the one loopback exception), the provider must
//!    offer PKCE `S256` if it lists its methods, and a confidential client
//!    picks `client_secret_basic` or `client_secret_post` from what it lists.
//!    Then it fetches the JWKS; keys of unknown types are skipped.
//! 2. [`Oidc::begin`] (pure but for the clock read; see [`Oidc::begin_at`]):
//!    random `state`, `nonce` and PKCE verifier (32 bytes each), and the
//!    authorization URL. The caller keeps the [`AuthRequest`] bound to the
//!    browser (e.g. in an encrypted or server-side cookie session).
//! 3. [`Oidc::finish`] (network): [`check_callback`] compares `state` in
//!    constant time, refuses a login older than [`LOGIN_TTL_MS`] and turns
//!    a provider `error` into [`OidcError::Provider`]; the code is exchanged
//!    at the token endpoint with the PKCE verifier and client authentication;
//!    [`verify_id_token`] checks the ID token (signature against the JWKS,
//!    algorithm allow-list, `iss`, `aud`/`azp`, `exp`/`iat`/`nbf` against the
//!    caller's clock, `nonce`, `sub`). An unknown `kid` refetches the JWKS at
//!    most once per [`JWKS_REFETCH_MIN_MS`]. When the ID token lacks the email
//!    (some providers put profile claims only in UserInfo when an access token
//!    is issued), the UserInfo endpoint fills email, name and groups — never
//!    `iss`, `sub`, `amr` or `acr` — after checking its `sub` is the token's.
//! 4. [`admit`] (pure): the identity is (`iss`, `sub`), never a mutable claim;
//!    the email is kept only when `email_verified` and after
//!    [`normalize_email`]; then the allowed domains, allowed groups and the
//!    MFA claims (`amr`, `acr`) configured in [`OidcConfig`].
//!
//! Every response from the provider is bounded in size
//! ([`MAX_RESPONSE_BYTES`]) and time ([`OidcConfig::http_timeout`]);
//! redirects are not followed and environment proxies are ignored (the
//! controller talks to the provider directly). TLS is rustls with the ring
//! provider, trusting the system's roots plus [`OidcConfig::ca_file`].
//! Error messages are written for the person at the browser and never carry
//! a token, a code or the client secret.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::UnixMs;

/// Largest ID token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest response body read from the provider (discovery, JWKS, token,
/// UserInfo).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Clock skew tolerated between the controller and the provider for `iat` and
/// `nbf` (`exp` must simply be in the future).
pub const CLOCK_LEEWAY_MS: i64 = 60_000;
/// Minimum time between two JWKS refetches caused by an unknown `kid`.
pub const JWKS_REFETCH_MIN_MS: i64 = 60_000;
/// How long a person has between [`Oidc::begin`] and the callback.
pub const LOGIN_TTL_MS: i64 = 10 * 60_000;
/// Longest `sub` accepted, in bytes (OIDC Core: at most 255 ASCII characters).
pub const MAX_SUBJECT_BYTES: usize = 255;
/// Longest email address accepted, in bytes (RFC 5321 path limit).
pub const MAX_EMAIL_BYTES: usize = 254;
/// The default per-request timeout for [`OidcConfig::http_timeout`].
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Most keys taken from a JWKS; more is a misconfigured or hostile provider.
const MAX_JWKS_KEYS: usize = 64;
/// Longest authorization code accepted from the callback.
const MAX_CODE_BYTES: usize = 4096;
/// Longest provider-supplied text (error descriptions) shown to a person.
const MAX_SHOWN_CHARS: usize = 200;
/// Longest display name kept, in characters.
const MAX_NAME_CHARS: usize = 128;

/// How the controller signs people in at one OpenID provider.
#[derive(Clone)]
pub struct OidcConfig {
    /// The provider's issuer URL (`https`), compared byte for byte with the
    /// discovery document's `issuer` and the ID token's `iss`.
    pub issuer: String,
    /// This controller's client ID at the provider.
    pub client_id: String,
    /// The client secret of a confidential client (sent with
    /// `client_secret_basic`, or `client_secret_post` when that is all the
    /// provider offers); `None` for a public client, which relies on PKCE.
    pub client_secret: Option<String>,
    /// The callback URL registered at the provider.
    pub redirect_url: String,
    /// Scopes requested; `openid` is added when missing.
    pub scopes: Vec<String>,
    /// Email domains allowed to sign in (empty: any); compared ASCII
    /// case-insensitively with the whole domain of the verified email, so
    /// `example.com` does not admit `sub.example.com`.
    pub allowed_domains: Vec<String>,
    /// Groups allowed to sign in (empty: any); the token's `groups` must
    /// contain at least one, compared exactly.
    pub allowed_groups: Vec<String>,
    /// Authentication methods of which the token's `amr` must contain at least
    /// one (e.g. `mfa`, `otp`, `hwk`); empty: no check.
    pub required_amr: Vec<String>,
    /// When set, the token's `acr` must equal it; it is also requested with
    /// `acr_values`.
    pub required_acr: Option<String>,
    /// An extra CA certificate file (PEM) trusted for the provider's TLS,
    /// besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Time limit for each request to the provider.
    pub http_timeout: Duration,
}

impl OidcConfig {
    /// A configuration with the defaults: scopes `openid email profile`, no
    /// allow-lists, no MFA requirement, system roots only, 10 s timeout.
    pub fn new(issuer: &str, client_id: &str, redirect_url: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            client_secret: None,
            redirect_url: redirect_url.to_owned(),
            scopes: ["openid", "email", "profile"].map(String::from).to_vec(),
            allowed_domains: Vec::new(),
            allowed_groups: Vec::new(),
            required_amr: Vec::new(),
            required_acr: None,
            ca_file: None,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }
}

impl fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("redirect_url", &self.redirect_url)
            .field("scopes", &self.scopes)
            .field("allowed_domains", &self.allowed_domains)
            .field("allowed_groups", &self.allowed_groups)
            .field("required_amr", &self.required_amr)
            .field("required_acr", &self.required_acr)
            .field("ca_file", &self.ca_file)
            .field("http_timeout", &self.http_timeout)
            .finish()
    }
}

/// What to remember between [`Oidc::begin`] and [`Oidc::finish`], bound to
/// the browser that started the login.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    /// Echoed by the provider in the callback; ties it to this browser.
    pub state: String,
    /// Must come back inside the ID token; ties the token to this login.
    pub nonce: String,
    /// The PKCE code verifier sent with the code exchange.
    pub pkce_verifier: String,
    /// When the login started (Unix ms).
    pub created_ms: UnixMs,
}

/// The callback's query parameters, as received.
#[derive(Clone, Debug, Default)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// A person the provider vouched for and the policy admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The provider (`iss`); with `subject` the person's stable identity.
    pub issuer: String,
    /// The provider's stable ID for the person (`sub`).
    pub subject: String,
    /// The email, only when the provider says it verified it; normalized by
    /// [`normalize_email`].
    pub email: Option<String>,
    /// A display name, stripped of control and invisible formatting
    /// characters; for display only.
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub amr: Vec<String>,
    pub acr: Option<String>,
}

/// The claims of a verified ID token that the controller uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    /// `aud`, always as a list.
    pub aud: Vec<String>,
    pub azp: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issue time, Unix seconds.
    pub iat: i64,
    pub nonce: Option<String>,
    /// The email as sent, whether verified or not ([`admit`] decides).
    pub email: Option<String>,
    /// `email_verified` is `true` or `"true"`.
    pub email_verified: bool,
    pub name: Option<String>,
    /// `groups` (a list of strings, or one string).
    pub groups: Vec<String>,
    /// Authentication methods used (`amr`).
    pub amr: Vec<String>,
    /// Authentication context class (`acr`).
    pub acr: Option<String>,
}

/// What an ID token must say to be accepted.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub nonce: &'a str,
}

/// Why a sign-in failed. Messages are for the person at the browser;
/// [`OidcError::reason`] is the word for the audit log.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The callback's `state` is missing or not the one this browser started
    /// with: a forged, replayed or crossed callback. Start the login again.
    #[error("this sign-in response does not belong to the login started in this browser; start the login again")]
    StateMismatch,
    /// The callback came more than [`LOGIN_TTL_MS`] after the login started.
    #[error("this sign-in took too long; start the login again")]
    LoginExpired,
    /// The provider answered the authorization request with an error (the
    /// person cancelled, or the provider refused the client or the request).
    #[error("the identity provider refused the sign-in: {}", provider_message(.error, .description.as_deref()))]
    Provider {
        error: String,
        description: Option<String>,
    },
    /// The token endpoint refused the code (used, expired, or a client
    /// authentication problem) or answered without an ID token.
    #[error("the identity provider did not accept the sign-in: {0}")]
    TokenExchange(String),
    /// The ID token's signature does not verify with the provider's key.
    #[error("the sign-in token's signature is not valid")]
    BadSignature,
    /// The ID token names a key the provider does not publish (or names none
    /// while it publishes several).
    #[error("the sign-in token was signed with a key the identity provider does not publish")]
    UnknownKey,
    /// The ID token uses an algorithm not on the allow-list, or not the one
    /// of the key it names.
    #[error("the sign-in token's signing algorithm ({0}) is not accepted")]
    AlgRefused(String),
    /// `iss` is not the configured issuer.
    #[error("the sign-in token was issued by a different identity provider")]
    WrongIssuer,
    /// `aud`/`azp` do not name this controller's client.
    #[error("the sign-in token was issued for a different application")]
    WrongAudience,
    /// `exp` has passed.
    #[error("the sign-in token has expired; sign in again")]
    Expired,
    /// `iat` or `nbf` lies in the future beyond the leeway: a clock is off.
    #[error("the sign-in token is not valid yet; the clocks of the controller and the identity provider disagree")]
    NotYetValid,
    /// `nonce` is missing or not this login's.
    #[error("the sign-in token does not belong to this login; start the login again")]
    NonceMismatch,
    /// A token, callback or provider response that does not parse or lacks a
    /// required part; the detail says which.
    #[error("the identity provider's answer is malformed ({0})")]
    Malformed(&'static str),
    /// A verified email is needed (allowed domains are configured) but the
    /// provider sent none, or did not mark it verified.
    #[error("your identity provider did not confirm an email address for this account")]
    EmailUnverified,
    /// The verified email is not a plain address (unicode look-alikes,
    /// invisible characters, too long, not exactly one `@`).
    #[error("the email address from your identity provider cannot be used here ({0})")]
    BadEmail(&'static str),
    /// The verified email's domain is not among the allowed domains.
    #[error("accounts of the domain {0} may not sign in here")]
    DomainRefused(String),
    /// The person is in none of the allowed groups.
    #[error("your account is not in a group that may sign in here")]
    GroupRefused,
    /// `amr` lacks every required method, or `acr` is not the required one.
    #[error("this sign-in needs a second factor; sign in again with multi-factor authentication")]
    MfaRequired,
    /// The provider's discovery document, JWKS or this configuration is
    /// unusable; the detail says why.
    #[error("the identity provider cannot be used: {0}")]
    Discovery(String),
    /// A request to the provider failed (connection, TLS, timeout, status,
    /// size limit).
    #[error("cannot reach the identity provider: {0}")]
    Http(String),
}

impl OidcError {
    /// A short stable word for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::StateMismatch => "state-mismatch",
            Self::Provider { .. } => "provider-error",
            Self::TokenExchange(_) => "token-exchange",
            Self::BadSignature => "bad-signature",
            Self::UnknownKey => "unknown-key",
            Self::AlgRefused(_) => "alg-refused",
            Self::WrongIssuer => "wrong-issuer",
            Self::WrongAudience => "wrong-audience",
            // Outside the time window, whichever end.
            Self::Expired | Self::NotYetValid | Self::LoginExpired => "expired",
            Self::NonceMismatch => "nonce-mismatch",
            Self::Malformed(_) => "malformed",
            Self::EmailUnverified => "email-unverified",
            Self::BadEmail(_) => "bad-email",
            Self::DomainRefused(_) => "domain-refused",
            Self::GroupRefused => "group-refused",
            Self::MfaRequired => "mfa-required",
            Self::Discovery(_) => "discovery",
            Self::Http(_) => "http",
        }
    }
}

/// A discovered provider: its endpoints, an HTTP client and the cached JWKS.
pub struct Oidc {
    cfg: OidcConfig,
    endpoints: Endpoints,
    http: reqwest::Client,
    keys: Mutex<KeyCache>,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.cfg.issuer)
            .field("client_id", &self.cfg.client_id)
            .finish_non_exhaustive()
    }
}

impl Oidc {
    /// Discovers the provider and fetches its keys.
    ///
    /// Fetches `{issuer}/.well-known/openid-configuration`, checks that its
    /// `issuer` equals [`OidcConfig::issuer`] exactly and that every endpoint
    /// is `https`, then fetches the JWKS.
    ///
    /// One exception to `https`: an issuer whose host is a literal loopback IP
    /// (`http://127.0.0.1:PORT`, `http://[::1]:PORT`) may use `http`, for a
    /// provider on the same machine; its endpoints may then be `http` only on
    /// loopback IPs too. A host *name* such as `localhost` gets no exception,
    /// since a name can resolve elsewhere.
    ///
    /// # Errors
    /// [`OidcError::Discovery`] for an unusable configuration, CA file,
    /// document or JWKS; [`OidcError::Http`] when the provider cannot be
    /// reached.
    pub async fn discover(cfg: OidcConfig) -> Result<Oidc, OidcError> {
        let issuer = parse_issuer(&cfg.issuer)?;
        check_config(&cfg)?;
        let http = http_client(&cfg)?;
        let well_known = format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        );
        let url = Url::parse(&well_known)
            .map_err(|_| OidcError::Discovery("the issuer is not a valid URL".into()))?;
        let (status, body) = fetch(http.get(url).header("accept", "application/json")).await?;
        if status != StatusCode::OK {
            return Err(OidcError::Discovery(format!(
                "the discovery document answered HTTP {}",
                status.as_u16()
            )));
        }
        let meta: ProviderMetadata = serde_json::from_slice(&body).map_err(|_| {
            OidcError::Discovery("the discovery document is not valid JSON metadata".into())
        })?;
        let endpoints = Endpoints::from_metadata(meta, &cfg, &issuer)?;
        let jwks = fetch_jwks(&http, &endpoints.jwks).await?;
        tracing::info!(
            issuer = %cfg.issuer,
            keys = jwks.keys.len(),
            client_auth = endpoints.client_auth.as_str(),
            "oidc provider discovered"
        );
        Ok(Oidc {
            cfg,
            endpoints,
            http,
            keys: Mutex::new(KeyCache {
                set: Arc::new(jwks),
                refetched_ms: None,
            }),
        })
    }

    /// A new authorization request, stamped with the wall clock; see
    /// [`Oidc::begin_at`].
    pub fn begin(&self, rng: &mut impl rand::RngCore) -> (String, AuthRequest) {
        self.begin_at(rng, crate::now_ms())
    }

    /// A new authorization request started at `now_ms`: random `state`,
    /// `nonce` and PKCE verifier; returns the provider's authorization URL to
    /// send the browser to, and what to remember until the callback.
    pub fn begin_at(&self, rng: &mut impl rand::RngCore, now_ms: UnixMs) -> (String, AuthRequest) {
        let req = new_request(rng, now_ms);
        let url = authorization_url(&self.endpoints.authorization, &self.cfg, &req);
        (url, req)
    }

    /// Completes a login from the provider's callback.
    ///
    /// Checks the callback against `req` ([`check_callback`]), exchanges the
    /// code, verifies the ID token at `now_ms` ([`verify_id_token`]), fills
    /// a missing email from UserInfo, and applies [`admit`].
    ///
    /// # Errors
    /// Every check has its [`OidcError`] variant.
    pub async fn finish(
        &self,
        req: &AuthRequest,
        cb: &Callback,
        now_ms: UnixMs,
    ) -> Result<Identity, OidcError> {
        let code = check_callback(req, cb, now_ms)?;
        let tokens = self.exchange(code, req).await?;
        let mut claims = self.verify(&tokens.id_token, &req.nonce, now_ms).await?;
        if wants_userinfo(&claims, &self.cfg) {
            if let (Some(endpoint), Some(access)) =
                (&self.endpoints.userinfo, tokens.access_token.as_deref())
            {
                self.fill_from_userinfo(&mut claims, endpoint, access)
                    .await?;
            }
        }
        admit(claims, &self.cfg)
    }

    /// The configuration this provider was discovered with.
    pub fn config(&self) -> &OidcConfig {
        &self.cfg
    }

    /// Exchanges the authorization code at the token endpoint.
    async fn exchange(&self, code: &str, req: &AuthRequest) -> Result<TokenResponse, OidcError> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &self.cfg.redirect_url),
            ("code_verifier", &req.pkce_verifier),
        ];
        let mut request = self
            .http
            .post(self.endpoints.token.clone())
            .header("accept", "application/json");
        match (
            self.endpoints.client_auth,
            self.cfg.client_secret.as_deref(),
        ) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: both parts form-encoded before Basic.
                request =
                    request.basic_auth(form_encode(&self.cfg.client_id), Some(form_encode(secret)));
            }
            (ClientAuth::Post, Some(secret)) => {
                form.push(("client_id", &self.cfg.client_id));
                form.push(("client_secret", secret));
            }
            _ => form.push(("client_id", &self.cfg.client_id)),
        }
        let (status, body) = fetch(request.form(&form)).await?;
        parse_token_response(status, &body)
    }

    /// Verifies an ID token with the cached keys, refetching the JWKS once
    /// (rate-limited) when the token names a key the cache lacks.
    async fn verify(&self, token: &str, nonce: &str, now_ms: UnixMs) -> Result<Claims, OidcError> {
        let expect = Expect {
            issuer: &self.cfg.issuer,
            client_id: &self.cfg.client_id,
            nonce,
        };
        let cached = self.lock_keys().set.clone();
        match verify_id_token(token, &cached, &expect, now_ms) {
            Err(OidcError::UnknownKey) if self.claim_refetch(now_ms) => {
                let fresh = Arc::new(fetch_jwks(&self.http, &self.endpoints.jwks).await?);
                tracing::info!(
                    keys = fresh.keys.len(),
                    "oidc jwks refetched for an unknown key"
                );
                self.lock_keys().set = fresh.clone();
                verify_id_token(token, &fresh, &expect, now_ms)
            }
            other => other,
        }
    }

    /// Takes the one refetch slot of the current [`JWKS_REFETCH_MIN_MS`]
    /// window, so concurrent callbacks and a flood of bogus `kid`s cause at
    /// most one fetch per window.
    fn claim_refetch(&self, now_ms: UnixMs) -> bool {
        let mut keys = self.lock_keys();
        match keys.refetched_ms {
            Some(last) if now_ms.saturating_sub(last) < JWKS_REFETCH_MIN_MS => false,
            _ => {
                keys.refetched_ms = Some(now_ms);
                true
            }
        }
    }

    fn lock_keys(&self) -> std::sync::MutexGuard<'_, KeyCache> {
        // The cache holds no invariant a panic could break half-way.
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills missing email, name and groups from the UserInfo endpoint. A
    /// failed request is logged and the login goes on with what the ID token
    /// said; a UserInfo answer about another subject is refused.
    async fn fill_from_userinfo(
        &self,
        claims: &mut Claims,
        endpoint: &Url,
        access_token: &str,
    ) -> Result<(), OidcError> {
        let request = self
            .http
            .get(endpoint.clone())
            .bearer_auth(access_token)
            .header("accept", "application/json");
        let body = match fetch(request).await {
            Ok((StatusCode::OK, body)) => body,
            Ok((status, _)) => {
                tracing::warn!(
                    status = status.as_u16(),
                    "oidc userinfo refused; using the id token's claims"
                );
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "oidc userinfo failed; using the id token's claims");
                return Ok(());
            }
        };
        let info: RawUserInfo = match serde_json::from_slice(&body) {
            Ok(info) => info,
            Err(_) => {
                // A signed (application/jwt) UserInfo is not supported.
                tracing::warn!("oidc userinfo is not a JSON object; using the id token's claims");
                return Ok(());
            }
        };
        merge_userinfo(claims, info)
    }
}

/// Verifies a compact JWS ID token against `jwks` and the expectations. Pure.
///
/// The algorithm must be one of RS256, RS384, RS512, PS256, ES256, ES384,
/// EdDSA (never `none` or HS*) and fit the key's type, curve and declared
/// `alg`; `kid` must name a key of the set (a token without `kid` is accepted
/// only when exactly one key fits); `iss` must equal the issuer; `aud` must
/// contain the client ID, and with several audiences (or any `azp`) `azp`
/// must be the client ID; `exp` must be after `now_ms`, `iat` and `nbf` no
/// later than `now_ms` plus [`CLOCK_LEEWAY_MS`]; `nonce` must equal; `sub`
/// must be 1 to 255 bytes; the token at most [`MAX_TOKEN_BYTES`].
///
/// # Errors
/// The [`OidcError`] of the first check that fails.
pub fn verify_id_token(
    token: &str,
    jwks: &JwkSet,
    expect: &Expect<'_>,
    now_ms: UnixMs,
) -> Result<Claims, OidcError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(OidcError::Malformed("the ID token is too large"));
    }
    let header = parse_header(token)?;
    let alg = allowed_alg(&header.alg).ok_or_else(|| OidcError::AlgRefused(shown(&header.alg)))?;
    let jwk = select_key(jwks, header.kid.as_deref(), alg)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| OidcError::UnknownKey)?;

    // Signature only: every claim is checked below with the caller's clock.
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    let raw = jsonwebtoken::decode::<RawClaims>(token, &key, &validation)
        .map_err(jwt_error)?
        .claims;

    let not_before = raw
        .nbf
        .as_ref()
        .map(|n| numeric_date(n).ok_or(OidcError::Malformed("nbf is not a number")))
        .transpose()?;
    let claims = raw.into_claims()?;
    if claims.iss != expect.issuer {
        return Err(OidcError::WrongIssuer);
    }
    if !claims.aud.iter().any(|a| a == expect.client_id) {
        return Err(OidcError::WrongAudience);
    }
    let azp_needed = claims.aud.len() > 1 || claims.azp.is_some();
    if azp_needed && claims.azp.as_deref() != Some(expect.client_id) {
        return Err(OidcError::WrongAudience);
    }
    if seconds_to_ms(claims.exp) <= now_ms {
        return Err(OidcError::Expired);
    }
    let latest_start = now_ms.saturating_add(CLOCK_LEEWAY_MS);
    if seconds_to_ms(claims.iat) > latest_start
        || not_before.is_some_and(|nbf| seconds_to_ms(nbf) > latest_start)
    {
        return Err(OidcError::NotYetValid);
    }
    let nonce_ok = claims
        .nonce
        .as_deref()
        .is_some_and(|n| bool::from(n.as_bytes().ct_eq(expect.nonce.as_bytes())));
    if !nonce_ok {
        return Err(OidcError::NonceMismatch);
    }
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_BYTES {
        return Err(OidcError::Malformed(
            "the subject (sub) is empty or too long",
        ));
    }
    Ok(claims)
}

/// The identity from verified claims, after the policy checks. Pure.
///
/// The email is kept only when `email_verified` is true, and must then pass
/// [`normalize_email`]. With [`OidcConfig::allowed_domains`] set, a verified
/// email of an allowed domain is required; then the allowed groups, the
/// required `amr` and `acr`. An unverified email without a domain rule is
/// simply dropped: the identity is (`iss`, `sub`) regardless, and whether a
/// login without email is mapped is the caller's decision.
///
/// # Errors
/// [`OidcError::BadEmail`], [`OidcError::EmailUnverified`],
/// [`OidcError::DomainRefused`], [`OidcError::GroupRefused`],
/// [`OidcError::MfaRequired`].
pub fn admit(claims: Claims, cfg: &OidcConfig) -> Result<Identity, OidcError> {
    let email = match (&claims.email, claims.email_verified) {
        (Some(raw), true) => Some(normalize_email(raw)?),
        _ => None,
    };
    if !cfg.allowed_domains.is_empty() {
        let Some(address) = &email else {
            return Err(OidcError::EmailUnverified);
        };
        let (_, domain) = address
            .rsplit_once('@')
            .expect("normalize_email leaves exactly one @");
        let allowed = cfg
            .allowed_domains
            .iter()
            .any(|d| d.trim().trim_end_matches('.').eq_ignore_ascii_case(domain));
        if !allowed {
            return Err(OidcError::DomainRefused(domain.to_owned()));
        }
    }
    if !cfg.allowed_groups.is_empty()
        && !claims.groups.iter().any(|g| cfg.allowed_groups.contains(g))
    {
        return Err(OidcError::GroupRefused);
    }
    if !cfg.required_amr.is_empty() && !claims.amr.iter().any(|m| cfg.required_amr.contains(m)) {
        return Err(OidcError::MfaRequired);
    }
    if let Some(acr) = &cfg.required_acr {
        if claims.acr.as_ref() != Some(acr) {
            return Err(OidcError::MfaRequired);
        }
    }
    Ok(Identity {
        issuer: claims.iss,
        subject: claims.sub,
        email,
        name: claims.name.as_deref().and_then(clean_display_name),
        groups: claims.groups,
        amr: claims.amr,
        acr: claims.acr,
    })
}

/// An email address made safe to map to a login: plain ASCII, lowercased.
/// Pure.
///
/// Refused: more than [`MAX_EMAIL_BYTES`], anything outside printable ASCII
/// (so Cyrillic look-alikes, fullwidth `＠`, right-to-left overrides and
/// zero-width characters never reach a login), whitespace and control
/// characters, not exactly one `@`, a quoted or dotted-wrong local part, or a
/// domain that is not dot-separated LDH labels (internationalized domains
/// arrive as `xn--` labels, which pass). The whole address is lowercased: the
/// controller treats `Alice@Example.COM` and `alice@example.com` as one person.
///
/// # Errors
/// [`OidcError::BadEmail`] saying which rule failed.
pub fn normalize_email(raw: &str) -> Result<String, OidcError> {
    if raw.len() > MAX_EMAIL_BYTES {
        return Err(OidcError::BadEmail("longer than 254 bytes"));
    }
    if !raw.is_ascii() {
        return Err(OidcError::BadEmail("contains non-ASCII characters"));
    }
    if !raw.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(OidcError::BadEmail("contains spaces or control characters"));
    }
    let mut parts = raw.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(OidcError::BadEmail("not exactly one @"));
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
    if !local_ok {
        return Err(OidcError::BadEmail(
            "the part before @ is not a plain mailbox name",
        ));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !domain_ok {
        return Err(OidcError::BadEmail("the domain is not a plain DNS name"));
    }
    Ok(raw.to_ascii_lowercase())
}

/// Checks a callback against the login it claims to finish and returns the
/// authorization code. Pure.
///
/// `state` first (compared in constant time), so a forged callback never
/// gets to show a provider error; then the login's age; then the provider's
/// `error`; then the code.
///
/// # Errors
/// [`OidcError::StateMismatch`], [`OidcError::LoginExpired`],
/// [`OidcError::Provider`], [`OidcError::Malformed`].
pub fn check_callback<'a>(
    req: &AuthRequest,
    cb: &'a Callback,
    now_ms: UnixMs,
) -> Result<&'a str, OidcError> {
    let state_ok = cb
        .state
        .as_deref()
        .is_some_and(|s| bool::from(s.as_bytes().ct_eq(req.state.as_bytes())));
    if !state_ok {
        return Err(OidcError::StateMismatch);
    }
    // A small step back of the clock must not break a login in progress.
    let age = now_ms.saturating_sub(req.created_ms);
    if !(-CLOCK_LEEWAY_MS..=LOGIN_TTL_MS).contains(&age) {
        return Err(OidcError::LoginExpired);
    }
    if let Some(error) = &cb.error {
        return Err(OidcError::Provider {
            error: shown(error),
            description: cb.error_description.as_deref().map(shown),
        });
    }
    match cb.code.as_deref() {
        Some(code) if !code.is_empty() && code.len() <= MAX_CODE_BYTES => Ok(code),
        Some(_) => Err(OidcError::Malformed(
            "the authorization code is empty or too long",
        )),
        None => Err(OidcError::Malformed(
            "the callback carries neither a code nor an error",
        )),
    }
}

/// The PKCE S256 challenge of a verifier (RFC 7636 §4.2). Pure.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A fresh login: 32 random bytes each for `state`, `nonce` and the PKCE
/// verifier, base64url without padding (43 characters).
fn new_request(rng: &mut impl rand::RngCore, now_ms: UnixMs) -> AuthRequest {
    let mut random = || {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        URL_SAFE_NO_PAD.encode(bytes)
    };
    AuthRequest {
        state: random(),
        nonce: random(),
        pkce_verifier: random(),
        created_ms: now_ms,
    }
}

/// The authorization request URL (OIDC Core §3.1.2.1, RFC 7636 §4.3).
fn authorization_url(endpoint: &Url, cfg: &OidcConfig, req: &AuthRequest) -> String {
    let mut scopes: Vec<&str> = vec!["openid"];
    for s in &cfg.scopes {
        if !scopes.contains(&s.as_str()) {
            scopes.push(s);
        }
    }
    let mut url = endpoint.clone();
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", &cfg.client_id)
            .append_pair("redirect_uri", &cfg.redirect_url)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("state", &req.state)
            .append_pair("nonce", &req.nonce)
            .append_pair("code_challenge", &pkce_challenge(&req.pkce_verifier))
            .append_pair("code_challenge_method", "S256");
        if let Some(acr) = &cfg.required_acr {
            query.append_pair("acr_values", acr);
        }
    }
    url.into()
}

/// Whether UserInfo may add what the policy or the caller needs.
fn wants_userinfo(claims: &Claims, cfg: &OidcConfig) -> bool {
    claims.email.is_none() || (claims.groups.is_empty() && !cfg.allowed_groups.is_empty())
}

/// Adds UserInfo's email (with its verified flag), name and groups where the
/// ID token had none. Pure.
fn merge_userinfo(claims: &mut Claims, info: RawUserInfo) -> Result<(), OidcError> {
    // OIDC Core §5.3.2: a UserInfo answer about someone else is not used.
    if info.sub != claims.sub {
        return Err(OidcError::Malformed(
            "UserInfo describes a different subject",
        ));
    }
    if claims.email.is_none() {
        claims.email = info.email;
        claims.email_verified = info.email_verified.is_some_and(|v| v.is_true());
    }
    if claims.name.is_none() {
        claims.name = info.name;
    }
    if claims.groups.is_empty() {
        claims.groups = info.groups.map(OneOrMany::into_vec).unwrap_or_default();
    }
    Ok(())
}

/// Display text without control or invisible formatting characters (bidi
/// overrides, zero-width), trimmed and bounded; `None` when nothing is left.
fn clean_display_name(raw: &str) -> Option<String> {
    let cleaned: String = raw
        .chars()
        .filter(|c| !c.is_control() && !is_invisible_format(*c))
        .take(MAX_NAME_CHARS)
        .collect();
    let trimmed = cleaned.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_owned())
}

/// Unicode format characters that change how text reads without showing.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Provider text made safe to show: printable ASCII only, bounded.
fn shown(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_SHOWN_CHARS)
        .collect();
    if raw.chars().count() > MAX_SHOWN_CHARS {
        out.push_str("...");
    }
    out
}

fn provider_message(error: &str, description: Option<&str>) -> String {
    match description {
        Some(d) if !d.is_empty() => format!("{error} ({d})"),
        _ => error.to_owned(),
    }
}

/// The JOSE header fields this module reads.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    /// Critical extensions: none is understood, so any makes the token
    /// unusable (RFC 7515 §4.1.11).
    crit: Option<serde_json::Value>,
}

/// The header of a compact JWS with exactly three base64url segments.
fn parse_header(token: &str) -> Result<RawHeader, OidcError> {
    let segments: Vec<&str> = token.split('.').collect();
    let [header, payload, _signature] = segments[..] else {
        return Err(OidcError::Malformed(
            "the ID token is not three dot-separated parts",
        ));
    };
    if header.is_empty() || payload.is_empty() {
        return Err(OidcError::Malformed("the ID token has an empty part"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| OidcError::Malformed("the ID token header is not base64url"))?;
    let header: RawHeader = serde_json::from_slice(&bytes)
        .map_err(|_| OidcError::Malformed("the ID token header is not a JSON object"))?;
    if header.crit.is_some() {
        return Err(OidcError::Malformed(
            "the ID token has critical header extensions",
        ));
    }
    Ok(header)
}

/// The allow-listed signing algorithms.
fn allowed_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The key that must have signed a token with this `kid` and `alg`.
fn select_key<'k>(
    jwks: &'k JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'k Jwk, OidcError> {
    match kid {
        Some(kid) => {
            let named: Vec<&Jwk> = jwks
                .keys
                .iter()
                .filter(|k| k.common.key_id.as_deref() == Some(kid))
                .collect();
            if named.is_empty() {
                return Err(OidcError::UnknownKey);
            }
            named
                .into_iter()
                .find(|k| key_fits(k, alg))
                .ok_or_else(|| OidcError::AlgRefused(format!("{alg:?} for this key")))
        }
        None => {
            let mut fitting = jwks.keys.iter().filter(|k| key_fits(k, alg));
            match (fitting.next(), fitting.next()) {
                (Some(only), None) => Ok(only),
                _ => Err(OidcError::UnknownKey),
            }
        }
    }
}

/// Whether `jwk` is a signature key that `alg` may be verified with: its type
/// and curve fit, and its declared `alg`, `use` and `key_ops` allow it.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let common = &jwk.common;
    if common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return false;
    }
    if common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return false;
    }
    if common
        .key_algorithm
        .is_some_and(|declared| !same_alg(declared, alg))
    {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

fn same_alg(declared: KeyAlgorithm, alg: Algorithm) -> bool {
    matches!(
        (declared, alg),
        (KeyAlgorithm::RS256, Algorithm::RS256)
            | (KeyAlgorithm::RS384, Algorithm::RS384)
            | (KeyAlgorithm::RS512, Algorithm::RS512)
            | (KeyAlgorithm::PS256, Algorithm::PS256)
            | (KeyAlgorithm::PS384, Algorithm::PS384)
            | (KeyAlgorithm::PS512, Algorithm::PS512)
            | (KeyAlgorithm::ES256, Algorithm::ES256)
            | (KeyAlgorithm::ES384, Algorithm::ES384)
            | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
    )
}

fn jwt_error(e: jsonwebtoken::errors::Error) -> OidcError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Crypto(_) => OidcError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            OidcError::AlgRefused("mismatch".into())
        }
        _ => OidcError::Malformed("the ID token does not decode"),
    }
}

/// Unix seconds to milliseconds, saturating.
fn seconds_to_ms(s: i64) -> i64 {
    s.saturating_mul(1000)
}

/// A JSON NumericDate (integer or fractional seconds) as whole seconds,
/// saturating at the `i64` range.
fn numeric_date(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    // `as` saturates for finite floats outside the range.
    f.is_finite().then(|| f.floor() as i64)
}

/// A claim that is one string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// `email_verified`: a JSON boolean, or (some providers) the string `"true"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum BoolOrString {
    Bool(bool),
    Text(String),
}

impl BoolOrString {
    fn is_true(&self) -> bool {
        match self {
            Self::Bool(b) => *b,
            Self::Text(s) => s == "true",
        }
    }
}

/// The ID token payload as sent. A repeated claim fails to parse (serde
/// refuses duplicate fields), so two `sub`s cannot disagree.
#[derive(Deserialize)]
struct RawClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<OneOrMany>,
    azp: Option<String>,
    exp: Option<serde_json::Number>,
    iat: Option<serde_json::Number>,
    nbf: Option<serde_json::Number>,
    nonce: Option<String>,
    email: Option<String>,
    email_verified: Option<BoolOrString>,
    name: Option<String>,
    groups: Option<OneOrMany>,
    amr: Option<OneOrMany>,
    acr: Option<String>,
}

impl RawClaims {
    fn into_claims(self) -> Result<Claims, OidcError> {
        let missing = OidcError::Malformed;
        Ok(Claims {
            iss: self
                .iss
                .ok_or(missing("the ID token has no issuer (iss)"))?,
            sub: self
                .sub
                .ok_or(missing("the ID token has no subject (sub)"))?,
            aud: self
                .aud
                .map(OneOrMany::into_vec)
                .ok_or(missing("the ID token has no audience (aud)"))?,
            azp: self.azp,
            exp: self
                .exp
                .as_ref()
                .and_then(numeric_date)
                .ok_or(missing("the ID token has no numeric expiry (exp)"))?,
            iat: self
                .iat
                .as_ref()
                .and_then(numeric_date)
                .ok_or(missing("the ID token has no numeric issue time (iat)"))?,
            nonce: self.nonce,
            email: self.email,
            email_verified: self.email_verified.is_some_and(|v| v.is_true()),
            name: self.name,
            groups: self.groups.map(OneOrMany::into_vec).unwrap_or_default(),
            amr: self.amr.map(OneOrMany::into_vec).unwrap_or_default(),
            acr: self.acr,
        })
    }
}

/// The UserInfo fields this module may use.
#[derive(Deserialize)]
struct RawUserInfo {
    sub: String,
    email: Option<String>,
    email_verified: Option<BoolOrString>,
    name: Option<String>,
    groups: Option<OneOrMany>,
}

/// The discovery document fields this module reads (OIDC Discovery §3).
#[derive(Deserialize)]
struct ProviderMetadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    userinfo_endpoint: Option<String>,
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
    code_challenge_methods_supported: Option<Vec<String>>,
}

/// How this client authenticates at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientAuth {
    /// Public client: `client_id` in the form, PKCE only.
    None,
    Basic,
    Post,
}

impl ClientAuth {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Basic => "client_secret_basic",
            Self::Post => "client_secret_post",
        }
    }
}

/// The checked endpoints of a discovered provider.
#[derive(Debug)]
struct Endpoints {
    authorization: Url,
    token: Url,
    jwks: Url,
    userinfo: Option<Url>,
    client_auth: ClientAuth,
}

impl Endpoints {
    /// Checks a discovery document against the configuration. Pure.
    fn from_metadata(
        meta: ProviderMetadata,
        cfg: &OidcConfig,
        issuer: &Url,
    ) -> Result<Endpoints, OidcError> {
        if meta.issuer != cfg.issuer {
            return Err(OidcError::Discovery(format!(
                "the discovery document names the issuer {:?}, not the configured {:?}",
                shown(&meta.issuer),
                cfg.issuer
            )));
        }
        let loopback_http = issuer.scheme() == "http";
        let endpoint = |what: &str, raw: &str| -> Result<Url, OidcError> {
            let url = Url::parse(raw).map_err(|_| {
                OidcError::Discovery(format!("the {what} endpoint is not a valid URL"))
            })?;
            let scheme_ok = url.scheme() == "https"
                || (loopback_http && url.scheme() == "http" && is_loopback_ip(&url));
            if !scheme_ok || !url.username().is_empty() || url.password().is_some() {
                return Err(OidcError::Discovery(format!(
                    "the {what} endpoint {} is not an https URL",
                    shown(raw)
                )));
            }
            Ok(url)
        };
        if let Some(methods) = &meta.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                return Err(OidcError::Discovery(
                    "the provider does not offer PKCE with S256".into(),
                ));
            }
        }
        let client_auth = if cfg.client_secret.is_none() {
            ClientAuth::None
        } else {
            // OIDC Discovery: absent means client_secret_basic.
            let methods = meta
                .token_endpoint_auth_methods_supported
                .unwrap_or_else(|| vec!["client_secret_basic".into()]);
            if methods.iter().any(|m| m == "client_secret_basic") {
                ClientAuth::Basic
            } else if methods.iter().any(|m| m == "client_secret_post") {
                ClientAuth::Post
            } else {
                return Err(OidcError::Discovery(
                    "the provider offers neither client_secret_basic nor client_secret_post".into(),
                ));
            }
        };
        Ok(Endpoints {
            authorization: endpoint("authorization", &meta.authorization_endpoint)?,
            token: endpoint("token", &meta.token_endpoint)?,
            jwks: endpoint("JWKS", &meta.jwks_uri)?,
            userinfo: meta
                .userinfo_endpoint
                .as_deref()
                .map(|u| endpoint("UserInfo", u))
                .transpose()?,
            client_auth,
        })
    }
}

/// The issuer as a URL: `https`, or `http` on a literal loopback IP.
fn parse_issuer(raw: &str) -> Result<Url, OidcError> {
    let url = Url::parse(raw)
        .map_err(|_| OidcError::Discovery(format!("the issuer {raw:?} is not a valid URL")))?;
    let ok = match url.scheme() {
        "https" => true,
        "http" => is_loopback_ip(&url),
        _ => false,
    };
    if !ok || url.query().is_some() || url.fragment().is_some() {
        return Err(OidcError::Discovery(format!(
            "the issuer {raw:?} must be an https URL without query or fragment \
             (http only on a loopback IP such as 127.0.0.1)"
        )));
    }
    Ok(url)
}

fn is_loopback_ip(url: &Url) -> bool {
    // `host_str` writes an IPv6 literal in brackets.
    url.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback())
}

/// The parts of the configuration discovery cannot check.
fn check_config(cfg: &OidcConfig) -> Result<(), OidcError> {
    if cfg.client_id.is_empty() {
        return Err(OidcError::Discovery("the client ID is empty".into()));
    }
    let redirect = Url::parse(&cfg.redirect_url).map_err(|_| {
        OidcError::Discovery(format!(
            "the redirect URL {:?} is not valid",
            cfg.redirect_url
        ))
    })?;
    if !matches!(redirect.scheme(), "https" | "http") || redirect.fragment().is_some() {
        return Err(OidcError::Discovery(format!(
            "the redirect URL {:?} must be http(s) without a fragment",
            cfg.redirect_url
        )));
    }
    if cfg.http_timeout.is_zero() {
        return Err(OidcError::Discovery("the HTTP timeout is zero".into()));
    }
    Ok(())
}

/// The HTTP client: rustls on ring, the system's roots plus the configured
/// CA file, HTTP/1.1, no redirects, no environment proxies, a per-request
/// timeout.
fn http_client(cfg: &OidcConfig) -> Result<reqwest::Client, OidcError> {
    crate::httpclient::client(cfg.ca_file.as_deref(), cfg.http_timeout)
        .map_err(OidcError::Discovery)
}

/// Sends a request and reads at most [`MAX_RESPONSE_BYTES`] of the answer.
async fn fetch(request: reqwest::RequestBuilder) -> Result<(StatusCode, Vec<u8>), OidcError> {
    let mut response = request.send().await.map_err(http_error)?;
    let status = response.status();
    if status.is_redirection() {
        return Err(OidcError::Http(format!(
            "{} answered with a redirect (HTTP {}), which is not followed",
            response.url().as_str(),
            status.as_u16()
        )));
    }
    let too_large = || {
        OidcError::Http(format!(
            "the answer is larger than {} bytes",
            MAX_RESPONSE_BYTES
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// A failed request, with a hint for the one TLS failure an admin can fix
/// here: a provider certificate from a CA the controller does not trust.
fn http_error(e: reqwest::Error) -> OidcError {
    let mut text = shown(&crate::httpclient::error_chain(&e));
    if text.contains("invalid peer certificate") {
        text.push_str(" (the provider's certificate is not trusted: configure its CA file)");
    }
    OidcError::Http(text)
}

async fn fetch_jwks(http: &reqwest::Client, url: &Url) -> Result<JwkSet, OidcError> {
    let (status, body) = fetch(http.get(url.clone()).header("accept", "application/json")).await?;
    if status != StatusCode::OK {
        return Err(OidcError::Discovery(format!(
            "the JWKS answered HTTP {}",
            status.as_u16()
        )));
    }
    parse_jwks(&body)
}

/// A JWKS document, keeping the keys this module can parse (a provider may
/// also publish encryption keys or types `jsonwebtoken` does not know). Pure.
fn parse_jwks(body: &[u8]) -> Result<JwkSet, OidcError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body)
        .map_err(|_| OidcError::Discovery("the JWKS is not a JSON key set".into()))?;
    if raw.keys.len() > MAX_JWKS_KEYS {
        return Err(OidcError::Discovery(format!(
            "the JWKS has {} keys, more than {MAX_JWKS_KEYS}",
            raw.keys.len()
        )));
    }
    let total = raw.keys.len();
    let keys: Vec<Jwk> = raw
        .keys
        .into_iter()
        .filter_map(|k| serde_json::from_value(k).ok())
        .collect();
    if keys.len() < total {
        tracing::debug!(
            skipped = total - keys.len(),
            "oidc jwks keys of unsupported types skipped"
        );
    }
    Ok(JwkSet { keys })
}

/// The token endpoint's answer.
#[derive(Debug)]
struct TokenResponse {
    id_token: String,
    access_token: Option<String>,
}

/// The token endpoint's answer: the tokens, or its error surfaced (RFC 6749
/// §5.2), sanitized and bounded. Pure.
fn parse_token_response(status: StatusCode, body: &[u8]) -> Result<TokenResponse, OidcError> {
    #[derive(Deserialize)]
    struct Success {
        id_token: Option<String>,
        access_token: Option<String>,
    }
    #[derive(Deserialize)]
    struct Failure {
        error: String,
        error_description: Option<String>,
    }
    if !status.is_success() {
        let detail = match serde_json::from_slice::<Failure>(body) {
            Ok(f) => provider_message(
                &shown(&f.error),
                f.error_description.as_deref().map(shown).as_deref(),
            ),
            Err(_) => format!("HTTP {}", status.as_u16()),
        };
        return Err(OidcError::TokenExchange(detail));
    }
    let ok: Success = serde_json::from_slice(body)
        .map_err(|_| OidcError::Malformed("the token endpoint's answer is not JSON"))?;
    let id_token = ok
        .id_token
        .ok_or_else(|| OidcError::TokenExchange("the answer carries no ID token".into()))?;
    Ok(TokenResponse {
        id_token,
        access_token: ok.access_token,
    })
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The JWKS in use and when an unknown `kid` last caused a refetch.
struct KeyCache {
    set: Arc<JwkSet>,
    refetched_ms: Option<UnixMs>,
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header};
    use rand::SeedableRng;
    use serde_json::{json, Value};

    use super::*;

    const NOW_MS: i64 = 1_750_000_000_000;
    const NOW_S: i64 = NOW_MS / 1000;
    const ISSUER: &str = "https://idp.example.com";
    const CLIENT: &str = "ztmesh-test";
    const NONCE: &str = "n-0S6_WzA2Mj";

    /// A 2048-bit RSA key made with `openssl genrsa` for these tests only
    /// (ring cannot generate RSA keys); it protects nothing.
    const TEST_RSA_PKCS1_PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\n\
MIIEpAIBAAKCAQEAtRaaWkqLMIElsZcPtQ5hguKn5hr6Pcc+Y45++KbqdBbFkC3E\n\
e/ngROYwdN4HamfRIP/gPuPUoNxlB7H0ko0kcZ6yFFJPJuKCH61pPd2Vogrxu32s\n\
G/e/lcfy5ujruAdJHwMa0zMkzWhVO+MMDFGq01Kaxf+XVSrac+bgl4ZtWRtcM9st\n\
RW3zrdqqoaZyLs8DFY9Uqw1mE9BuSc5hjA/L4FRiIpaBaTlcfM9RQCerZtfnSngy\n\
pdJwWmN28WmwwI2+3/KX2s1JA0q02ux7k980SGEMo8Oxo6PXKzg5Xb+StniWKjdL\n\
oXGJX9+V7nLa+vsubcQmWgdbCYGgsIJd9cwzpQIDAQABAoIBAC6Dyc4bi7k/0zDU\n\
vqIhOYbnNX1zvIeV4D6uYYr5RQvgtYqdVvUJcEQCZLwANCNu21cAotdEql9PfVwG\n\
p+3k91GAE/oIUnCIiigc4QWVH1RqP0GLvGPKtZmBrLEHb1Tr+ipPH9rULkXc4Nfr\n\
MDMR3zE87KijSHoF8esHiPUjAH98ie7ZWEhCG0ky272uLqHsjEYvB8MOIZNV/y+z\n\
DR+5RZkFUyqT3ZJPxcimQLBWj0tnMLR8Bemrg8YtXVwoM55PX3gHgHOOvQEvqAcb\n\
m0qN1Zm1vsQw/1Fo/pcEmd6vQvexmzLKRBV+IBGgoRZqof0pa2UKET4eczzZHG0I\n\
MR14OlkCgYEA+BmCMN1PWmtTTtPFXf3m+QWNz1hH0Uyvc5ubwpp9kHLsQesYu0Q+\n\
2L4Bo8pOLaKDh9Ja85K7kvMhU23E7YyCiszmVXdOGa33NA5QwOjiiD/zJKkAR7/a\n\
z3m7pz+wXMAPww4nwjyxpXBrBocxZJpZKGL+1oN8ouFayaf/PClI0scCgYEAutrS\n\
iTuGl98SGIycTn6JeijlS/2NNpeBiaoOx6g0gSnnEt3An4Ph2M8DjU2XjtSAt0Az\n\
eTOcfBySttHQ3f2lto/yL8oJcPggLNfeBuo7edNGRMaLhNyC7J/EZYpZRpW2beI4\n\
XslME/6HxXb0M/xGCpEe0V8EW3a1GatnVLAOGjMCgYEA74OIyW3OHud//Ji7cHsf\n\
EYdIGUULyEZ1F3HBVITa9anM5fJ15MwEtC/y21ICWVIMEwKEJaOhjENGCAnv1LkS\n\
ibc4IohUELx+63VqhmIN2CWMsPaqu5m/Pw8xl0wIEfKlBNTUk1MO2T2HRT0c9ReB\n\
PVkc1rEHkSNoB0g1QrpEgJ8CgYA3OIQP2m+kYmBOsP9gkzS9zWg2VPBuucemj4Ne\n\
re8WXPPVN4O9oJQWJte94rhvlY2UmnybzQzqAOe677byZAudMF06klLH+AxKNGGB\n\
WafKEQ4rNSH2WdS3aV/5QjGwEn6fasON/59kKUympsj0tBFe/hRFe/clsKdEtssK\n\
1BzW0QKBgQCcN7TNuPDs9WuZ4FBU4U2Eh6rX+U+ld/sPdLJJEKj5VZtltczgg3K6\n\
pnv0lOZPoHAEmLLHkoMqlHMMi8gKs8gvf+fYSLr/g/jbXenyDQ3yI45FtBVEIZ47\n\
vb97uiO4Qr1swYKakEmLyOQG8CwkQM1dc/Zc5qKePM/65vCpByrShA==\n\
-----END RSA PRIVATE KEY-----";

    struct TestKey {
        alg: Algorithm,
        kid: String,
        signing: EncodingKey,
        jwk: Value,
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn ec_key(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        TestKey {
            alg: Algorithm::ES256,
            kid: kid.into(),
            signing: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..])}),
        }
    }

    fn ed_key(kid: &str) -> TestKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        TestKey {
            alg: Algorithm::EdDSA,
            kid: kid.into(),
            signing: EncodingKey::from_ed_der(&pair.serialize_der()),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                        "x": b64(pair.public_key_raw())}),
        }
    }

    fn rsa_der() -> Vec<u8> {
        let body: String = TEST_RSA_PKCS1_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    fn rsa_key(kid: &str, alg: Algorithm) -> TestKey {
        let der = rsa_der();
        let pair = ring::rsa::KeyPair::from_der(&der).unwrap();
        let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
        TestKey {
            alg,
            kid: kid.into(),
            signing: EncodingKey::from_rsa_der(&der),
            jwk: json!({"kty": "RSA", "kid": kid, "use": "sig",
                        "n": b64(&public.n), "e": b64(&public.e)}),
        }
    }

    fn set(keys: &[&TestKey]) -> JwkSet {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        serde_json::from_value(json!({ "keys": keys })).unwrap()
    }

    fn good_claims() -> Value {
        json!({
            "iss": ISSUER, "sub": "248289761001", "aud": CLIENT,
            "exp": NOW_S + 300, "iat": NOW_S - 5, "nonce": NONCE,
            "email": "Alice@Example.com", "email_verified": true, "name": "Alice",
            "groups": ["eng", "ops"], "amr": ["pwd", "otp"], "acr": "urn:example:mfa",
        })
    }

    fn sign(key: &TestKey, claims: &Value) -> String {
        let mut header = Header::new(key.alg);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.signing).unwrap()
    }

    fn expect() -> Expect<'static> {
        Expect {
            issuer: ISSUER,
            client_id: CLIENT,
            nonce: NONCE,
        }
    }

    fn verify(token: &str, jwks: &JwkSet) -> Result<Claims, OidcError> {
        verify_id_token(token, jwks, &expect(), NOW_MS)
    }

    fn reason(r: Result<Claims, OidcError>) -> &'static str {
        r.map(|_| "ok").unwrap_or_else(|e| e.reason())
    }

    /// The claims with one field changed (or removed, for `Value::Null`).
    fn with(field: &str, value: Value) -> Value {
        let mut claims = good_claims();
        let map = claims.as_object_mut().unwrap();
        if value.is_null() {
            map.remove(field);
        } else {
            map.insert(field.into(), value);
        }
        claims
    }

    /// A token with a hand-made header and unsigned or arbitrary signature.
    fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(signature)
        )
    }

    fn cfg() -> OidcConfig {
        OidcConfig::new(ISSUER, CLIENT, "https://198.18.0.1:8443/oidc/callback")
    }

    fn verified_claims() -> Claims {
        let key = ec_key("k1");
        verify(&sign(&key, &good_claims()), &set(&[&key])).unwrap()
    }

    #[test]
    fn accepts_good_tokens_of_every_key_type() {
        let ec = ec_key("ec-1");
        let ed = ed_key("ed-1");
        let rs = rsa_key("rsa-1", Algorithm::RS256);
        let ps = rsa_key("rsa-1", Algorithm::PS256);
        let jwks = set(&[&ec, &ed, &rs]);
        for key in [&ec, &ed, &rs, &ps] {
            let claims = verify(&sign(key, &good_claims()), &jwks)
                .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
            assert_eq!(claims.iss, ISSUER);
            assert_eq!(claims.sub, "248289761001");
            assert_eq!(claims.aud, vec![CLIENT.to_owned()]);
            assert_eq!(claims.exp, NOW_S + 300);
            assert!(claims.email_verified);
            assert_eq!(claims.groups, ["eng", "ops"]);
            assert_eq!(claims.amr, ["pwd", "otp"]);
        }
    }

    #[test]
    fn refuses_a_signature_from_another_key_under_a_published_kid() {
        let published = ec_key("k1");
        let attacker = ec_key("k1");
        let token = sign(&attacker, &good_claims());
        assert_eq!(reason(verify(&token, &set(&[&published]))), "bad-signature");

        let published = ed_key("k2");
        let attacker = ed_key("k2");
        let token = sign(&attacker, &good_claims());
        assert_eq!(reason(verify(&token, &set(&[&published]))), "bad-signature");
    }

    #[test]
    fn refuses_a_tampered_payload() {
        let key = ec_key("k1");
        let token = sign(&key, &good_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = with("sub", json!("admin"));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(forged.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(reason(verify(&tampered, &set(&[&key]))), "bad-signature");
    }

    #[test]
    fn refuses_an_unknown_kid() {
        let published = ec_key("k1");
        let other = ec_key("k-rotated");
        let token = sign(&other, &good_claims());
        assert_eq!(reason(verify(&token, &set(&[&published]))), "unknown-key");
        assert_eq!(reason(verify(&token, &set(&[]))), "unknown-key");
    }

    #[test]
    fn accepts_a_token_without_kid_only_when_one_key_fits() {
        let key = ec_key("k1");
        let mut header = Header::new(Algorithm::ES256);
        header.kid = None;
        let token = jsonwebtoken::encode(&header, &good_claims(), &key.signing).unwrap();
        assert_eq!(reason(verify(&token, &set(&[&key]))), "ok");
        // An Ed25519 key does not fit ES256, so the EC key is still the only one.
        assert_eq!(reason(verify(&token, &set(&[&key, &ed_key("k2")]))), "ok");
        assert_eq!(
            reason(verify(&token, &set(&[&key, &ec_key("k3")]))),
            "unknown-key"
        );
    }

    #[test]
    fn refuses_alg_none() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        for alg in ["none", "None", "NONE"] {
            let token = raw_token(&json!({"alg": alg, "kid": "k1"}), &good_claims(), b"");
            assert_eq!(reason(verify(&token, &jwks)), "alg-refused", "{alg}");
        }
        let bare = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(good_claims().to_string().as_bytes())
        );
        assert_eq!(reason(verify(&bare, &jwks)), "alg-refused");
    }

    #[test]
    fn refuses_hmac_signed_with_the_public_key_as_secret() {
        // The classic confusion: a verifier that feeds the RSA public key to
        // HMAC would accept this token.
        let rsa = rsa_key("rsa-1", Algorithm::RS256);
        let jwks = set(&[&rsa]);
        let public_n = rsa.jwk["n"].as_str().unwrap().as_bytes().to_vec();
        for (alg, secret) in [
            (Algorithm::HS256, public_n.clone()),
            (Algorithm::HS384, rsa.jwk.to_string().into_bytes()),
            (Algorithm::HS512, public_n),
        ] {
            let mut header = Header::new(alg);
            header.kid = Some("rsa-1".into());
            let token =
                jsonwebtoken::encode(&header, &good_claims(), &EncodingKey::from_secret(&secret))
                    .unwrap();
            assert_eq!(reason(verify(&token, &jwks)), "alg-refused", "{alg:?}");
        }
        // Even a symmetric key published in the JWKS is never used.
        let secret = b"shared-secret-published-by-mistake";
        let oct: JwkSet = serde_json::from_value(
            json!({"keys": [{"kty": "oct", "kid": "oct-1", "alg": "HS256", "k": b64(secret)}]}),
        )
        .unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("oct-1".into());
        let token =
            jsonwebtoken::encode(&header, &good_claims(), &EncodingKey::from_secret(secret))
                .unwrap();
        assert_eq!(reason(verify(&token, &oct)), "alg-refused");
    }

    #[test]
    fn refuses_an_alg_that_does_not_fit_the_named_key() {
        // ES256 header naming an RSA key; RS256 naming a key declared PS256.
        let ec = ec_key("shared");
        let rsa = rsa_key("shared", Algorithm::RS256);
        assert_eq!(
            reason(verify(&sign(&ec, &good_claims()), &set(&[&rsa]))),
            "alg-refused"
        );
        let mut declared_ps = rsa_key("rsa-ps", Algorithm::RS256);
        declared_ps.jwk["alg"] = json!("PS256");
        let token = sign(&declared_ps, &good_claims());
        assert_eq!(reason(verify(&token, &set(&[&declared_ps]))), "alg-refused");
        // An encryption key is never a signature key.
        let mut enc = ec_key("enc");
        enc.jwk["use"] = json!("enc");
        assert_eq!(
            reason(verify(&sign(&enc, &good_claims()), &set(&[&enc]))),
            "alg-refused"
        );
        // Allow-listed algorithms only: ES512 and PS512 are not on the list.
        let token = raw_token(
            &json!({"alg": "ES512", "kid": "shared"}),
            &good_claims(),
            b"x",
        );
        assert_eq!(reason(verify(&token, &set(&[&ec]))), "alg-refused");
    }

    #[test]
    fn refuses_the_wrong_issuer() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        for iss in [
            json!("https://evil.example.org"),
            json!("https://idp.example.com/"),
            Value::Null,
        ] {
            let token = sign(&key, &with("iss", iss.clone()));
            let expected = if iss.is_null() {
                "malformed"
            } else {
                "wrong-issuer"
            };
            assert_eq!(reason(verify(&token, &jwks)), expected, "{iss}");
        }
    }

    #[test]
    fn refuses_a_token_for_another_client() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        let cases = [
            (with("aud", json!("other-client")), "wrong-audience"),
            (with("aud", json!(["other-client"])), "wrong-audience"),
            (with("aud", json!([])), "wrong-audience"),
            // Several audiences need azp naming us.
            (
                with("aud", json!([CLIENT, "other-client"])),
                "wrong-audience",
            ),
            // azp naming someone else, even with a single audience.
            (with("azp", json!("other-client")), "wrong-audience"),
            (with("aud", Value::Null), "malformed"),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                reason(verify(&sign(&key, &claims), &jwks)),
                expected,
                "{claims}"
            );
        }
        let mut multi = with("aud", json!([CLIENT, "other-client"]));
        multi["azp"] = json!(CLIENT);
        assert_eq!(reason(verify(&sign(&key, &multi), &jwks)), "ok");
    }

    #[test]
    fn checks_time_against_the_callers_clock() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        let cases = [
            (with("exp", json!(NOW_S - 1)), "expired"),
            (with("exp", json!(NOW_S)), "expired"),
            (with("exp", json!(-1)), "expired"),
            (with("exp", json!("tomorrow")), "malformed"),
            (with("exp", Value::Null), "malformed"),
            (with("exp", json!(1e300)), "ok"),
            (with("exp", json!(NOW_S as f64 + 0.5)), "expired"),
            (with("iat", json!(NOW_S + 3600)), "expired"),
            (with("iat", json!(NOW_S + 59)), "ok"),
            (with("iat", Value::Null), "malformed"),
            (with("nbf", json!(NOW_S + 3600)), "expired"),
            (with("nbf", json!(NOW_S - 10)), "ok"),
        ];
        for (claims, expected) in cases {
            assert_eq!(
                reason(verify(&sign(&key, &claims), &jwks)),
                expected,
                "{claims}"
            );
        }
        // The same token is good now and expired later: only `now_ms` decides.
        let token = sign(&key, &good_claims());
        assert!(verify_id_token(&token, &jwks, &expect(), NOW_MS).is_ok());
        let later = verify_id_token(&token, &jwks, &expect(), NOW_MS + 301_000);
        assert!(matches!(later, Err(OidcError::Expired)));
        let iat_skew = verify_id_token(&token, &jwks, &expect(), NOW_MS - 120_000);
        assert!(matches!(iat_skew, Err(OidcError::NotYetValid)));
    }

    #[test]
    fn refuses_a_nonce_of_another_login() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        for nonce in [json!("another-nonce"), json!(""), Value::Null] {
            let token = sign(&key, &with("nonce", nonce.clone()));
            assert_eq!(reason(verify(&token, &jwks)), "nonce-mismatch", "{nonce}");
        }
    }

    #[test]
    fn refuses_an_empty_or_oversized_subject() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        let cases = [
            (json!(""), "malformed"),
            (json!("s".repeat(256)), "malformed"),
            (json!("s".repeat(255)), "ok"),
            (json!(42), "malformed"),
            (Value::Null, "malformed"),
        ];
        for (sub, expected) in cases {
            let token = sign(&key, &with("sub", sub.clone()));
            assert_eq!(reason(verify(&token, &jwks)), expected, "{sub}");
        }
    }

    #[test]
    fn refuses_malformed_tokens_without_panicking() {
        let key = ec_key("k1");
        let jwks = set(&[&key]);
        let good = sign(&key, &good_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let header = parts[0];
        let cases: Vec<String> = vec![
            String::new(),
            "garbage".into(),
            "a.b".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.extra"),
            "..".into(),
            format!("{header}..{}", parts[2]),
            format!("!!!.{}.{}", parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]),
            format!("{}.{}.{}", b64(b"[1,2]"), parts[1], parts[2]),
            format!("{header}.{}.{}", b64(b"not json"), parts[2]),
            format!("{header}.{}.{}", b64(b"\xff\xfe"), parts[2]),
            format!("{header}.{}.{}", parts[1], "%%%"),
            format!("{header}.{}.{}", "a".repeat(MAX_TOKEN_BYTES), parts[2]),
            format!(
                "{}.{}.{}",
                b64(br#"{"alg":"ES256","alg":"ES256","kid":"k1"}"#),
                parts[1],
                parts[2]
            ),
            format!(
                "{}.{}.{}",
                b64(br#"{"alg":"ES256","kid":"k1","crit":["exp"]}"#),
                parts[1],
                parts[2]
            ),
        ];
        for token in cases {
            let r = verify(&token, &jwks);
            assert!(
                matches!(r, Err(OidcError::Malformed(_) | OidcError::BadSignature)),
                "{:.80}: {r:?}",
                token
            );
        }
        // A well-signed payload that is not a JSON object, or repeats a claim.
        for payload in [json!("a string"), json!([1, 2, 3])] {
            assert_eq!(reason(verify(&sign(&key, &payload), &jwks)), "malformed");
        }
        let duplicated = format!(
            r#"{{"iss":"{ISSUER}","sub":"victim","sub":"admin","aud":"{CLIENT}","exp":{},"iat":{},"nonce":"{NONCE}"}}"#,
            NOW_S + 300,
            NOW_S
        );
        let signing_input = format!("{}.{}", parts[0], b64(duplicated.as_bytes()));
        let signature =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), &key.signing, Algorithm::ES256)
                .unwrap();
        let token = format!("{signing_input}.{signature}");
        assert_eq!(reason(verify(&token, &jwks)), "malformed");
    }

    #[test]
    fn refuses_a_huge_token_before_parsing() {
        let key = ec_key("k1");
        let big = with("padding", json!("x".repeat(MAX_TOKEN_BYTES)));
        let token = sign(&key, &big);
        assert!(matches!(
            verify(&token, &set(&[&key])),
            Err(OidcError::Malformed("the ID token is too large"))
        ));
    }

    #[test]
    fn admits_a_verified_identity_keyed_by_issuer_and_subject() {
        let identity = admit(verified_claims(), &cfg()).unwrap();
        assert_eq!(
            identity,
            Identity {
                issuer: ISSUER.into(),
                subject: "248289761001".into(),
                email: Some("alice@example.com".into()),
                name: Some("Alice".into()),
                groups: vec!["eng".into(), "ops".into()],
                amr: vec!["pwd".into(), "otp".into()],
                acr: Some("urn:example:mfa".into()),
            }
        );
    }

    #[test]
    fn drops_an_unverified_email_but_keeps_the_identity() {
        for verified in [json!(false), json!("false"), json!("yes"), Value::Null] {
            let key = ec_key("k1");
            let token = sign(&key, &with("email_verified", verified.clone()));
            let claims = verify(&token, &set(&[&key])).unwrap();
            let identity = admit(claims, &cfg()).unwrap();
            assert_eq!(identity.email, None, "{verified}");
            assert_eq!(identity.subject, "248289761001");
        }
        let key = ec_key("k1");
        let token = sign(&key, &with("email_verified", json!("true")));
        let identity = admit(verify(&token, &set(&[&key])).unwrap(), &cfg()).unwrap();
        assert_eq!(identity.email.as_deref(), Some("alice@example.com"));
    }

    #[test]
    fn domain_rule_needs_a_verified_email_of_an_allowed_domain() {
        let mut cfg = cfg();
        cfg.allowed_domains = vec!["EXAMPLE.com".into(), "example.org".into()];
        assert!(admit(verified_claims(), &cfg).is_ok());

        let mut unverified = verified_claims();
        unverified.email_verified = false;
        assert_eq!(
            admit(unverified, &cfg).unwrap_err().reason(),
            "email-unverified"
        );

        let mut no_email = verified_claims();
        no_email.email = None;
        assert_eq!(
            admit(no_email, &cfg).unwrap_err().reason(),
            "email-unverified"
        );

        for other in [
            "alice@evil.example.net",
            "alice@sub.example.com",
            "alice@example.com.evil.test",
        ] {
            let mut claims = verified_claims();
            claims.email = Some(other.into());
            let err = admit(claims, &cfg).unwrap_err();
            assert_eq!(err.reason(), "domain-refused", "{other}");
            assert!(err.to_string().contains(other.split('@').nth(1).unwrap()));
        }
    }

    #[test]
    fn refuses_unicode_tricks_and_oversized_emails() {
        let bad = [
            "\u{0430}lice@example.com",           // Cyrillic a
            "alice@ex\u{0430}mple.com",           // Cyrillic a in the domain
            "alice\u{202E}moc.elpmaxe@evil.test", // right-to-left override
            "alice\u{FF20}example.com",           // fullwidth @
            "alice\u{200B}@example.com",          // zero-width space
            "alice @example.com",
            "alice\t@example.com",
            "alice\n@example.com",
            "alice@@example.com",
            "alice@example.com@evil.test",
            "alice.example.com",
            "@example.com",
            "alice@",
            "alice@localhost",
            ".alice@example.com",
            "al..ice@example.com",
            "\"alice\"@example.com",
            "alice@-example.com",
            "alice@example..com",
            "alice@exa_mple.com",
        ];
        for raw in bad {
            let mut claims = verified_claims();
            claims.email = Some(raw.into());
            let err = admit(claims, &cfg()).unwrap_err();
            assert_eq!(err.reason(), "bad-email", "{raw:?}");
            assert!(err.to_string().is_ascii(), "message stays plain: {err}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        let long_total = format!("a@{}.com", "b.".repeat(126));
        for raw in [long_local, long_total] {
            let mut claims = verified_claims();
            claims.email = Some(raw.clone());
            assert_eq!(
                admit(claims, &cfg()).unwrap_err().reason(),
                "bad-email",
                "{raw}"
            );
        }
        for good in [
            "a+tag@example.com",
            "x@xn--bcher-kva.example",
            "o'brien@example.org",
        ] {
            assert!(normalize_email(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn group_allow_list_needs_an_intersection() {
        let mut cfg = cfg();
        cfg.allowed_groups = vec!["admins".into(), "ops".into()];
        assert!(admit(verified_claims(), &cfg).is_ok());
        let mut claims = verified_claims();
        claims.groups = vec!["eng".into(), "OPS".into()];
        assert_eq!(admit(claims, &cfg).unwrap_err().reason(), "group-refused");
        let mut claims = verified_claims();
        claims.groups.clear();
        assert_eq!(admit(claims, &cfg).unwrap_err().reason(), "group-refused");
    }

    #[test]
    fn mfa_rules_check_amr_and_acr() {
        let mut cfg = cfg();
        cfg.required_amr = vec!["mfa".into(), "otp".into(), "hwk".into()];
        assert!(admit(verified_claims(), &cfg).is_ok());
        let mut password_only = verified_claims();
        password_only.amr = vec!["pwd".into()];
        assert_eq!(
            admit(password_only, &cfg).unwrap_err().reason(),
            "mfa-required"
        );
        let mut none = verified_claims();
        none.amr.clear();
        assert_eq!(admit(none, &cfg).unwrap_err().reason(), "mfa-required");

        let mut cfg = self::cfg();
        cfg.required_acr = Some("urn:example:mfa".into());
        assert!(admit(verified_claims(), &cfg).is_ok());
        let mut weak = verified_claims();
        weak.acr = Some("urn:example:pwd".into());
        assert_eq!(admit(weak, &cfg).unwrap_err().reason(), "mfa-required");
        let mut absent = verified_claims();
        absent.acr = None;
        assert_eq!(admit(absent, &cfg).unwrap_err().reason(), "mfa-required");
    }

    #[test]
    fn amr_and_groups_accept_a_single_string() {
        let key = ec_key("k1");
        let claims = with("amr", json!("otp"));
        let claims = verify(&sign(&key, &claims), &set(&[&key])).unwrap();
        assert_eq!(claims.amr, ["otp"]);
        let bad = with("groups", json!([1, 2]));
        assert_eq!(
            reason(verify(&sign(&key, &bad), &set(&[&key]))),
            "malformed"
        );
    }

    #[test]
    fn display_name_loses_control_and_invisible_characters() {
        let mut claims = verified_claims();
        claims.name = Some("Ali\u{202E}ce\u{0007} \u{200B}Smith".into());
        let identity = admit(claims, &cfg()).unwrap();
        assert_eq!(identity.name.as_deref(), Some("Alice Smith"));
        let mut claims = verified_claims();
        claims.name = Some("\u{202E}\u{200B}".into());
        assert_eq!(admit(claims, &cfg()).unwrap().name, None);
    }

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn begin_builds_a_complete_authorization_url() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut cfg = cfg();
        cfg.scopes = vec!["email".into(), "groups".into()];
        cfg.required_acr = Some("urn:example:mfa".into());
        let endpoint = Url::parse("https://idp.example.com/auth?tenant=t1").unwrap();
        let req = new_request(&mut rng, NOW_MS);
        let url = Url::parse(&authorization_url(&endpoint, &cfg, &req)).unwrap();

        let query: std::collections::BTreeMap<String, String> =
            url.query_pairs().into_owned().collect();
        assert_eq!(url.host_str(), Some("idp.example.com"));
        assert_eq!(query["tenant"], "t1");
        assert_eq!(query["response_type"], "code");
        assert_eq!(query["client_id"], CLIENT);
        assert_eq!(
            query["redirect_uri"],
            "https://198.18.0.1:8443/oidc/callback"
        );
        assert_eq!(query["scope"], "openid email groups");
        assert_eq!(query["state"], req.state);
        assert_eq!(query["nonce"], req.nonce);
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(query["code_challenge"], pkce_challenge(&req.pkce_verifier));
        assert_eq!(query["acr_values"], "urn:example:mfa");
        assert_eq!(req.created_ms, NOW_MS);
        for secret in [&req.state, &req.nonce, &req.pkce_verifier] {
            assert_eq!(secret.len(), 43, "32 bytes in base64url");
            assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap().len(), 32);
        }
        assert_ne!(req.state, req.nonce);
        assert_ne!(req.nonce, req.pkce_verifier);
        assert_ne!(new_request(&mut rng, NOW_MS).state, req.state);
        assert!(!query.contains_key("client_secret"));
    }

    fn request() -> AuthRequest {
        AuthRequest {
            state: "state-abc".into(),
            nonce: NONCE.into(),
            pkce_verifier: "verifier".into(),
            created_ms: NOW_MS - 1000,
        }
    }

    fn callback(code: Option<&str>, state: Option<&str>) -> Callback {
        Callback {
            code: code.map(String::from),
            state: state.map(String::from),
            ..Callback::default()
        }
    }

    #[test]
    fn callback_state_is_checked_before_anything_else() {
        let req = request();
        assert_eq!(
            check_callback(&req, &callback(Some("c"), Some("state-abc")), NOW_MS).unwrap(),
            "c"
        );
        for state in [None, Some(""), Some("state-abd"), Some("state-abc ")] {
            let mut cb = callback(Some("c"), state);
            cb.error = Some("access_denied".into());
            let err = check_callback(&req, &cb, NOW_MS).unwrap_err();
            assert_eq!(err.reason(), "state-mismatch", "{state:?}");
        }
    }

    #[test]
    fn callback_error_and_age_and_code_are_checked() {
        let req = request();
        let mut cb = callback(None, Some("state-abc"));
        cb.error = Some("access_denied".into());
        cb.error_description = Some("The user \u{202E}cancelled\n<script>".into());
        let err = check_callback(&req, &cb, NOW_MS).unwrap_err();
        assert_eq!(err.reason(), "provider-error");
        assert_eq!(
            err.to_string(),
            "the identity provider refused the sign-in: access_denied (The user cancelled<script>)"
        );

        let late = NOW_MS + LOGIN_TTL_MS;
        let cb = callback(Some("c"), Some("state-abc"));
        assert_eq!(
            check_callback(&req, &cb, late).unwrap_err().reason(),
            "expired"
        );

        for code in [None, Some(""), Some(&*"c".repeat(MAX_CODE_BYTES + 1))] {
            let cb = callback(code, Some("state-abc"));
            assert_eq!(
                check_callback(&req, &cb, NOW_MS).unwrap_err().reason(),
                "malformed"
            );
        }
    }

    fn metadata() -> ProviderMetadata {
        ProviderMetadata {
            issuer: ISSUER.into(),
            authorization_endpoint: "https://idp.example.com/auth".into(),
            token_endpoint: "https://idp.example.com/token".into(),
            jwks_uri: "https://keys.example.com/jwks".into(),
            userinfo_endpoint: Some("https://idp.example.com/me".into()),
            token_endpoint_auth_methods_supported: None,
            code_challenge_methods_supported: Some(vec!["plain".into(), "S256".into()]),
        }
    }

    #[test]
    fn discovery_document_must_match_the_issuer_and_use_https() {
        let issuer = parse_issuer(ISSUER).unwrap();
        let ok = Endpoints::from_metadata(metadata(), &cfg(), &issuer).unwrap();
        assert_eq!(ok.client_auth, ClientAuth::None);
        assert_eq!(ok.jwks.as_str(), "https://keys.example.com/jwks");

        let mut m = metadata();
        m.issuer = "https://idp.example.com/".into();
        assert_eq!(
            Endpoints::from_metadata(m, &cfg(), &issuer)
                .unwrap_err()
                .reason(),
            "discovery"
        );
        let mut m = metadata();
        m.token_endpoint = "http://idp.example.com/token".into();
        assert!(Endpoints::from_metadata(m, &cfg(), &issuer).is_err());
        let mut m = metadata();
        m.jwks_uri = "http://127.0.0.1/jwks".into();
        assert!(
            Endpoints::from_metadata(m, &cfg(), &issuer).is_err(),
            "https issuer, http keys"
        );
        let mut m = metadata();
        m.code_challenge_methods_supported = Some(vec!["plain".into()]);
        assert!(Endpoints::from_metadata(m, &cfg(), &issuer).is_err());
    }

    #[test]
    fn http_issuer_only_on_a_loopback_ip() {
        assert!(parse_issuer("http://127.0.0.1:4000").is_ok());
        assert!(parse_issuer("http://[::1]:4000/oidc").is_ok());
        for refused in [
            "http://localhost:4000",
            "http://198.18.0.1:4000",
            "http://idp.example.com",
            "ftp://idp.example.com",
            "https://idp.example.com?x=1",
            "not a url",
        ] {
            assert_eq!(
                parse_issuer(refused).unwrap_err().reason(),
                "discovery",
                "{refused}"
            );
        }
        let issuer = parse_issuer("http://127.0.0.1:4000").unwrap();
        let mut cfg = cfg();
        cfg.issuer = "http://127.0.0.1:4000".into();
        let mut m = metadata();
        m.issuer = cfg.issuer.clone();
        m.authorization_endpoint = "http://127.0.0.1:4000/auth".into();
        m.token_endpoint = "http://127.0.0.1:4000/token".into();
        m.jwks_uri = "http://[::1]:4000/jwks".into();
        assert!(Endpoints::from_metadata(m, &cfg, &issuer).is_ok());
        let mut m = metadata();
        m.issuer = cfg.issuer.clone();
        m.token_endpoint = "http://idp.example.com/token".into();
        assert!(Endpoints::from_metadata(m, &cfg, &issuer).is_err());
    }

    #[test]
    fn confidential_client_picks_basic_then_post() {
        let issuer = parse_issuer(ISSUER).unwrap();
        let mut cfg = cfg();
        cfg.client_secret = Some("s3cret".into());
        let pick = |methods: Option<&[&str]>| {
            let mut m = metadata();
            m.token_endpoint_auth_methods_supported =
                methods.map(|ms| ms.iter().map(|s| s.to_string()).collect());
            Endpoints::from_metadata(m, &cfg, &issuer).map(|e| e.client_auth)
        };
        assert_eq!(pick(None).unwrap(), ClientAuth::Basic);
        assert_eq!(
            pick(Some(&["client_secret_post", "client_secret_basic"])).unwrap(),
            ClientAuth::Basic
        );
        assert_eq!(
            pick(Some(&["private_key_jwt", "client_secret_post"])).unwrap(),
            ClientAuth::Post
        );
        assert!(pick(Some(&["private_key_jwt"])).is_err());
    }

    #[test]
    fn config_debug_redacts_the_client_secret() {
        let mut cfg = cfg();
        cfg.client_secret = Some("hunter2-very-secret".into());
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn token_endpoint_errors_are_surfaced_sanitized() {
        let body = br#"{"error":"invalid_grant","error_description":"grant request is invalid\u001b[31m"}"#;
        let err = parse_token_response(StatusCode::BAD_REQUEST, body).unwrap_err();
        assert_eq!(err.reason(), "token-exchange");
        assert_eq!(
            err.to_string(),
            "the identity provider did not accept the sign-in: invalid_grant (grant request is invalid[31m)"
        );
        let long = format!(
            r#"{{"error":"invalid_client","error_description":"{}"}}"#,
            "x".repeat(5000)
        );
        let err = parse_token_response(StatusCode::UNAUTHORIZED, long.as_bytes()).unwrap_err();
        assert!(err.to_string().len() < 2 * MAX_SHOWN_CHARS + 100, "{err}");
        let err = parse_token_response(StatusCode::BAD_GATEWAY, b"<html>").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the identity provider did not accept the sign-in: HTTP 502"
        );

        let no_id = parse_token_response(StatusCode::OK, br#"{"access_token":"at"}"#).unwrap_err();
        assert_eq!(no_id.reason(), "token-exchange");
        assert_eq!(
            parse_token_response(StatusCode::OK, b"not json")
                .unwrap_err()
                .reason(),
            "malformed"
        );
        let ok = parse_token_response(
            StatusCode::OK,
            br#"{"id_token":"a.b.c","access_token":"at","token_type":"Bearer","expires_in":60}"#,
        )
        .unwrap();
        assert_eq!(ok.id_token, "a.b.c");
        assert_eq!(ok.access_token.as_deref(), Some("at"));
    }

    #[test]
    fn jwks_keeps_usable_keys_and_skips_unknown_types() {
        let ec = ec_key("k1");
        let body = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES", "kid": "enc", "x": "AA", "y": "AA"},
            {"kty": "unknown"},
            ec.jwk,
        ]});
        let jwks = parse_jwks(body.to_string().as_bytes()).unwrap();
        assert_eq!(jwks.keys.len(), 1);
        assert!(verify(&sign(&ec, &good_claims()), &jwks).is_ok());

        assert_eq!(parse_jwks(b"[]").unwrap_err().reason(), "discovery");
        let many: Vec<Value> = (0..=MAX_JWKS_KEYS).map(|_| ec.jwk.clone()).collect();
        let body = json!({ "keys": many }).to_string();
        assert_eq!(
            parse_jwks(body.as_bytes()).unwrap_err().reason(),
            "discovery"
        );
    }

    #[test]
    fn userinfo_fills_missing_claims_only_for_the_same_subject() {
        let mut claims = verified_claims();
        claims.email = None;
        claims.email_verified = false;
        claims.groups.clear();
        let info: RawUserInfo = serde_json::from_value(json!({
            "sub": "248289761001", "email": "bob@example.com", "email_verified": true,
            "groups": ["ops"], "name": "ignored: the token had one"
        }))
        .unwrap();
        merge_userinfo(&mut claims, info).unwrap();
        assert_eq!(claims.email.as_deref(), Some("bob@example.com"));
        assert!(claims.email_verified);
        assert_eq!(claims.groups, ["ops"]);
        assert_eq!(claims.name.as_deref(), Some("Alice"));

        let other: RawUserInfo =
            serde_json::from_value(json!({"sub": "someone-else", "email": "eve@example.com"}))
                .unwrap();
        let mut claims = verified_claims();
        claims.email = None;
        assert_eq!(
            merge_userinfo(&mut claims, other).unwrap_err().reason(),
            "malformed"
        );
        assert_eq!(claims.email, None);
    }

    #[test]
    fn reasons_are_stable_words() {
        let all = [
            OidcError::StateMismatch,
            OidcError::LoginExpired,
            OidcError::Provider {
                error: "e".into(),
                description: None,
            },
            OidcError::TokenExchange("x".into()),
            OidcError::BadSignature,
            OidcError::UnknownKey,
            OidcError::AlgRefused("none".into()),
            OidcError::WrongIssuer,
            OidcError::WrongAudience,
            OidcError::Expired,
            OidcError::NotYetValid,
            OidcError::NonceMismatch,
            OidcError::Malformed("x"),
            OidcError::EmailUnverified,
            OidcError::BadEmail("x"),
            OidcError::DomainRefused("example.org".into()),
            OidcError::GroupRefused,
            OidcError::MfaRequired,
            OidcError::Discovery("x".into()),
            OidcError::Http("x".into()),
        ];
        for e in &all {
            let word = e.reason();
            assert!(
                word.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{word}"
            );
            assert!(!e.to_string().is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_tokens_never_panic_or_verify(
            token in "[A-Za-z0-9_.-]{0,600}",
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            let key = ec_key("k1");
            let jwks = set(&[&key]);
            proptest::prop_assert!(verify(&token, &jwks).is_err());
            let lossy = String::from_utf8_lossy(&bytes);
            proptest::prop_assert!(verify(&lossy, &jwks).is_err());
            let header = b64(br#"{"alg":"ES256","kid":"k1"}"#);
            let spliced = format!("{header}.{}.{token}", b64(&bytes));
            proptest::prop_assert!(verify(&spliced, &jwks).is_err());
        }

        #[test]
        fn normalized_emails_are_plain_lowercase_and_stable(raw in "\\PC{0,80}|[a-zA-Z0-9.+@-]{0,80}") {
            if let Ok(email) = normalize_email(&raw) {
                proptest::prop_assert!(email.len() <= MAX_EMAIL_BYTES);
                proptest::prop_assert!(email.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
                proptest::prop_assert_eq!(email.matches('@').count(), 1);
                proptest::prop_assert_eq!(normalize_email(&email).unwrap(), email.clone());
                proptest::prop_assert!(email.eq_ignore_ascii_case(&raw));
            }
        }
    }

    /// Web handlers run these futures on a multi-threaded runtime and share
    /// one `Oidc`: a compile-time check that they may.
    #[test]
    fn futures_are_send_and_the_provider_is_shareable() {
        fn send<T: Send>(_: &T) {}
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Oidc>();
        let discover = Oidc::discover(cfg());
        send(&discover);
        #[allow(dead_code, reason = "only type-checked")]
        fn finish_is_send(oidc: &Oidc, req: &AuthRequest, cb: &Callback) {
            send(&oidc.finish(req, cb, NOW_MS));
        }
    }

    #[test]
    fn form_encoding_follows_rfc6749_basic_rules() {
        assert_eq!(form_encode("client:id"), "client%3Aid");
        assert_eq!(form_encode("a b+c/é"), "a+b%2Bc%2F%C3%A9");
        assert_eq!(form_encode("Az09-._*"), "Az09-._*");
    }
}
