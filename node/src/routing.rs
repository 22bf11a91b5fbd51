//! Subnet routes and exit nodes on the node (issue 12): the user's choices
//! ([`Prefs`], from `ztmesh up` flags, kept in `prefs.json`) and what the
//! host must look like for a given netmap ([`plan`]). Pure: no I/O; the
//! shell that makes the host match a [`RoutePlan`] is
//! [`crate::io::hostroute`].
//!
//! - A **client** routes each subnet route a peer offers it (the prefixes in
//!   the peer's AllowedIPs outside the overlay) into the tunnel, and with
//!   `--exit-node NAME` everything else too, except the controller, the
//!   relays and its own encrypted traffic (so it never locks itself out),
//!   and, with `--exit-node-allow-lan-access`, the networks its own routing
//!   table reaches without a default route.
//! - A **router** (the map's `self_node.routes`) or **exit node**
//!   (`self_node.exit_node`) forwards what its inbound rules admit: the
//!   packet filter checks source, destination and port before the packet
//!   reaches the kernel, which forwards it (with source NAT unless
//!   `--snat-subnet-routes=false`; always for internet egress), clamping the
//!   TCP MSS to the path MTU. A forwarded flow never ends on the router
//!   itself: anything from the tunnel to one of its local addresses other
//!   than its overlay addresses is dropped by the kernel firewall.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Routes one node may advertise at most (the controller's limit too).
pub const MAX_ROUTES: usize = 64;

/// The user's routing and DNS choices, as `ztmesh up` set them last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Prefs {
    /// Subnets behind this node offered to the mesh (canonical CIDRs).
    pub advertise_routes: Vec<IpNet>,
    /// Offer this node as an exit node.
    pub advertise_exit_node: bool,
    /// The exit node this node sends non-mesh traffic through (a peer's
    /// name or overlay address).
    pub exit_node: Option<String>,
    /// With an exit node: keep reaching the networks the host's own routing
    /// table reaches without its default route.
    pub exit_node_allow_lan_access: bool,
    /// As a router: rewrite the source of forwarded traffic to the router's
    /// own address, so the subnet needs no route back to the overlay.
    pub snat_subnet_routes: bool,
    /// Answer DNS on 100.100.100.100 and point the host's resolver at it.
    pub accept_dns: bool,
    /// Report this node's posture attributes to the controller (see
    /// [`crate::posture`]); off, the last report goes stale.
    pub report_posture: bool,
}

impl Default for Prefs {
    fn default() -> Self {
        Self {
            advertise_routes: Vec::new(),
            advertise_exit_node: false,
            exit_node: None,
            exit_node_allow_lan_access: false,
            snat_subnet_routes: true,
            accept_dns: true,
            report_posture: true,
        }
    }
}

/// The flags of one `ztmesh up`: `None` keeps the current choice; an empty
/// text clears a list or the exit node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefsUpdate {
    /// Comma-separated CIDRs.
    pub advertise_routes: Option<String>,
    pub advertise_exit_node: Option<bool>,
    pub exit_node: Option<String>,
    pub exit_node_allow_lan_access: Option<bool>,
    pub snat_subnet_routes: Option<bool>,
    pub accept_dns: Option<bool>,
    pub report_posture: Option<bool>,
}

/// A route the node itself refuses to advertise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("--advertise-routes: {0:?} is not a CIDR (e.g. 198.19.50.0/24)")]
    NotCidr(String),
    #[error("--advertise-routes: {given} has host bits set; use {canonical}")]
    NotCanonical { given: String, canonical: String },
    #[error("--advertise-routes: {0} is a default route; use --advertise-exit-node")]
    Default(String),
    #[error("--advertise-routes: {route} overlaps the mesh's overlay range {overlay}")]
    Overlay { route: String, overlay: String },
    #[error("--advertise-routes: {route} covers the controller's address {controller}")]
    Controller { route: String, controller: IpAddr },
    #[error("--advertise-routes: at most {MAX_ROUTES} routes")]
    TooMany,
}

/// Parses `--advertise-routes` text: comma-separated canonical CIDRs, none
/// a default route, none overlapping `overlay` or covering `controller`
/// (the controller checks the same, and the relays' addresses).
///
/// # Errors
/// [`RouteError`] naming the first bad route.
pub fn parse_routes(
    text: &str,
    overlay: &[IpNet],
    controller: Option<IpAddr>,
) -> Result<Vec<IpNet>, RouteError> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let net: IpNet = item
            .parse()
            .map_err(|_| RouteError::NotCidr(item.to_string()))?;
        if net.trunc() != net {
            return Err(RouteError::NotCanonical {
                given: item.to_string(),
                canonical: net.trunc().to_string(),
            });
        }
        if net.prefix_len() == 0 {
            return Err(RouteError::Default(item.to_string()));
        }
        if let Some(o) = overlay
            .iter()
            .find(|o| o.contains(&net) || net.contains(*o))
        {
            return Err(RouteError::Overlay {
                route: item.to_string(),
                overlay: o.to_string(),
            });
        }
        if let Some(c) = controller.filter(|c| net.contains(c)) {
            return Err(RouteError::Controller {
                route: item.to_string(),
                controller: c,
            });
        }
        out.push(net);
    }
    out.sort();
    out.dedup();
    if out.len() > MAX_ROUTES {
        return Err(RouteError::TooMany);
    }
    Ok(out)
}

impl Prefs {
    /// These prefs with `u` applied.
    ///
    /// # Errors
    /// [`RouteError`] for a bad `--advertise-routes`; nothing changes then.
    pub fn updated(
        &self,
        u: &PrefsUpdate,
        overlay: &[IpNet],
        controller: Option<IpAddr>,
    ) -> Result<Prefs, RouteError> {
        let mut p = self.clone();
        if let Some(text) = &u.advertise_routes {
            p.advertise_routes = parse_routes(text, overlay, controller)?;
        }
        if let Some(v) = u.advertise_exit_node {
            p.advertise_exit_node = v;
        }
        if let Some(name) = &u.exit_node {
            let name = name.trim();
            p.exit_node = (!name.is_empty()).then(|| name.to_string());
        }
        if let Some(v) = u.exit_node_allow_lan_access {
            p.exit_node_allow_lan_access = v;
        }
        if let Some(v) = u.snat_subnet_routes {
            p.snat_subnet_routes = v;
        }
        if let Some(v) = u.accept_dns {
            p.accept_dns = v;
        }
        if let Some(v) = u.report_posture {
            p.report_posture = v;
        }
        Ok(p)
    }

    /// What the node advertises to the controller: its subnet routes and
    /// whether it offers itself as an exit node.
    pub fn advertisement(&self) -> (Vec<IpNet>, bool) {
        (self.advertise_routes.clone(), self.advertise_exit_node)
    }

    /// Whether going from these prefs to `new` changes what the host and
    /// the data plane are configured from: anything but `report_posture`,
    /// which only the posture reporter reads.
    pub fn host_changed(&self, new: &Prefs) -> bool {
        let same_posture = Prefs {
            report_posture: self.report_posture,
            ..new.clone()
        };
        *self != same_posture
    }
}

/// Whether `net` is a default route (`0.0.0.0/0` or `::/0`).
pub fn is_default(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// What the host must look like: routes into the tunnel, exit-node
/// routing, forwarding.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Subnet routes of peers, routed into the tunnel interface (sorted).
    pub routes: Vec<IpNet>,
    /// Addresses reached outside the tunnel whatever a peer offers or the
    /// exit node carries: the controller and the relays (sorted).
    pub bypass: Vec<IpAddr>,
    /// Everything else through an exit node.
    pub exit: Option<ExitRouting>,
    /// This node forwards for others.
    pub forward: Option<Forwarding>,
}

/// A client's default route through its exit node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRouting {
    /// Keep the host's non-default routes (its LANs) outside the tunnel.
    pub allow_lan: bool,
}

/// A router or exit node's forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    /// The routes this node serves.
    pub routes: Vec<IpNet>,
    /// Whether it is an exit node.
    pub exit: bool,
    /// Source NAT for traffic to the subnet routes (internet egress is
    /// always translated).
    pub snat: bool,
    /// This node's overlay addresses: the only local addresses the tunnel
    /// may reach.
    pub own: Vec<IpAddr>,
    /// The overlay prefixes (peers' sources).
    pub overlay: Vec<IpNet>,
}

/// What a netmap offers this node, as [`crate::control::apply::translate`]
/// reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offered {
    /// Peers' subnet routes (non-default prefixes outside the overlay).
    pub routes: Vec<IpNet>,
    /// Whether the exit node the user chose offers itself to this node.
    pub exit_usable: bool,
    /// The routes this node serves.
    pub serves: Vec<IpNet>,
    /// Whether this node is an approved exit node.
    pub is_exit: bool,
}

/// The plan for `offered` under `prefs`. `bypass` holds the controller's
/// and relays' addresses; `own` this node's overlay addresses.
///
/// The exit route stays in place while the chosen exit node is missing from
/// the map (offline, or no longer granted): non-mesh traffic then goes
/// nowhere rather than leaking outside the tunnel the user asked for.
pub fn plan(
    offered: &Offered,
    prefs: &Prefs,
    mut bypass: Vec<IpAddr>,
    own: &[IpAddr],
    overlay: &[IpNet],
) -> RoutePlan {
    bypass.sort();
    bypass.dedup();
    let exit = prefs.exit_node.as_ref().map(|_| ExitRouting {
        allow_lan: prefs.exit_node_allow_lan_access,
    });
    let forward = (!offered.serves.is_empty() || offered.is_exit).then(|| Forwarding {
        routes: offered.serves.clone(),
        exit: offered.is_exit,
        snat: prefs.snat_subnet_routes,
        own: own.to_vec(),
        overlay: overlay.to_vec(),
    });
    let mut routes = offered.routes.clone();
    routes.sort();
    routes.dedup();
    RoutePlan {
        routes,
        bypass,
        exit,
        forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> Vec<IpNet> {
        vec![
            "100.64.0.0/10".parse().unwrap(),
            "fd51:7e2a:9c04::/48".parse().unwrap(),
        ]
    }

    fn routes(text: &str) -> Result<Vec<IpNet>, RouteError> {
        parse_routes(text, &overlay(), Some("198.18.0.1".parse().unwrap()))
    }

    #[test]
    fn advertised_routes_must_be_canonical_and_clear_of_the_mesh() {
        assert_eq!(
            routes("198.19.51.0/24, 198.19.50.0/24,198.19.50.0/24").unwrap(),
            vec![
                "198.19.50.0/24".parse::<IpNet>().unwrap(),
                "198.19.51.0/24".parse().unwrap()
            ]
        );
        assert!(routes("").unwrap().is_empty(), "empty clears");
        let err = |t: &str| routes(t).unwrap_err().to_string();
        assert_eq!(
            err("198.19.50.1/24"),
            "--advertise-routes: 198.19.50.1/24 has host bits set; use 198.19.50.0/24"
        );
        assert!(err("0.0.0.0/0").contains("--advertise-exit-node"));
        assert!(err("::/0").contains("default route"));
        assert!(err("100.64.0.0/16").contains("overlay range 100.64.0.0/10"));
        assert!(err("100.0.0.0/8").contains("overlay"), "covering it too");
        assert!(err("fd51:7e2a:9c04:1::/64").contains("overlay"));
        assert!(err("198.18.0.0/24").contains("controller's address 198.18.0.1"));
        assert!(err("web").contains("not a CIDR"));
        assert!(err("198.19.50.0").contains("not a CIDR"), "a bare address");
        let many: Vec<String> = (0..65).map(|i| format!("198.19.{i}.0/24")).collect();
        assert_eq!(routes(&many.join(",")), Err(RouteError::TooMany));
    }

    #[test]
    fn up_flags_change_only_what_they_name_and_a_bad_route_changes_nothing() {
        let p = Prefs::default();
        assert!(
            p.snat_subnet_routes && p.accept_dns && p.report_posture,
            "defaults as Tailscale"
        );
        let u = PrefsUpdate {
            advertise_routes: Some("198.19.50.0/24".into()),
            exit_node: Some("gw".into()),
            ..PrefsUpdate::default()
        };
        let p = p.updated(&u, &overlay(), None).unwrap();
        assert_eq!(p.advertise_routes.len(), 1);
        assert_eq!(p.exit_node.as_deref(), Some("gw"));
        let p2 = p
            .updated(
                &PrefsUpdate {
                    accept_dns: Some(false),
                    ..PrefsUpdate::default()
                },
                &overlay(),
                None,
            )
            .unwrap();
        assert_eq!(p2.advertise_routes, p.advertise_routes, "kept");
        assert!(!p2.accept_dns);
        let quiet = p2
            .updated(
                &PrefsUpdate {
                    report_posture: Some(false),
                    ..PrefsUpdate::default()
                },
                &overlay(),
                None,
            )
            .unwrap();
        assert!(
            !quiet.report_posture && !quiet.accept_dns,
            "only what is named"
        );
        // Turning posture reports off or on touches neither the host nor
        // what is advertised; anything else does.
        assert!(!p2.host_changed(&quiet) && !quiet.host_changed(&p2));
        assert_eq!(p2.advertisement(), quiet.advertisement());
        assert!(p.host_changed(&p2), "accept_dns");
        assert_eq!(p.advertisement(), p2.advertisement(), "not advertised");
        assert!(!p.host_changed(&p));
        let cleared = p2
            .updated(
                &PrefsUpdate {
                    advertise_routes: Some(String::new()),
                    exit_node: Some(" ".into()),
                    ..PrefsUpdate::default()
                },
                &overlay(),
                None,
            )
            .unwrap();
        assert!(cleared.advertise_routes.is_empty() && cleared.exit_node.is_none());
        assert_ne!(cleared.advertisement(), p2.advertisement());
        let bad = PrefsUpdate {
            advertise_routes: Some("198.19.50.0/24,0.0.0.0/0".into()),
            exit_node: Some("other".into()),
            ..PrefsUpdate::default()
        };
        assert!(p.updated(&bad, &overlay(), None).is_err());
        // Stored prefs from an older version (fields missing) take defaults.
        let old: Prefs = serde_json::from_str(r#"{"advertise_exit_node": true}"#).unwrap();
        assert!(old.advertise_exit_node && old.snat_subnet_routes && old.report_posture);
    }

    #[test]
    fn the_plan_routes_offers_forwards_what_is_served_and_keeps_a_missing_exit_closed() {
        let own: Vec<IpAddr> = vec!["100.64.0.1".parse().unwrap()];
        let ctl: IpAddr = "198.18.0.1".parse().unwrap();
        let relay: IpAddr = "198.18.0.9".parse().unwrap();
        let offered = Offered {
            routes: vec![
                "198.19.51.0/24".parse().unwrap(),
                "198.19.50.0/24".parse().unwrap(),
            ],
            ..Offered::default()
        };
        let plain = plan(&offered, &Prefs::default(), vec![ctl], &own, &overlay());
        assert_eq!(plain.routes[0], "198.19.50.0/24".parse::<IpNet>().unwrap());
        assert!(plain.exit.is_none() && plain.forward.is_none());
        let prefs = Prefs {
            exit_node: Some("gw".into()),
            ..Prefs::default()
        };
        // The exit node is not offered (exit_usable false): the exit route
        // stays, fail closed.
        let p = plan(&offered, &prefs, vec![relay, ctl, ctl], &own, &overlay());
        assert_eq!(p.exit, Some(ExitRouting { allow_lan: false }));
        assert_eq!(p.bypass, vec![ctl, relay], "sorted, no duplicates");
        let router = Offered {
            serves: vec!["198.19.50.0/24".parse().unwrap()],
            ..Offered::default()
        };
        let no_snat = Prefs {
            snat_subnet_routes: false,
            ..Prefs::default()
        };
        let f = plan(&router, &no_snat, vec![], &own, &overlay())
            .forward
            .unwrap();
        assert!(!f.snat && !f.exit && f.own == own);
        let exit = Offered {
            is_exit: true,
            ..Offered::default()
        };
        assert!(
            plan(&exit, &Prefs::default(), vec![], &own, &overlay())
                .forward
                .unwrap()
                .exit
        );
    }
}
