//! Policy and admission: `policy test|check|eval|flows|sign|reload`, `admit`, `audit verify`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use quadrant::{config::Config, control::Client};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run every `test_*` rule of the bundle, as `opa test` does.
    Test,
    /// Report quadrant or local allows that a global deny overrides (with both sources), and
    /// rules placed in a layer that does not own them. Fails if there are any.
    Check,
    /// Evaluate a decision for an input document and print it with the rules that produced it:
    /// a flow `{"from","to","protocol","port"}`, or an admission review `{"review": {...}}`.
    Eval {
        /// JSON or YAML input file.
        #[arg(long, short)]
        input: PathBuf,
        /// Query instead of the decision chosen by the input's shape.
        #[arg(long, short)]
        query: Option<String>,
    },
    /// Print the flows the kernel enforces.
    Flows,
    /// Sign the `policy_dir` bundle with a policy key (writes `<policy_dir>/bundle.dsse.json`).
    Sign {
        /// Ed25519 PKCS#8 key with the `policy` role for every quadrant.
        #[arg(long)]
        key: PathBuf,
    },
    /// Ask the running agent to re-evaluate the bundle and make it live at once (SIGHUP does
    /// the same); the current policy stays if the new one does not evaluate.
    Reload,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of the audit log (the configured one, or FILE).
    Verify {
        /// Log file instead of the configured `audit_log`.
        #[arg(long)]
        log: Option<PathBuf>,
    },
}

pub fn policy(config: &Config, command: PolicyCommand) -> anyhow::Result<()> {
    let bundle = || quadrant::policy::PolicyBundle::for_config(config);
    match command {
        PolicyCommand::Test => {
            let bundle = bundle()?;
            let results = bundle.run_tests()?;
            let failed: Vec<_> = results.iter().filter(|r| !r.passed).collect();
            for r in &results {
                match &r.error {
                    None => println!("PASS {}", r.name),
                    Some(e) => println!("FAIL {} ({e})", r.name),
                }
            }
            println!(
                "{} passed, {} failed ({})",
                results.len() - failed.len(),
                failed.len(),
                bundle.origin()
            );
            if !failed.is_empty() {
                bail!("{} policy test(s) failed", failed.len());
            }
            Ok(())
        }
        PolicyCommand::Check => {
            let report = bundle()?.check(&config.policy)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.conflicts.is_empty() || !report.misplaced.is_empty() {
                bail!(
                    "{} conflict(s) (a global deny overrides an allow) and {} misplaced rule(s)",
                    report.conflicts.len(),
                    report.misplaced.len()
                );
            }
            Ok(())
        }
        PolicyCommand::Eval { input, query } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("cannot read {}", input.display()))?;
            let value: serde_json::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is neither JSON nor YAML", input.display()))?;
            let (q, decision) = bundle()?.eval(&config.policy, &value, query.as_deref())?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "query": q, "result": decision })
                )?
            );
            Ok(())
        }
        PolicyCommand::Sign { key } => {
            let dir = config.policy_dir.as_ref().context("policy sign needs policy_dir in the configuration (the embedded bundle is part of the binary)")?;
            let bundle = quadrant::policy::PolicyBundle::from_dir(dir)?;
            let key = quadrant::signing::SigningKey::load(&key)?;
            let path = dir.join(quadrant::policy::SIGNATURE_FILE);
            std::fs::write(&path, serde_json::to_string_pretty(&bundle.sign(&key))?)?;
            println!(
                "signed bundle sha256:{} with key {}: {}",
                bundle.digest(),
                key.id(),
                path.display()
            );
            Ok(())
        }
        PolicyCommand::Reload => {
            let (state, slot) = Client::new(config.socket_path()).policy_reload()?;
            println!("policy {state} (live slot {slot})");
            Ok(())
        }
        PolicyCommand::Flows => {
            for f in bundle()?.flows(&config.policy)? {
                println!("{}", serde_json::to_string(&f)?);
            }
            Ok(())
        }
    }
}

/// `quadrant admit --review R --svid S`: fails when the workload is rejected.
pub fn admit(config: &Config, review: &Path, svid: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(review)
        .with_context(|| format!("cannot read {}", review.display()))?;
    let review_doc: serde_json::Value = serde_yaml::from_str(&text)
        .with_context(|| format!("{} is neither JSON nor YAML", review.display()))?;
    let pem =
        std::fs::read_to_string(svid).with_context(|| format!("cannot read {}", svid.display()))?;
    let decision = Client::new(config.socket_path()).admit(review_doc, pem)?;
    println!("{}", serde_json::to_string_pretty(&decision)?);
    if !decision.allowed {
        let why = decision.why();
        bail!("rejected: {why}");
    }
    Ok(())
}

/// `quadrant audit verify [--log FILE]`.
pub fn audit(config: &Config, command: AuditCommand) -> anyhow::Result<()> {
    let AuditCommand::Verify { log } = command;
    let path = log.unwrap_or_else(|| config.audit_log.clone());
    let n = quadrant::audit::verify(&path)?;
    println!("audit log {}: {n} records, chain intact", path.display());
    Ok(())
}
