//! The README's first hour: the `echo` and `hello` examples, as built by
//! `cargo test`, join a message server (pointed at by the environment, as
//! a newcomer's shell would) and exchange a request, an acknowledged send
//! and a notification.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context};
use message_server::MessageServer;
use node_runtime::Config;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// An example's binary, built beside this test's.
fn example(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("no target directory")?;
    let path = dir.join("examples").join(name);
    ensure!(
        path.exists(),
        "{} is not built: run `cargo test -p node-runtime` (it builds the examples)",
        path.display()
    );
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_exchange_messages() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut config = Config::default();
        config.message_server.listen = "127.0.0.1:0".parse()?;
        let server = MessageServer::bind(config).await?;
        let addr = server.local_addr().to_string();
        let _server = tokio::spawn(async move {
            let _ = server.run(std::future::pending()).await;
        });

        let mut echo = Command::new(example("echo")?)
            .env("CLUSTERCOMM_MESSAGE_SERVER", &addr)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = BufReader::new(echo.stdout.take().context("no stdout")?).lines();
        let first = lines.next_line().await?.context("echo ended")?;
        ensure!(first.starts_with("echo-1 ready"), "echo said {first:?}");

        let hello = Command::new(example("hello")?)
            .env("CLUSTERCOMM_MESSAGE_SERVER", &addr)
            .output()
            .await?;
        let said = String::from_utf8_lossy(&hello.stdout);
        ensure!(
            hello.status.success(),
            "hello failed: {said}{}",
            String::from_utf8_lossy(&hello.stderr)
        );
        ensure!(
            said.contains("reply from echo-1: hello"),
            "hello said {said:?}"
        );
        ensure!(said.contains("delivered to echo-1"), "hello said {said:?}");

        // The echo server saw all three.
        let mut seen = Vec::new();
        while seen.len() < 3 {
            seen.push(lines.next_line().await?.context("echo ended")?);
        }
        ensure!(seen[0].starts_with("request from hello-") && seen[0].ends_with(": hello"));
        ensure!(seen[1].ends_with(": hello, group"), "{seen:?}");
        ensure!(seen[2].ends_with(": goodbye"), "{seen:?}");
        Ok(())
    })
    .await
    .context("the examples did not finish within 60 s")?
}
