//! Priorities (issue 18): a message keeps the priority it was sent with
//! (`SendOptions::priority`, or its service's `[services.<name>]` default)
//! on every path, and its receiver sees it.

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, test_config, TestServer};
use node_runtime::{
    Config, Inbox, Message, Node, NodeId, Priority, SendOptions, ServiceConfig, Target,
};

/// The receiver.
const RECEIVER: &str = "receiver";

async fn node(id: &str, config: &Config, server: &TestServer) -> anyhow::Result<Node> {
    Ok(Node::builder(id)
        .config(config.clone())
        .message_server(server.addr)
        .ignore_environment()
        .start()
        .await?)
}

async fn next(inbox: &mut Inbox) -> anyhow::Result<Message> {
    bounded(async { inbox.recv().await.context("inbox closed") }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_keeps_its_priority_on_every_path() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let mut config = test_config();
        // Bodies above 1 KiB take a lazy channel.
        config.lazy.threshold_bytes = 1024;
        config.services.insert(
            "audit".into(),
            ServiceConfig {
                priority: Some(Priority::Low),
            },
        );
        let server = TestServer::start(config.clone()).await?;
        let sender = node("sender", &config, &server).await?;
        let receiver = node(RECEIVER, &config, &server).await?;
        let mut svc = receiver.subscribe("svc").await?;
        let mut audit = receiver.subscribe("audit").await?;
        let to = || Target::Node(NodeId::new(RECEIVER));
        let with = |p| SendOptions::new().priority(p);

        // Through the message server.
        sender.send(to(), "svc", "plain").await?;
        let m = next(&mut svc).await?;
        ensure!(
            m.priority() == Priority::Normal,
            "default: {:?}",
            m.priority()
        );
        for p in Priority::ALL {
            sender.send_with(to(), "svc", "given", &with(p)).await?;
            let m = next(&mut svc).await?;
            ensure!(m.priority() == p, "sent {p}, received {}", m.priority());
        }
        sender.notify(to(), "audit", "by config").await?;
        let m = next(&mut audit).await?;
        ensure!(
            m.priority() == Priority::Low,
            "the service's default: {}",
            m.priority()
        );
        sender
            .notify_with(to(), "audit", "overridden", &with(Priority::High))
            .await?;
        ensure!(next(&mut audit).await?.priority() == Priority::High);

        // A request, and its reply.
        let answering = {
            let sender = sender.clone();
            async move {
                sender
                    .request_with(to(), "svc", "question", &with(Priority::Express))
                    .await
            }
        };
        let (reply, asked) = tokio::join!(answering, async {
            let m = next(&mut svc).await?;
            let priority = m.priority();
            m.reply("answer").await?;
            anyhow::Ok(priority)
        });
        ensure!(reply?.body == "answer");
        ensure!(asked? == Priority::Express, "the request's priority");

        // Over a lazy channel.
        let lazy_before = sender.counters().lazy_messages;
        let large = vec![7u8; 4096];
        sender
            .send_with(to(), "svc", large.clone(), &with(Priority::High))
            .await?;
        let m = next(&mut svc).await?;
        ensure!(m.body().len() == large.len());
        ensure!(
            m.priority() == Priority::High,
            "over the lazy channel: {}",
            m.priority()
        );
        ensure!(
            sender.counters().lazy_messages > lazy_before,
            "the large body did not take the lazy channel"
        );
        Ok(())
    })
    .await
}
