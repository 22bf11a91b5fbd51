//! The relay protocol's frame codec (ALPN [`ALPN`]). Pure: no I/O, no clock.
//!
//! On a byte stream (the QUIC bidirectional stream, or the TLS-over-TCP
//! fallback) every frame is
//! `u32 BE length (of type + body) | u8 type | body`, where the length is
//! at most [`MAX_FRAME_LEN`] for every type but `HELLO` and `MAP`, which
//! carry a signed netmap and may take up to [`MAX_MAP_FRAME_LEN`]
//! ([`max_len`]; a reader checks it as soon as it has the type byte, before
//! it buffers the body):
//!
//! | type | name | body |
//! |---|---|---|
//! | 1 | `HELLO` | `u16 BE len | NodeProof text` then `u32 BE len | SignedNetMap (protobuf)` |
//! | 2 | `MAP` | a newer `SignedNetMap` (protobuf) |
//! | 3 | `WELCOME` | node id, `u64 BE` |
//! | 4 | `REFUSED` | reason, UTF-8, at most [`MAX_REASON_LEN`] bytes |
//! | 5 | `DATA` | peer id `u64 BE` then one WireGuard datagram |
//!
//! The proof in `HELLO` is made by the node's machine key for the method
//! [`hello_method`]`(relay name)`, so it is worth nothing at another relay or
//! at the controller. QUIC datagrams (RFC 9221) carry `peer id u64 BE |
//! WireGuard datagram` ([`encode_datagram`], [`decode_datagram`]): towards
//! the relay the peer is the destination, from the relay it is the source.
//!
//! Decoding never panics and never allocates more than the frame it was
//! given; every refusal names the frame and the field.

use std::borrow::Cow;

use prost::Message;

use crate::auth::NodeProof;
use crate::control::SignedNetMap;

/// The TLS ALPN protocol of the relay, on QUIC and on TCP.
pub const ALPN: &[u8] = b"ztmesh-relay/1";
/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Largest `type + body` of every frame but `HELLO` and `MAP`: a maximal
/// UDP payload plus room for the headers.
pub const MAX_FRAME_LEN: usize = 65_535 + 64;
/// Largest signed netmap a `HELLO` or `MAP` carries: the bound a node
/// applies to maps from its controller, so every map a node accepts can also
/// be shown to a relay.
pub const MAX_SIGNED_MAP_LEN: usize = crate::netmap::MAX_SIGNED_MAP_BYTES;
/// Largest `type + body` of a `HELLO` or `MAP`: the map plus the `HELLO`'s
/// proof and length fields.
pub const MAX_MAP_FRAME_LEN: usize = 1 + 2 + MAX_PROOF_LEN + 4 + MAX_SIGNED_MAP_LEN;
/// Bytes of the peer id in front of a datagram.
pub const PEER_ID_LEN: usize = 8;
/// Largest WireGuard datagram a `DATA` frame (and a QUIC datagram) carries.
pub const MAX_DATAGRAM_LEN: usize = MAX_FRAME_LEN - 1 - PEER_ID_LEN;
/// Largest `REFUSED` reason.
pub const MAX_REASON_LEN: usize = 1_024;
/// Largest node proof text (as the `x-ztmesh-proof` header bounds it).
pub const MAX_PROOF_LEN: usize = 256;
/// The method prefix a relay `HELLO` proof is signed for.
pub const HELLO_METHOD_PREFIX: &str = "/ztmesh.relay.v1/";

/// The proof method for a `HELLO` to the relay named `relay_name`.
pub fn hello_method(relay_name: &str) -> String {
    format!("{HELLO_METHOD_PREFIX}{relay_name}")
}

/// Frame type bytes.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const MAP: u8 = 2;
    pub const WELCOME: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const DATA: u8 = 5;
}

/// One frame, borrowing the datagram and the reason from the input.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame<'a> {
    /// Client → relay, first frame: who I am and my current map.
    Hello { proof: NodeProof, map: SignedNetMap },
    /// Client → relay: a newer map, sent each time the node installs one.
    Map(SignedNetMap),
    /// Relay → client: the `HELLO` was accepted; the node id the relay
    /// knows the client by (from its map).
    Welcome { node_id: u64 },
    /// Relay → client: the session is refused or ended, and why.
    Refused { reason: Cow<'a, str> },
    /// Either way: one WireGuard datagram for (or from) `peer`.
    Data { peer: u64, datagram: &'a [u8] },
}

/// Why bytes are not a frame (or a frame cannot be encoded).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is 0: a frame has at least its type byte.
    #[error("frame length is 0: a frame has at least a type byte")]
    Empty,
    /// The length prefix (or the frame being encoded) exceeds the maximum.
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLong { len: usize, max: usize },
    /// The type byte is not one of [`kind`].
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A field runs past the end of the frame.
    #[error("{frame} frame truncated: {field} needs {need} bytes, {have} left")]
    Truncated {
        frame: &'static str,
        field: &'static str,
        need: usize,
        have: usize,
    },
    /// Bytes are left after the last field.
    #[error("{frame} frame has {extra} trailing bytes")]
    Trailing { frame: &'static str, extra: usize },
    /// A field has the right size but not the right content.
    #[error("{frame} frame: {field} is malformed")]
    Malformed {
        frame: &'static str,
        field: &'static str,
    },
}

impl FrameError {
    /// A short stable name for counters and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong { .. } => "too_long",
            Self::UnknownType(_) => "unknown_type",
            Self::Truncated { .. } => "truncated",
            Self::Trailing { .. } => "trailing",
            Self::Malformed { .. } => "malformed",
        }
    }
}

/// Reads a frame's length prefix: the number of bytes (type + body) that
/// follow. This checks only the bound of the largest type
/// ([`MAX_MAP_FRAME_LEN`]); [`max_len`] of the type byte is the real bound.
///
/// # Errors
/// [`FrameError::Empty`] or [`FrameError::TooLong`]; a stream that sent
/// either is out of sync and must be closed.
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    check_len(len, MAX_MAP_FRAME_LEN)?;
    Ok(len)
}

/// The largest `type + body` a frame of type `ty` may have:
/// [`MAX_MAP_FRAME_LEN`] for `HELLO` and `MAP`, [`MAX_FRAME_LEN`] for the others.
///
/// # Errors
/// [`FrameError::UnknownType`].
pub fn max_len(ty: u8) -> Result<usize, FrameError> {
    match ty {
        kind::HELLO | kind::MAP => Ok(MAX_MAP_FRAME_LEN),
        kind::WELCOME | kind::REFUSED | kind::DATA => Ok(MAX_FRAME_LEN),
        other => Err(FrameError::UnknownType(other)),
    }
}

/// Checks a frame's length against the bound of its type, before its body
/// is read: what a reader does once it has the length and the type byte.
///
/// # Errors
/// [`FrameError::UnknownType`] or [`FrameError::TooLong`].
pub fn check_frame_len(len: usize, ty: u8) -> Result<(), FrameError> {
    check_len(len, max_len(ty)?)
}

/// Decodes the first frame of `buf`: `Ok(None)` while it is incomplete,
/// else the frame and the number of bytes it took.
///
/// # Errors
/// Any [`FrameError`] of the length prefix or of the frame.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some((header, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    if let Some(&ty) = rest.first() {
        check_frame_len(len, ty)?;
    }
    let Some(frame) = rest.get(..len) else {
        return Ok(None);
    };
    Ok(Some((decode_frame(frame)?, HEADER_LEN + len)))
}

/// Decodes one frame without its length prefix (`type | body`).
///
/// # Errors
/// Any [`FrameError`].
pub fn decode_frame(frame: &[u8]) -> Result<Frame<'_>, FrameError> {
    let Some((&ty, body)) = frame.split_first() else {
        return Err(FrameError::Empty);
    };
    check_frame_len(frame.len(), ty)?;
    match ty {
        kind::HELLO => decode_hello(body),
        kind::MAP => Ok(Frame::Map(decode_map("MAP", body)?)),
        kind::WELCOME => {
            let mut r = Reader::new("WELCOME", body);
            let node_id = r.u64("node id")?;
            r.finish()?;
            Ok(Frame::Welcome { node_id })
        }
        kind::REFUSED => {
            if body.len() > MAX_REASON_LEN {
                return Err(FrameError::TooLong {
                    len: body.len(),
                    max: MAX_REASON_LEN,
                });
            }
            let reason = std::str::from_utf8(body).map_err(|_| FrameError::Malformed {
                frame: "REFUSED",
                field: "reason",
            })?;
            Ok(Frame::Refused {
                reason: Cow::Borrowed(reason),
            })
        }
        kind::DATA => {
            let (peer, datagram) = split_datagram("DATA", body)?;
            Ok(Frame::Data { peer, datagram })
        }
        other => Err(FrameError::UnknownType(other)),
    }
}

impl Frame<'_> {
    /// Appends the frame, length prefix included, to `out`.
    ///
    /// # Errors
    /// [`FrameError::TooLong`] (nothing is appended) for a map that does not
    /// fit in [`MAX_MAP_FRAME_LEN`], a datagram that does not fit in
    /// [`MAX_FRAME_LEN`], or a reason longer than
    /// [`MAX_REASON_LEN`]; [`FrameError::Empty`] for an empty datagram.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match self {
            Frame::Hello { proof, map } => {
                let proof = proof.to_string();
                let map_len = map.encoded_len();
                let len = 1 + 2 + proof.len() + 4 + map_len;
                check_len(len, MAX_MAP_FRAME_LEN)?;
                let proof_len = u16::try_from(proof.len()).map_err(|_| FrameError::TooLong {
                    len: proof.len(),
                    max: MAX_PROOF_LEN,
                })?;
                put_header(out, len, kind::HELLO);
                out.extend_from_slice(&proof_len.to_be_bytes());
                out.extend_from_slice(proof.as_bytes());
                out.extend_from_slice(&(map_len as u32).to_be_bytes());
                map.encode(out).expect("a Vec grows to fit any message");
            }
            Frame::Map(map) => {
                let len = 1 + map.encoded_len();
                check_len(len, MAX_MAP_FRAME_LEN)?;
                put_header(out, len, kind::MAP);
                map.encode(out).expect("a Vec grows to fit any message");
            }
            Frame::Welcome { node_id } => {
                put_header(out, 1 + 8, kind::WELCOME);
                out.extend_from_slice(&node_id.to_be_bytes());
            }
            Frame::Refused { reason } => {
                check_len(reason.len(), MAX_REASON_LEN)?;
                put_header(out, 1 + reason.len(), kind::REFUSED);
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::Data { peer, datagram } => encode_data(*peer, datagram, out)?,
        }
        Ok(())
    }

    /// The frame's encoding in a new vector.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn to_vec(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Appends a `DATA` frame for `peer` (without building a [`Frame`]).
///
/// # Errors
/// [`FrameError::Empty`] for an empty datagram, [`FrameError::TooLong`] for
/// one above [`MAX_DATAGRAM_LEN`].
pub fn encode_data(peer: u64, datagram: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_datagram(datagram)?;
    put_header(out, 1 + PEER_ID_LEN + datagram.len(), kind::DATA);
    out.extend_from_slice(&peer.to_be_bytes());
    out.extend_from_slice(datagram);
    Ok(())
}

/// Appends a QUIC datagram payload, `peer u64 BE | datagram`.
///
/// # Errors
/// As [`encode_data`].
pub fn encode_datagram(peer: u64, datagram: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    check_datagram(datagram)?;
    out.extend_from_slice(&peer.to_be_bytes());
    out.extend_from_slice(datagram);
    Ok(())
}

/// Splits a QUIC datagram payload into the peer id and the WireGuard datagram.
///
/// # Errors
/// [`FrameError::Truncated`] without a full peer id, [`FrameError::Empty`]
/// for an empty datagram, [`FrameError::TooLong`] above [`MAX_DATAGRAM_LEN`].
pub fn decode_datagram(payload: &[u8]) -> Result<(u64, &[u8]), FrameError> {
    split_datagram("datagram", payload)
}

fn split_datagram<'a>(frame: &'static str, body: &'a [u8]) -> Result<(u64, &'a [u8]), FrameError> {
    let mut r = Reader::new(frame, body);
    let peer = r.u64("peer id")?;
    let datagram = r.rest();
    check_datagram(datagram)?;
    Ok((peer, datagram))
}

fn check_datagram(datagram: &[u8]) -> Result<(), FrameError> {
    if datagram.is_empty() {
        return Err(FrameError::Empty);
    }
    check_len(datagram.len(), MAX_DATAGRAM_LEN)
}

fn check_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(())
}

fn put_header(out: &mut Vec<u8>, len: usize, ty: u8) {
    let len = u32::try_from(len).expect("callers bound len by MAX_MAP_FRAME_LEN");
    out.reserve(HEADER_LEN + len as usize);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(ty);
}

fn decode_hello(body: &[u8]) -> Result<Frame<'_>, FrameError> {
    let mut r = Reader::new("HELLO", body);
    let proof_len = usize::from(r.u16("proof length")?);
    if proof_len > MAX_PROOF_LEN {
        return Err(FrameError::TooLong {
            len: proof_len,
            max: MAX_PROOF_LEN,
        });
    }
    let proof_text = r.take("proof", proof_len)?;
    let proof = std::str::from_utf8(proof_text)
        .ok()
        .and_then(|t| t.parse::<NodeProof>().ok())
        .ok_or(FrameError::Malformed {
            frame: "HELLO",
            field: "proof",
        })?;
    let map_len = r.u32("map length")? as usize;
    let map = decode_map("HELLO", r.take("map", map_len)?)?;
    r.finish()?;
    Ok(Frame::Hello { proof, map })
}

/// A full signed map as a relay reads it: `SignedNetMap` without its
/// `delta` field, which prost then skips unread. Decoding a delta would
/// let anyone who connects (before any proof is checked) turn a frame of
/// empty peer entries into many times its size in memory.
#[derive(Clone, PartialEq, prost::Message)]
struct FullMapOnly {
    #[prost(bytes = "vec", tag = "1")]
    netmap: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    signature: Vec<u8>,
}

fn decode_map(frame: &'static str, bytes: &[u8]) -> Result<SignedNetMap, FrameError> {
    let map = FullMapOnly::decode(bytes).map_err(|_| FrameError::Malformed {
        frame,
        field: "signed map",
    })?;
    if map.netmap.is_empty() || map.signature.is_empty() {
        return Err(FrameError::Malformed {
            frame,
            field: "signed map",
        });
    }
    Ok(SignedNetMap {
        netmap: map.netmap,
        signature: map.signature,
        delta: None,
    })
}

/// A cursor over a frame body that names what is missing.
struct Reader<'a> {
    frame: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(frame: &'static str, buf: &'a [u8]) -> Self {
        Self { frame, buf }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated {
                frame: self.frame,
                field,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("took 4 bytes")))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        let b = self.take(field, 8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("took 8 bytes")))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Trailing {
                frame: self.frame,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;
    use crate::keys::SigningKey;

    fn proof() -> NodeProof {
        let mut rng = StdRng::seed_from_u64(7);
        let key = SigningKey::generate(&mut rng);
        NodeProof::create(&key, &hello_method("r1"), 1_000_000, &mut rng)
    }

    fn signed(n: usize) -> SignedNetMap {
        SignedNetMap {
            netmap: vec![0x08; n.max(1)],
            signature: vec![1; 64],
            delta: None,
        }
    }

    fn every_frame() -> Vec<Frame<'static>> {
        vec![
            Frame::Hello {
                proof: proof(),
                map: signed(300),
            },
            Frame::Map(signed(5_000)),
            Frame::Welcome { node_id: u64::MAX },
            Frame::Refused {
                reason: Cow::Borrowed("over memory budget"),
            },
            Frame::Refused {
                reason: Cow::Borrowed(""),
            },
            Frame::Data {
                peer: 42,
                datagram: &[4; 1_312],
            },
            Frame::Data {
                peer: 0,
                datagram: &[1; MAX_DATAGRAM_LEN],
            },
        ]
    }

    #[test]
    fn every_frame_round_trips_alone_and_back_to_back() {
        let mut stream = Vec::new();
        for f in every_frame() {
            let bytes = f.to_vec().unwrap();
            assert_eq!(decode(&bytes).unwrap(), Some((f.clone(), bytes.len())));
            stream.extend_from_slice(&bytes);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((f, used)) = decode(&stream[at..]).unwrap() {
            got.push(f);
            at += used;
        }
        assert_eq!(at, stream.len());
        assert_eq!(got, every_frame());
    }

    #[test]
    fn every_truncation_is_incomplete_not_an_error() {
        for f in every_frame() {
            let bytes = f.to_vec().unwrap();
            let cuts = [0, 1, 3, 4, 5, bytes.len() / 2, bytes.len() - 1];
            for cut in cuts.into_iter().filter(|&c| c < bytes.len()) {
                assert_eq!(decode(&bytes[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn a_frame_cut_inside_its_declared_length_names_the_missing_field() {
        // The length prefix claims fewer bytes than the fields need.
        let mut bytes = Frame::Welcome { node_id: 7 }.to_vec().unwrap();
        bytes[3] = 5;
        bytes.truncate(9);
        assert_eq!(
            decode(&bytes),
            Err(FrameError::Truncated {
                frame: "WELCOME",
                field: "node id",
                need: 8,
                have: 4
            })
        );
        let hello = Frame::Hello {
            proof: proof(),
            map: signed(100),
        }
        .to_vec()
        .unwrap();
        let short = &hello[HEADER_LEN..hello.len() - 10];
        assert!(matches!(
            decode_frame(short),
            Err(FrameError::Truncated {
                frame: "HELLO",
                field: "map",
                ..
            })
        ));
        assert!(matches!(
            decode_frame(&[kind::DATA, 1, 2, 3]),
            Err(FrameError::Truncated {
                field: "peer id",
                ..
            })
        ));
    }

    #[test]
    fn oversized_and_empty_lengths_are_refused_before_reading_the_body() {
        // Past the largest type's bound: refused on the prefix alone.
        let len = (MAX_MAP_FRAME_LEN as u32 + 1).to_be_bytes();
        assert_eq!(
            decode(&len),
            Err(FrameError::TooLong {
                len: MAX_MAP_FRAME_LEN + 1,
                max: MAX_MAP_FRAME_LEN
            })
        );
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes()).map_err(|e| e.name()),
            Err("too_long")
        );
        assert_eq!(decode(&[0, 0, 0, 0, 5]), Err(FrameError::Empty));
        assert_eq!(
            frame_len((MAX_MAP_FRAME_LEN as u32).to_be_bytes()),
            Ok(MAX_MAP_FRAME_LEN)
        );
        // Past a data frame's bound: refused as soon as the type byte is
        // there, before any body; a map may be that long.
        let data_len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
        assert_eq!(decode(&data_len), Ok(None), "the type decides");
        for ty in [kind::DATA, kind::WELCOME, kind::REFUSED] {
            let mut b = data_len.to_vec();
            b.push(ty);
            assert_eq!(
                decode(&b),
                Err(FrameError::TooLong {
                    len: MAX_FRAME_LEN + 1,
                    max: MAX_FRAME_LEN
                }),
                "type {ty}"
            );
        }
        for ty in [kind::HELLO, kind::MAP] {
            let mut b = data_len.to_vec();
            b.push(ty);
            assert_eq!(decode(&b), Ok(None), "type {ty} waits for its body");
        }
        let mut b = data_len.to_vec();
        b.push(77);
        assert_eq!(decode(&b), Err(FrameError::UnknownType(77)));
        assert_eq!(check_frame_len(MAX_FRAME_LEN, kind::DATA), Ok(()));
        assert_eq!(check_frame_len(MAX_MAP_FRAME_LEN, kind::MAP), Ok(()));
        assert!(check_frame_len(MAX_MAP_FRAME_LEN + 1, kind::HELLO).is_err());
    }

    #[test]
    fn hello_and_map_carry_maps_beyond_a_data_frame() {
        // A map of several megabytes (thousands of peers) fits HELLO and MAP.
        let big = signed(3 << 20);
        for f in [
            Frame::Hello {
                proof: proof(),
                map: big.clone(),
            },
            Frame::Map(big.clone()),
        ] {
            let bytes = f.to_vec().unwrap();
            assert!(bytes.len() > MAX_FRAME_LEN);
            assert_eq!(decode(&bytes).unwrap(), Some((f, bytes.len())));
        }
        // A map beyond the bound is refused by the encoder, not sent.
        let mut out = Vec::new();
        assert!(matches!(
            Frame::Map(signed(MAX_MAP_FRAME_LEN)).encode(&mut out),
            Err(FrameError::TooLong { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn encoding_refuses_what_cannot_be_decoded() {
        assert!(matches!(
            encode_data(1, &vec![0; MAX_DATAGRAM_LEN + 1], &mut Vec::new()),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(encode_data(1, &[], &mut Vec::new()), Err(FrameError::Empty));
        let mut out = Vec::new();
        assert!(Frame::Map(signed(MAX_MAP_FRAME_LEN))
            .encode(&mut out)
            .is_err());
        let long = "x".repeat(MAX_REASON_LEN + 1);
        assert!(Frame::Refused {
            reason: long.into()
        }
        .encode(&mut out)
        .is_err());
        assert!(out.is_empty(), "nothing appended on error");
    }

    #[test]
    fn hostile_bodies_get_precise_errors() {
        assert_eq!(decode_frame(&[9]), Err(FrameError::UnknownType(9)));
        assert_eq!(decode_frame(&[0]), Err(FrameError::UnknownType(0)));
        assert_eq!(decode_frame(&[]), Err(FrameError::Empty));
        assert_eq!(
            decode_frame(&[kind::WELCOME, 0, 0, 0, 0, 0, 0, 0, 1, 9]),
            Err(FrameError::Trailing {
                frame: "WELCOME",
                extra: 1
            })
        );
        assert_eq!(
            decode_frame(&[kind::REFUSED, 0xff, 0xfe]),
            Err(FrameError::Malformed {
                frame: "REFUSED",
                field: "reason"
            })
        );
        assert_eq!(
            decode_frame(&[kind::DATA, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(FrameError::Empty),
            "a DATA frame without a datagram"
        );
        // A map that is not protobuf, and one without a signature.
        assert!(matches!(
            decode_frame(&[kind::MAP, 0xff, 0xff, 0xff]),
            Err(FrameError::Malformed { frame: "MAP", .. })
        ));
        let unsigned = SignedNetMap {
            netmap: vec![1],
            signature: vec![],
            delta: None,
        };
        let mut m = vec![kind::MAP];
        unsigned.encode(&mut m).unwrap();
        assert!(matches!(
            decode_frame(&m),
            Err(FrameError::Malformed { .. })
        ));
        // HELLO: a proof that is too long, one that is not a proof, trailing bytes.
        let mut h = vec![kind::HELLO, 0x01, 0x01];
        h.extend_from_slice(&[b'a'; 257]);
        assert!(matches!(
            decode_frame(&h),
            Err(FrameError::TooLong { max: 256, .. })
        ));
        let mut h = vec![kind::HELLO, 0, 3];
        h.extend_from_slice(b"a.b");
        h.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(
            decode_frame(&h),
            Err(FrameError::Malformed {
                frame: "HELLO",
                field: "proof"
            })
        );
        let mut good = Frame::Hello {
            proof: proof(),
            map: signed(10),
        }
        .to_vec()
        .unwrap();
        good.push(0);
        assert!(matches!(
            decode_frame(&good[HEADER_LEN..]),
            Err(FrameError::Trailing {
                frame: "HELLO",
                extra: 1
            })
        ));
    }

    /// A map frame carrying a delta (a million empty peer entries, two
    /// bytes each on the wire) decodes without reading it: the relay takes
    /// full maps only and never builds what a delta would describe.
    #[test]
    fn a_relay_never_decodes_a_delta() {
        let mut body = vec![kind::MAP];
        SignedNetMap {
            netmap: vec![0x08, 1],
            signature: vec![1; 64],
            delta: None,
        }
        .encode(&mut body)
        .unwrap();
        let empties: Vec<u8> = [0x2a, 0x00].repeat(1_000_000);
        // Field 3 (delta), length-delimited, holding the peer entries.
        body.push(0x1a);
        prost::encoding::encode_varint(empties.len() as u64, &mut body);
        body.extend_from_slice(&empties);
        match decode_frame(&body) {
            Ok(Frame::Map(m)) => {
                assert!(m.delta.is_none());
                assert_eq!(m.netmap, [0x08, 1]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn datagrams_carry_the_peer_id_in_front() {
        let mut d = Vec::new();
        encode_datagram(0x0102_0304_0506_0708, &[9; 1_400], &mut d).unwrap();
        assert_eq!(&d[..8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            decode_datagram(&d),
            Ok((0x0102_0304_0506_0708, &[9u8; 1_400][..]))
        );
        assert!(matches!(
            decode_datagram(&d[..7]),
            Err(FrameError::Truncated { .. })
        ));
        assert_eq!(decode_datagram(&d[..8]), Err(FrameError::Empty));
        assert!(matches!(
            decode_datagram(&vec![0; 8 + MAX_DATAGRAM_LEN + 1]),
            Err(FrameError::TooLong { .. })
        ));
    }

    #[test]
    fn the_hello_proof_is_bound_to_the_relay_name() {
        assert_eq!(hello_method("r1"), "/ztmesh.relay.v1/r1");
        let p = proof();
        assert!(p.verify(&hello_method("r1"), 1_000_000).is_ok());
        assert!(p.verify(&hello_method("r2"), 1_000_000).is_err());
    }
}
