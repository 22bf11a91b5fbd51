//! Device posture: attributes of a node, the conditions of the policy's
//! `postures` section, and their evaluation (pure: no I/O, no clock).
//!
//! Tailscale's syntax and semantics: a posture is a list of conditions, all
//! of which must hold; a rule's `srcPosture` (or, without one, the policy's
//! `defaultSrcPosture`) passes when any listed posture passes; an unset
//! attribute fails every condition except `NOT SET`; `<`, `<=`, `>`, `>=`
//! compare numbers, or versions (dotted numbers) when the literal is a
//! string.
//!
//! Attributes in the `node:` namespace are reported by the node itself
//! (self-asserted, advisory); `custom:` attributes are set by an admin
//! through the admin API (e.g. from an MDM) and are the ones to use for a
//! hard gate. A node whose report is stale (older than the controller's
//! posture TTL, or never received) fails every posture that has a
//! condition.

use std::collections::BTreeMap;
use std::fmt;

/// The value of a posture attribute.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttrValue {
    /// Text, e.g. `linux` or `1.2.3`.
    Str(String),
    /// A whole number.
    Int(i64),
    /// A flag.
    Bool(bool),
}

impl fmt::Display for AttrValue {
    /// As written in a condition: `'text'`, `42`, `true`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Str(s) => write!(f, "'{s}'"),
            AttrValue::Int(n) => write!(f, "{n}"),
            AttrValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// The type a known attribute's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrType {
    Str,
    Int,
    Bool,
}

/// The `node:` attributes a node reports about itself, with their types.
/// Anything else in the `node:` namespace is unknown (a policy error; a
/// report carrying it is clipped).
pub const NODE_ATTRIBUTES: &[(&str, AttrType)] = &[
    ("node:os", AttrType::Str),
    ("node:osDistro", AttrType::Str),
    ("node:osVersion", AttrType::Str),
    ("node:kernel", AttrType::Str),
    ("node:tsVersion", AttrType::Str),
    ("node:securityUpdates", AttrType::Int),
    ("node:daysSinceUpgrade", AttrType::Int),
    ("node:firewall", AttrType::Bool),
    ("node:diskEncrypted", AttrType::Bool),
];

/// What the policy knows of one node's posture.
///
/// `Default` is a node that never reported: no attributes, not fresh.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash)]
pub struct Attributes {
    /// `node:*` (reported) and `custom:*` (admin-set) attributes by key.
    pub values: BTreeMap<String, AttrValue>,
    /// Whether the node's last report is recent enough to be believed; a
    /// stale node fails every posture with a condition.
    pub fresh: bool,
}

/// The result of one posture for one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureCheck {
    /// `posture:name`.
    pub name: String,
    pub passed: bool,
    /// Empty when passed; else the first failing condition and the value
    /// seen, e.g. `custom:compliant == true: seen false (set by an admin)`,
    /// `node:osVersion >= '12': seen '11' (reported by the node, advisory)`,
    /// `node:firewall == true: not set`, or `posture report is stale`.
    pub detail: String,
}
