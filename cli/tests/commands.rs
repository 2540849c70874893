//! The admin command's cluster subcommands against a live cluster: a
//! message server in this process, nodes in it, and the real
//! `clustercomm` binary joining as a short-lived node.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::{Config, MembershipEvent, Node};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn cluster() -> anyhow::Result<(String, Node, Node)> {
    let mut config = Config::default();
    config.message_server.listen = "127.0.0.1:0".parse()?;
    let server = MessageServer::bind(config).await?;
    let addr = server.local_addr().to_string();
    tokio::spawn(async move {
        let _ = server.run(std::future::pending()).await;
    });
    let web = Node::builder("web-1")
        .message_server(&addr)
        .groups(["web"])
        .ignore_environment()
        .start()
        .await?;
    let db = Node::builder("db-1")
        .message_server(&addr)
        .groups(["db"])
        .ignore_environment()
        .start()
        .await?;
    Ok((addr, web, db))
}

/// Runs `clustercomm --server ADDR ARGS...` and returns its stdout; it
/// must succeed.
async fn clustercomm(addr: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
        .arg("--server")
        .arg(addr)
        .args(args)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "clustercomm {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_test_messages() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (addr, web, db) = cluster().await?;
        let mut inbox = web.subscribe("svc").await?;
        let answering = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(m) = inbox.recv().await {
                if m.is_request() {
                    let _ = m
                        .reply(format!("re: {}", String::from_utf8_lossy(m.body())))
                        .await;
                }
                got.push(String::from_utf8_lossy(m.body()).into_owned());
                if got.len() == 3 {
                    break;
                }
            }
            got
        });

        let all = clustercomm(&addr, &["members"]).await?;
        ensure!(all.contains("web-1") && all.contains("db-1"), "{all}");
        ensure!(
            all.contains("2 members"),
            "the command's own node is listed: {all}"
        );
        let line = all
            .lines()
            .find(|l| l.starts_with("web-1"))
            .context("no web-1")?;
        ensure!(line.contains(" web ") && line.contains("svc"), "{line}");
        let dbs = clustercomm(&addr, &["members", "--group", "db"]).await?;
        ensure!(dbs.contains("db-1") && !dbs.contains("web-1"), "{dbs}");

        let sent = clustercomm(
            &addr,
            &[
                "send",
                "--to",
                "node:web-1",
                "--service",
                "svc",
                "--body",
                "one",
            ],
        )
        .await?;
        ensure!(sent.contains("delivered to web-1"), "{sent}");
        let notified = clustercomm(
            &addr,
            &[
                "notify",
                "--to",
                "group:web",
                "--service",
                "svc",
                "--body",
                "two",
            ],
        )
        .await?;
        ensure!(notified.contains("notified group web"), "{notified}");
        let replied = clustercomm(
            &addr,
            &[
                "request",
                "--to",
                "any:web",
                "--service",
                "svc",
                "--body",
                "three",
            ],
        )
        .await?;
        ensure!(replied.contains("reply from web-1: re: three"), "{replied}");
        let got = answering.await?;
        ensure!(got == ["one", "two", "three"], "web-1 got {got:?}");

        // A failed delivery is the command's failure, with the reason.
        let out = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
            .args([
                "--server",
                &addr,
                "send",
                "--to",
                "node:nobody",
                "--service",
                "svc",
            ])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "a send to no one succeeded");
        ensure!(
            stderr.lines().count() == 1 && stderr.contains("nobody"),
            "{stderr}"
        );
        drop(db);
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}

/// A running `clustercomm --server ADDR watch ARGS...`: its output after
/// the `watching` line, and the lines before it.
struct Watch {
    _process: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    before: Vec<String>,
}

async fn watch(addr: &str, args: &[&str]) -> anyhow::Result<Watch> {
    let mut process = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
        .args(["--server", addr, "watch"])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(process.stdout.take().context("no stdout")?).lines();
    let mut before = Vec::new();
    loop {
        let line = lines.next_line().await?.context("watch ended")?;
        if line.starts_with("watching") {
            break;
        }
        before.push(line);
    }
    Ok(Watch {
        _process: process,
        lines,
        before,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_members_and_events() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (addr, web, _db) = cluster().await?;
        let mut events = web.membership_events();
        let Watch {
            _process,
            mut lines,
            before,
        } = watch(&addr, &["--rates-every", "0"]).await?;
        ensure!(
            before.iter().any(|l| l.starts_with("member  web-1")),
            "{before:?}"
        );
        ensure!(
            before.iter().any(|l| l.starts_with("member  db-1")),
            "{before:?}"
        );
        // The watcher has joined: web-1 saw it. Now a node comes and goes.
        loop {
            if let MembershipEvent::Joined(m) = events.recv().await? {
                if m.id.as_str().starts_with("clustercomm-") {
                    break;
                }
            }
        }
        let cache = Node::builder("cache-1")
            .message_server(&addr)
            .ignore_environment()
            .start()
            .await?;
        cache.shutdown().await;
        let joined = lines.next_line().await?.context("watch ended")?;
        ensure!(joined.starts_with("joined  cache-1"), "{joined}");
        let left = lines.next_line().await?.context("watch ended")?;
        ensure!(
            left.starts_with("left    cache-1") && left.ends_with("stopped"),
            "{left}"
        );
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}

/// With a monitor, `watch` prints the rates of the traffic between its
/// reads, naming the busiest node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_rates_from_the_monitor() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut config = Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr().to_string();
        let monitor =
            message_server::monitor::Monitor::bind("127.0.0.1:0".parse()?, server.handle()).await?;
        let monitor_addr = monitor.local_addr().to_string();
        tokio::spawn(monitor.run(std::future::pending()));
        tokio::spawn(async move {
            let _ = server.run(std::future::pending()).await;
        });
        let node = |id: &'static str| {
            Node::builder(id)
                .message_server(&addr)
                .ignore_environment()
                .start()
        };
        let (sender, receiver) = (node("sender-1").await?, node("receiver-1").await?);
        let mut inbox = receiver.subscribe("svc").await?;
        let Watch {
            _process,
            mut lines,
            before,
        } = watch(&addr, &["--monitor", &monitor_addr, "--rates-every", "1"]).await?;
        for line in &before {
            ensure!(!line.starts_with("rates   none"), "{line}");
        }
        // Traffic until a rate line shows it: acknowledged sends, so each
        // went through the server before the next.
        let mut sent = 0u64;
        let line = loop {
            tokio::select! {
                line = lines.next_line() => {
                    let line = line?.context("watch ended")?;
                    if line.starts_with("rates   routed") && line.contains("sender-1 in") {
                        break line;
                    }
                }
                report = sender.send(node_runtime::Target::Node(receiver.id().clone()), "svc", "x") => {
                    ensure!(report?.is_complete());
                    inbox.recv().await.context("inbox closed")?;
                    sent += 1;
                }
            }
        };
        ensure!(sent > 0);
        let routed: f64 = line
            .strip_prefix("rates   routed ")
            .and_then(|l| l.split_whitespace().next())
            .context("no rate")?
            .parse()?;
        ensure!(routed > 0.0, "{line}");
        ensure!(line.contains("route failures 0/s"), "{line}");

        // A monitor that does not answer: one line saying so, then events.
        let Watch { before, .. } = watch(&addr, &["--monitor", "127.0.0.1:9"]).await?;
        let none: Vec<_> = before.iter().filter(|l| l.starts_with("rates")).collect();
        ensure!(
            none.len() == 1 && none[0].contains("no monitor answers at 127.0.0.1:9"),
            "{before:?}"
        );
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}

/// `status` reads the monitor: the server's cluster and role, and a line
/// per node with what went through the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_monitor() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut config = Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        config.cluster.name = "status-test".into();
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr().to_string();
        let monitor =
            message_server::monitor::Monitor::bind("127.0.0.1:0".parse()?, server.handle()).await?;
        let monitor_addr = monitor.local_addr().to_string();
        tokio::spawn(monitor.run(std::future::pending()));
        tokio::spawn(async move {
            let _ = server.run(std::future::pending()).await;
        });
        let mut config = Config::default();
        config.cluster.name = "status-test".into();
        let web = Node::builder("web-1")
            .config(config)
            .message_server(&addr)
            .ignore_environment()
            .start()
            .await?;
        let _inbox = web.subscribe("svc").await?;
        let out = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
            .args(["status", "--monitor", &monitor_addr])
            .output()
            .await?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "status failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(said.contains("cluster status-test"), "{said}");
        ensure!(said.contains("members 1"), "{said}");
        ensure!(
            said.lines().any(|l| l.starts_with("web-1")),
            "no line for web-1: {said}"
        );

        // No monitor there: one line saying so.
        let out = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
            .args(["status", "--monitor", "127.0.0.1:9"])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success());
        ensure!(
            stderr.lines().count() == 1 && stderr.contains("no monitor answers"),
            "{stderr}"
        );
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}

/// `trace` prints exactly the messages that match its filter, with their
/// bodies when asked, and ends at its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_captures_exactly_the_matching_messages() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let (addr, web, db) = cluster().await?;
        let _svc = web.subscribe("svc").await?;
        let _other = web.subscribe("other").await?;
        let mut trace = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
            .args([
                "--server",
                &addr,
                "trace",
                "--service",
                "svc",
                "--sender",
                "db-1",
            ])
            .args(["--count", "3", "--bodies"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(trace.stdout.take().context("no stdout")?).lines();
        let first = lines.next_line().await?.context("trace ended")?;
        ensure!(first.starts_with("tracing"), "{first}");
        let to_web = || node_runtime::Target::Node("web-1".into());
        for i in 0..4 {
            // Not matching: another service, or another sender.
            db.send(to_web(), "other", format!("skip-{i}")).await?;
            web.send(node_runtime::Target::Node("web-1".into()), "svc", "self")
                .await
                .ok();
            db.send(to_web(), "svc", format!("match-{i}")).await?;
        }
        let mut got = Vec::new();
        loop {
            let line = lines.next_line().await?.context("trace ended early")?;
            if line.starts_with("trace ended") {
                ensure!(line.contains("3 captured, 0 dropped"), "{line}");
                break;
            }
            got.push(line);
        }
        ensure!(got.len() == 3, "{got:?}");
        for (i, line) in got.iter().enumerate() {
            ensure!(
                line.contains("send db-1#")
                    && line.contains("-> node web-1 service svc 7 bytes")
                    && line.ends_with(&format!(": \"match-{i}\"")),
                "{line}"
            );
        }
        ensure!(trace.wait().await?.success());
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}

/// A node whose `permissions.trace` is false is refused a trace, and the
/// command says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_without_permission_is_refused() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut config = Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        config.permissions.trace = false;
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr().to_string();
        tokio::spawn(async move {
            let _ = server.run(std::future::pending()).await;
        });
        let out = Command::new(env!("CARGO_BIN_EXE_clustercomm"))
            .args(["--server", &addr, "trace", "--count", "1"])
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "a trace without permission ran");
        ensure!(stderr.contains("permissions.trace"), "{stderr}");
        Ok(())
    })
    .await
    .context("the test did not finish within 60 s")?
}
