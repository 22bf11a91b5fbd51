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

    /// Sends the datagrams of `batch` for this socket's family (IPv6 or
    /// not) with as few syscalls as GSO allows.
    pub(super) fn send_batch(&self, batch: &TxBatch, v6: bool) {
        let max_segments = self.state.max_gso_segments().max(1);
        let mut i = 0;
        while i < batch.packets.len() {
            let (to, first) = batch.packets[i].clone();
            if to.is_ipv6() != v6 {
                i += 1;
                continue;
            }
            let stride = first.len();
            let mut end = first.end;
            let mut n = 1;
            // A GSO run: same destination, contiguous, every datagram `stride`
            // bytes except a shorter last one.
            while i + n < batch.packets.len() && n < max_segments {
                let (next_to, ref next) = batch.packets[i + n];
                if next_to != to
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
            let segment = (n > 1).then_some(stride);
            self.send(to, &batch.buf[first.start..end], segment);
            i += n;
        }
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
