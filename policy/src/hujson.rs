//! HuJSON (JSON with comments and trailing commas) parser that records the
//! line and column of every key and value (pure: no I/O).
//!
//! The grammar is standard JSON (RFC 8259) plus `//` line comments, `/* */`
//! block comments and one optional trailing comma before `]` or `}`, as in
//! Tailscale's `hujson` package. Nothing JSON5-like is accepted: no single
//! quotes, no unquoted keys, no hex numbers, no missing commas.

use std::collections::HashSet;

use crate::error::Pos;

/// Nesting deeper than this is rejected, so that hostile input cannot
/// overflow the stack (policy files nest four levels deep).
const MAX_DEPTH: usize = 64;

/// A parsed value together with the position of its first character.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    pub pos: Pos,
    pub kind: Kind,
}

/// The JSON value kinds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool),
    /// The number's source text; the policy grammar never needs its value.
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Members in source order; duplicates are rejected by the parser.
    Object(Vec<Member>),
}

/// One `"key": value` pair of an object.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Member {
    pub key: String,
    pub key_pos: Pos,
    pub value: Value,
}

/// A syntax error: where and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

impl Kind {
    /// The kind's name for "expected X, found Y" messages.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "boolean",
            Kind::Number(_) => "number",
            Kind::String(_) => "string",
            Kind::Array(_) => "array",
            Kind::Object(_) => "object",
        }
    }
}

/// Parses a whole document.
///
/// Returns `Ok(None)` for a document that holds only whitespace and comments.
///
/// # Errors
/// The first syntax error; the parser does not try to recover, because a
/// guess at the intended structure would produce misleading follow-up errors.
pub(crate) fn parse(text: &str) -> Result<Option<Value>, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
    };
    p.skip_trivia()?;
    if p.peek().is_none() {
        return Ok(None);
    }
    let value = p.value(0)?;
    p.skip_trivia()?;
    if p.peek().is_some() {
        return Err(p.error_here("unexpected content after the end of the document"));
    }
    Ok(Some(value))
}

struct Parser {
    chars: Vec<char>,
    i: usize,
    line: u32,
    col: u32,
}

impl Parser {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            col: self.col,
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn peek2(&self) -> Option<char> {
        self.chars.get(self.i + 1).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn error_at(pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos,
            message: message.into(),
        }
    }

    fn error_here(&self, message: impl Into<String>) -> SyntaxError {
        Self::error_at(self.pos(), message)
    }

    fn describe_here(&self) -> String {
        match self.peek() {
            None => "end of file".to_string(),
            Some(c) => format!("{c:?}"),
        }
    }

    /// Skips whitespace and comments.
    fn skip_trivia(&mut self) -> Result<(), SyntaxError> {
        loop {
            match (self.peek(), self.peek2()) {
                (Some(' ' | '\t' | '\n' | '\r'), _) => {
                    self.bump();
                }
                (Some('/'), Some('/')) => {
                    while let Some(c) = self.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                (Some('/'), Some('*')) => {
                    let start = self.pos();
                    self.bump();
                    self.bump();
                    loop {
                        match (self.peek(), self.peek2()) {
                            (Some('*'), Some('/')) => {
                                self.bump();
                                self.bump();
                                break;
                            }
                            (Some(_), _) => {
                                self.bump();
                            }
                            (None, _) => {
                                return Err(Self::error_at(start, "unterminated block comment"))
                            }
                        }
                    }
                }
                (Some('/'), _) => {
                    return Err(self.error_here("unexpected '/'; comments start with // or /*"))
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        let pos = self.pos();
        let kind = match self.peek() {
            Some('{') => {
                self.check_depth(depth)?;
                self.object(depth)?
            }
            Some('[') => {
                self.check_depth(depth)?;
                self.array(depth)?
            }
            Some('"') => Kind::String(self.string()?),
            Some('-' | '0'..='9') => Kind::Number(self.number()?),
            Some(c) if c.is_ascii_alphabetic() => self.literal()?,
            _ => {
                return Err(
                    self.error_here(format!("expected a value, found {}", self.describe_here()))
                )
            }
        };
        Ok(Value { pos, kind })
    }

    fn check_depth(&self, depth: usize) -> Result<(), SyntaxError> {
        if depth >= MAX_DEPTH {
            return Err(self.error_here(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn literal(&mut self) -> Result<Kind, SyntaxError> {
        let pos = self.pos();
        let mut word = String::new();
        while let Some(c) = self.peek() {
            if !c.is_ascii_alphanumeric() && c != '_' {
                break;
            }
            word.push(c);
            self.bump();
        }
        match word.as_str() {
            "true" => Ok(Kind::Bool(true)),
            "false" => Ok(Kind::Bool(false)),
            "null" => Ok(Kind::Null),
            _ => Err(Self::error_at(
                pos,
                format!("expected a value, found `{word}` (keys and strings need double quotes)"),
            )),
        }
    }

    fn number(&mut self) -> Result<String, SyntaxError> {
        let pos = self.pos();
        let mut s = String::new();
        let bad = |s: &str| Self::error_at(pos, format!("invalid number `{s}`"));
        if self.peek() == Some('-') {
            s.push('-');
            self.bump();
        }
        match self.peek() {
            Some('0') => {
                s.push('0');
                self.bump();
            }
            Some('1'..='9') => self.digits(&mut s),
            _ => return Err(bad(&s)),
        }
        if self.peek() == Some('.') {
            s.push('.');
            self.bump();
            if !matches!(self.peek(), Some('0'..='9')) {
                return Err(bad(&s));
            }
            self.digits(&mut s);
        }
        if let Some(e @ ('e' | 'E')) = self.peek() {
            s.push(e);
            self.bump();
            if let Some(sign @ ('+' | '-')) = self.peek() {
                s.push(sign);
                self.bump();
            }
            if !matches!(self.peek(), Some('0'..='9')) {
                return Err(bad(&s));
            }
            self.digits(&mut s);
        }
        if matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric()) {
            return Err(self.error_here(format!("unexpected {} in number", self.describe_here())));
        }
        Ok(s)
    }

    fn digits(&mut self, s: &mut String) {
        while let Some(c @ '0'..='9') = self.peek() {
            s.push(c);
            self.bump();
        }
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump(); // opening quote
        let mut out = String::new();
        loop {
            let here = self.pos();
            match self.bump() {
                None => return Err(Self::error_at(start, "unterminated string")),
                Some('"') => return Ok(out),
                Some('\\') => {
                    let c = match self.bump() {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('/') => '/',
                        Some('b') => '\u{8}',
                        Some('f') => '\u{c}',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some('u') => self.unicode_escape(here)?,
                        _ => return Err(Self::error_at(here, "invalid escape sequence")),
                    };
                    out.push(c);
                }
                Some(c) if (c as u32) < 0x20 => {
                    return Err(Self::error_at(
                        here,
                        "control character in string (use an escape)",
                    ));
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn hex4(&mut self, at: Pos) -> Result<u32, SyntaxError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = self
                .bump()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| Self::error_at(at, "invalid \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn unicode_escape(&mut self, at: Pos) -> Result<char, SyntaxError> {
        let hi = self.hex4(at)?;
        let code = if (0xd800..0xdc00).contains(&hi) {
            if self.bump() != Some('\\') || self.bump() != Some('u') {
                return Err(Self::error_at(at, "unpaired surrogate in \\u escape"));
            }
            let lo = self.hex4(at)?;
            if !(0xdc00..0xe000).contains(&lo) {
                return Err(Self::error_at(at, "unpaired surrogate in \\u escape"));
            }
            0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| Self::error_at(at, "unpaired surrogate in \\u escape"))
    }

    fn array(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.bump(); // '['
        let mut items = Vec::new();
        loop {
            self.skip_trivia()?;
            if self.peek() == Some(']') {
                self.bump();
                return Ok(Kind::Array(items));
            }
            items.push(self.value(depth + 1)?);
            self.skip_trivia()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => {
                    return Err(self.error_here(format!(
                        "expected ',' or ']' in array, found {}",
                        self.describe_here()
                    )))
                }
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Kind, SyntaxError> {
        self.bump(); // '{'
        let mut members: Vec<Member> = Vec::new();
        // A set, not a scan of `members`: hostile input may hold many keys.
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            self.skip_trivia()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Kind::Object(members));
                }
                Some('"') => {}
                _ => {
                    return Err(self.error_here(format!(
                        "expected a double-quoted key or '}}', found {}",
                        self.describe_here()
                    )))
                }
            }
            let key_pos = self.pos();
            let key = self.string()?;
            if !seen.insert(key.clone()) {
                return Err(Self::error_at(key_pos, format!("duplicate key {key:?}")));
            }
            self.skip_trivia()?;
            if self.peek() != Some(':') {
                return Err(self.error_here(format!(
                    "expected ':' after key, found {}",
                    self.describe_here()
                )));
            }
            self.bump();
            self.skip_trivia()?;
            let value = self.value(depth + 1)?;
            members.push(Member {
                key,
                key_pos,
                value,
            });
            self.skip_trivia()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => {
                    return Err(self.error_here(format!(
                        "expected ',' or '}}' in object, found {}",
                        self.describe_here()
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Value {
        parse(text).expect("valid").expect("non-empty")
    }

    fn err(text: &str) -> String {
        let e = parse(text).expect_err("invalid");
        format!("{}:{}: {}", e.pos.line, e.pos.col, e.message)
    }

    #[test]
    fn empty_and_comment_only_documents_are_none() {
        for text in ["", "  \n\t", "// nothing\n", "/* a */ /* b */", "\u{feff}"] {
            assert_eq!(parse(text), Ok(None), "{text:?}");
        }
    }

    #[test]
    fn accepts_comments_and_trailing_commas() {
        let v = ok("{ // c\n \"a\": [1, 2, /* x */ 3,], /* y */\n \"b\": {\"c\": true,},\n}");
        let Kind::Object(members) = v.kind else {
            panic!("object expected")
        };
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].key, "a");
        assert_eq!(members[0].key_pos, Pos { line: 2, col: 2 });
        assert_eq!(members[1].key_pos, Pos { line: 3, col: 2 });
        let Kind::Array(items) = &members[0].value.kind else {
            panic!("array expected")
        };
        assert_eq!(items.len(), 3);
        assert_eq!(items[2].pos, Pos { line: 2, col: 22 });
    }

    #[test]
    fn strings_keep_comment_markers_and_decode_escapes() {
        let v = ok(r#"["https://x/*y*/,}", "a\"b\\c\u00e9\ud83d\ude00\n"]"#);
        assert_eq!(
            v.kind,
            Kind::Array(vec![
                Value {
                    pos: Pos { line: 1, col: 2 },
                    kind: Kind::String("https://x/*y*/,}".into())
                },
                Value {
                    pos: Pos { line: 1, col: 22 },
                    kind: Kind::String("a\"b\\c\u{e9}\u{1f600}\n".into())
                },
            ])
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let v = ok("[\"é\", 1]");
        let Kind::Array(items) = v.kind else {
            panic!("array expected")
        };
        assert_eq!(items[1].pos, Pos { line: 1, col: 7 });
    }

    #[test]
    fn numbers_and_literals() {
        assert_eq!(ok("-1.5e3").kind, Kind::Number("-1.5e3".into()));
        assert_eq!(ok("0").kind, Kind::Number("0".into()));
        assert_eq!(ok("true").kind, Kind::Bool(true));
        assert_eq!(ok("null").kind, Kind::Null);
    }

    #[test]
    fn rejects_json5_and_malformed_input() {
        let cases = [
            (
                "{'a': 1}",
                "1:2: expected a double-quoted key or '}', found '\\''",
            ),
            (
                "{a: 1}",
                "1:2: expected a double-quoted key or '}', found 'a'",
            ),
            ("[1,,2]", "1:4: expected a value, found ','"),
            ("[,]", "1:2: expected a value, found ','"),
            ("[1 2]", "1:4: expected ',' or ']' in array, found '2'"),
            (
                "{\"a\": 1 \"b\": 2}",
                "1:9: expected ',' or '}' in object, found '\"'",
            ),
            ("{\"a\" 1}", "1:6: expected ':' after key, found '1'"),
            ("{\"a\": 1, \"a\": 2}", "1:10: duplicate key \"a\""),
            ("[0x10]", "1:3: unexpected 'x' in number"),
            ("[01]", "1:3: unexpected '1' in number"),
            ("[1.]", "1:2: invalid number `1.`"),
            (
                "[True]",
                "1:2: expected a value, found `True` (keys and strings need double quotes)",
            ),
            ("\"abc", "1:1: unterminated string"),
            ("/* open", "1:1: unterminated block comment"),
            (
                "[1] [2]",
                "1:5: unexpected content after the end of the document",
            ),
            ("[\"\\x\"]", "1:3: invalid escape sequence"),
            ("[\"\\ud800\"]", "1:3: unpaired surrogate in \\u escape"),
            (
                "[\"a\tb\"]",
                "1:4: control character in string (use an escape)",
            ),
            ("[1", "1:3: expected ',' or ']' in array, found end of file"),
            ("/ x", "1:1: unexpected '/'; comments start with // or /*"),
        ];
        for (text, want) in cases {
            assert_eq!(err(text), want, "{text:?}");
        }
    }

    #[test]
    fn many_keys_parse_in_linear_time() {
        let body: Vec<String> = (0..50_000).map(|i| format!("\"k{i}\": {i}")).collect();
        let text = format!("{{{}}}", body.join(","));
        let v = ok(&text);
        assert!(matches!(v.kind, Kind::Object(m) if m.len() == 50_000));
    }

    #[test]
    fn rejects_excessive_nesting_without_overflowing_the_stack() {
        let text = "[".repeat(100_000);
        assert_eq!(err(&text), "1:65: nesting deeper than 64 levels");
    }
}
