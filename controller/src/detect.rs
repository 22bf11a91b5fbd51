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
//! alone can make a detector fire: every detector needs
//! [`DetectConfig::min_reporters`] distinct reporters, and a reporter's
//! share of any sum is capped at `threshold / min_reporters` (rounded up).
//! Framing a node takes that many colluding nodes, all of them its peers.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// Evidence older than this is forgotten (and a fired detector stays
    /// quiet about the node this long).
    pub window_ms: i64,
    /// Distinct reporters every detector needs (at least 2).
    pub min_reporters: usize,
    /// Scanning: distinct (receiver, protocol, port) the node was refused on.
    pub scan_ports: u64,
    /// Scanning: distinct receivers that refused the node (any port).
    pub scan_peers: u64,
    /// Burst: denied packets from the node, summed over receivers.
    pub burst_packets: u64,
    /// Handshake failures: distinct receivers that got at least
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
            min_reporters: 2,
            scan_ports: 40,
            scan_peers: 8,
            burst_packets: 5_000,
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
            ("--detect-burst-packets", self.burst_packets),
            ("--detect-handshake-peers", self.handshake_peers),
        ] {
            if v < min {
                return Err(format!("{flag} {v} is below --detect-min-reporters {min}"));
            }
        }
        if self.window_ms < 1_000 {
            return Err("--detect-window must be at least 1s".into());
        }
        if self.handshake_min == 0 {
            return Err("--detect-handshake-min must be at least 1".into());
        }
        Ok(())
    }

    /// A reporter's share of a summed threshold.
    fn share(&self, threshold: u64) -> u64 {
        threshold.div_ceil(self.min_reporters.max(1) as u64)
    }
}

/// One thing a reporter saw the suspect do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// `packets` to (`proto`, `port`) were refused by the reporter's filter.
    Denied { proto: u8, port: u16, packets: u64 },
    /// `count` verified handshake initiations from the suspect's key while
    /// the reporter did not list it.
    Handshakes { count: u64 },
}

/// One reporter's evidence about one suspect in the current window.
#[derive(Clone, Debug, Default)]
struct Witness {
    since_ms: UnixMs,
    last_ms: UnixMs,
    /// Distinct (protocol, port) refused, at most the reporter's share.
    ports: BTreeSet<(u8, u16)>,
    denied_packets: u64,
    handshakes: u64,
}

/// A reporter's evidence as a finding shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Testimony {
    pub reporter: u64,
    /// Distinct ports refused (capped at the reporter's share).
    pub ports: u64,
    /// A few of them, "tcp/22" style.
    pub sample: Vec<String>,
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

/// (suspect, reporter) pairs held at most; beyond it new pairs are dropped
/// (and counted) until old ones expire.
pub const MAX_WITNESSES: usize = 100_000;

/// The detectors' state: recent evidence per suspect, per reporter.
#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    suspects: HashMap<u64, BTreeMap<u64, Witness>>,
    witnesses: usize,
    /// Evidence dropped because [`MAX_WITNESSES`] was reached.
    pub dropped: u64,
    /// Until when a suspect that fired stays quiet.
    quiet: HashMap<u64, UnixMs>,
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            cfg,
            suspects: HashMap::new(),
            witnesses: 0,
            dropped: 0,
            quiet: HashMap::new(),
        }
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// Records what `reporter` saw `suspect` do at `now`. Reports by a node
    /// about itself are ignored.
    pub fn observe(&mut self, reporter: u64, suspect: u64, seen: Seen, now: UnixMs) {
        if reporter == suspect || self.cfg.mode == Mode::Off {
            return;
        }
        let port_share = self.cfg.share(self.cfg.scan_ports);
        let burst_share = self.cfg.share(self.cfg.burst_packets);
        let window = self.cfg.window_ms;
        let witnesses = self.suspects.entry(suspect).or_default();
        let fresh = !witnesses.contains_key(&reporter);
        if fresh && self.witnesses >= MAX_WITNESSES {
            self.dropped = self.dropped.saturating_add(1);
            return;
        }
        let w = witnesses.entry(reporter).or_default();
        if fresh {
            self.witnesses += 1;
        }
        if fresh || now.saturating_sub(w.since_ms) > window {
            *w = Witness {
                since_ms: now,
                ..Witness::default()
            };
        }
        w.last_ms = w.last_ms.max(now);
        match seen {
            Seen::Denied {
                proto,
                port,
                packets,
            } => {
                if (w.ports.len() as u64) < port_share {
                    w.ports.insert((proto, port));
                }
                w.denied_packets = w.denied_packets.saturating_add(packets).min(burst_share);
            }
            Seen::Handshakes { count } => {
                w.handshakes = w.handshakes.saturating_add(count);
            }
        }
    }

    /// Forgets everything about `node`, as suspect and as reporter (it was
    /// released, deleted, or exempted).
    pub fn forget(&mut self, node: u64) {
        if let Some(w) = self.suspects.remove(&node) {
            self.witnesses -= w.len();
        }
        for w in self.suspects.values_mut() {
            if w.remove(&node).is_some() {
                self.witnesses -= 1;
            }
        }
        self.suspects.retain(|_, w| !w.is_empty());
        self.quiet.remove(&node);
    }

    /// Drops evidence older than the window.
    pub fn expire(&mut self, now: UnixMs) {
        let window = self.cfg.window_ms;
        let mut removed = 0;
        for w in self.suspects.values_mut() {
            let before = w.len();
            w.retain(|_, x| now.saturating_sub(x.since_ms) <= window);
            removed += before - w.len();
        }
        self.witnesses -= removed;
        self.suspects.retain(|_, w| !w.is_empty());
        self.quiet.retain(|_, until| *until > now);
    }

    /// The suspects whose evidence now crosses a threshold, each once per
    /// window (it stays quiet afterwards).
    pub fn evaluate(&mut self, now: UnixMs) -> Vec<Finding> {
        self.expire(now);
        let mut found = Vec::new();
        for (&node, witnesses) in &self.suspects {
            if self.quiet.contains_key(&node) {
                continue;
            }
            if let Some(f) = self.judge(node, witnesses) {
                found.push(f);
            }
        }
        found.sort_by_key(|f| f.node);
        for f in &found {
            self.quiet
                .insert(f.node, now.saturating_add(self.cfg.window_ms));
        }
        found
    }

    fn judge(&self, node: u64, witnesses: &BTreeMap<u64, Witness>) -> Option<Finding> {
        let cfg = &self.cfg;
        let min = cfg.min_reporters;
        let denying: Vec<&Witness> = witnesses
            .values()
            .filter(|w| w.denied_packets > 0 || !w.ports.is_empty())
            .collect();
        let shaking = witnesses
            .values()
            .filter(|w| w.handshakes >= cfg.handshake_min)
            .count() as u64;
        let ports: u64 = denying.iter().map(|w| w.ports.len() as u64).sum();
        let packets: u64 = denying
            .iter()
            .fold(0u64, |s, w| s.saturating_add(w.denied_packets));
        let mut fired = Vec::new();
        if denying.len() >= min {
            for (detector, value, threshold) in [
                ("scan_ports", ports, cfg.scan_ports),
                ("scan_peers", denying.len() as u64, cfg.scan_peers),
                ("denied_burst", packets, cfg.burst_packets),
            ] {
                if value >= threshold {
                    fired.push(Fired {
                        detector,
                        value,
                        threshold,
                    });
                }
            }
        }
        if shaking >= cfg.handshake_peers && shaking >= min as u64 {
            fired.push(Fired {
                detector: "handshake_failures",
                value: shaking,
                threshold: cfg.handshake_peers,
            });
        }
        if fired.is_empty() {
            return None;
        }
        let evidence = witnesses
            .iter()
            .map(|(&reporter, w)| Testimony {
                reporter,
                ports: w.ports.len() as u64,
                sample: w
                    .ports
                    .iter()
                    .take(SAMPLE_PORTS)
                    .map(|&(p, port)| format!("{}/{port}", ztmesh_policy::proto_name(p)))
                    .collect(),
                denied_packets: w.denied_packets,
                handshakes: w.handshakes,
                first_ms: w.since_ms,
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

    fn scan(d: &mut Detector, reporter: u64, suspect: u64, ports: u16, now: UnixMs) {
        for port in 1..=ports {
            d.observe(
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
    fn a_scan_seen_by_two_receivers_fires_once() {
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        assert!(d.evaluate(T0).is_empty(), "one receiver is never enough");
        scan(&mut d, 3, 9, 100, T0 + 1_000);
        let found = d.evaluate(T0 + 1_000);
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(f.node, 9);
        assert_eq!(
            f.fired,
            vec![Fired {
                detector: "scan_ports",
                value: 40,
                threshold: 40
            }]
        );
        assert_eq!(f.evidence.len(), 2);
        assert_eq!(f.evidence[0].ports, 20, "a reporter's share is capped");
        assert_eq!(f.evidence[0].sample.len(), SAMPLE_PORTS);
        assert_eq!(f.evidence[0].sample[0], "tcp/1");
        // Quiet for the window: more evidence does not fire again.
        scan(&mut d, 4, 9, 100, T0 + 2_000);
        assert!(d.evaluate(T0 + 2_000).is_empty());
    }

    #[test]
    fn one_liar_cannot_frame_anyone_however_loud() {
        let mut d = detector();
        // Every detector's input, maximal, from one reporter.
        scan(&mut d, 2, 9, 60_000, T0);
        d.observe(
            2,
            9,
            Seen::Denied {
                proto: TCP,
                port: 1,
                packets: u64::MAX,
            },
            T0,
        );
        d.observe(2, 9, Seen::Handshakes { count: u64::MAX }, T0);
        assert!(d.evaluate(T0).is_empty());
        // A second, quiet reporter adds its share only: with one reporter's
        // share capped at half a threshold, the pair needs both to testify.
        scan(&mut d, 3, 9, 5, T0);
        assert!(d.evaluate(T0).is_empty(), "20 + 5 ports < 40");
        // Reports by the suspect about itself are not evidence.
        scan(&mut d, 9, 9, 1000, T0);
        assert!(d.evaluate(T0).is_empty());
    }

    #[test]
    fn handshake_failures_need_many_receivers_each_with_repeats() {
        let mut d = detector();
        for r in 2..=4 {
            d.observe(r, 9, Seen::Handshakes { count: 50 }, T0);
        }
        // A lone stale initiation to a fourth receiver (a map race) is not enough.
        d.observe(5, 9, Seen::Handshakes { count: 1 }, T0);
        assert!(d.evaluate(T0).is_empty());
        d.observe(5, 9, Seen::Handshakes { count: 2 }, T0);
        let f = d.evaluate(T0);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fired[0].detector, "handshake_failures");
        assert_eq!(f[0].fired[0].value, 4);
    }

    #[test]
    fn a_burst_of_denied_packets_fires_and_evidence_expires() {
        let mut d = detector();
        let burst = |d: &mut Detector, r: u64, now: UnixMs| {
            d.observe(
                r,
                9,
                Seen::Denied {
                    proto: 17,
                    port: 53,
                    packets: 2_500,
                },
                now,
            )
        };
        burst(&mut d, 2, T0);
        // The window passes before the second receiver testifies.
        burst(&mut d, 3, T0 + 61_000);
        assert!(d.evaluate(T0 + 61_000).is_empty());
        burst(&mut d, 2, T0 + 62_000);
        let f = d.evaluate(T0 + 62_000);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].fired[0].detector, "denied_burst");
        assert_eq!(f[0].fired[0].value, 5_000);
    }

    #[test]
    fn forget_clears_a_released_node_and_the_witness_count() {
        let mut d = detector();
        scan(&mut d, 2, 9, 100, T0);
        scan(&mut d, 3, 9, 100, T0);
        scan(&mut d, 9, 2, 1, T0);
        assert_eq!(d.witnesses, 3);
        assert_eq!(d.evaluate(T0).len(), 1);
        d.forget(9);
        assert_eq!(d.witnesses, 0);
        assert!(d.suspects.is_empty() && d.quiet.is_empty());
        // Released, it starts from nothing: one new report is not a finding.
        scan(&mut d, 2, 9, 100, T0 + 1);
        assert!(d.evaluate(T0 + 1).is_empty());
    }

    #[test]
    fn witnesses_are_bounded() {
        let mut d = detector();
        for s in 0..(MAX_WITNESSES as u64 + 10) {
            d.observe(1_000_000, s + 1, Seen::Handshakes { count: 1 }, T0);
        }
        assert_eq!(d.witnesses, MAX_WITNESSES);
        assert_eq!(d.dropped, 10);
        d.expire(T0 + 61_000);
        assert_eq!(d.witnesses, 0);
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
    fn config_refuses_thresholds_one_reporter_could_reach() {
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
