//! Recoverable messages under crashes (issue 19): two senders stream
//! recoverable messages to two receivers while sender, receiver and
//! message-server processes are SIGKILLed and restarted at random moments
//! (the seed is printed; `CRASH_SEED` repeats a run). Every message arrives
//! once, in order per sender. And an acknowledged message is in its
//! receiver's store when its sender learns of it.
//!
//! `CLUSTERCOMM_LONG_FAULTS=1` runs the long version: 50,000 messages, each
//! kind of process killed 5 times.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{
    init_logging, message_server_bin, test_config, ChildProcess, DataDir, TEST_WAIT,
};
use node_runtime::{Node, NodeId, SendOptions, Target};
use tokio::process::Command;

const SENDERS: u32 = 2;
const RECEIVERS: u32 = 2;

fn long() -> bool {
    std::env::var("CLUSTERCOMM_LONG_FAULTS").is_ok_and(|v| v == "1")
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let server = message_server_bin()?;
    let dir = server.parent().context("a binary directory")?;
    let path = dir.join(name);
    ensure!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    Ok(path)
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The test timings as the server's config file.
fn server_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let config = test_config();
    std::fs::create_dir_all(dir)?;
    let path = dir.join("server.toml");
    std::fs::write(
        &path,
        format!(
            "[cluster]\nheartbeat_interval_ms = {}\nfailure_timeout_ms = {}\n",
            config.cluster.heartbeat_interval_ms, config.cluster.failure_timeout_ms
        ),
    )?;
    Ok(path)
}

async fn start_server(addr: SocketAddr, config: &Path) -> anyhow::Result<ChildProcess> {
    let mut cmd = Command::new(message_server_bin()?);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config")
        .arg(config);
    ChildProcess::spawn(cmd, "message-server listening on").await
}

/// What the receivers printed: (sender, receiver) -> numbers in the order
/// handed over, across every restart.
type Delivered = Arc<Mutex<BTreeMap<(u32, u32), Vec<u64>>>>;

/// One crash-node process and how to start it again.
struct CrashNode {
    args: Vec<String>,
    process: Option<ChildProcess>,
    /// Set by a sender's output reader when it printed `done`.
    done: Arc<Mutex<bool>>,
    /// Fires when the output reader of the running process saw its end.
    eof: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl CrashNode {
    async fn start(&mut self, receiver: Option<(u32, Delivered)>) -> anyhow::Result<()> {
        *self.done.lock().expect("lock") = false;
        let mut cmd = Command::new(bin("crash-node")?);
        cmd.args(&self.args);
        let mut process = ChildProcess::spawn(cmd, "ready").await?;
        let mut lines = process.take_stdout()?;
        let done = self.done.clone();
        let (eof_tx, eof_rx) = tokio::sync::oneshot::channel();
        self.eof = Some(eof_rx);
        tokio::spawn(async move {
            let _eof = eof_tx;
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "done" {
                    *done.lock().expect("lock") = true;
                }
                if let (Some((r, delivered)), Some(rest)) = (&receiver, line.strip_prefix("got ")) {
                    let mut parts = rest.split(' ');
                    let s = parts.next().and_then(|p| p.parse::<u32>().ok());
                    let n = parts.next().and_then(|p| p.parse::<u64>().ok());
                    if let (Some(s), Some(n)) = (s, n) {
                        delivered
                            .lock()
                            .expect("lock")
                            .entry((s, *r))
                            .or_default()
                            .push(n);
                    }
                }
            }
        });
        self.process = Some(process);
        Ok(())
    }

    async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill().await?;
        }
        // Everything it printed is read.
        if let Some(eof) = self.eof.take() {
            let _ = eof.await;
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        *self.done.lock().expect("lock")
    }
}

/// A small deterministic generator for the kill moments and victims.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoverable_messages_survive_kills_of_every_process() -> anyhow::Result<()> {
    init_logging();
    let per_pair: u64 = if long() { 12_500 } else { 2_500 };
    let kills_each: u32 = if long() { 5 } else { 3 };
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("CRASH_SEED={seed} ({per_pair} messages per sender and receiver, {kills_each} kills of each kind)");
    let mut rng = Lcg(seed);
    let root = DataDir::new("run");
    let server_addr = free_addr()?;
    let server_config = server_config(root.path())?;
    let mut server = start_server(server_addr, &server_config).await?;
    let delivered: Delivered = Arc::default();
    let to: Vec<String> = (0..RECEIVERS).map(|r| format!("r{r}")).collect();
    let common = |id: &str, role: &str| {
        vec![
            "--server".to_owned(),
            server_addr.to_string(),
            "--id".to_owned(),
            id.to_owned(),
            "--data".to_owned(),
            root.path().join(id).display().to_string(),
            "--role".to_owned(),
            role.to_owned(),
        ]
    };
    let mut receivers = Vec::new();
    for r in 0..RECEIVERS {
        let mut node = CrashNode {
            args: common(&to[r as usize], "receiver"),
            process: None,
            done: Arc::default(),
            eof: None,
        };
        node.start(Some((r, delivered.clone()))).await?;
        receivers.push(node);
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let mut args = common(&format!("s{s}"), "sender");
        args.extend([
            "--index".to_owned(),
            s.to_string(),
            "--to".to_owned(),
            to.join(","),
            "--count".to_owned(),
            per_pair.to_string(),
        ]);
        let mut node = CrashNode {
            args,
            process: None,
            done: Arc::default(),
            eof: None,
        };
        node.start(None).await?;
        senders.push(node);
    }

    // The faults: each kind of process killed `kills_each` times, in a
    // random order, at random moments while the traffic flows.
    let mut victims: Vec<u8> = (0..kills_each).flat_map(|_| [0u8, 1, 2]).collect();
    for i in (1..victims.len()).rev() {
        victims.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut in_the_window: Vec<(u32, u32, u64)> = Vec::new();
    let mut receiver_kills = 0u64;
    for victim in victims {
        let pause = 100 + rng.below(700);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        match victim {
            0 => {
                let s = rng.below(u64::from(SENDERS)) as usize;
                println!("after {pause} ms: kill -9 sender s{s}");
                senders[s].kill().await?;
                senders[s].start(None).await?;
            }
            1 => {
                receiver_kills += 1;
                let r = rng.below(u64::from(RECEIVERS)) as usize;
                println!("after {pause} ms: kill -9 receiver r{r}");
                receivers[r].kill().await?;
                // The message after the last it printed may have been
                // handed over, and the application killed before printing
                // it.
                {
                    let printed = delivered.lock().expect("lock");
                    for s in 0..SENDERS {
                        let next = printed
                            .get(&(s, r as u32))
                            .and_then(|v| v.last())
                            .map_or(0, |n| n + 1);
                        in_the_window.push((s, r as u32, next));
                    }
                }
                receivers[r]
                    .start(Some((r as u32, delivered.clone())))
                    .await?;
            }
            _ => {
                println!("after {pause} ms: kill -9 the message server");
                server.kill().await?;
                server = start_server(server_addr, &server_config).await?;
            }
        }
    }

    // Every sender saw everything acknowledged, and every receiver handed
    // over the last message of each sender (in order: so everything).
    let expected = per_pair * u64::from(SENDERS * RECEIVERS);
    let waited = tokio::time::timeout(TEST_WAIT * 4, async {
        loop {
            let all_last = {
                let printed = delivered.lock().expect("lock");
                (0..SENDERS).all(|s| {
                    (0..RECEIVERS).all(|r| {
                        printed
                            .get(&(s, r))
                            .and_then(|v| v.last())
                            .is_some_and(|&n| n + 1 == per_pair)
                    })
                })
            };
            if senders.iter().all(CrashNode::is_done) && all_last {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let delivered = delivered.lock().expect("lock").clone();
    let (mut lost, mut duplicated, mut reordered, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
    let mut killed_in_hand = 0u64;
    for s in 0..SENDERS {
        for r in 0..RECEIVERS {
            let got = delivered.get(&(s, r)).cloned().unwrap_or_default();
            let mut seen = vec![false; per_pair as usize];
            let mut last = None;
            for &n in &got {
                match seen.get_mut(n as usize) {
                    None => unexpected += 1,
                    Some(true) => duplicated += 1,
                    Some(seen) => {
                        *seen = true;
                        if last.is_some_and(|l| n < l) {
                            reordered += 1;
                        }
                        last = Some(n);
                    }
                }
            }
            let missing: Vec<usize> = seen
                .iter()
                .enumerate()
                .filter(|(_, s)| !**s)
                .map(|(n, _)| n)
                .collect();
            // A message handed over the instant its application was
            // killed, before it printed it, is the application's loss:
            // the next after the last printed at a kill of its receiver.
            let (in_hand, missing): (Vec<usize>, Vec<usize>) = missing
                .into_iter()
                .partition(|&n| in_the_window.contains(&(s, r, n as u64)));
            killed_in_hand += in_hand.len() as u64;
            if !missing.is_empty() {
                println!(
                    "s{s} -> r{r}: {} missing, the first {:?}",
                    missing.len(),
                    &missing[..missing.len().min(10)]
                );
            }
            lost += missing.len() as u64;
        }
    }
    let done: Vec<bool> = senders.iter().map(CrashNode::is_done).collect();
    println!("senders done: {done:?}");
    if lost > 0 {
        // Where the missing messages are: the stores, read after a kill.
        for node in senders.iter_mut().chain(receivers.iter_mut()) {
            node.kill().await?;
        }
        for id in ["s0", "s1", "r0", "r1"] {
            let opened = clustercomm_store::Store::open(
                &root.path().join(id),
                clustercomm_store::OnDamage::Refuse,
            )?;
            let c = &opened.contents;
            println!(
                "{id}: epoch {}, marks {:?}, outgoing {:?}, incoming {:?}",
                c.epoch,
                c.marks
                    .iter()
                    .map(|m| (m.kind, m.node.clone(), m.epoch, m.value))
                    .collect::<Vec<_>>(),
                c.outgoing
                    .iter()
                    .map(|o| (o.receiver.clone(), o.pseq))
                    .collect::<Vec<_>>(),
                c.incoming
                    .iter()
                    .map(|i| (i.origin.clone(), i.pseq))
                    .collect::<Vec<_>>(),
            );
        }
    }
    println!(
        "{expected} messages: lost {lost}, duplicated {duplicated}, reordered {reordered}, unexpected {unexpected}; \
         {killed_in_hand} handed over to an application killed before it printed them ({receiver_kills} receiver kills)"
    );
    ensure!(
        killed_in_hand <= receiver_kills,
        "{killed_in_hand} messages in the hands of killed applications: more than one per kill ({receiver_kills})"
    );
    ensure!(
        waited.is_ok() || lost > 0,
        "the senders did not finish in time though nothing was lost"
    );
    ensure!(
        lost == 0 && duplicated == 0 && reordered == 0 && unexpected == 0,
        "seed {seed}: lost {lost}, duplicated {duplicated}, reordered {reordered}, unexpected {unexpected}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_message_is_in_the_receivers_store_when_its_sender_learns_of_it(
) -> anyhow::Result<()> {
    init_logging();
    let root = DataDir::new("ack");
    let server_addr = free_addr()?;
    let server_config = server_config(root.path())?;
    let _server = start_server(server_addr, &server_config).await?;
    let receiver_dir = root.path().join("r0");
    let mut receiver = CrashNode {
        args: vec![
            "--server".to_owned(),
            server_addr.to_string(),
            "--id".to_owned(),
            "r0".to_owned(),
            "--data".to_owned(),
            receiver_dir.display().to_string(),
            "--role".to_owned(),
            "receiver".to_owned(),
        ],
        process: None,
        done: Arc::default(),
        eof: None,
    };
    receiver.start(Some((0, Arc::default()))).await?;
    let mut config = test_config();
    config.node.data_dir = Some(root.path().join("s0"));
    let sender = Node::builder("s0")
        .config(config)
        .message_server(server_addr.to_string())
        .start()
        .await?;
    let options = SendOptions::new().recoverable();
    let target = || Target::Node(NodeId::new("r0"));
    let mut acknowledged = 0u64;
    for n in 0..300u64 {
        let pending = sender
            .submit_with(
                target(),
                "ledger",
                clustercomm_tests::fault::body(0, n),
                &options,
            )
            .await?;
        pending.outcome().await?;
        acknowledged += 1;
    }
    // Killed the moment the last acknowledgement arrived: whatever it
    // acknowledged must be on its disk.
    receiver.kill().await?;
    let opened = clustercomm_store::Store::open(&receiver_dir, clustercomm_store::OnDamage::Refuse)
        .context("the killed receiver's store opens")?;
    let contents = opened.contents;
    let received = contents
        .marks
        .iter()
        .filter(|m| m.kind == clustercomm_store::MarkKind::Received && m.node == "s0")
        .map(|m| m.value)
        .max()
        .unwrap_or(0);
    println!(
        "acknowledged {acknowledged}; the receiver's store says received up to {received}, {} not yet handed over",
        contents.incoming.len()
    );
    ensure!(
        received >= acknowledged,
        "acknowledged {acknowledged}, stored {received}"
    );
    sender.shutdown().await;
    if received < acknowledged {
        bail!("unreachable");
    }
    Ok(())
}
