//! The audit log's hash chain: the canonical bytes of a row, its hash, the
//! signed checkpoints, and verification. Pure: no I/O, no clock; the store
//! feeds rows in and the controller's key signs.
//!
//! Every row carries `prev_hash` (the hash of the row before it, or
//! [`GENESIS`] for the first row ever written) and its own `hash`:
//!
//! ```text
//! hash = SHA-256("ztmesh audit row v1" || 0x00 || canonical)
//! canonical = field(id) || field(time_ms) || field(actor) || field(action)
//!          || field(target) || field(detail) || field(prev_hash)
//! field(x) = u32 big-endian byte length of x || x
//! ```
//!
//! `id` is 8 bytes big-endian, `time_ms` 8 bytes big-endian two's
//! complement, the texts are UTF-8, `prev_hash` is 32 bytes. Every field is
//! length-prefixed, so no two rows share canonical bytes.
//!
//! Rows are never changed or reordered; they are deleted only by pruning,
//! which records each run of deleted rows in a signed *gap* checkpoint
//! (after row `before_id` with hash `before_hash`, the next kept row carries
//! `prev_hash = last_hash`; the deleted ids end at `last_id`). The head of
//! the chain (`head_id`, `head_hash`) is signed periodically. A verifier
//! holding the controller's public key then detects any row altered,
//! deleted, inserted or reordered outside the controller, and rows cut from
//! the end up to the last signed head.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use ztmesh_proto::handover::TrustedKey;
use ztmesh_proto::keys::PublicKey;

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The `prev_hash` of the first row ever written.
pub const GENESIS: Hash = [0; 32];

/// Domain separation of row hashes.
const ROW_LABEL: &[u8] = b"ztmesh audit row v1\0";
/// Domain separation of checkpoint signatures (no netmap or other message
/// signed with the same key starts with it).
const CHECKPOINT_LABEL: &[u8] = b"ztmesh audit checkpoint v1\0";

/// The fields of a row that its hash covers, besides `prev_hash`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowFields<'a> {
    pub id: u64,
    pub time_ms: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: &'a str,
}

impl RowFields<'_> {
    /// The canonical bytes of this row chained after `prev` (see the module
    /// docs for the encoding).
    pub fn canonical(&self, prev: &Hash) -> Vec<u8> {
        let texts = self.actor.len() + self.action.len() + self.target.len() + self.detail.len();
        let mut out = Vec::with_capacity(7 * 4 + 16 + 32 + texts);
        for field in [
            &self.id.to_be_bytes()[..],
            &self.time_ms.to_be_bytes()[..],
            self.actor.as_bytes(),
            self.action.as_bytes(),
            self.target.as_bytes(),
            self.detail.as_bytes(),
            &prev[..],
        ] {
            // A field longer than 4 GiB cannot come out of SQLite (its
            // values are at most 2 GiB), so the length always fits.
            let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    /// The row's hash chained after `prev`.
    pub fn hash(&self, prev: &Hash) -> Hash {
        let mut h = Sha256::new();
        h.update(ROW_LABEL);
        h.update(self.canonical(prev));
        h.finalize().into()
    }
}

/// A row as stored: its fields and the two hash columns, untrusted (a
/// column of the wrong length simply fails verification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainRow {
    pub id: u64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl ChainRow {
    pub fn fields(&self) -> RowFields<'_> {
        RowFields {
            id: self.id,
            time_ms: self.time_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            detail: &self.detail,
        }
    }

    /// Whether the row's content, chained after its stored `prev_hash`,
    /// hashes to its stored `hash` when given the id `id`.
    fn hashes_as(&self, id: u64, prev: &[u8], hash: &[u8]) -> bool {
        let Ok(prev) = <Hash>::try_from(prev) else {
            return false;
        };
        RowFields {
            id,
            ..self.fields()
        }
        .hash(&prev)[..]
            == *hash
    }
}

/// What a checkpoint vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The chain's head: row `id` has hash `hash`.
    Head { id: u64, hash: Hash },
    /// Pruned rows: after row `before_id` (0: the start) with hash
    /// `before_hash`, the rows up to id `last_id` were deleted, and the next
    /// row carries `prev_hash = last_hash`.
    Gap {
        before_id: u64,
        before_hash: Hash,
        last_id: u64,
        last_hash: Hash,
    },
}

/// A signed statement about the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub mark: Mark,
    pub time_ms: i64,
    /// ed25519 over [`Checkpoint::message`].
    pub signature: Vec<u8>,
}

impl Checkpoint {
    /// The signed message: the label, the kind, the mark's fields and the
    /// time, each fixed-width big-endian.
    pub fn message(mark: &Mark, time_ms: i64) -> Vec<u8> {
        let mut m = CHECKPOINT_LABEL.to_vec();
        match mark {
            Mark::Head { id, hash } => {
                m.extend_from_slice(b"head");
                m.extend_from_slice(&id.to_be_bytes());
                m.extend_from_slice(hash);
            }
            Mark::Gap {
                before_id,
                before_hash,
                last_id,
                last_hash,
            } => {
                m.extend_from_slice(b"gap\0");
                m.extend_from_slice(&before_id.to_be_bytes());
                m.extend_from_slice(before_hash);
                m.extend_from_slice(&last_id.to_be_bytes());
                m.extend_from_slice(last_hash);
            }
        }
        m.extend_from_slice(&time_ms.to_be_bytes());
        m
    }

    /// Signs `mark` as of `time_ms` with `sign` (the controller's key).
    pub fn signed(mark: Mark, time_ms: i64, sign: &dyn Fn(&[u8]) -> [u8; 64]) -> Self {
        let signature = sign(&Self::message(&mark, time_ms)).to_vec();
        Self {
            mark,
            time_ms,
            signature,
        }
    }

    pub fn verifies(&self, key: &PublicKey) -> bool {
        key.verify(&Self::message(&self.mark, self.time_ms), &self.signature)
    }

    /// Whether one of `keys` signed it while that key was in use: a
    /// retired key's signature counts only for checkpoints made up to its
    /// retirement (see [`ztmesh_proto::handover::lineage`]).
    pub fn verifies_any(&self, keys: &[TrustedKey]) -> bool {
        keys.iter()
            .any(|t| t.until_ms.is_none_or(|until| self.time_ms <= until) && self.verifies(&t.key))
    }

    /// The row id the checkpoint is about (a gap's last deleted id).
    pub fn row(&self) -> u64 {
        match self.mark {
            Mark::Head { id, .. } => id,
            Mark::Gap { last_id, .. } => last_id,
        }
    }
}

/// The first thing wrong with a chain, naming the row.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The row's content no longer matches its hash: it was changed after
    /// it was written.
    #[error("row #{id}: altered (its content does not match its hash)")]
    Altered { id: u64 },
    /// The row holds the content of another row: rows were swapped or moved.
    #[error("row #{id}: reordered (it holds the content of row #{from})")]
    Reordered { id: u64, from: u64 },
    /// Rows were deleted without a signed prune checkpoint.
    #[error("row #{first}: missing (rows #{first}..#{last} were deleted without a signed prune checkpoint)")]
    Missing { first: u64, last: u64 },
    /// The row does not chain to the row before it: that row was altered
    /// and rehashed, this one was inserted, or rows were reordered.
    #[error("row #{id}: out of order (it does not chain to row #{prev}: row #{prev} altered and rehashed, row #{id} inserted, or rows reordered)")]
    Unlinked { id: u64, prev: u64 },
    /// Rows were cut from the end: the chain ends before a signed head (or
    /// before the head the store recorded).
    #[error("row #{first}: missing (rows #{first}..#{head} were cut from the end; {})", signed_text(*.signed_ms, "the chain head"))]
    Truncated {
        first: u64,
        head: u64,
        signed_ms: Option<i64>,
    },
    /// The row differs from the head signed for its id: the chain was
    /// rewritten from here on.
    #[error("row #{id}: altered (it does not match {})", signed_text(*.signed_ms, "the recorded chain head"))]
    HeadMismatch { id: u64, signed_ms: Option<i64> },
    /// Rows follow the head the controller recorded: written behind its back.
    #[error("row #{id}: inserted (the controller's recorded chain head is #{head})")]
    Appended { id: u64, head: u64 },
    /// A checkpoint's signature does not verify with the controller's key:
    /// forged, or signed by another controller.
    #[error("row #{id}: a checkpoint for it has an invalid signature (forged, or signed by another controller key)")]
    BadSignature { id: u64 },
}

fn signed_text(signed_ms: Option<i64>, unsigned: &str) -> String {
    match signed_ms {
        Some(ms) => format!("the head signed at {ms} ms"),
        None => unsigned.to_string(),
    }
}

impl ChainError {
    /// The row the error names.
    pub fn row(&self) -> u64 {
        match *self {
            ChainError::Altered { id }
            | ChainError::Reordered { id, .. }
            | ChainError::Unlinked { id, .. }
            | ChainError::HeadMismatch { id, .. }
            | ChainError::Appended { id, .. }
            | ChainError::BadSignature { id } => id,
            ChainError::Missing { first, .. } | ChainError::Truncated { first, .. } => first,
        }
    }

    /// One word for what happened to the row.
    pub fn kind(&self) -> &'static str {
        match self {
            ChainError::Altered { .. } | ChainError::HeadMismatch { .. } => "altered",
            ChainError::Reordered { .. } | ChainError::Unlinked { .. } => "reordered",
            ChainError::Missing { .. } | ChainError::Truncated { .. } => "missing",
            ChainError::Appended { .. } => "inserted",
            ChainError::BadSignature { .. } => "forged checkpoint",
        }
    }
}

/// What a verification found, for a chain that holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Rows checked.
    pub rows: u64,
    /// The last row id of the chain (a pruned tail counts).
    pub last_id: u64,
    /// The newest signed head: its row id and when it was signed.
    pub signed_head: Option<(u64, i64)>,
    /// Rows newer than the signed head (not yet signed, so cutting them
    /// would not be detected by the signature).
    pub unsigned_rows: u64,
    /// Runs of pruned rows crossed, each vouched for by a signed checkpoint.
    pub gaps: u64,
}

/// A failure noticed at a row, waiting for the rows after it to tell what
/// kind it is.
#[derive(Debug)]
enum Pending {
    /// The row's content does not match its hash: maybe it holds a later
    /// row's content (a swap), else it was altered.
    Content {
        row: Box<ChainRow>,
        from: Option<u64>,
    },
    /// The row does not chain to the one before: maybe its `prev_hash` is a
    /// later row's hash (a swap), else it is out of order.
    Link {
        id: u64,
        prev: u64,
        prev_hash: Vec<u8>,
        from: Option<u64>,
    },
    /// Nothing more to learn.
    Final(ChainError),
}

/// Verifies a chain fed row by row in id order, without holding the rows.
///
/// Feed every row with [`Verifier::push`], then [`Verifier::finish`]. Only
/// checkpoints whose signature verifies with the controller's key count.
#[derive(Debug)]
pub struct Verifier {
    /// Validly signed heads: row id → (hash, signed at).
    heads: BTreeMap<u64, (Hash, i64)>,
    /// Validly signed gaps by the row before them.
    gaps: BTreeMap<u64, Vec<(Hash, u64, Hash)>>,
    /// Row ids of checkpoints whose signature does not verify.
    forged: Vec<u64>,
    /// The chain head the store recorded (unsigned), if any.
    recorded: Option<(u64, Hash)>,
    /// The newest signed head's row id (0: none).
    newest_head: u64,
    expected: Hash,
    prev_id: u64,
    out: Verified,
    pending: Option<Pending>,
}

impl Verifier {
    /// A verifier trusting `keys` (the controller's key and the keys it
    /// replaced, each until its retirement), with the stored checkpoints and the chain
    /// head the store recorded.
    pub fn new(
        keys: &[TrustedKey],
        checkpoints: &[Checkpoint],
        recorded: Option<(u64, Hash)>,
    ) -> Self {
        let mut heads = BTreeMap::new();
        let mut gaps: BTreeMap<u64, Vec<(Hash, u64, Hash)>> = BTreeMap::new();
        let mut forged = Vec::new();
        for c in checkpoints {
            if !c.verifies_any(keys) {
                forged.push(c.row());
                continue;
            }
            match c.mark {
                Mark::Head { id, hash } => {
                    heads.insert(id, (hash, c.time_ms));
                }
                Mark::Gap {
                    before_id,
                    before_hash,
                    last_id,
                    last_hash,
                } => gaps
                    .entry(before_id)
                    .or_default()
                    .push((before_hash, last_id, last_hash)),
            }
        }
        forged.sort_unstable();
        let newest_head = heads.keys().next_back().copied().unwrap_or(0);
        Self {
            newest_head,
            heads,
            gaps,
            forged,
            recorded,
            expected: GENESIS,
            prev_id: 0,
            out: Verified::default(),
            pending: None,
        }
    }

    /// Checks a segment only: the rows after row `id` with hash `hash`
    /// (trusted: a kept row, or a signed head). For the store, before it
    /// prunes or signs, so that it never vouches for rows it did not write.
    pub fn starting_after(mut self, id: u64, hash: Hash) -> Self {
        self.prev_id = id;
        self.expected = hash;
        self
    }

    /// The verdict on a segment ([`Verifier::starting_after`]): the rows
    /// pushed hold together; returns the last row's id and hash. Nothing is
    /// said about cut rows or the recorded head.
    ///
    /// # Errors
    /// As [`Verifier::finish`], for the rows pushed.
    pub fn segment(mut self) -> Result<(u64, Hash), ChainError> {
        self.recorded = None;
        self.heads.clear();
        self.forged.clear();
        let (id, hash) = (self.prev_id, self.expected);
        self.finish().map(|_| (id, hash))
    }

    /// Whether the outcome is already decided (the caller may stop feeding).
    pub fn is_decided(&self) -> bool {
        matches!(self.pending, Some(Pending::Final(_)))
    }

    /// Checks the next row (rows come in increasing id order).
    pub fn push(&mut self, row: &ChainRow) {
        match &mut self.pending {
            Some(Pending::Final(_)) => return,
            Some(Pending::Content { row: bad, from }) => {
                // A swap leaves the altered row's content hashing right
                // under the other row's id, with either row's prev_hash.
                if from.is_none()
                    && (bad.hashes_as(row.id, &bad.prev_hash, &bad.hash)
                        || bad.hashes_as(row.id, &row.prev_hash, &row.hash))
                {
                    *from = Some(row.id);
                }
                return;
            }
            Some(Pending::Link {
                prev_hash, from, ..
            }) => {
                if from.is_none() && *prev_hash == row.hash {
                    *from = Some(row.id);
                }
                return;
            }
            None => {}
        }
        self.out.rows += 1;
        let Ok(prev) = <Hash>::try_from(&row.prev_hash[..]) else {
            self.pending = Some(Pending::Content {
                row: Box::new(row.clone()),
                from: None,
            });
            return;
        };
        let hash = row.fields().hash(&prev);
        if hash[..] != row.hash[..] {
            self.pending = Some(Pending::Content {
                row: Box::new(row.clone()),
                from: None,
            });
            return;
        }
        if prev != self.expected {
            if let Err(p) = self.cross_gap(row.id, &prev) {
                self.pending = Some(p);
                return;
            }
        }
        if let Some((signed, at)) = self.heads.get(&row.id) {
            if *signed != hash {
                self.pending = Some(Pending::Final(ChainError::HeadMismatch {
                    id: row.id,
                    signed_ms: Some(*at),
                }));
                return;
            }
        }
        if row.id > self.newest_head {
            self.out.unsigned_rows += 1;
        }
        self.expected = hash;
        self.prev_id = row.id;
    }

    /// The row `next_id` carries `prev`, not the hash of the row before:
    /// fine only where a signed gap says so.
    fn cross_gap(&mut self, next_id: u64, prev: &Hash) -> Result<(), Pending> {
        let mut covered = self.prev_id;
        for (before, last_id, last_hash) in self.gaps.get(&self.prev_id).into_iter().flatten() {
            if *before != self.expected || *last_id >= next_id {
                continue;
            }
            if last_hash == prev {
                self.out.gaps += 1;
                return Ok(());
            }
            // Pruned up to `last_id`; what follows was deleted.
            covered = covered.max(*last_id);
        }
        if next_id > covered + 1 {
            return Err(Pending::Final(ChainError::Missing {
                first: covered + 1,
                last: next_id - 1,
            }));
        }
        Err(Pending::Link {
            id: next_id,
            prev: self.prev_id,
            prev_hash: prev.to_vec(),
            from: None,
        })
    }

    /// The verdict, once every row was pushed.
    ///
    /// # Errors
    /// The first row found altered, missing, reordered, inserted or cut.
    pub fn finish(mut self) -> Result<Verified, ChainError> {
        match self.pending.take() {
            Some(Pending::Final(e)) => return Err(e),
            Some(Pending::Content {
                row,
                from: Some(from),
            }) => return Err(ChainError::Reordered { id: row.id, from }),
            Some(Pending::Content { row, from: None }) => {
                return Err(ChainError::Altered { id: row.id })
            }
            Some(Pending::Link {
                id,
                from: Some(from),
                ..
            }) => return Err(ChainError::Reordered { id, from }),
            Some(Pending::Link { id, prev, .. }) => return Err(ChainError::Unlinked { id, prev }),
            None => {}
        }
        // A pruned tail: the chain goes on, up to the gap's end.
        let mut last = self.prev_id;
        let mut last_hash = self.expected;
        if let Some(gaps) = self.gaps.get(&self.prev_id) {
            if let Some((_, last_id, hash)) = gaps
                .iter()
                .filter(|(before, last_id, _)| *before == self.expected && *last_id > self.prev_id)
                .max_by_key(|(_, last_id, _)| *last_id)
            {
                last = *last_id;
                last_hash = *hash;
                self.out.gaps += 1;
            }
        }
        if let Some((&head, &(_, at))) = self.heads.range(last + 1..).next_back() {
            return Err(ChainError::Truncated {
                first: last + 1,
                head,
                signed_ms: Some(at),
            });
        }
        if let Some((id, hash)) = self.recorded {
            if id > last {
                return Err(ChainError::Truncated {
                    first: last + 1,
                    head: id,
                    signed_ms: None,
                });
            }
            if id < last {
                return Err(ChainError::Appended {
                    id: id + 1,
                    head: id,
                });
            }
            if hash != last_hash {
                return Err(ChainError::HeadMismatch {
                    id,
                    signed_ms: None,
                });
            }
        }
        if let Some(&id) = self.forged.first() {
            return Err(ChainError::BadSignature { id });
        }
        self.out.last_id = last;
        self.out.signed_head = self
            .heads
            .range(..=last)
            .next_back()
            .map(|(id, (_, at))| (*id, *at));
        Ok(self.out)
    }
}

/// Verifies `rows` (in id order) against `checkpoints` with `key`; the
/// whole chain in one call (see [`Verifier`] for a streaming check).
///
/// # Errors
/// As [`Verifier::finish`].
pub fn verify(
    rows: &[ChainRow],
    checkpoints: &[Checkpoint],
    recorded: Option<(u64, Hash)>,
    key: &PublicKey,
) -> Result<Verified, ChainError> {
    let key = [TrustedKey {
        key: *key,
        until_ms: None,
    }];
    let mut v = Verifier::new(&key, checkpoints, recorded);
    for r in rows {
        v.push(r);
        if v.is_decided() {
            break;
        }
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use ztmesh_proto::keys::SigningKey;

    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate(&mut StdRng::seed_from_u64(7))
    }

    /// `n` chained rows with ids 1..=n.
    fn chain(n: u64) -> Vec<ChainRow> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|id| {
                let mut r = ChainRow {
                    id,
                    time_ms: 1_000 + id as i64,
                    actor: "local-admin".into(),
                    action: "user.create".into(),
                    target: format!("u{id}"),
                    detail: String::new(),
                    prev_hash: prev.to_vec(),
                    hash: Vec::new(),
                };
                let h = r.fields().hash(&prev);
                r.hash = h.to_vec();
                prev = h;
                r
            })
            .collect()
    }

    fn hash(r: &ChainRow) -> Hash {
        r.hash.clone().try_into().unwrap()
    }

    fn head(k: &SigningKey, r: &ChainRow, at: i64) -> Checkpoint {
        let mark = Mark::Head {
            id: r.id,
            hash: hash(r),
        };
        Checkpoint::signed(mark, at, &|m| k.sign(m))
    }

    /// A signed gap for the rows strictly between `before` (None: the
    /// start) and `next`.
    fn gap(k: &SigningKey, before: Option<&ChainRow>, next: &ChainRow) -> Checkpoint {
        let mark = Mark::Gap {
            before_id: before.map_or(0, |r| r.id),
            before_hash: before.map_or(GENESIS, hash),
            last_id: next.id - 1,
            last_hash: next.prev_hash.clone().try_into().unwrap(),
        };
        Checkpoint::signed(mark, 9_000, &|m| k.sign(m))
    }

    fn recorded(r: &ChainRow) -> Option<(u64, Hash)> {
        Some((r.id, hash(r)))
    }

    #[test]
    fn an_untouched_chain_verifies_and_reports_its_signed_head() {
        let k = key();
        let rows = chain(5);
        let cps = [head(&k, &rows[2], 50)];
        let v = verify(&rows, &cps, recorded(&rows[4]), &k.public()).unwrap();
        assert_eq!(
            v,
            Verified {
                rows: 5,
                last_id: 5,
                signed_head: Some((3, 50)),
                unsigned_rows: 2,
                gaps: 0,
            }
        );
    }

    #[test]
    fn an_empty_chain_verifies() {
        let k = key();
        let v = verify(&[], &[], None, &k.public()).unwrap();
        assert_eq!(v, Verified::default());
        let v = verify(&[], &[], Some((0, GENESIS)), &k.public()).unwrap();
        assert_eq!(v.rows, 0);
    }

    #[test]
    fn canonical_bytes_are_length_prefixed_so_fields_cannot_slide() {
        let a = RowFields {
            id: 1,
            time_ms: 2,
            actor: "ab",
            action: "c",
            target: "",
            detail: "",
        };
        let b = RowFields {
            actor: "a",
            action: "bc",
            ..a
        };
        assert_ne!(a.canonical(&GENESIS), b.canonical(&GENESIS));
        assert_ne!(a.hash(&GENESIS), b.hash(&GENESIS));
        let c = a.canonical(&GENESIS);
        assert_eq!(&c[..4], &8u32.to_be_bytes());
        assert_eq!(&c[4..12], &1u64.to_be_bytes());
        assert_eq!(c.len(), 7 * 4 + 8 + 8 + 2 + 1 + 32);
        // Another prev_hash, another hash.
        assert_ne!(a.hash(&GENESIS), a.hash(&[1; 32]));
    }

    #[test]
    fn an_altered_row_is_named() {
        let k = key();
        let mut rows = chain(5);
        rows[2].detail = "changed".into();
        let e = verify(&rows, &[], recorded(&rows[4]), &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Altered { id: 3 });
        assert_eq!(e.kind(), "altered");
        assert!(e.to_string().starts_with("row #3: altered"), "{e}");
    }

    #[test]
    fn a_hash_column_of_the_wrong_length_is_an_alteration() {
        let k = key();
        let mut rows = chain(3);
        rows[1].prev_hash.pop();
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Altered { id: 2 });
        let mut rows = chain(3);
        rows[1].hash.clear();
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Altered { id: 2 });
    }

    #[test]
    fn a_deleted_row_is_named_missing() {
        let k = key();
        let mut rows = chain(6);
        rows.remove(2);
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Missing { first: 3, last: 3 });
        // The first row gone: missing from the start.
        let mut rows = chain(3);
        rows.remove(0);
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Missing { first: 1, last: 1 });
    }

    #[test]
    fn swapped_rows_are_named_reordered_whichever_columns_moved() {
        let k = key();
        let base = chain(6);
        // Contents only (the hash columns stay).
        let mut rows = base.clone();
        let (a, b) = (rows[1].clone(), rows[4].clone());
        rows[1] = ChainRow {
            id: a.id,
            prev_hash: a.prev_hash.clone(),
            hash: a.hash.clone(),
            ..b.clone()
        };
        rows[4] = ChainRow {
            id: b.id,
            prev_hash: b.prev_hash.clone(),
            hash: b.hash.clone(),
            ..a.clone()
        };
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Reordered { id: 2, from: 5 });
        // Everything but the id.
        let mut rows = base.clone();
        rows[1] = ChainRow { id: 2, ..b.clone() };
        rows[4] = ChainRow { id: 5, ..a };
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Reordered { id: 2, from: 5 });
        assert_eq!(e.kind(), "reordered");
    }

    #[test]
    fn an_inserted_row_is_named() {
        let k = key();
        let rows = chain(4);
        // A row written behind the controller's back, chained correctly
        // after the last one: the recorded head gives it away.
        let mut forged = chain(5).pop().unwrap();
        forged.detail = String::new();
        let mut with = rows.clone();
        with.push(forged);
        let e = verify(&with, &[], recorded(&rows[3]), &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Appended { id: 5, head: 4 });
        // A row in the middle that chains to nothing.
        let mut with = chain(4);
        let mut mid = with[1].clone();
        mid.detail = "fake".into();
        mid.prev_hash = vec![9; 32];
        mid.hash = mid.fields().hash(&[9; 32]).to_vec();
        with[1] = mid;
        let e = verify(&with, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Unlinked { id: 2, prev: 1 });
    }

    #[test]
    fn a_rehashed_row_is_caught_by_its_successor_or_the_signed_head() {
        let k = key();
        let mut rows = chain(4);
        rows[1].detail = "rewritten".into();
        let prev: Hash = rows[1].prev_hash.clone().try_into().unwrap();
        rows[1].hash = rows[1].fields().hash(&prev).to_vec();
        let e = verify(&rows, &[], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Unlinked { id: 3, prev: 2 });
        // The last row rewritten: only the signed head can tell.
        let orig = chain(4);
        let mut rows = orig.clone();
        rows[3].detail = "rewritten".into();
        let prev: Hash = rows[3].prev_hash.clone().try_into().unwrap();
        rows[3].hash = rows[3].fields().hash(&prev).to_vec();
        let cps = [head(&k, &orig[3], 77)];
        let e = verify(&rows, &cps, None, &k.public()).unwrap_err();
        assert_eq!(
            e,
            ChainError::HeadMismatch {
                id: 4,
                signed_ms: Some(77)
            }
        );
    }

    #[test]
    fn cut_rows_are_named_against_the_signed_head() {
        let k = key();
        let rows = chain(6);
        let cps = [head(&k, &rows[1], 10), head(&k, &rows[4], 20)];
        let e = verify(&rows[..3], &cps, None, &k.public()).unwrap_err();
        assert_eq!(
            e,
            ChainError::Truncated {
                first: 4,
                head: 5,
                signed_ms: Some(20)
            }
        );
        assert_eq!(e.row(), 4);
        // Cut beyond the signed head: the recorded head still tells.
        let e = verify(&rows[..5], &cps, recorded(&rows[5]), &k.public()).unwrap_err();
        assert_eq!(
            e,
            ChainError::Truncated {
                first: 6,
                head: 6,
                signed_ms: None
            }
        );
        // Everything cut.
        let e = verify(&[], &cps, None, &k.public()).unwrap_err();
        assert_eq!(e.row(), 1);
    }

    #[test]
    fn pruned_runs_verify_through_their_signed_gaps() {
        let k = key();
        let rows = chain(10);
        // Pruned: the first two, 5..6, and the tail 9..10.
        let kept: Vec<ChainRow> = rows
            .iter()
            .filter(|r| ![1, 2, 5, 6, 9, 10].contains(&r.id))
            .cloned()
            .collect();
        let tail = Checkpoint::signed(
            Mark::Gap {
                before_id: 8,
                before_hash: hash(&rows[7]),
                last_id: 10,
                last_hash: hash(&rows[9]),
            },
            9_000,
            &|m| k.sign(m),
        );
        let cps = vec![
            gap(&k, None, &rows[2]),
            gap(&k, Some(&rows[3]), &rows[6]),
            tail,
            head(&k, &rows[9], 30),
        ];
        let v = verify(&kept, &cps, recorded(&rows[9]), &k.public()).unwrap();
        assert_eq!(v.rows, 4);
        assert_eq!(v.gaps, 3);
        assert_eq!(v.last_id, 10);
        assert_eq!(v.signed_head, Some((10, 30)));
        // Without one of the gaps, the run is missing.
        let e = verify(&kept, &cps[1..], recorded(&rows[9]), &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Missing { first: 1, last: 2 });
        // A row next to a signed gap deleted as well: not covered.
        let fewer: Vec<ChainRow> = kept.iter().filter(|r| r.id != 4).cloned().collect();
        let e = verify(&fewer, &cps, recorded(&rows[9]), &k.public()).unwrap_err();
        assert_eq!(e, ChainError::Missing { first: 4, last: 6 });
    }

    /// After a rotation of the signing key, checkpoints the old key made
    /// before it was replaced still count; one it made "after" (a leaked
    /// old key) does not.
    #[test]
    fn a_retired_key_counts_only_for_what_it_signed_before_retiring() {
        let (old, new) = (key(), SigningKey::generate(&mut StdRng::seed_from_u64(9)));
        let rows = chain(6);
        let keys = [
            TrustedKey {
                key: new.public(),
                until_ms: None,
            },
            TrustedKey {
                key: old.public(),
                until_ms: Some(100),
            },
        ];
        let check = |cps: &[Checkpoint]| {
            let mut v = Verifier::new(&keys, cps, recorded(&rows[5]));
            for r in &rows {
                v.push(r);
            }
            v.finish()
        };
        let v = check(&[head(&old, &rows[2], 100), head(&new, &rows[5], 200)]).unwrap();
        assert_eq!(v.signed_head, Some((6, 200)));
        assert_eq!(
            check(&[head(&old, &rows[2], 100), head(&old, &rows[5], 101)]).unwrap_err(),
            ChainError::BadSignature { id: 6 }
        );
    }

    #[test]
    fn a_forged_checkpoint_counts_for_nothing() {
        let k = key();
        let other = SigningKey::generate(&mut StdRng::seed_from_u64(8));
        let rows = chain(6);
        let kept: Vec<ChainRow> = rows.iter().filter(|r| r.id != 3).cloned().collect();
        // A gap signed by another key does not excuse the deletion.
        let e = verify(
            &kept,
            &[gap(&other, Some(&rows[1]), &rows[3])],
            None,
            &k.public(),
        )
        .unwrap_err();
        assert_eq!(e, ChainError::Missing { first: 3, last: 3 });
        // Nor does a forged head pass silently.
        let e = verify(&rows, &[head(&other, &rows[5], 1)], None, &k.public()).unwrap_err();
        assert_eq!(e, ChainError::BadSignature { id: 6 });
        // A signature over another time does not verify.
        let mut cp = head(&k, &rows[5], 1);
        cp.time_ms = 2;
        assert!(!cp.verifies(&k.public()));
    }

    proptest::proptest! {
        /// Whatever single change is made to a signed chain (a row altered,
        /// deleted, two swapped, the tail cut), verification names the
        /// first row it touched, with the right kind.
        #[test]
        fn any_single_tampering_is_named_at_its_first_row(
            n in 1u64..24, op in 0u8..4, a in 0usize..24, b in 0usize..24,
        ) {
            let k = key();
            let rows = chain(n);
            let last = rows.last().unwrap();
            let cps = [head(&k, last, 1)];
            let rec = recorded(last);
            proptest::prop_assert!(verify(&rows, &cps, rec, &k.public()).is_ok());
            let (i, j) = (a % rows.len(), b % rows.len());
            let mut t = rows.clone();
            let (row, kind) = match op {
                0 => {
                    t[i].detail.push('!');
                    (i as u64 + 1, "altered")
                }
                1 => {
                    t.remove(i);
                    (i as u64 + 1, "missing")
                }
                2 if i != j => {
                    let (lo, hi) = (i.min(j), i.max(j));
                    let (x, y) = (t[lo].clone(), t[hi].clone());
                    t[lo] = ChainRow { id: x.id, prev_hash: x.prev_hash, hash: x.hash, ..y.clone() };
                    t[hi] = ChainRow { id: y.id, prev_hash: y.prev_hash, hash: y.hash, ..x };
                    (lo as u64 + 1, "reordered")
                }
                _ => {
                    t.truncate(i);
                    (i as u64 + 1, "missing")
                }
            };
            let e = verify(&t, &cps, rec, &k.public()).unwrap_err();
            proptest::prop_assert_eq!(e.row(), row, "{}", e);
            proptest::prop_assert_eq!(e.kind(), kind, "{}", e);
        }
    }
}
