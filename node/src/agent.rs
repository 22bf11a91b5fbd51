//! `ztmesh daemon`: enrollment state, the control loop, the data plane in
//! managed mode, and the local API.
//!
//! State dir (0700): `machine.key` and `wg.key` (0600), `enrollment.json`
//! (controller URL, pinned fingerprint and netmap key, node id and addresses),
//! `netmap.bin` (the last verified signed netmap, so the data plane comes back
//! with it after a restart while the controller is down), `prefs.json` (the
//! routing and DNS choices of the last `ztmesh up`, see [`Prefs`]) and `down`
//! (present after `ztmesh down`).
//!
//! A node enrolls with an auth key (`Control.Enroll`) or, without one, by
//! an interactive login (`Control.Login`: the CLI shows a URL and code, a
//! person signs in). When the controller says the node's key expired, the
//! node drops its peers but keeps its enrollment and keys; the next `ztmesh
//! up` re-authenticates the same node, either way.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ipnet::IpNet;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use ztmesh_proto::auth::{self, KeyToken};
use ztmesh_proto::control::{self as pb, NetMap, SignedNetMap};
use ztmesh_proto::keys::{write_secret_file, PublicKey, SigningKey, WgPrivateKey, WgPublicKey};
use ztmesh_proto::netmap;
use ztmesh_proto::time::now_ms;

use crate::control::apply::{overlay_prefixes, RefusedMap, Translated};
use crate::control::login::{self, parse_address, Enrolled, EXPIRED_MESSAGE, FINGERPRINT_HINT};
use crate::control::{
    clock_hint, next_controller, reconnect_delay, session_end, translate, Backoff, Controller,
    Identity, Install, NetMapGate, SessionEnd, Step, FAILOVER_AFTER,
};
use crate::dns::hostcfg::{HostDns, Resolved};
use crate::dns::server::DnsServer;
use crate::dns::{self, Zone, MAGIC_DNS_ADDR};
use crate::io::hostroute::HostRoutes;
use crate::io::{interface_addresses, DataPlane, DataPlaneConfig, RelaySetup};
use crate::localapi::{authorize, to_line, Caller, Progress, Request, Response, MAX_LINE};
use crate::nat::discovery::{stun_servers, with_primary, EndpointReporter, STUN_INTERVAL};
use crate::posture::collect::Collector;
use crate::posture::{self, AttrSet, Collection, PostureReporter};
use crate::routing::{self, Offered, Prefs, PrefsUpdate};
use crate::tunnel::Destination;

/// How often denied-flow summaries are sent to the controller.
const FLOW_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Denied flows and unknown handshakes are evidence for the controller's
/// detectors: they go out this soon (allowed flows wait for the regular
/// report).
const EVIDENCE_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often the endpoint candidates are compared with the last report
/// (reports themselves are rate-limited by [`EndpointReporter`]).
const ENDPOINT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a session waits for STUN answers before its first endpoint report.
const DISCOVERY_SETTLE: Duration = Duration::from_secs(1);
/// How often a session asks [`PostureReporter`] whether a report is due.
const POSTURE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait for the controller to answer a `ReportPosture` (the session
/// loop waits for it); then the report counts as failed and is retried.
const POSTURE_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the controller to take a `NetMapApplied` (the session
/// loop waits for it); a late one only loses a latency sample.
const NETMAP_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Most lines of a `ReportPosture` answer kept for `status` and the log.
const MAX_CLIPPED_LINES: usize = 32;
/// How long `status` waits for the data plane's lock before reporting
/// without it.
const STATUS_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Daemon settings (every path and name is a flag, so several daemons can run
/// on one machine in separate network namespaces).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
    pub uapi_dir: Option<PathBuf>,
    /// Group allowed to use the local API (socket mode 0660); root-only otherwise.
    pub socket_gid: Option<u32>,
    /// Group whose members may send privileged requests (see
    /// [`crate::localapi::authorize`]); root only otherwise.
    pub operator_gid: Option<u32>,
    /// STUN servers asked for this node's reflexive address, besides those
    /// the netmap names.
    pub stun_servers: Vec<SocketAddr>,
    /// The host's resolver configuration (managed while MagicDNS is on
    /// and systemd-resolved is absent).
    pub resolv_conf: PathBuf,
    /// Where `/metrics` is served (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
}

/// Where `daemon --metrics-listen` without an address serves `/metrics`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9465";

/// What the node keeps about its enrollment, parsed once when
/// `enrollment.json` is read (stored as [`EnrollmentFile`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "EnrollmentFile", into = "EnrollmentFile")]
pub struct Enrollment {
    /// The controller this node talks to now (it moves on failover).
    pub controller_url: String,
    /// Every controller of the mesh, as the last netmap (or `up
    /// --controller A,B`) listed them; empty: only `controller_url`.
    pub controllers: Vec<String>,
    /// SHA-256 of the controller's TLS certificate (the pin).
    pub fingerprint: [u8; 32],
    /// The pins the last signed map that listed any gave (a TLS
    /// certificate rotation), current first; accepted besides
    /// `fingerprint`, which is never dropped.
    pub tls_pins: Vec<[u8; 32]>,
    /// The controller's netmap signing key.
    pub controller_key: PublicKey,
    pub node_id: u64,
    pub name: String,
    /// This node's overlay addresses.
    pub addresses: Vec<IpNet>,
}

/// `enrollment.json` on disk: the fingerprint in hex, the key in base64, the
/// addresses as text (a host address bare, as the controller sends it).
#[derive(Serialize, Deserialize)]
pub struct EnrollmentFile {
    controller_url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    controllers: Vec<String>,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tls_pins: Vec<String>,
    controller_key: String,
    node_id: u64,
    name: String,
    addresses: Vec<String>,
}

/// A field of `enrollment.json` that does not parse: the file is corrupt;
/// re-enroll (`ztmesh logout`, then `ztmesh up`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {field} {value:?}")]
pub struct EnrollmentError {
    pub field: &'static str,
    pub value: String,
}

impl Enrollment {
    /// Every certificate pin this node accepts: the learned ones (current
    /// first, so the controller is asked for it), then the enrolled one.
    pub fn pins(&self) -> Vec<[u8; 32]> {
        let mut pins = self.tls_pins.clone();
        if !pins.contains(&self.fingerprint) {
            pins.push(self.fingerprint);
        }
        pins
    }

    /// The enrollment the controller at `controller_url` (pinned to
    /// `fingerprint`) answered.
    fn new(controller_url: &str, fingerprint: [u8; 32], e: Enrolled) -> Self {
        Enrollment {
            controller_url: controller_url.to_string(),
            controllers: Vec::new(),
            fingerprint,
            tls_pins: Vec::new(),
            controller_key: e.controller_key,
            node_id: e.node_id,
            name: e.name,
            addresses: e.addresses,
        }
    }
}

impl TryFrom<EnrollmentFile> for Enrollment {
    type Error = EnrollmentError;

    fn try_from(f: EnrollmentFile) -> Result<Self, EnrollmentError> {
        let bad = |field, value: &str| EnrollmentError {
            field,
            value: value.to_string(),
        };
        let fingerprint = auth::parse_fingerprint(&f.fingerprint)
            .ok_or_else(|| bad("fingerprint", &f.fingerprint))?;
        let tls_pins = f
            .tls_pins
            .iter()
            .map(|p| auth::parse_fingerprint(p).ok_or_else(|| bad("tls_pins", p)))
            .collect::<Result<_, _>>()?;
        let controller_key = f
            .controller_key
            .parse()
            .map_err(|_| bad("controller_key", &f.controller_key))?;
        let addresses = f
            .addresses
            .iter()
            .map(|a| parse_address(a).ok_or_else(|| bad("addresses", a)))
            .collect::<Result<_, _>>()?;
        Ok(Enrollment {
            controller_url: f.controller_url,
            controllers: f.controllers,
            fingerprint,
            tls_pins,
            controller_key,
            node_id: f.node_id,
            name: f.name,
            addresses,
        })
    }
}

impl From<Enrollment> for EnrollmentFile {
    fn from(e: Enrollment) -> Self {
        EnrollmentFile {
            controller_url: e.controller_url,
            controllers: e.controllers,
            fingerprint: auth::hex(&e.fingerprint),
            tls_pins: e.tls_pins.iter().map(|p| auth::hex(p)).collect(),
            controller_key: e.controller_key.to_string(),
            node_id: e.node_id,
            name: e.name,
            addresses: e.addresses.iter().map(address_text).collect(),
        }
    }
}

/// The text of an overlay address: bare for a single host (as the controller
/// sends it), a prefix otherwise.
fn address_text(a: &IpNet) -> String {
    if a.prefix_len() == a.max_prefix_len() {
        a.addr().to_string()
    } else {
        a.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnState {
    Idle,
    Connecting { attempt: u32, last_error: String },
    Connected { since_ms: i64 },
}

struct State {
    enrollment: Option<Enrollment>,
    netmap: Option<NetMap>,
    netmap_received_ms: i64,
    conn: ConnState,
    control_task: Option<tokio::task::JoinHandle<()>>,
    refused_maps: u64,
    /// The controller's addresses as last resolved (its URL may name a
    /// host): routed outside the tunnel whatever the routes.
    controller_addrs: Vec<IpAddr>,
    /// When this node's key expires (Unix ms, 0 = never), from the last
    /// map or enrollment; `None` until one says.
    key_expiry_ms: Option<i64>,
    /// An `up` is enrolling or re-authenticating (an interactive login may
    /// wait minutes for a person); a second one is refused meanwhile.
    enrolling: bool,
    /// The last posture report the controller took.
    posture_sent: Option<PostureSent>,
    /// Why the last posture collection left attributes out (for `status`).
    posture_unreported: BTreeMap<&'static str, String>,
}

/// A posture report the controller took (for `status`).
struct PostureSent {
    at_ms: i64,
    attributes: AttrSet,
    /// What the controller clipped or dropped of it, one line each.
    clipped: Vec<String>,
}

/// The node's private keys.
struct Keys {
    machine: Arc<SigningKey>,
    wg: WgPrivateKey,
}

impl Keys {
    fn load_or_generate(state_dir: &Path) -> anyhow::Result<Keys> {
        Ok(Keys {
            machine: Arc::new(SigningKey::load_or_generate(
                &state_dir.join("machine.key"),
            )?),
            wg: WgPrivateKey::load_or_generate(&state_dir.join("wg.key"))?,
        })
    }
}

struct Daemon {
    cfg: DaemonConfig,
    /// The user's routing and DNS choices (`prefs.json`); a session
    /// re-advertises when they change.
    prefs: watch::Sender<Prefs>,
    /// Routes, exit-node routing and forwarding installed on the host.
    host: Mutex<HostRoutes>,
    /// MagicDNS while it is on.
    dns: Mutex<Option<MagicDns>>,
    /// Replaced (on disk and here) by `logout`, so the next `up` enrolls a
    /// fresh identity that survives a restart.
    keys: Mutex<Arc<Keys>>,
    state: Mutex<State>,
    dp: tokio::sync::Mutex<Option<DataPlane>>,
    /// Serial of the last netmap applied from a live controller session.
    live_serial: watch::Sender<u64>,
    /// Streams ask for netmap deltas; off for the life of the process once
    /// one was refused (a controller whose maps this node cannot re-encode,
    /// e.g. a newer schema, would otherwise cost a reconnect per change).
    deltas: std::sync::atomic::AtomicBool,
    /// The controller's message while it refuses this node because its key
    /// expired (peers dropped; `ztmesh up` signs in again); `None` otherwise.
    expired: watch::Sender<Option<String>>,
    /// Reads the posture attributes (on a blocking thread); kept across
    /// sessions for its cached `apt-get` count.
    posture: Arc<Mutex<Collector>>,
}

/// Aborts a task when dropped: a session's helper tasks end with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The CLI on the other end of a local API request: where progress lines
/// go (if it asked for them), and whether it hung up.
struct Link {
    progress: Option<tokio::sync::mpsc::Sender<Progress>>,
    hung_up: watch::Receiver<bool>,
}

impl Link {
    /// Resolves once the client has closed its end of the socket.
    async fn hung_up(&mut self) {
        if self.hung_up.wait_for(|gone| *gone).await.is_err() {
            // The watcher is gone without saying: the request is over anyway.
            std::future::pending::<()>().await;
        }
    }
}

/// Clears [`State::enrolling`] when the `up` that set it ends, however.
struct Enrolling<'a>(&'a Daemon);

impl Drop for Enrolling<'_> {
    fn drop(&mut self) {
        self.0.lock().enrolling = false;
    }
}

/// What `ztmesh up` asked for (see [`Request::Up`]).
struct UpArgs {
    controller: Option<String>,
    auth_key: Option<String>,
    hostname: Option<String>,
    fingerprint: Option<String>,
    timeout: Duration,
    login_timeout: Duration,
    force_reauth: bool,
    prefs: PrefsUpdate,
}

/// MagicDNS: the server on 100.100.100.100 and how the host was pointed
/// at it.
struct MagicDns {
    server: DnsServer,
    /// The resolvers the host used before (or the backup's, after a crash).
    upstreams: Vec<SocketAddr>,
    host: HostMode,
    /// The mesh domain and split suffixes the host configuration names.
    applied: Option<(String, Vec<String>)>,
}

/// The resolver configuration MagicDNS manages (see [`Daemon::host_dns_mode`]).
enum HostMode {
    /// systemd-resolved, per-link settings on the tunnel interface.
    Resolved(Resolved),
    /// The resolv.conf file, rewritten in place with a backup.
    File,
    /// Neither: the file is the host's while this daemon runs in a network
    /// namespace (why, for the log and `status`).
    Untouched(String),
}

impl HostMode {
    fn describe(&self) -> String {
        match self {
            HostMode::Resolved(_) => "systemd-resolved".into(),
            HostMode::File => "resolv.conf".into(),
            HostMode::Untouched(why) => format!("untouched: {why}"),
        }
    }
}

/// The resolver configuration file the daemon manages by default.
const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

impl Daemon {
    fn path(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(name)
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_enrollment(&self) -> anyhow::Result<Option<Enrollment>> {
        match std::fs::read(self.path("enrollment.json")) {
            Ok(b) => Ok(Some(
                serde_json::from_slice(&b).context("enrollment.json is corrupt")?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// What a netmap's `self_node` must name: our enrolled id and current keys.
    fn identity(&self, e: &Enrollment) -> Identity {
        let keys = self.keys();
        Identity {
            node_id: Some(e.node_id).filter(|id| *id != 0),
            machine: keys.machine.public(),
            wg: keys.wg.public(),
        }
    }

    /// Loads the stored netmap if its signature still verifies and it has not expired.
    fn load_cached_netmap(&self, e: &Enrollment) -> Option<(NetMap, SignedNetMap)> {
        let bytes = std::fs::read(self.path("netmap.bin")).ok()?;
        let signed = SignedNetMap::decode(bytes.as_slice()).ok()?;
        // A map stored just before its hand-over was saved still passes
        // (within the grace period).
        match netmap::verify_signature_rotating(&e.controller_key, &signed, now_ms())
            .map(|(m, _)| m)
        {
            Ok(m) if self.identity(e).check(&m).is_err() => {
                tracing::error!("stored netmap is for another node; starting with no peers");
                None
            }
            Ok(m) if m.not_after_ms > now_ms() => Some((m, signed)),
            Ok(_) => {
                tracing::warn!("stored netmap has expired; starting with no peers");
                None
            }
            Err(err) => {
                tracing::error!(error = %err, "stored netmap refused");
                None
            }
        }
    }

    async fn ensure_dataplane(&self, e: &Enrollment) -> anyhow::Result<()> {
        let mut dp = self.dp.lock().await;
        if dp.is_some() {
            return Ok(());
        }
        let addresses = e.addresses.clone();
        let mut routes: Vec<IpNet> = vec!["100.64.0.0/10".parse().expect("static prefix")];
        for a in &addresses {
            if let IpNet::V6(v6) = a {
                if let Ok(ula) = ipnet::Ipv6Net::new(v6.addr(), 48) {
                    routes.push(IpNet::V6(ula.trunc()));
                }
            }
        }
        let plane = DataPlane::start(DataPlaneConfig {
            interface: self.cfg.interface.clone(),
            mtu: self.cfg.mtu,
            private_key: self.keys().wg.clone(),
            listen_port: self.cfg.listen_port,
            addresses,
            routes,
            uapi_dir: self.cfg.uapi_dir.clone(),
            managed: true,
        })
        .await
        .context("starting the data plane")?;
        // Default deny until a netmap says otherwise.
        install(&plane, Install::Empty);
        plane.set_stun_servers(self.cfg.stun_servers.clone());
        // Before any map: a chosen exit node's route is in place (failing
        // closed) from the start, not only once a map arrives.
        self.route_host(&plane, &Offered::default(), &e.addresses, &[]);
        *dp = Some(plane);
        Ok(())
    }

    /// Passes a netmap through the gate and applies it; returns its serial.
    async fn apply(&self, signed: &SignedNetMap, gate: &mut NetMapGate) -> anyhow::Result<u64> {
        let exit = self.prefs.borrow().exit_node.clone();
        let (map, t, signed) = gate.accept(signed, now_ms(), exit.as_deref())?;
        if let Some(key) = gate.adopted() {
            self.adopt_controller_key(key);
        }
        self.learn_tls_pins(&map);
        {
            let dp = self.dp.lock().await;
            let dp = dp.as_ref().ok_or_else(|| anyhow!("data plane is down"))?;
            self.install_map(dp, &map, &signed, t);
        }
        write_secret_file(&self.path("netmap.bin"), &signed.encode_to_vec())?;
        let serial = map.serial;
        tracing::info!(
            serial,
            peers = map.peers.len(),
            rules = map.inbound_rules.len(),
            "netmap applied"
        );
        if let Some(q) = &map.quarantine {
            tracing::warn!(
                since_ms = q.since_ms,
                reason = %q.reason,
                "this node is quarantined by the controller: no peers until an admin releases it"
            );
        }
        let mut st = self.lock();
        st.key_expiry_ms = self_key_expiry(&map).or(st.key_expiry_ms);
        st.netmap = Some(map);
        st.netmap_received_ms = now_ms();
        Ok(serial)
    }

    /// Installs a verified map: filter and peers, STUN servers, the relay
    /// link, then the host's routes for it.
    fn install_map(&self, dp: &DataPlane, map: &NetMap, signed: &SignedNetMap, t: Translated) {
        let offered = t.offered.clone();
        let addresses = t.addresses.clone();
        install(dp, t.into());
        dp.set_stun_servers(stun_servers(&self.cfg.stun_servers, &map.relays));
        // After the peers: the relay learns the map the device now uses.
        dp.set_relay(Some(self.relay_setup(map, signed)));
        self.route_host(dp, &offered, &addresses, &map.relays);
        self.dns_follow(dp, map);
    }

    /// Starts MagicDNS if the prefs want it and it is not running: the
    /// address 100.100.100.100 on the tunnel interface, the server, then
    /// the host's resolver pointed at it. A failure is logged; the mesh
    /// works without names.
    fn dns_start(&self, _up: &DataPlane, domain: &str) {
        let mut dns = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        // Read under the lock: `update_prefs` turns it off under it too.
        if dns.is_some() || !self.prefs.borrow().accept_dns {
            return;
        }
        match self.start_magic_dns(domain) {
            Ok(m) => {
                tracing::info!(domain, upstreams = ?m.upstreams, host = %m.host.describe(),
                    "MagicDNS on 100.100.100.100");
                *dns = Some(m);
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "MagicDNS not started"),
        }
    }

    /// How the host's resolver is to be pointed at MagicDNS, if at all.
    fn host_dns_mode(&self) -> HostMode {
        let netns = dns::hostcfg::named_netns(Path::new("/run/netns"));
        let default_file = self.cfg.resolv_conf == Path::new(DEFAULT_RESOLV_CONF);
        if default_file {
            if let Some(why) =
                dns::hostcfg::host_resolver_not_ours(netns.as_deref(), Path::new("/etc/netns"))
            {
                return HostMode::Untouched(why);
            }
        }
        match Resolved::system().filter(|_| netns.is_none() && default_file) {
            Some(r) => HostMode::Resolved(r),
            None => HostMode::File,
        }
    }

    fn start_magic_dns(&self, domain: &str) -> anyhow::Result<MagicDns> {
        let iface = &self.cfg.interface;
        let addr = format!("{MAGIC_DNS_ADDR}/32");
        crate::io::ip(&["-4", "addr", "replace", &addr, "dev", iface])?;
        let host = self.host_dns_mode();
        let upstreams = match &host {
            HostMode::Resolved(_) => std::fs::read_to_string("/run/systemd/resolve/resolv.conf")
                .map(|t| dns::hostcfg::read_upstreams(&t))
                .unwrap_or_default(),
            HostMode::File | HostMode::Untouched(_) => {
                dns::hostcfg::original_upstreams(&self.cfg.resolv_conf, &self.dns_backup())
            }
        };
        let server = match DnsServer::start(SocketAddr::from((MAGIC_DNS_ADDR, 53))) {
            Ok(s) => s,
            Err(e) => {
                let _ = crate::io::ip(&["-4", "addr", "del", &addr, "dev", iface]);
                return Err(e).context("binding 100.100.100.100:53");
            }
        };
        server.set_zone(Zone::new(domain, upstreams.clone()));
        Ok(MagicDns {
            server,
            upstreams,
            host,
            applied: None,
        })
    }

    /// Feeds a new map to MagicDNS (its names and split routes) and points
    /// the host at it for the map's domain and split suffixes.
    fn dns_follow(&self, dp: &DataPlane, map: &NetMap) {
        self.dns_start(dp, &map.dns_domain);
        let mut dns = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        let Some(m) = dns.as_mut() else { return };
        let zone = Zone::from_netmap(map, m.upstreams.clone());
        let want = (
            zone.domain().to_string(),
            zone.split()
                .iter()
                .map(|(s, _)| s.clone())
                .collect::<Vec<_>>(),
        );
        m.server.set_zone(zone);
        if m.applied.as_ref() == Some(&want) {
            return;
        }
        let (domain, splits) = &want;
        let r = match &m.host {
            HostMode::Resolved(r) => r.apply(&self.cfg.interface, domain, splits),
            HostMode::File if m.applied.as_ref().is_some_and(|(d, _)| d == domain) => Ok(()),
            HostMode::File => {
                HostDns::apply(&self.cfg.resolv_conf, &self.dns_backup(), domain).map(|_| ())
            }
            HostMode::Untouched(why) => {
                tracing::warn!(reason = %why, "MagicDNS serves 100.100.100.100; the host resolver is left alone");
                Ok(())
            }
        };
        match r {
            Ok(()) => m.applied = Some(want),
            Err(e) => tracing::error!(error = %e, "the host resolver is not pointed at MagicDNS"),
        }
    }

    /// Empties MagicDNS's names (the peers are gone: revoked or expired).
    fn dns_forget_names(&self) {
        if let Some(m) = self.dns.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let domain = m
                .applied
                .as_ref()
                .map_or(dns::DEFAULT_DOMAIN, |(d, _)| d.as_str());
            m.server.set_zone(Zone::new(domain, m.upstreams.clone()));
        }
    }

    /// Stops MagicDNS and gives the host its resolver configuration back.
    /// Without MagicDNS running, a resolv.conf left managed by a daemon
    /// that crashed is restored too.
    fn dns_stop(&self) {
        let Some(m) = self.dns.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            self.restore_host_dns();
            return;
        };
        let r = match &m.host {
            HostMode::Resolved(r) => r
                .revert(&self.cfg.interface)
                .map(|()| "reverted".to_string()),
            HostMode::File => HostDns::restore(&self.cfg.resolv_conf, &self.dns_backup())
                .map(|r| format!("{r:?}")),
            HostMode::Untouched(_) => Ok("untouched".to_string()),
        };
        match r {
            Ok(how) => tracing::info!(how, "host resolver configuration restored"),
            Err(e) => tracing::error!(error = %e, "host resolver configuration not restored"),
        }
        m.server.shutdown();
        let _ = crate::io::ip(&[
            "-4",
            "addr",
            "del",
            &format!("{MAGIC_DNS_ADDR}/32"),
            "dev",
            &self.cfg.interface,
        ]);
    }

    /// Puts back a resolv.conf this daemon's state dir holds the original
    /// of (a previous run crashed with MagicDNS on), if the file is still
    /// ours to manage.
    fn restore_host_dns(&self) {
        if !self.dns_backup().exists() || !matches!(self.host_dns_mode(), HostMode::File) {
            return;
        }
        match HostDns::restore(&self.cfg.resolv_conf, &self.dns_backup()) {
            Ok(how) => tracing::info!(how = ?how, "resolv.conf of a previous run restored"),
            Err(e) => tracing::error!(error = %e, "resolv.conf of a previous run not restored"),
        }
    }

    /// Where the host's original resolv.conf is kept while MagicDNS runs.
    fn dns_backup(&self) -> PathBuf {
        self.path("resolv.conf.orig")
    }

    /// Makes the host's routes match what the map offers under the prefs.
    /// Takes the data plane as proof that it is up: once `stop` has taken
    /// it, nothing installs host routes again.
    fn route_host(
        &self,
        _up: &DataPlane,
        offered: &Offered,
        addresses: &[IpNet],
        relays: &[pb::Relay],
    ) {
        let prefs = self.prefs.borrow().clone();
        let mut bypass = self.lock().controller_addrs.clone();
        bypass.extend(relay_ips(relays));
        let own: Vec<IpAddr> = addresses.iter().map(IpNet::addr).collect();
        let overlay = overlay_prefixes(addresses);
        let plan = routing::plan(offered, &prefs, bypass, &own, &overlay);
        let mut host = self.host.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = host.apply(&plan) {
            tracing::error!(error = %format!("{e:#}"), "host routes not fully applied");
        }
    }

    /// Fails closed: default deny and no peers (revoked, or the map expired);
    /// STUN goes back to the configured servers only. Subnet routes and
    /// forwarding go; a chosen exit node's route stays (non-mesh traffic
    /// goes nowhere rather than around the tunnel).
    async fn clear_peers(&self) {
        let addresses = self
            .lock()
            .enrollment
            .as_ref()
            .map(|e| e.addresses.clone())
            .unwrap_or_default();
        if let Some(dp) = self.dp.lock().await.as_ref() {
            install(dp, Install::Empty);
            dp.set_stun_servers(self.cfg.stun_servers.clone());
            dp.set_relay(None);
            self.route_host(dp, &Offered::default(), &addresses, &[]);
        }
        self.dns_forget_names();
    }

    /// Fails closed because the controller refused this node (revoked, or
    /// its key expired): no peers, and no map in force that a prefs change
    /// could install again. The enrollment and keys stay.
    async fn fail_closed(&self) {
        self.clear_peers().await;
        self.lock().netmap = None;
    }

    /// Tells the controller what this node advertises (every session, and
    /// when `up` changes it) and returns what that was. A refusal is
    /// logged, not fatal: the session goes on without the routes.
    async fn advertise(&self, ctl: &mut Controller) -> (Vec<IpNet>, bool) {
        let (routes, exit) = self.prefs.borrow().advertisement();
        let text: Vec<String> = routes.iter().map(ToString::to_string).collect();
        match ctl.set_routes(&self.keys().machine, text, exit).await {
            Ok(r) => tracing::info!(
                advertised = ?routes, exit_node = exit,
                approved = ?r.approved, exit_approved = r.exit_node_approved,
                "routes advertised"
            ),
            Err(s) => {
                tracing::error!(code = ?s.code(), error = %s.message(), "routes refused by the controller")
            }
        }
        (routes, exit)
    }

    /// Re-applies the host routes for the map in force (or none).
    async fn refresh_host_routes(&self, e: &Enrollment) {
        if self.lock().netmap.is_some() {
            self.reinstall().await;
        } else if let Some(dp) = self.dp.lock().await.as_ref() {
            self.route_host(dp, &Offered::default(), &e.addresses, &[]);
        }
    }

    /// Re-applies the map in force (after the prefs changed).
    async fn reinstall(&self) {
        let (map, exit) = {
            let st = self.lock();
            (st.netmap.clone(), self.prefs.borrow().exit_node.clone())
        };
        let Some(map) = map else { return };
        let Ok(bytes) = std::fs::read(self.path("netmap.bin")) else {
            return;
        };
        let Ok(signed) = SignedNetMap::decode(bytes.as_slice()) else {
            return;
        };
        match translate(&map, exit.as_deref()) {
            Ok(t) => {
                if let Some(dp) = self.dp.lock().await.as_ref() {
                    self.install_map(dp, &map, &signed, t);
                }
            }
            Err(e) => tracing::error!(error = %e, "netmap in force no longer translates"),
        }
    }

    /// Applies `up`'s flags: validated as a whole (a bad route changes
    /// nothing), saved, and put in force.
    async fn update_prefs(&self, u: &PrefsUpdate) -> anyhow::Result<()> {
        let (overlay, controller) = {
            let st = self.lock();
            let e = st.enrollment.as_ref();
            (
                e.map(|e| overlay_prefixes(&e.addresses))
                    .unwrap_or_default(),
                e.and_then(|e| controller_ip(&e.controller_url)),
            )
        };
        let old = self.prefs.borrow().clone();
        let new = old.updated(u, &overlay, controller)?;
        if new == old {
            return Ok(());
        }
        write_secret_file(&self.path("prefs.json"), &serde_json::to_vec_pretty(&new)?)?;
        let dns_off = old.accept_dns && !new.accept_dns;
        let host_changed = old.host_changed(&new);
        self.prefs.send_replace(new);
        if dns_off {
            self.dns_stop();
        }
        if host_changed {
            self.reinstall().await;
        }
        Ok(())
    }

    /// The relay link's setup for an installed map.
    fn relay_setup(&self, map: &NetMap, signed: &SignedNetMap) -> RelaySetup {
        RelaySetup {
            relays: map.relays.clone(),
            machine_key: self.keys().machine.clone(),
            map: signed.clone(),
        }
    }

    fn set_conn(&self, c: ConnState) {
        self.lock().conn = c;
    }

    /// One controller session: connect, report endpoints, follow the netmap stream.
    async fn session(self: &Arc<Self>, e: &Enrollment, have: &mut u64) -> Result<(), SessionError> {
        let key = self.controller_key(e);
        let addrs = controller_addrs(&e.controller_url).await;
        let moved = !addrs.is_empty() && {
            let mut st = self.lock();
            let moved = st.controller_addrs != addrs;
            st.controller_addrs = addrs;
            moved
        };
        if moved {
            // The bypass of the exit-node and route tables must follow the
            // controller, or a dead exit node locks the node out.
            self.refresh_host_routes(e).await;
        }
        let pins = self.tls_pins(e);
        let mut ctl = Controller::connect_any(&e.controller_url, &pins, Duration::from_secs(5))
            .await
            .map_err(|err| SessionError::Retry(format!("{err:#}")))?;
        let mut endpoints = EndpointReporter::default();
        let mut primary = self.refresh_local_addresses(e).await;
        // With STUN servers known (flags, or the relays of a restored map),
        // report before the stream opens, reflexive addresses included. A
        // node that learns its servers from its first map reports once that
        // map is applied instead: a LAN-only report now would hold the
        // reflexive address back by the controller's republish interval.
        let mut first_report_due = true;
        // Endpoint checks since the first map of the session was applied.
        let mut first_map_checks: Option<u8> = None;
        if self.has_stun_servers().await {
            self.await_discovery().await;
            if let Some(list) = endpoints.poll(&self.candidates(primary).await, now_ms()) {
                if let Err(s) = ctl
                    .report_endpoints(&self.keys().machine, endpoint_strings(&list))
                    .await
                {
                    return Err(status_error(s));
                }
                tracing::info!(endpoints = ?list, "endpoints reported");
            }
            first_report_due = false;
        }
        let mut prefs = self.prefs.subscribe();
        prefs.mark_unchanged();
        let mut advertised = self.advertise(&mut ctl).await;
        let mut stream = ctl
            .stream(
                &self.keys().machine,
                *have,
                self.deltas.load(std::sync::atomic::Ordering::Relaxed),
            )
            .await
            .map_err(status_error)?;
        let mut gate = NetMapGate::new(key, self.identity(e), *have);
        // Posture: read on a blocking thread, reported from this loop.
        let (attrs_tx, mut attrs) = watch::channel(None);
        let _collector = AbortOnDrop(tokio::spawn(collect_posture(
            self.posture.clone(),
            self.prefs.subscribe(),
            attrs_tx,
        )));
        let mut posture = PostureReporter::default();
        let mut posture_check = tokio::time::interval(POSTURE_CHECK_INTERVAL);
        posture_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.set_conn(ConnState::Connected { since_ms: now_ms() });
        // The controller took this node's proof: its key is valid (again).
        if self.expired.send_if_modified(|m| m.take().is_some()) {
            tracing::info!("the controller accepts this node's key again");
        }
        tracing::info!(controller = %e.controller_url, "connected to controller");
        let mut report = tokio::time::interval(FLOW_REPORT_INTERVAL);
        let mut flow_overflow = 0;
        // The peers by path the controller last took in this session.
        let mut paths_sent = None;
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut evidence = tokio::time::interval(EVIDENCE_REPORT_INTERVAL);
        evidence.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut endpoint_check = tokio::time::interval(ENDPOINT_CHECK_INTERVAL);
        endpoint_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut local_refresh = tokio::time::interval(STUN_INTERVAL);
        local_refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        local_refresh.reset();
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = report.tick() => {
                    self
                        .report_flows(&mut ctl, &mut flow_overflow, &mut paths_sent, true)
                        .await;
                    continue;
                }
                _ = evidence.tick() => {
                    self
                        .report_flows(&mut ctl, &mut flow_overflow, &mut paths_sent, false)
                        .await;
                    continue;
                }
                _ = endpoint_check.tick() => {
                    if first_report_due {
                        // Not before the first map (it names the STUN
                        // servers), and for one check after it not before
                        // every server answered; the stream is read meanwhile.
                        match first_map_checks {
                            None => continue,
                            Some(0) if !self.discovery_settled().await => {
                                first_map_checks = Some(1);
                                continue;
                            }
                            Some(_) => first_report_due = false,
                        }
                    }
                    self.report_endpoints(&mut ctl, &mut endpoints, primary).await;
                    continue;
                }
                _ = local_refresh.tick() => {
                    primary = self.refresh_local_addresses(e).await;
                    continue;
                }
                Ok(()) = attrs.changed() => {
                    let current = attrs.borrow_and_update().clone();
                    self.lock().posture_unreported = current
                        .as_ref()
                        .map(|(c, _)| c.unreported.clone())
                        .unwrap_or_default();
                    let current = current.map(|(c, at)| (c.attrs, at));
                    self.report_posture(&mut ctl, &mut posture, current).await;
                    continue;
                }
                _ = posture_check.tick() => {
                    let current = attrs
                        .borrow()
                        .as_ref()
                        .map(|(c, at)| (c.attrs.clone(), *at));
                    self.report_posture(&mut ctl, &mut posture, current).await;
                    continue;
                }
                Ok(()) = prefs.changed() => {
                    prefs.mark_unchanged();
                    // Only a change of what is advertised is news to the
                    // controller (not, say, `--report-posture`).
                    let changed = self.prefs.borrow().advertisement() != advertised;
                    if changed {
                        advertised = self.advertise(&mut ctl).await;
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(signed)) => match self.apply(&signed, &mut gate).await {
                    Ok(serial) => {
                        *have = serial;
                        self.live_serial.send_replace(serial);
                        self.learn_controllers();
                        // For the controller's propagation latency, on the
                        // side: a slow controller must not hold up the next
                        // map or the reports. A controller without the call,
                        // or a throttled one, only misses a sample.
                        let keys = self.keys();
                        let mut ack_ctl = ctl.clone();
                        tokio::spawn(async move {
                            let ack = ack_ctl.netmap_applied(&keys.machine, serial);
                            match tokio::time::timeout(NETMAP_ACK_TIMEOUT, ack).await {
                                Ok(Ok(())) => {}
                                Ok(Err(s)) => {
                                    tracing::debug!(error = %s.message(), serial, "NetMapApplied not taken")
                                }
                                Err(_) => tracing::debug!(serial, "NetMapApplied timed out"),
                            }
                        });
                        if first_report_due && first_map_checks.is_none() {
                            first_map_checks = Some(0);
                        }
                    }
                    Err(err) => {
                        self.lock().refused_maps += 1;
                        let full = err
                            .downcast_ref::<RefusedMap>()
                            .is_some_and(RefusedMap::needs_full_map);
                        if full {
                            // The next stream's maps are all full ones.
                            self.deltas
                                .store(false, std::sync::atomic::Ordering::Relaxed);
                            tracing::warn!(error = %err, "netmap delta refused; full maps only from now on");
                            return Err(SessionError::Retry(format!(
                                "{err}; asking for full maps"
                            )));
                        }
                        tracing::error!(error = %err, "netmap refused; keeping the previous one");
                    }
                },
                Ok(None) => return Err(SessionError::Retry("controller closed the stream".into())),
                Err(s) => return Err(status_error(s)),
            }
        }
    }

    /// The `/metrics` exposition: the data plane's latest stats snapshot
    /// (taken by its thread every second) and the agent's state.
    async fn metrics_text(&self, format: ztmesh_proto::scrape::Format) -> String {
        let stats = self.dp.lock().await.as_ref().map(DataPlane::stats);
        let sample = {
            let st = self.lock();
            crate::metrics::sample(
                stats.as_ref(),
                st.netmap.as_ref(),
                matches!(st.conn, ConnState::Connected { .. }),
                st.refused_maps,
            )
        };
        crate::metrics::render(&sample, format)
    }

    /// Reads the interface addresses and hands them to the data plane, the
    /// route toward the controller first; returns that endpoint (the one
    /// peers on the controller's network reach us at).
    async fn refresh_local_addresses(&self, e: &Enrollment) -> Option<SocketAddr> {
        let dp = self.dp.lock().await;
        let port = dp
            .as_ref()
            .map_or(self.cfg.listen_port, DataPlane::local_port);
        let primary = local_endpoint(&e.controller_url, port);
        if let Some(dp) = dp.as_ref() {
            let mut addrs: Vec<std::net::IpAddr> = primary.map(|p| p.ip()).into_iter().collect();
            addrs.extend(interface_addresses(&[self.cfg.interface.as_str()]));
            dp.set_local_addresses(addrs);
        }
        primary
    }

    /// Whether the data plane has STUN servers to ask.
    async fn has_stun_servers(&self) -> bool {
        self.dp
            .lock()
            .await
            .as_ref()
            .is_some_and(|dp| !dp.stats().stun.is_empty())
    }

    /// Whether every STUN server of the data plane has answered (true
    /// without servers or data plane: there is nothing to wait for).
    async fn discovery_settled(&self) -> bool {
        match self.dp.lock().await.as_ref() {
            Some(dp) => dp.stats().stun.iter().all(|(_, seen)| seen.is_some()),
            None => true,
        }
    }

    /// Waits (at most [`DISCOVERY_SETTLE`]) until every STUN server has
    /// answered, so the session's first report carries the reflexive
    /// addresses instead of waiting out the report interval for them.
    async fn await_discovery(&self) {
        for _ in 0..DISCOVERY_SETTLE.as_millis() / 50 {
            let settled = self.discovery_settled().await;
            if settled {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What this node reports as its endpoints: `primary` first, then the
    /// data plane's candidates.
    async fn candidates(&self, primary: Option<SocketAddr>) -> Vec<SocketAddr> {
        let found = match self.dp.lock().await.as_ref() {
            Some(dp) => dp.candidates(),
            None => Vec::new(),
        };
        with_primary(primary, &found)
    }

    /// Reports the endpoint candidates when they changed (rate-limited by
    /// `reporter`). A failed report is logged and retried later.
    async fn report_endpoints(
        &self,
        ctl: &mut Controller,
        reporter: &mut EndpointReporter,
        primary: Option<SocketAddr>,
    ) {
        let candidates = self.candidates(primary).await;
        let Some(list) = reporter.poll(&candidates, now_ms()) else {
            return;
        };
        match ctl
            .report_endpoints(&self.keys().machine, endpoint_strings(&list))
            .await
        {
            Ok(()) => tracing::info!(endpoints = ?list, "endpoints reported"),
            Err(s) => {
                reporter.failed();
                tracing::warn!(error = %s.message(), "endpoint report failed; retrying later");
            }
        }
    }

    /// Sends this node's posture attributes when a report is due (see
    /// [`PostureReporter`]) and `up --report-posture` is on; notes what the
    /// controller took for `status`. A failed report is logged and retried
    /// later; a controller without `ReportPosture` is not asked again this
    /// session.
    async fn report_posture(
        &self,
        ctl: &mut Controller,
        reporter: &mut PostureReporter,
        current: Option<(AttrSet, i64)>,
    ) {
        if !self.prefs.borrow().report_posture {
            reporter.pause();
            return;
        }
        let Some((attrs, collected_ms)) = current else {
            return;
        };
        let interval = posture::report_interval_ms(
            self.lock()
                .netmap
                .as_ref()
                .map_or(0, |m| m.posture_interval_ms),
        );
        let now = now_ms();
        if !reporter.poll(now, interval, &attrs, collected_ms) {
            return;
        }
        let sent = tokio::time::timeout(
            POSTURE_REPORT_TIMEOUT,
            ctl.report_posture(&self.keys().machine, attrs.to_proto()),
        )
        .await;
        let Ok(sent) = sent else {
            reporter.failed();
            tracing::warn!(
                timeout_s = POSTURE_REPORT_TIMEOUT.as_secs(),
                "posture report unanswered; retrying later"
            );
            return;
        };
        match sent {
            Ok(mut clipped) => {
                clipped.truncate(MAX_CLIPPED_LINES);
                for line in &mut clipped {
                    *line = posture::clip(line).to_string();
                }
                let mut st = self.lock();
                let last = st.posture_sent.as_ref();
                if last.is_none_or(|s| s.clipped != clipped) {
                    for line in &clipped {
                        tracing::warn!(clipped = %line, "the controller clipped the posture report");
                    }
                }
                if last.is_none_or(|s| s.attributes != attrs) {
                    tracing::info!(attributes = ?attrs, "posture reported");
                } else {
                    tracing::debug!("posture reported again");
                }
                st.posture_sent = Some(PostureSent {
                    at_ms: now,
                    attributes: attrs,
                    clipped,
                });
            }
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                reporter.unsupported();
                tracing::info!("the controller takes no posture reports");
            }
            Err(s) => {
                reporter.failed();
                tracing::warn!(code = ?s.code(), error = %s.message(), "posture report failed; retrying later");
            }
        }
    }

    /// Sends the allowed (`with_allowed`) and denied flows and the unknown
    /// handshakes the data plane saw since the last report, with the peers
    /// by path. A failed report is logged and the flows are dropped (the
    /// counters remain).
    ///
    /// Without flows there is no report, except that the allowed-flow round
    /// sends the paths when they differ from `paths_sent` (the last the
    /// controller took in this session): a quiet node's paths stay current
    /// at the cost of a report per change, not one every round.
    async fn report_flows(
        &self,
        ctl: &mut Controller,
        overflow_seen: &mut u64,
        paths_sent: &mut Option<pb::PeerPaths>,
        with_allowed: bool,
    ) {
        let (log, stats) = match self.dp.lock().await.as_ref() {
            Some(dp) => (dp.take_flows(with_allowed).await, dp.stats()),
            None => return,
        };
        if log.allowed_overflow > *overflow_seen {
            *overflow_seen = log.allowed_overflow;
            tracing::warn!(
                total = log.allowed_overflow,
                max = crate::filter::MAX_ALLOWED_FLOWS,
                "more allowed flows in one report than it holds; the rest are not logged"
            );
        }
        let summaries = crate::control::flows::summaries(&log);
        let unknown = crate::control::flows::unknown_handshakes(&log);
        let paths = crate::control::flows::peer_paths(&stats);
        let paths_changed = with_allowed && paths_sent.as_ref() != Some(&paths);
        if summaries.is_empty() && unknown.is_empty() && !paths_changed {
            return;
        }
        let n = summaries.len();
        match ctl
            .report_flows(&self.keys().machine, summaries, unknown, paths)
            .await
        {
            Ok(()) => *paths_sent = Some(paths),
            Err(s) => tracing::warn!(error = %s.message(), flows = n, "flow report failed"),
        }
    }

    async fn control_loop(self: Arc<Self>, mut e: Enrollment) {
        let backoff = Backoff::default();
        let mut attempt = 0u32;
        // Connection failures in a row at the current controller.
        let mut failed_here = 0u32;
        // The newest serial seen, also across a re-authentication (which
        // restarts this loop after the peers and the map were dropped).
        let mut have = self
            .lock()
            .netmap
            .as_ref()
            .map_or(0, |m| m.serial)
            .max(*self.live_serial.borrow());
        // The last recoverable refusal logged, so a refusal that repeats on
        // every retry is one error line, not one per attempt.
        let mut last_refusal: Option<&'static str> = None;
        loop {
            let mut unreachable = false;
            let mut incompatible = false;
            let err = match self.session(&e, &mut have).await {
                Ok(()) => "session ended".to_string(),
                Err(SessionError::Retry(m)) => {
                    unreachable = true;
                    m
                }
                Err(SessionError::Refused { reason, message }) => {
                    // Not a revocation: the data plane keeps the last verified map.
                    if last_refusal != Some(reason) {
                        tracing::error!(reason, error = %message, "controller refused the session; keeping the last netmap and retrying");
                    } else {
                        tracing::debug!(reason, error = %message, "controller refused the session again");
                    }
                    last_refusal = Some(reason);
                    format!("{reason}: {message}")
                }
                Err(SessionError::Incompatible(m)) => {
                    // Only an upgrade fixes it: keep the map, say it once,
                    // ask rarely.
                    let reason = ztmesh_proto::refusal::AuthReason::Incompatible.as_str();
                    if last_refusal != Some(reason) {
                        tracing::error!(reason, error = %m, "controller does not speak this node's control protocol version; keeping the last netmap");
                    }
                    last_refusal = Some(reason);
                    incompatible = true;
                    format!("{reason}: {m}")
                }
                Err(SessionError::Revoked(m)) => {
                    // The controller no longer accepts this node (deleted):
                    // fail closed and drop every peer.
                    tracing::warn!(reason = %m, "controller refused this node; dropping all peers");
                    self.fail_closed().await;
                    m
                }
                Err(SessionError::Expired(m)) => {
                    // Fail closed, keep the identity: `ztmesh up` signs in
                    // again; meanwhile ask rarely, in case an admin extends it.
                    if self.expired.borrow().is_none() {
                        tracing::warn!(reason = %m, "node key expired; dropping all peers until someone signs in again (`ztmesh up`)");
                    } else {
                        tracing::debug!(reason = %m, "node key still expired");
                    }
                    self.fail_closed().await;
                    self.expired.send_replace(Some(m.clone()));
                    m
                }
            };
            if matches!(self.lock().conn, ConnState::Connected { .. }) {
                attempt = 0;
                failed_here = 0;
                // A session got through: the next refusal is news again.
                last_refusal = None;
            } else if unreachable {
                failed_here += 1;
                if failed_here >= FAILOVER_AFTER {
                    if let Some(next) = self.fail_over(&e) {
                        e = next;
                        failed_here = 0;
                    }
                }
            }
            tracing::info!(error = %err, attempt, "controller connection lost; retrying");
            self.set_conn(ConnState::Connecting {
                attempt,
                last_error: err,
            });
            let expired = self.expired.borrow().is_some();
            let delay = reconnect_delay(&backoff, attempt, expired || incompatible);
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Moves to the next controller of the mesh after the current one
    /// stopped answering; the choice is saved, so the node sticks to the
    /// controller that answers, across restarts too. `None`: no other.
    fn fail_over(&self, e: &Enrollment) -> Option<Enrollment> {
        let mut st = self.lock();
        let current = st.enrollment.as_mut()?;
        let next = next_controller(&e.controller_url, &current.controllers)?.to_string();
        tracing::warn!(from = %e.controller_url, to = %next, "controller unreachable; moving to another");
        current.controller_url = next;
        let moved = current.clone();
        drop(st);
        if let Err(err) = store_enrollment(&self.cfg.state_dir, &moved) {
            tracing::error!(error = %err, "cannot save the controller moved to");
        }
        Some(moved)
    }

    /// The controller's signing key was replaced and a map handed over to
    /// `key` from the one this node held: from now on only `key` signs for
    /// the controller. Saved before the map is installed or stored, so a
    /// restart holds the key the stored map is signed with.
    fn adopt_controller_key(&self, key: PublicKey) {
        let e = {
            let mut st = self.lock();
            let Some(e) = st.enrollment.as_mut() else {
                return;
            };
            tracing::warn!(old = %e.controller_key, new = %key, "the controller's signing key was replaced; following its hand-over");
            e.controller_key = key;
            e.clone()
        };
        if let Err(err) = store_enrollment(&self.cfg.state_dir, &e) {
            tracing::error!(error = %err, "cannot save the controller's new signing key; the hand-over is followed again after a restart");
        }
    }

    /// Keeps the TLS pins a verified map lists (a certificate rotation),
    /// saved before the map is installed, so a node restarted after the
    /// switch connects to the new certificate. A map without pins changes
    /// nothing: the pins learned and the enrolled fingerprint stay.
    fn learn_tls_pins(&self, map: &NetMap) {
        let pins: Vec<[u8; 32]> = map
            .trust
            .iter()
            .flat_map(|t| &t.tls_pins)
            .filter_map(|p| <[u8; 32]>::try_from(p.as_slice()).ok())
            .collect();
        let e = {
            let mut st = self.lock();
            let Some(e) = st.enrollment.as_mut() else {
                return;
            };
            if pins.is_empty() || pins == e.tls_pins {
                return;
            }
            let text: Vec<String> = pins.iter().map(|p| auth::hex(p)).collect();
            tracing::info!(pins = ?text, "the controller's TLS certificates changed; pins learned");
            e.tls_pins = pins;
            e.clone()
        };
        if let Err(err) = store_enrollment(&self.cfg.state_dir, &e) {
            tracing::error!(error = %err, "cannot save the controller's TLS pins");
        }
    }

    /// The certificate pins this node holds now (they change with a TLS
    /// certificate rotation), else the ones `e` was read with.
    fn tls_pins(&self, e: &Enrollment) -> Vec<[u8; 32]> {
        self.lock()
            .enrollment
            .as_ref()
            .map_or_else(|| e.pins(), Enrollment::pins)
    }

    /// The controller key this node holds now (it changes when the
    /// controller's key is handed over), else the one `e` was read with.
    fn controller_key(&self, e: &Enrollment) -> PublicKey {
        self.lock()
            .enrollment
            .as_ref()
            .map_or(e.controller_key, |now| now.controller_key)
    }

    /// Keeps the list of the mesh's controllers the newest map gave (a
    /// signed map: the list is the controllers' word, not the network's).
    fn learn_controllers(&self) {
        let mut st = self.lock();
        let State {
            netmap, enrollment, ..
        } = &mut *st;
        let (Some(map), Some(e)) = (netmap.as_ref(), enrollment.as_mut()) else {
            return;
        };
        if map.controllers.is_empty() || map.controllers == e.controllers {
            return;
        }
        e.controllers = map.controllers.clone();
        let e = e.clone();
        drop(st);
        tracing::info!(controllers = ?e.controllers, "the mesh's controllers");
        if let Err(err) = store_enrollment(&self.cfg.state_dir, &e) {
            tracing::error!(error = %err, "cannot save the mesh's controllers");
        }
    }

    fn start_control(self: &Arc<Self>, e: Enrollment) {
        let mut st = self.lock();
        if st.control_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        st.conn = ConnState::Connecting {
            attempt: 0,
            last_error: String::new(),
        };
        st.control_task = Some(tokio::spawn(self.clone().control_loop(e)));
    }

    async fn stop(&self) {
        let task = self.lock().control_task.take();
        if let Some(t) = task {
            t.abort();
        }
        self.set_conn(ConnState::Idle);
        // The data plane first: an install running now finishes before the
        // take, and none starts after it, so the clear is the last word.
        let dp = self.dp.lock().await.take();
        self.host.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.dns_stop();
        if let Some(dp) = dp {
            dp.shutdown().await;
        }
    }

    /// `ztmesh up`: enrolls if needed (with an auth key, or by an interactive
    /// login when there is none), re-authenticates the same node when its
    /// key expired or `--force-reauth` asks, applies the prefs, and returns
    /// once a map from the live controller is applied.
    #[expect(
        clippy::disallowed_methods,
        reason = "the agent shell bounds its waits for the sign-in and the first map on the real clock"
    )]
    async fn up(
        self: &Arc<Self>,
        args: UpArgs,
        link: &mut Link,
    ) -> anyhow::Result<serde_json::Value> {
        let mut deadline = Instant::now() + args.timeout;
        let pin = args
            .fingerprint
            .as_deref()
            .map(login::parse_fingerprint_arg)
            .transpose()?;
        let existing = self.lock().enrollment.clone();
        let expired = self.expired.borrow().is_some();
        // `--controller A,B`: enroll at the first; all are the mesh's
        // controllers to fail over to (until a netmap lists them).
        let urls: Vec<String> = args
            .controller
            .iter()
            .flat_map(|s| s.split(','))
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let mut reauthenticated = false;
        let enrollment = match existing {
            Some(e) => {
                let known = |u: &String| *u == e.controller_url || e.controllers.contains(u);
                if let Some(url) = urls.first().filter(|_| !urls.iter().any(known)) {
                    bail!(
                        "already enrolled as {} with {}; run `ztmesh logout` before joining {url}",
                        e.name,
                        e.controller_url
                    );
                }
                if pin.is_some_and(|fp| !e.pins().contains(&fp)) {
                    bail!(
                        "--fingerprint is not the one pinned for {} at enrollment ({}); run \
                         `ztmesh logout` before joining another controller",
                        e.controller_url,
                        login::fingerprint_text(&e.fingerprint)
                    );
                }
                if expired || args.force_reauth {
                    let _busy = self.begin_enrolling()?;
                    let url = &e.controller_url;
                    let new = match &args.auth_key {
                        Some(key) => {
                            self.enroll(url, key, &e.pins(), args.hostname, deadline)
                                .await?
                        }
                        None => {
                            let until = Instant::now() + args.login_timeout;
                            let new = self
                                .login(url, e.fingerprint, args.hostname, until, link)
                                .await?;
                            deadline = Instant::now() + args.timeout;
                            new
                        }
                    };
                    self.reauthenticated(&e, &new).await;
                    reauthenticated = true;
                    new
                } else {
                    e
                }
            }
            None => {
                let url = urls.first().cloned().ok_or_else(|| {
                    anyhow!(
                        "not enrolled: pass --controller URL, and --auth-key KEY or \
                         --fingerprint SHA256HEX to sign in interactively"
                    )
                })?;
                let _busy = self.begin_enrolling()?;
                let e = match &args.auth_key {
                    Some(key) => {
                        let pins: Vec<[u8; 32]> = pin.into_iter().collect();
                        self.enroll(&url, key, &pins, args.hostname, deadline)
                            .await?
                    }
                    None => {
                        let fp = pin.ok_or_else(|| {
                            anyhow!(
                                "not enrolled: pass --auth-key KEY, or --fingerprint SHA256HEX \
                                 to sign in interactively: the controller's certificate \
                                 fingerprint, which {FINGERPRINT_HINT}"
                            )
                        })?;
                        let until = Instant::now() + args.login_timeout;
                        let e = self.login(&url, fp, args.hostname, until, link).await?;
                        deadline = Instant::now() + args.timeout;
                        e
                    }
                };
                let mut e = e;
                if urls.len() > 1 {
                    e.controllers = urls;
                    store_enrollment(&self.cfg.state_dir, &e)?;
                }
                self.lock().enrollment = Some(e.clone());
                e
            }
        };
        self.update_prefs(&args.prefs).await?;
        if std::fs::remove_file(self.path("down")).is_ok() {
            ztmesh_proto::keys::sync_dir(&self.cfg.state_dir)?;
        }
        self.ensure_dataplane(&enrollment).await?;
        let mut applied = self.live_serial.subscribe();
        let have_before = *applied.borrow_and_update();
        let mut expiry = self.expired.subscribe();
        self.start_control(enrollment.clone());
        // Return once a netmap from the live controller is applied (after a
        // re-authentication, a new one: the peers were dropped).
        let wait = async {
            loop {
                if *applied.borrow_and_update() > have_before
                    || (!reauthenticated
                        && have_before > 0
                        && matches!(self.lock().conn, ConnState::Connected { .. }))
                {
                    return Ok(());
                }
                if let Some(m) = expiry.borrow_and_update().clone() {
                    return Err(anyhow!("{EXPIRED_MESSAGE} (the controller says: {m})"));
                }
                tokio::select! {
                    r = applied.changed() => r,
                    r = expiry.changed() => r,
                }
                .map_err(|_| anyhow!("daemon is shutting down"))?;
            }
        };
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(r) => r?,
            Err(_) => {
                let why = match &self.lock().conn {
                    ConnState::Connecting { last_error, .. } if !last_error.is_empty() => {
                        last_error.clone()
                    }
                    _ => "no netmap received".into(),
                };
                bail!("timed out waiting for the controller: {why}");
            }
        }
        Ok(self.status().await)
    }

    /// Marks an enrollment in progress until the guard drops.
    ///
    /// # Errors
    /// Another `up` is enrolling (or signing in) now.
    fn begin_enrolling(&self) -> anyhow::Result<Enrolling<'_>> {
        let mut st = self.lock();
        if st.enrolling {
            bail!(
                "another `ztmesh up` is enrolling this node (an interactive login may be waiting \
                 for someone to sign in); wait for it or interrupt it"
            );
        }
        st.enrolling = true;
        Ok(Enrolling(self))
    }

    /// Enrolls with an auth key (re-authenticating the same node when it is
    /// enrolled already: same keys). The controller fingerprint the key
    /// carries must be one of `pins`, unless that is empty.
    #[expect(
        clippy::disallowed_methods,
        reason = "the agent shell bounds enrollment retries on the real clock"
    )]
    async fn enroll(
        &self,
        url: &str,
        key: &str,
        pins: &[[u8; 32]],
        hostname: Option<String>,
        deadline: Instant,
    ) -> anyhow::Result<Enrollment> {
        let token = KeyToken::decode(auth::AUTH_KEY_PREFIX, key)
            .map_err(|_| anyhow!("malformed auth key: expected ztmk1.KEYID.SECRET.FINGERPRINT"))?;
        let fp = token
            .fingerprint
            .ok_or_else(|| anyhow!("auth key carries no controller fingerprint"))?;
        if let Some(pin) = pins.first().filter(|_| !pins.contains(&fp)) {
            bail!(
                "the auth key is for the controller with certificate fingerprint {}, not {} \
                 (--fingerprint, or the controller this node is enrolled with)",
                login::fingerprint_text(&fp),
                login::fingerprint_text(pin)
            );
        }
        let hostname = hostname.unwrap_or_else(system_hostname);
        let keys = self.keys();
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        let mut ctl = Controller::connect(url, fp, left)
            .await
            .map_err(|e| anyhow!("cannot reach the controller at {url}: {e:#}"))?;
        let resp = ctl
            .enroll(key, &keys.machine, &keys.wg, &hostname)
            .await
            .map_err(|s| anyhow!("enrollment refused: {}", s.message()))?;
        let enrolled = login::parse_enrollment(resp)?;
        let key_expiry_ms = enrolled.key_expiry_ms;
        let e = Enrollment::new(url, fp, enrolled);
        self.store_enrollment(&e, key_expiry_ms)?;
        tracing::info!(name = %e.name, "enrolled");
        Ok(e)
    }

    /// Signs in interactively: opens `Control.Login` over TLS pinned to
    /// `fp`, sends the prompt to the CLI as a progress line, and waits for
    /// the enrollment until `deadline` or until the CLI hangs up (dropping
    /// the stream, which cancels the login). Stores the enrollment like
    /// [`Self::enroll`]; on any failure nothing is stored.
    #[expect(
        clippy::disallowed_methods,
        reason = "the agent shell bounds the wait for a person on the real clock"
    )]
    async fn login(
        &self,
        url: &str,
        fp: [u8; 32],
        hostname: Option<String>,
        deadline: Instant,
        link: &mut Link,
    ) -> anyhow::Result<Enrollment> {
        let Some(progress) = link.progress.clone() else {
            bail!(
                "signing in needs a client that shows the login URL (this one asked for no \
                 progress): use a current `ztmesh up`, or pass --auth-key KEY"
            );
        };
        let hostname = hostname.unwrap_or_else(system_hostname);
        let os = host_os();
        let keys = self.keys();
        let left = deadline.saturating_duration_since(Instant::now());
        let connect_within = left.clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut ctl = Controller::connect(url, fp, connect_within)
            .await
            .map_err(|e| anyhow!("cannot reach the controller at {url}: {e:#}"))?;
        let fingerprint = login::fingerprint_text(&fp);
        let who = Applicant {
            machine: &keys.machine,
            wg: &keys.wg,
            hostname: &hostname,
            os: &os,
        };
        let sign_in = sign_in(&mut ctl, &self.cfg.state_dir, url, fp, &who, |p| {
            tracing::info!(
                expires_ms = p.expires_ms,
                "interactive login: waiting for someone to sign in"
            );
            // The only progress line of a login: the queue has room for it.
            let _ = progress.try_send(Progress::Login {
                url: p.url.clone(),
                code: p.code.clone(),
                expires_ms: p.expires_ms,
                fingerprint: fingerprint.clone(),
            });
        });
        let signed_in = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), sign_in) => r.unwrap_or_else(|_| Err(anyhow!(
                "timed out after {} s waiting for the sign-in (--timeout); run `ztmesh up` again",
                left.as_secs()
            ))),
            () = link.hung_up() => Err(anyhow!("login cancelled: the client went away")),
        };
        let (e, key_expiry_ms) = signed_in.inspect_err(|err| {
            tracing::warn!(error = %format!("{err:#}"), "interactive login failed; nothing stored");
        })?;
        self.lock().key_expiry_ms = Some(key_expiry_ms);
        tracing::info!(name = %e.name, node_id = e.node_id, "signed in");
        Ok(e)
    }

    /// Writes `enrollment.json` and notes the key expiry the controller gave.
    fn store_enrollment(&self, e: &Enrollment, key_expiry_ms: i64) -> anyhow::Result<()> {
        store_enrollment(&self.cfg.state_dir, e)?;
        self.lock().key_expiry_ms = Some(key_expiry_ms);
        Ok(())
    }

    /// Puts a re-authenticated enrollment in force: the session of the old
    /// one ends (`up` starts a new one), the expiry is over, and a data
    /// plane whose addresses changed goes (`up` starts it again).
    async fn reauthenticated(&self, old: &Enrollment, new: &Enrollment) {
        if new.node_id != old.node_id {
            tracing::warn!(
                old = old.node_id,
                new = new.node_id,
                "the controller re-authenticated this node under another id"
            );
        }
        let task = self.lock().control_task.take();
        if let Some(t) = task {
            t.abort();
            // Finished before the new session starts: no map of the old
            // one is applied after it.
            let _ = t.await;
        }
        if new.addresses != old.addresses {
            self.stop().await;
        }
        self.lock().enrollment = Some(new.clone());
        self.expired.send_replace(None);
        tracing::info!(name = %new.name, "re-authenticated");
    }

    async fn down(&self) -> anyhow::Result<serde_json::Value> {
        self.stop().await;
        // Durable like every state file: a restart right after must stay down.
        write_secret_file(&self.path("down"), b"")?;
        Ok(json!({"state": "down"}))
    }

    async fn logout(&self) -> anyhow::Result<serde_json::Value> {
        // The keys an enrollment in progress is proving must outlive it.
        if self.lock().enrolling {
            bail!(
                "`ztmesh up` is enrolling this node (an interactive login may be waiting for \
                 someone to sign in); interrupt it before logging out"
            );
        }
        let e = self.lock().enrollment.clone();
        let mut remote = "not enrolled".to_string();
        if let Some(e) = &e {
            remote =
                match Controller::connect_any(&e.controller_url, &e.pins(), Duration::from_secs(5))
                    .await
                {
                    Ok(mut c) => match c.logout(&self.keys().machine).await {
                        Ok(()) => "deregistered".into(),
                        Err(s) => format!("controller refused logout: {}", s.message()),
                    },
                    Err(err) => format!("controller unreachable ({err:#}); delete the node there"),
                };
        }
        self.stop().await;
        for f in [
            "enrollment.json",
            "netmap.bin",
            "machine.key",
            "wg.key",
            "down",
        ] {
            let _ = std::fs::remove_file(self.path(f));
        }
        // The removals must be durable before the fresh keys are written.
        ztmesh_proto::keys::sync_dir(&self.cfg.state_dir)?;
        // A fresh identity for the next `up`, on disk before it is used.
        let fresh = Keys::load_or_generate(&self.cfg.state_dir)?;
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        {
            let mut st = self.lock();
            st.enrollment = None;
            st.netmap = None;
            st.key_expiry_ms = None;
            st.posture_sent = None;
        }
        // A new enrollment starts its serials afresh.
        self.live_serial.send_replace(0);
        self.expired.send_replace(None);
        Ok(json!({"state": "logged out", "controller": remote}))
    }

    async fn status(&self) -> serde_json::Value {
        // The data plane's lock is held only for moments (a map install, a
        // route change): wait for it briefly rather than report a running
        // data plane as absent (a status read during a map install did).
        let stats = match tokio::time::timeout(STATUS_LOCK_WAIT, self.dp.lock()).await {
            Ok(dp) => dp.as_ref().map(DataPlane::stats),
            Err(_) => None,
        };
        let relay = stats.as_ref().map(|s| s.relay.clone());
        // try_lock: a resolvectl call in progress never stalls `status`.
        let dns = self.dns.try_lock().ok().and_then(|d| {
            d.as_ref().map(|m| {
                let st = m.server.stats();
                json!({
                    "address": MAGIC_DNS_ADDR.to_string(),
                    "domain": m.applied.as_ref().map(|(d, _)| d.clone()),
                    "upstreams": m.upstreams.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "host": m.host.describe(),
                    "queries": st.queries, "answered": st.answered_local, "forwarded": st.forwarded,
                    "forward_failed": st.forward_failed, "formerr": st.formerr,
                    "dropped": st.dropped_malformed + st.dropped_response + st.dropped_oversized
                        + st.dropped_rate_limited + st.dropped_overloaded,
                })
            })
        });
        let expired = self.expired.borrow().clone();
        let st = self.lock();
        let login_state = match (&expired, st.enrolling, &st.enrollment) {
            (Some(_), _, _) => "expired",
            (None, true, _) => "pending",
            (None, false, Some(_)) => "ok",
            (None, false, None) => "none",
        };
        let (conn, detail) = match &st.conn {
            ConnState::Idle => ("idle", String::new()),
            ConnState::Connecting {
                attempt,
                last_error,
            } => ("connecting", format!("attempt {attempt}: {last_error}")),
            ConnState::Connected { since_ms } => ("connected", format!("since {since_ms}")),
        };
        let map = st.netmap.as_ref();
        let posture = {
            let sent = st.posture_sent.as_ref();
            posture::status_json(
                map.map_or(&[][..], |m| &m.posture_checks),
                self.prefs.borrow().report_posture,
                posture::report_interval_ms(map.map_or(0, |m| m.posture_interval_ms)),
                sent.map(|s| s.at_ms),
                sent.map_or(&AttrSet::default(), |s| &s.attributes),
                sent.map_or(&[][..], |s| &s.clipped),
                &st.posture_unreported,
            )
        };
        let peers: Vec<serde_json::Value> = map
            .map(|m| {
                m.peers
                    .iter()
                    .map(|p| {
                        let key = WgPublicKey::from_slice(&p.wg_key).ok();
                        let s = stats.as_ref().and_then(|s| {
                            key.and_then(|k| s.peers.iter().find(|x| x.public_key == k))
                        });
                        let relay_name = stats.as_ref().map(|s| s.relay.name.clone()).unwrap_or_default();
                        json!({
                            "name": p.name,
                            "public_key": key.map(|k| k.to_string()).unwrap_or_default(),
                            "addresses": p.allowed_ips,
                            "endpoint": s.and_then(|s| s.endpoint).map(|e| e.to_string())
                                .or_else(|| p.endpoints.first().cloned()).unwrap_or_default(),
                            "path": path_text(s.and_then(|s| s.destination), s.is_some_and(|s| s.direct), &relay_name),
                            "last_rx_path": s.and_then(|s| s.last_rx)
                                .map(|d| path_text(Some(d), matches!(d, Destination::Udp(_)), &relay_name)),
                            "last_handshake_secs_ago": s.and_then(|s| s.last_handshake)
                                .and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
                            "rx_bytes": s.map(|s| s.rx_bytes).unwrap_or(0),
                            "tx_bytes": s.map(|s| s.tx_bytes).unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "relay": relay.filter(|r| !r.name.is_empty()).map(|r| json!({
                "name": r.name, "transport": r.transport, "error": r.error,
                "sessions": r.sessions, "dropped": r.dropped,
            })),
            "enrolled": st.enrollment.is_some(),
            "login": login_state,
            "login_message": expired.as_ref().map(|_| EXPIRED_MESSAGE),
            "login_detail": expired,
            "key_expiry_ms": st.key_expiry_ms,
            "key_expires_in_secs": st.key_expiry_ms.and_then(|k| login::key_expires_in_secs(k, now_ms())),
            "self": st.enrollment.as_ref().map(|e| json!({
                "name": e.name, "id": e.node_id,
                "addresses": e.addresses.iter().map(address_text).collect::<Vec<_>>(),
                "public_key": self.keys().wg.public().to_string(),
            })),
            "controller": {
                "url": st.enrollment.as_ref().map(|e| e.controller_url.clone()),
                // The netmap signing key this node holds (it follows a
                // rotation's hand-over).
                "key": st.enrollment.as_ref().map(|e| e.controller_key.to_string()),
                "state": conn,
                "detail": detail,
            },
            "netmap": map.map(|m| json!({
                "serial": m.serial,
                "age_secs": secs_between(st.netmap_received_ms, now_ms()),
                "not_after_ms": m.not_after_ms,
                "expires_in_secs": secs_between(now_ms(), m.not_after_ms),
                "inbound_rules": m.inbound_rules.len(),
                "refused": st.refused_maps,
                "deltas": self.deltas.load(std::sync::atomic::Ordering::Relaxed),
            })),
            "interface": self.cfg.interface,
            "data_plane": stats.is_some(),
            "endpoints": stats.as_ref().map(|s| s.candidates.iter().map(ToString::to_string).collect::<Vec<_>>()),
            "stun": stats.as_ref().map(|s| s.stun.iter().map(|(server, seen)| json!({
                "server": server.to_string(),
                "reflexive": seen.map(|a| a.to_string()),
            })).collect::<Vec<_>>()),
            "drops": stats.as_ref().map(|s| json!(s.drops.iter().map(|(r, n)| (r.to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>())),
            "peers": peers,
            "prefs": *self.prefs.borrow(),
            "dns": dns,
            "posture": posture,
            "quarantine": map.and_then(|m| m.quarantine.as_ref()).map(|q| json!({
                "since_ms": q.since_ms, "reason": q.reason,
            })),
        })
    }

    fn wg_config(&self, include_private_key: bool) -> anyhow::Result<String> {
        let st = self.lock();
        let e = st
            .enrollment
            .as_ref()
            .ok_or_else(|| anyhow!("not enrolled"))?;
        let mut out =
            String::from("# ztmesh: this node's view from the controller (netmap serial ");
        out.push_str(
            &st.netmap
                .as_ref()
                .map(|m| m.serial)
                .unwrap_or(0)
                .to_string(),
        );
        out.push_str(
            ").\n# The controller-enforced inbound filter is not expressible here.\n[Interface]\n",
        );
        if include_private_key {
            out.push_str(&format!("PrivateKey = {}\n", self.keys().wg.to_base64()));
        } else {
            out.push_str("# PrivateKey omitted (use --include-private-key)\n");
        }
        let addresses: Vec<String> = e.addresses.iter().map(address_text).collect();
        out.push_str(&format!("Address = {}\n", addresses.join(", ")));
        out.push_str(&format!("ListenPort = {}\n", self.cfg.listen_port));
        out.push_str(&format!("MTU = {}\n", self.cfg.mtu));
        if let Some(m) = &st.netmap {
            for p in &m.peers {
                let Ok(k) = WgPublicKey::from_slice(&p.wg_key) else {
                    continue;
                };
                out.push_str(&format!("\n# {}\n[Peer]\nPublicKey = {k}\n", p.name));
                out.push_str(&format!("AllowedIPs = {}\n", p.allowed_ips.join(", ")));
                if let Some(ep) = p.endpoints.first() {
                    out.push_str(&format!("Endpoint = {ep}\n"));
                }
                if p.persistent_keepalive > 0 {
                    out.push_str(&format!(
                        "PersistentKeepalive = {}\n",
                        p.persistent_keepalive
                    ));
                }
            }
        }
        Ok(out)
    }

    async fn handle(self: &Arc<Self>, req: Request, link: &mut Link) -> Response {
        let r = match req {
            Request::Up {
                controller,
                auth_key,
                hostname,
                timeout_ms,
                prefs,
                fingerprint,
                login_timeout_ms,
                force_reauth,
                progress: _,
            } => {
                let args = UpArgs {
                    controller,
                    auth_key,
                    hostname,
                    fingerprint,
                    timeout: Duration::from_millis(timeout_ms.clamp(1000, 600_000)),
                    login_timeout: Duration::from_millis(
                        login_timeout_ms
                            .unwrap_or(timeout_ms)
                            .clamp(1000, MAX_LOGIN_WAIT_MS),
                    ),
                    force_reauth,
                    prefs,
                };
                self.up(args, link).await
            }
            Request::Down => self.down().await,
            Request::Logout => self.logout().await,
            Request::Status => Ok(self.status().await),
            Request::WgConfig {
                include_private_key,
            } => self.wg_config(include_private_key).map(|c| json!(c)),
        };
        match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }
}

/// Longest wait for a person to sign in that `up` accepts (1 hour).
const MAX_LOGIN_WAIT_MS: u64 = 3_600_000;

enum SessionError {
    /// Transient: reconnect with backoff.
    Retry(String),
    /// The controller refused this node (deleted): fail closed, keep retrying.
    Revoked(String),
    /// The node's key expired: fail closed, keep the identity, retry slowly.
    Expired(String),
    /// The controller refused the session for a reason this node can recover
    /// from (`clock-skew`, `replaced`, `replayed`, `bad-proof`): keep the last
    /// verified map, log an error, retry with backoff.
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The controller does not serve this node's control protocol version:
    /// keep the last verified map, log an error, retry slowly.
    Incompatible(String),
}

/// The one place the agent changes the data plane's peers and filter: the
/// steps of [`Install::steps`], in their order (rules before peers).
fn install(dp: &DataPlane, what: Install) {
    for step in what.steps() {
        match step {
            Step::Filter(rules) => dp.set_filter(Some(rules)),
            Step::Peers(peers) => dp.set_peers(peers),
        }
    }
}

/// How `status` names a path: `direct ADDR`, `relay NAME`, or `none`
/// (`direct` is false for a UDP destination that is not fresh: a path that
/// is being tried, not one that answered).
fn path_text(d: Option<Destination>, direct: bool, relay: &str) -> String {
    match d {
        Some(Destination::Udp(a)) if direct => format!("direct {a}"),
        Some(Destination::Udp(a)) => format!("trying {a}"),
        Some(Destination::Relay(_)) => {
            format!("relay {}", if relay.is_empty() { "-" } else { relay })
        }
        None => "none".into(),
    }
}

fn status_error(s: tonic::Status) -> SessionError {
    match session_end(&s, now_ms()) {
        SessionEnd::Revoked(m) => SessionError::Revoked(m),
        SessionEnd::Expired(m) => SessionError::Expired(m),
        SessionEnd::ClockSkew { skew_ms, message } => SessionError::Refused {
            reason: "clock-skew",
            message: format!("{}: {message}", clock_hint(skew_ms)),
        },
        SessionEnd::Refused { reason, message } => SessionError::Refused { reason, message },
        SessionEnd::Retry(m) => SessionError::Retry(m),
        SessionEnd::Incompatible(m) => SessionError::Incompatible(m),
    }
}

/// The caller's credentials as the kernel recorded them at `connect`. If they
/// cannot be read, the caller is nobody in no group: only reads are allowed.
fn peer_caller(stream: &tokio::net::UnixStream) -> Caller {
    let Ok(cred) = stream.peer_cred() else {
        return Caller {
            uid: u32::MAX,
            gids: Vec::new(),
        };
    };
    let mut gids = peer_groups(stream).unwrap_or_default();
    gids.push(cred.gid());
    Caller {
        uid: cred.uid(),
        gids,
    }
}

/// The peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13+).
fn peer_groups(stream: &tokio::net::UnixStream) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // `SO_PEERGROUPS` is 59 where the kernel uses asm-generic/socket.h; alpha,
    // mips, parisc and sparc number it differently, and there only the
    // primary group is checked.
    if !cfg!(any(
        target_arch = "x86",
        target_arch = "x86_64",
        target_arch = "arm",
        target_arch = "aarch64",
        target_arch = "riscv64",
        target_arch = "powerpc64",
        target_arch = "s390x",
        target_arch = "loongarch64"
    )) {
        return Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
    }
    const SO_PEERGROUPS: libc::c_int = 59;
    /// The kernel's NGROUPS_MAX: the most groups a process can have.
    const MAX_GROUPS: usize = 65_536;
    let mut gids: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(gids.len() * std::mem::size_of::<libc::gid_t>())
            .unwrap_or(libc::socklen_t::MAX);
        // SAFETY: the buffer is valid for `len` bytes, and the kernel writes
        // at most `len` bytes and updates `len`.
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                gids.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            gids.truncate(n);
            return Ok(gids);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || n > MAX_GROUPS {
            return Err(err);
        }
        gids.resize(n, 0);
    }
    Err(std::io::Error::other("group list changed size twice"))
}

/// Who signs in: the node's keys, and the hostname and OS the confirmation
/// page shows.
pub struct Applicant<'a> {
    pub machine: &'a SigningKey,
    pub wg: &'a WgPrivateKey,
    pub hostname: &'a str,
    pub os: &'a str,
}

/// Runs an interactive login on `ctl` (a controller at `url`, pinned to
/// `fp`) and stores the enrollment in `STATE_DIR/enrollment.json` once it
/// completes; `on_prompt` gets the prompt first. Returns the enrollment and
/// the key expiry (Unix ms, 0 = never). The caller bounds the time; on any
/// failure, or when the future is dropped, nothing is stored.
///
/// # Errors
/// The login failed ([`crate::control::client::SignInError`]), or the file
/// cannot be written.
pub async fn sign_in(
    ctl: &mut Controller,
    state_dir: &Path,
    url: &str,
    fp: [u8; 32],
    who: &Applicant<'_>,
    on_prompt: impl FnMut(&login::Prompt),
) -> anyhow::Result<(Enrollment, i64)> {
    let enrolled = ctl
        .sign_in(who.machine, who.wg, who.hostname, who.os, on_prompt)
        .await
        .map_err(anyhow::Error::new)?;
    let key_expiry_ms = enrolled.key_expiry_ms;
    let e = Enrollment::new(url, fp, enrolled);
    store_enrollment(state_dir, &e)?;
    Ok((e, key_expiry_ms))
}

/// Writes `STATE_DIR/enrollment.json` (0600, durably).
fn store_enrollment(state_dir: &Path, e: &Enrollment) -> anyhow::Result<()> {
    write_secret_file(
        &state_dir.join("enrollment.json"),
        &serde_json::to_vec_pretty(e)?,
    )?;
    Ok(())
}

/// The last netmap this node installed (`STATE_DIR/netmap.bin`), if its
/// signature verifies against the controller key of `STATE_DIR/enrollment.json`
/// (expired or not: `ztmesh netcheck` only reads the relays from it).
///
/// # Errors
/// Not enrolled, no map yet, the files unreadable (the state dir is
/// root's), or a map that does not verify.
pub fn last_netmap(state_dir: &Path) -> anyhow::Result<NetMap> {
    let read = |name: &str| {
        let path = state_dir.join(name);
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    };
    let e: Enrollment =
        serde_json::from_slice(&read("enrollment.json")?).context("enrollment.json is corrupt")?;
    let signed =
        SignedNetMap::decode(read("netmap.bin")?.as_slice()).context("netmap.bin is corrupt")?;
    netmap::verify_signature(&e.controller_key, &signed)
        .map_err(|err| anyhow!("netmap.bin does not verify: {err}"))
}

/// `prefs.json` in `state_dir`, or the defaults when there is none.
///
/// # Errors
/// The file exists but cannot be read or parsed (the daemon refuses to
/// start rather than forget the user's routing choices).
fn load_prefs(state_dir: &Path) -> anyhow::Result<Prefs> {
    let path = state_dir.join("prefs.json");
    match std::fs::read(&path) {
        Ok(b) => {
            serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Prefs::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The controller's address when its URL names one as a literal.
fn controller_ip(controller_url: &str) -> Option<IpAddr> {
    let uri: tonic::transport::Uri = controller_url.parse().ok()?;
    uri.host()?.trim_matches(['[', ']']).parse().ok()
}

/// The controller's addresses: the literal in its URL, else what its host
/// name resolves to now (bounded: 3 s); empty when neither works.
async fn controller_addrs(controller_url: &str) -> Vec<IpAddr> {
    if let Some(ip) = controller_ip(controller_url) {
        return vec![ip];
    }
    let Ok(uri) = controller_url.parse::<tonic::transport::Uri>() else {
        return Vec::new();
    };
    let Some(host) = uri.host() else {
        return Vec::new();
    };
    let target = format!("{host}:{}", uri.port_u16().unwrap_or(443));
    match tokio::time::timeout(Duration::from_secs(3), tokio::net::lookup_host(target)).await {
        Ok(Ok(addrs)) => {
            let mut v: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            v.sort();
            v.dedup();
            v.truncate(16);
            v
        }
        _ => Vec::new(),
    }
}

/// The relays' underlay addresses (QUIC, TCP, STUN).
fn relay_ips(relays: &[pb::Relay]) -> Vec<IpAddr> {
    relays
        .iter()
        .flat_map(|r| {
            [r.quic_addr.as_str(), r.tcp_addr.as_str()]
                .into_iter()
                .chain(r.stun_addrs.iter().map(String::as_str))
        })
        .filter_map(|a| a.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .collect()
}

/// The local address the kernel would use toward the controller, with our port:
/// the endpoint peers on the same underlay can reach us at.
fn local_endpoint(controller_url: &str, port: u16) -> Option<SocketAddr> {
    let uri: tonic::transport::Uri = controller_url.parse().ok()?;
    let host = uri.host()?.trim_matches(['[', ']']);
    let ip: std::net::IpAddr = host.parse().ok()?;
    let bind: SocketAddr = if ip.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect((ip, uri.port_u16().unwrap_or(443))).ok()?;
    Some(SocketAddr::new(s.local_addr().ok()?.ip(), port))
}

fn endpoint_strings(list: &[SocketAddr]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// Whole seconds from `from_ms` to `to_ms`, 0 if `to_ms` is earlier. The
/// times may come from a netmap (any `i64`), so this never overflows.
fn secs_between(from_ms: i64, to_ms: i64) -> i64 {
    to_ms.saturating_sub(from_ms).max(0) / 1000
}

/// The key expiry a map names for this node (Unix ms, 0 = never).
fn self_key_expiry(map: &NetMap) -> Option<i64> {
    map.self_node.as_ref().map(|n| n.key_expiry_ms)
}

/// The OS string sent at login: the OS and the kernel release (`uname -r`).
fn host_os() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    login::os_string(std::env::consts::OS, &release)
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// What the daemon holds before its async runtime starts (and before it drops
/// its capabilities, see [`crate::privs`]).
pub struct Prepared {
    /// The state directory's lock, held for the daemon's life.
    lock: crate::statelock::StateLock,
    /// The local API socket, bound, with its owner group and mode set.
    listener: std::os::unix::net::UnixListener,
    /// The `/metrics` listener, bound, if asked for.
    metrics: Option<std::net::TcpListener>,
}

/// Creates the state dir, takes its lock, and binds the local socket. Blocking;
/// needs whatever privilege the paths and `--socket-group` (chown) need.
///
/// # Errors
/// Another daemon holds the state dir; unusable state dir or socket path.
pub fn prepare(cfg: &DaemonConfig) -> anyhow::Result<Prepared> {
    ensure_private_dir(&cfg.state_dir)?;
    // Before anything in the state dir or the socket is touched.
    let lock = crate::statelock::StateLock::acquire(&cfg.state_dir)?;
    if let Some(parent) = cfg.socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = std::os::unix::net::UnixListener::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    let mode = if let Some(gid) = cfg.socket_gid {
        std::os::unix::fs::chown(&cfg.socket, None, Some(gid))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))?;
    listener.set_nonblocking(true)?;
    let metrics = match cfg.metrics_listen {
        Some(a) => {
            let l = std::net::TcpListener::bind(a)
                .with_context(|| format!("binding --metrics-listen {a}"))?;
            l.set_nonblocking(true)?;
            Some(l)
        }
        None => None,
    };
    Ok(Prepared {
        lock,
        listener,
        metrics,
    })
}

/// Runs the daemon until SIGINT/SIGTERM.
///
/// # Errors
/// Unusable state dir.
pub async fn run(cfg: DaemonConfig, prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        lock,
        listener,
        metrics,
    } = prepared;
    let listener = tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("listening on {}", cfg.socket.display()))?;
    let keys = Keys::load_or_generate(&cfg.state_dir)?;
    let (live_serial, _) = watch::channel(0u64);
    let prefs = load_prefs(&cfg.state_dir)?;
    // A daemon that crashed may have left policy rules and its nftables
    // table behind; this interface's are ours to remove.
    let mut host = HostRoutes::new(&cfg.interface);
    host.reset();
    let daemon = Arc::new(Daemon {
        cfg: cfg.clone(),
        prefs: watch::channel(prefs).0,
        host: Mutex::new(host),
        dns: Mutex::new(None),
        keys: Mutex::new(Arc::new(keys)),
        state: Mutex::new(State {
            enrollment: None,
            netmap: None,
            netmap_received_ms: 0,
            conn: ConnState::Idle,
            control_task: None,
            refused_maps: 0,
            controller_addrs: Vec::new(),
            key_expiry_ms: None,
            enrolling: false,
            posture_sent: None,
            posture_unreported: BTreeMap::new(),
        }),
        dp: tokio::sync::Mutex::new(None),
        live_serial,
        deltas: std::sync::atomic::AtomicBool::new(true),
        expired: watch::channel(None).0,
        posture: Arc::new(Mutex::new(Collector::default())),
    });

    // A resolv.conf left pointing at MagicDNS by a run that crashed goes
    // back first; MagicDNS points it again once a map is installed.
    daemon.restore_host_dns();

    // Come back as we were: enrolled and not `down` → data plane up with the
    // last verified netmap, then reconnect.
    if let Some(e) = daemon.load_enrollment()? {
        {
            let mut st = daemon.lock();
            st.enrollment = Some(e.clone());
            st.controller_addrs = controller_ip(&e.controller_url).into_iter().collect();
        }
        if !daemon.path("down").exists() {
            daemon.ensure_dataplane(&e).await?;
            if let Some((map, signed)) = daemon.load_cached_netmap(&e) {
                let exit = daemon.prefs.borrow().exit_node.clone();
                match translate(&map, exit.as_deref()) {
                    Ok(t) => {
                        if let Some(dp) = daemon.dp.lock().await.as_ref() {
                            daemon.install_map(dp, &map, &signed, t);
                        }
                        tracing::info!(serial = map.serial, "restored the last netmap");
                        let mut st = daemon.lock();
                        st.key_expiry_ms = self_key_expiry(&map);
                        st.netmap = Some(map);
                        st.netmap_received_ms = now_ms();
                    }
                    Err(err) => tracing::error!(error = %err, "stored netmap unusable"),
                }
            }
            daemon.start_control(e);
        }
    }

    // Under systemd (Type=notify): ready below; the keep-alives ride on the
    // expiry check, which takes the daemon's state lock every second, so a
    // wedged daemon stops them and systemd restarts it.
    let notify = ztmesh_proto::ops::notify::Notifier::from_env().map(Arc::new);
    let keepalive = notify.clone().and_then(|n| {
        let every = n.keepalive_every()?;
        Some((n, every.as_secs().max(1)))
    });

    // Fail closed when the map in force expires while the controller is away.
    let expiry = daemon.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        for tick in 0u64.. {
            t.tick().await;
            if let Some((n, every)) = &keepalive {
                if tick % every == 0 {
                    n.keep_alive();
                }
            }
            let expired = expiry
                .lock()
                .netmap
                .as_ref()
                .is_some_and(|m| m.not_after_ms <= now_ms());
            if expired {
                tracing::warn!("netmap expired; dropping all peers until the controller is back");
                expiry.clear_peers().await;
                expiry.lock().netmap = None;
            }
        }
    });

    let _metrics = match metrics {
        Some(l) => {
            let l = tokio::net::TcpListener::from_std(l).context("--metrics-listen")?;
            tracing::info!(address = ?cfg.metrics_listen, "serving /metrics");
            let d = daemon.clone();
            Some(AbortOnDrop(tokio::spawn(ztmesh_proto::scrape::serve(
                l,
                move |format| {
                    let d = d.clone();
                    async move { d.metrics_text(format).await }
                },
            ))))
        }
        None => None,
    };

    tracing::info!(socket = %cfg.socket.display(), "daemon ready");
    if let Some(n) = &notify {
        n.ready(&format!("local API on {}", cfg.socket.display()));
    }

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let d = daemon.clone();
                tokio::spawn(async move { serve_client(d, stream).await });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("daemon stopping");
    if let Some(n) = &notify {
        n.stopping();
    }
    daemon.stop().await;
    let _ = std::fs::remove_file(&cfg.socket);
    drop(lock);
    Ok(())
}

/// A posture collection and when it finished (Unix ms).
type Collected = (Collection, i64);

/// Reads the posture attributes every [`posture::COLLECT_INTERVAL`] while
/// `up --report-posture` is on, on a blocking thread (nft and apt-get may
/// take seconds), and publishes each collection with its time (waking the
/// session when it changed); publishes `None` while reporting
/// is off, so turning it on again never sends the set of long ago. A pass
/// that may run `apt-get` follows a quick one without it, so a session's
/// first report does not wait for apt.
async fn collect_posture(
    collector: Arc<Mutex<Collector>>,
    mut prefs: watch::Receiver<Prefs>,
    out: watch::Sender<Option<Collected>>,
) {
    loop {
        if prefs.borrow_and_update().report_posture {
            for run_apt in [false, true] {
                if run_apt && !prefs.borrow().report_posture {
                    break;
                }
                let c = collector.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let mut c = c.lock().unwrap_or_else(|p| p.into_inner());
                    let now = now_ms();
                    let due = c.apt_due(now);
                    (!run_apt || due).then(|| c.collect(now, run_apt))
                })
                .await;
                match read {
                    Ok(Some(set)) => {
                        let at = now_ms();
                        out.send_if_modified(|cur| {
                            let changed = cur.as_ref().is_none_or(|(old, _)| *old != set);
                            *cur = Some((set, at));
                            changed
                        });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "posture collection failed"),
                }
            }
        } else {
            out.send_if_modified(|cur| cur.take().is_some());
        }
        tokio::select! {
            () = tokio::time::sleep(posture::COLLECT_INTERVAL) => {}
            r = prefs.changed() => if r.is_err() { return },
        }
    }
}

/// Serves one local API connection (framing in [`crate::localapi`]): the
/// request line, progress lines if it asked for them, the response line.
async fn serve_client(d: Arc<Daemon>, stream: tokio::net::UnixStream) {
    let caller = peer_caller(&stream);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r).take(MAX_LINE as u64);
    let mut line = String::new();
    let req = match reader.read_line(&mut line).await {
        Ok(_) => serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}")),
        Err(e) => Err(format!("bad request: {e}")),
    };
    let req = req.and_then(|req| match authorize(&req, &caller, d.cfg.operator_gid) {
        Ok(()) => Ok(req),
        Err(denied) => {
            tracing::warn!(
                uid = caller.uid,
                command = req.command(),
                "local API request refused"
            );
            Err(denied)
        }
    });
    let resp = match req {
        Err(e) => Response::err(e),
        Ok(req) => {
            let wants_progress = matches!(req, Request::Up { progress: true, .. });
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Progress>(4);
            let (gone_tx, gone_rx) = watch::channel(false);
            // The client sends nothing after its request: the end of its
            // stream means it hung up (bytes it should not send are dropped).
            let mut rest = reader.into_inner();
            let watcher = tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while matches!(rest.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = gone_tx.send(true);
            });
            let mut link = Link {
                progress: wants_progress.then_some(tx),
                hung_up: gone_rx,
            };
            let handled = d.handle(req, &mut link);
            tokio::pin!(handled);
            let resp = loop {
                tokio::select! {
                    resp = &mut handled => break resp,
                    Some(p) = rx.recv() => {
                        // A client that is gone shows as hung up to the request.
                        if let Ok(l) = to_line(&p) {
                            let _ = w.write_all(l.as_bytes()).await;
                        }
                    }
                }
            };
            // Progress queued just before the end still precedes the response.
            while let Ok(p) = rx.try_recv() {
                if let Ok(l) = to_line(&p) {
                    let _ = w.write_all(l.as_bytes()).await;
                }
            }
            watcher.abort();
            resp
        }
    };
    let out = to_line(&resp).unwrap_or_else(|_| "{\"ok\":false}\n".into());
    let _ = w.write_all(out.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmap_times_at_the_extremes_never_overflow() {
        let cases = [
            (0, 1_999, 1),
            (5_000, 1_000, 0),
            (i64::MIN, i64::MAX, i64::MAX / 1000),
            (i64::MAX, i64::MIN, 0),
            (i64::MIN, 0, i64::MAX / 1000),
            (-1, i64::MAX, i64::MAX / 1000),
            (i64::MAX, i64::MAX, 0),
        ];
        for (from, to, want) in cases {
            assert_eq!(secs_between(from, to), want, "{from} -> {to}");
        }
    }

    /// `enrollment.json` exactly as `ztmesh up` writes it (pretty JSON; the
    /// controller sends bare overlay addresses).
    const STATE_FILE: &str = r#"{
  "controller_url": "https://[fd00::1]:8443",
  "fingerprint": "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
  "controller_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
  "node_id": 7,
  "name": "web-1",
  "addresses": [
    "100.64.0.7",
    "fd7a:115c:a1e0::7"
  ]
}"#;

    #[test]
    fn a_state_file_written_today_loads_and_is_written_back_unchanged() {
        let e: Enrollment = serde_json::from_str(STATE_FILE).unwrap();
        assert_eq!(e.node_id, 7);
        assert_eq!(e.name, "web-1");
        assert_eq!(e.fingerprint, std::array::from_fn(|i| i as u8));
        assert_eq!(
            e.controller_key,
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
                .parse()
                .unwrap()
        );
        assert_eq!(
            e.addresses,
            [
                "100.64.0.7/32".parse::<IpNet>().unwrap(),
                "fd7a:115c:a1e0::7/128".parse().unwrap()
            ]
        );
        let again = serde_json::to_string_pretty(&e).unwrap();
        assert_eq!(again, STATE_FILE, "same bytes on disk");
        // Addresses written as prefixes load as the same addresses.
        let prefixed = STATE_FILE
            .replace("\"100.64.0.7\"", "\"100.64.0.7/32\"")
            .replace("a1e0::7\"", "a1e0::7/128\"");
        assert_ne!(prefixed, STATE_FILE);
        let p: Enrollment = serde_json::from_str(&prefixed).unwrap();
        assert_eq!(p, e);
    }

    #[test]
    fn tls_pins_round_trip_in_the_state_file_and_old_files_load_without_them() {
        let old: Enrollment = serde_json::from_str(STATE_FILE).unwrap();
        assert!(old.tls_pins.is_empty(), "a file from before has none");
        assert_eq!(old.pins(), vec![old.fingerprint]);
        let mut e = old.clone();
        e.tls_pins = vec![[9; 32], old.fingerprint];
        let text = serde_json::to_string_pretty(&e).unwrap();
        assert!(text.contains(&auth::hex(&[9; 32])), "{text}");
        let back: Enrollment = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            back.pins(),
            vec![[9; 32], old.fingerprint],
            "learned first, no duplicate"
        );
        e.tls_pins = vec![[9; 32]];
        assert_eq!(
            e.pins(),
            vec![[9; 32], old.fingerprint],
            "the enrolled pin stays"
        );
        let bad = text.replacen(&auth::hex(&[9; 32]), "nothex", 1);
        let err = serde_json::from_str::<Enrollment>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_pins"), "{err}");
    }

    #[test]
    fn a_corrupt_state_file_is_refused_naming_the_field() {
        let cases = [
            ("fingerprint", "0001020304050607", "deadbeef"),
            (
                "controller_key",
                "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                "not a key",
            ),
            ("addresses", "100.64.0.7", "100.64.0.300"),
        ];
        for (field, good, bad) in cases {
            let corrupt = STATE_FILE.replacen(good, bad, 1);
            assert_ne!(corrupt, STATE_FILE, "{field}: the case edits the file");
            let err = serde_json::from_str::<Enrollment>(&corrupt)
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn local_endpoint_uses_the_route_toward_the_controller() {
        let ep = local_endpoint("https://127.0.0.1:8443", 51820).unwrap();
        assert_eq!(ep, "127.0.0.1:51820".parse().unwrap());
        assert!(local_endpoint("https://name-not-ip:8443", 1).is_none());
    }
}
