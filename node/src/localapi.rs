//! The daemon's local API: one JSON request and one JSON response per line
//! over a unix socket (root-only unless a group is configured).

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
    },
    Down,
    Logout,
    Status,
    WgConfig {
        include_private_key: bool,
    },
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
