//! The control protocol's version, and which versions talk to each other.
//! Pure: no I/O.
//!
//! A node sends the version it speaks in the request metadata [`HEADER`]
//! (`x-ztmesh-protocol: 1.1`) on every control call; the controller answers
//! with its own in the response metadata. A node that sends none speaks
//! [`Version::UNVERSIONED`] (1.0: release 0.1.0, which sent no version).
//!
//! A controller serves nodes of its own major version whose minor is
//! within one of its own ([`check`]), so controllers can be upgraded first
//! and nodes after. Anything else is refused with `FAILED_PRECONDITION` and
//! [`AuthReason::Incompatible`], naming both versions and what to upgrade;
//! a malformed header is `INVALID_ARGUMENT`.

use std::fmt;
use std::str::FromStr;

use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::refusal::{self, AuthReason};

/// Request and response metadata key carrying a [`Version`].
pub const HEADER: &str = "x-ztmesh-protocol";

/// A control protocol version, `MAJOR.MINOR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl Version {
    /// The version this build speaks. A change to the control protocol
    /// bumps the minor version; a controller still serves nodes one minor
    /// older and one newer, so only support for what is two minors old may
    /// go. A change even one minor cannot bridge bumps the major version.
    pub const CURRENT: Version = Version::new(1, 1);
    /// What a node that sends no version speaks (release 0.1.0).
    pub const UNVERSIONED: Version = Version::new(1, 0);

    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }

    /// The oldest and newest node versions a controller speaking `self`
    /// serves: its own major version, its minor ± 1.
    pub fn accepted(self) -> (Version, Version) {
        (
            Version::new(self.major, self.minor.saturating_sub(1)),
            Version::new(self.major, self.minor.saturating_add(1)),
        )
    }

    /// The header value.
    pub fn metadata(self) -> MetadataValue<tonic::metadata::Ascii> {
        self.to_string()
            .parse()
            .expect("digits and a dot are valid metadata")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A header value that is not `MAJOR.MINOR` (decimal, at most 5 digits each).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed {HEADER} header {0:?}: expected MAJOR.MINOR (e.g. 1.1)")]
pub struct MalformedVersion(pub String);

impl FromStr for Version {
    type Err = MalformedVersion;
    fn from_str(s: &str) -> Result<Self, MalformedVersion> {
        let bad = || MalformedVersion(s.chars().take(32).collect());
        let number = |p: &str| {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u16>().map_err(|_| bad())
        };
        let (major, minor) = s.split_once('.').ok_or_else(bad)?;
        Ok(Version::new(number(major)?, number(minor)?))
    }
}

/// Which side of an incompatible pair must be upgraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    Node,
    Controller,
}

/// A node version this controller does not serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incompatible {
    pub node: Version,
    pub controller: Version,
}

impl Incompatible {
    /// The older side is the one to upgrade.
    pub fn upgrade(&self) -> Upgrade {
        if self.node < self.controller {
            Upgrade::Node
        } else {
            Upgrade::Controller
        }
    }
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = self.controller.accepted();
        let which = match self.upgrade() {
            Upgrade::Node => "the node",
            Upgrade::Controller => "the controller",
        };
        write!(
            f,
            "node speaks control protocol {}; this controller ({}) accepts {lo} to {hi}: upgrade {which}",
            self.node, self.controller
        )
    }
}

impl std::error::Error for Incompatible {}

/// Whether a controller speaking `controller` serves a node speaking
/// `node`: the same major version, minor versions at most one apart.
///
/// # Errors
/// [`Incompatible`] otherwise.
pub fn check(node: Version, controller: Version) -> Result<(), Incompatible> {
    let (lo, hi) = controller.accepted();
    if (lo..=hi).contains(&node) && node.major == controller.major {
        Ok(())
    } else {
        Err(Incompatible { node, controller })
    }
}

/// Why the controller refuses a call's protocol version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The header is not a version: `INVALID_ARGUMENT`.
    #[error(transparent)]
    Malformed(#[from] MalformedVersion),
    /// A version this controller does not serve: `FAILED_PRECONDITION`.
    #[error(transparent)]
    Incompatible(#[from] Incompatible),
}

impl Refused {
    /// The status the controller answers with; it carries the
    /// controller's version too.
    pub fn status(&self, controller: Version) -> Status {
        let mut s = match self {
            Refused::Malformed(e) => Status::invalid_argument(e.to_string()),
            Refused::Incompatible(e) => {
                refusal::status(AuthReason::Incompatible, &e.to_string(), None)
            }
        };
        s.metadata_mut().insert(HEADER, controller.metadata());
        s
    }
}

/// What a controller speaking `controller` makes of a call whose [`HEADER`]
/// is `header` (`None`: absent, a 1.0 node): the node's version if served.
///
/// # Errors
/// [`Refused`].
pub fn negotiate(header: Option<&[u8]>, controller: Version) -> Result<Version, Refused> {
    let node = match header {
        None => Version::UNVERSIONED,
        Some(raw) => std::str::from_utf8(raw)
            .map_err(|_| MalformedVersion(String::from_utf8_lossy(raw).chars().take(32).collect()))?
            .parse()?,
    };
    check(node, controller)?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    #[test]
    fn a_controller_serves_its_major_and_minor_plus_or_minus_one() {
        let table = [
            // (node, controller, served)
            ("1.1", "1.2", true),
            ("1.2", "1.2", true),
            ("1.3", "1.2", true),
            ("1.0", "1.2", false),
            ("1.4", "1.2", false),
            ("0.2", "1.2", false),
            ("2.2", "1.2", false),
            ("2.0", "1.2", false),
            ("0.9", "1.0", false),
            ("1.0", "1.0", true),
            ("1.1", "1.0", true),
            ("1.2", "1.0", false),
            // This release serves today's nodes and the next minor.
            ("1.0", "1.1", true),
            ("1.2", "1.1", true),
            ("1.3", "1.1", false),
            ("2.0", "1.1", false),
            ("65535.65535", "65535.65535", true),
            ("1.65535", "1.65535", true),
            ("2.0", "1.65535", false),
        ];
        for (node, controller, served) in table {
            assert_eq!(
                check(v(node), v(controller)).is_ok(),
                served,
                "node {node}, controller {controller}"
            );
        }
    }

    #[test]
    fn a_refusal_names_both_versions_and_what_to_upgrade() {
        let e = check(v("1.0"), v("1.2")).unwrap_err();
        assert_eq!(e.upgrade(), Upgrade::Node);
        assert_eq!(
            e.to_string(),
            "node speaks control protocol 1.0; this controller (1.2) accepts 1.1 to 1.3: upgrade the node"
        );
        let e = check(v("2.0"), v("1.2")).unwrap_err();
        assert_eq!(e.upgrade(), Upgrade::Controller);
        assert_eq!(
            e.to_string(),
            "node speaks control protocol 2.0; this controller (1.2) accepts 1.1 to 1.3: upgrade the controller"
        );
        assert_eq!(
            check(v("0.9"), v("1.0")).unwrap_err().upgrade(),
            Upgrade::Node
        );
        assert_eq!(
            check(v("1.4"), v("1.2")).unwrap_err().upgrade(),
            Upgrade::Controller
        );
    }

    #[test]
    fn a_missing_header_is_the_first_release_and_a_bad_one_is_malformed() {
        assert_eq!(negotiate(None, Version::CURRENT), Ok(Version::new(1, 0)));
        assert_eq!(
            negotiate(Some(b"1.2"), Version::CURRENT),
            Ok(Version::new(1, 2))
        );
        for bad in [
            &b""[..],
            b"1",
            b"1.",
            b".1",
            b"1.1.1",
            b"+1.1",
            b"1.-1",
            b" 1.1",
            b"1.1 ",
            b"v1.1",
            b"1.99999",
            b"123456.1",
            b"one.two",
            b"\xff.1",
        ] {
            assert!(
                matches!(
                    negotiate(Some(bad), Version::CURRENT),
                    Err(Refused::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn refusal_statuses_carry_the_code_the_reason_and_the_controllers_version() {
        let controller = v("1.2");
        let s = negotiate(Some(b"1.0"), controller)
            .unwrap_err()
            .status(controller);
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("upgrade the node"), "{}", s.message());
        assert_eq!(
            refusal::refusal(&s).reason,
            Some(Ok(AuthReason::Incompatible))
        );
        assert_eq!(s.metadata().get(HEADER).unwrap(), "1.2");
        let s = negotiate(Some(b"garbage"), controller)
            .unwrap_err()
            .status(controller);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("garbage"), "{}", s.message());
        assert_eq!(refusal::refusal(&s).reason, None);
    }

    #[test]
    fn versions_print_as_they_parse() {
        for s in ["0.0", "1.1", "65535.0"] {
            assert_eq!(v(s).to_string(), s);
        }
        assert_eq!(Version::CURRENT.metadata(), "1.1");
        assert!(check(Version::UNVERSIONED, Version::CURRENT).is_ok());
    }
}
