//! The controller's metrics: the counters and histograms the coordinator,
//! the API and the store wrapper update, and the OpenMetrics text of a
//! scrape. No I/O; the `/metrics` listener is `ztmesh_proto::scrape`.
//!
//! Live values (enrollments, builds, latencies) are prometheus-client
//! metrics updated where the event happens; gauges that are facts of the
//! mesh (nodes by state, streams) are read from [`Gauges`] at scrape time,
//! so they can never drift from the state they describe. Every label set
//! is fixed and small: a method, a reason from [`failure_reason`], a store
//! operation name.

use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use ztmesh_proto::scrape::Format;

use crate::error::Error;

/// One label, both halves from a fixed set.
pub type Label = [(&'static str, &'static str); 1];

/// A histogram constructor a [`Family`] can hold.
type MakeHistogram = fn() -> Histogram;

/// Propagation latency buckets: 1 ms to ~33 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Store call buckets: 50 µs to ~1.6 s.
fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Counters and histograms shared by the coordinator, the API and the store
/// wrapper (each metric is internally shared: clones update the same value).
#[derive(Debug)]
pub struct Metrics {
    enrollments: Family<Label, Counter>,
    enrollment_failures: Family<Label, Counter>,
    netmap_builds: Counter,
    netmap_sent_bytes: Counter,
    netmap_deltas: Counter,
    propagation: Histogram,
    acks_ignored: Counter,
    refused_calls: Family<Label, Counter>,
    detections: Family<Label, Counter>,
    store_ops: Family<Label, Histogram, MakeHistogram>,
}

/// Every value of the `action` label of detections.
pub const DETECTION_ACTIONS: [&str; 4] = ["quarantine", "alert", "dry_run", "exempt"];

/// Every value of the `reason` label of enrollment failures.
pub const FAILURE_REASONS: [&str; 10] = [
    "invalid_request",
    "invalid_key",
    "node_auth",
    "forbidden",
    "conflict",
    "rate_limited",
    "internal",
    "login_denied",
    "login_expired",
    "other",
];

/// Every value of the `reason` label of refused node calls.
pub const REFUSAL_REASONS: [&str; 6] = [
    "throttled",
    "unauthenticated",
    "session_conflict",
    "invalid",
    "protocol_version",
    "other",
];

impl Default for Metrics {
    /// Every labelled series of a fixed label set starts at zero, so a
    /// dashboard shows "none yet" rather than "no data".
    fn default() -> Self {
        let m = Self::empty();
        for method in ["authkey", "login"] {
            let _ = m.enrollments.get_or_create(&[("method", method)]);
        }
        for reason in FAILURE_REASONS {
            let _ = m.enrollment_failures.get_or_create(&[("reason", reason)]);
        }
        for reason in REFUSAL_REASONS {
            let _ = m.refused_calls.get_or_create(&[("reason", reason)]);
        }
        for action in DETECTION_ACTIONS {
            let _ = m.detections.get_or_create(&[("action", action)]);
        }
        m
    }
}

impl Metrics {
    fn empty() -> Self {
        Self {
            enrollments: Family::default(),
            enrollment_failures: Family::default(),
            netmap_builds: Counter::default(),
            netmap_sent_bytes: Counter::default(),
            netmap_deltas: Counter::default(),
            propagation: latency_histogram(),
            acks_ignored: Counter::default(),
            refused_calls: Family::default(),
            detections: Family::default(),
            store_ops: Family::new_with_constructor(store_histogram),
        }
    }
}

/// How a node enrolled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnrollMethod {
    AuthKey,
    Login,
}

/// Facts of the mesh read at scrape time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub online: u64,
    pub offline: u64,
    /// Key expired or revoked (by an admin or a logout).
    pub expired: u64,
    /// Quarantined by a detector (and not expired; not counted as online
    /// or offline).
    pub quarantined: u64,
    /// Open netmap streams.
    pub streams: u64,
}

/// The reason label of a refused enrollment or login: a small fixed set.
pub fn failure_reason(e: &Error) -> &'static str {
    match e {
        Error::Invalid(_) => "invalid_request",
        Error::Unauthenticated(_) => "invalid_key",
        Error::NodeAuth { .. } => "node_auth",
        Error::Forbidden(_) => "forbidden",
        Error::Conflict(_) => "conflict",
        Error::RateLimited | Error::Throttled(_) => "rate_limited",
        Error::Store(_) => "internal",
        _ => "other",
    }
}

/// The reason label of a refused node call.
pub fn refusal_reason(e: &Error) -> &'static str {
    match e {
        Error::RateLimited | Error::Throttled(_) => "throttled",
        Error::NodeAuth { .. } | Error::Unauthenticated(_) => "unauthenticated",
        Error::SessionConflict(_) => "session_conflict",
        Error::Invalid(_) => "invalid",
        _ => "other",
    }
}

impl Metrics {
    pub fn enrolled(&self, method: EnrollMethod) {
        let m = match method {
            EnrollMethod::AuthKey => "authkey",
            EnrollMethod::Login => "login",
        };
        self.enrollments.get_or_create(&[("method", m)]).inc();
    }

    pub fn enrollment_failed(&self, reason: &'static str) {
        self.enrollment_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// A netmap was built and signed.
    pub fn netmap_built(&self) {
        self.netmap_builds.inc();
    }

    /// A stream sent a map of `bytes`, as a delta or in full.
    pub fn netmap_sent(&self, bytes: usize, delta: bool) {
        self.netmap_sent_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
        if delta {
            self.netmap_deltas.inc();
        }
    }

    /// A node acknowledged a map `elapsed_ms` after the change behind it
    /// began (`None`: the acknowledgement matched nothing pending).
    pub fn netmap_applied(&self, elapsed_ms: Option<i64>) {
        match elapsed_ms {
            Some(ms) => self.propagation.observe(ms.max(0) as f64 / 1000.0),
            None => {
                self.acks_ignored.inc();
            }
        }
    }

    /// A detector's finding was decided (`action`: one of [`DETECTION_ACTIONS`]).
    pub fn detection(&self, action: &'static str) {
        self.detections.get_or_create(&[("action", action)]).inc();
    }

    /// A node call was refused (authentication, throttling, session).
    pub fn call_refused(&self, reason: &'static str) {
        self.refused_calls
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// One store call `op` took `took`.
    pub fn store_op(&self, op: &'static str, took: Duration) {
        self.store_ops
            .get_or_create(&[("op", op)])
            .observe(took.as_secs_f64());
    }

    /// The exposition of these metrics and `gauges` in `format`.
    pub fn render(&self, gauges: Gauges, format: Format) -> String {
        let mut r = Registry::with_prefix("ztmesh_controller");
        let nodes = Family::<Label, Gauge>::default();
        for (state, n) in [
            ("online", gauges.online),
            ("offline", gauges.offline),
            ("expired", gauges.expired),
            ("quarantined", gauges.quarantined),
        ] {
            nodes
                .get_or_create(&[("state", state)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        r.register("nodes", "Enrolled nodes by state", nodes);
        r.register(
            "streams",
            "Open netmap streams",
            ConstGauge::new(i64::try_from(gauges.streams).unwrap_or(i64::MAX)),
        );
        r.register(
            "enrollments",
            "Enrollments (and re-authentications), by method",
            self.enrollments.clone(),
        );
        r.register(
            "enrollment_failures",
            "Refused enrollments and logins, by reason",
            self.enrollment_failures.clone(),
        );
        r.register(
            "netmap_builds",
            "Netmaps built and signed",
            self.netmap_builds.clone(),
        );
        r.register_with_unit(
            "netmap_sent",
            "Netmap bytes sent on node streams (full maps and deltas)",
            Unit::Bytes,
            self.netmap_sent_bytes.clone(),
        );
        r.register(
            "netmap_deltas",
            "Netmaps sent as a delta against the stream's previous map",
            self.netmap_deltas.clone(),
        );
        r.register_with_unit(
            "netmap_propagation",
            "From the start of a change to a node reporting its map applied",
            Unit::Seconds,
            self.propagation.clone(),
        );
        r.register(
            "netmap_acks_ignored",
            "NetMapApplied calls that matched no pending map",
            self.acks_ignored.clone(),
        );
        r.register(
            "refused_calls",
            "Node calls refused, by reason",
            self.refused_calls.clone(),
        );
        r.register(
            "detections",
            "Detector findings, by what was done",
            self.detections.clone(),
        );
        r.register_with_unit(
            "store_operation",
            "Store calls, by operation",
            Unit::Seconds,
            self.store_ops.clone(),
        );
        exposition(&r, format)
    }
}

/// `r` in `format`.
pub fn exposition(r: &Registry, format: Format) -> String {
    let mut out = String::new();
    let written = match format {
        Format::OpenMetrics => text::encode(&mut out, r),
        Format::Text => prometheus_text::encode(&mut out, r),
    };
    if written.is_err() {
        // Writing to a String cannot fail; keep the exposition well formed.
        out.clear();
        if format == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_reason_given_is_one_of_the_precreated_series() {
        let errors = [
            Error::Invalid("x".into()),
            Error::Unauthenticated("x".into()),
            Error::Forbidden("x".into()),
            Error::NotFound("x".into()),
            Error::Conflict("x".into()),
            Error::RateLimited,
            Error::Throttled("x".into()),
            Error::SessionConflict("x".into()),
            Error::Policy("x".into()),
        ];
        for e in &errors {
            assert!(FAILURE_REASONS.contains(&failure_reason(e)), "{e:?}");
            assert!(REFUSAL_REASONS.contains(&refusal_reason(e)), "{e:?}");
        }
        let text = Metrics::default().render(Gauges::default(), Format::Text);
        for reason in FAILURE_REASONS {
            let line =
                format!("ztmesh_controller_enrollment_failures_total{{reason=\"{reason}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn renders_every_metric_with_conventional_names() {
        let m = Metrics::default();
        m.enrolled(EnrollMethod::AuthKey);
        m.enrolled(EnrollMethod::Login);
        m.enrolled(EnrollMethod::Login);
        m.enrollment_failed(failure_reason(&Error::Unauthenticated("x".into())));
        m.netmap_built();
        m.netmap_built();
        m.netmap_sent(1000, false);
        m.netmap_sent(500, true);
        m.netmap_applied(Some(12));
        m.netmap_applied(Some(-5));
        m.netmap_applied(None);
        m.call_refused(refusal_reason(&Error::Throttled("x".into())));
        m.store_op("nodes", Duration::from_micros(300));
        let gauges = Gauges {
            online: 2,
            offline: 1,
            expired: 3,
            quarantined: 1,
            streams: 2,
        };
        m.detection("quarantine");
        let text = m.render(gauges, Format::OpenMetrics);
        for (name, want) in [
            (r#"ztmesh_controller_nodes{state="online"}"#, 2.0),
            (r#"ztmesh_controller_nodes{state="offline"}"#, 1.0),
            (r#"ztmesh_controller_nodes{state="expired"}"#, 3.0),
            (r#"ztmesh_controller_nodes{state="quarantined"}"#, 1.0),
            (
                r#"ztmesh_controller_detections_total{action="quarantine"}"#,
                1.0,
            ),
            (
                r#"ztmesh_controller_detections_total{action="exempt"}"#,
                0.0,
            ),
            ("ztmesh_controller_streams", 2.0),
            (
                r#"ztmesh_controller_enrollments_total{method="login"}"#,
                2.0,
            ),
            (
                r#"ztmesh_controller_enrollments_total{method="authkey"}"#,
                1.0,
            ),
            (
                r#"ztmesh_controller_enrollment_failures_total{reason="invalid_key"}"#,
                1.0,
            ),
            ("ztmesh_controller_netmap_builds_total", 2.0),
            ("ztmesh_controller_netmap_sent_bytes_total", 1500.0),
            ("ztmesh_controller_netmap_deltas_total", 1.0),
            ("ztmesh_controller_netmap_propagation_seconds_count", 2.0),
            ("ztmesh_controller_netmap_propagation_seconds_sum", 0.012),
            ("ztmesh_controller_netmap_acks_ignored_total", 1.0),
            (
                r#"ztmesh_controller_refused_calls_total{reason="throttled"}"#,
                1.0,
            ),
            (
                r#"ztmesh_controller_store_operation_seconds_count{op="nodes"}"#,
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE ztmesh_controller_netmap_propagation_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("# UNIT ztmesh_controller_netmap_sent_bytes bytes"),
            "{text}"
        );
        // The text format has the same samples, typed under their own names.
        let plain = m.render(gauges, Format::Text);
        assert!(!plain.contains("# EOF"), "{plain}");
        assert!(
            plain.contains("# TYPE ztmesh_controller_netmap_builds_total counter"),
            "{plain}"
        );
        assert_eq!(
            sample(&plain, "ztmesh_controller_netmap_builds_total"),
            Some(2.0)
        );
    }
}
