//! The handshake fuzzed against the real listeners: the message server's
//! port and a node's direct port each get a few hundred connections of
//! random bytes, random frames after a valid length, mutated hellos, and
//! valid hellos followed by random frames where the proof belongs. Each is
//! answered with a refusal or a closed connection, never a crash or a
//! hang; afterwards good nodes still register and open channels.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{ensure, Context};
use bytes::{BufMut, BytesMut};
use clustercomm_tests::{bounded, init_logging};
use node_runtime::{Node, NodeId, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use transports::frame::{FrameCodec, OutFrame};
use transports::protocol::{Header, Proof};

/// Attempts per listener.
const ATTEMPTS: u64 = 240;
/// Attempts open at once (below the node's default cap of 64 connections
/// in their handshake).
const AT_ONCE: usize = 48;

/// A small deterministic generator (xorshift64*): every run tries the same
/// inputs, so a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn encode(frame: OutFrame, into: &mut BytesMut) -> anyhow::Result<()> {
    tokio_util::codec::Encoder::encode(&mut FrameCodec::new(1 << 20), frame, into)?;
    Ok(())
}

/// The bytes of attempt `i`, against a cluster named `cluster`.
fn attempt(i: u64, cluster: &str) -> anyhow::Result<Vec<u8>> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    let key = transports::auth::SessionKey::generate()?;
    let hello = clustercomm_tests::raw::hello("fuzz", cluster, &key);
    let mut out = BytesMut::new();
    match i % 4 {
        // Random bytes.
        0 => {
            let n = rng.below(2048) as usize;
            out.put_slice(&rng.bytes(n));
        }
        // A plausible length, then random bytes (a random header).
        1 => {
            let n = rng.below(512) as u32 + 1;
            out.put_u32(n);
            out.put_slice(&rng.bytes(n as usize));
        }
        // A valid hello with some bytes flipped.
        2 => {
            encode(OutFrame::control(Header::Hello(Box::new(hello))), &mut out)?;
            for _ in 0..=rng.below(4) {
                let at = 4 + rng.below(out.len() as u64 - 4) as usize;
                out[at] ^= (rng.next() as u8) | 1;
            }
        }
        // A valid hello, then something else where the proof belongs.
        _ => {
            encode(OutFrame::control(Header::Hello(Box::new(hello))), &mut out)?;
            let len = rng.below(100) as usize;
            let next = match rng.below(3) {
                0 => Header::Proof(Proof {
                    secret_proof: None,
                    signature: rng.bytes(len),
                }),
                1 => Header::Hello(Box::new(clustercomm_tests::raw::hello(
                    "again", cluster, &key,
                ))),
                _ => Header::Goodbye,
            };
            encode(OutFrame::control(next), &mut out)?;
            let n = rng.below(256) as usize;
            out.put_slice(&rng.bytes(n));
        }
    }
    Ok(out.to_vec())
}

/// Sends every attempt to `addr`, at most [`AT_ONCE`] at a time; each
/// connection must end (refused or closed) within the hello deadline
/// and some slack.
async fn fuzz(addr: SocketAddr, cluster: &str) -> anyhow::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..ATTEMPTS {
        let bytes = attempt(i, cluster)?;
        let permit = limit.clone().acquire_owned().await?;
        tries.spawn(async move {
            let _permit = permit;
            let mut stream = TcpStream::connect(addr).await?;
            // The peer may close before it read everything: that is fine.
            let _ = stream.write_all(&bytes).await;
            let mut sink = Vec::new();
            let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                loop {
                    match stream.read_buf(&mut sink).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => sink.clear(),
                    }
                }
            })
            .await;
            ensure!(ended.is_ok(), "attempt {i} was neither refused nor closed");
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tries.join_next().await {
        done??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_handshakes_are_refused_and_good_nodes_carry_on() -> anyhow::Result<()> {
    init_logging();
    let (mut server, addr) = clustercomm_tests::spawn_message_server(&[]).await?;
    let config = clustercomm_tests::test_config();
    let b = Node::builder("b")
        .config(config.clone())
        .message_server(addr)
        .start()
        .await?;
    let mut inbox = b.subscribe("svc").await?;
    let direct = b.direct_addr().context("no direct address")?;

    bounded(fuzz(addr, &config.cluster.name))
        .await
        .context("the message server's port")?;
    bounded(fuzz(direct, &config.cluster.name))
        .await
        .context("the node's direct port")?;

    // Both listeners still serve: a new node registers, and sends to `b`
    // through the server and over a new lazy channel.
    ensure!(
        server.child_alive(),
        "the message server exited during the fuzzing"
    );
    let a = Node::builder("a")
        .config(config)
        .message_server(addr)
        .start()
        .await?;
    for body in [vec![1u8; 16], vec![2u8; 256 << 10]] {
        a.send(Target::Node(NodeId::new("b")), "svc", body.clone())
            .await?;
        let got = bounded(async { inbox.recv().await.context("inbox closed") }).await?;
        ensure!(got.body().len() == body.len());
    }
    ensure!(a.counters().lazy_opened == 1, "{:?}", a.counters());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
