//! The README's configuration reference is the code's defaults.

use anyhow::Context;
use cluster_config::Config;

#[test]
fn config_reference_matches_the_defaults() -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let section = readme
        .split("## Configuration reference")
        .nth(1)
        .context("no configuration reference")?;
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .context("no toml block in the configuration reference")?;
    let parsed = Config::parse(block, "README.md")?;
    assert_eq!(parsed, Config::default());
    Ok(())
}
