//! STUN Binding (RFC 5389 / RFC 8489), the one exchange ztmesh needs: a node
//! asks "what address do you see me at?" and a server answers. Pure: no I/O,
//! no clock, no randomness (the caller picks the transaction id).
//!
//! Only the Binding method is understood. Nothing is authenticated (no
//! MESSAGE-INTEGRITY check: a reflexive address is a hint that a WireGuard
//! handshake then proves or disproves, never a credential), so a response is
//! matched to its request by the 96-bit transaction id alone.
//!
//! Datagrams arrive on the data-plane socket beside WireGuard's, so
//! [`is_stun`] is the demultiplexer: it is a few byte compares, and a
//! WireGuard message (type 1..=4, then three zero bytes) is never taken for
//! STUN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value at bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header (type, length, magic cookie, transaction id).
pub const HEADER_LEN: usize = 20;
/// Size of a [`binding_response`] for an IPv4 source.
pub const RESPONSE_LEN_V4: usize = HEADER_LEN + 4 + 8;
/// Size of a [`binding_response`] for an IPv6 source.
pub const RESPONSE_LEN_V6: usize = HEADER_LEN + 4 + 20;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;

const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// The XOR-MAPPED-ADDRESS code some pre-RFC 5389 servers still send.
const ATTR_XOR_MAPPED_ADDRESS_OLD: u16 = 0x8020;

const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// Why a datagram is not a usable Binding success response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// The datagram fails [`is_stun`]: wrong size, cookie or leading bits. Drop it.
    #[error("not a stun message")]
    NotStun,
    /// A STUN message, but not a Binding response (a request, an indication,
    /// another method). Drop it.
    #[error("not a stun binding response")]
    NotBindingResponse,
    /// The server answered with a Binding error response; try another server.
    #[error("stun binding error response")]
    ErrorResponse,
    /// An attribute claims more bytes than the message holds. Drop it.
    #[error("stun attribute truncated")]
    Truncated,
    /// An address attribute with an unknown family or a wrong length. Drop it.
    #[error("malformed stun address attribute")]
    BadAddress,
    /// A well-formed success response without any mapped-address attribute.
    #[error("stun response carries no mapped address")]
    NoAddress,
}

/// A Binding request with transaction id `txid` and no attributes.
pub fn binding_request(txid: [u8; 12]) -> [u8; 20] {
    let mut out = [0u8; HEADER_LEN];
    write_header(&mut out, BINDING_REQUEST, 0, &txid);
    out
}

/// Whether `datagram` is a STUN message (RFC 5389 framing).
///
/// True when the two leading bits are zero, bytes 4..8 hold the magic cookie,
/// and the length field is a multiple of 4 equal to the size after the
/// header. A WireGuard message (first byte 1..=4, then three zero bytes) is
/// never STUN, whatever its other bytes hold.
pub fn is_stun(datagram: &[u8]) -> bool {
    if datagram.len() < HEADER_LEN {
        return false;
    }
    if (1..=4).contains(&datagram[0]) && datagram[1..4] == [0, 0, 0] {
        return false;
    }
    let length = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
        && length % 4 == 0
        && length == datagram.len() - HEADER_LEN
}

/// The transaction id and reflexive address of a Binding success response.
///
/// The address comes from XOR-MAPPED-ADDRESS (either code point), falling
/// back to MAPPED-ADDRESS; IPv4 and IPv6. Attributes this codec does not know
/// are skipped, comprehension-required ones included: old servers send RFC
/// 3489 attributes (SOURCE-ADDRESS, CHANGED-ADDRESS) in that range, and none
/// of them changes what the mapped address means. MESSAGE-INTEGRITY and
/// FINGERPRINT are skipped, not checked.
///
/// # Errors
/// [`StunError`] says why the datagram is not a usable response; the caller
/// counts and drops it.
pub fn parse_binding_response(datagram: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    match u16::from_be_bytes([datagram[0], datagram[1]]) {
        BINDING_SUCCESS => {}
        BINDING_ERROR => return Err(StunError::ErrorResponse),
        _ => return Err(StunError::NotBindingResponse),
    }
    let txid: [u8; 12] = datagram[8..HEADER_LEN]
        .try_into()
        .expect("header length checked by is_stun");

    let mut xor_mapped = None;
    let mut mapped = None;
    let mut rest = &datagram[HEADER_LEN..];
    // Each pass consumes at least 4 bytes, so this ends within len/4 passes.
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(StunError::Truncated);
        }
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = len.div_ceil(4) * 4;
        if rest.len() - 4 < padded {
            return Err(StunError::Truncated);
        }
        let value = &rest[4..4 + len];
        match kind {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_OLD if xor_mapped.is_none() => {
                xor_mapped = Some(decode_address(value, Some(&txid))?);
            }
            ATTR_MAPPED_ADDRESS if mapped.is_none() => {
                mapped = Some(decode_address(value, None)?);
            }
            _ => {}
        }
        rest = &rest[4 + padded..];
    }
    xor_mapped
        .or(mapped)
        .map(|addr| (txid, addr))
        .ok_or(StunError::NoAddress)
}

/// The responder's answer to `request` from `source`, or `None`.
///
/// A well-formed Binding request (any attributes it carries are ignored) gets
/// a success response with the same transaction id and one
/// XOR-MAPPED-ADDRESS holding `source`: [`RESPONSE_LEN_V4`] (32) or
/// [`RESPONSE_LEN_V6`] (44) bytes, never more than 2.2 times the smallest
/// request, so the responder is a poor amplifier. Anything else, including
/// every response and indication, gets nothing.
pub fn binding_response(request: &[u8], source: SocketAddr) -> Option<Vec<u8>> {
    if !is_stun(request) || u16::from_be_bytes([request[0], request[1]]) != BINDING_REQUEST {
        return None;
    }
    let txid: [u8; 12] = request[8..HEADER_LEN].try_into().ok()?;
    let (family, addr_len) = match source.ip() {
        IpAddr::V4(_) => (FAMILY_V4, 4),
        IpAddr::V6(_) => (FAMILY_V6, 16),
    };
    let attr_len = 4 + addr_len;
    let mut out = vec![0u8; HEADER_LEN + 4 + attr_len];
    let body_len = u16::try_from(4 + attr_len).expect("at most 24 bytes");
    write_header(&mut out, BINDING_SUCCESS, body_len, &txid);
    let attr = &mut out[HEADER_LEN..];
    attr[0..2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    attr[2..4].copy_from_slice(&u16::try_from(attr_len).expect("20 at most").to_be_bytes());
    attr[5] = family;
    let key = xor_key(&txid);
    let port = source.port() ^ u16::from_be_bytes([key[0], key[1]]);
    attr[6..8].copy_from_slice(&port.to_be_bytes());
    let ip: Vec<u8> = match source.ip() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for (i, byte) in ip.iter().enumerate() {
        attr[8 + i] = byte ^ key[i];
    }
    Some(out)
}

fn write_header(out: &mut [u8], kind: u16, body_len: u16, txid: &[u8; 12]) {
    out[0..2].copy_from_slice(&kind.to_be_bytes());
    out[2..4].copy_from_slice(&body_len.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..HEADER_LEN].copy_from_slice(txid);
}

/// The magic cookie followed by the transaction id: what XOR-MAPPED-ADDRESS
/// XORs its port (first two bytes) and address (first 4 or all 16) with.
fn xor_key(txid: &[u8; 12]) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[0..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..16].copy_from_slice(txid);
    key
}

/// Decodes a (XOR-)MAPPED-ADDRESS value; `txid` is `Some` for the XOR form.
fn decode_address(value: &[u8], txid: Option<&[u8; 12]>) -> Result<SocketAddr, StunError> {
    if value.len() < 4 {
        return Err(StunError::BadAddress);
    }
    let key = txid.map_or([0u8; 16], xor_key);
    let port = u16::from_be_bytes([value[2], value[3]]) ^ u16::from_be_bytes([key[0], key[1]]);
    let raw = &value[4..];
    let ip = match (value[1], raw.len()) {
        (FAMILY_V4, 4) => {
            let mut octets = [0u8; 4];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = raw[i] ^ key[i];
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        (FAMILY_V6, 16) => {
            let mut octets = [0u8; 16];
            for (i, o) in octets.iter_mut().enumerate() {
                *o = raw[i] ^ key[i];
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(StunError::BadAddress),
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TXID: [u8; 12] = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.2: sample IPv4 response (SOFTWARE, XOR-MAPPED-ADDRESS,
    /// MESSAGE-INTEGRITY, FINGERPRINT). The mapped address, 192.0.2.1:32853,
    /// is the RFC's documentation address.
    const RFC5769_V4: [u8; 80] = [
        0x01, 0x01, 0x00, 0x3c, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1,
        0x12, 0xa6, 0x43, 0x00, 0x08, 0x00, 0x14, 0x2b, 0x91, 0xf5, 0x99, 0xfd, 0x9e, 0x90, 0xc3,
        0x8c, 0x74, 0x89, 0xf9, 0x2a, 0xf9, 0xba, 0x53, 0xf0, 0x6b, 0xe7, 0xd7, 0x80, 0x28, 0x00,
        0x04, 0xc0, 0x7d, 0x4c, 0x96,
    ];

    /// RFC 5769 §2.3: sample IPv6 response; mapped address
    /// [2001:db8:1234:5678:11:2233:4455:6677]:32853.
    const RFC5769_V6: [u8; 92] = [
        0x01, 0x01, 0x00, 0x48, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6,
        0x86, 0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x0b, 0x74, 0x65, 0x73, 0x74, 0x20, 0x76,
        0x65, 0x63, 0x74, 0x6f, 0x72, 0x20, 0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01,
        0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        0x00, 0x08, 0x00, 0x14, 0xa3, 0x82, 0x95, 0x4e, 0x4b, 0xe6, 0x7b, 0xf1, 0x17, 0x84, 0xc9,
        0x7c, 0x82, 0x92, 0xc2, 0x75, 0xbf, 0xe3, 0xed, 0x41, 0x80, 0x28, 0x00, 0x04, 0xc8, 0xfb,
        0x0b, 0x4c,
    ];

    /// CRC-32 (IEEE), bitwise: only to prove the vectors were copied intact.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// RFC 5389 §15.5: FINGERPRINT = CRC-32 of everything before it XOR 0x5354554e.
    fn fingerprint_holds(msg: &[u8]) -> bool {
        let (body, fp) = msg.split_at(msg.len() - 8);
        let stored = u32::from_be_bytes(fp[4..8].try_into().unwrap());
        fp[0..4] == [0x80, 0x28, 0x00, 0x04] && crc32(body) ^ 0x5354_554e == stored
    }

    fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
    }

    #[test]
    fn test_vectors_are_intact() {
        assert!(fingerprint_holds(&RFC5769_V4));
        assert!(fingerprint_holds(&RFC5769_V6));
    }

    #[test]
    fn parses_rfc5769_ipv4_response() {
        assert!(is_stun(&RFC5769_V4));
        let (txid, addr) = parse_binding_response(&RFC5769_V4).unwrap();
        assert_eq!(txid, TXID);
        assert_eq!(addr, v4(192, 0, 2, 1, 32853));
    }

    #[test]
    fn parses_rfc5769_ipv6_response() {
        assert!(is_stun(&RFC5769_V6));
        let (txid, addr) = parse_binding_response(&RFC5769_V6).unwrap();
        assert_eq!(txid, TXID);
        let ip: Ipv6Addr = "2001:db8:1234:5678:11:2233:4455:6677".parse().unwrap();
        assert_eq!(addr, SocketAddr::new(IpAddr::V6(ip), 32853));
    }

    #[test]
    fn request_is_twenty_bytes_with_cookie_and_txid() {
        let req = binding_request(TXID);
        assert_eq!(req[0..4], [0x00, 0x01, 0x00, 0x00]);
        assert_eq!(req[4..8], [0x21, 0x12, 0xa4, 0x42]);
        assert_eq!(req[8..20], TXID);
        assert!(is_stun(&req));
        assert_eq!(
            parse_binding_response(&req),
            Err(StunError::NotBindingResponse)
        );
    }

    #[test]
    fn responder_round_trips_v4_and_v6() {
        let req = binding_request(TXID);
        let src4 = v4(198, 18, 0, 7, 41641);
        let resp = binding_response(&req, src4).unwrap();
        assert_eq!(resp.len(), RESPONSE_LEN_V4);
        assert_eq!(resp.len(), 32);
        assert_eq!(parse_binding_response(&resp), Ok((TXID, src4)));

        let src6: SocketAddr = "[fd00::1:2]:51820".parse().unwrap();
        let resp = binding_response(&req, src6).unwrap();
        assert_eq!(resp.len(), RESPONSE_LEN_V6);
        assert_eq!(resp.len(), 44);
        assert_eq!(parse_binding_response(&resp), Ok((TXID, src6)));
    }

    #[test]
    fn responder_matches_rfc5769_xor_encoding() {
        // The XOR-MAPPED-ADDRESS of the RFC vector, produced by our encoder.
        let resp = binding_response(&binding_request(TXID), v4(192, 0, 2, 1, 32853)).unwrap();
        assert_eq!(resp[HEADER_LEN..], RFC5769_V4[36..48]);
    }

    #[test]
    fn responder_ignores_request_attributes() {
        // A Binding request carrying a SOFTWARE attribute still gets answered.
        let mut req = binding_request(TXID).to_vec();
        req[3] = 8;
        req.extend_from_slice(&[0x80, 0x22, 0x00, 0x03, b'z', b't', b'm', 0]);
        let resp = binding_response(&req, v4(198, 18, 1, 1, 9)).unwrap();
        assert_eq!(resp.len(), RESPONSE_LEN_V4);
    }

    #[test]
    fn responder_answers_nothing_but_binding_requests() {
        let src = v4(198, 18, 0, 7, 1);
        assert_eq!(binding_response(&[], src), None);
        assert_eq!(binding_response(&binding_request(TXID)[..19], src), None);
        assert_eq!(binding_response(&RFC5769_V4, src), None);
        // A Binding indication (0x0011) and an Allocate request (0x0003).
        let mut ind = binding_request(TXID);
        ind[1] = 0x11;
        assert_eq!(binding_response(&ind, src), None);
        let mut alloc = binding_request(TXID);
        alloc[1] = 0x03;
        assert_eq!(binding_response(&alloc, src), None);
        // A length that lies about the size.
        let mut lie = binding_request(TXID).to_vec();
        lie[3] = 4;
        assert_eq!(binding_response(&lie, src), None);
        lie.extend_from_slice(&[0; 8]);
        assert_eq!(binding_response(&lie, src), None);
    }

    #[test]
    fn wireguard_messages_are_never_stun() {
        // Handshake initiation (148 bytes), response (92), cookie reply (64),
        // transport data (32+): even with the cookie where STUN has it, and a
        // length field that would fit.
        for (kind, len) in [(1u8, 148usize), (2, 92), (3, 64), (4, 32), (4, 1452)] {
            let mut msg = vec![0u8; len];
            msg[0] = kind;
            msg[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            assert!(!is_stun(&msg), "type {kind}");
            assert_eq!(parse_binding_response(&msg), Err(StunError::NotStun));
            assert_eq!(binding_response(&msg, v4(198, 18, 0, 1, 1)), None);
        }
    }

    #[test]
    fn is_stun_rejects_bad_framing() {
        let good = binding_request(TXID);
        assert!(is_stun(&good));
        assert!(!is_stun(&good[..19]));
        let mut high_bits = good;
        high_bits[0] = 0x40;
        assert!(!is_stun(&high_bits));
        let mut cookie = good;
        cookie[7] ^= 1;
        assert!(!is_stun(&cookie));
        let mut odd = good.to_vec();
        odd[3] = 2;
        odd.extend_from_slice(&[0, 0]);
        assert!(!is_stun(&odd), "length not a multiple of 4");
        let mut longer = good.to_vec();
        longer.extend_from_slice(&[0; 4]);
        assert!(
            !is_stun(&longer),
            "length field says 0, datagram has 4 more"
        );
    }

    #[test]
    fn truncated_attribute_is_rejected() {
        // XOR-MAPPED-ADDRESS header claims 8 bytes; only 4 follow (the
        // message length is consistent, the attribute lies).
        let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
        msg[2..4].copy_from_slice(&8u16.to_be_bytes());
        msg.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47]);
        assert_eq!(parse_binding_response(&msg), Err(StunError::Truncated));
        // A SOFTWARE attribute one byte longer than what follows it.
        let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
        msg[2..4].copy_from_slice(&8u16.to_be_bytes());
        msg.extend_from_slice(&[0x80, 0x22, 0x00, 0x05, b'a', b'b', b'c', b'd']);
        assert_eq!(parse_binding_response(&msg), Err(StunError::Truncated));
    }

    #[test]
    fn length_lie_in_header_is_not_stun() {
        let mut msg = RFC5769_V4;
        msg[3] = 0x40; // 64, but 60 bytes follow
        assert_eq!(parse_binding_response(&msg), Err(StunError::NotStun));
        let mut msg = RFC5769_V4;
        msg[3] = 0x38; // 56
        assert_eq!(parse_binding_response(&msg), Err(StunError::NotStun));
    }

    #[test]
    fn unknown_comprehension_required_attributes_are_skipped() {
        // RFC 3489 SOURCE-ADDRESS (0x0004) and an unassigned 0x7f00 before
        // the XOR-MAPPED-ADDRESS: skipped, the address still found.
        let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
        msg.extend_from_slice(&[0x00, 0x04, 0x00, 0x08, 0, 1, 0, 1, 198, 18, 0, 1]);
        msg.extend_from_slice(&[0x7f, 0x00, 0x00, 0x01, 0xff, 0, 0, 0]);
        msg.extend_from_slice(&RFC5769_V4[36..48]);
        let body = u16::try_from(msg.len() - HEADER_LEN).unwrap();
        msg[2..4].copy_from_slice(&body.to_be_bytes());
        assert_eq!(
            parse_binding_response(&msg),
            Ok((TXID, v4(192, 0, 2, 1, 32853)))
        );
    }

    #[test]
    fn falls_back_to_mapped_address_and_prefers_xor() {
        let mapped = [0x00, 0x01, 0x00, 0x08, 0, 1, 0x1f, 0x90, 198, 18, 0, 9];
        let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
        msg.extend_from_slice(&mapped);
        msg[2..4].copy_from_slice(&12u16.to_be_bytes());
        assert_eq!(
            parse_binding_response(&msg),
            Ok((TXID, v4(198, 18, 0, 9, 8080)))
        );
        // With both, XOR-MAPPED-ADDRESS wins whatever the order.
        msg.extend_from_slice(&RFC5769_V4[36..48]);
        msg[2..4].copy_from_slice(&24u16.to_be_bytes());
        assert_eq!(
            parse_binding_response(&msg),
            Ok((TXID, v4(192, 0, 2, 1, 32853)))
        );
    }

    #[test]
    fn accepts_pre_rfc_xor_mapped_code_point() {
        let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
        msg.extend_from_slice(&RFC5769_V4[36..48]);
        msg[HEADER_LEN] = 0x80;
        msg[2..4].copy_from_slice(&12u16.to_be_bytes());
        assert_eq!(
            parse_binding_response(&msg),
            Ok((TXID, v4(192, 0, 2, 1, 32853)))
        );
    }

    #[test]
    fn bad_address_attributes_are_rejected() {
        for value in [
            &[0x00, 0x03, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43][..], // family 3
            &[0x00, 0x02, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43][..], // v6, 4 bytes
            &[0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43, 0, 0, 0, 0][..], // v4, 8
            &[0x00, 0x01, 0xa1, 0x47][..],                         // no address
        ] {
            let mut msg = RFC5769_V4[..HEADER_LEN].to_vec();
            let len = u16::try_from(value.len()).unwrap();
            msg.extend_from_slice(&[0x00, 0x20]);
            msg.extend_from_slice(&len.to_be_bytes());
            msg.extend_from_slice(value);
            let body = u16::try_from(msg.len() - HEADER_LEN).unwrap();
            msg[2..4].copy_from_slice(&body.to_be_bytes());
            assert_eq!(
                parse_binding_response(&msg),
                Err(StunError::BadAddress),
                "{value:?}"
            );
        }
    }

    #[test]
    fn error_and_empty_responses_carry_no_address() {
        let mut err = binding_request(TXID);
        err[0..2].copy_from_slice(&BINDING_ERROR.to_be_bytes());
        assert_eq!(parse_binding_response(&err), Err(StunError::ErrorResponse));
        let mut empty = binding_request(TXID);
        empty[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
        assert_eq!(parse_binding_response(&empty), Err(StunError::NoAddress));
    }

    #[test]
    fn every_prefix_of_the_vectors_is_handled_without_panic() {
        for vector in [&RFC5769_V4[..], &RFC5769_V6[..]] {
            for end in 0..=vector.len() {
                let _ = is_stun(&vector[..end]);
                let _ = parse_binding_response(&vector[..end]);
                let _ = binding_response(&vector[..end], v4(198, 18, 0, 1, 1));
            }
        }
    }
}
