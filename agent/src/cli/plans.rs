//! Plans and keys, offline: `plan schema|validate|sign|authorize-rollback|verify`, `keys
//! generate|trust|list`.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use dataplane_common::Quadrant;
use quadrant::config::Config;

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Print the plan JSON Schema (published as manifests/schemas/plan.schema.json).
    Schema,
    /// Validate a plan (JSON or YAML) against the schema.
    Validate {
        /// The plan.
        file: PathBuf,
    },
    /// Sign a plan with a key: prints the DSSE envelope (JSON).
    Sign {
        /// The plan.
        file: PathBuf,
        /// Ed25519 PKCS#8 key file (its stem is the key id).
        #[arg(long)]
        key: PathBuf,
    },
    /// Sign a break-glass rollback authorization with a break-glass key: prints the envelope.
    AuthorizeRollback {
        /// dx, dg, px or pg.
        #[arg(long)]
        quadrant: String,
        /// Workload name.
        #[arg(long)]
        workload: String,
        /// Generation to return to.
        #[arg(long)]
        generation: u64,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// How long the authorization stays valid, seconds.
        #[arg(long, default_value_t = 3600)]
        valid_for_secs: u64,
        /// Ed25519 PKCS#8 break-glass key.
        #[arg(long)]
        key: PathBuf,
    },
    /// Verify a signed plan (envelope) against the trust store, offline.
    Verify {
        /// The envelope.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate an Ed25519 key: `<out>/<id>.pk8` (private, 0600) and `<out>/<id>.json` (the
    /// trust document to install with `quadrant keys trust`).
    Generate {
        /// Key id.
        #[arg(long)]
        id: String,
        /// What it may sign: plan, artifact, break-glass (repeatable).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// For which quadrants (repeatable).
        #[arg(long = "quadrant", required = true)]
        quadrants: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Install a trust document into the trust store.
    Trust {
        /// `<id>.json`.
        file: PathBuf,
    },
    /// List the trusted keys.
    List,
}

pub fn plan(config: &Config, command: PlanCommand) -> anyhow::Result<()> {
    use quadrant::{plans, signing};
    let read = |f: &PathBuf| {
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))
    };
    match command {
        PlanCommand::Schema => {
            println!("{}", serde_json::to_string_pretty(&plans::schema())?);
            Ok(())
        }
        PlanCommand::Validate { file } => {
            let p = plans::parse(&read(&file)?)?;
            println!(
                "valid: {}/{} generation {}",
                Quadrant::from(p.quadrant).name(),
                p.workload,
                p.generation
            );
            Ok(())
        }
        PlanCommand::Sign { file, key } => {
            let p = plans::parse(&read(&file)?)?;
            let key = signing::SigningKey::load(&key)?;
            println!("{}", serde_json::to_string_pretty(&plans::sign(&p, &key))?);
            Ok(())
        }
        PlanCommand::AuthorizeRollback {
            quadrant,
            workload,
            generation,
            reason,
            valid_for_secs,
            key,
        } => {
            let q: plans::QuadrantName =
                serde_json::from_value(serde_json::Value::String(quadrant.clone()))
                    .with_context(|| format!("unknown quadrant {quadrant:?}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let rollback = plans::Rollback {
                quadrant: q,
                workload,
                target_generation: generation,
                reason,
                expires_at: now + valid_for_secs,
            };
            let key = signing::SigningKey::load(&key)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&plans::sign_rollback(&rollback, &key))?
            );
            Ok(())
        }
        PlanCommand::Verify { file } => {
            let envelope: signing::Envelope = serde_json::from_str(&read(&file)?)
                .map_err(|e| signing::SignatureError::Malformed(e.to_string()))?;
            let trust = signing::TrustStore::load(&config.trust_store)?;
            let (p, key) = plans::verify(&envelope, &trust)?;
            println!(
                "verified: {}/{} generation {} signed by {key}",
                Quadrant::from(p.quadrant).name(),
                p.workload,
                p.generation
            );
            Ok(())
        }
    }
}

pub fn keys(config: &Config, command: KeysCommand) -> anyhow::Result<()> {
    use quadrant::signing::{Role, SigningKey, TrustStore, TrustedKey};
    match command {
        KeysCommand::Generate {
            id,
            roles,
            quadrants,
            out,
        } => {
            if !quadrant::artifacts::valid_name(&id) {
                bail!("invalid key id {id:?}: use a-z, 0-9, '.', '_', '-'");
            }
            let roles: Vec<Role> = roles
                .iter()
                .map(|r| {
                    serde_json::from_value(serde_json::Value::String(r.clone())).with_context(
                        || format!("unknown role {r:?}; expected plan, artifact, break-glass, policy or dataplane"),
                    )
                })
                .collect::<anyhow::Result<_>>()?;
            let qs: Vec<Quadrant> = quadrants
                .iter()
                .map(|q| Quadrant::from_name(q).with_context(|| format!("unknown quadrant {q:?}")))
                .collect::<anyhow::Result<_>>()?;
            let (key, pkcs8) = SigningKey::generate(&id)?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let private = out.join(format!("{id}.pk8"));
            {
                use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&private)
                    .with_context(|| {
                        format!(
                            "cannot create {} (it must not exist yet)",
                            private.display()
                        )
                    })?;
                f.write_all(&pkcs8)?;
            }
            let public = out.join(format!("{id}.json"));
            std::fs::write(
                &public,
                serde_json::to_string_pretty(&key.trusted(roles, &qs))?,
            )?;
            println!(
                "private key {} (keep it secret)
trust document {}",
                private.display(),
                public.display()
            );
            Ok(())
        }
        KeysCommand::Trust { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let doc: TrustedKey = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a trust document", file.display()))?;
            if doc
                .quadrants
                .iter()
                .any(|q| Quadrant::from_name(q).is_none())
                || doc.roles.is_empty()
            {
                bail!(
                    "{}: quadrants must be dx, dg, px or pg and roles must not be empty",
                    file.display()
                );
            }
            std::fs::create_dir_all(&config.trust_store)?;
            let dest = config.trust_store.join(format!("{}.json", doc.id));
            std::fs::write(&dest, serde_json::to_string_pretty(&doc)?)?;
            TrustStore::load(&config.trust_store)?;
            println!("trusted key {} ({})", doc.id, dest.display());
            Ok(())
        }
        KeysCommand::List => {
            for k in TrustStore::load(&config.trust_store)?.keys() {
                let roles: Vec<String> = k
                    .roles
                    .iter()
                    .filter_map(|r| {
                        serde_json::to_value(r)
                            .ok()?
                            .as_str()
                            .map(ToOwned::to_owned)
                    })
                    .collect();
                println!(
                    "{}	roles {}	quadrants {}",
                    k.id,
                    roles.join(","),
                    k.quadrants.join(",")
                );
            }
            Ok(())
        }
    }
}
