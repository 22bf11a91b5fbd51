//! wg-quick configuration files: parse and render. Pure: no I/O (endpoint
//! host names are resolved separately, by [`PeerSection::to_peer_config`]).
//!
//! Supported keys: `[Interface]` PrivateKey, Address, ListenPort, MTU (and DNS,
//! kept for rendering); `[Peer]` PublicKey, PresharedKey, AllowedIPs, Endpoint,
//! PersistentKeepalive. wg-quick's host-side keys (Table, FwMark, PreUp, PostUp,
//! PreDown, PostDown, SaveConfig) are accepted and ignored, reported in
//! [`WgConfig::ignored`]. Anything else is an error naming the line.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ipnet::IpNet;
use ztmesh_proto::keys::{WgPrivateKey, WgPublicKey};

use crate::tunnel::PeerConfig;

/// A parse error, with the 1-based line it was found on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ConfigError {
    /// Line number (1-based; 0 for errors about the file as a whole).
    pub line: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Errors turning a parsed section into runtime configuration.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The endpoint is neither `ip:port`, `[ipv6]:port` nor a resolvable `host:port`.
    #[error("cannot resolve endpoint {0:?}")]
    Endpoint(String),
}

/// A whole wg-quick file.
#[derive(Debug, Clone, Default)]
pub struct WgConfig {
    /// The `[Interface]` section.
    pub interface: InterfaceSection,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerSection>,
    /// wg-quick keys that were accepted but have no effect here, as `(line, key)`.
    pub ignored: Vec<(usize, String)>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, Default)]
pub struct InterfaceSection {
    /// The interface's private key (required to run a tunnel).
    pub private_key: Option<WgPrivateKey>,
    /// Addresses with prefix length, assigned to the TUN device.
    pub addresses: Vec<IpNet>,
    /// UDP listen port (absent: random).
    pub listen_port: Option<u16>,
    /// Inner MTU (absent: 1280).
    pub mtu: Option<u16>,
    /// DNS servers or search domains, kept verbatim for rendering.
    pub dns: Vec<String>,
}

/// A `[Peer]` section.
#[derive(Clone)]
pub struct PeerSection {
    /// The peer's public key.
    pub public_key: WgPublicKey,
    /// Optional preshared key.
    pub preshared_key: Option<[u8; 32]>,
    /// AllowedIPs.
    pub allowed_ips: Vec<IpNet>,
    /// Endpoint as written (`ip:port`, `[ipv6]:port` or `host:port`).
    pub endpoint: Option<String>,
    /// Persistent keepalive in seconds (0 or absent: off).
    pub persistent_keepalive: Option<u16>,
}

impl std::fmt::Debug for PeerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSection")
            .field("public_key", &self.public_key)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("allowed_ips", &self.allowed_ips)
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

impl PeerSection {
    /// Builds the runtime peer, resolving a host name endpoint (blocking DNS).
    ///
    /// # Errors
    /// [`ResolveError::Endpoint`] when the endpoint cannot be resolved.
    pub fn to_peer_config(&self) -> Result<PeerConfig, ResolveError> {
        let endpoint = match &self.endpoint {
            None => None,
            Some(e) => Some(resolve(e)?),
        };
        Ok(PeerConfig {
            public_key: self.public_key,
            preshared_key: self.preshared_key,
            allowed_ips: self.allowed_ips.clone(),
            endpoint,
            candidates: Vec::new(),
            relay: None,
            persistent_keepalive: self.persistent_keepalive.filter(|k| *k > 0),
        })
    }
}

fn resolve(endpoint: &str) -> Result<SocketAddr, ResolveError> {
    if let Ok(a) = endpoint.parse::<SocketAddr>() {
        return Ok(a);
    }
    endpoint
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| ResolveError::Endpoint(endpoint.to_string()))
}

#[derive(Clone, Copy, PartialEq)]
enum Section {
    None,
    Interface,
    Peer,
}

/// Parses a wg-quick file.
///
/// # Errors
/// A [`ConfigError`] naming the line for unknown sections or keys, bad keys,
/// addresses, ports or numbers, a `[Peer]` without PublicKey, or a repeated `[Interface]`.
pub fn parse(text: &str) -> Result<WgConfig, ConfigError> {
    let mut cfg = WgConfig::default();
    let mut section = Section::None;
    let mut seen_interface = false;
    let mut peer: Option<(usize, PartialPeer)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |message: String| ConfigError {
            line: line_no,
            message,
        };
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            if let Some((start, p)) = peer.take() {
                cfg.peers.push(p.finish(start)?);
            }
            section = match line.to_ascii_lowercase().as_str() {
                "[interface]" => {
                    if seen_interface {
                        return Err(err("a second [Interface] section".into()));
                    }
                    seen_interface = true;
                    Section::Interface
                }
                "[peer]" => {
                    peer = Some((line_no, PartialPeer::default()));
                    Section::Peer
                }
                _ => return Err(err(format!("unknown section {line}"))),
            };
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(format!("expected `Key = Value`, found {line:?}")));
        };
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        match section {
            Section::None => return Err(err(format!("{key} outside of a section"))),
            Section::Interface => {
                let ifc = &mut cfg.interface;
                match lower.as_str() {
                    "privatekey" => {
                        ifc.private_key = Some(
                            value
                                .parse()
                                .map_err(|_| err("PrivateKey is not base64 of 32 bytes".into()))?,
                        )
                    }
                    "address" => {
                        for a in list(value) {
                            ifc.addresses.push(parse_address(a).map_err(&err)?);
                        }
                    }
                    "listenport" => {
                        ifc.listen_port = Some(number(value, "ListenPort").map_err(&err)?)
                    }
                    "mtu" => {
                        let mtu: u16 = number(value, "MTU").map_err(&err)?;
                        if !(576..=65_000).contains(&mtu) {
                            return Err(err(format!("MTU {mtu} is outside 576..=65000")));
                        }
                        ifc.mtu = Some(mtu);
                    }
                    "dns" => ifc.dns.extend(list(value).map(str::to_string)),
                    "table" | "fwmark" | "preup" | "postup" | "predown" | "postdown"
                    | "saveconfig" => cfg.ignored.push((line_no, key.to_string())),
                    _ => return Err(err(format!("unknown [Interface] key {key}"))),
                }
            }
            Section::Peer => {
                let (_, p) = peer.as_mut().expect("a [Peer] section has a partial peer");
                match lower.as_str() {
                    "publickey" => {
                        p.public_key = Some(
                            value
                                .parse()
                                .map_err(|_| err("PublicKey is not base64 of 32 bytes".into()))?,
                        )
                    }
                    "presharedkey" => {
                        let bytes = B64
                            .decode(value)
                            .ok()
                            .and_then(|b| <[u8; 32]>::try_from(b).ok())
                            .ok_or_else(|| err("PresharedKey is not base64 of 32 bytes".into()))?;
                        p.preshared_key = Some(bytes);
                    }
                    "allowedips" => {
                        for a in list(value) {
                            let net = parse_address(a).map_err(&err)?;
                            p.allowed_ips.push(net.trunc());
                        }
                    }
                    "endpoint" => {
                        if value
                            .rsplit_once(':')
                            .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
                        {
                            return Err(err(format!("Endpoint {value:?} is not host:port")));
                        }
                        p.endpoint = Some(value.to_string());
                    }
                    "persistentkeepalive" => {
                        p.persistent_keepalive = if value.eq_ignore_ascii_case("off") {
                            None
                        } else {
                            Some(number(value, "PersistentKeepalive").map_err(&err)?)
                        }
                    }
                    _ => return Err(err(format!("unknown [Peer] key {key}"))),
                }
            }
        }
    }
    if let Some((start, p)) = peer.take() {
        cfg.peers.push(p.finish(start)?);
    }
    if !seen_interface {
        return Err(ConfigError {
            line: 0,
            message: "missing [Interface] section".into(),
        });
    }
    Ok(cfg)
}

/// Renders a config as wg-quick text. The private key is written only when
/// `include_private_key` is true; preshared keys likewise.
pub fn render(cfg: &WgConfig, include_private_key: bool) -> String {
    let mut s = String::from("[Interface]\n");
    let ifc = &cfg.interface;
    if let (true, Some(k)) = (include_private_key, &ifc.private_key) {
        let _ = writeln!(s, "PrivateKey = {}", k.to_base64());
    }
    if !ifc.addresses.is_empty() {
        let _ = writeln!(s, "Address = {}", join(&ifc.addresses));
    }
    if let Some(p) = ifc.listen_port {
        let _ = writeln!(s, "ListenPort = {p}");
    }
    if let Some(m) = ifc.mtu {
        let _ = writeln!(s, "MTU = {m}");
    }
    if !ifc.dns.is_empty() {
        let _ = writeln!(s, "DNS = {}", ifc.dns.join(", "));
    }
    for p in &cfg.peers {
        let _ = writeln!(s, "\n[Peer]\nPublicKey = {}", p.public_key);
        if let (true, Some(psk)) = (include_private_key, &p.preshared_key) {
            let _ = writeln!(s, "PresharedKey = {}", B64.encode(psk));
        }
        if !p.allowed_ips.is_empty() {
            let _ = writeln!(s, "AllowedIPs = {}", join(&p.allowed_ips));
        }
        if let Some(e) = &p.endpoint {
            let _ = writeln!(s, "Endpoint = {e}");
        }
        if let Some(k) = p.persistent_keepalive.filter(|k| *k > 0) {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
    }
    s
}

#[derive(Default)]
struct PartialPeer {
    public_key: Option<WgPublicKey>,
    preshared_key: Option<[u8; 32]>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<String>,
    persistent_keepalive: Option<u16>,
}

impl PartialPeer {
    fn finish(self, line: usize) -> Result<PeerSection, ConfigError> {
        Ok(PeerSection {
            public_key: self.public_key.ok_or(ConfigError {
                line,
                message: "[Peer] without PublicKey".into(),
            })?,
            preshared_key: self.preshared_key,
            allowed_ips: self.allowed_ips,
            endpoint: self.endpoint,
            persistent_keepalive: self.persistent_keepalive,
        })
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_address(s: &str) -> Result<IpNet, String> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{s:?} is not an address or prefix"))
}

fn number<T: std::str::FromStr>(value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{what} {value:?} is not a valid number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# a comment
[Interface]
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
Address = 100.64.0.1/10, fd7a:115c:a1e0::1/48
ListenPort = 51820
MTU = 1280
PostUp = echo hi

[Peer]
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
PresharedKey = FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=
AllowedIPs = 100.64.0.2/32, fd7a:115c:a1e0::2/128
Endpoint = 198.18.0.2:51820
PersistentKeepalive = 25

[peer]
publickey = TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=
allowedips = 100.64.1.0/24
endpoint = [fd00::2]:51820
";

    #[test]
    fn parses_a_wg_quick_file() {
        let c = parse(SAMPLE).unwrap();
        assert!(c.interface.private_key.is_some());
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.addresses[0].to_string(), "100.64.0.1/10");
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.mtu, Some(1280));
        assert_eq!(c.ignored, vec![(7, "PostUp".to_string())]);
        assert_eq!(c.peers.len(), 2);
        assert!(c.peers[0].preshared_key.is_some());
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        let p = c.peers[1].to_peer_config().unwrap();
        assert_eq!(p.endpoint, Some("[fd00::2]:51820".parse().unwrap()));
        assert_eq!(
            p.allowed_ips,
            vec!["100.64.1.0/24".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn render_round_trips() {
        let c = parse(SAMPLE).unwrap();
        let text = render(&c, true);
        let again = parse(&text).unwrap();
        assert_eq!(render(&again, true), text);
        let public = render(&c, false);
        assert!(!public.contains("PrivateKey") && !public.contains("PresharedKey"));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("[Interface]\nPrivateKey = nope\n", 2),
            ("[Interface]\nListenPort = 70000\n", 2),
            ("[Interface]\nBogus = 1\n", 2),
            ("[Interface]\n[Peer]\nAllowedIPs = 100.64.0.0/10\n", 2),
            ("[Interface]\n[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 198.18.0.1\n", 4),
            ("[Interface]\nAddress = 100.64.0.300/10\n", 2),
            ("[Wat]\n", 1),
            ("Address = 1.2.3.4\n", 1),
            ("", 0),
        ];
        for (text, line) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }
}
