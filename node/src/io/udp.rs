//! UDP sockets with batched I/O: `recvmmsg` with UDP GRO on receive, UDP GSO
//! on send (quinn-udp probes both at runtime and falls back to one datagram
//! per syscall), and the batch of encrypted datagrams built between two sends.
//! The sockets are non-blocking and registered for readability only (see
//! [`super::wait_writable`] for the rare full send buffer).

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::AsRawFd;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

/// Largest UDP payload one GSO send may carry: the IP length field holds
/// 65,535 bytes including the IPv6 (40) and UDP (8) headers.
const MAX_GSO_BYTES: usize = 65_535 - 40 - 8;

/// A UDP socket and its quinn-udp state (GSO/GRO support, cmsg handling).
pub(super) struct Udp {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl Udp {
    /// Wraps a bound, non-blocking socket; probes GSO and enables GRO.
    pub(super) fn new(sock: UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&sock).into())?;
        Ok(Self { sock, state })
    }

    pub(super) fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    pub(super) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// How many datagrams one receive buffer may hold (UDP GRO), 1 without GRO.
    pub(super) fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// One `recvmmsg`: fills up to `bufs.len()` buffers; each may hold several
    /// datagrams of `meta.stride` bytes (GRO). `WouldBlock` when nothing is queued.
    pub(super) fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.state.recv((&self.sock).into(), bufs, meta)
    }

    /// Sends one datagram, or `contents.len() / segment` datagrams with GSO.
    /// A full send buffer is waited out (bounded, [`super::wait_writable`]);
    /// other send errors drop the datagrams, as the kernel would later on.
    pub(super) fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        // One wait for room, then one more try: a buffer that stays full
        // drops the datagrams instead of holding the thread.
        for attempt in 0..2 {
            match self.state.try_send((&self.sock).into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if attempt == 1 || !super::wait_writable(self.sock.as_raw_fd()) {
                        tracing::trace!(%to, "UDP send buffer full; datagrams dropped");
                        return;
                    }
                }
                Err(e) => {
                    tracing::trace!(error = %e, %to, "UDP send failed");
                    return;
                }
                Ok(()) => return,
            }
        }
    }

    /// The most datagrams one GSO send may carry (1 without GSO).
    pub(super) fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Sends on a connected socket: one datagram without a destination, so
    /// the kernel takes the route cached at `connect` (quinn-udp always names
    /// the destination, and a named one is looked up again); a GSO run with
    /// `to`, the connected endpoint, since only quinn-udp builds the segment
    /// control message (one lookup per run of up to 64 KiB).
    ///
    /// `Ok` when sent, or dropped as [`Udp::send`] drops; an error means the
    /// socket cannot send any more (its source address or its route is
    /// gone): close it and send through the listening socket.
    pub(super) fn send_connected(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        if segment.is_some() {
            self.send(to, contents, segment);
            return Ok(());
        }
        for attempt in 0..2 {
            match self.sock.send(contents) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if attempt == 1 || !super::wait_writable(self.sock.as_raw_fd()) {
                        tracing::trace!(%to, "UDP send buffer full; datagram dropped");
                        return Ok(());
                    }
                }
                // A connected socket reports an ICMP error (the peer's port
                // was closed) once, on its next call: the datagram is tried
                // again, since the peer may be back.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::trace!(%to, "port unreachable reported");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Encrypted datagrams waiting to be sent, written back to back into one
/// buffer so that consecutive datagrams to one peer form a GSO run.
pub(super) struct TxBatch {
    buf: Vec<u8>,
    used: usize,
    packets: Vec<(SocketAddr, Range<usize>)>,
}

impl TxBatch {
    pub(super) fn new(bytes: usize, packets: usize) -> Self {
        Self {
            buf: vec![0; bytes],
            used: 0,
            packets: Vec::with_capacity(packets),
        }
    }

    /// The unused tail of the buffer, to encrypt the next datagram into.
    pub(super) fn free(&mut self) -> &mut [u8] {
        &mut self.buf[self.used..]
    }

    /// Space left in [`TxBatch::free`].
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.used
    }

    /// Records a datagram written at `range` of [`TxBatch::free`].
    pub(super) fn push(&mut self, to: SocketAddr, range: Range<usize>) {
        let start = self.used + range.start;
        let end = self.used + range.end;
        self.used = end;
        self.packets.push((to, start..end));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Datagrams waiting.
    pub(super) fn len(&self) -> usize {
        self.packets.len()
    }

    /// The datagrams as sends: `(to, contents, segment)`, where a run of
    /// datagrams to one destination, contiguous, all `segment` bytes but a
    /// shorter last one, is one GSO send of at most `max_segments`.
    pub(super) fn runs(
        &self,
        max_segments: usize,
    ) -> impl Iterator<Item = (SocketAddr, &[u8], Option<usize>)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            let (to, first) = self.packets.get(i)?.clone();
            let stride = first.len();
            let mut end = first.end;
            let mut n = 1;
            while n < max_segments {
                let Some((next_to, next)) = self.packets.get(i + n) else {
                    break;
                };
                if *next_to != to
                    || next.start != end
                    || next.len() > stride
                    || next.end - first.start > MAX_GSO_BYTES
                {
                    break;
                }
                end = next.end;
                n += 1;
                if next.len() < stride {
                    break;
                }
            }
            i += n;
            Some((to, &self.buf[first.start..end], (n > 1).then_some(stride)))
        })
    }

    pub(super) fn clear(&mut self) {
        self.used = 0;
        self.packets.clear();
    }
}

/// Treats an IPv4-mapped IPv6 source as the IPv4 address it is.
pub(super) fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => a,
        },
        a => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(packets: &[(u16, usize)]) -> TxBatch {
        let mut b = TxBatch::new(1 << 17, packets.len());
        for &(port, len) in packets {
            b.push(SocketAddr::from(([198, 18, 0, 2], port)), 0..len);
        }
        b
    }

    fn shape(b: &TxBatch, max: usize) -> Vec<(u16, usize, Option<usize>)> {
        b.runs(max)
            .map(|(to, c, seg)| (to.port(), c.len(), seg))
            .collect()
    }

    #[test]
    fn runs_group_equal_datagrams_to_one_destination() {
        // Three full datagrams and a short one to port 1, then one to port 2.
        let b = batch(&[(1, 100), (1, 100), (1, 100), (1, 40), (2, 100)]);
        assert_eq!(
            shape(&b, 64),
            vec![(1, 340, Some(100)), (2, 100, None)],
            "a shorter datagram ends its run"
        );
        assert_eq!(
            shape(&b, 2),
            vec![(1, 200, Some(100)), (1, 140, Some(100)), (2, 100, None)],
            "at most max_segments per send"
        );
        assert_eq!(shape(&b, 1).len(), 5, "no GSO: one send each");
    }

    #[test]
    fn a_longer_datagram_or_another_destination_starts_a_new_run() {
        let b = batch(&[(1, 40), (1, 100), (2, 100), (1, 100)]);
        assert_eq!(
            shape(&b, 64),
            vec![
                (1, 40, None),
                (1, 100, None),
                (2, 100, None),
                (1, 100, None)
            ]
        );
        // Runs never exceed the 64 KiB a GSO send may carry.
        let big = batch(&[(1, 30_000), (1, 30_000), (1, 30_000)]);
        assert_eq!(
            shape(&big, 64),
            vec![(1, 60_000, Some(30_000)), (1, 30_000, None)]
        );
    }
}
