//! Device posture on the node (issue 14): the attributes this node reports
//! about itself, read from what the host shows, when to report them, and how
//! `status` shows the controller's verdict. Pure: no I/O, no clock (times are
//! arguments); [`collect`] is the shell that reads the host and runs `nft`
//! and `apt-get`.
//!
//! What the node reports (the keys of [`ztmesh_policy::NODE_ATTRIBUTES`]):
//!
//! | attribute | value | source |
//! |---|---|---|
//! | `node:os` | `"linux"` | the build target |
//! | `node:osDistro` | e.g. `"debian"` | `ID` of `/etc/os-release` |
//! | `node:osVersion` | e.g. `"12"` | `VERSION_ID` of `/etc/os-release` |
//! | `node:kernel` | e.g. `"6.1.0-18-amd64"` | `uname(2)` release |
//! | `node:tsVersion` | the agent's version | the crate version |
//! | `node:firewall` | bool | an nftables filter base chain on the input hook ([`firewall_active`]) |
//! | `node:diskEncrypted` | bool | dm-crypt under the device of `/` ([`collect::disk_encrypted`]) |
//! | `node:securityUpdates` | int | pending upgrades from a security suite ([`pending_security_updates`]), only while apt's package lists are recent ([`apt_lists_fresh`]) |
//! | `node:daysSinceUpgrade` | int | days since the package set last changed ([`days_since_upgrade`]) |
//!
//! Every one of them is **self-asserted**: a node that lies, or a user with
//! root on it, can report anything. They are advisory; a hard gate belongs on
//! `custom:*` attributes an admin sets (from an MDM, say). An attribute the
//! node cannot determine is **not reported** (the node's `status` says
//! why, [`Collection::unreported`]): it is then unset, and an unset
//! attribute fails every condition on it, `!=` included — an unknown
//! firewall state passes neither `node:firewall == true` nor
//! `node:firewall != false`.

pub mod collect;

use std::collections::BTreeMap;
use std::time::Duration;

pub use ztmesh_policy::AttrValue;

use serde_json::json;
use ztmesh_proto::control as pb;
use ztmesh_proto::UnixMs;

/// `node:os`.
pub const OS: &str = "node:os";
/// `node:osDistro` (os-release `ID`).
pub const OS_DISTRO: &str = "node:osDistro";
/// `node:osVersion` (os-release `VERSION_ID`).
pub const OS_VERSION: &str = "node:osVersion";
/// `node:kernel` (the kernel release).
pub const KERNEL: &str = "node:kernel";
/// `node:tsVersion` (this agent's version).
pub const AGENT_VERSION: &str = "node:tsVersion";
/// `node:firewall`.
pub const FIREWALL: &str = "node:firewall";
/// `node:diskEncrypted`.
pub const DISK_ENCRYPTED: &str = "node:diskEncrypted";
/// `node:securityUpdates`.
pub const SECURITY_UPDATES: &str = "node:securityUpdates";
/// `node:daysSinceUpgrade`.
pub const DAYS_SINCE_UPGRADE: &str = "node:daysSinceUpgrade";

/// Longest text value reported, in bytes (longer ones are cut at a
/// character boundary).
pub const MAX_VALUE_BYTES: usize = 128;
/// Most attributes in one report.
pub const MAX_ATTRIBUTES: usize = 16;

/// Report interval when the netmap names none (`posture_interval_ms` 0).
pub const DEFAULT_INTERVAL_MS: i64 = 300_000;
/// Least time between two reports, whatever the netmap says or how often
/// the attributes change: the controller takes 10 reports at once, then
/// one per 2 s.
pub const MIN_INTERVAL_MS: i64 = 2_000;
/// Longest interval honoured: a map asking for less often than this gets
/// reports this often (more often than asked only refreshes the report).
pub const MAX_INTERVAL_MS: i64 = 3_600_000;
/// Delay before a failed report is tried again (or the interval, if shorter).
pub const RETRY_MS: i64 = 10_000;
/// How often the agent reads the attributes again.
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(15);
/// Oldest collection still reported: about two collection intervals. A
/// collection that hangs (a blocking read that never returns) must not
/// keep an old set alive; the node then sends nothing and its last report
/// goes stale at the controller.
pub const MAX_COLLECTED_AGE_MS: i64 = 30_000;
/// How far in the future a file time may lie and still be believed (clocks
/// of file servers and of the host disagree a little); beyond it the time
/// is unknown.
pub const FUTURE_SLACK_MS: i64 = 60_000;
/// Oldest apt package lists whose pending-update count is reported: older
/// lists do not know of recent security releases, so their count would be a
/// reassuring, stale 0.
pub const MAX_APT_LISTS_AGE_MS: i64 = 7 * 86_400_000;

/// The nftables tables of ztmesh itself (`ztmesh_<interface>`, see
/// [`crate::io::hostroute`]): they guard the tunnel, not the host, and do
/// not count as a host firewall.
pub const OWN_NFT_TABLE_PREFIX: &str = "ztmesh_";

/// The attributes of one report, by key: at most [`MAX_ATTRIBUTES`], text
/// values at most [`MAX_VALUE_BYTES`] (enforced by [`AttrSet::set`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttrSet(BTreeMap<&'static str, AttrValue>);

impl AttrSet {
    /// Sets `key` to `value`, a text value clipped to [`MAX_VALUE_BYTES`].
    /// Returns false (and changes nothing) when a new key would exceed
    /// [`MAX_ATTRIBUTES`].
    pub fn set(&mut self, key: &'static str, value: AttrValue) -> bool {
        if self.0.len() >= MAX_ATTRIBUTES && !self.0.contains_key(key) {
            return false;
        }
        let value = match value {
            AttrValue::Str(s) => AttrValue::Str(clip(&s).to_string()),
            v => v,
        };
        self.0.insert(key, value);
        true
    }

    /// Sets `key` when `value` is known; an unknown value is not reported.
    pub fn set_known(&mut self, key: &'static str, value: Option<AttrValue>) {
        if let Some(v) = value {
            self.set(key, v);
        }
    }

    /// The value of `key`, if reported.
    pub fn get(&self, key: &str) -> Option<&AttrValue> {
        self.0.get(key)
    }

    /// The attributes in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &AttrValue)> {
        self.0.iter().map(|(k, v)| (*k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The attributes as `ReportPosture` carries them, in key order.
    pub fn to_proto(&self) -> Vec<pb::PostureAttribute> {
        use pb::posture_attribute::Value;
        self.iter()
            .map(|(k, v)| pb::PostureAttribute {
                key: k.to_string(),
                value: Some(match v {
                    AttrValue::Str(s) => Value::Text(s.clone()),
                    AttrValue::Int(n) => Value::Number(*n),
                    AttrValue::Bool(b) => Value::Flag(*b),
                }),
            })
            .collect()
    }

    /// The attributes as a JSON object (`status -o json`).
    pub fn to_json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = self
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    AttrValue::Str(s) => json!(s),
                    AttrValue::Int(n) => json!(n),
                    AttrValue::Bool(b) => json!(b),
                };
                (k.to_string(), v)
            })
            .collect();
        serde_json::Value::Object(map)
    }
}

/// One reading of the host: the attributes to report, and for each node
/// attribute the host did not tell, why (for `status`: the controller only
/// sees that it is unset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Collection {
    pub attrs: AttrSet,
    /// Attribute → why it is not reported.
    pub unreported: BTreeMap<&'static str, String>,
}

impl Collection {
    /// Reports `key` as `value`, or notes why it is not reported.
    pub fn put(&mut self, key: &'static str, value: Result<AttrValue, String>) {
        match value {
            Ok(v) => {
                self.attrs.set(key, v);
            }
            Err(why) => {
                self.unreported.insert(key, clip(&why).to_string());
            }
        }
    }
}

/// `s` cut to at most [`MAX_VALUE_BYTES`] at a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_VALUE_BYTES {
        return s;
    }
    let mut end = MAX_VALUE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What `/etc/os-release` says of the distribution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID`, e.g. `debian`.
    pub id: Option<String>,
    /// `VERSION_ID`, e.g. `12` (absent on rolling releases).
    pub version_id: Option<String>,
}

/// Parses os-release(5) text: `KEY=VALUE` lines, the value bare, in double
/// quotes (with `\` escapes) or in single quotes; comments and lines that
/// do not parse are skipped; an empty value counts as absent. The last
/// assignment of a key wins, as in a shell.
pub fn parse_os_release(text: &str) -> OsRelease {
    let mut out = OsRelease::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, raw)) = line.split_once('=') else {
            continue;
        };
        let slot = match key {
            "ID" => &mut out.id,
            "VERSION_ID" => &mut out.version_id,
            _ => continue,
        };
        if let Some(v) = unquote(raw) {
            *slot = (!v.is_empty()).then_some(v);
        }
    }
    out
}

/// The value of an os-release assignment, or `None` if its quoting is
/// broken.
fn unquote(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let mut chars = raw.chars();
    match chars.next() {
        Some('"') => {
            let mut out = String::new();
            let mut escaped = false;
            for c in chars.by_ref() {
                match (escaped, c) {
                    (false, '\\') => escaped = true,
                    (false, '"') => return chars.as_str().trim().is_empty().then_some(out),
                    (_, c) => {
                        out.push(c);
                        escaped = false;
                    }
                }
            }
            None
        }
        Some('\'') => {
            let rest = chars.as_str();
            let (value, after) = rest.split_once('\'')?;
            after.trim().is_empty().then(|| value.to_string())
        }
        _ => Some(raw.to_string()),
    }
}

/// The mount of `/` as `/proc/self/mountinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootMount {
    /// The device numbers (`st_dev`; major 0 for filesystems on no block
    /// device, and for btrfs).
    pub major: u32,
    pub minor: u32,
    /// e.g. `ext4`, `overlay`, `btrfs`.
    pub fstype: String,
    /// The mount source, e.g. `/dev/mapper/root`, `overlay`.
    pub source: String,
}

/// The mount of `/` in mountinfo text (proc(5)): the last line whose mount
/// point is `/`, since a later mount there hides the earlier ones. Lines
/// that do not parse are skipped.
pub fn root_mount(mountinfo: &str) -> Option<RootMount> {
    mountinfo.lines().rev().find_map(parse_mountinfo_line)
}

/// One mountinfo line, if it is the mount of `/`:
/// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER`.
fn parse_mountinfo_line(line: &str) -> Option<RootMount> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.get(4) != Some(&"/") {
        return None;
    }
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    Some(RootMount {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        fstype: fields.get(sep + 1)?.to_string(),
        source: fields.get(sep + 2)?.to_string(),
    })
}

/// The (major, minor) numbers of a device number as Linux encodes `dev_t`
/// (glibc's `major()`/`minor()`).
pub fn device_numbers(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    // Both fit: major is 12 + 20 bits, minor 8 + 24 bits.
    (major as u32, minor as u32)
}

/// Why `nft -j list ruleset` output was not understood (the firewall
/// state is then not reported).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NftError {
    /// Not JSON (an `nft` built without JSON support prints an error).
    #[error("nft output is not JSON: {0}")]
    NotJson(String),
    /// JSON without the top-level `nftables` array of libnftables-json(5).
    #[error("nft output has no \"nftables\" array")]
    NoRuleset,
}

/// Whether the ruleset (`nft -j -t list ruleset`, libnftables-json(5)) has
/// a host firewall: a base chain of type `filter`, family `ip`, `ip6` or
/// `inet`, on the `input` hook, whose policy is `drop` or that holds any
/// rule. Tables named [`OWN_NFT_TABLE_PREFIX`]`*` are ztmesh's own and do
/// not count; nor do dormant tables (flag `dormant`), whose chains the
/// kernel does not run.
///
/// Only the input hook counts: it is what guards the host itself. A
/// `forward` chain with policy drop is what Docker installs on any host
/// running it, and says nothing about what reaches the host. A `nat` or
/// `route` chain on that hook does not filter.
///
/// # Errors
/// [`NftError`] when the text is not an nftables JSON ruleset.
pub fn firewall_active(nft_json: &str) -> Result<bool, NftError> {
    let doc: serde_json::Value =
        serde_json::from_str(nft_json).map_err(|e| NftError::NotJson(e.to_string()))?;
    let items = doc["nftables"].as_array().ok_or(NftError::NoRuleset)?;
    let dormant: Vec<(&str, &str)> = items
        .iter()
        .map(|i| &i["table"])
        .filter(|t| t.is_object() && is_dormant(&t["flags"]))
        .map(|t| {
            (
                t["family"].as_str().unwrap_or_default(),
                t["name"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    let host_table = |o: &serde_json::Value| {
        let family = o["family"].as_str().unwrap_or_default();
        let table = o["table"].as_str().unwrap_or_default();
        matches!(family, "ip" | "ip6" | "inet")
            && !table.starts_with(OWN_NFT_TABLE_PREFIX)
            && !dormant.contains(&(family, table))
    };
    // (family, table, chain) of the input filter chains whose policy accepts.
    let mut accepting: Vec<(&str, &str, &str)> = Vec::new();
    for chain in items.iter().map(|i| &i["chain"]).filter(|c| c.is_object()) {
        if !host_table(chain)
            || chain["hook"].as_str() != Some("input")
            || chain["type"].as_str() != Some("filter")
        {
            continue;
        }
        if chain["policy"].as_str() == Some("drop") {
            return Ok(true);
        }
        accepting.push((
            chain["family"].as_str().unwrap_or_default(),
            chain["table"].as_str().unwrap_or_default(),
            chain["name"].as_str().unwrap_or_default(),
        ));
    }
    let has_rule = items
        .iter()
        .map(|i| &i["rule"])
        .filter(|r| r.is_object() && host_table(r))
        .any(|r| {
            let key = (
                r["family"].as_str().unwrap_or_default(),
                r["table"].as_str().unwrap_or_default(),
                r["chain"].as_str().unwrap_or_default(),
            );
            accepting.contains(&key)
        });
    Ok(has_rule)
}

/// Whether a table's `flags` (one name or an array of names) include
/// `dormant`. nft 1.0.6 prints a lone flag by its first letter (`"d"`), a
/// bug later versions fixed; both spellings count.
fn is_dormant(flags: &serde_json::Value) -> bool {
    let dormant = |f: &serde_json::Value| matches!(f.as_str(), Some("dormant" | "d"));
    match flags {
        serde_json::Value::Array(list) => list.iter().any(dormant),
        f => dormant(f),
    }
}

/// The number of pending upgrades from a security suite in the output of
/// `apt-get -s dist-upgrade`: `Inst` lines whose origins (in the first
/// parentheses, after the candidate version) name a `security` suite, e.g.
/// `Inst libssl3 [3.0.11-1] (3.0.11-2 Debian-Security:12/stable-security [amd64])`.
pub fn pending_security_updates(apt_output: &str) -> u32 {
    let from_security = |line: &str| {
        let Some(rest) = line.strip_prefix("Inst ") else {
            return false;
        };
        let Some((_, after)) = rest.split_once('(') else {
            return false;
        };
        let inside = after.split(')').next().unwrap_or_default();
        // The first word is the candidate version, which is not an origin.
        inside
            .split_whitespace()
            .skip(1)
            .any(|origin| origin.to_ascii_lowercase().contains("security"))
    };
    let n = apt_output.lines().filter(|l| from_security(l)).count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Whole days from `then_ms` to `now_ms`; 0 when `then_ms` is in the future.
pub fn whole_days(now_ms: UnixMs, then_ms: UnixMs) -> i64 {
    now_ms.saturating_sub(then_ms).max(0) / 86_400_000
}

/// `node:daysSinceUpgrade` from the newest modification time of the
/// package database's files: whole days since then; unknown (`None`)
/// without a time, or when the time lies more than [`FUTURE_SLACK_MS`]
/// ahead of `now_ms` (a file touched with a future time, or a clock set
/// back): a 0 would pass every `< N` gate.
pub fn days_since_upgrade(now_ms: UnixMs, newest_ms: Option<UnixMs>) -> Option<i64> {
    let newest = newest_ms?;
    (newest.saturating_sub(now_ms) <= FUTURE_SLACK_MS).then(|| whole_days(now_ms, newest))
}

/// Whether apt's package lists, last written at `newest_ms` (the newest
/// modification time under `/var/lib/apt/lists`; `None` when there are
/// none), are recent enough for a pending-update count to mean something:
/// at most [`MAX_APT_LISTS_AGE_MS`] old and not more than
/// [`FUTURE_SLACK_MS`] in the future.
pub fn apt_lists_fresh(now_ms: UnixMs, newest_ms: Option<UnixMs>) -> bool {
    newest_ms.is_some_and(|t| {
        t.saturating_sub(now_ms) <= FUTURE_SLACK_MS
            && now_ms.saturating_sub(t) <= MAX_APT_LISTS_AGE_MS
    })
}

/// Whether a device-mapper `dm/uuid` names a target that encrypts: the
/// prefixes cryptsetup gives LUKS1, LUKS2, plain dm-crypt, TrueCrypt /
/// VeraCrypt, BitLocker and loop-AES mappings. cryptsetup's other
/// `CRYPT-` mappings (`VERITY`, `INTEGRITY`, `SUBDEV`) check or carry data
/// without encrypting it.
pub fn is_encrypting_dm_uuid(uuid: &str) -> bool {
    const ENCRYPTING: [&str; 6] = [
        "CRYPT-LUKS1-",
        "CRYPT-LUKS2-",
        "CRYPT-PLAIN-",
        "CRYPT-TCRYPT-",
        "CRYPT-BITLK-",
        "CRYPT-LOOPAES-",
    ];
    ENCRYPTING.iter().any(|p| uuid.starts_with(p))
}

/// The report interval for a netmap's `posture_interval_ms`: the default
/// when it names none (0 or less), and within
/// [`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`].
pub fn report_interval_ms(netmap_interval_ms: i64) -> i64 {
    if netmap_interval_ms <= 0 {
        return DEFAULT_INTERVAL_MS;
    }
    netmap_interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS)
}

/// Whether a report is due at `now_ms`: the first one at once; then every
/// `interval_ms`, or sooner when the attributes `changed` — but never within
/// [`MIN_INTERVAL_MS`] of the last one. A clock stepped back before `last_ms`
/// makes a report due (once), rather than silencing reports until it
/// catches up.
pub fn report_due(
    now_ms: UnixMs,
    last_ms: Option<UnixMs>,
    interval_ms: i64,
    changed: bool,
) -> bool {
    let Some(last) = last_ms else {
        return true;
    };
    if now_ms < last {
        return true;
    }
    let waited = now_ms.saturating_sub(last);
    waited >= interval_ms.max(MIN_INTERVAL_MS) || (changed && waited >= MIN_INTERVAL_MS)
}

/// Decides when the agent sends `ReportPosture` (see [`report_due`]) and
/// remembers what it sent.
#[derive(Debug, Clone, Default)]
pub struct PostureReporter {
    /// When the last attempt was made; kept across [`Self::pause`], so
    /// turning reporting off and on cannot beat [`MIN_INTERVAL_MS`].
    last_ms: Option<UnixMs>,
    /// The attributes of the last attempt (`None` after a pause: the next
    /// set counts as a change).
    last_attrs: Option<AttrSet>,
    /// The last attempt failed: retry after [`RETRY_MS`].
    failed: bool,
    /// The controller does not know `ReportPosture`: quiet for this session.
    unsupported: bool,
}

impl PostureReporter {
    /// Whether to report `current`, collected at `collected_ms`, at `now_ms`
    /// under the netmap's interval (already passed through
    /// [`report_interval_ms`]); a `true` is recorded as an attempt (call
    /// [`Self::failed`] if it does not go through). A set collected more
    /// than [`MAX_COLLECTED_AGE_MS`] from `now_ms` (either way: a clock
    /// step) is never reported.
    pub fn poll(
        &mut self,
        now_ms: UnixMs,
        interval_ms: i64,
        current: &AttrSet,
        collected_ms: UnixMs,
    ) -> bool {
        if self.unsupported || now_ms.abs_diff(collected_ms) > MAX_COLLECTED_AGE_MS.unsigned_abs() {
            return false;
        }
        let due = if self.failed {
            report_due(now_ms, self.last_ms, interval_ms.min(RETRY_MS), false)
        } else {
            let changed = self.last_attrs.as_ref() != Some(current);
            report_due(now_ms, self.last_ms, interval_ms, changed)
        };
        if due {
            self.last_ms = Some(now_ms);
            self.last_attrs = Some(current.clone());
            self.failed = false;
        }
        due
    }

    /// The last attempt failed: try again after [`RETRY_MS`].
    pub fn failed(&mut self) {
        self.failed = true;
    }

    /// The controller has no `ReportPosture` (an older version): stop
    /// reporting until the next session.
    pub fn unsupported(&mut self) {
        self.unsupported = true;
    }

    /// Reporting was turned off: when it is turned on again, the first set
    /// goes out as soon as [`MIN_INTERVAL_MS`] since the last attempt allows.
    pub fn pause(&mut self) {
        self.last_attrs = None;
        self.failed = false;
    }
}

/// The `posture` object of `status -o json`: this node's checks from the
/// last applied netmap, whether it reports (`up --report-posture`), how
/// often, when it last reported (Unix ms), what it reported, what the
/// controller clipped of it, and why the last collection left attributes
/// out.
pub fn status_json(
    checks: &[pb::PostureCheck],
    reporting: bool,
    interval_ms: i64,
    last_report_ms: Option<UnixMs>,
    reported: &AttrSet,
    clipped: &[String],
    unreported: &BTreeMap<&'static str, String>,
) -> serde_json::Value {
    json!({
        "checks": checks.iter().map(|c| json!({
            "name": c.name, "passed": c.passed, "detail": c.detail,
        })).collect::<Vec<_>>(),
        "reporting": reporting,
        "interval_ms": interval_ms,
        "last_report_ms": last_report_ms,
        "attributes": reported.to_json(),
        "clipped": clipped,
        "unreported": unreported,
    })
}

/// The lines `ztmesh status` prints for a [`status_json`] object: one per
/// check (`posture:x  ok`, `posture:x  FAILED: why`), then how the node
/// reports, then why attributes are left out. `utc_offset_s` is the local time zone's offset, for the time of
/// the last report. Nothing for a daemon that sent no `posture` object.
pub fn status_lines(posture: &serde_json::Value, utc_offset_s: i64) -> Vec<String> {
    if !posture.is_object() {
        return Vec::new();
    }
    let checks = posture["checks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let width = checks
        .iter()
        .filter_map(|c| c["name"].as_str())
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0);
    let mut out: Vec<String> = checks
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap_or("?");
            let verdict = match (c["passed"].as_bool(), c["detail"].as_str()) {
                (Some(true), _) => "ok".to_string(),
                (_, Some(d)) if !d.is_empty() => format!("FAILED: {d}"),
                _ => "FAILED".to_string(),
            };
            format!("{name:<width$}  {verdict}")
        })
        .collect();
    let reporting = if posture["reporting"].as_bool() == Some(false) {
        "posture: reporting off (up --report-posture=false)".to_string()
    } else {
        let every = posture["interval_ms"]
            .as_i64()
            .unwrap_or(DEFAULT_INTERVAL_MS)
            / 1000;
        let last = match posture["last_report_ms"].as_i64() {
            Some(ms) => format!("last report {}", clock_text(ms, utc_offset_s)),
            None => "no report yet".to_string(),
        };
        format!("posture: reporting every {every}s, {last}")
    };
    out.push(reporting);
    if posture["reporting"].as_bool() != Some(false) {
        if let Some(missing) = posture["unreported"].as_object() {
            out.extend(missing.iter().map(|(key, why)| {
                let why = why.as_str().unwrap_or("?");
                format!("posture: {key} not reported: {why}")
            }));
        }
    }
    out
}

/// `HH:MM:SS` of `unix_ms` in a zone `utc_offset_s` seconds east of UTC.
pub fn clock_text(unix_ms: UnixMs, utc_offset_s: i64) -> String {
    let secs = (unix_ms.div_euclid(1000))
        .saturating_add(utc_offset_s)
        .rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztmesh_policy::{AttrType, NODE_ATTRIBUTES};

    #[test]
    fn os_release_values_bare_quoted_escaped_or_absent() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
                      VERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n";
        assert_eq!(
            parse_os_release(debian),
            OsRelease {
                id: Some("debian".into()),
                version_id: Some("12".into())
            }
        );
        let table: &[(&str, Option<&str>, Option<&str>)] = &[
            // Single quotes, spaces around, a comment, CRLF.
            (
                "# hi\r\nID='ubuntu'\r\n  VERSION_ID='22.04'  \r\n",
                Some("ubuntu"),
                Some("22.04"),
            ),
            // Rolling release: no VERSION_ID.
            (
                "NAME=\"Arch Linux\"\nID=arch\nBUILD_ID=rolling\n",
                Some("arch"),
                None,
            ),
            // Escapes inside double quotes.
            (r#"ID="we\"ird\\" "#, Some("we\"ird\\"), None),
            // Empty values count as absent; the last assignment wins.
            ("ID=\nVERSION_ID=1\nVERSION_ID=\"2\"", None, Some("2")),
            // Broken quoting is skipped, not guessed at.
            ("ID=\"debian\nVERSION_ID='12", None, None),
            ("ID=\"a\"b\nVERSION_ID=x", None, Some("x")),
            // Keys are exact; no `=` is no assignment.
            ("id=debian\nIDX=1\nID\nVERSION_ID = 3", None, None),
            ("", None, None),
        ];
        for (text, id, version) in table {
            let got = parse_os_release(text);
            assert_eq!(got.id.as_deref(), *id, "{text:?}");
            assert_eq!(got.version_id.as_deref(), *version, "{text:?}");
        }
    }

    #[test]
    fn the_root_mount_is_the_last_one_on_slash() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n\
                    30 27 0:25 / /tmp rw shared:5 - tmpfs tmpfs rw\n";
        assert_eq!(
            root_mount(info),
            Some(RootMount {
                major: 254,
                minor: 0,
                fstype: "ext4".into(),
                source: "/dev/vda".into()
            })
        );
        // Optional fields before the separator; an overlay stacked on top.
        let stacked = format!(
            "{info}99 27 0:52 / / rw,relatime shared:1 master:2 - overlay overlay rw,lowerdir=/a\n"
        );
        let top = root_mount(&stacked).unwrap();
        assert_eq!(
            (top.major, top.minor, top.fstype.as_str()),
            (0, 52, "overlay")
        );
        for bad in [
            "",
            "garbage",
            "27 1 254:0 / /",
            "27 1 x:0 / / rw - ext4 /dev/vda rw",
            "27 1 254 / / rw - ext4 /dev/vda rw",
            "27 1 254:0 / / rw ext4 /dev/vda rw",
            "27 1 254:0 / / rw -",
            "27 1 99999999999:0 / / rw - ext4 /dev/vda rw",
        ] {
            assert_eq!(root_mount(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn device_numbers_decode_like_glibc() {
        assert_eq!(device_numbers(0xfe00), (254, 0));
        assert_eq!(device_numbers(0x0803), (8, 3));
        // A large minor and major use the high bits.
        let dev = (0x123u64 << 8) | 0x45 | (0xabcde_u64 << 12 << 8) | (0x1_0000_u64 << 32);
        let (maj, min) = device_numbers(dev);
        assert_eq!(maj, 0x123 | (0x1_0000 & !0xfff));
        assert_eq!(min, 0x45 | (0xabcde << 8));
        assert_eq!(device_numbers(u64::MAX), (u32::MAX, u32::MAX));
    }

    fn ruleset(items: &str) -> String {
        format!(
            r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6", "json_schema_version": 1}}}}{items}]}}"#
        )
    }

    #[test]
    fn a_firewall_is_an_input_base_chain_that_drops_or_has_rules() {
        let table = r#", {"table": {"family": "inet", "name": "filter", "handle": 1}}"#;
        let chain = |family: &str, table: &str, name: &str, hook: &str, policy: &str| {
            format!(
                r#", {{"chain": {{"family": "{family}", "table": "{table}", "name": "{name}", "handle": 1, "type": "filter", "hook": "{hook}", "prio": 0, "policy": "{policy}"}}}}"#
            )
        };
        let rule = |family: &str, table: &str, chain: &str| {
            format!(
                r#", {{"rule": {{"family": "{family}", "table": "{table}", "chain": "{chain}", "handle": 4, "expr": [{{"accept": null}}]}}}}"#
            )
        };
        let input_accept = chain("inet", "filter", "input", "input", "accept");
        let cases: Vec<(String, bool, &str)> = vec![
            (ruleset(""), false, "empty ruleset"),
            (ruleset(table), false, "a table without chains"),
            (
                ruleset(&input_accept),
                false,
                "an empty accepting input chain",
            ),
            (
                ruleset(&chain("inet", "filter", "input", "input", "drop")),
                true,
                "policy drop",
            ),
            (
                ruleset(&format!(
                    "{input_accept}{}",
                    rule("inet", "filter", "input")
                )),
                true,
                "an accepting chain with a rule",
            ),
            (
                ruleset(&format!(
                    "{}{}",
                    chain("ip", "filter", "INPUT", "input", "accept"),
                    rule("ip", "filter", "INPUT")
                )),
                true,
                "iptables-nft",
            ),
            (
                ruleset(&format!(
                    "{input_accept}{}",
                    rule("inet", "filter", "other")
                )),
                false,
                "a rule in a regular chain",
            ),
            (
                ruleset(&format!("{input_accept}{}", rule("ip", "filter", "input"))),
                false,
                "same names, another family",
            ),
            (
                ruleset(&chain("inet", "filter", "forward", "forward", "drop")),
                false,
                "forward only (Docker)",
            ),
            (
                ruleset(&chain("inet", "filter", "out", "output", "drop")),
                false,
                "output only",
            ),
            (
                ruleset(&chain("netdev", "filter", "in", "ingress", "drop")),
                false,
                "netdev ingress",
            ),
            (
                ruleset(&chain("bridge", "filter", "input", "input", "drop")),
                false,
                "bridge family",
            ),
            (
                ruleset(&format!(
                    "{}{}",
                    chain("inet", "ztmesh_ztm0", "input", "input", "accept"),
                    rule("inet", "ztmesh_ztm0", "input")
                )),
                false,
                "ztmesh's own table",
            ),
            (
                ruleset(&format!(
                    "{}{}",
                    chain("ip", "n", "pre", "input", "accept").replace("filter", "nat"),
                    rule("ip", "n", "pre")
                )),
                false,
                "a nat chain on the input hook",
            ),
            (
                ruleset(
                    &chain("ip", "n", "pre", "input", "drop").replace("\"filter\"", "\"route\""),
                ),
                false,
                "a route chain",
            ),
            (
                ruleset(
                    &chain("inet", "filter", "input", "input", "drop")
                        .replace(r#""type": "filter", "#, ""),
                ),
                false,
                "a chain without a type",
            ),
        ];
        for (json, want, what) in cases {
            assert_eq!(firewall_active(&json), Ok(want), "{what}");
        }
        // Dormant tables do not run: however nft spells the flag.
        let dropping = chain("inet", "filter", "input", "input", "drop");
        for flags in [r#""dormant""#, r#""d""#, r#"["owner", "dormant"]"#] {
            let t = format!(
                r#", {{"table": {{"family": "inet", "name": "filter", "handle": 1, "flags": {flags}}}}}"#
            );
            assert_eq!(
                firewall_active(&ruleset(&format!("{t}{dropping}"))),
                Ok(false),
                "{flags}"
            );
            // The same table in another family is not the dormant one.
            let other = t.replace("inet", "ip");
            assert_eq!(
                firewall_active(&ruleset(&format!("{other}{dropping}"))),
                Ok(true),
                "{flags}"
            );
        }
        let owned =
            r#", {"table": {"family": "inet", "name": "filter", "handle": 1, "flags": "owner"}}"#;
        assert_eq!(
            firewall_active(&ruleset(&format!("{owned}{dropping}"))),
            Ok(true)
        );
        // As nft 1.0.6 prints `nft -j -t list ruleset` (no set elements):
        // a blocklist filter, a dormant table and a nat chain on input.
        let terse = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "t", "handle": 1}}, {"set": {"family": "inet", "name": "bl", "table": "t", "type": "ipv4_addr", "handle": 2}}, {"chain": {"family": "inet", "table": "t", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "t", "chain": "input", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@bl"}}, {"drop": null}]}}, {"table": {"family": "ip", "name": "d", "handle": 2, "flags": "d"}}, {"chain": {"family": "ip", "table": "d", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}}, {"table": {"family": "ip", "name": "n", "handle": 3}}, {"chain": {"family": "ip", "table": "n", "name": "pre", "handle": 1, "type": "nat", "hook": "input", "prio": 100, "policy": "accept"}}, {"rule": {"family": "ip", "table": "n", "chain": "pre", "handle": 2, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]}"#;
        assert_eq!(firewall_active(terse), Ok(true));
        let no_blocklist = terse.replace(
            r#""chain": "input", "handle": 3"#,
            r#""chain": "other", "handle": 3"#,
        );
        assert_eq!(
            firewall_active(&no_blocklist),
            Ok(false),
            "the dormant drop and the nat rule do not count"
        );
        // As nft 1.0.6 prints it: an accepting input chain with one rule.
        let real = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "filter", "handle": 1}}, {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"chain": {"family": "inet", "table": "filter", "name": "forward", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}}, {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 3, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}}, {"accept": null}]}}, {"table": {"family": "ip", "name": "nat", "handle": 2}}, {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}]}"#;
        assert_eq!(firewall_active(real), Ok(true));
        let without_rule = real.replace(
            r#"{"rule": {"family": "inet", "table": "filter", "chain": "input""#,
            r#"{"rule": {"family": "inet", "table": "filter", "chain": "elsewhere""#,
        );
        assert_eq!(firewall_active(&without_rule), Ok(false));
        assert!(matches!(
            firewall_active("Error: JSON support not compiled-in"),
            Err(NftError::NotJson(_))
        ));
        assert_eq!(firewall_active("{}"), Err(NftError::NoRuleset));
        assert_eq!(firewall_active("[1,2]"), Err(NftError::NoRuleset));
        // Odd shapes never panic.
        for odd in [
            r#"{"nftables": [1, null, "x", {"chain": 5}, {"rule": []}, {"chain": {"hook": 7}}]}"#,
            r#"{"nftables": [{"chain": {"family": "inet", "hook": "input", "policy": null}}, {"rule": {"family": "inet"}}]}"#,
        ] {
            assert!(firewall_active(odd).is_ok(), "{odd}");
        }
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(firewall_active(&deep).is_err());
    }

    #[test]
    fn security_updates_count_inst_lines_from_security_suites() {
        let out = "\
NOTE: This is only a simulation!
Reading package lists...
The following packages will be upgraded:
  bash libgnutls30 libc6
Inst bash [5.2.15-2+b8] (5.2.15-2+b13 Debian:12.14/oldstable [amd64])
Inst libgnutls30 [3.7.9-2+deb12u6] (3.7.9-2+deb12u7 Debian-Security:12/oldstable-security [amd64])
Inst libgnutls-dane0 [3.7.9-2+deb12u6] (3.7.9-2+deb12u7 Debian-Security:12/oldstable-security [amd64]) []
Inst libc6 [2.35-0ubuntu3.1] (2.35-0ubuntu3.4 Ubuntu:22.04/jammy-updates, Ubuntu:22.04/jammy-security [amd64])
Inst newpkg (1.0 Debian:12/stable [amd64])
Inst security-tool [1] (2 Debian:12/stable [amd64])
Inst tool [1] (2+security1 Debian:12/stable [amd64])
Conf libgnutls30 (3.7.9-2+deb12u7 Debian-Security:12/oldstable-security [amd64])
";
        assert_eq!(pending_security_updates(out), 3);
        assert_eq!(pending_security_updates(""), 0);
        assert_eq!(pending_security_updates("Inst x\nInst y (\nInst"), 0);
    }

    #[test]
    fn whole_days_round_down_and_never_go_negative() {
        let day = 86_400_000;
        assert_eq!(whole_days(10 * day, 10 * day), 0);
        assert_eq!(whole_days(10 * day, 9 * day + 1), 0);
        assert_eq!(whole_days(10 * day, 9 * day), 1);
        assert_eq!(whole_days(10 * day, 2 * day - 1), 8);
        assert_eq!(whole_days(0, day), 0, "a future time");
        assert_eq!(whole_days(i64::MAX, i64::MIN), i64::MAX / day);
        assert_eq!(whole_days(i64::MIN, i64::MAX), 0);
    }

    #[test]
    fn a_package_time_in_the_future_is_unknown_not_zero_days() {
        let day = 86_400_000;
        let now = 1_800_000_000_000;
        let table = [
            (None, None),
            (Some(now), Some(0)),
            (Some(now - 3 * day - 1), Some(3)),
            (Some(now + FUTURE_SLACK_MS), Some(0)),
            (Some(now + FUTURE_SLACK_MS + 1), None),
            (Some(now + 30 * day), None),
            (Some(i64::MIN), Some(i64::MAX / day)),
            (Some(i64::MAX), None),
        ];
        for (newest, want) in table {
            assert_eq!(days_since_upgrade(now, newest), want, "{newest:?}");
        }
    }

    #[test]
    fn apt_counts_need_package_lists_from_the_last_week() {
        let day = 86_400_000;
        let now = 1_800_000_000_000;
        let table = [
            (None, false),
            (Some(now), true),
            (Some(now - 7 * day), true),
            (Some(now - 7 * day - 1), false),
            (Some(now - 400 * day), false),
            (Some(now + FUTURE_SLACK_MS), true),
            (Some(now + FUTURE_SLACK_MS + 1), false),
            (Some(i64::MIN), false),
            (Some(i64::MAX), false),
        ];
        for (newest, want) in table {
            assert_eq!(apt_lists_fresh(now, newest), want, "{newest:?}");
        }
    }

    #[test]
    fn only_encrypting_device_mapper_targets_count() {
        let table = [
            ("CRYPT-LUKS1-0123abcd-root", true),
            ("CRYPT-LUKS2-0123abcd-luks-root", true),
            ("CRYPT-PLAIN-swap", true),
            ("CRYPT-TCRYPT-vc", true),
            ("CRYPT-BITLK-win", true),
            ("CRYPT-LOOPAES-old", true),
            ("CRYPT-VERITY-0123abcd-usr", false),
            ("CRYPT-INTEGRITY-0123abcd-data", false),
            ("CRYPT-SUBDEV-0123abcd-luks-root_dif", false),
            ("CRYPT-", false),
            ("CRYPT-LUKS2", false),
            ("crypt-luks2-x", false),
            ("LVM-AbCdEf", false),
            ("", false),
        ];
        for (uuid, want) in table {
            assert_eq!(is_encrypting_dm_uuid(uuid), want, "{uuid}");
        }
    }

    #[test]
    fn values_are_clipped_and_the_count_bounded() {
        let mut set = AttrSet::default();
        let long = "é".repeat(100); // 200 bytes
        assert!(set.set(KERNEL, AttrValue::Str(long)));
        let AttrValue::Str(kept) = set.get(KERNEL).unwrap() else {
            panic!("text stays text")
        };
        assert_eq!(kept.len(), 128);
        assert_eq!(clip("abc"), "abc");
        assert_eq!(clip(&"x".repeat(129)).len(), 128);
        assert_eq!(
            clip(&format!("{}€", "x".repeat(127))).len(),
            127,
            "not inside a char"
        );
        const KEYS: [&str; 20] = [
            "k00", "k01", "k02", "k03", "k04", "k05", "k06", "k07", "k08", "k09", "k10", "k11",
            "k12", "k13", "k14", "k15", "k16", "k17", "k18", "k19",
        ];
        let mut full = AttrSet::default();
        let added = KEYS
            .iter()
            .filter(|k| full.set(k, AttrValue::Int(1)))
            .count();
        assert_eq!((added, full.len()), (MAX_ATTRIBUTES, MAX_ATTRIBUTES));
        assert!(
            full.set("k00", AttrValue::Int(2)),
            "a known key still updates"
        );
        assert!(!full.set("k19", AttrValue::Int(2)));
        let mut c = Collection::default();
        c.put(KERNEL, Err("é".repeat(100)));
        c.put(OS, Ok(AttrValue::Str("linux".into())));
        assert_eq!(c.unreported[KERNEL].len(), 128, "reasons are clipped too");
        assert_eq!(c.attrs.len(), 1);
    }

    #[test]
    fn the_proto_and_json_forms_keep_types_and_key_order() {
        let mut set = AttrSet::default();
        set.set(OS, AttrValue::Str("linux".into()));
        set.set(FIREWALL, AttrValue::Bool(false));
        set.set(SECURITY_UPDATES, AttrValue::Int(3));
        set.set_known(DISK_ENCRYPTED, None);
        use pb::posture_attribute::Value;
        let p = set.to_proto();
        let keys: Vec<&str> = p.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["node:firewall", "node:os", "node:securityUpdates"]);
        assert_eq!(p[0].value, Some(Value::Flag(false)));
        assert_eq!(p[1].value, Some(Value::Text("linux".into())));
        assert_eq!(p[2].value, Some(Value::Number(3)));
        assert_eq!(
            set.to_json(),
            json!({"node:firewall": false, "node:os": "linux", "node:securityUpdates": 3})
        );
    }

    #[test]
    fn every_attribute_the_node_reports_is_one_the_policy_knows_with_its_type() {
        let ours = [
            (OS, AttrType::Str),
            (OS_DISTRO, AttrType::Str),
            (OS_VERSION, AttrType::Str),
            (KERNEL, AttrType::Str),
            (AGENT_VERSION, AttrType::Str),
            (FIREWALL, AttrType::Bool),
            (DISK_ENCRYPTED, AttrType::Bool),
            (SECURITY_UPDATES, AttrType::Int),
            (DAYS_SINCE_UPGRADE, AttrType::Int),
        ];
        for (key, ty) in ours {
            let known = NODE_ATTRIBUTES.iter().find(|(k, _)| *k == key);
            assert_eq!(known.map(|(_, t)| *t), Some(ty), "{key}");
        }
        assert_eq!(
            ours.len(),
            NODE_ATTRIBUTES.len(),
            "the node reports them all"
        );
        assert!(ours.len() <= MAX_ATTRIBUTES);
    }

    #[test]
    fn report_intervals_have_a_default_a_floor_and_a_ceiling() {
        assert_eq!(report_interval_ms(0), DEFAULT_INTERVAL_MS);
        assert_eq!(report_interval_ms(-5), DEFAULT_INTERVAL_MS);
        assert_eq!(report_interval_ms(1), MIN_INTERVAL_MS);
        assert_eq!(report_interval_ms(30_000), 30_000);
        assert_eq!(report_interval_ms(i64::MAX), MAX_INTERVAL_MS);
    }

    #[test]
    fn reports_are_due_first_then_on_the_interval_or_soon_after_a_change() {
        let s = 1_000;
        let t0 = 1_800_000_000_000;
        // (now, last, interval, changed, due)
        let table = [
            (t0, None, 60 * s, false, true),
            (t0 + 59 * s, Some(t0), 60 * s, false, false),
            (t0 + 60 * s, Some(t0), 60 * s, false, true),
            (t0 + 1_999, Some(t0), 60 * s, true, false),
            (t0 + 2 * s, Some(t0), 60 * s, true, true),
            // The floor holds even for a zero or negative interval.
            (t0 + 1_999, Some(t0), 0, false, false),
            (t0 + 2 * s, Some(t0), -1, false, true),
            // A clock stepped back reports rather than waits.
            (t0 - 5 * s, Some(t0), 60 * s, false, true),
            // Extremes never overflow.
            (i64::MAX, Some(i64::MIN), 60 * s, false, true),
            (i64::MIN, Some(i64::MIN), i64::MAX, true, false),
        ];
        for (now, last, interval, changed, want) in table {
            assert_eq!(
                report_due(now, last, interval, changed),
                want,
                "{now} {last:?} {interval} {changed}"
            );
        }
    }

    #[test]
    fn the_reporter_sends_changes_soon_retries_failures_and_pauses() {
        let t0 = 1_800_000_000_000;
        let minute = 60_000;
        let mut a = AttrSet::default();
        a.set(OS, AttrValue::Str("linux".into()));
        let mut b = a.clone();
        b.set(FIREWALL, AttrValue::Bool(true));
        let mut r = PostureReporter::default();
        // Each set is polled as freshly collected unless said otherwise.
        let poll = |r: &mut PostureReporter, now: i64, set: &AttrSet| r.poll(now, minute, set, now);
        assert!(poll(&mut r, t0, &a), "first report at once");
        assert!(!poll(&mut r, t0 + 1, &a));
        assert!(
            !poll(&mut r, t0 + 1_999, &b),
            "a change waits for the floor"
        );
        assert!(poll(&mut r, t0 + 2_000, &b), "then goes out");
        assert!(!poll(&mut r, t0 + 30_000, &b));
        assert!(poll(&mut r, t0 + 62_000, &b), "the interval refreshes");
        // A failure retries after RETRY_MS, not at once and not a whole interval later.
        r.failed();
        assert!(!poll(&mut r, t0 + 63_000, &b));
        let t1 = t0 + 62_000 + RETRY_MS;
        assert!(poll(&mut r, t1, &b));
        assert!(
            !poll(&mut r, t1 + 3_000, &b),
            "success: back to the interval"
        );
        // Turned off and on again: the set goes out as a change, but not
        // within the floor of the last attempt (toggling cannot flood).
        r.pause();
        assert!(!poll(&mut r, t1 + 1_000, &b));
        assert!(poll(&mut r, t1 + 2_000, &b));
        // A set collected too long ago (a hung collection) is never sent;
        // nor one stamped far in the future (a clock stepped back).
        let t2 = t1 + 10 * minute;
        assert!(!r.poll(t2, minute, &a, t2 - MAX_COLLECTED_AGE_MS - 1));
        assert!(!r.poll(t2, minute, &a, t2 + MAX_COLLECTED_AGE_MS + 1));
        assert!(r.poll(t2, minute, &a, t2 - MAX_COLLECTED_AGE_MS));
        assert!(
            !r.poll(i64::MAX, minute, &a, i64::MIN),
            "extremes do not overflow"
        );
        // A controller without the RPC: quiet until the next session.
        r.unsupported();
        assert!(!poll(&mut r, t2 + 10 * minute, &b));
        r.pause();
        assert!(!poll(&mut r, t2 + 11 * minute, &a));
        assert!(PostureReporter::default().poll(t0, minute, &AttrSet::default(), t0));
    }

    #[test]
    fn stale_collections_are_about_two_collection_intervals_old() {
        let interval = i64::try_from(COLLECT_INTERVAL.as_millis()).unwrap();
        assert_eq!(MAX_COLLECTED_AGE_MS, 2 * interval);
        // A quick pass (nft's timeout, the reaping) and the sleep fit; so
        // does an apt pass between two quick ones.
        let nft = i64::try_from(collect::NFT_TIMEOUT.as_millis()).unwrap();
        let apt = i64::try_from(collect::APT_TIMEOUT.as_millis()).unwrap();
        assert!(interval + nft + 1_000 < MAX_COLLECTED_AGE_MS);
        assert!(apt + nft + 1_000 < MAX_COLLECTED_AGE_MS);
    }

    fn check(name: &str, passed: bool, detail: &str) -> pb::PostureCheck {
        pb::PostureCheck {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }

    #[test]
    fn status_names_each_check_and_how_the_node_reports() {
        let mut set = AttrSet::default();
        set.set(OS, AttrValue::Str("linux".into()));
        let checks = [
            check(
                "posture:compliant",
                false,
                "custom:compliant == true: seen false (set by an admin)",
            ),
            check("posture:base", true, ""),
        ];
        // 12:34:56 UTC.
        let at = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000 + 45_296_000;
        let unreported = BTreeMap::from([(
            SECURITY_UPDATES,
            "apt-get -s dist-upgrade has not counted yet".to_string(),
        )]);
        let v = status_json(
            &checks,
            true,
            60_000,
            Some(at),
            &set,
            &["node:x: unknown attribute".into()],
            &unreported,
        );
        assert_eq!(
            v,
            json!({
                "checks": [
                    {"name": "posture:compliant", "passed": false, "detail": "custom:compliant == true: seen false (set by an admin)"},
                    {"name": "posture:base", "passed": true, "detail": ""},
                ],
                "reporting": true,
                "interval_ms": 60_000,
                "last_report_ms": at,
                "attributes": {"node:os": "linux"},
                "clipped": ["node:x: unknown attribute"],
                "unreported": {"node:securityUpdates": "apt-get -s dist-upgrade has not counted yet"},
            })
        );
        assert_eq!(
            status_lines(&v, 0),
            [
                "posture:compliant  FAILED: custom:compliant == true: seen false (set by an admin)",
                "posture:base       ok",
                "posture: reporting every 60s, last report 12:34:56",
                "posture: node:securityUpdates not reported: apt-get -s dist-upgrade has not counted yet",
            ]
        );
        assert_eq!(
            status_lines(&v, 3_600)[2],
            "posture: reporting every 60s, last report 13:34:56"
        );
        let off = status_json(&[], false, 60_000, Some(at), &set, &[], &unreported);
        assert_eq!(
            status_lines(&off, 0),
            ["posture: reporting off (up --report-posture=false)"]
        );
        let fresh = status_json(
            &[check("posture:x", false, "")],
            true,
            300_000,
            None,
            &AttrSet::default(),
            &[],
            &BTreeMap::new(),
        );
        assert_eq!(
            status_lines(&fresh, 0),
            [
                "posture:x  FAILED",
                "posture: reporting every 300s, no report yet"
            ]
        );
        // An older daemon sends no posture object; odd shapes do not panic.
        assert!(status_lines(&serde_json::Value::Null, 0).is_empty());
        assert_eq!(
            status_lines(&json!({"checks": [1, {"name": 2}], "interval_ms": "x"}), 0).len(),
            3
        );
        assert_eq!(
            status_lines(&json!({"unreported": {"node:x": 5}}), 0),
            [
                "posture: reporting every 300s, no report yet",
                "posture: node:x not reported: ?"
            ]
        );
    }

    proptest::proptest! {
        /// Whatever the host's files and tools print, the parsers answer
        /// and never panic.
        #[test]
        fn parsers_take_any_text(text in "(\\PC|[ \t\n'\"\\\\=:()\\[\\]{},-])*") {
            let os = parse_os_release(&text);
            proptest::prop_assert!(os.id.is_none_or(|v| !v.is_empty()));
            let _ = root_mount(&text);
            let _ = firewall_active(&text);
            let n = pending_security_updates(&text);
            proptest::prop_assert!(n as usize <= text.lines().count());
            proptest::prop_assert!(clip(&text).len() <= MAX_VALUE_BYTES);
        }

        #[test]
        fn the_root_mount_line_round_trips(major in 0u32..4096, minor in 0u32..1_000_000, fs in "[a-z0-9]{1,8}", opt in proptest::option::of("shared:[0-9]{1,3}")) {
            let optional = opt.map(|o| format!(" {o}")).unwrap_or_default();
            let line = format!("27 1 {major}:{minor} / / rw,relatime{optional} - {fs} /dev/x rw\n");
            let m = root_mount(&line).unwrap();
            proptest::prop_assert_eq!((m.major, m.minor, m.fstype.as_str(), m.source.as_str()), (major, minor, fs.as_str(), "/dev/x"));
        }
    }

    #[test]
    fn clock_text_wraps_days_and_zones() {
        assert_eq!(clock_text(0, 0), "00:00:00");
        assert_eq!(clock_text(86_399_999, 0), "23:59:59");
        assert_eq!(clock_text(0, -3_600), "23:00:00");
        assert_eq!(clock_text(-1, 0), "23:59:59");
        assert_eq!(clock_text(i64::MAX, i64::MAX).len(), 8);
        assert_eq!(clock_text(i64::MIN, i64::MIN).len(), 8);
    }
}
