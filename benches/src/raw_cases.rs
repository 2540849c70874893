//! Raw loopback TCP as the floor of the suite: every [`Case`] run with the
//! same pattern by a hand-written tokio program, in the same run as
//! clustercomm and NATS.
//!
//! Frames are a 4-byte big-endian length followed by the body, written in
//! batches and parsed out of a `BytesMut` the way [`crate::raw_tcp`] does.
//!
//! | case | raw pattern | result |
//! | --- | --- | --- |
//! | `Notify`, `Session` | [`raw_tcp::sink`]: one connection, one-way | frames/s received |
//! | `SendPipelined`, `RecoverableSend` | [`raw_tcp::pipelined_ack`]: a 4-byte ack per frame, `outstanding` unacknowledged | acks/s |
//! | `FanOutAll`, `FanOutGroup` | one producer, `receivers` connections each carrying every frame | deliveries/s |
//! | `AnyOf` | one producer, frames dealt round-robin over `members` connections | frames/s received in all |
//! | `RequestLatency`, `RecoverableLatency` | one frame echoed back, one at a time | µs percentiles |
//! | `RequestRate` | frames echoed back, `outstanding` in flight | replies/s |
//! | `Bulk` | [`bulk_tcp::bulk_ack`], [`BULK_IN_FLIGHT`] in flight (the path is irrelevant) | MB/s |
//! | `FixedRate`, `NotifyTls`, `LazyTls` | none: "n/a" | |
//!
//! For fan-out and round-robin the producer encodes each frame once into
//! per-connection batches of [`BATCH_BYTES`] (the capacity of a default
//! `BufWriter`) and hands full batches to one writer task per connection
//! over a bounded channel; a fan-out batch is one `Bytes` shared by every
//! connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::bulk_tcp;
use crate::options::{Options, WAIT_TIMEOUT};
use crate::raw_tcp::{self, loopback_pair, write_frames_for, FRAMES_PER_CLOCK_CHECK, READ_CHUNK};
use crate::report::per_second;
use crate::suite::{Case, Latency, Measurement, Outcome};
use crate::transfer::Plan;
use crate::wait::{wait_for_count, Counter};

/// Bulk bodies kept unacknowledged, on every peer (as in the bulk bench).
pub const BULK_IN_FLIGHT: usize = 2;

/// Least number of measured bulk bodies with `--quick`...
pub const QUICK_MIN_BODIES: u64 = 3;

/// ...and in a full run.
pub const FULL_MIN_BODIES: u64 = 8;

/// Bytes a fan-out or round-robin batch collects before it is handed to
/// its connection's writer (a batch holds at least one whole frame).
pub const BATCH_BYTES: usize = 8 * 1024;

/// Batches queued per connection before the producer waits.
pub const QUEUED_BATCHES: usize = 16;

/// The bulk phases of a run: warm-up for `options.warmup` (at least one
/// body), then the measured phase for `options.measure` and at least
/// [`QUICK_MIN_BODIES`] or [`FULL_MIN_BODIES`] bodies.
pub fn bulk_plans(options: &Options) -> (Plan, Plan) {
    let min_bodies = if options.quick {
        QUICK_MIN_BODIES
    } else {
        FULL_MIN_BODIES
    };
    (
        Plan {
            duration: options.warmup,
            min_bodies: 1,
        },
        Plan {
            duration: options.measure,
            min_bodies,
        },
    )
}

/// Measures `case` over raw loopback TCP with the pattern described in
/// the module docs; a failure comes back as [`Outcome::Failed`]. TCP
/// loses nothing, so the measurement's loss is always 0. The fixed-rate
/// case has no direct counterpart (the relay is its floor).
pub async fn run(case: Case, options: &Options) -> Measurement {
    let result = match case {
        Case::Notify { body } | Case::Session { body } => {
            raw_tcp::sink(options, body).await.map(Outcome::Rate)
        }
        Case::SendPipelined {
            body, outstanding, ..
        }
        | Case::RecoverableSend { body, outstanding } => {
            raw_tcp::pipelined_ack(options, body, outstanding)
                .await
                .map(Outcome::Rate)
        }
        Case::FanOutAll { receivers, body } | Case::FanOutGroup { receivers, body } => {
            spread(options, body, receivers, Spread::Every)
                .await
                .map(Outcome::Rate)
        }
        Case::AnyOf { members, body } => spread(options, body, members, Spread::RoundRobin)
            .await
            .map(Outcome::Rate),
        Case::RequestLatency { body } | Case::RecoverableLatency { body } => {
            ping_pong(options, body).await
        }
        Case::RequestRate { body, outstanding } => echo_rate(options, body, outstanding)
            .await
            .map(Outcome::Rate),
        Case::Bulk { body, .. } => bulk(options, body).await.map(Outcome::Rate),
        Case::HeadOfLine { body } => head_of_line(options, body).await,
        Case::Priority { .. }
        | Case::FixedRate { .. }
        | Case::NotifyTls { .. }
        | Case::LazyTls { .. }
        | Case::Stream { .. } => Ok(Outcome::Skipped("n/a".to_owned())),
    };
    result
        .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")))
        .into()
}

/// How the producer spreads frames over the connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// Every frame to every connection.
    Every,
    /// Frame `i` to connection `i % n`.
    RoundRobin,
}

/// One producer, `connections` loopback connections: frames counted by
/// all readers per second over the measured phase.
async fn spread(
    options: &Options,
    body_len: usize,
    connections: usize,
    spread: Spread,
) -> anyhow::Result<f64> {
    ensure!(connections > 0, "no connections");
    let received = Counter::new();
    let mut readers = Vec::with_capacity(connections);
    let mut writers = Vec::with_capacity(connections);
    let mut queues = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (client, server) = loopback_pair().await?;
        readers.push(tokio::spawn(count_frames(server, received.clone(), None)));
        let (queue, batches) = mpsc::channel(QUEUED_BATCHES);
        writers.push(tokio::spawn(write_batches(client, batches)));
        queues.push(queue);
    }
    let frame = frame(body_len)?;
    let per_frame = match spread {
        Spread::Every => connections as u64,
        Spread::RoundRobin => 1,
    };

    let warm = produce(&queues, &frame, spread, options.warmup).await?;
    wait_for_count(&received, warm * per_frame, WAIT_TIMEOUT)
        .await
        .context("raw spread warm-up")?;

    let base = received.get();
    let start = Instant::now();
    let sent = produce(&queues, &frame, spread, options.measure).await?;
    let done = wait_for_count(&received, base + sent * per_frame, WAIT_TIMEOUT)
        .await
        .context("raw spread")?;

    drop(queues);
    for task in writers.into_iter().chain(readers) {
        tokio::time::timeout(WAIT_TIMEOUT, task)
            .await
            .context("raw spread task did not stop")???;
    }
    Ok(per_second(sent * per_frame, done - start))
}

/// Produces frames for `duration` into per-connection batches and returns
/// how many frames; ends with every partial batch handed on.
async fn produce(
    queues: &[mpsc::Sender<Bytes>],
    frame: &Bytes,
    spread: Spread,
    duration: Duration,
) -> anyhow::Result<u64> {
    let batch_count = match spread {
        Spread::Every => 1,
        Spread::RoundRobin => queues.len(),
    };
    let mut batches: Vec<BytesMut> = (0..batch_count)
        .map(|_| BytesMut::with_capacity(BATCH_BYTES.max(frame.len())))
        .collect();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..FRAMES_PER_CLOCK_CHECK {
            let slot = (sent % batch_count as u64) as usize;
            let batch = &mut batches[slot];
            batch.extend_from_slice(frame);
            sent += 1;
            if batch.len() >= BATCH_BYTES {
                hand_on(queues, spread, slot, batch).await?;
            }
        }
    }
    for (slot, batch) in batches.iter_mut().enumerate() {
        if !batch.is_empty() {
            hand_on(queues, spread, slot, batch).await?;
        }
    }
    Ok(sent)
}

/// Hands the batch in `slot` to its connection (or, for
/// [`Spread::Every`], to all of them) and starts a new one.
async fn hand_on(
    queues: &[mpsc::Sender<Bytes>],
    spread: Spread,
    slot: usize,
    batch: &mut BytesMut,
) -> anyhow::Result<()> {
    let full = batch.split().freeze();
    batch.reserve(BATCH_BYTES.max(full.len()));
    let targets = match spread {
        Spread::Every => queues,
        Spread::RoundRobin => &queues[slot..=slot],
    };
    for queue in targets {
        tokio::time::timeout(WAIT_TIMEOUT, queue.send(full.clone()))
            .await
            .context("a raw writer did not take a batch within the timeout")?
            .context("a raw writer stopped")?;
    }
    Ok(())
}

/// Writes batches to `stream` until the queue closes, then shuts it down.
async fn write_batches(
    mut stream: TcpStream,
    mut batches: mpsc::Receiver<Bytes>,
) -> anyhow::Result<()> {
    while let Some(batch) = batches.recv().await {
        stream.write_all(&batch).await?;
    }
    stream.shutdown().await?;
    Ok(())
}

/// One frame echoed back at a time: round-trip percentiles.
async fn ping_pong(options: &Options, body_len: usize) -> anyhow::Result<Outcome> {
    let (mut client, server) = loopback_pair().await?;
    let echo = tokio::spawn(echo(server));
    let frame = frame(body_len)?;
    let mut reply = vec![0u8; frame.len()];

    let start = Instant::now();
    while start.elapsed() < options.warmup {
        round_trip(&mut client, &frame, &mut reply).await?;
    }
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    while start.elapsed() < options.measure {
        let sent = Instant::now();
        round_trip(&mut client, &frame, &mut reply).await?;
        crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
    }

    client.shutdown().await?;
    tokio::time::timeout(WAIT_TIMEOUT, echo)
        .await
        .context("raw echo did not stop")???;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no round trip completed")
}

/// Writes `frame` and reads its echo into `reply`, bounded.
pub(crate) async fn round_trip(
    stream: &mut TcpStream,
    frame: &Bytes,
    reply: &mut [u8],
) -> anyhow::Result<()> {
    tokio::time::timeout(WAIT_TIMEOUT, async {
        stream.write_all(frame).await?;
        stream.read_exact(reply).await?;
        anyhow::Ok(())
    })
    .await
    .context("raw round trip timed out")??;
    ensure!(reply[..4] == frame[..4], "echo has the wrong length prefix");
    Ok(())
}

/// Frames echoed back, at most `outstanding` unanswered: replies per second
/// over the measured phase.
async fn echo_rate(options: &Options, body_len: usize, outstanding: usize) -> anyhow::Result<f64> {
    ensure!(outstanding > 0, "no frames in flight");
    let (client, server) = loopback_pair().await?;
    let echo = tokio::spawn(echo(server));
    let (client_read, client_write) = client.into_split();
    let window = Arc::new(Semaphore::new(outstanding));
    let replies = Counter::new();
    let reply_reader = tokio::spawn(count_frames(
        client_read,
        replies.clone(),
        Some(window.clone()),
    ));
    let mut writer = BufWriter::new(client_write);
    let body = Bytes::from(vec![0u8; body_len]);

    let warm = write_frames_for(&mut writer, &body, options.warmup, Some(&window)).await?;
    wait_for_count(&replies, warm, WAIT_TIMEOUT)
        .await
        .context("raw echo warm-up")?;

    let base = replies.get();
    let start = Instant::now();
    let sent = write_frames_for(&mut writer, &body, options.measure, Some(&window)).await?;
    let done = wait_for_count(&replies, base + sent, WAIT_TIMEOUT)
        .await
        .context("raw echo rate")?;

    writer.shutdown().await?;
    for task in [echo, reply_reader] {
        tokio::time::timeout(WAIT_TIMEOUT, task)
            .await
            .context("raw echo task did not stop")???;
    }
    Ok(per_second(sent, done - start))
}

/// Echoes every complete frame back as it arrives (one write and flush
/// per read) until end of stream, then shuts its side down.
async fn echo(stream: TcpStream) -> anyhow::Result<()> {
    let (mut read, write) = stream.into_split();
    let mut write = BufWriter::new(write);
    let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        if read.read_buf(&mut buf).await? == 0 {
            if !buf.is_empty() {
                bail!("stream ended inside a frame");
            }
            break;
        }
        let complete = complete_frames(&buf).1;
        if complete > 0 {
            let frames = buf.split_to(complete);
            write.write_all(&frames).await?;
            write.flush().await?;
        }
    }
    write.shutdown().await?;
    Ok(())
}

/// Complete frames at the start of `buf`: how many, and their bytes.
pub(crate) fn complete_frames(buf: &[u8]) -> (u64, usize) {
    let (mut frames, mut at) = (0u64, 0usize);
    while buf.len() - at >= 4 {
        let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if buf.len() - at - 4 < len {
            break;
        }
        at += 4 + len;
        frames += 1;
    }
    (frames, at)
}

/// Reads frames until end of stream, splitting each body off as `Bytes`
/// and counting them; with a `window`, gives a permit back per frame.
pub(crate) async fn count_frames<R>(
    mut read: R,
    counter: Counter,
    window: Option<Arc<Semaphore>>,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        if read.read_buf(&mut buf).await? == 0 {
            if !buf.is_empty() {
                bail!("stream ended inside a frame");
            }
            return Ok(());
        }
        let mut frames = 0u64;
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            buf.advance(4);
            let body = buf.split_to(len).freeze();
            drop(body);
            frames += 1;
        }
        if let Some(window) = &window {
            window.add_permits(frames as usize);
        }
        counter.add(frames);
    }
}

/// Requests of `body_len` bytes echoed one at a time, while a producer
/// writes [`crate::suite::HOL_BULK_BYTES`] frames back to back on the
/// same connection (a request waits for the frame being written and the
/// one queued before it): latency percentiles. A request's first body
/// byte says it is one (a bulk frame's is 0).
async fn head_of_line(options: &Options, body_len: usize) -> anyhow::Result<Outcome> {
    ensure!(body_len > 0, "a request needs a body");
    let (client, server) = loopback_pair().await?;
    let (mut read, mut write) = client.into_split();
    // The receiver: echoes requests, drops bulk frames.
    let receiver = tokio::spawn(async move {
        let (mut sread, mut swrite) = server.into_split();
        let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            if sread.read_buf(&mut buf).await? == 0 {
                return anyhow::Ok(());
            }
            while buf.len() >= 4 {
                let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                if buf.len() < 4 + len {
                    // A large frame: room for it at once.
                    buf.reserve(4 + len - buf.len());
                    break;
                }
                let frame = buf.split_to(4 + len);
                if len > 0 && frame[4] == 1 {
                    swrite.write_all(&frame).await?;
                }
            }
        }
    });
    // One writer: bulk and requests in one stream, in the order handed
    // over (one bulk frame queued at most).
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            write.write_all(&frame).await?;
        }
        write.shutdown().await?;
        anyhow::Ok(())
    });
    let mut bulk = BytesMut::with_capacity(4 + crate::suite::HOL_BULK_BYTES);
    bulk.put_u32(u32::try_from(crate::suite::HOL_BULK_BYTES)?);
    bulk.put_bytes(0, crate::suite::HOL_BULK_BYTES);
    let bulk = bulk.freeze();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if tx.send(bulk.clone()).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut request = BytesMut::with_capacity(4 + body_len);
    request.put_u32(u32::try_from(body_len)?);
    request.put_u8(1);
    request.put_bytes(0xAB, body_len - 1);
    let request = request.freeze();
    let mut reply = vec![0u8; request.len()];
    let mut samples = crate::latency::histogram();
    let start = Instant::now();
    while start.elapsed() < options.warmup + options.measure {
        let sent = Instant::now();
        tx.send(request.clone())
            .await
            .context("the raw writer stopped")?;
        tokio::time::timeout(WAIT_TIMEOUT, read.read_exact(&mut reply))
            .await
            .context("raw request timed out behind the bulk")??;
        if start.elapsed() > options.warmup {
            crate::latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(tx);
    producer.await?;
    tokio::time::timeout(WAIT_TIMEOUT, writer)
        .await
        .context("raw writer did not stop")???;
    tokio::time::timeout(WAIT_TIMEOUT, receiver)
        .await
        .context("raw receiver did not stop")???;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no request completed")
}

/// One encoded frame: the length prefix and a body of `body_len` bytes.
fn frame(body_len: usize) -> anyhow::Result<Bytes> {
    let prefix = u32::try_from(body_len).context("body too long for a u32 prefix")?;
    let mut frame = BytesMut::with_capacity(4 + body_len);
    frame.put_u32(prefix);
    frame.put_bytes(0xAB, body_len);
    Ok(frame.freeze())
}

/// [`bulk_tcp::bulk_ack`] with [`bulk_plans`]: MB/s.
async fn bulk(options: &Options, body_len: usize) -> anyhow::Result<f64> {
    let body = Bytes::from(vec![0xAB; body_len]);
    let (warmup, measure) = bulk_plans(options);
    let transfer = bulk_tcp::bulk_ack(&body, BULK_IN_FLIGHT, &warmup, &measure).await?;
    Ok(transfer.mb_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::BulkPath;

    #[test]
    fn frames_are_split_where_they_end() {
        let one = frame(3).expect("frame");
        let mut two = BytesMut::new();
        two.extend_from_slice(&one);
        two.extend_from_slice(&one[..5]);
        assert_eq!(complete_frames(&two), (1, 7));
        assert_eq!(complete_frames(&one[..3]), (0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_case_measures_something() {
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(20);
        options.measure = Duration::from_millis(100);
        for case in [
            Case::Notify { body: 128 },
            Case::SendPipelined {
                body: 128,
                outstanding: 16,
                peer: crate::suite::SendPeer::Publish,
            },
            Case::FanOutAll {
                receivers: 3,
                body: 128,
            },
            Case::AnyOf {
                members: 3,
                body: 100,
            },
            Case::RequestLatency { body: 128 },
            Case::RequestRate {
                body: 128,
                outstanding: 8,
            },
            Case::Bulk {
                body: 1 << 20,
                path: BulkPath::Lazy,
            },
        ] {
            let outcome = run(case, &options).await.outcome;
            println!("raw {case}: {outcome:?} {}", case.unit());
            assert!(
                outcome.value().is_some_and(|v| v > 0.0),
                "{case}: {outcome}"
            );
        }
    }

    /// Every case of a full run with short phases (slower: 64 MiB bodies).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a few seconds; run with --ignored --nocapture to see the floor"]
    async fn raw_runs_every_case() {
        let mut options = Options::from_args(["--quick"]);
        options.warmup = Duration::from_millis(100);
        options.measure = Duration::from_millis(500);
        for case in crate::suite::cases(false) {
            let outcome = run(case, &options).await.outcome;
            println!("raw {case}: {outcome:?} {}", case.unit());
            assert!(
                outcome.value().is_some_and(|v| v > 0.0),
                "{case}: {outcome}"
            );
        }
    }
}
