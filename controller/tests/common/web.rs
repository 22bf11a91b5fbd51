//! A browser-like HTTP/2 client for the controller's pages (what a browser
//! sends, minus the browser), and helpers to read the pages it gets.

use std::sync::Arc;

use super::{Ctl, LIVENESS};
use ztmesh_controller::accounts;

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// A browser-like HTTP/2 client with one cookie jar.
pub struct Browser {
    pub h2: h2::client::SendRequest<bytes::Bytes>,
    pub cookie: Option<String>,
}

impl Browser {
    pub async fn new(ctl: &Ctl) -> Self {
        let tcp = tokio::net::TcpStream::connect(ctl.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(
            ztmesh_proto::tls::pinned_client_config(ctl.fp),
        ));
        let name = rustls::pki_types::ServerName::try_from("ztmesh-controller").unwrap();
        let io = tls.connect(name, tcp).await.unwrap();
        let (h2, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { h2, cookie: None }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        form: Option<String>,
        origin: bool,
    ) -> Reply {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("https://ztmesh-controller{path}"));
        if let Some(c) = &self.cookie {
            b = b.header("cookie", format!("__Host-ztmesh={c}"));
        }
        if form.is_some() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
            if origin {
                b = b.header("origin", "https://ztmesh-controller");
            }
        }
        let req = b.body(()).unwrap();
        let body = form.unwrap_or_default();
        let (resp, mut stream) = self.h2.send_request(req, body.is_empty()).unwrap();
        if !body.is_empty() {
            stream.send_data(bytes::Bytes::from(body), true).unwrap();
        }
        let resp = tokio::time::timeout(LIVENESS, resp).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        for v in headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            if let Some(rest) = v.strip_prefix("__Host-ztmesh=") {
                let val = rest.split(';').next().unwrap();
                self.cookie = (!val.is_empty()).then(|| val.to_string());
            }
        }
        Reply {
            status,
            headers,
            body: String::from_utf8(out).unwrap(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, None, false).await
    }

    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let form = fields
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect::<Vec<_>>()
            .join("&");
        self.send("POST", path, Some(form), true).await
    }
}

pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The value of `<input ... name="NAME" value="...">` in a page.
pub fn field(page: &str, name: &str) -> String {
    let at = page
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no field {name} in {page}"));
    let rest = &page[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// The text of the element with `id`.
pub fn by_id(page: &str, id: &str) -> String {
    let at = page
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {page}"));
    let rest = &page[at..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    rest[..rest.find('<').unwrap()].to_string()
}

pub fn location(r: &Reply) -> String {
    r.headers
        .get("location")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

pub fn base32_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
            .iter()
            .position(|x| *x == c)
            .unwrap() as u32;
        buf = (buf << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    out
}

pub fn totp_now(secret: &[u8], offset: i64) -> String {
    let step = accounts::totp_step(ztmesh_controller::now_ms()) + offset;
    format!("{:06}", accounts::hotp(secret, step as u64))
}
