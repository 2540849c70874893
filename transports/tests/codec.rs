//! Property and malformed-input tests of the frame codec.
//!
//! - Any header (every variant) with any body round-trips through
//!   [`FrameCodec`], one frame or many in one buffer, encoded as
//!   [`OutFrame::Parts`] or [`OutFrame::Raw`].
//! - The same streams fed one byte at a time (and in arbitrary pieces) give
//!   the same frames, in order.
//! - Arbitrary bytes never panic the decoder, nor make it reserve more than
//!   its limit allows.
//! - One named test per malformed case.
//! - [`FrameReader`] over `tokio::io::duplex`, written in tiny pieces.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder};

use transports::frame::{
    peek, Frame, FrameCodec, FrameError, OutFrame, Peeked, RawFrame, COPY_FRAMES_UP_TO,
    HANDSHAKE_MAX_FRAME_BYTES, LENGTH_PREFIX_BYTES, MAX_HEADER_BYTES,
};
use transports::io::FrameReader;
use transports::protocol::{
    Ack, AckStatus, Acks, Challenge, DeliveryFailure, Header, Hello, Interests, LeaveReason,
    MemberEvent, MemberInfo, MessageHeader, MessageKind, NodeId, NodeReport, Proof, Refusal,
    RefusalReason, Role, Routed, Target, Welcome,
};

/// Upper bound on any await in the async tests.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Short text, any printable unicode (multi-byte characters included).
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn node_id() -> impl Strategy<Value = NodeId> {
    text().prop_map(NodeId::from)
}

fn names() -> impl Strategy<Value = Vec<String>> {
    vec(text(), 0..4)
}

/// Socket addresses as the wire carries them: serde encodes an IPv6
/// address as (ip, port) only, so flow info and scope id are always 0 here.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let v4 = (any::<[u8; 4]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(ip), port).into());
    let v6 = (any::<[u16; 8]>(), any::<u16>())
        .prop_map(|(ip, port)| SocketAddrV6::new(Ipv6Addr::from(ip), port, 0, 0).into());
    prop_oneof![v4, v6]
}

/// The codec of a handshake once the peer is proven: frames up to
/// [`HANDSHAKE_MAX_FRAME_BYTES`], nothing reserved from a declared length.
fn handshake_codec() -> FrameCodec {
    let mut codec = FrameCodec::handshake();
    codec.set_max_frame(HANDSHAKE_MAX_FRAME_BYTES);
    codec
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Server), Just(Role::Dispatcher)]
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<u16>(),
        text(),
        node_id(),
        any::<u64>(),
        role(),
        proptest::option::of(socket_addr()),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        proptest::option::of(socket_addr().prop_map(|a| a.ip())),
        any::<bool>(),
    )
        .prop_map(
            |(
                version,
                cluster,
                node,
                incarnation,
                role,
                direct_addr,
                max_message_bytes,
                nonce,
                session_key,
                heartbeat_ip,
                rejoining,
            )| Hello {
                version,
                cluster,
                node,
                incarnation,
                role,
                direct_addr,
                max_message_bytes,
                nonce,
                session_key,
                heartbeat_ip,
                rejoining,
            },
        )
}

fn member_info() -> impl Strategy<Value = MemberInfo> {
    (
        node_id(),
        any::<u64>(),
        role(),
        names(),
        names(),
        proptest::option::of(socket_addr()),
        (any::<[u8; 32]>(), any::<bool>()),
    )
        .prop_map(
            |(id, incarnation, role, groups, services, direct_addr, (session_key, busy))| {
                MemberInfo {
                    id,
                    incarnation,
                    role,
                    groups: groups.into_iter().map(Into::into).collect(),
                    services: services.into_iter().map(Into::into).collect(),
                    direct_addr,
                    session_key,
                    busy,
                }
            },
        )
}

fn welcome() -> impl Strategy<Value = Welcome> {
    (
        any::<u16>(),
        text(),
        any::<u64>(),
        vec(member_info(), 0..4),
        proptest::option::of(socket_addr()),
        proptest::option::of(any::<[u8; 32]>()),
    )
        .prop_map(
            |(version, cluster, max_message_bytes, members, heartbeat_addr, session_secret)| {
                Welcome {
                    version,
                    cluster,
                    max_message_bytes,
                    members,
                    heartbeat_addr,
                    session_secret,
                }
            },
        )
}

fn refusal_reason() -> impl Strategy<Value = RefusalReason> {
    prop_oneof![
        (any::<u16>(), any::<u16>())
            .prop_map(|(ours, theirs)| RefusalReason::VersionMismatch { ours, theirs }),
        (text(), text()).prop_map(|(ours, theirs)| RefusalReason::ClusterMismatch { ours, theirs }),
        Just(RefusalReason::DuplicateNode),
        Just(RefusalReason::BadCredentials),
        Just(RefusalReason::ProtocolViolation),
        Just(RefusalReason::IncarnationFailed),
    ]
}

fn refusal() -> impl Strategy<Value = Refusal> {
    (refusal_reason(), text()).prop_map(|(reason, detail)| Refusal { reason, detail })
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        node_id().prop_map(Target::Node),
        text().prop_map(Target::Group),
        text().prop_map(Target::AnyOf),
        Just(Target::All),
    ]
}

fn message_kind() -> impl Strategy<Value = MessageKind> {
    prop_oneof![
        Just(MessageKind::Notify),
        Just(MessageKind::Send),
        Just(MessageKind::Request),
        (any::<u64>(), any::<u64>()).prop_map(|(request_seq, requester_incarnation)| {
            MessageKind::Reply {
                request_seq,
                requester_incarnation,
            }
        }),
    ]
}

fn message_header() -> impl Strategy<Value = MessageHeader> {
    (
        node_id(),
        any::<u64>(),
        any::<u64>(),
        target(),
        text(),
        message_kind(),
        0..transports::protocol::Priority::ALL.len(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(sender, incarnation, seq, target, service, kind, priority, expires_ms)| {
                MessageHeader {
                    sender,
                    incarnation,
                    seq,
                    target,
                    service: Arc::from(service),
                    kind,
                    priority: transports::protocol::Priority::ALL[priority],
                    expires_ms,
                }
            },
        )
}

fn delivery_failure() -> impl Strategy<Value = DeliveryFailure> {
    prop_oneof![
        Just(DeliveryFailure::UnknownTarget),
        Just(DeliveryFailure::NoSuchService),
        (any::<u64>(), any::<u64>())
            .prop_map(|(size, max)| DeliveryFailure::PayloadTooLarge { size, max }),
        Just(DeliveryFailure::ReceiverOverloaded),
        text().prop_map(DeliveryFailure::Rejected),
        Just(DeliveryFailure::TargetStopped),
        Just(DeliveryFailure::NotPermitted),
        Just(DeliveryFailure::ReceiverBusy),
        Just(DeliveryFailure::Expired),
    ]
}

fn routed() -> impl Strategy<Value = Routed> {
    (
        any::<u64>(),
        vec((node_id(), any::<u64>()), 0..4),
        vec((node_id(), delivery_failure()), 0..4),
        proptest::option::of(delivery_failure()),
    )
        .prop_map(|(seq, receivers, failed, error)| Routed {
            seq,
            receivers,
            failed,
            error,
        })
}

fn ack() -> impl Strategy<Value = Ack> {
    let status = prop_oneof![
        Just(AckStatus::Accepted),
        delivery_failure().prop_map(AckStatus::Failed),
    ];
    (
        node_id(),
        any::<u64>(),
        any::<u64>(),
        node_id(),
        any::<u64>(),
        status,
    )
        .prop_map(
            |(to, to_incarnation, seq, from, from_incarnation, status)| Ack {
                to,
                to_incarnation,
                seq,
                from,
                from_incarnation,
                status,
            },
        )
}

fn member_event() -> impl Strategy<Value = MemberEvent> {
    let reason = prop_oneof![
        Just(LeaveReason::Stopped),
        Just(LeaveReason::Disconnected),
        Just(LeaveReason::Failed),
    ];
    prop_oneof![
        member_info().prop_map(MemberEvent::Joined),
        member_info().prop_map(MemberEvent::Updated),
        (node_id(), any::<u64>(), reason).prop_map(|(id, incarnation, reason)| {
            MemberEvent::Left {
                id,
                incarnation,
                reason,
            }
        }),
    ]
}

/// Any header, every variant equally likely.
fn header() -> impl Strategy<Value = Header> {
    prop_oneof![
        hello().prop_map(|h| Header::Hello(Box::new(h))),
        welcome().prop_map(|w| Header::Welcome(Box::new(w))),
        refusal().prop_map(Header::Refused),
        message_header().prop_map(Header::Message),
        routed().prop_map(Header::Routed),
        ack().prop_map(Header::Ack),
        member_event().prop_map(Header::Member),
        (any::<u64>(), text()).prop_map(|(token, service)| Header::Subscribe { token, service }),
        text().prop_map(|service| Header::Unsubscribe { service }),
        any::<u64>().prop_map(|token| Header::Subscribed { token }),
        Just(Header::Goodbye),
        (any::<u64>(), target(), text()).prop_map(|(token, target, service)| Header::Resolve {
            token,
            target,
            service
        }),
        (
            any::<u64>(),
            prop_oneof![
                vec((node_id(), any::<u64>()), 0..4).prop_map(Ok),
                delivery_failure().prop_map(Err),
            ]
        )
            .prop_map(|(token, result)| Header::Resolved { token, result }),
        any::<u64>().prop_map(|nonce| Header::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Header::Pong { nonce }),
        (
            node_id(),
            any::<u64>(),
            node_id(),
            any::<u64>(),
            vec(any::<u64>(), 0..64)
        )
            .prop_map(|(to, to_incarnation, from, from_incarnation, seqs)| {
                Header::Acks(Acks {
                    to,
                    to_incarnation,
                    from,
                    from_incarnation,
                    seqs,
                })
            }),
        (
            any::<[u8; 16]>(),
            proptest::option::of(any::<[u8; 32]>()),
            proptest::option::of(vec(any::<u8>(), 0..80)),
        )
            .prop_map(|(nonce, secret_proof, signature)| {
                Header::Challenge(Challenge {
                    nonce,
                    secret_proof,
                    signature,
                })
            }),
        (
            proptest::option::of(any::<[u8; 32]>()),
            vec(any::<u8>(), 0..80)
        )
            .prop_map(|(secret_proof, signature)| Header::Proof(Proof {
                secret_proof,
                signature
            })),
        (any::<u64>(), text())
            .prop_map(|(token, reason)| Header::SubscribeRefused { token, reason }),
        (
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::option::of(any::<bool>()),
                any::<u64>(),
            ),
        )
            .prop_map(|((lm, lb, sm, sb), (received, open, busy, backlog))| {
                Header::Report(NodeReport {
                    lazy_messages: lm,
                    lazy_bytes: lb,
                    session_messages: sm,
                    session_bytes: sb,
                    received_direct: received,
                    channels_open: open,
                    busy,
                    backlog,
                })
            }),
        (names(), names()).prop_map(|(groups, services)| Header::Interests(Box::new(Interests {
            groups,
            services
        }))),
        dead_letter().prop_map(|d| Header::DeadLetter(Box::new(d))),
        (
            any::<u64>(),
            vec(any::<u64>(), 0..8),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(token, ids, after, limit, take, bodies)| {
                Header::DeadLetters(Box::new(transports::protocol::DeadLetterQuery {
                    token,
                    ids,
                    after,
                    limit,
                    take,
                    bodies,
                }))
            }),
        (any::<u64>(), dead_letter()).prop_map(|(token, d)| Header::DeadLetterEntry {
            token,
            entry: Box::new(d)
        }),
        (
            any::<u64>(),
            prop_oneof![
                vec(any::<u64>(), 7).prop_map(|v| Ok(transports::protocol::DeadLetterStats {
                    entries: v[0],
                    bytes: v[1],
                    added: v[2],
                    overflowed: v[3],
                    max_entries: v[4],
                    max_bytes: v[5],
                    durable: v[6],
                })),
                text().prop_map(Err),
            ]
        )
            .prop_map(|(token, result)| Header::DeadLettersEnd { token, result }),
    ]
}

/// Any dead letter.
fn dead_letter() -> impl Strategy<Value = transports::protocol::DeadLetter> {
    use transports::protocol::{DeadLetter, DeadReason};
    let reason = prop_oneof![
        Just(DeadReason::Expired),
        Just(DeadReason::TargetGone),
        Just(DeadReason::NotPermitted),
        (any::<u32>(), delivery_failure())
            .prop_map(|(attempts, last)| DeadReason::RetriesExhausted { attempts, last }),
        delivery_failure().prop_map(DeadReason::Undeliverable),
    ];
    (
        (any::<u64>(), node_id(), target(), text()),
        (
            0..transports::protocol::Priority::ALL.len(),
            reason,
            any::<u64>(),
            text(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |(
                (id, sender, target, service),
                (priority, reason, at_unix_ms, filed_by, body_bytes),
            )| {
                DeadLetter {
                    id,
                    sender,
                    target,
                    service,
                    priority: transports::protocol::Priority::ALL[priority],
                    reason,
                    at_unix_ms,
                    filed_by,
                    body_bytes,
                }
            },
        )
}

fn body() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..4096).prop_map(Bytes::from)
}

/// How a frame is handed to the encoder.
#[derive(Clone, Copy, Debug)]
enum Form {
    Parts,
    Raw,
}

fn form() -> impl Strategy<Value = Form> {
    prop_oneof![Just(Form::Parts), Just(Form::Raw)]
}

/// A header, a body, and the form to encode them in.
fn frame_spec() -> impl Strategy<Value = (Header, Bytes, Form)> {
    (header(), body(), form())
}

fn frame_specs() -> impl Strategy<Value = Vec<(Header, Bytes, Form)>> {
    vec(frame_spec(), 1..8)
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Header and body as on the wire after the length prefix, built without the
/// codec (postcard directly), so the codec is checked against the format.
fn raw_contents(header: &Header, body: &[u8]) -> Bytes {
    let mut raw = postcard::to_allocvec(header).expect("header serializes");
    raw.extend_from_slice(body);
    Bytes::from(raw)
}

fn out_frame(header: &Header, body: &Bytes, form: Form) -> OutFrame {
    match form {
        Form::Parts => OutFrame::Parts {
            header: header.clone(),
            body: body.clone(),
        },
        Form::Raw => OutFrame::Raw(raw_contents(header, body)),
    }
}

/// Encodes every frame, one after the other, into one buffer.
fn encode_all(codec: &mut FrameCodec, specs: &[(Header, Bytes, Form)]) -> BytesMut {
    let mut buf = BytesMut::new();
    for (header, body, form) in specs {
        codec
            .encode(out_frame(header, body, *form), &mut buf)
            .expect("frame within the limit encodes");
    }
    buf
}

/// Checks one decoded frame against what was encoded.
fn check_frame(frame: &Frame, header: &Header, body: &Bytes) {
    assert_eq!(frame.header(), header);
    assert_eq!(&frame.body(), body);
    assert_eq!(frame.body_len(), body.len());
    assert_eq!(frame.raw(), &raw_contents(header, body));
    let (h, b) = frame.clone().into_parts();
    assert_eq!(&h, header);
    assert_eq!(&b, body);
    check_peek(frame.raw(), header, body);
}

/// Reading the header in place gives the same fields and the same body.
fn check_peek(raw: &[u8], header: &Header, body: &[u8]) {
    let (peeked, len) = peek(raw).expect("a valid frame peeks");
    assert_eq!(&raw[len..], body);
    match (peeked, header) {
        (Peeked::Message(m), Header::Message(h)) => {
            assert_eq!(m.sender, h.sender.as_str());
            assert_eq!(m.incarnation, h.incarnation);
            assert_eq!(m.seq, h.seq);
            assert_eq!(m.target.to_target(), h.target);
            assert_eq!(m.service, &*h.service);
            assert_eq!(m.kind, h.kind);
        }
        (Peeked::Ack(a), Header::Ack(h)) => {
            assert_eq!(a.to, h.to.as_str());
            assert_eq!(a.from, h.from.as_str());
            assert_eq!(
                (a.to_incarnation, a.seq, a.from_incarnation),
                (h.to_incarnation, h.seq, h.from_incarnation)
            );
            assert_eq!(&a.status, &h.status);
        }
        (Peeked::Acks(a), Header::Acks(h)) => {
            assert_eq!((a.to, a.from), (h.to.as_str(), h.from.as_str()));
            assert_eq!(
                (a.to_incarnation, a.from_incarnation),
                (h.to_incarnation, h.from_incarnation)
            );
            assert_eq!(a.seqs.0, h.seqs.len());
        }
        (Peeked::Other(o), h) => {
            assert!(!matches!(
                h,
                Header::Message(_) | Header::Ack(_) | Header::Acks(_)
            ));
            assert_eq!(&*o, h);
        }
        (p, h) => panic!("peeked {p:?} for {h:?}"),
    }
}

/// A length prefix followed by `contents`.
fn prefixed(len: u32, contents: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(len);
    buf.extend_from_slice(contents);
    buf
}

/// Feeds `bytes` into the decoder in pieces of the sizes in `pieces`
/// (cycling), decoding after each push; returns the frames in order and
/// checks that nothing is left over.
fn decode_in_pieces(codec: &mut FrameCodec, bytes: &[u8], pieces: &[usize]) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < bytes.len() {
        let piece = pieces[i % pieces.len()].max(1);
        i += 1;
        let end = (at + piece).min(bytes.len());
        buf.extend_from_slice(&bytes[at..end]);
        at = end;
        while let Some(frame) = codec.decode(&mut buf).expect("valid stream decodes") {
            frames.push(frame);
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
    frames
}

/// Decodes `input` with a codec limited to `limit` until it needs more bytes
/// or fails, checking after each call that the buffer never grew beyond what
/// the limit allows; then ends the stream. Must never panic.
fn decode_arbitrary(input: &[u8], limit: usize) {
    // Growth is amortized (a `Vec` doubles), so allow twice the input on top
    // of one frame at the limit; a declared length above the limit reserved
    // anyway would be far above this.
    let bound = 2 * input.len() + limit + LENGTH_PREFIX_BYTES;
    let mut codec = FrameCodec::new(limit);
    let mut buf = BytesMut::from(input);
    let mut frames = 0usize;
    loop {
        let res = codec.decode(&mut buf);
        assert!(
            buf.capacity() <= bound,
            "capacity {} above {bound} (input {} bytes, limit {limit})",
            buf.capacity(),
            input.len()
        );
        match res {
            Ok(Some(frame)) => {
                assert!(frame.raw().len() <= limit);
                frames += 1;
                assert!(frames <= input.len() / (LENGTH_PREFIX_BYTES + 1));
            }
            Ok(None) => {
                let _ = codec.decode_eof(&mut buf);
                assert!(buf.capacity() <= bound);
                return;
            }
            Err(_) => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Reading a header in place never panics on arbitrary bytes, whatever
    /// tag they start with.
    #[test]
    fn peek_never_panics(tag in 0u8..16, rest in vec(any::<u8>(), 0..300)) {
        let mut raw = vec![tag];
        raw.extend_from_slice(&rest);
        if let Ok((_, len)) = peek(&raw) {
            prop_assert!(len <= raw.len());
        }
        prop_assert!(matches!(peek(&[]), Err(FrameError::Empty)));
    }

    /// One frame: header and body come back as they went in.
    #[test]
    fn any_frame_round_trips((header, body, form) in frame_spec()) {
        let mut codec = handshake_codec();
        let mut buf = BytesMut::new();
        codec.encode(out_frame(&header, &body, form), &mut buf).expect("encodes");
        let declared = u32::from_be_bytes(buf[..LENGTH_PREFIX_BYTES].try_into().expect("4 bytes"));
        prop_assert_eq!(declared as usize, buf.len() - LENGTH_PREFIX_BYTES);
        let frame = codec.decode(&mut buf).expect("decodes").expect("whole frame");
        check_frame(&frame, &header, &body);
        prop_assert!(buf.is_empty());
        prop_assert!(codec.decode(&mut buf).expect("empty buffer").is_none());
        prop_assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
    }

    /// `Parts` and `Raw` of the same frame put the same bytes on the wire.
    #[test]
    fn parts_and_raw_encode_alike((header, body, _form) in frame_spec()) {
        let mut codec = handshake_codec();
        let mut parts = BytesMut::new();
        codec.encode(out_frame(&header, &body, Form::Parts), &mut parts).expect("parts");
        let mut raw = BytesMut::new();
        codec.encode(out_frame(&header, &body, Form::Raw), &mut raw).expect("raw");
        prop_assert_eq!(parts, raw);
    }

    /// Several frames in one buffer come out in order, and a decoded frame
    /// forwarded as `Raw` is the same frame again.
    #[test]
    fn concatenated_frames_round_trip(specs in frame_specs()) {
        let mut codec = handshake_codec();
        let mut buf = encode_all(&mut codec, &specs);
        let wire = buf.clone().freeze();
        let mut forwarded = BytesMut::new();
        for (header, body, _) in &specs {
            let frame = codec.decode(&mut buf).expect("decodes").expect("whole frame");
            check_frame(&frame, header, body);
            codec.encode(OutFrame::Raw(frame.raw().clone()), &mut forwarded).expect("forward");
        }
        prop_assert!(buf.is_empty());
        prop_assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
        prop_assert_eq!(forwarded.freeze(), wire);
    }

    /// The stream fed one byte at a time gives the same frames, in order,
    /// each one only once its last byte is in.
    #[test]
    fn frames_fed_one_byte_at_a_time(specs in frame_specs()) {
        let mut codec = handshake_codec();
        let wire = encode_all(&mut codec, &specs);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut frame_ends = Vec::new();
        let mut end = 0;
        for (header, body, _) in &specs {
            end += LENGTH_PREFIX_BYTES + raw_contents(header, body).len();
            frame_ends.push(end);
        }
        for (i, byte) in wire.iter().enumerate() {
            buf.put_u8(*byte);
            while let Some(frame) = codec.decode(&mut buf).expect("valid stream decodes") {
                prop_assert_eq!(frame_ends[frames.len()], i + 1, "frame out early or late");
                frames.push(frame);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert!(codec.decode_eof(&mut buf).expect("clean end").is_none());
        prop_assert_eq!(frames.len(), specs.len());
        for (frame, (header, body, _)) in frames.iter().zip(&specs) {
            check_frame(frame, header, body);
        }
    }

    /// The stream cut at arbitrary places gives the same frames, in order.
    #[test]
    fn frames_fed_in_arbitrary_pieces(
        specs in frame_specs(),
        pieces in vec(1usize..700, 1..16),
    ) {
        let mut codec = handshake_codec();
        let wire = encode_all(&mut codec, &specs);
        let frames = decode_in_pieces(&mut codec, &wire, &pieces);
        prop_assert_eq!(frames.len(), specs.len());
        for (frame, (header, body, _)) in frames.iter().zip(&specs) {
            check_frame(frame, header, body);
        }
    }

    /// Arbitrary bytes: no panic, no reservation past the limit.
    #[test]
    fn arbitrary_bytes_never_panic(
        input in vec(any::<u8>(), 0..8192),
        limit in prop_oneof![1usize..64, 64usize..16_384, Just(HANDSHAKE_MAX_FRAME_BYTES)],
    ) {
        decode_arbitrary(&input, limit);
    }

    /// A plausible length prefix (small, often within the limit) followed by
    /// garbage: no panic, no reservation past the limit.
    #[test]
    fn small_prefix_then_garbage_never_panics(
        declared in prop_oneof![0u32..16, 16u32..4096, 4096u32..20_000],
        garbage in vec(any::<u8>(), 0..8192),
        limit in 1usize..16_384,
    ) {
        let input = prefixed(declared, &garbage);
        decode_arbitrary(&input, limit);
    }

    /// A valid header tag and length, then garbage where the fields should
    /// be: no panic.
    #[test]
    fn valid_tag_then_garbage_never_panics(
        tag in 0u8..11,
        garbage in vec(any::<u8>(), 0..512),
    ) {
        let mut contents = vec![tag];
        contents.extend_from_slice(&garbage);
        let input = prefixed(contents.len() as u32, &contents);
        decode_arbitrary(&input, HANDSHAKE_MAX_FRAME_BYTES);
    }

    /// A valid stream with bytes changed, removed or cut off: no panic, no
    /// reservation past the limit.
    #[test]
    fn mutated_valid_stream_never_panics(
        specs in vec(frame_spec(), 1..4),
        edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
        limit in prop_oneof![64usize..8192, Just(HANDSHAKE_MAX_FRAME_BYTES)],
    ) {
        let mut codec = handshake_codec();
        let mut wire = encode_all(&mut codec, &specs).to_vec();
        for (at, byte, op) in edits {
            if wire.is_empty() {
                break;
            }
            let i = at.index(wire.len());
            match op {
                0 => wire[i] = byte,
                1 => {
                    wire.remove(i);
                }
                _ => wire.truncate(i),
            }
        }
        decode_arbitrary(&wire, limit);
    }
}

proptest! {
    // Each case starts a runtime: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `FrameReader` over a duplex pipe, written in arbitrary tiny pieces.
    #[test]
    fn reader_reads_frames_written_in_tiny_pieces(
        specs in frame_specs(),
        pieces in vec(1usize..8, 1..8),
        pipe in 1usize..64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let wire = encode_all(&mut handshake_codec(), &specs).freeze();
        let frames = rt.block_on(read_through_duplex(wire, pieces, pipe));
        prop_assert_eq!(frames.len(), specs.len());
        for (frame, (header, body, _)) in frames.iter().zip(&specs) {
            check_frame(frame, header, body);
        }
    }
}

/// Writes `wire` into one end of a duplex pipe in `pieces`, flushing and
/// yielding after each, then closes it; reads frames from the other end
/// with a [`FrameReader`] until the clean end of stream.
async fn read_through_duplex(wire: Bytes, pieces: Vec<usize>, pipe: usize) -> Vec<Frame> {
    let (mut client, server) = tokio::io::duplex(pipe);
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut i = 0;
        while at < wire.len() {
            let end = (at + pieces[i % pieces.len()]).min(wire.len());
            i += 1;
            client.write_all(&wire[at..end]).await.expect("write");
            client.flush().await.expect("flush");
            tokio::task::yield_now().await;
            at = end;
        }
        client.shutdown().await.expect("shutdown");
    });
    let mut reader = FrameReader::new(server, handshake_codec());
    let mut frames = Vec::new();
    while let Some(frame) = tokio::time::timeout(TEST_TIMEOUT, reader.next())
        .await
        .expect("reader within the timeout")
        .expect("valid stream reads")
    {
        frames.push(frame);
    }
    tokio::time::timeout(TEST_TIMEOUT, writer)
        .await
        .expect("writer within the timeout")
        .expect("writer task");
    frames
}

// ---------------------------------------------------------------------------
// Malformed input, one case each
// ---------------------------------------------------------------------------

/// The tags `peek` dispatches on are the variant indexes postcard writes.
#[test]
fn peek_tags_match_the_header_variants() {
    use transports::protocol::{ACKS_TAG, ACK_TAG, MESSAGE_TAG};
    let first = |h: &Header| postcard::to_allocvec(h).expect("serializes")[0];
    let message = Header::Message(MessageHeader {
        sender: NodeId::new("a"),
        incarnation: 1,
        seq: 2,
        target: Target::All,
        service: Arc::from("svc"),
        kind: MessageKind::Notify,
        priority: transports::protocol::Priority::Normal,
        expires_ms: None,
    });
    let ack = Header::Ack(Ack {
        to: NodeId::new("a"),
        to_incarnation: 1,
        seq: 2,
        from: NodeId::new("b"),
        from_incarnation: 3,
        status: AckStatus::Accepted,
    });
    let acks = Header::Acks(Acks {
        to: NodeId::new("a"),
        to_incarnation: 1,
        from: NodeId::new("b"),
        from_incarnation: 3,
        seqs: vec![4, 5],
    });
    assert_eq!(first(&message), MESSAGE_TAG);
    assert_eq!(first(&ack), ACK_TAG);
    assert_eq!(first(&acks), ACKS_TAG);
}

#[test]
fn length_prefix_u32_max_is_too_large_and_reserves_nothing() {
    let mut codec = handshake_codec();
    let mut buf = prefixed(u32::MAX, b"some bytes after the prefix");
    let before = buf.len();
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(
        matches!(
            err,
            FrameError::TooLarge { declared, max }
                if declared == u64::from(u32::MAX) && max == HANDSHAKE_MAX_FRAME_BYTES
        ),
        "{err:?}"
    );
    assert!(buf.capacity() < 64 * 1024, "capacity {}", buf.capacity());
    assert_eq!(buf.len(), before);

    // The same at the end of the stream, and for the prefix alone.
    let err = codec.decode_eof(&mut buf).expect_err("refused at eof");
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
    let mut buf = prefixed(u32::MAX, &[]);
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
    assert!(buf.capacity() < 64 * 1024, "capacity {}", buf.capacity());
}

#[test]
fn length_zero_is_empty() {
    let mut codec = handshake_codec();
    let mut buf = prefixed(0, &[]);
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(matches!(err, FrameError::Empty), "{err:?}");

    // Also when a valid frame follows.
    let mut buf = prefixed(0, &[]);
    codec
        .encode(OutFrame::control(Header::Goodbye), &mut buf)
        .expect("encodes");
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(matches!(err, FrameError::Empty), "{err:?}");
}

#[test]
fn encoding_empty_raw_is_empty_and_leaves_dst() {
    let mut codec = handshake_codec();
    let mut dst = BytesMut::from(&b"earlier"[..]);
    let err = codec
        .encode(OutFrame::Raw(Bytes::new()), &mut dst)
        .expect_err("refused");
    assert!(matches!(err, FrameError::Empty), "{err:?}");
    assert_eq!(&dst[..], b"earlier");
}

#[test]
fn truncated_frame_then_eof_is_truncated() {
    let mut codec = handshake_codec();
    let mut full = BytesMut::new();
    codec
        .encode(
            OutFrame::Parts {
                header: Header::Subscribe {
                    token: 7,
                    service: "echo".into(),
                },
                body: Bytes::from_static(b"hello body"),
            },
            &mut full,
        )
        .expect("encodes");

    // Every cut short of the whole frame: nothing yet, then Truncated at
    // the end of the stream with the bytes buffered.
    for cut in 1..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert!(
            codec.decode(&mut buf).expect("waits").is_none(),
            "cut {cut}"
        );
        let err = codec.decode_eof(&mut buf).expect_err("truncated");
        assert!(
            matches!(err, FrameError::Truncated { buffered } if buffered == cut),
            "cut {cut}: {err:?}"
        );
    }

    // A whole frame followed by the start of another: the first comes out,
    // then Truncated.
    let mut buf = full.clone();
    buf.extend_from_slice(&full[..3]);
    let frame = codec.decode_eof(&mut buf).expect("first").expect("frame");
    assert_eq!(
        frame.header(),
        &Header::Subscribe {
            token: 7,
            service: "echo".into()
        }
    );
    let err = codec.decode_eof(&mut buf).expect_err("truncated");
    assert!(
        matches!(err, FrameError::Truncated { buffered: 3 }),
        "{err:?}"
    );
}

#[test]
fn garbage_header_is_header_error() {
    let mut codec = handshake_codec();
    let hello_start = {
        let mut v = postcard::to_allocvec(&Header::Goodbye).expect("serializes");
        v[0] = 0; // Hello tag, then too few bytes for a Hello.
        v
    };
    let cases: [(&str, Vec<u8>); 5] = [
        ("unknown variant tag", vec![0x7f, 1, 2, 3]),
        (
            "unterminated varint tag",
            vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("hello without its fields", hello_start),
        // Unsubscribe { service } with a string length past the frame end.
        ("string longer than the frame", vec![8, 0x20, b'a']),
        // Unsubscribe { service } holding invalid UTF-8.
        ("invalid utf-8 string", vec![8, 2, 0xc3, 0x28]),
    ];
    for (name, contents) in cases {
        let mut buf = prefixed(contents.len() as u32, &contents);
        let err = codec.decode(&mut buf).expect_err(name);
        assert!(matches!(err, FrameError::Header(_)), "{name}: {err:?}");
    }
}

#[test]
fn header_over_max_header_bytes_is_refused() {
    let header = Header::Unsubscribe {
        service: "s".repeat(MAX_HEADER_BYTES + 16),
    };
    let mut codec = FrameCodec::new(4 * MAX_HEADER_BYTES);

    // Encoding refuses it and leaves dst as it was.
    let mut dst = BytesMut::from(&b"earlier"[..]);
    let err = codec
        .encode(OutFrame::control(header.clone()), &mut dst)
        .expect_err("refused");
    assert!(matches!(err, FrameError::HeaderTooLarge { .. }), "{err:?}");
    assert_eq!(&dst[..], b"earlier");

    // Decoding refuses it although the frame is within the frame limit.
    let contents = raw_contents(&header, &[]);
    let mut buf = prefixed(contents.len() as u32, &contents);
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(matches!(err, FrameError::HeaderTooLarge { .. }), "{err:?}");
}

#[test]
fn frame_at_the_limit_decodes_one_byte_over_is_refused() {
    const LIMIT: usize = 1000;
    let mut codec = FrameCodec::new(LIMIT);
    let header = Header::Subscribed { token: 42 };
    let header_len = raw_contents(&header, &[]).len();

    // Parts: header plus body exactly at the limit.
    let body = Bytes::from(vec![0xab; LIMIT - header_len]);
    let mut buf = BytesMut::new();
    codec
        .encode(
            OutFrame::Parts {
                header: header.clone(),
                body: body.clone(),
            },
            &mut buf,
        )
        .expect("at the limit encodes");
    assert_eq!(buf.len(), LENGTH_PREFIX_BYTES + LIMIT);
    let frame = codec.decode(&mut buf).expect("decodes").expect("frame");
    check_frame(&frame, &header, &body);

    // Raw: exactly at the limit.
    let raw = raw_contents(&header, &body);
    assert_eq!(raw.len(), LIMIT);
    let mut buf = BytesMut::new();
    codec
        .encode(OutFrame::Raw(raw.clone()), &mut buf)
        .expect("raw at the limit encodes");
    let frame = codec.decode(&mut buf).expect("decodes").expect("frame");
    check_frame(&frame, &header, &body);

    // One byte over, built by hand: refused before the body arrives, and
    // with the body there.
    let over = raw_contents(&header, &vec![0xab; LIMIT - header_len + 1]);
    let mut buf = prefixed(over.len() as u32, &[]);
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(
        matches!(err, FrameError::TooLarge { declared, max } if declared == LIMIT as u64 + 1 && max == LIMIT),
        "{err:?}"
    );
    let mut buf = prefixed(over.len() as u32, &over);
    let err = codec.decode(&mut buf).expect_err("refused");
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");

    // A larger codec takes the frame the smaller one refused.
    let mut buf = prefixed(over.len() as u32, &over);
    let frame = FrameCodec::new(LIMIT + 1)
        .decode(&mut buf)
        .expect("decodes")
        .expect("frame");
    assert_eq!(frame.body_len(), LIMIT - header_len + 1);
}

#[test]
fn encoding_over_the_limit_is_too_large_and_leaves_dst() {
    const LIMIT: usize = 1000;
    let mut codec = FrameCodec::new(LIMIT);
    let header = Header::Subscribed { token: 42 };
    let header_len = raw_contents(&header, &[]).len();
    let earlier = {
        let mut b = BytesMut::new();
        codec
            .encode(OutFrame::control(Header::Goodbye), &mut b)
            .expect("encodes");
        b
    };

    // Parts, one byte over and far over.
    for body_len in [LIMIT - header_len + 1, LIMIT, 10 * LIMIT] {
        let mut dst = earlier.clone();
        let err = codec
            .encode(
                OutFrame::Parts {
                    header: header.clone(),
                    body: Bytes::from(vec![1u8; body_len]),
                },
                &mut dst,
            )
            .expect_err("refused");
        assert!(
            matches!(err, FrameError::TooLarge { declared, max }
                if declared == (header_len + body_len) as u64 && max == LIMIT),
            "body {body_len}: {err:?}"
        );
        assert_eq!(dst, earlier, "body {body_len}");
    }

    // Raw, one byte over.
    let mut dst = earlier.clone();
    let err = codec
        .encode(OutFrame::Raw(Bytes::from(vec![0u8; LIMIT + 1])), &mut dst)
        .expect_err("refused");
    assert!(
        matches!(err, FrameError::TooLarge { declared, max } if declared == LIMIT as u64 + 1 && max == LIMIT),
        "{err:?}"
    );
    assert_eq!(dst, earlier);

    // What was there still decodes.
    let mut dst = dst;
    let frame = codec.decode(&mut dst).expect("decodes").expect("frame");
    assert_eq!(frame.header(), &Header::Goodbye);
}

#[test]
fn error_is_sticky_until_the_connection_is_dropped() {
    // The decoder consumes nothing on error: calling again gives the same
    // error rather than resynchronizing on garbage.
    let mut codec = FrameCodec::new(100);
    let mut buf = prefixed(101, &[0; 8]);
    for _ in 0..3 {
        let err = codec.decode(&mut buf).expect_err("refused");
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    declared: 101,
                    max: 100
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(buf.len(), LENGTH_PREFIX_BYTES + 8);
}

#[test]
fn reserves_a_declared_frame_within_the_limit_once() {
    let mut codec = FrameCodec::new(100_000);
    let mut buf = prefixed(90_000, &[0]);
    assert!(codec.decode(&mut buf).expect("waits").is_none());
    assert!(buf.capacity() >= LENGTH_PREFIX_BYTES + 90_000);
    assert!(buf.capacity() <= 2 * (LENGTH_PREFIX_BYTES + 90_000));
}

// ---------------------------------------------------------------------------
// FrameReader
// ---------------------------------------------------------------------------

/// A few frames of each kind of size, written a few bytes at a time through
/// a pipe smaller than one frame.
#[tokio::test]
async fn frame_reader_reads_frames_written_in_tiny_pieces() {
    let specs: Vec<(Header, Bytes, Form)> = (0..20u64)
        .map(|i| {
            let header = match i % 3 {
                0 => Header::Subscribed { token: i },
                1 => Header::Goodbye,
                _ => Header::Unsubscribe {
                    service: format!("service-{i}"),
                },
            };
            let body = Bytes::from(vec![i as u8; (i as usize * 37) % 300]);
            let form = if i % 2 == 0 { Form::Parts } else { Form::Raw };
            (header, body, form)
        })
        .collect();
    let wire = encode_all(&mut handshake_codec(), &specs).freeze();
    let frames = read_through_duplex(wire, vec![1, 2, 3, 1, 5, 7], 8).await;
    assert_eq!(frames.len(), specs.len());
    for (frame, (header, body, _)) in frames.iter().zip(&specs) {
        check_frame(frame, header, body);
    }
}

/// Frames taken in place: small ones borrowed from the read buffer, larger
/// ones in buffers of their own, in order and whole, however the bytes
/// arrive; an empty frame and an oversized one are the codec's errors.
#[tokio::test]
async fn frame_reader_lends_small_frames_and_owns_large_ones() {
    let sizes = [
        0usize,
        1,
        100,
        COPY_FRAMES_UP_TO - 20,
        COPY_FRAMES_UP_TO + 1,
        50_000,
        7,
    ];
    let specs: Vec<(Header, Bytes, Form)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let body = Bytes::from(vec![i as u8; n]);
            (Header::Subscribed { token: i as u64 }, body, Form::Parts)
        })
        .collect();
    let wire = encode_all(&mut handshake_codec(), &specs).freeze();
    for pieces in [vec![wire.len()], vec![1, 2, 3, 1, 5, 7, 4096]] {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let bytes = wire.clone();
        let writer = tokio::spawn(async move {
            let mut rest = &bytes[..];
            for n in pieces.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*n).min(rest.len()));
                client.write_all(now).await.expect("write");
                rest = later;
            }
            client.shutdown().await.expect("shutdown");
        });
        let mut reader = FrameReader::new(server, FrameCodec::new(1 << 20).in_place());
        for (header, body, _) in &specs {
            let raw = if reader.has_buffered_frame() {
                reader.try_next_frame()
            } else {
                tokio::time::timeout(TEST_TIMEOUT, reader.next_frame())
                    .await
                    .expect("within the timeout")
            };
            let raw = raw.expect("reads").expect("not the end");
            let whole = header_len_of(header) + body.len();
            assert_eq!(raw.len(), whole);
            if let RawFrame::Borrowed(_) = raw {
                assert!(whole <= COPY_FRAMES_UP_TO, "a large frame of {whole} lent");
            }
            let (peeked, header_len) = transports::frame::peek(&raw).expect("peeks");
            assert!(matches!(peeked, Peeked::Other(h) if &*h == header));
            assert_eq!(&raw[header_len..], &body[..]);
            assert_eq!(raw.to_bytes(), Bytes::copy_from_slice(&raw));
        }
        let end = tokio::time::timeout(TEST_TIMEOUT, reader.next_frame())
            .await
            .expect("within the timeout")
            .expect("a clean end");
        assert!(end.is_none());
        writer.await.expect("writer task");
    }

    // An empty frame, then one over the limit: errors, not frames.
    for (prefix, limit) in [(0u32, 1 << 20), (5_000, 4_096)] {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut bytes = prefix.to_be_bytes().to_vec();
        bytes.extend(vec![1u8; prefix as usize]);
        client.write_all(&bytes).await.expect("write");
        let mut reader = FrameReader::new(server, FrameCodec::new(limit).in_place());
        let err = tokio::time::timeout(TEST_TIMEOUT, reader.next_frame())
            .await
            .expect("within the timeout")
            .expect_err("refused");
        assert!(
            matches!(err, FrameError::Empty | FrameError::TooLarge { .. }),
            "{err:?}"
        );
    }
}

/// How many bytes `header` takes encoded.
fn header_len_of(header: &Header) -> usize {
    postcard::to_allocvec(header).expect("encodes").len()
}

#[tokio::test]
async fn frame_reader_reports_truncated_at_end_of_stream() {
    let mut wire = BytesMut::new();
    let mut codec = handshake_codec();
    codec
        .encode(OutFrame::control(Header::Goodbye), &mut wire)
        .expect("encodes");
    codec
        .encode(
            OutFrame::Parts {
                header: Header::Subscribed { token: 1 },
                body: Bytes::from_static(b"0123456789"),
            },
            &mut wire,
        )
        .expect("encodes");
    wire.truncate(wire.len() - 4);
    let cut = wire.len();

    let (mut client, server) = tokio::io::duplex(4);
    let writer = tokio::spawn(async move {
        for byte in wire.iter() {
            client.write_all(&[*byte]).await.expect("write");
        }
        client.shutdown().await.expect("shutdown");
    });
    let mut reader = FrameReader::new(server, codec);
    let first = tokio::time::timeout(TEST_TIMEOUT, reader.next())
        .await
        .expect("within the timeout")
        .expect("first frame")
        .expect("not the end");
    assert_eq!(first.header(), &Header::Goodbye);
    let err = tokio::time::timeout(TEST_TIMEOUT, reader.next())
        .await
        .expect("within the timeout")
        .expect_err("truncated");
    let first_len = LENGTH_PREFIX_BYTES + 1;
    assert!(
        matches!(err, FrameError::Truncated { buffered } if buffered == cut - first_len),
        "{err:?}"
    );
    writer.await.expect("writer task");
}

#[tokio::test]
async fn frame_reader_refuses_oversized_prefix() {
    let (mut client, server) = tokio::io::duplex(64);
    client
        .write_all(&u32::MAX.to_be_bytes())
        .await
        .expect("write");
    let mut reader = FrameReader::new(server, handshake_codec());
    let err = tokio::time::timeout(TEST_TIMEOUT, reader.next())
        .await
        .expect("within the timeout")
        .expect_err("refused");
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
    drop(client);
}

/// A codec reading in place hands small frames out as slices of its read
/// buffer; a `BodyArena` gives their bodies memory of their own, equal to
/// what a copying codec gives.
#[test]
fn in_place_frames_give_owned_bodies_equal_to_copied_ones() {
    let mut wire = BytesMut::new();
    let small = Bytes::from(vec![3u8; 100]);
    let large = Bytes::from(vec![4u8; transports::frame::COPY_FRAMES_UP_TO + 10]);
    for (token, body) in [(1u64, &small), (2, &large)] {
        transports::frame::encode_header(
            &Header::Subscribed { token },
            body.len(),
            1 << 20,
            &mut wire,
        )
        .expect("encodes");
        wire.put_slice(body);
    }
    for in_place in [false, true] {
        let mut codec = FrameCodec::new(1 << 20);
        if in_place {
            codec = codec.in_place();
        }
        let mut src = wire.clone();
        let mut arena = transports::frame::BodyArena::new();
        for body in [&small, &large] {
            let raw = codec.decode_raw(&mut src).expect("decodes").expect("whole");
            let (_, header_len) = transports::frame::peek(&raw).expect("peeks");
            let owned = arena.owned_body(&RawFrame::Owned(raw.clone()), header_len);
            assert_eq!(&owned, body, "in place {in_place}");
            // Borrowed from a read buffer: the same body, in memory of its own.
            let borrowed = arena.owned_body(&RawFrame::Borrowed(&raw), header_len);
            assert_eq!(&borrowed, body, "borrowed, in place {in_place}");
        }
        assert!(src.is_empty());
    }
}
