//! A 256 MiB body over a lazy channel costs at most about one extra copy at
//! either end: measured as peak resident memory (VmHWM) of the sending test
//! process and of the receiving node process. One test per binary, so no
//! other test shares the measured process.

use std::time::Duration;

use bytes::Bytes;
use clustercomm_tests::{
    bounded, init_logging, own_status_kib, spawn_test_node_with, test_config, TestServer,
};
use node_runtime::{Node, Target};

const MIB: u64 = 1 << 20;
const BODY: u64 = 256 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_body_costs_at_most_one_extra_copy_at_either_end() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = TestServer::start(test_config()).await?;
        let limit = (512 * MIB).to_string();
        let receiver = spawn_test_node_with(
            server.addr,
            "big-receiver",
            "bulk",
            &["--max-message-bytes", &limit],
        )
        .await?;
        let mut config = test_config();
        config.limits.max_message_bytes = 512 * MIB;
        config.node.send_timeout_ms = 60_000;
        let sender = Node::builder("big-sender")
            .config(config)
            .message_server(server.addr)
            .start()
            .await?;
        while !sender.members().iter().any(|m| m.id == "big-receiver") {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // The body is written (so resident) before the baseline is taken.
        let body = Bytes::from(vec![0x42u8; BODY as usize]);
        let sender_before = own_status_kib("VmHWM")?;
        let receiver_before = receiver.proc_status_kib("VmHWM")?;

        let report = sender
            .send(Target::Node("big-receiver".into()), "bulk", body.clone())
            .await?;
        assert_eq!(report.delivered.len(), 1);
        let c = sender.counters();
        assert_eq!(
            (c.lazy_messages, c.lazy_bytes, c.server_messages),
            (1, BODY, 0)
        );
        assert_eq!(
            server.handle.counters().message_bytes,
            0,
            "no bulk through the server"
        );

        let sender_growth = (own_status_kib("VmHWM")? - sender_before) * 1024;
        let receiver_growth = (receiver.proc_status_kib("VmHWM")? - receiver_before) * 1024;
        eprintln!(
            "peak memory growth for a {} MiB body: sender {} MiB, receiver {} MiB",
            BODY / MIB,
            sender_growth / MIB,
            receiver_growth / MIB
        );
        // The sender writes straight from the body: growth well under one
        // extra copy. The receiver holds the body once (read straight into
        // its final buffer), plus at most about one copy.
        assert!(
            sender_growth <= BODY / 2,
            "sender grew by {sender_growth} bytes"
        );
        assert!(
            receiver_growth <= 2 * BODY + 32 * MIB,
            "receiver grew by {receiver_growth} bytes"
        );
        assert!(
            receiver_growth >= BODY / 2,
            "the receiver did not hold the body?"
        );
        Ok(())
    })
    .await
}
