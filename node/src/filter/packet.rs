//! IP packet parsing for the filter: IPv4 and IPv6 (with extension headers and
//! fragments), TCP, UDP, ICMP and ICMPv6. Pure: no I/O, no allocation.
//!
//! The parser fails closed: anything it cannot fully account for (truncated
//! headers, lengths that disagree with the buffer, too many extension headers, a
//! first fragment that does not carry the whole transport header) is an error,
//! and the filter drops the packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;
/// IP protocol number of SCTP.
pub const PROTO_SCTP: u8 = 132;

/// TCP flag bits used by conntrack.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK.
pub const TCP_ACK: u8 = 0x10;

/// More extension headers than this is treated as an attack, not a packet.
const MAX_EXT_HEADERS: usize = 8;

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The buffer is shorter than the header it claims to carry.
    #[error("truncated packet")]
    Truncated,
    /// The IP version nibble is neither 4 nor 6.
    #[error("unknown IP version")]
    BadVersion,
    /// A length field (IHL, total length, payload length, extension length) is inconsistent.
    #[error("inconsistent length field")]
    BadLength,
    /// Too many IPv6 extension headers, or a first fragment that does not carry
    /// the whole transport header (RFC 7112), or a TCP fragment at offset 8 (RFC 1858).
    #[error("suspicious header chain or fragment")]
    Suspicious,
}

/// Fragment position of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment.
    None,
    /// The first fragment (offset 0, more fragments follow); carries the transport header.
    First {
        /// IP identification (IPv4: 16 bits; IPv6: 32 bits).
        id: u32,
        /// Bytes of the fragmentable part it carries: a later fragment
        /// starting before this would overwrite what the filter checked.
        len: u32,
    },
    /// A later fragment: no transport header.
    Later {
        /// IP identification.
        id: u32,
        /// Byte offset of its data in the fragmentable part.
        offset: u32,
    },
}

/// The transport-layer facts the filter needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP, UDP or SCTP: ports, and TCP flags (0 for UDP/SCTP).
    Ports {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
        /// TCP flags byte (0 unless TCP).
        flags: u8,
    },
    /// ICMP/ICMPv6 echo request or reply.
    Echo {
        /// Echo identifier.
        id: u16,
        /// True for a request, false for a reply.
        request: bool,
    },
    /// ICMP/ICMPv6 error carrying the start of the packet that caused it.
    IcmpError(Option<Inner>),
    /// Any other ICMP/ICMPv6 message.
    IcmpOther {
        /// ICMP type.
        kind: u8,
    },
    /// No transport header parsed: a later fragment, or a protocol without ports.
    Opaque,
}

/// The flow of the packet quoted inside an ICMP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner {
    /// Quoted source (the address of the host the error is sent to).
    pub src: IpAddr,
    /// Quoted destination.
    pub dst: IpAddr,
    /// Quoted protocol.
    pub proto: u8,
    /// Quoted source port or echo id.
    pub src_port: u16,
    /// Quoted destination port (0 for echo).
    pub dst_port: u16,
}

/// A parsed IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Fragment position.
    pub fragment: Fragment,
    /// Transport facts.
    pub transport: Transport,
}

/// Parses an IPv4 or IPv6 packet.
///
/// # Errors
/// A [`ParseError`] for anything that is not a well-formed packet; callers drop it.
pub fn parse(buf: &[u8]) -> Result<Packet, ParseError> {
    match buf.first().map(|b| b >> 4) {
        Some(4) => parse_v4(buf, true),
        Some(6) => parse_v6(buf, true),
        Some(_) => Err(ParseError::BadVersion),
        None => Err(ParseError::Truncated),
    }
}

/// Reads the source address of an IPv4/IPv6 packet without a full parse.
pub fn source(buf: &[u8]) -> Option<IpAddr> {
    match buf.first()? >> 4 {
        4 if buf.len() >= 20 => Some(IpAddr::V4(ipv4_at(buf, 12))),
        6 if buf.len() >= 40 => Some(IpAddr::V6(ipv6_at(buf, 8))),
        _ => None,
    }
}

/// Reads the destination address of an IPv4/IPv6 packet without a full parse.
pub fn destination(buf: &[u8]) -> Option<IpAddr> {
    match buf.first()? >> 4 {
        4 if buf.len() >= 20 => Some(IpAddr::V4(ipv4_at(buf, 16))),
        6 if buf.len() >= 40 => Some(IpAddr::V6(ipv6_at(buf, 24))),
        _ => None,
    }
}

fn ipv4_at(buf: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(buf[off], buf[off + 1], buf[off + 2], buf[off + 3])
}

fn ipv6_at(buf: &[u8], off: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&buf[off..off + 16]);
    Ipv6Addr::from(a)
}

fn be16(buf: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([buf[off], buf[off + 1]])
}

/// `outer` is false when parsing the quote inside an ICMP error: the quote is
/// usually truncated, so the length fields are not checked against the buffer
/// and no nested error is followed.
fn parse_v4(buf: &[u8], outer: bool) -> Result<Packet, ParseError> {
    if buf.len() < 20 {
        return Err(ParseError::Truncated);
    }
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(ParseError::BadLength);
    }
    if buf.len() < ihl {
        return Err(ParseError::Truncated);
    }
    let end = if outer {
        let total = usize::from(be16(buf, 2));
        if total < ihl || total > buf.len() {
            return Err(ParseError::BadLength);
        }
        total
    } else {
        buf.len()
    };
    let proto = buf[9];
    let flags_frag = be16(buf, 6);
    let more = flags_frag & 0x2000 != 0;
    let offset = flags_frag & 0x1fff;
    let id = u32::from(be16(buf, 4));
    let src = IpAddr::V4(ipv4_at(buf, 12));
    let dst = IpAddr::V4(ipv4_at(buf, 16));
    let fragment = match (offset, more) {
        (0, false) => Fragment::None,
        (0, true) => Fragment::First {
            id,
            len: (end - ihl) as u32,
        },
        _ => Fragment::Later {
            id,
            offset: u32::from(offset) * 8,
        },
    };
    if let Fragment::Later { .. } = fragment {
        // RFC 1858: a TCP fragment at offset 8 can rewrite the flags of the first.
        if proto == PROTO_TCP && offset == 1 {
            return Err(ParseError::Suspicious);
        }
        return Ok(Packet {
            src,
            dst,
            proto,
            fragment,
            transport: Transport::Opaque,
        });
    }
    let payload = &buf[ihl..end];
    let transport = parse_transport(proto, payload, false, outer, &fragment)?;
    Ok(Packet {
        src,
        dst,
        proto,
        fragment,
        transport,
    })
}

fn parse_v6(buf: &[u8], outer: bool) -> Result<Packet, ParseError> {
    if buf.len() < 40 {
        return Err(ParseError::Truncated);
    }
    let end = if outer {
        let total = 40 + usize::from(be16(buf, 4));
        if total > buf.len() {
            return Err(ParseError::BadLength);
        }
        total
    } else {
        buf.len()
    };
    let src = IpAddr::V6(ipv6_at(buf, 8));
    let dst = IpAddr::V6(ipv6_at(buf, 24));
    let mut next = buf[6];
    let mut off = 40;
    let mut fragment = Fragment::None;
    let mut seen = 0;
    loop {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                if off + 2 > end {
                    return Err(ParseError::Truncated);
                }
                let len = (usize::from(buf[off + 1]) + 1) * 8;
                if off + len > end {
                    return Err(ParseError::BadLength);
                }
                next = buf[off];
                off += len;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                if off + 2 > end {
                    return Err(ParseError::Truncated);
                }
                let len = (usize::from(buf[off + 1]) + 2) * 4;
                if off + len > end {
                    return Err(ParseError::BadLength);
                }
                next = buf[off];
                off += len;
            }
            // Fragment header: 8 bytes.
            44 => {
                if off + 8 > end {
                    return Err(ParseError::Truncated);
                }
                if fragment != Fragment::None {
                    return Err(ParseError::Suspicious);
                }
                let frag = be16(buf, off + 2);
                let offset = frag >> 3;
                let more = frag & 1 != 0;
                let id =
                    u32::from_be_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
                next = buf[off];
                off += 8;
                fragment = match (offset, more) {
                    // An atomic fragment (RFC 6946) is a whole packet.
                    (0, false) => Fragment::None,
                    // Extension headers may follow the fragment header in the
                    // first fragment: the loop goes on walking them.
                    (0, true) => Fragment::First {
                        id,
                        len: (end - off) as u32,
                    },
                    // A later fragment's next header names the first header
                    // of the fragmentable part (an extension header, often),
                    // not the transport: reassembly keys on (src, dst, id).
                    _ => {
                        return Ok(Packet {
                            src,
                            dst,
                            proto: next,
                            fragment: Fragment::Later {
                                id,
                                offset: u32::from(offset) * 8,
                            },
                            transport: Transport::Opaque,
                        })
                    }
                };
            }
            _ => break,
        }
        seen += 1;
        if seen > MAX_EXT_HEADERS {
            return Err(ParseError::Suspicious);
        }
    }
    let transport = parse_transport(next, &buf[off..end], true, outer, &fragment)?;
    Ok(Packet {
        src,
        dst,
        proto: next,
        fragment,
        transport,
    })
}

fn parse_transport(
    proto: u8,
    p: &[u8],
    v6: bool,
    outer: bool,
    fragment: &Fragment,
) -> Result<Transport, ParseError> {
    // In a quote, only the first 8 bytes of the transport header are guaranteed.
    let need = match proto {
        PROTO_TCP if outer => 20,
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => 8,
        PROTO_ICMP if !v6 => 8,
        PROTO_ICMPV6 if v6 => 8,
        _ => return Ok(Transport::Opaque),
    };
    if p.len() < need {
        // A first fragment must carry the whole transport header (RFC 7112).
        return Err(if matches!(fragment, Fragment::First { .. }) {
            ParseError::Suspicious
        } else {
            ParseError::Truncated
        });
    }
    match proto {
        PROTO_TCP => {
            if outer {
                let data_off = usize::from(p[12] >> 4) * 4;
                if data_off < 20 || data_off > p.len() {
                    return Err(ParseError::BadLength);
                }
            }
            Ok(Transport::Ports {
                src: be16(p, 0),
                dst: be16(p, 2),
                flags: if outer { p[13] } else { 0 },
            })
        }
        PROTO_UDP | PROTO_SCTP => Ok(Transport::Ports {
            src: be16(p, 0),
            dst: be16(p, 2),
            flags: 0,
        }),
        _ => {
            let kind = p[0];
            let id = be16(p, 4);
            let (req, rep, is_error) = if v6 {
                (128, 129, matches!(kind, 1..=4))
            } else {
                (8, 0, matches!(kind, 3 | 11 | 12))
            };
            if kind == req || kind == rep {
                Ok(Transport::Echo {
                    id,
                    request: kind == req,
                })
            } else if is_error {
                if !outer {
                    return Ok(Transport::IcmpOther { kind });
                }
                let quote = &p[8..];
                let inner = if v6 {
                    parse_v6(quote, false).ok()
                } else {
                    parse_v4(quote, false).ok()
                };
                Ok(Transport::IcmpError(inner.and_then(quoted_flow)))
            } else {
                Ok(Transport::IcmpOther { kind })
            }
        }
    }
}

fn quoted_flow(p: Packet) -> Option<Inner> {
    let (src_port, dst_port) = match p.transport {
        Transport::Ports { src, dst, .. } => (src, dst),
        Transport::Echo { id, request: true } => (id, 0),
        _ => return None,
    };
    Some(Inner {
        src: p.src,
        dst: p.dst,
        proto: p.proto,
        src_port,
        dst_port,
    })
}

/// Builders for well-formed test packets, shared by the filter and tunnel tests.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    /// An IPv4 packet with the given protocol and transport bytes.
    pub fn v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..].copy_from_slice(payload);
        p
    }

    /// An IPv6 packet with the given next header and payload bytes.
    pub fn v6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40 + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.octets());
        p[24..40].copy_from_slice(&dst.octets());
        p[40..].copy_from_slice(payload);
        p
    }

    /// A 20-byte TCP header.
    pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// An 8-byte UDP header plus `data`.
    pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 8];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        t.extend_from_slice(data);
        t
    }

    /// An ICMP(v6) header with type, code 0, and the echo id.
    pub fn icmp(kind: u8, id: u16) -> Vec<u8> {
        let mut t = vec![0u8; 8];
        t[0] = kind;
        t[4..6].copy_from_slice(&id.to_be_bytes());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn a6() -> Ipv6Addr {
        "fd00::1".parse().unwrap()
    }
    fn b6() -> Ipv6Addr {
        "fd00::2".parse().unwrap()
    }

    #[test]
    fn parses_tcp_over_ipv4() {
        let p = parse(&v4(A, B, PROTO_TCP, &tcp(40000, 22, TCP_SYN))).unwrap();
        assert_eq!(p.proto, PROTO_TCP);
        assert_eq!(
            p.transport,
            Transport::Ports {
                src: 40000,
                dst: 22,
                flags: TCP_SYN
            }
        );
        assert_eq!(p.fragment, Fragment::None);
    }

    #[test]
    fn parses_udp_after_ipv6_extension_headers() {
        // Hop-by-hop (8 bytes) -> destination options (16 bytes) -> UDP.
        let mut payload = vec![60, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[PROTO_UDP, 1]);
        payload.extend_from_slice(&[0; 14]);
        payload.extend_from_slice(&udp(5353, 53, b"q"));
        let p = parse(&v6(a6(), b6(), 0, &payload)).unwrap();
        assert_eq!(p.proto, PROTO_UDP);
        assert!(matches!(p.transport, Transport::Ports { dst: 53, .. }));
    }

    #[test]
    fn rejects_ipv6_extension_length_overflow() {
        let payload = vec![PROTO_UDP, 200, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse(&v6(a6(), b6(), 0, &payload)),
            Err(ParseError::BadLength)
        );
    }

    #[test]
    fn rejects_ipv6_extension_header_chains_that_are_too_long() {
        let mut payload = Vec::new();
        for _ in 0..12 {
            payload.extend_from_slice(&[60, 0, 0, 0, 0, 0, 0, 0]);
        }
        payload.extend_from_slice(&udp(1, 2, b""));
        assert_eq!(
            parse(&v6(a6(), b6(), 60, &payload)),
            Err(ParseError::Suspicious)
        );
    }

    #[test]
    fn rejects_bad_ipv4_lengths() {
        let mut p = v4(A, B, PROTO_UDP, &udp(1, 2, b"x"));
        p[0] = 0x44; // IHL 4
        assert_eq!(parse(&p), Err(ParseError::BadLength));
        let mut p = v4(A, B, PROTO_UDP, &udp(1, 2, b"x"));
        p[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(parse(&p), Err(ParseError::BadLength));
        let p = v4(A, B, PROTO_TCP, &[0; 10]);
        assert_eq!(parse(&p), Err(ParseError::Truncated));
        assert_eq!(parse(&[]), Err(ParseError::Truncated));
        assert_eq!(parse(&[0x50; 40]), Err(ParseError::BadVersion));
    }

    #[test]
    fn classifies_ipv4_fragments() {
        let mut first = v4(A, B, PROTO_UDP, &udp(1, 2, b"abcdefgh"));
        first[4..6].copy_from_slice(&7u16.to_be_bytes());
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        let p = parse(&first).unwrap();
        assert_eq!(p.fragment, Fragment::First { id: 7, len: 16 });
        assert!(matches!(p.transport, Transport::Ports { dst: 2, .. }));

        let mut later = v4(A, B, PROTO_UDP, b"tail");
        later[4..6].copy_from_slice(&7u16.to_be_bytes());
        later[6..8].copy_from_slice(&3u16.to_be_bytes());
        let p = parse(&later).unwrap();
        assert_eq!(p.fragment, Fragment::Later { id: 7, offset: 24 });
        assert_eq!(p.transport, Transport::Opaque);
    }

    #[test]
    fn rejects_tiny_and_overlapping_tcp_fragments() {
        // First fragment too short to carry the TCP header.
        let mut first = v4(A, B, PROTO_TCP, &[0; 8]);
        first[6..8].copy_from_slice(&0x2000u16.to_be_bytes());
        assert_eq!(parse(&first), Err(ParseError::Suspicious));
        // A TCP fragment at offset 8 bytes (RFC 1858).
        let mut later = v4(A, B, PROTO_TCP, &[0; 8]);
        later[6..8].copy_from_slice(&1u16.to_be_bytes());
        assert_eq!(parse(&later), Err(ParseError::Suspicious));
    }

    #[test]
    fn ipv6_first_fragment_is_matched_on_ports() {
        let mut payload = vec![PROTO_TCP, 0, 0, 1, 0, 0, 0, 9]; // offset 0, M=1, id 9
        payload.extend_from_slice(&tcp(1234, 443, TCP_SYN));
        let p = parse(&v6(a6(), b6(), 44, &payload)).unwrap();
        assert_eq!(p.fragment, Fragment::First { id: 9, len: 20 });
        assert!(matches!(p.transport, Transport::Ports { dst: 443, .. }));
        let later = [PROTO_TCP, 0, 0, 24, 0, 0, 0, 9, 1, 2, 3];
        let p = parse(&v6(a6(), b6(), 44, &later)).unwrap();
        assert_eq!(p.fragment, Fragment::Later { id: 9, offset: 24 });
    }

    /// Extension headers after the fragment header (a destination options
    /// header here) are walked in the first fragment; a later fragment names
    /// that header, not the transport, as its next header.
    #[test]
    fn ipv6_extension_headers_after_the_fragment_header() {
        // Fragment header (next: dest opts, offset 0, M=1, id 5), dest opts
        // (next: TCP, 8 bytes), then TCP.
        let mut payload = vec![60, 0, 0, 1, 0, 0, 0, 5];
        payload.extend_from_slice(&[PROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        payload.extend_from_slice(&tcp(1234, 443, TCP_SYN));
        let p = parse(&v6(a6(), b6(), 44, &payload)).unwrap();
        assert_eq!(p.proto, PROTO_TCP);
        assert_eq!(p.fragment, Fragment::First { id: 5, len: 28 });
        assert!(matches!(p.transport, Transport::Ports { dst: 443, .. }));
        let later = [60, 0, 0, 32, 0, 0, 0, 5, 9, 9, 9, 9];
        let p = parse(&v6(a6(), b6(), 44, &later)).unwrap();
        assert_eq!(p.fragment, Fragment::Later { id: 5, offset: 32 });
        assert_eq!(p.transport, Transport::Opaque);
    }

    #[test]
    fn parses_icmp_echo_and_errors() {
        let p = parse(&v4(A, B, PROTO_ICMP, &icmp(8, 77))).unwrap();
        assert_eq!(
            p.transport,
            Transport::Echo {
                id: 77,
                request: true
            }
        );
        let quoted = v4(B, A, PROTO_UDP, &udp(5000, 53, b""));
        let mut err = icmp(3, 0);
        err.extend_from_slice(&quoted[..28]);
        let p = parse(&v4(A, B, PROTO_ICMP, &err)).unwrap();
        let Transport::IcmpError(Some(inner)) = p.transport else {
            panic!("expected an ICMP error with a quote: {p:?}");
        };
        assert_eq!(inner.src, IpAddr::V4(B));
        assert_eq!(inner.dst_port, 53);
        let p = parse(&v6(a6(), b6(), PROTO_ICMPV6, &icmp(129, 5))).unwrap();
        assert_eq!(
            p.transport,
            Transport::Echo {
                id: 5,
                request: false
            }
        );
    }

    #[test]
    fn never_panics_on_truncations_of_valid_packets() {
        let samples = [
            v4(A, B, PROTO_TCP, &tcp(1, 2, TCP_SYN)),
            v6(a6(), b6(), PROTO_UDP, &udp(1, 2, b"xyz")),
            v4(A, B, PROTO_ICMP, &icmp(3, 0)),
        ];
        for s in samples {
            for n in 0..s.len() {
                let _ = parse(&s[..n]);
            }
        }
    }
}
