//! The controller's web pages, served on its TLS listener next to gRPC
//! (HTTP/2 only; every current browser speaks it over TLS): sign-in with a
//! built-in account (password + TOTP) or SSO (OIDC), and the confirmation of
//! a device that runs `ztmesh up` without an auth key (interactive login).
//!
//! Hardening, on every response: a strict Content-Security-Policy (no
//! script at all, styles only from /static, no framing, forms only to this
//! origin), `no-store`, `Referrer-Policy: same-origin` (a login code in a URL
//! never leaks to the identity provider), HSTS, `nosniff`. State-changing requests are
//! POSTs that carry the session's CSRF token and, when the browser sends
//! them, a same-origin `Origin` and `Sec-Fetch-Site`. Cookies are
//! `__Host-`, Secure, HttpOnly, SameSite=Lax. Guessing is slowed by
//! exponential back-off per account and per source ([`crate::accounts`]),
//! never locked out. Every sign-in, failure, enrolment and device decision
//! is audited.

#![allow(
    clippy::result_large_err,
    reason = "the error of a page helper is the response to send at once; boxing it buys nothing"
)]

pub mod html;
pub mod session;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Form, Router};
use base64::Engine;
use serde::Deserialize;
use tokio::sync::oneshot;
use tonic::transport::server::TcpConnectInfo;
use ztmesh_proto::auth::{hex, sha256};
use ztmesh_proto::control as pb;

use crate::accounts::{self, Backoff};
use crate::device::{self, DeviceLogins, Pending};
use crate::mesh::{DeviceClaim, Mesh};
use crate::oidc::{Callback, Oidc, OidcConfig};
use crate::ratelimit::source_key;
use crate::roles::Role;
use crate::UnixMs;
use html::{esc, hidden, page};
use session::{Auth, Session, Sessions, COOKIE};

/// What a waiting node receives: its enrollment, or why not.
pub type Waiter = oneshot::Sender<Result<pb::EnrollResponse, String>>;

/// Devices waiting for confirmation, shared by the `Login` RPC (which adds
/// them and waits) and the pages (which confirm them).
pub struct LoginHub {
    logins: Mutex<DeviceLogins<Waiter>>,
    /// The base URL printed to nodes; `None`: the address the node used.
    pub public_url: Option<String>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LoginHub {
    pub fn new(public_url: Option<String>) -> Self {
        Self {
            logins: Mutex::new(DeviceLogins::new(4096, 16)),
            public_url,
        }
    }

    /// Registers a device; returns its code and expiry.
    ///
    /// # Errors
    /// [`device::Full`].
    #[expect(clippy::disallowed_types, reason = "login codes come from OS entropy")]
    pub fn start(
        &self,
        claim: DeviceClaim,
        os: &str,
        source: Option<IpAddr>,
        waiter: Waiter,
        now: UnixMs,
    ) -> Result<(String, UnixMs), device::Full> {
        use rand_core::OsRng;
        let src = source
            .map(|ip| source_key(ip).to_string())
            .unwrap_or_default();
        relock(&self.logins).start(claim, os, &src, waiter, now, &mut OsRng)
    }

    /// Forgets a login whose node stopped waiting.
    pub fn cancel(&self, code: &str) {
        relock(&self.logins).cancel(code);
    }

    /// What a page shows of a pending login (its waiter stays).
    fn peek(&self, code: &str, now: UnixMs) -> Option<(String, DeviceClaim, String, String)> {
        relock(&self.logins)
            .get(code, now)
            .filter(|p| !p.waiter.is_closed())
            .map(|p| {
                (
                    p.code.clone(),
                    p.claim.clone(),
                    p.os.clone(),
                    p.source.clone(),
                )
            })
    }

    fn take(&self, code: &str, now: UnixMs) -> Option<Pending<Waiter>> {
        relock(&self.logins)
            .take(code, now)
            .filter(|p| !p.waiter.is_closed())
    }

    pub fn pending(&self) -> usize {
        relock(&self.logins).len()
    }
}

/// Single sign-on at one OpenID provider: discovered in the background, so
/// the controller starts (and built-in accounts work) while the provider is
/// down; discovery is retried until it answers.
pub struct Sso {
    cfg: OidcConfig,
    /// Whether a first SSO sign-in may create its user (a member): only when
    /// the provider's allowed domains vouch for the email; otherwise an
    /// admin creates users first.
    create_users: bool,
    provider: std::sync::RwLock<Result<Arc<Oidc>, String>>,
}

impl Sso {
    pub fn new(cfg: OidcConfig) -> Arc<Self> {
        Arc::new(Self {
            create_users: !cfg.allowed_domains.is_empty(),
            cfg,
            provider: std::sync::RwLock::new(Err("not discovered yet".into())),
        })
    }

    /// Discovers the provider, retrying every `retry` until it answers.
    pub async fn discover(self: Arc<Self>, retry: std::time::Duration) {
        loop {
            match Oidc::discover(self.cfg.clone()).await {
                Ok(o) => {
                    *self.provider.write().unwrap_or_else(|p| p.into_inner()) = Ok(Arc::new(o));
                    return;
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.cfg.issuer, error = %e, "SSO provider not available; retrying");
                    *self.provider.write().unwrap_or_else(|p| p.into_inner()) = Err(e.to_string());
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    fn provider(&self) -> Result<Arc<Oidc>, String> {
        self.provider
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The pages' shared state.
pub struct Web {
    mesh: Arc<Mesh>,
    hub: Arc<LoginHub>,
    sso: Option<Arc<Sso>>,
    sessions: Mutex<Sessions>,
    /// Password failures per account (a delay the owner sits out at most
    /// 30 s) and per source (up to 5 minutes).
    pw_account: Mutex<Backoff>,
    pw_source: Mutex<Backoff>,
    /// Second-factor failures per account.
    mfa: Mutex<Backoff>,
    /// Unknown device codes per source.
    codes: Mutex<Backoff>,
    /// Password checks running at once (argon2: 19 MiB and ~50 ms each).
    hashing: Arc<tokio::sync::Semaphore>,
    /// SSO callbacks running at once (each may wait on the provider).
    callbacks: Arc<tokio::sync::Semaphore>,
    fingerprint: String,
}

impl Web {
    pub fn new(mesh: Arc<Mesh>, hub: Arc<LoginHub>, sso: Option<Arc<Sso>>) -> Self {
        let fingerprint = hex(&mesh.fingerprint());
        let idle_ms = mesh.config().web_session_idle_ms;
        Self {
            mesh,
            hub,
            sso,
            sessions: Mutex::new(Sessions::new(10_000, 64).with_idle(idle_ms)),
            pw_account: Mutex::new(Backoff::new(5, 1000, 30_000, 100_000)),
            pw_source: Mutex::new(Backoff::new(20, 1000, 300_000, 100_000)),
            mfa: Mutex::new(Backoff::new(3, 1000, 30_000, 100_000)),
            codes: Mutex::new(Backoff::new(5, 1000, 60_000, 100_000)),
            hashing: Arc::new(tokio::sync::Semaphore::new(2)),
            callbacks: Arc::new(tokio::sync::Semaphore::new(8)),
            fingerprint,
        }
    }
}

/// The pages' routes, to be merged with the gRPC services' router.
pub fn router(web: Arc<Web>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login_post))
        .route("/mfa", get(mfa_page).post(mfa_post))
        .route("/mfa/enroll", get(enroll_page).post(enroll_post))
        .route("/device", get(device_page).post(device_post))
        .route("/logout", axum::routing::post(logout))
        .route("/oidc/start", get(oidc_start))
        .route("/oidc/callback", get(oidc_callback))
        .route("/static/style.css", get(style))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(web)
}

/// The same-origin-only, script-free policy of every page.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                       form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::CACHE_CONTROL, "no-store"),
        // `same-origin`: a login code in a URL never reaches the identity
        // provider in a Referer. (`no-referrer` would also make Chromium
        // send `Origin: null` on our own form posts.)
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        html::STYLE,
    )
        .into_response()
}

// ---- request plumbing -------------------------------------------------------

/// The web shell reads the clock once per step of a request.
pub(crate) fn now() -> UnixMs {
    crate::now_ms()
}

/// The caller's address, as the listener accepted it.
pub(crate) type Conn = Option<Extension<TcpConnectInfo>>;

fn source(conn: &Conn) -> Option<IpAddr> {
    conn.as_ref()
        .and_then(|Extension(c)| c.remote_addr())
        .map(|a| a.ip())
}

pub(crate) fn source_text(conn: &Conn) -> String {
    source(conn)
        .map(|ip| source_key(ip).to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(id: &str) -> (header::HeaderName, String) {
    (
        header::SET_COOKIE,
        format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Lax"),
    )
}

/// A page response, setting the session cookie when it changed.
pub(crate) fn respond(status: StatusCode, set: Option<&str>, body: String) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    if let Some(id) = set {
        let (k, v) = set_cookie(id);
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers_mut().append(k, v);
        }
    }
    r
}

/// A 303 to a local path (after a POST, or to sign in first).
pub(crate) fn redirect(to: &str, set: Option<&str>) -> Response {
    let mut r = respond(StatusCode::SEE_OTHER, set, String::new());
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

pub(crate) fn problem(status: StatusCode, title: &str, msg: &str) -> Response {
    respond(status, None, page(title, &html::error(Some(msg))))
}

/// The admin console's pages (`crate::console`): a place to come back to
/// after signing in.
pub const CONSOLE_PAGES: &[&str] = &[
    "/nodes", "/users", "/keys", "/policy", "/graph", "/audit", "/flows",
];

/// Where to go after signing in: only this site's own pages (an open
/// redirect would hand a login code to another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some("/") | None => "/".into(),
        Some(n) if CONSOLE_PAGES.contains(&n) => n.into(),
        Some(n) => match n
            .strip_prefix("/device?code=")
            .and_then(device::normalize_code)
        {
            Some(code) => format!("/device?code={}", device::display_code(&code)),
            None => "/".into(),
        },
    }
}

/// The session of a request, creating one (and its cookie) if there is none.
#[expect(clippy::disallowed_types, reason = "session ids come from OS entropy")]
fn session_or_new<T>(
    w: &Web,
    conn: &Conn,
    headers: &HeaderMap,
    f: impl FnOnce(&mut Session) -> T,
) -> (T, Option<String>) {
    use rand_core::OsRng;
    let now = now();
    let mut sessions = relock(&w.sessions);
    if let Some(id) = cookie(headers) {
        if let Some(s) = sessions.get(&id, now) {
            return (f(s), None);
        }
    }
    match sessions.create(now, &source_text(conn), &mut OsRng) {
        Some(id) => {
            let s = sessions.get(&id, now).expect("just created");
            (f(s), Some(id))
        }
        // Full of signed-in sessions: serve this request from a throwaway
        // session (its forms will be refused as stale).
        None => {
            let mut throwaway = Sessions::new(1, 1);
            let id = throwaway
                .create(now, "", &mut OsRng)
                .expect("an empty table has room");
            (f(throwaway.get(&id, now).expect("just created")), None)
        }
    }
}

/// Checks a state-changing request: a live session whose CSRF token the
/// form carries, from this site (Origin / Sec-Fetch-Site when sent).
pub(crate) fn check_post(
    w: &Web,
    uri: &Uri,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<String, Response> {
    let stale = |why: &str| {
        tracing::info!(why, "form refused");
        problem(
            StatusCode::FORBIDDEN,
            "Form expired",
            "This form is stale or came from another site. Go back, reload the page and try again.",
        )
    };
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "same-origin" && v != "none")
    {
        return Err(stale("cross-site request"));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        // HTTP/2 carries the authority in the URI (`:authority`), HTTP/1 in Host.
        let ours = uri.authority().map(|a| a.as_str().to_string()).or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let same_site_fetch = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v == "same-origin");
        let same = ours
            .as_deref()
            .is_some_and(|h| origin.strip_prefix("https://") == Some(h))
            || (origin == "null" && same_site_fetch);
        if !same {
            tracing::info!(origin, ours = ?ours, "origin differs");
            return Err(stale("foreign origin"));
        }
    }
    let id = cookie(headers).ok_or_else(|| stale("no session cookie"))?;
    let now = now();
    let mut sessions = relock(&w.sessions);
    let s = sessions
        .get(&id, now)
        .ok_or_else(|| stale("no such session"))?;
    if !s.csrf_ok(csrf) {
        return Err(stale("wrong CSRF token"));
    }
    Ok(id)
}

/// Moves the session to a new id after a change of privilege.
#[expect(clippy::disallowed_types, reason = "session ids come from OS entropy")]
fn rotate(w: &Web, id: &str) -> Option<String> {
    use rand_core::OsRng;
    relock(&w.sessions).rotate(id, now(), &mut OsRng)
}

/// The signed-in user of session `id`, if their credentials have not
/// changed since they signed in (else the session is signed out).
pub(crate) fn current_user(w: &Web, id: &str) -> Option<(String, Role)> {
    let (login, role, stamp) = with_session(w, id, |s| match &s.auth {
        Auth::SignedIn {
            login, role, stamp, ..
        } => Some((login.clone(), *role, *stamp)),
        _ => None,
    })??;
    if w.mesh.credential_stamp(&login) == Some(stamp) {
        return Some((login, role));
    }
    with_session(w, id, |s| s.auth = Auth::Anonymous);
    None
}

pub(crate) fn with_session<T>(w: &Web, id: &str, f: impl FnOnce(&mut Session) -> T) -> Option<T> {
    relock(&w.sessions).get(id, now()).map(f)
}

fn wait_message(ms: i64) -> String {
    format!(
        "Too many attempts. Wait {} s before trying again.",
        (ms + 999) / 1000
    )
}

// ---- pages ----------------------------------------------------------------------

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

async fn home(State(w): State<Arc<Web>>, conn: Conn, headers: HeaderMap) -> Response {
    let (csrf, set) = session_or_new(&w, &conn, &headers, |s| s.csrf.clone());
    let user = cookie(&headers)
        .filter(|_| set.is_none())
        .and_then(|id| current_user(&w, &id));
    let Some((login, role)) = user else {
        return redirect("/login", set.as_deref());
    };
    let body = format!(
        "<p id=\"signed-in\">Signed in as <strong>{}</strong> ({}).</p>\
         <p>To add a device, run <code>ztmesh up --controller URL --fingerprint {}</code> on it \
         and open the link it prints.</p>\
         {}<form method=\"post\" action=\"/logout\">{}<button id=\"sign-out\" class=\"secondary\">Sign out</button></form>",
        esc(&login),
        esc(role.as_str()),
        esc(&w.fingerprint),
        if role.allows(crate::roles::Access::Read) {
            "<p><a id=\"console\" class=\"button\" href=\"/nodes\">Open the admin console</a></p>"
        } else {
            ""
        },
        hidden("csrf", &csrf)
    );
    respond(StatusCode::OK, set.as_deref(), page("ztmesh", &body))
}

fn login_form(sso: bool, csrf: &str, next: &str, login: &str, err: Option<&str>) -> String {
    let sso = if sso {
        format!(
            "<p><a id=\"sso\" class=\"button\" href=\"/oidc/start?next={}\">Sign in with SSO</a></p>\
             <div class=\"sep\"></div><p>Or with a built-in account:</p>",
            esc(&percent(next))
        )
    } else {
        String::new()
    };
    format!(
        "{sso}{}<form id=\"password\" method=\"post\" action=\"/login\">{}{}\
         <label for=\"login\">Login</label>\
         <input type=\"text\" id=\"login\" name=\"login\" autocomplete=\"username\" value=\"{}\" required>\
         <label for=\"password-input\">Password</label>\
         <input type=\"password\" id=\"password-input\" name=\"password\" autocomplete=\"current-password\" required>\
         <button id=\"sign-in\">Sign in</button></form>",
        html::error(err),
        hidden("csrf", csrf),
        hidden("next", next),
        esc(login)
    )
}

async fn login_page(
    State(w): State<Arc<Web>>,
    conn: Conn,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    let ((user, csrf), set) = session_or_new(&w, &conn, &headers, |s| {
        s.next = next.clone();
        (s.user().is_some(), s.csrf.clone())
    });
    if user {
        return redirect(&next, set.as_deref());
    }
    respond(
        StatusCode::OK,
        set.as_deref(),
        page(
            "Sign in",
            &login_form(w.sso.is_some(), &csrf, &next, "", None),
        ),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    csrf: String,
    login: String,
    password: String,
    next: Option<String>,
}

async fn login_post(
    State(w): State<Arc<Web>>,
    conn: Conn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let id = match check_post(&w, &uri, &headers, &f.csrf) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let source = source_text(&conn);
    let login = f.login.trim().to_ascii_lowercase();
    let next = safe_next(f.next.as_deref());
    let actor = format!("web:{source}");
    let refuse = |status: StatusCode, msg: &str| {
        let csrf = with_session(&w, &id, |s| s.csrf.clone()).unwrap_or_default();
        respond(
            status,
            None,
            page(
                "Sign in",
                &login_form(w.sso.is_some(), &csrf, &next, &login, Some(msg)),
            ),
        )
    };
    if login.len() > 254 || f.password.len() > accounts::MAX_PASSWORD {
        return refuse(StatusCode::BAD_REQUEST, "Login or password too long.");
    }
    let creds = match w.mesh.credentials(&login) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reading credentials");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                "The controller could not read its database.",
            );
        }
    };
    // What the audit log names: a known login, never what a stranger typed
    // (it may be a password, or terminal escapes).
    let target = if creds.is_some() {
        login.clone()
    } else {
        format!("unknown:{}", &hex(&sha256(login.as_bytes()))[..12])
    };
    // Back-off per source and per (account, source): guesses from one place
    // are slowed, and nobody elsewhere can keep the owner out.
    let src_key = format!("src:{source}");
    let acct_key = format!("acct:{login}|{source}");
    // At most a few argon2 checks at once (19 MiB each); a request waits a
    // little for its turn, then is told to retry (and is not charged).
    let Ok(Ok(permit)) = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        w.hashing.clone().acquire_owned(),
    )
    .await
    else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "The controller is busy checking other sign-ins. Try again in a moment.",
        );
    };
    let now = self::now();
    let wait = relock(&w.pw_source)
        .check(&src_key, now)
        .and_then(|()| relock(&w.pw_account).check(&acct_key, now));
    if let Err(ms) = wait {
        return refuse(StatusCode::TOO_MANY_REQUESTS, &wait_message(ms));
    }
    // Charged before the (slow) check, so requests racing each other cannot
    // all slip through one window; a match takes the account's charge back.
    let waits = (
        relock(&w.pw_source).fail(&src_key, now),
        relock(&w.pw_account).fail(&acct_key, now),
    );
    let hash = creds
        .as_ref()
        .and_then(|c| c.password_hash.clone())
        .unwrap_or_else(|| accounts::dummy_hash().to_string());
    let pw = f.password.clone();
    // argon2 is deliberately slow (and 19 MiB): off the async workers, at
    // most a few at a time.
    let matched = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        accounts::verify_password(&pw, &hash)
    })
    .await
    .unwrap_or(false)
        && creds.as_ref().is_some_and(|c| c.password_hash.is_some());
    if !matched {
        w.mesh.audit_event(
            now,
            &actor,
            "login.failed",
            &target,
            "wrong login or password",
        );
        if waits.0 > 0 || waits.1 > 0 {
            // Once per step up of the back-off, not per refused attempt.
            w.mesh.audit_event(
                now,
                &actor,
                "login.throttled",
                &target,
                &format!("wait_ms={}", waits.0.max(waits.1)),
            );
        }
        return refuse(StatusCode::UNAUTHORIZED, "Wrong login or password.");
    }
    // The source's count is not cleared: one good password (a colleague
    // behind the same NAT, or the attacker's own account) must not reset
    // the budget of guesses at others' accounts.
    relock(&w.pw_account).succeed(&acct_key);
    let enrolled = creds.is_some_and(|c| c.totp_secret.is_some());
    let stamp = w.mesh.credential_stamp(&login).unwrap_or_default();
    with_session(&w, &id, |s| {
        s.auth = Auth::Password {
            login: login.clone(),
            stamp,
        };
        s.mfa_failures = 0;
        s.next = next;
    });
    let new = rotate(&w, &id);
    redirect(
        if enrolled { "/mfa" } else { "/mfa/enroll" },
        new.as_deref(),
    )
}

/// The login of a session whose password was accepted, else a page that
/// sends the person back to sign in.
fn password_stage(w: &Web, headers: &HeaderMap) -> Result<(String, String, String), Response> {
    let id = cookie(headers).ok_or_else(|| redirect("/login", None))?;
    with_session(w, &id, |s| match &s.auth {
        Auth::Password { login, stamp } => Ok((id.clone(), login.clone(), s.csrf.clone(), *stamp)),
        _ => Err(redirect("/login", None)),
    })
    .unwrap_or_else(|| Err(redirect("/login", None)))
    .and_then(|(id, login, csrf, stamp)| {
        // A password reset (or a deleted user) since ends this stage.
        if w.mesh.credential_stamp(&login) == Some(stamp) {
            Ok((id, login, csrf))
        } else {
            with_session(w, &id, |s| s.auth = Auth::Anonymous);
            Err(redirect("/login", None))
        }
    })
}

/// Signed-in browser sessions one user keeps (the stalest go).
const MAX_SESSIONS_PER_USER: usize = 20;

/// Wrong second-factor codes one password entry allows.
const MAX_MFA_FAILURES: u32 = 10;

/// A second-factor form's POST: checked like every form, from a session
/// whose password was accepted; its id, login and (current) CSRF token.
fn code_post(
    w: &Web,
    uri: &Uri,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(String, String, String), Response> {
    check_post(w, uri, headers, csrf)?;
    password_stage(w, headers)
}

fn mfa_form(csrf: &str, err: Option<&str>) -> String {
    format!(
        "<p>Enter the 6-digit code from your authenticator app, or one of your recovery codes.</p>{}\
         <form id=\"totp\" method=\"post\" action=\"/mfa\">{}\
         <label for=\"code\">Code</label>\
         <input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>\
         <button id=\"verify\">Verify</button></form>",
        html::error(err),
        hidden("csrf", csrf)
    )
}

async fn mfa_page(State(w): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match password_stage(&w, &headers) {
        Ok((_, _, csrf)) => respond(
            StatusCode::OK,
            None,
            page("Two-factor authentication", &mfa_form(&csrf, None)),
        ),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct CodeForm {
    csrf: String,
    code: String,
}

async fn mfa_post(
    State(w): State<Arc<Web>>,
    conn: Conn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<CodeForm>,
) -> Response {
    let (id, login, csrf) = match code_post(&w, &uri, &headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = now();
    let actor = format!("web:{}", source_text(&conn));
    let key = format!("mfa:{login}");
    if let Err(ms) = relock(&w.mfa).check(&key, now) {
        w.mesh.audit_event(
            now,
            &actor,
            "login.throttled",
            &login,
            &format!("second factor, wait_ms={ms}"),
        );
        return respond(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            page(
                "Two-factor authentication",
                &mfa_form(&csrf, Some(&wait_message(ms))),
            ),
        );
    }
    let ok = w
        .mesh
        .use_second_factor(&login, &f.code, now)
        .unwrap_or(false);
    if !ok {
        let wait = relock(&w.mfa).fail(&key, now);
        w.mesh.audit_event(
            now,
            &actor,
            "login.failed",
            &login,
            "wrong or reused second-factor code",
        );
        // Past a few wrong codes the password is asked for again: a holder
        // of the password alone gets no endless stream of code guesses.
        let again = with_session(&w, &id, |s| {
            s.mfa_failures += 1;
            if s.mfa_failures >= MAX_MFA_FAILURES {
                s.auth = Auth::Anonymous;
                true
            } else {
                false
            }
        })
        .unwrap_or(true);
        if again {
            w.mesh.audit_event(
                now,
                &actor,
                "login.mfa-reset",
                &login,
                "too many wrong codes",
            );
            return redirect("/login", None);
        }
        let msg = if wait > 0 {
            format!(
                "That code is wrong or was already used. {}",
                wait_message(wait)
            )
        } else {
            "That code is wrong or was already used.".to_string()
        };
        return respond(
            StatusCode::UNAUTHORIZED,
            None,
            page("Two-factor authentication", &mfa_form(&csrf, Some(&msg))),
        );
    }
    relock(&w.mfa).succeed(&key);
    let via = if f.code.trim().len() == 6 {
        "password+totp"
    } else {
        "password+recovery-code"
    };
    sign_in(&w, &id, &login, via, &actor, now)
}

/// Completes a sign-in: the session is the user's (with their current
/// role and credential stamp), under a new id; audited. Returns where to go
/// next and the new cookie value; `None` when the user no longer exists.
fn complete_sign_in(
    w: &Web,
    id: &str,
    login: &str,
    via: &'static str,
    actor: &str,
    now: UnixMs,
) -> Option<(String, Option<String>)> {
    let (Ok(user), Some(stamp)) = (w.mesh.user(login), w.mesh.credential_stamp(login)) else {
        return None;
    };
    let role = user.role;
    let next = with_session(w, id, |s| {
        s.auth = Auth::SignedIn {
            login: login.to_string(),
            role,
            via,
            stamp,
        };
        s.pending_totp = None;
        s.oidc = None;
        s.next.clone()
    })
    .unwrap_or_else(|| "/".into());
    w.mesh.audit_event(
        now,
        actor,
        "login",
        login,
        &format!("via={via} role={role}"),
    );
    let new = rotate(w, id);
    relock(&w.sessions).limit_user(login, MAX_SESSIONS_PER_USER);
    Some((safe_next(Some(&next)), new))
}

/// [`complete_sign_in`], then on to where the person was going.
fn sign_in(
    w: &Web,
    id: &str,
    login: &str,
    via: &'static str,
    actor: &str,
    now: UnixMs,
) -> Response {
    match complete_sign_in(w, id, login, via, actor, now) {
        Some((next, new)) => redirect(&next, new.as_deref()),
        None => problem(
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "This user no longer exists.",
        ),
    }
}

fn qr_svg_data_uri(uri: &str) -> String {
    let svg = qrcode::QrCode::new(uri.as_bytes())
        .map(|c| {
            c.render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(200, 200)
                .build()
        })
        .unwrap_or_default();
    format!(
        "data:image/svg+xml;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(svg)
    )
}

fn enroll_form(csrf: &str, login: &str, secret: &[u8], err: Option<&str>) -> String {
    let uri = accounts::otpauth_uri("ztmesh", login, secret);
    format!(
        "<p>Your account needs a second factor. Scan this code with an authenticator app \
         (or type the key), then enter the 6-digit code it shows.</p>\
         <p class=\"qr\"><img id=\"qr\" alt=\"TOTP QR code\" src=\"{}\"></p>\
         <p>Key: <code id=\"totp-secret\">{}</code></p>{}\
         <form id=\"totp-enroll\" method=\"post\" action=\"/mfa/enroll\">{}\
         <label for=\"code\">Code</label>\
         <input type=\"text\" id=\"code\" name=\"code\" inputmode=\"numeric\" autocomplete=\"one-time-code\" required>\
         <button id=\"enroll\">Turn on two-factor authentication</button></form>",
        qr_svg_data_uri(&uri),
        esc(&accounts::base32(secret)),
        html::error(err),
        hidden("csrf", csrf)
    )
}

#[expect(clippy::disallowed_types, reason = "TOTP secrets come from OS entropy")]
async fn enroll_page(State(w): State<Arc<Web>>, headers: HeaderMap) -> Response {
    use rand_core::OsRng;
    let (id, login, csrf) = match password_stage(&w, &headers) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if w.mesh
        .credentials(&login)
        .ok()
        .flatten()
        .is_some_and(|c| c.totp_secret.is_some())
    {
        return redirect("/mfa", None);
    }
    let secret = with_session(&w, &id, |s| {
        *s.pending_totp
            .get_or_insert_with(|| accounts::new_totp_secret(&mut OsRng))
    });
    let Some(secret) = secret else {
        return redirect("/login", None);
    };
    respond(
        StatusCode::OK,
        None,
        page(
            "Set up two-factor authentication",
            &enroll_form(&csrf, &login, &secret, None),
        ),
    )
}

#[expect(
    clippy::disallowed_types,
    reason = "recovery codes come from OS entropy"
)]
async fn enroll_post(
    State(w): State<Arc<Web>>,
    conn: Conn,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<CodeForm>,
) -> Response {
    use rand_core::OsRng;
    let (id, login, csrf) = match code_post(&w, &uri, &headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = now();
    let actor = format!("web:{}", source_text(&conn));
    let Some(Some(secret)) = with_session(&w, &id, |s| s.pending_totp) else {
        return redirect("/mfa/enroll", None);
    };
    if w.mesh
        .credentials(&login)
        .ok()
        .flatten()
        .is_some_and(|c| c.totp_secret.is_some())
    {
        // Enrolled meanwhile (another tab): never overwrite a factor here.
        return redirect("/mfa", None);
    }
    let key = format!("mfa:{login}");
    if let Err(ms) = relock(&w.mfa).check(&key, now) {
        return respond(
            StatusCode::TOO_MANY_REQUESTS,
            None,
            page(
                "Set up two-factor authentication",
                &enroll_form(&csrf, &login, &secret, Some(&wait_message(ms))),
            ),
        );
    }
    let Some(step) = accounts::check_totp(&secret, &f.code, now, 0) else {
        relock(&w.mfa).fail(&key, now);
        w.mesh
            .audit_event(now, &actor, "mfa.enroll-failed", &login, "wrong code");
        return respond(
            StatusCode::UNAUTHORIZED,
            None,
            page(
                "Set up two-factor authentication",
                &enroll_form(
                    &csrf,
                    &login,
                    &secret,
                    Some("That code is wrong. Check the time on your phone and try the next code."),
                ),
            ),
        );
    };
    let codes = match w.mesh.enroll_totp(&login, &secret, step, &mut OsRng, now) {
        Ok(c) => c,
        // Enrolled meanwhile (another browser): sign in with that one.
        Err(crate::error::Error::Conflict(_)) => return redirect("/mfa", None),
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                &format!("Could not save the second factor: {e}"),
            )
        }
    };
    relock(&w.mfa).succeed(&key);
    // Signed in now; the recovery codes are shown this once, on this
    // response (never stored in clear, never shown again).
    let Some((next, new)) = complete_sign_in(&w, &id, &login, "password+totp", &actor, now) else {
        return problem(
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "This user no longer exists.",
        );
    };
    let list: String = codes
        .iter()
        .map(|c| format!("<li>{}</li>", esc(c)))
        .collect();
    let body = format!(
        "<p>Two-factor authentication is on. Keep these recovery codes somewhere safe: each \
         signs you in once if you lose your phone. They are shown only now.</p>\
         <ul id=\"recovery-codes\">{list}</ul>\
         <p><a id=\"continue\" class=\"button\" href=\"{}\">Continue</a></p>",
        esc(&next)
    );
    respond(
        StatusCode::OK,
        new.as_deref(),
        page("Recovery codes", &body),
    )
}

#[derive(Deserialize)]
struct CodeQuery {
    code: Option<String>,
}

fn device_unknown() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "Unknown code",
        "This login code is unknown, expired or already used, or the device stopped waiting. \
         Run `ztmesh up` on the device again for a new one.",
    )
}

async fn device_page(
    State(w): State<Arc<Web>>,
    conn: Conn,
    headers: HeaderMap,
    Query(q): Query<CodeQuery>,
) -> Response {
    let Some(code) = q.code.as_deref().and_then(device::normalize_code) else {
        return device_unknown();
    };
    let next = format!("/device?code={}", device::display_code(&code));
    let (csrf, set) = session_or_new(&w, &conn, &headers, |s| s.csrf.clone());
    let user = cookie(&headers)
        .filter(|_| set.is_none())
        .and_then(|id| current_user(&w, &id));
    let Some((login, _)) = user else {
        return redirect(&format!("/login?next={}", percent(&next)), set.as_deref());
    };
    let now = now();
    let src = format!("user:{login}");
    if let Err(ms) = relock(&w.codes).check(&src, now) {
        return problem(
            StatusCode::TOO_MANY_REQUESTS,
            "Slow down",
            &wait_message(ms),
        );
    }
    let Some((code, claim, os, from)) = w.hub.peek(&code, now) else {
        relock(&w.codes).fail(&src, now);
        w.mesh.audit_event(
            now,
            &format!("user:{login}"),
            "device.unknown-code",
            &login,
            "",
        );
        return device_unknown();
    };
    let fp = fingerprint_of(&claim.machine_key);
    let body = format!(
        "<p>A device asks to join the network as <strong id=\"owner\">{}</strong>. Approve it only \
         if you just ran <code>ztmesh up</code> on it and it shows code <strong id=\"code\">{}</strong>.</p>\
         <dl><dt>Hostname</dt><dd id=\"hostname\">{}</dd>\
         <dt>Operating system</dt><dd id=\"os\">{}</dd>\
         <dt>Machine key</dt><dd id=\"fingerprint\">{}</dd>\
         <dt>Connecting from</dt><dd id=\"source\">{}</dd></dl>\
         <form id=\"confirm\" method=\"post\" action=\"/device\">{}{}\
         <button id=\"approve\" name=\"action\" value=\"approve\">Approve this device</button> \
         <button id=\"deny\" class=\"secondary\" name=\"action\" value=\"deny\">Deny</button></form>",
        esc(&login),
        esc(&device::display_code(&code)),
        esc(&claim.hostname),
        esc(&os),
        esc(&fp),
        esc(&from),
        hidden("csrf", &csrf),
        hidden("code", &code)
    );
    respond(
        StatusCode::OK,
        set.as_deref(),
        page("Confirm device", &body),
    )
}

/// A short, comparable form of a machine key: SHA-256, first 16 bytes.
fn fingerprint_of(key: &[u8; 32]) -> String {
    hex(&sha256(key)[..16])
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

pub(crate) fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct DeviceForm {
    csrf: String,
    code: String,
    action: String,
}

async fn device_post(
    State(w): State<Arc<Web>>,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<DeviceForm>,
) -> Response {
    let id = match check_post(&w, &uri, &headers, &f.csrf) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some((login, _)) = current_user(&w, &id) else {
        return redirect("/login", None);
    };
    let now = now();
    let actor = format!("user:{login}");
    let src = format!("user:{login}");
    if let Err(ms) = relock(&w.codes).check(&src, now) {
        return problem(
            StatusCode::TOO_MANY_REQUESTS,
            "Slow down",
            &wait_message(ms),
        );
    }
    let Some(p) = w.hub.take(&f.code, now) else {
        relock(&w.codes).fail(&src, now);
        w.mesh
            .audit_event(now, &actor, "device.unknown-code", &login, "confirmation");
        return device_unknown();
    };
    if f.action != "approve" {
        w.mesh.audit_event(
            now,
            &actor,
            "device.deny",
            &p.claim.hostname,
            &format!("from={}", p.source),
        );
        let _ = p.waiter.send(Err(format!("{login} denied this device")));
        return respond(
            StatusCode::OK,
            None,
            page(
                "Device denied",
                "<p id=\"result\">Device denied. It was not added.</p>",
            ),
        );
    }
    match w.mesh.enroll_device(&login, &p.claim, now) {
        Ok(done) => {
            let what = if done.reauth {
                "signed in again"
            } else {
                "added"
            };
            let body = format!(
                "<p id=\"result\">Device approved: <strong>{}</strong> ({}) {what}. You can close this page.</p>",
                esc(&done.node.name),
                esc(&done.node.ipv4.to_string())
            );
            if p.waiter.send(Ok(done.response)).is_err() {
                tracing::info!(node = %done.node.name, "the device stopped waiting after its approval");
            }
            respond(StatusCode::OK, None, page("Device approved", &body))
        }
        Err(e) => {
            w.mesh.audit_event(
                now,
                &actor,
                "device.refused",
                &p.claim.hostname,
                &e.to_string(),
            );
            let _ = p.waiter.send(Err(e.to_string()));
            problem(StatusCode::CONFLICT, "Device not added", &e.to_string())
        }
    }
}

#[expect(
    clippy::disallowed_types,
    reason = "state, nonce and PKCE verifier come from OS entropy"
)]
async fn oidc_start(
    State(w): State<Arc<Web>>,
    conn: Conn,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    use rand_core::OsRng;
    let Some(sso) = &w.sso else {
        return problem(
            StatusCode::NOT_FOUND,
            "No SSO",
            "Single sign-on is not configured on this controller.",
        );
    };
    let provider = match sso.provider() {
        Ok(p) => p,
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "SSO unavailable",
                &format!("The identity provider cannot be reached right now ({e}). Try again in a minute, or use a built-in account."),
            )
        }
    };
    // Only from this site's own sign-in page: a link elsewhere must not
    // start (or overwrite) a sign-in in this browser.
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v != "same-origin" && v != "none")
    {
        return respond(
            StatusCode::FORBIDDEN,
            None,
            page(
                "Sign in",
                "<p id=\"error\" class=\"error\">Single sign-on starts from this controller's own sign-in page.</p>\
                 <p><a id=\"again\" href=\"/login\">Go to the sign-in page</a></p>",
            ),
        );
    }
    let next = safe_next(q.next.as_deref());
    let (url, req) = provider.begin(&mut OsRng);
    let ((), set) = session_or_new(&w, &conn, &headers, |s| {
        s.next = next;
        s.oidc = Some(req);
    });
    redirect(&url, set.as_deref())
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The provider sends the browser back here. Whatever the outcome, the
/// session's pending request is used up (a reload or a replayed callback
/// URL finds none), and success answers with a redirect away, so the code
/// never sits in the address bar to be reloaded.
async fn oidc_callback(
    State(w): State<Arc<Web>>,
    conn: Conn,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let now = now();
    let actor = format!("web:{}", source_text(&conn));
    let refuse = |status: StatusCode, reason: &str, msg: &str| {
        w.mesh.audit_event(
            now,
            &actor,
            "login.failed",
            "sso",
            &format!("reason={reason}"),
        );
        respond(
            status,
            None,
            page(
                "Sign-in refused",
                &format!(
                    "{}<p><a id=\"again\" href=\"/login\">Start again</a></p>",
                    html::error(Some(msg))
                ),
            ),
        )
    };
    let Some(sso) = w.sso.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "No SSO",
            "Single sign-on is not configured on this controller.",
        );
    };
    // Each callback may call the provider: a few at a time.
    let Ok(_permit) = w.callbacks.clone().try_acquire_owned() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "The controller is busy finishing other sign-ins. Reload this page in a moment.",
        );
    };
    let id = cookie(&headers);
    let pending = id
        .as_deref()
        .and_then(|id| with_session(&w, id, |s| s.oidc.take()))
        .flatten();
    let (Some(id), Some(req)) = (id, pending) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "state-mismatch",
            "No sign-in was started in this browser, or this sign-in response was already used. Start again.",
        );
    };
    let provider = match sso.provider() {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "discovery", &e),
    };
    let cb = Callback {
        code: q.code,
        state: q.state,
        error: q.error,
        error_description: q.error_description,
    };
    let identity = match provider.finish(&req, &cb, now).await {
        Ok(i) => i,
        Err(e) => {
            let status = match e.reason() {
                "http" | "discovery" => StatusCode::BAD_GATEWAY,
                "mfa-required" | "domain-refused" | "group-refused" | "email-unverified" => {
                    StatusCode::FORBIDDEN
                }
                _ => StatusCode::BAD_REQUEST,
            };
            return refuse(status, e.reason(), &e.to_string());
        }
    };
    let user = match w.mesh.sso_user(
        &identity.issuer,
        &identity.subject,
        identity.email.as_deref(),
        sso.create_users,
        now,
    ) {
        Ok(u) => u,
        Err(e) => return refuse(StatusCode::FORBIDDEN, "no-user", &e.to_string()),
    };
    sign_in(&w, &id, &user.login, "sso", &actor, now)
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(w): State<Arc<Web>>,
    uri: Uri,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let id = match check_post(&w, &uri, &headers, &f.csrf) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if let Some(Some((login, _))) =
        with_session(&w, &id, |s| s.user().map(|(l, r)| (l.to_string(), r)))
    {
        w.mesh
            .audit_event(now(), &format!("user:{login}"), "logout", &login, "");
    }
    relock(&w.sessions).remove(&id);
    let mut r = redirect("/login", None);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_only_ever_points_at_our_own_pages() {
        assert_eq!(safe_next(None), "/");
        assert_eq!(
            safe_next(Some("/device?code=bcdf-ghjk")),
            "/device?code=BCDF-GHJK"
        );
        for evil in [
            "https://evil.example",
            "//evil.example/device?code=BCDFGHJK",
            "/\\evil.example",
            "/device?code=BCDFGHJK&x=https://evil.example",
            "/device?code=AAAAAAAA",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_next(Some(evil)), "/", "{evil}");
        }
    }

    #[test]
    fn cookies_are_found_among_others_and_set_host_only_and_secure() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-ztmesh=abc; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        let (_, v) = set_cookie("xyz");
        assert_eq!(
            v,
            "__Host-ztmesh=xyz; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
    }
}
