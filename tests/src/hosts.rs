//! Multi-host tests on one machine: hosts made of Linux network
//! namespaces, each with a data and a heartbeat interface, working as root
//! and as an ordinary user alike.
//!
//! ```no_run
//! use clustercomm_tests::hosts;
//!
//! #[test]
//! fn the_test() {
//!     let Some(world) = hosts::world("the_test") else { return };
//!     let h1 = world.host(1);
//!     let mut server = h1.spawn(h1.bin("message-server").arg("--listen=0.0.0.0:7400"));
//!     server.expect_line("message-server listening on", clustercomm_tests::TEST_WAIT);
//! }
//! ```
//!
//! # The world
//!
//! [`world`] re-runs the test's own executable, that one test alone, under
//! `unshare -rn --pid --mount-proc --fork --kill-child`: in a new user
//! namespace, where it is root (so no privileges are needed), a new network
//! namespace (the world, holding the two bridges), and a new PID namespace
//! with its own `/proc` (a mount namespace only for that). That run gets the
//! [`World`]; the outer run passes its output through, asserts that it
//! passed, and gets `None`.
//!
//! # Hosts and links
//!
//! Host `n` is a network namespace held by a process (`unshare -n` running
//! `cat` on a pipe from the world) and entered with `nsenter -t PID -n`.
//! Its `eth0` is `10.77.0.n/24` on the data bridge, its `eth1`
//! `10.78.0.n/24` on the heartbeat bridge (one veth pair each), `lo` is up.
//! Cutting a link sets the world's end of its veth pair down: packets are
//! dropped both ways and nothing answers (no RST, no ICMP), as with a
//! pulled cable; connections stay open on both ends and carry on when the
//! link is restored (TCP's retransmission back-off decides when). As on a
//! real host, the kernel forgets the host's ARP neighbours when its carrier
//! goes; a restore returns once both ends are up and the bridge forwards,
//! and leaves no stale address resolution behind (the host flushes what
//! the cut left pending, and announces itself with a gratuitous ARP,
//! `arp_notify`), so the next packet goes at once. Every method panics with a message naming what failed
//! (for `ip`, the command and its standard error), and every wait is for a
//! readiness signal (a line printed, a link state polled), never a fixed
//! sleep.
//!
//! # Cleanup
//!
//! Nothing outlives a test, however it ends:
//! - a [`HostProcess`] is killed (SIGKILL) and reaped when dropped, also
//!   when the test panics;
//! - a host's holder is killed when its [`Host`] is dropped, and exits
//!   anyway when the world process ends (its standard input closes);
//! - the world process is PID 1 of its PID namespace, so when it ends, even
//!   killed, the kernel kills every process left in it; the namespaces,
//!   veth pairs and bridges go with their last process;
//! - the world ends with the test that started it, even killed: `unshare`
//!   gets SIGKILL when that test's thread dies (`setpriv --pdeathsig`), and
//!   takes the world with it (`--kill-child`).
//!
//! Nothing is made outside the world: no `ip netns` names, nothing in
//! `/run`. Inside, `std::process::id()` is 1 in every world, so files go to
//! [`World::write_file`]'s own directory (removed with the [`World`]),
//! not to names made from the process id such as
//! [`ConfigFile`](crate::ConfigFile)'s.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::{bin_dir, DataDir, TEST_WAIT};

/// Set (to `1`) in the world's run of a test; [`world`] sets it.
pub const WORLD_ENV: &str = "CLUSTERCOMM_WORLD";

/// Upper bound for a whole multi-host test in its world; past it the world
/// is killed and the test fails.
pub const WORLD_WAIT: Duration = Duration::from_secs(600);

/// The data network: host `n` is `10.77.0.n/24` on its `eth0`.
pub const DATA_NET: [u8; 3] = [10, 77, 0];

/// The heartbeat network: host `n` is `10.78.0.n/24` on its `eth1`.
pub const HEARTBEAT_NET: [u8; 3] = [10, 78, 0];

/// The highest host number.
pub const MAX_HOST: u8 = 250;

/// `unshare`'s options for the world.
const WORLD_NAMESPACES: [&str; 5] = ["-rn", "--pid", "--mount-proc", "--fork", "--kill-child"];

/// How often a condition is looked at.
const POLL: Duration = Duration::from_millis(5);

/// Lines of a process's standard error kept for failure messages.
const STDERR_TAIL: usize = 100;

/// Runs the calling test in a world of its own.
///
/// Outside a world ([`WORLD_ENV`] unset), re-runs the current test
/// executable as `unshare -rn --pid --mount-proc --fork --kill-child <exe>
/// --exact <test_name> --nocapture --test-threads=1 --include-ignored` with
/// [`WORLD_ENV`] set (under `setpriv --pdeathsig KILL`, so that it dies
/// with the calling test), passes its output through (to the test's
/// captured output), asserts that the test passed there, and returns
/// `None`: the caller returns. Inside, returns the [`World`].
///
/// # Panics
///
/// In one line, when `unshare`, `setpriv`, `ip` or `nsenter` is missing or
/// unprivileged user namespaces are not available: never a silent skip.
/// When the test failed in its world (with its exit status), ran no test
/// of that name, or ran longer than [`WORLD_WAIT`].
pub fn world(test_name: &str) -> Option<World> {
    if std::env::var_os(WORLD_ENV).is_some() {
        return Some(World::new());
    }
    if let Some(thread) = std::thread::current().name() {
        // libtest names each test's thread after it (but for "main", with
        // one test thread).
        assert!(
            thread == "main" || thread == test_name,
            "hosts::world({test_name:?}) called from test {thread:?}: pass the test's own name"
        );
    }
    let unshare = tool("unshare", "util-linux");
    let setpriv = tool("setpriv", "util-linux");
    tool("ip", "iproute2");
    tool("nsenter", "util-linux");
    let check = Command::new(&unshare)
        .args(WORLD_NAMESPACES)
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("multi-host tests need `unshare` to run: {e}"));
    assert!(
        check.status.success(),
        "multi-host tests need unprivileged user namespaces (`unshare {} true` failed: {})",
        WORLD_NAMESPACES.join(" "),
        one_line(&check.stderr)
    );
    let exe = std::env::current_exe().expect("the test executable's path");
    // The world dies with this thread, however it ends (setpriv's parent
    // death signal), and everything in it with the world.
    let mut child = Command::new(setpriv)
        .args(["--pdeathsig", "KILL"])
        .arg(&unshare)
        .args(WORLD_NAMESPACES)
        .arg(&exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .arg("--include-ignored")
        .env(WORLD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the world of {test_name}: {e}"));
    let passed = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&passed);
    let stdout = forward(child.stdout.take(), move |line| {
        println!("{line}");
        if line.starts_with("test result: ok. 1 passed") {
            seen.store(true, Ordering::Relaxed);
        }
    });
    let stderr = forward(child.stderr.take(), |line| eprintln!("{line}"));
    if !poll(WORLD_WAIT, || !matches!(child.try_wait(), Ok(None))) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the world of {test_name} ran longer than {WORLD_WAIT:?}: killed");
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("waiting for the world of {test_name}: {e}"));
    let _ = stdout.join();
    let _ = stderr.join();
    assert!(
        status.success(),
        "{test_name} failed in its world ({status}); its output is above"
    );
    assert!(
        passed.load(Ordering::Relaxed),
        "the world ran no test named {test_name:?}: pass hosts::world the test's own name \
         (with its module path, if any)"
    );
    None
}

/// The network namespace a multi-host test runs in, with its two bridges;
/// it makes the hosts.
pub struct World {
    tools: Arc<Tools>,
    dir: DataDir,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("tools", &self.tools)
            .field("dir", &self.dir.path())
            .finish()
    }
}

impl World {
    /// Sets up the world in this (fresh) network namespace: `lo` up, the
    /// data bridge (10.77.0.0/24) and the heartbeat bridge (10.78.0.0/24).
    ///
    /// # Panics
    ///
    /// When this is not a fresh world (as when [`WORLD_ENV`] was set by
    /// hand), or an `ip` command fails.
    fn new() -> World {
        let tools = Arc::new(Tools::find());
        let links = ip(&tools, None, &["-o", "link", "show"]);
        let fresh =
            std::process::id() == 1 && links.lines().all(|l| l.split(": ").nth(1) == Some("lo"));
        assert!(
            fresh,
            "{WORLD_ENV} is set, but this is not a fresh world (PID {}, links: {links}); \
             only hosts::world sets it",
            std::process::id()
        );
        ip(&tools, None, &["link", "set", "lo", "up"]);
        for net in [Net::Data, Net::Heartbeat] {
            ip(
                &tools,
                None,
                &["link", "add", net.bridge(), "type", "bridge"],
            );
            ip(&tools, None, &["link", "set", net.bridge(), "up"]);
        }
        World {
            tools,
            dir: DataDir::new("world"),
        }
    }

    /// Host `n` (1 to [`MAX_HOST`]) with both interfaces, up.
    ///
    /// # Panics
    ///
    /// As [`World::host_with`].
    pub fn host(&self, n: u8) -> Host {
        self.host_with(n, Interfaces::BOTH)
    }

    /// Host `n` (1 to [`MAX_HOST`]) with the interfaces asked for, up.
    ///
    /// # Panics
    ///
    /// For a number out of range or already taken, or when setting it up
    /// fails.
    pub fn host_with(&self, n: u8, interfaces: Interfaces) -> Host {
        assert!(
            (1..=MAX_HOST).contains(&n),
            "host numbers go from 1 to {MAX_HOST}, not {n}"
        );
        let mut holder = Command::new(&self.tools.unshare)
            .args(["-n", "sh", "-c", "echo ready; exec cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting host {n} (`unshare -n`): {e}"));
        let mut ready = String::new();
        if let Some(out) = holder.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut ready);
        }
        if ready.trim() != "ready" {
            let _ = holder.kill();
            let mut stderr = Vec::new();
            if let Some(mut err) = holder.stderr.take() {
                let _ = err.read_to_end(&mut stderr);
            }
            let _ = holder.wait();
            panic!(
                "host {n} did not start (`unshare -n`): {}",
                one_line(&stderr)
            );
        }
        let host = Host {
            n,
            interfaces,
            holder,
            tools: Arc::clone(&self.tools),
        };
        host.inside(&["link", "set", "lo", "up"]);
        let pid = host.holder_pid().to_string();
        for net in host.nets() {
            let outside = host.outside_name(net);
            let inside = net.inside_name();
            host.outside(&[
                "link", "add", &outside, "type", "veth", "peer", "name", inside, "netns", &pid,
            ]);
            host.outside(&["link", "set", &outside, "master", net.bridge()]);
            host.outside(&["link", "set", &outside, "up"]);
            let address = format!("{}/24", host.ip(net));
            host.inside(&["addr", "add", &address, "dev", inside]);
            host.announce_on_link_up(net);
            host.inside(&["link", "set", inside, "up"]);
            host.wait_link_up(net);
        }
        host
    }

    /// Writes `contents` to `name` in the world's temporary directory
    /// (removed with the world) and returns its path.
    ///
    /// # Panics
    ///
    /// If the file cannot be written.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(self.dir.path())
            .and_then(|()| std::fs::write(&path, contents))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// The world's temporary directory (made by [`World::write_file`]).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Which networks a host is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interfaces {
    /// `eth0` on the data network.
    pub data: bool,
    /// `eth1` on the heartbeat network.
    pub heartbeat: bool,
}

impl Interfaces {
    /// Both networks.
    pub const BOTH: Interfaces = Interfaces {
        data: true,
        heartbeat: true,
    };
    /// The data network only.
    pub const DATA_ONLY: Interfaces = Interfaces {
        data: true,
        heartbeat: false,
    };
    /// The heartbeat network only.
    pub const HEARTBEAT_ONLY: Interfaces = Interfaces {
        data: false,
        heartbeat: true,
    };
}

/// A host of the world: a network namespace with its links. Dropping it
/// kills its holder; processes spawned in it live on until their own
/// guards drop.
#[derive(Debug)]
pub struct Host {
    n: u8,
    interfaces: Interfaces,
    holder: Child,
    tools: Arc<Tools>,
}

impl Host {
    /// Its number.
    pub fn number(&self) -> u8 {
        self.n
    }

    /// Its address on the data network (`eth0`, 10.77.0.n).
    pub fn data_ip(&self) -> IpAddr {
        self.ip(Net::Data)
    }

    /// Its address on the heartbeat network (`eth1`, 10.78.0.n).
    pub fn heartbeat_ip(&self) -> IpAddr {
        self.ip(Net::Heartbeat)
    }

    /// The process holding its network namespace (for `nsenter -t PID -n`).
    pub fn holder_pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command running `program` in this host (`nsenter -t PID -n --
    /// program`); spawn it with [`Host::spawn`], or run it to completion.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(&self.tools.nsenter);
        cmd.arg("-t")
            .arg(self.holder_pid().to_string())
            .args(["-n", "--"])
            .arg(program);
        cmd
    }

    /// [`Host::command`] for a binary of the workspace (`message-server`,
    /// `host-node`, from [`bin_dir`]).
    ///
    /// # Panics
    ///
    /// If it has not been built (`cargo build --workspace --bins`).
    pub fn bin(&self, name: &str) -> Command {
        let path = bin_dir()
            .expect("the directory of the workspace's binaries")
            .join(name);
        assert!(
            path.is_file(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
            path.display()
        );
        self.command(path)
    }

    /// Spawns `cmd`, made by this host's [`Host::command`] or
    /// [`Host::bin`], with its standard streams piped.
    ///
    /// # Panics
    ///
    /// If the command is not this host's, or cannot start.
    pub fn spawn(&self, cmd: &mut Command) -> HostProcess {
        let pid = self.holder_pid().to_string();
        let args: Vec<&OsStr> = cmd.get_args().collect();
        let ours = cmd.get_program() == self.tools.nsenter.as_os_str()
            && args.len() > 4
            && args[..4]
                == [
                    OsStr::new("-t"),
                    OsStr::new(&pid),
                    "-n".as_ref(),
                    "--".as_ref(),
                ];
        assert!(
            ours,
            "host {}: spawn takes a command of its own command() or bin(), not {cmd:?}",
            self.n
        );
        let program = Path::new(args[4]).file_name().unwrap_or(args[4]);
        HostProcess::start(format!("h{} {}", self.n, program.to_string_lossy()), cmd)
    }

    /// Cuts the data link (a pulled cable: packets dropped both ways).
    ///
    /// # Panics
    ///
    /// If the host has no data interface, or `ip` fails.
    pub fn cut_data(&self) {
        self.cut(Net::Data);
    }

    /// Restores the data link, returning once it carries packets.
    ///
    /// # Panics
    ///
    /// If the host has no data interface, or `ip` fails.
    pub fn restore_data(&self) {
        self.restore(Net::Data);
    }

    /// Cuts the heartbeat link.
    ///
    /// # Panics
    ///
    /// If the host has no heartbeat interface, or `ip` fails.
    pub fn cut_heartbeat(&self) {
        self.cut(Net::Heartbeat);
    }

    /// Restores the heartbeat link, returning once it carries packets.
    ///
    /// # Panics
    ///
    /// If the host has no heartbeat interface, or `ip` fails.
    pub fn restore_heartbeat(&self) {
        self.restore(Net::Heartbeat);
    }

    /// Pulls the plug: cuts every link first (so that nothing the dying
    /// processes' kernel sockets send gets out: no FIN, no RST), then kills
    /// (SIGKILL) every process in the host, spawned or not, and returns once
    /// they are dead. Their [`HostProcess`] guards reap them.
    ///
    /// # Panics
    ///
    /// If `ip` or `kill` fails, or a process does not die in time.
    pub fn power_off(&self) {
        for net in self.nets() {
            self.cut(net);
        }
        let pids = self.processes();
        if pids.is_empty() {
            return;
        }
        // One may have exited meanwhile, failing kill: the wait tells.
        let _ = Command::new(tool("kill", "procps"))
            .arg("-KILL")
            .args(pids.iter().map(u32::to_string))
            .stderr(Stdio::null())
            .status();
        poll_until(&format!("the processes of host {} to die", self.n), || {
            pids.iter().all(|&pid| dead(pid))
        });
    }

    /// Restores every link after [`Host::power_off`] (processes are
    /// started again by the test).
    ///
    /// # Panics
    ///
    /// If `ip` fails.
    pub fn power_on(&self) {
        for net in self.nets() {
            self.restore(net);
        }
    }

    /// Tries a TCP connection from this host to `addr` (with bash's
    /// `/dev/tcp`, under `timeout`): whether it was accepted, refused,
    /// had no route, or got no answer within `timeout` (dropped).
    ///
    /// # Panics
    ///
    /// If bash or timeout is missing, or the attempt fails otherwise.
    pub fn probe_tcp(&self, addr: SocketAddr, timeout: Duration) -> Probe {
        let script = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        let out = self
            .command(tool("timeout", "coreutils"))
            .arg(format!("{:.3}", timeout.as_secs_f64()))
            .arg(tool("bash", "bash"))
            .args(["-c", &script])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("host {}: probing {addr}: {e}", self.n));
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Probe::Connected,
            Some(124) => Probe::TimedOut,
            _ if stderr.contains("refused") => Probe::Refused,
            _ if stderr.contains("unreachable") || stderr.contains("No route") => {
                Probe::Unreachable
            }
            _ => panic!(
                "host {}: probing {addr} failed ({}): {}",
                self.n,
                out.status,
                one_line(&out.stderr)
            ),
        }
    }

    fn ip(&self, net: Net) -> IpAddr {
        let [a, b, c] = net.prefix();
        IpAddr::V4(Ipv4Addr::new(a, b, c, self.n))
    }

    fn has(&self, net: Net) -> bool {
        match net {
            Net::Data => self.interfaces.data,
            Net::Heartbeat => self.interfaces.heartbeat,
        }
    }

    fn nets(&self) -> impl Iterator<Item = Net> + '_ {
        [Net::Data, Net::Heartbeat]
            .into_iter()
            .filter(|&net| self.has(net))
    }

    /// The world's end of the link to `net`.
    fn outside_name(&self, net: Net) -> String {
        format!("h{}{}", self.n, net.suffix())
    }

    /// `ip ARGS` in the world.
    fn outside(&self, args: &[&str]) -> String {
        ip(&self.tools, None, args)
    }

    /// `ip ARGS` in this host.
    fn inside(&self, args: &[&str]) -> String {
        ip(&self.tools, Some(self), args)
    }

    fn cut(&self, net: Net) {
        let outside = self.checked(net);
        self.outside(&["link", "set", &outside, "down"]);
        poll_until(
            &format!("host {}'s {} link to go down", self.n, net.name()),
            || {
                !self
                    .inside(&["-o", "link", "show", "dev", net.inside_name()])
                    .contains(" state UP ")
            },
        );
    }

    fn restore(&self, net: Net) {
        let outside = self.checked(net);
        self.outside(&["link", "set", &outside, "up"]);
        self.wait_link_up(net);
        // The kernel forgot the neighbours when the carrier went; what was
        // sent during the cut left entries still resolving, which would
        // ask again only at their next retry (up to a second). Gone, the
        // next packet asks at once.
        self.inside(&["neigh", "flush", "dev", net.inside_name()]);
    }

    /// Has the host announce itself (gratuitous ARP) whenever the link
    /// comes up, so that the others' resolutions of its address, pending
    /// since a cut, complete at once.
    fn announce_on_link_up(&self, net: Net) {
        let setting = format!("/proc/sys/net/ipv4/conf/{}/arp_notify", net.inside_name());
        let out = self
            .command("sh")
            .args(["-c", &format!("echo 1 > {setting}")])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("host {}: setting {setting}: {e}", self.n));
        assert!(
            out.status.success(),
            "host {}: setting {setting} failed ({}): {}",
            self.n,
            out.status,
            one_line(&out.stderr)
        );
    }

    /// Waits until both ends are up and the bridge forwards: the link
    /// carries packets.
    fn wait_link_up(&self, net: Net) {
        let outside = self.outside_name(net);
        poll_until(
            &format!("host {}'s {} link to come up", self.n, net.name()),
            || {
                let world = self.outside(&["-d", "-o", "link", "show", "dev", &outside]);
                let host = self.inside(&["-o", "link", "show", "dev", net.inside_name()]);
                world.contains(" state UP ")
                    && world.contains("bridge_slave state forwarding")
                    && host.contains(" state UP ")
            },
        );
    }

    fn checked(&self, net: Net) -> String {
        assert!(
            self.has(net),
            "host {} has no {} interface ({:?})",
            self.n,
            net.name(),
            self.interfaces
        );
        self.outside_name(net)
    }

    /// The live processes in this host's network namespace, its holder
    /// excepted.
    fn processes(&self) -> Vec<u32> {
        let holder = self.holder_pid();
        let netns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
        let own = netns(holder).unwrap_or_else(|| panic!("host {}'s holder is gone", self.n));
        let entries = std::fs::read_dir("/proc").expect("reading /proc");
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != holder && netns(pid).as_ref() == Some(&own))
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// What [`Host::probe_tcp`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// The connection was accepted.
    Connected,
    /// Refused: the host is reachable, nothing listens there.
    Refused,
    /// No route from this host (no interface on that network).
    Unreachable,
    /// No answer in time: the packets were dropped (a cut link), or
    /// nobody has the address.
    TimedOut,
}

/// A process spawned in a host ([`Host::spawn`]): its output read line by
/// line, its input written line by line. Killed (SIGKILL) and reaped when
/// dropped. Every line it prints is also copied to the test's output,
/// tagged with the host and program (`[h2 host-node]`), standard error
/// tagged `[h2 host-node stderr]`.
#[derive(Debug)]
pub struct HostProcess {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Lines read but not yet matched by [`HostProcess::expect_line`].
    backlog: VecDeque<String>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl HostProcess {
    fn start(label: String, cmd: &mut Command) -> HostProcess {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label} ({cmd:?}): {e}"));
        let (tx, lines) = mpsc::channel();
        let tag = label.clone();
        let _ = forward(child.stdout.take(), move |line| {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line.to_owned());
        });
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr);
        let tag = label.clone();
        let _ = forward(child.stderr.take(), move |line| {
            eprintln!("[{tag} stderr] {line}");
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line.to_owned());
        });
        HostProcess {
            label,
            stdin: child.stdin.take(),
            child,
            lines,
            backlog: VecDeque::new(),
            stderr,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first line starting with `prefix` that no earlier call took,
    /// waiting at most `timeout` for it. Lines passed over stay for later
    /// calls, so asynchronous lines are never lost.
    ///
    /// # Panics
    ///
    /// If none comes in time, or the process closes its output first
    /// (naming the other lines, its exit status and its standard error).
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        self.expect_any(&[prefix], timeout)
    }

    /// As [`HostProcess::expect_line`], for a line starting with any of
    /// `prefixes`.
    ///
    /// # Panics
    ///
    /// As `expect_line`.
    pub fn expect_any(&mut self, prefixes: &[&str], timeout: Duration) -> String {
        let prefix = prefixes;
        let matches = |l: &str| prefixes.iter().any(|p| l.starts_with(p));
        if let Some(i) = self.backlog.iter().position(|l| matches(l)) {
            if let Some(line) = self.backlog.remove(i) {
                return line;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(line) => self.backlog.push_back(line),
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line starting with {prefix:?} within {timeout:?}; lines passed \
                     over: {:?}; stderr: {}",
                    self.label,
                    self.backlog,
                    self.stderr_tail()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.status_text();
                    panic!(
                        "{}: output closed ({status}) before a line starting with {prefix:?}; \
                         lines passed over: {:?}; stderr: {}",
                        self.label,
                        self.backlog,
                        self.stderr_tail()
                    )
                }
            }
        }
    }

    /// Whether it printed a line starting with `prefix` that no call
    /// took yet, among the lines printed so far (without waiting).
    pub fn printed(&mut self, prefix: &str) -> bool {
        while let Ok(line) = self.lines.try_recv() {
            self.backlog.push_back(line);
        }
        self.backlog.iter().any(|l| l.starts_with(prefix))
    }

    /// Writes `line` and a newline to its standard input.
    ///
    /// # Panics
    ///
    /// If its input is closed.
    pub fn send_line(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            panic!("{}: its stdin was closed by the test", self.label);
        };
        if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            let status = self.status_text();
            panic!(
                "{}: writing {line:?} to its stdin: {e} ({status}); stderr: {}",
                self.label,
                self.stderr_tail()
            );
        }
    }

    /// [`HostProcess::send_line`] `command`, then
    /// [`HostProcess::expect_line`] `answer_prefix` within [`TEST_WAIT`].
    ///
    /// # Panics
    ///
    /// As those two.
    pub fn ask(&mut self, command: &str, answer_prefix: &str) -> String {
        self.send_line(command);
        self.expect_line(answer_prefix, TEST_WAIT)
    }

    /// `host-node`'s `send <to> <bytes>`, and its answer (`ok MS` or `err
    /// VARIANT MS ERROR`).
    ///
    /// # Panics
    ///
    /// As [`HostProcess::ask`].
    pub fn send_to(&mut self, to: &str, bytes: usize) -> String {
        self.send_line(&format!("send {to} {bytes}"));
        self.expect_any(&["ok ", "err "], TEST_WAIT)
    }

    /// Closes its standard input (`host-node` stops then, a planned stop).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits at most `timeout` for it to exit, and reaps it.
    ///
    /// # Panics
    ///
    /// If it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        poll(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("{}: still running after {timeout:?}", self.label))
    }

    /// Kills it (SIGKILL) and reaps it now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines (up to 100) of its standard error.
    pub fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        Vec::from(tail.clone()).join("\n")
    }

    fn status_text(&mut self) -> String {
        let mut status = None;
        // Output closes just before the exit shows.
        poll(Duration::from_secs(1), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.map_or_else(|| "still running".to_owned(), |s| s.to_string())
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A network of the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Net {
    Data,
    Heartbeat,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Data => "data",
            Net::Heartbeat => "heartbeat",
        }
    }

    fn bridge(self) -> &'static str {
        match self {
            Net::Data => "br-data",
            Net::Heartbeat => "br-hb",
        }
    }

    /// The interface's name in a host.
    fn inside_name(self) -> &'static str {
        match self {
            Net::Data => "eth0",
            Net::Heartbeat => "eth1",
        }
    }

    /// Of the world's end of a host's link (`h3d`, `h3h`).
    fn suffix(self) -> &'static str {
        match self {
            Net::Data => "d",
            Net::Heartbeat => "h",
        }
    }

    fn prefix(self) -> [u8; 3] {
        match self {
            Net::Data => DATA_NET,
            Net::Heartbeat => HEARTBEAT_NET,
        }
    }
}

/// The programs the world runs, found once.
#[derive(Debug)]
struct Tools {
    ip: PathBuf,
    nsenter: PathBuf,
    unshare: PathBuf,
}

impl Tools {
    fn find() -> Tools {
        Tools {
            ip: tool("ip", "iproute2"),
            nsenter: tool("nsenter", "util-linux"),
            unshare: tool("unshare", "util-linux"),
        }
    }
}

/// `name` on the `PATH` or in the usual system directories (`ip` lives in
/// `/usr/sbin`, often not on an ordinary user's `PATH`).
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("multi-host tests need `{name}` (Debian package {package})"))
}

/// `ip ARGS`, in the world or in `host`; its standard output.
fn ip(tools: &Tools, host: Option<&Host>, args: &[&str]) -> String {
    let mut cmd = match host {
        Some(host) => host.command(&tools.ip),
        None => Command::new(&tools.ip),
    };
    let out = cmd.args(args).stdin(Stdio::null()).output();
    let place = host.map_or_else(|| "the world".to_owned(), |h| format!("host {}", h.n));
    let what = format!("ip {}` in {place}", args.join(" "));
    let out = out.unwrap_or_else(|e| panic!("`{what} could not run: {e}"));
    assert!(
        out.status.success(),
        "`{what} failed ({}): {}",
        out.status,
        one_line(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `pid` has exited (gone, or a zombie waiting to be reaped).
fn dead(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // "PID (COMM) STATE ...": COMM may hold anything, the state follows
    // its last parenthesis.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}

/// Reads `stream` line by line on a thread of its own (which ends with
/// it), handing each line to `each`.
fn forward(
    stream: Option<impl Read + Send + 'static>,
    mut each: impl FnMut(&str) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(stream) = stream else { return };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            each(&line);
        }
    })
}

/// Looks at `condition` every few milliseconds until it holds (true) or
/// `timeout` passes (false).
fn poll(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// [`poll`] for [`TEST_WAIT`]; panics naming `what` was awaited if it does
/// not hold in time. (The tests library's `wait_until` is its async twin;
/// the hosts are driven from plain threads.)
fn poll_until(what: &str, condition: impl FnMut() -> bool) {
    assert!(
        poll(TEST_WAIT, condition),
        "{what}: not within {TEST_WAIT:?}"
    );
}

/// A process's standard error on one line.
fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" / ")
}
