//! Raw TCP through a relay process as the floor of every suite case that
//! goes through a server: sender → `bench-relay` → receiver, two loopback
//! hops with nothing in the middle but a program that forwards bytes.
//! The suite reports ours/relay for these cases; it shows how close the
//! message server's path is to the physical limit of two hops.
//!
//! Each [`run`] starts a fresh relay process ([`start_relay`], the
//! `bench-relay` binary found by [`relay_binary`]) and connects the case's
//! clients to it, each over its own loopback connection (nodelay). The
//! relay's protocol (see `src/bin/bench-relay.rs`): a client says its id
//! ([`connect`]), then sends frames `[u32 BE len][u32 BE destination][body]`
//! to a client id, to [`ALL`] the other clients or to [`ANY`] one of them
//! in turn. Senders batch frames exactly as [`crate::raw_cases`] and
//! [`crate::raw_tcp`] do (a [`BATCH_BYTES`] `BufWriter`, or straight from
//! the body for bulk), and receivers parse them the same way.
//!
//! | case | through the relay | result |
//! | --- | --- | --- |
//! | `Notify` | one sender, one receiver, one-way | frames/s received |
//! | `FixedRate` | the same at the case's rate, bodies stamped with their due time ([`crate::latency`]) | µs percentiles of arrival minus due time |
//! | `SendPipelined`, `RecoverableSend` | the receiver answers each frame with an ack frame to the sender, `outstanding` unacknowledged | acks/s |
//! | `FanOutAll`, `FanOutGroup` | frames to [`ALL`] of `receivers` receivers | deliveries/s |
//! | `AnyOf` | frames to [`ANY`] of `members` receivers | frames/s received in all |
//! | `RequestLatency`, `RecoverableLatency` | a frame echoed back (readdressed), one at a time | µs percentiles |
//! | `Priority` | the same, while the sender's one queue carries a backlog of 4 KiB frames to the same receiver ahead of it | µs percentiles |
//! | `RequestRate` | frames echoed back, `outstanding` in flight | replies/s |
//! | `Bulk` through the server | bodies each answered by a 1-byte ack frame, [`BULK_IN_FLIGHT`] in flight, [`bulk_plans`] | MB/s |
//!
//! `Session` and lazy-channel bulk are direct paths with no relay
//! counterpart ("n/a"), and the TLS cases have none either. TCP loses nothing: the loss is always 0, and a
//! count that falls short fails the case instead of giving a rate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::bulk_tcp::{self, send_bodies};
use crate::child::ListeningChild;
use crate::latency::{self, PacedSender, Recorder};
use crate::options::{Options, WAIT_TIMEOUT};
use crate::raw_cases::{
    bulk_plans, complete_frames, count_frames, round_trip, BATCH_BYTES, BULK_IN_FLIGHT,
};
use crate::raw_tcp::{write_frames_for, READ_CHUNK};
use crate::report::per_second;
use crate::suite::{BulkPath, Case, Latency, Measurement, Outcome};
use crate::transfer::Transfer;
use crate::wait::{wait_for_count, Counter};

/// The relay binary of this package (`src/bin/`).
pub const RELAY_BINARY: &str = "bench-relay";

/// The destination of a frame for every other connected client.
pub const ALL: u32 = 0xFFFF_FFFF;

/// The destination of a frame for the next of the other connected
/// clients, round robin.
pub const ANY: u32 = 0xFFFF_FFFE;

/// Bytes of the destination at the start of every payload (and of a
/// client's hello).
pub const DEST_LEN: usize = 4;

/// Largest body the relay carries, the message server's limit in the
/// bulk cases ([`crate::ours::BULK_MAX_MESSAGE_BYTES`]).
pub const MAX_BODY: usize = 128 * 1024 * 1024;

/// Largest payload (destination and body) the relay takes; a longer one
/// closes the connection.
pub const MAX_PAYLOAD: usize = DEST_LEN + MAX_BODY;

/// The id of the sending (or requesting) client of every case; the
/// receivers are `SENDER + 1` onwards.
const SENDER: u32 = 1;

/// Where the suite looks for [`RELAY_BINARY`] first (see
/// [`crate::child::beside_exe`]); `None` if it is not there.
pub fn relay_binary() -> Option<PathBuf> {
    crate::child::beside_exe(RELAY_BINARY)
}

/// Measures `case` through a fresh relay process (`relay`, the
/// `bench-relay` binary) with the pattern described in the module docs.
/// Anything that goes wrong (the relay does not start or exits badly, a
/// wait times out, a count falls short) is [`Outcome::Failed`]; the direct
/// paths are [`Outcome::Skipped`] ("n/a"). The loss is always 0.
pub async fn run(case: Case, options: &Options, relay: &Path) -> Measurement {
    if !case.through_server() {
        return Measurement::skipped("n/a");
    }
    let process = match start_relay(relay, Stdio::inherit()).await {
        Ok(process) => process,
        Err(e) => return Measurement::failed(format!("{e:#}")),
    };
    let measured = run_at(case, options, process.addr()).await;
    match process.stop().await {
        Err(e) if measured.outcome.value().is_some() => Measurement::failed(format!("{e:#}")),
        _ => measured,
    }
}

/// Measures `case` as [`run`] does, through a relay already listening at
/// `relay` (whose client ids 1 and up must be free).
pub async fn run_at(case: Case, options: &Options, relay: SocketAddr) -> Measurement {
    let budget = options.warmup + options.measure + 4 * WAIT_TIMEOUT;
    let measured = match tokio::time::timeout(budget, measure(case, options, relay)).await {
        Ok(measured) => measured,
        Err(_) => Err(anyhow!("the relay case did not finish within {budget:?}")),
    };
    measured.unwrap_or_else(|e| Measurement::failed(format!("{e:#}")))
}

/// Connects to the relay at `relay` as client `id` (nodelay) and waits
/// for the relay to take it.
///
/// # Errors
///
/// The connection fails, the relay closes it (a reserved id, or one in
/// use) or answers otherwise, or all that takes longer than
/// [`WAIT_TIMEOUT`].
pub async fn connect(relay: SocketAddr, id: u32) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(WAIT_TIMEOUT, async {
        let mut stream = TcpStream::connect(relay)
            .await
            .context("connecting to the relay")?;
        stream.set_nodelay(true)?;
        stream.write_all(&id.to_be_bytes()).await?;
        let mut welcome = [0u8; DEST_LEN];
        stream
            .read_exact(&mut welcome)
            .await
            .with_context(|| format!("the relay refused client {id}"))?;
        ensure!(
            welcome == id.to_be_bytes(),
            "the relay answered client {id} with {welcome:?}"
        );
        Ok(stream)
    })
    .await
    .context("connecting to the relay timed out")?
}

// ---------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------

/// Starts a `bench-relay` process (`binary`) on a free loopback port, its
/// stderr going to `stderr` (`Stdio::piped()` to get it back from
/// [`ListeningChild::stop`]).
///
/// # Errors
///
/// As [`ListeningChild::start`].
pub async fn start_relay(binary: &Path, stderr: Stdio) -> anyhow::Result<ListeningChild> {
    ListeningChild::start(binary, ["--listen", "127.0.0.1:0"], stderr).await
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// A payload: `dest` and a body of `body_len` bytes.
fn payload(dest: u32, body_len: usize) -> Bytes {
    let mut payload = BytesMut::with_capacity(DEST_LEN + body_len);
    payload.put_u32(dest);
    payload.put_bytes(0xAB, body_len);
    payload.freeze()
}

/// A whole frame: the length prefix and `dest` and `body`.
fn frame(dest: u32, body: &[u8]) -> anyhow::Result<Bytes> {
    let len = u32::try_from(DEST_LEN + body.len()).context("body too long for a u32 prefix")?;
    let mut frame = BytesMut::with_capacity(4 + DEST_LEN + body.len());
    frame.put_u32(len);
    frame.put_u32(dest);
    frame.put_slice(body);
    Ok(frame.freeze())
}

/// The payload of the first frame of `frames`, which holds only complete
/// frames, split off; `None` once it is empty.
fn next_payload(frames: &mut BytesMut) -> Option<Bytes> {
    let prefix: [u8; 4] = frames.get(..4)?.try_into().ok()?;
    let len = u32::from_be_bytes(prefix) as usize;
    frames.advance(4);
    Some(frames.split_to(len.min(frames.len())).freeze())
}

/// Sets the destination of every frame in `frames` (complete frames only)
/// to `to`.
fn readdress(frames: &mut [u8], to: u32) {
    let mut at = 0;
    while frames.len() - at >= 4 + DEST_LEN {
        let len = u32::from_be_bytes([frames[at], frames[at + 1], frames[at + 2], frames[at + 3]])
            as usize;
        frames[at + 4..at + 4 + DEST_LEN].copy_from_slice(&to.to_be_bytes());
        at += 4 + len;
    }
}

/// Room to reserve before the next read, given the partial frame `rest`:
/// the rest of a large frame at once, else [`READ_CHUNK`].
///
/// # Errors
///
/// The partial frame is longer than [`MAX_PAYLOAD`].
fn room_for(rest: &[u8]) -> anyhow::Result<usize> {
    let Some(prefix) = rest.get(..4) else {
        return Ok(READ_CHUNK);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    ensure!(
        len <= MAX_PAYLOAD,
        "a frame of {len} bytes is over the limit"
    );
    Ok((4 + len).saturating_sub(rest.len()).max(READ_CHUNK))
}

// ---------------------------------------------------------------------------
// The clients of one case
// ---------------------------------------------------------------------------

/// How an answering client answers each frame.
#[derive(Debug, Clone)]
enum Answer {
    /// With this frame (an ack addressed to the sender).
    Ack(Bytes),
    /// With the frame itself, readdressed to `to`.
    Echo {
        /// The requester.
        to: u32,
    },
}

/// The clients of one case: their tasks, the write sides of those that
/// only read, and the stop signals of those that answer. Dropping it
/// aborts whatever still runs.
#[derive(Default)]
struct Clients {
    tasks: JoinSet<anyhow::Result<()>>,
    quiet: Vec<OwnedWriteHalf>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Clients {
    /// `count` receivers with ids from `SENDER + 1`, counting the frames
    /// they get into `received`.
    async fn receivers(
        &mut self,
        relay: SocketAddr,
        count: usize,
        received: &Counter,
    ) -> anyhow::Result<()> {
        for i in 0..count {
            let id = receiver_id(i)?;
            let (read, write) = connect(relay, id).await?.into_split();
            self.tasks
                .spawn(count_frames(read, received.clone(), None::<Arc<Semaphore>>));
            self.quiet.push(write);
        }
        Ok(())
    }

    /// Client `SENDER + 1`, answering every frame `how`, counting them
    /// into `answered`.
    async fn answering(
        &mut self,
        relay: SocketAddr,
        how: Answer,
        answered: &Counter,
    ) -> anyhow::Result<()> {
        let (read, write) = connect(relay, receiver_id(0)?).await?.into_split();
        let (stop, stopped) = oneshot::channel();
        self.tasks
            .spawn(answer(read, write, how, answered.clone(), stopped));
        self.stops.push(stop);
        Ok(())
    }

    /// The sender (or requester), with its incoming frames counted into
    /// `incoming` and each giving a permit back to `window`: its write
    /// side.
    fn sender(
        &mut self,
        stream: TcpStream,
        incoming: &Counter,
        window: Option<Arc<Semaphore>>,
    ) -> OwnedWriteHalf {
        let (read, write) = stream.into_split();
        self.tasks
            .spawn(count_frames(read, incoming.clone(), window));
        write
    }

    /// Ends every client (the sender's write side is already shut down):
    /// the quiet ones shut their write sides, the answering ones are told
    /// to stop; each task then reads until the relay closes its side.
    async fn close(mut self) -> anyhow::Result<()> {
        for write in &mut self.quiet {
            write.shutdown().await?;
        }
        self.stops.clear();
        tokio::time::timeout(WAIT_TIMEOUT, async {
            while let Some(joined) = self.tasks.join_next().await {
                joined.context("a relay client task panicked")??;
            }
            anyhow::Ok(())
        })
        .await
        .context("the relay clients did not stop")?
    }
}

/// The id of receiver `i` (from 0).
fn receiver_id(i: usize) -> anyhow::Result<u32> {
    u32::try_from(i)
        .ok()
        .and_then(|i| i.checked_add(SENDER + 1))
        .filter(|&id| id < ANY)
        .context("too many receivers for the relay's ids")
}

/// Reads frames, answering each `how` (one write and flush per read) and
/// counting them into `answered`. When `stop` fires (or its sender is
/// dropped) it shuts its write side down and reads on, answering nothing,
/// until the relay closes its side.
async fn answer(
    mut read: OwnedReadHalf,
    write: OwnedWriteHalf,
    how: Answer,
    answered: Counter,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut write = BufWriter::new(write);
    let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
    let mut room = READ_CHUNK;
    let mut stopping = false;
    loop {
        buf.reserve(room);
        let n = tokio::select! {
            biased;
            n = read.read_buf(&mut buf) => n?,
            _ = &mut stop, if !stopping => {
                write.shutdown().await?;
                stopping = true;
                continue;
            }
        };
        if n == 0 {
            ensure!(buf.is_empty(), "stream ended inside a frame");
            return Ok(());
        }
        let (frames, complete) = complete_frames(&buf);
        room = room_for(&buf[complete..])?;
        let mut chunk = buf.split_to(complete);
        if stopping || frames == 0 {
            continue;
        }
        match &how {
            Answer::Ack(ack) => {
                while let Some(payload) = next_payload(&mut chunk) {
                    drop(payload);
                    write.write_all(ack).await?;
                }
            }
            Answer::Echo { to } => {
                readdress(&mut chunk, *to);
                write.write_all(&chunk).await?;
            }
        }
        write.flush().await?;
        answered.add(frames);
    }
}

/// Reads frames until end of stream, recording each body (after the
/// destination) in `recorder`.
async fn record_frames(mut read: OwnedReadHalf, recorder: Recorder) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
    let mut room = READ_CHUNK;
    loop {
        buf.reserve(room);
        if read.read_buf(&mut buf).await? == 0 {
            ensure!(buf.is_empty(), "stream ended inside a frame");
            return Ok(());
        }
        let (_, complete) = complete_frames(&buf);
        room = room_for(&buf[complete..])?;
        let mut chunk = buf.split_to(complete);
        while let Some(payload) = next_payload(&mut chunk) {
            recorder.record(payload.get(DEST_LEN..).unwrap_or_default());
        }
    }
}

/// A client's write side as a fixed-rate sender: each body a frame to
/// `dest` in a [`BATCH_BYTES`] `BufWriter`, flushed when nothing more is
/// due.
struct PacedRelay {
    writer: BufWriter<OwnedWriteHalf>,
    dest: [u8; DEST_LEN],
}

impl PacedSender for PacedRelay {
    async fn send(&mut self, body: Bytes) -> anyhow::Result<()> {
        let len = u32::try_from(DEST_LEN + body.len()).context("body too long for a u32 prefix")?;
        self.writer.write_all(&len.to_be_bytes()).await?;
        self.writer.write_all(&self.dest).await?;
        self.writer.write_all(&body).await?;
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.writer.flush().await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

async fn measure(case: Case, options: &Options, relay: SocketAddr) -> anyhow::Result<Measurement> {
    let rate = |rate: f64| Measurement::from(Outcome::Rate(rate));
    Ok(match case {
        Case::Notify { body } => rate(one_way(options, relay, body, 1, receiver_id(0)?).await?),
        Case::FixedRate { body, rate } => fixed_rate(options, relay, body, rate).await?,
        Case::SendPipelined {
            body, outstanding, ..
        }
        | Case::RecoverableSend { body, outstanding } => {
            let ack = Answer::Ack(frame(SENDER, &[0; 4])?);
            rate(answered(options, relay, body, outstanding, ack, "acked").await?)
        }
        Case::FanOutAll { receivers, body } | Case::FanOutGroup { receivers, body } => {
            rate(one_way(options, relay, body, receivers, ALL).await?)
        }
        Case::AnyOf { members, body } => rate(one_way(options, relay, body, members, ANY).await?),
        Case::RequestLatency { body } | Case::RecoverableLatency { body } => {
            ping_pong(options, relay, body).await?.into()
        }
        Case::Priority { body } => behind_a_backlog(options, relay, body).await?.into(),
        Case::RequestRate { body, outstanding } => {
            let echo = Answer::Echo { to: SENDER };
            rate(answered(options, relay, body, outstanding, echo, "echo rate").await?)
        }
        Case::Bulk {
            body,
            path: BulkPath::Server,
        } => rate(bulk(options, relay, body).await?),
        Case::Session { .. }
        | Case::NotifyTls { .. }
        | Case::LazyTls { .. }
        | Case::Stream { .. }
        | Case::HeadOfLine { .. }
        | Case::Bulk {
            path: BulkPath::Lazy,
            ..
        } => Measurement::skipped("n/a"),
    })
}

/// One sender, `receivers` receivers, frames to `dest` (a receiver,
/// [`ALL`] or [`ANY`]): frames received per second over the measured
/// phase, by all receivers.
async fn one_way(
    options: &Options,
    relay: SocketAddr,
    body_len: usize,
    receivers: usize,
    dest: u32,
) -> anyhow::Result<f64> {
    ensure!(receivers > 0, "no receivers");
    let per_frame = if dest == ALL { receivers as u64 } else { 1 };
    let received = Counter::new();
    let mut clients = Clients::default();
    clients.receivers(relay, receivers, &received).await?;
    let sender = connect(relay, SENDER).await?;
    let write = clients.sender(sender, &Counter::new(), None);
    let mut writer = BufWriter::with_capacity(BATCH_BYTES, write);
    let payload = payload(dest, body_len);

    let warm = write_frames_for(&mut writer, &payload, options.warmup, None).await?;
    wait_for_count(&received, warm * per_frame, WAIT_TIMEOUT)
        .await
        .context("relay one-way warm-up")?;

    let base = received.get();
    let start = Instant::now();
    let sent = write_frames_for(&mut writer, &payload, options.measure, None).await?;
    let done = wait_for_count(&received, base + sent * per_frame, WAIT_TIMEOUT)
        .await
        .context("relay one-way")?;

    writer.shutdown().await?;
    clients.close().await?;
    let expected = (warm + sent) * per_frame;
    ensure!(
        received.get() == expected,
        "the receivers counted {} frames, {expected} were sent",
        received.get()
    );
    Ok(per_second(sent * per_frame, done - start))
}

/// One-way at `rate` frames per second: latency from due time to arrival.
async fn fixed_rate(
    options: &Options,
    relay: SocketAddr,
    body_len: usize,
    rate: u64,
) -> anyhow::Result<Measurement> {
    ensure!(rate > 0, "no rate to send at");
    let recorder = Recorder::new();
    let mut clients = Clients::default();
    let (read, write) = connect(relay, receiver_id(0)?).await?.into_split();
    clients.tasks.spawn(record_frames(read, recorder.clone()));
    clients.quiet.push(write);
    let sender = connect(relay, SENDER).await?;
    let write = clients.sender(sender, &Counter::new(), None);
    let mut paced = PacedRelay {
        writer: BufWriter::with_capacity(BATCH_BYTES, write),
        dest: receiver_id(0)?.to_be_bytes(),
    };
    let measured =
        latency::fixed_rate(&mut paced, &recorder, body_len, rate as f64, options).await?;
    paced.writer.shutdown().await?;
    clients.close().await?;
    ensure!(
        measured.lost == 0,
        "{} frames of the measured phase did not arrive",
        measured.lost
    );
    Ok(measured)
}

/// Frames each answered through the relay (`answer`: an ack frame or the
/// frame echoed back), at most `outstanding` unanswered: answers per
/// second over the measured phase. `what` names the case in errors.
async fn answered(
    options: &Options,
    relay: SocketAddr,
    body_len: usize,
    outstanding: usize,
    answer: Answer,
    what: &str,
) -> anyhow::Result<f64> {
    ensure!(outstanding > 0, "no frames in flight");
    let mut clients = Clients::default();
    clients.answering(relay, answer, &Counter::new()).await?;
    let window = Arc::new(Semaphore::new(outstanding));
    let answers = Counter::new();
    let sender = connect(relay, SENDER).await?;
    let write = clients.sender(sender, &answers, Some(window.clone()));
    let mut writer = BufWriter::with_capacity(BATCH_BYTES, write);
    let payload = payload(receiver_id(0)?, body_len);

    let warm = write_frames_for(&mut writer, &payload, options.warmup, Some(&window)).await?;
    wait_for_count(&answers, warm, WAIT_TIMEOUT)
        .await
        .with_context(|| format!("relay {what} warm-up"))?;

    let base = answers.get();
    let start = Instant::now();
    let sent = write_frames_for(&mut writer, &payload, options.measure, Some(&window)).await?;
    let done = wait_for_count(&answers, base + sent, WAIT_TIMEOUT)
        .await
        .with_context(|| format!("relay {what}"))?;

    writer.shutdown().await?;
    clients.close().await?;
    Ok(per_second(sent, done - start))
}

/// One frame echoed back through the relay at a time: round-trip
/// percentiles.
async fn ping_pong(
    options: &Options,
    relay: SocketAddr,
    body_len: usize,
) -> anyhow::Result<Outcome> {
    let mut clients = Clients::default();
    clients
        .answering(relay, Answer::Echo { to: SENDER }, &Counter::new())
        .await?;
    let mut client = connect(relay, SENDER).await?;
    let frame = frame(receiver_id(0)?, &vec![0xAB; body_len])?;
    let mut reply = vec![0u8; frame.len()];

    let start = Instant::now();
    while start.elapsed() < options.warmup {
        round_trip(&mut client, &frame, &mut reply).await?;
    }
    if reply.get(4..4 + DEST_LEN) != Some(&SENDER.to_be_bytes()[..]) {
        bail!("the echo came back addressed to someone else");
    }
    let mut samples = latency::histogram();
    let start = Instant::now();
    while start.elapsed() < options.measure {
        let sent = Instant::now();
        round_trip(&mut client, &frame, &mut reply).await?;
        latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
    }

    client.shutdown().await?;
    clients.close().await?;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no round trip completed")
}

/// Frames waiting in the sender's queue ahead of a measured one in
/// [`behind_a_backlog`], at most: one FIFO, as a sender without
/// priorities has.
const BACKLOG_QUEUED: usize = 64;

/// The first body byte of a measured frame in [`behind_a_backlog`] (a
/// backlog frame's is 0).
const MEASURED: u8 = 1;

/// Frames of `body_len` bytes echoed back through the relay one at a
/// time, while the same sender keeps a backlog of
/// [`crate::suite::PRIORITY_BACKLOG_BYTES`] frames flowing to the same
/// receiver on the same connection: round-trip percentiles. One writer
/// takes both from one queue in order (at most [`BACKLOG_QUEUED`] frames
/// ahead), as a sender without priorities does; the receiver echoes the
/// measured frames and drops the backlog.
async fn behind_a_backlog(
    options: &Options,
    relay: SocketAddr,
    body_len: usize,
) -> anyhow::Result<Outcome> {
    ensure!(body_len > 0, "a measured frame needs a body");
    let receiver = {
        let (mut read, write) = connect(relay, receiver_id(0)?).await?.into_split();
        tokio::spawn(async move {
            let mut write = BufWriter::new(write);
            let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
            let mut room = READ_CHUNK;
            loop {
                buf.reserve(room);
                if read.read_buf(&mut buf).await? == 0 {
                    return anyhow::Ok(());
                }
                let (_, complete) = complete_frames(&buf);
                room = room_for(&buf[complete..])?;
                let mut chunk = buf.split_to(complete);
                let mut echoed = false;
                while let Some(payload) = next_payload(&mut chunk) {
                    if payload.get(DEST_LEN) == Some(&MEASURED) {
                        write
                            .write_all(&frame(SENDER, &payload[DEST_LEN..])?)
                            .await?;
                        echoed = true;
                    }
                }
                if echoed {
                    write.flush().await?;
                }
            }
        })
    };
    let (mut read, write) = connect(relay, SENDER).await?.into_split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(BACKLOG_QUEUED);
    let writer = tokio::spawn(async move {
        let mut write = BufWriter::with_capacity(BATCH_BYTES, write);
        while let Some(frame) = rx.recv().await {
            write.write_all(&frame).await?;
            if rx.is_empty() {
                write.flush().await?;
            }
        }
        write.shutdown().await?;
        anyhow::Ok(())
    });
    let to = receiver_id(0)?;
    let backlog = frame(to, &vec![0; crate::suite::PRIORITY_BACKLOG_BYTES])?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = {
        let (tx, stop) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if tx.send(backlog.clone()).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut body = vec![0xAB; body_len];
    body[0] = MEASURED;
    let measured = frame(to, &body)?;
    let mut reply = vec![0u8; measured.len()];
    let mut samples = latency::histogram();
    let start = Instant::now();
    let run = async {
        while start.elapsed() < options.warmup + options.measure {
            let sent = Instant::now();
            tx.send(measured.clone())
                .await
                .context("the writer is gone")?;
            tokio::time::timeout(WAIT_TIMEOUT, read.read_exact(&mut reply))
                .await
                .context("no echo in time")??;
            if start.elapsed() > options.warmup {
                latency::record(&mut samples, sent.elapsed().as_nanos() as u64);
            }
        }
        anyhow::Ok(())
    }
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.await.context("the backlog's producer panicked")?;
    drop(tx);
    writer.await.context("the writer panicked")??;
    receiver.abort();
    run?;
    Latency::from_histogram(&samples)
        .map(Outcome::Latency)
        .context("no measured frame came back")
}

/// Bodies of `body_len` bytes, each answered by a 1-byte ack frame,
/// [`BULK_IN_FLIGHT`] unacknowledged, for [`bulk_plans`]: MB/s.
async fn bulk(options: &Options, relay: SocketAddr, body_len: usize) -> anyhow::Result<f64> {
    ensure!(
        body_len <= MAX_BODY,
        "a {body_len}-byte body is over the relay's limit"
    );
    let received = Counter::new();
    let mut clients = Clients::default();
    let ack = frame(SENDER, &[bulk_tcp::ACK])?;
    clients
        .answering(relay, Answer::Ack(ack), &received)
        .await?;
    let window = Arc::new(Semaphore::new(BULK_IN_FLIGHT));
    let acks = Counter::new();
    let sender = connect(relay, SENDER).await?;
    let mut write = clients.sender(sender, &acks, Some(window.clone()));
    let payload = payload(receiver_id(0)?, body_len);
    let prefix = u32::try_from(payload.len())
        .context("body too long for a u32 prefix")?
        .to_be_bytes();
    let (warmup, measure) = bulk_plans(options);

    let warm = send_bodies(&mut write, &prefix, &payload, &window, &warmup).await?;
    wait_for_count(&acks, warm, WAIT_TIMEOUT)
        .await
        .context("relay bulk warm-up")?;

    let start = Instant::now();
    let sent = send_bodies(&mut write, &prefix, &payload, &window, &measure).await?;
    let done = wait_for_count(&acks, warm + sent, WAIT_TIMEOUT)
        .await
        .context("relay bulk")?;

    write.shutdown().await?;
    clients.close().await?;
    ensure!(
        received.get() == warm + sent,
        "the receiver counted {} bodies, {} were sent",
        received.get(),
        warm + sent
    );
    Ok(Transfer::new(sent, body_len, done - start).mb_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_destination_first() {
        let f = frame(7, b"hi").expect("frame");
        assert_eq!(&f[..], &[0, 0, 0, 6, 0, 0, 0, 7, b'h', b'i']);
        let p = payload(ALL, 3);
        assert_eq!(&p[..], &[0xFF, 0xFF, 0xFF, 0xFF, 0xAB, 0xAB, 0xAB]);
    }

    #[test]
    fn payloads_are_split_off_in_order() {
        let mut frames = BytesMut::new();
        frames.extend_from_slice(&frame(2, b"one").expect("frame"));
        frames.extend_from_slice(&frame(3, b"").expect("frame"));
        let first = next_payload(&mut frames).expect("first");
        assert_eq!(&first[..], &[0, 0, 0, 2, b'o', b'n', b'e']);
        let second = next_payload(&mut frames).expect("second");
        assert_eq!(&second[..], &[0, 0, 0, 3]);
        assert!(next_payload(&mut frames).is_none());
    }

    #[test]
    fn echoes_are_readdressed_frame_by_frame() {
        let mut frames = [frame(2, b"ab"), frame(2, b""), frame(9, b"xyz")]
            .iter()
            .flat_map(|f| f.as_ref().expect("frame").to_vec())
            .collect::<Vec<u8>>();
        readdress(&mut frames, 1);
        let expected = [frame(1, b"ab"), frame(1, b""), frame(1, b"xyz")]
            .iter()
            .flat_map(|f| f.as_ref().expect("frame").to_vec())
            .collect::<Vec<u8>>();
        assert_eq!(frames, expected);
    }

    #[test]
    fn reads_make_room_for_the_rest_of_a_large_frame() {
        assert_eq!(room_for(&[]).expect("empty"), READ_CHUNK);
        assert_eq!(room_for(&[0, 0]).expect("no prefix yet"), READ_CHUNK);
        let big = frame(2, &vec![0; 1 << 20]).expect("frame");
        assert_eq!(room_for(&big[..10]).expect("big"), 4 + (1 << 20) + 4 - 10);
        assert_eq!(room_for(&big[..100]).expect("small"), (1 << 20) + 8 - 100);
        let small = frame(2, &[0; 100]).expect("frame");
        assert_eq!(room_for(&small[..10]).expect("small"), READ_CHUNK);
        let over = ((MAX_PAYLOAD + 1) as u32).to_be_bytes();
        assert!(room_for(&over).is_err());
    }

    #[test]
    fn receiver_ids_follow_the_sender_and_avoid_the_reserved_ones() {
        assert_eq!(receiver_id(0).expect("first"), SENDER + 1);
        assert_eq!(receiver_id(7).expect("eighth"), SENDER + 8);
        assert!(receiver_id(usize::MAX).is_err());
        assert!(receiver_id((ANY - SENDER - 1) as usize).is_err());
    }
}
