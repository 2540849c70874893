//! The scale benchmark: `cargo bench -p clustercomm-benches --bench scale`
//! runs 100, 1,000 and 5,000 nodes; `-- 200 2000` runs the sizes given.
//! See [`clustercomm_benches::scale`] for what each step measures.

use anyhow::Context;
use clustercomm_benches::scale;

fn main() -> anyhow::Result<()> {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| {
            a.parse()
                .with_context(|| format!("{a:?} is not a node count"))
        })
        .collect::<anyhow::Result<_>>()?;
    if sizes.is_empty() {
        sizes = vec![100, 1000, 5000];
    }
    let dir = std::env::temp_dir().join(format!("clustercomm-scale-{}", std::process::id()));
    let mut reports = Vec::new();
    for n in sizes {
        eprintln!("scale: {n} nodes");
        // About 200,000 deliveries a size.
        let broadcasts = (200_000 / n).clamp(10, 2000);
        let report = scale::run(n, &dir, broadcasts);
        let _ = std::fs::remove_dir_all(&dir);
        reports.push(report.with_context(|| format!("{n} nodes"))?);
        println!("{}", scale::table(&reports));
    }
    Ok(())
}
