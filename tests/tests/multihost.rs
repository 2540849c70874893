//! Smoke tests of the multi-host harness (`clustercomm_tests::hosts`): hosts
//! reach each other on both networks, a cut link drops packets until it is
//! restored, a host on one network has no route to the other, and a
//! powered-off host goes silent until it is powered on. Each test runs in a
//! world of its own (network namespaces, no privileges needed); `host-node`
//! and `message-server` must be built (`cargo build --workspace --bins`).

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clustercomm_tests::hosts::{self, Host, HostProcess, Interfaces, Probe, World};
use clustercomm_tests::TEST_WAIT;

/// The message server's port, on every address of its host.
const SERVER_PORT: u16 = 7400;

/// How long a probe waits for an answer before it counts as dropped.
const PROBE_WAIT: Duration = Duration::from_millis(500);

/// The service every `host-node` subscribes.
const SERVICE: &str = "smoke";

#[test]
fn hosts_reach_each_other_on_both_networks() {
    let Some(world) = hosts::world("hosts_reach_each_other_on_both_networks") else {
        return;
    };
    let h1 = world.host(1);
    let h2 = world.host(2);
    let h3 = world.host(3);
    let config = cluster_config(&world, &h1, &[("n2", &h2), ("n3", &h3)]);
    let _server = start_server(&h1, &config);
    let data = SocketAddr::new(h1.data_ip(), SERVER_PORT);
    let heartbeat = SocketAddr::new(h1.heartbeat_ip(), SERVER_PORT);
    for host in [&h2, &h3] {
        assert_eq!(host.probe_tcp(data, PROBE_WAIT), Probe::Connected);
        assert_eq!(host.probe_tcp(heartbeat, PROBE_WAIT), Probe::Connected);
    }

    // Nodes join over the data network (and heartbeat over the other).
    let mut n2 = start_node(&h2, &config, "n2");
    let mut n3 = start_node(&h3, &config, "n3");
    n2.expect_line("joined n3", TEST_WAIT);
    n2.ask("send n3 16", "ok ");
    assert_eq!(n3.ask("received", "received "), "received 1");
    assert_eq!(n2.ask("members", "members "), "members n2,n3");
    let paths = n2.ask("paths", "paths ");
    assert!(paths.starts_with("paths server=1 direct=0 "), "{paths}");

    // A cut link drops packets (no answer at all), the other link and the
    // other hosts carry on, and a restored link carries packets at once.
    h3.cut_data();
    assert_eq!(h3.probe_tcp(data, PROBE_WAIT), Probe::TimedOut);
    assert_eq!(h3.probe_tcp(heartbeat, PROBE_WAIT), Probe::Connected);
    assert_eq!(h2.probe_tcp(data, PROBE_WAIT), Probe::Connected);
    h3.restore_data();
    assert_eq!(h3.probe_tcp(data, PROBE_WAIT), Probe::Connected);

    h3.cut_heartbeat();
    assert_eq!(h3.probe_tcp(heartbeat, PROBE_WAIT), Probe::TimedOut);
    assert_eq!(h3.probe_tcp(data, PROBE_WAIT), Probe::Connected);
    h3.restore_heartbeat();
    assert_eq!(h3.probe_tcp(heartbeat, PROBE_WAIT), Probe::Connected);

    // Nothing listening: the host answers (a refusal, not a drop).
    let closed = SocketAddr::new(h1.data_ip(), SERVER_PORT + 1);
    assert_eq!(h2.probe_tcp(closed, PROBE_WAIT), Probe::Refused);
}

#[test]
fn a_host_on_one_network_has_no_route_to_the_other() {
    let Some(world) = hosts::world("a_host_on_one_network_has_no_route_to_the_other") else {
        return;
    };
    let h1 = world.host(1);
    let data_only = world.host_with(2, Interfaces::DATA_ONLY);
    let heartbeat_only = world.host_with(3, Interfaces::HEARTBEAT_ONLY);
    let config = cluster_config(&world, &h1, &[]);
    let _server = start_server(&h1, &config);
    let data = SocketAddr::new(h1.data_ip(), SERVER_PORT);
    let heartbeat = SocketAddr::new(h1.heartbeat_ip(), SERVER_PORT);
    assert_eq!(data_only.probe_tcp(data, PROBE_WAIT), Probe::Connected);
    assert_eq!(
        data_only.probe_tcp(heartbeat, PROBE_WAIT),
        Probe::Unreachable
    );
    assert_eq!(
        heartbeat_only.probe_tcp(heartbeat, PROBE_WAIT),
        Probe::Connected
    );
    assert_eq!(
        heartbeat_only.probe_tcp(data, PROBE_WAIT),
        Probe::Unreachable
    );
}

#[test]
fn a_powered_off_host_is_silent_until_powered_on() {
    let Some(world) = hosts::world("a_powered_off_host_is_silent_until_powered_on") else {
        return;
    };
    let h1 = world.host(1);
    let h2 = world.host(2);
    let h3 = world.host(3);
    let config = cluster_config(&world, &h1, &[("n2", &h2), ("n3", &h3)]);
    let _server = start_server(&h1, &config);
    let mut n2 = start_node(&h2, &config, "n2");
    let mut n3 = start_node(&h3, &config, "n3");
    n2.expect_line("joined n3", TEST_WAIT);

    // Its links go first, so its dying sockets say nothing: the others
    // only hear silence, and declare it failed.
    h3.power_off();
    assert_eq!(n3.wait_exit(TEST_WAIT).signal(), Some(9));
    assert_eq!(n2.expect_line("left n3", TEST_WAIT), "left n3 Failed");
    let on_h3 = SocketAddr::new(h3.data_ip(), SERVER_PORT);
    assert_eq!(h2.probe_tcp(on_h3, PROBE_WAIT), Probe::TimedOut);

    h3.power_on();
    assert_eq!(h2.probe_tcp(on_h3, PROBE_WAIT), Probe::Refused);
    let mut n3 = start_node(&h3, &config, "n3");
    n2.expect_line("joined n3", TEST_WAIT);
    n2.ask("send n3 16", "ok ");

    // host-node stops (a planned stop) when its input closes.
    n3.close_stdin();
    assert!(n3.wait_exit(TEST_WAIT).success());
    assert_eq!(n2.expect_line("left n3", TEST_WAIT), "left n3 Stopped");
}

/// The cluster's file: the message server on `server`, reached over the
/// data network, heartbeats over the heartbeat network (so each node of
/// `nodes` binds its heartbeats to its address there: the server takes
/// them only from the address a node registered); the tests' short timings
/// (as `clustercomm_tests::test_config`).
fn cluster_config(world: &World, server: &Host, nodes: &[(&str, &Host)]) -> PathBuf {
    let data = server.data_ip();
    let heartbeat = server.heartbeat_ip();
    let sections: String = nodes
        .iter()
        .map(|(id, host)| {
            let ip = host.heartbeat_ip();
            format!("\n[nodes.{id}.node]\nheartbeat_bind = \"{ip}:0\"\n")
        })
        .collect();
    world.write_file(
        "cluster.toml",
        &format!(
            r#"
[cluster]
heartbeat_interval_ms = 200
failure_timeout_ms = 1000
heartbeat_listen = "{heartbeat}:7402"

[message_server]
addresses = ["{data}:{SERVER_PORT}"]
listen = "0.0.0.0:{SERVER_PORT}"
connect_timeout_ms = 2000
reconnect_delay_ms = 50
reconnect_max_delay_ms = 500

[node]
send_timeout_ms = 5000
{sections}"#
        ),
    )
}

/// `message-server` on `host`, listening.
fn start_server(host: &Host, config: &Path) -> HostProcess {
    let mut server = host.spawn(host.bin("message-server").arg("--config").arg(config));
    server.expect_line("message-server listening on", TEST_WAIT);
    server
}

/// `host-node` `id` on `host`, joined: it announced its direct address on
/// the data network and registered with the server there.
fn start_node(host: &Host, config: &Path, id: &str) -> HostProcess {
    let mut node = host.spawn(host.bin("host-node").arg("--config").arg(config).args([
        "--id",
        id,
        "--service",
        SERVICE,
    ]));
    let ready = node.expect_line(&format!("ready {id} "), TEST_WAIT);
    let direct = format!("direct={}:", host.data_ip());
    assert!(ready.contains(&direct), "{ready}: expected {direct}");
    assert!(ready.ends_with(&format!(":{SERVER_PORT}")), "{ready}");
    node
}

// The topology tests (issue 20): interfaces chosen by name, per-node
// addresses, a cut data or heartbeat network, and a standby server on
// another host.

/// The tests' timings and a lazy threshold low enough that a 64 KiB body
/// takes a direct channel, with `cluster` and `server` added to those
/// sections (`server` names the servers' addresses) and `rest` after them.
fn topology_config(world: &World, name: &str, cluster: &str, server: &str, rest: &str) -> PathBuf {
    world.write_file(
        name,
        &format!(
            r#"
[cluster]
heartbeat_interval_ms = 200
failure_timeout_ms = 1000
{cluster}

[message_server]
listen = "0.0.0.0:{SERVER_PORT}"
connect_timeout_ms = 2000
reconnect_delay_ms = 50
reconnect_max_delay_ms = 500
{server}

[lazy]
threshold_bytes = 1024
{rest}"#
        ),
    )
}

/// The number after `key=` in a `paths` answer.
fn path_count(paths: &str, key: &str) -> u64 {
    paths
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {paths:?}"))
}

/// Messages from `from` to `to` for three failure timeouts: heartbeats
/// taken on their network keep both members all along (a refused
/// heartbeat fails its node within one), so no one left or lost its link.
fn steady_for_three_failure_timeouts(from: &mut HostProcess, to: &mut HostProcess, to_id: &str) {
    let until = std::time::Instant::now() + Duration::from_millis(3 * 1000);
    while std::time::Instant::now() < until {
        let answer = from.send_to(to_id, 16);
        assert!(answer.starts_with("ok "), "{answer}");
    }
    assert!(!from.printed(&format!("left {to_id}")), "{to_id} left");
    assert!(!from.printed("disconnected"), "the sender lost its link");
    assert!(!to.printed("disconnected"), "{to_id} lost its link");
}

#[test]
fn interfaces_by_name_keep_heartbeats_and_direct_channels_apart() {
    let Some(world) = hosts::world("interfaces_by_name_keep_heartbeats_and_direct_channels_apart")
    else {
        return;
    };
    let h1 = world.host(1);
    let h2 = world.host(2);
    let h3 = world.host(3);
    // One file for all: the server takes heartbeats on its eth1, each node
    // sends them from its eth1 and takes direct channels on its eth0.
    let config = topology_config(
        &world,
        "names.toml",
        r#"heartbeat_interface = "eth1""#,
        &format!(r#"addresses = ["{}:{SERVER_PORT}"]"#, h1.data_ip()),
        "[node]\ndirect_interface = \"eth0\"\nheartbeat_interface = \"eth1\"\n",
    );
    let mut server = h1.spawn(h1.bin("message-server").arg("--config").arg(&config));
    server.expect_line("message-server listening on 0.0.0.0:", TEST_WAIT);
    let heartbeats = server.expect_line("  heartbeats", TEST_WAIT);
    assert!(
        heartbeats.contains(&format!("{}:{SERVER_PORT}", h1.heartbeat_ip())),
        "{heartbeats}"
    );
    let mut n2 = start_node(&h2, &config, "n2");
    let mut n3 = start_node(&h3, &config, "n3");
    n2.expect_line("joined n3", TEST_WAIT);

    n2.ask("send n3 65536", "ok ");
    let paths = n2.ask("paths", "paths ");
    assert_eq!(path_count(&paths, "direct"), 1, "{paths}");
    steady_for_three_failure_timeouts(&mut n2, &mut n3, "n3");
}

#[test]
fn addresses_per_node_and_by_route_across_hosts() {
    let Some(world) = hosts::world("addresses_per_node_and_by_route_across_hosts") else {
        return;
    };
    let h1 = world.host(1);
    let h2 = world.host(2);
    let h3 = world.host(3);
    // n2 says nothing of its addresses: it announces the one that reaches
    // the server (its data network, not its heartbeat one) and heartbeats
    // from the one that reaches the server's heartbeat address. n3 has its
    // own port and announced address in its section.
    let config = topology_config(
        &world,
        "overrides.toml",
        &format!(r#"heartbeat_listen = "{}:7402""#, h1.heartbeat_ip()),
        &format!(r#"addresses = ["{}:{SERVER_PORT}"]"#, h1.data_ip()),
        &format!(
            "[nodes.n3.node]\ndirect_listen = \"0.0.0.0:7411\"\ndirect_advertise = \"{}:7411\"\n",
            h3.data_ip()
        ),
    );
    let _server = start_server(&h1, &config);
    let mut n2 = start_node(&h2, &config, "n2");
    let n3_ready = {
        let mut n3 = h3.spawn(h3.bin("host-node").arg("--config").arg(&config).args([
            "--id",
            "n3",
            "--service",
            SERVICE,
        ]));
        let ready = n3.expect_line("ready n3 ", TEST_WAIT);
        (n3, ready)
    };
    let (mut n3, ready) = n3_ready;
    assert!(
        ready.contains(&format!("direct={}:7411 ", h3.data_ip())),
        "{ready}"
    );
    n2.expect_line("joined n3", TEST_WAIT);

    n2.ask("send n3 65536", "ok ");
    n3.ask("send n2 65536", "ok ");
    for node in [&mut n2, &mut n3] {
        let paths = node.ask("paths", "paths ");
        assert_eq!(path_count(&paths, "direct"), 1, "{paths}");
    }
    steady_for_three_failure_timeouts(&mut n2, &mut n3, "n3");
}

/// The file of the fault tests: the server's heartbeat address given, the
/// nodes' found by route; n3 gives up its sends after 3 s.
fn fault_config(world: &World, server: &Host) -> PathBuf {
    topology_config(
        world,
        "faults.toml",
        &format!(r#"heartbeat_listen = "{}:7402""#, server.heartbeat_ip()),
        &format!(r#"addresses = ["{}:{SERVER_PORT}"]"#, server.data_ip()),
        "[node]\nsend_timeout_ms = 20000\n\n[nodes.n3.node]\nsend_timeout_ms = 3000\n",
    )
}

/// The fault tests' cluster: the server on host 1, `n2` on host 2 and
/// `n3` on host 3, joined.
struct FaultCluster {
    server: HostProcess,
    n2: HostProcess,
    n3: HostProcess,
    /// Hosts 1 and 2.
    hosts: [Host; 2],
    h3: Host,
}

fn fault_cluster(world: &World) -> FaultCluster {
    let h1 = world.host(1);
    let h2 = world.host(2);
    let h3 = world.host(3);
    let config = fault_config(world, &h1);
    let server = start_server(&h1, &config);
    let mut n2 = start_node(&h2, &config, "n2");
    let n3 = start_node(&h3, &config, "n3");
    n2.expect_line("joined n3", TEST_WAIT);
    FaultCluster {
        server,
        n2,
        n3,
        hosts: [h1, h2],
        h3,
    }
}

/// The part of a `send` answer that names its outcome (`ok`, or `err`
/// and the error's variant), and its milliseconds.
fn outcome(answer: &str) -> (String, u64) {
    let mut words = answer.split_whitespace();
    let first = words.next().unwrap_or_default();
    let (kind, ms) = if first == "ok" {
        ("ok".to_owned(), words.next())
    } else {
        (
            format!("err {}", words.next().unwrap_or_default()),
            words.next(),
        )
    };
    let ms = ms
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("{answer:?}"));
    (kind, ms)
}

#[test]
fn a_cut_data_network_fails_the_node_within_the_failure_timeout() {
    let Some(world) = hosts::world("a_cut_data_network_fails_the_node_within_the_failure_timeout")
    else {
        return;
    };
    // Every part bound: what is left out of a pattern is dropped (and a
    // process killed) at once.
    let FaultCluster {
        server: _server,
        hosts: _hosts,
        h3,
        mut n2,
        mut n3,
    } = fault_cluster(&world);
    n2.ask("send n3 16", "ok ");

    // Its heartbeats still arrive; its connection carries nothing. A send
    // to it ends with TargetStopped when it is declared failed (within
    // the failure timeout of its last word), long before its 20 s timeout.
    h3.cut_data();
    let (to_cut, ms) = outcome(&n2.send_to("n3", 16));
    assert_eq!(to_cut, "err TargetStopped", "after {ms} ms");
    assert_eq!(n2.expect_line("left n3", TEST_WAIT), "left n3 Failed");

    // The node itself drops its silent link, and its own send fails at its
    // timeout (it waits for a server), never hangs.
    let (from_cut, ms) = outcome(&n3.send_to("n2", 16));
    assert_eq!(from_cut, "err Timeout", "after {ms} ms");
    n3.expect_line("disconnected", TEST_WAIT);

    // Back on the network, it rejoins (a new incarnation) and is reached.
    h3.restore_data();
    n2.expect_line("joined n3", TEST_WAIT);
    n2.ask("send n3 16", "ok ");
    n3.ask("send n2 16", "ok ");
}

#[test]
fn a_cut_heartbeat_network_fails_the_node_which_rejoins_over_its_data_network() {
    let Some(world) =
        hosts::world("a_cut_heartbeat_network_fails_the_node_which_rejoins_over_its_data_network")
    else {
        return;
    };
    // Every part bound: what is left out of a pattern is dropped (and a
    // process killed) at once.
    let FaultCluster {
        server: _server,
        hosts: _hosts,
        h3,
        mut n2,
        mut n3,
    } = fault_cluster(&world);

    // The heartbeats are the failure detector: without them n3 is failed,
    // and n3, unanswered, drops its link; over its data network it
    // rejoins as a new incarnation (and is failed again while the cut
    // lasts).
    h3.cut_heartbeat();
    assert_eq!(n2.expect_line("left n3", TEST_WAIT), "left n3 Failed");
    n3.expect_line("disconnected", TEST_WAIT);
    n2.expect_line("joined n3", TEST_WAIT);

    // Heartbeats back: it stays, and is reached.
    h3.restore_heartbeat();
    let deadline = std::time::Instant::now() + TEST_WAIT;
    loop {
        let (result, _) = outcome(&n2.send_to("n3", 16));
        if result == "ok" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "n3 not reached after its heartbeats came back: {result}"
        );
        n2.expect_line("joined n3", TEST_WAIT);
    }
}

#[test]
fn nodes_move_to_a_standby_on_another_host_and_back() {
    let Some(world) = hosts::world("nodes_move_to_a_standby_on_another_host_and_back") else {
        return;
    };
    let primary = world.host(1);
    let standby = world.host(2);
    let h3 = world.host(3);
    let h4 = world.host(4);
    // Each server takes heartbeats on its own eth1: one file for both.
    let config = topology_config(
        &world,
        "standby.toml",
        r#"heartbeat_interface = "eth1""#,
        &format!(
            r#"addresses = ["{}:{SERVER_PORT}", "{}:{SERVER_PORT}"]"#,
            primary.data_ip(),
            standby.data_ip()
        ),
        "[node]\ndirect_interface = \"eth0\"\nheartbeat_interface = \"eth1\"\n",
    );
    let _first = start_server(&primary, &config);
    let _standby = start_server(&standby, &config);
    let mut n3 = start_node(&h3, &config, "n3");
    let mut n4 = start_node(&h4, &config, "n4");
    n3.expect_line("joined n4", TEST_WAIT);

    primary.power_off();
    let on_standby = format!("server {}:{SERVER_PORT}", standby.data_ip());
    n3.expect_line(&on_standby, TEST_WAIT);
    n4.expect_line(&on_standby, TEST_WAIT);
    wait_reached(&mut n3, "n4");

    primary.power_on();
    let _second = start_server(&primary, &config);
    let on_primary = format!("server {}:{SERVER_PORT}", primary.data_ip());
    n3.expect_line(&on_primary, TEST_WAIT);
    n4.expect_line(&on_primary, TEST_WAIT);
    wait_reached(&mut n3, "n4");
    n4.ask("send n3 65536", "ok ");
}

/// Sends from `from` to `to` until one is delivered (both may need a
/// moment to meet on the same server after a move).
fn wait_reached(from: &mut HostProcess, to: &str) {
    let deadline = std::time::Instant::now() + TEST_WAIT;
    loop {
        let answer = from.send_to(to, 16);
        if answer.starts_with("ok ") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{to} not reached: {answer}"
        );
    }
}
