//! Running an instance: `up`, `down`, `status`, `exec`, the eBPF object (`verifier`,
//! `dataplane`), the verdict trace, and what the binary carries (`schema`, `default-config`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use dataplane_common::Quadrant;
use quadrant::{
    config::Config,
    control::{Client, protocol::published_schemas},
    daemon::{self, Stopped, offline},
    trace::TraceMode,
};

use super::{Output, render};

#[derive(Debug, Subcommand)]
pub enum DataplaneCommand {
    /// Print the embedded object's digest, program set and map layout versions.
    Info,
    /// Sign the embedded object (digest and versions) with KEY (a `dataplane` key for every
    /// quadrant); write the envelope to OUT, for `dataplane_signature`.
    Sign {
        /// PKCS#8 key file.
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signature.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `quadrant up`: the agent, in the foreground.
pub fn up(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(daemon::up(config, |status| {
        print!("{}", render::status(status));
        println!(
            "\nquadrant up: {} quadrants ready; control socket {}. Ctrl-C or `quadrant down` stops and removes them.",
            status.quadrants.len(),
            status.socket.display()
        );
    }))? {
        Stopped::Removed => println!("quadrant down: everything removed"),
        Stopped::DataplaneKept => {
            println!("quadrant down: the agent stopped; the dataplane keeps enforcing");
        }
    }
    Ok(())
}

/// `quadrant down [--keep-dataplane]`.
pub fn down(config: &Config, keep_dataplane: bool) -> anyhow::Result<()> {
    if keep_dataplane {
        let kept = offline::down_keep_dataplane(config)?;
        println!(
            "agent stopped; the quadrants and the dataplane (map layout {}, pins in {}) keep enforcing and {} workloads keep running ({}) until the next `quadrant up` takes them over",
            kept.map_layout,
            kept.pin_dir.display(),
            kept.handed_over_workloads.len(),
            kept.handed_over_workloads.join(", ")
        );
        return Ok(());
    }
    let removed = offline::down(config)?;
    if removed.is_empty() {
        println!("nothing to remove for instance {}", config.instance);
    }
    for r in removed {
        println!("removed {r}");
    }
    Ok(())
}

/// `quadrant status`.
pub fn status(config: &Config, output: Output) -> anyhow::Result<()> {
    let report = Client::new(config.socket_path()).status()?;
    match output {
        Output::Text => print!("{}", render::status(&report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

/// `quadrant exec`: returns only on failure.
pub fn exec(
    config: &Config,
    quadrant: &str,
    instance: u8,
    workload: Option<&str>,
    command: &[String],
) -> anyhow::Result<()> {
    let Some(q) = Quadrant::from_name(quadrant) else {
        bail!("unknown quadrant {quadrant:?}; expected dx, dg, px or pg");
    };
    Err(offline::exec(config, q, instance, workload, command))
        .with_context(|| format!("cannot run {:?} in {}", command.join(" "), q.name()))
}

/// `quadrant trace MODE`.
pub fn trace(config: &Config, mode: TraceMode) -> anyhow::Result<()> {
    let mode = Client::new(config.socket_path()).trace(mode)?;
    println!(
        "verdict trace: {} (the agent logs it under the target quadrant::trace)",
        serde_json::to_value(mode)?.as_str().unwrap_or_default()
    );
    Ok(())
}

/// `quadrant verifier`: the programs as `config` loads them (`chaos.enabled`).
pub fn verifier(config: &Config) -> anyhow::Result<()> {
    daemon::require_root("verifier")?;
    let dp = quadrant::loader::Dataplane::load_with(None, config.chaos.enabled)?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let hooks = quadrant::loader::programs::ALL
        .iter()
        .map(|(_, hook)| hook.name())
        .chain(
            quadrant::loader::programs::LANE_ACCEL
                .iter()
                .map(|(_, kind)| *kind),
        );
    println!(
        "all {} programs loaded on kernel {}",
        quadrant::loader::programs::ALL.len() + quadrant::loader::programs::LANE_ACCEL.len(),
        kernel.trim()
    );
    println!(
        "{:<22} {:<12} {:>22}",
        "PROGRAM", "HOOK", "VERIFIED INSTRUCTIONS"
    );
    for ((name, count), hook) in dp.verified_instructions()?.into_iter().zip(hooks) {
        let count = count.map_or_else(|| "n/a".to_owned(), |c| c.to_string());
        println!("{name:<22} {hook:<12} {count:>22}");
    }
    Ok(())
}

/// `quadrant dataplane`.
pub fn dataplane(command: DataplaneCommand) -> anyhow::Result<()> {
    let statement = quadrant::loader::object_statement();
    match command {
        DataplaneCommand::Info => println!("{statement}"),
        DataplaneCommand::Sign { key, out } => {
            let key = quadrant::signing::SigningKey::load(&key)?;
            let envelope = key.sign(
                quadrant::signing::DATAPLANE_PAYLOAD_TYPE,
                statement.as_bytes(),
            );
            std::fs::write(&out, serde_json::to_string_pretty(&envelope)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "signed {statement} with key {}: {}",
                key.id(),
                out.display()
            );
        }
    }
    Ok(())
}

/// `quadrant schema NAME`.
pub fn print_schema(name: &str) -> anyhow::Result<()> {
    let (_, _, schema) = published_schemas()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .with_context(|| format!("unknown schema {name:?}"))?;
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}
