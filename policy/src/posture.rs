//! Device posture: attributes of a node, the conditions of the policy's
//! `postures` section (grammar, type checks against [`NODE_ATTRIBUTES`])
//! and their evaluation (pure: no I/O, no clock).
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

use std::cmp::Ordering;
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
    /// `node:firewall == true: not set`, or, for a stale report, `no fresh
    /// posture report from the node (never sent, or expired): ...`.
    pub detail: String,
}

/// Longest condition string, in bytes.
pub const MAX_CONDITION_BYTES: usize = 1024;
/// Most conditions in one posture.
pub const MAX_CONDITIONS: usize = 64;
/// Most postures in one policy.
pub const MAX_POSTURES: usize = 256;
/// Most items in an `IN` / `NOT IN` list.
pub const MAX_LIST_ITEMS: usize = 64;
/// Most dotted components of a version literal (`'1.2.3'` has three).
pub const MAX_VERSION_COMPONENTS: usize = 8;
/// Longest `NAME` of a `custom:NAME` attribute.
pub const MAX_CUSTOM_NAME: usize = 64;
/// Longest text value of an attribute, in bytes: longer text is refused
/// by [`parse_custom_attribute`] and [`check_node_attribute`].
pub const MAX_ATTR_VALUE_LEN: usize = 256;

/// The type of the `node:` attribute `key`, or `None` if ztmesh nodes do
/// not report it.
pub fn node_attribute_type(key: &str) -> Option<AttrType> {
    NODE_ATTRIBUTES
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, t)| *t)
}

/// Checks one attribute of a node's report: a known `node:` key, a value
/// of its type, text no longer than [`MAX_ATTR_VALUE_LEN`] and without
/// control characters.
///
/// # Errors
/// Why the attribute cannot be kept, e.g. `"node:colour": unknown attribute`
/// (untrusted keys are quoted, clipped and escaped).
pub fn check_node_attribute(key: &str, value: &AttrValue) -> Result<(), String> {
    let Some(ty) = node_attribute_type(key) else {
        return Err(format!("{}: unknown attribute", shown_text(key)));
    };
    if AttrType::of(value) != ty {
        return Err(format!(
            "{key}: holds {}, not {}",
            ty.describe(),
            AttrType::of(value).describe()
        ));
    }
    if let AttrValue::Str(s) = value {
        check_text_value(s).map_err(|e| format!("{key}: {e}"))?;
    }
    Ok(())
}

/// Parses an admin's `custom:NAME=VALUE` assignment (admin API and CLI):
/// `true`/`false` (any case) is a flag, a decimal integer (optional sign)
/// a number, anything else text.
///
/// # Errors
/// A key outside `custom:` (`node:` attributes are reported by the node
/// itself), an invalid name, an empty value, an integer out of range, or
/// text longer than [`MAX_ATTR_VALUE_LEN`] bytes or with control characters.
pub fn parse_custom_attribute(key: &str, value: &str) -> Result<AttrValue, String> {
    if key.starts_with("node:") {
        return Err(format!(
            "{} is reported by the node itself; an admin sets custom:NAME attributes",
            shown_text(key)
        ));
    }
    attribute_type(key)?;
    if value.is_empty() {
        return Err(format!(
            "empty value for {key}: to remove the attribute, unset it"
        ));
    }
    if value.eq_ignore_ascii_case("true") {
        return Ok(AttrValue::Bool(true));
    }
    if value.eq_ignore_ascii_case("false") {
        return Ok(AttrValue::Bool(false));
    }
    if is_integer(value) {
        return value
            .parse::<i64>()
            .map(AttrValue::Int)
            .map_err(|_| format!("{} is out of range for a number attribute", clip(value)));
    }
    check_text_value(value)?;
    Ok(AttrValue::Str(value.to_string()))
}

/// Compares two versions by their leading dotted-number parts: `6.1.0-18-amd64`
/// is `6.1.0`, `1.40` equals `1.40.0`, components compare as numbers of
/// any length (`1.10 > 1.9`).
///
/// `None` when either string does not start with a digit, so it is no
/// version at all.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let a = leading_version(a)?;
    let b = leading_version(b)?;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or("0");
        let y = b.get(i).copied().unwrap_or("0");
        match compare_digits(x, y) {
            Ordering::Equal => {}
            other => return Some(other),
        }
    }
    Some(Ordering::Equal)
}

impl AttrType {
    fn of(value: &AttrValue) -> AttrType {
        match value {
            AttrValue::Str(_) => AttrType::Str,
            AttrValue::Int(_) => AttrType::Int,
            AttrValue::Bool(_) => AttrType::Bool,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            AttrType::Str => "text",
            AttrType::Int => "a number",
            AttrType::Bool => "a flag (true or false)",
        }
    }
}

/// A named posture of the policy's `postures` section: all of its
/// conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Posture {
    /// `posture:NAME`.
    pub name: String,
    pub conditions: Vec<Condition>,
}

/// What a node whose report is stale (or missing) sees for every posture
/// with a condition.
const STALE: &str =
    "posture report is stale (none within the posture TTL, or never sent): every posture fails until the node reports again";

impl Posture {
    /// This posture's result for a node with `attrs`: the first failing
    /// condition and the value seen, or a stale report.
    pub fn check(&self, attrs: &Attributes) -> PostureCheck {
        let detail = self.failure(attrs).unwrap_or_default();
        PostureCheck {
            name: self.name.clone(),
            passed: detail.is_empty(),
            detail,
        }
    }

    /// Whether a node with `attrs` passes: a posture without conditions
    /// passes for everyone, even without a fresh report.
    pub fn passes(&self, attrs: &Attributes) -> bool {
        self.conditions.is_empty()
            || (attrs.fresh && self.conditions.iter().all(|c| c.eval(attrs).is_ok()))
    }

    /// Whether every node passes (the posture has no conditions).
    pub fn is_open(&self) -> bool {
        self.conditions.is_empty()
    }

    fn failure(&self, attrs: &Attributes) -> Option<String> {
        if self.conditions.is_empty() {
            return None;
        }
        if !attrs.fresh {
            return Some(STALE.to_string());
        }
        self.conditions.iter().find_map(|c| c.eval(attrs).err())
    }
}

/// One condition, e.g. `node:os IN ['linux', 'macos']`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Condition {
    /// As written, whitespace runs folded to one space (for details).
    text: String,
    key: String,
    test: Test,
}

/// What a condition requires of the attribute's value. Types were checked
/// at parse time against the attribute's known type (`node:`) and within
/// lists; values of another type fail at evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Test {
    Eq(AttrValue),
    Ne(AttrValue),
    In(Vec<AttrValue>),
    NotIn(Vec<AttrValue>),
    /// `<`, `<=`, `>`, `>=` against a number, or against a version (a
    /// validated `Str` of dotted numbers). Holds when the comparison of
    /// value to literal is one of the orderings.
    Order(Sym, AttrValue),
    IsSet,
    NotSet,
}

/// A comparison operator token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sym {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Sym {
    fn admits(self, o: Ordering) -> bool {
        match self {
            Sym::Eq => o == Ordering::Equal,
            Sym::Ne => o != Ordering::Equal,
            Sym::Lt => o == Ordering::Less,
            Sym::Le => o != Ordering::Greater,
            Sym::Gt => o == Ordering::Greater,
            Sym::Ge => o != Ordering::Less,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Sym::Eq => "==",
            Sym::Ne => "!=",
            Sym::Lt => "<",
            Sym::Le => "<=",
            Sym::Gt => ">",
            Sym::Ge => ">=",
        }
    }
}

/// A condition that does not parse: where (a character offset into the
/// condition) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConditionError {
    pub offset: usize,
    pub message: String,
}

/// Parses one condition of a posture.
///
/// # Errors
/// The first problem, with the character offset of the offending token.
pub(crate) fn parse_condition(text: &str) -> Result<Condition, ConditionError> {
    if text.len() > MAX_CONDITION_BYTES {
        return Err(ConditionError {
            offset: 0,
            message: format!("condition is longer than {MAX_CONDITION_BYTES} bytes"),
        });
    }
    let tokens = lex(text)?;
    let mut p = Parser {
        tokens,
        i: 0,
        end: text.chars().count(),
    };
    let (key_at, key) =
        match p.next() {
            Some((at, Tok::Word(w))) => (at, w),
            Some((at, _)) => {
                return Err(p.error_at(
                    at,
                    "a condition starts with an attribute, e.g. node:os == 'linux'",
                ))
            }
            None => return Err(p.error_at(
                0,
                "empty condition: write one like node:os == 'linux' or custom:compliant == true",
            )),
        };
    let ty = attribute_type(&key).map_err(|m| p.error_at(key_at, m))?;
    let test = p.test(&key, ty)?;
    if let Some((at, _)) = p.next() {
        return Err(p.error_at(
            at,
            "unexpected text after the condition: write one condition per string (a posture's conditions must all hold)",
        ));
    }
    Ok(Condition {
        text: text.split_whitespace().collect::<Vec<_>>().join(" "),
        key,
        test,
    })
}

/// The known type of an attribute key (`None` for `custom:` keys, which
/// hold any type).
///
/// # Errors
/// An unknown `node:` attribute, an invalid `custom:` name, another
/// namespace, or no namespace at all.
pub(crate) fn attribute_type(key: &str) -> Result<Option<AttrType>, String> {
    if let Some(name) = key.strip_prefix("node:") {
        if let Some(t) = node_attribute_type(key) {
            return Ok(Some(t));
        }
        let known: Vec<&str> = NODE_ATTRIBUTES.iter().map(|(k, _)| *k).collect();
        let hint = NODE_ATTRIBUTES
            .iter()
            .find(|(k, _)| k["node:".len()..].eq_ignore_ascii_case(name))
            .map_or(String::new(), |(k, _)| format!(" (did you mean {k}?)"));
        return Err(format!(
            "unknown attribute {}{hint}: ztmesh nodes report {}",
            shown_text(key),
            known.join(", ")
        ));
    }
    if let Some(name) = key.strip_prefix("custom:") {
        let valid = !name.is_empty()
            && name.len() <= MAX_CUSTOM_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
        return if valid {
            Ok(None)
        } else {
            Err(format!(
                "invalid attribute name {}: custom:NAME takes 1-{MAX_CUSTOM_NAME} letters, digits, '-' or '_'",
                shown_text(key)
            ))
        };
    }
    match key.split_once(':') {
        Some((ns, _)) => Err(format!(
            "attribute namespace {} is not available in ztmesh: use node:* (reported by the node) or custom:* (set by an admin)",
            shown_text(&format!("{ns}:"))
        )),
        None => Err(format!(
            "expected an attribute (node:NAME or custom:NAME), found {}",
            shown_text(key)
        )),
    }
}

impl Condition {
    /// `Ok` when the condition holds for `attrs` (freshness is the
    /// posture's business); else the detail: the condition as written,
    /// the value seen and where it came from.
    fn eval(&self, attrs: &Attributes) -> Result<(), String> {
        let Some(value) = attrs.values.get(&self.key) else {
            return match self.test {
                Test::NotSet => Ok(()),
                _ => Err(format!("{}: not set", self.text)),
            };
        };
        let fail = |note: &str| {
            let provenance = if self.key.starts_with("node:") {
                "(reported by the node, advisory)"
            } else {
                "(set by an admin)"
            };
            let mut d = format!("{}: seen {} {provenance}", self.text, shown(value));
            if !note.is_empty() {
                d.push_str(", ");
                d.push_str(note);
            }
            Err(d)
        };
        let mismatch = |lit: &AttrValue| {
            format!(
                "which is {}, not {}",
                AttrType::of(value).describe(),
                AttrType::of(lit).describe()
            )
        };
        let same = |lit: &AttrValue| AttrType::of(lit) == AttrType::of(value);
        match &self.test {
            Test::IsSet => Ok(()),
            Test::NotSet => fail(""),
            Test::Eq(lit) | Test::Ne(lit) if !same(lit) => fail(&mismatch(lit)),
            Test::Eq(lit) if value == lit => Ok(()),
            Test::Ne(lit) if value != lit => Ok(()),
            Test::Eq(_) | Test::Ne(_) => fail(""),
            Test::In(list) | Test::NotIn(list) => {
                // Lists are non-empty and of one type (checked at parse time).
                if !list.first().is_some_and(same) {
                    return match list.first() {
                        Some(lit) => fail(&mismatch(lit)),
                        None => fail(""),
                    };
                }
                let found = list.contains(value);
                if found == matches!(self.test, Test::In(_)) {
                    Ok(())
                } else {
                    fail("")
                }
            }
            Test::Order(sym, lit) => {
                let ordering = match (value, lit) {
                    (AttrValue::Int(v), AttrValue::Int(l)) => v.cmp(l),
                    (AttrValue::Str(v), AttrValue::Str(l)) => match compare_versions(v, l) {
                        Some(o) => o,
                        None => return fail("which is not a version (dotted numbers)"),
                    },
                    _ => return fail(&mismatch(lit)),
                };
                if sym.admits(ordering) {
                    Ok(())
                } else {
                    fail("")
                }
            }
        }
    }
}

/// A token of a condition.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An attribute key or a keyword (`IN`, `NOT`, `IS`, `SET`, `true`).
    Word(String),
    Str(String),
    Int(i64),
    Op(Sym),
    Open,
    Close,
    Comma,
}

/// Splits a condition into tokens, each with its character offset.
fn lex(text: &str) -> Result<Vec<(usize, Tok)>, ConditionError> {
    let chars: Vec<char> = text.chars().collect();
    let err = |offset: usize, message: String| ConditionError { offset, message };
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let start = i;
        let next = chars.get(i + 1).copied();
        let tok = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            // Any letter, so that `custom:é` is reported as a bad name.
            c if c.is_alphabetic() => {
                while chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'))
                {
                    i += 1;
                }
                Tok::Word(chars[start..i].iter().collect())
            }
            c if c.is_ascii_digit()
                || (matches!(c, '+' | '-') && next.is_some_and(|d| d.is_ascii_digit())) =>
            {
                i += 1;
                while chars.get(i).is_some_and(char::is_ascii_digit) {
                    i += 1;
                }
                if chars
                    .get(i)
                    .is_some_and(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | ':'))
                {
                    let word: String = chars[start..]
                        .iter()
                        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ']'))
                        .take(40)
                        .collect();
                    return Err(err(
                        start,
                        format!(
                            "unquoted value {}: quote text and versions, e.g. '1.40'",
                            shown_text(&word)
                        ),
                    ));
                }
                let digits: String = chars[start..i].iter().collect();
                match digits.parse::<i64>() {
                    Ok(n) => Tok::Int(n),
                    Err(_) => {
                        return Err(err(
                            start,
                            format!("number {digits} is out of range (64-bit signed integers)"),
                        ))
                    }
                }
            }
            '\'' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match chars.get(i) {
                        None => {
                            return Err(err(
                                start,
                                "unterminated string: a closing ' is missing".to_string(),
                            ))
                        }
                        Some('\'') => break,
                        Some('\\') => {
                            return Err(err(
                                i,
                                "backslash escapes are not supported in posture strings"
                                    .to_string(),
                            ))
                        }
                        Some(c) if c.is_control() => {
                            return Err(err(i, "control character in a string".to_string()))
                        }
                        Some(c) => s.push(*c),
                    }
                    i += 1;
                }
                i += 1;
                Tok::Str(s)
            }
            '"' => {
                return Err(err(
                    start,
                    "strings in conditions take single quotes, e.g. 'linux'".to_string(),
                ))
            }
            '=' | '!' | '<' | '>' => {
                let eq = next == Some('=');
                i += 1 + usize::from(eq);
                match (c, eq) {
                    ('=', true) => Tok::Op(Sym::Eq),
                    ('!', true) => Tok::Op(Sym::Ne),
                    ('<', false) => Tok::Op(Sym::Lt),
                    ('<', true) => Tok::Op(Sym::Le),
                    ('>', false) => Tok::Op(Sym::Gt),
                    ('>', true) => Tok::Op(Sym::Ge),
                    ('=', false) => {
                        return Err(err(start, "write '==' to compare for equality".to_string()))
                    }
                    _ => {
                        return Err(err(
                            start,
                            "'!' alone is not an operator: write '!=' or NOT IN".to_string(),
                        ))
                    }
                }
            }
            '[' => {
                i += 1;
                Tok::Open
            }
            ']' => {
                i += 1;
                Tok::Close
            }
            ',' => {
                i += 1;
                Tok::Comma
            }
            other => return Err(err(start, format!("unexpected character {other:?}"))),
        };
        out.push((start, tok));
    }
    Ok(out)
}

/// Recursive-descent parser over the tokens of one condition.
struct Parser {
    tokens: Vec<(usize, Tok)>,
    i: usize,
    /// Offset just past the condition, for "missing X at the end".
    end: usize,
}

impl Parser {
    fn next(&mut self) -> Option<(usize, Tok)> {
        let t = self.tokens.get(self.i).cloned();
        self.i += usize::from(t.is_some());
        t
    }

    fn error_at(&self, offset: usize, message: impl Into<String>) -> ConditionError {
        ConditionError {
            offset,
            message: message.into(),
        }
    }

    /// Everything after the attribute key.
    fn test(&mut self, key: &str, ty: Option<AttrType>) -> Result<Test, ConditionError> {
        let ops = "==, !=, <, <=, >, >=, IN, NOT IN, IS SET or NOT SET";
        let Some((at, tok)) = self.next() else {
            // Bare `custom:flag` means `custom:flag == true`.
            return match ty {
                None | Some(AttrType::Bool) => Ok(Test::Eq(AttrValue::Bool(true))),
                Some(t) => Err(self.error_at(
                    self.end,
                    format!(
                        "{key} holds {}: a bare attribute means == true, so give an operator ({ops})",
                        t.describe()
                    ),
                )),
            };
        };
        let word = |w: &str, kw: &str| w.eq_ignore_ascii_case(kw);
        match tok {
            Tok::Op(sym) => {
                let (lit_at, lit) = self.literal(key)?;
                match sym {
                    Sym::Eq | Sym::Ne => {
                        check_type(key, ty, &lit).map_err(|m| self.error_at(lit_at, m))?;
                        Ok(if sym == Sym::Eq {
                            Test::Eq(lit)
                        } else {
                            Test::Ne(lit)
                        })
                    }
                    _ => {
                        self.check_order(key, ty, sym, &lit, lit_at)?;
                        Ok(Test::Order(sym, lit))
                    }
                }
            }
            Tok::Word(w) if word(&w, "in") => Ok(Test::In(self.list(key, ty)?)),
            Tok::Word(w) if word(&w, "not") => match self.next() {
                Some((_, Tok::Word(w))) if word(&w, "in") => Ok(Test::NotIn(self.list(key, ty)?)),
                Some((_, Tok::Word(w))) if word(&w, "set") => Ok(Test::NotSet),
                Some((at, _)) => Err(self.error_at(at, "expected IN or SET after NOT")),
                None => Err(self.error_at(self.end, "expected IN or SET after NOT")),
            },
            Tok::Word(w) if word(&w, "is") => match self.next() {
                Some((_, Tok::Word(w))) if word(&w, "set") => Ok(Test::IsSet),
                Some((at, Tok::Word(w))) if word(&w, "not") => {
                    Err(self.error_at(at, format!("write {key} NOT SET (not IS NOT SET)")))
                }
                Some((at, _)) => Err(self.error_at(at, "expected SET after IS")),
                None => Err(self.error_at(self.end, "expected SET after IS")),
            },
            _ => Err(self.error_at(at, format!("expected an operator after {key}: {ops}"))),
        }
    }

    fn literal(&mut self, key: &str) -> Result<(usize, AttrValue), ConditionError> {
        let expected = "expected a value: 'text', a number, true or false";
        match self.next() {
            Some((at, Tok::Str(s))) => Ok((at, AttrValue::Str(s))),
            Some((at, Tok::Int(n))) => Ok((at, AttrValue::Int(n))),
            Some((at, Tok::Word(w))) if w.eq_ignore_ascii_case("true") => {
                Ok((at, AttrValue::Bool(true)))
            }
            Some((at, Tok::Word(w))) if w.eq_ignore_ascii_case("false") => {
                Ok((at, AttrValue::Bool(false)))
            }
            Some((at, Tok::Word(w))) => Err(self.error_at(
                at,
                format!(
                    "{expected}; found {} (quote text: '{}')",
                    shown_text(&w),
                    clip(&w)
                ),
            )),
            Some((at, _)) => Err(self.error_at(at, expected)),
            None => Err(self.error_at(self.end, format!("{expected} after {key}"))),
        }
    }

    /// `[lit, lit, ...]`: non-empty, at most [`MAX_LIST_ITEMS`], one type.
    fn list(&mut self, key: &str, ty: Option<AttrType>) -> Result<Vec<AttrValue>, ConditionError> {
        match self.next() {
            Some((_, Tok::Open)) => {}
            Some((at, _)) => {
                return Err(self.error_at(at, "expected a list, e.g. ['linux', 'macos']"))
            }
            None => {
                return Err(self.error_at(
                    self.end,
                    "expected a list after IN, e.g. ['linux', 'macos']",
                ))
            }
        }
        let mut items: Vec<AttrValue> = Vec::new();
        loop {
            if let Some((at, Tok::Close)) = self.tokens.get(self.i).cloned() {
                self.i += 1;
                if items.is_empty() {
                    return Err(self.error_at(at, "empty list: name at least one value"));
                }
                return Ok(items);
            }
            let (at, lit) = self.literal(key)?;
            if items.len() == MAX_LIST_ITEMS {
                return Err(self.error_at(at, format!("too many values: at most {MAX_LIST_ITEMS}")));
            }
            check_type(key, ty, &lit).map_err(|m| self.error_at(at, m))?;
            if let Some(first) = items.first() {
                if AttrType::of(first) != AttrType::of(&lit) {
                    return Err(self.error_at(
                        at,
                        format!(
                            "list values must all have one type: {} is {}, the first is {}",
                            shown(&lit),
                            AttrType::of(&lit).describe(),
                            AttrType::of(first).describe()
                        ),
                    ));
                }
            }
            items.push(lit);
            match self.next() {
                Some((_, Tok::Comma)) => {}
                Some((_, Tok::Close)) => return Ok(items),
                Some((at, _)) => return Err(self.error_at(at, "expected ',' or ']' in the list")),
                None => return Err(self.error_at(self.end, "unterminated list: a ']' is missing")),
            }
        }
    }

    /// Ordering takes a number (for number attributes) or a version (for
    /// text attributes); flags have no order.
    fn check_order(
        &self,
        key: &str,
        ty: Option<AttrType>,
        sym: Sym,
        lit: &AttrValue,
        at: usize,
    ) -> Result<(), ConditionError> {
        let op = sym.text();
        if ty == Some(AttrType::Bool) {
            return Err(self.error_at(
                at,
                format!("{key} is a flag: flags have no order; use == or !="),
            ));
        }
        match lit {
            AttrValue::Bool(_) => Err(self.error_at(
                at,
                format!("true and false have no order: use == or != instead of {op}"),
            )),
            AttrValue::Str(text) if !is_version_literal(text) => Err(self.error_at(
                at,
                format!(
                    "{} is not a version: {op} takes a number or a version of 1-{MAX_VERSION_COMPONENTS} dotted numbers, e.g. '1.40'",
                    shown(lit)
                ),
            )),
            _ => check_type(key, ty, lit).map_err(|m| self.error_at(at, m)),
        }
    }
}

/// A literal of the wrong type for a `node:` attribute is an error.
fn check_type(key: &str, ty: Option<AttrType>, lit: &AttrValue) -> Result<(), String> {
    match ty {
        Some(t) if t != AttrType::of(lit) => Err(format!(
            "{key} holds {}, but {} is {}",
            t.describe(),
            shown(lit),
            AttrType::of(lit).describe()
        )),
        _ => Ok(()),
    }
}

/// A version literal: 1-8 components of ASCII digits, each fitting a u64.
fn is_version_literal(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= MAX_VERSION_COMPONENTS
        && parts.iter().all(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u64>().is_ok()
        })
}

/// The leading dotted-number part of `s` as digit strings, or `None` when
/// `s` does not start with a digit.
fn leading_version(s: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let n = rest.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            break;
        }
        parts.push(&rest[..n]);
        rest = &rest[n..];
        match rest.strip_prefix('.') {
            Some(r) if r.starts_with(|c: char| c.is_ascii_digit()) => rest = r,
            _ => break,
        }
    }
    (!parts.is_empty()).then_some(parts)
}

/// Compares two strings of ASCII digits as numbers of any length.
fn compare_digits(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

fn is_integer(s: &str) -> bool {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// An attribute's text: at most [`MAX_ATTR_VALUE_LEN`] bytes, no control characters.
fn check_text_value(s: &str) -> Result<(), String> {
    if s.len() > MAX_ATTR_VALUE_LEN {
        return Err(format!("value is longer than {MAX_ATTR_VALUE_LEN} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err("value holds a control character".to_string());
    }
    Ok(())
}

/// Longest piece of untrusted text quoted in a message, in characters.
const SHOWN_CHARS: usize = 64;

/// Untrusted text for a message: clipped, control characters escaped.
fn clip(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == SHOWN_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A key or other name from the input, quoted and clipped.
fn shown_text(s: &str) -> String {
    format!("\"{}\"", clip(s))
}

/// A value as written in a condition (`'text'`, `42`, `true`), clipped.
fn shown(v: &AttrValue) -> String {
    match v {
        AttrValue::Str(s) => format!("'{}'", clip(s)),
        other => other.to_string(),
    }
}
