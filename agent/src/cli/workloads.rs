//! The running agent's workloads: `submit`, `shadow`, `rollback` (break-glass), `workloads`,
//! `logs`, `stop`.

use std::path::Path;

use anyhow::Context as _;
use quadrant::{
    config::Config,
    control::Client,
    signing::{Envelope, SignatureError},
};

use super::{Output, render};

fn envelope(file: &Path) -> anyhow::Result<Envelope> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(serde_json::from_str(&text).map_err(|e| SignatureError::Malformed(e.to_string()))?)
}

/// `quadrant submit ENVELOPE [--shadow]`.
pub fn submit(config: &Config, file: &Path, shadow: bool) -> anyhow::Result<()> {
    let s = Client::new(config.socket_path()).submit(envelope(file)?, shadow)?;
    if let Some(why) = &s.shadow {
        let live = s
            .status
            .name
            .strip_suffix(quadrant::identity::attest::SHADOW_SUFFIX)
            .unwrap_or(&s.status.name);
        println!(
            "started {live} generation {} as a shadow of the live generation, as {} ({why}); \
             `quadrant shadow` compares them",
            s.status.generation, s.status.name
        );
        return Ok(());
    }
    println!(
        "started {} generation {} as {} (pid {}, signed by {}, audit record {})",
        s.status.name,
        s.status.generation,
        s.spiffe_id,
        s.status.pid.map_or_else(|| "-".into(), |p| p.to_string()),
        s.signer,
        s.audit_seq.map_or_else(|| "-".into(), |s| s.to_string())
    );
    Ok(())
}

/// What `quadrant shadow` does besides listing.
#[derive(Debug, clap::Subcommand)]
pub enum ShadowCommand {
    /// List the shadow generations with their figures and verdicts (the default).
    List,
    /// Make the shadow's generation the live one (the workload restarts at it).
    Promote {
        /// `<quadrant>/<workload>`.
        workload: String,
    },
    /// Stop the shadow; the live generation stays.
    Reject {
        /// `<quadrant>/<workload>`.
        workload: String,
    },
}

/// `quadrant shadow [list|promote W|reject W]`.
pub fn shadow(
    config: &Config,
    command: Option<ShadowCommand>,
    output: Output,
) -> anyhow::Result<()> {
    use quadrant::shadow::Decision;
    let client = Client::new(config.socket_path());
    let (workload, decision) = match command.unwrap_or(ShadowCommand::List) {
        ShadowCommand::List => {
            let report = client.shadows()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Text => print!("{}", quadrant::shadow::render(&report)),
            }
            return Ok(());
        }
        ShadowCommand::Promote { workload } => (workload, Decision::Promoted),
        ShadowCommand::Reject { workload } => (workload, Decision::Rejected),
    };
    let report = client.shadow_decide(workload, decision)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => println!(
            "{} generation {} {} (the figures said {:?})",
            report.workload,
            report.shadow.generation.unwrap_or_default(),
            match decision {
                Decision::Promoted => "promoted: it is the live generation now",
                Decision::Rejected => "rejected: the shadow stopped, the live generation stays",
            },
            report.verdict
        ),
    }
    Ok(())
}

/// `quadrant rollback --authorization A --plan P`.
pub fn rollback(config: &Config, authorization: &Path, plan: &Path) -> anyhow::Result<()> {
    let s =
        Client::new(config.socket_path()).rollback(envelope(authorization)?, envelope(plan)?)?;
    println!(
        "rolled back {} to generation {} as {} (break-glass, recorded in the audit log)",
        s.status.name, s.status.generation, s.spiffe_id
    );
    Ok(())
}

/// `quadrant workloads`.
pub fn list(config: &Config, output: Output) -> anyhow::Result<()> {
    let list = Client::new(config.socket_path()).workloads()?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        Output::Text => print!("{}", render::workloads(&list)),
    }
    Ok(())
}

/// `quadrant logs NAME`.
pub fn logs(config: &Config, name: &str) -> anyhow::Result<()> {
    let w = Client::new(config.socket_path())
        .workloads()?
        .into_iter()
        .find(|w| w.name == name)
        .with_context(|| format!("no workload {name}; see `quadrant workloads`"))?;
    print!(
        "{}",
        std::fs::read_to_string(&w.log)
            .with_context(|| format!("cannot read {}", w.log.display()))?
    );
    Ok(())
}

/// `quadrant stop NAME`.
pub fn stop(config: &Config, name: &str) -> anyhow::Result<()> {
    let s = Client::new(config.socket_path()).stop(name)?;
    println!(
        "stopped {} ({})",
        s.name,
        s.last_exit.unwrap_or_else(|| "not running".into())
    );
    Ok(())
}
