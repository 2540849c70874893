//! The relay floor end to end: every relay case against a real
//! `bench-relay` process with short phases, and hostile clients that the
//! relay closes while it goes on serving.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use clustercomm_benches::relay_cases::{self, ALL, MAX_PAYLOAD};
use clustercomm_benches::suite::{self, BulkPath, Case, Outcome, SendPeer, System};
use clustercomm_benches::{ours, raw_cases, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on one case in these tests (short phases, debug build).
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Upper bound on the relay closing a hostile connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

fn relay() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bench-relay"))
}

fn short_options() -> Options {
    let mut options = Options::from_args(["--quick"]);
    options.warmup = Duration::from_millis(20);
    options.measure = Duration::from_millis(100);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_case_measures_something() {
    let options = short_options();
    let cases = [
        Case::Notify { body: 128 },
        Case::FixedRate {
            body: 128,
            rate: 5_000,
        },
        Case::SendPipelined {
            body: 128,
            outstanding: 16,
            peer: SendPeer::Publish,
        },
        Case::FanOutAll {
            receivers: 3,
            body: 128,
        },
        Case::FanOutGroup {
            receivers: 2,
            body: 64,
        },
        Case::AnyOf {
            members: 3,
            body: 100,
        },
        Case::RequestLatency { body: 128 },
        Case::RequestRate {
            body: 128,
            outstanding: 8,
        },
        Case::Bulk {
            body: 1 << 20,
            path: BulkPath::Server,
        },
    ];
    for case in cases {
        let m = tokio::time::timeout(CASE_TIMEOUT, relay_cases::run(case, &options, &relay()))
            .await
            .unwrap_or_else(|_| panic!("{case} did not finish"));
        println!("relay {case}: {m} {}", case.unit());
        assert!(m.outcome.value().is_some_and(|v| v > 0.0), "{case}: {m}");
        assert_eq!(m.lost, 0, "{case}: {m}");
    }
    for case in [
        Case::Session { body: 128 },
        Case::Bulk {
            body: 1 << 20,
            path: BulkPath::Lazy,
        },
    ] {
        let m = relay_cases::run(case, &options, &relay()).await;
        assert_eq!(m.outcome, Outcome::Skipped("n/a".to_owned()), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_relay_binary_fails_the_case() {
    let m = relay_cases::run(
        Case::Notify { body: 128 },
        &short_options(),
        &PathBuf::from("/nonexistent/bench-relay"),
    )
    .await;
    assert!(matches!(m.outcome, Outcome::Failed(_)), "{m}");
}

/// A connection the relay should close without a word: anything read
/// before the end fails the test.
async fn assert_closed(mut stream: TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(CLOSE_TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: the relay answered {:?}", &buf[..n]),
        Err(_) => panic!("{what}: the relay kept the connection open"),
    }
}

/// A connection that has sent `hello` (no welcome awaited).
async fn hello(relay: std::net::SocketAddr, hello: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(relay).await.expect("connect");
    stream.write_all(hello).await.expect("hello");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_closed_and_the_relay_serves_on() {
    let process = relay_cases::start_relay(&relay(), Stdio::piped())
        .await
        .expect("relay starts");
    let addr = process.addr();

    // Refused at hello: none at all, id 0, a reserved id, an id in use.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    silent.shutdown().await.expect("shutdown");
    assert_closed(silent, "no hello").await;
    assert_closed(hello(addr, &0u32.to_be_bytes()).await, "id 0").await;
    assert_closed(hello(addr, &ALL.to_be_bytes()).await, "id ALL").await;
    let holder = relay_cases::connect(addr, 500).await.expect("id 500");
    assert_closed(hello(addr, &500u32.to_be_bytes()).await, "id 500 again").await;

    // Closed on a bad frame: a length past the limit (nothing allocated
    // for it), a payload without a destination, a frame cut off by the
    // end of the stream, and garbage after frames to nobody (those are
    // dropped and counted first).
    let mut oversized = relay_cases::connect(addr, 501).await.expect("id 501");
    let too_long = u32::try_from(MAX_PAYLOAD + 1).expect("fits");
    oversized
        .write_all(&too_long.to_be_bytes())
        .await
        .expect("write");
    assert_closed(oversized, "oversized length").await;
    let mut short = relay_cases::connect(addr, 502).await.expect("id 502");
    short.write_all(&[0, 0, 0, 2, 1, 2]).await.expect("write");
    assert_closed(short, "no destination").await;
    let mut cut = relay_cases::connect(addr, 503).await.expect("id 503");
    cut.write_all(&[0, 0, 0, 100, 0, 0, 1, 244, 1, 2, 3])
        .await
        .expect("write");
    cut.shutdown().await.expect("shutdown");
    assert_closed(cut, "a frame cut off").await;
    let mut garbage = relay_cases::connect(addr, 504).await.expect("id 504");
    let mut nobody = Vec::new();
    for _ in 0..3 {
        nobody.extend_from_slice(&[0, 0, 0, 6, 0, 0, 0x27, 0x0F, 0xAA, 0xBB]);
    }
    garbage.write_all(&nobody).await.expect("write");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .expect("write");
    assert_closed(garbage, "garbage").await;

    // The relay still carries a normal run.
    let m = tokio::time::timeout(
        CASE_TIMEOUT,
        relay_cases::run_at(Case::Notify { body: 128 }, &short_options(), addr),
    )
    .await
    .expect("notify finishes");
    assert!(m.outcome.value().is_some_and(|v| v > 0.0), "{m}");
    drop(holder);

    let stderr = process.stop().await.expect("the relay exits cleanly");
    assert!(
        stderr.contains(
            "4 connections refused at hello, 4 closed on a bad frame, \
             3 frames dropped (no such client)"
        ),
        "{stderr}"
    );
}

/// [`suite::FIXED_RATE_PERCENT`] of `rate`, as a fixed rate.
fn share(rate: f64) -> u64 {
    (rate * suite::FIXED_RATE_PERCENT as f64 / 100.0) as u64
}

/// Every case of a quick suite run that goes through a server, with the
/// suite's quick phases: the relay beside direct raw TCP and clustercomm
/// (the fixed-rate case at half of each system's own notify rate, as in
/// the suite). Run in release with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "about half a minute; prints relay, raw and ours numbers"]
async fn quick_phases_beside_raw_and_ours() {
    let options = Options::from_args(["--quick"]);
    let server = PathBuf::from(env!("CARGO_BIN_EXE_bench-message-server"));
    let (mut relay_notify, mut ours_notify) = (0.0, 0.0);
    println!("| case | unit | relay | raw direct | ours | ours/relay |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for case in suite::cases(true) {
        if !case.through_server() {
            continue;
        }
        let Some(relay_case) = System::Relay.pattern(case) else {
            continue;
        };
        let relay_case = relay_case.at_rate(share(relay_notify));
        let relayed = relay_cases::run(relay_case, &options, &relay()).await;
        let raw = match System::Raw.pattern(case) {
            Some(raw_case) => raw_cases::run(raw_case, &options).await.to_string(),
            None => "n/a".to_owned(),
        };
        let ours_case = System::Ours.pattern(case).unwrap_or(case);
        let ours_case = ours_case.at_rate(share(ours_notify));
        let ours = match ours::run(ours_case, &options, &server, None).await {
            Ok((m, _)) => m,
            Err(e) => suite::Measurement::failed(format!("{e:#}")),
        };
        if case == (Case::Notify { body: 128 }) {
            relay_notify = relayed.outcome.value().unwrap_or(0.0);
            ours_notify = ours.outcome.value().unwrap_or(0.0);
        }
        let ratio = match (ours.outcome.value(), relayed.outcome.value()) {
            (Some(o), Some(r)) if o > 0.0 && case.is_latency() => format!("{:.2}x", r / o),
            (Some(o), Some(r)) if r > 0.0 => format!("{:.2}x", o / r),
            _ => "-".to_owned(),
        };
        println!(
            "| {case} | {} | {relayed} | {raw} | {ours} | {ratio} |",
            case.unit()
        );
        assert!(
            relayed.outcome.value().is_some_and(|v| v > 0.0),
            "{case}: {relayed}"
        );
    }
}
