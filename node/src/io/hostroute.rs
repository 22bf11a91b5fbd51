//! Makes the host match a [`RoutePlan`]: routes into the tunnel interface
//! (`ip route`), exit-node policy routing (`ip rule` + a routing table),
//! and a router's forwarding (sysctls + one nftables table). Every change
//! is undone by [`HostRoutes::clear`] (on `down`, shutdown, or when the
//! plan no longer asks for it); each piece is replaced only when its part
//! of the plan changed.
//!
//! Exit-node routing, in priority order (both families):
//! 1. packets of this node's own WireGuard socket (marked [`BYPASS_MARK`])
//!    use the main table: the encrypted traffic never loops into the tunnel;
//! 2. the controller and the relays use the main table;
//! 3. with LAN access, the main table except its default route
//!    (`suppress_prefixlength 0`);
//! 4. everything else: [`EXIT_TABLE`], whose default route is the tunnel.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use ipnet::IpNet;

use crate::routing::{ExitRouting, Forwarding, RoutePlan};

/// The mark on this node's WireGuard UDP sockets (`SO_MARK`).
pub const BYPASS_MARK: u32 = 0x5a7e;
/// The routing table holding the exit node's default route.
pub const EXIT_TABLE: u32 = 5270;
/// `ip rule` priorities: mark, bypass addresses, LAN, exit table.
const PRIO_MARK: u32 = 5200;
const PRIO_BYPASS: u32 = 5210;
const PRIO_LAN: u32 = 5220;
const PRIO_EXIT: u32 = 5270;
/// The sysctls a router needs, and the value it sets.
const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// What is installed on the host, to diff the next plan against.
#[derive(Debug)]
pub struct HostRoutes {
    interface: String,
    routes: BTreeSet<IpNet>,
    exit: Option<ExitRouting>,
    forward: Option<Forwarding>,
    /// The sysctl values found before forwarding was turned on.
    saved_sysctls: Vec<(&'static str, String)>,
}

impl HostRoutes {
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_string(),
            routes: BTreeSet::new(),
            exit: None,
            forward: None,
            saved_sysctls: Vec::new(),
        }
    }

    /// Applies `plan`. Best effort per piece: a piece that fails is logged
    /// and retried with the next plan; the error names the first failure.
    ///
    /// # Errors
    /// The first `ip`/`nft`/sysctl failure.
    pub fn apply(&mut self, plan: &RoutePlan) -> anyhow::Result<()> {
        let mut first: Option<anyhow::Error> = None;
        let mut note = |r: anyhow::Result<()>| {
            if let Err(e) = r {
                tracing::warn!(error = %format!("{e:#}"), "host routing");
                first.get_or_insert(e);
            }
        };
        let want: BTreeSet<IpNet> = plan.routes.iter().copied().collect();
        for gone in self.routes.difference(&want).copied().collect::<Vec<_>>() {
            note(route(&["del"], &gone, &self.interface, None));
            self.routes.remove(&gone);
        }
        for new in want.difference(&self.routes).copied().collect::<Vec<_>>() {
            match route(&["replace"], &new, &self.interface, None) {
                Ok(()) => {
                    self.routes.insert(new);
                }
                Err(e) => note(Err(e)),
            }
        }
        if self.exit != plan.exit {
            self.clear_exit();
            if let Some(exit) = &plan.exit {
                let r = self.install_exit(exit);
                if r.is_err() {
                    self.clear_exit();
                } else {
                    self.exit = Some(exit.clone());
                }
                note(r);
            }
        }
        if self.forward != plan.forward {
            match &plan.forward {
                Some(f) => {
                    let r = self.install_forwarding(f);
                    if r.is_ok() {
                        self.forward = Some(f.clone());
                    }
                    note(r);
                }
                None => self.clear_forwarding(),
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Undoes everything [`HostRoutes::apply`] installed.
    pub fn clear(&mut self) {
        for r in std::mem::take(&mut self.routes) {
            // The interface may be gone already, taking its routes along.
            let _ = route(&["del"], &r, &self.interface, None);
        }
        self.clear_exit();
        self.clear_forwarding();
    }

    fn install_exit(&self, exit: &ExitRouting) -> anyhow::Result<()> {
        for family in ["-4", "-6"] {
            let default = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            let table = EXIT_TABLE.to_string();
            ip(&[
                family,
                "route",
                "replace",
                default,
                "dev",
                &self.interface,
                "table",
                &table,
            ])?;
            let mark = format!("{BYPASS_MARK:#x}");
            rule(family, PRIO_MARK, &["fwmark", &mark, "lookup", "main"])?;
            for a in exit
                .bypass
                .iter()
                .filter(|a| a.is_ipv4() == (family == "-4"))
            {
                let to = a.to_string();
                rule(family, PRIO_BYPASS, &["to", &to, "lookup", "main"])?;
            }
            if exit.allow_lan {
                rule(
                    family,
                    PRIO_LAN,
                    &["lookup", "main", "suppress_prefixlength", "0"],
                )?;
            }
            rule(family, PRIO_EXIT, &["lookup", &table])?;
        }
        tracing::info!(bypass = ?exit.bypass, lan = exit.allow_lan, "exit node routing on");
        Ok(())
    }

    fn clear_exit(&mut self) {
        let was = self.exit.take().is_some();
        for family in ["-4", "-6"] {
            for prio in [PRIO_MARK, PRIO_BYPASS, PRIO_LAN, PRIO_EXIT] {
                // Several rules may share a priority; bounded by the most
                // one plan installs.
                for _ in 0..64 {
                    if ip(&[family, "rule", "del", "priority", &prio.to_string()]).is_err() {
                        break;
                    }
                }
            }
            let _ = ip(&[family, "route", "flush", "table", &EXIT_TABLE.to_string()]);
        }
        if was {
            tracing::info!("exit node routing off");
        }
    }

    fn install_forwarding(&mut self, f: &Forwarding) -> anyhow::Result<()> {
        if self.saved_sysctls.is_empty() {
            for path in FORWARDING {
                let old = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {path}"))?
                    .trim()
                    .to_string();
                self.saved_sysctls.push((path, old));
            }
        }
        for path in FORWARDING {
            std::fs::write(path, "1\n").with_context(|| format!("enabling forwarding ({path})"))?;
        }
        nft(&nft_script(&self.interface, f))?;
        tracing::info!(routes = ?f.routes, exit = f.exit, snat = f.snat, "forwarding on");
        Ok(())
    }

    fn clear_forwarding(&mut self) {
        if self.forward.take().is_some() || !self.saved_sysctls.is_empty() {
            let _ = nft(&format!(
                "delete table inet {}\n",
                table_name(&self.interface)
            ));
            for (path, old) in std::mem::take(&mut self.saved_sysctls) {
                if let Err(e) = std::fs::write(path, format!("{old}\n")) {
                    tracing::warn!(error = %e, path, "cannot restore sysctl");
                }
            }
            tracing::info!("forwarding off");
        }
    }
}

impl Drop for HostRoutes {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The nftables table of `interface` (one per daemon, so several daemons
/// in one namespace do not collide).
fn table_name(interface: &str) -> String {
    let clean: String = interface
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("ztmesh_{clean}")
}

/// The router's nftables table, replaced atomically: nothing from the
/// tunnel ends on a local address but the overlay ones; TCP MSS clamped to
/// the route's MTU both ways; source NAT for what leaves another interface
/// (internet egress always; the subnet routes when `snat`).
pub fn nft_script(interface: &str, f: &Forwarding) -> String {
    let t = table_name(interface);
    let iface = format!("\"{interface}\"");
    let mut s = format!("table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n");
    s.push_str("  chain input {\n    type filter hook input priority -10; policy accept;\n");
    for (nfproto, ip, v4) in [("ipv4", "ip", true), ("ipv6", "ip6", false)] {
        let own: Vec<String> = f
            .own
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(IpAddr::to_string)
            .collect();
        let except = if own.is_empty() {
            String::new()
        } else {
            format!(" {ip} daddr != {{ {} }}", own.join(", "))
        };
        s.push_str(&format!(
            "    iifname {iface} meta nfproto {nfproto} fib daddr type local{except} counter drop\n"
        ));
    }
    s.push_str("  }\n");
    s.push_str("  chain forward {\n    type filter hook forward priority mangle; policy accept;\n");
    s.push_str(&format!(
        "    iifname {iface} tcp flags syn tcp option maxseg size set rt mtu\n"
    ));
    s.push_str(&format!(
        "    oifname {iface} tcp flags syn tcp option maxseg size set rt mtu\n"
    ));
    s.push_str("  }\n");
    s.push_str(
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
    );
    for (v4, ip) in [(true, "ip"), (false, "ip6")] {
        let sources: Vec<String> = f
            .overlay
            .iter()
            .filter(|n| n.addr().is_ipv4() == v4)
            .map(IpNet::to_string)
            .collect();
        if sources.is_empty() {
            continue;
        }
        let routes: Vec<String> = f
            .routes
            .iter()
            .filter(|n| n.addr().is_ipv4() == v4)
            .map(IpNet::to_string)
            .collect();
        let from = format!("{ip} saddr {{ {} }} oifname != {iface}", sources.join(", "));
        if f.snat {
            s.push_str(&format!("    {from} masquerade\n"));
        } else if f.exit {
            // Internet egress only: the subnets see the real sources.
            let except = if routes.is_empty() {
                String::new()
            } else {
                format!(" {ip} daddr != {{ {} }}", routes.join(", "))
            };
            s.push_str(&format!("    {from}{except} masquerade\n"));
        }
    }
    s.push_str("  }\n}\n");
    s
}

fn route(op: &[&str], net: &IpNet, interface: &str, table: Option<u32>) -> anyhow::Result<()> {
    let family = if net.addr().is_ipv4() { "-4" } else { "-6" };
    let dst = net.trunc().to_string();
    let table = table.map(|t| t.to_string());
    let mut args = vec![family, "route"];
    args.extend(op);
    args.extend([dst.as_str(), "dev", interface]);
    if let Some(t) = &table {
        args.extend(["table", t.as_str()]);
    }
    ip(&args)
}

fn rule(family: &str, prio: u32, args: &[&str]) -> anyhow::Result<()> {
    let prio = prio.to_string();
    let mut all = vec![family, "rule", "add", "priority", &prio];
    all.extend(args);
    ip(&all)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn nft(script: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft (install nftables to serve routes)")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarding(snat: bool, exit: bool) -> Forwarding {
        Forwarding {
            routes: vec!["198.19.50.0/24".parse().unwrap()],
            exit,
            snat,
            own: vec![
                "100.64.0.3".parse().unwrap(),
                "fd51:7e2a:9c04::3".parse().unwrap(),
            ],
            overlay: vec![
                "100.64.0.0/10".parse().unwrap(),
                "fd51:7e2a:9c04::/48".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn the_router_table_guards_local_addresses_clamps_mss_and_translates_as_asked() {
        let s = nft_script("zt-r1", &forwarding(true, false));
        assert!(s.starts_with("table inet ztmesh_zt_r1 {}\ndelete table inet ztmesh_zt_r1\n"));
        assert!(s.contains(
            "iifname \"zt-r1\" meta nfproto ipv4 fib daddr type local ip daddr != { 100.64.0.3 } counter drop"
        ));
        assert!(s.contains("ip6 daddr != { fd51:7e2a:9c04::3 } counter drop"));
        assert!(s.contains("oifname \"zt-r1\" tcp flags syn tcp option maxseg size set rt mtu"));
        assert!(s.contains("ip saddr { 100.64.0.0/10 } oifname != \"zt-r1\" masquerade"));
        let plain = nft_script("zt-r1", &forwarding(false, false));
        assert!(!plain.contains("masquerade"), "no SNAT: {plain}");
        let exit = nft_script("zt-r1", &forwarding(false, true));
        assert!(
            exit.contains("oifname != \"zt-r1\" ip daddr != { 198.19.50.0/24 } masquerade"),
            "internet egress is translated, the subnet is not: {exit}"
        );
    }
}
