//! Connected UDP sockets: one per peer endpoint the data plane sends
//! transport data to, bound to the listening port (`SO_REUSEPORT`) and
//! connected to the endpoint.
//!
//! Why: a send on an unconnected socket names its destination, and the
//! kernel looks the route up for every datagram; on an idle machine that
//! lookup runs cold. A connected socket sends without a destination, on the
//! route cached at `connect`, and on receive the kernel's early demux finds
//! the socket and its cached input route. An idle round trip measured 77–83 µs
//! connected against 92–102 µs unconnected (`scripts/bench/udp-connect.sh`).
//!
//! The kernel delivers the endpoint's datagrams to its connected socket, so
//! each one is read like the listening sockets (every datagram with its
//! source address: a datagram queued before `connect` may come from anyone).
//! What stays on the listening sockets: handshakes, cookies, timers,
//! keepalives, STUN, and every source without a connected socket.
//!
//! Only transport data makes a socket, and transport data goes only to an
//! endpoint learned from an authenticated packet (or configured): a spoofed
//! source cannot make the node open sockets. The table is bounded
//! ([`MAX_SOCKETS`]); beyond it, or while making a socket fails, datagrams go
//! out of the listening socket as before. A socket is closed when idle for
//! [`IDLE`], when its sends fail (its source address is gone: `connect` pins
//! the source, as kernel WireGuard pins a peer's), and when this node's
//! addresses change, so that the next one picks its source afresh.
//!
//! The table ([`Table`]) is pure: which endpoint has which slot, when a slot
//! may be added and when it is due to close. The sockets are its values.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Most connected sockets at once: far below the default descriptor limit
/// (1024), and enough for every busy peer of a large node.
pub(super) const MAX_SOCKETS: usize = 256;
/// A socket with no datagram sent or received for this long is closed.
pub(super) const IDLE: Duration = Duration::from_secs(120);
/// After making a socket failed, none is made for this long (a failing
/// `socket`/`connect` per datagram would cost more than it saves).
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The connected sockets by endpoint, in slots whose index names the
/// socket's epoll token.
#[derive(Debug)]
pub(super) struct Table<S> {
    slots: Vec<Option<Entry<S>>>,
    by_endpoint: HashMap<SocketAddr, usize>,
    max: usize,
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct Entry<S> {
    endpoint: SocketAddr,
    /// Last datagram sent or received; a `Cell` so that a send through a
    /// shared reference keeps the socket alive.
    used: Cell<Instant>,
    value: S,
}

impl<S> Table<S> {
    pub(super) fn new(max: usize) -> Self {
        Self {
            slots: Vec::with_capacity(max),
            by_endpoint: HashMap::with_capacity(max),
            max,
            retry_at: None,
        }
    }

    /// The socket connected to `endpoint`, marked used.
    pub(super) fn get(&self, endpoint: SocketAddr, now: Instant) -> Option<&S> {
        let entry = self.slots[*self.by_endpoint.get(&endpoint)?].as_ref()?;
        entry.used.set(now);
        Some(&entry.value)
    }

    /// The socket in slot `i`, if any.
    pub(super) fn slot(&self, i: usize) -> Option<&S> {
        self.slots.get(i)?.as_ref().map(|e| &e.value)
    }

    pub(super) fn slot_mut(&mut self, i: usize) -> Option<&mut S> {
        self.slots.get_mut(i)?.as_mut().map(|e| &mut e.value)
    }

    /// The slot of the socket connected to `endpoint`.
    pub(super) fn index(&self, endpoint: SocketAddr) -> Option<usize> {
        self.by_endpoint.get(&endpoint).copied()
    }

    /// Marks slot `i` used (a datagram arrived on it).
    pub(super) fn touch(&self, i: usize, now: Instant) {
        if let Some(Some(e)) = self.slots.get(i) {
            e.used.set(now);
        }
    }

    /// Whether a socket for `endpoint` may be made now: none yet, room in
    /// the table, and no recent failure.
    pub(super) fn may_add(&self, endpoint: SocketAddr, now: Instant) -> bool {
        !self.by_endpoint.contains_key(&endpoint)
            && self.by_endpoint.len() < self.max
            && self.retry_at.is_none_or(|t| now >= t)
    }

    /// The slot the next [`Table::add`] fills: its token must be known
    /// before the socket is registered.
    pub(super) fn next_slot(&self) -> usize {
        self.slots
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.slots.len())
    }

    /// Adds the socket connected to `endpoint` in [`Table::next_slot`].
    pub(super) fn add(&mut self, endpoint: SocketAddr, value: S, now: Instant) -> usize {
        let i = self.next_slot();
        let entry = Some(Entry {
            endpoint,
            used: Cell::new(now),
            value,
        });
        if i == self.slots.len() {
            self.slots.push(entry);
        } else {
            self.slots[i] = entry;
        }
        self.by_endpoint.insert(endpoint, i);
        i
    }

    /// Making a socket failed: no new one until [`RETRY_AFTER`].
    pub(super) fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + RETRY_AFTER);
    }

    /// A slot idle for [`IDLE`], to be closed.
    pub(super) fn idle(&self, now: Instant) -> Option<usize> {
        self.slots.iter().position(|e| {
            e.as_ref()
                .is_some_and(|e| now.saturating_duration_since(e.used.get()) >= IDLE)
        })
    }

    /// The occupied slots.
    pub(super) fn occupied(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|_| i))
    }

    /// Empties slot `i`: its endpoint and socket.
    pub(super) fn remove(&mut self, i: usize) -> Option<(SocketAddr, S)> {
        let entry = self.slots.get_mut(i)?.take()?;
        self.by_endpoint.remove(&entry.endpoint);
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        Some((entry.endpoint, entry.value))
    }

    pub(super) fn len(&self) -> usize {
        self.by_endpoint.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, 2], port))
    }

    #[test]
    fn an_endpoint_gets_one_slot_and_slots_are_reused() {
        let t0 = Instant::now();
        let mut t = Table::new(4);
        assert!(t.may_add(ep(1), t0));
        assert_eq!(t.add(ep(1), "a", t0), 0);
        assert!(!t.may_add(ep(1), t0), "one socket per endpoint");
        assert_eq!(t.add(ep(2), "b", t0), 1);
        assert_eq!(t.add(ep(3), "c", t0), 2);
        assert_eq!(t.get(ep(2), t0), Some(&"b"));
        assert_eq!(t.index(ep(3)), Some(2));
        assert_eq!(t.remove(1), Some((ep(2), "b")));
        assert_eq!(t.get(ep(2), t0), None);
        assert_eq!(t.slot(1), None);
        assert_eq!(t.next_slot(), 1, "the freed slot (token) is reused");
        assert_eq!(t.add(ep(4), "d", t0), 1);
        assert_eq!(t.occupied().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(t.remove(2), Some((ep(3), "c")));
        assert_eq!(t.next_slot(), 2, "trailing empty slots are dropped");
        assert_eq!(t.remove(2), None);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_table_is_bounded_and_a_failure_backs_off() {
        let t0 = Instant::now();
        let mut t = Table::new(2);
        t.add(ep(1), (), t0);
        t.add(ep(2), (), t0);
        assert!(!t.may_add(ep(3), t0), "full: the listening socket serves");
        t.remove(0);
        assert!(t.may_add(ep(3), t0));
        t.failed(t0);
        assert!(!t.may_add(ep(3), t0 + RETRY_AFTER - Duration::from_millis(1)));
        assert!(t.may_add(ep(3), t0 + RETRY_AFTER));
    }

    #[test]
    fn a_slot_closes_after_idle_unless_used_by_a_send_or_a_receive() {
        let t0 = Instant::now();
        let mut t = Table::new(4);
        t.add(ep(1), (), t0);
        t.add(ep(2), (), t0);
        let half = t0 + IDLE / 2;
        assert_eq!(t.idle(half), None);
        t.get(ep(1), half);
        t.touch(1, half);
        assert_eq!(t.idle(t0 + IDLE), None, "both were used at half time");
        t.touch(1, t0 + IDLE);
        assert_eq!(t.idle(half + IDLE), Some(0));
        t.remove(0);
        assert_eq!(t.idle(half + IDLE), None);
        assert_eq!(t.idle(t0 + 2 * IDLE), Some(1));
    }
}
