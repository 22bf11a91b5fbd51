//! The daemon's local API: one JSON request and one JSON response per line
//! over a unix socket (root-only unless a group is configured), and who may
//! send which request ([`authorize`], pure).

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
        timeout_ms: u64,
        /// Routing and DNS flags (`--advertise-routes`, `--exit-node` …).
        #[serde(default)]
        prefs: crate::routing::PrefsUpdate,
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

/// Longest request line accepted (auth keys and URLs are short).
pub const MAX_LINE: usize = 16 * 1024;

/// Sends one request to the daemon at `socket` and reads its response.
///
/// # Errors
/// The daemon is not running, or answered garbage.
pub async fn call(socket: &std::path::Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the ztmesh daemon at {} (is `ztmesh daemon` running? use --socket)",
                socket.display()
            )
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    let mut reader = BufReader::new(r);
    let mut resp = String::new();
    reader.read_line(&mut resp).await?;
    serde_json::from_str(&resp).context("daemon sent an invalid response")
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
