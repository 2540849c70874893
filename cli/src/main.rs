//! `clustercomm`: the admin command of a clustercomm cluster.
//!
//! `clustercomm certs --out DIR NAME...` makes the cluster's CA and a
//! certificate for the message server and for each node, for `[tls]`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// The clustercomm admin command.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Makes a CA, the message server's certificate and one per node.
    Certs {
        /// Where to write them (created if missing).
        #[arg(long, short)]
        out: PathBuf,
        /// The cluster's name, in the CA's name.
        #[arg(long, default_value = "clustercomm")]
        cluster: String,
        /// The name the message server's certificate carries
        /// (`tls.server_name`).
        #[arg(long, default_value = "message-server")]
        server_name: String,
        /// The node ids to make certificates for.
        #[arg(required = true)]
        nodes: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Certs {
            out,
            cluster,
            server_name,
            nodes,
        } => {
            let mut names = vec![server_name.clone()];
            names.extend(nodes);
            let written = clustercomm::certs::generate(&out, &cluster, &names)
                .with_context(|| format!("making certificates in {}", out.display()))?;
            println!(
                "CA certificate: {} (its key ca.key: keep it offline)",
                written.ca.display()
            );
            for (name, cert, key) in &written.issued {
                println!("{name}: {} {}", cert.display(), key.display());
            }
            println!();
            println!("[tls]");
            println!("ca_file = {:?}", written.ca.display().to_string());
            if let Some((_, cert, key)) = written.issued.first() {
                println!("cert_file = {:?}", cert.display().to_string());
                println!("key_file = {:?}", key.display().to_string());
            }
            println!("server_name = {server_name:?}");
            for (name, cert, key) in written.issued.iter().skip(1) {
                println!();
                println!("[nodes.{name}.tls]");
                println!("cert_file = {:?}", cert.display().to_string());
                println!("key_file = {:?}", key.display().to_string());
            }
            Ok(())
        }
    }
}
