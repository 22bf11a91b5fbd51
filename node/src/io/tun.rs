//! The TUN device with offloads: with `IFF_VNET_HDR` and TSO/USO enabled the
//! kernel hands us up to 64 KiB "super-packets" that tun-rs splits into
//! MTU-sized segments (one `read` for up to ~45 packets), and coalesces the
//! TCP/UDP segments we deliver into super-packets (GRO) before writing, so the
//! inner stack and our syscalls see one packet where the wire saw dozens.
//! Kernels without TUN offloads get a plain TUN and one packet per syscall.

use std::io;

use tun_rs::{ExpandBuffer, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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

    /// One read (the device is non-blocking): `WouldBlock` when nothing is
    /// queued; else the packet count.
    pub(super) fn try_recv(&mut self, tun: &SyncDevice) -> io::Result<usize> {
        tun.recv_multiple(&mut self.raw, &mut self.segments, &mut self.sizes, 0)
    }

    /// The `i`-th packet of the last read.
    pub(super) fn packet(&self, i: usize) -> &[u8] {
        &self.segments[i][..self.sizes[i]]
    }
}

/// One buffer of [`TunTx`]: the first `len` bytes of `data`. `data` is
/// reserved at its full size but only initialized (zeroed) as far as a packet
/// has reached, once: its length is a high-water mark that never shrinks, so
/// the next packet of the same size writes nothing before it is decrypted. A
/// plain `Vec` truncated to each packet would be zero-filled again by the
/// next `resize` (a memset of every packet, 1.1 % of the receiver in
/// `docs/perf/`); zeroing all of it up front would touch 64 KiB per buffer
/// (8 MiB) of memory an idle node never uses.
struct Frame {
    data: Vec<u8>,
    len: usize,
}

impl Frame {
    fn new(capacity: usize) -> Self {
        Self {
            data: Vec::with_capacity(capacity),
            len: 0,
        }
    }

    /// Sets the length to `len`, zeroing only bytes no packet has reached.
    /// Bytes below the high-water mark keep what an earlier packet left.
    fn set_len(&mut self, len: usize) {
        if len > self.data.len() {
            self.data.resize(len, 0);
        }
        self.len = len;
    }
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for Frame {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

/// What tun-rs's GRO needs: it checks the capacity before it coalesces, then
/// grows the first packet of a flow by the payloads of the others.
impl ExpandBuffer for Frame {
    fn buf_capacity(&self) -> usize {
        self.data.capacity()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let old = self.len;
        self.set_len(new_len);
        if new_len > old {
            self.data[old..new_len].fill(value);
        }
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let start = self.len;
        self.set_len(start + src.len());
        self.data[start..self.len].copy_from_slice(src);
    }
}

/// Decrypted packets waiting to be written, each with room for the virtio
/// header in front; GRO appends same-flow packets to the first of the flow,
/// so every buffer can grow to a super-packet without reallocating.
pub(super) struct TunTx {
    bufs: Vec<Frame>,
    used: usize,
    gro: GROTable,
}

impl TunTx {
    pub(super) fn new() -> Self {
        Self {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Frame::new(VIRTIO_NET_HDR_LEN + SUPER_PACKET))
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
        &self.bufs[self.used].as_ref()[VIRTIO_NET_HDR_LEN..]
    }

    /// The next free slot, `len` bytes after the header room, for the device
    /// to decrypt into. Call [`TunTx::commit`] to keep what it wrote. The
    /// slot holds an earlier packet's bytes; only the virtio header is zeroed
    /// (GRO writes a header only for the packets it coalesces).
    pub(super) fn slot(&mut self, len: usize) -> &mut [u8] {
        let buf = &mut self.bufs[self.used];
        buf.set_len(VIRTIO_NET_HDR_LEN + len);
        let buf = buf.as_mut();
        buf[..VIRTIO_NET_HDR_LEN].fill(0);
        &mut buf[VIRTIO_NET_HDR_LEN..]
    }

    /// Keeps bytes `start..end` of the last [`TunTx::slot`] as a packet.
    pub(super) fn commit(&mut self, start: usize, end: usize) {
        let buf = &mut self.bufs[self.used];
        if start > 0 {
            buf.as_mut().copy_within(
                VIRTIO_NET_HDR_LEN + start..VIRTIO_NET_HDR_LEN + end,
                VIRTIO_NET_HDR_LEN,
            );
        }
        buf.set_len(VIRTIO_NET_HDR_LEN + end - start);
        self.used += 1;
    }

    /// Writes every pending packet (coalesced where offloads allow), then
    /// empties. A TUN write does not block: the kernel takes the packet or
    /// drops it.
    pub(super) fn flush(&mut self, tun: &SyncDevice) {
        if self.used == 0 {
            return;
        }
        let r = tun.send_multiple(
            &mut self.gro,
            &mut self.bufs[..self.used],
            VIRTIO_NET_HDR_LEN,
        );
        if let Err(e) = r {
            tracing::trace!(error = %e, "TUN write failed");
        }
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames are reused without zeroing, so a hostile peer's long packet
    /// must not leak into the next, shorter one written from the same
    /// frame, and nothing left in the header room may reach the kernel.
    #[test]
    fn a_short_packet_after_a_long_one_carries_none_of_its_bytes() {
        let mut tx = TunTx::new();
        tx.slot(1500).fill(0xaa);
        tx.commit(0, 1500);
        // As after a flush: the frame is free again, its bytes stay.
        tx.used = 0;
        tx.bufs[0].as_mut()[..VIRTIO_NET_HDR_LEN].fill(0xff);

        let slot = tx.slot(200);
        assert_eq!(slot.len(), 200);
        // The device decrypts 60 bytes at offset 16 of its slot.
        slot[16..76].fill(0x11);
        tx.commit(16, 76);

        let frame = tx.bufs[0].as_ref();
        assert_eq!(frame.len(), VIRTIO_NET_HDR_LEN + 60);
        assert!(frame[..VIRTIO_NET_HDR_LEN].iter().all(|&b| b == 0));
        assert!(frame[VIRTIO_NET_HDR_LEN..].iter().all(|&b| b == 0x11));
        assert_eq!(tx.len(), 1);
    }

    /// GRO may grow a frame to a whole super-packet without reallocating.
    #[test]
    fn frames_offer_a_super_packet_of_capacity_and_grow_in_place() {
        let mut frame = Frame::new(VIRTIO_NET_HDR_LEN + SUPER_PACKET);
        assert!(frame.buf_capacity() >= VIRTIO_NET_HDR_LEN + SUPER_PACKET);
        frame.set_len(VIRTIO_NET_HDR_LEN + 100);
        let ptr = frame.as_ref().as_ptr();
        frame.buf_extend_from_slice(&[7; 1400]);
        frame.buf_resize(VIRTIO_NET_HDR_LEN + 1600, 9);
        let bytes = frame.as_ref();
        assert_eq!(bytes.len(), VIRTIO_NET_HDR_LEN + 1600);
        assert_eq!(bytes.as_ptr(), ptr, "no reallocation");
        assert!(bytes[VIRTIO_NET_HDR_LEN + 100..VIRTIO_NET_HDR_LEN + 1500]
            .iter()
            .all(|&b| b == 7));
        assert!(bytes[VIRTIO_NET_HDR_LEN + 1500..].iter().all(|&b| b == 9));
    }
}
