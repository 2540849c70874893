//! `clustercomm tune` against a live cluster: a message server in this
//! process whose path carries at most 64 KiB, a node in it, and the real
//! binary sweeping a few sizes over both paths. Timings are never
//! asserted: only that each path was measured where it could be, and what
//! was written.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::{Config, Node};
use tokio::process::Command;

/// A file name in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "clustercomm-tune-{}-{name}.toml",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn run(addr: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_clustercomm"))
        .arg("--server")
        .arg(addr)
        .args(args)
        .output()
        .await?)
}

/// The line of the table for `size`, split in words.
fn row<'a>(stdout: &'a str, size: &str) -> anyhow::Result<Vec<&'a str>> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{size} ")))
        .with_context(|| format!("no row for {size}: {stdout}"))?;
    Ok(line.split_whitespace().collect())
}

/// How many durations a row holds (each a number and a unit).
fn durations(words: &[&str]) -> usize {
    words
        .iter()
        .filter(|w| ["µs", "ms", "s"].contains(w))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_sweeps_both_paths_and_writes_a_threshold() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut config = Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        config.limits.max_message_bytes = 64 << 10;
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr().to_string();
        tokio::spawn(async move {
            let _ = server.run(std::future::pending()).await;
        });
        let web = Node::builder("web-1")
            .message_server(&addr)
            .ignore_environment()
            .start()
            .await?;

        let file = TempFile::new("lazy");
        let path = file.0.to_str().context("a temporary path in UTF-8")?;
        let out = run(
            &addr,
            &[
                "tune",
                "--node",
                "web-1",
                "--sizes",
                "1KiB,64KiB,256KiB",
                "--rounds",
                "3",
                "--write",
                path,
            ],
        )
        .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "tune failed: {stdout}{stderr}");
        ensure!(
            !stderr.contains("requests"),
            "a progress bar on a stderr that is no terminal: {stderr}"
        );

        // Both paths measured where the server's limit allows, with a winner.
        for size in ["1 KiB", "64 KiB"] {
            let words = row(&stdout, size)?;
            ensure!(durations(&words) == 2, "{size}: {words:?}\n{stdout}");
            ensure!(
                words.contains(&"server") || words.contains(&"lazy"),
                "{size}: no winner: {words:?}"
            );
        }
        // Above it, the lazy path alone, and a note saying why.
        let words = row(&stdout, "256 KiB")?;
        ensure!(durations(&words) == 1, "{words:?}");
        let note = words.join(" ");
        ensure!(
            note.contains("server: over the message server's limit (64 KiB)"),
            "{note}"
        );
        ensure!(
            stdout.lines().any(|l| l.starts_with("crossover: ")),
            "{stdout}"
        );
        let threshold: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("recommended: threshold_bytes = "))
            .and_then(|rest| rest.split_whitespace().next())
            .context("no recommendation")?
            .parse()?;

        // The requests reached web-1 over both paths: 2 sizes through the
        // server and 3 over its lazy channel, 4 requests each (one warm-up).
        let got = web.counters();
        ensure!(got.received_server >= 8, "{got:?}");
        ensure!(got.received_direct >= 12, "{got:?}");

        // The file is a valid config that sets the threshold, and says how
        // it was measured.
        let written = std::fs::read_to_string(&file.0)?;
        ensure!(
            written.contains("# Written by `clustercomm tune`"),
            "{written}"
        );
        let loaded = cluster_config::Config::load(&file.0)?;
        ensure!(loaded.lazy.threshold_bytes == threshold, "{written}");

        // It never writes over a file.
        let again = run(
            &addr,
            &[
                "tune", "--node", "web-1", "--sizes", "1KiB", "--write", path,
            ],
        )
        .await?;
        ensure!(!again.status.success(), "wrote over {path}");
        ensure!(
            String::from_utf8_lossy(&again.stderr).contains("exists"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );

        // --override: the node's own section.
        let file = TempFile::new("override");
        let path = file.0.to_str().context("a temporary path in UTF-8")?;
        let out = run(
            &addr,
            &[
                "tune",
                "--node",
                "web-1",
                "--sizes",
                "1KiB,64KiB",
                "--rounds",
                "3",
                "--write",
                path,
                "--override",
            ],
        )
        .await?;
        ensure!(
            out.status.success(),
            "tune --override failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let loaded = cluster_config::Config::load(&file.0)?;
        let default = Config::default().lazy.threshold_bytes;
        ensure!(loaded.lazy.threshold_bytes == default);
        let own = loaded.for_node("web-1")?.lazy.threshold_bytes;
        ensure!(
            own == 1024 || own == 64 << 10 || own == 1023,
            "a threshold among the sizes measured: {own}"
        );

        // A node that is not there: one line saying so.
        let out = run(&addr, &["tune", "--node", "nobody", "--sizes", "1KiB"]).await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success());
        ensure!(
            stderr.lines().count() == 1 && stderr.contains("nobody is not a live node"),
            "{stderr}"
        );
        Ok(())
    })
    .await
    .context("the test did not finish within 120 s")?
}
