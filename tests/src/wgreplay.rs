//! Replaying a node's exported wg-quick config with wireguard-go: what a
//! hostile or legacy peer would run. Tests edit the config first (widen a
//! peer's AllowedIPs) to play a node that routes more into its tunnel than
//! its netmap allows.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{wait_until, Netns, Proc};

/// A WireGuard interface name no other test in this run uses: wireguard-go's
/// control socket (`/var/run/wireguard/NAME.sock`) lives in the shared
/// filesystem, not in the namespace, so two replays with one name collide.
pub fn unique_wg_iface() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("zw{}x{n}", std::process::id() % 10_000_000)
}

/// Runs wireguard-go in `ns` on interface `iface` with the
/// wg-quick config `wg`: keys and peers via `wg setconf`, addresses and
/// routes via `ip`, as `wg-quick up` would.
pub fn replay_with_wireguard_go(ns: &Netns, iface: &str, wg: &WgQuick, dir: &Path) -> Proc {
    let mut cmd = ns.command("wireguard-go");
    cmd.args(["-f", iface])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let mut proc = Proc::spawn(&format!("{}/wireguard-go", ns.tag()), cmd);
    let uapi = PathBuf::from(format!("/var/run/wireguard/{iface}.sock"));
    let ready = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        !proc.is_running() || UnixStream::connect(&uapi).is_ok()
    });
    if ready.is_err() || !proc.is_running() {
        panic!("wireguard-go did not start\n{}", proc.logs());
    }
    let file = dir.join(format!("{iface}.conf"));
    fs::write(&file, wg.setconf_text()).expect("write wg config");
    ns.run_ok([
        "wg",
        "setconf",
        iface,
        file.to_str().expect("utf-8 temp path"),
    ]);
    for addr in &wg.addresses {
        ns.run_ok(["ip", "addr", "add", addr.as_str(), "dev", iface]);
    }
    ns.run_ok([
        "ip",
        "link",
        "set",
        iface,
        "mtu",
        &wg.mtu.unwrap_or(1280).to_string(),
        "up",
    ]);
    for route in wg.peers.iter().flat_map(|p| &p.allowed_ips) {
        ns.run_ok(["ip", "route", "replace", route.as_str(), "dev", iface]);
    }
    proc
}

// ---------------------------------------------------------------------------
// wg-quick configs
// ---------------------------------------------------------------------------

/// A wg-quick config split into what `wg setconf` accepts and what wg-quick
/// itself applies (addresses, MTU, routes from the peers' AllowedIPs).
#[derive(Debug, Default)]
pub struct WgQuick {
    pub interface: Vec<(String, String)>,
    pub peers: Vec<WgPeer>,
    pub addresses: Vec<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Default)]
pub struct WgPeer {
    pub lines: Vec<(String, String)>,
    pub allowed_ips: Vec<String>,
}

impl WgPeer {
    pub fn has_endpoint(&self) -> bool {
        self.lines
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("Endpoint") && !v.is_empty())
    }

    /// Adds `prefix` to the peer's AllowedIPs (what a hostile node edits).
    pub fn widen(&mut self, prefix: &str) {
        self.allowed_ips.push(prefix.to_owned());
        let joined = self.allowed_ips.join(", ");
        match self
            .lines
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case("AllowedIPs"))
        {
            Some(line) => line.1 = joined,
            None => self.lines.push(("AllowedIPs".to_owned(), joined)),
        }
    }
}

impl WgQuick {
    pub fn parse(text: &str) -> Self {
        let mut conf = Self::default();
        let mut in_peer = false;
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.eq_ignore_ascii_case("[Interface]") {
                in_peer = false;
                continue;
            }
            if line.eq_ignore_ascii_case("[Peer]") {
                in_peer = true;
                conf.peers.push(WgPeer::default());
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim().to_owned(), value.trim().to_owned());
            let list = || {
                value
                    .split(',')
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
            };
            match (in_peer, key.to_ascii_lowercase().as_str()) {
                (false, "address") => conf.addresses.extend(list()),
                (false, "mtu") => conf.mtu = value.parse().ok(),
                (false, "privatekey" | "listenport" | "fwmark") => {
                    conf.interface.push((key, value))
                }
                (false, _) => {} // DNS, Table, PreUp…: wg-quick only
                (true, k) => {
                    let peer = conf.peers.last_mut().expect("[Peer] seen");
                    if k == "allowedips" {
                        peer.allowed_ips.extend(list());
                    }
                    peer.lines.push((key, value));
                }
            }
        }
        conf
    }

    /// The config as `wg setconf` takes it.
    pub fn setconf_text(&self) -> String {
        let mut out = String::from("[Interface]\n");
        for (k, v) in &self.interface {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for peer in &self.peers {
            out.push_str("\n[Peer]\n");
            for (k, v) in &peer.lines {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
#[test]
fn wg_quick_config_splits_into_setconf_addresses_and_routes() {
    let conf = WgQuick::parse(
        "# exported\n[Interface]\nPrivateKey = cHJpdg==\nAddress = 100.64.0.2/32, fd7a::2/128\n\
         ListenPort = 41641\nMTU = 1280\nDNS = 100.100.100.100\n\n[Peer]\n# web\n\
         PublicKey = cHVi\nAllowedIPs = 100.64.0.4/32,fd7a::4/128\nEndpoint = 198.18.0.4:41641\n",
    );
    assert_eq!(conf.addresses, ["100.64.0.2/32", "fd7a::2/128"]);
    assert_eq!(conf.mtu, Some(1280));
    assert_eq!(conf.peers.len(), 1);
    assert_eq!(conf.peers[0].allowed_ips, ["100.64.0.4/32", "fd7a::4/128"]);
    let text = conf.setconf_text();
    assert!(text.contains("PrivateKey = cHJpdg==") && text.contains("ListenPort = 41641"));
    assert!(text.contains("Endpoint = 198.18.0.4:41641"));
    assert!(!text.contains("Address") && !text.contains("MTU") && !text.contains("DNS"));
}
