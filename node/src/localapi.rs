//! The daemon's local API over a unix socket (root-only unless a group is
//! configured), and who may send which request ([`authorize`], pure).
//!
//! **Framing.** The client sends one JSON [`Request`] on one line. The
//! daemon answers with exactly one JSON [`Response`] line (it always has an
//! `"ok"` member) and closes. A request may ask for progress (`up` with
//! `"progress": true`): then the daemon may send any number of progress
//! lines first, JSON objects with a `"progress"` member naming the kind and
//! never an `"ok"` member, e.g. `{"progress":"login","url":..,"code":..,
//! "expires_ms":..,"fingerprint":..}` ([`Progress`]). A client reads lines
//! until the one with `"ok"` and skips progress kinds it does not know
//! ([`read_line`]); a client that does not ask gets the single response line
//! as before. While a request runs, the daemon takes the client closing its
//! end as "cancel" (an interactive login stops waiting).

use serde::{Deserialize, Serialize};

/// A CLI request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Enroll if needed, connect, and answer once the first netmap is applied.
    Up {
        controller: Option<String>,
        auth_key: Option<String>,
        hostname: Option<String>,
        /// Bounds enrollment with an auth key and the wait for the first map.
        timeout_ms: u64,
        /// Routing and DNS flags (`--advertise-routes`, `--exit-node` …).
        #[serde(default)]
        prefs: crate::routing::PrefsUpdate,
        /// The controller's certificate fingerprint (hex, see
        /// [`crate::control::login::parse_fingerprint_arg`]): the pin for an
        /// interactive login, which has no auth key to carry it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fingerprint: Option<String>,
        /// Bounds the wait for a person to sign in (`timeout_ms` if absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        login_timeout_ms: Option<u64>,
        /// Re-authenticate an enrolled node whose key has not expired.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force_reauth: bool,
        /// The client reads [`Progress`] lines before the response.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        progress: bool,
    },
    Down,
    Logout,
    Status,
    WgConfig {
        include_private_key: bool,
    },
}

impl Request {
    /// The CLI command this request comes from, for messages.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Up { .. } => "up",
            Request::Down => "down",
            Request::Logout => "logout",
            Request::Status => "status",
            Request::WgConfig {
                include_private_key: true,
            } => "wg-config --include-private-key",
            Request::WgConfig { .. } => "wg-config",
        }
    }

    /// Whether the request changes the node or reveals a secret: `up` (it can
    /// enroll the machine with a controller), `down`, `logout`, and the
    /// private key. Everything else only reads what `status` shows.
    pub fn is_privileged(&self) -> bool {
        match self {
            Request::Up { .. } | Request::Down | Request::Logout => true,
            Request::WgConfig {
                include_private_key,
            } => *include_private_key,
            Request::Status => false,
        }
    }
}

/// Who is on the other end of the socket, as the kernel reports it
/// (`SO_PEERCRED`, `SO_PEERGROUPS`), never as the client claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Primary and supplementary groups.
    pub gids: Vec<u32>,
}

/// Decides whether `caller` may send `req`: privileged requests need uid 0
/// or membership of `operator_gid`. Pure.
///
/// # Errors
/// A one-line "permission denied" message naming what is required.
pub fn authorize(req: &Request, caller: &Caller, operator_gid: Option<u32>) -> Result<(), String> {
    if !req.is_privileged()
        || caller.uid == 0
        || operator_gid.is_some_and(|g| caller.gids.contains(&g))
    {
        return Ok(());
    }
    let who = match operator_gid {
        Some(g) => format!("root or group {g}"),
        None => "root (no --operator-group is configured)".to_string(),
    };
    Err(format!(
        "permission denied: `{}` requires {who}; uid {} may only read status",
        req.command(),
        caller.uid
    ))
}

/// The daemon's answer: `ok` plus a payload, or an error line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: String::new(),
            data,
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            error: e.to_string(),
            data: serde_json::Value::Null,
        }
    }
}

/// A line the daemon sends before its [`Response`] while a request runs
/// (only to a client that asked, see the module's framing).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "progress", rename_all = "kebab-case")]
pub enum Progress {
    /// An interactive login waits for a person: open `url`, compare `code`
    /// (valid until `expires_ms`, Unix ms) and check that the browser shows
    /// the controller's certificate `fingerprint` (`SHA256:` hex).
    Login {
        url: String,
        code: String,
        expires_ms: i64,
        fingerprint: String,
    },
}

/// One line from the daemon, as a client reads it.
#[derive(Debug, Clone)]
pub enum Line {
    /// A progress line of a kind this client knows.
    Progress(Progress),
    /// A progress line of a kind this client does not know: skipped.
    Unknown,
    /// The response: the last line.
    Response(Response),
}

/// A daemon line that is neither a response nor a progress line.
#[derive(Debug, thiserror::Error)]
#[error("daemon sent an invalid response: {0}")]
pub struct BadLine(String);

/// Longest request line accepted (auth keys and URLs are short).
pub const MAX_LINE: usize = 16 * 1024;
/// Most progress lines a client reads before the response (a daemon that
/// sends more is broken).
pub const MAX_PROGRESS_LINES: usize = 64;

/// Parses one line from the daemon (see the module's framing). Pure.
///
/// # Errors
/// [`BadLine`]: not JSON, or an object with neither `"ok"` nor `"progress"`.
pub fn read_line(line: &str) -> Result<Line, BadLine> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| BadLine(e.to_string()))?;
    if v.get("ok").is_some() {
        return serde_json::from_value(v)
            .map(Line::Response)
            .map_err(|e| BadLine(e.to_string()));
    }
    if !v.get("progress").is_some_and(serde_json::Value::is_string) {
        return Err(BadLine("neither a response nor a progress line".into()));
    }
    Ok(serde_json::from_value(v).map_or(Line::Unknown, Line::Progress))
}

/// One JSON line (a request, a progress line or a response), newline ended.
///
/// # Errors
/// Serialisation failures (none for these types in practice).
pub fn to_line(v: &impl Serialize) -> serde_json::Result<String> {
    let mut line = serde_json::to_string(v)?;
    line.push('\n');
    Ok(line)
}

/// Sends one request to the daemon at `socket` and reads its response.
///
/// # Errors
/// The daemon is not running, or answered garbage.
pub async fn call(socket: &std::path::Path, req: &Request) -> anyhow::Result<Response> {
    call_with_progress(socket, req, |_| {}).await
}

/// Sends one request to the daemon at `socket`, hands each progress line
/// to `on_progress` as it arrives, and returns the response.
///
/// # Errors
/// The daemon is not running, or answered garbage.
pub async fn call_with_progress(
    socket: &std::path::Path,
    req: &Request,
    on_progress: impl FnMut(Progress),
) -> anyhow::Result<Response> {
    use anyhow::Context;
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the ztmesh daemon at {} (is `ztmesh daemon` running? use --socket)",
                socket.display()
            )
        })?;
    exchange(stream, req, on_progress).await
}

/// [`call_with_progress`] over an established connection.
///
/// # Errors
/// The connection fails or the daemon answers garbage.
pub async fn exchange(
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite,
    req: &Request,
    mut on_progress: impl FnMut(Progress),
) -> anyhow::Result<Response> {
    use anyhow::bail;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(to_line(req)?.as_bytes()).await?;
    let mut reader = BufReader::new(r);
    for _ in 0..=MAX_PROGRESS_LINES {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the daemon closed the connection without answering");
        }
        match read_line(&line)? {
            Line::Response(resp) => return Ok(resp),
            Line::Progress(p) => on_progress(p),
            Line::Unknown => {}
        }
    }
    bail!("the daemon sent more than {MAX_PROGRESS_LINES} progress lines without answering")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_requests_need_root_or_the_operator_group() {
        let up = Request::Up {
            controller: None,
            auth_key: None,
            hostname: None,
            timeout_ms: 1000,
            prefs: Default::default(),
            fingerprint: None,
            login_timeout_ms: None,
            force_reauth: false,
            progress: false,
        };
        let secret = Request::WgConfig {
            include_private_key: true,
        };
        let public = Request::WgConfig {
            include_private_key: false,
        };
        let root = Caller {
            uid: 0,
            gids: vec![0],
        };
        let user = Caller {
            uid: 1000,
            gids: vec![1000, 27],
        };
        let operator = Caller {
            uid: 1001,
            gids: vec![1001, 900],
        };
        let cases: [(&Request, &Caller, Option<u32>, bool); 14] = [
            (&Request::Status, &user, None, true),
            (&public, &user, None, true),
            (&Request::Down, &user, None, false),
            (&Request::Logout, &user, Some(900), false),
            (&secret, &user, Some(900), false),
            (&up, &user, Some(900), false),
            (&Request::Down, &operator, Some(900), true),
            (&Request::Logout, &operator, Some(900), true),
            (&secret, &operator, Some(900), true),
            (&up, &operator, Some(900), true),
            (&Request::Down, &operator, None, false),
            (&Request::Down, &root, None, true),
            (&secret, &root, Some(900), true),
            (&Request::Status, &root, None, true),
        ];
        for (req, caller, group, allowed) in cases {
            let got = authorize(req, caller, group);
            assert_eq!(
                got.is_ok(),
                allowed,
                "{req:?} by {caller:?} with {group:?}: {got:?}"
            );
        }
        let msg = authorize(&secret, &user, Some(900)).unwrap_err();
        assert!(
            msg.starts_with(
                "permission denied: `wg-config --include-private-key` requires root or group 900"
            ),
            "{msg}"
        );
        assert!(authorize(&Request::Down, &user, None)
            .unwrap_err()
            .contains("requires root"));
    }
}

#[cfg(test)]
mod framing {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    fn login() -> Progress {
        Progress::Login {
            url: "https://198.18.0.1:8443/device?code=WXYZ-1234".into(),
            code: "WXYZ-1234".into(),
            expires_ms: 1_800_000_600_000,
            fingerprint: format!("SHA256:{}", "ab".repeat(32)),
        }
    }

    fn up(progress: bool) -> Request {
        Request::Up {
            controller: Some("https://198.18.0.1:8443".into()),
            auth_key: None,
            hostname: None,
            timeout_ms: 30_000,
            prefs: Default::default(),
            fingerprint: Some("ab".repeat(32)),
            login_timeout_ms: Some(600_000),
            force_reauth: false,
            progress,
        }
    }

    #[test]
    fn progress_lines_have_a_kind_and_never_ok() {
        let line = to_line(&login()).unwrap();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["progress"], "login");
        assert_eq!(v["code"], "WXYZ-1234");
        assert_eq!(v["expires_ms"], 1_800_000_600_000_i64);
        assert!(
            v.get("ok").is_none(),
            "an old client must not take it for a response"
        );
        assert!(matches!(read_line(&line), Ok(Line::Progress(p)) if p == login()));
    }

    #[test]
    fn a_client_skips_progress_it_does_not_know_and_refuses_garbage() {
        let newer = r#"{"progress":"posture","checks":3}"#;
        assert!(matches!(read_line(newer), Ok(Line::Unknown)));
        let resp = to_line(&Response::ok(serde_json::json!({"enrolled": true}))).unwrap();
        assert!(matches!(read_line(&resp), Ok(Line::Response(r)) if r.ok));
        let err = to_line(&Response::err("nope")).unwrap();
        assert!(matches!(read_line(&err), Ok(Line::Response(r)) if !r.ok && r.error == "nope"));
        for bad in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"progress":7}"#,
            r#"{"ok":"yes"}"#,
            r#"{"data":1}"#,
        ] {
            assert!(read_line(bad).is_err(), "{bad:?}");
        }
        // A known kind with a malformed body is skipped, not fatal.
        assert!(matches!(
            read_line(r#"{"progress":"login","url":1}"#),
            Ok(Line::Unknown)
        ));
    }

    #[test]
    fn requests_from_older_clients_still_parse_and_new_fields_are_omitted_when_unset() {
        let old = r#"{"cmd":"up","controller":"https://198.18.0.1:8443","auth_key":"k","hostname":null,"timeout_ms":30000}"#;
        let Request::Up {
            fingerprint,
            login_timeout_ms,
            force_reauth,
            progress,
            timeout_ms,
            ..
        } = serde_json::from_str(old).unwrap()
        else {
            panic!("an up request");
        };
        assert_eq!(
            (
                fingerprint,
                login_timeout_ms,
                force_reauth,
                progress,
                timeout_ms
            ),
            (None, None, false, false, 30_000)
        );
        let mut plain = up(false);
        if let Request::Up {
            fingerprint,
            login_timeout_ms,
            ..
        } = &mut plain
        {
            *fingerprint = None;
            *login_timeout_ms = None;
        }
        let text = serde_json::to_string(&plain).unwrap();
        for absent in [
            "fingerprint",
            "login_timeout_ms",
            "force_reauth",
            "progress",
        ] {
            assert!(!text.contains(absent), "{text}");
        }
        let again: Request =
            serde_json::from_str(&serde_json::to_string(&up(true)).unwrap()).unwrap();
        assert_eq!(again, up(true));
    }

    /// Both directions over a real byte stream: the daemon's side writes
    /// progress then the response; a new client sees the progress first, an
    /// old client (one line, no progress asked) gets its response alone.
    #[tokio::test]
    async fn progress_reaches_a_new_client_before_the_response() {
        let (client, server) = tokio::io::duplex(4096);
        let daemon = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(server);
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            let req: Request = serde_json::from_str(&line).unwrap();
            assert_eq!(req, up(true));
            w.write_all(to_line(&login()).unwrap().as_bytes())
                .await
                .unwrap();
            w.write_all(b"{\"progress\":\"from-the-future\"}\n")
                .await
                .unwrap();
            let resp = Response::ok(serde_json::json!({"self": {"name": "laptop"}}));
            w.write_all(to_line(&resp).unwrap().as_bytes())
                .await
                .unwrap();
        });
        let mut seen = Vec::new();
        let resp = exchange(client, &up(true), |p| seen.push(p)).await.unwrap();
        daemon.await.unwrap();
        assert_eq!(seen, [login()]);
        assert!(resp.ok);
        assert_eq!(resp.data["self"]["name"], "laptop");
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_or_floods_progress_is_an_error() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let daemon = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(server);
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            w.write_all(to_line(&login()).unwrap().as_bytes())
                .await
                .unwrap();
        });
        let err = exchange(client, &up(true), |_| {}).await.unwrap_err();
        assert!(err.to_string().contains("without answering"), "{err}");
        daemon.await.unwrap();

        let (client, server) = tokio::io::duplex(1 << 20);
        let daemon = tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(server);
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            for _ in 0..=MAX_PROGRESS_LINES {
                let _ = w.write_all(to_line(&login()).unwrap().as_bytes()).await;
            }
            let _ = w
                .write_all(
                    to_line(&Response::ok(serde_json::Value::Null))
                        .unwrap()
                        .as_bytes(),
                )
                .await;
        });
        let mut n = 0;
        let err = exchange(client, &up(true), |_| n += 1).await.unwrap_err();
        assert!(
            err.to_string().contains("more than 64 progress lines"),
            "{err}"
        );
        assert_eq!(n, MAX_PROGRESS_LINES + 1);
        daemon.abort();
    }
}
