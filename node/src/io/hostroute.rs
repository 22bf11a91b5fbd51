//! Makes the host match a [`RoutePlan`]: routes into the tunnel interface
//! and exit-node routing (`ip rule` + one routing table), and a router's
//! forwarding (sysctls + one nftables table). Every change is undone by
//! [`HostRoutes::clear`] (on `down`, shutdown, or when the plan no longer
//! asks for it) and leftovers of a crashed daemon by [`HostRoutes::reset`]
//! at start; each piece is replaced only when its part of the plan changed.
//!
//! Offered subnet routes and the exit node's default route live in
//! [`ROUTE_TABLE`], never in the main table, consulted by rules in this
//! order (both families):
//! 1. packets of this node's own WireGuard sockets (marked [`BYPASS_MARK`])
//!    use the main table: encrypted traffic never loops into its tunnel,
//!    whatever a peer's routes cover;
//! 2. the controller and the relays use the main table: no route a peer
//!    offers, and no exit node, locks the node out of its control plane;
//! 3. the main table except its default route (`suppress_prefixlength 0`):
//!    the host's own networks win over offered routes; with an exit node this
//!    rule is there only with `--exit-node-allow-lan-access`;
//! 4. [`ROUTE_TABLE`]: the offered routes, and with an exit node a default
//!    route into the tunnel backed by an `unreachable` default, so when the
//!    tunnel device is gone non-mesh traffic fails instead of leaking.

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::Context as _;
use ipnet::IpNet;

use super::ip;
use crate::routing::{Forwarding, RoutePlan};

/// The mark on this node's WireGuard UDP sockets (`SO_MARK`).
pub const BYPASS_MARK: u32 = 0x5a7e;
/// The routing table of offered routes and the exit node's default route.
pub const ROUTE_TABLE: u32 = 5270;
/// `ip rule` priorities: mark, bypass addresses, host networks, the table.
const PRIO_MARK: u32 = 5200;
const PRIO_BYPASS: u32 = 5210;
const PRIO_LAN: u32 = 5220;
const PRIO_TABLE: u32 = 5270;
/// Metric of the `unreachable` default route under the tunnel's.
const UNREACHABLE_METRIC: &str = "4000000000";
/// The IPv4 forwarding sysctl, and IPv6's (set only when IPv6 is forwarded).
const FORWARD_V4: &str = "/proc/sys/net/ipv4/ip_forward";
const FORWARD_V6: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// The policy rules in force: what bypasses the table, and whether the
/// host's own networks come first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rules {
    bypass: Vec<IpAddr>,
    lan: bool,
}

/// What is installed on the host, to diff the next plan against.
#[derive(Debug)]
pub struct HostRoutes {
    interface: String,
    /// Offered routes in [`ROUTE_TABLE`].
    routes: BTreeSet<IpNet>,
    /// Whether the exit node's default routes are in the table.
    exit: bool,
    rules: Option<Rules>,
    forward: Option<Forwarding>,
    /// The sysctls this node turned on, with the values it found.
    saved_sysctls: Vec<(&'static str, String)>,
}

/// The address families the host has (IPv6 may be disabled).
fn families() -> Vec<&'static str> {
    let v6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|v| v.trim() == "0");
    if v6 {
        vec!["-4", "-6"]
    } else {
        vec!["-4"]
    }
}

impl HostRoutes {
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_string(),
            routes: BTreeSet::new(),
            exit: false,
            rules: None,
            forward: None,
            saved_sysctls: Vec::new(),
        }
    }

    /// Removes what a previous daemon on this interface may have left
    /// (it crashed): the rules, the table, the nftables table.
    pub fn reset(&mut self) {
        self.clear_rules();
        for family in families() {
            let _ = ip(&[family, "route", "flush", "table", &ROUTE_TABLE.to_string()]);
        }
        let _ = nft(&format!(
            "delete table inet {}\n",
            table_name(&self.interface)
        ));
    }

    /// Applies `plan`. A piece that fails is logged and retried with the
    /// next plan; the error names the first failure. Nothing is undone on
    /// failure: a half-installed exit route fails closed.
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
        let fams = families();
        let has = |n: &IpNet| fams.contains(&if n.addr().is_ipv4() { "-4" } else { "-6" });
        let want: BTreeSet<IpNet> = plan.routes.iter().copied().filter(has).collect();
        let rules = (!want.is_empty() || plan.exit.is_some()).then(|| Rules {
            bypass: plan.bypass.clone(),
            lan: plan.exit.as_ref().is_none_or(|e| e.allow_lan),
        });
        // Table first, then rules: a route is never consulted half-built.
        for gone in self.routes.difference(&want).copied().collect::<Vec<_>>() {
            note(self.table_route(&["del"], &gone.to_string(), family_of(&gone)));
            self.routes.remove(&gone);
        }
        for new in want.difference(&self.routes).copied().collect::<Vec<_>>() {
            match self.table_route(&["replace"], &new.to_string(), family_of(&new)) {
                Ok(()) => {
                    self.routes.insert(new);
                }
                Err(e) => note(Err(e)),
            }
        }
        if plan.exit.is_some() != self.exit {
            if plan.exit.is_some() {
                note(self.install_exit_routes(&fams));
                self.exit = true;
            } else {
                self.remove_exit_routes(&fams);
                self.exit = false;
            }
        }
        if self.rules != rules {
            self.clear_rules();
            if let Some(r) = &rules {
                note(install_rules(r, &fams));
                tracing::info!(bypass = ?r.bypass, lan = r.lan, exit = self.exit, "policy routing on");
            }
            self.rules = rules;
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
        // Rules first: nothing is sent into a table being emptied.
        self.clear_rules();
        self.rules = None;
        for family in families() {
            let _ = ip(&[family, "route", "flush", "table", &ROUTE_TABLE.to_string()]);
        }
        self.routes.clear();
        self.exit = false;
        self.clear_forwarding();
    }

    fn table_route(&self, op: &[&str], dst: &str, family: &str) -> anyhow::Result<()> {
        let table = ROUTE_TABLE.to_string();
        let mut args = vec![family, "route"];
        args.extend(op);
        args.extend([dst, "dev", self.interface.as_str(), "table", &table]);
        ip(&args)
    }

    fn install_exit_routes(&self, fams: &[&str]) -> anyhow::Result<()> {
        let table = ROUTE_TABLE.to_string();
        for family in fams {
            let default = if *family == "-4" { "0.0.0.0/0" } else { "::/0" };
            ip(&[
                family,
                "route",
                "replace",
                "unreachable",
                default,
                "table",
                &table,
                "metric",
                UNREACHABLE_METRIC,
            ])?;
            self.table_route(&["replace"], default, family)?;
        }
        Ok(())
    }

    fn remove_exit_routes(&self, fams: &[&str]) {
        let table = ROUTE_TABLE.to_string();
        for family in fams {
            let default = if *family == "-4" { "0.0.0.0/0" } else { "::/0" };
            let _ = self.table_route(&["del"], default, family);
            let _ = ip(&[
                family,
                "route",
                "del",
                "unreachable",
                default,
                "table",
                &table,
                "metric",
                UNREACHABLE_METRIC,
            ]);
        }
    }

    fn clear_rules(&self) {
        for family in ["-4", "-6"] {
            for prio in [PRIO_MARK, PRIO_BYPASS, PRIO_LAN, PRIO_TABLE] {
                // Several rules may share a priority; bounded by the most
                // one plan installs (the bypass list is short).
                for _ in 0..64 {
                    if ip(&[family, "rule", "del", "priority", &prio.to_string()]).is_err() {
                        break;
                    }
                }
            }
        }
    }

    fn install_forwarding(&mut self, f: &Forwarding) -> anyhow::Result<()> {
        let v6 = f.exit || f.routes.iter().any(|r| r.addr().is_ipv6());
        let mut wanted = vec![FORWARD_V4];
        if v6 && families().contains(&"-6") {
            wanted.push(FORWARD_V6);
        }
        for path in wanted {
            let old = std::fs::read_to_string(path)
                .with_context(|| format!("reading {path}"))?
                .trim()
                .to_string();
            if old != "1" {
                std::fs::write(path, "1\n")
                    .with_context(|| format!("enabling forwarding ({path})"))?;
                tracing::info!(sysctl = path, "forwarding enabled");
                if !self.saved_sysctls.iter().any(|(p, _)| *p == path) {
                    self.saved_sysctls.push((path, old));
                }
            }
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
            // Only what this node turned on goes back.
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

fn family_of(n: &IpNet) -> &'static str {
    if n.addr().is_ipv4() {
        "-4"
    } else {
        "-6"
    }
}

fn install_rules(r: &Rules, fams: &[&str]) -> anyhow::Result<()> {
    let mark = format!("{BYPASS_MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    for family in fams {
        rule(family, PRIO_MARK, &["fwmark", &mark, "lookup", "main"])?;
        for a in r.bypass.iter().filter(|a| a.is_ipv4() == (*family == "-4")) {
            let to = a.to_string();
            rule(family, PRIO_BYPASS, &["to", &to, "lookup", "main"])?;
        }
        if r.lan {
            rule(
                family,
                PRIO_LAN,
                &["lookup", "main", "suppress_prefixlength", "0"],
            )?;
        }
        rule(family, PRIO_TABLE, &["lookup", &table])?;
    }
    Ok(())
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
    // The input hook sees only what is delivered locally: from the tunnel,
    // that is the node's own overlay addresses and nothing else (not its
    // underlay, not a broadcast, not an anycast address).
    for (ip, v4) in [("ip", true), ("ip6", false)] {
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
        let proto = if v4 { "ipv4" } else { "ipv6" };
        s.push_str(&format!(
            "    iifname {iface} meta nfproto {proto}{except} counter drop\n"
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

fn rule(family: &str, prio: u32, args: &[&str]) -> anyhow::Result<()> {
    let prio = prio.to_string();
    let mut all = vec![family, "rule", "add", "priority", &prio];
    all.extend(args);
    ip(&all)
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
            "iifname \"zt-r1\" meta nfproto ipv4 ip daddr != { 100.64.0.3 } counter drop"
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
