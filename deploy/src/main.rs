//! `quadrant-deploy` (run by `cargo xtask deploy`): Kubernetes manifests, or a node install.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use quadrant_deploy::{METRICS_PORT, kubernetes, node, node_config};

#[derive(Debug, Parser)]
#[command(about = "quadrant deployment")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write the Kubernetes manifests (and a kustomization) into DIR.
    Render {
        /// Where.
        #[arg(long)]
        out: PathBuf,
        /// The namespace.
        #[arg(long, default_value = "quadrant-system")]
        namespace: String,
        /// The agent's image (holding /usr/local/bin/quadrant and quadrant-cni).
        #[arg(long, default_value = concat!("quadrant:", env!("CARGO_PKG_VERSION")))]
        image: String,
    },
    /// Install the binaries, the systemd unit and the configuration on this host.
    Node {
        /// Install under this root instead of `/`.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the built binaries are.
        #[arg(long)]
        bin_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Render {
            out,
            namespace,
            image,
        } => {
            let files = kubernetes::render(&kubernetes::Options {
                namespace,
                image,
                config: node_config(true)?,
                metrics_port: METRICS_PORT,
            })?;
            std::fs::create_dir_all(&out)?;
            for (name, text) in files {
                std::fs::write(out.join(&name), text)?;
                println!("{}", out.join(name).display());
            }
        }
        Task::Node { root, bin_dir } => {
            let done = node::install(&root, &bin_dir)?;
            for p in &done.written {
                println!("installed {}", p.display());
            }
            for p in &done.kept {
                println!("kept {} (already there)", p.display());
            }
            if root == std::path::Path::new("/") {
                println!(
                    "next: systemctl daemon-reload && systemctl enable --now quadrant \
                     (the agent chains quadrant-cni into /etc/cni/net.d at start)"
                );
            }
        }
    }
    Ok(())
}
