//! The raw-TCP bulk-copy peer: what a hand-written tokio program moves over
//! one loopback connection when every body is acknowledged, measured in the
//! same run as clustercomm's large-message paths.
//!
//! Each body goes out as a 4-byte big-endian length followed by the body,
//! written straight from the sender's buffer (no copy into a `BufWriter`).
//! The reader allocates one buffer per body of exactly its length, reads
//! the body into it, freezes it into `Bytes` the way a codec hands a body
//! on, drops it and answers with a 1-byte ack. The sender keeps at most
//! `in_flight` bodies unacknowledged, like acknowledged sends kept in
//! flight through `Node::submit`.

use std::sync::Arc;

use anyhow::{bail, ensure, Context};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::options::WAIT_TIMEOUT;
use crate::raw_tcp::loopback_pair;
use crate::transfer::{Plan, Transfer};
use crate::wait::{wait_for_count, Counter};

/// The byte the reader answers each body with.
pub const ACK: u8 = 0x06;

/// Bodies of `body.len()` bytes, each acknowledged, at most `in_flight`
/// unacknowledged: a `warmup` phase, then the measured one.
///
/// # Errors
///
/// Socket errors, a body longer than a u32 prefix allows, a write or an ack
/// not completing within [`WAIT_TIMEOUT`], or the reader counting other
/// than what was sent.
pub async fn bulk_ack(
    body: &Bytes,
    in_flight: usize,
    warmup: &Plan,
    measure: &Plan,
) -> anyhow::Result<Transfer> {
    ensure!(in_flight > 0, "in_flight must be at least 1");
    let prefix = u32::try_from(body.len())
        .context("body too long for a u32 prefix")?
        .to_be_bytes();
    let (client, server) = loopback_pair().await?;
    let (server_read, server_write) = server.into_split();
    let receiver = tokio::spawn(receive_bodies(server_read, server_write));
    let (client_read, mut client_write) = client.into_split();
    let window = Arc::new(Semaphore::new(in_flight));
    let acked = Counter::new();
    let ack_reader = tokio::spawn(read_acks(client_read, acked.clone(), window.clone()));

    let warm = send_bodies(&mut client_write, &prefix, body, &window, warmup).await?;
    wait_for_count(&acked, warm, WAIT_TIMEOUT)
        .await
        .context("raw bulk warm-up")?;

    let start = Instant::now();
    let sent = send_bodies(&mut client_write, &prefix, body, &window, measure).await?;
    let done = wait_for_count(&acked, warm + sent, WAIT_TIMEOUT)
        .await
        .context("raw bulk")?;

    client_write.shutdown().await?;
    let received = tokio::time::timeout(WAIT_TIMEOUT, receiver)
        .await
        .context("raw bulk reader did not stop")???;
    ensure!(
        received == warm + sent,
        "raw bulk reader counted {received} bodies, {} were sent",
        warm + sent
    );
    tokio::time::timeout(WAIT_TIMEOUT, ack_reader)
        .await
        .context("raw bulk ack reader did not stop")???;
    Ok(Transfer::new(sent, body.len(), done - start))
}

/// Writes bodies for `plan`, each after taking a window permit (given back
/// when its ack arrives), and returns how many.
pub(crate) async fn send_bodies<W>(
    writer: &mut W,
    prefix: &[u8; 4],
    body: &Bytes,
    window: &Semaphore,
    plan: &Plan,
) -> anyhow::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut sent = 0u64;
    while plan.more(sent, start.elapsed()) {
        tokio::time::timeout(WAIT_TIMEOUT, window.acquire())
            .await
            .context("no ack within the timeout")??
            .forget();
        tokio::time::timeout(WAIT_TIMEOUT, async {
            writer.write_all(prefix).await?;
            writer.write_all(body).await
        })
        .await
        .context("writing a body timed out")??;
        sent += 1;
    }
    Ok(sent)
}

/// Reads bodies until end of stream, acknowledging each with one byte;
/// returns how many.
async fn receive_bodies<R, W>(mut read: R, mut acks: W) -> anyhow::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut bodies = 0u64;
    loop {
        let mut prefix = [0u8; 4];
        let first = read.read(&mut prefix).await?;
        if first == 0 {
            break;
        }
        read.read_exact(&mut prefix[first..])
            .await
            .context("stream ended inside a length prefix")?;
        let len = u32::from_be_bytes(prefix) as usize;
        let mut buf = BytesMut::with_capacity(len);
        let mut limited = (&mut read).take(len as u64);
        while buf.len() < len {
            if limited.read_buf(&mut buf).await? == 0 {
                bail!("stream ended inside a body ({} of {len} bytes)", buf.len());
            }
        }
        let body = buf.freeze();
        drop(body);
        acks.write_all(&[ACK]).await?;
        bodies += 1;
    }
    acks.shutdown().await?;
    Ok(bodies)
}

/// Reads acks until end of stream, counting them and reopening the window.
async fn read_acks<R>(mut read: R, counter: Counter, window: Arc<Semaphore>) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
{
    let mut buf = [0u8; 256];
    loop {
        let n = read.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        ensure!(buf[..n].iter().all(|&b| b == ACK), "unexpected ack byte");
        window.add_permits(n);
        counter.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_are_copied_and_acknowledged() -> anyhow::Result<()> {
        let body = Bytes::from(vec![0x5A; 300_000]);
        let plan = Plan {
            duration: Duration::ZERO,
            min_bodies: 5,
        };
        let t = bulk_ack(&body, 2, &plan, &plan).await?;
        assert_eq!(t.bodies, 5);
        assert_eq!(t.bytes, 1_500_000);
        Ok(())
    }
}
