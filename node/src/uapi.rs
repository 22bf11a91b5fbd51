//! The cross-platform WireGuard userspace API (the protocol `wg` speaks to
//! wireguard-go over `/var/run/wireguard/IFACE.sock`), answered the way
//! wireguard-go answers: `get=1` prints the device and its peers as
//! `key=value` lines with hex keys; `set=1` applies changes; every response
//! ends with `errno=N` (0 or a negative errno) and a blank line.
//!
//! The protocol logic ([`render_get`], [`SetRequest::parse`],
//! [`SetRequest::apply`]) is pure; [`Server`] is the socket shell. In managed
//! mode `set` is refused with `-EPERM`: the controller owns the configuration.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

use crate::tunnel::{PeerConfig, PeerStatus};

/// Largest request accepted, in lines (a big `setconf` is ~3 lines per AllowedIP).
const MAX_LINES: usize = 200_000;

/// The device state a `get` renders.
#[derive(Debug, Clone)]
pub struct State {
    /// The interface's private key (printed in hex, as wireguard-go does, to
    /// root-only socket clients).
    pub private_key: WgPrivateKey,
    /// The UDP listen port.
    pub listen_port: u16,
    /// Peers with the wall-clock time of their last handshake.
    pub peers: Vec<(PeerStatus, Option<SystemTime>)>,
}

/// A request from a socket client to the device task.
#[derive(Debug)]
pub enum Request {
    /// `get=1`: reply with the current state.
    Get(oneshot::Sender<State>),
    /// `set=1`: apply, reply with 0 or a negative errno.
    Set(SetRequest, oneshot::Sender<Result<(), i64>>),
}

/// Renders the body of a `get` response (without the `errno` line).
pub fn render_get(state: &State) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "private_key={}",
        hex(&state.private_key.to_dalek().to_bytes())
    );
    if state.listen_port != 0 {
        let _ = writeln!(s, "listen_port={}", state.listen_port);
    }
    for (p, handshake) in &state.peers {
        let _ = writeln!(s, "public_key={}", hex(&p.config.public_key.0));
        let psk = p.config.preshared_key.unwrap_or([0; 32]);
        let _ = writeln!(s, "preshared_key={}", hex(&psk));
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let since = handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.config.persistent_keepalive.unwrap_or(0)
        );
        for net in &p.config.allowed_ips {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s
}

/// A parsed `set` request.
#[derive(Debug, Default)]
pub struct SetRequest {
    private_key: Option<WgPrivateKey>,
    listen_port: Option<u16>,
    replace_peers: bool,
    peers: Vec<PeerChange>,
}

#[derive(Debug)]
struct PeerChange {
    key: WgPublicKey,
    remove: bool,
    update_only: bool,
    preshared_key: Option<[u8; 32]>,
    endpoint: Option<SocketAddr>,
    keepalive: Option<u16>,
    replace_allowed_ips: bool,
    allowed_ips: Vec<IpNet>,
}

impl SetRequest {
    /// Parses the lines of a `set` request (without `set=1` and the blank line).
    ///
    /// # Errors
    /// `-EPROTO` for a line without `=`, `-EINVAL` for unknown keys or bad values.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<Self, i64> {
        let einval = -i64::from(libc::EINVAL);
        let mut req = SetRequest::default();
        for line in lines {
            let (key, value) = line.split_once('=').ok_or(-i64::from(libc::EPROTO))?;
            if key == "public_key" {
                req.peers.push(PeerChange {
                    key: WgPublicKey(unhex(value).ok_or(einval)?),
                    remove: false,
                    update_only: false,
                    preshared_key: None,
                    endpoint: None,
                    keepalive: None,
                    replace_allowed_ips: false,
                    allowed_ips: Vec::new(),
                });
                continue;
            }
            match (req.peers.last_mut(), key) {
                (None, "private_key") => {
                    let bytes = unhex(value).ok_or(einval)?;
                    req.private_key =
                        Some(WgPublicKey(bytes).to_string().parse().map_err(|_| einval)?);
                }
                (None, "listen_port") => req.listen_port = Some(value.parse().map_err(|_| einval)?),
                (None, "fwmark") => {
                    if value.parse::<u32>().map_err(|_| einval)? != 0 {
                        return Err(einval);
                    }
                }
                (None, "replace_peers") if value == "true" => req.replace_peers = true,
                (Some(p), "remove") if value == "true" => p.remove = true,
                (Some(p), "update_only") if value == "true" => p.update_only = true,
                (Some(p), "preshared_key") => p.preshared_key = Some(unhex(value).ok_or(einval)?),
                (Some(p), "endpoint") => p.endpoint = Some(value.parse().map_err(|_| einval)?),
                (Some(p), "persistent_keepalive_interval") => {
                    p.keepalive = Some(value.parse().map_err(|_| einval)?)
                }
                (Some(p), "replace_allowed_ips") if value == "true" => p.replace_allowed_ips = true,
                (Some(p), "allowed_ip") => p
                    .allowed_ips
                    .push(value.parse::<IpNet>().map_err(|_| einval)?.trunc()),
                (Some(_), "protocol_version") if value == "1" => {}
                _ => return Err(einval),
            }
        }
        Ok(req)
    }

    /// Applies the request to the current peers; returns the new private key
    /// (if one was set) and the complete new peer list.
    ///
    /// # Errors
    /// `-EADDRINUSE` when asked to change the listen port of a running device
    /// (rebinding is not supported; restart with the new port).
    pub fn apply(
        self,
        current: &[PeerConfig],
        listen_port: u16,
    ) -> Result<(Option<WgPrivateKey>, Vec<PeerConfig>), i64> {
        if self.listen_port.is_some_and(|p| p != listen_port) {
            return Err(-i64::from(libc::EADDRINUSE));
        }
        let mut peers: BTreeMap<WgPublicKey, (usize, PeerConfig)> = BTreeMap::new();
        if !self.replace_peers {
            for (i, p) in current.iter().enumerate() {
                peers.insert(p.public_key, (i, p.clone()));
            }
        }
        let mut next = current.len();
        for change in self.peers {
            if change.remove {
                peers.remove(&change.key);
                continue;
            }
            let entry = match peers.get_mut(&change.key) {
                Some((_, p)) => p,
                None if change.update_only => continue,
                None => {
                    next += 1;
                    let fresh = PeerConfig {
                        public_key: change.key,
                        preshared_key: None,
                        allowed_ips: Vec::new(),
                        endpoint: None,
                        candidates: Vec::new(),
                        relay: None,
                        persistent_keepalive: None,
                    };
                    &mut peers.entry(change.key).or_insert((next, fresh)).1
                }
            };
            if let Some(psk) = change.preshared_key {
                entry.preshared_key = (psk != [0; 32]).then_some(psk);
            }
            if change.endpoint.is_some() {
                entry.endpoint = change.endpoint;
            }
            if let Some(k) = change.keepalive {
                entry.persistent_keepalive = (k > 0).then_some(k);
            }
            if change.replace_allowed_ips {
                entry.allowed_ips.clear();
            }
            for net in change.allowed_ips {
                if !entry.allowed_ips.contains(&net) {
                    entry.allowed_ips.push(net);
                }
            }
        }
        let mut list: Vec<(usize, PeerConfig)> = peers.into_values().collect();
        list.sort_by_key(|(i, _)| *i);
        Ok((self.private_key, list.into_iter().map(|(_, p)| p).collect()))
    }
}

/// The UAPI socket: `DIR/IFACE.sock`, mode 0600, removed on stop.
pub struct Server {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

impl Server {
    /// Creates the directory (0755) and the socket (0600) and starts serving.
    ///
    /// # Errors
    /// The directory or socket cannot be created, or another live process
    /// serves the socket already.
    pub fn start(
        dir: &Path,
        interface: &str,
        managed: bool,
        requests: mpsc::UnboundedSender<Request>,
    ) -> std::io::Result<Server> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        let path = dir.join(format!("{interface}.sock"));
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        let _ = std::fs::remove_file(&path);
        // Create the socket with no group/other bits at all, then make sure.
        // SAFETY: umask only swaps the process file-creation mask.
        let old = unsafe { libc::umask(0o077) };
        let listener = UnixListener::bind(&path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = listener?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(handle(stream, managed, requests.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "UAPI accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(Server { path, task })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving and removes the socket file.
    pub fn stop(self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn handle(stream: UnixStream, managed: bool, requests: mpsc::UnboundedSender<Request>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(op)) = lines.next_line().await {
        let response = match op.as_str() {
            "get=1" => {
                // The operation line is followed by a blank line.
                match lines.next_line().await {
                    Ok(Some(l)) if l.is_empty() => {}
                    _ => return,
                }
                let (tx, rx) = oneshot::channel();
                if requests.send(Request::Get(tx)).is_err() {
                    return;
                }
                match rx.await {
                    Ok(state) => format!("{}errno=0\n\n", render_get(&state)),
                    Err(_) => format!("errno={}\n\n", -libc::EIO),
                }
            }
            "set=1" => {
                let mut body = Vec::new();
                loop {
                    match lines.next_line().await {
                        Ok(Some(l)) if l.is_empty() => break,
                        Ok(Some(l)) if body.len() < MAX_LINES => body.push(l),
                        _ => return,
                    }
                }
                let errno = if managed {
                    tracing::warn!("UAPI set refused: the controller manages this interface");
                    -i64::from(libc::EPERM)
                } else {
                    match SetRequest::parse(body.iter().map(String::as_str)) {
                        Err(e) => e,
                        Ok(set) => {
                            let (tx, rx) = oneshot::channel();
                            if requests.send(Request::Set(set, tx)).is_err() {
                                return;
                            }
                            match rx.await {
                                Ok(Ok(())) => 0,
                                Ok(Err(e)) => e,
                                Err(_) => -i64::from(libc::EIO),
                            }
                        }
                    }
                };
                format!("errno={errno}\n\n")
            }
            _ => return,
        };
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(d(pair[0])? * 16 + d(pair[1])?).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(n: u8) -> WgPublicKey {
        WgPublicKey([n; 32])
    }

    #[test]
    fn get_matches_wireguard_go_layout() {
        let sk: WgPrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        let status = PeerStatus {
            config: PeerConfig {
                public_key: key(0xab),
                preshared_key: None,
                allowed_ips: vec![
                    "100.64.0.2/32".parse().unwrap(),
                    "fd00::2/128".parse().unwrap(),
                ],
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                candidates: Vec::new(),
                relay: None,
                persistent_keepalive: Some(25),
            },
            endpoint: Some("198.18.0.2:51820".parse().unwrap()),
            destination: None,
            direct: false,
            last_rx: None,
            path: Default::default(),
            last_handshake: None,
            rx_bytes: 10,
            tx_bytes: 20,
        };
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let text = render_get(&State {
            private_key: sk,
            listen_port: 51820,
            peers: vec![(status, Some(t))],
        });
        let want = format!(
            "private_key=c809f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669\n\
             listen_port=51820\n\
             public_key={ab}\n\
             preshared_key={zero}\n\
             protocol_version=1\n\
             endpoint=198.18.0.2:51820\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\n\
             tx_bytes=20\n\
             rx_bytes=10\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=100.64.0.2/32\n\
             allowed_ip=fd00::2/128\n",
            ab = "ab".repeat(32),
            zero = "00".repeat(32),
        );
        assert_eq!(text, want);
    }

    #[test]
    fn set_adds_updates_and_removes_peers() {
        let current = vec![PeerConfig {
            public_key: key(1),
            preshared_key: None,
            allowed_ips: vec!["100.64.0.1/32".parse().unwrap()],
            endpoint: None,
            candidates: Vec::new(),
            relay: None,
            persistent_keepalive: None,
        }];
        let body = format!(
            "listen_port=51820\npublic_key={}\nendpoint=198.18.0.9:1\nallowed_ip=100.64.0.9/32\n\
             public_key={}\nreplace_allowed_ips=true\nallowed_ip=100.64.1.0/24\npersistent_keepalive_interval=25\n\
             public_key={}\nremove=true\npublic_key={}\nupdate_only=true\nallowed_ip=1.2.3.4/32",
            "02".repeat(32),
            "01".repeat(32),
            "03".repeat(32),
            "04".repeat(32),
        );
        let req = SetRequest::parse(body.lines()).unwrap();
        let (pk, peers) = req.apply(&current, 51820).unwrap();
        assert!(pk.is_none());
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].public_key, key(1));
        assert_eq!(
            peers[0].allowed_ips,
            vec!["100.64.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(peers[0].persistent_keepalive, Some(25));
        assert_eq!(peers[1].public_key, key(2));
        assert_eq!(peers[1].endpoint, Some("198.18.0.9:1".parse().unwrap()));
    }

    async fn roundtrip(path: &Path, request: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while !reply.ends_with(b"\n\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed: {:?}",
                String::from_utf8_lossy(&reply)
            );
            reply.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(reply).unwrap()
    }

    #[tokio::test]
    async fn socket_is_private_and_managed_mode_refuses_set() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ztmesh-uapi-{}", std::process::id()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = Server::start(&dir, "ztmtest0", true, tx).unwrap();
        let mode = std::fs::metadata(server.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let responder = tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                if let Request::Get(reply) = req {
                    let _ = reply.send(State {
                        private_key: "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
                            .parse()
                            .unwrap(),
                        listen_port: 41641,
                        peers: Vec::new(),
                    });
                }
            }
        });
        let get = roundtrip(server.path(), "get=1\n\n").await;
        assert!(
            get.contains("listen_port=41641\n") && get.ends_with("errno=0\n\n"),
            "{get}"
        );
        let set = roundtrip(
            server.path(),
            &format!("set=1\npublic_key={}\nremove=true\n\n", "01".repeat(32)),
        )
        .await;
        assert_eq!(set, format!("errno={}\n\n", -libc::EPERM));
        let path = server.path().to_path_buf();
        server.stop();
        responder.abort();
        assert!(!path.exists());
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn set_rejects_bad_input_with_negative_errno() {
        let einval = -i64::from(libc::EINVAL);
        assert_eq!(SetRequest::parse(["bogus=1"]).unwrap_err(), einval);
        assert_eq!(SetRequest::parse(["public_key=zz"]).unwrap_err(), einval);
        assert_eq!(
            SetRequest::parse(["no equals sign"]).unwrap_err(),
            -i64::from(libc::EPROTO)
        );
        let req = SetRequest::parse(["listen_port=1"]).unwrap();
        assert_eq!(req.apply(&[], 2).unwrap_err(), -i64::from(libc::EADDRINUSE));
    }
}
