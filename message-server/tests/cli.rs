//! The `message-server` binary: starts on defaults, prints where it listens,
//! and names the bad key of a broken config file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the child when dropped.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn first_line(mut cmd: Command) -> (Guard, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn message-server");
    let stdout = child.stdout.take().expect("stdout");
    let guard = Guard(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("message-server printed nothing");
    (guard, line)
}

#[test]
fn listens_where_told_and_says_so() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_message-server"));
    cmd.args(["--listen", "127.0.0.1:0"]);
    let (_guard, line) = first_line(cmd);
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("message-server listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .expect("an address");
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    std::net::TcpStream::connect(addr).expect("it accepts connections");
}

#[test]
fn runs_with_no_arguments_on_the_default_port() {
    // In a private network namespace when we can make one, so the default
    // port cannot collide with anything on this machine.
    let private = Command::new("unshare")
        .args(["-rn", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = if private {
        let mut c = Command::new("unshare");
        c.args(["-rn", env!("CARGO_BIN_EXE_message-server")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_message-server"))
    };
    cmd.env_remove("CLUSTERCOMM_LISTEN");
    let (_guard, line) = first_line(cmd);
    assert_eq!(line.trim(), "message-server listening on 0.0.0.0:7400");
}

#[test]
fn bad_config_names_the_key_and_exits() {
    let dir = std::env::temp_dir().join(format!("cc-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cases = [
        ("[lazy]\nthreshhold_bytes = 1\n", "threshhold_bytes"),
        (
            "[node]\nbusy_lower = 10\nbusy_upper = 5\n",
            "node.busy_lower",
        ),
        ("[message_server]\nlisten = \"nowhere\"\n", "listen"),
        (
            "[message_server]\ninterface = \"cc-missing0\"\n",
            "`message_server.interface`: this host has no network interface \"cc-missing0\"",
        ),
        (
            "[cluster]\nheartbeat_interface = \"cc-missing1\"\n",
            "`cluster.heartbeat_interface`: this host has no network interface \"cc-missing1\"",
        ),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        std::fs::write(&path, text).expect("write config");
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_message-server"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{text}: should fail");
        assert!(started.elapsed() < Duration::from_secs(10));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(key),
            "{text}: stderr does not name {key}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
