//! Hostile and broken clients against the real `message-server` binary:
//! each is cut off without the server allocating what it declared, and the
//! good nodes keep being served.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::BytesMut;
use clustercomm_tests::{bounded, init_logging, spawn_message_server, test_config};
use node_runtime::{Node, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util_codec::{decode_all, encode};
use transports::protocol::{Header, MessageHeader, MessageKind, RefusalReason};

/// Small helpers around the codec, so the test speaks the real wire format.
mod tokio_util_codec {
    use bytes::BytesMut;
    use transports::frame::{Frame, FrameCodec, OutFrame};

    pub fn encode(frame: OutFrame) -> anyhow::Result<BytesMut> {
        let mut buf = BytesMut::new();
        tokio_util::codec::Encoder::encode(&mut FrameCodec::new(1 << 20), frame, &mut buf)?;
        Ok(buf)
    }

    pub fn decode_all(mut buf: BytesMut) -> Vec<Frame> {
        let mut codec = FrameCodec::new(1 << 20);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf) {
            frames.push(f);
        }
        frames
    }
}

/// Writes `bytes`, optionally half-closes, and reads until the server
/// closes the connection. Returns what the server sent.
async fn send_and_expect_close(
    server: std::net::SocketAddr,
    bytes: &[u8],
    half_close: bool,
) -> anyhow::Result<BytesMut> {
    let mut stream = TcpStream::connect(server).await?;
    stream.write_all(bytes).await?;
    if half_close {
        stream.shutdown().await?;
    }
    let mut got = BytesMut::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read_buf(&mut got).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                // A reset is a close too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match closed {
        Ok(Ok(())) => Ok(got),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("the server kept the connection open"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be
/// replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_are_cut_off_and_good_nodes_keep_working() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let (server, addr) = spawn_message_server(&[]).await?;
        let a = Node::builder("good-a")
            .config(test_config())
            .message_server(addr)
            .start()
            .await?;
        let b = Node::builder("good-b")
            .config(test_config())
            .message_server(addr)
            .start()
            .await?;
        let mut inbox = b.subscribe("svc").await?;
        a.send(Target::Node("good-b".into()), "svc", "before")
            .await?;
        let peak_before = server.proc_status_kib("VmHWM")?;

        // A length prefix of 0xFFFFFFFF: refused at once, before any
        // allocation, without waiting for more bytes.
        send_and_expect_close(addr, &[0xFF, 0xFF, 0xFF, 0xFF], false).await?;
        // The same after a valid-looking start.
        send_and_expect_close(addr, &[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3], false).await?;

        // A truncated frame, then end of stream.
        let hello_like = encode(transports::OutFrame::control(Header::Goodbye))?;
        let mut truncated = vec![0, 0, 0, 100];
        truncated.extend_from_slice(&hello_like[4..]);
        send_and_expect_close(addr, &truncated, true).await?;

        // Random bytes, many seeds.
        for seed in 1..=20u64 {
            send_and_expect_close(addr, &noise(seed, 4096), true)
                .await
                .with_context(|| format!("noise seed {seed}"))?;
        }

        // A message frame before the handshake: refused with a reason.
        let message = encode(transports::OutFrame::Parts {
            header: Header::Message(MessageHeader {
                sender: "intruder".into(),
                incarnation: 1,
                seq: 1,
                target: Target::Node("good-b".into()),
                service: "svc".into(),
                kind: MessageKind::Send,
                priority: transports::protocol::Priority::Normal,
                expires_ms: None,
            }),
            body: bytes::Bytes::from_static(b"sneaky"),
        })?;
        let answer = send_and_expect_close(addr, &message, false).await?;
        let frames = decode_all(answer);
        match frames.first().map(|f| f.header()) {
            Some(Header::Refused(r)) => assert_eq!(r.reason, RefusalReason::ProtocolViolation),
            other => bail!("expected a protocol-violation refusal, got {other:?}"),
        }

        // The server is alive, did not deliver the intruder's message, and
        // never allocated anything like what was declared.
        a.send(Target::Node("good-b".into()), "svc", "after")
            .await?;
        let first = inbox.recv().await.context("inbox")?;
        let second = inbox.recv().await.context("inbox")?;
        assert_eq!(&first.body()[..], b"before");
        assert_eq!(&second.body()[..], b"after");
        let peak_after = server.proc_status_kib("VmHWM")?;
        assert!(
            peak_after < peak_before + 32 * 1024,
            "peak memory grew from {peak_before} KiB to {peak_after} KiB"
        );
        Ok(())
    })
    .await
}
