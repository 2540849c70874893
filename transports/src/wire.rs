//! The message header's postcard encoding, written out by hand.
//!
//! Every message is framed with a [`MessageRef`] header, read by the
//! message server and by each receiver, so its encoding is the hottest
//! code on the wire. Through serde, postcard copies each varint through a
//! scratch buffer and dispatches each field through the visitor
//! machinery; here the same bytes are written and read directly. The
//! layout is exactly postcard's (and so the one [`crate::frame`] documents):
//! varints are LEB128, at most 10 bytes for a `u64` and 5 for a variant
//! index; a string is its length as a varint, then its UTF-8 bytes; an enum
//! is its variant index as a varint, then its fields. Decoding accepts what
//! postcard accepts and fails where it fails, with the same
//! [`postcard::Error`]; the tests check both against postcard itself.

use postcard::Error;

#[cfg(feature = "io")]
use crate::protocol::MESSAGE_TAG;
use crate::protocol::{MessageKind, MessageRef, Priority, TargetRef};

/// Most bytes a `u64` varint takes.
const MAX_VARINT_U64: usize = 10;
/// Most bytes a `u32` varint (a variant index) takes.
const MAX_VARINT_U32: usize = 5;

/// Writes into a byte slice; `None` once it is full.
#[cfg(feature = "io")]
struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

#[cfg(feature = "io")]
impl Writer<'_> {
    #[inline]
    fn varint(&mut self, mut value: u64) -> Option<()> {
        loop {
            let byte = self.out.get_mut(self.len)?;
            self.len += 1;
            if value < 0x80 {
                *byte = value as u8;
                return Some(());
            }
            *byte = (value as u8) | 0x80;
            value >>= 7;
        }
    }

    #[inline]
    fn str(&mut self, s: &str) -> Option<()> {
        self.varint(s.len() as u64)?;
        let end = self.len.checked_add(s.len())?;
        self.out
            .get_mut(self.len..end)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Some(())
    }
}

/// Encodes `Header::Message(h)` (the variant index, then the fields) at the
/// start of `out`: how many bytes it took, or `None` if `out` is too small.
#[cfg(feature = "io")]
pub(crate) fn encode_message(h: &MessageRef<'_>, out: &mut [u8]) -> Option<usize> {
    let mut w = Writer { out, len: 0 };
    w.varint(u64::from(MESSAGE_TAG))?;
    w.str(h.sender)?;
    w.varint(h.incarnation)?;
    w.varint(h.seq)?;
    match h.target {
        TargetRef::Node(name) => {
            w.varint(0)?;
            w.str(name)?;
        }
        TargetRef::Group(name) => {
            w.varint(1)?;
            w.str(name)?;
        }
        TargetRef::AnyOf(name) => {
            w.varint(2)?;
            w.str(name)?;
        }
        TargetRef::All => w.varint(3)?,
    }
    w.str(h.service)?;
    match h.kind {
        MessageKind::Notify => w.varint(0)?,
        MessageKind::Send => w.varint(1)?,
        MessageKind::Request => w.varint(2)?,
        MessageKind::Reply {
            request_seq,
            requester_incarnation,
        } => {
            w.varint(3)?;
            w.varint(request_seq)?;
            w.varint(requester_incarnation)?;
        }
        MessageKind::ReplyError {
            request_seq,
            requester_incarnation,
            code,
        } => {
            w.varint(4)?;
            w.varint(request_seq)?;
            w.varint(requester_incarnation)?;
            match code {
                None => w.varint(0)?,
                Some(code) => {
                    w.varint(1)?;
                    w.varint(u64::from(code))?;
                }
            }
        }
        MessageKind::Recoverable { epoch, pseq, floor } => {
            w.varint(5)?;
            w.varint(epoch)?;
            w.varint(pseq)?;
            w.varint(floor)?;
        }
    }
    w.varint(h.priority.index() as u64)?;
    match h.expires_ms {
        None => w.varint(0)?,
        Some(at) => {
            w.varint(1)?;
            w.varint(at)?;
        }
    }
    Some(w.len)
}

/// Reads from a byte slice, as postcard's deserializer does.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn byte(&mut self) -> Result<u8, Error> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(Error::DeserializeUnexpectedEnd)?;
        self.pos += 1;
        Ok(b)
    }

    /// A varint of at most `max_bytes` bytes whose last byte holds at most
    /// `max_last` (the bits left of the type's width).
    #[inline]
    fn varint(&mut self, max_bytes: usize, max_last: u8) -> Result<u64, Error> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i == max_bytes - 1 && b > max_last {
                    return Err(Error::DeserializeBadVarint);
                }
                return Ok(out);
            }
        }
        Err(Error::DeserializeBadVarint)
    }

    #[inline]
    fn u64(&mut self) -> Result<u64, Error> {
        // 64 bits: one bit left for the tenth byte.
        self.varint(MAX_VARINT_U64, 0x01)
    }

    #[inline]
    fn variant(&mut self) -> Result<u32, Error> {
        // 32 bits: four bits left for the fifth byte.
        self.varint(MAX_VARINT_U32, 0x0F).map(|v| v as u32)
    }

    #[inline]
    fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let len = self.u64()?;
        let len = usize::try_from(len).map_err(|_| Error::DeserializeUnexpectedEnd)?;
        let end = self
            .pos
            .checked_add(len)
            .ok_or(Error::DeserializeUnexpectedEnd)?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(Error::DeserializeUnexpectedEnd)?;
        self.pos = end;
        Ok(bytes)
    }

    /// A string, checked against `slot` first: the same bytes as the
    /// string there are that string, with no UTF-8 validation; other bytes
    /// are validated and, when valid, kept in `slot` for the next header.
    #[inline]
    fn str<'s>(&mut self, slot: Option<&'s mut String>) -> Result<&'s str, Error>
    where
        'a: 's,
    {
        let bytes = self.bytes()?;
        match slot {
            Some(slot) if same_bytes(slot.as_bytes(), bytes) => Ok(slot.as_str()),
            slot => {
                let s = std::str::from_utf8(bytes).map_err(|_| Error::DeserializeBadUtf8)?;
                if let Some(slot) = slot {
                    slot.clear();
                    slot.push_str(s);
                }
                Ok(s)
            }
        }
    }
}

/// Whether `a` and `b` hold the same bytes: names (up to 16 bytes) are
/// compared as two overlapping words in place, not through a call to the
/// C library's `memcmp`, which costs more than the comparison: with `==`
/// instead, `memcmp` took 4% of the CPU samples of the `AnyOf` benchmark
/// (the server and every node compare names on each message), and the
/// case ran 6-8% slower in two interleaved A/Bs.
#[inline]
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    fn word(bytes: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(bytes);
        u64::from_ne_bytes(w)
    }
    fn half(bytes: &[u8]) -> u32 {
        let mut w = [0u8; 4];
        w.copy_from_slice(bytes);
        u32::from_ne_bytes(w)
    }
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => half(&a[..4]) == half(&b[..4]) && half(&a[n - 4..]) == half(&b[n - 4..]),
        8..=16 => word(&a[..8]) == word(&b[..8]) && word(&a[n - 8..]) == word(&b[n - 8..]),
        _ => a == b,
    }
}

/// The names of the last message header decoded on one connection, kept
/// so that the next header naming them again (the usual case: one sender
/// per connection, a few targets and services) is checked by comparing
/// bytes instead of validating UTF-8 again. Its strings keep their
/// capacity, so a changing name costs a copy, not an allocation.
#[derive(Debug, Default)]
pub struct NameCache {
    sender: String,
    target: String,
    service: String,
}

impl NameCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Decodes a [`MessageRef`] (the fields, after the variant index) from the
/// start of `buf`: the header and how many bytes it took. With `names`,
/// the names are checked against (and then kept in) the cache, and the
/// header borrows from both.
///
/// # Errors
///
/// As postcard: [`Error::DeserializeUnexpectedEnd`] when `buf` ends too
/// early, [`Error::DeserializeBadVarint`], [`Error::DeserializeBadUtf8`],
/// and [`Error::SerdeDeCustom`] for an unknown variant.
#[inline]
pub(crate) fn decode_message_with<'a>(
    buf: &'a [u8],
    names: Option<&'a mut NameCache>,
) -> Result<(MessageRef<'a>, usize), Error> {
    let (sender_slot, target_slot, service_slot) = match names {
        Some(NameCache {
            sender,
            target,
            service,
        }) => (Some(sender), Some(target), Some(service)),
        None => (None, None, None),
    };
    let mut r = Reader { buf, pos: 0 };
    let sender = r.str(sender_slot)?;
    let incarnation = r.u64()?;
    let seq = r.u64()?;
    let target = match r.variant()? {
        0 => TargetRef::Node(r.str(target_slot)?),
        1 => TargetRef::Group(r.str(target_slot)?),
        2 => TargetRef::AnyOf(r.str(target_slot)?),
        3 => TargetRef::All,
        _ => return Err(Error::SerdeDeCustom),
    };
    let service = r.str(service_slot)?;
    let kind = match r.variant()? {
        0 => MessageKind::Notify,
        1 => MessageKind::Send,
        2 => MessageKind::Request,
        3 => MessageKind::Reply {
            request_seq: r.u64()?,
            requester_incarnation: r.u64()?,
        },
        4 => MessageKind::ReplyError {
            request_seq: r.u64()?,
            requester_incarnation: r.u64()?,
            // An option's tag is one byte, as postcard reads it.
            code: match r.byte()? {
                0 => None,
                // A `u32`, read as postcard reads one (as the variant).
                1 => Some(r.variant()?),
                _ => return Err(Error::DeserializeBadOption),
            },
        },
        5 => MessageKind::Recoverable {
            epoch: r.u64()?,
            pseq: r.u64()?,
            floor: r.u64()?,
        },
        _ => return Err(Error::SerdeDeCustom),
    };
    let priority = Priority::from_index(r.variant()? as usize).ok_or(Error::SerdeDeCustom)?;
    // An option's tag is one byte, as postcard reads it.
    let expires_ms = match r.byte()? {
        0 => None,
        1 => Some(r.u64()?),
        _ => return Err(Error::DeserializeBadOption),
    };
    let header = MessageRef {
        sender,
        incarnation,
        seq,
        target,
        service,
        kind,
        priority,
        expires_ms,
    };
    Ok((header, r.pos))
}

/// [`Welcome::encode_with_members`](crate::protocol::Welcome::encode_with_members).
pub(crate) fn encode_welcome<M: AsRef<[u8]>>(
    mut welcome: crate::protocol::Welcome,
    members: &[M],
) -> Result<Vec<u8>, Error> {
    welcome.members = Vec::new();
    let tail = postcard::to_allocvec(&(&welcome.heartbeat_addr, &welcome.session_secret))?;
    let empty = postcard::to_allocvec(&crate::protocol::Header::Welcome(Box::new(welcome)))?;
    // The empty list is one byte, a zero length, just before the fields
    // after it.
    let at = empty
        .len()
        .checked_sub(tail.len() + 1)
        .filter(|&at| empty[at] == 0)
        .ok_or(Error::SerializeSeqLengthUnknown)?;
    let len: usize = members.iter().map(|m| m.as_ref().len()).sum();
    let mut out = Vec::with_capacity(empty.len() + MAX_VARINT_U64 + len);
    out.extend_from_slice(&empty[..at]);
    let mut count = members.len() as u64;
    while count >= 0x80 {
        out.push((count as u8) | 0x80);
        count >>= 7;
    }
    out.push(count as u8);
    for member in members {
        out.extend_from_slice(member.as_ref());
    }
    out.extend_from_slice(&empty[at + 1..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A welcome assembled from its members' encodings is exactly the
    /// welcome postcard encodes, for lists across the varint's widths and
    /// with or without the optional fields.
    #[test]
    fn welcome_from_encoded_members_is_postcards() {
        use crate::protocol::{Header, MemberInfo, NodeId, Role, Welcome};
        let mut rng = Rng(0x5EED_1234);
        for count in [0usize, 1, 2, 127, 128, 300, 20_000] {
            let members: Vec<MemberInfo> = (0..count)
                .map(|i| MemberInfo {
                    id: NodeId::from(format!("n-{i}-{}", rng.below(1000))),
                    incarnation: rng.number(),
                    role: Role::Server,
                    groups: (0..rng.below(3)).map(|g| format!("g{g}").into()).collect(),
                    services: (0..rng.below(3)).map(|s| format!("s{s}").into()).collect(),
                    direct_addr: (rng.below(2) == 0)
                        .then(|| std::net::SocketAddr::from(([10, 0, 0, 1], 4000))),
                    session_key: [rng.below(256) as u8; 32],
                    busy: rng.below(2) == 0,
                })
                .collect();
            let welcome = Welcome {
                version: rng.below(65536) as u16,
                cluster: "c".repeat(rng.below(200) as usize),
                max_message_bytes: rng.number(),
                members: members.clone(),
                heartbeat_addr: (count % 2 == 0)
                    .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 7000))),
                session_secret: (count % 3 == 0).then_some([7u8; 32]),
            };
            let encoded: Vec<Vec<u8>> = members
                .iter()
                .map(|m| postcard::to_allocvec(m).expect("encodes"))
                .collect();
            let expected = postcard::to_allocvec(&Header::Welcome(Box::new(welcome.clone())))
                .expect("encodes");
            assert_eq!(
                welcome.encode_with_members(&encoded).expect("encodes"),
                expected,
                "{count} members"
            );
        }
    }

    /// Decodes without a cache.
    fn decode_message(buf: &[u8]) -> Result<(MessageRef<'_>, usize), Error> {
        decode_message_with(buf, None)
    }

    /// A small deterministic generator (no dependency for a test).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A number of any width, edges included.
        fn number(&mut self) -> u64 {
            match self.below(6) {
                0 => 0,
                1 => u64::MAX,
                2 => self.below(128),
                3 => 1 << self.below(64),
                4 => (1 << self.below(64)) - 1,
                _ => self.next(),
            }
        }
    }

    const NAMES: [&str; 6] = [
        "",
        "a",
        "node-1",
        "web",
        "ünïcødé",
        "a-rather-long-service-name-x",
    ];

    fn header<'a>(rng: &mut Rng, long: &'a str) -> MessageRef<'a> {
        let name = |rng: &mut Rng| -> &'a str {
            match rng.below(8) {
                7 => long,
                i => NAMES[i as usize % NAMES.len()],
            }
        };
        let target = match rng.below(4) {
            0 => TargetRef::Node(name(rng)),
            1 => TargetRef::Group(name(rng)),
            2 => TargetRef::AnyOf(name(rng)),
            _ => TargetRef::All,
        };
        let kind = match rng.below(7) {
            0 => MessageKind::Notify,
            1 => MessageKind::Send,
            2 => MessageKind::Request,
            3 => MessageKind::ReplyError {
                request_seq: rng.number(),
                requester_incarnation: rng.number(),
                code: None,
            },
            4 => MessageKind::ReplyError {
                request_seq: rng.number(),
                requester_incarnation: rng.number(),
                code: Some(rng.number() as u32),
            },
            5 => MessageKind::Recoverable {
                epoch: rng.number(),
                pseq: rng.number(),
                floor: rng.number(),
            },
            _ => MessageKind::Reply {
                request_seq: rng.number(),
                requester_incarnation: rng.number(),
            },
        };
        MessageRef {
            sender: name(rng),
            incarnation: rng.number(),
            seq: rng.number(),
            target,
            service: name(rng),
            kind,
            priority: Priority::ALL[rng.number() as usize % Priority::ALL.len()],
            expires_ms: (rng.below(2) == 0).then(|| rng.number()),
        }
    }

    /// What postcard itself makes of `Header::Message`'s fields in `buf`.
    fn postcard_decode(buf: &[u8]) -> Result<(MessageRef<'_>, usize), Error> {
        postcard::take_from_bytes::<MessageRef<'_>>(buf)
            .map(|(h, rest)| (h, buf.len() - rest.len()))
    }

    #[test]
    fn encodes_exactly_what_postcard_encodes() {
        let long = "x".repeat(300);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..5_000 {
            let h = header(&mut rng, &long);
            let mut ours = [0u8; 1024];
            let n = encode_message(&h, &mut ours).expect("fits");
            let mut theirs = postcard::to_allocvec(&u32::from(MESSAGE_TAG)).expect("tag");
            theirs.extend(postcard::to_allocvec(&h).expect("header"));
            assert_eq!(&ours[..n], &theirs[..], "{h:?}");
            // Decoding it gives it back, whole.
            assert_eq!(decode_message(&ours[1..n]), Ok((h, n - 1)));
            // Too small a buffer is `None` at every cut, never a panic.
            for cut in [0, 1, n / 2, n - 1] {
                assert_eq!(encode_message(&h, &mut ours[..cut]), None);
            }
        }
    }

    #[test]
    fn decodes_whatever_bytes_exactly_as_postcard() {
        let long = "y".repeat(200);
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        let mut cache = NameCache::new();
        let mut buf = [0u8; 1024];
        for round in 0..20_000 {
            let h = header(&mut rng, &long);
            let n = encode_message(&h, &mut buf).expect("fits");
            let mut bytes = buf[1..n].to_vec();
            // Damage it: flip, cut, extend, or replace with noise.
            match round % 5 {
                0 => {
                    for _ in 0..=rng.below(3) {
                        let i = rng.below(bytes.len() as u64) as usize;
                        bytes[i] ^= 1 << rng.below(8);
                    }
                }
                1 => bytes.truncate(rng.below(bytes.len() as u64) as usize),
                2 => bytes.extend((0..rng.below(8)).map(|_| rng.next() as u8)),
                3 => {
                    let len = rng.below(40) as usize;
                    bytes = (0..len).map(|_| rng.next() as u8).collect();
                }
                _ => {
                    // Long varints: continuation bytes where a number was.
                    let i = rng.below(bytes.len() as u64) as usize;
                    bytes.splice(i..i, std::iter::repeat_n(0xFF, rng.below(12) as usize));
                }
            }
            let theirs = postcard_decode(&bytes);
            assert_eq!(
                decode_message(&bytes),
                theirs,
                "round {round}: {bytes:02x?}"
            );
            // Through a cache that keeps the names of earlier rounds (hits
            // and misses both), the same.
            assert_eq!(
                decode_message_with(&bytes, Some(&mut cache)),
                theirs,
                "round {round}, cached: {bytes:02x?}"
            );
        }
    }

    #[test]
    fn same_bytes_agrees_with_slice_equality() {
        let mut rng = Rng(0x5EED_0000_1234_5678);
        for _ in 0..50_000 {
            let len = rng.below(40) as usize;
            let a: Vec<u8> = (0..len).map(|_| rng.below(3) as u8).collect();
            let mut b = a.clone();
            match rng.below(4) {
                0 => {}
                1 if len > 0 => {
                    let i = rng.below(len as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                2 => b.push(0),
                _ => b = (0..rng.below(40)).map(|_| rng.below(3) as u8).collect(),
            }
            assert_eq!(same_bytes(&a, &b), a == b, "{a:?} {b:?}");
        }
    }

    #[test]
    fn a_cache_hit_gives_the_same_header_as_a_miss() {
        let mut cache = NameCache::new();
        let mut buf = [0u8; 256];
        let h = MessageRef {
            sender: "node-1",
            incarnation: 1_764_554_400_123_456_789,
            seq: 7,
            target: TargetRef::Node("ünïcødé"),
            service: "web",
            kind: MessageKind::Send,
            priority: Priority::High,
            expires_ms: None,
        };
        let n = encode_message(&h, &mut buf).expect("fits");
        for _ in 0..3 {
            assert_eq!(
                decode_message_with(&buf[1..n], Some(&mut cache)),
                Ok((h, n - 1))
            );
        }
        // Other names replace the kept ones; invalid UTF-8 is refused
        // whatever the cache holds.
        let other = MessageRef {
            sender: "node-2",
            target: TargetRef::Group("g"),
            ..h
        };
        let m = encode_message(&other, &mut buf).expect("fits");
        assert_eq!(
            decode_message_with(&buf[1..m], Some(&mut cache)),
            Ok((other, m - 1))
        );
        assert_eq!(cache.sender, "node-2");
        buf[2] = 0xFF;
        assert_eq!(
            decode_message_with(&buf[1..m], Some(&mut cache)),
            Err(Error::DeserializeBadUtf8)
        );
    }

    #[test]
    fn varint_edges_match_postcard() {
        let cases: [&[u8]; 8] = [
            // The largest u64, and one past it in the tenth byte.
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02],
            // Eleven bytes.
            &[
                0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
            ],
            // An overlong zero, which postcard accepts.
            &[0x80, 0x00],
            &[0x80],
            &[],
            &[0x00],
            &[0x05, b'a', b'b'],
        ];
        for bytes in cases {
            check_u64(bytes);
        }
        // Every length, with and without bytes after it.
        let mut rng = Rng(0x0123_4567_89AB_CDEF);
        for _ in 0..20_000 {
            let mut bytes = Vec::new();
            let len = 1 + rng.below(11) as usize;
            for i in 0..len {
                let b = rng.next() as u8;
                bytes.push(if i + 1 < len { b | 0x80 } else { b & 0x7F });
            }
            check_u64(&bytes);
            bytes.extend((0..rng.below(10)).map(|_| rng.next() as u8));
            check_u64(&bytes);
        }
    }

    /// The number (and its length), or the error, that postcard reads from
    /// `bytes`: the same from ours.
    fn check_u64(bytes: &[u8]) {
        let mut theirs = postcard::Deserializer::from_bytes(bytes);
        let value: Result<u64, _> = serde::Deserialize::deserialize(&mut theirs);
        let theirs = value.map(|v| {
            (
                v,
                bytes.len() - theirs.finalize().map_or(0, |rest| rest.len()),
            )
        });
        let mut reader = Reader { buf: bytes, pos: 0 };
        let ours = reader.u64().map(|v| (v, reader.pos));
        assert_eq!(ours, theirs, "{bytes:02x?}");
    }
}
