//! Each way a request can end, timed: a reply, an error reply
//! (`reply_err` reaches the requester as `SendError::Remote`), a request
//! dropped without a reply (`NoReply` at once, not after the timeout), a
//! service closed with requests in its inbox (the same), a per-call
//! timeout, and a receiver process that dies while the request waits
//! (`TargetStopped` within the failure timeout).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{bounded, init_logging, spawn_test_node_with, test_config, TestServer};
use node_runtime::{Node, NodeId, SendError, SendOptions, Target};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_of_a_request() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        // Long enough that an answer before it is not a timeout.
        config.node.send_timeout_ms = 10_000;
        let server = TestServer::start(config.clone()).await?;
        let start = |id: &'static str| {
            Node::builder(id)
                .config(config.clone())
                .message_server(server.addr)
                .ignore_environment()
                .start()
        };
        let (requester, answerer) = (start("requester").await?, start("answerer").await?);
        let mut inbox = answerer.subscribe("svc").await?;
        let to = || Target::Node(NodeId::new("answerer"));
        let answering = tokio::spawn(async move {
            while let Some(m) = inbox.recv().await {
                match m.body().as_ref() {
                    b"ok" => m.reply("fine").await?,
                    b"err" => m.reply_err(42, "no such order").await?,
                    b"drop" => drop(m),
                    b"close" => return anyhow::Ok(inbox),
                    // Kept unanswered: the requester's own timeout ends it.
                    _ => std::mem::forget(m),
                }
            }
            bail!("inbox closed")
        });

        let t = Instant::now();
        let reply = requester.request(to(), "svc", "ok").await?;
        ensure!(reply.body == "fine" && reply.from == "answerer");
        println!("reply: {:.1} ms", ms(t.elapsed()));

        let t = Instant::now();
        match requester.request(to(), "svc", "err").await {
            Err(SendError::Remote { node, code, text }) => {
                ensure!(node == "answerer" && code == 42 && text == "no such order");
                ensure!(!SendError::Remote { node, code, text }.is_definite());
            }
            other => bail!("error reply: {other:?}"),
        }
        println!("error reply: Remote after {:.1} ms", ms(t.elapsed()));

        let t = Instant::now();
        match requester.request(to(), "svc", "drop").await {
            Err(SendError::NoReply { node }) => ensure!(node == "answerer"),
            other => bail!("dropped request: {other:?}"),
        }
        println!(
            "dropped request: NoReply after {:.1} ms (send timeout 10 s)",
            ms(t.elapsed())
        );

        // A per-call timeout, shorter than the config's.
        let t = Instant::now();
        let quick = SendOptions::new().timeout(Duration::from_millis(300));
        match requester.request_with(to(), "svc", "keep", &quick).await {
            Err(SendError::Timeout { after, .. }) => {
                ensure!(after == Duration::from_millis(300), "{after:?}")
            }
            other => bail!("per-call timeout: {other:?}"),
        }
        println!(
            "per-call timeout of 300 ms: Timeout after {:.1} ms",
            ms(t.elapsed())
        );

        // Requests left in an inbox that closes are answered NoReply. The
        // handler stops reading ("close") and hands the inbox back; three
        // requests follow, then an acknowledged marker: once the marker is
        // in the inbox, so are the requests (one sender's messages keep
        // their order), and the inbox is dropped with them in it.
        requester.notify(to(), "svc", "close").await?;
        let inbox = answering.await??;
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let requester = requester.clone();
                tokio::spawn(async move {
                    requester
                        .request(Target::Node(NodeId::new("answerer")), "svc", "queued")
                        .await
                })
            })
            .collect();
        while requester.pending() < 3 {
            tokio::task::yield_now().await;
        }
        requester.send(to(), "svc", "marker").await?;
        ensure!(inbox.len() == 4, "{} in the inbox", inbox.len());
        let t = Instant::now();
        drop(inbox);
        for w in waiting {
            match w.await? {
                Err(SendError::NoReply { node }) => ensure!(node == "answerer"),
                other => bail!("request in a closed inbox: {other:?}"),
            }
        }
        println!(
            "requests in an inbox that closed: NoReply after {:.1} ms",
            ms(t.elapsed())
        );
        requester.shutdown().await;
        answerer.shutdown().await;
        server.stop().await;
        Ok(())
    })
    .await
}

/// A receiver process stopped (SIGSTOP, so it cannot answer) and then
/// killed while a request waits on it: the request ends with
/// `TargetStopped` within the failure timeout (1 s here), not at its
/// 10 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_node_that_dies_ends_within_the_failure_timeout() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        config.node.send_timeout_ms = 10_000;
        let server = TestServer::start(config.clone()).await?;
        let mut victim = spawn_test_node_with(server.addr, "victim", "svc", &[]).await?;
        let requester = Node::builder("requester")
            .config(config.clone())
            .message_server(server.addr)
            .ignore_environment()
            .start()
            .await?;
        // Answered while it runs.
        let reply = requester
            .request(Target::Node(NodeId::new("victim")), "svc", "hello")
            .await?;
        ensure!(reply.body == "hello");
        victim.signal("STOP").await?;
        let waiting = {
            let requester = requester.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = requester
                    .request(Target::Node(NodeId::new("victim")), "svc", "anyone?")
                    .await;
                (r, t.elapsed())
            })
        };
        // The request is on its way (it waits for the stopped process).
        tokio::task::yield_now().await;
        while requester.pending() == 0 {
            tokio::task::yield_now().await;
        }
        victim.kill().await?;
        let (result, took) = waiting.await.context("request task")?;
        match result {
            Err(SendError::TargetStopped { node, .. }) => ensure!(node == "victim"),
            other => bail!("request to a dead node: {other:?}"),
        }
        println!(
            "request to a node killed while it waited: TargetStopped after {:.0} ms (failure timeout 1000 ms, send timeout 10000 ms)",
            ms(took)
        );
        requester.shutdown().await;
        server.stop().await;
        Ok(())
    })
    .await
}
