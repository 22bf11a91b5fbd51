//! Detectors: which nodes misbehave, on whose word, and what to do about it.
//!
//! Pure: evidence in (with the time), findings and decisions out. The
//! evidence about a suspect is only ever what *other* nodes report about
//! traffic they received from it and refused — a denied flow is reported
//! by the receiver whose filter denied it, after its data plane
//! authenticated the packet to the suspect's WireGuard session; a
//! handshake from a key the receiver does not list is reported with the
//! initiator's static key, which the receiver verified. The coordinator
//! ([`crate::mesh`]) drops anything that cannot be true before it gets
//! here: a flow "from" a node that is not the reporter's peer, a report by
//! the suspect about itself.
//!
//! A lying node can still report anything about its peers. So no reporter
//! alone can make a detector fire: evidence is kept per *principal* — the
//! user who owns the reporting node, or the node itself when it is tagged —
//! so one person's several devices are one voice; every detector needs
//! [`DetectConfig::min_reporters`] distinct principals, and a principal's
//! share of any sum is capped at `threshold / min_reporters` (rounded up).
//! Framing a node takes that many colluding principals, all with nodes that
//! are its peers.
//!
//! Windows slide: counts live in time buckets, refused ports with the time
//! they were last seen. Scans are judged over a long window (10 min by
//! default) so one paced a receiver at a time still shows on several;
//! bursts and handshakes over a short one.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;

use crate::UnixMs;

/// How the detectors act.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Nothing is observed.
    Off,
    /// Findings are recorded (detections, audit) with what would have been
    /// done; nobody is quarantined and no alert is sent.
    DryRun,
    /// Findings are acted on.
    Enforce,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Mode::Off),
            "dry-run" => Ok(Mode::DryRun),
            "enforce" => Ok(Mode::Enforce),
            _ => Err(format!("{s:?}: expected off, dry-run or enforce")),
        }
    }
}

/// What the detectors do when one fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    /// Send an alert only.
    Alert,
    /// Quarantine the node and send an alert.
    Quarantine,
}

impl std::str::FromStr for Response {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "alert" => Ok(Response::Alert),
            "quarantine" => Ok(Response::Quarantine),
            _ => Err(format!("{s:?}: expected alert or quarantine")),
        }
    }
}

/// Thresholds and responses (controller flags `--detect-*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectConfig {
    pub mode: Mode,
    pub response: Response,
    /// The sliding window of the burst and handshake detectors.
    pub window_ms: i64,
    /// The sliding window of the scan detectors: long, so that a scan paced
    /// one receiver at a time still shows on several.
    pub scan_window_ms: i64,
    /// Distinct reporting principals every detector needs (at least 2).
    pub min_reporters: usize,
    /// Scanning: distinct (principal, protocol, port) the node was refused on.
    pub scan_ports: u64,
    /// Scanning: distinct principals that refused the node (any port).
    pub scan_peers: u64,
    /// Burst: denied flows from the node (one per flow and report, ~1 s),
    /// summed over principals — flows, not packets, so one busy stream a
    /// policy change cut off is one flow per second, not thousands.
    pub burst_flows: u64,
    /// Handshake failures: distinct principals that got at least
    /// [`DetectConfig::handshake_min`] verified initiations from the node
    /// while not listing it as a peer.
    pub handshake_peers: u64,
    pub handshake_min: u64,
    /// Nodes with any of these tags are never acted on (the finding is
    /// still recorded).
    pub exempt_tags: Vec<String>,
    /// At most this many nodes are quarantined at once; beyond it a finding
    /// only alerts.
    pub max_quarantined: usize,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            response: Response::Quarantine,
            window_ms: 60_000,
            scan_window_ms: 600_000,
            min_reporters: 2,
            scan_ports: 40,
            scan_peers: 8,
            burst_flows: 1_000,
            handshake_peers: 4,
            handshake_min: 3,
            exempt_tags: Vec::new(),
            max_quarantined: 3,
        }
    }
}

impl DetectConfig {
    /// Checks the thresholds make sense together.
    ///
    /// # Errors
    /// A message naming the flag at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_reporters < 2 {
            return Err(
                "--detect-min-reporters must be at least 2: one node's word frames anyone".into(),
            );
        }
        let min = self.min_reporters as u64;
        for (flag, v) in [
            ("--detect-scan-ports", self.scan_ports),
            ("--detect-scan-peers", self.scan_peers),
            ("--detect-burst-flows", self.burst_flows),
            ("--detect-handshake-peers", self.handshake_peers),
        ] {
            if v < min {
                return Err(format!("{flag} {v} is below --detect-min-reporters {min}"));
            }
        }
        if self.window_ms < 1_000 || self.scan_window_ms < 1_000 {
            return Err("--detect-window and --detect-scan-window must be at least 1s".into());
        }
        if self.handshake_min == 0 {
            return Err("--detect-handshake-min must be at least 1".into());
        }
        Ok(())
    }

    /// A principal's share of a summed threshold.
    fn share(&self, threshold: u64) -> u64 {
        threshold.div_ceil(self.min_reporters.max(1) as u64)
    }

    /// How long evidence is kept: the longer window.
    fn horizon(&self) -> i64 {
        self.window_ms.max(self.scan_window_ms)
    }
}

/// One thing a reporter saw the suspect do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A denied flow to (`proto`, `port`) with `packets`, in one report.
    Denied { proto: u8, port: u16, packets: u64 },
    /// `count` verified handshake initiations from the suspect's key while
    /// the reporter did not list it.
    Handshakes { count: u64 },
}

/// Counts in time buckets: a sliding sum over a window, in bounded memory.
#[derive(Clone, Debug, Default)]
struct Buckets(VecDeque<(UnixMs, u64)>);

/// Buckets per window.
const BUCKETS: i64 = 8;

impl Buckets {
    fn add(&mut self, now: UnixMs, n: u64, window: i64) {
        let width = (window / BUCKETS).max(1);
        let start = now - now.rem_euclid(width);
        match self.0.back_mut() {
            Some((s, c)) if *s == start => *c = c.saturating_add(n),
            _ => self.0.push_back((start, n)),
        }
        self.prune(now, window);
    }

    fn prune(&mut self, now: UnixMs, window: i64) {
        while self.0.front().is_some_and(|(s, _)| *s <= now - window) {
            self.0.pop_front();
        }
        // A clock stepped back leaves buckets "in the future": bounded anyway.
        while self.0.len() as i64 > BUCKETS + 1 {
            self.0.pop_front();
        }
    }

    fn sum(&self, now: UnixMs, window: i64) -> u64 {
        self.0
            .iter()
            .filter(|(s, _)| *s > now - window)
            .fold(0u64, |a, (_, c)| a.saturating_add(*c))
    }
}

/// Reporter ids a testimony lists at most (the principal is what counts).
const MAX_REPORTERS_LISTED: usize = 8;

/// One principal's evidence about one suspect.
#[derive(Clone, Debug, Default)]
struct Witness {
    /// The principal's nodes that reported (all of them: `forget` needs
    /// them; at most the principal's nodes that are the suspect's peers).
    reporters: BTreeSet<u64>,
    first_ms: UnixMs,
    last_ms: UnixMs,
    /// Refused (protocol, port) and when last, at most the principal's share.
    ports: BTreeMap<(u8, u16), UnixMs>,
    flows: Buckets,
    packets: Buckets,
    handshakes: Buckets,
}

impl Witness {
    fn prune(&mut self, now: UnixMs, cfg: &DetectConfig) {
        self.ports
            .retain(|_, last| *last > now - cfg.scan_window_ms);
        self.flows.prune(now, cfg.window_ms);
        self.packets.prune(now, cfg.window_ms);
        self.handshakes.prune(now, cfg.window_ms);
    }

    fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.flows.0.is_empty()
            && self.packets.0.is_empty()
            && self.handshakes.0.is_empty()
    }
}

/// A principal's evidence as a finding shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Testimony {
    /// The node, or the user whose nodes, reported.
    pub principal: String,
    /// Its reporting nodes (some of them).
    pub reporters: Vec<u64>,
    /// Distinct ports refused in the scan window (capped at its share).
    pub ports: u64,
    /// A few of them, "tcp/22" style.
    pub sample: Vec<String>,
    /// Denied flows and their packets in the window.
    pub denied_flows: u64,
    pub denied_packets: u64,
    pub handshakes: u64,
    pub first_ms: UnixMs,
    pub last_ms: UnixMs,
}

/// A detector that fired, with the value that crossed its threshold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fired {
    /// `scan_ports`, `scan_peers`, `denied_burst`, `handshake_failures`.
    pub detector: &'static str,
    pub value: u64,
    pub threshold: u64,
}

/// A node the detectors found misbehaving, and on what evidence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub node: u64,
    pub fired: Vec<Fired>,
    pub evidence: Vec<Testimony>,
}

/// How many distinct ports a testimony names in its sample.
const SAMPLE_PORTS: usize = 8;

/// (suspect, principal) witnesses held at most; beyond it new ones are
/// dropped (and counted) until old ones expire. By their layout (the map
/// slot, 20 ports, three bucket queues) up to about 3.5 KiB each: 70 MiB at
/// worst.
pub const MAX_WITNESSES: usize = 20_000;

/// Witnesses one principal may hold, so that one cannot fill the table
/// and blind the detectors to everyone else's evidence.
pub const MAX_WITNESSES_PER_PRINCIPAL: usize = 2_000;

/// The detectors' state: recent evidence per suspect, per principal.
#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    suspects: HashMap<u64, BTreeMap<String, Witness>>,
    witnesses: usize,
    /// Witnesses per principal.
    per_principal: HashMap<String, usize>,
    /// Evidence dropped because [`MAX_WITNESSES`] was reached.
    pub dropped: u64,
    /// Until when a suspect stays quiet (after a finding).
    quiet: HashMap<u64, UnixMs>,
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            cfg,
            suspects: HashMap::new(),
            witnesses: 0,
            per_principal: HashMap::new(),
            dropped: 0,
            quiet: HashMap::new(),
        }
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Records what node `reporter`, speaking for `principal` (its owner, or
    /// the node itself when tagged), saw `suspect` do at `now`. Reports by a
    /// node about itself are ignored.
    pub fn observe(
        &mut self,
        principal: &str,
        reporter: u64,
        suspect: u64,
        seen: Seen,
        now: UnixMs,
    ) {
        if reporter == suspect || self.cfg.mode == Mode::Off {
            return;
        }
        let port_share = self.cfg.share(self.cfg.scan_ports);
        let flow_share = self.cfg.share(self.cfg.burst_flows);
        let cfg = self.cfg.clone();
        let fresh = !self
            .suspects
            .get(&suspect)
            .is_some_and(|w| w.contains_key(principal));
        let held = self.per_principal.get(principal).copied().unwrap_or(0);
        if fresh && (self.witnesses >= MAX_WITNESSES || held >= MAX_WITNESSES_PER_PRINCIPAL) {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        let w = self
            .suspects
            .entry(suspect)
            .or_default()
            .entry(principal.to_string())
            .or_default();
        if fresh {
            self.witnesses += 1;
            *self.per_principal.entry(principal.to_string()).or_default() += 1;
            w.first_ms = now;
        }
        w.prune(now, &cfg);
        w.reporters.insert(reporter);
        w.last_ms = w.last_ms.max(now);
        match seen {
            Seen::Denied {
                proto,
                port,
                packets,
            } => {
                if (w.ports.len() as u64) < port_share || w.ports.contains_key(&(proto, port)) {
                    w.ports.insert((proto, port), now);
                }
                if w.flows.sum(now, cfg.window_ms) < flow_share {
                    w.flows.add(now, 1, cfg.window_ms);
                }
                w.packets.add(now, packets, cfg.window_ms);
            }
            Seen::Handshakes { count } => {
                w.handshakes.add(now, count, cfg.window_ms);
            }
        }
    }

    /// Forgets everything about `node`: as a suspect, and the testimony of
    /// every principal it reported for (it was released, quarantined,
    /// deleted).
    pub fn forget(&mut self, node: u64) {
        let mut gone: Vec<String> = Vec::new();
        if let Some(w) = self.suspects.remove(&node) {
            gone.extend(w.into_keys());
        }
        for w in self.suspects.values_mut() {
            w.retain(|p, x| {
                let keep = !x.reporters.contains(&node);
                if !keep {
                    gone.push(p.clone());
                }
                keep
            });
        }
        self.suspects.retain(|_, w| !w.is_empty());
        self.quiet.remove(&node);
        self.removed(gone);
    }

    /// Bookkeeping for witnesses removed, by principal.
    fn removed(&mut self, principals: Vec<String>) {
        self.witnesses -= principals.len();
        for p in principals {
            if let Some(n) = self.per_principal.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.per_principal.remove(&p);
                }
            }
        }
    }

    /// Keeps `node` quiet until `until` (a decision that is not a
    /// quarantine is not repeated every window).
    pub fn silence(&mut self, node: u64, until: UnixMs) {
        let q = self.quiet.entry(node).or_insert(until);
        *q = (*q).max(until);
    }

    /// Drops evidence older than the windows.
    pub fn expire(&mut self, now: UnixMs) {
        let cfg = self.cfg.clone();
        let mut gone: Vec<String> = Vec::new();
        for w in self.suspects.values_mut() {
            w.retain(|p, x| {
                x.prune(now, &cfg);
                let keep = !x.is_empty() && x.last_ms > now - cfg.horizon();
                if !keep {
                    gone.push(p.clone());
                }
                keep
            });
        }
        self.suspects.retain(|_, w| !w.is_empty());
        self.removed(gone);
        self.quiet.retain(|_, until| *until > now);
    }

    /// The suspects whose evidence now crosses a threshold, each once (it
    /// stays quiet for the scan window afterwards).
    pub fn evaluate(&mut self, now: UnixMs) -> Vec<Finding> {
        self.expire(now);
        let mut found = Vec::new();
        for (&node, witnesses) in &self.suspects {
            if self.quiet.contains_key(&node) {
                continue;
            }
            if let Some(f) = self.judge(node, witnesses, now) {
                found.push(f);
            }
        }
        found.sort_by_key(|f| f.node);
        let quiet = self.cfg.horizon();
        for f in &found {
            self.quiet.insert(f.node, now.saturating_add(quiet));
        }
        found
    }

    fn judge(
        &self,
        node: u64,
        witnesses: &BTreeMap<String, Witness>,
        now: UnixMs,
    ) -> Option<Finding> {
        let cfg = &self.cfg;
        let min = cfg.min_reporters as u64;
        let scanning: Vec<&Witness> = witnesses.values().filter(|w| !w.ports.is_empty()).collect();
        let flowing: Vec<u64> = witnesses
            .values()
            .map(|w| w.flows.sum(now, cfg.window_ms))
            .filter(|&n| n > 0)
            .collect();
        let shaking = witnesses
            .values()
            .filter(|w| w.handshakes.sum(now, cfg.window_ms) >= cfg.handshake_min)
            .count() as u64;
        let ports: u64 = scanning.iter().map(|w| w.ports.len() as u64).sum();
        let flows: u64 = flowing.iter().fold(0u64, |s, n| s.saturating_add(*n));
        let mut fired = Vec::new();
        for (detector, value, threshold, principals) in [
            ("scan_ports", ports, cfg.scan_ports, scanning.len() as u64),
            (
                "scan_peers",
                scanning.len() as u64,
                cfg.scan_peers,
                scanning.len() as u64,
            ),
            ("denied_burst", flows, cfg.burst_flows, flowing.len() as u64),
            ("handshake_failures", shaking, cfg.handshake_peers, shaking),
        ] {
            if principals >= min && value >= threshold {
                fired.push(Fired {
                    detector,
                    value,
                    threshold,
                });
            }
        }
        if fired.is_empty() {
            return None;
        }
        let evidence = witnesses
            .iter()
            .map(|(principal, w)| Testimony {
                principal: principal.clone(),
                reporters: w
                    .reporters
                    .iter()
                    .take(MAX_REPORTERS_LISTED)
                    .copied()
                    .collect(),
                ports: w.ports.len() as u64,
                sample: w
                    .ports
                    .keys()
                    .take(SAMPLE_PORTS)
                    .map(|&(p, port)| format!("{}/{port}", ztmesh_policy::proto_name(p)))
                    .collect(),
                denied_flows: w.flows.sum(now, cfg.window_ms),
                denied_packets: w.packets.sum(now, cfg.window_ms),
                handshakes: w.handshakes.sum(now, cfg.window_ms),
                first_ms: w.first_ms,
                last_ms: w.last_ms,
            })
            .collect();
        Some(Finding {
            node,
            fired,
            evidence,
        })
    }
}

/// What the controller does about a finding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The node is quarantined and an alert sent.
    Quarantine,
    /// Only an alert is sent: the response is `alert`, or the cap on
    /// simultaneous quarantines is reached (`capped`).
    Alert { capped: bool },
    /// Recorded only: dry-run mode (`would` is what enforce mode would do).
    DryRun { would: Box<Action> },
    /// Recorded only: the node carries an exempt tag.
    Exempt { tag: String },
}

impl Action {
    /// A short label for tables and the audit log.
    pub fn label(&self) -> String {
        match self {
            Action::Quarantine => "quarantine".into(),
            Action::Alert { capped: false } => "alert".into(),
            Action::Alert { capped: true } => "alert (quarantine cap reached)".into(),
            Action::DryRun { would } => format!("dry-run: would {}", would.label()),
            Action::Exempt { tag } => format!("none (exempt: {tag})"),
        }
    }

    /// Whether an alert goes out.
    pub fn alerts(&self) -> bool {
        matches!(self, Action::Quarantine | Action::Alert { .. })
    }
}

/// Decides on a finding about a node with `tags`, with `quarantined` nodes
/// quarantined now.
pub fn decide(cfg: &DetectConfig, tags: &[String], quarantined: usize) -> Action {
    if let Some(tag) = tags.iter().find(|t| cfg.exempt_tags.contains(t)) {
        return Action::Exempt { tag: tag.clone() };
    }
    let act = match cfg.response {
        Response::Alert => Action::Alert { capped: false },
        Response::Quarantine if quarantined >= cfg.max_quarantined => {
            Action::Alert { capped: true }
        }
        Response::Quarantine => Action::Quarantine,
    };
    match cfg.mode {
        Mode::Enforce => act,
        Mode::DryRun | Mode::Off => Action::DryRun {
            would: Box::new(act),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: UnixMs = 1_700_000_000_000;
    const TCP: u8 = 6;

    fn detector() -> Detector {
        Detector::new(DetectConfig::default())
    }

    fn who(r: u64) -> String {
        format!("node:{r}")
    }

    fn scan(d: &mut Detector, reporter: u64, suspect: u64, ports: u16, now: UnixMs) {
        for port in 1..=ports {
            d.observe(
                &who(reporter),
                reporter,
                suspect,
                Seen::Denied {
                    proto: TCP,
                    port,
                    packets: 1,
                },
                now,
            );
        }
    }

    #[test]
    fn a_scan_seen_by_two_principals_fires_once() {
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        assert!(d.evaluate(T0).is_empty(), "one receiver is never enough");
        scan(&mut d, 3, 9, 100, T0 + 1_000);
        let found = d.evaluate(T0 + 1_000);
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(f.node, 9);
        assert_eq!(
            f.fired[0],
            Fired {
                detector: "scan_ports",
                value: 40,
                threshold: 40
            }
        );
        assert_eq!(f.evidence.len(), 2);
        assert_eq!(f.evidence[0].ports, 20, "a principal's share is capped");
        assert_eq!(f.evidence[0].sample.len(), SAMPLE_PORTS);
        assert_eq!(f.evidence[0].sample[0], "tcp/1");
        assert_eq!(f.evidence[0].reporters, vec![2]);
        // Quiet afterwards: more evidence does not fire again.
        scan(&mut d, 4, 9, 100, T0 + 2_000);
        assert!(d.evaluate(T0 + 2_000).is_empty());
    }

    #[test]
    fn one_liar_cannot_frame_anyone_however_loud() {
        let mut d = detector();
        // Every detector's input, maximal, from one reporter.
        scan(&mut d, 2, 9, 60_000, T0);
        for t in 0..100 {
            d.observe(
                &who(2),
                2,
                9,
                Seen::Denied {
                    proto: TCP,
                    port: 1,
                    packets: u64::MAX,
                },
                T0 + t,
            );
        }
        d.observe(&who(2), 2, 9, Seen::Handshakes { count: u64::MAX }, T0);
        assert!(d.evaluate(T0 + 100).is_empty());
        // A second, quiet reporter adds its share only.
        scan(&mut d, 3, 9, 5, T0 + 100);
        assert!(d.evaluate(T0 + 100).is_empty(), "20 + 5 ports < 40");
        // Reports by the suspect about itself are not evidence.
        scan(&mut d, 9, 9, 1000, T0 + 100);
        assert!(d.evaluate(T0 + 100).is_empty());
    }

    #[test]
    fn one_persons_devices_are_one_voice() {
        let mut d = detector();
        for reporter in [2, 3, 4] {
            for port in 1..=100 {
                d.observe(
                    "alice@example.com",
                    reporter,
                    9,
                    Seen::Denied {
                        proto: TCP,
                        port,
                        packets: 1,
                    },
                    T0,
                );
            }
        }
        assert!(d.evaluate(T0).is_empty(), "three laptops of alice's");
        scan(&mut d, 5, 9, 100, T0);
        let f = d.evaluate(T0);
        assert_eq!(f.len(), 1);
        let alice = f[0]
            .evidence
            .iter()
            .find(|t| t.principal == "alice@example.com")
            .unwrap();
        assert_eq!((alice.ports, alice.reporters.clone()), (20, vec![2, 3, 4]));
    }

    #[test]
    fn a_scan_paced_one_receiver_at_a_time_still_fires() {
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        assert!(d.evaluate(T0).is_empty());
        // Two minutes later (beyond the short window), the next receiver.
        scan(&mut d, 3, 9, 100, T0 + 120_000);
        let f = d.evaluate(T0 + 120_000);
        assert_eq!(f.len(), 1, "the scan window is 10 minutes");
        // Beyond the scan window, the first receiver's ports are gone.
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        scan(&mut d, 3, 9, 100, T0 + 601_000);
        assert!(d.evaluate(T0 + 601_000).is_empty());
    }

    #[test]
    fn handshake_failures_need_many_principals_each_with_repeats() {
        let mut d = detector();
        for r in 2..=4 {
            d.observe(&who(r), r, 9, Seen::Handshakes { count: 50 }, T0);
        }
        // A lone stale initiation to a fourth receiver (a map race) is not enough.
        d.observe(&who(5), 5, 9, Seen::Handshakes { count: 1 }, T0);
        assert!(d.evaluate(T0).is_empty());
        d.observe(&who(5), 5, 9, Seen::Handshakes { count: 2 }, T0);
        let f = d.evaluate(T0);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fired[0].detector, "handshake_failures");
        assert_eq!(f[0].fired[0].value, 4);
        // The short window slides: handshakes a minute old no longer count.
        let mut d = detector();
        for r in 2..=4 {
            d.observe(&who(r), r, 9, Seen::Handshakes { count: 50 }, T0);
        }
        d.observe(&who(5), 5, 9, Seen::Handshakes { count: 3 }, T0 + 61_000);
        assert!(d.evaluate(T0 + 61_000).is_empty());
    }

    #[test]
    fn a_burst_counts_denied_flows_not_packets() {
        let stream = |d: &mut Detector, r: u64, secs: i64, start: UnixMs| {
            for s in 0..secs {
                d.observe(
                    &who(r),
                    r,
                    9,
                    Seen::Denied {
                        proto: 17,
                        port: 514,
                        packets: 100,
                    },
                    start + s * 1_000,
                )
            }
        };
        // One busy UDP stream (100 pps) to each of two receivers that a
        // policy change cut off: one flow per report, not 6,000 packets.
        let mut d = detector();
        stream(&mut d, 2, 60, T0);
        stream(&mut d, 3, 60, T0);
        assert!(d.evaluate(T0 + 59_000).is_empty());
        // Many denied flows at once: 500 per principal (its share) per minute.
        let mut d = detector();
        for r in [2, 3] {
            for port in 0..600u16 {
                d.observe(
                    &who(r),
                    r,
                    9,
                    Seen::Denied {
                        proto: 17,
                        port: 1000 + port % 10,
                        packets: 1,
                    },
                    T0,
                );
            }
        }
        let f = d.evaluate(T0);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fired[0].detector, "denied_burst");
        assert_eq!(f[0].fired[0].value, 1_000);
        assert_eq!(f[0].evidence[0].denied_packets, 600);
    }

    #[test]
    fn forget_clears_a_node_as_suspect_and_as_witness() {
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        scan(&mut d, 3, 9, 100, T0);
        scan(&mut d, 9, 2, 1, T0);
        assert_eq!(d.witnesses, 3);
        assert_eq!(d.evaluate(T0).len(), 1);
        d.forget(9);
        assert_eq!(d.witnesses, 0, "9 as suspect, and its testimony about 2");
        assert!(d.suspects.is_empty() && d.quiet.is_empty());
        // Released, it starts from nothing: one new report is not a finding.
        scan(&mut d, 2, 9, 100, T0 + 1);
        assert!(d.evaluate(T0 + 1).is_empty());
        // A quarantined reporter's earlier testimony is gone with it.
        let mut d = detector();
        scan(&mut d, 5, 1, 100, T0);
        d.forget(5);
        scan(&mut d, 6, 1, 100, T0 + 1);
        assert!(d.evaluate(T0 + 1).is_empty());
    }

    #[test]
    fn silenced_nodes_stay_quiet_until_the_time_given() {
        let mut d = detector();
        d.silence(9, T0 + 3_600_000);
        scan(&mut d, 2, 9, 100, T0);
        scan(&mut d, 3, 9, 100, T0);
        assert!(d.evaluate(T0).is_empty());
        scan(&mut d, 2, 9, 100, T0 + 3_600_001);
        scan(&mut d, 3, 9, 100, T0 + 3_600_001);
        assert_eq!(d.evaluate(T0 + 3_600_001).len(), 1);
    }

    #[test]
    fn witnesses_are_bounded_in_all_and_per_principal() {
        let mut d = detector();
        let hs = Seen::Handshakes { count: 1 };
        // One principal cannot fill the table…
        for s in 0..(MAX_WITNESSES_PER_PRINCIPAL as u64 + 10) {
            d.observe(&who(1_000_000), 1_000_000, s + 1, hs, T0);
        }
        assert_eq!(d.witnesses, MAX_WITNESSES_PER_PRINCIPAL);
        assert_eq!(d.dropped, 10);
        // …many together can, up to the cap.
        let per = MAX_WITNESSES_PER_PRINCIPAL as u64;
        for p in 0..(MAX_WITNESSES as u64 / per + 1) {
            for s in 0..per {
                d.observe(&format!("user:{p}"), 2_000_000 + p, s + 1, hs, T0);
            }
        }
        assert_eq!(d.witnesses, MAX_WITNESSES);
        d.forget(1);
        assert_eq!(d.per_principal.values().sum::<usize>(), d.witnesses);
        d.expire(T0 + 601_000);
        assert_eq!(d.witnesses, 0);
        assert!(d.suspects.is_empty() && d.per_principal.is_empty());
    }

    #[test]
    fn decisions_follow_exemptions_the_cap_the_response_and_the_mode() {
        let mut cfg = DetectConfig {
            exempt_tags: vec!["tag:scanner".into()],
            max_quarantined: 1,
            ..DetectConfig::default()
        };
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            decide(&cfg, &tags(&["tag:web", "tag:scanner"]), 0),
            Action::Exempt {
                tag: "tag:scanner".into()
            }
        );
        assert_eq!(decide(&cfg, &tags(&["tag:web"]), 0), Action::Quarantine);
        assert_eq!(
            decide(&cfg, &tags(&["tag:web"]), 1),
            Action::Alert { capped: true }
        );
        cfg.mode = Mode::DryRun;
        let a = decide(&cfg, &[], 0);
        assert_eq!(a.label(), "dry-run: would quarantine");
        assert!(!a.alerts());
        cfg.mode = Mode::Enforce;
        cfg.response = Response::Alert;
        assert_eq!(decide(&cfg, &[], 0), Action::Alert { capped: false });
    }

    #[test]
    fn config_refuses_thresholds_one_principal_could_reach() {
        let ok = DetectConfig::default();
        assert!(ok.validate().is_ok());
        let one = DetectConfig {
            min_reporters: 1,
            ..ok.clone()
        };
        assert!(one.validate().unwrap_err().contains("min-reporters"));
        let low = DetectConfig {
            scan_peers: 1,
            ..ok
        };
        assert!(low.validate().unwrap_err().contains("--detect-scan-peers"));
    }
}
