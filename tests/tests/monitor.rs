//! The message server's monitor against the real binary: its JSON with a
//! live 3-node cluster, its `/metrics` through Prometheus' own checker
//! (`promtool check metrics`), its page in headless Chromium, and the
//! binary's banner and configuration errors.
//!
//! `promtool` (Debian's `prometheus`) and `chromium` must be installed
//! (`.ci/run` installs them); a test that lacks one fails saying so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{
    bounded, init_logging, message_server_bin, spawn_test_node_with, test_config, ChildProcess,
    ConfigFile, TEST_WAIT,
};
use node_runtime::{Node, Target};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Lines of the banner after the ready line.
const BANNER_LINES: usize = 7;

/// A message server started from the binary, with its banner.
struct Server {
    _process: ChildProcess,
    addr: SocketAddr,
    banner: HashMap<String, String>,
}

impl Server {
    /// The monitor's address, from the banner's URL.
    fn monitor(&self) -> anyhow::Result<SocketAddr> {
        let url = self.banner.get("monitor").context("no monitor line")?;
        clustercomm_tests::monitor_url_addr(url)
    }
}

/// Starts the binary with `args` and reads its ready line and banner.
async fn start_server(args: &[&str]) -> anyhow::Result<Server> {
    let mut cmd = Command::new(message_server_bin()?);
    cmd.args(args);
    let mut process = ChildProcess::spawn(cmd, "message-server listening on").await?;
    let addr = process.ready_addr()?;
    let mut lines = process.take_stdout()?;
    let mut banner = HashMap::new();
    for _ in 0..BANNER_LINES {
        let line = tokio::time::timeout(TEST_WAIT, lines.next_line())
            .await
            .context("banner not printed in time")??
            .context("stdout closed in the banner")?;
        let (key, value) = line
            .trim()
            .split_once(char::is_whitespace)
            .with_context(|| format!("banner line without a value: {line:?}"))?;
        banner.insert(key.to_owned(), value.trim().to_owned());
    }
    Ok(Server {
        _process: process,
        addr,
        banner,
    })
}

/// A free loopback port (bound, then let go: the server takes it next).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An HTTP/1.1 GET: status, headers (lower-case names), body.
async fn get(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<(u16, HashMap<String, String>, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).context("a response that is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("a response without a blank line")?;
    let mut head_lines = head.lines();
    let status: u16 = head_lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no status line")?
        .parse()?;
    let headers: HashMap<String, String> = head_lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    ensure!(
        !headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked")),
        "a chunked response (the monitor sends whole bodies)"
    );
    Ok((status, headers, body.to_owned()))
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, headers, body) = get(addr, path, None).await?;
    ensure!(status == 200, "{path}: status {status}: {body}");
    let kind = headers.get("content-type").map_or("", String::as_str);
    ensure!(kind.starts_with("application/json"), "{path}: {kind}");
    serde_json::from_str(&body).with_context(|| format!("{path} is not JSON: {body}"))
}

/// Polls `path` until `done` holds (bounded), and returns the last value.
async fn wait_json(
    addr: SocketAddr,
    path: &str,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + TEST_WAIT;
    loop {
        let value = get_json(addr, path).await?;
        if done(&value) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{path} never got there: {value:#}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn by_id<'v>(list: &'v Value, id: &str) -> anyhow::Result<&'v Value> {
    list.as_array()
        .and_then(|a| a.iter().find(|m| m["id"] == id))
        .with_context(|| format!("{id} is missing from {list:#}"))
}

/// A live cluster of three nodes: two `test-node` processes and one node
/// in this process that sends; the JSON names them, their groups and
/// services, counts what each sent and got, and `/metrics` passes
/// `promtool check metrics` with the same counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_metrics_show_a_live_cluster() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        // Listed as the primary: the monitor says so.
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let file = ConfigFile::new(
            "monitor-cluster",
            &format!("[message_server]\naddresses = [\"{listen}\"]\n"),
        )?;
        let server = start_server(&[
            "--config",
            &file.path,
            "--listen",
            &listen,
            "--monitor",
            "127.0.0.1:0",
        ])
        .await?;
        let monitor = server.monitor()?;
        let _a = spawn_test_node_with(server.addr, "node-a", "cache", &["--groups", "web"]).await?;
        let _b =
            spawn_test_node_with(server.addr, "node-b", "cache", &["--groups", "web,db"]).await?;
        let app = Node::builder("app-1")
            .config(test_config())
            .message_server(server.addr)
            .groups(["ops"])
            .start()
            .await?;
        let _audit = app.subscribe("audit").await?;

        let members = wait_json(monitor, "/api/v1/members", |m| {
            m.as_array().is_some_and(|a| a.len() == 3)
        })
        .await?;
        // Every node offers the built-in service first (`clustercomm.tune`).
        let tune = node_runtime::TUNE_SERVICE;
        for (id, groups, services) in [
            ("node-a", vec!["web"], vec![tune, "cache"]),
            ("node-b", vec!["web", "db"], vec![tune, "cache"]),
            ("app-1", vec!["ops"], vec![tune, "audit"]),
        ] {
            let m = by_id(&members, id)?;
            assert_eq!(strings(&m["groups"]), groups, "{id}: {m:#}");
            assert_eq!(strings(&m["services"]), services, "{id}: {m:#}");
            // Idle nodes: not busy (null until a node's first report).
            assert!(
                matches!(m["busy"], Value::Null | Value::Bool(false)),
                "an idle node is not busy: {m:#}"
            );
            assert!(
                m["backlog"].is_null() || m["backlog"].as_u64().is_some(),
                "{m:#}"
            );
            assert!(m["address"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")));
            assert!(m["heartbeat_age_ms"]
                .as_u64()
                .is_some_and(|age| age < 10_000));
        }
        let incarnation = by_id(&members, "app-1")?["incarnation"].clone();
        assert_eq!(incarnation, Value::String(app.incarnation().to_string()));

        // 10 one-way messages to node-a, 5 acknowledged ones to the group
        // (node-a and node-b): 15 messages in from app-1, 20 deliveries.
        for i in 0..10u32 {
            app.notify(Target::Node("node-a".into()), "cache", i.to_string())
                .await?;
        }
        for i in 0..5u32 {
            let report = app
                .send(Target::Group("web".into()), "cache", i.to_string())
                .await?;
            assert_eq!(report.delivered.len(), 2);
        }
        let nodes = wait_json(monitor, "/api/v1/nodes", |n| {
            by_id(n, "node-a").is_ok_and(|a| a["paths"]["server"]["messages_out"] == 15)
        })
        .await?;
        let server_path = |id: &str| -> anyhow::Result<Value> {
            Ok(by_id(&nodes, id)?["paths"]["server"].clone())
        };
        assert_eq!(server_path("app-1")?["messages_in"], 15);
        assert_eq!(server_path("app-1")?["messages_out"], 0);
        assert_eq!(server_path("node-a")?["messages_out"], 15);
        assert_eq!(server_path("node-b")?["messages_out"], 5);
        assert_eq!(server_path("node-b")?["messages_in"], 0);
        for id in ["app-1", "node-a", "node-b"] {
            let node = by_id(&nodes, id)?;
            assert!(node["queue"]["frames"].is_u64(), "{node:#}");
        }

        // A body over the lazy threshold goes over a lazy channel, past
        // the server: the nodes' reports (every heartbeat interval) say so.
        let big = vec![7u8; 2 * app.config().lazy.threshold_bytes as usize];
        let report = app
            .send(Target::Node("node-a".into()), "cache", big.clone())
            .await?;
        assert_eq!(report.delivered.len(), 1);
        assert_eq!(app.counters().lazy_messages, 1);
        let nodes = wait_json(monitor, "/api/v1/nodes", |n| {
            by_id(n, "app-1").is_ok_and(|a| a["paths"]["lazy"]["messages_sent"] == 1)
                && by_id(n, "node-a").is_ok_and(|a| a["paths"]["received_direct"] == 1)
        })
        .await?;
        let app_paths = &by_id(&nodes, "app-1")?["paths"];
        assert_eq!(app_paths["lazy"]["bytes_sent"], big.len() as u64);
        assert_eq!(app_paths["session"]["messages_sent"], 0);
        assert_eq!(app_paths["channels_open"], 1);
        assert_eq!(
            by_id(&nodes, "node-a")?["paths"]["lazy"]["messages_sent"],
            0
        );
        assert_eq!(
            by_id(&nodes, "app-1")?["paths"]["server"]["messages_in"],
            15
        );

        let status = get_json(monitor, "/api/v1/status").await?;
        assert_eq!(status["members"], 3);
        assert_eq!(status["counters"]["messages"], 15);
        assert_eq!(status["counters"]["deliveries"], 20);
        assert_eq!(status["failover"]["kind"], "primary");
        assert_eq!(status["failover"]["position"], 0);
        assert_eq!(status["listen"], listen.as_str());

        let events = get_json(monitor, "/api/v1/events").await?;
        let joined: Vec<&str> = events["membership"]
            .as_array()
            .context("no membership events")?
            .iter()
            .filter(|e| e["kind"] == "joined")
            .filter_map(|e| e["node"].as_str())
            .collect();
        for id in ["node-a", "node-b", "app-1"] {
            assert!(joined.contains(&id), "{id} did not join: {events:#}");
        }
        // The snapshot holds all of it, the queue per priority included.
        let all = get_json(monitor, "/api/v1/snapshot").await?;
        assert_eq!(all["members"].as_array().map(Vec::len), Some(3));
        let node_a = all["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == "node-a"))
            .context("node-a in the snapshot's nodes")?;
        for priority in ["express", "high", "normal", "low"] {
            assert!(
                node_a["queue"]["by_priority"][priority].is_u64(),
                "no {priority} count in node-a's queue: {node_a:#}"
            );
        }
        let (status, _, _) = get(monitor, "/nope", None).await?;
        assert_eq!(status, 404);

        check_metrics(monitor).await?;
        app.shutdown().await;
        Ok(())
    })
    .await
}

/// `/metrics` in the Prometheus text format passes `promtool check
/// metrics` (format and naming conventions) and counts what was sent;
/// asked for OpenMetrics, it answers in it.
async fn check_metrics(monitor: SocketAddr) -> anyhow::Result<()> {
    let (status, headers, text) = get(monitor, "/metrics", None).await?;
    ensure!(status == 200, "/metrics: {status}");
    let kind = headers.get("content-type").map_or("", String::as_str);
    ensure!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    clustercomm_tests::promtool_check(&text).await?;
    for line in [
        "clustercomm_server_messages_total 15",
        "clustercomm_server_deliveries_total 20",
        "clustercomm_server_members 3",
        "clustercomm_server_node_received_messages_total{node=\"app-1\",path=\"server\"} 15",
        "clustercomm_server_node_forwarded_messages_total{node=\"node-a\",path=\"server\"} 15",
        "clustercomm_server_node_forwarded_messages_total{node=\"node-b\",path=\"server\"} 5",
        "clustercomm_server_node_direct_sent_messages_total{node=\"app-1\",path=\"lazy\"} 1",
        "clustercomm_server_node_direct_received_messages_total{node=\"node-a\"} 1",
        "# TYPE clustercomm_server_node_queue_bytes gauge",
        "# TYPE clustercomm_server_message_bytes_total counter",
        "# TYPE clustercomm_server_node_queue_priority_frames gauge",
        "clustercomm_server_node_queue_priority_frames{node=\"node-a\",priority=\"express\"} 0",
        "clustercomm_server_node_queue_priority_frames{node=\"node-a\",priority=\"low\"} 0",
    ] {
        let (name, value) = line.rsplit_once(' ').context("a sample line")?;
        let found = text.lines().any(|l| {
            l == line
                || (!line.starts_with('#')
                    && l.rsplit_once(' ').is_some_and(|(n, v)| {
                        n == name && v.parse::<f64>().ok() == value.parse::<f64>().ok()
                    }))
        });
        ensure!(found, "no {line:?} in the metrics:\n{text}");
    }
    ensure!(
        text.contains("clustercomm_server_info{") && text.contains("role=\"primary\""),
        "no info metric:\n{text}"
    );
    let (_, headers, open) = get(
        monitor,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await?;
    let kind = headers.get("content-type").map_or("", String::as_str);
    ensure!(kind.starts_with("application/openmetrics-text"), "{kind}");
    ensure!(
        open.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{open}"
    );
    Ok(())
}

/// The page in headless Chromium: its script renders the three members
/// (the page itself names none), and a screenshot is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_renders_the_members_in_chromium() -> anyhow::Result<()> {
    init_logging();
    let chromium = clustercomm_tests::required_tool("/usr/bin/chromium", "chromium")?;
    bounded(async {
        let server = start_server(&["--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0"]).await?;
        let monitor = server.monitor()?;
        let ids = ["web-1", "web-2", "dispatcher-1"];
        // Some traffic (dispatcher-1 pings web-1 every 20 ms) and a refused
        // connection, so that the page has something in every table.
        let nodes = [
            spawn_test_node_with(server.addr, "web-1", "pings", &["--groups", "web"]).await?,
            spawn_test_node_with(server.addr, "web-2", "cache", &["--groups", "web,db"]).await?,
            spawn_test_node_with(
                server.addr,
                "dispatcher-1",
                "cache",
                &["--groups", "web", "--ping", "web-1"],
            )
            .await?,
        ];
        let mut garbage = tokio::net::TcpStream::connect(server.addr).await?;
        garbage.write_all(b"\x00\x00\x00\x05hello").await?;
        wait_json(monitor, "/api/v1/members", |m| {
            m.as_array().is_some_and(|a| a.len() == 3)
        })
        .await?;
        // Two reads a rate window apart: the page gets rates at once.
        get_json(monitor, "/api/v1/snapshot").await?;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        get_json(monitor, "/api/v1/snapshot").await?;
        let (_, headers, page) = get(monitor, "/", None).await?;
        let kind = headers.get("content-type").map_or("", String::as_str);
        ensure!(kind.starts_with("text/html"), "{kind}");
        for id in ids {
            ensure!(
                !page.contains(id),
                "the page itself names {id}: the script should"
            );
        }
        ensure!(
            !page.contains("http://") && !page.contains("https://"),
            "the page loads nothing from elsewhere"
        );

        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitor");
        std::fs::create_dir_all(&dir)?;
        let url = format!("http://{monitor}/");
        let dom = headless(
            &chromium,
            &dir,
            &["--dump-dom", "--virtual-time-budget=5000", &url],
        )
        .await?;
        for id in ids {
            ensure!(
                dom.contains(&format!("data-node=\"{id}\"")),
                "{id} not rendered; the DOM after the script ran:\n{dom}"
            );
        }
        ensure!(
            dom.contains("<div id=\"state\" class=\"meta\">updated "),
            "the page did not say it updated:\n{dom}"
        );

        let shot = dir.join("monitor.png");
        let _ = std::fs::remove_file(&shot);
        headless(
            &chromium,
            &dir,
            &[
                &format!("--screenshot={}", shot.display()),
                "--window-size=1400,1300",
                "--hide-scrollbars",
                "--virtual-time-budget=5000",
                &url,
            ],
        )
        .await?;
        let png =
            std::fs::read(&shot).with_context(|| format!("no screenshot at {}", shot.display()))?;
        ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        ensure!(
            png.len() > 20_000,
            "a nearly empty screenshot ({} bytes)",
            png.len()
        );
        eprintln!("monitor screenshot: {}", shot.display());
        drop(nodes);
        Ok(())
    })
    .await
}

/// Runs headless Chromium with `args` (its own profile under `dir`);
/// returns its stdout.
async fn headless(chromium: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let profile = dir.join(format!("profile-{}", std::process::id()));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .context("chromium did not finish in time")??;
    let _ = std::fs::remove_dir_all(&profile);
    ensure!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The banner names the version, cluster, config file, addresses, the
/// monitor and the credentials; with no file, the embedded defaults.
#[tokio::test]
async fn banner_says_what_runs() -> anyhow::Result<()> {
    bounded(async {
        let file = ConfigFile::new(
            "monitor-banner",
            "[cluster]\nname = \"shop\"\ncredentials = \"s3cret\"\nheartbeat_listen = \"127.0.0.1:0\"\n[monitor]\nlisten = \"\"\n",
        )?;
        let server = start_server(&["--config", &file.path, "--listen", "127.0.0.1:0"]).await?;
        let b = &server.banner;
        assert_eq!(b["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(b["cluster"], "shop");
        assert_eq!(b["config"], file.path);
        assert_eq!(b["listen"], format!("{} (tcp)", server.addr));
        let heartbeats = b["heartbeats"].strip_suffix(" (udp)").context("udp")?;
        let heartbeats: SocketAddr = heartbeats.parse()?;
        assert_ne!(heartbeats.port(), 0, "the bound heartbeat port");
        assert!(b["monitor"].starts_with("off"), "{b:?}");
        assert_eq!(b["credentials"], "cluster secret on, TLS off");

        let server = start_server(&["--listen", "127.0.0.1:0", "--monitor", "127.0.0.1:0"]).await?;
        let b = &server.banner;
        assert_eq!(b["config"], "embedded defaults");
        assert_eq!(b["cluster"], "clustercomm");
        assert!(b["monitor"].starts_with("http://127.0.0.1:"), "{b:?}");
        assert!(b["credentials"].starts_with("cluster secret off, TLS off"), "{b:?}");
        let (status, _, _) = get(server.monitor()?, "/", None).await?;
        assert_eq!(status, 200);
        Ok(())
    })
    .await
}

/// A bad `monitor.listen` (in the file or on the command line) is one
/// message naming the key, no backtrace even with RUST_BACKTRACE=1, and
/// exit code 2; a monitor address asked for and taken is exit code 1.
#[tokio::test]
async fn config_errors_name_the_key_once_and_exit_2() -> anyhow::Result<()> {
    bounded(async {
        let file = ConfigFile::new("monitor-bad", "[monitor]\nlisten = \"nowhere\"\n")?;
        let cases: [(&[&str], &str, i32); 3] = [
            (&["--config", &file.path], "monitor.listen", 2),
            (&["--monitor", "nowhere"], "monitor.listen", 2),
            (
                &["--listen", "127.0.0.1:0", "--config", "/nonexistent/x.toml"],
                "/nonexistent/x.toml",
                2,
            ),
        ];
        for (args, key, code) in cases {
            let out = run_to_exit(args).await?;
            check_one_error(&out, key, code, args)?;
        }
        // A monitor address asked for that cannot be had stops the start.
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let at = taken.local_addr()?.to_string();
        let args = ["--listen", "127.0.0.1:0", "--monitor", at.as_str()];
        let out = run_to_exit(&args).await?;
        check_one_error(&out, "monitor.listen", 1, &args)?;
        Ok(())
    })
    .await
}

async fn run_to_exit(args: &[&str]) -> anyhow::Result<std::process::Output> {
    let out = Command::new(message_server_bin()?)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    Ok(tokio::time::timeout(TEST_WAIT, out)
        .await
        .context("the server did not exit")??)
}

fn check_one_error(
    out: &std::process::Output,
    key: &str,
    code: i32,
    args: &[&str],
) -> anyhow::Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(code),
        "{args:?}: exit {:?}, not {code}: {stderr}",
        out.status.code()
    );
    ensure!(out.stdout.is_empty(), "{args:?}: printed a banner");
    ensure!(
        stderr.matches(key).count() == 1,
        "{args:?}: {key} named other than once: {stderr}"
    );
    ensure!(
        stderr.matches("message-server: ").count() == 1,
        "{args:?}: more than one error: {stderr}"
    );
    let lower = stderr.to_lowercase();
    ensure!(
        !lower.contains("backtrace") && !lower.contains("stack"),
        "{args:?}: a backtrace: {stderr}"
    );
    Ok(())
}

/// A node's own metrics, merged into an application's registry, pass
/// `promtool check metrics` and count what the node sent on each path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_metrics_count_its_paths() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let server = start_server(&["--listen", "127.0.0.1:0", "--monitor", ""]).await?;
        let _b = spawn_test_node_with(server.addr, "node-b", "cache", &[]).await?;
        let app = Node::builder("app-1")
            .config(test_config())
            .message_server(server.addr)
            .start()
            .await?;
        let mut events = app.membership_events();
        while !app.members().iter().any(|m| m.id == "node-b") {
            events.recv().await?;
        }
        for i in 0..3u32 {
            app.send(Target::Node("node-b".into()), "cache", i.to_string())
                .await?;
        }
        let big = vec![1u8; 2 * app.config().lazy.threshold_bytes as usize];
        app.send(Target::Node("node-b".into()), "cache", big.clone())
            .await?;

        // The application's registry, with the node's metrics in it.
        let mut registry = prometheus_client::registry::Registry::default();
        app.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        clustercomm_tests::promtool_check(&text).await?;
        for line in [
            "clustercomm_node_sent_messages_total{node=\"app-1\",path=\"server\"} 3",
            "clustercomm_node_sent_messages_total{node=\"app-1\",path=\"lazy\"} 1",
            &format!(
                "clustercomm_node_sent_bytes_total{{node=\"app-1\",path=\"lazy\"}} {}",
                big.len()
            ),
            "clustercomm_node_channels_opened_total{node=\"app-1\",kind=\"lazy\"} 1",
            "clustercomm_node_channels_open{node=\"app-1\"} 1",
            "clustercomm_node_members{node=\"app-1\"} 2",
            "clustercomm_node_pending{node=\"app-1\"} 0",
        ] {
            ensure!(
                text.lines().any(|l| l == line),
                "no {line:?} in the node's metrics:\n{text}"
            );
        }
        // Its own registry says the same.
        let mut own = String::new();
        prometheus_client::encoding::text::encode(&mut own, &app.metrics())?;
        ensure!(
            own.contains("clustercomm_node_sent_messages_total{node=\"app-1\",path=\"server\"} 3"),
            "{own}"
        );
        app.shutdown().await;
        Ok(())
    })
    .await
}

/// Writes `request` to `addr` and reads the answer until the server
/// closes.
async fn exchange(addr: SocketAddr, request: &[u8]) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(TEST_WAIT, stream.read_to_end(&mut raw))
        .await
        .context("the node's monitor did not close")??;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// `node.monitor_listen` serves the node's own metrics, in both text
/// formats, which promtool accepts; anything else gets a clear status, a
/// request head over 8 KiB is refused, and connections beyond the cap are
/// closed unread while the ones served go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_its_own_metrics() -> anyhow::Result<()> {
    use node_runtime::monitor::{MAX_CONNECTIONS, MAX_REQUEST_BYTES};
    init_logging();
    bounded(async {
        let server = start_server(&["--listen", "127.0.0.1:0", "--monitor", ""]).await?;
        let mut config = test_config();
        config.node.monitor_listen = Some("127.0.0.1:0".parse()?);
        let app = Node::builder("app-1")
            .config(config.clone())
            .message_server(server.addr)
            .start()
            .await?;
        let addr = app.monitor_addr().context("no monitor address")?;
        app.notify(Target::Node("app-1".into()), "nobody", "x")
            .await?;

        let (status, headers, body) = get(addr, "/metrics", None).await?;
        ensure!(status == 200, "{status}: {body}");
        ensure!(
            headers["content-type"].starts_with("text/plain; version=0.0.4"),
            "{headers:?}"
        );
        clustercomm_tests::promtool_check(&body).await?;
        ensure!(
            body.lines()
                .any(|l| l
                    == "clustercomm_node_sent_messages_total{node=\"app-1\",path=\"server\"} 1"),
            "{body}"
        );
        let (status, headers, body) =
            get(addr, "/metrics", Some("application/openmetrics-text")).await?;
        ensure!(status == 200, "{status}: {body}");
        ensure!(
            headers["content-type"].starts_with("application/openmetrics-text"),
            "{headers:?}"
        );
        ensure!(body.ends_with("# EOF\n"), "{body}");

        // Everything else: a status saying what is wrong.
        let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await?;
        ensure!(
            head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        for (request, status) in [
            (&b"GET /nothing HTTP/1.1\r\n\r\n"[..], "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"GET /metrics SPDY/3\r\n\r\n", "505"),
            (b"GET\r\n\r\n", "400"),
            (b"\xff\xfe /metrics HTTP/1.1\r\n\r\n", "400"),
        ] {
            let answer = exchange(addr, request).await?;
            ensure!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{:?}: {answer}",
                String::from_utf8_lossy(request)
            );
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        huge.resize(MAX_REQUEST_BYTES + 2048, b'a');
        let answer = exchange(addr, &huge).await?;
        ensure!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

        // The cap: that many connections with half a request are held;
        // one more is closed before anything is read from it.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET").await?;
            held.push(s);
        }
        let closed_unread = async {
            loop {
                let mut extra = tokio::net::TcpStream::connect(addr).await?;
                let mut buf = [0u8; 64];
                // Closed at once (EOF or reset), without an answer.
                match tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return anyhow::Ok(()),
                    Ok(Ok(_)) => bail!("a connection over the cap was answered"),
                    // Not yet closed: the held ones may still be being
                    // accepted; this one waits its turn. Try again.
                    Err(_) => continue,
                }
            }
        };
        tokio::time::timeout(TEST_WAIT, closed_unread)
            .await
            .context("no connection over the cap was closed")??;
        // Finishing the held requests frees their places.
        for mut s in held {
            s.write_all(b" / HTTP/1.1\r\n\r\n").await?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await?;
            ensure!(
                raw.starts_with(b"HTTP/1.1 200 "),
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
        let (status, _, _) = get(addr, "/metrics", None).await?;
        ensure!(status == 200);

        // The address taken: the start fails naming the key.
        config.node.monitor_listen = Some(addr);
        let err = Node::builder("app-2")
            .config(config)
            .message_server(server.addr)
            .start()
            .await
            .err()
            .context("a second node bound the same monitor address")?;
        ensure!(
            err.to_string().contains("node.monitor_listen")
                && err.to_string().contains(&addr.to_string()),
            "{err}"
        );
        app.shutdown().await;
        Ok(())
    })
    .await
}
