//! Several controllers on one database: each keeps its in-memory view
//! current from the change log ([`Store::changes_since`]), and one of them,
//! the leader, runs the singleton tasks.
//!
//! A log entry names what changed (a node, or the policy), never how: the
//! reader reads the current row and applies it as a [`Change`], so an entry
//! applied twice, late, or after the writer's own copy does no harm. Entries
//! this controller wrote are applied again too: the row read is the one it
//! applied (an empty diff), unless its own write committed while the call
//! failed, which this heals. A reader that fell behind a prune re-reads
//! every node and the policy.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use ztmesh_policy::Policy;

use super::{Mesh, Turn};
use crate::error::Result;
use crate::netcore::Change;
use crate::UnixMs;

/// Log entries read per query.
const FEED_PAGE: u32 = 1_000;

/// A stored policy as the core applies it: one that no longer parses is
/// the empty policy (deny all), logged; failing closed beats guessing.
pub(super) fn stored_policy(row: Option<&crate::store::PolicyRow>) -> Policy {
    match row {
        Some(p) => Policy::parse(&p.file_name, &p.text).unwrap_or_else(|e| {
            tracing::error!(error = %e, "stored policy does not parse; denying all");
            Policy::empty()
        }),
        None => Policy::empty(),
    }
}

impl Mesh {
    /// Marks this controller as one of several on a shared database (see
    /// the module docs): it leads only when told so ([`Mesh::set_leader`]).
    pub fn shared(self) -> Self {
        self.shared.store(true, Ordering::SeqCst);
        self.leader.store(false, Ordering::SeqCst);
        self
    }

    /// Whether this controller runs the singleton tasks (always, alone on
    /// its database).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// This controller became the leader (`Some(term)`), or stopped being it.
    pub fn set_leader(&self, term: Option<u64>, now: UnixMs) {
        let was = self.leader.swap(term.is_some(), Ordering::SeqCst);
        match term {
            Some(t) if !was => {
                tracing::info!(term = t, "this controller leads");
                self.audit(
                    now,
                    "controller",
                    "controller.leader",
                    "",
                    &format!("term={t}"),
                );
            }
            None if was => tracing::warn!("this controller no longer leads"),
            _ => {}
        }
    }

    /// Applies every change other controllers made since the last call and
    /// publishes the maps that changed; returns how many nodes that was.
    ///
    /// # Errors
    /// Store failures (what was applied before stays applied; the next call
    /// resumes from there).
    pub fn catch_up(&self, now: UnixMs) -> Result<usize> {
        let turn = self.turn();
        let mut changed = BTreeSet::new();
        // What was applied before a failure is published all the same: the
        // next call re-reads those rows, and an empty diff publishes nothing.
        let read = self.catch_up_in(&turn, &mut changed);
        self.publish(&turn, &changed, now);
        read.map(|()| changed.len())
    }

    /// [`Mesh::catch_up`] before an admin call that names or lists nodes,
    /// so that it sees what other controllers did a moment ago; a failure
    /// is logged (the view is as of the last catch-up).
    pub fn sync(&self, now: UnixMs) {
        if !self.shared.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.catch_up(now) {
            tracing::warn!(error = %e, "cannot read the change log");
        }
    }

    /// [`Mesh::catch_up`] under the caller's turn, before a change that
    /// rewrites a row from the in-memory view; a failure is logged (the
    /// view is as of the last catch-up).
    pub(super) fn fresh(&self, turn: &Turn<'_>, now: UnixMs) {
        if !self.shared.load(Ordering::SeqCst) {
            return;
        }
        let mut changed = BTreeSet::new();
        if let Err(e) = self.catch_up_in(turn, &mut changed) {
            tracing::warn!(error = %e, "cannot read the change log");
        }
        self.publish(turn, &changed, now);
    }

    /// [`Mesh::catch_up`] under the caller's turn, adding the nodes whose
    /// view changed to `changed` (for the caller to publish, error or not).
    pub(super) fn catch_up_in(&self, _turn: &Turn<'_>, changed: &mut BTreeSet<u64>) -> Result<()> {
        loop {
            let pos = self.state().feed_pos;
            let batch = self.store.changes_since(pos, FEED_PAGE)?;
            if pos < batch.pruned_to {
                tracing::warn!(
                    pos,
                    pruned_to = batch.pruned_to,
                    "change log pruned past us: re-reading all"
                );
                changed.extend(self.resync()?);
                continue;
            }
            let Some(last) = batch.rows.last().map(|c| c.id) else {
                break;
            };
            let mut nodes = BTreeSet::new();
            let mut policy = false;
            for c in &batch.rows {
                match c.node {
                    Some(id) => {
                        nodes.insert(id);
                    }
                    None => policy = true,
                }
            }
            if policy {
                changed.extend(self.reload_policy()?);
            }
            for id in nodes {
                let row = self.store.node(id)?;
                let mut st = self.state();
                let change = match row {
                    Some(mut row) => {
                        // `last_seen` is not in the log; ours may be newer.
                        if let Some(n) = st.core.nodes().get(id) {
                            row.last_seen_ms = row.last_seen_ms.max(n.last_seen_ms);
                        }
                        Change::Upsert(row)
                    }
                    None => Change::Remove(id),
                };
                let removed = matches!(change, Change::Remove(_));
                changed.extend(st.core.apply(change));
                drop(st);
                if removed {
                    self.forget_evidence(id);
                }
            }
            self.state().feed_pos = last;
            if batch.rows.len() < FEED_PAGE as usize {
                break;
            }
        }
        Ok(())
    }

    /// Reads the policy in force and applies it.
    fn reload_policy(&self) -> Result<BTreeSet<u64>> {
        let row = self.store.policy()?;
        let policy = stored_policy(row.as_ref());
        let mut st = self.state();
        st.policy_row = row;
        Ok(st.core.apply(Change::Policy(policy)))
    }

    /// Re-reads every node and the policy, for a reader the log's prune
    /// left behind; resumes the log from where the read began.
    fn resync(&self) -> Result<BTreeSet<u64>> {
        let head = self.store.change_head()?;
        let rows = self.store.nodes()?;
        let mut changed = self.reload_policy()?;
        let stored: BTreeSet<u64> = rows.iter().map(|r| r.id).collect();
        let gone: Vec<u64> = {
            let st = self.state();
            st.core
                .nodes()
                .iter()
                .map(|n| n.id)
                .filter(|id| !stored.contains(id))
                .collect()
        };
        for id in gone {
            changed.extend(self.state().core.apply(Change::Remove(id)));
            self.forget_evidence(id);
        }
        let mut st = self.state();
        for mut row in rows {
            if let Some(n) = st.core.nodes().get(row.id) {
                row.last_seen_ms = row.last_seen_ms.max(n.last_seen_ms);
            }
            changed.extend(st.core.apply(Change::Upsert(row)));
        }
        st.feed_pos = head;
        Ok(changed)
    }
}
