//! Signing in, the pure parts: the order of `Control.Login`'s events, what
//! an enrollment answer must hold, the `--fingerprint` argument, the OS
//! string shown on the confirmation page, and the key-expiry warning of
//! `ztmesh status`. No I/O: the clock is an argument.
//!
//! An interactive login is one server stream: first a [`Prompt`] (a URL and
//! a one-time code for a person), then the enrollment, then the end. Anything
//! else (an enrollment before the prompt, a second prompt, an empty event, a
//! stream that ends early) is refused with a [`LoginError`], and the node
//! stores nothing.

use ipnet::IpNet;
use ztmesh_proto::control as pb;
use ztmesh_proto::keys::PublicKey;
use ztmesh_proto::UnixMs;

/// Longest sign-in URL accepted from the controller.
pub const MAX_URL_LEN: usize = 2048;
/// Longest one-time code accepted from the controller.
pub const MAX_CODE_LEN: usize = 64;
/// How long before its key expires a node starts warning in `status`.
pub const WARN_BEFORE_EXPIRY_MS: i64 = 7 * DAY_MS;
/// The message `status` shows while the node's key is expired.
pub const EXPIRED_MESSAGE: &str = "node key expired: run `ztmesh up` to sign in again";
/// Where a person finds the controller's fingerprint, for error messages.
pub const FINGERPRINT_HINT: &str = "`ztmesh-controller serve` prints it at start \
     (`ztmesh-controller fingerprint` too)";

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Longest `--fingerprint` argument looked at (64 hex digits with colons
/// and a prefix fit easily).
const MAX_FINGERPRINT_ARG: usize = 160;
/// Longest kernel release kept in the OS string.
const MAX_RELEASE_LEN: usize = 64;

/// What a person is asked to do: open `url`, compare `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// An `https://` URL of printable ASCII (safe to print on a terminal).
    pub url: String,
    /// Printable ASCII, at most [`MAX_CODE_LEN`] characters.
    pub code: String,
    /// Unix ms after which the controller refuses the code.
    pub expires_ms: UnixMs,
}

/// The controller's answer to an enrollment (auth key or login), parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub node_id: u64,
    pub name: String,
    pub addresses: Vec<IpNet>,
    /// The key that signs this node's network maps.
    pub controller_key: PublicKey,
    /// Unix ms when the node's key expires; 0 = never.
    pub key_expiry_ms: UnixMs,
}

/// An enrollment answer the node cannot use; nothing is stored.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    /// `controller_key` is not an ed25519 public key: a controller bug.
    #[error("controller sent an invalid netmap key")]
    ControllerKey,
    /// An overlay address that does not parse: a controller bug.
    #[error("controller sent an invalid address {0:?}")]
    Address(String),
}

/// Why an interactive login failed; nothing is stored.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    /// The stream ended without an enrollment: the code expired, the person
    /// declined, or the controller restarted. Run `ztmesh up` again.
    #[error(
        "the controller ended the login without enrolling this node (the code expired, \
         the sign-in was declined, or the controller restarted); run `ztmesh up` again"
    )]
    Ended,
    /// An event with neither a prompt nor an enrollment.
    #[error("the controller sent an empty login event")]
    Empty,
    /// The enrollment came before the prompt: no person could have confirmed.
    #[error("the controller sent an enrollment before the sign-in prompt")]
    EnrolledBeforePrompt,
    /// A second prompt: the protocol has one.
    #[error("the controller sent a second sign-in prompt")]
    SecondPrompt,
    /// An event after the enrollment: the login is over.
    #[error("the controller sent a login event after the enrollment")]
    AfterEnrollment,
    /// The URL is not one to show a person (why).
    #[error("the controller sent an unusable sign-in URL: {0}")]
    BadUrl(&'static str),
    /// The code is empty, too long, or not printable ASCII.
    #[error("the controller sent an unusable sign-in code")]
    BadCode,
    /// The enrollment does not parse.
    #[error(transparent)]
    Enroll(#[from] EnrollError),
}

/// What a login event means, once it passed [`LoginFlow::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginStep {
    /// Show this to the person; wait for the enrollment.
    Prompt(Prompt),
    /// Store this; the login is complete.
    Enrolled(Enrolled),
}

/// The order of a login stream's events: prompt, then enrollment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginFlow {
    stage: Stage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    AwaitPrompt,
    AwaitEnrollment,
    Done,
}

impl LoginFlow {
    /// Checks the next event of the stream.
    ///
    /// # Errors
    /// [`LoginError`] for an event out of order or one that does not parse;
    /// the login is over then (the caller drops the stream).
    pub fn handle(&mut self, ev: pb::LoginEvent) -> Result<LoginStep, LoginError> {
        use pb::login_event::Event;
        let step = match (self.stage, ev.event) {
            (Stage::Done, _) => return Err(LoginError::AfterEnrollment),
            (_, None) => return Err(LoginError::Empty),
            (Stage::AwaitPrompt, Some(Event::Prompt(p))) => LoginStep::Prompt(parse_prompt(p)?),
            (Stage::AwaitPrompt, Some(Event::Enrolled(_))) => {
                return Err(LoginError::EnrolledBeforePrompt)
            }
            (Stage::AwaitEnrollment, Some(Event::Prompt(_))) => {
                return Err(LoginError::SecondPrompt)
            }
            (Stage::AwaitEnrollment, Some(Event::Enrolled(r))) => {
                LoginStep::Enrolled(parse_enrollment(r)?)
            }
        };
        self.stage = match step {
            LoginStep::Prompt(_) => Stage::AwaitEnrollment,
            LoginStep::Enrolled(_) => Stage::Done,
        };
        Ok(step)
    }

    /// What the end of the stream means now: `None` once enrolled, else the
    /// error to report.
    pub fn ended(&self) -> Option<LoginError> {
        (self.stage != Stage::Done).then_some(LoginError::Ended)
    }
}

/// Parses the controller's answer to `Enroll` or the enrollment of a login.
///
/// # Errors
/// [`EnrollError`] naming the field that does not parse.
pub fn parse_enrollment(r: pb::EnrollResponse) -> Result<Enrolled, EnrollError> {
    let controller_key =
        PublicKey::from_slice(&r.controller_key).map_err(|_| EnrollError::ControllerKey)?;
    let addresses = r
        .addresses
        .iter()
        .map(|a| parse_address(a).ok_or_else(|| EnrollError::Address(a.clone())))
        .collect::<Result<_, _>>()?;
    Ok(Enrolled {
        node_id: r.node_id,
        name: r.name,
        addresses,
        controller_key,
        key_expiry_ms: r.key_expiry_ms,
    })
}

/// An overlay address as the controller sends it (a bare address) or as a
/// prefix.
pub fn parse_address(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

fn parse_prompt(p: pb::LoginPrompt) -> Result<Prompt, LoginError> {
    // Printed on a terminal: no control characters, no escape sequences.
    let printable = |s: &str| s.bytes().all(|b| b.is_ascii_graphic());
    if p.url.len() > MAX_URL_LEN {
        return Err(LoginError::BadUrl("too long"));
    }
    if !printable(&p.url) {
        return Err(LoginError::BadUrl("not printable ASCII"));
    }
    let scheme_ok = p
        .url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    if !scheme_ok || p.url.len() == 8 {
        return Err(LoginError::BadUrl("not an https:// URL"));
    }
    if p.code.is_empty() || p.code.len() > MAX_CODE_LEN || !printable(&p.code) {
        return Err(LoginError::BadCode);
    }
    Ok(Prompt {
        url: p.url,
        code: p.code,
        expires_ms: p.expires_ms,
    })
}

/// A `--fingerprint` that is not a SHA-256 fingerprint.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid controller fingerprint {shown:?}: expected 64 hex characters (colons and a \
     SHA256: prefix allowed); {FINGERPRINT_HINT}"
)]
pub struct FingerprintError {
    /// The argument, cut short if long.
    shown: String,
}

/// Parses the controller's certificate fingerprint as a person types it:
/// 64 hex digits, with or without a `sha256:` prefix (any case) and colons.
///
/// # Errors
/// [`FingerprintError`] quoting (the start of) the argument.
pub fn parse_fingerprint_arg(s: &str) -> Result<[u8; 32], FingerprintError> {
    let bad = || FingerprintError {
        shown: s.chars().take(80).collect(),
    };
    if s.len() > MAX_FINGERPRINT_ARG {
        return Err(bad());
    }
    let t = s.trim();
    let t = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
        _ => t,
    };
    // `auth::parse_fingerprint` takes hex with colons, nothing else.
    if !t.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
        return Err(bad());
    }
    ztmesh_proto::auth::parse_fingerprint(t).ok_or_else(bad)
}

/// How the node shows a fingerprint to a person: `SHA256:` and lowercase hex.
pub fn fingerprint_text(fp: &[u8; 32]) -> String {
    format!("SHA256:{}", ztmesh_proto::auth::hex(fp))
}

/// The OS string sent at login (shown on the confirmation page): `os` (as
/// `std::env::consts::OS`) and the kernel release, the release cut to
/// printable ASCII and at most 64 characters.
pub fn os_string(os: &str, release: &str) -> String {
    let release: String = release
        .trim()
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_RELEASE_LEN)
        .collect();
    if release.is_empty() {
        os.to_string()
    } else {
        format!("{os} {release}")
    }
}

/// Signed seconds until the key expires (negative once it has), or `None`
/// for a key that never expires (`key_expiry_ms` 0).
pub fn key_expires_in_secs(key_expiry_ms: UnixMs, now_ms: UnixMs) -> Option<i64> {
    (key_expiry_ms != 0).then(|| key_expiry_ms.saturating_sub(now_ms) / 1000)
}

/// The warning `status` prints when the key expires within
/// [`WARN_BEFORE_EXPIRY_MS`] or has expired; `None` otherwise (and for a
/// key that never expires, `key_expiry_ms` 0).
pub fn expiry_warning(key_expiry_ms: UnixMs, now_ms: UnixMs) -> Option<String> {
    if key_expiry_ms == 0 {
        return None;
    }
    let left = key_expiry_ms.saturating_sub(now_ms);
    if left <= 0 {
        let ago = now_ms.saturating_sub(key_expiry_ms);
        return Some(format!(
            "key expired {} ago: run `ztmesh up` to sign in again",
            span_text(ago)
        ));
    }
    (left < WARN_BEFORE_EXPIRY_MS).then(|| {
        format!(
            "key expires in {}: run `ztmesh up --force-reauth` to extend",
            span_text(left)
        )
    })
}

/// A span of time for a person, rounded down: `2d 3h`, `5h 12m`, `7m`,
/// `less than a minute` (also for a negative span).
pub fn span_text(ms: i64) -> String {
    let (d, h, m) = (ms / DAY_MS, ms % DAY_MS / HOUR_MS, ms % HOUR_MS / MINUTE_MS);
    match (d, h, m) {
        _ if ms < MINUTE_MS => "less than a minute".into(),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h {m}m"),
        (d, h, _) => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use ztmesh_proto::keys::SigningKey;

    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn prompt(url: &str, code: &str) -> pb::LoginEvent {
        pb::LoginEvent {
            event: Some(pb::login_event::Event::Prompt(pb::LoginPrompt {
                url: url.into(),
                code: code.into(),
                expires_ms: NOW + 600_000,
            })),
        }
    }

    fn enrollment(addresses: &[&str], key: Vec<u8>) -> pb::EnrollResponse {
        pb::EnrollResponse {
            node_id: 7,
            name: "laptop".into(),
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            controller_key: key,
            key_expiry_ms: NOW + 30 * DAY_MS,
        }
    }

    fn enrolled(r: pb::EnrollResponse) -> pb::LoginEvent {
        pb::LoginEvent {
            event: Some(pb::login_event::Event::Enrolled(r)),
        }
    }

    fn controller_key() -> Vec<u8> {
        SigningKey::generate(&mut StdRng::seed_from_u64(5))
            .public()
            .as_bytes()
            .to_vec()
    }

    fn good_enrollment() -> pb::EnrollResponse {
        enrollment(&["100.64.0.7", "fd7a:115c:a1e0::7"], controller_key())
    }

    #[test]
    fn a_prompt_then_an_enrollment_completes_the_login() {
        let mut flow = LoginFlow::default();
        assert_eq!(flow.ended(), Some(LoginError::Ended));
        let step = flow
            .handle(prompt(
                "https://198.18.0.1:8443/device?code=ABCD-EFGH",
                "ABCD-EFGH",
            ))
            .unwrap();
        assert_eq!(
            step,
            LoginStep::Prompt(Prompt {
                url: "https://198.18.0.1:8443/device?code=ABCD-EFGH".into(),
                code: "ABCD-EFGH".into(),
                expires_ms: NOW + 600_000,
            })
        );
        assert_eq!(
            flow.ended(),
            Some(LoginError::Ended),
            "prompted, not enrolled"
        );
        let LoginStep::Enrolled(e) = flow.handle(enrolled(good_enrollment())).unwrap() else {
            panic!("an enrollment");
        };
        assert_eq!(e.node_id, 7);
        assert_eq!(e.name, "laptop");
        assert_eq!(
            e.addresses,
            [
                "100.64.0.7/32".parse::<IpNet>().unwrap(),
                "fd7a:115c:a1e0::7/128".parse().unwrap()
            ]
        );
        assert_eq!(e.key_expiry_ms, NOW + 30 * DAY_MS);
        assert_eq!(flow.ended(), None);
        assert_eq!(
            flow.handle(prompt("https://example.com/x", "A")),
            Err(LoginError::AfterEnrollment)
        );
    }

    #[test]
    fn events_out_of_order_or_empty_are_refused() {
        let mut flow = LoginFlow::default();
        assert_eq!(
            flow.handle(enrolled(good_enrollment())),
            Err(LoginError::EnrolledBeforePrompt)
        );
        let mut flow = LoginFlow::default();
        assert_eq!(
            flow.handle(pb::LoginEvent { event: None }),
            Err(LoginError::Empty)
        );
        let mut flow = LoginFlow::default();
        flow.handle(prompt("https://example.com/device", "C0DE"))
            .unwrap();
        assert_eq!(
            flow.handle(prompt("https://example.com/device", "C0DE")),
            Err(LoginError::SecondPrompt)
        );
        assert_eq!(
            flow.handle(pb::LoginEvent { event: None }),
            Err(LoginError::Empty)
        );
    }

    #[test]
    fn prompts_unsafe_to_show_a_person_are_refused() {
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        let long_code = "A".repeat(MAX_CODE_LEN + 1);
        let cases: [(&str, &str, LoginError); 9] = [
            (
                "http://example.com/device",
                "C",
                LoginError::BadUrl("not an https:// URL"),
            ),
            (
                "javascript:alert(1)",
                "C",
                LoginError::BadUrl("not an https:// URL"),
            ),
            ("https://", "C", LoginError::BadUrl("not an https:// URL")),
            ("", "C", LoginError::BadUrl("not an https:// URL")),
            (
                "https://example.com/\x1b]8;;x\x07",
                "C",
                LoginError::BadUrl("not printable ASCII"),
            ),
            (
                "https://example.com/ spaced",
                "C",
                LoginError::BadUrl("not printable ASCII"),
            ),
            (
                "https://exämple.com/",
                "C",
                LoginError::BadUrl("not printable ASCII"),
            ),
            (&long, "C", LoginError::BadUrl("too long")),
            ("https://example.com/", &long_code, LoginError::BadCode),
        ];
        for (url, code, want) in cases {
            let mut flow = LoginFlow::default();
            assert_eq!(
                flow.handle(prompt(url, code)),
                Err(want),
                "{url:?} {code:?}"
            );
        }
        for code in ["", "AB\nCD", "AB\x1b[2J"] {
            let mut flow = LoginFlow::default();
            assert_eq!(
                flow.handle(prompt("https://example.com/device", code)),
                Err(LoginError::BadCode),
                "{code:?}"
            );
        }
        // Upper-case scheme is still https.
        let mut flow = LoginFlow::default();
        assert!(flow.handle(prompt("HTTPS://example.com/d", "C")).is_ok());
    }

    #[test]
    fn enrollments_with_a_bad_key_or_address_are_refused_naming_it() {
        let cases = [
            (
                enrollment(&["100.64.0.7"], vec![1; 31]),
                EnrollError::ControllerKey,
            ),
            (
                enrollment(&["100.64.0.7"], Vec::new()),
                EnrollError::ControllerKey,
            ),
            (
                enrollment(&["100.64.0.7", "100.64.0.300"], controller_key()),
                EnrollError::Address("100.64.0.300".into()),
            ),
            (
                enrollment(&["not-an-ip"], controller_key()),
                EnrollError::Address("not-an-ip".into()),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(parse_enrollment(r.clone()), Err(want.clone()));
            let mut flow = LoginFlow::default();
            flow.handle(prompt("https://example.com/device", "C"))
                .unwrap();
            assert_eq!(flow.handle(enrolled(r)), Err(LoginError::Enroll(want)));
            assert_eq!(flow.ended(), Some(LoginError::Ended), "nothing enrolled");
        }
        assert_eq!(
            EnrollError::Address("x".into()).to_string(),
            "controller sent an invalid address \"x\"",
            "the auth-key path's wording is unchanged"
        );
    }

    #[test]
    fn fingerprints_parse_as_people_type_them() {
        let fp: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        let hex = ztmesh_proto::auth::hex(&fp);
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        let colons = colons.join(":");
        for s in [
            hex.clone(),
            hex.to_uppercase(),
            format!("sha256:{hex}"),
            format!("SHA256:{hex}"),
            format!("Sha256:{colons}"),
            colons.clone(),
            format!("  SHA256:{hex}\n"),
        ] {
            assert_eq!(parse_fingerprint_arg(&s), Ok(fp), "{s:?}");
        }
        assert_eq!(fingerprint_text(&fp), format!("SHA256:{hex}"));
        assert_eq!(parse_fingerprint_arg(&fingerprint_text(&fp)), Ok(fp));
        for s in [
            String::new(),
            "abc".into(),
            hex[..62].to_string(),
            format!("{hex}00"),
            format!("sha1:{hex}"),
            format!("SHA256: {hex}"),
            format!("sha256:sha256:{hex}"),
            hex.replacen('0', "g", 1),
            format!("{hex}{}", ":".repeat(200)),
            "é".repeat(64),
        ] {
            let err = parse_fingerprint_arg(&s).expect_err(&s);
            let msg = err.to_string();
            assert!(msg.contains("ztmesh-controller serve"), "{msg}");
            assert!(msg.len() < 400, "the argument is quoted short: {msg}");
        }
    }

    #[test]
    fn the_os_string_is_bounded_and_printable() {
        assert_eq!(
            os_string("linux", "6.1.0-18-amd64\n"),
            "linux 6.1.0-18-amd64"
        );
        assert_eq!(os_string("linux", ""), "linux");
        assert_eq!(
            os_string("linux", "6.1\x1b[31m x\u{202e}"),
            "linux 6.1[31mx"
        );
        let long = os_string("linux", &"9".repeat(1000));
        assert_eq!(long.len(), "linux ".len() + 64);
    }

    #[test]
    fn expiry_warnings_on_a_virtual_clock() {
        let cases: [(i64, Option<&str>); 9] = [
            (0, None),
            (NOW + 30 * DAY_MS, None),
            (NOW + 7 * DAY_MS, None),
            (
                NOW + 7 * DAY_MS - 1,
                Some("key expires in 6d 23h: run `ztmesh up --force-reauth` to extend"),
            ),
            (
                NOW + 2 * DAY_MS + 3 * HOUR_MS + 59 * MINUTE_MS,
                Some("key expires in 2d 3h: run `ztmesh up --force-reauth` to extend"),
            ),
            (
                NOW + 5 * HOUR_MS + 12 * MINUTE_MS + 30_000,
                Some("key expires in 5h 12m: run `ztmesh up --force-reauth` to extend"),
            ),
            (
                NOW + 59_999,
                Some("key expires in less than a minute: run `ztmesh up --force-reauth` to extend"),
            ),
            (
                NOW,
                Some("key expired less than a minute ago: run `ztmesh up` to sign in again"),
            ),
            (
                NOW - DAY_MS - 2 * HOUR_MS,
                Some("key expired 1d 2h ago: run `ztmesh up` to sign in again"),
            ),
        ];
        for (expiry, want) in cases {
            assert_eq!(
                expiry_warning(expiry, NOW).as_deref(),
                want,
                "expiry {expiry} at {NOW}"
            );
        }
        // Extremes never overflow.
        assert!(expiry_warning(i64::MAX, i64::MIN).is_none());
        assert!(expiry_warning(i64::MIN + 1, i64::MAX).is_some());
        assert_eq!(key_expires_in_secs(0, NOW), None);
        assert_eq!(key_expires_in_secs(NOW + 90_500, NOW), Some(90));
        assert_eq!(key_expires_in_secs(NOW - 5_000, NOW), Some(-5));
        assert_eq!(
            key_expires_in_secs(i64::MIN + 1, i64::MAX),
            Some(i64::MIN / 1000)
        );
    }
}
