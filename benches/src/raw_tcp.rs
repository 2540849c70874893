//! The raw-TCP peers: what a hand-written tokio program moves over one
//! loopback connection, measured in the same run as clustercomm.
//!
//! Frames are a 4-byte big-endian length followed by the body. The writer
//! batches them through a [`BufWriter`] (it flushes when the buffer fills);
//! the reader parses them out of a [`BytesMut`], splitting each body off as
//! `Bytes` the way a real codec hands it on.
//!
//! - [`sink`]: one-way; the rate is frames counted by the reader.
//! - [`pipelined_ack`]: the reader answers every frame with a 4-byte ack
//!   through its own `BufWriter`, the writer keeps at most `in_flight`
//!   frames unacknowledged; the rate is acks counted by the writer side.
//!
//! Both run a warm-up phase, wait for the reader to catch up, then measure
//! from the first frame of the measured phase to the moment the last of its
//! frames (or acks) was counted.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::options::{Options, WAIT_TIMEOUT};
use crate::report::per_second;
use crate::wait::{wait_for_count, Counter};

/// Capacity the readers keep free in their buffer before each read.
pub const READ_CHUNK: usize = 64 * 1024;

/// Frames written between two looks at the clock.
pub const FRAMES_PER_CLOCK_CHECK: u64 = 64;

/// Length of an ack.
pub const ACK_LEN: usize = 4;

/// A connected loopback pair, nodelay on both ends like clustercomm's
/// default `[tcp]` settings: (client, accepted).
///
/// # Errors
///
/// Bind, connect or accept failures, or no connection within
/// [`WAIT_TIMEOUT`].
pub async fn loopback_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the raw TCP listener")?;
    let addr = listener.local_addr()?;
    let (client, accepted) = tokio::time::timeout(WAIT_TIMEOUT, async {
        tokio::join!(TcpStream::connect(addr), listener.accept())
    })
    .await
    .context("raw TCP connect timed out")?;
    let client = client.context("raw TCP connect")?;
    let (server, _) = accepted.context("raw TCP accept")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    Ok((client, server))
}

/// One-way frames of `body_len` bytes: frames per second the reader
/// counted over the measured phase.
///
/// # Errors
///
/// Socket errors, or the reader not catching up within [`WAIT_TIMEOUT`].
pub async fn sink(options: &Options, body_len: usize) -> anyhow::Result<f64> {
    let (client, server) = loopback_pair().await?;
    let received = Counter::new();
    let reader = tokio::spawn(count_frames(server, received.clone(), None::<TcpStream>));
    let mut writer = BufWriter::new(client);
    let body = Bytes::from(vec![0xAB; body_len]);

    let warm = write_frames_for(&mut writer, &body, options.warmup, None).await?;
    wait_for_count(&received, warm, WAIT_TIMEOUT)
        .await
        .context("raw sink warm-up")?;

    let base = received.get();
    let start = Instant::now();
    let sent = write_frames_for(&mut writer, &body, options.measure, None).await?;
    let done = wait_for_count(&received, base + sent, WAIT_TIMEOUT)
        .await
        .context("raw sink")?;

    close(writer, reader).await?;
    Ok(per_second(sent, done - start))
}

/// Frames of `body_len` bytes, each acknowledged by the reader, at most
/// `in_flight` unacknowledged: acks per second over the measured phase.
///
/// # Errors
///
/// Socket errors, or the acks not arriving within [`WAIT_TIMEOUT`].
pub async fn pipelined_ack(
    options: &Options,
    body_len: usize,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let (client, server) = loopback_pair().await?;
    let (server_read, server_write) = server.into_split();
    let (client_read, client_write) = client.into_split();
    let reader = tokio::spawn(count_frames(
        server_read,
        Counter::new(),
        Some(server_write),
    ));
    let window = Arc::new(Semaphore::new(in_flight));
    let acked = Counter::new();
    let ack_reader = tokio::spawn(count_acks(client_read, acked.clone(), window.clone()));
    let mut writer = BufWriter::new(client_write);
    let body = Bytes::from(vec![0xAB; body_len]);

    let warm = write_frames_for(&mut writer, &body, options.warmup, Some(&window)).await?;
    wait_for_count(&acked, warm, WAIT_TIMEOUT)
        .await
        .context("raw pipelined-ack warm-up")?;

    let base = acked.get();
    let start = Instant::now();
    let sent = write_frames_for(&mut writer, &body, options.measure, Some(&window)).await?;
    let done = wait_for_count(&acked, base + sent, WAIT_TIMEOUT)
        .await
        .context("raw pipelined ack")?;

    close(writer, reader).await?;
    tokio::time::timeout(WAIT_TIMEOUT, ack_reader)
        .await
        .context("raw ack reader did not stop")???;
    Ok(per_second(sent, done - start))
}

/// Writes frames for `duration` and returns how many. With a `window`, each
/// frame first takes a permit (returned when its ack arrives); when none is
/// free the buffer is flushed before waiting, so buffered frames can be
/// acknowledged. Ends with a flush.
pub(crate) async fn write_frames_for<W>(
    writer: &mut BufWriter<W>,
    body: &Bytes,
    duration: Duration,
    window: Option<&Semaphore>,
) -> anyhow::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let prefix = u32::try_from(body.len())
        .context("body too long for a u32 prefix")?
        .to_be_bytes();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < duration {
        for _ in 0..FRAMES_PER_CLOCK_CHECK {
            if let Some(window) = window {
                match window.try_acquire() {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        writer.flush().await?;
                        tokio::time::timeout(WAIT_TIMEOUT, window.acquire())
                            .await
                            .context("no ack within the timeout")??
                            .forget();
                    }
                }
            }
            writer.write_all(&prefix).await?;
            writer.write_all(body).await?;
            sent += 1;
        }
    }
    writer.flush().await?;
    Ok(sent)
}

/// Reads frames until end of stream, counting them; with `acks`, answers
/// each with a 4-byte ack and flushes once per read.
async fn count_frames<R, W>(mut read: R, counter: Counter, acks: Option<W>) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut acks = acks.map(BufWriter::new);
    let mut buf = BytesMut::with_capacity(2 * READ_CHUNK);
    let mut seq = 0u32;
    loop {
        buf.reserve(READ_CHUNK);
        if read.read_buf(&mut buf).await? == 0 {
            if !buf.is_empty() {
                bail!("stream ended inside a frame");
            }
            break;
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
            if let Some(acks) = acks.as_mut() {
                seq = seq.wrapping_add(1);
                acks.write_all(&seq.to_be_bytes()).await?;
            }
        }
        if let Some(acks) = acks.as_mut() {
            acks.flush().await?;
        }
        counter.add(frames);
    }
    if let Some(mut acks) = acks {
        acks.shutdown().await?;
    }
    Ok(())
}

/// Reads acks until end of stream, counting them and reopening the window.
async fn count_acks<R>(mut read: R, counter: Counter, window: Arc<Semaphore>) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK / 4);
        if read.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let acks = buf.len() / ACK_LEN;
        buf.advance(acks * ACK_LEN);
        window.add_permits(acks);
        counter.add(acks as u64);
    }
}

/// Shuts the writer down and waits for the reader to see end of stream.
async fn close<W>(
    mut writer: BufWriter<W>,
    reader: JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer.shutdown().await?;
    tokio::time::timeout(WAIT_TIMEOUT, reader)
        .await
        .context("raw reader did not stop")???;
    Ok(())
}
