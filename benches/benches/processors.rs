//! Processors: messages handled per second by a service served with 4
//! processors against the same service with 1, on a handler that spends
//! 20 µs of CPU per message, three senders keeping 256 acknowledged sends
//! each in flight, through a message server in this process. The two
//! configurations take turns, round by round; the table gives each one's
//! median and range and the ratio of the medians.
//!
//! `cargo bench -p clustercomm-benches --bench processors [-- --quick]`
//!
//! The measurement lives in [`clustercomm_benches::processors`], which the
//! suite runs too (its `processors` case, against a `bench-message-server`
//! process: `--bench suite -- --quick processors`). This is the thin
//! wrapper that prints its table.

use std::time::Duration;

use anyhow::Context;
use clustercomm_benches::processors::{self, Plan, Topology, WORKERS};

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("building the runtime")?;
    let result = runtime.block_on(async move { tokio::spawn(run(quick)).await });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result.context("benchmark task panicked")?
}

async fn run(quick: bool) -> anyhow::Result<()> {
    let plan = Plan::new(quick, None);
    println!("# processors: {}", plan.header(Topology::InProcess));
    let comparison = processors::run(&plan, Topology::InProcess).await?;
    println!();
    println!("{}", comparison.table());
    Ok(())
}
