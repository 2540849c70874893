//! The suite's helper processes (`bench-message-server`, `bench-relay`):
//! each started on a free loopback port, its address read from the
//! `listening on ADDR` line it prints first, stopped by closing its stdin,
//! and killed and reaped on drop, so that it also ends if the suite dies.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::wait::wait_until;

/// Upper bound on a helper printing its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound on a helper exiting once its stdin is closed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A helper binary named `name` next to the running executable, or one
/// directory up (benches and tests run from `target/<profile>/deps/`,
/// binaries live in `target/<profile>/`), so that a copied suite (an A/B)
/// runs the helpers copied beside it. `None` if it is in neither place.
pub fn beside_exe(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found
}

/// A running helper process.
#[derive(Debug)]
pub struct ListeningChild {
    child: Child,
    /// Held open while the helper lives: end of file stops it.
    stdin: Option<ChildStdin>,
    /// Held so that the helper never writes to a closed pipe.
    _stdout: Option<BufReader<ChildStdout>>,
    addr: SocketAddr,
}

impl ListeningChild {
    /// Starts `binary` with `args`, its stderr going to `stderr`
    /// (`Stdio::piped()` to get it back from [`ListeningChild::stop`]), and
    /// reads the address it printed.
    ///
    /// # Errors
    ///
    /// The binary does not start, or does not print `listening on ADDR`
    /// within [`START_TIMEOUT`].
    pub async fn start<I, S>(binary: &Path, args: I, stderr: Stdio) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = child.stdout.take();
        let mut process = ListeningChild {
            stdin: child.stdin.take(),
            child,
            _stdout: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let stdout = stdout.context("no stdout pipe")?;
        // Blocking read on a blocking thread; if the child never prints,
        // dropping `process` kills it and the read ends with end of file.
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let read = reader.read_line(&mut line);
            (reader, read.map(|_| line))
        });
        let (reader, line) = tokio::time::timeout(START_TIMEOUT, read)
            .await
            .with_context(|| {
                format!(
                    "{} printed no address within {START_TIMEOUT:?}",
                    binary.display()
                )
            })?
            .context("reader thread panicked")?;
        process._stdout = Some(reader);
        let line = line.with_context(|| format!("reading {}'s stdout", binary.display()))?;
        process.addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?} (did it exit?)"))?
            .parse()
            .with_context(|| format!("bad address in {line:?}"))?;
        Ok(process)
    }

    /// The address the helper listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The helper's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Closes the helper's stdin, waits for it to exit and gives back what
    /// it wrote on stderr (empty unless started with `Stdio::piped()`).
    ///
    /// # Errors
    ///
    /// The helper does not exit within [`STOP_TIMEOUT`] (it is then
    /// killed), or exits unsuccessfully.
    pub async fn stop(mut self) -> anyhow::Result<String> {
        drop(self.stdin.take());
        let child = &mut self.child;
        let exited = wait_until(STOP_TIMEOUT, || {
            matches!(child.try_wait(), Ok(Some(_)) | Err(_))
        })
        .await;
        ensure!(
            exited.is_some(),
            "the helper did not exit within {STOP_TIMEOUT:?} of its stdin closing"
        );
        let status = self.child.wait().context("reaping the helper")?;
        let stderr = match self.child.stderr.take() {
            // The helper has exited: the pipe holds what it wrote, then
            // end of file.
            Some(mut pipe) => tokio::task::spawn_blocking(move || {
                let mut text = String::new();
                pipe.read_to_string(&mut text).map(|_| text)
            })
            .await
            .context("stderr reader panicked")?
            .context("reading the helper's stderr")?,
            None => String::new(),
        };
        ensure!(
            status.success(),
            "the helper exited with {status}: {}",
            stderr.trim()
        );
        Ok(stderr)
    }
}

impl Drop for ListeningChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
