//! `clustercomm dead-letters` against a real server: a node's one-way
//! messages to a node that does not exist are filed by the server
//! (`target_gone`); the command, joining as a short-lived node, lists
//! them, takes one out, and replays the others once a node of that name
//! subscribes to the service, which empties the queue.
//!
//! The `clustercomm` binary must be built (`cargo test --workspace` or
//! `cargo build --workspace --bins` builds it).

use std::path::PathBuf;
use std::process::Output;

use anyhow::{bail, ensure, Context};
use clustercomm_tests::{bounded, init_logging, next_message, test_config, TestServer, TEST_WAIT};
use node_runtime::{Node, NodeId, Target};
use tokio::process::Command;

/// The `clustercomm` binary, beside this test's (`target/debug`).
fn clustercomm_bin() -> anyhow::Result<PathBuf> {
    let path = clustercomm_tests::bin_dir()?.join("clustercomm");
    if !path.exists() {
        bail!(
            "{} is missing: run the tests with `cargo test --workspace`, which builds it",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `clustercomm --server ADDR ARGS...` (bounded) and returns its
/// output, whether it succeeded or not.
async fn clustercomm(server: &TestServer, args: &[&str]) -> anyhow::Result<Output> {
    let run = Command::new(clustercomm_bin()?)
        .arg("--server")
        .arg(server.addr.to_string())
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(TEST_WAIT, run)
        .await
        .with_context(|| format!("clustercomm {args:?} did not end in time"))?
        .context("running clustercomm")
}

/// [`clustercomm`], which must succeed; its standard output.
async fn succeeds(server: &TestServer, args: &[&str]) -> anyhow::Result<String> {
    let out = clustercomm(server, args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "clustercomm {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// [`clustercomm`], which must fail; its standard output and error.
async fn fails(server: &TestServer, args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = clustercomm(server, args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "clustercomm {args:?} succeeded: {stdout}"
    );
    Ok((stdout, stderr))
}

/// A server whose queue holds one dead letter per body, numbered from 1:
/// one-way messages from `app-1` to `nobody`, service `orders`.
async fn server_with_dead_letters(bodies: &[&str]) -> anyhow::Result<(TestServer, Node)> {
    let server = TestServer::start(test_config()).await?;
    let app = server.node("app-1", &test_config()).await?;
    for body in bodies {
        app.notify(
            Target::Node(NodeId::new("nobody")),
            "orders",
            body.to_string(),
        )
        .await?;
    }
    let want = bodies.len() as u64;
    clustercomm_tests::wait_dead_letters(&server.handle, |s| s.added == want).await?;
    Ok((server, app))
}

/// The line of entry `id` in a listing.
fn entry_line(listing: &str, id: u64) -> anyhow::Result<&str> {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
        .with_context(|| format!("no line for {id}: {listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_take_and_replay() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let (server, _app) = server_with_dead_letters(&["first", "second", "third"]).await?;

        let all = succeeds(&server, &["dead-letters", "list", "--bodies"]).await?;
        ensure!(
            all.starts_with("dead letters: 3 held (16 bytes) of at most "),
            "{all}"
        );
        ensure!(all.contains("; 3 added, 0 overflowed"), "{all}");
        for (id, body) in [(1, "first"), (2, "second"), (3, "third")] {
            let line = entry_line(&all, id)?;
            for part in [" app-1 ", " node:nobody ", " orders ", " target gone"] {
                ensure!(line.contains(part), "no {part:?} in {line:?}");
            }
            ensure!(
                line.contains(&format!(" {} target gone", body.len())),
                "no byte count in {line:?}"
            );
            // Filed by the server itself: no "filed by".
            ensure!(!line.contains("filed by"), "{line}");
            ensure!(
                all.contains(&format!("body \"{body}\"")),
                "no body {body:?}: {all}"
            );
        }

        // A page: after 1, one entry, and a hint for the next.
        let page = succeeds(
            &server,
            &["dead-letters", "list", "--after", "1", "--limit", "1"],
        )
        .await?;
        entry_line(&page, 2)?;
        ensure!(entry_line(&page, 3).is_err(), "{page}");
        ensure!(page.contains("--after 2"), "{page}");
        ensure!(
            !page.lines().any(|l| l.trim_start().starts_with("body ")),
            "bodies unasked: {page}"
        );

        // Take 1 out; taking it again fails, naming it.
        let taken = succeeds(&server, &["dead-letters", "take", "1"]).await?;
        ensure!(taken.starts_with("taken 1 of 1"), "{taken}");
        entry_line(&taken, 1)?;
        ensure!(server.handle.dead_letter_stats().entries == 2);
        let (_, stderr) = fails(&server, &["dead-letters", "take", "1"]).await?;
        ensure!(stderr.contains("not in the queue: 1"), "{stderr}");

        // Replaying an entry that is not there fails, and says so.
        let (stdout, stderr) = fails(&server, &["dead-letters", "replay", "99"]).await?;
        ensure!(
            stdout.contains("not replayed 99: no dead letter number 99"),
            "{stdout}"
        );
        ensure!(
            stderr.contains("1 of 1 dead letters not replayed"),
            "{stderr}"
        );

        // The target comes after the fact: each replay is delivered.
        let nobody = server.node("nobody", &test_config()).await?;
        let mut inbox = nobody.subscribe("orders").await?;
        for (id, body) in [(2, "second"), (3, "third")] {
            let id = id.to_string();
            let replayed = succeeds(&server, &["dead-letters", "replay", &id]).await?;
            ensure!(
                replayed.trim() == format!("replayed {id}: delivered to nobody"),
                "{replayed}"
            );
            let message = next_message(&mut inbox).await?;
            ensure!(message.body().as_ref() == body.as_bytes());
            ensure!(message.sender().as_str().starts_with("clustercomm-"));
        }
        let stats =
            clustercomm_tests::wait_dead_letters(&server.handle, |s| s.entries == 0).await?;
        ensure!((stats.bytes, stats.added) == (0, 3), "{stats:?}");
        let empty = succeeds(&server, &["dead-letters", "list"]).await?;
        ensure!(
            empty.trim().lines().count() == 1 && empty.starts_with("dead letters: 0 held"),
            "{empty}"
        );
        Ok(())
    })
    .await
}

/// One `replay` naming several entries replays every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_several_in_one_command() -> anyhow::Result<()> {
    init_logging();
    bounded(async {
        let (server, _app) = server_with_dead_letters(&["first", "second"]).await?;
        let nobody = server.node("nobody", &test_config()).await?;
        let mut inbox = nobody.subscribe("orders").await?;
        let replayed = succeeds(&server, &["dead-letters", "replay", "1", "2"]).await?;
        ensure!(
            replayed.lines().collect::<Vec<_>>()
                == [
                    "replayed 1: delivered to nobody",
                    "replayed 2: delivered to nobody"
                ],
            "{replayed}"
        );
        for body in ["first", "second"] {
            let message = next_message(&mut inbox).await?;
            ensure!(message.body().as_ref() == body.as_bytes());
        }
        clustercomm_tests::wait_dead_letters(&server.handle, |s| s.entries == 0).await?;
        Ok(())
    })
    .await
}
