//! The scale benchmark in reduced form (issue 20): 100 and then 200 nodes,
//! in `bench-nodes` processes on one `bench-message-server`. Every node
//! sees every member, every broadcast arrives everywhere, a killed node is
//! known gone everywhere, every node registers again after the server
//! restarts, and the membership traffic of a join grows linearly with the
//! cluster (its bytes per member stay flat), not quadratically. The
//! timings are the benchmark's business (`--bench scale`), not asserted
//! here.

use clustercomm_benches::scale::{self, ScaleReport, LATE_JOINERS};

fn run(nodes: usize) -> ScaleReport {
    let dir = std::env::temp_dir().join(format!(
        "clustercomm-scale-test-{}-{nodes}",
        std::process::id()
    ));
    let report = scale::run(nodes, &dir, 20);
    let _ = std::fs::remove_dir_all(&dir);
    match report {
        Ok(report) => report,
        Err(e) => panic!("{nodes} nodes: {e:#}"),
    }
}

#[test]
fn two_hundred_nodes_converge_and_joins_cost_linear_traffic() {
    let small = run(100);
    let large = run(200);
    eprintln!("{}", scale::table(&[small.clone(), large.clone()]));
    for r in [&small, &large] {
        assert_eq!(
            r.broadcast_counted.1, r.broadcast_counted.0,
            "{} nodes: broadcasts lost",
            r.nodes
        );
    }
    let per_member = |r: &ScaleReport| r.bytes_per_join / (r.nodes + LATE_JOINERS) as f64;
    let ratio = per_member(&large) / per_member(&small);
    // Linear: the bytes of a join per member stay about the same when the
    // cluster doubles (a full list to everyone would double them).
    assert!(
        (0.6..1.5).contains(&ratio),
        "bytes per join per member went from {:.0} to {:.0} (x{ratio:.2}) when the cluster doubled",
        per_member(&small),
        per_member(&large)
    );
}
