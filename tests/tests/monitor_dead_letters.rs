//! The monitor's view of the dead-letter queue against a real server: a
//! node's one-way messages to a node that does not exist are filed by
//! the server (`target_gone`), and the monitor shows them in
//! `/api/v1/dead-letters`, in the snapshot, in `/metrics` (checked by
//! `promtool check metrics`) and on its page (rendered by headless
//! Chromium, with a service name that would be markup if it were not
//! escaped).
//!
//! `promtool` (Debian's `prometheus`) and `chromium` must be installed
//! (`.ci/run` installs them); the test fails saying so if one is missing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context};
use clustercomm_tests::{bounded, init_logging, test_config, TestServer};
use message_server::monitor::Monitor;
use node_runtime::{NodeId, Target};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// A service name that is markup, to see the page escape it.
const SERVICE: &str = "<b>orders</b>";

/// An HTTP/1.1 GET: status, headers (lower-case names), body.
async fn get(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, HashMap<String, String>, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
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
    let headers = head_lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, headers, body) = get(addr, path).await?;
    ensure!(status == 200, "{path}: status {status}: {body}");
    let kind = headers.get("content-type").map_or("", String::as_str);
    ensure!(kind.starts_with("application/json"), "{path}: {kind}");
    ensure!(
        headers.get("cache-control").map(String::as_str) == Some("no-store"),
        "{path} may be cached: {headers:?}"
    );
    serde_json::from_str(&body).with_context(|| format!("{path} is not JSON: {body}"))
}

fn ids(list: &Value) -> Vec<u64> {
    list["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// Four one-way messages to a node that does not exist, with room for
/// three: the queue holds three, counts one as overflowed, and the
/// monitor shows exactly that everywhere; a node taking one out is seen
/// at the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_shows_the_dead_letter_queue() -> anyhow::Result<()> {
    init_logging();
    // Both tools are needed: said at once if one is missing.
    clustercomm_tests::required_tool("/usr/bin/promtool", "prometheus")?;
    let chromium = clustercomm_tests::required_tool("/usr/bin/chromium", "chromium")?;
    bounded(async {
        let mut config = test_config();
        config.message_server.dead_letter_entries = 3;
        let server = TestServer::start(config.clone()).await?;
        let monitor = Monitor::bind("127.0.0.1:0".parse()?, server.handle.clone()).await?;
        let addr = monitor.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let monitor_task = tokio::spawn(monitor.run(async {
            let _ = stopped.await;
        }));
        let app = server.node("app-1", &config).await?;

        let empty = get_json(addr, "/api/v1/dead-letters").await?;
        assert_eq!(empty["stats"]["entries"], 0, "{empty:#}");
        assert_eq!(empty["stats"]["max_entries"], 3, "{empty:#}");
        assert_eq!(ids(&empty), Vec::<u64>::new());

        let before = unix_ms();
        for i in 0..4 {
            app.notify(
                Target::Node(NodeId::new("nobody")),
                SERVICE,
                format!("body-{i}"),
            )
            .await?;
        }
        let stats = clustercomm_tests::wait_dead_letters(&server.handle, |s| {
            s.added == 3 && s.overflowed == 1
        })
        .await?;
        assert_eq!((stats.entries, stats.bytes), (3, 18), "{stats:?}");
        let after = unix_ms();

        // Newest first, without bodies.
        let list = get_json(addr, "/api/v1/dead-letters").await?;
        assert_eq!(ids(&list), [3, 2, 1], "{list:#}");
        let s = &list["stats"];
        for (key, want) in [
            ("entries", 3),
            ("bytes", 18),
            ("added", 3),
            ("overflowed", 1),
            ("max_entries", 3),
        ] {
            assert_eq!(s[key], want, "stats.{key}: {list:#}");
        }
        let newest = &list["entries"][0];
        assert_eq!(newest["sender"], "app-1");
        assert_eq!(newest["target"]["kind"], "node");
        assert_eq!(newest["target"]["name"], "nobody");
        assert_eq!(newest["service"], SERVICE);
        assert_eq!(newest["priority"], "normal");
        assert_eq!(newest["reason"], "target_gone");
        assert_eq!(newest["detail"], "target gone");
        assert_eq!(newest["filed_by"], Value::Null, "the server filed it");
        assert_eq!(newest["body_bytes"], 6);
        assert!(newest.get("body").is_none(), "no bodies: {newest:#}");
        let at = newest["at_unix_ms"].as_u64().context("at_unix_ms")?;
        assert!(
            (before..=after).contains(&at),
            "{before} <= {at} <= {after}"
        );

        // The limit: default, a smaller one, none, one past the maximum,
        // and one that is not a number.
        assert_eq!(
            ids(&get_json(addr, "/api/v1/dead-letters?limit=2").await?),
            [3, 2]
        );
        let none = get_json(addr, "/api/v1/dead-letters?limit=0").await?;
        assert_eq!(
            (ids(&none).len(), &none["stats"]["entries"]),
            (0, &Value::from(3))
        );
        let capped = get_json(addr, "/api/v1/dead-letters?limit=99999").await?;
        assert_eq!(ids(&capped), [3, 2, 1]);
        let (status, _, body) = get(addr, "/api/v1/dead-letters?limit=ten").await?;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("limit"), "{body}");

        // The snapshot carries them for the page.
        let snapshot = get_json(addr, "/api/v1/snapshot").await?;
        assert_eq!(ids(&snapshot["dead_letters"]), [3, 2, 1]);
        assert_eq!(snapshot["status"]["counters"]["expired"], 0);

        check_metrics(addr).await?;
        check_page(&chromium, addr).await?;

        // A node takes one out: the monitor's next read shows it gone.
        let taken = app.dead_letters().take(&[2]).await?;
        assert_eq!(taken.len(), 1);
        let list = get_json(addr, "/api/v1/dead-letters").await?;
        assert_eq!(ids(&list), [3, 1], "{list:#}");
        assert_eq!(list["stats"]["entries"], 2);
        assert_eq!(list["stats"]["added"], 3);

        app.shutdown().await;
        let _ = stop.send(());
        monitor_task.await??;
        server.stop().await;
        Ok(())
    })
    .await
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `/metrics` passes `promtool check metrics` and counts the queue.
async fn check_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let (status, _, text) = get(addr, "/metrics").await?;
    ensure!(status == 200, "/metrics: {status}");
    clustercomm_tests::promtool_check(&text).await?;
    for line in [
        "# TYPE clustercomm_server_dead_letters gauge",
        "clustercomm_server_dead_letters 3",
        "# TYPE clustercomm_server_dead_letters_bytes gauge",
        "clustercomm_server_dead_letters_bytes 18",
        "clustercomm_server_dead_letters_limit 3",
        "# TYPE clustercomm_server_dead_letters_added_total counter",
        "clustercomm_server_dead_letters_added_total 3",
        "# TYPE clustercomm_server_dead_letters_overflowed_total counter",
        "clustercomm_server_dead_letters_overflowed_total 1",
        "# TYPE clustercomm_server_expired_total counter",
        "clustercomm_server_expired_total 0",
    ] {
        ensure!(
            text.lines().any(|l| l == line),
            "no {line:?} in the metrics:\n{text}"
        );
    }
    ensure!(
        text.lines()
            .any(|l| l.starts_with("clustercomm_server_dead_letters_limit_bytes ")),
        "no byte limit in the metrics:\n{text}"
    );
    Ok(())
}

/// The page names no dead letter itself; its script renders the three
/// from the snapshot, the service as text, not markup.
async fn check_page(chromium: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let (_, _, page) = get(addr, "/").await?;
    ensure!(page.contains("id=\"dead-letters\""), "no dead-letter table");
    ensure!(!page.contains("nobody"), "the page itself names a target");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("monitor-dead-letters");
    std::fs::create_dir_all(&dir)?;
    let profile = dir.join(format!("profile-{}", std::process::id()));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--dump-dom",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{addr}/"))
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
    let dom = String::from_utf8_lossy(&out.stdout);
    for id in 1..=3 {
        ensure!(
            dom.contains(&format!("data-dead-letter=\"{id}\"")),
            "dead letter {id} not rendered; the DOM after the script ran:\n{dom}"
        );
    }
    ensure!(
        dom.contains("&lt;b&gt;orders&lt;/b&gt;") && !dom.contains("<b>orders</b>"),
        "the service name is not escaped:\n{dom}"
    );
    ensure!(dom.contains("node nobody"), "no target:\n{dom}");
    ensure!(dom.contains("target gone"), "no reason:\n{dom}");
    ensure!(
        dom.contains("<b class=\"bad\">1</b> not held"),
        "the stats line does not show the overflow:\n{dom}"
    );
    Ok(())
}
