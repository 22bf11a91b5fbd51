//! What the store's SQL needs from an engine: parameter and column values,
//! rows, a connection that runs statements, and transactions. The store's
//! queries ([`super::SqlStore`]) are written once against this and run on
//! SQLite ([`super::sqlite`]) and PostgreSQL ([`super::postgres`]).
//!
//! The dialect both engines share: `?N` placeholders (PostgreSQL's backend
//! rewrites them to `$N`), `RETURNING`, `ON CONFLICT … DO UPDATE`,
//! `LIMIT … OFFSET …`, `TRUE`; booleans are stored as the integers 0 and 1
//! on both, so a row reads the same from either.

use std::fmt;

use super::{Result, StoreError};

/// A parameter or column value: the types the schema uses.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    /// Only ever read (a column written behind the controller's back).
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

/// Unsigned counts and ids: beyond `i64::MAX` they saturate (both engines'
/// integers are signed 64-bit; no id or count gets there).
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Self::Int(v.into())
    }
}

impl From<u16> for Value {
    fn from(v: u16) -> Self {
        Self::Int(v.into())
    }
}

impl From<u8> for Value {
    fn from(v: u8) -> Self {
        Self::Int(v.into())
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Self::Int(v.into())
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Self::Text(v.to_string())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Self::Text(v)
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Self::Text(v.clone())
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Self::Blob(v.to_vec())
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Self::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// The parameters of one statement, in `?1, ?2, …` order.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        &[$($crate::store::sql::Value::from($v)),*][..]
    };
}
pub(crate) use args;

/// Why a statement failed, as far as the store's callers care.
#[derive(Debug)]
pub enum DbError {
    /// A UNIQUE or PRIMARY KEY constraint.
    Unique,
    /// A FOREIGN KEY constraint (the referenced row is missing).
    ForeignKey,
    /// Anything else: the message.
    Other(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unique => f.write_str("unique constraint violated"),
            Self::ForeignKey => f.write_str("foreign key constraint violated"),
            Self::Other(m) => f.write_str(m),
        }
    }
}

impl From<DbError> for StoreError {
    fn from(e: DbError) -> Self {
        Self::Db(e.to_string())
    }
}

/// What a statement or a row read returns.
pub type DbResult<T> = std::result::Result<T, DbError>;

/// A stored value that does not parse: corruption or a newer schema.
pub fn corrupt(col: usize, what: &str) -> DbError {
    DbError::Other(format!("column {col}: corrupt stored {what}"))
}

/// One result row.
#[derive(Clone, Debug)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// The raw value of column `i` (NULL past the end).
    pub fn value(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }

    pub fn opt_i64(&self, i: usize) -> DbResult<Option<i64>> {
        match self.value(i) {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(corrupt(i, "integer")),
        }
    }

    pub fn i64(&self, i: usize) -> DbResult<i64> {
        self.opt_i64(i)?.ok_or_else(|| corrupt(i, "integer (NULL)"))
    }

    pub fn opt_u64(&self, i: usize) -> DbResult<Option<u64>> {
        self.opt_i64(i)?
            .map(|v| u64::try_from(v).map_err(|_| corrupt(i, "unsigned integer")))
            .transpose()
    }

    pub fn u64(&self, i: usize) -> DbResult<u64> {
        self.opt_u64(i)?
            .ok_or_else(|| corrupt(i, "unsigned integer (NULL)"))
    }

    /// An integer that must fit `T` (a port, a protocol number, a count).
    pub fn int<T: TryFrom<i64>>(&self, i: usize) -> DbResult<T> {
        T::try_from(self.i64(i)?).map_err(|_| corrupt(i, "integer out of range"))
    }

    pub fn bool(&self, i: usize) -> DbResult<bool> {
        Ok(self.i64(i)? != 0)
    }

    pub fn opt_text(&self, i: usize) -> DbResult<Option<String>> {
        match self.value(i) {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(corrupt(i, "text")),
        }
    }

    pub fn text(&self, i: usize) -> DbResult<String> {
        self.opt_text(i)?.ok_or_else(|| corrupt(i, "text (NULL)"))
    }

    pub fn opt_blob(&self, i: usize) -> DbResult<Option<Vec<u8>>> {
        match self.value(i) {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v.clone())),
            _ => Err(corrupt(i, "blob")),
        }
    }

    pub fn blob(&self, i: usize) -> DbResult<Vec<u8>> {
        self.opt_blob(i)?.ok_or_else(|| corrupt(i, "blob (NULL)"))
    }

    pub fn key32(&self, i: usize) -> DbResult<[u8; 32]> {
        self.blob(i)?
            .try_into()
            .map_err(|_| corrupt(i, "32-byte key"))
    }

    /// A text column parsed as `T` (an address, a role).
    pub fn parsed<T: std::str::FromStr>(&self, i: usize) -> DbResult<T> {
        self.text(i)?.parse().map_err(|_| corrupt(i, "value"))
    }

    /// A comma-separated list column.
    pub fn list(&self, i: usize) -> DbResult<Vec<String>> {
        Ok(split_list(&self.text(i)?))
    }
}

pub fn join_list(v: &[String]) -> String {
    v.join(",")
}

pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

/// A connection, or a transaction on one.
pub trait Conn {
    /// Runs one statement; the number of rows it changed.
    ///
    /// # Errors
    /// The engine's verdict, classified.
    fn exec(&mut self, sql: &str, args: &[Value]) -> DbResult<u64>;

    /// Runs a query and calls `each` with its rows in order until it
    /// returns `false`.
    ///
    /// # Errors
    /// The engine's, or the first one `each` returns.
    fn query(
        &mut self,
        sql: &str,
        args: &[Value],
        each: &mut dyn FnMut(Row) -> DbResult<bool>,
    ) -> DbResult<()>;

    /// Runs several `;`-separated statements without parameters (migrations).
    ///
    /// # Errors
    /// The engine's.
    fn batch(&mut self, sql: &str) -> DbResult<()>;
}

impl dyn Conn + '_ {
    /// All rows, each mapped.
    pub fn rows<T>(
        &mut self,
        sql: &str,
        args: &[Value],
        map: impl Fn(&Row) -> DbResult<T>,
    ) -> DbResult<Vec<T>> {
        let mut out = Vec::new();
        self.query(sql, args, &mut |r| {
            out.push(map(&r)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// The first row, if any, mapped.
    pub fn opt<T>(
        &mut self,
        sql: &str,
        args: &[Value],
        map: impl Fn(&Row) -> DbResult<T>,
    ) -> DbResult<Option<T>> {
        let mut out = None;
        self.query(sql, args, &mut |r| {
            out = Some(map(&r)?);
            Ok(false)
        })?;
        Ok(out)
    }

    /// The first row, which must exist (an aggregate, `RETURNING`).
    pub fn one<T>(
        &mut self,
        sql: &str,
        args: &[Value],
        map: impl Fn(&Row) -> DbResult<T>,
    ) -> DbResult<T> {
        self.opt(sql, args, map)?
            .ok_or_else(|| DbError::Other(format!("no row returned by: {sql}")))
    }
}

/// An engine: connections and transactions.
pub trait Backend: Send + Sync + 'static {
    /// Appended to a `SELECT` of a row a write transaction is about to
    /// change: PostgreSQL locks the row (`FOR UPDATE`); SQLite's write
    /// transaction holds the whole database already.
    const LOCK_ROW: &'static str;

    /// Whether the database keeps the change log (`ztmesh_changes`, written
    /// by triggers in the transaction of each change) that several
    /// controllers on one database follow.
    const CHANGE_LOG: bool;

    /// What the change log records as the writer of changes made through
    /// this handle (unique per process); empty without a change log.
    fn origin(&self) -> &str;

    /// Runs `f` on a connection, each statement on its own (autocommit).
    ///
    /// # Errors
    /// The engine's (no connection), or `f`'s.
    fn with<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T>;

    /// Runs `f` in one transaction, serialized against every other write
    /// transaction on the database (from this process or another); commits
    /// if `f` returns `Ok`, else rolls back.
    ///
    /// # Errors
    /// The engine's, or `f`'s.
    fn write<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T>;

    /// Runs `f` in one read-only snapshot: what it reads is consistent,
    /// whatever is written meanwhile.
    ///
    /// # Errors
    /// The engine's, or `f`'s.
    fn snapshot<T>(&self, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T>;

    /// See [`super::Store::online_backup`].
    ///
    /// # Errors
    /// The engine's.
    fn online_backup(&self, dest: &std::path::Path) -> Result<super::Snapshot>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_read_typed_values_and_refuse_the_wrong_type() {
        let r = Row(vec![
            Value::Int(-1),
            Value::Text("a,b,,c".into()),
            Value::Blob(vec![7; 32]),
            Value::Null,
            Value::Real(1.5),
        ]);
        assert_eq!(r.i64(0).unwrap(), -1);
        assert!(r.u64(0).is_err(), "a negative id is corrupt");
        assert!(r.int::<u8>(0).is_err());
        assert_eq!(r.list(1).unwrap(), ["a", "b", "c"]);
        assert_eq!(r.key32(2).unwrap(), [7; 32]);
        assert!(r.key32(1).is_err());
        assert_eq!(r.opt_text(3).unwrap(), None);
        assert!(r.text(3).is_err(), "NULL where a value must be");
        assert!(r.i64(4).is_err());
        assert_eq!(r.value(99), &Value::Null);
        assert_eq!(Value::from(u64::MAX), Value::Int(i64::MAX));
        assert_eq!(Value::from(None::<&str>), Value::Null);
        assert_eq!(args![1_u32, true, "x"].len(), 3);
    }
}
