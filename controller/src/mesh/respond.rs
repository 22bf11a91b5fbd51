//! Respond: node reports become evidence for the detectors
//! ([`crate::detect`]), findings become decisions (quarantine, alert,
//! dry-run, exempt), each recorded as a detection and in the audit chain.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use serde_json::json;
use ztmesh_proto::control as pb;

use super::{Mesh, Turn};
use crate::alert::AlertJob;
use crate::detect::{decide, Action, Finding, Mode, Seen};
use crate::error::{Error, Result};
use crate::netcore::Change;
use crate::store::{DetectionRow, NodeRow, Quarantine};
use crate::UnixMs;

/// Testimonies a detection records at most (the largest first); the rest
/// are counted.
pub const MAX_TESTIMONIES: usize = 16;

/// A finding that did not quarantine (alert only, dry-run, exempt) is not
/// recorded again for the node for this long.
pub const REPEAT_AFTER_MS: i64 = 3_600_000;

/// The voice a node speaks with as a witness: its owner, so one person's
/// devices are one principal; a tagged node (a server) speaks for itself.
pub fn principal_of(n: &NodeRow) -> String {
    match &n.user {
        Some(u) => format!("user:{u}"),
        None => format!("node:{}", n.id),
    }
}

/// Verified unknown-key handshakes counted per (reporter, key) and report.
const MAX_HANDSHAKES_PER_REPORT: u64 = 1_000;

impl Mesh {
    /// Turns a node's report into evidence: denied flows whose source is
    /// one of the reporter's peers (its data plane authenticated them to
    /// that peer), and verified handshakes from keys of nodes that are not
    /// its peers. Anything else cannot be true of an honest reporter and is
    /// ignored. Then acts on what the detectors find.
    pub fn observe_report(
        &self,
        reporter: &NodeRow,
        flows: &[pb::FlowSummary],
        handshakes: &[pb::UnknownHandshakes],
        now: UnixMs,
    ) {
        if self.cfg.detect.mode == Mode::Off {
            return;
        }
        let mut seen: Vec<(u64, Seen)> = Vec::new();
        let principal;
        let findings = {
            let st = self.state();
            let core = &st.core;
            // A quarantined (or departed) node's word counts for nothing.
            match core.nodes().get(reporter.id) {
                Some(n) if n.quarantine.is_none() => principal = principal_of(n),
                _ => return,
            }
            // Lookups by address and by key, and a peer test per entry: no
            // pass over the reporter's peers or over all nodes per report.
            for f in flows.iter().filter(|f| !f.allowed) {
                let (Ok(src), Ok(proto), Ok(port)) = (
                    f.src.parse::<IpAddr>(),
                    u8::try_from(f.protocol),
                    u16::try_from(f.dst_port),
                ) else {
                    continue;
                };
                let Some(suspect) = core.nodes().by_address(src).map(|n| n.id) else {
                    continue;
                };
                if core.is_peer(reporter.id, suspect) {
                    seen.push((
                        suspect,
                        Seen::Denied {
                            proto,
                            port,
                            packets: f.packets,
                        },
                    ));
                }
            }
            let mut keys = BTreeSet::new();
            for h in handshakes {
                let Ok(key) = <[u8; 32]>::try_from(h.wg_key.as_slice()) else {
                    continue;
                };
                // One entry per key and report.
                if !keys.insert(key) {
                    continue;
                }
                match core.nodes().by_wg_key(&key).map(|n| n.id) {
                    Some(suspect) if !core.is_peer(reporter.id, suspect) => seen.push((
                        suspect,
                        Seen::Handshakes {
                            count: h.count.min(MAX_HANDSHAKES_PER_REPORT),
                        },
                    )),
                    _ => {}
                }
            }
            if seen.is_empty() {
                return;
            }
            // Recorded under the state lock that saw the reporter free: a
            // quarantine is applied under it too and forgets the reporter's
            // testimony afterwards, so nothing it said survives the
            // quarantine (lock order: state, then detector; the detector
            // lock is never held while taking another).
            let mut d = self.detector.lock().unwrap_or_else(|p| p.into_inner());
            for (suspect, s) in seen {
                d.observe(&principal, reporter.id, suspect, s, now);
            }
            d.evaluate(now)
        };
        for f in findings {
            if let Err(e) = self.respond(&f, now) {
                tracing::error!(error = %e, node = f.node, "cannot act on a detection");
            }
        }
    }

    /// Decides on a finding and carries the decision out: a detection row,
    /// an audit row with the evidence, the quarantine (the node leaves
    /// every map), the alert.
    fn respond(&self, f: &Finding, now: UnixMs) -> Result<()> {
        let turn = self.turn();
        let (node, quarantined, names) = {
            let st = self.state();
            let nodes = st.core.nodes();
            let Some(node) = nodes.get(f.node).cloned() else {
                return Ok(());
            };
            let quarantined = nodes.iter().filter(|n| n.quarantine.is_some()).count();
            let names: HashMap<u64, String> = f
                .evidence
                .iter()
                .flat_map(|t| t.reporters.iter())
                .filter_map(|&r| nodes.get(r).map(|n| (r, n.name.clone())))
                .collect();
            (node, quarantined, names)
        };
        if node.quarantine.is_some() {
            return Ok(());
        }
        let action = decide(&self.cfg.detect, &node.tags, quarantined);
        let detectors: Vec<&str> = f.fired.iter().map(|x| x.detector).collect();
        let mut testimonies = f.evidence.clone();
        testimonies.sort_by(|a, b| {
            (b.ports, b.denied_flows, b.handshakes).cmp(&(a.ports, a.denied_flows, a.handshakes))
        });
        let more = testimonies.len().saturating_sub(MAX_TESTIMONIES);
        testimonies.truncate(MAX_TESTIMONIES);
        let evidence: Vec<serde_json::Value> = testimonies
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["reporter_names"] = json!(t
                    .reporters
                    .iter()
                    .map(|r| names.get(r).cloned().unwrap_or_default())
                    .collect::<Vec<_>>());
                v
            })
            .collect();
        let mut evidence = json!(evidence);
        if more > 0 {
            evidence = json!({"testimonies": evidence, "more": more});
        }
        let fired = serde_json::to_string(&f.fired).unwrap_or_default();
        let alerts = action.alerts();
        let alert = match (&self.alerts, alerts) {
            (_, false) => "none",
            (None, true) => "none (no webhook configured)",
            (Some(_), true) => "pending",
        };
        let mut row = DetectionRow {
            id: 0,
            time_ms: now,
            node_id: node.id,
            node_name: node.name.clone(),
            detectors: fired.clone(),
            action: action.label(),
            evidence: evidence.to_string(),
            alert: alert.into(),
        };
        row.id = self.store.record_detection(&row)?;
        let detail = json!({
            "detection": row.id,
            "detectors": f.fired,
            "action": row.action,
            "evidence": evidence,
        })
        .to_string();
        let (audit_action, kind) = match action {
            Action::Quarantine => ("detect.quarantine", "quarantine"),
            Action::Alert { .. } => ("detect.alert", "alert"),
            Action::DryRun { .. } => ("detect.dry_run", "dry_run"),
            Action::Exempt { .. } => ("detect.exempt", "exempt"),
        };
        self.metrics.detection(kind);
        tracing::warn!(
            node = %node.name,
            detection = row.id,
            detectors = %detectors.join(","),
            action = %row.action,
            "detector fired"
        );
        if action == Action::Quarantine {
            // The quarantine first: the audit row says what was done.
            let q = Quarantine {
                since_ms: now,
                reason: format!("{} (detection {})", detectors.join(", "), row.id),
            };
            if let Err(e) = self.store.set_node_quarantine(node.id, Some(&q)) {
                self.audit(
                    now,
                    "controller:detect",
                    "detect.quarantine_failed",
                    &node.name,
                    &detail,
                );
                if let Err(e) = self
                    .store
                    .set_detection_alert(row.id, "none (quarantine failed)")
                {
                    tracing::error!(error = %e, "cannot record the detection state");
                }
                return Err(e.into());
            }
            self.audit(now, "controller:detect", audit_action, &node.name, &detail);
            self.apply(
                &turn,
                Change::Upsert(NodeRow {
                    quarantine: Some(q),
                    ..node.clone()
                }),
                now,
            );
            // Its word counts for nothing now, also what it said before.
            self.forget_evidence(node.id);
        } else {
            self.audit(now, "controller:detect", audit_action, &node.name, &detail);
            // Not repeated every window: the record stands for an hour —
            // except a quarantine held back by the cap, judged again after
            // the scan window (a slot may have come free).
            if action != (Action::Alert { capped: true }) {
                self.detector
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .silence(node.id, now.saturating_add(REPEAT_AFTER_MS));
            }
        }
        if alerts {
            self.send_alert(&row, &f.fired, &evidence, &node);
        }
        Ok(())
    }

    fn send_alert(
        &self,
        row: &DetectionRow,
        fired: &[crate::detect::Fired],
        evidence: &serde_json::Value,
        node: &NodeRow,
    ) {
        let Some(tx) = &self.alerts else {
            return;
        };
        let body = json!({
            "type": "ztmesh.detection",
            "detection": row.id,
            "time_ms": row.time_ms,
            "node": {"id": node.id, "name": node.name, "addresses": [node.ipv4.to_string(), node.ipv6.to_string()], "tags": node.tags},
            "detectors": fired,
            "action": row.action,
            "evidence": evidence,
        })
        .to_string()
        .into_bytes();
        let job = AlertJob {
            detection: row.id,
            body,
        };
        if tx.try_send(job).is_err() {
            tracing::error!(detection = row.id, "alert queue full; alert dropped");
            if let Err(e) = self.store.set_detection_alert(row.id, "failed: queue full") {
                tracing::error!(error = %e, "cannot record the alert state");
            }
        }
    }

    /// Ends a node's quarantine: it is in the maps again. Its evidence is
    /// forgotten, so it starts from nothing.
    ///
    /// # Errors
    /// `NotFound`; `FailedPrecondition` when the node is not quarantined;
    /// store failures.
    pub fn release_node(&self, actor: &str, r: &str, now: UnixMs) -> Result<NodeRow> {
        let turn: Turn<'_> = self.turn();
        let node = self.find_node(r)?;
        let Some(q) = &node.quarantine else {
            return Err(Error::FailedPrecondition(format!(
                "node {} is not quarantined",
                node.name
            )));
        };
        self.store.set_node_quarantine(node.id, None)?;
        self.audit(
            now,
            actor,
            "node.release",
            &node.name,
            &format!(
                "id={} quarantined_ms={} reason={}",
                node.id, q.since_ms, q.reason
            ),
        );
        self.detector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(node.id);
        let released = NodeRow {
            quarantine: None,
            ..node
        };
        self.apply(&turn, Change::Upsert(released.clone()), now);
        Ok(released)
    }

    /// Quarantines a node by an admin's decision (the console's or the
    /// CLI's "quarantine" button): it leaves every map, like a detector's
    /// quarantine, until released. `reason` is one line the admin wrote.
    ///
    /// # Errors
    /// `NotFound`; `InvalidArgument` for an empty or long reason;
    /// `FailedPrecondition` when it is quarantined already; store failures.
    pub fn quarantine_node(
        &self,
        actor: &str,
        r: &str,
        reason: &str,
        now: UnixMs,
    ) -> Result<NodeRow> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 200 || reason.chars().any(char::is_control) {
            return Err(Error::Invalid(
                "a quarantine needs a reason: one line of at most 200 bytes".into(),
            ));
        }
        let turn: Turn<'_> = self.turn();
        let node = self.find_node(r)?;
        if node.quarantine.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "node {} is quarantined already",
                node.name
            )));
        }
        let q = Quarantine {
            since_ms: now,
            reason: format!("by {actor}: {reason}"),
        };
        self.store.set_node_quarantine(node.id, Some(&q))?;
        self.audit(
            now,
            actor,
            "node.quarantine",
            &node.name,
            &format!("id={} reason={reason}", node.id),
        );
        let quarantined = NodeRow {
            quarantine: Some(q),
            ..node
        };
        self.apply(&turn, Change::Upsert(quarantined.clone()), now);
        Ok(quarantined)
    }

    /// Forgets a node's evidence (it left the mesh).
    pub(super) fn forget_evidence(&self, node: u64) {
        self.detector
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(node);
        // And what else it said about itself: its peers by path.
        self.state().paths.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::tests::{enroll_nodes, open_with, T0};
    use super::*;
    use crate::detect::{DetectConfig, Response};
    use crate::mesh::MeshConfig;
    use crate::store::{SqliteStore, Store};

    const TCP: u32 = 6;

    fn mesh(detect: DetectConfig) -> (Mesh, Arc<SqliteStore>) {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let cfg = MeshConfig {
            detect,
            ..MeshConfig::default()
        };
        (open_with(store.clone(), cfg, T0), store)
    }

    fn row(m: &Mesh, id: u64) -> NodeRow {
        m.find_node(&id.to_string()).unwrap()
    }

    /// What a receiver reports after `from` tried `ports` on it.
    fn denied(from: &NodeRow, ports: std::ops::RangeInclusive<u32>) -> Vec<pb::FlowSummary> {
        ports
            .map(|p| pb::FlowSummary {
                src: from.ipv4.to_string(),
                dst: "100.64.0.99".into(),
                protocol: TCP,
                dst_port: p,
                allowed: false,
                reason: "port_not_allowed".into(),
                packets: 2,
                ..Default::default()
            })
            .collect()
    }

    fn peers_of(m: &Mesh, id: u64) -> Vec<u64> {
        m.netmap(id, T0)
            .unwrap()
            .peers
            .iter()
            .map(|p| p.id)
            .collect()
    }

    #[test]
    fn a_scan_seen_by_two_receivers_quarantines_until_released() {
        let (m, store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 4);
        let (suspect, a, b, c) = (ids[0], ids[1], ids[2], ids[3]);
        let s = row(&m, suspect);
        m.observe_report(&row(&m, a), &denied(&s, 1..=100), &[], T0 + 1);
        assert!(row(&m, suspect).quarantine.is_none(), "one receiver");
        m.observe_report(&row(&m, b), &denied(&s, 1..=100), &[], T0 + 2);
        let q = row(&m, suspect).quarantine.expect("quarantined");
        assert!(q.reason.starts_with("scan_ports (detection "), "{q:?}");
        // Durable, in nobody's map, and its own map is empty and says why.
        assert!(store.nodes().unwrap()[0].quarantine.is_some());
        for other in [a, b, c] {
            assert!(!peers_of(&m, other).contains(&suspect), "{other}");
        }
        let own = m.netmap(suspect, T0 + 3).unwrap();
        assert!(own.peers.is_empty() && own.inbound_rules.is_empty());
        assert_eq!(own.quarantine.unwrap().reason, q.reason);
        // The detection and the audit row carry the evidence.
        let d = &store.detections(10, None).unwrap()[0];
        assert_eq!((d.node_id, d.action.as_str()), (suspect, "quarantine"));
        assert_eq!(d.alert, "none (no webhook configured)");
        let ev: serde_json::Value = serde_json::from_str(&d.evidence).unwrap();
        let names: Vec<&str> = ev
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["reporter_names"][0].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["n1", "n2"]);
        let audit = store.audit_log(50).unwrap();
        let row_q = audit
            .iter()
            .find(|r| r.action == "detect.quarantine")
            .expect("audited");
        assert!(
            row_q.detail.contains("\"reporter_names\":[\"n2\"]"),
            "{}",
            row_q.detail
        );
        // A third receiver's report fires nothing more: it is quarantined.
        m.observe_report(&row(&m, c), &denied(&s, 1..=100), &[], T0 + 4);
        assert_eq!(store.detections(10, None).unwrap().len(), 1);

        // Logging out is no way out.
        let e = m.logout(&row(&m, suspect), T0 + 4).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        assert!(row(&m, suspect).quarantine.is_some());
        let released = m.release_node("admin", &s.name, T0 + 5).unwrap();
        assert!(released.quarantine.is_none());
        assert!(peers_of(&m, a).contains(&suspect));
        assert!(m.netmap(suspect, T0 + 5).unwrap().quarantine.is_none());
        assert!(store
            .audit_log(50)
            .unwrap()
            .iter()
            .any(|r| r.action == "node.release"));
        assert!(matches!(
            m.release_node("admin", &s.name, T0 + 6),
            Err(Error::FailedPrecondition(_))
        ));
        // Its slate is clean: one receiver's report is not a finding again.
        m.observe_report(&row(&m, a), &denied(&s, 1..=100), &[], T0 + 7);
        assert!(row(&m, suspect).quarantine.is_none());
    }

    #[test]
    fn an_admin_quarantines_a_node_with_a_reason_until_released() {
        let (m, store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 2);
        let (n, other) = (row(&m, ids[0]), ids[1]);
        for bad in ["", "  ", "two\nlines", &"x".repeat(201)] {
            assert!(
                matches!(
                    m.quarantine_node("user:alice", &n.name, bad, T0 + 1),
                    Err(Error::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            m.quarantine_node("user:alice", "nope", "stolen laptop", T0 + 1),
            Err(Error::NotFound(_))
        ));
        assert!(
            row(&m, n.id).quarantine.is_none(),
            "refusals change nothing"
        );
        let q = m
            .quarantine_node("user:alice", &n.name, "stolen laptop", T0 + 2)
            .unwrap()
            .quarantine
            .unwrap();
        assert_eq!(q.reason, "by user:alice: stolen laptop");
        assert!(store.nodes().unwrap()[0].quarantine.is_some(), "durable");
        assert!(!peers_of(&m, other).contains(&n.id));
        assert!(matches!(
            m.quarantine_node("user:alice", &n.name, "again", T0 + 3),
            Err(Error::FailedPrecondition(_))
        ));
        let audited = store.audit_log(50).unwrap();
        let r = audited
            .iter()
            .find(|r| r.action == "node.quarantine")
            .expect("audited");
        assert_eq!(
            (r.actor.as_str(), r.target.as_str()),
            ("user:alice", n.name.as_str())
        );
        m.release_node("user:alice", &n.name, T0 + 4).unwrap();
        assert!(peers_of(&m, other).contains(&n.id));
    }

    #[test]
    fn a_lying_node_cannot_frame_a_victim() {
        let (m, store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 4);
        let (victim, liar, bystander) = (row(&m, ids[0]), row(&m, ids[1]), row(&m, ids[2]));
        // As loud as it likes, on its own: denied flows, packets, handshakes.
        let mut forged = denied(&victim, 1..=5_000);
        forged.iter_mut().for_each(|f| f.packets = u64::MAX);
        let hs = [pb::UnknownHandshakes {
            wg_key: victim.wg_key.to_vec(),
            count: u64::MAX,
        }];
        for t in 0..20 {
            m.observe_report(&liar, &forged, &hs, T0 + t);
        }
        // A second node's reports about flows "from" addresses that are not
        // its peers', or about itself, are not evidence either.
        let mut nobody = denied(&victim, 1..=100);
        nobody
            .iter_mut()
            .for_each(|f| f.src = "100.64.200.1".into());
        m.observe_report(&bystander, &nobody, &[], T0 + 30);
        m.observe_report(&bystander, &denied(&bystander, 1..=100), &[], T0 + 31);
        // Handshakes "from" a key that is the reporter's peer are not
        // unknown handshakes.
        m.observe_report(&bystander, &[], &hs, T0 + 32);
        assert!(row(&m, victim.id).quarantine.is_none());
        assert!(store.detections(10, None).unwrap().is_empty());
    }

    #[test]
    fn verified_handshakes_from_a_non_peer_at_four_receivers_quarantine_it() {
        let (m, store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 6);
        // Nobody may talk to anybody: every handshake is from a non-peer.
        m.set_policy("admin", "p.hujson", r#"{"acls": []}"#, T0)
            .unwrap();
        let s = row(&m, ids[0]);
        let hs = |count| {
            vec![pb::UnknownHandshakes {
                wg_key: s.wg_key.to_vec(),
                count,
            }]
        };
        // One receiver, however loud, and three with a stale map's worth.
        m.observe_report(&row(&m, ids[1]), &[], &hs(u64::MAX), T0);
        for r in &ids[2..5] {
            m.observe_report(&row(&m, *r), &[], &hs(1), T0);
        }
        assert!(row(&m, s.id).quarantine.is_none());
        // Repeated initiations at four receivers.
        for r in &ids[2..5] {
            m.observe_report(&row(&m, *r), &[], &hs(2), T0 + 1);
        }
        let q = row(&m, s.id).quarantine.expect("quarantined");
        assert!(q.reason.starts_with("handshake_failures"), "{q:?}");
        let d = &store.detections(10, None).unwrap()[0];
        assert!(d.detectors.contains("\"value\":4"), "{}", d.detectors);
    }

    #[test]
    fn a_quarantined_nodes_word_about_non_peers_counts_for_nothing() {
        // Handshake evidence is about non-peers, and a quarantined node is
        // nobody's peer: only the quarantine check keeps its word out.
        let (m, _store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 9);
        m.set_policy("admin", "p.hujson", r#"{"acls": []}"#, T0)
            .unwrap();
        let hs = |n: &NodeRow| {
            vec![pb::UnknownHandshakes {
                wg_key: n.wg_key.to_vec(),
                count: 5,
            }]
        };
        let (liar, victim) = (row(&m, ids[0]), row(&m, ids[1]));
        for r in &ids[2..6] {
            m.observe_report(&row(&m, *r), &[], &hs(&liar), T0);
        }
        let liar = row(&m, liar.id);
        assert!(liar.quarantine.is_some());
        m.observe_report(&liar, &[], &hs(&victim), T0 + 1);
        for r in &ids[6..9] {
            m.observe_report(&row(&m, *r), &[], &hs(&victim), T0 + 1);
        }
        assert!(row(&m, victim.id).quarantine.is_none(), "3 voices, not 4");
    }

    #[test]
    fn a_users_nodes_speak_as_the_user_a_tagged_node_as_itself() {
        let (m, _store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 1);
        let tagged = row(&m, ids[0]);
        assert_eq!(principal_of(&tagged), format!("node:{}", tagged.id));
        let owned = NodeRow {
            user: Some("alice@example.com".into()),
            ..tagged
        };
        assert_eq!(principal_of(&owned), "user:alice@example.com");
    }

    #[test]
    fn a_quarantined_node_is_no_witness() {
        let (m, _store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 4);
        let (s1, a, b) = (row(&m, ids[0]), row(&m, ids[1]), row(&m, ids[2]));
        m.observe_report(&a, &denied(&s1, 1..=100), &[], T0);
        m.observe_report(&b, &denied(&s1, 1..=100), &[], T0);
        assert!(row(&m, s1.id).quarantine.is_some());
        // s1, quarantined, and one honest-looking node accuse `a`.
        let s1 = row(&m, s1.id);
        m.observe_report(&s1, &denied(&a, 1..=100), &[], T0 + 1);
        m.observe_report(&b, &denied(&a, 1..=100), &[], T0 + 1);
        assert!(row(&m, a.id).quarantine.is_none());
    }

    #[test]
    fn what_a_node_said_before_its_quarantine_counts_for_nothing_after() {
        let (m, _store) = mesh(DetectConfig::default());
        let ids = enroll_nodes(&m, 5);
        let (liar, victim) = (row(&m, ids[0]), row(&m, ids[1]));
        let (b, x, y) = (row(&m, ids[2]), row(&m, ids[3]), row(&m, ids[4]));
        m.observe_report(&liar, &denied(&victim, 1..=100), &[], T0);
        // The liar is itself caught scanning.
        m.observe_report(&x, &denied(&liar, 1..=100), &[], T0 + 1);
        m.observe_report(&y, &denied(&liar, 1..=100), &[], T0 + 1);
        assert!(row(&m, liar.id).quarantine.is_some());
        // One more accuser of the victim is not a second voice.
        m.observe_report(&b, &denied(&victim, 1..=100), &[], T0 + 2);
        assert!(row(&m, victim.id).quarantine.is_none());
    }

    #[test]
    fn a_finding_that_does_not_quarantine_is_not_repeated_every_window() {
        let (m, store) = mesh(DetectConfig {
            mode: Mode::DryRun,
            ..DetectConfig::default()
        });
        let ids = enroll_nodes(&m, 3);
        let s = row(&m, ids[0]);
        for t in [0, 700_000, 1_400_000] {
            m.observe_report(&row(&m, ids[1]), &denied(&s, 1..=100), &[], T0 + t);
            m.observe_report(&row(&m, ids[2]), &denied(&s, 1..=100), &[], T0 + t);
        }
        assert_eq!(store.detections(10, None).unwrap().len(), 1);
        m.observe_report(&row(&m, ids[1]), &denied(&s, 1..=100), &[], T0 + 3_700_000);
        m.observe_report(&row(&m, ids[2]), &denied(&s, 1..=100), &[], T0 + 3_700_000);
        assert_eq!(
            store.detections(10, None).unwrap().len(),
            2,
            "an hour later"
        );
    }

    #[test]
    fn dry_run_records_and_changes_nothing() {
        let (m, store) = mesh(DetectConfig {
            mode: Mode::DryRun,
            ..DetectConfig::default()
        });
        let ids = enroll_nodes(&m, 3);
        let s = row(&m, ids[0]);
        let before = peers_of(&m, ids[1]);
        m.observe_report(&row(&m, ids[1]), &denied(&s, 1..=100), &[], T0);
        m.observe_report(&row(&m, ids[2]), &denied(&s, 1..=100), &[], T0);
        assert!(row(&m, s.id).quarantine.is_none());
        assert_eq!(peers_of(&m, ids[1]), before);
        let d = &store.detections(10, None).unwrap()[0];
        assert_eq!(d.action, "dry-run: would quarantine");
        assert_eq!(d.alert, "none");
        assert!(store
            .audit_log(50)
            .unwrap()
            .iter()
            .any(|r| r.action == "detect.dry_run"));
    }

    #[test]
    fn the_cap_and_exemptions_hold() {
        let (m, store) = mesh(DetectConfig {
            max_quarantined: 1,
            ..DetectConfig::default()
        });
        let ids = enroll_nodes(&m, 4);
        let (s1, s2) = (row(&m, ids[0]), row(&m, ids[1]));
        let (a, b) = (row(&m, ids[2]), row(&m, ids[3]));
        for s in [&s1, &s2] {
            m.observe_report(&a, &denied(s, 1..=100), &[], T0);
            m.observe_report(&b, &denied(s, 1..=100), &[], T0);
        }
        assert!(row(&m, s1.id).quarantine.is_some());
        assert!(row(&m, s2.id).quarantine.is_none(), "beyond the cap");
        let actions: Vec<String> = store
            .detections(10, None)
            .unwrap()
            .into_iter()
            .map(|d| d.action)
            .collect();
        assert_eq!(
            actions,
            vec![
                "alert (quarantine cap reached)".to_string(),
                "quarantine".into()
            ]
        );

        let (m, store) = mesh(DetectConfig {
            exempt_tags: vec!["tag:a".into()],
            response: Response::Quarantine,
            ..DetectConfig::default()
        });
        let ids = enroll_nodes(&m, 3);
        let s = row(&m, ids[0]);
        m.observe_report(&row(&m, ids[1]), &denied(&s, 1..=100), &[], T0);
        m.observe_report(&row(&m, ids[2]), &denied(&s, 1..=100), &[], T0);
        assert!(row(&m, s.id).quarantine.is_none());
        assert_eq!(
            store.detections(10, None).unwrap()[0].action,
            "none (exempt: tag:a)"
        );
    }
}
