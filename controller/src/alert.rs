//! Alerts: each detection that alerts is POSTed as JSON to the webhook,
//! signed, and retried with backoff.
//!
//! The receiver checks `X-Ztmesh-Signature: v1=HEX`, HEX being
//! HMAC-SHA256 under the shared secret of `TIMESTAMP "." BODY`, with
//! TIMESTAMP the `X-Ztmesh-Timestamp` header (Unix seconds): the body
//! cannot be altered, and a receiver that refuses old timestamps refuses
//! replays. `X-Ztmesh-Detection` carries the detection id, so a retry
//! after a lost answer can be recognised.
//!
//! [`signature`] and [`backoff`] are pure; [`spawn`] is the shell.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::{mpsc, Semaphore};

use crate::store::Store;

/// An alert for the webhook: the detection's id and its body (signed when sent).
#[derive(Clone, Debug)]
pub struct AlertJob {
    pub detection: u64,
    pub body: Vec<u8>,
}

/// Attempts per alert (the first and the retries).
pub const MAX_ATTEMPTS: u32 = 6;
/// Alerts queued for the webhook before new ones fail.
pub const QUEUE: usize = 256;
/// Alerts in flight at once.
const CONCURRENT: usize = 8;
/// One attempt's time limit.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Where alerts go.
#[derive(Clone)]
pub struct Webhook {
    pub url: reqwest::Url,
    /// The HMAC key (from a 0600 file; never logged).
    pub secret: Vec<u8>,
    /// Extra CA certificates for an https receiver.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url.as_str())
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `v1=` and the hex HMAC-SHA256 of `TIMESTAMP.BODY` under `secret`.
pub fn signature(secret: &[u8], timestamp_s: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(3 + tag.len() * 2);
    hex.push_str("v1=");
    for b in tag {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// The wait before attempt `n` (1-based; the first is immediate): 1 s, 2 s,
/// 4 s, … capped at 60 s.
pub fn backoff(attempt: u32) -> Duration {
    match attempt {
        0 | 1 => Duration::ZERO,
        n => Duration::from_secs((1u64 << (n - 2).min(6)).min(60)),
    }
}

/// Whether an HTTP status is worth retrying: server errors, 408, 429.
pub fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// Starts the webhook task; returns the queue the mesh sends alerts to.
///
/// # Errors
/// The https client cannot be set up (CA file).
pub fn spawn(hook: Webhook, store: Arc<dyn Store>) -> Result<mpsc::Sender<AlertJob>, String> {
    let client = crate::httpclient::client(hook.ca_file.as_deref(), TIMEOUT)?;
    let host = hook.url.host_str().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if hook.url.scheme() == "http" && !loopback {
        tracing::warn!(
            "--alert-webhook is plain http to a remote host: alerts and their evidence cross the network in clear (use https)"
        );
    }
    // Alerts pending when the controller last stopped were lost with its
    // queue (all of them: paged, newest first).
    let mut before = None;
    loop {
        let rows = match store.detections(500, before) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the detections");
                break;
            }
        };
        for d in rows.iter().filter(|d| d.alert == "pending") {
            if let Err(e) = store.set_detection_alert(d.id, "failed: controller restarted") {
                tracing::error!(error = %e, "cannot record the alert state");
            }
        }
        match rows.last() {
            Some(last) if rows.len() == 500 => before = Some(last.id),
            _ => break,
        }
    }
    let (tx, mut rx) = mpsc::channel::<AlertJob>(QUEUE);
    let hook = Arc::new(hook);
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (client, hook, store) = (client.clone(), hook.clone(), store.clone());
            tokio::spawn(async move {
                let state = deliver(&client, &hook, &job).await;
                if let Err(e) = store.set_detection_alert(job.detection, &state) {
                    tracing::error!(error = %e, "cannot record the alert state");
                }
                drop(permit);
            });
        }
    });
    Ok(tx)
}

/// Sends one alert until it is accepted, refused for good, or out of
/// attempts; returns the state to record.
async fn deliver(client: &reqwest::Client, hook: &Webhook, job: &AlertJob) -> String {
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        tokio::time::sleep(backoff(attempt)).await;
        let ts = ztmesh_proto::time::now_ms() / 1000;
        let sent = client
            .post(hook.url.clone())
            .header("content-type", "application/json")
            .header("x-ztmesh-timestamp", ts.to_string())
            .header("x-ztmesh-signature", signature(&hook.secret, ts, &job.body))
            .header("x-ztmesh-detection", job.detection.to_string())
            .body(job.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(detection = job.detection, attempt, "alert delivered");
                return "sent".into();
            }
            Ok(r) => {
                let code = r.status().as_u16();
                last = format!("HTTP {code}");
                if !retryable(code) {
                    break;
                }
            }
            // Without the URL: a webhook's path often holds a token.
            Err(e) => last = crate::httpclient::error_chain(&e.without_url()),
        }
        tracing::warn!(detection = job.detection, attempt, error = %last, "alert not delivered");
    }
    let mut state = format!("failed: {last}");
    if state.len() > 200 {
        let mut end = 200;
        while !state.is_char_boundary(end) {
            end -= 1;
        }
        state.truncate(end);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 shape: key "Jefe"; the message is "1.x".
        let s = signature(b"Jefe", 1, b"x");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1.x");
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(s, format!("v1={want}"));
        assert_ne!(s, signature(b"Jefe", 2, b"x"), "the timestamp is signed");
        assert_ne!(s, signature(b"Jefe", 1, b"y"), "the body is signed");
        assert_ne!(s, signature(b"jefe", 1, b"x"), "the key matters");
    }

    #[test]
    fn backoff_doubles_from_one_second_and_is_capped() {
        let waits: Vec<u64> = (1..=MAX_ATTEMPTS).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, vec![0, 1, 2, 4, 8, 16]);
        assert_eq!(backoff(40), Duration::from_secs(60));
        assert!(retryable(503) && retryable(429) && retryable(408));
        assert!(!retryable(400) && !retryable(401) && !retryable(404));
    }
}
