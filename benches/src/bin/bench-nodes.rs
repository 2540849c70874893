//! `bench-nodes`: many clustercomm nodes in one process, for the scale
//! benchmark ([`clustercomm_benches::scale`]).
//!
//! ```text
//! bench-nodes --server ADDR --config FILE --prefix P --count N
//! ```
//!
//! Starts nodes `P-0` .. `P-(N-1)` against the message server at `ADDR`,
//! prints `started N`, then answers the commands on its stdin described
//! in [`clustercomm_benches::scale::serve_nodes`] until stdin ends.

fn main() -> anyhow::Result<()> {
    let args = clustercomm_benches::scale::NodesArgs::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(clustercomm_benches::scale::serve_nodes(
        args.server,
        &args.config,
        &args.prefix,
        args.count,
    ))?;
    // Nodes are not shut down one by one: the process ends, and the
    // server sees the connections close.
    std::process::exit(0)
}
