//! Browser-login test tools: a real OpenID provider and a real headless
//! Chromium, each run inside a test's network namespace.
//!
//! - [`Idp`] runs `tests/web/idp.mjs`: `oidc-provider` (OpenID Certified) over
//!   HTTPS with a leaf from its own [`TestCa`], configured from an [`IdpConfig`]
//!   (clients, users with their `amr`/`acr`/`groups`/`email_verified`, token TTLs).
//!   Its sign-in page has `#login`, `#password` and `#submit` (and `#abort`);
//!   a client with `consent: true` also gets a page with `#continue`.
//! - [`Browser`] runs `tests/web/driver.mjs`: Debian's Chromium through
//!   `playwright-core`, trusting only the certificates whose SPKI hashes it is
//!   given (`--ignore-certificate-errors-spki-list`; nothing else is ignored).
//! - [`https_get`] / [`https_post_form`]: `curl` in a namespace, for the
//!   requests a relying party makes itself (the token endpoint).
//!
//! Typical use (see `tests/tests/web_harness.rs`):
//!
//! ```no_run
//! use ztmesh_tests::web::{Browser, Idp, IdpClient, IdpConfig, IdpUser, WebTools};
//! use ztmesh_tests::{require_root_or_skip, TempDir, Topology};
//!
//! if !require_root_or_skip() || !WebTools::require_or_skip() {
//!     return;
//! }
//! let topo = Topology::new(&["idp", "user"]);
//! let dir = TempDir::new("idp");
//! let config = IdpConfig {
//!     clients: vec![IdpClient::confidential("ztmesh", "s3cret", "https://198.18.0.2:8444/cb")],
//!     users: vec![IdpUser::new("alice", "correct horse")],
//!     ..IdpConfig::default()
//! };
//! let addr = (topo.addr("idp"), 8443).into();
//! let idp = Idp::start(topo.ns("idp"), addr, &config, dir.path()).unwrap();
//! let mut browser = Browser::launch(topo.ns("user"), &[idp.spki().to_owned()]).unwrap();
//! browser.goto(&format!("{}/.well-known/openid-configuration", idp.issuer())).unwrap();
//! ```
//!
//! The tools come from `scripts/setup.sh` (Debian's `nodejs` and `chromium`,
//! `npm ci` in `tests/web`); tests call [`WebTools::require_or_skip`] first.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::{wait_until, Netns, Proc, TempDir};

/// How long [`Idp::start`] waits for the provider's ready line: a liveness
/// bound (it starts in 1–3 s alone; under the whole suite on 2 cores it
/// once took over 20 s).
const IDP_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long [`Browser::launch`] waits for Chromium to start.
const BROWSER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on one browser command (the driver's own default too).
const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time the Rust side gives the driver to answer after an op's timeout.
const REPLY_SLACK: Duration = Duration::from_secs(5);
/// How long a closing browser gets before SIGTERM, and SIGTERM before SIGKILL.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Bound on one `curl` request (its `--max-time`), and on the process.
const CURL_MAX_TIME: Duration = Duration::from_secs(10);
/// Oldest Node.js major version the pinned npm packages run on.
const MIN_NODE_MAJOR: u32 = 20;

// ---------------------------------------------------------------------------
// Tool discovery
// ---------------------------------------------------------------------------

/// The external tools the browser-login tests need.
#[derive(Debug, Clone, Copy)]
pub struct WebTools;

impl WebTools {
    /// `tests/web`: the provider, the driver and their `node_modules`.
    pub fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
    }

    /// The Chromium binary: `$ZTMESH_CHROMIUM`, else Debian's `/usr/bin/chromium`.
    pub fn chromium() -> PathBuf {
        std::env::var_os("ZTMESH_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
    }

    /// Checks that Node.js (≥ 20), Chromium and the pinned npm packages are installed.
    ///
    /// # Errors
    /// Lists what is missing and says to run `scripts/setup.sh`.
    pub fn available() -> Result<(), String> {
        let mut missing = Vec::new();
        match node_major() {
            Some(major) if major >= MIN_NODE_MAJOR => {}
            Some(major) => missing.push(format!("node >= {MIN_NODE_MAJOR} (found {major})")),
            None => missing.push("node (Debian package nodejs)".to_owned()),
        }
        let chromium = Self::chromium();
        if !chromium.is_file() {
            missing.push(format!("{} (Debian package chromium)", chromium.display()));
        }
        for package in ["oidc-provider", "playwright-core"] {
            let manifest = Self::dir()
                .join("node_modules")
                .join(package)
                .join("package.json");
            if !manifest.is_file() {
                missing.push(format!("tests/web/node_modules/{package} (npm ci)"));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "browser-login test tools missing: {}; run scripts/setup.sh",
                missing.join(", ")
            ))
        }
    }

    /// Returns `true` when the tools are there; `false` (with a message)
    /// when they are not and this is a developer's machine.
    ///
    /// # Panics
    /// When they are missing under CI (`CI` is set): `scripts/test.sh` runs
    /// `scripts/setup.sh`, so a skip there would hide a broken setup.
    pub fn require_or_skip() -> bool {
        let Err(why) = Self::available() else {
            return true;
        };
        if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
            panic!("{why} (CI is set, so the browser-login tests may not skip)");
        }
        eprintln!("skipped: {why}");
        false
    }
}

fn node_major() -> Option<u32> {
    let out = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let version = String::from_utf8_lossy(&out.stdout);
    version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A throwaway certificate authority for a test's HTTPS servers.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    /// Makes a CA named `ztmesh test CA <name>` with a fresh P-256 key.
    ///
    /// # Panics
    /// If rcgen cannot make a key or certificate (not expected).
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ztmesh test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate (PEM), for clients that verify against it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for `ip` (its only subject alternative name),
    /// signed by this CA: `(cert_pem, key_pem)`.
    ///
    /// # Panics
    /// If rcgen cannot make the key or certificate (not expected).
    pub fn leaf(&self, ip: IpAddr) -> (String, String) {
        let key = KeyPair::generate().expect("generate a leaf key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
        params.subject_alt_names = vec![SanType::IpAddress(ip)];
        params
            .distinguished_name
            .push(DnType::CommonName, ip.to_string());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo: the
    /// form Chromium's `--ignore-certificate-errors-spki-list` takes.
    ///
    /// # Errors
    /// When `cert_pem` holds no parseable X.509 certificate.
    pub fn spki_sha256_b64(cert_pem: &str) -> Result<String, String> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("no PEM certificate: {e}"))?;
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("unparseable certificate: {e}"))?;
        let spki = cert.subject_public_key_info();
        Ok(STANDARD.encode(Sha256::digest(spki.as_ref())))
    }
}

// ---------------------------------------------------------------------------
// The OpenID provider
// ---------------------------------------------------------------------------

/// What `tests/web/idp.mjs` serves: its clients, users and token lifetimes.
///
/// Scopes and the claims they put in the ID token: `openid` → `sub`, `acr`,
/// `amr`, `auth_time`; `email` → `email`, `email_verified`; `profile` →
/// `name`, `preferred_username`; `groups` → `groups`. PKCE (S256) is
/// required of every client.
#[derive(Debug, Clone, Serialize)]
pub struct IdpConfig {
    /// Registered clients (relying parties).
    pub clients: Vec<IdpClient>,
    /// Accounts that can sign in.
    pub users: Vec<IdpUser>,
    /// ID token lifetime (set it to 1 to test expired tokens).
    pub id_token_ttl_secs: u32,
    /// Access token lifetime.
    pub access_token_ttl_secs: u32,
    /// Authorization code lifetime.
    pub code_ttl_secs: u32,
}

impl Default for IdpConfig {
    fn default() -> Self {
        Self {
            clients: Vec::new(),
            users: Vec::new(),
            id_token_ttl_secs: 300,
            access_token_ttl_secs: 300,
            code_ttl_secs: 60,
        }
    }
}

/// One relying party registered at the provider.
#[derive(Debug, Clone, Serialize)]
pub struct IdpClient {
    /// The `client_id`.
    pub client_id: String,
    /// `None`: a public client (`token_endpoint_auth_method: none`); otherwise
    /// the secret for HTTP Basic authentication at the token endpoint.
    pub client_secret: Option<String>,
    /// Exact redirect URIs the client may use.
    pub redirect_uris: Vec<String>,
    /// `true`: after signing in, the person must press `#continue` on a
    /// consent page; `false`: consent is granted without a page.
    pub consent: bool,
}

impl IdpClient {
    /// A confidential client with one redirect URI and no consent page.
    pub fn confidential(client_id: &str, secret: &str, redirect_uri: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: Some(secret.to_owned()),
            redirect_uris: vec![redirect_uri.to_owned()],
            consent: false,
        }
    }

    /// A public client (no secret) with one redirect URI and no consent page.
    pub fn public(client_id: &str, redirect_uri: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: None,
            redirect_uris: vec![redirect_uri.to_owned()],
            consent: false,
        }
    }
}

/// One account at the provider, and the claims its ID tokens carry.
#[derive(Debug, Clone, Serialize)]
pub struct IdpUser {
    /// What the person types into `#login`.
    pub login: String,
    /// What the person types into `#password`.
    pub password: String,
    /// The stable subject identifier (`sub`).
    pub sub: String,
    /// The `email` claim (omitted when `None`).
    pub email: Option<String>,
    /// The `email_verified` claim.
    pub email_verified: bool,
    /// The `groups` claim.
    pub groups: Vec<String>,
    /// The `amr` claim (RFC 8176 values such as `pwd`, `otp`, `mfa`); omitted when empty.
    pub amr: Vec<String>,
    /// The `acr` claim (omitted when `None`).
    pub acr: Option<String>,
    /// Makes the provider misbehave for this user: its ID tokens are
    /// rewritten after issue (`None`: honest tokens).
    pub tamper: Option<IdTokenTamper>,
}

/// How the provider rewrites a user's ID token at the token endpoint, to test
/// what a relying party refuses (expired, wrong audience, unsigned, …).
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdTokenTamper {
    /// Added to `iat`, `exp` and `auth_time` (e.g. -3600: expired an hour ago).
    pub shift_time_secs: i64,
    /// Claims set (or replaced), e.g. `{"aud": "another-client"}`.
    pub set_claims: serde_json::Map<String, Value>,
    /// Claims removed, e.g. `["amr"]`.
    pub remove_claims: Vec<String>,
    /// How the result is signed.
    pub signature: TamperSignature,
}

/// The signature on a tampered ID token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TamperSignature {
    /// Signed with the provider's key: valid, only the claims are off.
    #[default]
    Provider,
    /// `alg: none` and an empty signature.
    None,
    /// Signed with a key the JWKS does not have, under the provider's `kid`.
    ForeignKey,
    /// Signed with a key the JWKS does not have, under a `kid` it does not list.
    UnknownKid,
}

impl IdpUser {
    /// A user `login` with subject `sub-<login>`, a verified
    /// `<login>@example.com`, no groups, and `amr: ["pwd", "otp"]` (signed in
    /// with a second factor).
    pub fn new(login: &str, password: &str) -> Self {
        Self {
            login: login.to_owned(),
            password: password.to_owned(),
            sub: format!("sub-{login}"),
            email: Some(format!("{login}@example.com")),
            email_verified: true,
            groups: Vec::new(),
            amr: vec!["pwd".to_owned(), "otp".to_owned()],
            acr: None,
            tamper: None,
        }
    }
}

/// A running OpenID provider (`tests/web/idp.mjs`) in a namespace; stopped,
/// by PID, on drop.
#[derive(Debug)]
pub struct Idp {
    proc: Proc,
    issuer: String,
    ca_pem: String,
    ca_path: PathBuf,
    cert_pem: String,
    spki: String,
}

impl Idp {
    /// Starts the provider in `ns`, listening on `addr` (which must be one of
    /// the namespace's addresses) with issuer `https://addr`, and waits until
    /// it listens. Its CA, leaf certificate, key and configuration are
    /// written into `dir`.
    ///
    /// # Errors
    /// Missing tools, unwritable `dir`, or a provider that exited or did not
    /// become ready within 20 s (its log is in the message).
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        config: &IdpConfig,
        dir: &Path,
    ) -> Result<Self, String> {
        WebTools::available()?;
        let ca = TestCa::new("idp");
        let (cert_pem, key_pem) = ca.leaf(addr.ip());
        let spki = TestCa::spki_sha256_b64(&cert_pem)?;
        let write = |name: &str, contents: &[u8]| -> Result<PathBuf, String> {
            let path = dir.join(name);
            fs::write(&path, contents).map_err(|e| format!("write {}: {e}", path.display()))?;
            Ok(path)
        };
        let ca_path = write("idp-ca.pem", ca.cert_pem().as_bytes())?;
        let cert_path = write("idp-cert.pem", cert_pem.as_bytes())?;
        let key_path = write("idp-key.pem", key_pem.as_bytes())?;
        let json = serde_json::to_vec_pretty(config).map_err(|e| format!("encode config: {e}"))?;
        let config_path = write("idp-config.json", &json)?;

        let script = WebTools::dir().join("idp.mjs");
        let args: Vec<OsString> = vec![
            "node".into(),
            script.into(),
            "--config".into(),
            config_path.into(),
            "--cert".into(),
            cert_path.into(),
            "--key".into(),
            key_path.into(),
            "--listen".into(),
            addr.to_string().into(),
        ];
        let mut proc = ns.spawn("idp", args);
        let ready = wait_until(IDP_READY_TIMEOUT, Duration::from_millis(20), || {
            proc.stdout().contains("\"ready\":true") || !proc.is_running()
        });
        let line = proc.stdout();
        let issuer = line
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| v["issuer"].as_str().map(str::to_owned));
        match (ready, issuer) {
            (Ok(_), Some(issuer)) if proc.is_running() => Ok(Self {
                proc,
                issuer,
                ca_pem: ca.cert_pem().to_owned(),
                ca_path,
                cert_pem,
                spki,
            }),
            _ => Err(format!(
                "OpenID provider on {addr} did not become ready within {IDP_READY_TIMEOUT:?}\n{}",
                proc.logs()
            )),
        }
    }

    /// The issuer, `https://IP:PORT` (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The CA that signed the provider's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The same CA as a file (for `curl --cacert` or a controller flag).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The provider's own (leaf) certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf's SPKI pin, for [`Browser::launch`].
    pub fn spki(&self) -> &str {
        &self.spki
    }

    /// The provider's stdout and stderr (one JSON event a line on stderr:
    /// `login.failed`, `grant.error`, …).
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// Whether the provider still runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// An authorization-endpoint URL (`response_type=code`, S256 PKCE) for `req`.
    pub fn authorization_url(&self, req: &AuthorizationRequest<'_>) -> String {
        let mut query = vec![
            ("response_type", "code"),
            ("client_id", req.client_id),
            ("redirect_uri", req.redirect_uri),
            ("scope", req.scope),
            ("state", req.state),
            ("nonce", req.nonce),
        ];
        if let Some(challenge) = req.code_challenge {
            query.push(("code_challenge", challenge));
            query.push(("code_challenge_method", "S256"));
        }
        format!("{}/auth?{}", self.issuer, form_urlencode(&query))
    }
}

/// The parameters of one authorization request ([`Idp::authorization_url`]).
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    /// The client's `client_id`.
    pub client_id: &'a str,
    /// One of the client's registered redirect URIs.
    pub redirect_uri: &'a str,
    /// Space-separated scopes, e.g. `"openid email groups"`.
    pub scope: &'a str,
    /// The `state` to be echoed back.
    pub state: &'a str,
    /// The `nonce` to be put in the ID token.
    pub nonce: &'a str,
    /// The S256 challenge ([`Pkce`]); `None` sends no PKCE (the provider refuses it).
    pub code_challenge: Option<&'a str>,
}

/// A PKCE verifier and its S256 challenge (RFC 7636).
#[derive(Debug, Clone)]
pub struct Pkce {
    /// The secret the client keeps until the token request (43 characters).
    pub verifier: String,
    /// `BASE64URL(SHA256(verifier))`, sent in the authorization request.
    pub challenge: String,
}

impl Pkce {
    /// A fresh verifier from 32 random bytes, and its challenge.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let verifier = URL_SAFE_NO_PAD.encode(bytes);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Self {
            verifier,
            challenge,
        }
    }
}

/// The claims of a compact JWS, **without verifying its signature** (for a
/// test to inspect a token the code under test will verify).
///
/// # Errors
/// When `token` is not three base64url parts whose middle one is a JSON object.
pub fn jwt_claims_unverified(token: &str) -> Result<Value, String> {
    let parts: Vec<&str> = token.split('.').collect();
    let [_, payload, _] = parts.as_slice() else {
        return Err(format!("a JWT has 3 parts, this has {}", parts.len()));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| format!("JWT payload is not base64url: {e}"))?;
    let value: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("JWT payload is not JSON: {e}"))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err("JWT payload is not a JSON object".to_owned())
    }
}

/// The claims of an RS256 JWT whose signature verifies with a key of `jwks`
/// (a JWK Set as the provider's `jwks_uri` serves it), chosen by `kid`.
/// Only `alg` and the signature are checked, no claim: it is how a test
/// tells a well-signed token from a forged one, not a relying party.
///
/// # Errors
/// Malformed token, another `alg`, no key with its `kid`, bad signature.
pub fn jwt_verify_rs256(token: &str, jwks: &Value) -> Result<Value, String> {
    let (input, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| "a JWT has 3 parts".to_owned())?;
    let header_part = input.split('.').next().unwrap_or_default();
    let header: Value = URL_SAFE_NO_PAD
        .decode(header_part)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| "JWT header is not base64url JSON".to_owned())?;
    if header["alg"] != "RS256" {
        return Err(format!("JWT alg is {}, not RS256", header["alg"]));
    }
    let kid = header["kid"].as_str().unwrap_or_default();
    let key = jwks["keys"]
        .as_array()
        .and_then(|keys| keys.iter().find(|k| k["kid"] == kid))
        .ok_or_else(|| format!("no key with kid {kid:?} in the JWKS"))?;
    let component = |name: &str| -> Result<Vec<u8>, String> {
        key[name]
            .as_str()
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .ok_or_else(|| format!("JWK {kid:?} has no RSA {name}"))
    };
    let public = ring::signature::RsaPublicKeyComponents {
        n: component("n")?,
        e: component("e")?,
    };
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| format!("JWT signature is not base64url: {e}"))?;
    public
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            input.as_bytes(),
            &signature,
        )
        .map_err(|_| format!("JWT signature does not verify with key {kid:?}"))?;
    jwt_claims_unverified(token)
}

/// The first value of query parameter `name` in `url`, percent-decoded.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name).then(|| percent_decode(v))?
    })
}

// ---------------------------------------------------------------------------
// HTTPS requests from a namespace (curl)
// ---------------------------------------------------------------------------

/// An HTTP response: status and body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

impl HttpReply {
    /// The body parsed as JSON.
    ///
    /// # Errors
    /// When the body is not JSON (the body is in the message).
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_str(&self.body)
            .map_err(|e| format!("HTTP {} body is not JSON ({e}): {}", self.status, self.body))
    }
}

/// `GET url` from inside `ns`, trusting only the CA in the file `ca`.
///
/// # Errors
/// `curl`'s message when there is no HTTP response (TLS failure, refused, timed out).
pub fn https_get(ns: &Netns, ca: &Path, url: &str) -> Result<HttpReply, String> {
    curl(ns, ca, url, Vec::new())
}

/// `POST url` with an `application/x-www-form-urlencoded` body from inside
/// `ns`, trusting only the CA in the file `ca`, with HTTP Basic
/// authentication when `basic` is `(user, password)`.
///
/// # Errors
/// `curl`'s message when there is no HTTP response.
pub fn https_post_form(
    ns: &Netns,
    ca: &Path,
    url: &str,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> Result<HttpReply, String> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some((user, password)) = basic {
        args.push("--user".into());
        args.push(format!("{user}:{password}").into());
    }
    for (k, v) in form {
        args.push("--data-urlencode".into());
        args.push(format!("{k}={v}").into());
    }
    if form.is_empty() {
        args.push("--data".into());
        args.push("".into());
    }
    curl(ns, ca, url, args)
}

fn curl(ns: &Netns, ca: &Path, url: &str, extra: Vec<OsString>) -> Result<HttpReply, String> {
    let mut args: Vec<OsString> = vec![
        "curl".into(),
        "--silent".into(),
        "--show-error".into(),
        "--max-time".into(),
        CURL_MAX_TIME.as_secs().to_string().into(),
        "--cacert".into(),
        ca.into(),
        "--write-out".into(),
        "\n%{http_code}".into(),
    ];
    args.extend(extra);
    args.push(url.into());
    let mut proc = ns.spawn("curl", args);
    let Some(status) = proc.wait_exit(CURL_MAX_TIME + Duration::from_secs(5)) else {
        proc.kill9();
        return Err(format!("curl {url}: did not finish"));
    };
    if !status.success() {
        return Err(format!("curl {url}: {} ({status})", proc.stderr().trim()));
    }
    let out = proc.stdout();
    let (body, code) = out
        .rsplit_once('\n')
        .ok_or_else(|| format!("curl {url}: no status line in {out:?}"))?;
    let status = code
        .trim()
        .parse()
        .map_err(|_| format!("curl {url}: bad status {code:?}"))?;
    Ok(HttpReply {
        status,
        body: body.to_owned(),
    })
}

// ---------------------------------------------------------------------------
// The browser
// ---------------------------------------------------------------------------

/// The result of a navigation (`goto`, `reload`, `back`).
#[derive(Debug, Clone, Deserialize)]
pub struct Nav {
    /// HTTP status of the final response (`None`: no response, e.g. `back` with no history).
    pub status: Option<u16>,
    /// The page's URL afterwards.
    pub url: String,
}

/// The result of a click.
#[derive(Debug, Clone, Deserialize)]
pub struct Click {
    /// Whether the click started a main-frame navigation (then it was waited for).
    pub navigated: bool,
    /// The page's URL afterwards (`chrome-error://…` when the load failed).
    pub url: String,
    /// The load that failed, if the navigation ended in one: its URL is the
    /// one the browser could not open (e.g. a redirect to a port nothing listens on).
    pub failed: Option<FailedLoad>,
}

/// A main-frame load that got no HTTP response.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FailedLoad {
    /// The URL that could not be loaded.
    pub url: String,
    /// Chromium's reason, e.g. `net::ERR_CONNECTION_REFUSED`, `net::ERR_CERT_AUTHORITY_INVALID`.
    pub error: String,
}

/// Every main-frame request so far and the loads that failed.
#[derive(Debug, Clone, Deserialize)]
pub struct Navigations {
    /// Request URLs in order, redirects included.
    pub urls: Vec<String>,
    /// Loads that got no response.
    pub failed: Vec<FailedLoad>,
}

/// A cookie in the browser.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cookie {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
    /// Domain (host).
    pub domain: String,
    /// Path.
    pub path: String,
    /// Expiry in seconds since the epoch; -1 for a session cookie.
    pub expires: f64,
    /// `HttpOnly`.
    pub http_only: bool,
    /// `Secure`.
    pub secure: bool,
    /// `Strict`, `Lax` or `None`.
    pub same_site: String,
}

/// What kind of problem a page had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViolationKind {
    /// A Content-Security-Policy violation (`securitypolicyviolation`).
    Csp,
    /// A `console.error` (including Chromium's own "Refused to …" CSP messages).
    Console,
    /// An uncaught exception in a page script.
    #[serde(rename = "pageerror")]
    PageError,
    /// "Failed to load resource": a subresource, or the document itself,
    /// answered with an error status or not at all.
    Resource,
}

/// One problem a page had ([`Browser::violations`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Violation {
    /// What kind.
    pub kind: ViolationKind,
    /// The message (for CSP: `<directive> blocked <uri>`).
    pub text: String,
    /// The document or resource it concerns.
    pub url: String,
}

/// A headless Chromium in a namespace, driven one command at a time; closed
/// (then killed, by PID) on drop.
///
/// Every method is bounded by the browser's timeout (15 s unless
/// [`Browser::set_timeout`] changes it) and returns `Err` with the driver's
/// one-line reason: an element not found, a navigation refused, a timeout.
pub struct Browser {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
    next_id: u64,
    timeout: Duration,
    version: String,
    stderr_path: PathBuf,
    logs_shown: bool,
    _dir: TempDir,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("version", &self.version)
            .finish()
    }
}

impl Browser {
    /// Starts Chromium in `ns`, trusting (besides nothing else) the
    /// certificates whose SPKI pins ([`TestCa::spki_sha256_b64`]) are given.
    ///
    /// # Errors
    /// Missing tools, or a browser that did not start within 30 s.
    pub fn launch(ns: &Netns, spki_pins: &[String]) -> Result<Self, String> {
        Self::launch_with_args(ns, spki_pins, &[])
    }

    /// Like [`Browser::launch`], with extra Chromium command-line arguments.
    ///
    /// # Errors
    /// As [`Browser::launch`]; also a pin that is not base64.
    pub fn launch_with_args(
        ns: &Netns,
        spki_pins: &[String],
        extra_args: &[&str],
    ) -> Result<Self, String> {
        WebTools::available()?;
        for pin in spki_pins {
            let bytes = STANDARD
                .decode(pin)
                .map_err(|e| format!("SPKI pin {pin:?} is not base64: {e}"))?;
            if bytes.len() != 32 {
                return Err(format!("SPKI pin {pin:?} is not a SHA-256 hash"));
            }
        }
        let dir = TempDir::new(&format!("browser-{}", ns.tag()));
        let stderr_path = dir.join("driver.log");
        let stderr = fs::File::create(&stderr_path).map_err(|e| format!("create log: {e}"))?;
        let mut cmd = ns.command("node");
        cmd.arg(WebTools::dir().join("driver.mjs"))
            .arg("--chromium")
            .arg(WebTools::chromium())
            .arg("--");
        if !spki_pins.is_empty() {
            cmd.arg(format!(
                "--ignore-certificate-errors-spki-list={}",
                spki_pins.join(",")
            ));
        }
        cmd.args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start the browser driver in {}: {e}", ns.name()))?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut browser = Self {
            label: format!("{}/browser", ns.tag()),
            stdin: child.stdin.take(),
            child,
            replies,
            next_id: 1,
            timeout: DEFAULT_OP_TIMEOUT,
            version: String::new(),
            stderr_path,
            logs_shown: false,
            _dir: dir,
        };
        let ready = browser
            .replies
            .recv_timeout(BROWSER_READY_TIMEOUT)
            .ok()
            .and_then(|line| serde_json::from_str::<Value>(&line).ok())
            .filter(|v| v["ready"] == true);
        match ready {
            Some(v) => {
                browser.version = v["version"].as_str().unwrap_or_default().to_owned();
                Ok(browser)
            }
            None => Err(format!(
                "Chromium did not start within {BROWSER_READY_TIMEOUT:?}:\n{}",
                browser.logs()
            )),
        }
    }

    /// Chromium's version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Sets the bound on each later command (default 15 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Loads `url` and waits for its `load` event.
    ///
    /// # Errors
    /// When there is no response (refused, certificate not trusted: the
    /// message carries Chromium's `net::ERR_…`) or it times out. An HTTP
    /// error status is not an error: see [`Nav::status`].
    pub fn goto(&mut self, url: &str) -> Result<Nav, String> {
        self.typed(json!({"op": "goto", "url": url}))
    }

    /// Types `value` into the input matching `sel`.
    ///
    /// # Errors
    /// No such (single, editable) element within the timeout.
    pub fn fill(&mut self, sel: &str, value: &str) -> Result<(), String> {
        self.call(json!({"op": "fill", "sel": sel, "value": value}))
            .map(drop)
    }

    /// Clicks the element matching `sel`; if that starts a navigation, waits
    /// until it has loaded or failed.
    ///
    /// # Errors
    /// No such element, or the navigation did not finish within the timeout.
    pub fn click(&mut self, sel: &str) -> Result<Click, String> {
        self.typed(json!({"op": "click", "sel": sel}))
    }

    /// The rendered text of the one element matching `sel`, waiting (up to
    /// the timeout) for it to appear; [`Browser::count`] checks absence
    /// without waiting.
    ///
    /// # Errors
    /// None (within the timeout) or several elements match.
    pub fn text(&mut self, sel: &str) -> Result<String, String> {
        let v = self.call(json!({"op": "text", "sel": sel}))?;
        string_field(&v, "text")
    }

    /// Attribute `name` of the one element matching `sel` (`None` when absent).
    ///
    /// # Errors
    /// None or several elements match.
    pub fn attr(&mut self, sel: &str, name: &str) -> Result<Option<String>, String> {
        let v = self.call(json!({"op": "attr", "sel": sel, "name": name}))?;
        Ok(v["value"].as_str().map(str::to_owned))
    }

    /// How many elements match `sel` (does not wait).
    ///
    /// # Errors
    /// An invalid selector.
    pub fn count(&mut self, sel: &str) -> Result<usize, String> {
        let v = self.call(json!({"op": "count", "sel": sel}))?;
        v["count"]
            .as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| "count: no count in the answer".to_owned())
    }

    /// Waits until an element matching `sel` is visible.
    ///
    /// # Errors
    /// It did not appear within the timeout.
    pub fn wait(&mut self, sel: &str) -> Result<(), String> {
        self.call(json!({"op": "wait", "sel": sel})).map(drop)
    }

    /// Waits until the page's URL contains `part`; returns the URL.
    ///
    /// # Errors
    /// It did not within the timeout.
    pub fn wait_url(&mut self, part: &str) -> Result<String, String> {
        let v = self.call(json!({"op": "wait_url", "contains": part}))?;
        string_field(&v, "url")
    }

    /// The page's current URL.
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn url(&mut self) -> Result<String, String> {
        let v = self.call(json!({"op": "url"}))?;
        string_field(&v, "url")
    }

    /// The page's HTML, as serialized by the browser.
    ///
    /// # Errors
    /// Only when the driver is gone or the page is mid-navigation.
    pub fn content(&mut self) -> Result<String, String> {
        let v = self.call(json!({"op": "content"}))?;
        string_field(&v, "html")
    }

    /// HTTP status of the last main-frame response (`None`: none yet, or the
    /// last load failed).
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn status(&mut self) -> Result<Option<u16>, String> {
        let v = self.call(json!({"op": "status"}))?;
        Ok(v["status"].as_u64().and_then(|s| u16::try_from(s).ok()))
    }

    /// Every main-frame request URL so far, and the loads that failed.
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn navigations(&mut self) -> Result<Navigations, String> {
        self.typed(json!({"op": "navigations"}))
    }

    /// All cookies in the browser.
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn cookies(&mut self) -> Result<Vec<Cookie>, String> {
        let v = self.call(json!({"op": "cookies"}))?;
        serde_json::from_value(v["cookies"].clone()).map_err(|e| format!("cookies: {e}"))
    }

    /// Forgets every cookie: to servers, a new visitor.
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn clear_cookies(&mut self) -> Result<(), String> {
        self.call(json!({"op": "clear_cookies"})).map(drop)
    }

    /// Reloads the page (a POST result is re-requested as the browser would).
    ///
    /// # Errors
    /// As [`Browser::goto`].
    pub fn reload(&mut self) -> Result<Nav, String> {
        self.typed(json!({"op": "reload"}))
    }

    /// Goes back one history entry.
    ///
    /// # Errors
    /// As [`Browser::goto`].
    pub fn back(&mut self) -> Result<Nav, String> {
        self.typed(json!({"op": "back"}))
    }

    /// Saves a full-page PNG to `path` (for a person to look at).
    ///
    /// # Errors
    /// When the page cannot be captured or the file written.
    pub fn screenshot(&mut self, path: &Path) -> Result<(), String> {
        let path = path.to_string_lossy();
        self.call(json!({"op": "screenshot", "path": path}))
            .map(drop)
    }

    /// Every problem pages had since launch (or since [`Browser::take_violations`]).
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn violations(&mut self) -> Result<Vec<Violation>, String> {
        let v = self.call(json!({"op": "violations"}))?;
        serde_json::from_value(v["violations"].clone()).map_err(|e| format!("violations: {e}"))
    }

    /// Like [`Browser::violations`], and forgets them.
    ///
    /// # Errors
    /// Only when the driver is gone.
    pub fn take_violations(&mut self) -> Result<Vec<Violation>, String> {
        let v = self.call(json!({"op": "violations", "clear": true}))?;
        serde_json::from_value(v["violations"].clone()).map_err(|e| format!("violations: {e}"))
    }

    /// The driver's log (JSON events on stderr: failed loads, launch errors).
    pub fn logs(&mut self) -> String {
        self.logs_shown = true;
        format!(
            "----- {} (pid {}) driver log -----\n{}\n-----",
            self.label,
            self.child.id(),
            fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// Closes the browser and waits for it to exit (what drop does, too).
    pub fn close(mut self) {
        self.shutdown();
    }

    fn typed<T: for<'de> Deserialize<'de>>(&mut self, cmd: Value) -> Result<T, String> {
        let op = cmd["op"].as_str().unwrap_or_default().to_owned();
        let v = self.call(cmd)?;
        serde_json::from_value(v).map_err(|e| format!("{op}: unexpected answer: {e}"))
    }

    /// Sends one command and waits for the answer that carries its id.
    fn call(&mut self, mut cmd: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = id.into();
        cmd["timeout_ms"] = u64::try_from(self.timeout.as_millis())
            .unwrap_or(u64::MAX)
            .into();
        let what = describe_command(&cmd);
        let line = format!("{cmd}\n");
        let sent = self.stdin.as_mut().map(|stdin| {
            stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush())
        });
        if !matches!(sent, Some(Ok(()))) {
            return Err(format!(
                "{what}: the browser driver is gone\n{}",
                self.logs()
            ));
        }
        let deadline = Instant::now() + self.timeout + REPLY_SLACK;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.replies.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{what}: no answer from the browser driver"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "{what}: the browser driver exited\n{}",
                        self.logs()
                    ));
                }
            };
            let Ok(reply) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            // An answer to an earlier command that timed out on this side.
            if reply["id"] != id {
                continue;
            }
            if reply["ok"] == true {
                return Ok(reply);
            }
            let error = reply["error"].as_str().unwrap_or("failed without a reason");
            return Err(format!("{what}: {error}"));
        }
    }

    fn shutdown(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"{\"op\":\"close\"}\n");
            // Dropping stdin closes it: EOF also makes the driver close.
        }
        if self.wait_exit(CLOSE_GRACE) {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on the PID of our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if self.wait_exit(CLOSE_GRACE) {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_until(timeout, Duration::from_millis(20), || {
            !matches!(self.child.try_wait(), Ok(None))
        })
        .is_ok()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.shutdown();
        if std::thread::panicking() && !self.logs_shown {
            eprintln!("{}", self.logs());
        }
    }
}

fn string_field(v: &Value, name: &str) -> Result<String, String> {
    v[name]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no {name} in the answer {v}"))
}

/// `click #submit`, `goto https://…`: the op and its main argument, for messages.
fn describe_command(cmd: &Value) -> String {
    let op = cmd["op"].as_str().unwrap_or("?");
    match ["sel", "url", "contains"]
        .iter()
        .find_map(|k| cmd[*k].as_str())
    {
        Some(arg) => format!("{op} {arg}"),
        None => op.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// URL encoding (pure)
// ---------------------------------------------------------------------------

/// `application/x-www-form-urlencoded` serialization (space as `%20`, which
/// every server accepts).
fn form_urlencode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes (and turns `+` into a space); `None` on a broken escape
/// or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData as _;

    use super::*;

    #[test]
    fn spki_pin_is_the_sha256_of_the_leaf_public_key() {
        let ca = TestCa::new("unit");
        let ip: IpAddr = "198.18.0.1".parse().unwrap();
        let (cert, key) = ca.leaf(ip);
        let key = KeyPair::from_pem(&key).unwrap();
        let want = STANDARD.encode(Sha256::digest(key.subject_public_key_info()));
        assert_eq!(TestCa::spki_sha256_b64(&cert).unwrap(), want);
        assert_ne!(
            TestCa::spki_sha256_b64(ca.cert_pem()).unwrap(),
            want,
            "the CA has its own key"
        );
    }

    #[test]
    fn spki_pin_refuses_what_is_not_a_certificate() {
        assert!(TestCa::spki_sha256_b64("").is_err());
        assert!(TestCa::spki_sha256_b64(
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        .is_err());
        let key = KeyPair::generate().unwrap().serialize_pem();
        assert!(TestCa::spki_sha256_b64(&key).is_err());
    }

    #[test]
    fn pkce_challenge_is_the_s256_of_the_verifier() {
        // RFC 7636, appendix B.
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        assert_eq!(challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let a = Pkce::generate();
        let b = Pkce::generate();
        assert_eq!(a.verifier.len(), 43);
        assert_ne!(a.verifier, b.verifier);
        assert_eq!(
            a.challenge,
            URL_SAFE_NO_PAD.encode(Sha256::digest(a.verifier.as_bytes()))
        );
    }

    #[test]
    fn jwt_claims_are_read_and_malformed_tokens_refused() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","amr":["pwd"]}"#);
        let claims = jwt_claims_unverified(&format!("e30.{payload}.sig")).unwrap();
        assert_eq!(claims["sub"], "alice");
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "e30.!!!.sig",
            &format!("e30.{}.s", URL_SAFE_NO_PAD.encode(b"[1]")),
            &format!("e30.{}.s", URL_SAFE_NO_PAD.encode(b"not json")),
        ] {
            assert!(jwt_claims_unverified(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn jwt_verifier_refuses_malformed_tokens_and_keys_without_panicking() {
        let header = |h: &str| URL_SAFE_NO_PAD.encode(h.as_bytes());
        let jwks = json!({"keys": [{"kid": "k", "kty": "RSA", "n": "AQAB", "e": "AQAB"}]});
        let cases = [
            ("", "3 parts"),
            ("x.y", "not base64url JSON"),
            (
                &format!("{}.e30.", header(r#"{"alg":"none"}"#)),
                "not RS256",
            ),
            (
                &format!("{}.e30.AA", header(r#"{"alg":"RS256","kid":"z"}"#)),
                "no key",
            ),
            (
                &format!("{}.e30.!!", header(r#"{"alg":"RS256","kid":"k"}"#)),
                "base64url",
            ),
            (
                &format!("{}.e30.AAAA", header(r#"{"alg":"RS256","kid":"k"}"#)),
                "does not verify",
            ),
        ];
        for (token, want) in cases {
            let err = jwt_verify_rs256(token, &jwks).unwrap_err();
            assert!(err.contains(want), "{token:?}: {err}");
        }
        let err = jwt_verify_rs256(
            &format!("{}.e30.AA", header(r#"{"alg":"RS256","kid":"k"}"#)),
            &json!({}),
        )
        .unwrap_err();
        assert!(err.contains("no key"), "{err}");
    }

    #[test]
    fn query_params_are_decoded_and_broken_escapes_refused() {
        let url = "https://198.18.0.2:8444/cb?code=a%2Bb&state=s+1&iss=https%3A%2F%2F198.18.0.1%3A8443#frag";
        assert_eq!(query_param(url, "code").as_deref(), Some("a+b"));
        assert_eq!(query_param(url, "state").as_deref(), Some("s 1"));
        assert_eq!(
            query_param(url, "iss").as_deref(),
            Some("https://198.18.0.1:8443")
        );
        assert_eq!(query_param(url, "frag"), None);
        assert_eq!(query_param("https://x.test/?a=%zz", "a"), None);
        assert_eq!(query_param("https://x.test/?a=%f", "a"), None);
        assert_eq!(query_param("https://x.test/?a=%ff", "a"), None);
        assert_eq!(query_param("https://x.test/?a=%+f", "a"), None);
        assert_eq!(query_param("https://x.test/", "a"), None);
        assert_eq!(
            query_param("https://x.test/?flag", "flag").as_deref(),
            Some("")
        );
    }

    #[test]
    fn authorization_url_encodes_every_parameter() {
        let q = form_urlencode(&[("scope", "openid email"), ("r", "https://a.test/cb?x=1&y")]);
        assert_eq!(
            q,
            "scope=openid%20email&r=https%3A%2F%2Fa.test%2Fcb%3Fx%3D1%26y"
        );
        assert_eq!(
            query_param(&format!("u?{q}"), "r").as_deref(),
            Some("https://a.test/cb?x=1&y")
        );
    }

    #[test]
    fn config_serializes_as_idp_mjs_reads_it() {
        let config = IdpConfig {
            clients: vec![
                IdpClient::confidential("web", "s", "https://198.18.0.3/cb"),
                IdpClient::public("cli", "https://198.18.0.3/cb"),
            ],
            users: vec![IdpUser::new("alice", "pw")],
            ..IdpConfig::default()
        };
        let v = serde_json::to_value(&config).unwrap();
        assert_eq!(v["clients"][0]["client_secret"], "s");
        assert!(v["clients"][1]["client_secret"].is_null());
        assert_eq!(v["users"][0]["sub"], "sub-alice");
        assert_eq!(v["users"][0]["amr"], json!(["pwd", "otp"]));
        assert_eq!(v["id_token_ttl_secs"], 300);
    }

    #[test]
    fn violations_parse_every_kind_the_driver_reports() {
        let v: Vec<Violation> = serde_json::from_value(json!([
            {"kind": "csp", "text": "script-src blocked inline", "url": "https://a.test/"},
            {"kind": "console", "text": "x", "url": ""},
            {"kind": "pageerror", "text": "boom", "url": ""},
            {"kind": "resource", "text": "Failed to load resource", "url": ""},
        ]))
        .unwrap();
        let kinds: Vec<ViolationKind> = v.iter().map(|v| v.kind).collect();
        assert_eq!(
            kinds,
            [
                ViolationKind::Csp,
                ViolationKind::Console,
                ViolationKind::PageError,
                ViolationKind::Resource
            ]
        );
    }
}
