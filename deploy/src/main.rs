//! `quadrant-deploy` (run by `cargo xtask deploy`): Kubernetes manifests, or a node install.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use quadrant_deploy::{ClusterPeers, METRICS_PORT, cluster_config, image, kubernetes, node};

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
        /// Make the nodes each other's peers (lanes between nodes), found through the API; the
        /// upstream CA every node's CA chains to comes from this Secret (`kubectl -n NS create
        /// secret tls NAME --cert ROOT.pem --key ROOT.key`).
        #[arg(long, value_name = "SECRET")]
        peers_upstream_secret: Option<String>,
        /// A node's block of quadrant prefixes (four equal quarters: dx, dg, px, pg), as
        /// NODE=CIDR; repeat it for every node (with --peers-upstream-secret).
        #[arg(long, value_name = "NODE=CIDR", requires = "peers_upstream_secret")]
        node_prefix: Vec<String>,
    },
    /// Build the agent's container image (a Debian base with iproute2 and the binaries).
    Image {
        /// The image's name and tag (the manifests' default).
        #[arg(long, default_value = concat!("quadrant:", env!("CARGO_PKG_VERSION")))]
        tag: String,
        /// Where the built binaries are.
        #[arg(long)]
        bin_dir: PathBuf,
        /// `podman` or `docker` (default: the first found).
        #[arg(long)]
        engine: Option<String>,
        /// The Debian release of the base (default: this host's).
        #[arg(long)]
        suite: Option<String>,
        /// The Debian mirror.
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
        /// Where the base is kept between builds.
        #[arg(long, default_value = "target/image")]
        work_dir: PathBuf,
        /// Also write the image to this archive (`ctr -n k8s.io images import FILE` on a node).
        #[arg(long)]
        save: Option<PathBuf>,
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
            peers_upstream_secret,
            node_prefix,
        } => {
            let peers = match &peers_upstream_secret {
                Some(secret) => Some(ClusterPeers {
                    upstream_secret: secret.clone(),
                    node_prefixes: node_prefix
                        .iter()
                        .map(|p| {
                            let (n, c) = p.split_once('=').ok_or_else(|| {
                                anyhow::anyhow!("--node-prefix {p:?}: expected NODE=CIDR")
                            })?;
                            let block: ipnet::Ipv4Net = c.parse().map_err(|e| {
                                anyhow::anyhow!("--node-prefix {p:?}: {c:?} is no IPv4 CIDR: {e}")
                            })?;
                            anyhow::ensure!(
                                block.prefix_len() <= 28,
                                "--node-prefix {p:?}: at most /28, so each quadrant has a /30"
                            );
                            Ok((n.to_owned(), block.trunc().to_string()))
                        })
                        .collect::<anyhow::Result<_>>()?,
                }),
                None => None,
            };
            let files = kubernetes::render(&kubernetes::Options {
                namespace,
                image,
                config: cluster_config(peers.as_ref())?,
                metrics_port: METRICS_PORT,
                upstream_secret: peers_upstream_secret,
            })?;
            std::fs::create_dir_all(&out)?;
            for (name, text) in files {
                std::fs::write(out.join(&name), text)?;
                println!("{}", out.join(name).display());
            }
        }
        Task::Image {
            tag,
            bin_dir,
            engine,
            suite,
            mirror,
            work_dir,
            save,
        } => {
            let built = image::build(&image::Options {
                tag,
                bin_dir,
                engine,
                suite,
                mirror,
                work_dir,
                save: save.clone(),
            })?;
            println!(
                "{} {} ({}, Debian {} base)",
                built.tag, built.id, built.engine, built.suite
            );
            if let Some(to) = save {
                println!("saved to {}", to.display());
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
