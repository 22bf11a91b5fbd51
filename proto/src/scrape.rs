//! The `/metrics` listener the controller and the node both run: plain
//! HTTP/1.1, `GET /metrics` only, one request per connection.
//!
//! A scraper that accepts OpenMetrics (Prometheus does) gets OpenMetrics;
//! any other client gets the Prometheus text format 0.0.4 (what
//! `promtool check metrics` and `curl` users read), the same metrics.
//!
//! A thin shell: [`serve`] owns the socket and the timers; what a request
//! head asks for ([`route`]) and the response bytes ([`response`]) are pure.
//! Bounded against a hostile or broken scraper: at most
//! [`MAX_CONNECTIONS`] at once (more are closed unanswered), a request head
//! of at most [`MAX_HEAD`] bytes, a connection lives at most
//! [`CONNECTION_TIMEOUT`], and request bodies are never read.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The OpenMetrics text exposition format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text exposition format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which exposition format a scrape gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }
}
/// Longest request head read; a longer one is answered 431.
pub const MAX_HEAD: usize = 8192;
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection is closed this long after it was accepted, answered or not.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The request head must arrive within this long (a scraper sends it at
/// once): idle connections cannot hold the slots for long.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (a query string is ignored), in this format.
    Metrics(Format),
    /// Another path.
    NotFound,
    /// Another method on `/metrics`.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
    /// No end of the head within [`MAX_HEAD`] bytes.
    HeadTooLarge,
}

/// Decides a request from its head (the bytes up to the blank line).
pub fn route(head: &[u8]) -> Route {
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => Route::Metrics(format_of(head)),
        (_, "/metrics") => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// OpenMetrics if an `Accept` header names it, else the text format.
fn format_of(head: &[u8]) -> Format {
    let text = String::from_utf8_lossy(head);
    let accepts_openmetrics = text.split("\r\n").skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    });
    if accepts_openmetrics {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// The complete response to `route`; `body` is used for [`Route::Metrics`] only.
pub fn response(route: Route, body: &str) -> Vec<u8> {
    let (status, content_type, body) = match route {
        Route::Metrics(f) => ("200 OK", f.content_type(), body),
        Route::NotFound => ("404 Not Found", "text/plain", "not found: try /metrics\n"),
        Route::MethodNotAllowed => ("405 Method Not Allowed", "text/plain", "GET only\n"),
        Route::BadRequest => ("400 Bad Request", "text/plain", "bad request\n"),
        Route::HeadTooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n",
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if route == Route::MethodNotAllowed {
            "Allow: GET\r\n"
        } else {
            ""
        }
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Serves `/metrics` on `listener` until the task is dropped; `render`
/// produces the exposition for each scrape, in the format asked for.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn(Format) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let render = Arc::new(render);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors and the like: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
                let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut conn)).await;
                let route = match head {
                    Ok(Some(head)) => route(&head),
                    Ok(None) => Route::HeadTooLarge,
                    // Nothing worth answering.
                    Err(_) => return,
                };
                let body = match route {
                    Route::Metrics(f) => render(f).await,
                    _ => String::new(),
                };
                let _ = conn.write_all(&response(route, &body)).await;
                let _ = conn.shutdown().await;
            })
            .await;
        });
    }
}

/// Reads up to the blank line ending the head; `None` if it does not come
/// within [`MAX_HEAD`] bytes or the peer closes first.
async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    while len < MAX_HEAD {
        let n = conn.read(&mut buf[len..]).await.ok()?;
        if n == 0 {
            return None;
        }
        let from = len.saturating_sub(3);
        len += n;
        if buf[from..len].windows(4).any(|w| w == b"\r\n\r\n") {
            buf.truncate(len);
            return Some(buf);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_get_metrics_and_refuses_the_rest() {
        let cases: &[(&[u8], Route)] = &[
            (
                b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Route::Metrics(Format::Text),
            ),
            (
                b"GET /metrics?x=1 HTTP/1.0\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
                Route::Metrics(Format::OpenMetrics),
            ),
            (b"POST /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed),
            (b"GET / HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics/x HTTP/1.1\r\n\r\n", Route::NotFound),
            (b"GET /metrics HTTP/2\r\n\r\n", Route::BadRequest),
            (b"GET  /metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            (b"\xff\xfe\r\n\r\n", Route::BadRequest),
            (b"", Route::BadRequest),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), *want, "{}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_response_carries_its_length_and_closes() {
        let r =
            String::from_utf8(response(Route::Metrics(Format::OpenMetrics), "# EOF\n")).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(
            r.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{r}"
        );
        assert!(r.contains("Content-Length: 6\r\n"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n# EOF\n"), "{r}");
        let r = String::from_utf8(response(Route::NotFound, "secret")).unwrap();
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        assert!(!r.contains("secret"), "{r}");
    }

    #[tokio::test]
    async fn serves_a_scrape_and_bounds_a_head_without_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, |f| async move {
            match f {
                Format::OpenMetrics => "x 1\n# EOF\n".to_string(),
                Format::Text => "x 1\n".to_string(),
            }
        }));
        let ask = |req: Vec<u8>| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(&req).await.unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nignored body".to_vec()).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(TEXT_CONTENT_TYPE), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx 1\n"), "{ok}");
        let om =
            ask(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n".to_vec())
                .await;
        assert!(om.contains(CONTENT_TYPE), "{om}");
        assert!(om.ends_with("x 1\n# EOF\n"), "{om}");
        let big = ask(vec![b'a'; MAX_HEAD]).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        task.abort();
    }
}
