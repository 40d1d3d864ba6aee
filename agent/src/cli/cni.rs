//! `quadrant pods` and `quadrant cni install|uninstall`.

use std::path::PathBuf;

use clap::Subcommand;
use quadrant::{cni::conflist, config::Config, control::Client};

use super::Output;

/// Chaining `quadrant-cni` into the node's network configuration.
#[derive(Debug, Subcommand)]
pub enum CniCommand {
    /// Append `quadrant-cni` to the primary conflist of the directory (the first by name, as
    /// the runtime picks it), atomically; again, it replaces our entry and nothing else.
    Install {
        /// The CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The quadrant of pods without the `quadrant.io/quadrant` annotation (none: such pods
        /// fail to start).
        #[arg(long)]
        quadrant: Option<String>,
    },
    /// Remove the `quadrant-cni` entries (only those) from the directory's conflists.
    Uninstall {
        /// The CNI configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

/// `quadrant cni …`.
pub fn run(config: &Config, command: CniCommand) -> anyhow::Result<()> {
    match command {
        CniCommand::Install { conf_dir, quadrant } => {
            let (path, changed) =
                conflist::install(&conf_dir, quadrant.as_deref(), &config.socket_path())
                    .map_err(anyhow::Error::msg)?;
            if changed {
                println!("quadrant-cni chained into {}", path.display());
            } else {
                println!("quadrant-cni already chained into {}", path.display());
            }
        }
        CniCommand::Uninstall { conf_dir } => {
            let changed = conflist::uninstall(&conf_dir).map_err(anyhow::Error::msg)?;
            if changed.is_empty() {
                println!("no conflist in {} chains quadrant-cni", conf_dir.display());
            }
            for p in changed {
                println!("quadrant-cni removed from {}", p.display());
            }
        }
    }
    Ok(())
}

/// `quadrant pods`.
pub fn pods(config: &Config, output: Output) -> anyhow::Result<()> {
    let pods = Client::new(config.socket_path()).pods()?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&pods)?),
        Output::Text => {
            println!(
                "{:<4} {:<16} {:<24} {:<8} {:<18} ADDRESSES",
                "QUAD", "HOST-IF", "CONTAINER", "IFNAME", "PROGRAMS"
            );
            for p in pods {
                let s = &p.spec;
                let id: String = s.container_id.chars().take(24).collect();
                let addrs: Vec<String> = s.addresses.iter().map(ToString::to_string).collect();
                let hooks: Vec<&str> = p.programs.iter().map(|a| a.hook.as_str()).collect();
                println!(
                    "{:<4} {:<16} {:<24} {:<8} {:<18} {}",
                    s.quadrant,
                    s.host_ifname,
                    id,
                    s.ifname,
                    hooks.join(","),
                    addrs.join(" ")
                );
            }
        }
    }
    Ok(())
}
