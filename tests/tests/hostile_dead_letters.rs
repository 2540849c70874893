//! The dead-letter frames are hostile ground too: a node that files dead
//! letters cannot pass them off as filed by someone else, cannot grow the
//! queue past its bounds (what does not fit is counted), cannot make a
//! query answer more than its bound, and loses its connection for names of
//! bad length, while the server goes on serving everyone else.

use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::BytesMut;
use clustercomm_tests::raw::{self, RawNode};
use clustercomm_tests::{bounded, init_logging, test_config, TestServer};
use node_runtime::{NodeId, Target};
use tokio::io::AsyncWriteExt;
use transports::protocol::{
    DeadLetter, DeadLetterQuery, DeadReason, Header, Interests, Priority, MAX_DEAD_LETTER_QUERY,
};

fn letter(service: &str, filed_by: &str) -> DeadLetter {
    DeadLetter {
        id: 77,
        sender: NodeId::new("victim"),
        target: Target::Node(NodeId::new("elsewhere")),
        service: service.to_owned(),
        priority: Priority::Express,
        reason: DeadReason::Expired,
        at_unix_ms: 1,
        filed_by: filed_by.to_owned(),
        body_bytes: 1 << 40,
    }
}

fn frame(header: &Header, body: &[u8]) -> anyhow::Result<BytesMut> {
    let mut buf = BytesMut::new();
    transports::frame::encode_header(header, body.len(), 1 << 20, &mut buf)?;
    buf.extend_from_slice(body);
    Ok(buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_frames_are_checked_bounded_and_cannot_forge_their_filer() -> anyhow::Result<()>
{
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.message_server.dead_letter_entries = 10;
        let server = TestServer::start(config.clone()).await?;
        let key = transports::auth::SessionKey::generate()?;
        let hello = raw::hello("mallory", cluster_config::DEFAULT_CLUSTER_NAME, &key);
        let mut mallory =
            RawNode::register(server.addr, hello, &Interests::default(), key, None).await?;

        // Filed as "the server", with a made-up number and size: the server
        // says who filed it, numbers it and counts its body itself.
        let claimed = Header::DeadLetter(Box::new(letter("svc", "")));
        mallory.writer.write_all(&frame(&claimed, b"body")?).await?;
        let handle = server.handle.clone();
        bounded(async {
            while handle.dead_letter_stats().entries == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        })
        .await?;
        let filed = server.handle.dead_letters(1);
        let filed = filed.first().context("the dead letter")?;
        ensure!(filed.filed_by == "mallory", "filed by {:?}", filed.filed_by);
        ensure!(filed.id == 1 && filed.body_bytes == 4, "{filed:?}");

        // A flood: the queue holds its bound and counts the rest.
        for i in 0..50 {
            let h = Header::DeadLetter(Box::new(letter(&format!("flood-{i}"), "x")));
            mallory.writer.write_all(&frame(&h, &[0u8; 64])?).await?;
        }
        // A query asking for everything, many times over, is answered with
        // at most its bound and an end.
        let query = DeadLetterQuery {
            token: 9,
            ids: (0..(MAX_DEAD_LETTER_QUERY as u64 * 2)).collect(),
            limit: u32::MAX,
            bodies: true,
            ..DeadLetterQuery::default()
        };
        mallory
            .writer
            .write_all(&frame(&Header::DeadLetters(Box::new(query)), b"")?)
            .await?;
        let (entries, stats) = bounded(async {
            let mut entries = 0usize;
            loop {
                let f = mallory
                    .reader
                    .next()
                    .await?
                    .context("the server closed the connection")?;
                match f.header() {
                    Header::DeadLetterEntry { token: 9, .. } => entries += 1,
                    Header::DeadLettersEnd { token: 9, result } => {
                        let stats = result.clone().map_err(anyhow::Error::msg)?;
                        return anyhow::Ok((entries, stats));
                    }
                    _ => {}
                }
            }
        })
        .await?;
        ensure!(entries == 10, "{entries} entries answered");
        ensure!(
            stats.entries == 10 && stats.added == 10 && stats.overflowed == 41,
            "{stats:?}"
        );

        // A name of bad length costs the node its connection.
        let bad = Header::DeadLetter(Box::new(letter(&"s".repeat(300), "")));
        mallory.writer.write_all(&frame(&bad, b"")?).await?;
        let closed = bounded(async {
            loop {
                match mallory.reader.next().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return anyhow::Ok(()),
                }
            }
        })
        .await;
        closed.context("the server kept a node that sent a service name of 300 bytes")?;

        // Everyone else is served as before.
        let a = server.node("a", &config).await?;
        let b = server.node("b", &config).await?;
        let mut inbox = b.subscribe("svc").await?;
        a.send(Target::Node(NodeId::new("b")), "svc", "still here")
            .await?;
        let m = clustercomm_tests::next_message(&mut inbox).await?;
        ensure!(m.body().as_ref() == b"still here");
        ensure!(server.handle.dead_letter_stats().entries == 10);
        Ok(())
    })
    .await
}
