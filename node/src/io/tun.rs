//! The TUN device with offloads: with `IFF_VNET_HDR` and TSO/USO enabled the
//! kernel hands us up to 64 KiB "super-packets" that tun-rs splits into
//! MTU-sized segments (one `read` for up to ~45 packets), and coalesces the
//! TCP/UDP segments we deliver into super-packets (GRO) before writing, so the
//! inner stack and our syscalls see one packet where the wire saw dozens.
//! Kernels without TUN offloads get a plain TUN and one packet per syscall.

use std::io;

use tun_rs::{AsyncDevice, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// Largest packet the kernel hands over or accepts with offloads (64 KiB).
const SUPER_PACKET: usize = 65_536;

/// Buffers for reading from the TUN: the raw read and the split segments.
pub(super) struct TunRx {
    raw: Vec<u8>,
    segments: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl TunRx {
    /// `mtu`: the interface MTU, the largest segment tun-rs produces.
    pub(super) fn new(mtu: usize) -> Self {
        let mut segments: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE).map(|_| vec![0; mtu]).collect();
        // Without offloads the whole packet lands in the first buffer.
        segments[0] = vec![0; SUPER_PACKET];
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + SUPER_PACKET],
            segments,
            sizes: vec![0; IDEAL_BATCH_SIZE],
        }
    }

    /// One read: `WouldBlock` when nothing is queued; else the packet count.
    pub(super) fn try_recv(&mut self, tun: &AsyncDevice) -> io::Result<usize> {
        tun.try_recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
    }

    /// The `i`-th packet of the last read.
    pub(super) fn packet(&self, i: usize) -> &[u8] {
        &self.segments[i][..self.sizes[i]]
    }
}

/// Decrypted packets waiting to be written, each with room for the virtio
/// header in front; GRO appends same-flow packets to the first of the flow,
/// so every buffer can grow to a super-packet without reallocating.
pub(super) struct TunTx {
    bufs: Vec<Vec<u8>>,
    used: usize,
    gro: GROTable,
}

impl TunTx {
    pub(super) fn new() -> Self {
        Self {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + SUPER_PACKET))
                .collect(),
            used: 0,
            gro: GROTable::new(),
        }
    }

    /// Packets waiting.
    pub(super) fn len(&self) -> usize {
        self.used
    }

    pub(super) fn is_full(&self) -> bool {
        self.used == self.bufs.len()
    }

    /// The last [`TunTx::slot`] as the device left it (not committed).
    pub(super) fn current(&self) -> &[u8] {
        &self.bufs[self.used][VIRTIO_NET_HDR_LEN..]
    }

    /// The next free slot, `len` bytes after the header room, for the device
    /// to decrypt into. Call [`TunTx::commit`] to keep what it wrote.
    pub(super) fn slot(&mut self, len: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.used];
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN + len, 0);
        &mut buf[VIRTIO_NET_HDR_LEN..]
    }

    /// Keeps bytes `start..end` of the last [`TunTx::slot`] as a packet.
    pub(super) fn commit(&mut self, start: usize, end: usize) {
        let buf = &mut self.bufs[self.used];
        if start > 0 {
            buf.copy_within(
                VIRTIO_NET_HDR_LEN + start..VIRTIO_NET_HDR_LEN + end,
                VIRTIO_NET_HDR_LEN,
            );
        }
        buf.truncate(VIRTIO_NET_HDR_LEN + end - start);
        self.used += 1;
    }

    /// Writes every pending packet (coalesced where offloads allow), then empties.
    pub(super) async fn flush(&mut self, tun: &AsyncDevice) {
        if self.used == 0 {
            return;
        }
        let r = tun
            .send_multiple(
                &mut self.gro,
                &mut self.bufs[..self.used],
                VIRTIO_NET_HDR_LEN,
            )
            .await;
        if let Err(e) = r {
            tracing::trace!(error = %e, "TUN write failed");
        }
        self.used = 0;
    }
}
