//! Fuzz check for the `/metrics` listener's request routing
//! (`ztmesh_proto::scrape`): the request head a scraper, or anyone who can
//! reach the port, sends. Shared by the fuzz target `metrics_request` and
//! the corpus replay test in `proto/tests/fuzz_corpus.rs`.
//!
//! Properties: nothing panics; only a `GET /metrics` request line is served;
//! every response is one HTTP/1.1 status line with a `Content-Length` that
//! matches its body, and a refusal never echoes the rendered body.

use ztmesh_proto::scrape::{response, route, Route};

pub fn run(data: &[u8]) {
    let r = route(data);
    if let Route::Metrics(_) = r {
        assert!(data.starts_with(b"GET /metrics"), "served a non-GET");
    }
    let body = "secret 1\n";
    let out = response(r, body);
    let text = std::str::from_utf8(&out).expect("responses are UTF-8");
    let (head, rest) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 "), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.parse().ok())
        .expect("a Content-Length");
    assert_eq!(len, rest.len());
    assert_eq!(matches!(r, Route::Metrics(_)), rest == body);
}
