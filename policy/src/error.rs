//! Policy diagnostics: `FILE:LINE:COL: message` errors (pure: no I/O).

use std::fmt;

/// A 1-based line and column (in characters) inside a policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Line, starting at 1.
    pub line: u32,
    /// Column in Unicode scalar values, starting at 1.
    pub col: u32,
}

/// One problem found in a policy, pointing at the offending token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name given to [`crate::Policy::parse`].
    pub file: String,
    /// 1-based line of the offending token.
    pub line: u32,
    /// 1-based column of the offending token.
    pub col: u32,
    /// Lowercase description of the problem and, where possible, its remedy.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// A rejected policy or a failed policy test: every problem found, in file order.
///
/// `Display` prints one `FILE:LINE:COL: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// Builds an error from diagnostics, sorted by position for stable output.
    pub(crate) fn new(mut diagnostics: Vec<Diagnostic>) -> PolicyError {
        diagnostics.sort_by_key(|d| (d.line, d.col));
        diagnostics.dedup();
        PolicyError { diagnostics }
    }

    /// The individual problems, sorted by line and column.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Collects diagnostics for one file while a pass runs.
#[derive(Debug)]
pub(crate) struct Sink {
    file: String,
    diagnostics: Vec<Diagnostic>,
}

impl Sink {
    pub fn new(file: &str) -> Sink {
        Sink {
            file: file.to_string(),
            diagnostics: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            col: pos.col,
            message: message.into(),
        });
    }

    pub fn into_result<T>(self, value: T) -> Result<T, PolicyError> {
        if self.diagnostics.is_empty() {
            Ok(value)
        } else {
            Err(PolicyError::new(self.diagnostics))
        }
    }
}
