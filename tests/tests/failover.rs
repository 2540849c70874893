//! Message-server failover under real faults: the `message-server`
//! process is killed with SIGKILL and restarted while four senders stream
//! acknowledged messages to four receivers. Every message is accounted for:
//! none lost, duplicated or reordered, and no sender is told of an error
//! while its targets are alive.
//!
//! `CLUSTERCOMM_LONG_FAULTS=1` runs longer versions (more messages, more
//! kills).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clustercomm_tests::fault::{body, Ledger, Told};
use clustercomm_tests::{init_logging, message_server_bin, test_config, ChildProcess};
use node_runtime::{Config, Node, Target};
use tokio::process::Command;

const SENDERS: u32 = 4;
const RECEIVERS: u32 = 4;
const WINDOW: usize = 64;

fn long() -> bool {
    std::env::var("CLUSTERCOMM_LONG_FAULTS").is_ok_and(|v| v == "1")
}

/// A free loopback port, to restart the server on the same address.
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Writes the test timings as the server's config file.
fn server_config_file(tag: &str, config: &Config) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("cc-failover-{tag}-{}.toml", std::process::id()));
    let text = format!(
        "[cluster]\nheartbeat_interval_ms = {}\nfailure_timeout_ms = {}\n",
        config.cluster.heartbeat_interval_ms, config.cluster.failure_timeout_ms
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn start_server(
    addr: SocketAddr,
    config_file: &std::path::Path,
) -> anyhow::Result<ChildProcess> {
    let mut cmd = Command::new(message_server_bin()?);
    cmd.arg("--listen")
        .arg(addr.to_string())
        .arg("--config")
        .arg(config_file);
    ChildProcess::spawn(cmd, "message-server listening on").await
}

/// A small deterministic generator for the kill moments (seed printed).
struct Lcg(u64);

impl Lcg {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

/// Four receivers and four senders against `addresses`; each sender sends
/// `per_sender` acknowledged messages round-robin over the receivers while
/// `faults` runs. Returns the ledger once every sender is done and every
/// acknowledged message had time to be recorded, with the nodes (still
/// running).
async fn run_traffic<F>(
    addresses: Vec<String>,
    per_sender: u64,
    nodes_out: Arc<std::sync::Mutex<Vec<Node>>>,
    faults: F,
) -> anyhow::Result<(Ledger, Vec<Node>)>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let ledger = Ledger::default();
    let mut config = test_config();
    config.node.send_timeout_ms = 30_000;
    let mut receivers = Vec::new();
    for r in 0..RECEIVERS {
        let node = Node::builder(format!("r{r}"))
            .config(config.clone())
            .message_servers(addresses.clone())
            .start()
            .await?;
        let mut inbox = node.subscribe("ft").await?;
        let ledger = ledger.clone();
        tokio::spawn(async move {
            while let Some(m) = inbox.recv().await {
                ledger.delivered(r, m.body());
            }
        });
        receivers.push(node);
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let node = Node::builder(format!("s{s}"))
            .config(config.clone())
            .message_servers(addresses.clone())
            .start()
            .await?;
        // Everyone knows everyone before the traffic starts.
        while node.members().len() < (RECEIVERS + s + 1) as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        senders.push(node);
    }
    *nodes_out.lock().expect("lock") = senders.iter().chain(&receivers).cloned().collect();
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for (s, node) in senders.iter().enumerate() {
        let node = node.clone();
        let ledger = ledger.clone();
        tasks.spawn(async move {
            let s = s as u32;
            let mut window = std::collections::VecDeque::with_capacity(WINDOW);
            let settle = |(r, n, outcome): (u32, u64, Result<_, node_runtime::SendError>)| {
                let told = match outcome {
                    Ok(_) => Told::Delivered,
                    Err(e) => Told::Error(e.to_string()),
                };
                ledger.told(s, r, n, told);
            };
            for i in 0..per_sender {
                let r = (i % u64::from(RECEIVERS)) as u32;
                let n = i / u64::from(RECEIVERS);
                let target = Target::Node(format!("r{r}").into());
                match node.submit(target, "ft", body(s, n)).await {
                    Ok(p) => window.push_back((r, n, p)),
                    Err(e) => settle((r, n, Err(e))),
                }
                if window.len() >= WINDOW {
                    if let Some((r, n, p)) = window.pop_front() {
                        settle((r, n, p.outcome().await));
                    }
                }
            }
            for (r, n, p) in window {
                settle((r, n, p.outcome().await));
            }
        });
    }
    let traffic = async {
        while let Some(r) = tasks.join_next().await {
            r?;
        }
        done.store(true, Ordering::SeqCst);
        anyhow::Ok(())
    };
    let (traffic, faults) = tokio::join!(traffic, faults);
    traffic?;
    faults?;
    // Every acknowledged message is in an inbox; give the drain tasks a
    // moment to record them all (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    while ledger.delivered_count() < ledger.acknowledged_count() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((ledger, senders.into_iter().chain(receivers).collect()))
}

async fn shutdown(nodes: Vec<Node>) {
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_and_restarted_loses_nothing() -> anyhow::Result<()> {
    init_logging();
    let (messages, kills) = if long() {
        (400_000u64, 60)
    } else {
        (100_000, 20)
    };
    let run = async {
        let addr = free_addr()?;
        let config = test_config();
        let file = server_config_file("kill", &config)?;
        let server = Arc::new(tokio::sync::Mutex::new(start_server(addr, &file).await?));
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64;
        eprintln!("kill moments seeded with {seed}");
        let killer = {
            let server = server.clone();
            let file = file.clone();
            async move {
                let mut rng = Lcg(seed);
                for k in 0..kills {
                    tokio::time::sleep(Duration::from_millis(rng.next_ms(30, 250))).await;
                    let mut s = server.lock().await;
                    s.kill().await?;
                    // Down for a random moment too.
                    tokio::time::sleep(Duration::from_millis(rng.next_ms(0, 200))).await;
                    *s = start_server(addr, &file)
                        .await
                        .with_context(|| format!("restart {k}"))?;
                }
                anyhow::Ok(())
            }
        };
        let started = Instant::now();
        let (ledger, nodes) = run_traffic(
            vec![addr.to_string()],
            messages / u64::from(SENDERS),
            Arc::default(),
            killer,
        )
        .await?;
        shutdown(nodes).await;
        let tally = ledger.tally();
        eprintln!("{kills} kills, {:?}: {tally}", started.elapsed());
        ensure!(tally.sent == messages, "{tally}");
        ensure!(
            tally.errors == 0,
            "errors while every target was alive: {tally}"
        );
        ensure!(
            tally.lost == 0 && tally.duplicated == 0 && tally.reordered == 0,
            "{tally}"
        );
        ensure!(tally.unexpected == 0, "{tally}");
        let _ = std::fs::remove_file(&file);
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(if long() { 900 } else { 240 }), run)
        .await
        .context("the failover test exceeded its time bound")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_and_nodes_return_to_the_primary() -> anyhow::Result<()> {
    init_logging();
    let messages = if long() { 200_000u64 } else { 40_000 };
    let run = async {
        let (primary, standby) = (free_addr()?, free_addr()?);
        let config = test_config();
        let file = server_config_file("standby", &config)?;
        let mut primary_server = start_server(primary, &file).await?;
        let _standby_server = start_server(standby, &file).await?;
        let addresses = vec![primary.to_string(), standby.to_string()];
        let back = Arc::new(tokio::sync::Mutex::new(None));
        let watched: Arc<std::sync::Mutex<Vec<Node>>> = Arc::default();
        let bound = config.failure_timeout() + Duration::from_secs(1);
        let faults = {
            let file = file.clone();
            let back = back.clone();
            let watched = watched.clone();
            async move {
                // Let traffic flow, kill the primary: every node moves to the
                // standby within the bound; traffic flows there for a while;
                // then the primary comes back.
                tokio::time::sleep(Duration::from_millis(300)).await;
                primary_server.kill().await?;
                let killed = Instant::now();
                loop {
                    let all_on_standby = watched
                        .lock()
                        .expect("lock")
                        .iter()
                        .all(|n| n.message_server() == Some(standby.to_string()));
                    if all_on_standby {
                        break;
                    }
                    ensure!(
                        killed.elapsed() < bound,
                        "nodes did not all move to the standby within {bound:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                eprintln!(
                    "every node moved to the standby {:?} after the kill",
                    killed.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
                *back.lock().await = Some(start_server(primary, &file).await?);
                anyhow::Ok(())
            }
        };
        let started = Instant::now();
        let (ledger, nodes) =
            run_traffic(addresses, messages / u64::from(SENDERS), watched, faults).await?;
        // Every node goes back to the primary (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        let on_primary = |nodes: &[Node]| {
            nodes
                .iter()
                .all(|n| n.message_server() == Some(primary.to_string()))
        };
        while !on_primary(&nodes) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let where_: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}: {:?}", n.id(), n.message_server()))
            .collect();
        let all_back = on_primary(&nodes);
        shutdown(nodes).await;
        let tally = ledger.tally();
        eprintln!(
            "primary killed, standby used, primary back ({:?}): {tally}",
            started.elapsed()
        );
        ensure!(tally.sent == messages, "{tally}");
        ensure!(
            tally.errors == 0,
            "errors while every target was alive: {tally}"
        );
        ensure!(
            tally.lost == 0 && tally.duplicated == 0 && tally.reordered == 0,
            "{tally}"
        );
        ensure!(tally.unexpected == 0, "{tally}");
        ensure!(
            all_back,
            "not every node returned to the primary: {where_:?}"
        );
        let _ = std::fs::remove_file(&file);
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(if long() { 900 } else { 240 }), run)
        .await
        .context("the standby test exceeded its time bound")?
}
